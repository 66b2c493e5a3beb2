//! An image reference down to the blobs a pull of it needs: the index (when
//! there is one), the platform's manifest, its config and layers. Every
//! manifest goes through the node's own fetch engine, so it is verified
//! against its digest and stored like a pull's.

use crate::fetch::{FetchError, Fetcher};
use crate::oci::{Digest, ImageRef, Platform, RawManifest, Reference};
use crate::origin::Upstream;

/// One blob to fetch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlobRef {
    pub digest: Digest,
    pub size: u64,
}

/// An image resolved to its blobs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resolved {
    /// What the reference resolved to: an index or a manifest.
    pub root: Digest,
    /// The manifest for the platform (the root itself without an index).
    pub manifest: Digest,
    /// Bytes of the index and manifest (already stored once resolved).
    pub manifest_bytes: u64,
    pub config: BlobRef,
    pub layers: Vec<BlobRef>,
}

impl Resolved {
    /// Every digest of the image, manifests first, each once.
    pub fn digests(&self) -> Vec<Digest> {
        let mut out = vec![self.root.clone()];
        if self.manifest != self.root {
            out.push(self.manifest.clone());
        }
        for b in std::iter::once(&self.config).chain(&self.layers) {
            if !out.contains(&b.digest) {
                out.push(b.digest.clone());
            }
        }
        out
    }

    /// The config and layers, each once.
    pub fn blobs(&self) -> Vec<BlobRef> {
        let mut out: Vec<BlobRef> = Vec::new();
        for b in std::iter::once(&self.config).chain(&self.layers) {
            if !out.iter().any(|o| o.digest == b.digest) {
                out.push(b.clone());
            }
        }
        out
    }

    /// Bytes of everything the image stores.
    pub fn total_bytes(&self) -> u64 {
        self.manifest_bytes + self.blobs().iter().map(|b| b.size).sum::<u64>()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ResolveError {
    #[error(transparent)]
    Fetch(#[from] FetchError),
    #[error("manifest {digest} is not a manifest or index: {reason}")]
    Invalid { digest: Digest, reason: String },
    #[error("index {digest} has no manifest for {platform} (it has: {available})")]
    NoPlatform {
        digest: Digest,
        platform: Platform,
        available: String,
    },
}

fn parse(digest: &Digest, body: &[u8]) -> Result<RawManifest, ResolveError> {
    serde_json::from_slice(body).map_err(|e| ResolveError::Invalid {
        digest: digest.clone(),
        reason: e.to_string(),
    })
}

fn descriptor_digest(
    manifest: &Digest,
    d: &crate::oci::Descriptor,
) -> Result<Digest, ResolveError> {
    d.digest.parse().map_err(|e| ResolveError::Invalid {
        digest: manifest.clone(),
        reason: format!("descriptor {:?}: {e}", d.digest),
    })
}

/// Picks `platform`'s manifest from an index's entries.
pub fn pick_platform(
    index: &Digest,
    entries: &[crate::oci::Descriptor],
    platform: &Platform,
) -> Result<Digest, ResolveError> {
    let pick = entries
        .iter()
        .find(|e| e.platform.as_ref().is_some_and(|p| platform.matches(p)));
    match pick {
        Some(e) => descriptor_digest(index, e),
        None => Err(ResolveError::NoPlatform {
            digest: index.clone(),
            platform: platform.clone(),
            available: entries
                .iter()
                .filter_map(|e| e.platform.as_ref().map(|p| p.to_string()))
                .collect::<Vec<_>>()
                .join(", "),
        }),
    }
}

/// Resolves `image` at the origin (a tag always; a digest from the store
/// when it is there) and, for an index, `platform`'s manifest.
pub async fn resolve(
    fetcher: &Fetcher,
    up: &Upstream,
    image: &ImageRef,
    platform: &Platform,
) -> Result<Resolved, ResolveError> {
    let reference = match (&image.digest, &image.tag) {
        (Some(d), _) => Reference::Digest(d.clone()),
        (None, Some(t)) => Reference::Tag(t.clone()),
        (None, None) => Reference::Tag("latest".into()),
    };
    let repo = &image.repository;
    let root = fetcher.manifest(up, repo, &reference, None, None).await?;
    let mut manifest_bytes = root.body.len() as u64;
    let mut raw = parse(&root.digest, &root.body)?;
    let mut manifest = root.digest.clone();
    if let Some(entries) = raw.manifests.take() {
        let child = pick_platform(&root.digest, &entries, platform)?;
        let m = fetcher
            .manifest(up, repo, &Reference::Digest(child.clone()), None, None)
            .await?;
        manifest_bytes += m.body.len() as u64;
        raw = parse(&m.digest, &m.body)?;
        if raw.manifests.is_some() {
            return Err(ResolveError::Invalid {
                digest: child,
                reason: "an index inside an index".into(),
            });
        }
        manifest = m.digest;
    }
    let config = raw.config.as_ref().ok_or_else(|| ResolveError::Invalid {
        digest: manifest.clone(),
        reason: "no config descriptor".into(),
    })?;
    let config = BlobRef {
        digest: descriptor_digest(&manifest, config)?,
        size: config.size,
    };
    let layers = raw
        .layers
        .iter()
        .map(|l| {
            Ok(BlobRef {
                digest: descriptor_digest(&manifest, l)?,
                size: l.size,
            })
        })
        .collect::<Result<Vec<_>, ResolveError>>()?;
    Ok(Resolved {
        root: root.digest,
        manifest,
        manifest_bytes,
        config,
        layers,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::oci::Descriptor;

    fn entry(digest: &Digest, platform: &str) -> Descriptor {
        Descriptor {
            media_type: None,
            digest: digest.to_string(),
            size: 1,
            platform: Some(platform.parse().unwrap()),
        }
    }

    #[test]
    fn the_index_entry_for_the_platform_is_picked() {
        let d = |n: u8| Digest::from_sha256(&[n; 32]);
        let entries = [entry(&d(1), "linux/amd64"), entry(&d(2), "linux/arm64/v8")];
        let arm: Platform = "linux/arm64".parse().unwrap();
        assert_eq!(pick_platform(&d(9), &entries, &arm).unwrap(), d(2));
        let amd: Platform = "linux/amd64".parse().unwrap();
        assert_eq!(pick_platform(&d(9), &entries, &amd).unwrap(), d(1));
        let s390: Platform = "linux/s390x".parse().unwrap();
        let e = pick_platform(&d(9), &entries, &s390)
            .unwrap_err()
            .to_string();
        assert!(e.contains("linux/amd64, linux/arm64/v8"), "{e}");
    }

    #[test]
    fn shared_blobs_are_counted_once() {
        let d = |n: u8| Digest::from_sha256(&[n; 32]);
        let r = Resolved {
            root: d(1),
            manifest: d(1),
            manifest_bytes: 10,
            config: BlobRef {
                digest: d(2),
                size: 5,
            },
            layers: vec![
                BlobRef {
                    digest: d(3),
                    size: 100,
                },
                BlobRef {
                    digest: d(3),
                    size: 100,
                },
            ],
        };
        assert_eq!(r.blobs().len(), 2);
        assert_eq!(r.total_bytes(), 115);
        assert_eq!(r.digests(), vec![d(1), d(2), d(3)]);
    }
}
