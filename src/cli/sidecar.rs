//! `damselfly sidecar status`: the sidecar's `/v1/status`, over HTTP (the
//! sidecar runs as its own pod, not on a node's admin socket).

use std::process::ExitCode;

use clap::Args;

use super::{finish, local_url, print, runtime, width, CliError, Global};
use crate::config::Config;
use crate::sidecar::{SidecarStatus, STATUS_PATH};

#[derive(Debug, Clone, Args)]
pub struct SidecarStatusArgs {
    /// The sidecar's HTTP address [default: `sidecar.listen` from the
    /// config, else http://127.0.0.1:4010].
    #[arg(long, value_name = "URL")]
    pub url: Option<String>,
}

/// `damselfly sidecar status`: exit 0, 2 for a bad config, 3 when the
/// sidecar does not answer.
pub fn sidecar_status(g: &Global, a: &SidecarStatusArgs) -> ExitCode {
    finish(runtime().and_then(|rt| rt.block_on(status(g, a))))
}

async fn status(g: &Global, a: &SidecarStatusArgs) -> Result<(), CliError> {
    let base = match &a.url {
        Some(u) => u.trim_end_matches('/').to_owned(),
        None => {
            let cfg = match &g.config {
                Some(p) => Config::load(p),
                None => Config::defaults(),
            }
            .map_err(|e| CliError::Usage(e.to_string()))?;
            let listen = cfg.sidecar.map(|s| s.listen).unwrap_or_else(|| {
                crate::config::default_of("sidecar.listen")
                    .parse()
                    .unwrap_or_else(|_| std::net::SocketAddr::from(([127, 0, 0, 1], 4010)))
            });
            local_url(listen)
        }
    };
    let url = format!("{base}{STATUS_PATH}");
    let unreachable = |reason: String| CliError::SidecarUnreachable {
        url: url.clone(),
        reason,
    };
    let resp = reqwest::Client::builder()
        .timeout(std::time::Duration::from_secs(10))
        .no_proxy()
        .build()
        .map_err(|e| CliError::Protocol(e.to_string()))?
        .get(&url)
        .send()
        .await
        .map_err(|e| unreachable(format!("{e}; is `damselfly sidecar` running there?")))?;
    if !resp.status().is_success() {
        return Err(CliError::Protocol(format!(
            "{url} answered {}",
            resp.status()
        )));
    }
    let s: Option<SidecarStatus> = resp
        .json()
        .await
        .map_err(|e| CliError::Protocol(format!("{url}: {e}")))?;
    let s = s.ok_or_else(|| CliError::Protocol(format!("{url}: the sidecar is starting")))?;
    print(g, &s, |s| {
        super::render::sidecar_status(s, super::render::now(), width())
    })
}
