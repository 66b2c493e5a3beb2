//! The CLI against a real daemon that containerd pulled a real image
//! through: every subcommand, its table (insta snapshots, with digests,
//! ports, sizes, ages and paths redacted) and its JSON (parsed and checked
//! against what was pushed), then the read-only fallback once the daemon
//! is stopped.
//!
//! Set `DAMSELFLY_CLI_DOCS=<dir>` to keep each command's real output there
//! (docs/cli.md quotes it).

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;

use common::{
    build_image_cached, push_image, write_hosts_toml, Containerd, ImageSpec, Registry, RegistryAuth,
};
use daemon::Daemon;
use damselfly_lab as common;
use damselfly_lab::daemon;
use serde_json::Value;

struct Run {
    code: i32,
    stdout: String,
    stderr: String,
}

/// Runs `damselfly <args>` with the daemon's config, as an operator would
/// with `kubectl exec`.
fn cli(config: &Path, args: &[&str]) -> Run {
    cli_with(Some(config), args)
}

/// Runs `damselfly <args>`, with `--config` only when `config` is given.
fn cli_with(config: Option<&Path>, args: &[&str]) -> Run {
    let mut cmd = Command::new(daemon::binary());
    cmd.args(args);
    if let Some(config) = config {
        cmd.arg("--config").arg(config);
    }
    let out = cmd
        .env_remove("DAMSELFLY_SOCKET")
        .env_remove("DAMSELFLY_CONFIG")
        .output()
        .expect("run damselfly");
    let run = Run {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    };
    assert!(
        !run.stderr.contains("panicked"),
        "damselfly {args:?} panicked:\n{}",
        run.stderr
    );
    if let Some(dir) = std::env::var_os("DAMSELFLY_CLI_DOCS") {
        use std::io::Write;
        let name = args.join(" ").replace(['/', ' ', ':'], "_");
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(Path::new(&dir).join(format!("{name}.txt")));
        if let Ok(mut f) = file {
            let _ = write!(
                f,
                "$ damselfly {}\n{}{}(exit {})\n\n",
                args.join(" "),
                run.stdout,
                run.stderr,
                run.code
            );
        }
    }
    run
}

fn ok(config: &Path, args: &[&str]) -> String {
    let r = cli(config, args);
    assert_eq!(r.code, 0, "damselfly {args:?}:\n{}{}", r.stdout, r.stderr);
    r.stdout
}

fn json(config: &Path, args: &[&str]) -> Value {
    let mut all = args.to_vec();
    all.extend(["-o", "json"]);
    let out = ok(config, &all);
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("{args:?} gave bad JSON ({e}):\n{out}"))
}

/// Snapshots a table with what changes between runs redacted: digests,
/// ports, sizes (the busybox layer follows the host's busybox), ages,
/// durations and temp paths. Runs of spaces collapse, since redacted cells
/// change column widths; the renderer's unit tests pin exact alignment.
fn snapshot(name: &str, text: &str) {
    insta::with_settings!({
        filters => vec![
            (r"sha256:[0-9a-f]{64}", "sha256:[digest]"),
            (r"sha256:[0-9a-f]{12}", "sha256:[short]"),
            (r"127\.0\.0\.1:\d+", "127.0.0.1:[port]"),
            (r"\d+(\.\d+)? (B|KiB|MiB|GiB)", "[size]"),
            (r"\d+[smhd] ago", "[age]"),
            (r"uptime +\S+", "uptime [duration]"),
            (r"\d+ hit, \d+ miss, \d+ joined", "[n] hit, [n] miss, [n] joined"),
            (r"\d+\.\d% of blob lookups", "[pct] of blob lookups"),
            (r"/tmp/\S+", "[path]"),
            (r" {2,}", "  "),
        ],
        prepend_module_to_snapshot => false,
    }, {
        insta::assert_snapshot!(name, text);
    });
}

fn digests(v: &Value, key: &str) -> Vec<String> {
    v[key]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["digest"].as_str().unwrap().to_owned())
        .collect()
}

#[test]
fn every_subcommand_against_a_daemon_that_pulled_an_image() {
    common::require_tools();
    let reg = Registry::start(RegistryAuth::None).expect("registry");
    let layout = build_image_cached(&ImageSpec::small()).expect("build image");
    let img = push_image(&layout, &reg, "cli/small", "v1", None).expect("push image");
    let mut d = Daemon::start(&format!(
        "[[registry]]\nhost = \"{}\"\nendpoint = \"{}\"\n",
        reg.host(),
        reg.url()
    ));
    let cfg = d.config_path.clone();
    let socket = d.store_dir().join("admin.sock");
    let mode = std::fs::metadata(&socket)
        .expect("admin socket")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600, "the admin socket is owner-only");

    let hosts = tempfile::tempdir().unwrap();
    write_hosts_toml(hosts.path(), &reg.host(), &d.url()).unwrap();
    let ctr = Containerd::start().unwrap();
    let out = ctr.pull(&img.reference, hosts.path(), &[]).unwrap();
    assert!(out.success(), "pull: {out:?}\n{}", d.log_tail(30));

    // cache ls: every blob of the image, with its kind, source and image.
    let ls = json(&cfg, &["cache", "ls"]);
    let blobs = ls["blobs"].as_array().unwrap();
    assert_eq!(blobs.len(), 2 + img.layers.len(), "{ls:#}");
    let by_digest = |dg: &str| blobs.iter().find(|b| b["digest"] == dg).unwrap().clone();
    for (digest, size) in &img.layers {
        let b = by_digest(digest);
        assert_eq!(b["size"], *size);
        assert_eq!(b["kind"], "layer");
        assert_eq!(b["pinned"], false);
        assert_eq!(b["source"]["from"], "origin");
        assert_eq!(b["source"]["registry"], reg.host().as_str());
        assert_eq!(b["source"]["repository"], "cli/small");
        assert_eq!(b["images"], serde_json::json!([img.reference]));
        assert!(b["media_type"].as_str().unwrap().contains("layer"));
    }
    assert_eq!(by_digest(&img.config_digest)["kind"], "config");
    let manifest = by_digest(&img.manifest_digest);
    assert_eq!(manifest["kind"], "manifest");
    assert_eq!(manifest["media_type"], img.manifest_media_type.as_str());
    snapshot("cache_ls", &ok(&cfg, &["cache", "ls", "--sort", "size"]));
    let big = json(
        &cfg,
        &["cache", "ls", "--min-size", "1MiB", "--sort", "size"],
    );
    assert_eq!(big["blobs"].as_array().unwrap().len(), 3, "{big:#}");
    assert!(big["blobs"][0]["size"].as_u64() >= big["blobs"][1]["size"].as_u64());

    // cache inspect, a blob and the image.
    let (layer, layer_size) = img.layers[1].clone();
    let b = json(&cfg, &["cache", "inspect", &layer]);
    assert_eq!(b["type"], "blob");
    assert_eq!(b["state"], "committed");
    assert_eq!(b["size"], layer_size);
    assert_eq!(b["holders"], serde_json::json!(["local"]));
    assert_eq!(b["readers"], 0);
    snapshot(
        "cache_inspect_blob",
        &ok(&cfg, &["cache", "inspect", &layer]),
    );
    let i = json(&cfg, &["cache", "inspect", &img.reference]);
    assert_eq!(i["type"], "image");
    assert_eq!(i["digest"], img.manifest_digest.as_str());
    assert_eq!(i["layers"], img.layers.len());
    assert_eq!(i["layers_present"], img.layers.len());
    assert_eq!(i["complete"], 1.0);
    snapshot(
        "cache_inspect_image",
        &ok(&cfg, &["cache", "inspect", &img.reference]),
    );
    let absent = json(
        &cfg,
        &["cache", "inspect", &format!("sha256:{}", "0".repeat(64))],
    );
    assert_eq!(absent["state"], "absent");

    // cache stats and images.
    let s = json(&cfg, &["cache", "stats"]);
    let stored = img.total_size + img.manifest.len() as u64;
    assert_eq!(s["used_bytes"], stored);
    assert_eq!(s["blobs"], 2 + img.layers.len());
    assert_eq!(s["daemon"]["bytes_served"]["origin"], img.total_size);
    assert_eq!(s["daemon"]["origin_bytes"], img.total_size);
    assert!(
        s["daemon"]["blob_lookups"]["miss"].as_u64().unwrap() >= img.blob_digests().len() as u64
    );
    snapshot("cache_stats", &ok(&cfg, &["cache", "stats"]));
    let images = json(&cfg, &["images"]);
    assert_eq!(images["images"][0]["reference"], img.reference.as_str());
    assert_eq!(images["images"][0]["complete"], 1.0);
    assert_eq!(
        images["images"][0]["layer_bytes"],
        img.total_size - img.config_size
    );
    snapshot("images", &ok(&cfg, &["images"]));

    // peers, before the swarm.
    let p = json(&cfg, &["peers"]);
    assert_eq!(p["swarm"], "disabled");
    assert_eq!(p["peers"], serde_json::json!([]));
    snapshot("peers", &ok(&cfg, &["peers"]));

    // cache verify finds a blob corrupted on disk; --repair removes it and
    // the next pull fetches it again from the origin.
    let (victim, _) = img.layers[2].clone();
    let path = d.blob_path(&victim);
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[100] ^= 0xff;
    std::fs::write(&path, &bytes).unwrap();
    let r = cli(&cfg, &["cache", "verify", "-o", "json"]);
    assert_eq!(r.code, 4, "{}{}", r.stdout, r.stderr);
    let v: Value = serde_json::from_str(&r.stdout).unwrap();
    assert_eq!(digests(&v, "corrupt"), vec![victim.clone()]);
    assert_eq!(v["corrupt"][0]["removed"], false);
    assert!(path.exists());
    let r = cli(&cfg, &["cache", "verify"]);
    assert_eq!(r.code, 4);
    snapshot("cache_verify_corrupt", &r.stdout);
    let v = json(&cfg, &["cache", "verify", "--repair"]);
    assert_eq!(v["corrupt"][0]["removed"], true);
    assert!(!path.exists());
    let mark = reg.mark();
    let again = Containerd::start().unwrap();
    let out = again.pull(&img.reference, hosts.path(), &[]).unwrap();
    assert!(
        out.success(),
        "pull after repair: {out:?}\n{}",
        d.log_tail(30)
    );
    let refetched: Vec<_> = reg
        .requests_since(mark)
        .into_iter()
        .filter(|r| r.is_blob_get())
        .map(|r| r.digest().unwrap_or_default().to_owned())
        .collect();
    assert_eq!(
        refetched,
        vec![victim.clone()],
        "only the repaired blob comes from the origin"
    );
    assert!(path.exists());
    let v = json(&cfg, &["cache", "verify"]);
    assert_eq!(v["corrupt"], serde_json::json!([]));
    snapshot("cache_verify_clean", &ok(&cfg, &["cache", "verify"]));

    // pin / unpin an image: every blob of it.
    let pinned = json(&cfg, &["cache", "pin", &img.reference]);
    assert_eq!(
        pinned["digests"].as_array().unwrap().len(),
        2 + img.layers.len()
    );
    let only = json(&cfg, &["cache", "ls", "--pinned"]);
    assert_eq!(
        only["blobs"].as_array().unwrap().len(),
        2 + img.layers.len()
    );
    snapshot(
        "cache_unpin",
        &ok(&cfg, &["cache", "unpin", &img.reference]),
    );
    let again = json(&cfg, &["cache", "unpin", &img.reference]);
    assert_eq!(again["changed"], false);

    // gc --target frees down to the target; the pinned layer survives.
    let (keep, keep_size) = img.layers[2].clone();
    snapshot("cache_pin", &ok(&cfg, &["cache", "pin", &keep]));
    let dry = json(
        &cfg,
        &[
            "cache",
            "gc",
            "--dry-run",
            "--target",
            &keep_size.to_string(),
        ],
    );
    assert_eq!(
        dry["evicted"].as_array().unwrap().len(),
        1 + img.layers.len()
    );
    assert_eq!(
        json(&cfg, &["cache", "ls"])["blobs"]
            .as_array()
            .unwrap()
            .len(),
        2 + img.layers.len()
    );
    snapshot(
        "cache_gc_dry_run",
        &ok(
            &cfg,
            &[
                "cache",
                "gc",
                "--dry-run",
                "--target",
                &keep_size.to_string(),
            ],
        ),
    );
    let gc = json(&cfg, &["cache", "gc", "--target", &keep_size.to_string()]);
    assert_eq!(gc["after"], keep_size);
    assert_eq!(gc["reached"], true);
    assert_eq!(gc["kept_pinned_blobs"], 1);
    assert!(d.blob_path(&keep).exists());
    for digest in img.blob_digests().iter().filter(|x| **x != keep) {
        assert!(!d.blob_path(digest).exists(), "{digest} survived gc");
    }
    let left = json(&cfg, &["cache", "ls"]);
    assert_eq!(digests(&left, "blobs"), vec![keep.clone()]);
    assert_eq!(left["blobs"][0]["pinned"], true);
    let zero = json(&cfg, &["cache", "gc", "--target", "0"]);
    assert_eq!(zero["reached"], false);
    assert!(
        d.blob_path(&keep).exists(),
        "pinned content is never collected"
    );

    // Bad input: a clear error and exit 2; an image never seen: exit 1.
    let r = cli(&cfg, &["cache", "inspect", "sha256:nothex"]);
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(
        r.stderr.starts_with("damselfly: invalid digest"),
        "{}",
        r.stderr
    );
    let r = cli(&cfg, &["cache", "pin", "Not/A/Valid:ref!"]);
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(r.stderr.contains("invalid image reference"), "{}", r.stderr);
    let r = cli(&cfg, &["cache", "inspect", "127.0.0.1:1/never/pulled:v1"]);
    assert_eq!(r.code, 1, "{}", r.stderr);
    assert!(
        r.stderr.contains("has not been pulled through this node"),
        "{}",
        r.stderr
    );
    let r = cli(&cfg, &["cache", "gc", "--target", "lots"]);
    assert_eq!(r.code, 2, "{}", r.stderr);

    // The daemon stops: its socket goes, read-only commands still answer
    // from the store, and mutations take the store's lock.
    let status = d.terminate().expect("daemon was running");
    assert!(status.success());
    assert!(!socket.exists(), "the socket is removed on shutdown");
    let r = cli(&cfg, &["cache", "ls", "-o", "json"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(r.stderr.contains("no daemon answers"), "{}", r.stderr);
    let offline: Value = serde_json::from_str(&r.stdout).unwrap();
    assert_eq!(digests(&offline, "blobs"), vec![keep.clone()]);
    assert_eq!(offline["blobs"][0]["pinned"], true);
    let s = json(&cfg, &["cache", "stats"]);
    assert_eq!(s["daemon"], Value::Null);
    assert_eq!(s["used_bytes"], keep_size);
    snapshot("cache_stats_offline", &ok(&cfg, &["cache", "stats"]));
    // gc took the (unpinned) manifest too: the tag is still known, its
    // layers no longer are.
    let i = json(&cfg, &["cache", "inspect", &img.reference]);
    assert_eq!(i["manifest"], Value::Null);
    assert_eq!(i["complete"], 0.0);
    assert_eq!(
        json(&cfg, &["images"])["images"][0]["reference"],
        img.reference.as_str()
    );
    assert_eq!(json(&cfg, &["cache", "verify"])["checked"], 1);
    let unpin = json(&cfg, &["cache", "unpin", &keep]);
    assert_eq!(unpin["changed"], true);
    assert_eq!(
        json(&cfg, &["cache", "ls", "--pinned"])["blobs"],
        serde_json::json!([])
    );
    assert_eq!(json(&cfg, &["peers"])["swarm"], "disabled");
}

#[test]
fn without_a_daemon_or_a_store_errors_are_clear() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("damselfly.toml");
    let store = dir.path().join("nothing-here");
    std::fs::write(&config, format!("[store]\ndir = \"{}\"\n", store.display())).unwrap();
    for args in [&["cache", "ls"][..], &["cache", "gc"], &["images"]] {
        let r = cli(&config, args);
        assert_eq!(r.code, 3, "{args:?}: {}", r.stderr);
        assert!(
            r.stderr.contains("cannot reach the daemon on"),
            "{}",
            r.stderr
        );
        assert!(r.stderr.contains("admin.sock"), "{}", r.stderr);
    }
    assert!(!store.exists(), "nothing was created");
    // Input is checked before anything is contacted.
    assert_eq!(cli(&config, &["cache", "inspect", "sha256:abc"]).code, 2);
    let r = cli(&config, &["cache", "ls", "--sort", "nonsense"]);
    assert_eq!(r.code, 2);
    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, "[admin]\nsocket = 3\n").unwrap();
    let r = cli(&bad, &["cache", "stats"]);
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(r.stderr.contains("admin.socket"), "{}", r.stderr);
}

/// With the daemon stopped, the CLI opens the store itself: that must never
/// evict on its own (the scenario: a daemon configured far above the
/// built-in quota is stopped, and `cache pin` would first evict down to the
/// default), and `cache gc` without `--target` needs to know the quota.
#[test]
fn offline_maintenance_never_evicts_and_gc_needs_the_quota() {
    use damselfly::oci::Digest;
    use damselfly::store::Store;
    use sha2::Digest as _;

    let dir = tempfile::tempdir().unwrap();
    let store_dir = dir.path().join("store");
    let blobs: Vec<(Digest, Vec<u8>)> = (0..3u8)
        .map(|i| {
            let bytes = vec![i; 4096];
            (Digest::from_sha256(&sha2::Sha256::digest(&bytes)), bytes)
        })
        .collect();
    {
        let (store, _) = Store::open(&store_dir, u64::MAX).unwrap();
        for (d, bytes) in &blobs {
            store.put_small(d, bytes, None).unwrap();
        }
    }
    let path = |d: &Digest| store_dir.join("blobs/sha256").join(d.hex());
    let all_there = |when: &str| {
        for (d, _) in &blobs {
            assert!(path(d).exists(), "{d} was evicted by {when}");
        }
    };
    // The daemon's config has a quota far below what the store holds.
    let config = dir.path().join("damselfly.toml");
    std::fs::write(
        &config,
        format!(
            "[store]\ndir = \"{}\"\nmax_size = \"4KiB\"\n",
            store_dir.display()
        ),
    )
    .unwrap();
    let store_arg = store_dir.to_str().unwrap();
    let first = blobs[0].0.to_string();

    let r = cli(&config, &["cache", "pin", &first]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(r.stderr.contains("with its lock"), "{}", r.stderr);
    all_there("cache pin");
    let r = cli(&config, &["cache", "unpin", &first]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    all_there("cache unpin");
    let r = cli_with(None, &["cache", "pin", &first, "--store", store_arg]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    all_there("cache pin without a config");

    // No config file: the quota is unknown, so gc needs --target.
    for args in [
        &["cache", "gc", "--store", store_arg][..],
        &["cache", "gc", "--dry-run", "--store", store_arg],
    ] {
        let r = cli_with(None, args);
        assert_eq!(r.code, 2, "{args:?}: {}{}", r.stdout, r.stderr);
        assert!(
            r.stderr.contains("quota is unknown") && r.stderr.contains("--target"),
            "{}",
            r.stderr
        );
        all_there("cache gc without a quota");
    }
    let r = cli_with(
        None,
        &["cache", "gc", "--store", store_arg, "--target", "1000000"],
    );
    assert_eq!(r.code, 0, "{}", r.stderr);
    all_there("cache gc above the store's size");

    // With the config, gc frees down to its quota; the pin holds.
    let r = cli(&config, &["cache", "gc", "-o", "json"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let gc: Value = serde_json::from_str(&r.stdout).unwrap();
    assert_eq!(gc["target"], 4096);
    assert_eq!(gc["after"], 4096);
    assert!(path(&blobs[0].0).exists(), "the pinned blob stays");
    assert!(blobs[1..].iter().all(|(d, _)| !path(d).exists()));
}

#[test]
fn help_has_examples_and_completions_are_generated() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("none.toml");
    std::fs::write(&cfg, "").unwrap();
    let help = Command::new(daemon::binary())
        .args(["cache", "--help"])
        .output()
        .unwrap();
    let help = String::from_utf8_lossy(&help.stdout);
    assert!(
        help.contains("Examples:") && help.contains("Exit codes:"),
        "{help}"
    );
    for sub in ["ls", "inspect", "stats", "verify", "gc", "pin", "unpin"] {
        let out = Command::new(daemon::binary())
            .args(["cache", sub, "--help"])
            .output()
            .unwrap();
        assert!(
            String::from_utf8_lossy(&out.stdout).contains("Examples:"),
            "cache {sub}"
        );
    }
    for shell in ["bash", "zsh", "fish"] {
        let out = Command::new(daemon::binary())
            .args(["completions", shell])
            .output()
            .unwrap();
        assert!(out.status.success());
        assert!(
            String::from_utf8_lossy(&out.stdout).contains("cache"),
            "{shell}"
        );
    }
    let _ = cfg;
}
