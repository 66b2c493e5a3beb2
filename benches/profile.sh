#!/usr/bin/env bash
# Where one daemon's CPU goes, per stage of the byte path: perf profiles of a
# release daemon serving one blob cold (origin -> mirror -> client) and as a
# cache hit, on loopback, with a real docker-registry as the origin and curl
# as the client. docs/benchmarks.md ("Where the CPU goes") has the figures.
#
#   benches/profile.sh [daemon binary] [blob MiB] [extra [origin] lines]
#   DAMSELFLY_PROFILE_PEER=1 benches/profile.sh ...   # also the peer path
#
# With DAMSELFLY_PROFILE_PEER=1 the daemon (A) is a swarm member on
# 127.0.0.2, and a third phase starts a second daemon (B) on 127.0.0.3 that
# pulls the blob through its mirror from A over the TLS data plane; both
# daemons are sampled, and each one's CPU is reported on its own.
#
# Needs perf, docker-registry, curl and sha256sum. Writes perf data and a
# report per phase to $DAMSELFLY_PROFILE_OUT (default a new /tmp dir) and
# prints the daemon's CPU seconds per GiB (from /proc) and a summary by
# stage: symbols are put in stages by name (see classify below), so the
# split is as good as those names; the perf reports are kept to check it.
set -euo pipefail

BIN=${1:-target/release/damselfly}
MIB=${2:-1024}
ORIGIN_EXTRA=${3:-}
PEER=${DAMSELFLY_PROFILE_PEER:-0}
OUT=${DAMSELFLY_PROFILE_OUT:-$(mktemp -d /tmp/damselfly-profile.XXXXXX)}
mkdir -p "$OUT"
work=$(mktemp -d /tmp/damselfly-profile-work.XXXXXX)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
REG_PORT=$(port)
MIRROR_PORT=$(port)
TEL_PORT=$(port)

cat >"$work/registry.yml" <<EOF
version: 0.1
log: {level: error, accesslog: {disabled: true}}
storage: {filesystem: {rootdirectory: $work/registry}}
http: {addr: 127.0.0.1:$REG_PORT}
EOF
docker-registry serve "$work/registry.yml" >"$work/registry.log" 2>&1 &
pids+=($!)
for _ in $(seq 100); do curl -sf "http://127.0.0.1:$REG_PORT/v2/" >/dev/null && break; sleep 0.1; done

echo "pushing a $MIB MiB blob..." >&2
head -c "${MIB}M" /dev/urandom >"$work/blob"
digest="sha256:$(sha256sum "$work/blob" | cut -d' ' -f1)"
loc=$(curl -sfi -X POST "http://127.0.0.1:$REG_PORT/v2/prof/blob/blobs/uploads/" |
  tr -d '\r' | awk 'tolower($1)=="location:"{print $2}')
case "$loc" in http*) ;; *) loc="http://127.0.0.1:$REG_PORT$loc" ;; esac
sep='?'; case "$loc" in *\?*) sep='&' ;; esac
curl -sf -X PUT -H "Content-Type: application/octet-stream" -T "$work/blob" \
  "$loc${sep}digest=$digest" >/dev/null
rm -f "$work/blob"

# A swarm section for node $1 (127.0.0.$1), bootstrapping from $2 if set.
swarm_section() {
  [ "$PEER" = 1 ] || return 0
  local ip=127.0.0.$1
  echo "[swarm]"
  echo "listen = \"/ip4/$ip/tcp/$(port)\""
  echo "data_listen = \"$ip:$(port)\""
  echo "cluster_key_file = \"$work/cluster.key\""
  echo "bootstrap = [${2:+\"$2\"}]"
}
[ "$PEER" = 1 ] && head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' >"$work/cluster.key"

cat >"$work/damselfly.toml" <<EOF
[mirror]
listen = "127.0.0.1:$MIRROR_PORT"
[store]
dir = "$work/store"
max_size = "64GiB"
scrub_rate = 0
[telemetry]
listen = "127.0.0.1:$TEL_PORT"
log_level = "warn"
[origin]
$ORIGIN_EXTRA
[[registry]]
host = "127.0.0.1:$REG_PORT"
endpoint = "http://127.0.0.1:$REG_PORT"
$(swarm_section 2)
EOF
"$BIN" daemon --config "$work/damselfly.toml" >"$work/daemon.log" 2>&1 &
DPID=$!
pids+=($DPID)
for _ in $(seq 100); do curl -sf "http://127.0.0.1:$TEL_PORT/readyz" >/dev/null && break; sleep 0.1; done

url="http://127.0.0.1:$MIRROR_PORT/v2/prof/blob/blobs/$digest?ns=127.0.0.1%3A$REG_PORT"
cpu() { awk '{print $14 + $15}' "/proc/${1:-$DPID}/stat"; }
tck=$(getconf CLK_TCK)

# Symbols to stages. Kernel copies are told apart by their callers in the
# call chains (perf report -g caller), so the summary below splits
# user-copy by its parent: receive (tcp_recvmsg), write (generic_perform_write),
# read (filemap_read), send (tcp_sendmsg).
classify() {
  awk -v total="$1" '
    function stage(sym, chain) {
      if (sym ~ /sha256|sha2::|Sha256|sha256_block|sha256_block_data_order/) return "sha256";
      if (sym ~ /xxh3|xxhash|XXH3/) return "xxh3";
      if (sym ~ /aes|gcm|ghash|aws_lc|rustls|chacha|poly1305/) return "TLS (rustls, AES-GCM)";
      if (sym ~ /copy_user|rep_movs|memcpy|__memmove|copy_page_to_iter|copy_page_from_iter|_copy_to_iter|_copy_from_iter|copy_folio/) {
        if (chain ~ /tcp_recvmsg|skb_copy_datagram/) return "copy: socket -> user (receive)";
        if (chain ~ /generic_perform_write|ext4_buffered_write|ext4_file_write/) return "copy: user -> page cache (write)";
        if (chain ~ /filemap_read|ext4_file_read/) return "copy: page cache -> user (read)";
        if (chain ~ /tcp_sendmsg/) return "copy: user -> socket (send)";
        return "copy: other";
      }
      if (chain ~ /tcp_sendmsg|tcp_sendpage|splice|sendfile|do_sendfile/ || sym ~ /^tcp_|^__tcp|^ip_|^__ip|skb|^sock_|loopback|net_rx|__netif|napi|^tcp_v4/) return "network stack";
      if (chain ~ /ext4|filemap|page_cache|folio|generic_perform_write|iomap/ || sym ~ /ext4|folio|filemap|xas_|^__filemap|lru|mark_page|memcg/) return "page cache, ext4";
      if (sym ~ /tokio|mio|futures|parking|epoll|schedule|futex|__switch_to|pick_next|syscall|entry_SYSCALL|do_syscall|__x64_sys|_raw_spin/) return "runtime, syscalls, scheduling";
      if (sym ~ /malloc|free|alloc|mmap|munmap|page_fault|clear_page|do_anonymous|handle_mm_fault|zap_|tlb|memset/) return "memory (alloc, zeroing, faults)";
      if (sym ~ /hyper|http|reqwest|h2|bytes::|BytesMut/) return "http";
      return "other";
    }
    # perf script: a header line per sample (its period before the event
    # name), then the call chain, leaf first, one frame per indented line.
    /^[^ \t]/ { if (sym != "") { s = stage(sym, chain); w[s] += n }; sym = ""; chain = "";
                for (i = 1; i <= NF; i++) if ($i ~ /^cpu-clock|^cycles|^task-clock/) n = $(i - 1);
                next }
    /^[ \t]+[0-9a-f]+ / { f = $2; sub(/\+0x[0-9a-f]+$/, "", f);
                if (sym == "") sym = f; else chain = chain " " f; next }
    END {
      if (sym != "") { s = stage(sym, chain); w[s] += n }
      for (s in w) all += w[s];
      for (s in w) printf "%5.1f%%  %5.2f CPU-s/GiB  %s\n", 100 * w[s] / all, total * w[s] / all, s;
    }' | sort -rn
}

# phase NAME [URL [PID...]]: samples the daemons PID (default A) while curl
# pulls URL (default A's mirror), and reports each one's CPU per GiB.
phase() {
  local name=$1 from=${2:-$url}
  shift; [ $# -gt 0 ] && shift
  local procs=("$@")
  [ ${#procs[@]} -gt 0 ] || procs=("$DPID")
  floor >/dev/null
  sync
  local c0=() p
  for p in "${procs[@]}"; do c0+=("$(cpu "$p")"); done
  perf record -q -g -F 1999 -p "$(IFS=,; echo "${procs[*]}")" -o "$OUT/$name.data" 2>/dev/null &
  local perf=$!
  sleep 0.3
  local t0; t0=$(date +%s.%N)
  curl -sf -o /dev/null "$from"
  local t1; t1=$(date +%s.%N)
  sleep 0.5
  kill -INT "$perf"; wait "$perf" 2>/dev/null || true
  local gib; gib=$(echo "$MIB / 1024" | bc -l)
  local rate; rate=$(echo "$MIB / ($t1 - $t0)" | bc -l)
  local cps=()
  for i in "${!procs[@]}"; do
    cps+=("$(echo "($(cpu "${procs[$i]}") - ${c0[$i]}) / $tck / $gib" | bc -l)")
  done
  printf '\n## %s: %.0f MiB/s (load %s)\n' "$name" "$rate" "$(cut -d' ' -f1-3 /proc/loadavg)"
  perf report -i "$OUT/$name.data" --stdio --no-children --sort sym -g caller,0.5,callee,function,percent \
    --percent-limit 0.3 >"$OUT/$name.txt" 2>/dev/null || true
  for i in "${!procs[@]}"; do
    printf '\n### daemon pid %s: %.2f CPU-s per GiB\n\n' "${procs[$i]}" "${cps[$i]}"
    perf script -i "$OUT/$name.data" --pid "${procs[$i]}" 2>/dev/null | classify "${cps[$i]}"
  done
}

# What this machine charges any process for filling the page cache with a
# new file of the blob's size, measured now: the floor under the write stage.
# On this VM the first touch of guest memory that the host has taken back
# costs several times a plain write (1.97 against 0.20 CPU-s per GiB in
# two dd runs in a row, 2026-12-07), and that lands in whichever stage
# first writes the page: each phase runs after a dd of the blob's size, so
# the pages it fills are backed, and the second dd below is the floor.
floor() { { /usr/bin/time -f '%S' dd if=/dev/zero of="$work/floor" bs=1M count="$MIB" status=none; } 2>&1; rm -f "$work/floor"; }
first=$(floor)
printf '\nwriting a new %s MiB file here (dd): %.2f CPU-s (system) per GiB the first time, ' "$MIB" "$(echo "$first * 1024 / $MIB" | bc -l)"
printf '%.2f the second\n' "$(echo "$(floor) * 1024 / $MIB" | bc -l)"

phase cold
phase hit
if [ "$PEER" = 1 ]; then
  B_MIRROR=$(port) B_TEL=$(port)
  a_ctl=$(sed -n 's|^listen = "\(/ip4/127.0.0.2/[^"]*\)"|\1|p' "$work/damselfly.toml")
  sed -e "s|^listen = \"127.0.0.1:$MIRROR_PORT\"|listen = \"127.0.0.3:$B_MIRROR\"|" \
      -e "s|^listen = \"127.0.0.1:$TEL_PORT\"|listen = \"127.0.0.3:$B_TEL\"|" \
      -e "s|$work/store|$work/store-b|" \
      -e '/^\[swarm\]/,$d' "$work/damselfly.toml" >"$work/b.toml"
  swarm_section 3 "$a_ctl" >>"$work/b.toml"
  "$BIN" daemon --config "$work/b.toml" >"$work/daemon-b.log" 2>&1 &
  BPID=$!
  pids+=($BPID)
  for _ in $(seq 300); do
    curl -sf "http://127.0.0.3:$B_TEL/metrics" | grep -q '^damselfly_swarm_members [1-9]' && break
    sleep 0.1
  done
  sleep 1
  echo "A is pid $DPID (holds the blob, serves), B is pid $BPID (pulls from A)"
  phase peer "http://127.0.0.3:$B_MIRROR/v2/prof/blob/blobs/$digest?ns=127.0.0.1%3A$REG_PORT" "$DPID" "$BPID"
  curl -sf "http://127.0.0.3:$B_TEL/metrics" | grep -E '^damselfly_(fetched_bytes|origin_bytes)' || true
fi
echo >&2
echo "perf data and reports: $OUT" >&2
