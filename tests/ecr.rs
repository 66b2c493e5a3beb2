//! ECR: the daemon authenticates to the registry with its own token from
//! the node's AWS identity, against real components: `moto_server` (PyPI
//! `moto[server,ecr]`) as the ECR and STS APIs, a `docker-registry` with the
//! htpasswd user `AWS` and the password that moto's token decodes to
//! (`<account>-auth-token`), and a real containerd that pulls through the
//! mirror without any credentials of its own.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use common::util::ChildGuard;
use common::{
    build_image_cached, push_image, write_hosts_toml, Containerd, ImageSpec, LayerSpec,
    PushedImage, Registry, RegistryAuth, TestDir,
};
use daemon::Daemon;
use damselfly_lab as common;
use damselfly_lab::daemon;

/// A `moto_server` on 127.0.0.1. Its account decides the password in the
/// ECR tokens it hands out: `MOTO_ACCOUNT_ID` when set, else the caller's
/// (the default 123456789012, or an assumed role's account).
struct Moto {
    child: Option<ChildGuard>,
    port: u16,
    log: PathBuf,
    _dir: TestDir,
}

impl Moto {
    fn start(account: Option<&str>) -> Moto {
        let dir = TestDir::new("moto").expect("moto temp dir");
        let mut m = Moto {
            child: None,
            port: common::free_port().expect("free port"),
            log: dir.join("moto.log"),
            _dir: dir,
        };
        m.spawn(account);
        m
    }

    /// `python3 -m moto.server`: the interpreter `.ci/run` installed moto
    /// into. (A `moto_server` on PATH may be a pyenv shim for another
    /// Python that lacks moto.) A missing moto fails the test.
    fn command() -> std::process::Command {
        let mut c = common::util::command("python3");
        c.args(["-m", "moto.server"]);
        c
    }

    fn spawn(&mut self, account: Option<&str>) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("moto log");
        let mut cmd = Moto::command();
        cmd.args(["-H", "127.0.0.1", "-p", &self.port.to_string()]);
        match account {
            Some(a) => cmd.env("MOTO_ACCOUNT_ID", a),
            None => cmd.env_remove("MOTO_ACCOUNT_ID"),
        };
        cmd.stdin(std::process::Stdio::null())
            .stdout(log.try_clone().expect("moto log"))
            .stderr(log);
        let mut child = ChildGuard::spawn(cmd, "moto_server").unwrap_or_else(|e| {
            panic!("{e:#}: install moto with `python3 -m pip install 'moto[server,ecr]'`")
        });
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let probe = common::util::raw_http_request(
                &format!("127.0.0.1:{}", self.port),
                "GET",
                "/moto-api/",
                Duration::from_secs(2),
            );
            if matches!(probe, Ok((200, _))) {
                break;
            }
            if let Ok(Some(status)) = child.try_wait() {
                panic!(
                    "moto_server exited ({status}); install it with \
                     `python3 -m pip install 'moto[server,ecr]'`:\n{}",
                    std::fs::read_to_string(&self.log).unwrap_or_default()
                );
            }
            assert!(
                Instant::now() < deadline,
                "moto_server did not answer within 30 s:\n{}",
                std::fs::read_to_string(&self.log).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(25));
        }
        self.child = Some(child);
    }

    /// Starts it again on the same port as account `account`: from then on
    /// its tokens carry that account's password.
    fn restart_as(&mut self, account: &str) {
        if let Some(mut c) = self.child.take() {
            c.kill();
        }
        self.spawn(Some(account));
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// API calls so far (each AWS call is one `POST /` in werkzeug's log;
    /// the lab's own probes are GETs).
    fn api_calls(&self) -> usize {
        std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .filter(|l| l.contains("\"POST / HTTP/1.1\""))
            .count()
    }
}

/// The password in moto's ECR token for `account`.
fn password(account: &str) -> String {
    format!("{account}-auth-token")
}

fn ecr_registry_toml(reg: &Registry, moto: &Moto, extra: &str) -> String {
    format!(
        "[[registry]]\nhost = \"{}\"\nendpoint = \"{}\"\nauth = \"ecr\"\n\
         ecr_region = \"us-east-1\"\necr_endpoint = \"{}\"\n{extra}",
        reg.host(),
        reg.url(),
        moto.url()
    )
}

/// The daemon's environment: none of the test's own AWS settings, no IMDS,
/// no profile files; `aws` adds what the case needs.
fn aws_env(aws: &[(&str, &str)]) -> daemon::Options {
    let mut env: Vec<(String, String)> = vec![
        ("AWS_EC2_METADATA_DISABLED".into(), "true".into()),
        ("AWS_CONFIG_FILE".into(), "/nonexistent/aws/config".into()),
        (
            "AWS_SHARED_CREDENTIALS_FILE".into(),
            "/nonexistent/aws/credentials".into(),
        ),
    ];
    env.extend(aws.iter().map(|(k, v)| (k.to_string(), v.to_string())));
    daemon::Options {
        env,
        env_remove: vec!["AWS_*".into()],
        ..Default::default()
    }
}

const DUMMY_KEYS: &[(&str, &str)] = &[
    ("AWS_ACCESS_KEY_ID", "AKIDDAMSELFLYTEST"),
    ("AWS_SECRET_ACCESS_KEY", "dummy-secret"),
    ("AWS_REGION", "us-east-1"),
];

fn start_daemon(extra: String, aws: &[(&str, &str)]) -> Daemon {
    Daemon::start_with(daemon::Options {
        extra,
        ..aws_env(aws)
    })
}

fn push(reg: &Registry, spec: &ImageSpec, repo: &str, pw: &str) -> PushedImage {
    let layout = build_image_cached(spec).expect("build image");
    push_image(&layout, reg, repo, "v1", Some(("AWS", pw))).expect("push image")
}

/// One more small image, so that a second pull must fetch new blobs.
fn other_spec() -> ImageSpec {
    ImageSpec::new(vec![LayerSpec::Random {
        size: 512 << 10,
        seed: 0xec2,
    }])
}

fn ecr_fetches(d: &Daemon, reason: &str, result: &str) -> u64 {
    d.metric(&format!(
        r#"damselfly_ecr_token_fetches_total{{reason="{reason}",result="{result}"}}"#
    )) as u64
}

/// The issue's main case: containerd has no credentials, the daemon has
/// only (dummy) AWS keys, and the pull goes through with the daemon's own
/// ECR token. Every origin request comes from the daemon.
#[test]
fn containerd_pulls_through_the_mirror_with_the_daemons_ecr_token() {
    common::require_tools();
    let account = "123456789012";
    let moto = Moto::start(Some(account));
    let reg = Registry::start(RegistryAuth::htpasswd("AWS", &password(account))).unwrap();
    let img = push(&reg, &ImageSpec::small(), "ecr/app", &password(account));
    let d = start_daemon(ecr_registry_toml(&reg, &moto, ""), DUMMY_KEYS);
    let hosts = tempfile::tempdir().unwrap();
    write_hosts_toml(hosts.path(), &reg.host(), &d.url()).unwrap();

    let mark = reg.mark();
    let c = Containerd::start().unwrap();
    let started = Instant::now();
    let out = c.pull(&img.reference, hosts.path(), &[]).unwrap();
    let took = started.elapsed();
    assert!(out.success(), "pull failed: {out:?}\n{}", d.log_tail(30));
    eprintln!("cold pull through the mirror with an ECR token: {took:?}");

    let seen = reg.requests_in_repo("ecr/app", mark);
    let blob_gets: Vec<_> = seen
        .iter()
        // 206: the daemon's first GET of a blob asks for a range
        // (origin.parallel_ranges), which covers these small blobs whole.
        .filter(|r| r.is_blob_get() && (200..300).contains(&r.status))
        .collect();
    assert_eq!(blob_gets.len(), img.blob_digests().len(), "{seen:#?}");
    for r in &seen {
        assert!(
            r.user_agent.starts_with("damselfly/"),
            "containerd went to the origin itself: {r:?}"
        );
        assert_ne!(r.status, 401, "the token is sent up front: {r:?}");
    }
    assert_eq!(
        d.metric(r#"damselfly_bytes_served_total{source="origin"}"#) as u64,
        img.total_size
    );
    assert_eq!(ecr_fetches(&d, "initial", "ok"), 1, "{}", d.metrics());
    assert_eq!(
        moto.api_calls(),
        1,
        "one GetAuthorizationToken, then cached"
    );
    let log = d.log();
    let got = log.lines().find(|l| l.contains("got an ECR token"));
    eprintln!("{}", got.unwrap_or_else(|| panic!("no token line:\n{log}")));
}

/// With no AWS credentials at all the daemon logs one clear line, answers
/// `401 UNAUTHORIZED` with the origin's challenge, and does not ask AWS
/// again within the interval. containerd then does what docs/ecr.md says:
/// without credentials it falls back to the registry itself (and fails
/// there, the image being private); with credentials it answers the
/// challenge and the mirror uses them.
#[tokio::test(flavor = "multi_thread")]
async fn without_aws_credentials_the_error_is_clear_and_containerd_falls_back() {
    common::require_tools();
    let account = "123456789012";
    let moto = Moto::start(Some(account));
    let pw = password(account);
    let reg = Registry::start(RegistryAuth::htpasswd("AWS", &pw)).unwrap();
    let img = push(&reg, &ImageSpec::small(), "ecr/nocreds", &pw);
    let d = start_daemon(ecr_registry_toml(&reg, &moto, ""), &[]);

    let url = format!("{}/v2/ecr/nocreds/manifests/v1?ns={}", d.url(), reg.host());
    let started = Instant::now();
    let resp = reqwest::get(&url).await.unwrap();
    let first = started.elapsed();
    assert_eq!(resp.status(), 401, "{}", d.log_tail(20));
    assert_eq!(
        resp.headers()["www-authenticate"],
        "Basic realm=\"damselfly-lab\""
    );
    let body: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(body["errors"][0]["code"], "UNAUTHORIZED", "{body}");
    let message = body["errors"][0]["message"].as_str().unwrap();
    assert!(message.contains("no AWS credentials found"), "{message}");
    for _ in 0..5 {
        assert_eq!(reqwest::get(&url).await.unwrap().status(), 401);
    }
    eprintln!("first answer without credentials: {first:?}");

    let log = d.log();
    let lines: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("no AWS credentials found"))
        .collect();
    assert_eq!(lines.len(), 1, "one line per attempt:\n{log}");
    assert!(lines[0].contains("ERROR"), "{}", lines[0]);
    eprintln!("the log line: {}", lines[0]);
    assert_eq!(ecr_fetches(&d, "initial", "no_credentials"), 1);
    assert_eq!(
        moto.api_calls(),
        0,
        "nothing to sign with: AWS is not called"
    );

    let hosts = tempfile::tempdir().unwrap();
    write_hosts_toml(hosts.path(), &reg.host(), &d.url()).unwrap();
    let hosts_dir = hosts.path().to_owned();
    let reference = img.reference.clone();
    let (anonymous, with_creds) = tokio::task::spawn_blocking(move || {
        let c = Containerd::start().unwrap();
        let anonymous = c.pull(&reference, &hosts_dir, &[]).unwrap();
        let c = Containerd::start().unwrap();
        let user = format!("AWS:{pw}");
        let with_creds = c.pull(&reference, &hosts_dir, &["--user", &user]).unwrap();
        (anonymous, with_creds)
    })
    .await
    .unwrap();

    // Anonymous: the mirror's 401 sends containerd to the registry itself,
    // which refuses it too.
    assert!(!anonymous.success(), "{anonymous:?}");
    let fell_back = reg
        .requests_in_repo("ecr/nocreds", 0)
        .into_iter()
        .filter(|r| r.user_agent.starts_with("containerd/"))
        .count();
    assert!(fell_back > 0, "containerd did not fall back to the origin");

    // With credentials: containerd answers the mirror's challenge and the
    // mirror pulls with them (a puller's credentials win).
    assert!(with_creds.success(), "{with_creds:?}\n{}", d.log_tail(30));
    assert_eq!(
        d.metric(r#"damselfly_bytes_served_total{source="origin"}"#) as u64,
        img.total_size
    );
}

/// The registry's password changes (the token the daemon holds is refused)
/// and AWS now hands out the new one: the daemon fetches a new token once,
/// and the pull succeeds.
#[test]
fn a_refused_token_is_renewed_once_and_the_pull_succeeds() {
    common::require_tools();
    let (old, new) = ("111111111111", "222222222222");
    let mut moto = Moto::start(Some(old));
    let reg = Registry::start(RegistryAuth::htpasswd("AWS", &password(old))).unwrap();
    let first = push(&reg, &ImageSpec::small(), "ecr/rotate", &password(old));
    let second = push(&reg, &other_spec(), "ecr/rotate2", &password(old));
    let d = start_daemon(ecr_registry_toml(&reg, &moto, ""), DUMMY_KEYS);
    let hosts = tempfile::tempdir().unwrap();
    write_hosts_toml(hosts.path(), &reg.host(), &d.url()).unwrap();

    let c = Containerd::start().unwrap();
    let out = c.pull(&first.reference, hosts.path(), &[]).unwrap();
    assert!(out.success(), "first pull: {out:?}\n{}", d.log_tail(30));
    assert_eq!(ecr_fetches(&d, "initial", "ok"), 1);

    // Rotate: the registry wants the new account's password, and moto
    // (restarted as that account) hands it out.
    reg.set_htpasswd("AWS", &password(new)).unwrap();
    moto.restart_as(new);
    let calls_before = moto.api_calls();
    let mark = reg.mark();

    let started = Instant::now();
    let out = c.pull(&second.reference, hosts.path(), &[]).unwrap();
    eprintln!("pull with one token refresh: {:?}", started.elapsed());
    assert!(
        out.success(),
        "pull after rotation: {out:?}\n{}",
        d.log_tail(30)
    );
    assert_eq!(ecr_fetches(&d, "unauthorized", "ok"), 1, "{}", d.metrics());
    assert_eq!(ecr_fetches(&d, "initial", "ok"), 1);
    assert_eq!(moto.api_calls() - calls_before, 1, "exactly one new token");

    let seen = reg.requests_in_repo("ecr/rotate2", mark);
    let refused: Vec<_> = seen.iter().filter(|r| r.status == 401).collect();
    assert_eq!(
        refused.len(),
        1,
        "one request with the old token: {seen:#?}"
    );
    assert!(seen.iter().all(|r| r.user_agent.starts_with("damselfly/")));
    assert_eq!(
        seen.iter()
            .filter(|r| r.is_blob_get() && (200..300).contains(&r.status))
            .count(),
        second.blob_digests().len()
    );
}

/// `role_arn`: the daemon assumes the role (STS at moto, through the SDK's
/// own `AWS_ENDPOINT_URL_STS`) and asks ECR as that role. moto puts an
/// assumed role in the role's account, so the token carries that account's
/// password, which is the only one the registry takes.
#[test]
fn role_arn_is_assumed_before_asking_ecr() {
    common::require_tools();
    let moto = Moto::start(None);
    let role_account = "333333333333";
    let reg = Registry::start(RegistryAuth::htpasswd("AWS", &password(role_account))).unwrap();
    let img = push(&reg, &other_spec(), "ecr/role", &password(role_account));
    let role = format!("role_arn = \"arn:aws:iam::{role_account}:role/damselfly-puller\"\n");
    let sts = [("AWS_ENDPOINT_URL_STS", moto.url())];
    let env: Vec<(&str, &str)> = DUMMY_KEYS
        .iter()
        .copied()
        .chain(sts.iter().map(|(k, v)| (*k, v.as_str())))
        .collect();
    let d = start_daemon(ecr_registry_toml(&reg, &moto, &role), &env);
    let hosts = tempfile::tempdir().unwrap();
    write_hosts_toml(hosts.path(), &reg.host(), &d.url()).unwrap();
    let c = Containerd::start().unwrap();
    let out = c.pull(&img.reference, hosts.path(), &[]).unwrap();
    assert!(
        out.success(),
        "pull as the role: {out:?}\n{}",
        d.log_tail(30)
    );
    assert_eq!(ecr_fetches(&d, "initial", "ok"), 1);
    assert_eq!(
        moto.api_calls(),
        2,
        "AssumeRole, then GetAuthorizationToken"
    );
}
