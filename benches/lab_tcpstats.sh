#!/bin/bash
# While a lab bench runs (benches/swarm.rs): every 0.5 s, the TCP timeout and
# retransmission counters of each node namespace, last reading kept in
# /tmp/tcpstats/<namespace> (docs/benchmarks.md, "A step is a hop").
out=/tmp/tcpstats; rm -rf $out; mkdir -p $out
while true; do
  for ns in $(ip netns list | awk '{print $1}' | grep -E '^dfb[0-9]+-(n[0-9]+|o)$'); do
    ip netns exec $ns nstat -az TcpExtTCPTimeouts TcpRetransSegs TcpExtTCPLossProbes TcpOutSegs TcpExtTCPSpuriousRTOs 2>/dev/null | awk 'NR>1{print $1,$2}' > $out/$ns.tmp && mv $out/$ns.tmp $out/$ns
  done
  sleep 0.5
done
