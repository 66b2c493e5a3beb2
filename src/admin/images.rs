//! Images as the node has seen them: the catalog that ties blobs to the
//! images that use them (references and manifest parsing are in
//! [`crate::oci::image`]).

use std::collections::{HashMap, HashSet};

use super::AdminError;
use crate::fetch::tags::{self, TagRecord};
use crate::fetch::MAX_MANIFEST;
pub use crate::oci::{Descriptor, ImageRef, Platform};
use crate::oci::{Digest, RawManifest};
use crate::store::Store;

/// What `cache inspect`, `pin` and `unpin` take.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    Digest(Digest),
    Image(ImageRef),
}

impl Target {
    pub fn parse(s: &str) -> Result<Target, AdminError> {
        let s = s.trim();
        // `algo:hex` with no slash reads as a digest; `name:tag` does not
        // (a tag is never all hex of digest length).
        let looks_like_digest = !s.contains('/')
            && !s.contains('@')
            && s.split_once(':').is_some_and(|(algo, enc)| {
                algo == "sha256"
                    || (algo
                        .bytes()
                        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
                        && enc.len() >= 32
                        && enc.bytes().all(|b| b.is_ascii_hexdigit()))
            });
        if looks_like_digest {
            return Ok(Target::Digest(s.parse()?));
        }
        if s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Ok(Target::Digest(Digest::from_hex(s)?));
        }
        Ok(Target::Image(ImageRef::parse(s)?))
    }
}

#[derive(Debug, Clone)]
enum Parsed {
    Index(Vec<Descriptor>),
    Manifest {
        config: Option<Descriptor>,
        layers: Vec<Descriptor>,
    },
}

/// An image resolved down to its blobs.
#[derive(Debug, Clone)]
pub struct Resolved {
    pub reference: String,
    pub digest: Digest,
    pub media_type: Option<String>,
    pub platform: Option<String>,
    /// The manifest whose blobs are listed.
    pub manifest: Option<Digest>,
    pub config: Option<Descriptor>,
    pub layers: Vec<Descriptor>,
    /// When the origin last confirmed the tag.
    pub confirmed_at: Option<u64>,
}

impl Resolved {
    /// Every digest the image consists of: index, manifest, config, layers.
    pub fn digests(&self) -> Vec<Digest> {
        let mut out = vec![self.digest.clone()];
        out.extend(self.manifest.iter().cloned());
        for d in self.config.iter().chain(&self.layers) {
            if let Ok(d) = d.digest.parse() {
                out.push(d);
            }
        }
        let mut seen = HashSet::new();
        out.retain(|d| seen.insert(d.clone()));
        out
    }
}

/// Every stored manifest, parsed, and the images they make up.
pub struct Catalog {
    manifests: HashMap<Digest, Parsed>,
    /// digest -> (kind, media type), from manifests and their descriptors.
    roles: HashMap<Digest, (&'static str, Option<String>)>,
    pub images: Vec<Resolved>,
    records: Vec<TagRecord>,
}

impl Catalog {
    /// Reads every manifest in `store` (those with a recorded media type)
    /// and every tag record. Reads only; touches no access times.
    pub fn load(store: &Store) -> Catalog {
        let mut manifests = HashMap::new();
        let mut roles = HashMap::new();
        for b in store.blobs() {
            let Some(mt) = store.media_type(&b.digest) else {
                continue;
            };
            let Some(body) = store.read_untracked(&b.digest, MAX_MANIFEST) else {
                continue;
            };
            let Ok(raw) = serde_json::from_slice::<RawManifest>(&body) else {
                continue;
            };
            let parsed = match raw.manifests {
                Some(children) => {
                    roles.insert(b.digest.clone(), ("index", Some(mt)));
                    Parsed::Index(children)
                }
                None => {
                    roles.insert(b.digest.clone(), ("manifest", Some(mt)));
                    Parsed::Manifest {
                        config: raw.config,
                        layers: raw.layers,
                    }
                }
            };
            manifests.insert(b.digest, parsed);
        }
        for p in manifests.values() {
            if let Parsed::Manifest { config, layers } = p {
                for (kind, d) in config
                    .iter()
                    .map(|c| ("config", c))
                    .chain(layers.iter().map(|l| ("layer", l)))
                {
                    if let Ok(digest) = d.digest.parse::<Digest>() {
                        roles.entry(digest).or_insert((kind, d.media_type.clone()));
                    }
                }
            }
        }
        let mut records = tags::read_all(&store.tags_dir());
        records.sort_by(|a, b| a.reference.cmp(&b.reference));
        let mut cat = Catalog {
            manifests,
            roles,
            images: Vec::new(),
            records,
        };
        cat.images = cat.resolve_all(store);
        cat
    }

    fn resolve_all(&self, store: &Store) -> Vec<Resolved> {
        let mut images = Vec::new();
        let mut named: HashSet<Digest> = HashSet::new();
        for rec in &self.records {
            let (Some(reference), Ok(d)) = (&rec.reference, rec.digest.parse::<Digest>()) else {
                continue;
            };
            let mut r = self.resolve(reference.clone(), &d);
            r.confirmed_at = Some(rec.confirmed_at);
            named.extend(r.digests());
            images.push(r);
        }
        // Manifests pulled by digest only, that no index we hold lists.
        let children: HashSet<Digest> = self
            .manifests
            .values()
            .filter_map(|p| match p {
                Parsed::Index(c) => Some(c),
                _ => None,
            })
            .flatten()
            .filter_map(|c| c.digest.parse().ok())
            .collect();
        let mut loose: Vec<&Digest> = self
            .manifests
            .keys()
            .filter(|d| !named.contains(*d) && !children.contains(*d))
            .collect();
        loose.sort();
        for d in loose {
            let reference = match store.provenance(d) {
                Some(p) => match (p.registry, p.repository) {
                    (Some(reg), Some(repo)) => format!("{reg}/{repo}@{d}"),
                    _ => d.to_string(),
                },
                None => d.to_string(),
            };
            images.push(self.resolve(reference, d));
        }
        images
    }

    /// Resolves `digest` (an index or a manifest) to its blobs. An index is
    /// resolved to the child for this host's platform when it is stored,
    /// else to the first stored child.
    pub fn resolve(&self, reference: String, digest: &Digest) -> Resolved {
        let mut r = Resolved {
            reference,
            digest: digest.clone(),
            media_type: self.roles.get(digest).and_then(|(_, mt)| mt.clone()),
            platform: None,
            manifest: None,
            config: None,
            layers: Vec::new(),
            confirmed_at: None,
        };
        let mut target = digest.clone();
        if let Some(Parsed::Index(children)) = self.manifests.get(digest) {
            let host = Platform::host();
            let stored: Vec<&Descriptor> = children
                .iter()
                .filter(|c| {
                    c.digest
                        .parse::<Digest>()
                        .is_ok_and(|d| self.manifests.contains_key(&d))
                })
                .collect();
            let pick = stored
                .iter()
                .find(|c| c.platform.as_ref().is_some_and(|p| host.matches(p)))
                .or_else(|| stored.first());
            let Some(child) = pick else {
                return r;
            };
            r.platform = child.platform.as_ref().map(|p| p.to_string());
            let Ok(d) = child.digest.parse::<Digest>() else {
                return r;
            };
            target = d;
        }
        if let Some(Parsed::Manifest { config, layers }) = self.manifests.get(&target) {
            r.manifest = Some(target);
            r.config = config.clone();
            r.layers = layers.clone();
        }
        r
    }

    /// The digest a reference names: its own digest, or its tag's last
    /// answer.
    pub fn lookup(&self, r: &ImageRef) -> Option<Digest> {
        if let Some(d) = &r.digest {
            return Some(d.clone());
        }
        let key = r.tag_key()?;
        self.records
            .iter()
            .find(|rec| rec.reference.as_deref() == Some(key.as_str()))
            .and_then(|rec| rec.digest.parse().ok())
    }

    /// `index`, `manifest`, `config` or `layer`, and the media type, when
    /// a stored manifest says.
    pub fn role(&self, d: &Digest) -> (Option<String>, Option<String>) {
        match self.roles.get(d) {
            Some((kind, mt)) => (Some((*kind).to_owned()), mt.clone()),
            None => (None, None),
        }
    }

    /// digest -> references of the images that use it.
    pub fn users(&self) -> HashMap<Digest, Vec<String>> {
        let mut out: HashMap<Digest, Vec<String>> = HashMap::new();
        for img in &self.images {
            for d in img.digests() {
                let v = out.entry(d).or_default();
                if !v.contains(&img.reference) {
                    v.push(img.reference.clone());
                }
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_tell_digests_from_images() {
        let hex = "b".repeat(64);
        assert!(matches!(
            Target::parse(&format!("sha256:{hex}")),
            Ok(Target::Digest(_))
        ));
        assert!(matches!(Target::parse(&hex), Ok(Target::Digest(_))));
        assert!(matches!(
            Target::parse("sha256:short"),
            Err(AdminError::InvalidDigest(_))
        ));
        assert!(matches!(
            Target::parse(&format!("sha512:{hex}")),
            Err(AdminError::InvalidDigest(_))
        ));
        assert!(matches!(
            Target::parse("ubuntu:22.04"),
            Ok(Target::Image(_))
        ));
        assert!(matches!(
            Target::parse("UPPER/case"),
            Err(AdminError::InvalidReference(_))
        ));
    }
}
