//! The daemon wires a real containerd to itself with hostsd at start-up
//! (`[containerd] configure_hosts`), and the kubelet's path, a CRI
//! `PullImage`, then goes through the mirror. With the daemon stopped, the
//! same files make containerd fall back to the origin.

use std::path::Path;
use std::time::{Duration, Instant};

use common::{
    build_image_cached, cri_pull, push_image, write_direct_hosts_toml, Containerd, ImageSpec,
    Registry, RegistryAuth,
};
use daemon::Daemon;
use damselfly_lab as common;
use damselfly_lab::daemon;

fn wait_for_file(path: &Path, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    while !path.exists() {
        assert!(
            Instant::now() < deadline,
            "{} never appeared",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn timed(f: impl FnOnce() -> Result<(), String>) -> Duration {
    let t = Instant::now();
    f().expect("pull");
    t.elapsed()
}

#[test]
fn cri_pull_goes_through_the_mirror_and_falls_back_when_it_is_down() {
    common::require_tools();
    let reg = Registry::start(RegistryAuth::None).expect("registry");
    let layout = build_image_cached(&ImageSpec::small()).expect("image");
    let img = push_image(&layout, &reg, "wired/app", "v1", None).expect("push");
    let img2 = push_image(&layout, &reg, "wired/other", "v1", None).expect("push");

    let c = Containerd::start().expect("containerd");
    let mut d = Daemon::start(&format!(
        "[containerd]\nconfigure_hosts = true\nconfig = \"{}\"\n\
         [[registry]]\nhost = \"{}\"\nendpoint = \"{}\"\n",
        c.config_path().display(),
        reg.host(),
        reg.url()
    ));
    let hosts_toml = c.hosts_dir().join(reg.host()).join("hosts.toml");
    wait_for_file(&hosts_toml, Duration::from_secs(10));
    let text = std::fs::read_to_string(&hosts_toml).unwrap();
    assert!(text.contains(&format!("[host.\"{}\"]", d.url())), "{text}");
    assert!(
        text.contains(&format!("server = \"{}\"", reg.url())),
        "{text}"
    );

    // The kubelet's path: CRI PullImage reads config_path.
    let mark = reg.mark();
    let through_mirror = timed(|| cri_pull(c.socket(), &img.reference));
    let seen = reg.requests_in_repo("wired/app", mark);
    let blob_gets: Vec<_> = seen.iter().filter(|r| r.is_blob_get()).collect();
    assert_eq!(blob_gets.len(), img.blob_digests().len(), "{seen:#?}");
    assert!(
        seen.iter().all(|r| r.user_agent.starts_with("damselfly/")),
        "the CRI pull bypassed the mirror: {seen:#?}"
    );
    assert_eq!(
        d.metric(r#"damselfly_bytes_served_total{source="origin"}"#) as u64,
        img.total_size
    );

    // The daemon goes away; the files stay. containerd falls back to the
    // origin for every request.
    // A second containerd on the same hosts dir has an empty content store.
    d.terminate();
    let c2 = Containerd::start_with_hosts_dir(c.hosts_dir()).expect("containerd");
    let mark = reg.mark();
    let fallback = timed(|| cri_pull(c2.socket(), &img2.reference));
    let seen = reg.requests_in_repo("wired/other", mark);
    assert!(
        seen.iter().any(|r| r.is_blob_get()),
        "the fallback pull fetched no blob: {seen:#?}"
    );
    assert!(
        seen.iter().all(|r| !r.user_agent.starts_with("damselfly/")),
        "{seen:#?}"
    );

    // Baseline: the same pull by a containerd that goes straight to the
    // origin, with no mirror configured at all.
    let direct_hosts = tempfile::tempdir().unwrap();
    write_direct_hosts_toml(direct_hosts.path(), &reg.host()).unwrap();
    let direct = Containerd::start_with_hosts_dir(direct_hosts.path()).expect("containerd");
    let img3 = push_image(&layout, &reg, "wired/direct", "v1", None).expect("push");
    let baseline = timed(|| cri_pull(direct.socket(), &img3.reference));
    eprintln!(
        "CRI pull of a {} KiB image: through the mirror {:?}, fallback with the daemon down {:?}, \
         direct {:?}; the fallback added {:?}",
        img.total_size >> 10,
        through_mirror,
        fallback,
        baseline,
        fallback.saturating_sub(baseline)
    );
}

#[test]
fn ctr_pulls_through_the_files_the_daemon_wrote_for_any_registry() {
    common::require_tools();
    let reg = Registry::start(RegistryAuth::None).expect("registry");
    let layout = build_image_cached(&ImageSpec::small()).expect("image");
    let img = push_image(&layout, &reg, "wired/any", "v1", None).expect("push");
    let c = Containerd::start().expect("containerd");
    // No [[registry]]: the mirror serves any registry over HTTPS, and hostsd
    // writes `_default`. The origin here is plain HTTP, so the mirror cannot
    // reach it and answers an error; containerd must then fall back.
    // No retries: TLS towards a plain-HTTP origin fails the same way every
    // time, and containerd falls back per request.
    let d = Daemon::start(&format!(
        "[containerd]\nconfigure_hosts = true\nconfig = \"{}\"\n[origin]\nretries = 0\n",
        c.config_path().display()
    ));
    let default = c.hosts_dir().join("_default").join("hosts.toml");
    wait_for_file(&default, Duration::from_secs(10));
    let text = std::fs::read_to_string(&default).unwrap();
    assert!(text.contains(&format!("[host.\"{}\"]", d.url())), "{text}");
    // containerd asked the mirror first (it is the first host) ...
    let out = c
        .pull(&img.reference, c.hosts_dir(), &["--plain-http"])
        .unwrap();
    assert!(
        d.metric(r#"damselfly_http_requests_total{method="HEAD",route="manifest",status="502"}"#)
            >= 1.0,
        "containerd never asked the mirror:\n{}",
        d.log_tail(20)
    );
    // ... and then pulled from the origin itself.
    assert!(out.success(), "{out:?}");
}
