//! The `[node]` section: Kubernetes node gating (see `crate::node`).

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use toml::{Table, Value};

use super::validate::parse_string_list;
use super::Validator;

/// When and how the daemon removes its startup taint from its own Node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeConfig {
    pub gate: bool,
    /// `None`: `$NODE_NAME`, read when the gate starts.
    pub name: Option<String>,
    pub taint: TaintSpec,
    /// Taint keys that must be gone first (Karpenter's `unregistered`).
    pub wait_for_taints: Vec<String>,
    pub deadline: Duration,
    pub wait_for_ready: bool,
    pub check_hosts: bool,
    pub poll_interval: Duration,
    /// `None`: in-cluster config, else `$KUBECONFIG` / `~/.kube/config`.
    pub kubeconfig: Option<PathBuf>,
}

/// A taint as `kubectl taint` writes it: `key[=value]:Effect`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TaintSpec {
    pub key: String,
    /// `None` matches any value.
    pub value: Option<String>,
    pub effect: TaintEffect,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TaintEffect {
    NoSchedule,
    PreferNoSchedule,
    NoExecute,
}

impl TaintEffect {
    pub fn as_str(self) -> &'static str {
        match self {
            TaintEffect::NoSchedule => "NoSchedule",
            TaintEffect::PreferNoSchedule => "PreferNoSchedule",
            TaintEffect::NoExecute => "NoExecute",
        }
    }
}

impl fmt::Display for TaintSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.value {
            Some(v) => write!(f, "{}={v}:{}", self.key, self.effect.as_str()),
            None => write!(f, "{}:{}", self.key, self.effect.as_str()),
        }
    }
}

impl FromStr for TaintSpec {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let (kv, effect) = s
            .rsplit_once(':')
            .ok_or_else(|| format!("{s:?} is not a taint like \"key[=value]:NoSchedule\""))?;
        let effect = match effect {
            "NoSchedule" => TaintEffect::NoSchedule,
            "PreferNoSchedule" => TaintEffect::PreferNoSchedule,
            "NoExecute" => TaintEffect::NoExecute,
            other => {
                return Err(format!(
                    "effect {other:?} must be NoSchedule, PreferNoSchedule or NoExecute"
                ))
            }
        };
        let (key, value) = match kv.split_once('=') {
            Some((k, v)) => (k, Some(v)),
            None => (kv, None),
        };
        valid_label_key(key)?;
        if let Some(v) = value {
            valid_label_value(v)?;
        }
        Ok(TaintSpec {
            key: key.to_owned(),
            value: value.map(str::to_owned),
            effect,
        })
    }
}

/// A Kubernetes qualified name with an optional DNS prefix
/// (`damselfly.io/not-ready`), as taint and label keys must be.
pub fn valid_label_key(key: &str) -> Result<(), String> {
    let (prefix, name) = match key.split_once('/') {
        Some((p, n)) => (Some(p), n),
        None => (None, key),
    };
    let bad = || format!("{key:?} is not a taint key like \"example.com/name\"");
    if let Some(p) = prefix {
        let label = |l: &str| {
            !l.is_empty()
                && l.len() <= 63
                && l.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                && !l.starts_with('-')
                && !l.ends_with('-')
        };
        if p.len() > 253 || !p.split('.').all(label) {
            return Err(bad());
        }
    }
    let edge = |b: u8| b.is_ascii_alphanumeric();
    let ok = !name.is_empty()
        && name.len() <= 63
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
        && name.bytes().next().is_some_and(edge)
        && name.bytes().last().is_some_and(edge);
    if ok {
        Ok(())
    } else {
        Err(bad())
    }
}

fn valid_label_value(v: &str) -> Result<(), String> {
    let ok = v.len() <= 63
        && v.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
        && (v.is_empty()
            || (v.as_bytes()[0].is_ascii_alphanumeric()
                && v.as_bytes()[v.len() - 1].is_ascii_alphanumeric()));
    if ok {
        Ok(())
    } else {
        Err(format!("{v:?} is not a valid taint value"))
    }
}

impl Validator {
    pub(super) fn node(&mut self, t: &Table) -> NodeConfig {
        const S: &str = "node";
        let written = self.opt_string(t, S, "taint").and_then(|s| {
            s.parse()
                .map_err(|e: String| self.issue("node.taint", &e))
                .ok()
        });
        // A bad taint was reported; the default stands in for it so that
        // the checks below still run.
        let taint = written
            .or_else(|| self.keys_default(S, "taint", str::parse::<TaintSpec>))
            .unwrap_or(TaintSpec {
                key: String::new(),
                value: None,
                effect: TaintEffect::NoSchedule,
            });
        let wait_for_taints = match t.get("wait_for_taints") {
            None => self
                .keys_default(S, "wait_for_taints", parse_string_list)
                .unwrap_or_default(),
            Some(Value::Array(items)) => items
                .iter()
                .enumerate()
                .filter_map(|(i, item)| {
                    let at = format!("node.wait_for_taints[{i}]");
                    match item {
                        Value::String(k) => match valid_label_key(k) {
                            Ok(()) => Some(k.clone()),
                            Err(e) => {
                                self.issue(&at, &e);
                                None
                            }
                        },
                        other => {
                            self.issue(&at, &format!("must be a string, not {}", other.type_str()));
                            None
                        }
                    }
                })
                .collect(),
            Some(other) => {
                self.issue(
                    "node.wait_for_taints",
                    &format!("must be a list of taint keys, not {}", other.type_str()),
                );
                Vec::new()
            }
        };
        if wait_for_taints.contains(&taint.key) {
            self.issue(
                "node.wait_for_taints",
                &format!(
                    "lists {:?}, the taint this daemon removes: it would wait for itself",
                    taint.key
                ),
            );
        }
        let name = self.opt_string(t, S, "name");
        if let Some(n) = &name {
            if n.is_empty() || n.len() > 253 {
                self.issue("node.name", &format!("{n:?} is not a Node name"));
            }
        }
        let poll_interval = self.duration(t, S, "poll_interval");
        if poll_interval < Duration::from_millis(10) {
            self.issue("node.poll_interval", "must be at least 10ms");
        }
        NodeConfig {
            gate: self.bool(t, S, "gate"),
            name,
            taint,
            wait_for_taints,
            deadline: self.duration(t, S, "deadline"),
            wait_for_ready: self.bool(t, S, "wait_for_ready"),
            check_hosts: self.bool(t, S, "check_hosts"),
            poll_interval,
            kubeconfig: self.opt_path(t, S, "kubeconfig"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn taints_parse_like_kubectl_writes_them() {
        let t: TaintSpec = "damselfly.io/not-ready:NoSchedule".parse().unwrap();
        assert_eq!(t.key, "damselfly.io/not-ready");
        assert_eq!(t.value, None);
        assert_eq!(t.effect, TaintEffect::NoSchedule);
        assert_eq!(t.to_string(), "damselfly.io/not-ready:NoSchedule");
        let t: TaintSpec = "gpu=true:NoExecute".parse().unwrap();
        assert_eq!(t.value.as_deref(), Some("true"));
        assert_eq!(t.to_string(), "gpu=true:NoExecute");
        for bad in [
            "damselfly.io/not-ready",
            "x:NoWhere",
            ":NoSchedule",
            "Bad_Prefix.IO/x:NoSchedule",
            "a/b/c:NoSchedule",
            "k=-v:NoSchedule",
            "-k:NoSchedule",
        ] {
            assert!(bad.parse::<TaintSpec>().is_err(), "{bad:?} should fail");
        }
    }
}
