//! The CLI's side of the admin socket: one HTTP/1.1 request per connection.

use std::path::{Path, PathBuf};

use bytes::Bytes;
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::net::UnixStream;

use super::CliError;
use crate::admin::api::ErrorBody;

pub struct Client {
    socket: PathBuf,
}

/// Why the socket did not answer: nothing there (the daemon is down), or
/// something that needs the user's attention.
pub enum Unreachable {
    Down(std::io::Error),
    Refused(std::io::Error),
}

impl Client {
    /// Connects once to see whether a daemon answers.
    pub async fn probe(socket: &Path) -> Result<Client, Unreachable> {
        match UnixStream::connect(socket).await {
            Ok(_) => Ok(Client {
                socket: socket.to_owned(),
            }),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
                ) =>
            {
                Err(Unreachable::Down(e))
            }
            Err(e) => Err(Unreachable::Refused(e)),
        }
    }

    async fn send(
        &self,
        method: Method,
        path: &str,
        body: Vec<u8>,
    ) -> Result<http::Response<hyper::body::Incoming>, CliError> {
        let unreachable = |e: &dyn std::fmt::Display| CliError::Unreachable {
            socket: self.socket.clone(),
            reason: e.to_string(),
        };
        let stream = UnixStream::connect(&self.socket)
            .await
            .map_err(|e| unreachable(&e))?;
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
                .await
                .map_err(|e| unreachable(&e))?;
        tokio::spawn(conn);
        let req = Request::builder()
            .method(method)
            .uri(path)
            .header(http::header::HOST, "damselfly")
            .header(http::header::CONTENT_TYPE, "application/json")
            .body(Full::new(Bytes::from(body)))
            .map_err(|e| CliError::Protocol(e.to_string()))?;
        sender.send_request(req).await.map_err(|e| unreachable(&e))
    }

    async fn call<T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Vec<u8>,
    ) -> Result<T, CliError> {
        let resp = self.send(method, path, body).await?;
        let status = resp.status();
        let bytes = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| CliError::Protocol(e.to_string()))?
            .to_bytes();
        decode(status, &bytes)
    }

    pub async fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T, CliError> {
        self.call(Method::GET, path, Vec::new()).await
    }

    pub async fn post<R: Serialize, T: DeserializeOwned>(
        &self,
        path: &str,
        req: &R,
    ) -> Result<T, CliError> {
        let body = serde_json::to_vec(req).map_err(|e| CliError::Protocol(e.to_string()))?;
        self.call(Method::POST, path, body).await
    }

    /// POSTs `req` and hands each line of the streamed answer to `on_line`.
    pub async fn post_lines<R: Serialize>(
        &self,
        path: &str,
        req: &R,
        on_line: &mut dyn FnMut(&[u8]) -> Result<(), CliError>,
    ) -> Result<(), CliError> {
        let body = serde_json::to_vec(req).map_err(|e| CliError::Protocol(e.to_string()))?;
        let resp = self.send(Method::POST, path, body).await?;
        let status = resp.status();
        let mut body = resp.into_body();
        if status != StatusCode::OK {
            let bytes = body
                .collect()
                .await
                .map_err(|e| CliError::Protocol(e.to_string()))?
                .to_bytes();
            return decode::<()>(status, &bytes);
        }
        let mut buf = Vec::new();
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|e| CliError::Protocol(e.to_string()))?;
            if let Ok(data) = frame.into_data() {
                buf.extend_from_slice(&data);
                while let Some(i) = buf.iter().position(|&b| b == b'\n') {
                    let line: Vec<u8> = buf.drain(..=i).collect();
                    on_line(&line[..line.len() - 1])?;
                }
            }
        }
        if !buf.is_empty() {
            on_line(&buf)?;
        }
        Ok(())
    }
}

fn decode<T: DeserializeOwned>(status: StatusCode, bytes: &[u8]) -> Result<T, CliError> {
    if status.is_success() {
        return serde_json::from_slice(bytes)
            .map_err(|e| CliError::Protocol(format!("unexpected answer: {e}")));
    }
    match serde_json::from_slice::<ErrorBody>(bytes) {
        Ok(b) => Err(CliError::Api(b.error)),
        Err(_) => Err(CliError::Protocol(format!(
            "the daemon answered {status}: {}",
            String::from_utf8_lossy(bytes)
                .chars()
                .take(200)
                .collect::<String>()
        ))),
    }
}
