//! Manifests: by digest from the store when present, by tag always from the
//! origin (the origin's answer is the authorization check), with the last
//! good tag answer as a bounded fallback when the origin is unreachable.

use bytes::{Bytes, BytesMut};
use futures_util::StreamExt;
use http::{HeaderMap, HeaderValue, Method};
use sha2::Digest as _;

use super::{FetchError, Fetcher, Source};
use crate::oci::{Digest, Reference};
use crate::origin::{self, Upstream};

/// distribution refuses manifests over 4 MiB; so do we, to bound memory.
pub const MAX_MANIFEST: u64 = 4 << 20;

/// What containerd asks for when it resolves: every manifest kind it knows.
pub const DEFAULT_ACCEPT: &str = "application/vnd.oci.image.index.v1+json, \
application/vnd.oci.image.manifest.v1+json, \
application/vnd.docker.distribution.manifest.list.v2+json, \
application/vnd.docker.distribution.manifest.v2+json, */*";

#[derive(Debug, Clone)]
pub struct Manifest {
    pub digest: Digest,
    pub media_type: String,
    pub body: Bytes,
    pub source: Source,
    /// Served from the tag fallback because the origin was unreachable.
    pub stale: bool,
}

impl Fetcher {
    /// Resolves a manifest by tag or digest.
    #[tracing::instrument(skip_all, fields(registry = %up.host(), repo, reference = %reference))]
    pub async fn manifest(
        &self,
        up: &Upstream,
        repo: &str,
        reference: &Reference,
        accept: Option<&HeaderValue>,
        client_auth: Option<&HeaderValue>,
    ) -> Result<Manifest, FetchError> {
        let lookups = &self.inner.metrics.cache_lookups;
        if let Reference::Digest(d) = reference {
            if let Some(m) = self.local_manifest(d).await? {
                lookups.with_label_values(&["manifest", "hit"]).inc();
                return Ok(m);
            }
            lookups.with_label_values(&["manifest", "miss"]).inc();
        }
        if let Reference::Digest(d) = reference {
            if let Some(m) = self.peer_manifest(up, repo, d).await {
                return Ok(m);
            }
        }
        let key = format!("{}/{repo}:{reference}", up.host());
        match self
            .origin_manifest(up, repo, reference, accept, client_auth)
            .await
        {
            Ok(m) => {
                if let Reference::Tag(_) = reference {
                    self.inner
                        .tags
                        .record(&key, &m.digest.to_string(), &m.media_type);
                }
                Ok(m)
            }
            Err(FetchError::Origin(e)) if e.is_unavailable() => {
                let Reference::Tag(_) = reference else {
                    return Err(e.into());
                };
                let Some((rec, age)) = self.inner.tags.fallback(&key) else {
                    return Err(e.into());
                };
                let Ok(d) = rec.digest.parse::<Digest>() else {
                    return Err(e.into());
                };
                let Some(mut m) = self.local_manifest(&d).await? else {
                    return Err(e.into());
                };
                tracing::warn!(error = %e, age_s = age.as_secs(), digest = %d,
                    "origin unreachable, serving the last good answer for the tag");
                self.inner.metrics.stale_tags_served.inc();
                m.stale = true;
                Ok(m)
            }
            Err(e) => Err(e),
        }
    }

    async fn local_manifest(&self, d: &Digest) -> Result<Option<Manifest>, FetchError> {
        let store = &self.inner.store;
        let Some(opened) = store.open_blob(d)? else {
            return Ok(None);
        };
        if opened.size > MAX_MANIFEST {
            return Err(FetchError::ManifestTooLarge {
                limit: MAX_MANIFEST,
            });
        }
        let file = std::sync::Arc::new(opened.file);
        let body = super::read::read_chunk(file.clone(), 0, opened.size)
            .await
            .map_err(|source| FetchError::Io {
                what: format!("manifest {d}"),
                source,
            })?;
        // A manifest is small enough to hash whole every time: one that
        // rotted on disk is quarantined and fetched again, never served.
        if Digest::from_sha256(&sha2::Sha256::digest(&body)) != *d {
            let store = store.clone();
            let dd = d.clone();
            let moved = tokio::task::spawn_blocking(move || store.quarantine(&dd, &file))
                .await
                .map_err(|e| FetchError::Io {
                    what: format!("manifest {d}"),
                    source: std::io::Error::other(e),
                })??;
            if let Some(to) = moved {
                self.inner
                    .metrics
                    .corrupt_blobs
                    .with_label_values(&["mirror"])
                    .inc();
                tracing::error!(digest = %d, quarantine = %to.display(),
                    "a cached manifest no longer matches its digest: quarantined, fetching it again");
            }
            return Ok(None);
        }
        let media_type = store
            .media_type(d)
            .unwrap_or_else(|| sniff_media_type(&body));
        Ok(Some(Manifest {
            digest: d.clone(),
            media_type,
            body,
            source: Source::Local,
            stale: false,
        }))
    }

    async fn origin_manifest(
        &self,
        up: &Upstream,
        repo: &str,
        reference: &Reference,
        accept: Option<&HeaderValue>,
        client_auth: Option<&HeaderValue>,
    ) -> Result<Manifest, FetchError> {
        // A client that names no manifest type (curl's or reqwest's `*/*`)
        // would get a 404 for an OCI manifest from distribution; ask for every
        // type on its behalf. A client that names types gets exactly those.
        let accept = accept
            .filter(|a| a.to_str().is_ok_and(|s| s.contains("manifest")))
            .cloned()
            .unwrap_or_else(|| HeaderValue::from_static(DEFAULT_ACCEPT));
        let mut headers = HeaderMap::new();
        headers.insert(http::header::ACCEPT, accept);
        let req = origin::Request {
            method: Method::GET,
            path: format!("/v2/{repo}/manifests/{reference}"),
            scope: origin::pull_scope(repo),
            headers,
            client_auth,
            kind: crate::oci::Object::Manifest,
        };
        let resp = self.inner.origin.send(up, &req).await?;
        if resp.content_length().is_some_and(|n| n > MAX_MANIFEST) {
            return Err(FetchError::ManifestTooLarge {
                limit: MAX_MANIFEST,
            });
        }
        let header_type = resp
            .headers()
            .get(http::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map(|s| s.split(';').next().unwrap_or(s).trim().to_owned())
            .filter(|s| !s.is_empty() && s != "application/octet-stream");
        let mut body = BytesMut::new();
        let mut stream = resp.bytes_stream();
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(|e| FetchError::BadOriginResponse {
                what: format!("manifest {repo}:{reference}"),
                reason: format!("body broke: {e}"),
            })?;
            if (body.len() + chunk.len()) as u64 > MAX_MANIFEST {
                return Err(FetchError::ManifestTooLarge {
                    limit: MAX_MANIFEST,
                });
            }
            body.extend_from_slice(&chunk);
        }
        let body = body.freeze();
        let actual = Digest::from_sha256(&sha2::Sha256::digest(&body));
        if let Reference::Digest(expected) = reference {
            if &actual != expected {
                self.inner.metrics.digest_mismatches.inc();
                return Err(FetchError::DigestMismatch {
                    expected: expected.clone(),
                    actual,
                });
            }
        }
        let media_type = header_type.unwrap_or_else(|| sniff_media_type(&body));
        if !self.inner.store.contains(&actual) {
            let prov = crate::store::Provenance::origin(up.host(), repo);
            self.commit_small(&actual, &body, &media_type, &prov)
                .await?;
        }
        Ok(Manifest {
            digest: actual,
            media_type,
            body,
            source: Source::Origin,
            stale: false,
        })
    }
}

/// The media type a manifest declares, or the OCI type its shape implies.
impl Fetcher {
    /// A manifest by digest from a member that holds it. Not an
    /// authorization bypass: whoever asks got the digest from an answer of
    /// the origin (a tag resolved with its own credentials), and content by
    /// digest is what it is. Only holders are asked, with no origin hint, so
    /// no peer fetches it from the origin on our behalf.
    async fn peer_manifest(&self, up: &Upstream, repo: &str, d: &Digest) -> Option<Manifest> {
        let swarm = self.inner.swarm.as_ref()?;
        if !swarm.has_peers() {
            return None;
        }
        swarm.find_holders(d, swarm.hedge_after()).await;
        let plan = swarm.piece_plan(d, 0, None, false, &std::collections::HashSet::new());
        for src in plan {
            let crate::swarm::PieceSource::Peer(p) = src else {
                break;
            };
            let req = crate::swarm::PieceRequest {
                peer: &p,
                digest: d,
                start: 0,
                end_incl: MAX_MANIFEST - 1,
                size: None,
                registry: "",
                repo: "",
            };
            let resp = match swarm.open_piece(req).await {
                Ok(r) if r.total <= MAX_MANIFEST && r.start == 0 => r,
                Ok(_) => continue,
                Err(e) => {
                    tracing::debug!(peer = %p.id, digest = %d, error = %e, "peer cannot serve the manifest");
                    continue;
                }
            };
            let content_type = resp.content_type.clone();
            let mut body = BytesMut::new();
            let mut stream = resp.body;
            let complete = loop {
                match tokio::time::timeout(swarm.stall_timeout(), stream.next()).await {
                    Ok(Some(Ok(c))) if (body.len() + c.len()) as u64 <= MAX_MANIFEST => {
                        body.extend_from_slice(&c)
                    }
                    Ok(None) => break true,
                    _ => break false,
                }
            };
            if !complete {
                continue;
            }
            let body = body.freeze();
            if Digest::from_sha256(&sha2::Sha256::digest(&body)) != *d {
                swarm.distrust(&p.id, "sent a manifest that does not match its digest");
                continue;
            }
            let media_type = content_type.unwrap_or_else(|| sniff_media_type(&body));
            let mut prov = crate::store::Provenance::origin(up.host(), repo);
            prov.from = crate::store::Fetched::Peer;
            if let Err(e) = self.commit_small(d, &body, &media_type, &prov).await {
                tracing::debug!(digest = %d, error = %e, "cannot store a manifest from a peer");
            }
            self.inner
                .metrics
                .cache_lookups
                .with_label_values(&["manifest", "peer"])
                .inc();
            return Some(Manifest {
                digest: d.clone(),
                media_type,
                body,
                source: Source::Peer,
                stale: false,
            });
        }
        None
    }
}

fn sniff_media_type(body: &[u8]) -> String {
    #[derive(serde::Deserialize)]
    struct Probe {
        #[serde(rename = "mediaType")]
        media_type: Option<String>,
        manifests: Option<serde_json::Value>,
    }
    match serde_json::from_slice::<Probe>(body) {
        Ok(Probe {
            media_type: Some(mt),
            ..
        }) => mt,
        Ok(Probe {
            manifests: Some(_), ..
        }) => "application/vnd.oci.image.index.v1+json".into(),
        _ => "application/vnd.oci.image.manifest.v1+json".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::sniff_media_type;

    #[test]
    fn media_type_sniffing() {
        assert_eq!(
            sniff_media_type(
                br#"{"mediaType":"application/vnd.docker.distribution.manifest.v2+json"}"#
            ),
            "application/vnd.docker.distribution.manifest.v2+json"
        );
        assert_eq!(
            sniff_media_type(br#"{"manifests":[]}"#),
            "application/vnd.oci.image.index.v1+json"
        );
        assert_eq!(
            sniff_media_type(b"not json"),
            "application/vnd.oci.image.manifest.v1+json"
        );
    }
}
