#!/usr/bin/env python3
# Per-hop delay of relay trees, from the daemon logs of a kept lab run
# (docs/benchmarks.md, "A step is a hop"):
#
#   DAMSELFLY_BENCH_KEEP=1 \
#   DAMSELFLY_BENCH_LOG="info,damselfly::fetch::pieces=debug" \
#   DAMSELFLY_BENCH_QUICK=1 DAMSELFLY_BENCH_ONLY=burst DAMSELFLY_BENCH_NODES=8 \
#     cargo bench --bench swarm          # prints "kept <dir>"
#   python3 benches/relay_hops.py <dir>
#
# Each node logs when a piece's first bytes land and from whom; a relayed
# transfer's hop is the child's time less its sender's.
import re, sys, glob, datetime, statistics as st
root = sys.argv[1]
ids, first = {}, {}   # peer id -> node; (node, piece) -> (t, src, whole, waited)
def ts(s): return datetime.datetime.fromisoformat(s.rstrip('Z')).timestamp()
for log in sorted(glob.glob(root + '/node*/daemon.log')):
    node = log.split('/')[-2]
    for line in open(log):
        m = re.search(r'control plane started peer_id=(\S+)', line)
        if m: ids[m.group(1)] = node
        if "first bytes" not in line: continue
        t = ts(line.split()[0])
        k = int(re.search(r'piece=(\d+)', line).group(1))
        if 'from the origin' in line:
            first[(node, k)] = (t, None, None, None)
        else:
            p = re.search(r'peer=(\S+)', line).group(1)
            w = re.search(r'whole=(\w+)', line).group(1) == 'true'
            wt = int(re.search(r'waited_ms=(\d+)', line).group(1))
            first.setdefault((node, k), (t, p, w, wt))
relay, waited_whole, asked_late = [], [], []
for (node, k), (t, p, w, wt) in first.items():
    if p is None: continue
    parent = ids.get(p)
    if w: waited_whole.append(wt); continue
    pt = first.get((parent, k))
    if pt is None: continue
    d = (t - pt[0]) * 1000
    if t - wt / 1000 < pt[0]:   # asked before the parent had any byte
        relay.append(d)
    else:
        asked_late.append(wt)
def show(name, xs):
    if not xs: print(name, 'none'); return
    xs = sorted(xs); q = lambda f: xs[min(len(xs)-1, int(f*len(xs)))]
    print(f"{name}: n={len(xs)} median {q(0.5):.0f} ms, p10 {q(0.1):.0f}, p90 {q(0.9):.0f}, max {xs[-1]:.0f}")
show("relay hop (child's first byte - parent's first byte; child asked first)", relay)
show("asked a relay that already had bytes: wait for the first byte", asked_late)
show("asked a whole holder: wait for the first byte", waited_whole)
