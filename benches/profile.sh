#!/usr/bin/env bash
# Where one daemon's CPU goes, per stage of the byte path: perf profiles of a
# release daemon serving one blob cold (origin -> mirror -> client) and as a
# cache hit, on loopback, with a real docker-registry as the origin and curl
# as the client. docs/benchmarks.md ("Where the CPU goes") has the figures.
#
#   benches/profile.sh [daemon binary] [blob MiB] [extra [origin] lines]
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
EOF
"$BIN" daemon --config "$work/damselfly.toml" >"$work/daemon.log" 2>&1 &
DPID=$!
pids+=($DPID)
for _ in $(seq 100); do curl -sf "http://127.0.0.1:$TEL_PORT/readyz" >/dev/null && break; sleep 0.1; done

url="http://127.0.0.1:$MIRROR_PORT/v2/prof/blob/blobs/$digest?ns=127.0.0.1%3A$REG_PORT"
cpu() { awk '{print $14 + $15}' "/proc/$DPID/stat"; }
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

phase() {
  local name=$1
  sync
  local c0; c0=$(cpu)
  perf record -q -g -F 1999 -p "$DPID" -o "$OUT/$name.data" 2>/dev/null &
  local perf=$!
  sleep 0.3
  local t0; t0=$(date +%s.%N)
  curl -sf -o /dev/null "$url"
  local t1; t1=$(date +%s.%N)
  sleep 0.5
  kill -INT "$perf"; wait "$perf" 2>/dev/null || true
  local c1; c1=$(cpu)
  local gib; gib=$(echo "$MIB / 1024" | bc -l)
  local cps; cps=$(echo "($c1 - $c0) / $tck / $gib" | bc -l)
  local rate; rate=$(echo "$MIB / ($t1 - $t0)" | bc -l)
  printf '\n## %s: %.0f MiB/s, daemon %.2f CPU-s per GiB (load %s)\n\n' "$name" "$rate" "$cps" "$(cut -d' ' -f1-3 /proc/loadavg)"
  perf report -i "$OUT/$name.data" --stdio --no-children --sort sym -g caller,0.5,callee,function,percent \
    --percent-limit 0.3 >"$OUT/$name.txt" 2>/dev/null || true
  perf script -i "$OUT/$name.data" 2>/dev/null | classify "$cps"
}

# What this machine charges any process for filling the page cache with a
# new file of the blob's size, measured now: the floor under the write stage.
floor=$( { /usr/bin/time -f '%S' dd if=/dev/zero of="$work/floor" bs=1M count="$MIB" status=none; } 2>&1 )
rm -f "$work/floor"
printf '\nwriting a new %s MiB file here (dd): %.2f CPU-s (system) per GiB\n' "$MIB" "$(echo "$floor * 1024 / $MIB" | bc -l)"

phase cold
phase hit
echo >&2
echo "perf data and reports: $OUT" >&2
