//! Node gating: the daemon removes its startup taint from its own Node once
//! the node is wired, so no pod lands before the mirror can serve it.
//!
//! Karpenter's NodePool `startupTaints` (or a node group's taints) put
//! `damselfly.io/not-ready:NoSchedule` on every new node. [`gate`] waits for
//! the daemon's conditions (containerd's hosts.toml written, `/readyz`
//! ready, which with `prewarm.gate_readiness` includes the prewarm), then
//! for Karpenter's own `karpenter.sh/unregistered` taint to go (Karpenter
//! writes the startup taints when it registers a node, so one removed
//! earlier comes back), and then removes the taint with a guarded JSON patch.
//! A deadline lifts the daemon's own conditions, so a broken origin never
//! keeps a node out of service.
//!
//! Node taints are one list, and a merge patch replaces it whole: a taint
//! that another controller added between our read and our write would be
//! lost. So the patch `test`s the list as read, then `replace`s (or
//! `remove`s) it; when the list changed meanwhile the API server answers 422
//! (409 for a storage conflict) and the gate reads the Node again.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use k8s_openapi::api::core::v1::Node;
use kube::api::{Api, ApiResource, DynamicObject, Patch, PatchParams};
use serde_json::{json, Value};
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::config::{NodeConfig, TaintSpec};

/// Patches tried before the gate backs off and starts again: each one only
/// fails when the taints changed since the read just before it.
const PATCH_ATTEMPTS: u32 = 8;

#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error(
        "no node name: set node.name, or NODE_NAME from the downward API \
         (env valueFrom.fieldRef.fieldPath: spec.nodeName)"
    )]
    NoNodeName,
    #[error("cannot set up the Kubernetes client{}: {reason}",
        .kubeconfig.as_ref().map(|p| format!(" from {}", p.display())).unwrap_or_default())]
    Client {
        kubeconfig: Option<PathBuf>,
        reason: String,
    },
    #[error(
        "the API server refused to {verb} node {node} (403 Forbidden): the ServiceAccount \
         needs get and patch on nodes (daemonset/base/rbac.yaml): {message}"
    )]
    Forbidden {
        node: String,
        verb: &'static str,
        message: String,
    },
    #[error("node {node} does not exist (404): is node.name or NODE_NAME right?")]
    NotFound { node: String },
    #[error("the taints of node {node} changed under each of {attempts} patches in a row")]
    Conflicts { node: String, attempts: u32 },
    #[error("node {node}: spec.taints is not a list of taints")]
    BadTaints { node: String },
    #[error("cannot {verb} node {node}: {source}")]
    Api {
        node: String,
        verb: &'static str,
        #[source]
        source: kube::Error,
    },
}

/// What [`NodeApi::remove_taint`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Removal {
    /// Removed by one successful patch, after `conflicts` refused ones.
    Removed { conflicts: u32 },
    /// The Node did not carry the taint.
    Absent,
}

/// This node's Node object, read and patched through the API server.
#[derive(Clone)]
pub struct NodeApi {
    /// Untyped on purpose: the guard's `test` must send back the taints
    /// exactly as the server wrote them, and a typed round trip could
    /// re-encode a `timeAdded` differently.
    api: Api<DynamicObject>,
    name: String,
}

impl NodeApi {
    /// A client for `node.name` (or `$NODE_NAME`), from `node.kubeconfig`,
    /// else in-cluster config, else `$KUBECONFIG` / `~/.kube/config`.
    pub async fn connect(cfg: &NodeConfig) -> Result<NodeApi, NodeError> {
        let name = node_name(cfg)?;
        let client_err = |reason: String| NodeError::Client {
            kubeconfig: cfg.kubeconfig.clone(),
            reason,
        };
        let mut config = match &cfg.kubeconfig {
            Some(path) => {
                let kc = kube::config::Kubeconfig::read_from(path)
                    .map_err(|e| client_err(e.to_string()))?;
                kube::Config::from_custom_kubeconfig(kc, &Default::default())
                    .await
                    .map_err(|e| client_err(e.to_string()))?
            }
            None => kube::Config::infer()
                .await
                .map_err(|e| client_err(e.to_string()))?,
        };
        // kube sets no read timeout; a wedged API server must not hang the gate.
        config.read_timeout = Some(Duration::from_secs(30));
        let client = kube::Client::try_from(config).map_err(|e| client_err(e.to_string()))?;
        Ok(NodeApi::new(client, name))
    }

    pub fn new(client: kube::Client, name: impl Into<String>) -> NodeApi {
        NodeApi {
            api: Api::all_with(client, &ApiResource::erase::<Node>(&())),
            name: name.into(),
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// The Node's labels, e.g. GPU Feature Discovery's `nvidia.com/gpu.product`.
    pub async fn labels(&self) -> Result<BTreeMap<String, String>, NodeError> {
        Ok(self.get().await?.metadata.labels.unwrap_or_default())
    }

    /// The Node's taints as the API server sent them.
    pub async fn taints(&self) -> Result<Vec<Value>, NodeError> {
        let node = self.get().await?;
        self.taints_of(&node)
    }

    /// Which of `keys` the Node carries as taints.
    pub async fn present(&self, keys: &[String]) -> Result<Vec<String>, NodeError> {
        let taints = self.taints().await?;
        Ok(keys
            .iter()
            .filter(|k| taints.iter().any(|t| t["key"] == k.as_str()))
            .cloned()
            .collect())
    }

    /// Removes every taint that matches `spec` and keeps the others, with a
    /// patch that fails if the taints changed since they were read; on
    /// such a failure (422, or 409) it reads them again and retries.
    pub async fn remove_taint(&self, spec: &TaintSpec) -> Result<Removal, NodeError> {
        for attempt in 0..PATCH_ATTEMPTS {
            let node = self.get().await?;
            let taints = self.taints_of(&node)?;
            let kept: Vec<Value> = taints
                .iter()
                .filter(|t| !matches(spec, t))
                .cloned()
                .collect();
            if kept.len() == taints.len() {
                return Ok(Removal::Absent);
            }
            let write = if kept.is_empty() {
                json!({"op": "remove", "path": "/spec/taints"})
            } else {
                json!({"op": "replace", "path": "/spec/taints", "value": kept})
            };
            let ops = json!([{"op": "test", "path": "/spec/taints", "value": taints}, write]);
            let patch: json_patch::Patch =
                serde_json::from_value(ops).map_err(|e| NodeError::Api {
                    node: self.name.clone(),
                    verb: "build a patch for",
                    source: kube::Error::SerdeError(e),
                })?;
            match self
                .api
                .patch(
                    &self.name,
                    &PatchParams::default(),
                    &Patch::Json::<()>(patch),
                )
                .await
            {
                Ok(_) => return Ok(Removal::Removed { conflicts: attempt }),
                Err(kube::Error::Api(s)) if s.code == 409 || s.code == 422 => {
                    tracing::debug!(node = %self.name, code = s.code, message = %s.message,
                        "the node's taints changed since they were read; reading again");
                    tokio::time::sleep(Duration::from_millis(50 * u64::from(attempt + 1))).await;
                }
                Err(e) => return Err(self.error("patch", e)),
            }
        }
        Err(NodeError::Conflicts {
            node: self.name.clone(),
            attempts: PATCH_ATTEMPTS,
        })
    }

    async fn get(&self) -> Result<DynamicObject, NodeError> {
        self.api
            .get(&self.name)
            .await
            .map_err(|e| self.error("get", e))
    }

    fn taints_of(&self, node: &DynamicObject) -> Result<Vec<Value>, NodeError> {
        match node.data.pointer("/spec/taints") {
            None | Some(Value::Null) => Ok(Vec::new()),
            Some(Value::Array(list)) if list.iter().all(|t| t["key"].is_string()) => {
                Ok(list.clone())
            }
            Some(_) => Err(NodeError::BadTaints {
                node: self.name.clone(),
            }),
        }
    }

    fn error(&self, verb: &'static str, e: kube::Error) -> NodeError {
        let node = self.name.clone();
        match e {
            kube::Error::Api(s) if s.code == 403 => NodeError::Forbidden {
                node,
                verb,
                message: s.message,
            },
            kube::Error::Api(s) if s.code == 404 => NodeError::NotFound { node },
            source => NodeError::Api { node, verb, source },
        }
    }
}

/// Kubernetes identifies a taint by key and effect; a value, when the spec
/// names one, must match too.
fn matches(spec: &TaintSpec, taint: &Value) -> bool {
    taint["key"] == spec.key.as_str()
        && taint["effect"] == spec.effect.as_str()
        && spec
            .value
            .as_deref()
            .is_none_or(|v| taint["value"].as_str().unwrap_or("") == v)
}

/// `node.name`, else `$NODE_NAME`.
pub fn node_name(cfg: &NodeConfig) -> Result<String, NodeError> {
    cfg.name
        .clone()
        .or_else(|| std::env::var("NODE_NAME").ok())
        .filter(|n| !n.is_empty())
        .ok_or(NodeError::NoNodeName)
}

/// One thing the node waits for, as the daemon reports it.
pub struct Condition {
    /// Named in logs: "hosts", "ready".
    pub name: &'static str,
    pub met: watch::Receiver<bool>,
}

/// How [`gate`] ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// `forced`: the deadline passed before every condition was met.
    Removed {
        forced: bool,
    },
    /// The Node had no such taint (no `startupTaints` configured).
    Absent {
        forced: bool,
    },
    Cancelled,
}

/// Waits for `conditions` (or `deadline`), then for `cfg.wait_for_taints`
/// to go, then removes `cfg.taint`. API errors are logged and retried with
/// backoff (RBAC applied late heals by itself), so this returns only when
/// the taint is gone or `shutdown` fires.
pub async fn gate(
    api: &NodeApi,
    cfg: &NodeConfig,
    conditions: Vec<Condition>,
    deadline: Instant,
    shutdown: &CancellationToken,
) -> Outcome {
    let node = api.name().to_owned();
    let taint = cfg.taint.to_string();
    tracing::info!(%node, %taint, conditions = ?conditions.iter().map(|c| c.name).collect::<Vec<_>>(),
        "node gate: the taint stays until these are met");
    let pending = |cs: &[Condition]| -> Vec<&'static str> {
        cs.iter()
            .filter(|c| !*c.met.borrow())
            .map(|c| c.name)
            .collect()
    };
    let all_met = async {
        for c in &conditions {
            let mut rx = c.met.clone();
            // A sender gone without saying yes never will: wait for the deadline.
            if rx.wait_for(|met| *met).await.is_err() {
                std::future::pending::<()>().await;
            }
            tracing::info!(%node, condition = c.name, "node gate: condition met");
        }
    };
    let forced = tokio::select! {
        _ = shutdown.cancelled() => return Outcome::Cancelled,
        _ = all_met => false,
        _ = tokio::time::sleep_until(deadline) => {
            tracing::warn!(%node, %taint, waiting_for = ?pending(&conditions),
                "node gate: the deadline (node.deadline) passed first; removing the taint anyway, \
                 so pods may land before containerd is wired or the images are warm");
            true
        }
    };

    let mut said = Vec::new();
    let mut backoff = Backoff::new();
    loop {
        match api.present(&cfg.wait_for_taints).await {
            Ok(p) if p.is_empty() => break,
            Ok(p) => {
                if p != said {
                    tracing::info!(%node, taints = ?p,
                        "node gate: waiting for these taints to go before removing ours");
                    said = p;
                }
                backoff.reset();
                if sleep_or_cancel(cfg.poll_interval, shutdown).await {
                    return Outcome::Cancelled;
                }
            }
            Err(e) => {
                tracing::error!(%node, error = %e, "node gate: cannot read the node");
                if sleep_or_cancel(backoff.next(), shutdown).await {
                    return Outcome::Cancelled;
                }
            }
        }
    }

    loop {
        match api.remove_taint(&cfg.taint).await {
            Ok(Removal::Removed { conflicts }) => {
                tracing::info!(%node, %taint, conflicts, forced, "node gate: taint removed");
                return Outcome::Removed { forced };
            }
            Ok(Removal::Absent) => {
                tracing::info!(%node, %taint,
                    "node gate: the node does not carry the taint; nothing to remove");
                return Outcome::Absent { forced };
            }
            Err(e) => {
                tracing::error!(%node, %taint, error = %e,
                    "node gate: cannot remove the taint; trying again");
                if sleep_or_cancel(backoff.next(), shutdown).await {
                    return Outcome::Cancelled;
                }
            }
        }
    }
}

/// True when `shutdown` fired first.
async fn sleep_or_cancel(d: Duration, shutdown: &CancellationToken) -> bool {
    tokio::select! {
        _ = shutdown.cancelled() => true,
        _ = tokio::time::sleep(d) => false,
    }
}

/// 1 s, doubling to a minute.
struct Backoff(Duration);

impl Backoff {
    fn new() -> Backoff {
        Backoff(Duration::from_secs(1))
    }

    fn next(&mut self) -> Duration {
        let d = self.0;
        self.0 = (self.0 * 2).min(Duration::from_secs(60));
        d
    }

    fn reset(&mut self) {
        *self = Backoff::new();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn taints_match_by_key_effect_and_given_value() {
        let spec: TaintSpec = "damselfly.io/not-ready:NoSchedule".parse().unwrap();
        let t = |v: Value| matches(&spec, &v);
        assert!(t(
            json!({"key": "damselfly.io/not-ready", "effect": "NoSchedule"})
        ));
        assert!(t(
            json!({"key": "damselfly.io/not-ready", "value": "x", "effect": "NoSchedule"})
        ));
        assert!(!t(
            json!({"key": "damselfly.io/not-ready", "effect": "NoExecute"})
        ));
        assert!(!t(json!({"key": "nvidia.com/gpu", "effect": "NoSchedule"})));
        let valued: TaintSpec = "gpu=true:NoSchedule".parse().unwrap();
        assert!(matches(
            &valued,
            &json!({"key": "gpu", "value": "true", "effect": "NoSchedule"})
        ));
        assert!(!matches(
            &valued,
            &json!({"key": "gpu", "value": "false", "effect": "NoSchedule"})
        ));
    }

    #[test]
    fn backoff_doubles_to_a_minute() {
        let mut b = Backoff::new();
        let got: Vec<u64> = (0..8).map(|_| b.next().as_secs()).collect();
        assert_eq!(got, [1, 2, 4, 8, 16, 32, 60, 60]);
    }
}
