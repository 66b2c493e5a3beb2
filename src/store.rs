//! The content-addressed cache on disk.
//!
//! ```text
//! <dir>/blobs/sha256/<hex>      committed, verified content
//! <dir>/meta/sha256/<hex>       media type of a committed manifest (optional)
//! <dir>/meta/sha256/<hex>.source where the blob came from (JSON, optional)
//! <dir>/meta/sha256/<hex>.sums  xxh3-64 of every MiB, checked as it is served
//! <dir>/tmp/<hex>.partial       a download in progress, resumable
//! <dir>/quarantine/<hex>.<time> a blob whose bytes stopped matching
//! <dir>/tags/<sha256 of key>    last good answer for a manifest tag
//! <dir>/pins/<sha256 of target>.json  a pin: digests exempt from eviction
//! ```
//!
//! A blob only ever appears under `blobs/` by an atomic rename, after its
//! bytes were hashed and matched the digest and the expected size, and after
//! an fsync. So whatever moment the process dies, `blobs/` holds only
//! verified content, and `tmp/` holds only partials, which the next download
//! re-hashes and resumes.
//!
//! [`Store::open_read_only`] opens the same directory without its lock and
//! without ever writing to it, for the CLI while the daemon is down.
//! Pinning, on-demand GC and verification live in the [`pins`] and
//! [`maintain`] submodules; quarantine, re-checks and partial downloads'
//! bookkeeping in [`integrity`].

mod integrity;
mod maintain;
mod pins;

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use crate::oci::Digest;

pub use integrity::{BlobCheck, Checked, Partial, ScrubState, QUARANTINE_KEEP};
pub use maintain::{BlobInfo, Evicted, GcReport, Provenance, VerifyProgress, VerifyReport};
pub use maintain::{CorruptBlob, Fetched};
pub use pins::PinRecord;

/// How stale a blob's on-disk access time (its mtime) may get before a read
/// refreshes it; bounds the metadata writes a hot blob causes.
const ACCESS_PERSIST_INTERVAL: Duration = Duration::from_secs(60);

/// Bytes per checksum in a blob's `.sums` side file.
pub const SUM_CHUNK: u64 = 1 << 20;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("store I/O on {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("store {path} is in use by another damselfly process")]
    Locked { path: PathBuf },
    #[error("store {path} was opened read-only")]
    ReadOnly { path: PathBuf },
    #[error("no store at {path}")]
    Missing { path: PathBuf },
    #[error(
        "blob {digest} has {actual_size} bytes hashing to {actual}, expected {expected_size} bytes"
    )]
    Mismatch {
        digest: Digest,
        actual: Digest,
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

/// A partial download untouched for this long is abandoned: start-up (and,
/// while the daemon runs, the fetcher's sweep) removes it rather than keep
/// it outside the quota forever.
pub const PARTIAL_TTL: std::time::Duration = std::time::Duration::from_secs(24 * 3600);

#[derive(Debug)]
struct Entry {
    size: u64,
    /// Logical clock of the last access; larger is more recent.
    last_access: u64,
    /// Wall-clock time of the last access, for people.
    accessed: SystemTime,
    readers: u32,
}

#[derive(Debug, Default)]
struct Index {
    entries: HashMap<Digest, Entry>,
    total: u64,
    clock: u64,
    /// Union of every pin record's digests; never evicted.
    pinned: HashSet<Digest>,
}

/// Totals for metrics and the admin view.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Usage {
    pub bytes: u64,
    pub blobs: u64,
    pub max_size: u64,
}

impl Usage {
    /// Publishes the store's size gauges.
    pub fn publish(&self, metrics: &crate::telemetry::Metrics) {
        metrics.store_bytes.set(self.bytes as i64);
        metrics.store_blobs.set(self.blobs as i64);
        metrics.store_max_bytes.set(self.max_size as i64);
    }
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
    /// Serializes pin changes: held across writing or removing a pin record
    /// and updating `Index::pinned`, and across rescanning `pins/` and
    /// swapping the set in, so that a rescan never drops a newer pin. Taken
    /// before `index`, never while holding it.
    pins: Mutex<()>,
    /// Held (with an exclusive lock) for the store's lifetime: two daemons
    /// on one store would resume each other's partial files. `None` for a
    /// read-only view, which never writes.
    lock_file: Option<File>,
    /// Told of every blob that leaves the store (evicted, removed,
    /// quarantined, gone behind our back): the swarm withdraws its provider
    /// record, so peers stop asking this node for it.
    on_removed: std::sync::OnceLock<RemovedHook>,
}

struct RemovedHook(Box<dyn Fn(&Digest) + Send + Sync>);

impl std::fmt::Debug for RemovedHook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RemovedHook")
    }
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
        let over = index.total > self.store.inner.max_size;
        drop(index);
        if !over {
            return;
        }
        // Eviction may have been held back by this reader. It unlinks files,
        // which can take long for huge ones: off the async runtime if there
        // is one.
        let store = self.store.clone();
        match tokio::runtime::Handle::try_current() {
            Ok(rt) => {
                rt.spawn_blocking(move || store.evict_over_quota());
            }
            Err(_) => {
                store.evict_over_quota();
            }
        }
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
        for sub in ["blobs/sha256", "meta/sha256", "tmp", "tags", "pins"] {
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
        let store = Store::with_inner(root, max_size, Some(lock));
        let recovery = store.recover(true)?;
        store.load_pins();
        store.evict_over_quota();
        Ok((store, recovery))
    }

    fn with_inner(root: &Path, max_size: u64, lock_file: Option<File>) -> Store {
        Store {
            inner: Arc::new(Inner {
                root: root.to_owned(),
                max_size,
                index: Mutex::new(Index::default()),
                pins: Mutex::new(()),
                lock_file,
                on_removed: std::sync::OnceLock::new(),
            }),
        }
    }

    /// Opens the store at `root` as it is, without taking its lock and
    /// without writing anything: stray files are skipped, not removed, and
    /// every mutation fails with [`StoreError::ReadOnly`]. What it shows is
    /// a snapshot; a daemon may be changing the directory meanwhile.
    pub fn open_read_only(root: &Path, max_size: u64) -> Result<Store, StoreError> {
        if !root.join("blobs/sha256").is_dir() {
            return Err(StoreError::Missing {
                path: root.to_owned(),
            });
        }
        let store = Store::with_inner(root, max_size, None);
        store.recover(false)?;
        store.load_pins();
        Ok(store)
    }

    pub fn root(&self) -> &Path {
        &self.inner.root
    }

    pub fn is_read_only(&self) -> bool {
        self.inner.lock_file.is_none()
    }

    fn writable(&self) -> Result<(), StoreError> {
        if self.is_read_only() {
            return Err(StoreError::ReadOnly {
                path: self.inner.root.clone(),
            });
        }
        Ok(())
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

    /// Where committed blob `d` lives (for log lines and operators).
    pub fn blob_path_of(&self, d: &Digest) -> PathBuf {
        self.blob_path(d)
    }

    fn meta_path(&self, d: &Digest) -> PathBuf {
        self.inner.root.join("meta/sha256").join(d.hex())
    }

    fn source_path(&self, d: &Digest) -> PathBuf {
        self.inner
            .root
            .join("meta/sha256")
            .join(format!("{}.source", d.hex()))
    }

    fn sums_path(&self, d: &Digest) -> PathBuf {
        self.inner
            .root
            .join("meta/sha256")
            .join(format!("{}.sums", d.hex()))
    }

    /// Records the chunk checksums of a blob (see `fetch::pieces`): xxh3-64
    /// of every [`SUM_CHUNK`] bytes, little endian. Downloads write them
    /// just before the commit. Reads from the store are checked against
    /// them as they are served (`fetch::verify`), and peers receive them
    /// with the bytes, so a disk that rotted under a committed blob is
    /// caught chunk by chunk.
    pub fn set_sums(&self, d: &Digest, sums: &[u64]) -> Result<(), StoreError> {
        self.writable()?;
        let bytes: Vec<u8> = sums.iter().flat_map(|s| s.to_le_bytes()).collect();
        write_atomic(&self.sums_path(d), &bytes)
    }

    /// The chunk checksums of a committed blob of `size` bytes, if recorded
    /// and of the right length.
    pub fn sums(&self, d: &Digest, size: u64) -> Option<Vec<u64>> {
        self.sums_slice(d, size, 0, usize::MAX)
    }

    /// Removes a blob's file and its side files. The index is the caller's.
    fn unlink(&self, d: &Digest) -> io::Result<bool> {
        let path = self.blob_path(d);
        let existed = match std::fs::remove_file(&path) {
            Ok(()) => true,
            Err(e) if e.kind() == io::ErrorKind::NotFound => false,
            Err(e) => return Err(e),
        };
        let _ = std::fs::remove_file(self.meta_path(d));
        let _ = std::fs::remove_file(self.source_path(d));
        let _ = std::fs::remove_file(self.sums_path(d));
        Ok(existed)
    }

    /// Where the resumable download of `d` lives.
    pub fn partial_path(&self, d: &Digest) -> PathBuf {
        self.inner
            .root
            .join("tmp")
            .join(format!("{}.partial", d.hex()))
    }

    /// The journal of a piece download's partial file: which pieces are on
    /// disk (`fetch::journal`). It lives and dies with the partial.
    pub fn pieces_path(&self, d: &Digest) -> PathBuf {
        self.inner
            .root
            .join("tmp")
            .join(format!("{}.pieces", d.hex()))
    }

    pub fn tags_dir(&self) -> PathBuf {
        self.inner.root.join("tags")
    }

    /// Rebuilds the index from `blobs/`. With `fix`, removes what a crash
    /// left behind; without, only skips it (a read-only view).
    fn recover(&self, fix: bool) -> Result<Recovery, StoreError> {
        let mut rec = Recovery::default();
        let tmp = self.inner.root.join("tmp");
        for entry in std::fs::read_dir(&tmp).map_err(io_err(&tmp))? {
            let entry = entry.map_err(io_err(&tmp))?;
            let name = entry.file_name();
            let name = name.to_string_lossy();
            // An empty partial has nothing to resume: a download that died
            // before its first byte. A pieces journal stays with its
            // partial, and goes when the partial does.
            let journal = name.ends_with(".pieces");
            let partial = match name
                .strip_suffix(".partial")
                .or(name.strip_suffix(".pieces"))
            {
                Some(hex) if Digest::from_hex(hex).is_ok() => {
                    std::fs::metadata(tmp.join(format!("{hex}.partial"))).ok()
                }
                _ => None,
            };
            let keep = partial.as_ref().is_some_and(|m| m.len() > 0);
            let stale = partial
                .and_then(|m| m.modified().ok())
                .and_then(|t| t.elapsed().ok())
                .is_some_and(|age| age > PARTIAL_TTL);
            if keep && !(fix && stale) {
                if !journal {
                    rec.partials += 1;
                }
            } else if fix {
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
                _ if fix => {
                    remove_any(&entry.path());
                    rec.removed += 1;
                }
                _ => {}
            }
        }
        // Oldest first, so that the logical clock orders by the last access
        // that reached the disk (an mtime) until real accesses reorder it.
        found.sort_by_key(|(mtime, _, _)| *mtime);
        let mut index = self.lock();
        for (mtime, d, size) in found {
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
                    accessed: mtime.unwrap_or(SystemTime::UNIX_EPOCH),
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
        let now = SystemTime::now();
        let persist = {
            let mut index = self.lock();
            index.clock += 1;
            let clock = index.clock;
            match index.entries.get_mut(d) {
                Some(e) => {
                    let stale = now
                        .duration_since(e.accessed)
                        .is_ok_and(|age| age >= ACCESS_PERSIST_INTERVAL);
                    e.last_access = clock;
                    e.accessed = now;
                    e.readers += 1;
                    stale
                }
                None => return Ok(None),
            }
        };
        let lease = Lease {
            store: self.clone(),
            digest: d.clone(),
        };
        let path = self.blob_path(d);
        match File::open(&path) {
            Ok(file) => {
                let size = file.metadata().map_err(io_err(&path))?.len();
                if persist && !self.is_read_only() {
                    // The access time survives a restart as the mtime, which
                    // recovery orders the LRU by. Best effort.
                    let _ = file.set_modified(now);
                }
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
        std::fs::read_to_string(self.meta_path(d))
            .ok()
            .map(|t| t.trim().to_owned())
            .filter(|t| !t.is_empty())
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
        self.writable()?;
        if verified != d || expected_size.is_some_and(|e| e != size) {
            remove_any(tmp);
            return Err(StoreError::Mismatch {
                digest: d.clone(),
                actual: verified.clone(),
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
        {
            // The rename happens under the index lock so that a quarantine
            // (which compares the file at the path with the one it read)
            // never races it.
            let mut index = self.lock();
            std::fs::rename(tmp, &dest).map_err(io_err(&dest))?;
            index.clock += 1;
            let clock = index.clock;
            let old = index.entries.insert(
                d.clone(),
                Entry {
                    size,
                    last_access: clock,
                    accessed: SystemTime::now(),
                    readers: 0,
                },
            );
            index.total = index.total - old.map_or(0, |e| e.size) + size;
        }
        sync_dir(dest.parent().unwrap_or(&self.inner.root));
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
        self.writable()?;
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
        self.writable()?;
        let existed = self.unlink(d).map_err(io_err(&self.blob_path(d)))?;
        self.forget(d);
        Ok(existed)
    }

    fn forget(&self, d: &Digest) {
        let gone = {
            let mut index = self.lock();
            let e = index.entries.remove(d);
            if let Some(e) = &e {
                index.total -= e.size;
            }
            e.is_some()
        };
        if gone {
            self.removed(d);
        }
    }

    /// Sets what is told of each blob that leaves the store (once; a second
    /// hook is ignored). Called without the index lock held.
    pub fn on_removed(&self, hook: impl Fn(&Digest) + Send + Sync + 'static) {
        let _ = self.inner.on_removed.set(RemovedHook(Box::new(hook)));
    }

    fn removed(&self, d: &Digest) {
        if let Some(hook) = self.inner.on_removed.get() {
            (hook.0)(d);
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

    /// Evicts least recently used blobs that nobody reads and nobody
    /// pinned until the store fits its quota. Returns the evicted digests.
    pub fn evict_over_quota(&self) -> Vec<Digest> {
        if self.is_read_only() {
            return Vec::new();
        }
        if self.lock().total <= self.inner.max_size {
            return Vec::new();
        }
        let victims = self.evict_to(self.inner.max_size, false).evicted;
        victims.into_iter().map(|e| e.digest).collect()
    }
}

/// Writes `bytes` to `path` by a rename, so readers see all or nothing.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), StoreError> {
    use std::io::Write as _;
    let tmp = path.with_extension(format!("tmp{}", rand::random::<u32>()));
    // Synced before the rename: after a power loss the name points at the
    // whole content, never at an empty file.
    let written =
        File::create(&tmp).and_then(|mut f| f.write_all(bytes).and_then(|()| f.sync_all()));
    if let Err(e) = written {
        let _ = std::fs::remove_file(&tmp);
        return Err(io_err(&tmp)(e));
    }
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
mod tests;
