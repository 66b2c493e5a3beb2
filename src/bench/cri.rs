//! The kubelet's pull, timed: CRI `RemoveImage`, then `PullImage`, over
//! containerd's socket with the daemon's own CRI client ([`crate::cri`]).

use std::path::Path;
use std::time::{Duration, Instant};

use super::BenchError;
use crate::cri::Containerd;

/// Removes `image` from containerd (an image that is not there is fine),
/// then times `PullImage`.
pub async fn timed_pull(
    sock: &Path,
    image: &str,
    timeout: Duration,
) -> Result<Duration, BenchError> {
    // The namespace only matters for the images API; CRI picks its own.
    let c = Containerd::new(sock, "k8s.io", timeout);
    let err = |e: crate::cri::CriError| BenchError::Cri(e.to_string());
    c.remove_image(image).await.map_err(err)?;
    let started = Instant::now();
    c.pull_image(image).await.map_err(err)?;
    Ok(started.elapsed())
}
