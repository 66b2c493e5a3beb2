//! The kubelet's `PullImage` for tests, over containerd's socket, with the
//! daemon's own CRI client (`damselfly::cri`), for damselfly's tests and
//! hostsd's.

use std::path::Path;
use std::time::Duration;

/// CRI `runtime.v1.ImageService/PullImage` of `image`, blocking.
pub fn cri_pull(sock: &Path, image: &str) -> Result<(), String> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    let c = damselfly::cri::Containerd::new(sock, "k8s.io", Duration::from_secs(60));
    rt.block_on(c.pull_image(image))
        .map(|_| ())
        .map_err(|e| e.to_string())
}
