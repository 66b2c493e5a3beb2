//! Serving peers: the engine's side of the data plane
//! ([`crate::swarm::data::PeerBlobs`]).

use futures_util::future::BoxFuture;

use super::{pieces, verify, Ask, Blob, BlobBody, FetchError, Fetcher, Priority, Source, Starter};
use crate::oci::Digest;
use crate::origin::Upstream;
use crate::swarm::data::{PeerAsk, PeerBlobs, PeerBody, PeerRead, ServeError};

impl Fetcher {
    /// Opens bytes of blob `digest` for a peer: from the store, from a
    /// download in flight (asking it for the piece at `start`), or, with
    /// `origin` given, from a new serving download of just the pieces peers
    /// ask for. `None`: not here and not fetchable. Asked as a relay
    /// (`relay`), only the store or a download that pulls the whole blob
    /// answers: a relay request never makes this node fetch anything it
    /// would not fetch anyway, so relay requests cannot pull bytes from
    /// the origin twice.
    async fn blob_for_peer(
        &self,
        digest: &Digest,
        start: u64,
        size: Option<u64>,
        origin: Option<(Upstream, String)>,
        relay: bool,
    ) -> Result<Option<Blob>, FetchError> {
        if let Some(opened) = self.inner.store.open_blob(digest)? {
            if let Some(blob) = self
                .local_blob(opened, digest, verify::FoundBy::Peer, origin.clone())
                .await?
            {
                return Ok(Some(blob));
            }
            // It was bad: its refetch is in flight now, and serves the peer.
        }
        let piece = self
            .inner
            .swarm
            .as_ref()
            .map_or(0, |s| (start / s.piece_size()) as usize);
        let existing = self
            .inner
            .inflight
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(digest)
            .cloned()
            .filter(|dl| !relay || dl.pulling.load(std::sync::atomic::Ordering::Relaxed));
        let origin = origin.filter(|_| !relay);
        let dl = match (existing, origin) {
            (Some(dl), _) => {
                if let Some(w) = &dl.wants {
                    // A download still waiting for its first answer takes
                    // the size the peer knows, so the peer's piece can be
                    // started (and answered) at once.
                    if let (Some(size), Some(swarm)) = (size, self.inner.swarm.as_ref()) {
                        pieces::adopt_size(&dl, size, swarm.piece_size());
                    }
                    let _ = w.send(pieces::Want::Piece(piece));
                }
                dl
            }
            (None, Some((up, repo))) => {
                let ask = Ask {
                    starter: Starter::Peer { piece, size },
                    // Priority is this node's: a peer's request only adds
                    // pieces, which go first whatever the priority.
                    priority: Priority::Background,
                    last_try: false,
                };
                match self.join_or_start(&up, &repo, digest, None, ask)? {
                    Some((dl, _)) => dl,
                    None => {
                        return Box::pin(self.blob_for_peer(digest, start, size, None, relay)).await
                    }
                }
            }
            (None, None) => return Ok(None),
        };
        let size = dl.size().await?;
        Ok(Some(Blob {
            size,
            source: Source::Peer,
            for_peer: true,
            body: BlobBody::Growing(dl),
        }))
    }
}

impl PeerBlobs for Fetcher {
    fn read_for_peer<'a>(
        &'a self,
        ask: PeerAsk<'a>,
    ) -> BoxFuture<'a, Result<PeerRead, ServeError>> {
        Box::pin(async move {
            // Where this node's own origin keeps the blob, should it have to
            // fetch it: only a configured registry and a valid repository
            // name, so the data plane cannot be used as a proxy.
            let origin = ask.origin.and_then(|(registry, repo)| {
                crate::oci::validate_repository(repo).ok()?;
                let up = self.inner.origin.upstream(registry)?;
                Some((up, repo.to_owned()))
            });
            let blob = match self
                .blob_for_peer(ask.digest, ask.start, ask.size, origin, ask.relay)
                .await
            {
                Ok(Some(b)) => b,
                Ok(None) => return Ok(PeerRead::NotHere),
                Err(e) => return Err(ServeError(e.to_string())),
            };
            let size = blob.size;
            if ask.start >= size && size > 0 {
                return Ok(PeerRead::OutOfRange { size });
            }
            let end = ask.end_incl.saturating_add(1).min(size);
            let sums = blob.sums_from(&self.inner.store, ask.digest, ask.start, end);
            let media_type = self.inner.store.media_type(ask.digest);
            let body: PeerBody = Box::pin(blob.stream(ask.start, end, self.inner.metrics.clone()));
            Ok(PeerRead::Bytes {
                size,
                start: ask.start,
                end,
                sums,
                media_type,
                body,
            })
        })
    }
}
