//! `reconcile` and `remove`: plan every change first, write nothing unless the
//! whole plan is valid, then apply it file by file, atomically.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use crate::containerd_config::{self, ConfigPath, ContainerdConfig, DEFAULT_CERTS_DIR};
use crate::ecr;
use crate::error::Error;
use crate::fsops;
use crate::hosts_file::{self, Desired, BACKUP_FILE, HOSTS_FILE};
use crate::imds;
use crate::options::{normalized_mirror, parse_go_duration, ReconcileOptions};
use crate::registry::{self, default_server, RegistrySpec};
use crate::report::{Action, ConfigChange, FileChange, Report};

/// What containerd's config says about where hosts.toml files live.
pub(crate) struct Inspection {
    pub config: ContainerdConfig,
    /// The certs.d roots in containerd's search order (just the override, if
    /// one was given).
    pub roots: Vec<PathBuf>,
    /// Why containerd's CRI plugin would not use hosts.toml files, when that
    /// is so and no override says otherwise.
    pub problem: Option<Error>,
    pub warnings: Vec<String>,
}

/// Reads containerd's config. Only an unreadable or malformed config is an
/// error here, and only without an override.
pub(crate) fn inspect(opts: &ReconcileOptions) -> Result<Inspection, Error> {
    let loaded = ContainerdConfig::load(&opts.containerd_config);
    let Some(dir) = &opts.certs_dir else {
        let config = loaded?;
        let warnings = config.warnings();
        let problem = config.conflict().or_else(|| {
            (config.roots().is_empty()).then(|| config.missing_error(Path::new(DEFAULT_CERTS_DIR)))
        });
        return Ok(Inspection {
            roots: config.roots(),
            config,
            problem,
            warnings,
        });
    };
    // With an explicit directory, what containerd's config says is advice.
    let mut warnings = Vec::new();
    let config = match loaded {
        Ok(c) => c,
        Err(e) => {
            warnings.push(format!("ignoring containerd config: {e}"));
            ContainerdConfig::parse(&opts.containerd_config, None)?
        }
    };
    if config.exists {
        if let Some(c) = config.conflict() {
            warnings.push(c.to_string());
        }
        warnings.extend(config.soci_warning());
        match config.first_root() {
            Some(first) if first == *dir => {}
            Some(first) => warnings.push(format!(
                "containerd's config_path starts with {}, not {}: CRI pulls will not read these \
                 files (ctr --hosts-dir will)",
                first.display(),
                dir.display()
            )),
            None if !opts.patch_config => warnings.push(format!(
                "{} sets no config_path: CRI pulls will not read these files (ctr --hosts-dir will)",
                config.path.display()
            )),
            None => {}
        }
    }
    Ok(Inspection {
        config,
        roots: vec![dir.clone()],
        problem: None,
        warnings,
    })
}

/// One registry hostsd should route, with its origins.
pub(crate) struct Wanted {
    pub host: String,
    pub server_override: Option<String>,
    pub default_server: Option<String>,
}

/// The registries from the options, ECR hostnames included, deduplicated.
pub(crate) fn wanted_registries(
    opts: &ReconcileOptions,
) -> Result<(Vec<Wanted>, Vec<String>), Error> {
    let mut specs: Vec<RegistrySpec> = opts.registries.clone();
    let mut accounts = opts.ecr.accounts.clone();
    let mut regions = opts.ecr.regions.clone();
    let mut notes = Vec::new();
    if opts.ecr.discover {
        let id = imds::discover(&opts.ecr.imds_endpoint, opts.ecr.imds_timeout)?;
        notes.push(format!(
            "instance metadata: account {} in {}",
            id.account_id, id.region
        ));
        if !accounts.contains(&id.account_id) {
            accounts.push(id.account_id);
        }
        if !regions.contains(&id.region) {
            regions.push(id.region);
        }
    }
    let (ecr_hosts, ecr_notes) = ecr::registry_hosts(&accounts, &regions, opts.ecr.fips)?;
    notes.extend(ecr_notes);
    specs.extend(ecr_hosts.into_iter().map(RegistrySpec::new));

    let mut seen: Vec<Wanted> = Vec::new();
    for spec in specs {
        let server = spec.validate()?;
        let server_override = spec.server.as_ref().and(server);
        if let Some(prev) = seen.iter().find(|w| w.host == spec.host) {
            if prev.server_override != server_override {
                return Err(Error::InvalidRegistry {
                    name: spec.host,
                    reason: "given twice with different servers".into(),
                });
            }
            continue;
        }
        seen.push(Wanted {
            default_server: default_server(&spec.host),
            host: spec.host,
            server_override,
        });
    }
    if seen.is_empty() {
        return Err(Error::NoRegistries);
    }
    Ok((seen, notes))
}

struct FilePlan {
    change: FileChange,
    dir: PathBuf,
    desired: Vec<u8>,
    /// The current file is foreign and must be backed up first.
    take_over: bool,
    mode: u32,
}

/// Writes one managed hosts.toml per registry, and puts back files of
/// registries that are no longer wanted. See the crate docs for the rules.
pub fn reconcile(opts: &ReconcileOptions) -> Result<Report, Error> {
    let mirror = normalized_mirror(&opts.mirror)?;
    parse_go_duration(&opts.dial_timeout)?;
    let insp = inspect(opts)?;
    let mut warnings = insp.warnings;

    let mut patch_to: Option<PathBuf> = None;
    let certs_dir = match (&opts.certs_dir, insp.problem) {
        (Some(dir), _) => {
            if opts.patch_config && insp.config.config_path == ConfigPath::Missing {
                if let Some(conflict) = insp.config.conflict() {
                    return Err(conflict);
                }
                patch_to = Some(dir.clone());
            }
            dir.clone()
        }
        (None, Some(Error::ConfigPathMissing { .. })) if opts.patch_config => {
            patch_to = Some(PathBuf::from(DEFAULT_CERTS_DIR));
            PathBuf::from(DEFAULT_CERTS_DIR)
        }
        (None, Some(problem)) => return Err(problem),
        (None, None) => insp.roots[0].clone(),
    };
    if insp.roots.len() > 1 && opts.certs_dir.is_none() {
        warnings.push(format!(
            "config_path lists {} directories; writing to the first, which containerd searches first",
            insp.roots.len()
        ));
    }

    let (wanted, notes) = wanted_registries(opts)?;
    warnings.extend(notes);

    // Plan under the lock, so the plan is still true when it is applied. A
    // certs.d that does not exist yet holds nothing to take over; it is
    // created only once the plan is known to be good.
    let mut lock = match !opts.dry_run && certs_dir.is_dir() {
        true => Some(fsops::lock_dir(&certs_dir)?),
        false => None,
    };
    // Plan everything before writing anything.
    let mut plans = Vec::new();
    for w in &wanted {
        plans.push(plan_file(&certs_dir, w, &mirror, &opts.dial_timeout)?);
    }
    let planned: HashSet<PathBuf> = plans.iter().map(|p| p.dir.clone()).collect();
    let stale = stale_files(&certs_dir, &planned)?;
    let config_plan = match &patch_to {
        Some(dir) => Some(plan_config_patch(&insp.config, dir)?),
        None => None,
    };

    let mut report = Report {
        certs_dir: Some(certs_dir.clone()),
        files: Vec::new(),
        config_change: None,
        restart_required: config_plan.is_some(),
        warnings,
        dry_run: opts.dry_run,
    };
    if !opts.dry_run {
        if lock.is_none() {
            fsops::ensure_dir(&certs_dir)?;
            lock = Some(fsops::lock_dir(&certs_dir)?);
        }
        for p in &plans {
            apply_file(p)?;
        }
        for s in &stale {
            undo_file(s)?;
        }
        if let Some((change, text)) = &config_plan {
            write_config(&insp.config, change, text)?;
        }
    }
    drop(lock);
    report.files = plans.into_iter().map(|p| p.change).collect();
    report.files.extend(stale);
    report.config_change = config_plan.map(|(c, _)| c);
    Ok(report)
}

fn plan_file(root: &Path, w: &Wanted, mirror: &str, dial_timeout: &str) -> Result<FilePlan, Error> {
    let dir = registry::target_dir(root, &w.host);
    let path = dir.join(HOSTS_FILE);
    let backup_path = dir.join(BACKUP_FILE);
    let current = fsops::read_opt(&path)?;
    let backup = fsops::read_opt(&backup_path)?;
    let managed = current.as_deref().is_some_and(hosts_file::is_managed);

    // The foreign content to keep: the file itself when hostsd has not taken
    // it over yet, else the backup of the original.
    let (foreign, foreign_path, take_over) = match (&current, managed) {
        (Some(bytes), false) => (Some(bytes.clone()), path.clone(), true),
        _ => (backup.clone(), backup_path.clone(), false),
    };
    let foreign_text =
        match &foreign {
            Some(bytes) => Some(String::from_utf8(bytes.clone()).map_err(|_| {
                Error::ForeignFileUndecodable {
                    path: foreign_path.clone(),
                    reason: "not UTF-8".into(),
                }
            })?),
            None => None,
        };
    let desired = Desired {
        mirror,
        dial_timeout,
        server_override: w.server_override.as_deref(),
        default_server: w.default_server.as_deref(),
        has_original: foreign.is_some(),
    };
    let rendered = hosts_file::render(&desired, foreign_text.as_deref()).map_err(|e| {
        Error::ForeignFileUndecodable {
            path: foreign_path.clone(),
            reason: e.to_string(),
        }
    })?;
    verify(&path, &rendered.text, mirror)?;

    let mut notes = rendered.notes;
    if take_over && backup.is_some() && backup != current {
        notes.push(format!(
            "replaced an older {BACKUP_FILE}: the file now in place is what remove restores"
        ));
    }
    let action = match &current {
        Some(bytes) if *bytes == rendered.text.as_bytes() => Action::Unchanged,
        Some(_) if take_over => Action::TookOver,
        Some(_) => Action::Updated,
        None => Action::Created,
    };
    Ok(FilePlan {
        change: FileChange {
            registry: w.host.clone(),
            path: path.clone(),
            action,
            backup: foreign.is_some().then_some(backup_path),
            notes: if action == Action::Unchanged {
                Vec::new()
            } else {
                notes
            },
            content: Some(rendered.text.clone()),
        },
        dir,
        desired: rendered.text.into_bytes(),
        take_over,
        mode: fsops::mode_of(&path).unwrap_or(0o644),
    })
}

/// The last guard before a rename: the file must parse with the same TOML
/// parser, decode as containerd decodes it, and put the mirror first.
fn verify(path: &Path, text: &str, mirror: &str) -> Result<(), Error> {
    let invalid = |reason: String| Error::GeneratedInvalid {
        path: path.to_path_buf(),
        reason,
    };
    toml::from_str::<toml::Table>(text).map_err(|e| invalid(containerd_config::one_line(&e)))?;
    let hosts = hosts_file::decode(text).map_err(|e| invalid(e.to_string()))?;
    let first = hosts.first().ok_or_else(|| invalid("no hosts".into()))?;
    if first.origin() != mirror || !first.capabilities.pull || !first.capabilities.resolve {
        return Err(invalid(format!(
            "the first host is {}, not the mirror",
            first.origin()
        )));
    }
    Ok(())
}

fn apply_file(p: &FilePlan) -> Result<(), Error> {
    if !p.change.action.writes() {
        return Ok(());
    }
    if fsops::ensure_dir(&p.dir)? {
        fsops::write_atomic(&p.dir.join(fsops::CREATED_DIR_MARKER), b"", 0o644)?;
    }
    if p.take_over {
        if let Some(b) = &p.change.backup {
            fsops::backup(&p.change.path, b)?;
        }
    }
    fsops::write_atomic(&p.change.path, &p.desired, p.mode)
}

/// Managed files under `root` whose registry is no longer wanted.
fn stale_files(root: &Path, keep: &HashSet<PathBuf>) -> Result<Vec<FileChange>, Error> {
    Ok(owned_files(root)?
        .into_iter()
        .filter(|c| !c.path.parent().is_some_and(|d| keep.contains(d)))
        .collect())
}

/// What `remove` would do for every file hostsd owns under `root`: restore
/// the backup, or delete a file that had no original.
fn owned_files(root: &Path) -> Result<Vec<FileChange>, Error> {
    let entries = match std::fs::read_dir(root) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(Error::io("list", root, e)),
    };
    let mut out = Vec::new();
    for entry in entries.filter_map(Result::ok) {
        let dir = entry.path();
        if !dir.is_dir() {
            continue;
        }
        let path = dir.join(HOSTS_FILE);
        let backup = dir.join(BACKUP_FILE);
        let current = fsops::read_opt(&path)?;
        let has_backup = backup.exists();
        let managed = current.as_deref().is_some_and(hosts_file::is_managed);
        let action = match (managed, current.is_some(), has_backup) {
            (true, _, true) | (false, false, true) => Action::Restored,
            (true, _, false) => Action::Deleted,
            _ => continue,
        };
        out.push(FileChange {
            registry: entry.file_name().to_string_lossy().into_owned(),
            path,
            action,
            backup: has_backup.then_some(backup),
            notes: Vec::new(),
            content: None,
        });
    }
    out.sort_by(|a, b| a.path.cmp(&b.path));
    Ok(out)
}

fn undo_file(c: &FileChange) -> Result<(), Error> {
    match (&c.action, &c.backup) {
        (Action::Restored, Some(b)) => fsops::restore(b, &c.path)?,
        _ => fsops::remove(&c.path)?,
    }
    if let Some(dir) = c.path.parent() {
        fsops::remove_created_dir(dir)?;
    }
    Ok(())
}

fn plan_config_patch(cfg: &ContainerdConfig, dir: &Path) -> Result<(ConfigChange, String), Error> {
    let original = match std::fs::read_to_string(&cfg.path) {
        Ok(t) => Some(t),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => return Err(Error::io("read", &cfg.path, e)),
    };
    let text = containerd_config::patch_config_path(cfg, original.as_deref(), dir)?;
    Ok((
        ConfigChange {
            path: cfg.path.clone(),
            what: format!(
                "set config_path = \"{}\" in [{}]",
                dir.display(),
                if original.is_some() {
                    cfg.registry_table()
                } else {
                    "plugins.\"io.containerd.grpc.v1.cri\".registry".to_string()
                }
            ),
            backup: original
                .is_some()
                .then(|| containerd_config::backup_path(&cfg.path)),
        },
        text,
    ))
}

fn write_config(cfg: &ContainerdConfig, change: &ConfigChange, text: &str) -> Result<(), Error> {
    let mode = fsops::mode_of(&cfg.path).unwrap_or(0o644);
    if let Some(b) = &change.backup {
        fsops::backup(&cfg.path, b)?;
    } else if let Some(parent) = cfg.path.parent() {
        fsops::ensure_dir(parent)?;
    }
    fsops::write_atomic(&cfg.path, text.as_bytes(), mode)
}

/// Puts back every original that hostsd replaced, deletes the files it
/// created, and with `restore_config` undoes its config.toml change.
pub fn remove(opts: &ReconcileOptions) -> Result<Report, Error> {
    let insp = inspect(opts)?;
    let mut roots = insp.roots.clone();
    if roots.is_empty() {
        // No config_path: hostsd can only have written to the default place.
        roots.push(PathBuf::from(DEFAULT_CERTS_DIR));
    }
    let mut report = Report {
        certs_dir: roots.first().cloned(),
        files: Vec::new(),
        config_change: None,
        restart_required: false,
        warnings: Vec::new(),
        dry_run: opts.dry_run,
    };
    for root in &roots {
        let _lock = match opts.dry_run || !root.is_dir() {
            true => None,
            false => Some(fsops::lock_dir(root)?),
        };
        for c in owned_files(root)? {
            if !opts.dry_run {
                undo_file(&c)?;
            }
            report.files.push(c);
        }
    }
    let cfg = &insp.config;
    if cfg.patched_by_hostsd {
        let backup = containerd_config::backup_path(&cfg.path);
        if !opts.restore_config {
            report.warnings.push(format!(
                "{} has hostsd's config_path; add --restore-config to put the original back \
                 (needs a containerd restart)",
                cfg.path.display()
            ));
        } else {
            let text =
                std::fs::read_to_string(&cfg.path).map_err(|e| Error::io("read", &cfg.path, e))?;
            let (what, backup) = if backup.exists() {
                ("restored the original", Some(backup))
            } else if containerd_config::created_by_hostsd(&text) {
                ("deleted (hostsd had created it)", None)
            } else {
                report.warnings.push(format!(
                    "{} has hostsd's config_path but no backup to restore; left as it is",
                    cfg.path.display()
                ));
                ("", None)
            };
            if !what.is_empty() {
                if !opts.dry_run {
                    match &backup {
                        Some(b) => fsops::restore(b, &cfg.path)?,
                        None => fsops::remove(&cfg.path)?,
                    }
                }
                report.config_change = Some(ConfigChange {
                    path: cfg.path.clone(),
                    what: what.into(),
                    backup,
                });
                report.restart_required = true;
            }
        }
    }
    Ok(report)
}

#[cfg(test)]
#[path = "reconcile_tests.rs"]
mod tests;
