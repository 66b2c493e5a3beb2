//! Tags to digests, once per intent, at the origin with the sidecar's own
//! credentials (`[[registry]]`, ECR tokens included): the daemons then
//! prewarm exactly that image, and a tag moved mid-scale-out cannot split
//! the fleet between two images.
//!
//! The manifest (or index) is fetched whole and hashed here; a
//! `Docker-Content-Digest` that disagrees is an error. Nothing is stored.

use http::{HeaderMap, HeaderValue, Method};
use sha2::Digest as _;

use crate::fetch::{DEFAULT_ACCEPT, MAX_MANIFEST};
use crate::oci::{Digest, ImageRef};
use crate::origin::{self, Origin, OriginError};

#[derive(Debug, thiserror::Error)]
pub enum ResolveError {
    #[error("registry {0:?} is not in the config's [[registry]] list")]
    NotConfigured(String),
    #[error(transparent)]
    Origin(#[from] OriginError),
    #[error("the manifest is larger than {} MiB", MAX_MANIFEST >> 20)]
    TooLarge,
    #[error("the answer broke off: {0}")]
    Body(String),
    #[error("the origin says the manifest is {header} but its bytes hash to {actual}")]
    DigestMismatch { header: String, actual: Digest },
    #[error("the answer is not an image manifest or index: {0}")]
    NotAManifest(String),
}

/// The digest `image` names now: itself when it carries one, else what its
/// tag (or `latest`) resolves to at the origin.
pub async fn resolve(origin: &Origin, image: &ImageRef) -> Result<Digest, ResolveError> {
    if let Some(d) = &image.digest {
        return Ok(d.clone());
    }
    let up = origin
        .upstream(&image.registry)
        .ok_or_else(|| ResolveError::NotConfigured(image.registry.clone()))?;
    let tag = image.tag.as_deref().unwrap_or("latest");
    let mut headers = HeaderMap::new();
    headers.insert(
        http::header::ACCEPT,
        HeaderValue::from_static(DEFAULT_ACCEPT),
    );
    let req = origin::Request {
        method: Method::GET,
        path: format!("/v2/{}/manifests/{tag}", image.repository),
        scope: origin::pull_scope(&image.repository),
        headers,
        client_auth: None,
        kind: crate::oci::Object::Manifest,
    };
    let mut resp = origin.send(&up, &req).await?;
    if resp.content_length().is_some_and(|n| n > MAX_MANIFEST) {
        return Err(ResolveError::TooLarge);
    }
    let header = resp
        .headers()
        .get("docker-content-digest")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let mut body = Vec::new();
    while let Some(chunk) = resp
        .chunk()
        .await
        .map_err(|e| ResolveError::Body(e.to_string()))?
    {
        if (body.len() + chunk.len()) as u64 > MAX_MANIFEST {
            return Err(ResolveError::TooLarge);
        }
        body.extend_from_slice(&chunk);
    }
    let actual = Digest::from_sha256(&sha2::Sha256::digest(&body));
    if let Some(h) = header.filter(|h| h.starts_with("sha256:")) {
        if h != actual.to_string() {
            return Err(ResolveError::DigestMismatch { header: h, actual });
        }
    }
    check_manifest(&body)?;
    Ok(actual)
}

/// An image manifest has a config and layers, an index its manifests.
fn check_manifest(body: &[u8]) -> Result<(), ResolveError> {
    let v: serde_json::Value =
        serde_json::from_slice(body).map_err(|e| ResolveError::NotAManifest(e.to_string()))?;
    let has = |k: &str| v.get(k).is_some_and(|x| !x.is_null());
    if has("manifests") || (has("config") && has("layers")) {
        Ok(())
    } else {
        Err(ResolveError::NotAManifest(
            "it has neither `manifests` nor `config` and `layers`".into(),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_manifests_and_indexes_pass() {
        assert!(check_manifest(br#"{"schemaVersion":2,"config":{},"layers":[]}"#).is_ok());
        assert!(check_manifest(br#"{"schemaVersion":2,"manifests":[]}"#).is_ok());
        assert!(check_manifest(br#"{"errors":[{"code":"MANIFEST_UNKNOWN"}]}"#).is_err());
        assert!(check_manifest(b"<html>").is_err());
    }
}
