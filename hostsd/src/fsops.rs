//! File operations that containerd can never observe half-done: a reader sees
//! the old file or the new one, and a backup is the original inode itself.

use std::fs::{self, File, OpenOptions};
use std::io::{ErrorKind, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use crate::error::Error;

/// Marks a registry directory that hostsd created, so `remove` can delete it
/// again. containerd only looks at `.crt`, `.cert` and `.key` files there.
pub const CREATED_DIR_MARKER: &str = ".damselfly-created";

/// The file's bytes, or `None` if there is no such file.
pub fn read_opt(path: &Path) -> Result<Option<Vec<u8>>, Error> {
    match fs::read(path) {
        Ok(b) => Ok(Some(b)),
        Err(e) if e.kind() == ErrorKind::NotFound => Ok(None),
        Err(e) => Err(Error::io("read", path, e)),
    }
}

/// The permission bits of an existing file.
pub fn mode_of(path: &Path) -> Option<u32> {
    fs::metadata(path)
        .ok()
        .map(|m| m.permissions().mode() & 0o7777)
}

/// Replaces `path` with `bytes` by writing a temporary file in the same
/// directory, syncing it and renaming it over `path`.
pub fn write_atomic(path: &Path, bytes: &[u8], mode: u32) -> Result<(), Error> {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let dir = parent(path);
    let name = path.file_name().unwrap_or_default().to_string_lossy();
    let tmp = dir.join(format!(
        ".{name}.damselfly-tmp-{}-{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    ));
    let result = (|| {
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&tmp)
            .map_err(|e| Error::io("create", &tmp, e))?;
        f.write_all(bytes)
            .map_err(|e| Error::io("write", &tmp, e))?;
        // The umask may have narrowed `mode`; the file must end up exactly so.
        f.set_permissions(fs::Permissions::from_mode(mode))
            .map_err(|e| Error::io("chmod", &tmp, e))?;
        f.sync_all().map_err(|e| Error::io("sync", &tmp, e))?;
        fs::rename(&tmp, path).map_err(|e| Error::io("rename into place", path, e))
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result?;
    sync_dir(&dir)
}

/// Keeps `file` as `backup`: a hard link, so the backup is the original inode
/// (bytes, mode, mtime) and a later rename puts it back exactly. Where links
/// are not possible, a copy with the same mode.
pub fn backup(file: &Path, backup: &Path) -> Result<(), Error> {
    match fs::hard_link(file, backup) {
        Ok(()) => return sync_dir(&parent(backup)),
        Err(e) if e.kind() == ErrorKind::AlreadyExists => {
            // An older backup of an original that has since been replaced by
            // another foreign file: the file now in place is what to restore.
            if read_opt(backup)? == read_opt(file)? {
                return Ok(());
            }
            fs::remove_file(backup).map_err(|e| Error::io("remove stale backup", backup, e))?;
            if fs::hard_link(file, backup).is_ok() {
                return sync_dir(&parent(backup));
            }
        }
        Err(_) => {}
    }
    let bytes = fs::read(file).map_err(|e| Error::io("read", file, e))?;
    write_atomic(backup, &bytes, mode_of(file).unwrap_or(0o644))
}

/// Puts a backup back in place of `file`, atomically.
pub fn restore(backup: &Path, file: &Path) -> Result<(), Error> {
    fs::rename(backup, file).map_err(|e| Error::io("restore", file, e))?;
    sync_dir(&parent(file))
}

/// Deletes `file` if it exists.
pub fn remove(file: &Path) -> Result<(), Error> {
    match fs::remove_file(file) {
        Ok(()) => sync_dir(&parent(file)),
        Err(e) if e.kind() == ErrorKind::NotFound => Ok(()),
        Err(e) => Err(Error::io("remove", file, e)),
    }
}

/// Creates `dir` (and parents) if missing; returns whether it had to.
pub fn ensure_dir(dir: &Path) -> Result<bool, Error> {
    if dir.is_dir() {
        return Ok(false);
    }
    fs::create_dir_all(dir).map_err(|e| Error::io("create directory", dir, e))?;
    Ok(true)
}

/// Removes a directory hostsd created, if nothing but its marker is left.
pub fn remove_created_dir(dir: &Path) -> Result<bool, Error> {
    let marker = dir.join(CREATED_DIR_MARKER);
    if !marker.exists() {
        return Ok(false);
    }
    let others = fs::read_dir(dir)
        .map_err(|e| Error::io("list", dir, e))?
        .filter_map(Result::ok)
        .any(|e| e.file_name() != CREATED_DIR_MARKER);
    if others {
        return Ok(false);
    }
    remove(&marker)?;
    fs::remove_dir(dir).map_err(|e| Error::io("remove directory", dir, e))?;
    Ok(true)
}

/// An exclusive lock on a directory, held until dropped. Two hostsd runs on
/// one node (an init container and the daemon) must not both decide to take
/// over the same foreign file: the second would back up the first's managed
/// file over the original.
pub struct DirLock {
    _dir: File,
}

/// Waits for the exclusive lock on `dir` (flock on the directory itself, so
/// no lock file is left behind in certs.d).
pub fn lock_dir(dir: &Path) -> Result<DirLock, Error> {
    let f = File::open(dir).map_err(|e| Error::io("open", dir, e))?;
    rustix::fs::flock(&f, rustix::fs::FlockOperation::LockExclusive)
        .map_err(|e| Error::io("lock", dir, e.into()))?;
    Ok(DirLock { _dir: f })
}

/// Makes renames and new names durable: a crash right after `reconcile`
/// returns must not bring the old file back.
fn sync_dir(dir: &Path) -> Result<(), Error> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| Error::io("sync directory", dir, e))
}

fn parent(path: &Path) -> PathBuf {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    #[test]
    fn atomic_write_backup_and_restore_keep_the_original_inode() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("hosts.toml");
        let bak = dir.path().join("hosts.toml.damselfly-orig");
        fs::write(&file, b"original").unwrap();
        fs::set_permissions(&file, fs::Permissions::from_mode(0o600)).unwrap();
        let before = fs::metadata(&file).unwrap();

        backup(&file, &bak).unwrap();
        write_atomic(&file, b"managed", 0o644).unwrap();
        assert_eq!(fs::read(&file).unwrap(), b"managed");
        assert_eq!(mode_of(&file), Some(0o644));
        assert_eq!(fs::metadata(&bak).unwrap().ino(), before.ino());

        restore(&bak, &file).unwrap();
        let after = fs::metadata(&file).unwrap();
        assert_eq!(fs::read(&file).unwrap(), b"original");
        assert_eq!(after.ino(), before.ino());
        assert_eq!(after.mtime(), before.mtime());
        assert_eq!(after.permissions().mode() & 0o777, 0o600);
        assert!(!bak.exists());
        // No temporary files are left behind.
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn backup_over_a_stale_backup_takes_the_current_file() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("f");
        let bak = dir.path().join("f.bak");
        fs::write(&bak, b"old").unwrap();
        fs::write(&file, b"new foreign").unwrap();
        backup(&file, &bak).unwrap();
        assert_eq!(fs::read(&bak).unwrap(), b"new foreign");
    }

    #[test]
    fn directory_lock_is_exclusive() {
        let root = tempfile::tempdir().unwrap();
        let held = lock_dir(root.path()).unwrap();
        let other = File::open(root.path()).unwrap();
        let try_lock =
            || rustix::fs::flock(&other, rustix::fs::FlockOperation::NonBlockingLockExclusive);
        assert!(try_lock().is_err());
        drop(held);
        assert!(try_lock().is_ok());
    }

    #[test]
    fn created_dirs_are_removed_only_when_empty() {
        let root = tempfile::tempdir().unwrap();
        let d = root.path().join("r");
        assert!(ensure_dir(&d).unwrap());
        assert!(!ensure_dir(&d).unwrap());
        fs::write(d.join(CREATED_DIR_MARKER), b"").unwrap();
        fs::write(d.join("ca.crt"), b"x").unwrap();
        assert!(!remove_created_dir(&d).unwrap());
        fs::remove_file(d.join("ca.crt")).unwrap();
        assert!(remove_created_dir(&d).unwrap());
        assert!(!d.exists());
    }
}
