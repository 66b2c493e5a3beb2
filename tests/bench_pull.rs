//! `damselfly bench pull` end to end: a real daemon in front of a real
//! `docker-registry`, the image built with umoci and pushed with skopeo, and
//! a real containerd for the CRI timing.

use std::process::Command;

use common::{
    build_image_cached, push_image, write_hosts_toml, Containerd, ImageSpec, Registry, RegistryAuth,
};
use daemon::Daemon;
use damselfly_lab as common;
use damselfly_lab::daemon;

struct Run {
    code: i32,
    stdout: String,
    stderr: String,
}

fn bench(d: &Daemon, args: &[&str]) -> Run {
    let out = Command::new(daemon::binary())
        .args(["bench", "pull", "--config"])
        .arg(&d.config_path)
        .args(args)
        .output()
        .expect("run damselfly bench pull");
    Run {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

fn json(r: &Run) -> serde_json::Value {
    serde_json::from_str(&r.stdout)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {}\n{}", r.stdout, r.stderr))
}

#[test]
fn cold_then_warm_then_a_forced_origin_touch() {
    common::require_tools();
    let reg = Registry::start(RegistryAuth::None).expect("registry");
    let layout = build_image_cached(&ImageSpec::small()).expect("build image");
    let img = push_image(&layout, &reg, "bench/small", "v1", None).expect("push image");
    let d = Daemon::start(&format!(
        "[[registry]]\nhost = \"{}\"\nendpoint = \"{}\"\n",
        reg.host(),
        reg.url()
    ));

    // First pull: everything comes from the origin.
    let mark = reg.mark();
    let cold = bench(&d, &["-o", "json", &img.reference]);
    assert_eq!(cold.code, 0, "{}\n{}", cold.stderr, d.log_tail(20));
    let v = json(&cold);
    let run = &v["runs"][0];
    let bytes = run["bytes"].as_u64().unwrap();
    assert!(bytes > 0);
    assert_eq!(run["sources"]["origin"].as_u64(), Some(bytes), "{v}");
    assert_eq!(v["manifest"], img.manifest_digest.as_str());
    assert!(run["ttfb_ms"].as_f64().unwrap() > 0.0);
    assert!(
        run["blobs"].as_array().unwrap().len() >= 2,
        "config and layers: {v}"
    );
    let origin_blob_bytes: u64 = reg
        .requests_since(mark)
        .iter()
        .filter(|r| r.is_blob_get())
        .map(|r| r.bytes)
        .sum();
    assert_eq!(
        origin_blob_bytes, bytes,
        "the report agrees with the origin's own log"
    );

    // Warm: nothing from the origin, and the verdict passes.
    let mark = reg.mark();
    let warm = bench(
        &d,
        &["--expect-warm", "--runs", "2", "-o", "json", &img.reference],
    );
    assert_eq!(warm.code, 0, "{}\n{}", warm.stdout, warm.stderr);
    let v = json(&warm);
    assert_eq!(v["runs"].as_array().unwrap().len(), 2);
    for run in v["runs"].as_array().unwrap() {
        assert_eq!(run["sources"]["origin"], 0, "{v}");
        assert_eq!(run["sources"]["local"].as_u64(), Some(bytes), "{v}");
        for b in run["blobs"].as_array().unwrap() {
            assert_eq!(b["source"], "local", "{v}");
        }
    }
    assert_eq!(v["verdict"]["pass"], true);
    assert!(
        v["verdict"]["message"].as_str().unwrap().ends_with("PASS"),
        "{v}"
    );
    assert!(
        reg.requests_since(mark).iter().all(|r| !r.is_blob_get()),
        "a warm run sent no blob request to the origin"
    );

    // --cold evicts: a run marked warm that touched the origin fails.
    let forced = bench(&d, &["--cold", "--expect-warm", &img.reference]);
    assert_eq!(forced.code, 5, "{}\n{}", forced.stdout, forced.stderr);
    assert!(forced.stdout.contains("FAIL"), "{}", forced.stdout);
    assert!(
        forced.stdout.contains("from the origin"),
        "{}",
        forced.stdout
    );
    let again = bench(&d, &["--cold", "-o", "json", &img.reference]);
    let v = json(&again);
    assert!(v["runs"][0]["evicted"].as_u64().unwrap() >= 2, "{v}");
    assert_eq!(
        v["runs"][0]["sources"]["origin"].as_u64(),
        Some(bytes),
        "{v}"
    );

    // containerd's own PullImage over CRI, through the same mirror.
    let hosts = tempfile::tempdir().unwrap();
    write_hosts_toml(hosts.path(), &reg.host(), &d.url()).unwrap();
    let c = Containerd::start_with_hosts_dir(hosts.path()).expect("containerd");
    let socket = c.socket().to_str().unwrap().to_owned();
    let cri = bench(&d, &["--cri-socket", &socket, "-o", "json", &img.reference]);
    assert_eq!(
        cri.code,
        0,
        "{}\n{}\n{}",
        cri.stderr,
        d.log_tail(20),
        c.log_tail(20)
    );
    let v = json(&cri);
    assert!(v["runs"][0]["cri_pull_ms"].as_f64().unwrap() > 0.0, "{v}");
    // The CRI plugin keeps its images in the k8s.io namespace.
    let listed = c.ctr(&["-n", "k8s.io", "images", "ls", "-q"]).unwrap();
    assert!(
        listed.stdout.contains("bench/small"),
        "containerd has the image after the CRI pull: {listed:?}"
    );

    // The table, for people.
    let table = bench(&d, &[&img.reference]);
    assert_eq!(table.code, 0);
    assert!(
        table.stdout.contains("RESOLVE") && table.stdout.contains("100% cache"),
        "{}",
        table.stdout
    );
}

#[test]
fn bad_input_is_a_usage_error() {
    let d = Daemon::start("");
    let r = bench(&d, &["not a reference!"]);
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(r.stderr.contains("invalid image reference"), "{}", r.stderr);
    let r = bench(&d, &["--runs", "0", "127.0.0.1:1/x:y"]);
    assert_eq!(r.code, 2, "{}", r.stderr);
    // A registry the mirror does not serve: a clear error, not a panic.
    let r = bench(&d, &["127.0.0.1:1/x:y"]);
    assert_eq!(r.code, 1, "{}", r.stderr);
    assert!(r.stderr.contains("mirror at"), "{}", r.stderr);
}
