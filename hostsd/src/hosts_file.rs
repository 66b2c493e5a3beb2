//! hosts.toml as containerd reads it, and as hostsd writes it.
//!
//! [`decode`] follows containerd 1.6's `parseHostsFile`: the `[host."..."]`
//! tables in file order, then `server`, with the same type rules, so that a
//! file it accepts is one containerd accepts. [`render`] builds the managed
//! file: the mirror first, then whatever a foreign file had.

use toml_edit::{DocumentMut, ImDocument, Item, Table, Value};

use crate::options::parse_go_duration;

/// The first line of every file hostsd owns. containerd ignores comments.
pub const MANAGED_MARKER: &str = "# managed by damselfly hostsd; do not edit";
/// The file name containerd reads in each registry directory.
pub const HOSTS_FILE: &str = "hosts.toml";
/// The backup of a foreign hosts.toml, next to it.
pub const BACKUP_FILE: &str = "hosts.toml.damselfly-orig";

/// Whether hostsd wrote this file.
pub fn is_managed(text: &[u8]) -> bool {
    text.starts_with(MANAGED_MARKER.as_bytes())
}

/// What a host may do, as containerd's capability bits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Capabilities {
    pub pull: bool,
    pub resolve: bool,
    pub push: bool,
}

impl std::fmt::Display for Capabilities {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let names: Vec<&str> = [
            (self.pull, "pull"),
            (self.resolve, "resolve"),
            (self.push, "push"),
        ]
        .into_iter()
        .filter_map(|(on, n)| on.then_some(n))
        .collect();
        write!(f, "{}", names.join(","))
    }
}

/// One host containerd will try, in the order it tries them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostEntry {
    /// `http` or `https`; empty for the implicit default server.
    pub scheme: String,
    /// `host[:port]`; empty when `server` is absent and containerd uses the
    /// registry's own default.
    pub host: String,
    /// The API root, `/v2` unless `override_path`.
    pub path: String,
    pub capabilities: Capabilities,
    /// The `server` entry, which containerd always tries last.
    pub is_server: bool,
    /// `dial_timeout` as written, if any.
    pub dial_timeout: Option<String>,
}

impl HostEntry {
    /// `scheme://host`, the form of a `[host."..."]` key; `<registry default>`
    /// for an absent server.
    pub fn origin(&self) -> String {
        if self.host.is_empty() {
            "<registry default>".into()
        } else {
            format!("{}://{}", self.scheme, self.host)
        }
    }
}

/// Why containerd would not decode a file. It then logs "failed to decode
/// hosts.toml", ignores the file, and pulls straight from the origin.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DecodeError {
    /// The trap: containerd 1.6 requires a `[host]` tree ("invalid `host` tree").
    NoHostTree,
    /// Anything else: TOML syntax, a wrong type, an unknown capability.
    Invalid(String),
}

impl std::fmt::Display for DecodeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DecodeError::NoHostTree => write!(
                f,
                "no [host.\"...\"] table: containerd 1.6 fails with \"invalid `host` tree\""
            ),
            DecodeError::Invalid(s) => f.write_str(s),
        }
    }
}

/// Decodes a hosts.toml the way containerd does and returns the hosts in the
/// order containerd tries them, `server` last.
pub fn decode(text: &str) -> Result<Vec<HostEntry>, DecodeError> {
    let parsed = parse(text)?;
    if !parsed.has_host_tree {
        return Err(DecodeError::NoHostTree);
    }
    Ok(parsed.hosts)
}

struct Parsed {
    has_host_tree: bool,
    /// Host entries in containerd's order, server last.
    hosts: Vec<HostEntry>,
    /// Host table keys in containerd's order.
    host_keys: Vec<String>,
}

fn invalid(s: impl Into<String>) -> DecodeError {
    DecodeError::Invalid(s.into())
}

fn parse(text: &str) -> Result<Parsed, DecodeError> {
    // The serde parser must accept it too: that is the check the daemon and
    // any other reader would do.
    text.parse::<toml::Table>().map_err(|e| {
        invalid(format!(
            "not TOML: {}",
            crate::containerd_config::one_line(&e)
        ))
    })?;
    let doc = ImDocument::parse(text).map_err(|e| {
        invalid(format!(
            "not TOML: {}",
            crate::containerd_config::one_line(&e)
        ))
    })?;
    let root = doc.as_table();
    let server = match root.get("server") {
        None => None,
        Some(item) => Some(
            item.as_str()
                .ok_or_else(|| invalid("`server` must be a string"))?
                .to_string(),
        ),
    };
    let root_fields = check_fields(root, "the root table")?;

    let (has_host_tree, mut keyed) = match root.get("host") {
        None => (false, Vec::new()),
        Some(item) => {
            let tree = item
                .as_table_like()
                .ok_or_else(|| invalid("`host` must be a table of [host.\"...\"] tables"))?;
            let mut keyed = Vec::new();
            for (key, entry) in tree.iter() {
                let table = entry
                    .as_table_like()
                    .ok_or_else(|| invalid(format!("host {key:?} is not a table")))?;
                let fields = check_fields(table, &format!("[host.{key:?}]"))?;
                let host = host_entry(key, &fields, false)?;
                keyed.push((span_start(entry), key.to_string(), host));
            }
            (true, keyed)
        }
    };
    // containerd sorts host tables by the line they start on.
    keyed.sort_by_key(|(pos, _, _)| *pos);
    let host_keys = keyed.iter().map(|(_, k, _)| k.clone()).collect();
    let mut hosts: Vec<HostEntry> = keyed.into_iter().map(|(_, _, h)| h).collect();
    hosts.push(host_entry(
        server.as_deref().unwrap_or(""),
        &root_fields,
        true,
    )?);
    Ok(Parsed {
        has_host_tree,
        hosts,
        host_keys,
    })
}

fn span_start(item: &Item) -> usize {
    match item {
        Item::Table(t) => t.span().map(|s| s.start),
        Item::Value(v) => v.span().map(|s| s.start),
        _ => None,
    }
    .unwrap_or(usize::MAX)
}

struct Fields {
    capabilities: Option<Capabilities>,
    override_path: bool,
    dial_timeout: Option<String>,
}

/// The per-host fields containerd decodes, with its type rules. Unknown keys
/// are ignored, as containerd's TOML decoder does.
fn check_fields(t: &dyn toml_edit::TableLike, at: &str) -> Result<Fields, DecodeError> {
    let wrong = |key: &str, want: &str| invalid(format!("{at}: `{key}` must be {want}"));
    let strings = |v: &Value| -> Option<Vec<String>> {
        v.as_array()?
            .iter()
            .map(|x| x.as_str().map(str::to_string))
            .collect()
    };
    let mut capabilities = None;
    if let Some(item) = t.get("capabilities") {
        let list = item
            .as_value()
            .and_then(strings)
            .ok_or_else(|| wrong("capabilities", "an array of strings"))?;
        let mut caps = Capabilities::default();
        for c in list {
            match c.to_ascii_lowercase().as_str() {
                "pull" => caps.pull = true,
                "resolve" => caps.resolve = true,
                "push" => caps.push = true,
                _ => return Err(invalid(format!("{at}: unknown capability {c:?}"))),
            }
        }
        capabilities = Some(caps);
    }
    if let Some(item) = t.get("ca") {
        let v = item.as_value();
        if !(v.is_some_and(|v| v.is_str()) || v.and_then(strings).is_some()) {
            return Err(wrong("ca", "a path or an array of paths"));
        }
    }
    if let Some(item) = t.get("client") {
        let ok = match item.as_value() {
            Some(Value::String(_)) => true,
            Some(Value::Array(a)) => a.iter().all(|p| match p {
                Value::String(_) => true,
                Value::Array(pair) => pair.len() == 2 && pair.iter().all(|x| x.is_str()),
                _ => false,
            }),
            _ => false,
        };
        if !ok {
            return Err(wrong(
                "client",
                "a path, or an array of paths or [cert, key] pairs",
            ));
        }
    }
    if let Some(item) = t.get("skip_verify") {
        if item.as_bool().is_none() {
            return Err(wrong("skip_verify", "true or false"));
        }
    }
    let override_path = match t.get("override_path") {
        None => false,
        Some(item) => item
            .as_bool()
            .ok_or_else(|| wrong("override_path", "true or false"))?,
    };
    if let Some(item) = t.get("header") {
        let h = item
            .as_table_like()
            .ok_or_else(|| wrong("header", "a table of header names"))?;
        for (name, v) in h.iter() {
            let ok = v.as_str().is_some() || v.as_value().and_then(strings).is_some();
            if !ok {
                return Err(invalid(format!(
                    "{at}: header {name:?} must be a string or an array of strings"
                )));
            }
        }
    }
    let dial_timeout = match t.get("dial_timeout") {
        None => None,
        Some(item) => {
            let s = item
                .as_str()
                .ok_or_else(|| wrong("dial_timeout", "a duration string"))?;
            // containerd 2.1+ rejects the file when this does not parse.
            parse_go_duration(s).map_err(|e| invalid(format!("{at}: {e}")))?;
            Some(s.to_string())
        }
    };
    Ok(Fields {
        capabilities,
        override_path,
        dial_timeout,
    })
}

/// containerd's `parseHostConfig`: scheme defaults to https, `/v2` is
/// appended unless `override_path`, no capabilities means all of them.
fn host_entry(server: &str, f: &Fields, is_server: bool) -> Result<HostEntry, DecodeError> {
    let capabilities = f.capabilities.unwrap_or(Capabilities {
        pull: true,
        resolve: true,
        push: true,
    });
    if server.is_empty() {
        return Ok(HostEntry {
            scheme: String::new(),
            host: String::new(),
            path: "/v2".into(),
            capabilities,
            is_server,
            dial_timeout: f.dial_timeout.clone(),
        });
    }
    let url = if server.starts_with("http") {
        server.to_string()
    } else {
        format!("https://{server}")
    };
    let (scheme, rest) = url
        .split_once("://")
        .ok_or_else(|| invalid(format!("{server:?} is not a URL")))?;
    if scheme != "http" && scheme != "https" {
        return Err(invalid(format!("{server:?}: scheme must be http or https")));
    }
    let (host, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, ""),
    };
    if host.is_empty() || host.chars().any(|c| c.is_whitespace()) {
        return Err(invalid(format!("{server:?}: no usable host")));
    }
    let path = clean_path(path);
    let path = if f.override_path || path.ends_with("/v2") {
        path
    } else {
        format!("{}/v2", path.trim_end_matches('/'))
    };
    Ok(HostEntry {
        scheme: scheme.into(),
        host: host.into(),
        path,
        capabilities,
        is_server,
        dial_timeout: f.dial_timeout.clone(),
    })
}

/// Go's `path.Clean` for the simple paths registry URLs have.
fn clean_path(p: &str) -> String {
    let mut out: Vec<&str> = Vec::new();
    for seg in p.split('/') {
        match seg {
            "" | "." => {}
            ".." => {
                out.pop();
            }
            s => out.push(s),
        }
    }
    if out.is_empty() {
        String::new()
    } else {
        format!("/{}", out.join("/"))
    }
}

/// The `[host."..."]` key for a URL, as containerd would compare it.
fn host_key_origin(key: &str) -> String {
    let url = if key.starts_with("http") {
        key.to_string()
    } else {
        format!("https://{key}")
    };
    url.trim_end_matches('/').to_string()
}

/// What the managed file must say.
#[derive(Debug, Clone)]
pub struct Desired<'a> {
    /// The mirror URL, already normalized.
    pub mirror: &'a str,
    pub dial_timeout: &'a str,
    /// An explicit server override; wins over a foreign file's `server`.
    pub server_override: Option<&'a str>,
    /// containerd's default origin for the registry (`None` for `_default`).
    pub default_server: Option<&'a str>,
    /// Whether a backup of a foreign original exists next to the file.
    pub has_original: bool,
}

/// A rendered managed file and what it kept from a foreign one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rendered {
    pub text: String,
    /// Notes for the report: what was kept, what was replaced.
    pub notes: Vec<String>,
}

/// Builds the managed hosts.toml. `foreign` is the original file hostsd is
/// taking over (or has taken over): its root settings stay with `server`, and
/// its host tables follow the mirror's in their original order.
pub fn render(d: &Desired, foreign: Option<&str>) -> Result<Rendered, DecodeError> {
    let mut notes = Vec::new();
    let mut doc = DocumentMut::new();
    let mut root_values: Vec<(String, Item)> = Vec::new();
    let mut root_tables: Vec<(String, Item)> = Vec::new();
    let mut foreign_hosts: Vec<(String, Table)> = Vec::new();
    let mut foreign_server = None;
    let mut server_comment: Option<String> = None;
    let mut trailing = String::new();

    if let Some(text) = foreign {
        let parsed = parse(text)?;
        if !parsed.has_host_tree {
            notes.push(
                "the original had no [host] table, so containerd 1.6 ignored it; its settings now apply"
                    .into(),
            );
        }
        let fdoc: DocumentMut = text.parse().map_err(|e| {
            invalid(format!(
                "not TOML: {}",
                crate::containerd_config::one_line(&e)
            ))
        })?;
        trailing = fdoc.trailing().as_str().unwrap_or_default().to_string();
        for (key, item) in fdoc.as_table().iter() {
            match key {
                "server" => {
                    foreign_server = item.as_str().map(str::to_string);
                    // Comments above `server` (often the file's own header)
                    // belong to its key; carry them over.
                    server_comment = fdoc
                        .as_table()
                        .key(key)
                        .and_then(|k| k.leaf_decor().prefix())
                        .and_then(|p| p.as_str())
                        .map(|p| p.trim_start_matches('\n').to_string());
                }
                "host" => {}
                _ if item.is_table() => root_tables.push((key.to_string(), item.clone())),
                _ => root_values.push((key.to_string(), item.clone())),
            }
        }
        let tree = fdoc.get("host").and_then(Item::as_table_like);
        for key in &parsed.host_keys {
            if host_key_origin(key) == d.mirror {
                notes.push(format!(
                    "replaced the original's own [host.{key:?}] with hostsd's"
                ));
                continue;
            }
            let Some(item) = tree.and_then(|t| t.get(key)) else {
                continue;
            };
            let table = match item {
                Item::Table(t) => t.clone(),
                Item::Value(Value::InlineTable(t)) => t.clone().into_table(),
                _ => return Err(invalid(format!("host {key:?} is not a table"))),
            };
            foreign_hosts.push((key.clone(), table));
        }
        let kept: Vec<&str> = root_values
            .iter()
            .chain(root_tables.iter())
            .map(|(k, _)| k.as_str())
            .collect();
        if !kept.is_empty() {
            notes.push(format!("kept the original's settings: {}", kept.join(", ")));
        }
        if !foreign_hosts.is_empty() {
            let keys: Vec<&str> = foreign_hosts.iter().map(|(k, _)| k.as_str()).collect();
            notes.push(format!(
                "kept the original's hosts after the mirror: {}",
                keys.join(", ")
            ));
        }
    }

    let server = match (d.server_override, &foreign_server) {
        (Some(s), Some(f)) if s != f => {
            notes.push(format!("server {s} replaces the original's {f}"));
            Some(s.to_string())
        }
        (Some(s), _) => Some(s.to_string()),
        (None, Some(f)) => {
            if Some(f.as_str()) != d.default_server {
                notes.push(format!("kept the original's server {f}"));
            }
            Some(f.clone())
        }
        (None, None) => d.default_server.map(str::to_string),
    };
    if let Some(s) = &server {
        doc.insert("server", toml_edit::value(s.as_str()));
        if let (Some(comment), Some(mut key)) = (server_comment, doc.key_mut("server")) {
            key.leaf_decor_mut().set_prefix(comment);
        }
    }
    for (k, item) in root_values {
        doc.insert(&k, item);
    }
    for (k, item) in root_tables {
        doc.insert(&k, item);
    }
    let mut host = Table::new();
    host.set_implicit(true);
    let mut mirror = Table::new();
    let mut caps = toml_edit::Array::new();
    caps.push("pull");
    caps.push("resolve");
    mirror.insert("capabilities", toml_edit::value(caps));
    mirror.insert("dial_timeout", toml_edit::value(d.dial_timeout));
    host.insert(d.mirror, Item::Table(mirror));
    for (k, mut t) in foreign_hosts {
        t.set_implicit(false);
        t.set_dotted(false);
        host.insert(&k, Item::Table(t));
    }
    doc.insert("host", Item::Table(host));
    let mut next = 0;
    renumber(doc.as_table_mut(), &mut next);
    // A blank line before every table header, whatever the original had.
    space_tables(doc.as_table_mut());
    doc.set_trailing(trailing);

    let header = if d.has_original {
        format!("{MANAGED_MARKER} (original saved as {BACKUP_FILE})")
    } else {
        format!("{MANAGED_MARKER} (there was no hosts.toml here before)")
    };
    let body = doc.to_string();
    let text = format!(
        "{header}\n# containerd tries each [host] below in order, then `server`.\n\n{}",
        body.trim_start_matches('\n')
    );
    Ok(Rendered { text, notes })
}

/// Gives every table an explicit position in visiting order, so that tables
/// cloned from a foreign file keep the order hostsd chose rather than the
/// positions they had there.
fn renumber(t: &mut Table, next: &mut usize) {
    for (_, item) in t.iter_mut() {
        match item {
            Item::Table(sub) => {
                sub.set_position(*next);
                *next += 1;
                renumber(sub, next);
            }
            Item::ArrayOfTables(arr) => {
                for sub in arr.iter_mut() {
                    sub.set_position(*next);
                    *next += 1;
                    renumber(sub, next);
                }
            }
            _ => {}
        }
    }
}

fn space_tables(t: &mut Table) {
    for (_, item) in t.iter_mut() {
        if let Item::Table(sub) = item {
            if !sub.is_implicit() && !sub.is_dotted() {
                let prefix = sub.decor().prefix().and_then(|p| p.as_str()).unwrap_or("");
                let comments = prefix
                    .trim_start_matches(['\n', ' ', '\t', '\r'])
                    .to_string();
                sub.decor_mut().set_prefix(format!("\n{comments}"));
            }
            space_tables(sub);
        }
    }
}

#[cfg(test)]
#[path = "hosts_file_tests.rs"]
mod tests;
