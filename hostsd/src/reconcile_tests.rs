use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::MetadataExt;

use super::*;
use crate::hosts_file::decode;
use crate::options::ReconcileOptions;

const MIRROR: &str = "http://127.0.0.1:4001";

struct Env {
    _tmp: tempfile::TempDir,
    config: PathBuf,
    certs: PathBuf,
}

fn env(config: impl Fn(&Path) -> String) -> Env {
    let tmp = tempfile::tempdir().unwrap();
    let certs = tmp.path().join("certs.d");
    fs::create_dir(&certs).unwrap();
    let path = tmp.path().join("config.toml");
    fs::write(&path, config(&certs)).unwrap();
    Env {
        config: path,
        certs,
        _tmp: tmp,
    }
}

fn v2(certs: &Path) -> String {
    format!(
        "version = 2\n[plugins.\"io.containerd.grpc.v1.cri\".registry]\n  config_path = \"{}\"\n",
        certs.display()
    )
}

fn opts(e: &Env, registries: &[&str]) -> ReconcileOptions {
    ReconcileOptions {
        containerd_config: e.config.clone(),
        registries: registries.iter().map(|r| r.parse().unwrap()).collect(),
        ..Default::default()
    }
}

/// Every file under `root`: bytes, inode, mtime and mode.
type Snapshot = BTreeMap<PathBuf, (Vec<u8>, u64, i64, i64, u32)>;

fn snapshot(root: &Path) -> Snapshot {
    let mut out = BTreeMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let Ok(rd) = fs::read_dir(&dir) else { continue };
        for entry in rd.map(Result::unwrap) {
            let p = entry.path();
            let m = fs::metadata(&p).unwrap();
            if m.is_dir() {
                out.insert(p.clone(), (Vec::new(), 0, 0, 0, 0));
                stack.push(p);
            } else {
                out.insert(
                    p.clone(),
                    (
                        fs::read(&p).unwrap(),
                        m.ino(),
                        m.mtime(),
                        m.mtime_nsec(),
                        m.mode(),
                    ),
                );
            }
        }
    }
    out
}

fn origins(path: &Path) -> Vec<String> {
    let text = fs::read_to_string(path).unwrap();
    decode(&text)
        .unwrap_or_else(|e| panic!("{}: {e}\n{text}", path.display()))
        .iter()
        .map(|h| h.origin())
        .collect()
}

const FOREIGN_CA: &str = "server = \"https://ghcr.io\"\nca = \"/etc/pki/ghcr-ca.pem\"\n\n[host.\"https://corp-cache.example\"]\n  capabilities = [\"pull\", \"resolve\"]\n  ca = \"/etc/pki/corp.pem\"\n";
const FOREIGN_HEADERS: &str = "server = \"https://ghcr.io\"\n[host.\"https://corp-cache.example\"]\n  capabilities = [\"pull\"]\n  [host.\"https://corp-cache.example\".header]\n    authorization = \"Bearer x\"\n";

#[test]
fn existing_files_table() {
    enum Existing {
        None,
        Owned,
        Foreign(&'static str),
    }
    struct Case {
        name: &'static str,
        existing: Existing,
        action: Action,
        origins: &'static [&'static str],
        backup: bool,
    }
    let cases = [
        Case {
            name: "none",
            existing: Existing::None,
            action: Action::Created,
            origins: &[MIRROR, "https://ghcr.io"],
            backup: false,
        },
        Case {
            name: "owned (older mirror)",
            existing: Existing::Owned,
            action: Action::Updated,
            origins: &[MIRROR, "https://ghcr.io"],
            backup: false,
        },
        Case {
            name: "foreign with a CA",
            existing: Existing::Foreign(FOREIGN_CA),
            action: Action::TookOver,
            origins: &[MIRROR, "https://corp-cache.example", "https://ghcr.io"],
            backup: true,
        },
        Case {
            name: "foreign with headers",
            existing: Existing::Foreign(FOREIGN_HEADERS),
            action: Action::TookOver,
            origins: &[MIRROR, "https://corp-cache.example", "https://ghcr.io"],
            backup: true,
        },
    ];
    for c in cases {
        let e = env(v2);
        let dir = e.certs.join("ghcr.io");
        let file = dir.join("hosts.toml");
        let before = snapshot(&e.certs);
        match c.existing {
            Existing::None => {}
            Existing::Owned => {
                let old = ReconcileOptions {
                    mirror: "http://127.0.0.1:4999".into(),
                    ..opts(&e, &["ghcr.io"])
                };
                reconcile(&old).unwrap();
            }
            Existing::Foreign(text) => {
                fs::create_dir(&dir).unwrap();
                fs::write(&file, text).unwrap();
            }
        }
        let before = if matches!(c.existing, Existing::Foreign(_)) {
            snapshot(&e.certs)
        } else {
            before
        };

        let r = reconcile(&opts(&e, &["ghcr.io"])).unwrap();
        assert_eq!(r.files.len(), 1, "{}", c.name);
        assert_eq!(r.files[0].action, c.action, "{}", c.name);
        assert!(!r.restart_required, "{}", c.name);
        assert_eq!(origins(&file), c.origins, "{}", c.name);
        assert_eq!(dir.join(BACKUP_FILE).exists(), c.backup, "{}", c.name);
        if let Existing::Foreign(text) = c.existing {
            assert_eq!(fs::read_to_string(dir.join(BACKUP_FILE)).unwrap(), text);
            let new = fs::read_to_string(&file).unwrap();
            for kept in ["ca = ", "authorization", "capabilities = [\"pull\""] {
                if text.contains(kept) {
                    assert!(new.contains(kept), "{}: lost {kept:?}:\n{new}", c.name);
                }
            }
        }

        // A second run changes nothing: same bytes, inodes and mtimes.
        let after_first = snapshot(&e.certs);
        let again = reconcile(&opts(&e, &["ghcr.io"])).unwrap();
        assert!(
            again.files.iter().all(|f| f.action == Action::Unchanged),
            "{}",
            c.name
        );
        assert!(!again.changed(), "{}", c.name);
        assert_eq!(
            snapshot(&e.certs),
            after_first,
            "{}: second run touched files",
            c.name
        );

        // remove puts back exactly what was there before hostsd.
        let removed = remove(&opts(&e, &[])).unwrap();
        assert_eq!(removed.files.len(), 1, "{}", c.name);
        assert_eq!(
            snapshot(&e.certs),
            before,
            "{}: remove did not restore",
            c.name
        );
    }
}

#[test]
fn containerd_config_table() {
    struct Case {
        name: &'static str,
        config: fn(&Path) -> String,
        /// Where the file must land, relative to the temp dir.
        written_under: Option<&'static str>,
        error: Option<&'static str>,
    }
    let cases = [
        Case {
            name: "v2",
            config: v2,
            written_under: Some("certs.d"),
            error: None,
        },
        Case {
            name: "v3",
            config: |c| {
                format!(
                    "version = 3\n[plugins.'io.containerd.cri.v1.images'.registry]\nconfig_path = '{}'\n",
                    c.display()
                )
            },
            written_under: Some("certs.d"),
            error: None,
        },
        Case {
            name: "colon list: the first entry",
            config: |c| {
                format!(
                    "version = 2\n[plugins.\"io.containerd.grpc.v1.cri\".registry]\nconfig_path = \"{}:{}\"\n",
                    c.display(),
                    c.with_file_name("docker-certs.d").display()
                )
            },
            written_under: Some("certs.d"),
            error: None,
        },
        Case {
            name: "no config_path",
            config: |_| {
                "version = 2\n[plugins.\"io.containerd.grpc.v1.cri\"]\nsandbox_image = \"x\"\n"
                    .into()
            },
            written_under: None,
            error: Some("no `config_path`"),
        },
        Case {
            name: "inline mirrors",
            config: |c| {
                format!(
                    "version = 2\n[plugins.\"io.containerd.grpc.v1.cri\".registry]\nconfig_path = \"{}\"\n\
                     [plugins.\"io.containerd.grpc.v1.cri\".registry.mirrors.\"docker.io\"]\nendpoint = [\"https://m\"]\n",
                    c.display()
                )
            },
            written_under: None,
            error: Some("registry.mirrors for docker.io"),
        },
    ];
    for c in cases {
        let e = env(c.config);
        let before = snapshot(e.config.parent().unwrap());
        let got = reconcile(&opts(&e, &["ghcr.io"]));
        match (c.error, got) {
            (None, Ok(r)) => {
                let under = e.config.parent().unwrap().join(c.written_under.unwrap());
                assert_eq!(r.certs_dir.as_deref(), Some(under.as_path()), "{}", c.name);
                assert!(under.join("ghcr.io/hosts.toml").exists(), "{}", c.name);
            }
            (Some(want), Err(err)) => {
                assert!(err.to_string().contains(want), "{}: {err}", c.name);
                assert_eq!(err.kind(), crate::ErrorKind::NodeConfig, "{}", c.name);
                assert_eq!(
                    snapshot(e.config.parent().unwrap()),
                    before,
                    "{}: wrote something",
                    c.name
                );
            }
            (want, got) => panic!("{}: want error {want:?}, got {got:?}", c.name),
        }
    }
}

#[test]
fn patch_config_keeps_a_backup_and_remove_restores_it() {
    let e = env(|_| {
        "version = 2\n# keep me\n[plugins.\"io.containerd.grpc.v1.cri\"]\n  sandbox_image = \"x\"\n"
            .into()
    });
    let original = snapshot(e.config.parent().unwrap());
    let o = ReconcileOptions {
        certs_dir: Some(e.certs.clone()),
        patch_config: true,
        ..opts(&e, &["ghcr.io"])
    };
    let r = reconcile(&o).unwrap();
    assert!(r.restart_required);
    let change = r.config_change.clone().unwrap();
    assert_eq!(
        change.backup.as_deref(),
        Some(
            e.config
                .with_file_name("config.toml.damselfly-orig")
                .as_path()
        )
    );
    assert!(r.to_string().contains("RESTART NEEDED"));
    let patched = ContainerdConfig::load(&e.config).unwrap();
    assert_eq!(
        patched.config_path,
        ConfigPath::Set(e.certs.display().to_string())
    );
    assert!(fs::read_to_string(&e.config).unwrap().contains("# keep me"));

    // Now containerd's config names the directory: a rerun needs no patch.
    let again = reconcile(&ReconcileOptions {
        certs_dir: None,
        ..o.clone()
    })
    .unwrap();
    assert!(!again.changed() && !again.restart_required);

    // Without --restore-config, remove leaves config.toml and says so.
    let r = remove(&ReconcileOptions {
        certs_dir: None,
        ..o.clone()
    })
    .unwrap();
    assert!(r.config_change.is_none());
    assert!(r.warnings.iter().any(|w| w.contains("--restore-config")));
    let r = remove(&ReconcileOptions {
        certs_dir: None,
        restore_config: true,
        ..o.clone()
    })
    .unwrap();
    assert!(r.restart_required);
    assert_eq!(snapshot(e.config.parent().unwrap()), original);
}

#[test]
fn patch_without_override_targets_the_default_dir() {
    let e = env(|_| "version = 2\n".into());
    let r = reconcile(&ReconcileOptions {
        patch_config: true,
        dry_run: true,
        ..opts(&e, &["ghcr.io"])
    })
    .unwrap();
    assert!(r.restart_required);
    assert_eq!(r.certs_dir.as_deref(), Some(Path::new(DEFAULT_CERTS_DIR)));
    assert!(r
        .config_change
        .unwrap()
        .what
        .contains("/etc/containerd/certs.d"));
    assert_eq!(fs::read_to_string(&e.config).unwrap(), "version = 2\n");
}

#[test]
fn registry_forms_table() {
    struct Case {
        spec: &'static str,
        dir: &'static str,
        server: Option<&'static str>,
    }
    let cases = [
        Case {
            spec: "docker.io",
            dir: "docker.io",
            server: Some("https://registry-1.docker.io"),
        },
        Case {
            spec: "_default",
            dir: "_default",
            server: None,
        },
        Case {
            spec: "127.0.0.1:5000=http://127.0.0.1:5000",
            dir: "127.0.0.1:5000",
            server: Some("http://127.0.0.1:5000"),
        },
        Case {
            spec: "123456789012.dkr.ecr.us-east-1.amazonaws.com",
            dir: "123456789012.dkr.ecr.us-east-1.amazonaws.com",
            server: Some("https://123456789012.dkr.ecr.us-east-1.amazonaws.com"),
        },
    ];
    let e = env(v2);
    let specs: Vec<&str> = cases.iter().map(|c| c.spec).collect();
    reconcile(&opts(&e, &specs)).unwrap();
    for c in &cases {
        let file = e.certs.join(c.dir).join("hosts.toml");
        let hosts = decode(&fs::read_to_string(&file).unwrap()).unwrap();
        assert_eq!(hosts[0].origin(), MIRROR, "{}", c.spec);
        let server = hosts.last().unwrap();
        match c.server {
            Some(s) => assert_eq!(server.origin(), s, "{}", c.spec),
            None => assert_eq!(server.host, "", "{}", c.spec),
        }
    }
}

#[test]
fn ecr_options_become_registries() {
    let e = env(v2);
    let mut o = opts(&e, &[]);
    o.ecr.accounts = vec!["123456789012".into()];
    o.ecr.regions = vec!["us-east-1".into(), "cn-north-1".into()];
    o.ecr.fips = true;
    let r = reconcile(&o).unwrap();
    let mut dirs: Vec<String> = r.files.iter().map(|f| f.registry.clone()).collect();
    dirs.sort();
    assert_eq!(
        dirs,
        [
            "123456789012.dkr.ecr-fips.us-east-1.amazonaws.com",
            "123456789012.dkr.ecr.cn-north-1.amazonaws.com.cn",
            "123456789012.dkr.ecr.us-east-1.amazonaws.com",
        ]
    );
    assert!(r
        .warnings
        .iter()
        .any(|w| w.contains("no FIPS endpoint in cn-north-1")));
}

#[test]
fn an_existing_port_directory_is_used_not_shadowed() {
    let e = env(v2);
    fs::create_dir(e.certs.join("127.0.0.1_5000_")).unwrap();
    let r = reconcile(&opts(&e, &["127.0.0.1:5000"])).unwrap();
    assert_eq!(r.files[0].path, e.certs.join("127.0.0.1_5000_/hosts.toml"));
    assert!(!e.certs.join("127.0.0.1:5000").exists());
}

#[test]
fn registries_dropped_from_the_options_are_put_back() {
    let e = env(v2);
    fs::create_dir(e.certs.join("quay.io")).unwrap();
    fs::write(e.certs.join("quay.io/hosts.toml"), FOREIGN_CA).unwrap();
    let before = snapshot(&e.certs);
    reconcile(&opts(&e, &["ghcr.io", "quay.io", "docker.io"])).unwrap();
    let r = reconcile(&opts(&e, &["docker.io"])).unwrap();
    let mut actions: Vec<(String, Action)> = r
        .files
        .iter()
        .map(|f| (f.registry.clone(), f.action))
        .collect();
    actions.sort_by(|a, b| a.0.cmp(&b.0));
    assert_eq!(
        actions,
        [
            ("docker.io".to_string(), Action::Unchanged),
            ("ghcr.io".to_string(), Action::Deleted),
            ("quay.io".to_string(), Action::Restored),
        ]
    );
    assert!(!e.certs.join("ghcr.io").exists());
    remove(&opts(&e, &[])).unwrap();
    assert_eq!(snapshot(&e.certs), before);
}

#[test]
fn dry_run_writes_nothing() {
    let e = env(v2);
    fs::create_dir(e.certs.join("ghcr.io")).unwrap();
    fs::write(e.certs.join("ghcr.io/hosts.toml"), FOREIGN_CA).unwrap();
    let before = snapshot(&e.certs);
    let r = reconcile(&ReconcileOptions {
        dry_run: true,
        ..opts(&e, &["ghcr.io", "docker.io"])
    })
    .unwrap();
    assert!(r.changed());
    let shown = r.to_string();
    assert!(
        shown.contains("would take over") && shown.contains("would create"),
        "{shown}"
    );
    assert!(
        shown.contains("    | [host.\"http://127.0.0.1:4001\"]"),
        "{shown}"
    );
    assert_eq!(snapshot(&e.certs), before);
}

#[test]
fn one_bad_file_stops_the_whole_plan() {
    let e = env(v2);
    fs::create_dir(e.certs.join("quay.io")).unwrap();
    fs::write(
        e.certs.join("quay.io/hosts.toml"),
        "[host.\"https://x\"]\ncapabilities = [\"fly\"]\n",
    )
    .unwrap();
    let before = snapshot(&e.certs);
    let err = reconcile(&opts(&e, &["docker.io", "quay.io"])).unwrap_err();
    assert!(matches!(err, Error::ForeignFileUndecodable { .. }), "{err}");
    assert!(err.to_string().contains("unknown capability"), "{err}");
    assert_eq!(snapshot(&e.certs), before);
}

#[test]
fn bad_options_are_input_errors() {
    let e = env(v2);
    for o in [
        ReconcileOptions {
            mirror: "127.0.0.1:4001".into(),
            ..opts(&e, &["ghcr.io"])
        },
        ReconcileOptions {
            dial_timeout: "1 second".into(),
            ..opts(&e, &["ghcr.io"])
        },
        opts(&e, &[]),
        ReconcileOptions {
            registries: vec![
                RegistrySpec::new("ghcr.io"),
                RegistrySpec::with_server("ghcr.io", "http://x"),
            ],
            ..opts(&e, &[])
        },
    ] {
        let err = reconcile(&o).unwrap_err();
        assert_eq!(err.kind(), crate::ErrorKind::Input, "{err}");
    }
}

#[test]
fn concurrent_runs_keep_the_original() {
    let e = env(v2);
    fs::create_dir(e.certs.join("ghcr.io")).unwrap();
    fs::write(e.certs.join("ghcr.io/hosts.toml"), FOREIGN_CA).unwrap();
    let before = snapshot(&e.certs);
    let o = opts(&e, &["ghcr.io", "docker.io"]);
    std::thread::scope(|s| {
        for _ in 0..4 {
            s.spawn(|| reconcile(&o).unwrap());
        }
    });
    assert_eq!(
        fs::read_to_string(e.certs.join("ghcr.io").join(BACKUP_FILE)).unwrap(),
        FOREIGN_CA
    );
    remove(&opts(&e, &[])).unwrap();
    assert_eq!(snapshot(&e.certs), before);
}

#[test]
fn a_foreign_file_put_over_a_managed_one_becomes_the_new_original() {
    let e = env(v2);
    let dir = e.certs.join("ghcr.io");
    fs::create_dir(&dir).unwrap();
    fs::write(dir.join("hosts.toml"), FOREIGN_CA).unwrap();
    reconcile(&opts(&e, &["ghcr.io"])).unwrap();
    // Someone replaces hostsd's file by hand.
    fs::write(dir.join("hosts.toml"), FOREIGN_HEADERS).unwrap();
    let r = reconcile(&opts(&e, &["ghcr.io"])).unwrap();
    assert_eq!(r.files[0].action, Action::TookOver);
    assert!(r.files[0].notes.iter().any(|n| n.contains("older")), "{r}");
    remove(&opts(&e, &[])).unwrap();
    assert_eq!(
        fs::read_to_string(dir.join("hosts.toml")).unwrap(),
        FOREIGN_HEADERS
    );
}
