//! The content-addressed cache on disk.
//!
//! ```text
//! <dir>/blobs/sha256/<hex>      committed, verified content
//! <dir>/meta/sha256/<hex>       media type of a committed manifest (optional)
//! <dir>/tmp/<hex>.partial       a download in progress, resumable
//! <dir>/tags/<sha256 of key>    last good answer for a manifest tag
//! ```
//!
//! A blob only ever appears under `blobs/` by an atomic rename, after its
//! bytes were hashed and matched the digest and the expected size, and after
//! an fsync. So whatever moment the process dies, `blobs/` holds only
//! verified content, and `tmp/` holds only partials, which the next download
//! re-hashes and resumes.

use std::collections::HashMap;
use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use crate::oci::Digest;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("store I/O on {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("store {path} is in use by another damselfly process")]
    Locked { path: PathBuf },
    #[error(
        "blob {digest} has {actual_size} bytes hashing to {actual}, expected {expected_size} bytes"
    )]
    Mismatch {
        digest: Digest,
        actual: String,
        expected_size: u64,
        actual_size: u64,
    },
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> StoreError + '_ {
    move |source| StoreError::Io {
        path: path.to_owned(),
        source,
    }
}

#[derive(Debug)]
struct Entry {
    size: u64,
    /// Logical clock of the last access; larger is more recent.
    last_access: u64,
    readers: u32,
}

#[derive(Debug, Default)]
struct Index {
    entries: HashMap<Digest, Entry>,
    total: u64,
    clock: u64,
}

/// Totals for metrics and the admin view.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Usage {
    pub bytes: u64,
    pub blobs: u64,
    pub max_size: u64,
}

/// What start-up recovery found.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Recovery {
    pub blobs: u64,
    pub bytes: u64,
    /// Partial downloads kept for resumption.
    pub partials: u64,
    /// Stray files removed from `tmp/` and `blobs/`.
    pub removed: u64,
}

/// The cache. Cheap to clone.
#[derive(Clone, Debug)]
pub struct Store {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    root: PathBuf,
    max_size: u64,
    index: Mutex<Index>,
    /// Held (with an exclusive lock) for the store's lifetime: two daemons
    /// on one store would resume each other's partial files.
    _lock: File,
}

/// Holds a blob open and in use: it is not evicted while a lease lives.
#[derive(Debug)]
pub struct Lease {
    store: Store,
    digest: Digest,
}

impl Drop for Lease {
    fn drop(&mut self) {
        let mut index = self.store.lock();
        if let Some(e) = index.entries.get_mut(&self.digest) {
            e.readers = e.readers.saturating_sub(1);
        }
        drop(index);
        // Eviction may have been held back by this reader.
        self.store.evict_over_quota();
    }
}

/// An open committed blob.
#[derive(Debug)]
pub struct Opened {
    pub file: File,
    pub size: u64,
    pub lease: Lease,
}

impl Store {
    /// Opens (creating if needed) the store at `root` and recovers from
    /// whatever a crash left behind.
    pub fn open(root: &Path, max_size: u64) -> Result<(Store, Recovery), StoreError> {
        for sub in ["blobs/sha256", "meta/sha256", "tmp", "tags"] {
            let p = root.join(sub);
            std::fs::create_dir_all(&p).map_err(io_err(&p))?;
        }
        let lock_path = root.join("lock");
        let lock = File::create(&lock_path).map_err(io_err(&lock_path))?;
        match lock.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                return Err(StoreError::Locked {
                    path: root.to_owned(),
                })
            }
            Err(std::fs::TryLockError::Error(e)) => return Err(io_err(&lock_path)(e)),
        }
        let store = Store {
            inner: Arc::new(Inner {
                root: root.to_owned(),
                max_size,
                index: Mutex::new(Index::default()),
                _lock: lock,
            }),
        };
        let recovery = store.recover()?;
        store.evict_over_quota();
        Ok((store, recovery))
    }

    pub fn root(&self) -> &Path {
        &self.inner.root
    }

    fn lock(&self) -> MutexGuard<'_, Index> {
        // A panic while holding this lock cannot leave the index
        // inconsistent in a way worse than a stale size, so recover from
        // poisoning rather than cascade.
        self.inner.index.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn blob_path(&self, d: &Digest) -> PathBuf {
        self.inner.root.join("blobs/sha256").join(d.hex())
    }

    fn meta_path(&self, d: &Digest) -> PathBuf {
        self.inner.root.join("meta/sha256").join(d.hex())
    }

    /// Where the resumable download of `d` lives.
    pub fn partial_path(&self, d: &Digest) -> PathBuf {
        self.inner
            .root
            .join("tmp")
            .join(format!("{}.partial", d.hex()))
    }

    pub fn tags_dir(&self) -> PathBuf {
        self.inner.root.join("tags")
    }

    fn recover(&self) -> Result<Recovery, StoreError> {
        let mut rec = Recovery::default();
        let tmp = self.inner.root.join("tmp");
        for entry in std::fs::read_dir(&tmp).map_err(io_err(&tmp))? {
            let entry = entry.map_err(io_err(&tmp))?;
            let name = entry.file_name();
            let name = name.to_string_lossy();
            let keep = name
                .strip_suffix(".partial")
                .is_some_and(|hex| Digest::from_hex(hex).is_ok());
            if keep {
                rec.partials += 1;
            } else {
                remove_any(&entry.path());
                rec.removed += 1;
            }
        }
        let blobs = self.inner.root.join("blobs/sha256");
        let mut found = Vec::new();
        for entry in std::fs::read_dir(&blobs).map_err(io_err(&blobs))? {
            let entry = entry.map_err(io_err(&blobs))?;
            let name = entry.file_name();
            let meta = entry.metadata().map_err(io_err(&entry.path()))?;
            match Digest::from_hex(&name.to_string_lossy()) {
                Ok(d) if meta.is_file() => {
                    let mtime = meta.modified().ok();
                    found.push((mtime, d, meta.len()));
                }
                // Only our own renames put files here; anything else is
                // not ours to serve.
                _ => {
                    remove_any(&entry.path());
                    rec.removed += 1;
                }
            }
        }
        // Oldest first, so that the logical clock orders by commit time
        // until real accesses reorder it.
        found.sort_by_key(|(mtime, _, _)| *mtime);
        let mut index = self.lock();
        for (_, d, size) in found {
            index.clock += 1;
            let clock = index.clock;
            index.total += size;
            rec.blobs += 1;
            rec.bytes += size;
            index.entries.insert(
                d,
                Entry {
                    size,
                    last_access: clock,
                    readers: 0,
                },
            );
        }
        Ok(rec)
    }

    pub fn contains(&self, d: &Digest) -> bool {
        self.lock().entries.contains_key(d)
    }

    /// Opens a committed blob for reading, marking it used and in use.
    pub fn open_blob(&self, d: &Digest) -> Result<Option<Opened>, StoreError> {
        {
            let mut index = self.lock();
            index.clock += 1;
            let clock = index.clock;
            match index.entries.get_mut(d) {
                Some(e) => {
                    e.last_access = clock;
                    e.readers += 1;
                }
                None => return Ok(None),
            }
        }
        let lease = Lease {
            store: self.clone(),
            digest: d.clone(),
        };
        let path = self.blob_path(d);
        match File::open(&path) {
            Ok(file) => {
                let size = file.metadata().map_err(io_err(&path))?.len();
                Ok(Some(Opened { file, size, lease }))
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                // Removed behind our back (an operator, or a disk tool):
                // forget it so that it is fetched again.
                drop(lease);
                self.forget(d);
                Ok(None)
            }
            Err(e) => Err(io_err(&path)(e)),
        }
    }

    /// The media type recorded for a committed manifest.
    pub fn media_type(&self, d: &Digest) -> Option<String> {
        std::fs::read_to_string(self.meta_path(d)).ok()
    }

    /// Commits the fully written and verified file at `tmp` as blob `d`.
    /// `verified` is the digest the caller computed over exactly `size`
    /// bytes; a mismatch removes the file and is an error.
    pub fn commit(
        &self,
        d: &Digest,
        tmp: &Path,
        verified: &Digest,
        size: u64,
        expected_size: Option<u64>,
        media_type: Option<&str>,
    ) -> Result<(), StoreError> {
        if verified != d || expected_size.is_some_and(|e| e != size) {
            remove_any(tmp);
            return Err(StoreError::Mismatch {
                digest: d.clone(),
                actual: verified.to_string(),
                expected_size: expected_size.unwrap_or(size),
                actual_size: size,
            });
        }
        let f = File::open(tmp).map_err(io_err(tmp))?;
        f.sync_all().map_err(io_err(tmp))?;
        drop(f);
        if let Some(mt) = media_type {
            // Written first: a crash between the two leaves an orphan meta
            // file, which is harmless, never a manifest without its type.
            let meta = self.meta_path(d);
            write_atomic(&meta, mt.as_bytes())?;
        }
        let dest = self.blob_path(d);
        std::fs::rename(tmp, &dest).map_err(io_err(&dest))?;
        sync_dir(dest.parent().unwrap_or(&self.inner.root));
        {
            let mut index = self.lock();
            index.clock += 1;
            let clock = index.clock;
            let old = index.entries.insert(
                d.clone(),
                Entry {
                    size,
                    last_access: clock,
                    readers: 0,
                },
            );
            index.total = index.total - old.map_or(0, |e| e.size) + size;
        }
        self.evict_over_quota();
        Ok(())
    }

    /// Stores a small, already verified blob (a manifest) from memory.
    pub fn put_small(
        &self,
        d: &Digest,
        bytes: &[u8],
        media_type: Option<&str>,
    ) -> Result<(), StoreError> {
        use sha2::Digest as _;
        let tmp = self.inner.root.join("tmp").join(format!(
            "{}.small.{}",
            d.hex(),
            rand::random::<u32>()
        ));
        std::fs::write(&tmp, bytes).map_err(io_err(&tmp))?;
        let actual = Digest::from_sha256(&sha2::Sha256::digest(bytes));
        self.commit(d, &tmp, &actual, bytes.len() as u64, None, media_type)
    }

    /// Removes a blob (for example one found corrupt). Readers holding it
    /// open keep their file handle.
    pub fn remove(&self, d: &Digest) -> Result<bool, StoreError> {
        let path = self.blob_path(d);
        let existed = match std::fs::remove_file(&path) {
            Ok(()) => true,
            Err(e) if e.kind() == io::ErrorKind::NotFound => false,
            Err(e) => return Err(io_err(&path)(e)),
        };
        let _ = std::fs::remove_file(self.meta_path(d));
        self.forget(d);
        Ok(existed)
    }

    fn forget(&self, d: &Digest) {
        let mut index = self.lock();
        if let Some(e) = index.entries.remove(d) {
            index.total -= e.size;
        }
    }

    pub fn usage(&self) -> Usage {
        let index = self.lock();
        Usage {
            bytes: index.total,
            blobs: index.entries.len() as u64,
            max_size: self.inner.max_size,
        }
    }

    /// Evicts least recently used blobs that nobody reads until the store
    /// fits its quota. Returns the evicted digests.
    pub fn evict_over_quota(&self) -> Vec<Digest> {
        let mut victims = Vec::new();
        {
            let mut index = self.lock();
            if index.total <= self.inner.max_size {
                return victims;
            }
            let mut candidates: Vec<(u64, Digest, u64)> = index
                .entries
                .iter()
                .filter(|(_, e)| e.readers == 0)
                .map(|(d, e)| (e.last_access, d.clone(), e.size))
                .collect();
            candidates.sort_unstable_by_key(|(t, _, _)| *t);
            for (_, d, size) in candidates {
                if index.total <= self.inner.max_size {
                    break;
                }
                index.entries.remove(&d);
                index.total -= size;
                victims.push(d);
            }
        }
        for d in &victims {
            // Unlinking under a reader that opened it a moment ago is fine:
            // its handle stays valid. The index no longer lists it either way.
            let _ = std::fs::remove_file(self.blob_path(d));
            let _ = std::fs::remove_file(self.meta_path(d));
            tracing::debug!(digest = %d, "evicted");
        }
        victims
    }
}

/// Writes `bytes` to `path` by a rename, so readers see all or nothing.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), StoreError> {
    let tmp = path.with_extension(format!("tmp{}", rand::random::<u32>()));
    std::fs::write(&tmp, bytes).map_err(io_err(&tmp))?;
    std::fs::rename(&tmp, path).map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        io_err(path)(e)
    })
}

fn remove_any(p: &Path) {
    let _ = std::fs::remove_file(p).or_else(|_| std::fs::remove_dir_all(p));
}

fn sync_dir(dir: &Path) {
    // Makes the rename itself durable. Best effort: some filesystems refuse
    // fsync on directories, and the data is already synced.
    if let Ok(d) = File::open(dir) {
        let _ = d.sync_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sha2::Digest as _;

    fn digest_of(b: &[u8]) -> Digest {
        Digest::from_sha256(&sha2::Sha256::digest(b))
    }

    fn put(store: &Store, data: &[u8]) -> Digest {
        let d = digest_of(data);
        let tmp = store.partial_path(&d);
        std::fs::write(&tmp, data).unwrap();
        store
            .commit(
                &d,
                &tmp,
                &d,
                data.len() as u64,
                Some(data.len() as u64),
                None,
            )
            .unwrap();
        d
    }

    #[test]
    fn commit_verifies_and_recovery_rebuilds_the_index() {
        let dir = tempfile::tempdir().unwrap();
        let (store, _) = Store::open(dir.path(), 1 << 20).unwrap();
        let d = put(&store, b"hello");
        assert!(store.contains(&d));
        let wrong = digest_of(b"other");
        let tmp = store.partial_path(&wrong);
        std::fs::write(&tmp, b"hello").unwrap();
        let err = store
            .commit(&wrong, &tmp, &d, 5, Some(5), None)
            .unwrap_err();
        assert!(matches!(err, StoreError::Mismatch { .. }));
        assert!(!tmp.exists(), "mismatched data must be discarded");
        assert!(!store.contains(&wrong));

        // A crash leftover in tmp/ and a stray file in blobs/.
        std::fs::write(dir.path().join("tmp/garbage"), b"x").unwrap();
        std::fs::write(dir.path().join("blobs/sha256/not-a-digest"), b"x").unwrap();
        std::fs::write(store.partial_path(&wrong), b"hel").unwrap();
        drop(store);
        let (store, rec) = Store::open(dir.path(), 1 << 20).unwrap();
        assert_eq!(rec.blobs, 1);
        assert_eq!(rec.bytes, 5);
        assert_eq!(rec.partials, 1);
        assert_eq!(rec.removed, 2);
        assert!(store.contains(&d));
        assert_eq!(store.usage().bytes, 5);
    }

    #[test]
    fn lru_eviction_skips_blobs_in_use() {
        let dir = tempfile::tempdir().unwrap();
        let (store, _) = Store::open(dir.path(), 10).unwrap();
        let a = put(&store, b"aaaa");
        let b = put(&store, b"bbbb");
        let held = store.open_blob(&a).unwrap().unwrap(); // a is now most recent and in use
        let c = put(&store, b"cccc"); // 12 bytes > 10: evict the LRU that is not read
        assert!(store.contains(&a));
        assert!(!store.contains(&b));
        assert!(store.contains(&c));
        // Touch c, then drop the lease on a: a is least recent but was in use.
        drop(store.open_blob(&c).unwrap());
        let d = put(&store, b"dddd");
        assert!(store.contains(&a), "a is still held");
        assert!(!store.contains(&c));
        assert!(store.contains(&d));
        drop(held);
        assert_eq!(store.usage().bytes, 8);
        let e = put(&store, b"eeee");
        assert!(!store.contains(&a));
        assert!(store.contains(&e));
        assert!(store.usage().bytes <= 10);
    }

    #[test]
    fn one_process_per_store() {
        let dir = tempfile::tempdir().unwrap();
        let (store, _) = Store::open(dir.path(), 100).unwrap();
        assert!(matches!(
            Store::open(dir.path(), 100),
            Err(StoreError::Locked { .. })
        ));
        drop(store);
        assert!(Store::open(dir.path(), 100).is_ok());
    }

    #[test]
    fn a_blob_removed_behind_our_back_is_forgotten() {
        let dir = tempfile::tempdir().unwrap();
        let (store, _) = Store::open(dir.path(), 100).unwrap();
        let d = put(&store, b"zz");
        std::fs::remove_file(dir.path().join("blobs/sha256").join(d.hex())).unwrap();
        assert!(store.open_blob(&d).unwrap().is_none());
        assert!(!store.contains(&d));
        assert_eq!(store.usage().bytes, 0);
    }

    #[test]
    fn small_blobs_keep_their_media_type() {
        let dir = tempfile::tempdir().unwrap();
        let (store, _) = Store::open(dir.path(), 100).unwrap();
        let body = br#"{"schemaVersion":2}"#;
        let d = digest_of(body);
        store
            .put_small(&d, body, Some("application/vnd.oci.image.manifest.v1+json"))
            .unwrap();
        assert_eq!(
            store.media_type(&d).as_deref(),
            Some("application/vnd.oci.image.manifest.v1+json")
        );
        let bad = digest_of(b"x");
        assert!(store.put_small(&bad, body, None).is_err());
        assert!(!store.contains(&bad));
    }
}
