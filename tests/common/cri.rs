//! A CRI client for the one call the tests need: the kubelet's
//! `PullImage`, over containerd's socket, without protoc or generated code.
//! Shared by the damselfly tests (`mod common`) and hostsd's
//! (`#[path = "../../tests/common/cri.rs"]`).

use std::path::Path;
use std::time::Duration;

/// CRI `runtime.v1.ImageService/PullImage` over the containerd socket: a
/// unary gRPC call is an HTTP/2 POST whose body is a 5-byte prefix (no
/// compression, big-endian length) and the protobuf message, with the result
/// in the `grpc-status` trailer.
pub fn cri_pull(sock: &Path, image: &str) -> Result<(), String> {
    use http_body_util::{BodyExt, Full};

    // PullImageRequest { image: ImageSpec { image } }: field 1, length-delimited.
    let field = |bytes: &[u8]| {
        let mut out = vec![0x0a];
        let mut n = bytes.len();
        while n >= 0x80 {
            out.push((n as u8 & 0x7f) | 0x80);
            n >>= 7;
        }
        out.push(n as u8);
        out.extend_from_slice(bytes);
        out
    };
    let msg = field(&field(image.as_bytes()));
    let mut body = vec![0u8];
    body.extend_from_slice(&(msg.len() as u32).to_be_bytes());
    body.extend_from_slice(&msg);

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let stream = tokio::net::UnixStream::connect(sock)
            .await
            .map_err(|e| e.to_string())?;
        let (mut sender, conn) = hyper::client::conn::http2::handshake(
            hyper_util::rt::TokioExecutor::new(),
            hyper_util::rt::TokioIo::new(stream),
        )
        .await
        .map_err(|e| e.to_string())?;
        tokio::spawn(conn);
        let req = hyper::Request::post("http://localhost/runtime.v1.ImageService/PullImage")
            .header("content-type", "application/grpc")
            .header("te", "trailers")
            .body(Full::new(bytes::Bytes::from(body)))
            .unwrap();
        let call = async {
            let resp = sender.send_request(req).await.map_err(|e| e.to_string())?;
            let head = resp.headers().clone();
            let collected = resp
                .into_body()
                .collect()
                .await
                .map_err(|e| e.to_string())?;
            let trailers = collected.trailers().cloned().unwrap_or_default();
            let get = |k: &str| {
                trailers
                    .get(k)
                    .or_else(|| head.get(k))
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("")
                    .to_string()
            };
            match get("grpc-status").as_str() {
                "0" => Ok(()),
                status => Err(format!("grpc-status {status}: {}", get("grpc-message"))),
            }
        };
        tokio::time::timeout(Duration::from_secs(60), call)
            .await
            .map_err(|_| "CRI PullImage timed out".to_string())?
    })
}
