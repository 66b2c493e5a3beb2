//! Two CRI calls, `RemoveImage` and `PullImage`, over containerd's socket:
//! what the kubelet does, timed. A unary gRPC call is an HTTP/2 POST whose
//! body is a 5-byte prefix (no compression, big-endian length) and the
//! protobuf message; the result is in the `grpc-status` trailer. Both
//! requests are `{ image: ImageSpec { image: <ref> } }` (field 1 of field 1),
//! so no generated code is needed.

use std::path::Path;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};

use super::BenchError;

fn request(image: &str) -> Bytes {
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
    Bytes::from(body)
}

async fn call(sock: &Path, method: &str, image: &str, timeout: Duration) -> Result<(), BenchError> {
    let err = |e: &dyn std::fmt::Display| BenchError::Cri(format!("{method}: {e}"));
    let stream = tokio::net::UnixStream::connect(sock)
        .await
        .map_err(|e| BenchError::Cri(format!("cannot connect to {}: {e}", sock.display())))?;
    let (mut sender, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(stream),
    )
    .await
    .map_err(|e| err(&e))?;
    tokio::spawn(conn);
    let req = http::Request::post(format!("http://localhost/runtime.v1.ImageService/{method}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(Full::new(request(image)))
        .map_err(|e| err(&e))?;
    let answer = async {
        let resp = sender.send_request(req).await.map_err(|e| err(&e))?;
        let head = resp.headers().clone();
        let collected = resp.into_body().collect().await.map_err(|e| err(&e))?;
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
            status => Err(BenchError::Cri(format!(
                "{method}: grpc-status {status}: {}",
                get("grpc-message")
            ))),
        }
    };
    tokio::time::timeout(timeout, answer)
        .await
        .map_err(|_| BenchError::Cri(format!("{method} timed out after {timeout:?}")))?
}

/// Removes `image` from containerd (an image that is not there is fine),
/// then times `PullImage`.
pub async fn timed_pull(
    sock: &Path,
    image: &str,
    timeout: Duration,
) -> Result<Duration, BenchError> {
    // RemoveImage of an absent image answers OK in containerd's CRI.
    call(sock, "RemoveImage", image, timeout).await?;
    let started = Instant::now();
    call(sock, "PullImage", image, timeout).await?;
    Ok(started.elapsed())
}

#[cfg(test)]
mod tests {
    #[test]
    fn request_is_a_grpc_frame_of_nested_field_one() {
        let b = super::request("a/b:c");
        assert_eq!(&b[..5], &[0, 0, 0, 0, 9]);
        assert_eq!(&b[5..], &[0x0a, 7, 0x0a, 5, b'a', b'/', b'b', b':', b'c']);
    }
}
