//! What `reconcile` and `remove` did, for the CLI to print and the daemon to
//! log.

use std::fmt;
use std::path::PathBuf;

/// What happened to one hosts.toml.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// There was no hosts.toml; hostsd wrote one.
    Created,
    /// hostsd's own file, rewritten because the inputs changed.
    Updated,
    /// Already exactly right; not touched (same inode, same mtime).
    Unchanged,
    /// A foreign file, backed up and replaced by a managed file that keeps its
    /// hosts and settings.
    TookOver,
    /// A managed file put back to the original it replaced.
    Restored,
    /// A managed file with no original, deleted.
    Deleted,
}

impl Action {
    /// Whether the action touches the filesystem.
    pub fn writes(self) -> bool {
        self != Action::Unchanged
    }

    fn verb(self, dry_run: bool) -> &'static str {
        match (self, dry_run) {
            (Action::Created, false) => "created",
            (Action::Created, true) => "would create",
            (Action::Updated, false) => "updated",
            (Action::Updated, true) => "would update",
            (Action::Unchanged, _) => "unchanged",
            (Action::TookOver, false) => "took over",
            (Action::TookOver, true) => "would take over",
            (Action::Restored, false) => "restored",
            (Action::Restored, true) => "would restore",
            (Action::Deleted, false) => "deleted",
            (Action::Deleted, true) => "would delete",
        }
    }
}

/// One hosts.toml and what happened to it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileChange {
    /// The registry (directory name), e.g. `docker.io` or `_default`.
    pub registry: String,
    pub path: PathBuf,
    pub action: Action,
    /// Where the foreign original is kept, if there is one.
    pub backup: Option<PathBuf>,
    /// What was kept from a foreign file, and similar details.
    pub notes: Vec<String>,
    /// The new content, for `--dry-run` to show.
    pub content: Option<String>,
}

/// The one change hostsd may make to containerd's config.toml.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigChange {
    pub path: PathBuf,
    /// What happened: `set config_path = "..."`, or `restored`.
    pub what: String,
    /// The original, kept next to it (none when hostsd created the file).
    pub backup: Option<PathBuf>,
}

/// The result of `reconcile` or `remove`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Report {
    /// The certs.d root hostsd wrote to (or removed from).
    pub certs_dir: Option<PathBuf>,
    pub files: Vec<FileChange>,
    pub config_change: Option<ConfigChange>,
    /// containerd reads hosts.toml on every pull and needs no restart for
    /// them; only a config.toml change needs one.
    pub restart_required: bool,
    pub warnings: Vec<String>,
    pub dry_run: bool,
}

impl Report {
    /// Whether anything was (or, in a dry run, would be) written.
    pub fn changed(&self) -> bool {
        self.config_change.is_some() || self.files.iter().any(|f| f.action.writes())
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(dir) = &self.certs_dir {
            writeln!(f, "certs.d: {}", dir.display())?;
        }
        let width = self
            .files
            .iter()
            .map(|c| c.registry.len())
            .max()
            .unwrap_or(0);
        for c in &self.files {
            writeln!(
                f,
                "{:<15} {:<width$}  {}",
                c.action.verb(self.dry_run),
                c.registry,
                c.path.display()
            )?;
            if let Some(b) = &c.backup {
                if matches!(c.action, Action::TookOver) {
                    writeln!(f, "    original kept as {}", b.display())?;
                }
            }
            for n in &c.notes {
                writeln!(f, "    {n}")?;
            }
            if let Some(content) = self.dry_run.then_some(c.content.as_ref()).flatten() {
                for line in content.lines() {
                    writeln!(f, "    | {line}")?;
                }
            }
        }
        if self.files.is_empty() {
            writeln!(f, "no hosts.toml files to change")?;
        }
        if let Some(c) = &self.config_change {
            let verb = if self.dry_run {
                "would change"
            } else {
                "changed"
            };
            writeln!(f, "{verb} {}: {}", c.path.display(), c.what)?;
            if let Some(b) = &c.backup {
                writeln!(f, "    original kept as {}", b.display())?;
            }
        }
        for w in &self.warnings {
            writeln!(f, "warning: {w}")?;
        }
        if self.restart_required {
            writeln!(
                f,
                "RESTART NEEDED: containerd reads config.toml only at start; restart it \
                 (e.g. systemctl restart containerd) for this change to apply"
            )?;
        }
        Ok(())
    }
}
