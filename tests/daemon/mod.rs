//! A damselfly daemon run as a real process, for integration tests and
//! benches: its own store, config and free ports on 127.0.0.1.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// The binary under test, built once by cargo for every test target.
pub fn binary() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_damselfly"))
}

fn free_addr() -> SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    l.local_addr().expect("local addr")
}

pub struct Daemon {
    child: Option<Child>,
    pub dir: tempfile::TempDir,
    pub mirror: SocketAddr,
    pub telemetry: SocketAddr,
    pub config_path: PathBuf,
    pub log_path: PathBuf,
    env: Vec<(String, String)>,
    env_remove: Vec<String>,
}

/// Extra config lines: `mirror` and `store` go into those sections,
/// `extra` after them (`[[registry]]` tables, `[origin]`).
#[derive(Default)]
pub struct Options {
    pub mirror: String,
    pub store: String,
    pub extra: String,
    /// Set in the daemon's environment, on top of the test's own
    /// (`RUST_LOG` is always removed).
    pub env: Vec<(String, String)>,
    /// Removed from the daemon's environment before `env` is applied; a name
    /// ending in `*` removes every variable with that prefix (`AWS_*`).
    pub env_remove: Vec<String>,
}

impl Daemon {
    /// Starts a daemon with `extra` after the generated sections.
    pub fn start(extra: &str) -> Daemon {
        Daemon::start_with(Options {
            extra: extra.to_owned(),
            ..Options::default()
        })
    }

    pub fn start_with(opts: Options) -> Daemon {
        let mut d = Daemon::configure(opts);
        d.spawn();
        d
    }

    /// Starts a daemon that should refuse to start: waits (20 s at most)
    /// for the process to exit and returns its exit status and its whole
    /// log (stdout and stderr). Panics if it becomes ready instead.
    pub fn start_expecting_exit(opts: Options) -> (ExitStatus, String) {
        let mut d = Daemon::configure(opts);
        d.spawn_child();
        let deadline = Instant::now() + Duration::from_secs(20);
        let ready = format!("http://{}/readyz", d.telemetry);
        loop {
            if let Some(status) = d.child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                d.child = None;
                return (status, d.log());
            }
            if plain_http::blocking_get(&ready).ok() == Some(200) {
                panic!(
                    "damselfly became ready, expected it to exit:\n{}",
                    d.log_tail(40)
                );
            }
            if Instant::now() > deadline {
                panic!(
                    "damselfly neither exited nor became ready in 20 s:\n{}",
                    d.log_tail(40)
                );
            }
            std::thread::sleep(Duration::from_millis(25));
        }
    }

    /// Writes the config; no process yet.
    fn configure(opts: Options) -> Daemon {
        let dir = tempfile::tempdir().expect("tempdir");
        let mirror = free_addr();
        let telemetry = free_addr();
        let config_path = dir.path().join("damselfly.toml");
        let store = dir.path().join("store");
        let text = format!(
            "[mirror]\nlisten = \"{mirror}\"\ndrain_timeout = \"2s\"\n{}\n\
             [store]\ndir = \"{}\"\n{}\n\
             [telemetry]\nlisten = \"{telemetry}\"\nlog_level = \"info,damselfly=debug\"\n\
             {}\n",
            opts.mirror,
            store.display(),
            opts.store,
            opts.extra
        );
        std::fs::write(&config_path, text).expect("write config");
        let log_path = dir.path().join("daemon.log");
        Daemon {
            child: None,
            dir,
            mirror,
            telemetry,
            config_path,
            log_path,
            env: opts.env,
            env_remove: opts.env_remove,
        }
    }

    fn spawn(&mut self) {
        self.spawn_child();
        self.wait_ready();
    }

    fn spawn_child(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log_path)
            .expect("open daemon log");
        let mut cmd = Command::new(binary());
        cmd.env_remove("RUST_LOG");
        for name in &self.env_remove {
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
        cmd.envs(self.env.iter().map(|(k, v)| (k, v)));
        let child = cmd
            .arg("daemon")
            .arg("--config")
            .arg(&self.config_path)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("clone log"))
            .stderr(log)
            .spawn()
            .expect("spawn damselfly");
        self.child = Some(child);
    }

    fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        let url = format!("http://{}/readyz", self.telemetry);
        loop {
            if let Ok(r) = plain_http::blocking_get(&url) {
                if r == 200 {
                    return;
                }
            }
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                panic!(
                    "damselfly exited with {status} before it was ready:\n{}",
                    self.log_tail(40)
                );
            }
            if Instant::now() > deadline {
                panic!("damselfly not ready after 20 s:\n{}", self.log_tail(40));
            }
            std::thread::sleep(Duration::from_millis(25));
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.mirror)
    }

    pub fn store_dir(&self) -> PathBuf {
        self.dir.path().join("store")
    }

    pub fn blob_path(&self, digest: &str) -> PathBuf {
        let hex = digest.trim_start_matches("sha256:");
        self.store_dir().join("blobs/sha256").join(hex)
    }

    pub fn partial_path(&self, digest: &str) -> PathBuf {
        let hex = digest.trim_start_matches("sha256:");
        self.store_dir().join("tmp").join(format!("{hex}.partial"))
    }

    pub fn log_tail(&self, lines: usize) -> String {
        let text = std::fs::read_to_string(&self.log_path).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// The Prometheus exposition text.
    pub fn metrics(&self) -> String {
        plain_http::blocking_text(&format!("http://{}/metrics", self.telemetry)).unwrap_or_default()
    }

    /// The value of one sample, e.g. `damselfly_bytes_served_total{source="local"}`;
    /// 0 when absent.
    pub fn metric(&self, sample: &str) -> f64 {
        self.metrics()
            .lines()
            .find_map(|l| {
                let (name, value) = l.rsplit_once(' ')?;
                (name == sample).then(|| value.parse().ok())?
            })
            .unwrap_or(0.0)
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(|c| c.id()).unwrap_or(0)
    }

    /// `kill -9`: no chance to clean up.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM, then waits for the exit.
    pub fn terminate(&mut self) -> Option<ExitStatus> {
        let mut c = self.child.take()?;
        let _ = Command::new("kill")
            .args(["-TERM", &c.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            if let Ok(Some(s)) = c.try_wait() {
                return Some(s);
            }
            if Instant::now() > deadline {
                let _ = c.kill();
                return c.wait().ok();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Starts the process again on the same config and store.
    pub fn restart(&mut self) {
        self.kill9();
        self.spawn();
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// Minimal blocking HTTP helpers that need no runtime, so `Daemon` works
/// from sync and async tests alike.
mod plain_http {
    use std::io::{Read, Write};
    use std::net::TcpStream;
    use std::time::Duration;

    fn get(url: &str) -> std::io::Result<(u16, String)> {
        let rest = url.strip_prefix("http://").unwrap_or(url);
        let (host, path) = rest
            .split_once('/')
            .map_or((rest, "/".to_string()), |(h, p)| (h, format!("/{p}")));
        let mut s = TcpStream::connect(host)?;
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        write!(
            s,
            "GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
        )?;
        let mut buf = String::new();
        s.read_to_string(&mut buf)?;
        let status = buf
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .unwrap_or(0);
        let body = buf
            .split_once("\r\n\r\n")
            .map(|(_, b)| b.to_string())
            .unwrap_or_default();
        Ok((status, body))
    }

    pub fn blocking_get(url: &str) -> std::io::Result<u16> {
        get(url).map(|(s, _)| s)
    }

    pub fn blocking_text(url: &str) -> std::io::Result<String> {
        get(url).map(|(_, b)| b)
    }
}
