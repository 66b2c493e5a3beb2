//! The node's identity (an ed25519 keypair kept on disk) and the cluster
//! key (pnet PSK). Both are secrets: files are written 0600, a warning names
//! a file that others can read, and errors never echo a key.

use std::io::{self, Write};
use std::path::Path;

use libp2p::identity::Keypair;
use tracing::{info, warn};

use super::ControlError;

/// Reads a cluster key: the libp2p/IPFS `swarm.key` format or 64 bare hex
/// characters. Errors name the file but never echo its content.
pub fn load_psk(path: &Path) -> Result<[u8; 32], ControlError> {
    let bytes = std::fs::read(path).map_err(|source| ControlError::PskIo {
        path: path.to_path_buf(),
        source,
    })?;
    warn_if_readable_by_others(path, "cluster key");
    let bad = |reason| ControlError::PskFormat {
        path: path.to_path_buf(),
        reason,
    };
    let text = std::str::from_utf8(&bytes).map_err(|_| bad("the file is not text"))?;
    let lines: Vec<&str> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect();
    let hex_line = match lines.as_slice() {
        [hex] => *hex,
        ["/key/swarm/psk/1.0.0/", "/base16/", hex] => *hex,
        ["/key/swarm/psk/1.0.0/", _, _] => {
            return Err(bad("only the /base16/ encoding is supported"))
        }
        [] => return Err(bad("the file is empty")),
        _ => return Err(bad("unrecognised layout")),
    };
    if hex_line.len() != 64 {
        return Err(bad("the key is not exactly 64 hex characters"));
    }
    let mut key = [0u8; 32];
    hex::decode_to_slice(hex_line, &mut key)
        .map_err(|_| bad("the key contains characters other than 0-9, a-f"))?;
    Ok(key)
}

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

fn warn_if_readable_by_others(path: &Path, what: &str) {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        if let Ok(m) = std::fs::metadata(path) {
            if m.permissions().mode() & 0o077 != 0 {
                warn!(path = %path.display(), "{what} file is accessible to group/others; chmod 600 it");
            }
        }
    }
    #[cfg(not(unix))]
    let _ = (path, what);
}
