//! A config directory: every `*.toml` in it, merged in name order.
//!
//! The DaemonSet mounts one ConfigMap whose keys are files: the base's
//! `00-damselfly.toml`, and an overlay's own (`50-gpu-nodes.toml`) on top.
//! A later file's tables merge into the earlier ones key by key; any other
//! value, arrays of tables (`[[registry]]`) included, replaces the earlier
//! one whole, so a list never ends up half from one file and half from
//! another.

use std::path::{Path, PathBuf};

use toml::{Table, Value};

use super::ConfigError;

/// The `*.toml` files of `dir`, in name order. Dotfiles are skipped: a
/// mounted ConfigMap keeps its real files under `..data` and links them.
pub fn files(dir: &Path) -> Result<Vec<PathBuf>, ConfigError> {
    let read = |source| ConfigError::Read {
        path: dir.to_owned(),
        source,
    };
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(read)? {
        let path = entry.map_err(read)?.path();
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
        if name.starts_with('.') || !name.ends_with(".toml") {
            continue;
        }
        out.push(path);
    }
    out.sort();
    if out.is_empty() {
        return Err(read(std::io::Error::new(
            std::io::ErrorKind::NotFound,
            "the directory has no *.toml file",
        )));
    }
    Ok(out)
}

/// Parses and merges every file of `dir`. A syntax error names its file.
pub fn load_dir(dir: &Path) -> Result<Table, ConfigError> {
    let mut merged = Table::new();
    for path in files(dir)? {
        let text = std::fs::read_to_string(&path).map_err(|source| ConfigError::Read {
            path: path.clone(),
            source,
        })?;
        let table: Table = text
            .parse()
            .map_err(|e: toml::de::Error| ConfigError::Syntax {
                path: path.clone(),
                message: e.message().to_owned(),
            })?;
        merge(&mut merged, table);
    }
    Ok(merged)
}

/// Merges `over` into `base`: tables recursively, everything else replaced.
pub fn merge(base: &mut Table, over: Table) {
    for (key, value) in over {
        match (base.get_mut(&key), value) {
            (Some(Value::Table(b)), Value::Table(o)) => merge(b, o),
            (_, value) => {
                base.insert(key, value);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::config::Config;

    #[test]
    fn later_files_win_key_by_key_and_lists_whole() {
        let dir = tempfile::tempdir().unwrap();
        let write = |name: &str, text: &str| std::fs::write(dir.path().join(name), text).unwrap();
        write(
            "00-base.toml",
            "[store]\nmax_size = \"10GiB\"\n[mirror]\ntag_stale_for = \"1m\"\n\
             [[registry]]\nhost = \"a.test\"\n[[registry]]\nhost = \"b.test\"\n",
        );
        write(
            "50-seed.toml",
            "[store]\nmax_size = \"2TiB\"\n[[registry]]\nhost = \"c.test\"\n",
        );
        write("README", "not toml, not read");
        write(".hidden.toml", "this = is not [valid");
        let cfg = Config::load(dir.path()).unwrap();
        assert_eq!(cfg.store.max_size, 2 << 40);
        assert_eq!(cfg.mirror.tag_stale_for, std::time::Duration::from_secs(60));
        let hosts: Vec<&str> = cfg.registries.iter().map(|r| r.host.as_str()).collect();
        assert_eq!(hosts, ["c.test"]);
    }

    #[test]
    fn errors_name_the_file_or_the_directory() {
        let dir = tempfile::tempdir().unwrap();
        let err = Config::load(dir.path()).unwrap_err().to_string();
        assert!(err.contains("no *.toml file"), "{err}");
        std::fs::write(
            dir.path().join("10-a.toml"),
            "[store]\nmax_size = \"lots\"\n",
        )
        .unwrap();
        let err = Config::load(dir.path()).unwrap_err().to_string();
        assert!(
            err.contains(&dir.path().display().to_string()) && err.contains("store.max_size"),
            "{err}"
        );
        std::fs::write(dir.path().join("20-b.toml"), "[store\n").unwrap();
        let err = Config::load(dir.path()).unwrap_err().to_string();
        assert!(err.contains("20-b.toml is not valid TOML"), "{err}");
    }
}
