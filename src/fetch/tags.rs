//! The last good answer for each manifest tag, kept so that a tag can still
//! be resolved, for a bounded time, while its origin is unreachable.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use sha2::Digest as _;

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct TagRecord {
    /// `registry/repo:tag`. Records written before it was kept lack it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reference: Option<String>,
    pub digest: String,
    pub media_type: String,
    /// Seconds since the Unix epoch when the origin last confirmed it.
    pub confirmed_at: u64,
}

pub struct TagCache {
    dir: PathBuf,
    stale_for: Duration,
    mem: Mutex<HashMap<String, TagRecord>>,
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

impl TagCache {
    pub fn new(dir: PathBuf, stale_for: Duration) -> TagCache {
        TagCache {
            dir,
            stale_for,
            mem: Mutex::new(HashMap::new()),
        }
    }

    fn file(&self, key: &str) -> PathBuf {
        // Hashing the key keeps any repository name out of file paths.
        self.dir
            .join(hex::encode(sha2::Sha256::digest(key.as_bytes())))
    }

    /// Remembers the origin's current answer for `key` (registry/repo:tag).
    pub fn record(&self, key: &str, digest: &str, media_type: &str) {
        let rec = TagRecord {
            reference: Some(key.to_owned()),
            digest: digest.to_owned(),
            media_type: media_type.to_owned(),
            confirmed_at: now(),
        };
        if let Ok(json) = serde_json::to_vec(&rec) {
            if let Err(e) = crate::store::write_atomic(&self.file(key), &json) {
                tracing::debug!(error = %e, "cannot persist tag record");
            }
        }
        self.mem
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(key.to_owned(), rec);
    }

    /// The last answer for `key`, if it is recent enough to stand in for the
    /// origin, with its age.
    pub fn fallback(&self, key: &str) -> Option<(TagRecord, Duration)> {
        if self.stale_for.is_zero() {
            return None;
        }
        let cached = self
            .mem
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(key)
            .cloned();
        let rec = cached.or_else(|| {
            let bytes = std::fs::read(self.file(key)).ok()?;
            serde_json::from_slice::<TagRecord>(&bytes).ok()
        })?;
        // A clock that went backwards makes a record look new; the bound is
        // still applied once time catches up.
        let age = Duration::from_secs(now().saturating_sub(rec.confirmed_at));
        (age <= self.stale_for).then_some((rec, age))
    }
}

/// Every record in `dir`, for listing the images a node has seen. Reads
/// only; unreadable files are skipped.
pub fn read_all(dir: &Path) -> Vec<TagRecord> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| {
            let bytes = std::fs::read(e.path()).ok()?;
            serde_json::from_slice::<TagRecord>(&bytes).ok()
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_survive_a_restart_and_expire() {
        let dir = tempfile::tempdir().unwrap();
        let cache = TagCache::new(dir.path().to_owned(), Duration::from_secs(60));
        cache.record("r/x:v1", "sha256:aa", "application/json");
        let again = TagCache::new(dir.path().to_owned(), Duration::from_secs(60));
        let (rec, age) = again.fallback("r/x:v1").unwrap();
        assert_eq!(rec.digest, "sha256:aa");
        assert!(age <= Duration::from_secs(1));
        assert!(again.fallback("r/x:v2").is_none());
        let all = read_all(dir.path());
        assert_eq!(all.len(), 1);
        assert_eq!(all[0].reference.as_deref(), Some("r/x:v1"));

        // A record confirmed long ago is past the bound.
        let old = TagRecord {
            reference: None,
            digest: "sha256:bb".into(),
            media_type: "m".into(),
            confirmed_at: now() - 120,
        };
        std::fs::write(again.file("r/y:v1"), serde_json::to_vec(&old).unwrap()).unwrap();
        assert!(again.fallback("r/y:v1").is_none());

        let off = TagCache::new(dir.path().to_owned(), Duration::ZERO);
        assert!(off.fallback("r/x:v1").is_none());
    }
}
