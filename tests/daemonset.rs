//! The Kubernetes manifests in daemonset/: every kustomization builds with
//! `kubectl kustomize` (kubectl 1.32, kustomize 5.5), validates offline with
//! `kubernetes-validate --strict` (Kubernetes' own kinds) and
//! `check-jsonschema` against daemonset/schemas (the custom resources), the
//! PrometheusRule passes `promtool check rules`, each ConfigMap's
//! damselfly.toml passes the daemon's own config check, and the DaemonSet's
//! ports, probes and paths are the daemon's (the gpu-nodes overlay's
//! prewarm and NVML paths included). The sidecar example's config agrees
//! with its ScaledObject.
//!
//! The tools come from `.ci/run` (kubectl from the machine image, the two
//! validators from PyPI, promtool from Debian's `prometheus`); a missing one
//! fails the test with its name rather than skipping it.

use std::path::{Path, PathBuf};
use std::process::Command;

use damselfly::config::Config;
use serde_json::Value;

/// Every kustomization, and whether it makes the node DaemonSet.
const KUSTOMIZATIONS: &[(&str, Option<&str>)] = &[
    ("base", Some("damselfly")),
    ("overlays/gpu-nodes", Some("damselfly")),
    ("overlays/seed", Some("damselfly-seed")),
    ("overlays/monitoring", None),
    ("examples/sidecar", None),
    ("uninstall", None),
];

/// Custom resources and the schema each is checked against.
const CRD_SCHEMAS: &[(&str, &str)] = &[
    ("ServiceMonitor", "servicemonitor.json"),
    ("PrometheusRule", "prometheusrule.json"),
    ("ScaledObject", "scaledobject.json"),
];

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("daemonset")
}

fn tool(name: &str) -> Command {
    let found = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(name).is_file()))
        .unwrap_or(false);
    assert!(
        found,
        "{name} is not on PATH: .ci/run installs it (kubectl: the machine image's 1.32; \
         kubernetes-validate and check-jsonschema: pip; promtool: apt-get install prometheus)"
    );
    Command::new(name)
}

fn run(mut cmd: Command) -> (bool, String) {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// `kubectl kustomize dir` as YAML.
fn build(dir: &Path) -> String {
    let mut cmd = tool("kubectl");
    cmd.arg("kustomize").arg(dir);
    let out = cmd.output().expect("kubectl kustomize");
    assert!(
        out.status.success(),
        "kubectl kustomize {} failed:\n{}",
        dir.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("utf-8 YAML")
}

/// The YAML stream as JSON documents (PyYAML comes with kubernetes-validate).
fn documents(yaml: &str, scratch: &Path) -> Vec<Value> {
    let file = scratch.join("stream.yaml");
    std::fs::write(&file, yaml).unwrap();
    let mut cmd = tool("python3");
    cmd.args([
        "-c",
        "import json, sys, yaml; json.dump([d for d in yaml.safe_load_all(open(sys.argv[1])) if d], sys.stdout)",
    ])
    .arg(&file);
    let (ok, text) = run(cmd);
    assert!(ok, "YAML to JSON: {text}");
    serde_json::from_str(&text).expect("JSON documents")
}

/// `kubernetes-validate --strict` on one file; returns the kinds it had no
/// schema for.
fn validate_builtin(file: &Path) -> Result<Vec<String>, String> {
    let mut cmd = tool("kubernetes-validate");
    cmd.args(["--strict", "-k", "1.32.0"]).arg(file);
    let (ok, text) = run(cmd);
    if !ok || text.contains("ERROR") {
        return Err(text);
    }
    Ok(text
        .lines()
        .filter_map(|l| l.split("Couldn't find schema for kind ").nth(1))
        .filter_map(|rest| rest.split_whitespace().next())
        .map(str::to_owned)
        .collect())
}

fn validate_crd(doc: &Value, scratch: &Path) -> Result<(), String> {
    let kind = doc["kind"].as_str().unwrap_or_default();
    let Some((_, schema)) = CRD_SCHEMAS.iter().find(|(k, _)| *k == kind) else {
        return Err(format!("no vendored schema for kind {kind}"));
    };
    let file = scratch.join(format!(
        "{kind}-{}.json",
        doc["metadata"]["name"].as_str().unwrap_or("x")
    ));
    std::fs::write(&file, doc.to_string()).unwrap();
    let mut cmd = tool("check-jsonschema");
    cmd.arg("--schemafile")
        .arg(root().join("schemas").join(schema))
        .arg(&file);
    match run(cmd) {
        (true, _) => Ok(()),
        (false, text) => Err(text),
    }
}

#[test]
fn every_kustomization_builds_and_validates_offline() {
    let scratch = tempfile::tempdir().unwrap();
    for (dir, _) in KUSTOMIZATIONS {
        let yaml = build(&root().join(dir));
        let file = scratch.path().join("rendered.yaml");
        std::fs::write(&file, &yaml).unwrap();
        let unknown = validate_builtin(&file)
            .unwrap_or_else(|e| panic!("{dir}: kubernetes-validate --strict:\n{e}"));
        let docs = documents(&yaml, scratch.path());
        assert!(!docs.is_empty(), "{dir} renders nothing");
        let mut checked = Vec::new();
        for doc in &docs {
            let kind = doc["kind"].as_str().unwrap_or_default();
            if unknown.iter().any(|k| k == kind) {
                validate_crd(doc, scratch.path())
                    .unwrap_or_else(|e| panic!("{dir}: {kind} against its schema:\n{e}"));
                checked.push(kind.to_owned());
            }
        }
        for kind in &unknown {
            assert!(
                checked.contains(kind),
                "{dir}: {kind} was checked by nothing"
            );
        }
        eprintln!(
            "{dir}: {} objects valid; custom resources checked: {checked:?}",
            docs.len()
        );
    }
}

/// The validators bite: a misspelt field fails each of them.
#[test]
fn the_validators_reject_a_misspelt_field() {
    let scratch = tempfile::tempdir().unwrap();
    let yaml = build(&root().join("base"));
    let bad = yaml.replacen("hostNetwork: true", "hostNetwrk: true", 1);
    assert_ne!(bad, yaml);
    let file = scratch.path().join("bad.yaml");
    std::fs::write(&file, bad).unwrap();
    let err = validate_builtin(&file).expect_err("hostNetwrk must fail --strict");
    assert!(err.contains("hostNetwrk"), "{err}");

    let yaml = build(&root().join("overlays/monitoring"));
    let docs = documents(&yaml, scratch.path());
    let mut monitor = docs
        .into_iter()
        .find(|d| d["kind"] == "ServiceMonitor")
        .unwrap();
    validate_crd(&monitor, scratch.path()).unwrap();
    monitor["spec"]["endpoint"] = monitor["spec"]["endpoints"].take();
    let err = validate_crd(&monitor, scratch.path()).expect_err("endpoint must fail");
    assert!(err.contains("endpoint"), "{err}");
}

#[test]
fn the_alert_rules_pass_promtool() {
    let scratch = tempfile::tempdir().unwrap();
    let yaml = build(&root().join("overlays/monitoring"));
    let docs = documents(&yaml, scratch.path());
    let rule = docs
        .iter()
        .find(|d| d["kind"] == "PrometheusRule")
        .expect("a PrometheusRule");
    let file = scratch.path().join("rules.json");
    // promtool reads YAML, and JSON is YAML.
    std::fs::write(&file, rule["spec"].to_string()).unwrap();
    let mut cmd = tool("promtool");
    cmd.args(["check", "rules"]).arg(&file);
    let (ok, text) = run(cmd);
    assert!(ok, "promtool check rules:\n{text}");
    let alerts: Vec<&str> = rule["spec"]["groups"][0]["rules"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|r| r["alert"].as_str())
        .collect();
    for want in [
        "DamselflyMirrorDown",
        "DamselflyOriginRatioHigh",
        "DamselflyCacheHitRatioLow",
        "DamselflyPrewarmStuck",
        "DamselflyDiskNearlyFull",
    ] {
        assert!(alerts.contains(&want), "no {want} in {alerts:?}");
    }
    // The dashboard shows bytes by source.
    let dash = docs
        .iter()
        .find(|d| d["kind"] == "ConfigMap" && d["metadata"]["name"] == "damselfly-dashboard")
        .expect("the dashboard ConfigMap");
    let json: Value =
        serde_json::from_str(dash["data"]["damselfly.json"].as_str().unwrap()).unwrap();
    assert!(json
        .to_string()
        .contains("sum by (source) (rate(damselfly_bytes_served_total"));
}

/// Where the base puts the cluster key Secret in the pod.
const POD_KEY: &str = "/etc/damselfly/key/cluster.key";

/// An overlay's config as the daemon loads it: the rendered ConfigMap's
/// files in a directory, with the pod's key path pointing at a stand-in key
/// (the Secret exists only in the cluster), checked by the daemon's own
/// `Config::load`.
fn load(docs: &[Value], configmap: &str, scratch: &Path, what: &str) -> Config {
    let cm = docs
        .iter()
        .find(|d| {
            d["kind"] == "ConfigMap"
                && d["metadata"]["name"]
                    .as_str()
                    .is_some_and(|n| n.starts_with(configmap))
        })
        .unwrap_or_else(|| panic!("{what}: no ConfigMap {configmap}*"));
    let dir = scratch.join("config");
    std::fs::create_dir_all(&dir).unwrap();
    let key = scratch.join("cluster.key");
    std::fs::write(&key, format!("{}\n", "ab".repeat(32))).unwrap();
    for (name, text) in cm["data"].as_object().unwrap() {
        let text = text
            .as_str()
            .unwrap()
            .replace(POD_KEY, &key.display().to_string());
        std::fs::write(dir.join(name), text).unwrap();
    }
    Config::load(&dir).unwrap_or_else(|e| panic!("{what}: {e}"))
}

fn container<'a>(spec: &'a Value, list: &str, name: &str) -> &'a Value {
    spec[list]
        .as_array()
        .and_then(|cs| cs.iter().find(|c| c["name"] == name))
        .unwrap_or_else(|| panic!("no {list} {name}"))
}

fn port(c: &Value, name: &str) -> u16 {
    c["ports"]
        .as_array()
        .and_then(|ps| ps.iter().find(|p| p["name"] == name))
        .and_then(|p| p["containerPort"].as_u64())
        .unwrap_or_else(|| panic!("no port {name}")) as u16
}

fn env<'a>(c: &'a Value, name: &str) -> &'a Value {
    c["env"]
        .as_array()
        .and_then(|es| es.iter().find(|e| e["name"] == name))
        .unwrap_or_else(|| panic!("no env {name} in {}", c["name"]))
}

/// The mount that holds `path` and its volume.
fn mount_for<'a>(spec: &'a Value, c: &'a Value, path: &Path) -> (&'a Value, &'a Value) {
    let m = c["volumeMounts"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|m| path.starts_with(m["mountPath"].as_str().unwrap()))
        .max_by_key(|m| m["mountPath"].as_str().unwrap().len())
        .unwrap_or_else(|| panic!("{}: nothing mounted at {}", c["name"], path.display()));
    let v = spec["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == m["name"])
        .unwrap();
    (m, v)
}

#[test]
fn the_config_maps_pass_the_daemons_config_check_and_the_daemonset_matches_it() {
    let defaults = Config::defaults().unwrap();
    for (dir, daemonset) in KUSTOMIZATIONS {
        let Some(ds_name) = daemonset else { continue };
        let scratch = tempfile::tempdir().unwrap();
        let docs = documents(&build(&root().join(dir)), scratch.path());
        let cfg = load(&docs, "damselfly-config", scratch.path(), dir);
        let ds = docs
            .iter()
            .find(|d| d["kind"] == "DaemonSet" && d["metadata"]["name"] == *ds_name)
            .unwrap_or_else(|| panic!("{dir}: no DaemonSet {ds_name}"));
        let spec = &ds["spec"]["template"]["spec"];
        let daemon = container(spec, "containers", "damselfly");
        let hostsd = container(spec, "initContainers", "hostsd");

        // containerd's hosts.toml names 127.0.0.1:4001 on the node itself.
        assert_eq!(spec["hostNetwork"], true, "{dir}");
        assert_eq!(
            cfg.mirror.listen, defaults.mirror.listen,
            "{dir}: mirror.listen"
        );
        assert_eq!(port(daemon, "mirror"), cfg.mirror.listen.port(), "{dir}");
        assert_eq!(
            port(daemon, "telemetry"),
            cfg.telemetry.listen.port(),
            "{dir}"
        );
        assert_eq!(
            cfg.telemetry.listen.port(),
            defaults.telemetry.listen.port(),
            "{dir}"
        );
        let swarm_port: u16 = cfg
            .swarm
            .listen
            .rsplit('/')
            .next()
            .and_then(|p| p.parse().ok())
            .unwrap();
        assert_eq!(port(daemon, "swarm"), swarm_port, "{dir}");
        assert_eq!(port(daemon, "data"), cfg.swarm.data_listen.port(), "{dir}");
        assert!(cfg.swarm.enabled, "{dir}: the swarm must be on");
        if *dir == "overlays/gpu-nodes" {
            // The prewarm's CRI socket and NVML are where the pod has them.
            assert!(
                cfg.prewarm.gate_readiness && cfg.node.wait_for_ready,
                "{dir}"
            );
            assert!(!cfg.prewarm.rules.is_empty(), "{dir}");
            let (m, v) = mount_for(spec, daemon, &cfg.prewarm.containerd_socket);
            assert_eq!(
                m["mountPath"],
                cfg.prewarm.containerd_socket.to_str().unwrap()
            );
            assert_eq!(v["hostPath"]["type"], "Socket", "{dir}");
            let (m, _) = mount_for(spec, daemon, Path::new(&cfg.gpu.nvml_library));
            assert_eq!(m["readOnly"], true, "{dir}");
            assert!(
                cfg.node.deadline > cfg.prewarm.ready_deadline,
                "{dir}: the gate should not give up before the prewarm does"
            );
        }

        for (probe, path) in [
            ("readinessProbe", damselfly::telemetry::READY_PATH),
            ("livenessProbe", damselfly::telemetry::HEALTH_PATH),
            ("startupProbe", damselfly::telemetry::HEALTH_PATH),
        ] {
            assert_eq!(daemon[probe]["httpGet"]["path"], path, "{dir}: {probe}");
            assert_eq!(
                daemon[probe]["httpGet"]["port"], "telemetry",
                "{dir}: {probe}"
            );
        }

        // One config directory, in both containers.
        for c in [daemon, hostsd] {
            let at = env(c, "DAMSELFLY_CONFIG")["value"].as_str().unwrap();
            let (m, v) = mount_for(spec, c, Path::new(at));
            assert_eq!(m["mountPath"], at, "{dir}: {}", c["name"]);
            assert!(
                v["configMap"]["name"]
                    .as_str()
                    .is_some_and(|n| n.starts_with("damselfly-config")),
                "{dir}"
            );
        }
        let (m, v) = mount_for(spec, daemon, &cfg.store.dir);
        assert_eq!(m["mountPath"], cfg.store.dir.to_str().unwrap(), "{dir}");
        assert_eq!(
            v["hostPath"]["path"],
            cfg.store.dir.to_str().unwrap(),
            "{dir}"
        );
        assert_eq!(
            cfg.swarm.cluster_key_file.as_deref(),
            Some(scratch.path().join("cluster.key").as_path()),
            "{dir}: the key is the Secret's file"
        );
        let (_, v) = mount_for(spec, daemon, Path::new(POD_KEY));
        assert_eq!(v["secret"]["secretName"], "damselfly-cluster-key", "{dir}");
        // hostsd writes where containerd's config is; the daemon only reads.
        let (m, v) = mount_for(spec, hostsd, &cfg.containerd.config);
        assert_ne!(m["readOnly"], true, "{dir}");
        assert_eq!(v["hostPath"]["path"], "/etc/containerd", "{dir}");
        let (m, _) = mount_for(spec, daemon, &cfg.containerd.config);
        assert_eq!(m["readOnly"], true, "{dir}");
        assert!(
            !cfg.containerd.configure_hosts,
            "{dir}: the init container writes"
        );

        // The node gate: its Node from the downward API, and its own taint
        // tolerated (the pod must land on the node it un-taints).
        assert!(cfg.node.gate, "{dir}");
        assert_eq!(
            env(daemon, "NODE_NAME")["valueFrom"]["fieldRef"]["fieldPath"],
            "spec.nodeName",
            "{dir}"
        );
        let tolerates = |key: &str| {
            spec["tolerations"]
                .as_array()
                .unwrap()
                .iter()
                .any(|t| t["key"] == key || (t["key"].is_null() && t["operator"] == "Exists"))
        };
        assert!(tolerates(&cfg.node.taint.key), "{dir}");
        for key in &cfg.node.wait_for_taints {
            assert!(tolerates(key), "{dir}: {key}");
        }
        for key in ["nvidia.com/gpu", "gpu"] {
            assert!(tolerates(key), "{dir}: {key}");
        }
        assert_eq!(spec["priorityClassName"], "system-node-critical", "{dir}");

        // Secure by default, and never a GPU of the workloads'.
        for c in spec["containers"]
            .as_array()
            .unwrap()
            .iter()
            .chain(spec["initContainers"].as_array().unwrap())
        {
            let sc = &c["securityContext"];
            assert_eq!(sc["readOnlyRootFilesystem"], true, "{dir}: {}", c["name"]);
            assert_eq!(
                sc["allowPrivilegeEscalation"], false,
                "{dir}: {}",
                c["name"]
            );
            assert_eq!(
                sc["capabilities"]["drop"],
                serde_json::json!(["ALL"]),
                "{dir}"
            );
            assert!(sc["capabilities"]["add"].is_null(), "{dir}");
            assert!(c["resources"]["limits"]["memory"].is_string(), "{dir}");
            assert!(
                !c["resources"].to_string().contains("nvidia.com/gpu"),
                "{dir}: {} requests a GPU",
                c["name"]
            );
        }
        assert_eq!(
            spec["securityContext"]["seccompProfile"]["type"],
            "RuntimeDefault"
        );
        // Every container runs the one image.
        let images: std::collections::BTreeSet<&str> = spec["containers"]
            .as_array()
            .unwrap()
            .iter()
            .chain(spec["initContainers"].as_array().unwrap())
            .map(|c| c["image"].as_str().unwrap())
            .collect();
        assert_eq!(images.len(), 1, "{dir}: {images:?}");
    }
}

/// The sidecar example: its config passes the config check, its signal
/// and scaling numbers are the ScaledObject's, its images the Deployment's,
/// and its pod serves what its probes and ports say.
#[test]
fn the_sidecar_example_agrees_with_its_scaled_object() {
    use damselfly::config::SignalSource;
    let scratch = tempfile::tempdir().unwrap();
    let docs = documents(&build(&root().join("examples/sidecar")), scratch.path());
    let cfg = load(&docs, "damselfly-sidecar-config", scratch.path(), "sidecar");
    let sc = cfg.sidecar.expect("a [sidecar] section");
    let find = |kind: &str, name: &str| {
        docs.iter()
            .find(|d| d["kind"] == kind && d["metadata"]["name"] == name)
            .unwrap_or_else(|| panic!("no {kind} {name}"))
    };
    let so = find("ScaledObject", "inference");
    let spec = &so["spec"];
    let trigger = &spec["triggers"][0];
    assert_eq!(trigger["type"], "prometheus");
    let meta = &trigger["metadata"];
    match &sc.source {
        SignalSource::Prometheus { server, query } => {
            assert_eq!(meta["query"], query.as_str());
            assert_eq!(
                meta["serverAddress"].as_str().unwrap(),
                server.as_str().trim_end_matches('/')
            );
        }
        other => panic!("the example reads {other:?}, not the ScaledObject's Prometheus"),
    }
    let num = |v: &Value| v.as_str().unwrap().parse::<f64>().unwrap();
    assert_eq!(num(&meta["threshold"]), sc.scaling.threshold);
    assert_eq!(
        num(&meta["activationThreshold"]),
        sc.scaling.activation_threshold
    );
    assert_eq!(
        spec["minReplicaCount"].as_u64(),
        Some(u64::from(sc.scaling.min_replicas))
    );
    assert_eq!(
        spec["maxReplicaCount"].as_u64(),
        Some(u64::from(sc.scaling.max_replicas))
    );
    assert_eq!(spec["cooldownPeriod"].as_u64(), Some(sc.cooldown.as_secs()));
    assert!(
        sc.poll_interval.as_secs() <= spec["pollingInterval"].as_u64().unwrap(),
        "the sidecar must poll at least as often as KEDA"
    );
    // The workload is the ScaledObject's target, and its images are the
    // target's containers'.
    let target = find(
        "Deployment",
        spec["scaleTargetRef"]["name"].as_str().unwrap(),
    );
    assert_eq!(
        sc.workload,
        format!(
            "{}/{}",
            target["metadata"]["namespace"].as_str().unwrap(),
            target["metadata"]["name"].as_str().unwrap()
        )
    );
    let images: Vec<String> = target["spec"]["template"]["spec"]["containers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["image"].as_str().unwrap().to_owned())
        .collect();
    let configured: Vec<String> = sc.images.iter().map(|i| i.to_string()).collect();
    assert_eq!(configured, images);
    // The sidecar's own pod: in the daemons' namespace with their key, its
    // port and probes on `sidecar.listen`, the config where it reads it.
    let dep = find("Deployment", "damselfly-sidecar");
    assert_eq!(dep["metadata"]["namespace"], "damselfly");
    let pod = &dep["spec"]["template"]["spec"];
    let c = container(pod, "containers", "sidecar");
    assert_eq!(c["command"], serde_json::json!(["damselfly", "sidecar"]));
    assert_eq!(port(c, "http"), sc.listen.port());
    assert!(
        sc.listen.ip().is_unspecified(),
        "KEDA and Prometheus must reach it"
    );
    for (probe, path) in [
        ("readinessProbe", damselfly::telemetry::READY_PATH),
        ("livenessProbe", damselfly::telemetry::HEALTH_PATH),
    ] {
        assert_eq!(c[probe]["httpGet"]["path"], path, "{probe}");
    }
    let at = env(c, "DAMSELFLY_CONFIG")["value"].as_str().unwrap();
    let (_, v) = mount_for(pod, c, Path::new(at));
    assert!(v["configMap"]["name"]
        .as_str()
        .unwrap()
        .starts_with("damselfly-sidecar-config"));
    let (_, v) = mount_for(pod, c, Path::new(POD_KEY));
    assert_eq!(v["secret"]["secretName"], "damselfly-cluster-key");
    assert!(
        cfg.swarm
            .bootstrap
            .iter()
            .any(|b| b.contains("damselfly-peers.damselfly.svc")),
        "the sidecar finds the daemons through their headless Service"
    );
    let sec = &c["securityContext"];
    assert_eq!(sec["readOnlyRootFilesystem"], true);
    assert_eq!(pod["securityContext"]["runAsNonRoot"], true);
    assert!(!c["resources"].to_string().contains("nvidia.com/gpu"));
    let svc = find("Service", "damselfly-sidecar");
    assert_eq!(
        svc["spec"]["ports"][0]["port"].as_u64(),
        Some(u64::from(sc.listen.port()))
    );
    // The monitoring overlay scrapes the sidecar through this Service.
    let monitoring = documents(&build(&root().join("overlays/monitoring")), scratch.path());
    let monitor = monitoring
        .iter()
        .find(|d| d["kind"] == "ServiceMonitor" && d["metadata"]["name"] == "damselfly-sidecar")
        .expect("a ServiceMonitor for the sidecar");
    let svc_labels = &svc["metadata"]["labels"];
    for (k, v) in monitor["spec"]["selector"]["matchLabels"]
        .as_object()
        .unwrap()
    {
        assert_eq!(&svc_labels[k], v, "the sidecar's monitor selects {k}={v}");
    }
    let endpoint = &monitor["spec"]["endpoints"][0];
    assert!(
        svc["spec"]["ports"]
            .as_array()
            .unwrap()
            .iter()
            .any(|p| p["name"] == endpoint["port"]),
        "the monitor's port {} is not a port of the sidecar's Service",
        endpoint["port"]
    );
    assert_eq!(endpoint["path"], damselfly::telemetry::METRICS_PATH);
    // The daemons bootstrap from their headless Service: the sidecar's pod
    // (no data plane, no DHT answers) must not be in it.
    let base = documents(&build(&root().join("base")), scratch.path());
    let peers = base
        .iter()
        .find(|d| d["kind"] == "Service" && d["metadata"]["name"] == "damselfly-peers")
        .expect("the daemons' headless Service");
    let labels = &dep["spec"]["template"]["metadata"]["labels"];
    let selector = peers["spec"]["selector"].as_object().unwrap();
    assert!(
        selector.iter().any(|(k, v)| &labels[k] != v),
        "damselfly-peers ({selector:?}) selects the sidecar's pod ({labels})"
    );
}

#[test]
fn the_seed_overlay_makes_only_the_seed_daemonset_and_its_config() {
    let scratch = tempfile::tempdir().unwrap();
    let docs = documents(&build(&root().join("overlays/seed")), scratch.path());
    let kinds: Vec<&str> = docs.iter().map(|d| d["kind"].as_str().unwrap()).collect();
    assert_eq!(kinds, ["ConfigMap", "DaemonSet"], "{kinds:?}");
    let cfg = load(&docs, "damselfly-config-seed", scratch.path(), "seed");
    assert_eq!(cfg.swarm.role, damselfly::swarm::Role::Seed);
    let spec = &docs[1]["spec"]["template"]["spec"];
    assert_eq!(spec["serviceAccountName"], "damselfly");
    let terms = spec["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
        ["nodeSelectorTerms"]
        .to_string();
    assert!(
        terms.contains("\"In\"") && terms.contains("damselfly.io/role"),
        "{terms}"
    );
}

/// The image the manifests name, built as daemonset/image/build.sh builds
/// it (umoci, no Docker engine here), from this build's binaries: both run
/// from the image's own root filesystem, and it starts the daemon.
#[test]
fn the_image_builds_and_its_binaries_run_from_it() {
    let bin_dir = Path::new(env!("CARGO_BIN_EXE_damselfly"))
        .parent()
        .unwrap()
        .to_owned();
    if !bin_dir.join("hostsd").exists() {
        let mut cargo = Command::new(env!("CARGO"));
        cargo.args(["build", "-p", "hostsd", "--bin", "hostsd"]);
        let (ok, text) = run(cargo);
        assert!(ok, "cargo build -p hostsd: {text}");
    }
    tool("umoci");
    let scratch = tempfile::tempdir().unwrap();
    let layout = scratch.path().join("oci");
    let mut build = Command::new("bash");
    build
        .arg(root().join("image/build.sh"))
        .arg("--bin-dir")
        .arg(&bin_dir)
        .args(["--tag", "test"])
        .arg(&layout);
    let (ok, text) = run(build);
    assert!(ok, "build.sh:\n{text}");
    let bundle = scratch.path().join("bundle");
    let mut unpack = tool("umoci");
    unpack
        .args(["unpack", "--image"])
        .arg(format!("{}:test", layout.display()))
        .arg(&bundle);
    let (ok, text) = run(unpack);
    assert!(ok, "umoci unpack:\n{text}");
    let rootfs = bundle.join("rootfs");
    for (bin, want) in [("damselfly", "damselfly "), ("hostsd", "hostsd ")] {
        let mut cmd = Command::new("chroot");
        cmd.arg(&rootfs)
            .arg(format!("/usr/local/bin/{bin}"))
            .arg("--version");
        let (ok, text) = run(cmd);
        assert!(ok && text.starts_with(want), "{bin} in the image: {text}");
    }
    let config: Value =
        serde_json::from_str(&std::fs::read_to_string(bundle.join("config.json")).unwrap())
            .unwrap();
    assert_eq!(
        config["process"]["args"],
        serde_json::json!(["damselfly", "daemon"])
    );
    // Nothing but the binaries, their libraries, the CA bundle and passwd.
    let mut files = Vec::new();
    let mut stack = vec![rootfs.clone()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else {
                files.push(p.strip_prefix(&rootfs).unwrap().display().to_string());
            }
        }
    }
    assert!(
        files.len() <= 10 && !files.iter().any(|f| f.contains("bin/sh")),
        "{files:?}"
    );
}
