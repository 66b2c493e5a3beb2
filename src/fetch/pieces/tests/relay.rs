//! Relay trees in the piece engine: a node that pulls the blob too is
//! asked first for the pieces it relays, and passed over for the owner
//! when it cannot answer; a relay ask never starts a download.

use super::*;

/// This node's relay parent for piece `k` when every one of `peers` pulls
/// the blob (`None`: it takes the piece from the owner, or owns it).
fn relay_of(
    lab: &Lab,
    d: &Digest,
    k: u64,
    size: u64,
    peers: &[libp2p::PeerId],
) -> Option<libp2p::PeerId> {
    let ids: Vec<(Vec<u8>, libp2p::PeerId)> = std::iter::once(lab.swarm.local())
        .chain(peers.iter().copied())
        .map(|p| (p.to_bytes(), p))
        .collect();
    let refs: Vec<(&[u8], libp2p::PeerId)> = ids.iter().map(|(b, p)| (b.as_slice(), *p)).collect();
    rendezvous::relay_parent(
        &d.to_string(),
        k,
        owner(lab, d, k, size, peers),
        &refs,
        lab.swarm.local(),
        rendezvous::RELAY_FANOUT,
    )
}

/// Four peers that all pull the blob: they answer (as nodes that have
/// the bytes in flight do), with no checksums.
fn pulling_peers(lab: &Lab, data: &Bytes, d: &Digest) -> Vec<libp2p::PeerId> {
    (0..4)
        .map(|_| {
            let p = lab.swarm.add_peer(Script::Serves {
                data: data.clone(),
                sums: false,
            });
            lab.swarm.announce_pulling(d, p);
            p
        })
        .collect()
}

#[tokio::test]
async fn pieces_come_from_relays_when_peers_pull_the_blob_too() {
    let (data, d) = blob(32 * MIB);
    let (addr, served) = origin(data.clone(), d.clone()).await;
    let lab = lab(tuning(), Some(addr));
    let peers = pulling_peers(&lab, &data, &d);
    let got = lab.pull(&d).await.unwrap();
    assert!(got == data);
    let asked = lab.swarm.asked();
    let size = data.len() as u64;
    let mut relayed = 0;
    let mut mine = 0u64;
    for k in 0..pieces(size) {
        let o = owner(&lab, &d, k, size, &peers);
        let of_k: Vec<_> = asked.iter().filter(|a| a.start == k * PIECE).collect();
        match relay_of(&lab, &d, k, size, &peers) {
            Some(r) => {
                // The relay alone, asked as a relay: the owner never hears
                // of this node for this piece.
                assert_eq!(of_k.len(), 1, "piece {k}: {of_k:?}");
                assert!(of_k[0].peer == r && of_k[0].relay, "piece {k}: {of_k:?}");
                relayed += 1;
            }
            None if o == lab.swarm.local() => {
                assert!(of_k.is_empty(), "piece {k}: {of_k:?}");
                mine += PIECE.min(size - k * PIECE);
            }
            None => {
                assert_eq!(of_k.len(), 1, "piece {k}: {of_k:?}");
                assert!(of_k[0].peer == o && !of_k[0].relay, "piece {k}: {of_k:?}");
            }
        }
    }
    assert!(relayed > 0, "no piece of 16 had a relay");
    assert_eq!(lab.metrics.relayed_bytes.get(), relayed * PIECE);
    assert_eq!(served.bytes.load(Ordering::SeqCst), mine, "origin bytes");
}

#[tokio::test]
async fn a_relay_that_cannot_answer_is_passed_over_for_the_owner() {
    let (data, d) = blob(32 * MIB);
    let (addr, served) = origin(data.clone(), d.clone()).await;
    let lab = lab(tuning(), Some(addr));
    let peers = pulling_peers(&lab, &data, &d);
    let size = data.len() as u64;
    // The relay of some piece restarted and has nothing in flight: it
    // answers 404, as the data plane does for a relay ask it cannot serve.
    let (k, dead) = (0..pieces(size))
        .find_map(|k| relay_of(&lab, &d, k, size, &peers).map(|r| (k, r)))
        .expect("some piece has a relay");
    lab.swarm.script(dead, Script::Refuses);
    let got = lab.pull(&d).await.unwrap();
    assert!(got == data);
    let asked = lab.swarm.asked();
    let o = owner(&lab, &d, k, size, &peers);
    assert!(
        asked
            .iter()
            .any(|a| a.start == k * PIECE && a.peer == dead && a.relay),
        "{asked:?}"
    );
    assert!(
        asked.iter().any(|a| a.start == k * PIECE && a.peer == o),
        "piece {k} not asked of its owner after its relay failed: {asked:?}"
    );
    // Nothing more from the origin than this node's own pieces.
    let mine: u64 = (0..pieces(size))
        .filter(|&j| owner(&lab, &d, j, size, &peers) == lab.swarm.local())
        .map(|j| PIECE.min(size - j * PIECE))
        .sum();
    assert_eq!(served.bytes.load(Ordering::SeqCst), mine, "origin bytes");
    assert!(lab.swarm.distrusted().is_empty());
}

#[tokio::test(start_paused = true)]
async fn a_relay_ask_never_starts_a_download() {
    let (data, d) = blob(6 * MIB);
    let lab = lab(tuning(), None);
    let h = lab.swarm.add_peer(Script::Serves {
        data: data.clone(),
        sums: true,
    });
    lab.swarm.announce_holder(&d, h);
    let ask = PeerAsk {
        digest: &d,
        start: PIECE,
        end_incl: 2 * PIECE - 1,
        size: Some(data.len() as u64),
        origin: Some(("origin.test", REPO)),
        relay: true,
    };
    let read = lab.fetcher.read_for_peer(ask).await.unwrap();
    assert!(matches!(read, PeerRead::NotHere));
    assert!(lab.swarm.asked().is_empty(), "{:?}", lab.swarm.asked());
    assert!(lab.fetcher.downloads().is_empty());
    // Asked as the owner, the same node starts a serving download.
    let read = lab
        .fetcher
        .read_for_peer(PeerAsk {
            relay: false,
            ..ask
        })
        .await
        .unwrap();
    assert!(matches!(read, PeerRead::Bytes { .. }));
}

#[tokio::test(start_paused = true)]
async fn a_relay_ask_is_answered_by_a_download_that_pulls_the_blob() {
    let (data, d) = blob(6 * MIB);
    let lab = lab(tuning(), None);
    let h = lab.swarm.add_peer(Script::Late {
        data: data.clone(),
        sums: true,
        delay: Duration::from_secs(1),
    });
    lab.swarm.announce_holder(&d, h);
    let puller = {
        let fetcher = lab.fetcher.clone();
        let up = lab.up.clone();
        let d = d.clone();
        tokio::spawn(async move {
            fetcher
                .ensure_blob(&up, REPO, &d, crate::fetch::Priority::Live)
                .await
                .map(|e| e.size)
                .map_err(|e| e.to_string())
        })
    };
    while lab.fetcher.downloads().is_empty() {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let read = lab
        .fetcher
        .read_for_peer(PeerAsk {
            digest: &d,
            start: PIECE,
            end_incl: 2 * PIECE - 1,
            size: Some(data.len() as u64),
            origin: None,
            relay: true,
        })
        .await
        .unwrap();
    let PeerRead::Bytes { body, .. } = read else {
        panic!("a pulling download did not relay");
    };
    let bytes: Vec<u8> = body.map(|c| c.unwrap()).collect::<Vec<_>>().await.concat();
    assert!(bytes[..] == data[PIECE as usize..2 * PIECE as usize]);
    assert_eq!(puller.await.unwrap(), Ok(data.len() as u64));
}

#[tokio::test]
async fn a_relay_that_sends_corrupt_bytes_is_caught_and_distrusted() {
    let (data, d) = blob(32 * MIB);
    let (addr, served) = origin(data.clone(), d.clone()).await;
    let lab = lab(tuning(), Some(addr));
    let peers = pulling_peers(&lab, &data, &d);
    let size = data.len() as u64;
    let (k, liar) = (0..pieces(size))
        .find_map(|k| relay_of(&lab, &d, k, size, &peers).map(|r| (k, r)))
        .expect("some piece has a relay");
    // A relay has no checksums to send (it holds no verified blob): its
    // bad byte is caught by the blob's digest, and the comparison with the
    // origin names it.
    lab.swarm.script(
        liar,
        Script::Corrupts {
            data: data.clone(),
            at: k * PIECE + 7,
            sums: false,
        },
    );
    let first = lab.pull(&d).await;
    assert!(
        first.as_ref().is_err_and(|e| e.contains("may be wrong")),
        "{:?}",
        first.map(|b| b.len())
    );
    let got = lab.ensure_and_pull(&d).await;
    assert!(got == data, "the repaired blob differs");
    let distrusted = lab.swarm.distrusted();
    assert_eq!(distrusted.len(), 1, "{distrusted:?}");
    assert_eq!(distrusted[0].0, liar);
    let ranges = served.ranges.lock().unwrap().clone();
    assert!(
        ranges.iter().any(|r| r.0 == k * PIECE),
        "piece {k} was not compared with the origin: {ranges:?}"
    );
    assert!(lab.fetcher.store().contains(&d));
}
