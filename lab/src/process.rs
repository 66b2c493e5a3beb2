//! A long-running lab process with its output in a log file: a daemon on
//! loopback ([`crate::daemon::Daemon`]), or a daemon or registry inside a
//! network namespace ([`crate::netlab`]). One type for both, so that
//! spawning, the log, killing, exit status and clean-up work the same way.
//!
//! It is a [`ChildGuard`] underneath: spawned with `PR_SET_PDEATHSIG` from
//! the lab's spawner thread, recorded for the exit hook (a `Proc` kept in a
//! `static` is never dropped), SIGKILLed and reaped on drop.

use std::fs::{File, OpenOptions};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context as _;

use crate::daemon::file_tail;
use crate::util::{in_netns, ChildGuard};

/// How to start a [`Proc`]: where its output goes, where it runs, and its
/// environment on top of the command's.
#[derive(Debug, Clone, Default)]
pub struct Spawn {
    /// For messages (`damselfly`, `docker-registry`).
    pub name: String,
    /// stdout, and stderr too unless [`Spawn::stderr`] is set.
    pub log: PathBuf,
    /// stderr in a file of its own (a registry's access log is its stdout).
    pub stderr: Option<PathBuf>,
    /// Append to the log files rather than truncate them (a restarted
    /// daemon keeps its predecessor's lines).
    pub append: bool,
    /// Start inside network namespace `/run/netns/<netns>` (the child calls
    /// setns(2) before exec); the caller's namespace when `None`.
    pub netns: Option<String>,
    /// Set in the environment, after `env_remove`.
    pub env: Vec<(String, String)>,
    /// Removed from the environment; a name ending in `*` removes every
    /// variable with that prefix (`AWS_*`).
    pub env_remove: Vec<String>,
}

impl Spawn {
    /// `name`'s stdout and stderr into `log` (truncated).
    pub fn new(name: &str, log: &Path) -> Spawn {
        Spawn {
            name: name.to_owned(),
            log: log.to_path_buf(),
            ..Spawn::default()
        }
    }

    /// The same, inside network namespace `ns`.
    pub fn in_netns(mut self, ns: &str) -> Spawn {
        self.netns = Some(ns.to_owned());
        self
    }

    fn open(&self, path: &Path) -> anyhow::Result<File> {
        let mut opts = OpenOptions::new();
        if self.append {
            opts.create(true).append(true);
        } else {
            opts.create(true).write(true).truncate(true);
        }
        opts.open(path)
            .with_context(|| format!("open {}'s log {}", self.name, path.display()))
    }
}

/// A child process whose output goes to a log file. Killed (SIGKILL) and
/// reaped on drop.
#[derive(Debug)]
pub struct Proc {
    child: ChildGuard,
    log: PathBuf,
}

impl Proc {
    /// Starts `cmd` as `spawn` says; its stdin is `/dev/null`.
    pub fn spawn(mut cmd: Command, spawn: &Spawn) -> anyhow::Result<Proc> {
        let out = spawn.open(&spawn.log)?;
        let err = match &spawn.stderr {
            Some(path) if *path != spawn.log => spawn.open(path)?,
            _ => out.try_clone().context("clone the log file")?,
        };
        for name in &spawn.env_remove {
            match name.strip_suffix('*') {
                Some(prefix) => {
                    for (k, _) in std::env::vars_os() {
                        if k.to_string_lossy().starts_with(prefix) {
                            cmd.env_remove(k);
                        }
                    }
                }
                None => {
                    cmd.env_remove(name);
                }
            }
        }
        cmd.envs(spawn.env.iter().map(|(k, v)| (k, v)));
        if let Some(ns) = &spawn.netns {
            in_netns(&mut cmd, ns).with_context(|| format!("open network namespace {ns}"))?;
        }
        cmd.stdin(Stdio::null()).stdout(out).stderr(err);
        Ok(Proc {
            child: ChildGuard::spawn(cmd, &spawn.name)?,
            log: spawn.log.clone(),
        })
    }

    /// The process id (also after it exited).
    pub fn pid(&self) -> u32 {
        self.child.pid()
    }

    /// `Some(status)` once it has exited on its own (or was killed).
    pub fn exited(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// `kill -9`: no chance to clean up. Waits for the exit; its status.
    pub fn kill9(&mut self) -> Option<ExitStatus> {
        self.child.kill()
    }

    /// SIGTERM, then waits (at most `timeout`) for the exit; SIGKILL after
    /// that. The exit status.
    pub fn terminate(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let _ = self.child.signal(libc::SIGTERM);
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.exited() {
                return Some(status);
            }
            if Instant::now() > deadline {
                return self.kill9();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The log file (stdout, and stderr unless it had its own).
    pub fn log_path(&self) -> &Path {
        &self.log
    }

    /// The whole log (empty when unreadable).
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The log's last `lines` lines, for reports.
    pub fn log_tail(&self, lines: usize) -> String {
        file_tail(&self.log, lines)
    }
}
