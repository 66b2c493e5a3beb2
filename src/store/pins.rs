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
use std::sync::MutexGuard;
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

    /// Holds pin changes off; see `Inner::pins`. Taken before the index
    /// lock, never while holding it.
    fn pins_lock(&self) -> MutexGuard<'_, ()> {
        self.inner.pins.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Rebuilds the in-memory pinned set from the records on disk.
    pub(super) fn load_pins(&self) {
        let _pins = self.pins_lock();
        self.reload_pins();
    }

    /// [`Store::load_pins`] for a caller that holds the pins lock: no pin
    /// can be written between the scan and the swap.
    fn reload_pins(&self) {
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
        let pins = self.pins_lock();
        let path = self.pin_path(target);
        let replaced = path.exists();
        write_atomic(&path, &json)?;
        if !replaced {
            self.lock().pinned.extend(digests.iter().cloned());
            return Ok(rec);
        }
        // The old record's digests are pinned no longer, unless another
        // record lists them (prewarm re-pins a tag that moved).
        self.reload_pins();
        drop(pins);
        self.evict_over_quota();
        Ok(rec)
    }

    /// Removes the pin of `target`, returning it, or `None` if there was
    /// none. Its digests stay pinned if another record lists them.
    pub fn unpin(&self, target: &str) -> Result<Option<PinRecord>, StoreError> {
        self.writable()?;
        let path = self.pin_path(target);
        let pins = self.pins_lock();
        let rec = std::fs::read(&path)
            .ok()
            .and_then(|b| serde_json::from_slice::<PinRecord>(&b).ok());
        match std::fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io_err(&path)(e)),
        }
        self.reload_pins();
        drop(pins);
        // Content held back only by this pin may now be over the quota.
        self.evict_over_quota();
        Ok(rec)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn digest(n: usize) -> Digest {
        Digest::from_sha256(&sha2::Sha256::digest(n.to_le_bytes()))
    }

    /// Makes a FIFO named like a pin record: a rescan of `pins/` blocks
    /// reading it until the test writes to it and closes it.
    fn mkfifo(path: &std::path::Path) {
        // The crate forbids `unsafe`, so not libc::mkfifo.
        let status = std::process::Command::new("mkfifo")
            .arg(path)
            .status()
            .expect("run mkfifo");
        assert!(status.success(), "mkfifo {}", path.display());
    }

    /// Opens the FIFO for writing once a reader has it open, i.e. once a
    /// rescan is inside its directory walk.
    fn open_writer(path: &std::path::Path) -> std::fs::File {
        use std::os::unix::fs::OpenOptionsExt as _;
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            // Without a reader this fails (ENXIO) instead of blocking.
            match std::fs::OpenOptions::new()
                .write(true)
                .custom_flags(libc::O_NONBLOCK)
                .open(path)
            {
                Ok(f) => return f,
                Err(e) if std::time::Instant::now() < deadline => {
                    assert_eq!(e.raw_os_error(), Some(libc::ENXIO), "{e}");
                    std::thread::sleep(std::time::Duration::from_millis(1));
                }
                Err(e) => panic!("the rescan never opened the FIFO: {e}"),
            }
        }
    }

    /// The exact interleaving that lost pins: an unpin's rescan of `pins/`
    /// has listed the directory, a pin then writes its record and adds its
    /// digest, and the rescan's result (without that digest) replaces the
    /// in-memory set. With the pins lock the pin waits for the rescan.
    #[test]
    fn re_pinning_a_target_releases_what_it_no_longer_lists() {
        let dir = tempfile::tempdir().unwrap();
        let (store, _) = Store::open(dir.path(), u64::MAX).unwrap();
        store.pin("img", &[digest(1), digest(2)]).unwrap();
        store.pin("other", &[digest(2)]).unwrap();
        store.pin("img", &[digest(3)]).unwrap();
        assert!(
            !store.is_pinned(&digest(1)),
            "left behind by the new record"
        );
        assert!(store.is_pinned(&digest(2)), "still listed by another pin");
        assert!(store.is_pinned(&digest(3)));
    }

    #[test]
    fn a_pin_during_an_unpins_rescan_is_not_lost() {
        let dir = tempfile::tempdir().unwrap();
        let (store, _) = Store::open(dir.path(), u64::MAX).unwrap();
        store.pin("old", &[digest(1)]).unwrap();
        let fifo = store.pins_dir().join("stall.json");
        mkfifo(&fifo);
        std::thread::scope(|s| {
            let unpin = s.spawn(|| store.unpin("old").unwrap());
            // The rescan has listed `pins/` and is stuck reading the FIFO.
            let mut writer = open_writer(&fifo);
            let pin = s.spawn(|| store.pin("new", &[digest(2)]).unwrap());
            // Give the pin time to finish if nothing holds it back; with
            // the fix it waits for the rescan, so this just times out.
            let deadline = std::time::Instant::now() + std::time::Duration::from_millis(300);
            while !pin.is_finished() && std::time::Instant::now() < deadline {
                std::thread::sleep(std::time::Duration::from_millis(5));
            }
            use std::io::Write as _;
            writer.write_all(b"not a pin record").unwrap();
            drop(writer);
            assert!(unpin.join().unwrap().is_some());
            pin.join().unwrap();
        });
        std::fs::remove_file(&fifo).unwrap();
        assert!(!store.is_pinned(&digest(1)), "unpinned");
        assert!(
            store.is_pinned(&digest(2)),
            "the pin recorded on disk was lost from memory"
        );
        assert_eq!(store.pins().len(), 1);
    }

    /// The admin server pins and unpins on parallel blocking threads. An
    /// unpin rescans `pins/` and swaps the in-memory set; a pin written
    /// after that scan must not be lost by the swap, or eviction could take
    /// content that a record on disk says is pinned.
    #[test]
    fn concurrent_pins_and_unpins_keep_memory_equal_to_disk() {
        const THREADS: usize = 8;
        const ROUNDS: usize = 200;
        let dir = tempfile::tempdir().unwrap();
        let (store, _) = Store::open(dir.path(), u64::MAX).unwrap();
        std::thread::scope(|s| {
            for t in 0..THREADS {
                let store = store.clone();
                s.spawn(move || {
                    for r in 0..ROUNDS {
                        let n = t * ROUNDS + r;
                        let target = format!("img-{n}");
                        store.pin(&target, &[digest(n)]).unwrap();
                        // Every other pin is removed again, so unpins (and
                        // their rescans) run all the time beside new pins.
                        if r % 2 == 1 {
                            assert!(store.unpin(&target).unwrap().is_some());
                        }
                    }
                });
            }
        });
        let on_disk: HashSet<Digest> = store
            .pins()
            .iter()
            .flat_map(|r| r.digests.iter().map(|d| d.parse().unwrap()))
            .collect();
        assert_eq!(on_disk.len(), THREADS * ROUNDS / 2);
        let in_memory = store.lock().pinned.clone();
        let lost: Vec<_> = on_disk.difference(&in_memory).collect();
        let stale: Vec<_> = in_memory.difference(&on_disk).collect();
        assert!(
            lost.is_empty() && stale.is_empty(),
            "pinned on disk but not in memory: {lost:?}; in memory only: {stale:?}"
        );
    }
}
