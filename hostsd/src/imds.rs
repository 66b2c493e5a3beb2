//! This instance's AWS account and region, from EC2 instance metadata with
//! IMDSv2 (a session token first, then reads that present it).

use std::time::Duration;

use crate::ecr::{validate_account, validate_region};
use crate::error::Error;

/// What discovery yields.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub account_id: String,
    pub region: String,
}

const TOKEN_TTL_HEADER: &str = "X-aws-ec2-metadata-token-ttl-seconds";
const TOKEN_HEADER: &str = "X-aws-ec2-metadata-token";
const NO_ANSWER: &str = "no answer in time";
/// IMDS answers are a few hundred bytes; anything larger is not IMDS.
const BODY_LIMIT: u64 = 64 * 1024;

/// Asks IMDSv2 at `endpoint` (e.g. `http://169.254.169.254`) for the account
/// id and region. Each request gets `timeout`.
pub fn discover(endpoint: &str, timeout: Duration) -> Result<Identity, Error> {
    let base = endpoint.trim_end_matches('/');
    let fail = |step: &'static str, reason: String| Error::Imds {
        endpoint: base.to_string(),
        step,
        reason,
    };
    let agent: ureq::Agent = ureq::Agent::config_builder()
        // IMDS is link-local: a proxy from the environment must not see it.
        .proxy(None)
        .timeout_global(Some(timeout))
        .http_status_as_error(false)
        .max_redirects(0)
        .build()
        .into();

    let token = fetch(
        agent
            .put(format!("{base}/latest/api/token"))
            .header(TOKEN_TTL_HEADER, "60")
            .send_empty(),
    )
    .map_err(|r| {
        // The usual cause of silence: the token's reply is dropped one hop
        // early when the caller is in a pod.
        let hint = if r == NO_ANSWER {
            "; inside a pod without hostNetwork, IMDSv2 answers only when the \
             instance's metadata hop limit is 2 or more"
        } else {
            ""
        };
        fail("IMDSv2 token (PUT /latest/api/token)", format!("{r}{hint}"))
    })?;
    let token = token.trim().to_string();
    let get = |path: &str| {
        fetch(
            agent
                .get(format!("{base}{path}"))
                .header(TOKEN_HEADER, &token)
                .call(),
        )
    };

    let region = get("/latest/meta-data/placement/region")
        .map_err(|r| fail("region (GET /latest/meta-data/placement/region)", r))?
        .trim()
        .to_string();
    let doc = get("/latest/dynamic/instance-identity/document").map_err(|r| {
        fail(
            "identity document (GET /latest/dynamic/instance-identity/document)",
            r,
        )
    })?;
    let doc: serde_json::Value = serde_json::from_str(&doc)
        .map_err(|e| fail("identity document", format!("not JSON: {e}")))?;
    let account_id = doc
        .get("accountId")
        .and_then(|v| v.as_str())
        .ok_or_else(|| fail("identity document", "no accountId".into()))?
        .to_string();
    let doc_region = doc.get("region").and_then(|v| v.as_str()).unwrap_or("");
    let region = if region.is_empty() {
        doc_region.to_string()
    } else {
        region
    };
    if !doc_region.is_empty() && doc_region != region {
        return Err(fail(
            "identity document",
            format!("region {doc_region} disagrees with placement/region {region}"),
        ));
    }
    validate_account(&account_id).map_err(|e| fail("identity document", e.to_string()))?;
    validate_region(&region).map_err(|e| fail("region", e.to_string()))?;
    Ok(Identity { account_id, region })
}

/// The body of a 200 answer, or why there is none.
fn fetch(result: Result<ureq::http::Response<ureq::Body>, ureq::Error>) -> Result<String, String> {
    let mut resp = result.map_err(|e| match e {
        ureq::Error::Timeout(_) => NO_ANSWER.to_string(),
        other => other.to_string(),
    })?;
    let status = resp.status();
    let body = resp
        .body_mut()
        .with_config()
        .limit(BODY_LIMIT)
        .read_to_string()
        .map_err(|e| format!("reading the answer: {e}"))?;
    if status != 200 {
        return Err(format!("HTTP {}", status.as_u16()));
    }
    Ok(body)
}
