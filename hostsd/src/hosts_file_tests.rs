use super::*;

const MIRROR: &str = "http://127.0.0.1:4001";

fn desired<'a>(server: Option<&'a str>, has_original: bool) -> Desired<'a> {
    Desired {
        mirror: MIRROR,
        dial_timeout: "500ms",
        server_override: None,
        default_server: server,
        has_original,
    }
}

fn origins(text: &str) -> Vec<String> {
    decode(text)
        .unwrap_or_else(|e| panic!("{e}\n{text}"))
        .iter()
        .map(HostEntry::origin)
        .collect()
}

#[test]
fn decode_keeps_file_order_not_key_order() {
    let text = r#"
server = "https://registry.example"
[host."https://zzz.example"]
  capabilities = ["pull"]
[host."https://aaa.example"]
  capabilities = ["pull", "resolve"]
"#;
    let hosts = decode(text).unwrap();
    assert_eq!(
        hosts.iter().map(HostEntry::origin).collect::<Vec<_>>(),
        [
            "https://zzz.example",
            "https://aaa.example",
            "https://registry.example"
        ]
    );
    assert!(hosts[2].is_server);
    assert_eq!(hosts[0].capabilities.to_string(), "pull");
    // No capabilities given: containerd allows everything.
    assert_eq!(hosts[2].capabilities.to_string(), "pull,resolve,push");
    assert_eq!(hosts[0].path, "/v2");
}

#[test]
fn decode_table() {
    struct Case {
        name: &'static str,
        text: &'static str,
        want: Result<&'static [&'static str], &'static str>,
    }
    let cases = [
        Case {
            name: "server without host table (the containerd 1.6 trap)",
            text: "server = \"https://r.example\"\n",
            want: Err("invalid `host` tree"),
        },
        Case {
            name: "empty file has no host tree either",
            text: "",
            want: Err("invalid `host` tree"),
        },
        Case {
            name: "scheme-less host key means https",
            text: "[host.\"mirror.example:5000\"]\n",
            want: Ok(&["https://mirror.example:5000", "<registry default>"]),
        },
        Case {
            name: "unknown capability",
            text: "[host.\"http://m\"]\ncapabilities = [\"pull\", \"fetch\"]\n",
            want: Err("unknown capability"),
        },
        Case {
            name: "capabilities not an array",
            text: "[host.\"http://m\"]\ncapabilities = \"pull\"\n",
            want: Err("array of strings"),
        },
        Case {
            name: "ca wrong type",
            text: "[host.\"http://m\"]\nca = 1\n",
            want: Err("`ca`"),
        },
        Case {
            name: "client pairs",
            text: "[host.\"https://m\"]\nclient = [[\"c.pem\", \"k.pem\"], \"both.pem\"]\n",
            want: Ok(&["https://m", "<registry default>"]),
        },
        Case {
            name: "client pair of three",
            text: "[host.\"https://m\"]\nclient = [[\"a\", \"b\", \"c\"]]\n",
            want: Err("`client`"),
        },
        Case {
            name: "header values",
            text: "[host.\"https://m\"]\n[host.\"https://m\".header]\nx-a = \"1\"\nx-b = [\"2\", \"3\"]\n",
            want: Ok(&["https://m", "<registry default>"]),
        },
        Case {
            name: "header number",
            text: "[host.\"https://m\".header]\nx-a = 1\n",
            want: Err("header"),
        },
        Case {
            name: "bad dial_timeout (containerd 2.1+ rejects it)",
            text: "[host.\"http://m\"]\ndial_timeout = \"1 second\"\n",
            want: Err("dial timeout"),
        },
        Case {
            name: "host entry not a table",
            text: "host = { \"http://m\" = 1 }\n",
            want: Err("not a table"),
        },
        Case {
            name: "inline host tables",
            text: "host = { \"http://m\" = { capabilities = [\"pull\"] } }\n",
            want: Ok(&["http://m", "<registry default>"]),
        },
        Case {
            name: "not toml",
            text: "[host.\"http://m\"\n",
            want: Err("not TOML"),
        },
        Case {
            name: "skip_verify as string",
            text: "[host.\"https://m\"]\nskip_verify = \"true\"\n",
            want: Err("skip_verify"),
        },
    ];
    for c in cases {
        let got = decode(c.text);
        match (c.want, got) {
            (Ok(want), Ok(hosts)) => {
                let got: Vec<String> = hosts.iter().map(HostEntry::origin).collect();
                assert_eq!(got, want, "{}", c.name);
            }
            (Err(want), Err(e)) => {
                assert!(e.to_string().contains(want), "{}: {e}", c.name)
            }
            (want, got) => panic!("{}: want {want:?}, got {got:?}", c.name),
        }
    }
}

#[test]
fn paths_get_v2_unless_overridden() {
    let text = r#"
[host."https://a.example/prefix/"]
[host."https://b.example/custom"]
override_path = true
[host."https://c.example/x/v2"]
"#;
    let paths: Vec<String> = decode(text).unwrap().into_iter().map(|h| h.path).collect();
    assert_eq!(paths, ["/prefix/v2", "/custom", "/x/v2", "/v2"]);
}

#[test]
fn fresh_files_per_registry() {
    struct Case {
        name: &'static str,
        server: Option<&'static str>,
        want_server_line: Option<&'static str>,
        want_origins: &'static [&'static str],
    }
    let cases = [
        Case {
            name: "docker.io",
            server: Some("https://registry-1.docker.io"),
            want_server_line: Some("server = \"https://registry-1.docker.io\""),
            want_origins: &[MIRROR, "https://registry-1.docker.io"],
        },
        Case {
            name: "ECR",
            server: Some("https://123456789012.dkr.ecr.us-east-1.amazonaws.com"),
            want_server_line: Some(
                "server = \"https://123456789012.dkr.ecr.us-east-1.amazonaws.com\"",
            ),
            want_origins: &[
                MIRROR,
                "https://123456789012.dkr.ecr.us-east-1.amazonaws.com",
            ],
        },
        Case {
            name: "_default has no server: containerd uses each registry's own",
            server: None,
            want_server_line: None,
            want_origins: &[MIRROR, "<registry default>"],
        },
    ];
    for c in cases {
        let r = render(&desired(c.server, false), None).unwrap();
        assert!(is_managed(r.text.as_bytes()), "{}", c.name);
        assert!(r
            .text
            .lines()
            .next()
            .unwrap()
            .contains("no hosts.toml here before"));
        match c.want_server_line {
            Some(line) => assert!(r.text.contains(line), "{}:\n{}", c.name, r.text),
            None => assert!(
                !r.text.lines().any(|l| l.starts_with("server")),
                "{}:\n{}",
                c.name,
                r.text
            ),
        }
        assert_eq!(origins(&r.text), c.want_origins, "{}", c.name);
        let hosts = decode(&r.text).unwrap();
        assert_eq!(hosts[0].capabilities.to_string(), "pull,resolve");
        assert_eq!(hosts[0].dial_timeout.as_deref(), Some("500ms"));
        assert!(r.notes.is_empty(), "{}: {:?}", c.name, r.notes);
    }
}

#[test]
fn fresh_file_is_exactly_this() {
    let r = render(&desired(Some("https://ghcr.io"), false), None).unwrap();
    assert_eq!(
        r.text,
        "# managed by damselfly hostsd; do not edit (there was no hosts.toml here before)\n\
         # containerd tries each [host] below in order, then `server`.\n\
         \n\
         server = \"https://ghcr.io\"\n\
         \n\
         [host.\"http://127.0.0.1:4001\"]\n\
         capabilities = [\"pull\", \"resolve\"]\n\
         dial_timeout = \"500ms\"\n"
    );
}

const FOREIGN_CA: &str = r#"# corporate registry, hand-written
server = "https://registry.corp.example"
ca = "/etc/pki/corp-ca.pem"
skip_verify = false

[host."https://cache.corp.example"]
  capabilities = ["pull", "resolve"]
  ca = ["/etc/pki/corp-ca.pem", "/etc/pki/extra.pem"]
"#;

const FOREIGN_HEADERS: &str = r#"server = "https://ghcr.io"

[host."https://b-proxy.example"]
  capabilities = ["pull"]
  [host."https://b-proxy.example".header]
    x-proxy-token = "secret"
    x-multi = ["1", "2"]

[host."https://a-proxy.example"]
  skip_verify = true

[header]
  x-root = "kept"
"#;

#[test]
fn foreign_files_are_merged_after_the_mirror() {
    struct Case {
        name: &'static str,
        foreign: &'static str,
        want_origins: &'static [&'static str],
        want_lines: &'static [&'static str],
        want_notes: &'static [&'static str],
    }
    let cases = [
        Case {
            name: "foreign with a CA",
            foreign: FOREIGN_CA,
            want_origins: &[MIRROR, "https://cache.corp.example", "https://registry.corp.example"],
            want_lines: &[
                "server = \"https://registry.corp.example\"",
                "ca = \"/etc/pki/corp-ca.pem\"",
                "skip_verify = false",
                "  ca = [\"/etc/pki/corp-ca.pem\", \"/etc/pki/extra.pem\"]",
                "# corporate registry, hand-written",
            ],
            want_notes: &["kept the original's settings: ca, skip_verify", "kept the original's server"],
        },
        Case {
            name: "foreign with headers, hosts in file order",
            foreign: FOREIGN_HEADERS,
            want_origins: &[MIRROR, "https://b-proxy.example", "https://a-proxy.example", "https://ghcr.io"],
            want_lines: &[
                "    x-proxy-token = \"secret\"",
                "    x-multi = [\"1\", \"2\"]",
                "  skip_verify = true",
                "[header]",
                "  x-root = \"kept\"",
            ],
            want_notes: &["kept the original's settings: header"],
        },
        Case {
            name: "foreign that names our mirror already",
            foreign: "[host.\"http://127.0.0.1:4001/\"]\ncapabilities = [\"pull\"]\n[host.\"https://other\"]\n",
            want_origins: &[MIRROR, "https://other", "https://ghcr.io"],
            want_lines: &[],
            want_notes: &["replaced the original's own"],
        },
        Case {
            name: "foreign with the server-only trap",
            foreign: "server = \"https://ghcr.io\"\nskip_verify = true\n",
            want_origins: &[MIRROR, "https://ghcr.io"],
            want_lines: &["skip_verify = true"],
            want_notes: &["containerd 1.6 ignored it"],
        },
    ];
    for c in cases {
        let r = render(&desired(Some("https://ghcr.io"), true), Some(c.foreign))
            .unwrap_or_else(|e| panic!("{}: {e}", c.name));
        assert!(
            r.text
                .lines()
                .next()
                .unwrap()
                .contains("original saved as hosts.toml.damselfly-orig"),
            "{}",
            c.name
        );
        assert_eq!(origins(&r.text), c.want_origins, "{}:\n{}", c.name, r.text);
        for line in c.want_lines {
            assert!(
                r.text.lines().any(|l| l == *line),
                "{}: missing {line:?} in\n{}",
                c.name,
                r.text
            );
        }
        for note in c.want_notes {
            assert!(
                r.notes.iter().any(|n| n.contains(note)),
                "{}: no note {note:?} in {:?}",
                c.name,
                r.notes
            );
        }
        // Rendering is deterministic: the daemon's reconcile loop relies on
        // byte equality to leave files alone.
        let again = render(&desired(Some("https://ghcr.io"), true), Some(c.foreign)).unwrap();
        assert_eq!(again.text, r.text, "{}", c.name);
    }
}

#[test]
fn server_override_wins_over_a_foreign_server() {
    let d = Desired {
        server_override: Some("http://127.0.0.1:5000"),
        ..desired(Some("https://127.0.0.1:5000"), true)
    };
    let r = render(&d, Some(FOREIGN_CA)).unwrap();
    assert_eq!(
        origins(&r.text).last().map(String::as_str),
        Some("http://127.0.0.1:5000")
    );
    assert!(r
        .notes
        .iter()
        .any(|n| n.contains("replaces the original's")));
}

#[test]
fn undecodable_foreign_files_are_refused() {
    for bad in [
        "server = [",
        "[host.\"http://m\"]\ncapabilities = [\"fly\"]\n",
    ] {
        assert!(
            render(&desired(Some("https://x"), true), Some(bad)).is_err(),
            "{bad}"
        );
    }
}

#[test]
fn managed_marker() {
    assert!(is_managed(
        b"# managed by damselfly hostsd; do not edit (x)\n"
    ));
    assert!(!is_managed(
        b"server = \"x\"\n# managed by damselfly hostsd"
    ));
}
