use super::*;

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
