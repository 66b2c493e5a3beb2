use std::net::SocketAddr;

use super::members::Heartbeat;
use super::*;

static SEQ: AtomicUsize = AtomicUsize::new(0);

struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> TempDir {
        let n = SEQ.fetch_add(1, Ordering::Relaxed);
        let p = std::env::temp_dir().join(format!(
            "damselfly-control-{tag}-{}-{n}",
            std::process::id()
        ));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

const PSK: [u8; 32] = [7; 32];

fn info(n: u16) -> MemberInfo {
    MemberInfo {
        data_addr: SocketAddr::from(([127, 0, 0, 1], 5000 + n)),
        fingerprint: format!("{n:064x}"),
        role: if n == 0 { Role::Seed } else { Role::Node },
    }
}

fn config(
    dir: &TempDir,
    n: u16,
    psk: Option<[u8; 32]>,
    bootstrap: Vec<Bootstrap>,
) -> ControlConfig {
    ControlConfig {
        listen: "/ip4/127.0.0.1/tcp/0".parse().unwrap(),
        bootstrap,
        psk,
        mdns: false,
        identity_file: Some(dir.0.join(format!("node{n}")).join("identity.key")),
        dns_refresh: Duration::from_secs(30),
        heartbeat: Duration::from_millis(250),
        member_ttl: Duration::from_millis(1500),
        adaptive_heartbeat: true,
        info: info(n),
    }
}

fn boot(c: &Control) -> Vec<Bootstrap> {
    vec![Bootstrap::Addr(c.listen_addrs()[0].clone())]
}

async fn wait_for(within: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + within;
    loop {
        if f() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn sees(c: &Control, others: &[(&Control, u16)]) -> bool {
    let m = c.members().borrow().clone();
    m.len() == others.len()
        && others.iter().all(|(o, n)| {
            m.get(&o.local_peer_id())
                .is_some_and(|m| m.info == info(*n))
        })
}

/// Two nodes, B joined through A, that see each other.
async fn pair(dir: &TempDir) -> (Control, Control) {
    let a = Control::start(config(dir, 0, Some(PSK), vec![]))
        .await
        .unwrap();
    let b = Control::start(config(dir, 1, Some(PSK), boot(&a)))
        .await
        .unwrap();
    assert!(
        wait_for(Duration::from_secs(5), || sees(&a, &[(&b, 1)])
            && sees(&b, &[(&a, 0)]))
        .await,
        "a={:?} b={:?}",
        a.members().borrow(),
        b.members().borrow()
    );
    (a, b)
}

async fn chain(dir: &TempDir) -> (Control, Control, Control) {
    let a = Control::start(config(dir, 0, Some(PSK), vec![]))
        .await
        .unwrap();
    let b = Control::start(config(dir, 1, Some(PSK), boot(&a)))
        .await
        .unwrap();
    let c = Control::start(config(dir, 2, Some(PSK), boot(&b)))
        .await
        .unwrap();
    (a, b, c)
}

#[tokio::test]
async fn three_nodes_form_a_cluster() {
    let dir = TempDir::new("cluster");
    let (a, b, c) = chain(&dir).await;
    let ok = wait_for(Duration::from_secs(5), || {
        sees(&a, &[(&b, 1), (&c, 2)])
            && sees(&b, &[(&a, 0), (&c, 2)])
            && sees(&c, &[(&a, 0), (&b, 1)])
    })
    .await;
    assert!(
        ok,
        "members: a={:?} b={:?} c={:?}",
        a.members().borrow(),
        b.members().borrow(),
        c.members().borrow()
    );
    assert!(a.connected_peers() >= 1);
    for n in [&a, &b, &c] {
        n.shutdown().await;
    }
}

#[tokio::test]
async fn other_key_or_no_key_never_joins() {
    let dir = TempDir::new("psk");
    let a = Control::start(config(&dir, 0, Some(PSK), vec![]))
        .await
        .unwrap();
    let x = Control::start(config(&dir, 1, Some([9; 32]), boot(&a)))
        .await
        .unwrap();
    let y = Control::start(config(&dir, 2, None, boot(&a)))
        .await
        .unwrap();
    let stayed_apart = !wait_for(Duration::from_secs(3), || {
        !a.members().borrow().is_empty()
            || !x.members().borrow().is_empty()
            || !y.members().borrow().is_empty()
            || a.connected_peers() > 0
            || x.connected_peers() > 0
            || y.connected_peers() > 0
    })
    .await;
    assert!(stayed_apart, "a node without the cluster key got in");
    for n in [&a, &x, &y] {
        n.shutdown().await;
    }
}

/// Asks `n` for the providers of `digest` until `done` says yes, for at
/// most 5 s; the last answer.
async fn providers_until(
    n: &Control,
    digest: &Digest,
    done: impl Fn(&[PeerId]) -> bool,
) -> Vec<PeerId> {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let found = n.providers(digest, Duration::from_secs(1)).await;
        if done(&found) || Instant::now() >= deadline {
            return found;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn provider_found_two_hops_away() {
    let dir = TempDir::new("kad");
    let (a, b, c) = chain(&dir).await;
    assert!(
        wait_for(Duration::from_secs(5), || sees(&c, &[(&a, 0), (&b, 1)])).await,
        "cluster did not form"
    );
    let digest: Digest = format!("sha256:{}", "ab".repeat(32)).parse().unwrap();
    a.provide(&digest);
    let found = providers_until(&c, &digest, |f| f.contains(&a.local_peer_id())).await;
    assert!(found.contains(&a.local_peer_id()), "providers: {found:?}");
    assert!(!found.contains(&c.local_peer_id()));
    let other: Digest = format!("sha256:{}", "cd".repeat(32)).parse().unwrap();
    assert!(c.providers(&other, Duration::from_secs(2)).await.is_empty());
    for n in [&a, &b, &c] {
        n.shutdown().await;
    }
}

#[tokio::test]
async fn announcements_reach_others_not_self() {
    let dir = TempDir::new("ann");
    let (a, b) = pair(&dir).await;
    let mut a_rx = a.announcements();
    let mut b_rx = b.announcements();
    let what = Announce::Have {
        digest: format!("sha256:{}", "01".repeat(32)).parse().unwrap(),
        size: 1234,
    };
    let got = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            a.announce(what.clone());
            match tokio::time::timeout(Duration::from_millis(500), b_rx.recv()).await {
                Ok(Ok(got)) => return got,
                Ok(Err(e)) => panic!("broadcast: {e}"),
                Err(_) => continue,
            }
        }
    })
    .await
    .expect("B never got A's announcement");
    assert_eq!(got.from, a.local_peer_id());
    assert_eq!(got.what, what);
    assert!(a_rx.try_recv().is_err(), "A received its own announcement");
    a.shutdown().await;
    b.shutdown().await;
}

#[tokio::test]
async fn stopped_member_is_dropped() {
    let dir = TempDir::new("drop");
    let (a, b, c) = chain(&dir).await;
    assert!(wait_for(Duration::from_secs(5), || sees(&a, &[(&b, 1), (&c, 2)])).await);
    let c_id = c.local_peer_id();
    c.shutdown().await;
    let stopped = Instant::now();
    let ttl = Duration::from_millis(1500);
    assert!(
        wait_for(ttl + Duration::from_secs(1), || !a
            .members()
            .borrow()
            .contains_key(&c_id))
        .await,
        "C still a member of A after {:?}",
        stopped.elapsed()
    );
    assert!(a.members().borrow().contains_key(&b.local_peer_id()));
    a.shutdown().await;
    b.shutdown().await;
}

#[tokio::test]
async fn dns_bootstrap_joins_and_skips_self() {
    let dir = TempDir::new("dns");
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let dns = vec![Bootstrap::Dns {
        host: "localhost".into(),
        port,
    }];
    let mut cfg_a = config(&dir, 0, Some(PSK), dns.clone());
    cfg_a.listen = format!("/ip4/127.0.0.1/tcp/{port}").parse().unwrap();
    cfg_a.dns_refresh = Duration::from_secs(1);
    let a = Control::start(cfg_a).await.unwrap();
    let mut cfg_b = config(&dir, 1, Some(PSK), dns);
    cfg_b.dns_refresh = Duration::from_secs(1);
    let b = Control::start(cfg_b).await.unwrap();
    assert!(
        wait_for(Duration::from_secs(5), || sees(&a, &[(&b, 1)])
            && sees(&b, &[(&a, 0)]))
        .await,
        "a={:?} b={:?}",
        a.members().borrow(),
        b.members().borrow()
    );
    // Across a couple of refreshes A must not have connected to itself.
    tokio::time::sleep(Duration::from_millis(2200)).await;
    assert_eq!(a.connected_peers(), 1);
    assert!(!a.members().borrow().contains_key(&a.local_peer_id()));
    a.shutdown().await;
    b.shutdown().await;
}

#[tokio::test]
async fn identity_persists_and_corruption_is_reported() {
    let dir = TempDir::new("id");
    let cfg = config(&dir, 0, Some(PSK), vec![]);
    let path = cfg.identity_file.clone().unwrap();
    let first = Control::start(cfg.clone()).await.unwrap();
    let id = first.local_peer_id();
    first.shutdown().await;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }
    let second = Control::start(cfg.clone()).await.unwrap();
    assert_eq!(second.local_peer_id(), id);
    second.shutdown().await;

    std::fs::write(&path, b"not a key").unwrap();
    let err = Control::start(cfg.clone())
        .await
        .err()
        .expect("garbage identity accepted");
    assert!(matches!(err, ControlError::IdentityCorrupt { .. }), "{err}");
    assert!(
        err.to_string().contains(&path.display().to_string()),
        "{err}"
    );
}

#[tokio::test]
async fn listen_failure_is_an_error() {
    let dir = TempDir::new("listen");
    let a = Control::start(config(&dir, 0, None, vec![])).await.unwrap();
    let mut cfg = config(&dir, 1, None, vec![]);
    cfg.listen = a.listen_addrs()[0].clone();
    let err = Control::start(cfg)
        .await
        .err()
        .expect("second bind on the same port");
    assert!(matches!(err, ControlError::Listen { .. }), "{err}");
    a.shutdown().await;
}

/// With a 10 ms heartbeat, two members already make the period 40 ms
/// (2 / 50 s): each node announces it and the others record it (and time
/// it out after four of those periods, not of 10 ms: with a 40 ms
/// `member_ttl` every member would otherwise flap).
#[tokio::test]
async fn members_announce_their_slower_period_and_are_kept() {
    let dir = TempDir::new("period");
    let fast = |n: u16, boot: Vec<Bootstrap>| ControlConfig {
        heartbeat: Duration::from_millis(10),
        member_ttl: Duration::from_millis(40),
        ..config(&dir, n, Some(PSK), boot)
    };
    let a = Control::start(fast(0, vec![])).await.unwrap();
    let b = Control::start(fast(1, boot(&a))).await.unwrap();
    let c = Control::start(fast(2, boot(&a))).await.unwrap();
    let slower = |x: &Control| {
        let m = x.members().borrow().clone();
        m.len() == 2 && m.values().all(|m| m.every == Duration::from_millis(40))
    };
    let ok = wait_for(Duration::from_secs(10), || {
        slower(&a) && slower(&b) && slower(&c)
    })
    .await;
    assert!(
        ok,
        "a={:?} b={:?} c={:?}",
        a.members().borrow(),
        b.members().borrow(),
        c.members().borrow()
    );
    for n in [&a, &b, &c] {
        n.shutdown().await;
    }
}

#[test]
fn heartbeats_slow_down_as_the_cluster_grows() {
    use super::members::heartbeat_period;
    let base = Duration::from_secs(1);
    assert_eq!(heartbeat_period(base, 0), base);
    assert_eq!(heartbeat_period(base, 50), base);
    assert_eq!(heartbeat_period(base, 100), Duration::from_secs(2));
    assert_eq!(heartbeat_period(base, 1000), Duration::from_secs(20));
    // What each node takes in stays about 50 a second.
    for n in [10usize, 100, 1000, 10_000] {
        let rate = n as f64 / heartbeat_period(base, n).as_secs_f64();
        assert!(rate <= 50.0 + 1e-9, "{n} members: {rate}/s");
    }
    assert_eq!(
        heartbeat_period(Duration::from_secs(5), 100),
        Duration::from_secs(5)
    );
    assert_eq!(
        heartbeat_period(base, usize::MAX),
        Duration::from_secs(1 << 20) / 50
    );
}

#[test]
fn wire_formats() {
    let hb = serde_json::to_value(Heartbeat {
        info: info(1),
        every_ms: None,
    })
    .unwrap();
    assert_eq!(hb["info"]["role"], "node");
    assert!(hb.get("every_ms").is_none(), "{hb}");
    // A heartbeat from a node before `every_ms` still decodes.
    let old: Heartbeat = serde_json::from_value(serde_json::json!({ "info": hb["info"] })).unwrap();
    assert_eq!(old.every_ms, None);
    let a = Announce::Want {
        digest: format!("sha256:{}", "00".repeat(32)).parse().unwrap(),
        ns: "docker.io".into(),
        repo: "library/alpine".into(),
    };
    let s = serde_json::to_string(&a).unwrap();
    assert_eq!(serde_json::from_str::<Announce>(&s).unwrap(), a);
    assert!(serde_json::from_slice::<Heartbeat>(b"{\"info\":42}").is_err());
    let hex = "00".repeat(32);
    let gone = Announce::Gone {
        digest: format!("sha256:{hex}").parse().unwrap(),
    };
    let s = serde_json::to_string(&gone).unwrap();
    assert_eq!(s, format!(r#"{{"type":"gone","digest":"sha256:{hex}"}}"#));
    assert_eq!(serde_json::from_str::<Announce>(&s).unwrap(), gone);
}

/// What a node that still carried digests as strings put on the content
/// topic, byte for byte: it must decode, and encode back the same.
#[test]
fn announcements_from_string_digests() {
    let hex = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";
    let digest: Digest = format!("sha256:{hex}").parse().unwrap();
    let have = format!(r#"{{"type":"have","digest":"sha256:{hex}","size":1234}}"#);
    let want = format!(
        r#"{{"type":"want","digest":"sha256:{hex}","ns":"docker.io","repo":"library/alpine"}}"#
    );
    let decoded: Announce = serde_json::from_str(&have).unwrap();
    assert_eq!(
        decoded,
        Announce::Have {
            digest: digest.clone(),
            size: 1234
        }
    );
    assert_eq!(serde_json::to_string(&decoded).unwrap(), have);
    let decoded: Announce = serde_json::from_str(&want).unwrap();
    assert_eq!(
        decoded,
        Announce::Want {
            digest,
            ns: "docker.io".into(),
            repo: "library/alpine".into()
        }
    );
    assert_eq!(serde_json::to_string(&decoded).unwrap(), want);
    // A string that was never a digest the node could serve is now refused
    // at the edge, where before it was carried and matched nothing.
    for bad in [
        r#"{"type":"have","digest":"sha256:00","size":1}"#,
        r#"{"type":"have","digest":"md5:00","size":1}"#,
        r#"{"type":"want","digest":42,"ns":"docker.io","repo":"a"}"#,
    ] {
        assert!(serde_json::from_str::<Announce>(bad).is_err(), "{bad}");
    }
}

/// The TCP connections on this host between two local ports, either way
/// round, from /proc/net/tcp (states other than LISTEN).
fn tcp_between(a: u16, b: u16) -> Vec<String> {
    let table = std::fs::read_to_string("/proc/net/tcp").expect("read /proc/net/tcp");
    let port = |field: &str| {
        field
            .rsplit(':')
            .next()
            .and_then(|h| u16::from_str_radix(h, 16).ok())
    };
    table
        .lines()
        .skip(1)
        .filter(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            // f[3] is the state; 0A is LISTEN.
            f.len() > 3
                && f[3] != "0A"
                && matches!((port(f[1]), port(f[2])), (Some(l), Some(r))
                    if (l, r) == (a, b) || (l, r) == (b, a))
        })
        .map(str::to_owned)
        .collect()
}

/// A dial binds no listen port: with libp2p's default (`PortUse::Reuse`) a
/// busy address made every redial fail with EADDRINUSE until the kernel
/// freed it, and the node never joined.
#[tokio::test]
async fn dials_come_from_ephemeral_ports() {
    let dir = TempDir::new("port");
    let (a, b) = pair(&dir).await;
    let port = |c: &Control| {
        tcp_socket_addr(&c.listen_addrs()[0])
            .expect("a TCP listen address")
            .port()
    };
    let (pa, pb) = (port(&a), port(&b));
    let between = tcp_between(pa, pb);
    assert!(
        between.is_empty(),
        "a connection joins the two listen ports {pa} and {pb}, so a dial bound its listen port:\n{}",
        between.join("\n")
    );
    a.shutdown().await;
    b.shutdown().await;
}

/// Kademlia has no retraction: without the `Gone` announcement the others
/// keep A's record (and send A requests it can only refuse) until it
/// expires, 48 hours later (libp2p's default TTL).
#[tokio::test]
async fn an_unprovided_blob_leaves_the_others_provider_records() {
    let dir = TempDir::new("gone");
    let (a, b, c) = chain(&dir).await;
    assert!(
        wait_for(Duration::from_secs(5), || sees(&c, &[(&a, 0), (&b, 1)])).await,
        "cluster did not form"
    );
    let digest: Digest = format!("sha256:{}", "ef".repeat(32)).parse().unwrap();
    a.provide(&digest);
    let a_id = a.local_peer_id();
    let found = providers_until(&c, &digest, |f| f.contains(&a_id)).await;
    assert!(found.contains(&a_id), "providers: {found:?}");
    // At once: A's provide may still be storing its record on others.
    a.unprovide(&digest);
    for n in [&b, &c] {
        let found = providers_until(n, &digest, |f| !f.contains(&a_id)).await;
        assert!(
            !found.contains(&a_id),
            "A is still a provider after it withdrew: {found:?}"
        );
    }
    for n in [&a, &b, &c] {
        n.shutdown().await;
    }
}
