//! Integrity of committed blobs at rest: the chunk sums that verified reads
//! check, the quarantine that takes a blob that rotted out of `blobs/`, a
//! full re-check (SHA-256 and chunk sums) for the scrub and for blobs that
//! have no sums, and the bookkeeping of partial downloads.
//!
//! ```text
//! <dir>/quarantine/<hex>.<unix seconds>   a blob whose bytes stopped matching
//! <dir>/scrub.json                        where the scrub is (survives restarts)
//! ```
//!
//! A blob is quarantined only if the file at its path is the very file the
//! reader found wrong (same device and inode): a reader that held the old
//! file open must not quarantine the good copy that was fetched since. The
//! check and the rename happen under the index lock, as do commits' renames.

use std::fs::File;
use std::io;
use std::os::unix::fs::{FileExt as _, MetadataExt as _};
use std::path::PathBuf;
use std::time::SystemTime;

use serde::{Deserialize, Serialize};
use sha2::Digest as _;

use super::{io_err, remove_any, sync_dir, write_atomic, Store, StoreError, SUM_CHUNK};
use crate::oci::Digest;

/// Quarantined blobs kept for a post-mortem; older ones are deleted (with
/// a log line). They are outside `store.max_size`, so few.
pub const QUARANTINE_KEEP: usize = 4;

/// What a full re-check of a committed blob found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Checked {
    /// The bytes hash to the digest. `sums_fixed`: the recorded chunk sums
    /// were missing or wrong, and were written again.
    Good { size: u64, sums_fixed: bool },
    /// The bytes do not hash to the digest; the blob was quarantined (to
    /// `quarantined`, `None` when another reader had already moved it).
    Corrupt {
        size: u64,
        actual: Digest,
        /// The first chunk whose bytes differ from the recorded sums, when
        /// sums were recorded.
        first_bad: Option<u64>,
        quarantined: Option<PathBuf>,
    },
    /// Not committed (any more): evicted, removed, or quarantined.
    Vanished,
}

/// A re-check in progress: [`BlobCheck::step`] reads one chunk at a time,
/// so that the scrub can pace itself between chunks. Blocking I/O.
pub struct BlobCheck {
    digest: Digest,
    file: File,
    size: u64,
    pos: u64,
    sha: sha2::Sha256,
    sums: Vec<u64>,
    recorded: Option<Vec<u64>>,
    first_bad: Option<u64>,
    buf: Vec<u8>,
}

impl BlobCheck {
    /// Reads and hashes the next chunk; returns the bytes read, 0 at the end.
    pub fn step(&mut self) -> io::Result<u64> {
        if self.pos >= self.size {
            return Ok(0);
        }
        let n = (self.size - self.pos).min(SUM_CHUNK) as usize;
        self.file.read_exact_at(&mut self.buf[..n], self.pos)?;
        let data = &self.buf[..n];
        self.sha.update(data);
        let sum = xxhash_rust::xxh3::xxh3_64(data);
        let k = self.sums.len();
        if self.first_bad.is_none()
            && self
                .recorded
                .as_ref()
                .is_some_and(|r| r.get(k) != Some(&sum))
        {
            self.first_bad = Some(self.pos);
        }
        self.sums.push(sum);
        self.pos += n as u64;
        Ok(n as u64)
    }

    /// Bytes still to read.
    pub fn remaining(&self) -> u64 {
        self.size - self.pos
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    /// Reads what is left, then [`BlobCheck::finish`]es.
    pub fn run(mut self, store: &Store) -> Result<Checked, StoreError> {
        let path = store.blob_path(&self.digest);
        while self.step().map_err(io_err(&path))? > 0 {}
        self.finish(store)
    }

    /// Judges the bytes read: good ones get their sums recorded if they were
    /// missing or wrong; bad ones are quarantined.
    pub fn finish(self, store: &Store) -> Result<Checked, StoreError> {
        let actual = Digest::from_sha256(&self.sha.finalize());
        if actual == self.digest {
            let sums_fixed = self.recorded.as_deref() != Some(&self.sums[..]);
            if sums_fixed {
                store.set_sums(&self.digest, &self.sums)?;
            }
            return Ok(Checked::Good {
                size: self.size,
                sums_fixed,
            });
        }
        let quarantined = store.quarantine(&self.digest, &self.file)?;
        Ok(Checked::Corrupt {
            size: self.size,
            actual,
            first_bad: self.first_bad,
            quarantined,
        })
    }
}

/// Where the scrub stands, kept in `scrub.json`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ScrubState {
    /// When the current (or last) pass started, seconds since the epoch.
    pub started: u64,
    /// The last blob the current pass checked; `None` once the pass is done.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub after: Option<String>,
}

/// A partial download on disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Partial {
    pub digest: Digest,
    pub bytes: u64,
    pub modified: SystemTime,
}

impl Store {
    fn quarantine_dir(&self) -> PathBuf {
        self.inner.root.join("quarantine")
    }

    /// Whether chunk sums of the right length are recorded for blob `d` of
    /// `size` bytes.
    pub fn has_sums(&self, d: &Digest, size: u64) -> bool {
        std::fs::metadata(self.sums_path(d)).is_ok_and(|m| m.len() == size.div_ceil(SUM_CHUNK) * 8)
    }

    /// The recorded sums of chunks `first..last` of blob `d` (`last` is
    /// capped at the blob's last chunk), read without the rest of the file.
    /// `None` when no sums of the right length are recorded.
    pub fn sums_slice(&self, d: &Digest, size: u64, first: usize, last: usize) -> Option<Vec<u64>> {
        let f = File::open(self.sums_path(d)).ok()?;
        let chunks = size.div_ceil(SUM_CHUNK) as usize;
        if f.metadata().ok()?.len() != chunks as u64 * 8 {
            return None;
        }
        let last = last.min(chunks);
        if first > last {
            return None;
        }
        let mut bytes = vec![0u8; (last - first) * 8];
        f.read_exact_at(&mut bytes, first as u64 * 8).ok()?;
        Some(
            bytes
                .chunks_exact(8)
                .map(|c| u64::from_le_bytes(c.try_into().unwrap_or_default()))
                .collect(),
        )
    }

    /// Starts a full re-check of committed blob `d`, reading it without
    /// marking it used (the scrub must not reorder the LRU). `None` when it
    /// is not committed.
    pub fn check_blob(&self, d: &Digest) -> Result<Option<BlobCheck>, StoreError> {
        if !self.contains(d) {
            return Ok(None);
        }
        let path = self.blob_path(d);
        let file = match File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io_err(&path)(e)),
        };
        let size = file.metadata().map_err(io_err(&path))?.len();
        Ok(Some(BlobCheck {
            digest: d.clone(),
            file,
            size,
            pos: 0,
            sha: sha2::Sha256::new(),
            sums: Vec::with_capacity(size.div_ceil(SUM_CHUNK) as usize),
            recorded: self.sums(d, size),
            first_bad: None,
            buf: vec![0u8; SUM_CHUNK.min(size) as usize],
        }))
    }

    /// Moves committed blob `d` to `quarantine/` and forgets it, if the file
    /// at its path is `held` (the handle whose bytes were found wrong).
    /// Returns where it went; `None` when the path holds another file or
    /// none (already quarantined, evicted, or fetched again since).
    pub fn quarantine(&self, d: &Digest, held: &File) -> Result<Option<PathBuf>, StoreError> {
        self.writable()?;
        let src = self.blob_path(d);
        let held_id = held
            .metadata()
            .map(|m| (m.dev(), m.ino()))
            .map_err(io_err(&src))?;
        let dir = self.quarantine_dir();
        std::fs::create_dir_all(&dir).map_err(io_err(&dir))?;
        let stamp = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |t| t.as_secs());
        let dest = dir.join(format!("{}.{stamp}", d.hex()));
        {
            let mut index = self.lock();
            match std::fs::metadata(&src) {
                Ok(m) if (m.dev(), m.ino()) == held_id => {}
                Ok(_) => return Ok(None),
                Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
                Err(e) => return Err(io_err(&src)(e)),
            }
            std::fs::rename(&src, &dest).map_err(io_err(&dest))?;
            if let Some(e) = index.entries.remove(d) {
                index.total -= e.size;
            }
            // Under the lock: a download of `d` that starts once the entry
            // is gone writes its own side files, which must survive.
            let _ = std::fs::remove_file(self.meta_path(d));
            let _ = std::fs::remove_file(self.source_path(d));
            let _ = std::fs::remove_file(self.sums_path(d));
        }
        sync_dir(&dir);
        self.prune_quarantine();
        self.removed(d);
        Ok(Some(dest))
    }

    /// Quarantined files, newest first: path and size.
    pub fn quarantined(&self) -> Vec<(PathBuf, u64)> {
        let Ok(dir) = std::fs::read_dir(self.quarantine_dir()) else {
            return Vec::new();
        };
        let mut found: Vec<(u64, PathBuf, u64)> = dir
            .flatten()
            .filter_map(|e| {
                let name = e.file_name();
                let stamp = name.to_str()?.rsplit_once('.')?.1.parse().ok()?;
                Some((stamp, e.path(), e.metadata().ok()?.len()))
            })
            .collect();
        found.sort_by(|a, b| b.0.cmp(&a.0).then_with(|| b.1.cmp(&a.1)));
        found.into_iter().map(|(_, p, n)| (p, n)).collect()
    }

    pub(super) fn prune_quarantine(&self) {
        for (path, bytes) in self.quarantined().into_iter().skip(QUARANTINE_KEEP) {
            remove_any(&path);
            tracing::warn!(path = %path.display(), bytes,
                "deleted an old quarantined blob (only the newest {QUARANTINE_KEEP} are kept)");
        }
    }

    /// Partial downloads on disk, with their last modification.
    pub fn partials_aged(&self) -> Vec<Partial> {
        let Ok(dir) = std::fs::read_dir(self.inner.root.join("tmp")) else {
            return Vec::new();
        };
        dir.flatten()
            .filter_map(|e| {
                let name = e.file_name();
                let hex = name.to_str()?.strip_suffix(".partial")?;
                let digest = Digest::from_hex(hex).ok()?;
                let meta = e.metadata().ok()?;
                Some(Partial {
                    digest,
                    bytes: meta.len(),
                    modified: meta.modified().ok()?,
                })
            })
            .collect()
    }

    /// Removes the partial download of `d`. The caller makes sure that no
    /// download of `d` is in flight.
    pub fn remove_partial(&self, d: &Digest) -> Result<bool, StoreError> {
        self.writable()?;
        let path = self.partial_path(d);
        let _ = std::fs::remove_file(self.pieces_path(d));
        match std::fs::remove_file(&path) {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(io_err(&path)(e)),
        }
    }

    fn scrub_path(&self) -> PathBuf {
        self.inner.root.join("scrub.json")
    }

    /// Where the scrub stands; the default (never run) if unrecorded or
    /// unreadable.
    pub fn scrub_state(&self) -> ScrubState {
        std::fs::read(self.scrub_path())
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default()
    }

    pub fn set_scrub_state(&self, s: &ScrubState) -> Result<(), StoreError> {
        self.writable()?;
        let json = serde_json::to_vec(s).unwrap_or_default();
        write_atomic(&self.scrub_path(), &json)
    }
}
