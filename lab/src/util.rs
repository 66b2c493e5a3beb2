//! Small utilities: temp dirs, ports, HTTP readiness, hashing, running and
//! supervising child processes, and clean-up at process exit.

use std::collections::HashSet;
use std::future::Future;
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{mpsc, Mutex, MutexGuard, Once, OnceLock};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context as _};
use sha2::{Digest as _, Sha256};

/// The programs the lab runs. [`require_tools`] checks that all are on `PATH`.
pub const REQUIRED_TOOLS: &[&str] = &[
    "containerd",
    "ctr",
    "docker-registry",
    "umoci",
    "skopeo",
    "htpasswd",
    "openssl",
];

/// Returns the [`REQUIRED_TOOLS`] that are not on `PATH` (empty when all are).
/// Benches can use it to skip instead of failing.
pub fn missing_tools() -> Vec<&'static str> {
    REQUIRED_TOOLS
        .iter()
        .copied()
        .filter(|tool| find_in_path(tool).is_none())
        .collect()
}

/// Panics with one clear message naming every missing program (and the
/// Debian packages that provide them) unless all [`REQUIRED_TOOLS`] are on
/// `PATH`. Call it first in every lab test.
pub fn require_tools() {
    let missing = missing_tools();
    assert!(
        missing.is_empty(),
        "the test lab needs these programs on PATH, missing: {}. On Debian: \
         apt-get install -y containerd docker-registry umoci skopeo runc busybox-static \
         apache2-utils openssl",
        missing.join(", ")
    );
}

/// The full path of `program` if an executable file of that name is on `PATH`.
pub fn find_in_path(program: &str) -> Option<PathBuf> {
    use std::os::unix::fs::PermissionsExt as _;
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(program))
        .find(|candidate| {
            candidate
                .metadata()
                .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
                .unwrap_or(false)
        })
}

/// A `Command` for `program` without proxy variables in its environment,
/// so children talk to 127.0.0.1 directly.
pub fn command(program: &str) -> Command {
    let mut cmd = Command::new(program);
    for var in [
        "http_proxy",
        "https_proxy",
        "all_proxy",
        "HTTP_PROXY",
        "HTTPS_PROXY",
        "ALL_PROXY",
    ] {
        cmd.env_remove(var);
    }
    cmd
}

/// Whether the test process runs as root (containerd needs it).
pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// Makes `cmd` run in network namespace `ns` (`/run/netns/<ns>`, as
/// `ip netns add` makes it): the child calls setns(2) before exec. The
/// namespace file stays open for as long as `cmd` exists.
pub fn in_netns(cmd: &mut Command, ns: &str) -> io::Result<()> {
    use std::os::fd::AsRawFd as _;
    let file = std::fs::File::open(format!("/run/netns/{ns}"))?;
    // SAFETY: setns(2) is async-signal-safe; the fd is owned by the closure.
    unsafe {
        cmd.pre_exec(move || {
            if libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) != 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
    Ok(())
}

/// Asks the kernel for a free TCP port on 127.0.0.1 (binds port 0, reads the
/// port, releases it). Another process may take it before it is used again:
/// callers that cannot bind it themselves retry on "address in use"
/// ([`crate::Registry`] does).
pub fn free_port() -> io::Result<u16> {
    let listener = TcpListener::bind(("127.0.0.1", 0))?;
    Ok(listener.local_addr()?.port())
}

/// Hex SHA-256 of `bytes` (lower case, no `sha256:` prefix).
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// The OCI digest (`sha256:<hex>`) of `bytes`.
pub fn sha256_digest(bytes: &[u8]) -> String {
    format!("sha256:{}", sha256_hex(bytes))
}

/// Polls `url` (plain `http://` only) until any HTTP response arrives, and
/// returns its status code. Errors after `timeout` with the last connection
/// error.
pub fn wait_for_http(url: &str, timeout: Duration) -> anyhow::Result<u16> {
    let parsed = url::Url::parse(url).with_context(|| format!("bad URL {url:?}"))?;
    if parsed.scheme() != "http" {
        bail!("wait_for_http supports only http:// URLs, got {url}");
    }
    let host = parsed
        .host_str()
        .ok_or_else(|| anyhow!("URL {url} has no host"))?;
    let port = parsed.port_or_known_default().unwrap_or(80);
    let mut path = parsed.path().to_string();
    if let Some(q) = parsed.query() {
        path.push('?');
        path.push_str(q);
    }
    let deadline = Instant::now() + timeout;
    loop {
        match raw_http_request(
            &format!("{host}:{port}"),
            "GET",
            &path,
            Duration::from_secs(2),
        ) {
            Ok((status, _)) => return Ok(status),
            Err(e) if Instant::now() >= deadline => {
                return Err(anyhow!(e).context(format!("{url} did not answer within {timeout:?}")))
            }
            Err(_) => std::thread::sleep(Duration::from_millis(25)),
        }
    }
}

/// One HTTP/1.1 request over a fresh connection with `Connection: close`,
/// using only the standard library (usable from any thread, sync or async
/// test). Returns the status code and the response headers; the body is read
/// and discarded.
pub fn raw_http_request(
    authority: &str,
    method: &str,
    path_and_query: &str,
    timeout: Duration,
) -> io::Result<(u16, Vec<(String, String)>)> {
    let addr: SocketAddr = authority
        .to_socket_addrs()?
        .next()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "no address"))?;
    let mut stream = TcpStream::connect_timeout(&addr, timeout)?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    write!(
        stream,
        "{method} {path_and_query} HTTP/1.1\r\nHost: {authority}\r\nConnection: close\r\nUser-Agent: damselfly-lab\r\n\r\n"
    )?;
    let mut response = Vec::new();
    stream.read_to_end(&mut response)?;
    let head_end = response
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .unwrap_or(response.len());
    let head = String::from_utf8_lossy(&response[..head_end]);
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .and_then(|line| line.split_whitespace().nth(1))
        .and_then(|code| code.parse::<u16>().ok())
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "no HTTP status line"))?;
    let headers = lines
        .filter_map(|line| line.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    Ok((status, headers))
}

/// Runs `fut` to completion on a fresh current-thread tokio runtime on a
/// scoped thread of its own, so sync helpers can use async clients from both
/// plain `#[test]`s and `#[tokio::test]`s (where a nested `block_on` would
/// panic). The calling thread blocks until it is done.
pub fn block_on<F>(fut: F) -> F::Output
where
    F: Future + Send,
    F::Output: Send,
{
    std::thread::scope(|scope| {
        let worker = scope.spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("lab: cannot build a tokio runtime");
            runtime.block_on(fut)
        });
        match worker.join() {
            Ok(output) => output,
            Err(panic) => std::panic::resume_unwind(panic),
        }
    })
}

/// Last `lines` lines of a (log) file, for error messages; never fails.
pub fn log_tail(path: &Path, lines: usize) -> String {
    match std::fs::read(path) {
        Ok(bytes) => {
            let text = String::from_utf8_lossy(&bytes);
            let all: Vec<&str> = text.lines().collect();
            let start = all.len().saturating_sub(lines);
            format!(
                "--- last {} lines of {} ---\n{}",
                all.len() - start,
                path.display(),
                all[start..].join("\n")
            )
        }
        Err(e) => format!("--- cannot read {}: {e} ---", path.display()),
    }
}

// ---------------------------------------------------------------------------
// Temp dirs

/// A temp dir with a short path (under `/tmp` unless `DAMSELFLY_LAB_TMP` names
/// another base), removed on drop, and removed at process exit even when the
/// owner lives in a `static`. Short matters: unix socket paths are limited to
/// 108 bytes. With `DAMSELFLY_LAB_KEEP=1` set, the dir is kept and its path
/// printed.
#[derive(Debug)]
pub struct TestDir {
    dir: Option<tempfile::TempDir>,
    path: PathBuf,
}

impl TestDir {
    /// Creates `<base>/dl-<prefix>-XXXXXX`; the prefix is cut to 8
    /// characters of `[A-Za-z0-9-]`.
    pub fn new(prefix: &str) -> io::Result<TestDir> {
        let base = match std::env::var_os("DAMSELFLY_LAB_TMP") {
            Some(base) => PathBuf::from(base),
            None if Path::new("/tmp").is_dir() => PathBuf::from("/tmp"),
            None => std::env::temp_dir(),
        };
        let prefix: String = prefix
            .chars()
            .filter(|c| c.is_ascii_alphanumeric() || *c == '-')
            .take(8)
            .collect();
        let dir = tempfile::Builder::new()
            .prefix(&format!("dl-{prefix}-"))
            .tempdir_in(&base)?;
        let path = dir.path().to_path_buf();
        if keep_dirs() {
            eprintln!("lab: keeping {}", path.display());
            // Leaves the directory on disk; the TempDir no longer owns it.
            let _ = dir.keep();
            return Ok(TestDir { dir: None, path });
        }
        remove_at_exit(&path);
        Ok(TestDir {
            dir: Some(dir),
            path,
        })
    }

    /// The directory's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// `self.path().join(rel)`.
    pub fn join(&self, rel: impl AsRef<Path>) -> PathBuf {
        self.path.join(rel)
    }
}

impl Drop for TestDir {
    fn drop(&mut self) {
        if self.dir.is_some() {
            forget_at_exit(&self.path);
        }
        // Dropping the TempDir removes the tree (errors ignored).
        self.dir.take();
    }
}

/// Whether `DAMSELFLY_LAB_KEEP` asks to keep every temp dir.
pub(crate) fn keep_dirs() -> bool {
    std::env::var_os("DAMSELFLY_LAB_KEEP").is_some_and(|v| !v.is_empty() && v != "0")
}

// ---------------------------------------------------------------------------
// Child processes

/// What must be cleaned up if the process exits with lab objects still alive
/// (typically in a `static`, which is never dropped).
#[derive(Default)]
struct Cleanup {
    pids: HashSet<libc::pid_t>,
    dirs: HashSet<PathBuf>,
}

fn cleanup_mutex() -> &'static Mutex<Cleanup> {
    static CLEANUP: OnceLock<Mutex<Cleanup>> = OnceLock::new();
    CLEANUP.get_or_init(Default::default)
}

fn cleanup_registry() -> MutexGuard<'static, Cleanup> {
    cleanup_mutex()
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Removes `dir` at process exit if it still exists then (a component in a
/// `static` is never dropped); [`forget_at_exit`] undoes it.
pub(crate) fn remove_at_exit(dir: &Path) {
    cleanup_registry().dirs.insert(dir.to_path_buf());
    install_exit_hook();
}

/// Takes `dir` off the list of [`remove_at_exit`].
pub(crate) fn forget_at_exit(dir: &Path) {
    cleanup_registry().dirs.remove(dir);
}

fn install_exit_hook() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // SAFETY: registering a plain `extern "C" fn()` with atexit(3).
        unsafe {
            libc::atexit(cleanup_at_exit);
        }
    });
}

extern "C" fn cleanup_at_exit() {
    // Never block at exit: if another thread holds the lock, skip (the
    // children still get PR_SET_PDEATHSIG).
    let mut cleanup = match cleanup_mutex().try_lock() {
        Ok(guard) => guard,
        Err(std::sync::TryLockError::Poisoned(poisoned)) => poisoned.into_inner(),
        Err(std::sync::TryLockError::WouldBlock) => return,
    };
    for pid in cleanup.pids.drain() {
        // SAFETY: plain syscalls on a pid that is our own child.
        unsafe {
            libc::kill(pid, libc::SIGKILL);
            libc::waitpid(pid, std::ptr::null_mut(), 0);
        }
    }
    for dir in cleanup.dirs.drain() {
        let _ = std::fs::remove_dir_all(dir);
    }
}

type SpawnRequest = (Command, mpsc::Sender<io::Result<Child>>);

/// Spawns every lab child from one long-lived thread. `PR_SET_PDEATHSIG`
/// fires when the *thread* that forked the child exits, and test threads
/// exit after each test; this thread lives as long as the process.
fn spawner() -> &'static mpsc::Sender<SpawnRequest> {
    static SPAWNER: OnceLock<mpsc::Sender<SpawnRequest>> = OnceLock::new();
    SPAWNER.get_or_init(|| {
        let (tx, rx) = mpsc::channel::<SpawnRequest>();
        std::thread::Builder::new()
            .name("lab-spawner".into())
            .spawn(move || {
                for (mut cmd, reply) in rx {
                    let _ = reply.send(cmd.spawn());
                }
            })
            .expect("lab: cannot start the spawner thread");
        tx
    })
}

/// Spawns `cmd` so that it gets SIGKILL when the test process dies, and
/// records it for the exit hook.
fn spawn_supervised(mut cmd: Command) -> io::Result<Child> {
    let parent = std::process::id() as libc::pid_t;
    // SAFETY: the closure only makes async-signal-safe syscalls.
    unsafe {
        cmd.pre_exec(move || {
            if libc::prctl(
                libc::PR_SET_PDEATHSIG,
                libc::SIGKILL as libc::c_ulong,
                0,
                0,
                0,
            ) != 0
            {
                return Err(io::Error::last_os_error());
            }
            if libc::getppid() != parent {
                return Err(io::Error::other("the test process exited before exec"));
            }
            Ok(())
        });
    }
    let (reply_tx, reply_rx) = mpsc::channel();
    spawner()
        .send((cmd, reply_tx))
        .map_err(|_| io::Error::other("lab spawner thread is gone"))?;
    let child = reply_rx
        .recv()
        .map_err(|_| io::Error::other("lab spawner thread is gone"))??;
    cleanup_registry().pids.insert(child.id() as libc::pid_t);
    install_exit_hook();
    Ok(child)
}

/// A child process that is SIGKILLed (and reaped) on drop.
#[derive(Debug)]
pub struct ChildGuard {
    child: Child,
    name: String,
    reaped: bool,
}

impl ChildGuard {
    /// Spawns `cmd` (with PDEATHSIG). `name` is used in messages.
    pub fn spawn(cmd: Command, name: &str) -> anyhow::Result<ChildGuard> {
        let program = format!("{:?}", cmd.get_program());
        let child =
            spawn_supervised(cmd).with_context(|| format!("cannot start {name} ({program})"))?;
        Ok(ChildGuard {
            child,
            name: name.to_string(),
            reaped: false,
        })
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// `Some(status)` once the process has exited.
    pub fn try_wait(&mut self) -> io::Result<Option<ExitStatus>> {
        let status = self.child.try_wait()?;
        if status.is_some() {
            self.mark_reaped();
        }
        Ok(status)
    }

    /// Sends `signal` (e.g. `libc::SIGSTOP`, `libc::SIGCONT`, `libc::SIGTERM`).
    pub fn signal(&self, signal: libc::c_int) -> io::Result<()> {
        if self.reaped {
            return Ok(());
        }
        // SAFETY: kill(2) on our own, not yet reaped child.
        if unsafe { libc::kill(self.child.id() as libc::pid_t, signal) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// SIGSTOPs the process and waits (at most 5 s) until all its threads
    /// are stopped; the signal alone takes effect asynchronously.
    pub fn stop_process(&self) -> io::Result<()> {
        self.signal(libc::SIGSTOP)?;
        self.wait_for_threads(true)
    }

    /// SIGCONTs the process and waits (at most 5 s) until no thread is
    /// stopped.
    pub fn continue_process(&self) -> io::Result<()> {
        self.signal(libc::SIGCONT)?;
        self.wait_for_threads(false)
    }

    fn wait_for_threads(&self, stopped: bool) -> io::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(5);
        let tasks = PathBuf::from(format!("/proc/{}/task", self.child.id()));
        loop {
            let mut all = true;
            for entry in std::fs::read_dir(&tasks)? {
                let stat = std::fs::read_to_string(entry?.path().join("stat")).unwrap_or_default();
                // The state is the field after the parenthesised command.
                let state = stat
                    .rsplit_once(") ")
                    .and_then(|(_, rest)| rest.chars().next());
                let is_stopped = matches!(state, Some('T') | Some('t'));
                all &= is_stopped == stopped;
            }
            if all {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!(
                        "{} did not become {}",
                        self.name,
                        if stopped { "stopped" } else { "running" }
                    ),
                ));
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    /// SIGKILLs the process and waits for it; its exit status (`None` when
    /// it cannot be read).
    pub fn kill(&mut self) -> Option<ExitStatus> {
        if self.reaped {
            return self.child.try_wait().ok().flatten();
        }
        let _ = self.child.kill();
        let status = self.child.wait().ok();
        self.mark_reaped();
        status
    }

    fn mark_reaped(&mut self) {
        if !self.reaped {
            self.reaped = true;
            cleanup_registry()
                .pids
                .remove(&(self.child.id() as libc::pid_t));
        }
    }

    /// The name given at spawn.
    pub fn name(&self) -> &str {
        &self.name
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The result of [`run_command`]: exit status, captured output, time taken.
#[derive(Debug, Clone)]
pub struct CmdOutput {
    /// The command line, for messages.
    pub command: String,
    /// Exit status; `None` when it was killed for running past the timeout.
    pub status: Option<ExitStatus>,
    /// Captured stdout (lossy UTF-8).
    pub stdout: String,
    /// Captured stderr (lossy UTF-8).
    pub stderr: String,
    /// Wall time from spawn to exit.
    pub elapsed: Duration,
    /// Whether it was killed for running past the timeout.
    pub timed_out: bool,
}

impl CmdOutput {
    /// Exit status 0.
    pub fn success(&self) -> bool {
        self.status.is_some_and(|s| s.success())
    }

    /// `Ok(self)` on success, otherwise an error carrying the command line,
    /// status and both outputs.
    pub fn check(self) -> anyhow::Result<CmdOutput> {
        if self.success() {
            Ok(self)
        } else {
            Err(anyhow!("{}", self.describe()))
        }
    }

    /// A multi-line description for assertion messages.
    pub fn describe(&self) -> String {
        let status = match (&self.status, self.timed_out) {
            (_, true) => format!("killed after timeout ({:?})", self.elapsed),
            (Some(s), false) => s.to_string(),
            (None, false) => "unknown status".to_string(),
        };
        format!(
            "command `{}` {status} in {:?}\n--- stdout ---\n{}\n--- stderr ---\n{}",
            self.command,
            self.elapsed,
            self.stdout.trim_end(),
            self.stderr.trim_end()
        )
    }
}

/// Runs `cmd` to completion with stdout and stderr captured, killing it after
/// `timeout`. `Err` only when it cannot be started; a non-zero exit or a
/// timeout is reported in the [`CmdOutput`].
pub fn run_command(mut cmd: Command, timeout: Duration) -> anyhow::Result<CmdOutput> {
    let command = format_command(&cmd);
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let start = Instant::now();
    let mut guard = ChildGuard::spawn(cmd, &command)?;
    let stdout = guard.child.stdout.take().map(read_in_thread);
    let stderr = guard.child.stderr.take().map(read_in_thread);
    let mut timed_out = false;
    let status = loop {
        match guard.try_wait() {
            Ok(Some(status)) => break Some(status),
            Ok(None) if start.elapsed() >= timeout => {
                timed_out = true;
                guard.kill();
                break None;
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(5)),
            Err(e) => return Err(anyhow!(e).context(format!("waiting for `{command}`"))),
        }
    };
    let elapsed = start.elapsed();
    let collect = |h: Option<std::thread::JoinHandle<Vec<u8>>>| {
        h.and_then(|h| h.join().ok())
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    };
    Ok(CmdOutput {
        command,
        status,
        stdout: collect(stdout),
        stderr: collect(stderr),
        elapsed,
        timed_out,
    })
}

fn read_in_thread(mut pipe: impl Read + Send + 'static) -> std::thread::JoinHandle<Vec<u8>> {
    std::thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = pipe.read_to_end(&mut buf);
        buf
    })
}

/// `program arg1 arg2 ...` for messages.
pub fn format_command(cmd: &Command) -> String {
    std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(|s| s.to_string_lossy().into_owned())
        .collect::<Vec<_>>()
        .join(" ")
}

/// A plain HTTP/1.1 GET of `path` from `addr` (`ip:port`), blocking and
/// without a runtime, from whatever network namespace the calling thread is
/// in: the status and the body. For tiny answers (`/readyz`, `/metrics`).
pub fn http_get(addr: &str, path: &str) -> std::io::Result<(u16, String)> {
    http_request(addr, "GET", path, "")
}

/// [`http_get`] with any method and a body (a pushgateway `PUT`).
pub fn http_request(
    addr: &str,
    method: &str,
    path: &str,
    body: &str,
) -> std::io::Result<(u16, String)> {
    use std::io::{Read, Write};
    let sock: std::net::SocketAddr = addr
        .parse()
        .map_err(|_| std::io::Error::other(format!("bad address {addr}")))?;
    let mut s = std::net::TcpStream::connect_timeout(&sock, Duration::from_secs(2))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
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

/// The UTC time of day, `HH:MM:SS.mmmZ`, to line up a test's notes with the
/// daemons' logs ([`crate::note!`]).
pub fn clock() -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    let s = now.as_secs() % 86_400;
    format!(
        "{:02}:{:02}:{:02}.{:03}Z",
        s / 3600,
        s / 60 % 60,
        s % 60,
        now.subsec_millis()
    )
}
