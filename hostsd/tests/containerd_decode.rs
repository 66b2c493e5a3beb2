//! Real containerd 1.6 (Debian) decodes every file hostsd writes, tries the
//! mirror first, and honours the config hostsd patched.
//!
//! Each test starts its own `containerd --config` with a private root, state
//! and socket under a short /tmp directory. The mirror and a "corporate
//! cache" are local listeners that record requests and answer 404; origins
//! are closed 127.0.0.1 ports. So every pull fails, and what the listeners saw
//! is the order in which containerd tried the hosts.
//!
//! Needs root and the `containerd` and `ctr` binaries; skipped otherwise,
//! unless HOSTSD_REQUIRE_CONTAINERD=1 makes that a failure.

mod support;

use std::fs;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use damselfly_lab::cri_pull;
use hostsd::{check, reconcile, remove, Action, ReconcileOptions, RegistrySpec};
use support::{Response, Server};

fn available() -> bool {
    let have = |bin: &str| {
        Command::new(bin)
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success())
    };
    let root = Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0");
    let ok = have("containerd") && have("ctr") && root;
    if !ok {
        assert!(
            std::env::var("HOSTSD_REQUIRE_CONTAINERD").as_deref() != Ok("1"),
            "containerd and ctr (and root) are required: apt-get install -y containerd"
        );
        eprintln!("SKIPPED: needs root and containerd/ctr on PATH (apt-get install -y containerd)");
    }
    ok
}

/// A containerd daemon that is killed (by its pid) when dropped.
struct Containerd {
    child: Child,
    sock: PathBuf,
    log: PathBuf,
}

impl Containerd {
    fn start(dir: &Path, config: &Path) -> Containerd {
        let log = dir.join("containerd.log");
        let child = Command::new("containerd")
            .arg("--config")
            .arg(config)
            .stdout(Stdio::null())
            .stderr(fs::File::create(&log).unwrap())
            .spawn()
            .expect("start containerd");
        let c = Containerd {
            child,
            sock: dir.join("c.sock"),
            log,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        while !c.ctr(&["version"]).status.success() {
            assert!(
                Instant::now() < deadline,
                "containerd did not start:\n{}",
                c.log_tail()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        c
    }

    fn ctr(&self, args: &[&str]) -> Output {
        run_with_timeout(
            Command::new("ctr").arg("-a").arg(&self.sock).args(args),
            Duration::from_secs(30),
        )
    }

    /// The status column of the CRI plugin in `ctr plugins ls`.
    fn cri_status(&self) -> String {
        let out = self.ctr(&["plugins", "ls"]);
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        text.lines()
            .find(|l| {
                let cols: Vec<&str> = l.split_whitespace().collect();
                cols.first() == Some(&"io.containerd.grpc.v1") && cols.get(1) == Some(&"cri")
            })
            .and_then(|l| l.split_whitespace().last().map(str::to_string))
            .unwrap_or_else(|| format!("<no cri line in>\n{text}"))
    }

    fn log_tail(&self) -> String {
        let text = fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn run_with_timeout(cmd: &mut Command, limit: Duration) -> Output {
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    let deadline = Instant::now() + limit;
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("{cmd:?} ran longer than {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().unwrap()
}

/// A 127.0.0.1 port with nothing listening: connections are refused.
fn closed_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn base_config(dir: &Path, extra: &str) -> String {
    format!(
        r#"version = 2
root = "{d}/root"
state = "{d}/state"

[grpc]
  address = "{d}/c.sock"

[debug]
  level = "debug"

[plugins."io.containerd.grpc.v1.cri"]
  # No fixed port: several test daemons may run at once.
  stream_server_port = "0"
{extra}"#,
        d = dir.display()
    )
}

fn short_tempdir() -> tempfile::TempDir {
    // Unix socket paths must stay under 108 bytes.
    tempfile::Builder::new()
        .prefix("hd")
        .tempdir_in("/tmp")
        .unwrap()
}

/// `ns=` as containerd sends it: the registry, URL-encoded.
fn ns(registry: &str) -> String {
    format!("ns={}", registry.replace(':', "%3A"))
}

#[test]
fn containerd_decodes_every_file_hostsd_writes_and_tries_the_mirror_first() {
    if !available() {
        return;
    }
    let tmp = short_tempdir();
    let dir = tmp.path();
    let certs = dir.join("certs.d");
    let config = dir.join("config.toml");
    // No config_path yet: hostsd adds it, and containerd must load the result.
    fs::write(&config, base_config(dir, "")).unwrap();

    let mirror = Server::start(|_| Response::new(404, ""));
    let corp = Server::start(|_| Response::new(404, ""));
    let trap_target = Server::start(|_| Response::new(404, ""));
    let own = format!("127.0.0.1:{}", closed_port());
    let via_default = format!("127.0.0.1:{}", closed_port());
    let foreign = format!("127.0.0.1:{}", closed_port());
    let trapped = format!("127.0.0.1:{}", closed_port());

    // A hand-written file hostsd must keep: corporate cache with headers.
    fs::create_dir_all(certs.join(&foreign)).unwrap();
    let foreign_text = format!(
        "# hand-written\nserver = \"http://{foreign}\"\n\n[host.\"{}\"]\n  capabilities = [\"pull\", \"resolve\"]\n  skip_verify = true\n  [host.\"{}\".header]\n    x-corp = \"yes\"\n",
        corp.url(),
        corp.url()
    );
    fs::write(certs.join(&foreign).join("hosts.toml"), &foreign_text).unwrap();
    // The trap, not hostsd's: `server` with no [host] table.
    fs::create_dir_all(certs.join(&trapped)).unwrap();
    fs::write(
        certs.join(&trapped).join("hosts.toml"),
        format!("server = \"{}\"\n", trap_target.url()),
    )
    .unwrap();

    let opts = ReconcileOptions {
        containerd_config: config.clone(),
        certs_dir: Some(certs.clone()),
        mirror: mirror.url(),
        patch_config: true,
        registries: vec![
            RegistrySpec::with_server(&own, format!("http://{own}")),
            RegistrySpec::with_server(&foreign, format!("http://{foreign}")),
            RegistrySpec::new("_default"),
        ],
        ..Default::default()
    };
    let report = reconcile(&opts).unwrap();
    assert!(report.restart_required, "{report}");
    let actions: Vec<Action> = report.files.iter().map(|f| f.action).collect();
    assert_eq!(
        actions,
        [Action::Created, Action::TookOver, Action::Created],
        "{report}"
    );

    let cd = Containerd::start(dir, &config);
    assert_eq!(
        cd.cri_status(),
        "ok",
        "CRI plugin with hostsd's config_path:\n{}",
        cd.log_tail()
    );

    let pull = |registry: &str| {
        let out = cd.ctr(&[
            "--debug",
            "images",
            "pull",
            "--hosts-dir",
            certs.to_str().unwrap(),
            &format!("{registry}/test/img:v1"),
        ]);
        assert!(
            !out.status.success(),
            "the pull cannot succeed: every host is a 404 or closed"
        );
        let log = String::from_utf8_lossy(&out.stderr).into_owned();
        if std::env::var_os("HOSTSD_TEST_VERBOSE").is_some() {
            eprintln!("--- ctr pull {registry}:\n{log}");
        }
        log
    };

    // 1. A file hostsd created: the mirror is tried, with ns=<registry>.
    let log = pull(&own);
    let seen = mirror.requests();
    assert!(
        seen.iter()
            .any(|r| r.target.starts_with("/v2/test/img/manifests/v1")
                && r.target.contains(&ns(&own))),
        "mirror saw {seen:?}\nctr:\n{log}"
    );

    // 2. A registry with no directory of its own goes through _default.
    let log = pull(&via_default);
    assert!(
        mirror
            .requests()
            .iter()
            .any(|r| r.target.contains(&ns(&via_default))),
        "mirror saw {:?}\nctr:\n{log}",
        mirror.requests()
    );

    // 3. A foreign file taken over: mirror first, then the corporate cache
    //    with its header, then the (closed) server.
    let log = pull(&foreign);
    let m = mirror
        .requests()
        .into_iter()
        .find(|r| r.target.contains(&ns(&foreign)))
        .unwrap_or_else(|| panic!("mirror not tried for {foreign}\nctr:\n{log}"));
    let c = corp
        .requests()
        .into_iter()
        .find(|r| r.target.starts_with("/v2/test/img/manifests/v1"))
        .unwrap_or_else(|| panic!("corporate cache not tried\nctr:\n{log}"));
    assert!(
        m.at < c.at,
        "the mirror must come before the original hosts"
    );
    assert_eq!(
        c.header("x-corp"),
        Some("yes"),
        "the original's header is kept"
    );

    // 4. The trap: containerd ignores the file, so neither the server it
    //    names nor the mirror (_default is hidden by the directory) is tried.
    let log = pull(&trapped);
    assert!(
        trap_target.connections.lock().unwrap().is_empty(),
        "ctr:\n{log}"
    );
    assert!(!mirror
        .requests()
        .iter()
        .any(|r| r.target.contains(&ns(&trapped))));
    assert!(
        log.contains("failed to decode hosts.toml") || log.contains("invalid `host` tree"),
        "containerd should log the decode failure:\n{log}"
    );

    // 5. The path the kubelet takes: a CRI PullImage served by the daemon,
    //    which reads hosts.toml through the config_path hostsd patched in.
    for registry in [&own, &via_default] {
        let image = format!("{registry}/test/cri:v1");
        let t = Instant::now();
        let err = cri_pull(&cd.sock, &image).expect_err("the CRI pull cannot succeed");
        if std::env::var_os("HOSTSD_TEST_VERBOSE").is_some() {
            eprintln!("--- CRI PullImage {image} ({:?}): {err}", t.elapsed());
        }
        assert!(
            mirror
                .requests()
                .iter()
                .any(|r| r.target.starts_with("/v2/test/cri/manifests/v1")
                    && r.target.contains(&ns(registry))),
            "CRI pull of {image} did not reach the mirror ({err}); mirror saw {:?}\n{}",
            mirror.requests(),
            cd.log_tail()
        );
    }

    // hostsd check agrees with what containerd did.
    let mut check_opts = opts.clone();
    check_opts.registries.push(RegistrySpec::new(&via_default));
    check_opts.registries.push(RegistrySpec::new(&trapped));
    let r = check(&check_opts).unwrap();
    let routed: Vec<(String, bool)> = r
        .registries
        .iter()
        .map(|x| (x.registry.clone(), x.routed()))
        .collect();
    assert_eq!(
        routed,
        [
            (own.clone(), true),
            (foreign.clone(), true),
            ("_default".to_string(), true),
            (via_default.clone(), true),
            (trapped.clone(), false),
        ],
        "{r}"
    );
    assert!(r.to_string().contains("invalid `host` tree"), "{r}");

    // Rerunning changes nothing; remove restores the hand-written file.
    let again = reconcile(&ReconcileOptions {
        certs_dir: None,
        ..opts.clone()
    })
    .unwrap();
    assert!(!again.changed(), "{again}");
    remove(&ReconcileOptions {
        restore_config: true,
        ..opts.clone()
    })
    .unwrap();
    assert_eq!(
        fs::read_to_string(certs.join(&foreign).join("hosts.toml")).unwrap(),
        foreign_text
    );
    assert!(!certs.join(&own).exists() && !certs.join("_default").exists());
    assert_eq!(fs::read_to_string(&config).unwrap(), base_config(dir, ""));
}

#[test]
fn inline_mirrors_next_to_config_path_break_cri_as_hostsd_warns() {
    if !available() {
        return;
    }
    let tmp = short_tempdir();
    let dir = tmp.path();
    let config = dir.join("config.toml");
    let registry = format!(
        "[plugins.\"io.containerd.grpc.v1.cri\".registry]\n  config_path = \"{}/certs.d\"\n\
         [plugins.\"io.containerd.grpc.v1.cri\".registry.mirrors.\"docker.io\"]\n  endpoint = [\"http://127.0.0.1:4001\"]\n",
        dir.display()
    );
    fs::write(&config, base_config(dir, &registry)).unwrap();

    let err = reconcile(&ReconcileOptions {
        containerd_config: config.clone(),
        registries: vec![RegistrySpec::new("docker.io")],
        ..Default::default()
    })
    .unwrap_err();
    assert!(err.to_string().contains("`mirrors` cannot be set"), "{err}");

    let cd = Containerd::start(dir, &config);
    assert_eq!(
        cd.cri_status(),
        "error",
        "containerd 1.6 refuses the CRI plugin:\n{}",
        cd.log_tail()
    );
    assert!(
        fs::read_to_string(&cd.log)
            .unwrap()
            .contains("`mirrors` cannot be set when `config_path` is provided"),
        "{}",
        cd.log_tail()
    );
}
