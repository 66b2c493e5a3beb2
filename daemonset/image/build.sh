#!/usr/bin/env bash
# Builds the damselfly image (an OCI layout) without a Docker engine:
# the release binaries `damselfly` and `hostsd`, the shared libraries they
# link (glibc, libgcc_s, from ldd), and the CA bundle; nothing else (no
# shell). umoci makes the layout; skopeo pushes it.
#
#   daemonset/image/build.sh out/oci                 # cargo build --release first
#   daemonset/image/build.sh --bin-dir target/debug out/oci
#   skopeo copy oci:out/oci:0.1.0 docker://<registry>/damselfly:0.1.0
#
# Needs root (umoci unpack keeps file owners) and umoci. The Dockerfile at
# the repository root builds the same image where a Docker engine exists.
set -euo pipefail
cd "$(dirname "$0")/../.."

bin_dir=""
tag="$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -1)"
while [ $# -gt 1 ]; do
  case "$1" in
    --bin-dir) bin_dir="$2"; shift 2 ;;
    --tag) tag="$2"; shift 2 ;;
    *) echo "build.sh: unknown flag $1" >&2; exit 2 ;;
  esac
done
[ $# -eq 1 ] || { echo "usage: build.sh [--bin-dir DIR] [--tag TAG] OUT_LAYOUT" >&2; exit 2; }
out="$1"

if [ -z "$bin_dir" ]; then
  cargo build --release --locked -p damselfly -p hostsd
  bin_dir=target/release
fi

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
stage="$work/stage"
mkdir -p "$stage/usr/local/bin" "$stage/tmp" "$stage/etc/ssl/certs"
chmod 1777 "$stage/tmp"
for b in damselfly hostsd; do
  install -m 0755 "$bin_dir/$b" "$stage/usr/local/bin/$b"
  # Every library the binary links, at the path the loader looks for it.
  for lib in $(ldd "$bin_dir/$b" | awk '/=>/ { print $3; next } $1 ~ /^\// { print $1 }'); do
    mkdir -p "$stage$(dirname "$lib")"
    cp -L "$lib" "$stage$lib"
  done
done
cp -L /etc/ssl/certs/ca-certificates.crt "$stage/etc/ssl/certs/ca-certificates.crt"
printf 'root:x:0:0:root:/:/usr/sbin/nologin\nnobody:x:65534:65534:nobody:/:/usr/sbin/nologin\n' > "$stage/etc/passwd"

rm -rf "$out"
umoci init --layout "$out"
umoci new --image "$out:$tag"
umoci unpack --image "$out:$tag" "$work/bundle" >/dev/null
cp -a "$stage/." "$work/bundle/rootfs/"
umoci repack --image "$out:$tag" "$work/bundle"
umoci config --image "$out:$tag" \
  --config.cmd damselfly --config.cmd daemon \
  --config.env PATH=/usr/local/bin --config.env SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt \
  --config.label "org.opencontainers.image.title=damselfly" \
  --config.label "org.opencontainers.image.version=$tag" \
  --os linux --architecture amd64
umoci gc --layout "$out"
echo "built $out:$tag"
