//! Looking after the store: listing, provenance, GC to a target size, and
//! verification by re-hashing.

use std::fs::File;
use std::io::{self, Read};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use sha2::Digest as _;

use super::{io_err, write_atomic, Store, StoreError};
use crate::oci::Digest;

/// Where a blob's bytes came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Fetched {
    Origin,
    Peer,
}

/// The record of where a blob came from, kept beside it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Provenance {
    pub from: Fetched,
    /// The registry (as containerd names it in `?ns=`) it was fetched for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub registry: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub repository: Option<String>,
    /// Seconds since the Unix epoch.
    pub fetched_at: u64,
}

impl Provenance {
    pub fn origin(registry: &str, repository: &str) -> Provenance {
        Provenance {
            from: Fetched::Origin,
            registry: Some(registry.to_owned()),
            repository: Some(repository.to_owned()),
            fetched_at: unix_now(),
        }
    }
}

/// A committed blob as the index knows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlobInfo {
    pub digest: Digest,
    pub size: u64,
    /// The last read or the commit; survives restarts as the file's mtime
    /// (to within a minute).
    pub accessed: SystemTime,
    /// Readers holding the blob open right now.
    pub readers: u32,
    pub pinned: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Evicted {
    pub digest: Digest,
    pub size: u64,
}

/// What a GC did, or would do on a dry run.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GcReport {
    pub target: u64,
    pub dry_run: bool,
    pub before: u64,
    pub after: u64,
    /// Least recently used first.
    pub evicted: Vec<Evicted>,
    pub kept_pinned_blobs: u64,
    pub kept_pinned_bytes: u64,
    pub kept_in_use_blobs: u64,
    pub kept_in_use_bytes: u64,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct VerifyProgress {
    pub blobs_done: u64,
    pub blobs_total: u64,
    pub bytes_done: u64,
    pub bytes_total: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CorruptBlob {
    pub digest: Digest,
    pub size: u64,
    /// What the bytes on disk hash to, or why they could not be read.
    pub actual: String,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct VerifyReport {
    pub checked: u64,
    pub bytes: u64,
    pub corrupt: Vec<CorruptBlob>,
    /// Blobs evicted or removed while the check ran; not a fault.
    pub vanished: Vec<Digest>,
    /// Corrupt blobs removed (with repair).
    pub removed: Vec<Digest>,
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

impl Store {
    /// Every committed blob, in no particular order.
    pub fn blobs(&self) -> Vec<BlobInfo> {
        let index = self.lock();
        index
            .entries
            .iter()
            .map(|(d, e)| BlobInfo {
                digest: d.clone(),
                size: e.size,
                accessed: e.accessed,
                readers: e.readers,
                pinned: index.pinned.contains(d),
            })
            .collect()
    }

    pub fn blob_info(&self, d: &Digest) -> Option<BlobInfo> {
        let index = self.lock();
        index.entries.get(d).map(|e| BlobInfo {
            digest: d.clone(),
            size: e.size,
            accessed: e.accessed,
            readers: e.readers,
            pinned: index.pinned.contains(d),
        })
    }

    /// Partial downloads on disk: digest and bytes so far.
    pub fn partials(&self) -> Vec<(Digest, u64)> {
        self.partials_aged()
            .into_iter()
            .map(|p| (p.digest, p.bytes))
            .collect()
    }

    /// Reads a small committed blob (a manifest) without marking it used,
    /// so that listing never reorders the LRU. `None` when absent or larger
    /// than `limit`.
    pub fn read_untracked(&self, d: &Digest, limit: u64) -> Option<Vec<u8>> {
        let mut f = File::open(self.blob_path(d)).ok()?;
        if f.metadata().ok()?.len() > limit {
            return None;
        }
        let mut buf = Vec::new();
        f.read_to_end(&mut buf).ok()?;
        Some(buf)
    }

    /// Records where blob `d` came from. Best effort by design: a missing
    /// record only makes the CLI say "unknown".
    pub fn set_provenance(&self, d: &Digest, p: &Provenance) -> Result<(), StoreError> {
        self.writable()?;
        let json = serde_json::to_vec(p).unwrap_or_default();
        write_atomic(&self.source_path(d), &json)
    }

    pub fn provenance(&self, d: &Digest) -> Option<Provenance> {
        let bytes = std::fs::read(self.source_path(d)).ok()?;
        serde_json::from_slice(&bytes).ok()
    }

    /// Evicts least recently used blobs, never pinned ones nor ones being
    /// read, until the store holds at most `target` bytes (or nothing more
    /// can go). A dry run only reports.
    pub fn gc(&self, target: u64, dry_run: bool) -> Result<GcReport, StoreError> {
        if !dry_run {
            self.writable()?;
        }
        Ok(self.evict_to(target, dry_run))
    }

    pub(super) fn evict_to(&self, target: u64, dry_run: bool) -> GcReport {
        let mut report = GcReport {
            target,
            dry_run,
            ..GcReport::default()
        };
        {
            let mut index = self.lock();
            report.before = index.total;
            let mut candidates = Vec::new();
            for (d, e) in &index.entries {
                if index.pinned.contains(d) {
                    report.kept_pinned_blobs += 1;
                    report.kept_pinned_bytes += e.size;
                } else if e.readers > 0 {
                    report.kept_in_use_blobs += 1;
                    report.kept_in_use_bytes += e.size;
                } else {
                    candidates.push((e.last_access, d.clone(), e.size));
                }
            }
            candidates.sort_unstable_by_key(|(t, _, _)| *t);
            let mut total = index.total;
            for (_, digest, size) in candidates {
                if total <= target {
                    break;
                }
                total -= size;
                report.evicted.push(Evicted { digest, size });
            }
            report.after = total;
            if !dry_run {
                for e in &report.evicted {
                    index.entries.remove(&e.digest);
                }
                index.total = total;
            }
        }
        if !dry_run {
            for e in &report.evicted {
                // Unlinking under a reader that opened it a moment ago is
                // fine: its handle stays valid.
                let _ = self.unlink(&e.digest);
                tracing::debug!(digest = %e.digest, "evicted");
                self.removed(&e.digest);
            }
        }
        report
    }

    /// Re-hashes every committed blob. Corrupt ones are reported, and with
    /// `repair` removed so that the next pull fetches them again. Blocking:
    /// reads every byte of the store.
    pub fn verify(
        &self,
        repair: bool,
        progress: &mut dyn FnMut(&VerifyProgress),
    ) -> Result<VerifyReport, StoreError> {
        if repair {
            self.writable()?;
        }
        let mut blobs = self.blobs();
        blobs.sort_by(|a, b| a.digest.cmp(&b.digest));
        let mut p = VerifyProgress {
            blobs_total: blobs.len() as u64,
            bytes_total: blobs.iter().map(|b| b.size).sum(),
            ..VerifyProgress::default()
        };
        progress(&p);
        let mut report = VerifyReport::default();
        let mut buf = vec![0u8; 1 << 20];
        for b in blobs {
            let path = self.blob_path(&b.digest);
            let base = p.bytes_done;
            let mut on_bytes = |n: u64| {
                p.bytes_done = base + n;
                progress(&p);
            };
            match hash_file(&path, &mut buf, &mut on_bytes) {
                Ok((actual, size)) if actual == b.digest && size == b.size => {}
                Ok((actual, size)) => report.corrupt.push(CorruptBlob {
                    digest: b.digest.clone(),
                    size,
                    actual: actual.to_string(),
                }),
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    report.vanished.push(b.digest.clone())
                }
                Err(e) => report.corrupt.push(CorruptBlob {
                    digest: b.digest.clone(),
                    size: b.size,
                    actual: format!("unreadable: {e}"),
                }),
            }
            report.checked += 1;
            report.bytes += b.size;
            p.blobs_done += 1;
            p.bytes_done = base + b.size;
            progress(&p);
        }
        if repair {
            for c in &report.corrupt {
                let path = self.blob_path(&c.digest);
                self.remove(&c.digest).map_err(|e| match e {
                    StoreError::Io { source, .. } => io_err(&path)(source),
                    other => other,
                })?;
                tracing::warn!(digest = %c.digest, actual = %c.actual, "removed a corrupt blob");
                report.removed.push(c.digest.clone());
            }
        }
        Ok(report)
    }
}

/// The sha256 and length of a file, reporting bytes read as it goes.
fn hash_file(
    path: &std::path::Path,
    buf: &mut [u8],
    on_bytes: &mut dyn FnMut(u64),
) -> io::Result<(Digest, u64)> {
    let mut f = File::open(path)?;
    let mut hasher = sha2::Sha256::new();
    let mut n = 0u64;
    loop {
        let got = f.read(buf)?;
        if got == 0 {
            return Ok((Digest::from_sha256(&hasher.finalize()), n));
        }
        hasher.update(&buf[..got]);
        n += got as u64;
        on_bytes(n);
    }
}
