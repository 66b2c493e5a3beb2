//! Landing an image in containerd (CRI `PullImage` and the pinned
//! label), and the store-size check done before any fetch.

use std::collections::HashSet;

use super::resolve::Resolved;
use super::{pin_target, ImageState, Prewarm, WarmError};
use crate::oci::{Digest, ImageRef};

impl Prewarm {
    /// An image that was landed in containerd is still there (a refresh
    /// found the same digest). Images not for containerd count as there.
    pub(super) async fn still_in_containerd(&self, idx: usize) -> bool {
        let (goes, landed, reference) = {
            let entries = self.lock();
            let e = &entries[idx];
            (
                self.goes_to_containerd(e),
                e.status.in_containerd,
                e.status.reference.clone(),
            )
        };
        if !goes {
            return true;
        }
        if !landed {
            return false;
        }
        let Some(c) = &self.inner.containerd else {
            return true;
        };
        match c.image_status(&reference).await {
            Ok(Some(_)) => true,
            Ok(None) => {
                tracing::info!(image = %reference, "a prewarmed image left containerd; pulling it again");
                false
            }
            Err(e) => {
                tracing::debug!(image = %reference, error = %e, "cannot check containerd");
                true
            }
        }
    }

    /// Refuses an image that cannot fit the store beside the other pins.
    pub(super) fn check_fits(
        &self,
        rule: &str,
        image: &ImageRef,
        r: &Resolved,
    ) -> Result<(), WarmError> {
        let store = self.inner.fetcher.store();
        let max = store.usage().max_size;
        let total = r.total_bytes();
        let size = |n: u64| bytesize::ByteSize(n).display().iec().to_string();
        if total > max {
            return Err(WarmError::Refused(format!(
                "the image is {} and store.max_size is {}",
                size(total),
                size(max)
            )));
        }
        let own: HashSet<Digest> = r.digests().into_iter().collect();
        let target = pin_target(rule, image);
        let mut others: HashSet<Digest> = HashSet::new();
        for rec in store.pins() {
            if rec.target == target {
                continue;
            }
            others.extend(
                rec.digests
                    .iter()
                    .filter_map(|d| d.parse::<Digest>().ok())
                    .filter(|d| !own.contains(d)),
            );
        }
        let held: u64 = others
            .iter()
            .filter_map(|d| store.blob_info(d))
            .map(|b| b.size)
            .sum();
        if held + total > max {
            return Err(WarmError::Refused(format!(
                "the image is {} and other pins hold {} of store.max_size {}",
                size(total),
                size(held),
                size(max)
            )));
        }
        Ok(())
    }

    /// CRI `PullImage` through the mirror, then the pinned label on every
    /// containerd record of the image (and off the records of the image a
    /// moved tag named before).
    pub(super) async fn land_in_containerd(
        &self,
        idx: usize,
        image: &ImageRef,
        resolved: &Resolved,
        old_names: &[String],
    ) -> Result<(), WarmError> {
        let Some(c) = &self.inner.containerd else {
            return Ok(());
        };
        self.update(idx, |e| e.status.state = ImageState::Pulling);
        // By tag when there is one: that is the name the kubelet looks for.
        let reference = image.pull_reference();
        let id = c.pull_image(&reference).await?;
        let mut names = vec![
            reference.clone(),
            image.pinned_to(&resolved.root).to_string(),
        ];
        let mut cri_pinned = None;
        if let Some(st) = c.image_status(&reference).await? {
            cri_pinned = Some(st.pinned);
            names.extend(st.repo_digests);
        }
        if !id.is_empty() {
            names.push(id);
        }
        names.sort();
        names.dedup();
        if self.inner.cfg.pin_in_containerd {
            c.set_pinned(&names, true).await?;
            if let Some(st) = c.image_status(&reference).await? {
                cri_pinned = Some(st.pinned);
            }
            let stale: Vec<String> = old_names
                .iter()
                .filter(|n| !names.contains(n))
                .cloned()
                .collect();
            if !stale.is_empty() {
                if let Err(e) = c.set_pinned(&stale, false).await {
                    tracing::warn!(error = %e, "cannot unpin the previous image in containerd");
                }
            }
        }
        self.update(idx, |e| {
            e.status.in_containerd = true;
            e.status.cri_pinned = cri_pinned;
            e.containerd_names = names;
        });
        Ok(())
    }
}
