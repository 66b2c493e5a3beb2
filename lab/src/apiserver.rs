//! A stand-in for the Kubernetes API server's node endpoints, for the node
//! gate's tests: no real API server can run here (no kind, k3s or etcd).
//!
//! It serves `GET /api/v1/nodes/<name>` and `PATCH` with an RFC 6902 JSON
//! patch (`application/json-patch+json`), applied as the real server does:
//! all operations or none, a failed `test` answered `422 Unprocessable
//! Entity` with a `Status` body. Tests can take RBAC away (`403`), make the
//! next patch lose a storage race (`409`), or let "another controller" add a
//! taint between the gate's read and its write, and they read back every
//! request and every accepted patch.

use std::sync::{Arc, Mutex};

use http_body_util::BodyExt as _;
use hyper::{Method, Request, Response};
use serde_json::{json, Value};

use super::server::{simple_response, LabBody, ServerThread};

/// One request the stand-in answered.
#[derive(Debug, Clone)]
pub struct ApiRequest {
    pub method: String,
    pub path: String,
    pub content_type: String,
    pub authorization: Option<String>,
    pub body: String,
    pub status: u16,
}

#[derive(Default)]
struct State {
    /// Node name -> the Node object.
    nodes: std::collections::BTreeMap<String, Value>,
    resource_version: u64,
    allow_get: bool,
    allow_patch: bool,
    /// Answer the next N patches with 409 Conflict without applying them.
    conflicts: u32,
    /// Before the next patch is applied, add this taint (a controller that
    /// wrote in between): the patch's `test` then fails.
    race: Option<Value>,
    requests: Vec<ApiRequest>,
    /// Each accepted patch: (node, its operations).
    accepted: Vec<(String, Value)>,
}

pub struct ApiServer {
    server: ServerThread,
    state: Arc<Mutex<State>>,
}

impl ApiServer {
    /// A server that holds no Node yet, with RBAC for get and patch.
    pub fn start() -> anyhow::Result<ApiServer> {
        let state = Arc::new(Mutex::new(State {
            allow_get: true,
            allow_patch: true,
            ..State::default()
        }));
        let handler_state = state.clone();
        let server = ServerThread::start("lab-apiserver", 1, move |req| {
            let state = handler_state.clone();
            async move { handle(&state, req).await }
        })?;
        Ok(ApiServer { server, state })
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.server.addr())
    }

    /// A kubeconfig file that points at this server with a bearer token.
    pub fn write_kubeconfig(&self, path: &std::path::Path) -> std::io::Result<()> {
        std::fs::write(
            path,
            format!(
                "apiVersion: v1\nkind: Config\nclusters:\n- name: standin\n  cluster:\n    server: {}\n\
                 users:\n- name: damselfly\n  user:\n    token: standin-token\n\
                 contexts:\n- name: standin\n  context:\n    cluster: standin\n    user: damselfly\n\
                 current-context: standin\n",
                self.url()
            ),
        )
    }

    /// Adds (or replaces) a Node with these labels and taints.
    pub fn add_node(&self, name: &str, labels: Value, taints: Vec<Value>) {
        let mut s = self.state.lock().unwrap();
        s.resource_version += 1;
        let mut node = json!({
            "apiVersion": "v1",
            "kind": "Node",
            "metadata": {
                "name": name,
                "uid": format!("uid-{name}"),
                "resourceVersion": s.resource_version.to_string(),
                "creationTimestamp": "2025-01-01T00:00:00Z",
                "labels": labels,
            },
            "spec": {"providerID": format!("aws:///us-east-1a/i-{name}")},
            "status": {"conditions": [{"type": "Ready", "status": "True"}]},
        });
        if !taints.is_empty() {
            node["spec"]["taints"] = Value::Array(taints);
        }
        s.nodes.insert(name.to_owned(), node);
    }

    /// The Node's taints now.
    pub fn taints(&self, name: &str) -> Vec<Value> {
        let s = self.state.lock().unwrap();
        s.nodes
            .get(name)
            .and_then(|n| n["spec"]["taints"].as_array().cloned())
            .unwrap_or_default()
    }

    /// Removes every taint with `key`, as Karpenter does with its
    /// `unregistered` taint once the node registers.
    pub fn remove_taint_key(&self, name: &str, key: &str) {
        let mut s = self.state.lock().unwrap();
        s.resource_version += 1;
        let rv = s.resource_version.to_string();
        if let Some(node) = s.nodes.get_mut(name) {
            if let Some(list) = node["spec"]["taints"].as_array_mut() {
                list.retain(|t| t["key"] != key);
            }
            node["metadata"]["resourceVersion"] = Value::String(rv);
        }
    }

    /// Which verbs the caller's RBAC allows (403 for the others).
    pub fn set_rbac(&self, get: bool, patch: bool) {
        let mut s = self.state.lock().unwrap();
        s.allow_get = get;
        s.allow_patch = patch;
    }

    /// Answers the next `n` patches with 409 Conflict.
    pub fn conflict_next_patches(&self, n: u32) {
        self.state.lock().unwrap().conflicts = n;
    }

    /// Adds `taint` to the node just before the next patch is applied, as
    /// another controller writing between the gate's read and its write.
    pub fn race_next_patch(&self, taint: Value) {
        self.state.lock().unwrap().race = Some(taint);
    }

    pub fn requests(&self) -> Vec<ApiRequest> {
        self.state.lock().unwrap().requests.clone()
    }

    /// GETs of the Node so far.
    pub fn gets(&self) -> usize {
        self.requests().iter().filter(|r| r.method == "GET").count()
    }

    /// The patches that were applied: (node, operations).
    pub fn accepted_patches(&self) -> Vec<(String, Value)> {
        self.state.lock().unwrap().accepted.clone()
    }
}

fn status(code: u16, reason: &str, message: &str, name: &str) -> Response<LabBody> {
    let body = json!({
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "details": {"name": name, "kind": "nodes"},
        "code": code,
    });
    simple_response(code, "application/json", body.to_string())
}

async fn handle(state: &Mutex<State>, req: Request<hyper::body::Incoming>) -> Response<LabBody> {
    let method = req.method().clone();
    let path = req.uri().path().to_owned();
    let header = |name: hyper::header::HeaderName| {
        req.headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    let content_type = header(hyper::header::CONTENT_TYPE).unwrap_or_default();
    let authorization = header(hyper::header::AUTHORIZATION);
    let body = match req.into_body().collect().await {
        Ok(b) => String::from_utf8_lossy(&b.to_bytes()).into_owned(),
        Err(_) => String::new(),
    };
    let mut s = state.lock().unwrap();
    let response = answer(&mut s, &method, &path, &content_type, &body);
    s.requests.push(ApiRequest {
        method: method.to_string(),
        path,
        content_type,
        authorization,
        body,
        status: response.status().as_u16(),
    });
    response
}

fn answer(
    s: &mut State,
    method: &Method,
    path: &str,
    content_type: &str,
    body: &str,
) -> Response<LabBody> {
    let Some(name) = path
        .strip_prefix("/api/v1/nodes/")
        .filter(|n| !n.contains('/'))
    else {
        return status(
            404,
            "NotFound",
            "the server could not find the requested resource",
            "",
        );
    };
    let user = "system:serviceaccount:damselfly:damselfly";
    let forbidden = |verb: &str| {
        status(
            403,
            "Forbidden",
            &format!(
                "nodes \"{name}\" is forbidden: User \"{user}\" cannot {verb} resource \"nodes\" \
                 in API group \"\" at the cluster scope"
            ),
            name,
        )
    };
    match *method {
        Method::GET => {
            if !s.allow_get {
                return forbidden("get");
            }
            match s.nodes.get(name) {
                Some(node) => simple_response(200, "application/json", node.to_string()),
                None => status(
                    404,
                    "NotFound",
                    &format!("nodes \"{name}\" not found"),
                    name,
                ),
            }
        }
        Method::PATCH => {
            if !s.allow_patch {
                return forbidden("patch");
            }
            if content_type != "application/json-patch+json" {
                return status(
                    415,
                    "UnsupportedMediaType",
                    &format!("the body of the request was in an unknown format: {content_type}"),
                    name,
                );
            }
            if s.conflicts > 0 {
                s.conflicts -= 1;
                return status(
                    409,
                    "Conflict",
                    &format!(
                        "Operation cannot be fulfilled on nodes \"{name}\": the object has been \
                         modified; please apply your changes to the latest version and try again"
                    ),
                    name,
                );
            }
            let race = s.race.take();
            s.resource_version += 1;
            let rv = s.resource_version.to_string();
            let Some(node) = s.nodes.get_mut(name) else {
                return status(
                    404,
                    "NotFound",
                    &format!("nodes \"{name}\" not found"),
                    name,
                );
            };
            if let Some(taint) = race {
                match node["spec"]["taints"].as_array_mut() {
                    Some(list) => list.push(taint),
                    None => node["spec"]["taints"] = json!([taint]),
                }
                node["metadata"]["resourceVersion"] = Value::String(rv.clone());
            }
            let ops: Value = match serde_json::from_str(body) {
                Ok(v) => v,
                Err(e) => return status(400, "BadRequest", &e.to_string(), name),
            };
            let patch: json_patch::Patch = match serde_json::from_value(ops.clone()) {
                Ok(p) => p,
                Err(e) => return status(400, "BadRequest", &e.to_string(), name),
            };
            let mut patched = node.clone();
            if let Err(e) = json_patch::patch(&mut patched, &patch) {
                // What kube-apiserver answers when a JSON patch does not apply.
                return status(422, "Invalid", &e.to_string(), name);
            }
            patched["metadata"]["resourceVersion"] = Value::String(rv);
            *node = patched.clone();
            s.accepted.push((name.to_owned(), ops));
            simple_response(200, "application/json", patched.to_string())
        }
        _ => status(
            405,
            "MethodNotAllowed",
            "the server does not allow this method",
            name,
        ),
    }
}
