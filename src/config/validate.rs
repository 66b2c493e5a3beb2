//! The [`Validator`]: raw TOML values to typed ones, every problem collected
//! with its key's path, every default taken from [`KEYS`].
//!
//! The typed readers (`duration`, `size`, `bool`, ...) come in two kinds:
//! `opt_*` gives `None` when the key is absent (or wrong, after reporting
//! it), and the plain one falls back to the key's default in [`KEYS`], so no
//! default is written in the loader. A KEYS default that does not parse as
//! its type is a bug; it is reported as an issue of the key, so
//! `Config::defaults()` fails (and with it the tests) instead of the value
//! silently becoming zero.

use std::fmt::Display;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use toml::{Table, Value};

use super::keys::KEYS;
use super::Issue;

/// Collects issues while it converts raw TOML values.
pub(super) struct Validator {
    pub(super) issues: Vec<Issue>,
    pub(super) warnings: Vec<Issue>,
    /// Relative paths in the file resolve against this folder.
    pub(super) base: PathBuf,
}

/// The [`KEYS`] path of `key` under `section` as issues show it:
/// `prewarm.rule[2].gpu` + `min_count` is `prewarm.rule[].gpu.min_count`.
pub(super) fn schema_path(section: &str, key: &str) -> String {
    let mut out = String::with_capacity(section.len() + key.len() + 1);
    let mut in_index = false;
    for c in section.chars() {
        match c {
            '[' => {
                in_index = true;
                out.push('[');
            }
            ']' => {
                in_index = false;
                out.push(']');
            }
            _ if in_index => {}
            _ => out.push(c),
        }
    }
    out.push('.');
    out.push_str(key);
    out
}

pub(super) fn parse_duration(s: &str) -> Result<Duration, humantime::DurationError> {
    humantime::parse_duration(s)
}

pub(super) fn parse_size(s: &str) -> Result<u64, String> {
    s.parse::<bytesize::ByteSize>().map(|b| b.as_u64())
}

/// A list of strings as TOML writes it (`["a", "b"]`), as KEYS writes
/// list defaults.
pub(super) fn parse_string_list(s: &str) -> Result<Vec<String>, toml::de::Error> {
    #[derive(serde::Deserialize)]
    struct List {
        v: Vec<String>,
    }
    toml::from_str::<List>(&format!("v = {s}")).map(|l| l.v)
}

impl Validator {
    pub(super) fn new(base: PathBuf) -> Validator {
        Validator {
            issues: Vec::new(),
            warnings: Vec::new(),
            base,
        }
    }

    pub(super) fn issue(&mut self, path: &str, message: &str) {
        self.issues.push(Issue {
            path: path.to_owned(),
            message: message.to_owned(),
        });
    }

    pub(super) fn warn(&mut self, path: &str, message: &str) {
        self.warnings.push(Issue {
            path: path.to_owned(),
            message: message.to_owned(),
        });
    }

    /// The default of `key` under `section` as [`KEYS`] writes it, parsed
    /// with `parse`; `None` (after reporting the bug) when KEYS lacks the
    /// key or its default does not parse.
    pub(super) fn keys_default<T, E: Display>(
        &mut self,
        section: &str,
        key: &str,
        parse: impl FnOnce(&'static str) -> Result<T, E>,
    ) -> Option<T> {
        let path = schema_path(section, key);
        let Some(k) = KEYS.iter().find(|k| k.path == path) else {
            self.issue(
                &format!("{section}.{key}"),
                &format!("bug: {path} is not in the KEYS table, so it has no default"),
            );
            return None;
        };
        parse(k.default)
            .map_err(|e| {
                self.issue(
                    &format!("{section}.{key}"),
                    &format!(
                        "bug: the default {:?} in the KEYS table is not a valid {}: {e}",
                        k.default, k.kind
                    ),
                );
            })
            .ok()
    }

    pub(super) fn section<'a>(&mut self, root: &'a Table, name: &str) -> Option<&'a Table> {
        match root.get(name) {
            None => None,
            Some(Value::Table(t)) => {
                self.check_keys(t, name, name);
                Some(t)
            }
            Some(_) => {
                self.issue(name, "must be a table ([section])");
                None
            }
        }
    }

    /// Reports keys of `table` that KEYS does not declare under `schema`.
    pub(super) fn check_keys(&mut self, table: &Table, schema: &str, shown: &str) {
        let prefix = format!("{schema}.");
        for key in table.keys() {
            let full = format!("{prefix}{key}");
            // `gpu.assume` and `prewarm.rule` are tables (or arrays of
            // tables) of their own: known when a key lives under them.
            let nested = [format!("{full}."), format!("{full}[].")];
            if !KEYS
                .iter()
                .any(|k| k.path == full || nested.iter().any(|n| k.path.starts_with(n.as_str())))
            {
                self.issue(&format!("{shown}.{key}"), "unknown key");
            }
        }
    }

    pub(super) fn opt_string(&mut self, t: &Table, section: &str, key: &str) -> Option<String> {
        match t.get(key)? {
            Value::String(s) => Some(s.clone()),
            other => {
                self.issue(
                    &format!("{section}.{key}"),
                    &format!("must be a string, not {}", other.type_str()),
                );
                None
            }
        }
    }

    /// The string at `key`, else its default.
    pub(super) fn string(&mut self, t: &Table, section: &str, key: &str) -> String {
        self.opt_string(t, section, key).unwrap_or_else(|| {
            self.keys_default(section, key, |d| Ok::<_, String>(d.to_owned()))
                .unwrap_or_default()
        })
    }

    pub(super) fn opt_path(&mut self, t: &Table, section: &str, key: &str) -> Option<PathBuf> {
        let s = self.opt_string(t, section, key)?;
        if s.is_empty() {
            self.issue(&format!("{section}.{key}"), "must not be empty");
            return None;
        }
        let p = PathBuf::from(s);
        Some(if p.is_absolute() {
            p
        } else {
            self.base.join(p)
        })
    }

    /// The path at `key`, else its default (used as written).
    pub(super) fn path(&mut self, t: &Table, section: &str, key: &str) -> PathBuf {
        self.opt_path(t, section, key).unwrap_or_else(|| {
            self.keys_default(section, key, |d| Ok::<_, String>(PathBuf::from(d)))
                .unwrap_or_default()
        })
    }

    pub(super) fn addr(&mut self, t: &Table, section: &str, key: &str) -> SocketAddr {
        let fallback = self
            .keys_default(section, key, str::parse::<SocketAddr>)
            .unwrap_or(SocketAddr::from(([127, 0, 0, 1], 0)));
        let Some(s) = self.opt_string(t, section, key) else {
            return fallback;
        };
        s.parse().unwrap_or_else(|_| {
            self.issue(
                &format!("{section}.{key}"),
                &format!("{s:?} is not an IP:port address"),
            );
            fallback
        })
    }

    pub(super) fn opt_duration(&mut self, t: &Table, section: &str, key: &str) -> Option<Duration> {
        let s = self.opt_string(t, section, key)?;
        parse_duration(&s)
            .map_err(|e| {
                self.issue(
                    &format!("{section}.{key}"),
                    &format!("{s:?} is not a duration like \"30s\" or \"5m\": {e}"),
                );
            })
            .ok()
    }

    pub(super) fn duration(&mut self, t: &Table, section: &str, key: &str) -> Duration {
        self.opt_duration(t, section, key).unwrap_or_else(|| {
            self.keys_default(section, key, parse_duration)
                .unwrap_or_default()
        })
    }

    pub(super) fn opt_size(&mut self, t: &Table, section: &str, key: &str) -> Option<u64> {
        match t.get(key)? {
            Value::Integer(n) if *n >= 0 => Some(*n as u64),
            Value::String(s) => parse_size(s)
                .map_err(|e| {
                    self.issue(
                        &format!("{section}.{key}"),
                        &format!("{s:?} is not a size like \"512MiB\" or \"100GiB\": {e}"),
                    );
                })
                .ok(),
            other => {
                self.issue(
                    &format!("{section}.{key}"),
                    &format!(
                        "must be a size string or a byte count, not {}",
                        other.type_str()
                    ),
                );
                None
            }
        }
    }

    /// Bytes.
    pub(super) fn size(&mut self, t: &Table, section: &str, key: &str) -> u64 {
        self.opt_size(t, section, key).unwrap_or_else(|| {
            self.keys_default(section, key, parse_size)
                .unwrap_or_default()
        })
    }

    pub(super) fn opt_bool(&mut self, t: &Table, section: &str, key: &str) -> Option<bool> {
        match t.get(key)? {
            Value::Boolean(b) => Some(*b),
            other => {
                self.issue(
                    &format!("{section}.{key}"),
                    &format!("must be true or false, not {}", other.type_str()),
                );
                None
            }
        }
    }

    pub(super) fn bool(&mut self, t: &Table, section: &str, key: &str) -> bool {
        self.opt_bool(t, section, key).unwrap_or_else(|| {
            self.keys_default(section, key, str::parse::<bool>)
                .unwrap_or_default()
        })
    }

    /// An integer in `range`, else the key's default.
    pub(super) fn integer(
        &mut self,
        t: &Table,
        section: &str,
        key: &str,
        range: std::ops::RangeInclusive<i64>,
    ) -> i64 {
        let value = match t.get(key) {
            None => None,
            Some(Value::Integer(n)) if range.contains(n) => Some(*n),
            Some(other) => {
                self.issue(
                    &format!("{section}.{key}"),
                    &format!(
                        "must be an integer in {}..={}, got {other}",
                        range.start(),
                        range.end()
                    ),
                );
                None
            }
        };
        value.unwrap_or_else(|| {
            self.keys_default(section, key, str::parse::<i64>)
                .unwrap_or_default()
        })
    }
}
