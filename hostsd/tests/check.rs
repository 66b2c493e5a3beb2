//! `check` against real files and a real (local) mirror socket.

mod support;

use std::fs;
use std::path::{Path, PathBuf};

use hostsd::{check, reconcile, ReconcileOptions, RegistrySpec};
use support::{Response, Server};

struct Env {
    _tmp: tempfile::TempDir,
    certs: PathBuf,
    second: PathBuf,
    config: PathBuf,
}

fn env() -> Env {
    let tmp = tempfile::tempdir().unwrap();
    let certs = tmp.path().join("certs.d");
    let second = tmp.path().join("docker-certs.d");
    fs::create_dir(&certs).unwrap();
    fs::create_dir(&second).unwrap();
    let config = tmp.path().join("config.toml");
    fs::write(
        &config,
        format!(
            "version = 2\n[plugins.\"io.containerd.grpc.v1.cri\".registry]\nconfig_path = \"{}:{}\"\n",
            certs.display(),
            second.display()
        ),
    )
    .unwrap();
    Env {
        _tmp: tmp,
        certs,
        second,
        config,
    }
}

fn opts(e: &Env, mirror: &str, regs: &[&str]) -> ReconcileOptions {
    ReconcileOptions {
        containerd_config: e.config.clone(),
        mirror: mirror.to_string(),
        registries: regs.iter().map(|r| r.parse().unwrap()).collect(),
        ..Default::default()
    }
}

fn write(dir: &Path, registry: &str, text: &str) {
    fs::create_dir_all(dir.join(registry)).unwrap();
    fs::write(dir.join(registry).join("hosts.toml"), text).unwrap();
}

/// A mirror that answers 404 to everything, as a fresh daemon would for /v2/
/// if it did not implement it: still live.
fn mirror() -> Server {
    Server::start(|_| Response::new(404, ""))
}

#[test]
fn routed_registries_and_a_live_mirror_pass() {
    let e = env();
    let m = mirror();
    let o = opts(&e, &m.url(), &["ghcr.io", "docker.io", "_default"]);
    reconcile(&o).unwrap();
    let r = check(&o).unwrap();
    assert!(r.ok(), "{r}");
    assert!(r.to_string().contains("live (HTTP 404 on GET /v2/)"), "{r}");
    let docker = &r.registries[1];
    assert!(docker.managed);
    assert_eq!(docker.hosts[0].origin(), m.url());
    assert_eq!(docker.hosts[1].origin(), "https://registry-1.docker.io");
    assert!(m.requests().iter().any(|q| q.target == "/v2/"));
}

#[test]
fn a_down_mirror_fails_the_check() {
    let e = env();
    let m = mirror();
    let url = m.url();
    let o = opts(&e, &url, &["ghcr.io"]);
    reconcile(&o).unwrap();
    drop(m);
    let r = check(&o).unwrap();
    assert!(!r.ok());
    assert!(r.to_string().contains("DOWN"), "{r}");
}

#[test]
fn what_containerd_would_do_table() {
    struct Case {
        name: &'static str,
        setup: fn(&Env, &str),
        registry: &'static str,
        routed: bool,
        says: &'static str,
    }
    let cases = [
        Case {
            name: "no directory at all",
            setup: |_, _| {},
            registry: "quay.io",
            routed: false,
            says: "goes straight to https://quay.io",
        },
        Case {
            name: "server without a host table (the 1.6 trap)",
            setup: |e, _| write(&e.certs, "quay.io", "server = \"https://quay.io\"\n"),
            registry: "quay.io",
            routed: false,
            says: "invalid `host` tree",
        },
        Case {
            name: "mirror not first",
            setup: |e, m| {
                write(
                    &e.certs,
                    "quay.io",
                    &format!("[host.\"https://other\"]\n[host.\"{m}\"]\ncapabilities = [\"pull\", \"resolve\"]\n"),
                )
            },
            registry: "quay.io",
            routed: false,
            says: "containerd tries https://other first",
        },
        Case {
            name: "mirror without resolve",
            setup: |e, m| {
                write(
                    &e.certs,
                    "quay.io",
                    &format!("[host.\"{m}\"]\ncapabilities = [\"pull\"]\n"),
                )
            },
            registry: "quay.io",
            routed: false,
            says: "needs pull and resolve",
        },
        Case {
            name: "mirror missing",
            setup: |e, _| write(&e.certs, "quay.io", "[host.\"https://other\"]\n"),
            registry: "quay.io",
            routed: false,
            says: "is not one of its hosts",
        },
        Case {
            name: "_default applies",
            setup: |e, m| {
                write(
                    &e.certs,
                    "_default",
                    &format!("[host.\"{m}\"]\ncapabilities = [\"pull\", \"resolve\"]\n"),
                )
            },
            registry: "quay.io",
            routed: true,
            says: "containerd uses _default",
        },
        Case {
            name: "a directory without hosts.toml hides _default",
            setup: |e, m| {
                write(
                    &e.certs,
                    "_default",
                    &format!("[host.\"{m}\"]\ncapabilities = [\"pull\", \"resolve\"]\n"),
                );
                fs::create_dir(e.certs.join("quay.io")).unwrap();
                fs::write(e.certs.join("quay.io/ca.crt"), "x").unwrap();
            },
            registry: "quay.io",
            routed: false,
            says: "also hides _default",
        },
        Case {
            name: "found only in the second config_path entry",
            setup: |e, m| {
                write(
                    &e.second,
                    "quay.io",
                    &format!("[host.\"{m}\"]\ncapabilities = [\"pull\", \"resolve\"]\n"),
                )
            },
            registry: "quay.io",
            routed: true,
            says: "config_path entry 2",
        },
        Case {
            name: "the first entry's _default wins over the second entry's own directory",
            setup: |e, m| {
                write(&e.certs, "_default", "[host.\"https://elsewhere\"]\n");
                write(
                    &e.second,
                    "quay.io",
                    &format!("[host.\"{m}\"]\ncapabilities = [\"pull\", \"resolve\"]\n"),
                );
            },
            registry: "quay.io",
            routed: false,
            says: "is not one of its hosts",
        },
        Case {
            name: "host_port_ directory wins over host:port",
            setup: |e, m| {
                write(
                    &e.certs,
                    "127.0.0.1_5000_",
                    "[host.\"https://elsewhere\"]\n",
                );
                write(
                    &e.certs,
                    "127.0.0.1:5000",
                    &format!("[host.\"{m}\"]\ncapabilities = [\"pull\", \"resolve\"]\n"),
                );
            },
            registry: "127.0.0.1:5000",
            routed: false,
            says: "127.0.0.1_5000_",
        },
    ];
    for c in cases {
        let e = env();
        let m = mirror();
        (c.setup)(&e, &m.url());
        let r = check(&opts(&e, &m.url(), &[c.registry])).unwrap();
        let shown = r.to_string();
        assert_eq!(r.registries[0].routed(), c.routed, "{}:\n{shown}", c.name);
        assert_eq!(r.ok(), c.routed, "{}:\n{shown}", c.name);
        assert!(
            shown.contains(c.says),
            "{}: no {:?} in\n{shown}",
            c.name,
            c.says
        );
    }
}

#[test]
fn config_problems_fail_every_registry() {
    let e = env();
    let m = mirror();
    fs::write(&e.config, "version = 2\n").unwrap();
    let o = ReconcileOptions {
        certs_dir: None,
        ..opts(&e, &m.url(), &["ghcr.io"])
    };
    let r = check(&o).unwrap();
    assert!(!r.ok());
    assert!(r.problems[0].contains("no `config_path`"), "{r}");
    // A malformed option is still an error, not a report.
    let bad = ReconcileOptions {
        registries: vec![RegistrySpec::new("no/slash")],
        ..o
    };
    assert!(check(&bad).is_err());
}

/// Something other than damselfly on the mirror's address (a Dragonfly
/// dfdaemon left from the stack damselfly replaces) is named; damselfly
/// itself is not.
#[test]
fn another_program_on_the_mirror_port_is_named() {
    let e = env();
    let other = Server::start(|_| Response::new(200, "{}").with_header("Server", "dragonfly"));
    let o = opts(&e, &other.url(), &["ghcr.io"]);
    reconcile(&o).unwrap();
    let r = check(&o).unwrap();
    let w = r.warnings.join("\n");
    assert!(
        w.contains("Server: dragonfly") && w.contains("not as damselfly"),
        "{r}"
    );
    assert!(r.to_string().contains("warning: "), "{r}");

    let ours = Server::start(|_| Response::new(200, "{}").with_header("Server", "damselfly/0.1.0"));
    let o = opts(&e, &ours.url(), &["ghcr.io"]);
    reconcile(&o).unwrap();
    let r = check(&o).unwrap();
    assert!(r.ok(), "{r}");
    assert!(
        !r.warnings.iter().any(|w| w.contains("not as damselfly")),
        "{r}"
    );
}

/// A SOCI snapshotter fetches lazily loaded layers itself: named in check
/// and in apply, in both the proxy_plugins and the CRI snapshotter forms.
#[test]
fn a_soci_snapshotter_is_named() {
    let e = env();
    let m = Server::start(|_| Response::new(200, "{}").with_header("Server", "damselfly/0.1.0"));
    let mut text = fs::read_to_string(&e.config).unwrap();
    text.push_str(
        "[plugins.\"io.containerd.grpc.v1.cri\".containerd]\nsnapshotter = \"soci\"\n\
         [proxy_plugins.soci]\ntype = \"snapshot\"\naddress = \"/run/soci-snapshotter-grpc/soci-snapshotter-grpc.sock\"\n",
    );
    fs::write(&e.config, text).unwrap();
    let o = opts(&e, &m.url(), &["ghcr.io"]);
    let applied = reconcile(&o).unwrap();
    assert!(
        applied.warnings.iter().any(|w| w.contains("SOCI")),
        "{applied}"
    );
    let r = check(&o).unwrap();
    let soci: Vec<&String> = r.warnings.iter().filter(|w| w.contains("SOCI")).collect();
    assert_eq!(soci.len(), 1, "{r}");
    assert!(
        soci[0].contains("proxy_plugins.soci")
            && soci[0].contains(
                "plugins.\"io.containerd.grpc.v1.cri\".containerd.snapshotter = \"soci\""
            ),
        "{}",
        soci[0]
    );
    // The routing itself is fine: SOCI is a warning, not a failure.
    assert!(r.ok(), "{r}");
}
