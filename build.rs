//! Generates the gRPC clients for containerd (CRI v1 `ImageService`, and
//! containerd's own `Images` service) from the vendored protos in
//! `proto/`. protox compiles them in Rust, so no `protoc` is needed.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos = [
        "proto/k8s.io/cri-api/pkg/apis/runtime/v1/api.proto",
        "proto/github.com/containerd/containerd/api/services/images/v1/images.proto",
    ];
    for p in &protos {
        println!("cargo:rerun-if-changed={p}");
    }
    println!(
        "cargo:rerun-if-changed=proto/github.com/containerd/containerd/api/types/descriptor.proto"
    );
    let fds = protox::compile(protos, ["proto"])?;
    // The protos' comments are Go-flavoured prose with indented blocks that
    // rustdoc would run as doctests; proto/ keeps them.
    let mut config = prost_build::Config::new();
    config.disable_comments(["."]);
    tonic_prost_build::configure()
        .build_server(false)
        .disable_comments(["."])
        .compile_fds_with_config(fds, config)?;
    Ok(())
}
