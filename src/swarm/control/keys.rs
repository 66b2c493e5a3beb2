//! The node's identity (an ed25519 keypair kept on disk) and the cluster
//! key (pnet PSK). Both are secrets: files are written 0600, a warning names
//! a file that others can read, and errors never echo a key.

use std::io::{self, Write};
use std::path::Path;

use libp2p::identity::Keypair;
use tracing::info;

use super::ControlError;

/// The cluster key's format is config's, which checks the file at load.
pub use crate::config::load_psk;
use crate::config::warn_if_readable_by_others;

pub(super) fn load_or_create_identity(path: &Path) -> Result<Keypair, ControlError> {
    let io_err = |source| ControlError::IdentityIo {
        path: path.to_path_buf(),
        source,
    };
    match std::fs::read(path) {
        Ok(bytes) => {
            warn_if_readable_by_others(path, "identity");
            Keypair::from_protobuf_encoding(&bytes).map_err(|e| ControlError::IdentityCorrupt {
                path: path.to_path_buf(),
                reason: e.to_string(),
            })
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            let key = Keypair::generate_ed25519();
            let bytes = key
                .to_protobuf_encoding()
                .map_err(|e| io_err(io::Error::other(e.to_string())))?;
            write_private_file(path, &bytes).map_err(io_err)?;
            info!(path = %path.display(), peer_id = %key.public().to_peer_id(), "created node identity");
            Ok(key)
        }
        Err(e) => Err(io_err(e)),
    }
}

/// Writes through a temporary file and a rename, so a crash never leaves a
/// truncated identity that would fail the next start.
fn write_private_file(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    std::fs::create_dir_all(parent)?;
    let name = path
        .file_name()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "path has no file name"))?;
    let tmp = parent.join(format!(
        ".{}.tmp-{}",
        name.to_string_lossy(),
        std::process::id()
    ));
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    let result = (|| {
        let mut f = opts.open(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}
