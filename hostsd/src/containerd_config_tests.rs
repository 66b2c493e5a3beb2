use super::*;

const V2: &str = r#"version = 2
root = "/var/lib/containerd"

[plugins."io.containerd.grpc.v1.cri".registry]
  config_path = "/etc/containerd/certs.d"
"#;

const V3: &str = r#"version = 3

[plugins.'io.containerd.cri.v1.images'.registry]
  config_path = '/etc/containerd/certs.d'
"#;

const V2_NO_PATH: &str = r#"version = 2

[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "registry.k8s.io/pause:3.9"
"#;

// What EKS AL2023 ships.
const V2_COLON: &str = r#"version = 2
[plugins."io.containerd.grpc.v1.cri".registry]
config_path = "/etc/containerd/certs.d:/etc/docker/certs.d"
"#;

const V2_INLINE_MIRRORS: &str = r#"version = 2
[plugins."io.containerd.grpc.v1.cri".registry]
  config_path = ""
  [plugins."io.containerd.grpc.v1.cri".registry.mirrors."docker.io"]
    endpoint = ["https://mirror.gcr.io"]
"#;

const V2_INLINE_TLS: &str = r#"version = 2
[plugins."io.containerd.grpc.v1.cri".registry]
  config_path = "/etc/containerd/certs.d"
  [plugins."io.containerd.grpc.v1.cri".registry.configs."my.registry".tls]
    insecure_skip_verify = true
"#;

const V2_INLINE_AUTH: &str = r#"version = 2
[plugins."io.containerd.grpc.v1.cri".registry]
  config_path = "/etc/containerd/certs.d"
  [plugins."io.containerd.grpc.v1.cri".registry.configs."my.registry".auth]
    username = "u"
"#;

const V1: &str = r#"[plugins.cri.registry]
config_path = "/opt/certs.d"
"#;

const V3_NO_PATH: &str =
    "version = 3\n[plugins.'io.containerd.cri.v1.images']\nmax_concurrent_downloads = 3\n";

struct Case {
    name: &'static str,
    text: Option<&'static str>,
    version: i64,
    config_path: ConfigPath,
    first_root: Option<&'static str>,
    conflict: bool,
}

#[test]
fn config_table() {
    let cases = [
        Case {
            name: "v2",
            text: Some(V2),
            version: 2,
            config_path: ConfigPath::Set("/etc/containerd/certs.d".into()),
            first_root: Some("/etc/containerd/certs.d"),
            conflict: false,
        },
        Case {
            name: "v3",
            text: Some(V3),
            version: 3,
            config_path: ConfigPath::Set("/etc/containerd/certs.d".into()),
            first_root: Some("/etc/containerd/certs.d"),
            conflict: false,
        },
        Case {
            name: "no config_path",
            text: Some(V2_NO_PATH),
            version: 2,
            config_path: ConfigPath::Missing,
            first_root: None,
            conflict: false,
        },
        Case {
            name: "colon list",
            text: Some(V2_COLON),
            version: 2,
            config_path: ConfigPath::Set("/etc/containerd/certs.d:/etc/docker/certs.d".into()),
            first_root: Some("/etc/containerd/certs.d"),
            conflict: false,
        },
        Case {
            name: "inline mirrors",
            text: Some(V2_INLINE_MIRRORS),
            version: 2,
            config_path: ConfigPath::Missing,
            first_root: None,
            conflict: true,
        },
        Case {
            name: "inline tls",
            text: Some(V2_INLINE_TLS),
            version: 2,
            config_path: ConfigPath::Set("/etc/containerd/certs.d".into()),
            first_root: Some("/etc/containerd/certs.d"),
            conflict: true,
        },
        Case {
            name: "inline auth is allowed",
            text: Some(V2_INLINE_AUTH),
            version: 2,
            config_path: ConfigPath::Set("/etc/containerd/certs.d".into()),
            first_root: Some("/etc/containerd/certs.d"),
            conflict: false,
        },
        Case {
            name: "v1",
            text: Some(V1),
            version: 1,
            config_path: ConfigPath::Set("/opt/certs.d".into()),
            first_root: Some("/opt/certs.d"),
            conflict: false,
        },
        Case {
            name: "v3 without config_path",
            text: Some(V3_NO_PATH),
            version: 3,
            config_path: ConfigPath::Containerd2Default,
            first_root: Some("/etc/containerd/certs.d"),
            conflict: false,
        },
        Case {
            name: "no file",
            text: None,
            version: 1,
            config_path: ConfigPath::Missing,
            first_root: None,
            conflict: false,
        },
    ];
    for c in cases {
        let cfg = ContainerdConfig::parse(Path::new("/etc/containerd/config.toml"), c.text)
            .unwrap_or_else(|e| panic!("{}: {e}", c.name));
        assert_eq!(cfg.version, c.version, "{}", c.name);
        assert_eq!(cfg.config_path, c.config_path, "{}", c.name);
        assert_eq!(
            cfg.first_root(),
            c.first_root.map(PathBuf::from),
            "{}",
            c.name
        );
        assert_eq!(cfg.conflict().is_some(), c.conflict, "{}", c.name);
    }
}

#[test]
fn colon_list_roots_in_order() {
    let cfg = ContainerdConfig::parse(Path::new("c"), Some(V2_COLON)).unwrap();
    assert_eq!(
        cfg.roots(),
        vec![
            PathBuf::from("/etc/containerd/certs.d"),
            PathBuf::from("/etc/docker/certs.d")
        ]
    );
}

#[test]
fn conflict_messages_explain() {
    let cfg = ContainerdConfig::parse(Path::new("/c.toml"), Some(V2_INLINE_MIRRORS)).unwrap();
    let msg = cfg.conflict().unwrap().to_string();
    assert!(msg.contains("registry.mirrors for docker.io"), "{msg}");
    assert!(msg.contains("`mirrors` cannot be set"), "{msg}");
    let cfg = ContainerdConfig::parse(Path::new("/c.toml"), Some(V2_INLINE_TLS)).unwrap();
    assert!(cfg.conflict().unwrap().to_string().contains("configs.tls"));
    let cfg = ContainerdConfig::parse(Path::new("/c.toml"), Some(V2_INLINE_AUTH)).unwrap();
    assert!(cfg.warnings().iter().any(|w| w.contains("deprecated")));
    let cfg = ContainerdConfig::parse(Path::new("/c.toml"), Some(V2_NO_PATH)).unwrap();
    let msg = cfg.missing_error(Path::new(DEFAULT_CERTS_DIR)).to_string();
    assert!(
        msg.contains("--patch-config") && msg.contains("restart"),
        "{msg}"
    );
}

#[test]
fn bad_configs_are_errors() {
    for (name, text) in [
        ("not toml", "version = "),
        ("version 4", "version = 4"),
        ("version string", "version = \"2\""),
        (
            "config_path int",
            "version = 2\n[plugins.\"io.containerd.grpc.v1.cri\".registry]\nconfig_path = 1\n",
        ),
    ] {
        let err = ContainerdConfig::parse(Path::new("/c.toml"), Some(text)).unwrap_err();
        assert!(
            matches!(err, Error::ContainerdConfig { .. }),
            "{name}: {err}"
        );
        assert!(!err.to_string().contains('\n'), "{name}: one line: {err}");
    }
}

#[test]
fn patch_adds_config_path_and_keeps_the_rest() {
    let dir = Path::new("/etc/containerd/certs.d");
    for (name, text) in [
        ("v2 no registry table", V2_NO_PATH),
        (
            "v2 empty config_path",
            "version = 2\n[plugins.\"io.containerd.grpc.v1.cri\".registry]\n  config_path = \"\"\n",
        ),
        ("v3 no path", V3_NO_PATH),
        ("v1", "[plugins.cri]\nstream_server_port = \"0\"\n"),
    ] {
        let cfg = ContainerdConfig::parse(Path::new("/c.toml"), Some(text)).unwrap();
        let out = patch_config_path(&cfg, Some(text), dir).unwrap();
        let again = ContainerdConfig::parse(Path::new("/c.toml"), Some(&out)).unwrap();
        assert_eq!(
            again.config_path,
            ConfigPath::Set(dir.display().to_string()),
            "{name}"
        );
        assert!(again.patched_by_hostsd, "{name}");
        assert_eq!(again.version, cfg.version, "{name}");
        // Everything that was there is still there, byte for byte, up to
        // where the patch went in.
        for line in text.lines().filter(|l| !l.contains("config_path")) {
            assert!(out.contains(line), "{name}: lost {line:?} in\n{out}");
        }
    }
}

#[test]
fn patch_creates_a_minimal_file() {
    let cfg = ContainerdConfig::parse(Path::new("/c.toml"), None).unwrap();
    let out = patch_config_path(&cfg, None, Path::new("/etc/containerd/certs.d")).unwrap();
    assert!(created_by_hostsd(&out), "{out}");
    let again = ContainerdConfig::parse(Path::new("/c.toml"), Some(&out)).unwrap();
    assert_eq!(again.version, 2);
    assert_eq!(
        again.config_path,
        ConfigPath::Set("/etc/containerd/certs.d".into())
    );
    assert!(
        out.contains("[plugins.\"io.containerd.grpc.v1.cri\".registry]"),
        "{out}"
    );
}
