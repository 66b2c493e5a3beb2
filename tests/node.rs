//! The node gate (src/node.rs) against a stand-in of the API server's node
//! endpoints (lab/src/apiserver.rs), through the real kube client; and
//! the daemon itself un-tainting its node once hostsd has wired containerd.

use std::time::{Duration, Instant};

use common::ApiServer;
use damselfly::config::{Config, NodeConfig};
use damselfly::node::{gate, Condition, NodeApi, NodeError, Outcome, Removal};
use damselfly_lab as common;
use damselfly_lab::daemon;
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;

const NODE: &str = "ip-10-0-1-7.ec2.internal";

fn ours() -> Value {
    json!({"key": "damselfly.io/not-ready", "effect": "NoSchedule"})
}

fn gpu() -> Value {
    json!({"key": "nvidia.com/gpu", "value": "present", "effect": "NoSchedule",
           "timeAdded": "2025-01-01T00:00:00Z"})
}

fn unregistered() -> Value {
    json!({"key": "karpenter.sh/unregistered", "effect": "NoExecute"})
}

async fn client(server: &ApiServer) -> NodeApi {
    let config = kube::Config::new(server.url().parse().unwrap());
    NodeApi::new(kube::Client::try_from(config).unwrap(), NODE)
}

fn node_config(extra: &str) -> NodeConfig {
    Config::parse(
        &format!("[node]\ngate = true\npoll_interval = \"20ms\"\n{extra}"),
        std::path::Path::new("x.toml"),
    )
    .unwrap()
    .node
}

fn keys(taints: &[Value]) -> Vec<&str> {
    taints.iter().map(|t| t["key"].as_str().unwrap()).collect()
}

#[tokio::test]
async fn the_taint_is_removed_exactly_once_and_the_others_are_kept() {
    let server = ApiServer::start().unwrap();
    server.add_node(NODE, json!({}), vec![gpu(), ours()]);
    let api = client(&server).await;
    let spec = node_config("").taint;
    assert_eq!(
        api.remove_taint(&spec).await.unwrap(),
        Removal::Removed { conflicts: 0 }
    );
    // The other taint is kept byte for byte (its timeAdded included).
    assert_eq!(server.taints(NODE), [gpu()]);
    // Again: nothing to do, and no second patch.
    assert_eq!(api.remove_taint(&spec).await.unwrap(), Removal::Absent);
    let patches = server.accepted_patches();
    assert_eq!(patches.len(), 1, "{patches:?}");
    // The patch is guarded: test the list as read, then replace it.
    assert_eq!(
        patches[0].1,
        json!([
            {"op": "test", "path": "/spec/taints", "value": [gpu(), ours()]},
            {"op": "replace", "path": "/spec/taints", "value": [gpu()]},
        ])
    );
    let patch_req = server
        .requests()
        .into_iter()
        .find(|r| r.method == "PATCH")
        .unwrap();
    assert_eq!(patch_req.content_type, "application/json-patch+json");
    assert_eq!(patch_req.path, format!("/api/v1/nodes/{NODE}"));
}

#[tokio::test]
async fn the_last_taint_is_removed_with_remove() {
    let server = ApiServer::start().unwrap();
    server.add_node(NODE, json!({}), vec![ours()]);
    let api = client(&server).await;
    api.remove_taint(&node_config("").taint).await.unwrap();
    assert!(server.taints(NODE).is_empty());
    assert_eq!(
        server.accepted_patches()[0].1[1],
        json!({"op": "remove", "path": "/spec/taints"})
    );
}

#[tokio::test]
async fn a_taint_added_between_read_and_write_is_kept_and_the_patch_retried() {
    let server = ApiServer::start().unwrap();
    server.add_node(NODE, json!({}), vec![ours()]);
    let added = json!({"key": "node.kubernetes.io/disk-pressure", "effect": "NoSchedule"});
    server.race_next_patch(added.clone());
    let api = client(&server).await;
    let got = api.remove_taint(&node_config("").taint).await.unwrap();
    assert_eq!(got, Removal::Removed { conflicts: 1 });
    // A merge patch would have dropped the other controller's taint.
    assert_eq!(server.taints(NODE), [added]);
    let statuses: Vec<u16> = server
        .requests()
        .iter()
        .filter(|r| r.method == "PATCH")
        .map(|r| r.status)
        .collect();
    assert_eq!(statuses, [422, 200]);
    assert_eq!(server.accepted_patches().len(), 1);
}

#[tokio::test]
async fn a_409_is_retried_with_a_fresh_read_and_endless_conflicts_give_up() {
    let server = ApiServer::start().unwrap();
    server.add_node(NODE, json!({}), vec![gpu(), ours()]);
    server.conflict_next_patches(2);
    let api = client(&server).await;
    let spec = node_config("").taint;
    assert_eq!(
        api.remove_taint(&spec).await.unwrap(),
        Removal::Removed { conflicts: 2 }
    );
    assert_eq!(server.taints(NODE), [gpu()]);
    // Each attempt read the node again first.
    let methods: Vec<String> = server.requests().into_iter().map(|r| r.method).collect();
    assert_eq!(methods, ["GET", "PATCH", "GET", "PATCH", "GET", "PATCH"]);

    server.add_node(NODE, json!({}), vec![ours()]);
    server.conflict_next_patches(1000);
    match api.remove_taint(&spec).await {
        Err(NodeError::Conflicts { attempts, .. }) => assert_eq!(attempts, 8),
        other => panic!("expected Conflicts, got {other:?}"),
    }
    assert_eq!(server.taints(NODE), [ours()]);
}

#[tokio::test]
async fn without_rbac_the_error_says_so_and_nothing_changes() {
    let server = ApiServer::start().unwrap();
    server.add_node(NODE, json!({}), vec![ours()]);
    let api = client(&server).await;
    let spec = node_config("").taint;
    server.set_rbac(true, false);
    let err = api.remove_taint(&spec).await.unwrap_err();
    assert!(
        matches!(&err, NodeError::Forbidden { verb: "patch", .. }),
        "{err:?}"
    );
    let text = err.to_string();
    assert!(
        text.contains("403") && text.contains("get and patch on nodes"),
        "{text}"
    );
    server.set_rbac(false, false);
    assert!(matches!(
        api.labels().await,
        Err(NodeError::Forbidden { verb: "get", .. })
    ));
    assert_eq!(server.taints(NODE), [ours()]);
    assert!(server.accepted_patches().is_empty());

    let missing = NodeApi::new(
        kube::Client::try_from(kube::Config::new(server.url().parse().unwrap())).unwrap(),
        "no-such-node",
    );
    server.set_rbac(true, true);
    assert!(matches!(
        missing.taints().await,
        Err(NodeError::NotFound { .. })
    ));
}

#[tokio::test]
async fn labels_come_from_the_node() {
    let server = ApiServer::start().unwrap();
    server.add_node(
        NODE,
        json!({"nvidia.com/gpu.product": "NVIDIA-A10G", "nvidia.com/gpu.count": "1"}),
        vec![],
    );
    let labels = client(&server).await.labels().await.unwrap();
    assert_eq!(labels["nvidia.com/gpu.product"], "NVIDIA-A10G");
    assert_eq!(labels.len(), 2);
}

/// The gate holds the taint until every condition is met and Karpenter's
/// unregistered taint is gone, then removes it once.
#[tokio::test]
async fn the_gate_waits_for_its_conditions_and_for_karpenter() {
    let server = ApiServer::start().unwrap();
    server.add_node(NODE, json!({}), vec![unregistered(), gpu(), ours()]);
    let api = client(&server).await;
    let cfg = node_config("");
    let (hosts_tx, hosts) = tokio::sync::watch::channel(false);
    let (ready_tx, ready) = tokio::sync::watch::channel(false);
    let stop = CancellationToken::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(600);
    let task = {
        let api = api.clone();
        let cfg = cfg.clone();
        let stop = stop.clone();
        tokio::spawn(async move {
            let conditions = vec![
                Condition {
                    name: "hosts",
                    met: hosts,
                },
                Condition {
                    name: "ready",
                    met: ready,
                },
            ];
            gate(&api, &cfg, conditions, deadline, &stop).await
        })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    // Nothing is read or written before the daemon's own conditions hold.
    assert!(server.requests().is_empty(), "{:?}", server.requests());
    hosts_tx.send_replace(true);
    ready_tx.send_replace(true);
    // Then it watches the node, but leaves it alone while Karpenter's
    // taint is there.
    wait_until(|| server.gets() >= 3).await;
    assert!(server.accepted_patches().is_empty());
    assert_eq!(keys(&server.taints(NODE)).len(), 3);
    server.remove_taint_key(NODE, "karpenter.sh/unregistered");
    let outcome = tokio::time::timeout(Duration::from_secs(20), task)
        .await
        .expect("the gate finishes")
        .unwrap();
    assert_eq!(outcome, Outcome::Removed { forced: false });
    assert_eq!(server.taints(NODE), [gpu()]);
    assert_eq!(server.accepted_patches().len(), 1);
}

#[tokio::test]
async fn the_deadline_removes_the_taint_anyway() {
    let server = ApiServer::start().unwrap();
    server.add_node(NODE, json!({}), vec![ours()]);
    let api = client(&server).await;
    let cfg = node_config("");
    // A condition that is never met (an origin that never answers the prewarm).
    let (_never_tx, never) = tokio::sync::watch::channel(false);
    let stop = CancellationToken::new();
    let deadline = tokio::time::Instant::now() + Duration::from_millis(100);
    let conditions = vec![Condition {
        name: "ready",
        met: never,
    }];
    let outcome = tokio::time::timeout(
        Duration::from_secs(20),
        gate(&api, &cfg, conditions, deadline, &stop),
    )
    .await
    .unwrap();
    assert_eq!(outcome, Outcome::Removed { forced: true });
    assert!(server.taints(NODE).is_empty());
}

#[tokio::test]
async fn a_gate_without_rbac_keeps_trying_until_rbac_is_fixed() {
    let server = ApiServer::start().unwrap();
    server.add_node(NODE, json!({}), vec![ours()]);
    server.set_rbac(true, false);
    let api = client(&server).await;
    let cfg = node_config("wait_for_taints = []\n");
    let stop = CancellationToken::new();
    let task = {
        let stop = stop.clone();
        tokio::spawn(async move {
            gate(&api, &cfg, Vec::new(), tokio::time::Instant::now(), &stop).await
        })
    };
    wait_until(|| server.requests().iter().any(|r| r.status == 403)).await;
    server.set_rbac(true, true);
    let outcome = tokio::time::timeout(Duration::from_secs(20), task)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(outcome, Outcome::Removed { forced: false });
    assert!(server.taints(NODE).is_empty());

    // And a shutdown while waiting ends it without touching the node.
    server.add_node(NODE, json!({}), vec![unregistered(), ours()]);
    let api = client(&server).await;
    let cfg = node_config("");
    let stop = CancellationToken::new();
    stop.cancel();
    let outcome = gate(&api, &cfg, Vec::new(), tokio::time::Instant::now(), &stop).await;
    assert_eq!(outcome, Outcome::Cancelled);
    assert_eq!(keys(&server.taints(NODE)).len(), 2);
}

async fn wait_until(mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !f() {
        assert!(Instant::now() < deadline, "condition not met in 20 s");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// The daemon as the DaemonSet runs it: the hostsd init container's files
/// (`damselfly hosts apply`, from the daemon's own config) are checked
/// before the taint comes off, through a kubeconfig and `$NODE_NAME`.
#[test]
fn the_daemon_untaints_its_node_once_the_init_containers_files_check_out() {
    let server = ApiServer::start().unwrap();
    server.add_node(NODE, json!({}), vec![gpu(), ours()]);
    let tmp = tempfile::tempdir().unwrap();
    let kubeconfig = tmp.path().join("kubeconfig");
    server.write_kubeconfig(&kubeconfig).unwrap();
    let certs = tmp.path().join("certs.d");
    std::fs::create_dir(&certs).unwrap();
    let d = daemon::Daemon::start_with(daemon::Options {
        extra: format!(
            "[containerd]\nconfig = \"{}\"\ncerts_dir = \"{}\"\n\
             [node]\ngate = true\nkubeconfig = \"{}\"\npoll_interval = \"50ms\"\n\
             [[registry]]\nhost = \"registry.example.test\"\n",
            tmp.path().join("no-config.toml").display(),
            certs.display(),
            kubeconfig.display()
        ),
        env: vec![("NODE_NAME".into(), NODE.into())],
        ..Default::default()
    });
    // Ready, but containerd is not wired yet: the taint stays.
    wait_for_log(&d, "containerd is not wired to the mirror yet");
    assert!(server.accepted_patches().is_empty());
    assert_eq!(server.taints(NODE), [gpu(), ours()]);

    let out = std::process::Command::new(daemon::binary())
        .args(["hosts", "apply", "--config"])
        .arg(&d.config_path)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let written = std::fs::read_to_string(certs.join("registry.example.test/hosts.toml")).unwrap();
    assert!(
        written.contains(&format!("[host.\"http://{}\"]", d.mirror)),
        "{written}"
    );

    wait_for_log(&d, "node gate: taint removed");
    assert_eq!(server.taints(NODE), [gpu()]);
    assert_eq!(server.accepted_patches().len(), 1);
    let auth = server.requests()[0].authorization.clone();
    assert_eq!(auth.as_deref(), Some("Bearer standin-token"));
}

/// With `containerd.configure_hosts` the daemon's own hostsd run is the
/// condition; without a node name the daemon refuses to start.
#[test]
fn the_daemon_gates_on_its_own_hostsd_run_and_needs_a_node_name() {
    let server = ApiServer::start().unwrap();
    server.add_node(NODE, json!({}), vec![ours()]);
    let tmp = tempfile::tempdir().unwrap();
    let kubeconfig = tmp.path().join("kubeconfig");
    server.write_kubeconfig(&kubeconfig).unwrap();
    let certs = tmp.path().join("certs.d");
    std::fs::create_dir(&certs).unwrap();
    let extra = format!(
        "[containerd]\nconfigure_hosts = true\nconfig = \"{}\"\ncerts_dir = \"{}\"\n\
         [node]\ngate = true\nkubeconfig = \"{}\"\nwait_for_taints = []\n",
        tmp.path().join("no-config.toml").display(),
        certs.display(),
        kubeconfig.display()
    );
    let d = daemon::Daemon::start_with(daemon::Options {
        extra: extra.clone(),
        env: vec![("NODE_NAME".into(), NODE.into())],
        ..Default::default()
    });
    wait_for_log(&d, "node gate: taint removed");
    assert!(certs.join("_default/hosts.toml").exists());
    assert!(server.taints(NODE).is_empty());

    let (status, log) = daemon::Daemon::start_expecting_exit(daemon::Options {
        extra,
        env_remove: vec!["NODE_NAME".into()],
        ..Default::default()
    });
    assert!(!status.success());
    assert!(log.contains("NODE_NAME from the downward API"), "{log}");
}

fn wait_for_log(d: &daemon::Daemon, needle: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !d.log().contains(needle) {
        assert!(
            Instant::now() < deadline,
            "no {needle:?} in 30 s:\n{}",
            d.log_tail(40)
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// GPU Feature Discovery's labels on the Node are the GPU inventory of a
/// daemon that cannot load NVML (`gpu.source = "auto"`, a node name known):
/// a rule for A10G nodes matches.
#[test]
fn gpu_facts_come_from_the_nodes_labels_when_nvml_is_absent() {
    let server = ApiServer::start().unwrap();
    server.add_node(
        NODE,
        json!({
            "nvidia.com/gpu.count": "4",
            "nvidia.com/gpu.product": "NVIDIA-A10G",
            "nvidia.com/gpu.memory": "23028",
            "nvidia.com/cuda.driver.major": "550",
            "nvidia.com/cuda.driver.minor": "54",
            "nvidia.com/cuda.driver.rev": "15",
        }),
        vec![],
    );
    let tmp = tempfile::tempdir().unwrap();
    let kubeconfig = tmp.path().join("kubeconfig");
    server.write_kubeconfig(&kubeconfig).unwrap();
    let d = daemon::Daemon::start_with(daemon::Options {
        extra: format!(
            "[gpu]\nnvml_library = \"/nonexistent/libnvidia-ml.so.1\"\n\
             [node]\nkubeconfig = \"{}\"\n\
             [prewarm]\ninto_containerd = false\n\
             [[prewarm.rule]]\nname = \"a10g\"\nimages = [\"registry.example.test/llm:v1\"]\n\
             [prewarm.rule.gpu]\nproduct = \"*A10G*\"\nmin_count = 4\n\
             [[registry]]\nhost = \"registry.example.test\"\nendpoint = \"http://127.0.0.1:9\"\n",
            kubeconfig.display()
        ),
        env: vec![("NODE_NAME".into(), NODE.into())],
        ..Default::default()
    });
    let (code, gpu) = d.admin_get("/v1/gpu");
    assert_eq!(code, 200, "{gpu}");
    assert_eq!(gpu["source"], "labels", "{gpu}");
    assert_eq!(gpu["devices"].as_array().unwrap().len(), 4);
    assert_eq!(gpu["devices"][0]["product"], "NVIDIA-A10G");
    assert_eq!(gpu["devices"][0]["memory_bytes"], 23028u64 << 20);
    assert_eq!(gpu["driver_version"], "550.54.15");
    let (_, status) = d.admin_get("/v1/prewarm");
    assert_eq!(status["rules"][0]["matched"], true, "{status}");
    assert!(server.gets() >= 1);
    // The node's labels were read, not its taints changed.
    assert!(server.accepted_patches().is_empty());
}
