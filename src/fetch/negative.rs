//! The negative-answer cache: an origin's "no such blob" is remembered for
//! a few seconds per (registry, repository, digest), so a flood of requests
//! for made-up digests reaches the origin once per digest and interval,
//! not once per request.
//!
//! Only 404s are kept. An authentication error depends on who asks (a
//! containerd retries with credentials after its first anonymous 401), and
//! the origin client already retries transient errors.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::FetchError;
use crate::oci::Digest;
use crate::origin::OriginError;

/// How long a 404 is believed. Short: a blob pushed just after a miss is
/// found this long later at worst.
pub const NEGATIVE_TTL: Duration = Duration::from_secs(10);

/// At most this many answers are kept (about 200 bytes each); the oldest
/// go first.
pub const NEGATIVE_MAX: usize = 4096;

type Key = (String, String, Digest);

#[derive(Default)]
pub(super) struct NegativeCache {
    answers: HashMap<Key, (Instant, Arc<FetchError>)>,
    /// Insertion order, which is also expiry order (one TTL for all).
    order: VecDeque<(Instant, Key)>,
}

/// Whether a download's failure is an origin's "no such blob".
pub(super) fn is_not_found(e: &FetchError) -> bool {
    matches!(e.root(), FetchError::Origin(OriginError::NotFound { .. }))
}

impl NegativeCache {
    /// The remembered 404 for this blob, if still fresh at `now`.
    pub(super) fn get(
        &mut self,
        host: &str,
        repo: &str,
        digest: &Digest,
        now: Instant,
    ) -> Option<Arc<FetchError>> {
        self.expire(now);
        let key = (host.to_owned(), repo.to_owned(), digest.clone());
        self.answers.get(&key).map(|(_, e)| e.clone())
    }

    /// Remembers `e` (a 404) for this blob from `now` on.
    pub(super) fn insert(
        &mut self,
        host: &str,
        repo: &str,
        digest: &Digest,
        e: Arc<FetchError>,
        now: Instant,
    ) {
        self.expire(now);
        let key = (host.to_owned(), repo.to_owned(), digest.clone());
        self.answers.insert(key.clone(), (now, e));
        self.order.push_back((now, key));
        while self.answers.len() > NEGATIVE_MAX {
            self.pop_oldest();
        }
    }

    #[cfg(test)]
    pub(super) fn len(&self) -> usize {
        self.answers.len()
    }

    fn expire(&mut self, now: Instant) {
        while self
            .order
            .front()
            .is_some_and(|(at, _)| now.duration_since(*at) >= NEGATIVE_TTL)
        {
            self.pop_oldest();
        }
    }

    fn pop_oldest(&mut self) {
        let Some((at, key)) = self.order.pop_front() else {
            return;
        };
        // A key answered again later has a newer entry: keep that one.
        if self.answers.get(&key).is_some_and(|(t, _)| *t == at) {
            self.answers.remove(&key);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn not_found() -> Arc<FetchError> {
        Arc::new(FetchError::Origin(OriginError::NotFound {
            host: "reg".into(),
            what: crate::oci::Object::Blob,
        }))
    }

    fn digest(i: u32) -> Digest {
        Digest::from_hex(&format!("{i:064x}")).unwrap()
    }

    #[test]
    fn answers_expire_and_are_bounded() {
        let mut c = NegativeCache::default();
        let t0 = Instant::now();
        c.insert("reg", "a/b", &digest(1), not_found(), t0);
        assert!(c.get("reg", "a/b", &digest(1), t0).is_some());
        assert!(is_not_found(&c.get("reg", "a/b", &digest(1), t0).unwrap()));
        // Another repository or registry is another question.
        assert!(c.get("reg", "a/c", &digest(1), t0).is_none());
        assert!(c.get("other", "a/b", &digest(1), t0).is_none());
        let later = t0 + NEGATIVE_TTL - Duration::from_millis(1);
        assert!(c.get("reg", "a/b", &digest(1), later).is_some());
        assert!(c.get("reg", "a/b", &digest(1), t0 + NEGATIVE_TTL).is_none());
        assert_eq!(c.len(), 0);

        // Answered again: the newer answer outlives the older's expiry.
        c.insert("reg", "a/b", &digest(2), not_found(), t0);
        let t1 = t0 + NEGATIVE_TTL / 2;
        c.insert("reg", "a/b", &digest(2), not_found(), t1);
        assert!(c.get("reg", "a/b", &digest(2), t0 + NEGATIVE_TTL).is_some());

        for i in 0..(NEGATIVE_MAX as u32 + 100) {
            c.insert("reg", "a/b", &digest(1000 + i), not_found(), t1);
        }
        assert_eq!(c.len(), NEGATIVE_MAX);
        assert!(
            c.get("reg", "a/b", &digest(1000), t1).is_none(),
            "oldest went first"
        );
        assert!(c
            .get("reg", "a/b", &digest(1000 + NEGATIVE_MAX as u32 + 99), t1)
            .is_some());
        let other = not_found_status();
        assert!(!is_not_found(&other));
    }

    fn not_found_status() -> FetchError {
        FetchError::Origin(OriginError::Status {
            host: "reg".into(),
            status: http::StatusCode::BAD_GATEWAY,
        })
    }
}
