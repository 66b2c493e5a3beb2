//! Pins: content exempt from eviction and GC.
//!
//! A pin is a record, `pins/<sha256 of target>.json`, naming what was pinned
//! (an image reference or a digest) and the digests that it resolved to when
//! it was pinned. A digest is pinned while any record lists it, so two pinned
//! images that share a layer keep it until both are unpinned. A record may
//! list digests that are not in the store yet: prewarm pins an image before
//! fetching it.

use std::collections::HashSet;
use std::path::PathBuf;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use sha2::Digest as _;

use super::{io_err, write_atomic, Store, StoreError};
use crate::oci::Digest;

/// One pin as stored on disk.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PinRecord {
    /// What the user pinned: an image reference or a digest.
    pub target: String,
    /// The digests it resolved to (`sha256:<hex>`).
    pub digests: Vec<String>,
    /// Seconds since the Unix epoch.
    pub pinned_at: u64,
}

impl Store {
    fn pins_dir(&self) -> PathBuf {
        self.inner.root.join("pins")
    }

    fn pin_path(&self, target: &str) -> PathBuf {
        // Hashing keeps image names (slashes, colons) out of file names.
        let name = hex::encode(sha2::Sha256::digest(target.as_bytes()));
        self.pins_dir().join(format!("{name}.json"))
    }

    /// Every pin record on disk, in no particular order. Unreadable records
    /// are skipped with a log line: a bad file must not stop the daemon.
    pub fn pins(&self) -> Vec<PinRecord> {
        let Ok(dir) = std::fs::read_dir(self.pins_dir()) else {
            return Vec::new();
        };
        let mut out = Vec::new();
        for entry in dir.flatten() {
            let path = entry.path();
            if path.extension().is_none_or(|e| e != "json") {
                continue;
            }
            match std::fs::read(&path)
                .map_err(|e| e.to_string())
                .and_then(|b| serde_json::from_slice::<PinRecord>(&b).map_err(|e| e.to_string()))
            {
                Ok(rec) => out.push(rec),
                Err(e) => {
                    tracing::warn!(path = %path.display(), error = %e, "skipping unreadable pin")
                }
            }
        }
        out
    }

    /// Rebuilds the in-memory pinned set from the records on disk.
    pub(super) fn load_pins(&self) {
        let pinned: HashSet<Digest> = self
            .pins()
            .iter()
            .flat_map(|r| r.digests.iter().filter_map(|d| d.parse().ok()))
            .collect();
        self.lock().pinned = pinned;
    }

    pub fn is_pinned(&self, d: &Digest) -> bool {
        self.lock().pinned.contains(d)
    }

    /// Pins `digests` under `target`, replacing an earlier pin of the same
    /// target.
    pub fn pin(&self, target: &str, digests: &[Digest]) -> Result<PinRecord, StoreError> {
        self.writable()?;
        let dir = self.pins_dir();
        std::fs::create_dir_all(&dir).map_err(io_err(&dir))?;
        let rec = PinRecord {
            target: target.to_owned(),
            digests: digests.iter().map(|d| d.to_string()).collect(),
            pinned_at: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
        };
        let json = serde_json::to_vec_pretty(&rec).unwrap_or_default();
        write_atomic(&self.pin_path(target), &json)?;
        self.lock().pinned.extend(digests.iter().cloned());
        Ok(rec)
    }

    /// Removes the pin of `target`, returning it, or `None` if there was
    /// none. Its digests stay pinned if another record lists them.
    pub fn unpin(&self, target: &str) -> Result<Option<PinRecord>, StoreError> {
        self.writable()?;
        let path = self.pin_path(target);
        let rec = std::fs::read(&path)
            .ok()
            .and_then(|b| serde_json::from_slice::<PinRecord>(&b).ok());
        match std::fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io_err(&path)(e)),
        }
        self.load_pins();
        // Content held back only by this pin may now be over the quota.
        self.evict_over_quota();
        Ok(rec)
    }
}
