use super::*;
use toml::Value;

fn parse(text: &str) -> Result<Config, ConfigError> {
    Config::parse(text, Path::new("/etc/damselfly/test.toml"))
}

fn issues(text: &str) -> Vec<Issue> {
    match parse(text) {
        Err(ConfigError::Invalid { issues, .. }) => issues,
        other => panic!("expected validation issues, got {other:?}"),
    }
}

#[test]
fn defaults_validate() {
    let c = Config::defaults().unwrap();
    assert_eq!(c.mirror.listen, "127.0.0.1:4001".parse().unwrap());
    assert_eq!(c.telemetry.listen, "127.0.0.1:4002".parse().unwrap());
    assert_eq!(c.store.max_size, 100 << 30);
    assert_eq!(c.mirror.tag_stale_for, Duration::from_secs(900));
    assert_eq!(c.origin.retries, 5);
    assert!(c.registries.is_empty());
}

#[test]
fn every_error_is_reported_at_once_with_its_path() {
    let got = issues(
        r#"
        colour = "blue"
        [mirror]
        listen = "nowhere"
        tag_stale_for = "soon"
        [store]
        max_size = "lots"
        extra = 1
        [telemetry]
        log_format = "xml"
        [origin]
        retries = -1
        [[registry]]
        endpoint = "ftp://x"
        [[registry]]
        host = "a.test"
        endpoint = "http://127.0.0.1:5000/path"
        username = "u"
        [[registry]]
        host = "a.test"
        bogus = true
        "#,
    );
    let paths: Vec<&str> = got.iter().map(|i| i.path.as_str()).collect();
    for want in [
        "colour",
        "mirror.listen",
        "mirror.tag_stale_for",
        "store.max_size",
        "store.extra",
        "telemetry.log_format",
        "origin.retries",
        "registry[0].host",
        "registry[1].endpoint",
        "registry[1].password_file",
        "registry[2].host",
        "registry[2].bogus",
    ] {
        assert!(paths.contains(&want), "missing {want} in {paths:?}");
    }
}

#[test]
fn error_message_lists_each_issue() {
    let err = parse("[mirror]\nlisten = 1\nnope = 2\n")
        .unwrap_err()
        .to_string();
    assert!(err.contains("2 problem(s)"), "{err}");
    assert!(
        err.contains("mirror.listen: must be a string, not integer"),
        "{err}"
    );
    assert!(err.contains("mirror.nope: unknown key"), "{err}");
}

#[test]
fn syntax_errors_name_the_file() {
    let err = parse("[mirror\n").unwrap_err().to_string();
    assert!(
        err.contains("/etc/damselfly/test.toml is not valid TOML"),
        "{err}"
    );
}

#[test]
fn registries_and_credentials() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("pw"), "s3cret\n").unwrap();
    let cfg = Config::parse(
        r#"
        [mirror]
        default_registry = "origin.test:5000"
        [[registry]]
        host = "origin.test:5000"
        endpoint = "http://127.0.0.1:5000"
        username = "bob"
        password_file = "pw"
        [[registry]]
        host = "docker.io"
        "#,
        &dir.path().join("damselfly.toml"),
    )
    .unwrap();
    let r = cfg.registry_for("origin.test:5000").unwrap();
    assert_eq!(r.endpoint.as_str(), "http://127.0.0.1:5000/");
    assert_eq!(r.credentials.as_ref().unwrap().password, "s3cret");
    assert!(!format!("{r:?}").contains("s3cret"));
    let d = cfg.registry_for("docker.io").unwrap();
    assert_eq!(d.endpoint.as_str(), "https://registry-1.docker.io/");
    assert!(cfg.registry_for("evil.test").is_none());
}

#[test]
fn registry_auth_defaults_and_ecr_keys() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("pw"), "s3cret\n").unwrap();
    let cfg = Config::parse(
        r#"
        [[registry]]
        host = "123456789012.dkr.ecr.eu-west-1.amazonaws.com"
        [[registry]]
        host = "123456789012.dkr.ecr-fips.us-east-1.amazonaws.com"
        role_arn = "arn:aws:iam::123456789012:role/puller"
        [[registry]]
        host = "127.0.0.1:5000"
        endpoint = "http://127.0.0.1:5000"
        auth = "ecr"
        ecr_region = "us-east-1"
        ecr_endpoint = "http://127.0.0.1:5005"
        [[registry]]
        host = "basic.test"
        username = "bob"
        password_file = "pw"
        [[registry]]
        host = "open.test"
        "#,
        &dir.path().join("damselfly.toml"),
    )
    .unwrap();
    let auth = |h: &str| cfg.registry_for(h).unwrap().auth;
    let Auth::Ecr(e) = auth("123456789012.dkr.ecr.eu-west-1.amazonaws.com") else {
        panic!("ECR hosts default to auth = ecr")
    };
    assert_eq!(e.region, "eu-west-1");
    assert_eq!(e.account.as_deref(), Some("123456789012"));
    assert!(!e.fips && e.endpoint.is_none() && e.role_arn.is_none());
    let Auth::Ecr(e) = auth("123456789012.dkr.ecr-fips.us-east-1.amazonaws.com") else {
        panic!()
    };
    assert!(e.fips);
    assert_eq!(
        e.role_arn.as_deref(),
        Some("arn:aws:iam::123456789012:role/puller")
    );
    let Auth::Ecr(e) = auth("127.0.0.1:5000") else {
        panic!()
    };
    assert_eq!(e.region, "us-east-1");
    assert_eq!(e.account, None);
    assert_eq!(e.endpoint.unwrap().as_str(), "http://127.0.0.1:5005/");
    assert_eq!(auth("basic.test"), Auth::Basic);
    assert_eq!(auth("open.test"), Auth::None);
    // With no [[registry]] at all, ECR hosts still get ECR auth.
    let any = Config::defaults().unwrap();
    assert!(matches!(
        any.registry_for("123456789012.dkr.ecr.us-east-2.amazonaws.com")
            .unwrap()
            .auth,
        Auth::Ecr(_)
    ));
    assert_eq!(any.registry_for("quay.io").unwrap().auth, Auth::None);

    let got = issues(
        r#"
        [[registry]]
        host = "a.test"
        auth = "ecr"
        [[registry]]
        host = "b.test"
        auth = "kerberos"
        [[registry]]
        host = "c.test"
        ecr_region = "us-east-1"
        [[registry]]
        host = "d.test"
        auth = "ecr"
        ecr_region = "mars-1"
        ecr_endpoint = "ftp://x"
        role_arn = "puller"
        [[registry]]
        host = "e.test"
        auth = "basic"
        "#,
    );
    let paths: Vec<&str> = got.iter().map(|i| i.path.as_str()).collect();
    assert_eq!(
        paths,
        [
            "registry[0].ecr_region",
            "registry[1].auth",
            "registry[2].ecr_region",
            "registry[3].ecr_region",
            "registry[3].ecr_endpoint",
            "registry[3].role_arn",
            "registry[4].auth",
        ],
        "{got:?}"
    );
}

#[test]
fn no_registries_means_any_host_over_https() {
    let cfg = Config::defaults().unwrap();
    let r = cfg.registry_for("quay.io").unwrap();
    assert_eq!(r.endpoint.as_str(), "https://quay.io/");
    assert!(cfg.registry_for("bad host").is_none());
    assert!(cfg.registry_for("a.test:0").is_none());
    assert!(cfg.registry_for("a.test:99999").is_none());
}

#[test]
fn default_registry_must_exist() {
    let got = issues("[mirror]\ndefault_registry = \"x.test\"\n");
    assert_eq!(got[0].path, "mirror.default_registry");
}

#[test]
fn sizes_accept_strings_and_integers() {
    let c = parse("[store]\nmax_size = 1048576\n").unwrap();
    assert_eq!(c.store.max_size, 1 << 20);
    let c = parse("[store]\nmax_size = \"2GiB\"\n").unwrap();
    assert_eq!(c.store.max_size, 2 << 30);
}

/// The reference in docs/configuration.md is generated from KEYS; this keeps
/// the two equal, and keeps the doc's full example valid and complete.
#[test]
fn docs_reference_matches_keys() {
    let doc_path = Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/configuration.md");
    let doc = std::fs::read_to_string(&doc_path).unwrap();
    assert!(
        doc.contains(&reference_markdown()),
        "docs/configuration.md is out of date: paste the output of \
         `damselfly config reference` between the markers"
    );
    let example = doc
        .split("```toml\n")
        .nth(1)
        .and_then(|rest| rest.split("```").next())
        .expect("docs/configuration.md has a ```toml example");
    // The example names files that do not exist here, so only unknown keys
    // and type errors count, not unreadable files.
    let table: Table = example.parse().unwrap();
    // `a.b[].c.d`: tables and arrays of tables, to any depth.
    fn has(t: &Table, path: &[&str]) -> bool {
        let Some((first, rest)) = path.split_first() else {
            return true;
        };
        match (t.get(first.trim_end_matches("[]")), rest.is_empty()) {
            (Some(_), true) => true,
            (Some(Value::Table(inner)), false) => has(inner, rest),
            (Some(Value::Array(a)), false) => a
                .iter()
                .any(|v| v.as_table().is_some_and(|inner| has(inner, rest))),
            _ => false,
        }
    }
    for key in KEYS {
        let path: Vec<&str> = key.path.split('.').collect();
        let present = has(&table, &path);
        assert!(
            present,
            "the example in docs/configuration.md lacks {}",
            key.path
        );
    }
    if let Err(ConfigError::Invalid { issues, .. }) = Config::parse(example, &doc_path) {
        let real: Vec<_> = issues
            .iter()
            .filter(|i| !i.message.starts_with("cannot read"))
            .collect();
        assert!(real.is_empty(), "example has issues: {real:?}");
    }
}

#[test]
fn swarm_needs_a_key_or_an_explicit_opt_out() {
    let err = issues("[swarm]\nenabled = true\n");
    assert!(
        err.iter()
            .any(|i| i.path == "swarm.cluster_key_file"
                && i.message.contains("insecure_no_cluster_key")),
        "{err:?}"
    );
    let cfg = Config::parse(
        "[swarm]\nenabled = true\ninsecure_no_cluster_key = true\n",
        Path::new("x.toml"),
    )
    .unwrap();
    assert!(cfg.swarm.enabled && cfg.swarm.cluster_key_file.is_none());
    assert_eq!(cfg.swarm.piece_size, 8 << 20);
    assert_eq!(cfg.swarm.data_listen.port(), 4004);
    // Off by default, and then no key is needed.
    let cfg = Config::defaults().unwrap();
    assert!(!cfg.swarm.enabled);
}

/// A secret file that is a device, a FIFO, a directory or too large fails
/// the load with the key's path, and never hangs it (a FIFO without a
/// writer would block an open; `/dev/zero` would fill memory).
#[test]
fn secret_files_must_be_small_regular_files() {
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("fifo");
    let made = std::process::Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .unwrap();
    assert!(made.success());
    let big = dir.path().join("big");
    std::fs::write(&big, vec![b'a'; 100 << 10]).unwrap();
    let cases: Vec<PathBuf> = vec![fifo, big, dir.path().to_owned(), PathBuf::from("/dev/null")];
    for file in cases {
        let password = format!(
            "[[registry]]\nhost = \"origin.test\"\nusername = \"u\"\npassword_file = \"{}\"\n",
            file.display()
        );
        let key = format!(
            "[swarm]\nenabled = true\ncluster_key_file = \"{}\"\n",
            file.display()
        );
        for (text, at) in [
            (password, "registry[0].password_file"),
            (key, "swarm.cluster_key_file"),
        ] {
            // On a thread: a regression that blocks fails here, not hangs.
            let (tx, rx) = std::sync::mpsc::channel();
            std::thread::spawn(move || {
                let _ = tx.send(parse(&text));
            });
            let got = rx
                .recv_timeout(std::time::Duration::from_secs(20))
                .unwrap_or_else(|_| panic!("loading {} as {at} hung", file.display()));
            let Err(ConfigError::Invalid { issues, .. }) = got else {
                panic!("{} as {at}: expected an issue, got {got:?}", file.display());
            };
            assert!(
                issues.iter().any(|i| i.path == at),
                "{}: {issues:?}",
                file.display()
            );
        }
    }
}

#[test]
fn swarm_key_file_is_checked() {
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("good.key");
    std::fs::write(&good, format!("{}\n", "ab".repeat(32))).unwrap();
    let bad = dir.path().join("bad.key");
    std::fs::write(&bad, "not a key").unwrap();
    let text = |p: &Path| {
        format!(
            "[swarm]\nenabled = true\ncluster_key_file = \"{}\"\n",
            p.display()
        )
    };
    assert!(Config::parse(&text(&good), Path::new("x.toml")).is_ok());
    let err = issues(&text(&bad));
    assert!(
        err.iter().any(|i| i.path == "swarm.cluster_key_file"),
        "{err:?}"
    );
    assert!(
        !format!("{err:?}").contains("not a key"),
        "the key's content must not be echoed"
    );
    let err = issues(&format!(
        "[swarm]\nenabled = true\ninsecure_no_cluster_key = true\ncluster_key_file = \"{}\"\n",
        good.display()
    ));
    assert!(
        err.iter()
            .any(|i| i.path == "swarm.insecure_no_cluster_key"),
        "{err:?}"
    );
}

#[test]
fn swarm_values_are_validated() {
    let err = issues(
        "[swarm]\nlisten = \"tcp://x\"\nbootstrap = [\"dns:nohost\", 5]\nrole = \"leader\"\n\
         piece_size = \"100MiB\"\nhedge_after = \"1ms\"\nadvertise = \"here\"\n",
    );
    for path in [
        "swarm.listen",
        "swarm.bootstrap[0]",
        "swarm.bootstrap[1]",
        "swarm.role",
        "swarm.piece_size",
        "swarm.hedge_after",
        "swarm.advertise",
    ] {
        assert!(
            err.iter().any(|i| i.path == path),
            "no issue for {path}: {err:?}"
        );
    }
}

/// A `[swarm]` section that says how to join a cluster turns the swarm on
/// unless `enabled = false` is written; the lab that was set up this way
/// pulled 8x from the origin while the swarm silently stayed off.
#[test]
fn swarm_section_that_joins_turns_the_swarm_on() {
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("cluster.key");
    std::fs::write(&key, format!("{}\n", "cd".repeat(32))).unwrap();
    let joining = format!(
        "[swarm]\nlisten = \"/ip4/0.0.0.0/tcp/4003\"\nbootstrap = [\"dns:damselfly-peers.damselfly.svc:4003\"]\n\
         cluster_key_file = \"{}\"\n",
        key.display()
    );
    let cfg = Config::parse(&joining, Path::new("x.toml")).unwrap();
    assert!(cfg.swarm.enabled);
    assert_eq!(cfg.swarm.implied_by, ["bootstrap", "cluster_key_file"]);
    assert!(cfg.warnings.is_empty(), "{:?}", cfg.warnings);

    let off = Config::parse(&format!("{joining}enabled = false\n"), Path::new("x.toml")).unwrap();
    assert!(!off.swarm.enabled && off.swarm.implied_by.is_empty());
    assert_eq!(off.warnings.len(), 1, "{:?}", off.warnings);
    assert_eq!(off.warnings[0].path, "swarm.enabled");
    assert!(
        off.warnings[0]
            .message
            .contains("bootstrap, cluster_key_file are not used"),
        "{:?}",
        off.warnings
    );

    let on = Config::parse(&format!("{joining}enabled = true\n"), Path::new("x.toml")).unwrap();
    assert!(on.swarm.enabled && on.swarm.implied_by.is_empty());

    // Joining without a key is the same error as enabled = true without one.
    let err = issues("[swarm]\nbootstrap = [\"/ip4/10.0.0.5/tcp/4003\"]\n");
    assert!(
        err.iter().any(|i| i.path == "swarm.cluster_key_file"),
        "{err:?}"
    );

    // A section with nothing to join with stays off, and says so.
    let cfg =
        parse("[swarm]\nlisten = \"/ip4/0.0.0.0/tcp/4003\"\npiece_size = \"4MiB\"\n").unwrap();
    assert!(!cfg.swarm.enabled);
    assert_eq!(cfg.warnings[0].path, "swarm");
    assert!(
        cfg.warnings[0].message.contains("listen, piece_size")
            && cfg.warnings[0].message.contains("enabled = true"),
        "{:?}",
        cfg.warnings
    );
    assert!(Config::defaults().unwrap().warnings.is_empty());
}

#[test]
fn node_section_defaults_and_checks() {
    let cfg = Config::defaults().unwrap();
    assert!(!cfg.node.gate);
    assert_eq!(
        cfg.node.taint.to_string(),
        "damselfly.io/not-ready:NoSchedule"
    );
    assert_eq!(cfg.node.wait_for_taints, ["karpenter.sh/unregistered"]);
    assert_eq!(cfg.node.deadline, Duration::from_secs(600));
    assert!(cfg.node.wait_for_ready && cfg.node.check_hosts);
    assert_eq!(cfg.node.name, None);

    let cfg = parse(
        "[node]\ngate = true\nname = \"ip-10-0-1-7.ec2.internal\"\ntaint = \"example.com/wired=no:NoExecute\"\n\
         wait_for_taints = []\ndeadline = \"90s\"\nwait_for_ready = false\nkubeconfig = \"/root/.kube/config\"\n",
    )
    .unwrap();
    assert!(cfg.node.gate && !cfg.node.wait_for_ready);
    assert_eq!(cfg.node.taint.key, "example.com/wired");
    assert_eq!(cfg.node.taint.value.as_deref(), Some("no"));
    assert!(cfg.node.wait_for_taints.is_empty());
    assert_eq!(
        cfg.node.kubeconfig,
        Some(PathBuf::from("/root/.kube/config"))
    );

    let err = issues(
        "[node]\ntaint = \"not-a-taint\"\nwait_for_taints = [\"damselfly.io/not-ready\", 3]\n\
         deadline = \"soon\"\npoll_interval = \"1ms\"\nnope = 1\n",
    );
    let paths: Vec<&str> = err.iter().map(|i| i.path.as_str()).collect();
    for want in [
        "node.taint",
        "node.wait_for_taints",
        "node.wait_for_taints[1]",
        "node.deadline",
        "node.poll_interval",
        "node.nope",
    ] {
        assert!(paths.contains(&want), "missing {want} in {paths:?}");
    }
}

#[test]
fn store_integrity_keys() {
    let c = parse("").unwrap();
    assert!(c.store.verify_reads);
    assert_eq!(c.store.scrub_rate, 4 << 20);
    assert_eq!(c.store.scrub_every, Duration::from_secs(24 * 3600));
    let c = parse("[store]\nverify_reads = false\nscrub_rate = 0\nscrub_every = \"2h\"\n").unwrap();
    assert!(!c.store.verify_reads);
    assert_eq!(c.store.scrub_rate, 0);
    assert_eq!(c.store.scrub_every, Duration::from_secs(7200));
    let err =
        issues("[store]\nverify_reads = \"yes\"\nscrub_rate = \"fast\"\nscrub_every = \"0s\"\n");
    let paths: Vec<&str> = err.iter().map(|i| i.path.as_str()).collect();
    assert_eq!(
        paths,
        vec![
            "store.verify_reads",
            "store.scrub_rate",
            "store.scrub_every"
        ],
        "{err:?}"
    );
}

/// A value as the loaded config holds it, to compare with the default that
/// KEYS writes for its key.
#[derive(Debug, PartialEq)]
enum Loaded {
    Dur(Duration),
    /// Sizes in bytes and integers.
    Num(u64),
    Flag(bool),
    Text(String),
    Addr(std::net::SocketAddr),
    List(Vec<String>),
}

impl Loaded {
    /// The default of `path` in KEYS, parsed as the same kind as `self`.
    fn keys_default(&self, path: &str) -> Loaded {
        let d = default_of(path);
        assert!(!d.is_empty(), "{path} is not in KEYS");
        fn bad<T>(path: &str, d: &str, e: &dyn std::fmt::Display) -> T {
            panic!("{path}: KEYS default {d:?}: {e}")
        }
        match self {
            Loaded::Dur(_) => {
                Loaded::Dur(validate::parse_duration(d).unwrap_or_else(|e| bad(path, d, &e)))
            }
            Loaded::Num(_) => Loaded::Num(
                d.parse::<u64>()
                    .or_else(|_| validate::parse_size(d))
                    .unwrap_or_else(|e| bad(path, d, &e)),
            ),
            Loaded::Flag(_) => Loaded::Flag(d.parse().unwrap_or_else(|e| bad(path, d, &e))),
            Loaded::Text(_) => Loaded::Text(d.to_owned()),
            Loaded::Addr(_) => Loaded::Addr(d.parse().unwrap_or_else(|e| bad(path, d, &e))),
            Loaded::List(_) => {
                Loaded::List(validate::parse_string_list(d).unwrap_or_else(|e| bad(path, d, &e)))
            }
        }
    }
}

/// KEYS is the one place a default is written: the loader reads it from
/// there. This compares what an empty file loads to with what KEYS says,
/// key by key, so a default written in the loader that drifts from the
/// reference (or a key read from the wrong path) fails here.
#[test]
fn loaded_defaults_are_the_keys_defaults() {
    use Loaded::*;
    let c = parse("[gpu.assume]\n[[prewarm.rule]]\nimages = [\"a.example.com/x:1\"]\n").unwrap();
    let d = |v: Duration| Dur(v);
    let n = |v: u64| Num(v);
    let text = |v: &str| Text(v.to_owned());
    let rule = &c.prewarm.rules[0];
    let assume = c.gpu.assume.as_ref().unwrap();
    let checked: Vec<(&str, Loaded)> = vec![
        ("mirror.listen", Addr(c.mirror.listen)),
        ("mirror.tag_stale_for", d(c.mirror.tag_stale_for)),
        ("mirror.max_header_size", n(c.mirror.max_header_size)),
        ("mirror.drain_timeout", d(c.mirror.drain_timeout)),
        ("store.max_size", n(c.store.max_size)),
        ("store.verify_reads", Flag(c.store.verify_reads)),
        ("store.scrub_rate", n(c.store.scrub_rate)),
        ("store.scrub_every", d(c.store.scrub_every)),
        ("telemetry.listen", Addr(c.telemetry.listen)),
        (
            "telemetry.log_format",
            text(match c.telemetry.log_format {
                LogFormat::Text => "text",
                LogFormat::Json => "json",
            }),
        ),
        ("telemetry.log_level", text(&c.telemetry.log_level)),
        ("origin.connect_timeout", d(c.origin.connect_timeout)),
        ("origin.read_timeout", d(c.origin.read_timeout)),
        ("origin.retries", n(c.origin.retries.into())),
        ("origin.parallel_ranges", n(c.origin.parallel_ranges as u64)),
        ("origin.range_size", n(c.origin.range_size)),
        (
            "containerd.configure_hosts",
            Flag(c.containerd.configure_hosts),
        ),
        (
            "containerd.config",
            text(&c.containerd.config.display().to_string()),
        ),
        ("containerd.dial_timeout", text(&c.containerd.dial_timeout)),
        ("containerd.patch_config", Flag(c.containerd.patch_config)),
        ("swarm.listen", text(&c.swarm.listen)),
        ("swarm.data_listen", Addr(c.swarm.data_listen)),
        ("swarm.bootstrap", List(c.swarm.bootstrap.clone())),
        ("swarm.dns_refresh", d(c.swarm.dns_refresh)),
        (
            "swarm.insecure_no_cluster_key",
            Flag(c.swarm.enabled && c.swarm.cluster_key_file.is_none()),
        ),
        ("swarm.data_tls", Flag(c.swarm.data_tls)),
        ("swarm.mdns", Flag(c.swarm.mdns)),
        ("swarm.role", text(c.swarm.role.as_str())),
        ("swarm.piece_size", n(c.swarm.piece_size)),
        ("swarm.upload_limit", n(c.swarm.upload_limit)),
        ("swarm.download_limit", n(c.swarm.download_limit)),
        (
            "swarm.max_piece_transfers",
            n(c.swarm.max_piece_transfers as u64),
        ),
        ("swarm.relay_fanout", n(c.swarm.relay_fanout as u64)),
        ("swarm.max_uploads", n(c.swarm.max_uploads as u64)),
        ("swarm.hedge_after", d(c.swarm.hedge_after)),
        ("swarm.stall_timeout", d(c.swarm.stall_timeout)),
        ("swarm.heartbeat", d(c.swarm.heartbeat)),
        ("node.gate", Flag(c.node.gate)),
        ("node.taint", text(&c.node.taint.to_string())),
        ("node.wait_for_taints", List(c.node.wait_for_taints.clone())),
        ("node.deadline", d(c.node.deadline)),
        ("node.wait_for_ready", Flag(c.node.wait_for_ready)),
        ("node.check_hosts", Flag(c.node.check_hosts)),
        ("node.poll_interval", d(c.node.poll_interval)),
        ("gpu.nvml_library", text(&c.gpu.nvml_library)),
        ("gpu.assume.count", n(assume.count.into())),
        ("gpu.assume.product", text(&assume.product)),
        ("gpu.assume.memory", n(assume.memory)),
        ("prewarm.into_containerd", Flag(c.prewarm.into_containerd)),
        (
            "prewarm.containerd_socket",
            text(&c.prewarm.containerd_socket.display().to_string()),
        ),
        (
            "prewarm.containerd_namespace",
            text(&c.prewarm.containerd_namespace),
        ),
        (
            "prewarm.pin_in_containerd",
            Flag(c.prewarm.pin_in_containerd),
        ),
        ("prewarm.concurrency", n(c.prewarm.concurrency as u64)),
        (
            "prewarm.blob_concurrency",
            n(c.prewarm.blob_concurrency as u64),
        ),
        ("prewarm.refresh", d(c.prewarm.refresh)),
        ("prewarm.retry_max", d(c.prewarm.retry_max)),
        ("prewarm.gate_readiness", Flag(c.prewarm.gate_readiness)),
        ("prewarm.ready_deadline", d(c.prewarm.ready_deadline)),
        ("prewarm.swarm_wait", d(c.prewarm.swarm_wait)),
        (
            "prewarm.rule[].nodes",
            text(match rule.nodes {
                RuleNodes::Gpu => "gpu",
                RuleNodes::All => "all",
            }),
        ),
        ("prewarm.rule[].gpu.min_count", n(rule.gpu.min_count.into())),
    ];
    for (path, loaded) in &checked {
        assert_eq!(*loaded, loaded.keys_default(path), "{path}");
    }
    // gpu.source: `[gpu.assume]` turns "auto" into "static", so without it.
    let plain = Config::defaults().unwrap();
    assert_eq!(
        text(&format!("{:?}", plain.gpu.source).to_lowercase()),
        text("").keys_default("gpu.source")
    );
    // Every key with a default of a checkable kind is either above, in
    // `[sidecar]` (checked in sidecar.rs), or documented in words.
    let in_words = |d: &str| d.starts_with('(') || d.contains(' ') || d.contains('<');
    let missed: Vec<&str> = KEYS
        .iter()
        .filter(|k| !checked.iter().any(|(p, _)| *p == k.path))
        .filter(|k| k.path != "gpu.source" && !k.path.starts_with("sidecar."))
        .filter(|k| !in_words(k.default) && !k.path.starts_with("prewarm.rule[].name"))
        .map(|k| k.path)
        .collect();
    assert!(
        missed.is_empty(),
        "defaults not compared with KEYS: {missed:?}"
    );
}

/// A KEYS default that does not parse fails the load with the key's path,
/// not a silent zero.
#[test]
fn a_broken_keys_default_is_reported_not_zeroed() {
    let mut v = validate::Validator::new(PathBuf::from("."));
    let t = Table::new();
    assert_eq!(v.duration(&t, "store", "no_such_key"), Duration::ZERO);
    assert_eq!(v.issues.len(), 1);
    assert_eq!(v.issues[0].path, "store.no_such_key");
    assert!(v.issues[0].message.contains("not in the KEYS table"));
    // `store.dir`'s default is prose, not a size.
    assert_eq!(v.size(&t, "store", "dir"), 0);
    assert_eq!(v.issues[1].path, "store.dir");
    assert!(
        v.issues[1].message.contains("is not a valid path"),
        "{:?}",
        v.issues[1]
    );
    assert_eq!(
        validate::schema_path("prewarm.rule[12].gpu", "min_count"),
        "prewarm.rule[].gpu.min_count"
    );
}
