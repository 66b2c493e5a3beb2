//! The tables on fixed data: exact alignment, sizes and ages.

use super::*;

const NOW: u64 = 1_800_000_000;

fn d(c: char) -> String {
    format!("sha256:{}", c.to_string().repeat(64))
}

fn blob(c: char, kind: &str, size: u64, ago: u64, pinned: bool) -> BlobEntry {
    BlobEntry {
        digest: d(c),
        size,
        media_type: None,
        kind: Some(kind.into()),
        last_access: NOW - ago,
        pinned,
        readers: 0,
        source: Some(SourceInfo {
            from: "origin".into(),
            registry: Some("registry.example.com".into()),
            repository: Some("team/model".into()),
            fetched_at: NOW - 3600,
        }),
        images: vec!["registry.example.com/team/model:v3".into()],
    }
}

#[test]
fn ages_and_sizes() {
    assert_eq!(age(NOW, NOW - 5), "5s ago");
    assert_eq!(age(NOW, NOW - 180), "3m ago");
    assert_eq!(age(NOW, NOW - 7300), "2h ago");
    assert_eq!(age(NOW, NOW - 200_000), "2d ago");
    assert_eq!(age(NOW, NOW + 10), "0s ago");
    assert_eq!(age(NOW, 0), "-");
    assert_eq!(size(0), "0 B");
    assert_eq!(size(3 << 20), "3.0 MiB");
    assert_eq!(short(&d('a')), "sha256:aaaaaaaaaaaa");
}

#[test]
fn ls_table() {
    let list = BlobList {
        blobs: vec![
            blob('a', "layer", 2_100_000, 40, true),
            blob('b', "manifest", 754, 3 * 3600, false),
        ],
    };
    insta::assert_snapshot!(ls(&list, false, NOW, None));
}

#[test]
fn ls_fits_a_narrow_terminal() {
    let list = BlobList {
        blobs: vec![blob('a', "layer", 2_100_000, 40, true)],
    };
    let out = ls(&list, false, NOW, Some(80));
    assert!(out.lines().all(|l| l.chars().count() <= 80), "{out}");
    assert!(out.contains('…'));
}

#[test]
fn stats_without_a_daemon() {
    let s = Stats {
        store_dir: "/var/lib/damselfly".into(),
        used_bytes: 4 << 20,
        quota_bytes: 100 << 30,
        blobs: 5,
        pinned_blobs: 1,
        pinned_bytes: 1 << 20,
        in_use_blobs: 0,
        partials: 1,
        partial_bytes: 512,
        daemon: None,
    };
    insta::assert_snapshot!(stats(&s));
}

#[test]
fn gc_that_cannot_reach_its_target() {
    let r = GcReport {
        dry_run: true,
        target: 0,
        before: 3 << 20,
        after: 1 << 20,
        freed: 2 << 20,
        evicted: vec![Evicted {
            digest: d('c'),
            size: 2 << 20,
        }],
        kept_pinned_blobs: 1,
        kept_pinned_bytes: 1 << 20,
        kept_in_use_blobs: 0,
        kept_in_use_bytes: 0,
        reached: false,
    };
    insta::assert_snapshot!(gc(&r));
}

#[test]
fn peers_without_the_swarm() {
    let p = Peers {
        swarm: "disabled".into(),
        local_peer_id: None,
        local_role: None,
        peers: vec![],
        distrusted: vec![],
    };
    assert!(peers(&p).starts_with("the swarm is not enabled on this node"));
}

#[test]
fn peers_lists_members_and_distrusted_ones() {
    let peer = |id: &str, role: &str| Peer {
        id: id.into(),
        role: role.into(),
        addresses: vec!["10.0.0.2:4004".into()],
        latency_ms: None,
        last_seen_ms: Some(700),
        bytes_sent: 8 << 20,
        bytes_received: 3 << 30,
    };
    let p = Peers {
        swarm: "enabled".into(),
        local_peer_id: Some("12D3KooWLocal".into()),
        local_role: Some("node".into()),
        peers: vec![peer("12D3KooWA", "node"), peer("12D3KooWS", "seed")],
        distrusted: vec![peer("12D3KooWBad", "node")],
    };
    let text = peers(&p);
    assert!(
        text.starts_with("this node: 12D3KooWLocal (node)\n"),
        "{text}"
    );
    assert!(
        text.contains("12D3KooWBad") && text.contains("node (distrusted)"),
        "{text}"
    );
    assert!(
        text.contains("seed") && text.contains("10.0.0.2:4004"),
        "{text}"
    );
    assert!(
        text.contains("0.7s ago") && text.contains("3.0 GiB"),
        "{text}"
    );
    let alone = Peers {
        peers: vec![],
        distrusted: vec![],
        ..p
    };
    assert_eq!(
        peers(&alone),
        "this node: 12D3KooWLocal (node)\nno live peers\n"
    );
}

#[test]
fn inspect_shows_malformed_layer_digests_without_panicking() {
    // Descriptor digests come straight from a cached manifest, unvalidated:
    // a non-ASCII character across the 12th byte must not be sliced, and
    // short or foreign digests are shown as they are.
    let odd = [
        "sha256:0123456789aé0123",
        "sha256:abc",
        "sha512:xyz",
        "sha256:",
        "garbage",
        "",
    ];
    assert_eq!(short(odd[0]), odd[0]);
    assert_eq!(short(odd[1]), odd[1]);
    let blob = |digest: &str| ImageBlob {
        digest: digest.into(),
        kind: "layer".into(),
        media_type: None,
        size: 10,
        state: "absent".into(),
        present: 0,
    };
    let img = Inspection::Image(ImageInspection {
        reference: "registry.example.com/team/model:v3".into(),
        digest: d('a'),
        media_type: None,
        platform: None,
        manifest: Some(d('b')),
        pinned: false,
        blobs: odd.iter().map(|x| blob(x)).collect(),
        layers: odd.len() as u64,
        layers_present: 0,
        layer_bytes: 10 * odd.len() as u64,
        layer_bytes_present: 0,
        complete: 0.0,
    });
    let out = inspect(&img, NOW);
    for x in odd.iter().filter(|x| !x.is_empty()) {
        assert!(out.contains(x), "{x} missing from:\n{out}");
    }
}
