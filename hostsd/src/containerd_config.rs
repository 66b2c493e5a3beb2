//! Reading containerd's config.toml: which directory the CRI plugin reads
//! hosts.toml from (`config_path`), and which inline registry settings would
//! stop it from doing so. Also the one edit hostsd may make there, adding
//! `config_path` when it is missing.

use std::path::{Path, PathBuf};

use toml_edit::{DocumentMut, Item, Table};

use crate::error::Error;

/// Where hostsd points a config with no `config_path`: containerd's documented
/// location, and the first entry of containerd 2.x's own default.
pub const DEFAULT_CERTS_DIR: &str = "/etc/containerd/certs.d";
/// containerd 2.x's built-in `config_path` when a version 3 config names none.
pub const CONTAINERD2_DEFAULT_CONFIG_PATH: &str = "/etc/containerd/certs.d:/etc/docker/certs.d";
/// The first line of a config.toml that hostsd created from nothing.
const CREATED_MARKER: &str = "# created by damselfly hostsd (there was no config.toml); `hostsd remove --restore-config` deletes it";
/// The comment above a `config_path` that hostsd added.
const PATCH_MARKER: &str = "# config_path set by damselfly hostsd";

/// Where `config_path` came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConfigPath {
    /// Set in the file.
    Set(String),
    /// Not in a version 3 file: containerd 2.x falls back to its built-in list.
    Containerd2Default,
    /// Not set (or set to ""): the CRI plugin reads no hosts.toml.
    Missing,
}

/// What hostsd needs to know from containerd's config.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContainerdConfig {
    /// The config file.
    pub path: PathBuf,
    /// False when there is no file; containerd then runs on built-in defaults.
    pub exists: bool,
    /// The config `version`: 1 (or absent), 2 (containerd 1.x), 3 (containerd 2.x).
    pub version: i64,
    /// The CRI registry table's path as segments, e.g.
    /// `["plugins", "io.containerd.grpc.v1.cri", "registry"]`.
    pub registry_keys: Vec<&'static str>,
    /// The value of `config_path`.
    pub config_path: ConfigPath,
    /// Registries with an inline `registry.mirrors` entry.
    pub inline_mirrors: Vec<String>,
    /// Registries with an inline `registry.configs.<r>.tls` entry.
    pub inline_tls: Vec<String>,
    /// Registries with an inline `registry.configs.<r>.auth` entry (allowed
    /// next to config_path, but deprecated).
    pub inline_auth: Vec<String>,
    /// `imports`: other files that may override what this one says.
    pub imports: Vec<String>,
    /// `config_path` carries hostsd's marker comment.
    pub patched_by_hostsd: bool,
    /// Where the config names the SOCI snapshotter (a `proxy_plugins` entry,
    /// a `snapshotter = "soci"`), in dotted form.
    pub soci: Vec<String>,
}

impl ContainerdConfig {
    /// Reads and parses `path`. A missing file is not an error: containerd
    /// runs on defaults then, and that is reported as a missing `config_path`.
    pub fn load(path: &Path) -> Result<Self, Error> {
        match std::fs::read_to_string(path) {
            Ok(text) => Self::parse(path, Some(&text)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Self::parse(path, None),
            Err(e) => Err(Error::io("read", path, e)),
        }
    }

    /// Parses config text; `None` stands for "no file".
    pub fn parse(path: &Path, text: Option<&str>) -> Result<Self, Error> {
        let bad = |reason: String| Error::ContainerdConfig {
            path: path.to_path_buf(),
            reason,
        };
        let table: toml::Table = match text {
            Some(t) => t.parse().map_err(|e: toml::de::Error| bad(one_line(&e)))?,
            None => toml::Table::new(),
        };
        let version = match table.get("version") {
            None => 1,
            Some(toml::Value::Integer(v)) => *v,
            Some(other) => return Err(bad(format!("`version` must be an integer, not {other}"))),
        };
        let registry_keys = registry_keys(version).ok_or_else(|| {
            bad(format!(
                "config version {version} is not one hostsd knows (1, 2 or 3)"
            ))
        })?;
        let registry = lookup(&table, &registry_keys);
        let registry = match registry {
            None => None,
            Some(toml::Value::Table(t)) => Some(t),
            Some(_) => return Err(bad(format!("[{}] is not a table", dotted(&registry_keys)))),
        };
        let raw_path = match registry.and_then(|r| r.get("config_path")) {
            None => None,
            Some(toml::Value::String(s)) => Some(s.clone()),
            Some(_) => return Err(bad("`config_path` must be a string".into())),
        };
        let config_path = match raw_path {
            Some(s) if !s.trim().is_empty() => ConfigPath::Set(s),
            Some(_) => ConfigPath::Missing,
            None if version >= 3 => ConfigPath::Containerd2Default,
            None => ConfigPath::Missing,
        };
        let names = |key: &str, pick: &dyn Fn(&toml::Value) -> bool| -> Vec<String> {
            match registry.and_then(|r| r.get(key)) {
                Some(toml::Value::Table(t)) => t
                    .iter()
                    .filter(|(_, v)| pick(v))
                    .map(|(k, _)| k.clone())
                    .collect(),
                _ => Vec::new(),
            }
        };
        let has = |field: &'static str| {
            move |v: &toml::Value| v.as_table().is_some_and(|t| t.contains_key(field))
        };
        let imports = match table.get("imports") {
            Some(toml::Value::Array(a)) => a
                .iter()
                .filter_map(|v| v.as_str().map(str::to_string))
                .collect(),
            _ => Vec::new(),
        };
        Ok(ContainerdConfig {
            path: path.to_path_buf(),
            exists: text.is_some(),
            version,
            inline_mirrors: names("mirrors", &|_| true),
            inline_tls: names("configs", &has("tls")),
            inline_auth: names("configs", &has("auth")),
            registry_keys,
            config_path,
            imports,
            patched_by_hostsd: text.is_some_and(|t| t.contains(PATCH_MARKER)),
            soci: find_soci(&table),
        })
    }

    /// The registry table as containerd's docs write it.
    pub fn registry_table(&self) -> String {
        dotted(&self.registry_keys)
    }

    /// The directories containerd searches, in order. containerd splits
    /// `config_path` like a `PATH` and takes, for each registry, the first root
    /// that has a matching directory (or `_default`).
    pub fn roots(&self) -> Vec<PathBuf> {
        let list = match &self.config_path {
            ConfigPath::Set(s) => s.as_str(),
            ConfigPath::Containerd2Default => CONTAINERD2_DEFAULT_CONFIG_PATH,
            ConfigPath::Missing => "",
        };
        list.split(':')
            .filter(|p| !p.trim().is_empty())
            .map(PathBuf::from)
            .collect()
    }

    /// The directory hostsd writes to: the first root, because it shadows the
    /// others for every registry it has a directory (or `_default`) for.
    pub fn first_root(&self) -> Option<PathBuf> {
        self.roots().into_iter().next()
    }

    /// Inline registry settings that containerd refuses next to config_path.
    /// With them present, adding hosts.toml would either be ignored (no
    /// config_path) or break the CRI plugin (config_path set).
    pub fn conflict(&self) -> Option<Error> {
        let (what, says, list) = if !self.inline_mirrors.is_empty() {
            (
                "registry.mirrors",
                "`mirrors` cannot be set when `config_path` is provided",
                &self.inline_mirrors,
            )
        } else if !self.inline_tls.is_empty() {
            (
                "registry.configs.<registry>.tls",
                "`configs.tls` cannot be set when `config_path` is provided",
                &self.inline_tls,
            )
        } else {
            return None;
        };
        Some(Error::InlineRegistryConflict {
            path: self.path.clone(),
            table: self.registry_table(),
            what: format!("inline {what} for {}", list.join(", ")),
            containerd_says: says,
        })
    }

    /// The error for a config with no usable config_path.
    pub fn missing_error(&self, suggested: &Path) -> Error {
        Error::ConfigPathMissing {
            path: self.path.clone(),
            table: self.registry_table(),
            suggested: suggested.display().to_string(),
            note: if self.exists {
                String::new()
            } else {
                " (the file does not exist: containerd runs on built-in defaults)".into()
            },
        }
    }

    /// Notes worth a person's attention that do not stop hostsd.
    /// SOCI fetches the layers it lazy-loads itself, so they never reach
    /// the mirror.
    pub fn soci_warning(&self) -> Option<String> {
        (!self.soci.is_empty()).then(|| {
            format!(
                "containerd uses the SOCI snapshotter ({}): SOCI fetches the layers it \
                 lazy-loads itself, with its own registry settings, not through hosts.toml, so \
                 those bytes bypass the damselfly mirror",
                self.soci.join(", ")
            )
        })
    }

    pub fn warnings(&self) -> Vec<String> {
        let mut w = Vec::new();
        if !self.exists {
            w.push(format!(
                "{} does not exist: containerd runs on built-in defaults",
                self.path.display()
            ));
        }
        if self.config_path == ConfigPath::Containerd2Default {
            w.push(format!(
                "[{}] sets no config_path; assuming containerd 2.x's default \"{}\"",
                self.registry_table(),
                CONTAINERD2_DEFAULT_CONFIG_PATH
            ));
        }
        if !self.inline_auth.is_empty() {
            w.push(format!(
                "inline registry.configs.<registry>.auth for {} still works with config_path but is deprecated",
                self.inline_auth.join(", ")
            ));
        }
        w.extend(self.soci_warning());
        if !self.imports.is_empty() {
            w.push(format!(
                "config imports {}: hostsd does not read imported files; a config_path or \
                 registry.mirrors set there overrides what is reported here",
                self.imports.join(", ")
            ));
        }
        w
    }
}

fn registry_keys(version: i64) -> Option<Vec<&'static str>> {
    Some(match version {
        1 => vec!["plugins", "cri", "registry"],
        2 => vec!["plugins", "io.containerd.grpc.v1.cri", "registry"],
        3 => vec!["plugins", "io.containerd.cri.v1.images", "registry"],
        _ => return None,
    })
}

fn lookup<'a>(table: &'a toml::Table, keys: &[&str]) -> Option<&'a toml::Value> {
    let (first, rest) = keys.split_first()?;
    let mut v = table.get(*first)?;
    for k in rest {
        v = v.as_table()?.get(*k)?;
    }
    Some(v)
}

fn dotted(keys: &[&str]) -> String {
    keys.iter()
        .map(|k| {
            if k.chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
            {
                k.to_string()
            } else {
                format!("\"{k}\"")
            }
        })
        .collect::<Vec<_>>()
        .join(".")
}

/// The toml crate's errors span several lines with a source excerpt; a CLI
/// error is one line.
pub(crate) fn one_line(e: &dyn std::fmt::Display) -> String {
    e.to_string()
        .lines()
        .map(str::trim)
        .filter(|l| {
            !l.is_empty() && !l.starts_with('|') && !l.chars().all(|c| c == '^' || c == ' ')
        })
        .collect::<Vec<_>>()
        .join(": ")
}

/// The config text with `config_path = certs_dir` added, everything else kept
/// as it was. `original` is `None` when there was no file: a minimal version 2
/// config is created then (containerd 2.x migrates it).
pub fn patch_config_path(
    cfg: &ContainerdConfig,
    original: Option<&str>,
    certs_dir: &Path,
) -> Result<String, Error> {
    let bad = |reason: String| Error::ContainerdConfig {
        path: cfg.path.clone(),
        reason,
    };
    let certs = certs_dir
        .to_str()
        .ok_or_else(|| bad("the certs.d path is not UTF-8".into()))?;
    let (mut doc, keys) = match original {
        Some(text) => (
            text.parse::<DocumentMut>().map_err(|e| bad(one_line(&e)))?,
            cfg.registry_keys.clone(),
        ),
        None => {
            let mut doc = DocumentMut::new();
            doc.insert("version", toml_edit::value(2));
            doc.decor_mut().set_prefix(format!("{CREATED_MARKER}\n"));
            (doc, registry_keys(2).expect("version 2 is known"))
        }
    };
    let mut table: &mut dyn toml_edit::TableLike = doc.as_table_mut();
    for (i, key) in keys.iter().enumerate() {
        let mut fresh = Table::new();
        // Only the innermost table needs a header of its own.
        fresh.set_implicit(i + 1 < keys.len());
        let item = table.entry(key).or_insert(Item::Table(fresh));
        table = item
            .as_table_like_mut()
            .ok_or_else(|| bad(format!("`{key}` in [{}] is not a table", dotted(&keys))))?;
    }
    table.insert("config_path", toml_edit::value(certs));
    if let Some(mut key) = table.key_mut("config_path") {
        let backup = backup_path(&cfg.path);
        let note = match original {
            Some(_) => format!(
                "{PATCH_MARKER}; the original is {}\n",
                backup.file_name().unwrap_or_default().to_string_lossy()
            ),
            None => format!("{PATCH_MARKER}\n"),
        };
        key.leaf_decor_mut().set_prefix(note);
    }
    let out = doc.to_string();
    // The patched text must read back with the config_path just set.
    let check = ContainerdConfig::parse(&cfg.path, Some(&out))?;
    if check.config_path != ConfigPath::Set(certs.to_string()) {
        return Err(Error::GeneratedInvalid {
            path: cfg.path.clone(),
            reason: format!("config_path reads back as {:?}", check.config_path),
        });
    }
    Ok(out)
}

/// Where the original config.toml is kept while hostsd's patch is in place.
pub fn backup_path(config: &Path) -> PathBuf {
    let mut name = config.file_name().unwrap_or_default().to_os_string();
    name.push(".damselfly-orig");
    config.with_file_name(name)
}

/// Whether hostsd created this config file from nothing.
pub fn created_by_hostsd(text: &str) -> bool {
    text.starts_with(CREATED_MARKER)
}

#[cfg(test)]
#[path = "containerd_config_tests.rs"]
mod tests;

/// Where a config names the SOCI snapshotter: `proxy_plugins` entries whose
/// name or address says soci, and any `snapshotter = "soci..."` under
/// `plugins` (the CRI plugin's default snapshotter, any version).
fn find_soci(table: &toml::Table) -> Vec<String> {
    fn walk(t: &toml::Table, at: &str, out: &mut Vec<String>) {
        for (k, v) in t {
            let here = if at.is_empty() {
                k.clone()
            } else if k.contains('.') {
                format!("{at}.\"{k}\"")
            } else {
                format!("{at}.{k}")
            };
            match v {
                toml::Value::Table(inner) => walk(inner, &here, out),
                toml::Value::String(s) if k == "snapshotter" && s.contains("soci") => {
                    out.push(format!("{here} = {s:?}"))
                }
                _ => {}
            }
        }
    }
    let mut out = Vec::new();
    if let Some(toml::Value::Table(plugins)) = table.get("proxy_plugins") {
        for (name, v) in plugins {
            let address = v.get("address").and_then(|a| a.as_str()).unwrap_or("");
            if name.contains("soci") || address.contains("soci") {
                out.push(format!("proxy_plugins.{name}"));
            }
        }
    }
    if let Some(toml::Value::Table(plugins)) = table.get("plugins") {
        walk(plugins, "plugins", &mut out);
    }
    out
}
