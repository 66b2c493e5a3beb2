# The damselfly image: `damselfly` (daemon and CLI) and `hostsd`, one image
# for every container of the DaemonSet. Where no Docker engine runs (CI,
# this repository's lab), daemonset/image/build.sh builds the same image
# with umoci, and tests/daemonset.rs builds it and runs its binaries.
# The toolchain of rust-toolchain.toml (rustup would fetch it otherwise).
FROM rust:1.95.0-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked -p damselfly -p hostsd

# glibc, libgcc_s and the CA bundle; no shell.
FROM gcr.io/distroless/cc-debian12
COPY --from=build /src/target/release/damselfly /src/target/release/hostsd /usr/local/bin/
ENV SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt
CMD ["damselfly", "daemon"]
