//! Configuration: TOML in, a validated [`Config`] out.
//!
//! Every key is declared once, in [`KEYS`], with its type, default and
//! meaning. The loader accepts only those keys, and reports every problem in
//! a file at once, each with its path (`registry[1].endpoint: ...`), rather
//! than stopping at the first. `docs/configuration.md` embeds
//! [`reference_markdown`], and a test keeps the two equal.

use std::collections::HashSet;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use toml::{Table, Value};
use url::Url;

mod layers;
mod node;
mod prewarm;
mod sidecar;

pub use node::{valid_label_key, NodeConfig, TaintEffect, TaintSpec};

pub use prewarm::{
    parse_compute_capability, AssumedGpus, GpuConfig, GpuSelector, GpuSource, PrewarmConfig,
    PrewarmRule, ProductGlob, RuleNodes,
};
pub use sidecar::{valid_workload_id, Scaling, SidecarConfig, SignalSource, WORKLOAD_ID_GRAMMAR};

/// One documented configuration key.
pub struct Key {
    pub path: &'static str,
    pub kind: &'static str,
    pub default: &'static str,
    pub doc: &'static str,
}

/// Every key damselfly accepts, in the order the reference lists them.
pub const KEYS: &[Key] = &[
    Key {
        path: "mirror.listen",
        kind: "address",
        default: "127.0.0.1:4001",
        doc: "Where the registry mirror listens. containerd's hosts.toml points here.",
    },
    Key {
        path: "mirror.default_registry",
        kind: "string",
        default: "(none)",
        doc: "Registry used for requests that carry no `?ns=`. Must name a `[[registry]]` host. Without it such requests get a 400.",
    },
    Key {
        path: "mirror.tag_stale_for",
        kind: "duration",
        default: "15m",
        doc: "How long the last good answer for a tag may be served while the origin is unreachable. `0s` turns the fallback off.",
    },
    Key {
        path: "mirror.max_header_size",
        kind: "size",
        default: "16KiB",
        doc: "Largest total size of a request's headers; larger requests get a 431.",
    },
    Key {
        path: "mirror.drain_timeout",
        kind: "duration",
        default: "10s",
        doc: "On SIGTERM, how long in-flight requests may finish before they are cut.",
    },
    Key {
        path: "store.dir",
        kind: "path",
        default: "/var/lib/damselfly as root, else $XDG_CACHE_HOME/damselfly or ~/.cache/damselfly",
        doc: "The content-addressed cache. Blobs live in `blobs/sha256/<hex>`.",
    },
    Key {
        path: "store.max_size",
        kind: "size",
        default: "100GiB",
        doc: "Quota for committed blobs. Least recently used blobs are evicted past it; blobs being read are never evicted.",
    },
    Key {
        path: "store.verify_reads",
        kind: "bool",
        default: "true",
        doc: "Check every MiB of a cache hit (to the mirror's clients and to peers) against the xxh3 sum recorded when the blob was verified, as it is sent. A chunk that does not match is never sent: the response stops before it, the blob is moved to `quarantine/` and fetched again. `false` only to measure what the check costs.",
    },
    Key {
        path: "store.scrub_rate",
        kind: "size per second",
        default: "4MiB",
        doc: "How fast the background scrub re-reads committed blobs (SHA-256 and chunk sums) to find rot before a pull needs the blob; what fails is quarantined and fetched again. `0` turns the scrub off. 4MiB/s checks a 40 GB cache in under 3 hours for about 0.3% of a core and 4 reads of 1 MiB per second.",
    },
    Key {
        path: "store.scrub_every",
        kind: "duration",
        default: "24h",
        doc: "A scrub pass starts this long after the previous one started (at once if that pass took longer). Survives restarts: an interrupted pass resumes where it stopped.",
    },
    Key {
        path: "admin.socket",
        kind: "path",
        default: "<store.dir>/admin.sock",
        doc: "Unix socket of the admin API that the `damselfly cache`, `images` and `peers` commands use. Created mode 0600: only its owner (root in the DaemonSet) may connect.",
    },
    Key {
        path: "telemetry.listen",
        kind: "address",
        default: "127.0.0.1:4002",
        doc: "Serves `/metrics` (Prometheus), `/healthz` and `/readyz`.",
    },
    Key {
        path: "telemetry.log_format",
        kind: "\"text\" or \"json\"",
        default: "text",
        doc: "Log line format on stderr.",
    },
    Key {
        path: "telemetry.log_level",
        kind: "filter",
        default: "info",
        doc: "A tracing filter such as `info` or `damselfly=debug`. `RUST_LOG` overrides it.",
    },
    Key {
        path: "origin.connect_timeout",
        kind: "duration",
        default: "5s",
        doc: "TCP and TLS connect timeout towards origin registries.",
    },
    Key {
        path: "origin.read_timeout",
        kind: "duration",
        default: "30s",
        doc: "A response that sends nothing for this long counts as broken; blob downloads then resume with `Range`.",
    },
    Key {
        path: "origin.retries",
        kind: "integer",
        default: "5",
        doc: "Retries for an idempotent origin request (with exponential backoff from 100ms, capped at 2s).",
    },
    Key {
        path: "origin.parallel_ranges",
        kind: "integer",
        default: "4",
        doc: "Ranged GETs at once for one blob that this node fetches from the origin alone (object stores such as S3 behind ECR cap each connection). The parts ahead of the first missing byte wait in memory, at most `parallel_ranges` x `range_size` per download, so clients still stream from the first byte. 1 fetches each blob as one stream. 1 to 32.",
    },
    Key {
        path: "origin.range_size",
        kind: "size",
        default: "8MiB",
        doc: "Bytes per ranged GET when `parallel_ranges` is more than 1; blobs up to this size take one GET. 1MiB to 64MiB.",
    },
    Key {
        path: "containerd.configure_hosts",
        kind: "bool",
        default: "false",
        doc: "At start-up, write containerd's `certs.d/<registry>/hosts.toml` (with hostsd) so that containerd pulls every `[[registry]]` (or, with none, every registry through `_default`) through this mirror. Failures are logged; the mirror still serves.",
    },
    Key {
        path: "containerd.config",
        kind: "path",
        default: "/etc/containerd/config.toml",
        doc: "containerd's config file, read for the CRI registry `config_path` (versions 2 and 3, colon lists).",
    },
    Key {
        path: "containerd.certs_dir",
        kind: "path",
        default: "(the first `config_path` entry)",
        doc: "Write hosts.toml files here instead of where containerd's config points.",
    },
    Key {
        path: "containerd.dial_timeout",
        kind: "Go duration",
        default: "500ms",
        doc: "`dial_timeout` written for the mirror host, so that containerd (2.1+) gives up on a hung daemon quickly and pulls from the origin.",
    },
    Key {
        path: "containerd.patch_config",
        kind: "bool",
        default: "false",
        doc: "Add a `config_path` to containerd's config when it has none (a backup is kept). This one change needs a containerd restart.",
    },
    Key {
        path: "swarm.enabled",
        kind: "bool",
        default: "true when `[swarm]` sets `bootstrap`, `cluster_key_file`, `insecure_no_cluster_key` or `mdns`; else false",
        doc: "Join the cluster's swarm: fetch each blob from the origin once per cluster and share pieces with peers. Off, the daemon is a single-node mirror. `false` keeps it off whatever else the section says (with a warning when it also says how to join).",
    },
    Key {
        path: "swarm.listen",
        kind: "multiaddr",
        default: "/ip4/0.0.0.0/tcp/4003",
        doc: "The libp2p control plane (membership, content routing, discovery).",
    },
    Key {
        path: "swarm.data_listen",
        kind: "address",
        default: "0.0.0.0:4004",
        doc: "The data plane: peers fetch piece bytes here, over TLS 1.3, by digest only.",
    },
    Key {
        path: "swarm.advertise",
        kind: "IP address",
        default: "the IP of `swarm.data_listen`; for 0.0.0.0, `$POD_IP`, `$HOST_IP`, or the first non-loopback interface address",
        doc: "The address peers use to reach this node's data plane.",
    },
    Key {
        path: "swarm.bootstrap",
        kind: "list of strings",
        default: "[]",
        doc: "Peers to join through: multiaddrs (`/ip4/10.0.0.5/tcp/4003`) and `dns:<name>:<port>` names (a Kubernetes headless Service), re-resolved every `swarm.dns_refresh`.",
    },
    Key {
        path: "swarm.dns_refresh",
        kind: "duration",
        default: "30s",
        doc: "How often `dns:` bootstrap names are resolved again.",
    },
    Key {
        path: "swarm.cluster_key_file",
        kind: "path",
        default: "(required when enabled)",
        doc: "The pre-shared cluster key (64 hex characters, or the libp2p `swarm.key` format). Only nodes with the same key can connect (libp2p pnet), and only connected members reach the data plane.",
    },
    Key {
        path: "swarm.insecure_no_cluster_key",
        kind: "bool",
        default: "false",
        doc: "Run without a cluster key: any node that can reach the port may join. Only for trusted networks.",
    },
    Key {
        path: "swarm.data_tls",
        kind: "bool",
        default: "true",
        doc: "TLS 1.3 with mutual membership checks on the data plane. `false` sends piece bytes as plain HTTP, for trusted networks only.",
    },
    Key {
        path: "swarm.mdns",
        kind: "bool",
        default: "false",
        doc: "Also find peers with mDNS on the local link.",
    },
    Key {
        path: "swarm.role",
        kind: "\"node\" or \"seed\"",
        default: "node",
        doc: "A `seed` also keeps full copies of every blob it sees the cluster pull (up to `store.max_size`), fetched from peers, so the cache survives when every other node has scaled away.",
    },
    Key {
        path: "swarm.piece_size",
        kind: "size",
        default: "8MiB",
        doc: "Blobs are cut into pieces of this size; each piece is fetched from the origin by one node. The same value must be used cluster-wide. 1MiB to 64MiB.",
    },
    Key {
        path: "swarm.upload_limit",
        kind: "size per second",
        default: "0 (unlimited)",
        doc: "Most bytes per second this node sends to peers.",
    },
    Key {
        path: "swarm.download_limit",
        kind: "size per second",
        default: "0 (unlimited)",
        doc: "Most bytes per second this node takes from peers.",
    },
    Key {
        path: "swarm.max_piece_transfers",
        kind: "integer",
        default: "8",
        doc: "Pieces fetched at once per download.",
    },
    Key {
        path: "swarm.max_uploads",
        kind: "integer",
        default: "64",
        doc: "Piece requests from peers served at once; more get a 503 and go elsewhere.",
    },
    Key {
        path: "swarm.hedge_after",
        kind: "duration",
        default: "300ms",
        doc: "A peer that has not answered a piece request this long is hedged: the piece is asked of the next source too, and the first answer wins.",
    },
    Key {
        path: "swarm.stall_timeout",
        kind: "duration",
        default: "5s",
        doc: "A piece transfer that moves no byte for this long is abandoned and the rest of the piece asked elsewhere (often the origin). Congested links stall healthy TCP streams for a second or more; 1s sent 6-26% extra bytes to the origin in the 8-node lab.",
    },
    Key {
        path: "swarm.heartbeat",
        kind: "duration",
        default: "1s",
        doc: "Membership heartbeat period; a member silent for 4 heartbeats is dropped.",
    },
    Key {
        path: "node.gate",
        kind: "bool",
        default: "false",
        doc: "Remove `node.taint` from this node's Kubernetes Node once containerd is wired to the mirror and the daemon is ready (Karpenter `startupTaints`; see docs/deploy.md). Needs RBAC get and patch on nodes.",
    },
    Key {
        path: "node.name",
        kind: "string",
        default: "$NODE_NAME (the downward API's `spec.nodeName`)",
        doc: "The Node to un-taint.",
    },
    Key {
        path: "node.taint",
        kind: "taint",
        default: "damselfly.io/not-ready:NoSchedule",
        doc: "The startup taint to remove, as `key[=value]:Effect`. Taints match by key and effect (and value, when one is given); every other taint is kept.",
    },
    Key {
        path: "node.wait_for_taints",
        kind: "list of taint keys",
        default: "[\"karpenter.sh/unregistered\"]",
        doc: "Taints that must be gone before `node.taint` is removed, whatever the deadline: Karpenter writes a NodePool's startup taints when it registers the node, so one removed earlier comes back.",
    },
    Key {
        path: "node.deadline",
        kind: "duration",
        default: "10m",
        doc: "From start-up, the longest the daemon's own conditions (containerd wiring, readiness) may hold the taint. Past it the taint is removed anyway, with a warning, so a broken origin never keeps a node out of service.",
    },
    Key {
        path: "node.wait_for_ready",
        kind: "bool",
        default: "true",
        doc: "Also wait until `/readyz` is ready (with `prewarm.gate_readiness`, that includes the prewarm).",
    },
    Key {
        path: "node.check_hosts",
        kind: "bool",
        default: "true",
        doc: "Also wait until containerd is wired to the mirror: with `containerd.configure_hosts`, the daemon's own hostsd run succeeded; without it (the DaemonSet's `hostsd` init container wrote the files), `hostsd check` passes for every `[[registry]]`.",
    },
    Key {
        path: "node.poll_interval",
        kind: "duration",
        default: "2s",
        doc: "How often the Node (for `node.wait_for_taints`) and the hosts.toml check are looked at again while waiting.",
    },
    Key {
        path: "node.kubeconfig",
        kind: "path",
        default: "(in-cluster: the pod's service account; else $KUBECONFIG or ~/.kube/config)",
        doc: "A kubeconfig file to reach the API server with, instead of the in-cluster service account.",
    },
    Key {
        path: "gpu.source",
        kind: "\"auto\", \"nvml\", \"labels\", \"node\", \"static\" or \"none\"",
        default: "auto",
        doc: "Where the node's GPU facts come from. `labels`: GPU Feature Discovery's labels in `labels_file`; `node`: the same labels on this node's Kubernetes Node (name and client as `[node]` says). `auto`: `[gpu.assume]` when given, else NVML, then `labels_file` when set, then the Node when its name is known (`node.name` or `$NODE_NAME`). A node where no source answers has no GPUs: one INFO line says why.",
    },
    Key {
        path: "gpu.nvml_library",
        kind: "string",
        default: "libnvidia-ml.so.1",
        doc: "The NVML library, opened at run time: a name for the dynamic loader or a path (the DaemonSet mounts the host's driver libraries read-only).",
    },
    Key {
        path: "gpu.labels_file",
        kind: "path",
        default: "(none)",
        doc: "GPU Feature Discovery's node labels as `key=value` lines (GFD's own output file, or a file written from the Node's labels), for pods that run without the NVIDIA runtime.",
    },
    Key {
        path: "gpu.assume.count",
        kind: "integer",
        default: "1",
        doc: "The static inventory: this many GPUs, all alike. Setting any `[gpu.assume]` key makes `gpu.source = \"auto\"` use it.",
    },
    Key {
        path: "gpu.assume.product",
        kind: "string",
        default: "unknown",
        doc: "Product name of the assumed GPUs, as NVML names it (`NVIDIA A10G`).",
    },
    Key {
        path: "gpu.assume.memory",
        kind: "size, or integer GiB",
        default: "0",
        doc: "Memory of each assumed GPU.",
    },
    Key {
        path: "gpu.assume.compute_capability",
        kind: "string",
        default: "(none)",
        doc: "Compute capability of the assumed GPUs, `8.6`.",
    },
    Key {
        path: "gpu.assume.mig",
        kind: "bool",
        default: "(unknown)",
        doc: "Whether MIG is enabled on the assumed GPUs.",
    },
    Key {
        path: "gpu.assume.driver",
        kind: "string",
        default: "(none)",
        doc: "Driver version shown for the assumed GPUs.",
    },
    Key {
        path: "gpu.assume.cuda",
        kind: "string",
        default: "(none)",
        doc: "CUDA version shown for the assumed GPUs.",
    },
    Key {
        path: "prewarm.into_containerd",
        kind: "bool",
        default: "true",
        doc: "Once an image's blobs are cached, pull it into containerd with CRI `PullImage` (the kubelet's own call, through this mirror), so the kubelet's pull is a no-op. `false`: only the cache is warmed.",
    },
    Key {
        path: "prewarm.containerd_socket",
        kind: "path",
        default: "/run/containerd/containerd.sock",
        doc: "containerd's gRPC socket, for CRI `PullImage` and the images API.",
    },
    Key {
        path: "prewarm.containerd_namespace",
        kind: "string",
        default: "k8s.io",
        doc: "The containerd namespace the CRI plugin keeps images in; the pinned label is set there.",
    },
    Key {
        path: "prewarm.pin_in_containerd",
        kind: "bool",
        default: "true",
        doc: "Label prewarmed images `io.cri-containerd.pinned=pinned` in containerd while their rule matches, so that CRI reports them pinned and the kubelet's image GC keeps them (containerd 1.7 and later read the label).",
    },
    Key {
        path: "prewarm.concurrency",
        kind: "integer",
        default: "1",
        doc: "Images prewarmed at once.",
    },
    Key {
        path: "prewarm.blob_concurrency",
        kind: "integer",
        default: "3",
        doc: "Blobs of one image fetched at once (containerd's own default is 3). Live pulls always go first: no new prewarm blob starts while a live download runs, and prewarm downloads pause for them.",
    },
    Key {
        path: "prewarm.refresh",
        kind: "duration",
        default: "5m",
        doc: "How often tags are resolved again at the origin. When a tag moves, the new image is prewarmed and the old one unpinned. `0s`: never.",
    },
    Key {
        path: "prewarm.retry_max",
        kind: "duration",
        default: "5m",
        doc: "Longest wait between retries of a failed prewarm (the backoff starts at 1s and doubles).",
    },
    Key {
        path: "prewarm.gate_readiness",
        kind: "bool",
        default: "false",
        doc: "Hold `/readyz` at 503 until every matching image is ready (or `ready_deadline` passed), so that node gating knows when the node is warm.",
    },
    Key {
        path: "prewarm.ready_deadline",
        kind: "duration",
        default: "15m",
        doc: "With `gate_readiness`, the node is reported ready after this long anyway, with a warning, so a broken origin never keeps it out of service.",
    },
    Key {
        path: "prewarm.swarm_wait",
        kind: "duration",
        default: "10s",
        doc: "With the swarm on, how long prewarm waits at start-up for membership to settle before its first fetch, so that nodes booting together split the image between them instead of each taking it from the origin.",
    },
    Key {
        path: "prewarm.rule[].name",
        kind: "string",
        default: "rule-<index>",
        doc: "Names the rule in status, metrics and pins.",
    },
    Key {
        path: "prewarm.rule[].images",
        kind: "list of image references",
        default: "(required)",
        doc: "Images to prewarm, by tag or digest (`123456789012.dkr.ecr.us-east-1.amazonaws.com/llm:v3`). Their registries must be mirrored (a `[[registry]]`, or none configured).",
    },
    Key {
        path: "prewarm.rule[].platform",
        kind: "os/arch[/variant]",
        default: "the node's own",
        doc: "Which manifest of an index to prewarm. Only the node's own platform is pulled into containerd; others are cached only.",
    },
    Key {
        path: "prewarm.rule[].nodes",
        kind: "\"gpu\" or \"all\"",
        default: "gpu",
        doc: "`gpu`: nodes whose GPUs match `[prewarm.rule.gpu]` (with no selector, any node with a GPU). `all`: every node.",
    },
    Key {
        path: "prewarm.rule[].gpu.product",
        kind: "glob",
        default: "(any)",
        doc: "Product name glob, case-insensitive, spaces and dashes alike: `*A10G*`, `NVIDIA H100*`.",
    },
    Key {
        path: "prewarm.rule[].gpu.min_memory",
        kind: "size, or integer GiB",
        default: "(any)",
        doc: "Least memory per GPU.",
    },
    Key {
        path: "prewarm.rule[].gpu.min_count",
        kind: "integer",
        default: "1",
        doc: "Least number of GPUs that satisfy the other fields.",
    },
    Key {
        path: "prewarm.rule[].gpu.mig",
        kind: "bool",
        default: "(either)",
        doc: "MIG enabled (`true`) or not (`false`). A GPU without MIG support counts as not enabled.",
    },
    Key {
        path: "prewarm.rule[].gpu.min_compute_capability",
        kind: "string",
        default: "(any)",
        doc: "Least CUDA compute capability, `8.0`.",
    },
    Key {
        path: "sidecar.workload",
        kind: "string",
        default: "(required)",
        doc: "`damselfly sidecar`: the workload its warm intents are for, `namespace/deployment` (the ScaledObject's target). A newer intent for the same workload replaces the older on every daemon.",
    },
    Key {
        path: "sidecar.images",
        kind: "list of image references",
        default: "(required)",
        doc: "The workload's images. The sidecar resolves each tag to its digest once per intent, at the origin, with `[[registry]]` credentials (ECR included); an image that cannot be resolved is reported and the others still go out.",
    },
    Key {
        path: "sidecar.source",
        kind: "\"prometheus\" or \"metrics_url\"",
        default: "the one whose URL is set",
        doc: "Where the signal comes from. Needed only when both URLs are set; the other source's keys are then not used (a warning says so).",
    },
    Key {
        path: "sidecar.prometheus",
        kind: "URL",
        default: "(this or `metrics_url`)",
        doc: "Prometheus' address, the ScaledObject trigger's `serverAddress`; the sidecar asks its `/api/v1/query`.",
    },
    Key {
        path: "sidecar.query",
        kind: "PromQL",
        default: "(required with `prometheus`)",
        doc: "The ScaledObject's query. It must return one series or a scalar (KEDA refuses more); `sum(...) or vector(0)` gives 0 rather than nothing. A query Prometheus refuses stops the sidecar at start, naming this key.",
    },
    Key {
        path: "sidecar.metrics_url",
        kind: "URL",
        default: "(this or `prometheus`)",
        doc: "The simpler source: a Prometheus text page (a queue consumer's own `/metrics`) read directly, no Prometheus server needed.",
    },
    Key {
        path: "sidecar.metric",
        kind: "metric name",
        default: "(required with `metrics_url`)",
        doc: "The metric on `metrics_url`; the value is the sum of its samples (those with `metric_labels`).",
    },
    Key {
        path: "sidecar.metric_labels",
        kind: "table of strings",
        default: "{}",
        doc: "Only samples of `metric` with these labels count, e.g. `{ queue = \"a10g\" }`.",
    },
    Key {
        path: "sidecar.threshold",
        kind: "number",
        default: "(required)",
        doc: "The trigger's `threshold`: wanted replicas are `ceil(value / threshold)`, clamped to `min_replicas`..`max_replicas`, as KEDA's default `AverageValue` metric computes them.",
    },
    Key {
        path: "sidecar.activation_threshold",
        kind: "number",
        default: "0",
        doc: "The trigger's `activationThreshold`: at or below it the workload stays at `min_replicas` (zero).",
    },
    Key {
        path: "sidecar.min_replicas",
        kind: "integer",
        default: "0",
        doc: "The ScaledObject's `minReplicaCount`.",
    },
    Key {
        path: "sidecar.max_replicas",
        kind: "integer",
        default: "100",
        doc: "The ScaledObject's `maxReplicaCount` (KEDA's default is 100).",
    },
    Key {
        path: "sidecar.current_query",
        kind: "PromQL",
        default: "(none)",
        doc: "The replicas that exist now, e.g. `kube_deployment_status_replicas{namespace=\"inference\",deployment=\"llm\"}` (kube-state-metrics). With it an intent goes out when the wanted replicas rise above the current ones; without it, when they rise above zero.",
    },
    Key {
        path: "sidecar.poll_interval",
        kind: "duration",
        default: "15s",
        doc: "How often the signal is read; at most the ScaledObject's `pollingInterval`, so the sidecar sees a rise no later than KEDA does.",
    },
    Key {
        path: "sidecar.query_timeout",
        kind: "duration",
        default: "10s",
        doc: "Longest wait for one answer from the signal's source.",
    },
    Key {
        path: "sidecar.cooldown",
        kind: "duration",
        default: "5m",
        doc: "How long the wanted replicas must stay at zero before the intent is released and the daemons unpin its images (KEDA's `cooldownPeriod`).",
    },
    Key {
        path: "sidecar.intent_ttl",
        kind: "duration",
        default: "10m",
        doc: "Each publication of an intent expires this long after it; while the signal is good it is renewed. While the signal fails the last intent is held until it expires.",
    },
    Key {
        path: "sidecar.republish",
        kind: "duration",
        default: "30s",
        doc: "A live intent is published again this often, and a second after a member joins, so that booting nodes get it. Daemons only refresh its expiry.",
    },
    Key {
        path: "sidecar.listen",
        kind: "address",
        default: "127.0.0.1:4010",
        doc: "Serves the sidecar's `/metrics`, the KEDA `metrics-api` JSON (`/keda`), `/v1/status` (`damselfly sidecar status`), `/healthz` and `/readyz`. In a pod, `0.0.0.0:4010`.",
    },
    Key {
        path: "sidecar.gpu.product",
        kind: "glob",
        default: "(any)",
        doc: "Only daemons with GPUs like these act on the intent (seeds always do), as in `[prewarm.rule.gpu]`. Without `[sidecar.gpu]` every node does.",
    },
    Key {
        path: "sidecar.gpu.min_memory",
        kind: "size, or integer GiB",
        default: "(any)",
        doc: "Least memory per GPU.",
    },
    Key {
        path: "sidecar.gpu.min_count",
        kind: "integer",
        default: "1",
        doc: "Least number of GPUs that satisfy the other fields.",
    },
    Key {
        path: "sidecar.gpu.mig",
        kind: "bool",
        default: "(either)",
        doc: "MIG enabled (`true`) or not (`false`).",
    },
    Key {
        path: "registry[].host",
        kind: "string",
        default: "(required)",
        doc: "The registry name containerd sends as `?ns=`, with its port if it has one. With no `[[registry]]` at all, any registry is mirrored over HTTPS.",
    },
    Key {
        path: "registry[].endpoint",
        kind: "URL",
        default: "https://<host>; docker.io maps to https://registry-1.docker.io",
        doc: "Where the registry really is. `http://` for plain-HTTP registries.",
    },
    Key {
        path: "registry[].username",
        kind: "string",
        default: "(none)",
        doc: "Credentials for basic auth or the token flow. Needs `password_file`. A puller's own `Authorization` header wins over them.",
    },
    Key {
        path: "registry[].password_file",
        kind: "path",
        default: "(none)",
        doc: "File holding the password (trailing newline ignored). Read once at start-up.",
    },
    Key {
        path: "registry[].ca_file",
        kind: "path",
        default: "(none)",
        doc: "Extra PEM CA certificates trusted for this registry, on top of the system and webpki roots.",
    },
    Key {
        path: "registry[].auth",
        kind: "\"none\", \"basic\" or \"ecr\"",
        default: "ecr for `<account>.dkr.ecr[-fips].<region>.amazonaws.com[.cn]` hosts, basic with `username`, else none",
        doc: "How the daemon authenticates on its own. `ecr`: a `GetAuthorizationToken` token from the node's AWS identity (see docs/ecr.md). A puller's own `Authorization` header wins over it.",
    },
    Key {
        path: "registry[].ecr_region",
        kind: "string",
        default: "the region in the host name",
        doc: "Region of the ECR API to ask for tokens. Required with `auth = \"ecr\"` when the host is not an ECR host name.",
    },
    Key {
        path: "registry[].ecr_endpoint",
        kind: "URL",
        default: "the regional ECR API (FIPS for `-fips` hosts)",
        doc: "Where to call `GetAuthorizationToken`: a VPC endpoint, or a test double such as moto.",
    },
    Key {
        path: "registry[].role_arn",
        kind: "string",
        default: "(none)",
        doc: "IAM role to assume (STS `AssumeRole`, session `damselfly`) with the node's credentials before asking ECR.",
    },
];

/// The validated configuration. Every field is filled; defaults were applied
/// at load time.
#[derive(Debug, Clone)]
pub struct Config {
    pub mirror: MirrorConfig,
    pub store: StoreConfig,
    pub admin: AdminConfig,
    pub telemetry: TelemetryConfig,
    pub origin: OriginConfig,
    pub containerd: ContainerdConfig,
    pub swarm: SwarmConfig,
    pub node: NodeConfig,
    pub gpu: GpuConfig,
    pub prewarm: PrewarmConfig,
    /// `[sidecar]`: only `damselfly sidecar` reads it.
    pub sidecar: Option<SidecarConfig>,
    /// Empty means: mirror any registry over HTTPS.
    pub registries: Vec<RegistryConfig>,
    /// Valid, but probably not what was meant (the daemon logs them at
    /// start-up, `config check` prints them).
    pub warnings: Vec<Issue>,
}

/// How the daemon wires containerd to itself at start-up (see hostsd).
#[derive(Debug, Clone)]
pub struct ContainerdConfig {
    pub configure_hosts: bool,
    pub config: PathBuf,
    pub certs_dir: Option<PathBuf>,
    pub dial_timeout: String,
    pub patch_config: bool,
}

/// The peer-to-peer layer (see `swarm`).
#[derive(Debug, Clone)]
pub struct SwarmConfig {
    pub enabled: bool,
    /// The keys that turned the swarm on when `enabled` was not written
    /// (empty when it was, or when the swarm is off).
    pub implied_by: Vec<&'static str>,
    pub listen: String,
    pub data_listen: SocketAddr,
    pub advertise: Option<std::net::IpAddr>,
    pub bootstrap: Vec<String>,
    pub dns_refresh: Duration,
    /// `None` only with `insecure_no_cluster_key`.
    pub cluster_key_file: Option<PathBuf>,
    pub data_tls: bool,
    pub mdns: bool,
    pub role: crate::swarm::Role,
    pub piece_size: u64,
    /// Bytes per second; 0 is unlimited.
    pub upload_limit: u64,
    pub download_limit: u64,
    pub max_piece_transfers: usize,
    pub max_uploads: usize,
    pub hedge_after: Duration,
    pub stall_timeout: Duration,
    pub heartbeat: Duration,
}

#[derive(Debug, Clone)]
pub struct MirrorConfig {
    pub listen: SocketAddr,
    pub default_registry: Option<String>,
    pub tag_stale_for: Duration,
    pub max_header_size: u64,
    pub drain_timeout: Duration,
}

#[derive(Debug, Clone)]
pub struct StoreConfig {
    pub dir: PathBuf,
    /// Bytes.
    pub max_size: u64,
    pub verify_reads: bool,
    /// Bytes per second; 0 is off.
    pub scrub_rate: u64,
    pub scrub_every: Duration,
}

/// The admin API for the CLI.
#[derive(Debug, Clone)]
pub struct AdminConfig {
    pub socket: PathBuf,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Clone)]
pub struct TelemetryConfig {
    pub listen: SocketAddr,
    pub log_format: LogFormat,
    pub log_level: String,
}

#[derive(Debug, Clone)]
pub struct OriginConfig {
    pub connect_timeout: Duration,
    pub read_timeout: Duration,
    pub retries: u32,
    pub parallel_ranges: usize,
    pub range_size: u64,
}

#[derive(Clone)]
pub struct RegistryConfig {
    pub host: String,
    pub endpoint: Url,
    /// Set exactly when `auth` is [`Auth::Basic`].
    pub credentials: Option<Credentials>,
    pub ca_file: Option<PathBuf>,
    pub auth: Auth,
}

/// How the daemon authenticates to a registry by itself (a puller's own
/// `Authorization` always wins).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Auth {
    None,
    /// The configured `username` and `password_file`.
    Basic,
    /// Tokens from ECR's `GetAuthorizationToken` (see `origin::ecr`).
    Ecr(EcrAuth),
}

/// Where ECR tokens for a registry come from. Registries with equal values
/// share one cached token.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct EcrAuth {
    pub region: String,
    /// The account in the host name. It only keeps caches apart: a token
    /// is good for every registry that the identity may read, so the call
    /// names no `registryIds` (a deprecated field).
    pub account: Option<String>,
    /// Override of the ECR API endpoint.
    pub endpoint: Option<Url>,
    pub role_arn: Option<String>,
    /// The host is an `ecr-fips` host: use the FIPS API endpoint too.
    pub fips: bool,
}

impl Auth {
    /// The default for a host with no explicit `auth`: ECR hosts get
    /// [`Auth::Ecr`] with the account and region in their name.
    pub fn default_for(host: &str) -> Auth {
        match crate::origin::ecr::parse_host(host) {
            Some(h) => Auth::Ecr(EcrAuth {
                region: h.region,
                account: Some(h.account),
                endpoint: None,
                role_arn: None,
                fips: h.fips,
            }),
            None => Auth::None,
        }
    }
}

/// Basic credentials. The password never appears in `Debug` output.
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    pub username: String,
    pub password: String,
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Credentials")
            .field("username", &self.username)
            .field("password", &"<redacted>")
            .finish()
    }
}

impl fmt::Debug for RegistryConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RegistryConfig")
            .field("host", &self.host)
            .field("endpoint", &self.endpoint.as_str())
            .field("credentials", &self.credentials)
            .field("ca_file", &self.ca_file)
            .field("auth", &self.auth)
            .finish()
    }
}

/// One problem in a config file, with the key it is about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Issue {
    pub path: String,
    pub message: String,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path} is not valid TOML: {message}")]
    Syntax { path: PathBuf, message: String },
    #[error("config file {path} has {} problem(s):\n{}", issues.len(), render_issues(issues))]
    Invalid { path: PathBuf, issues: Vec<Issue> },
}

fn render_issues(issues: &[Issue]) -> String {
    issues
        .iter()
        .map(|i| format!("  {}: {}", i.path, i.message))
        .collect::<Vec<_>>()
        .join("\n")
}

impl Config {
    /// The built-in defaults, as used when no config file is given. They
    /// go through the same validation as a file (an empty one).
    pub fn defaults() -> Result<Config, ConfigError> {
        Config::parse("", Path::new("<built-in defaults>"))
    }

    /// Reads and validates a config file, or a directory of `*.toml`
    /// drop-ins merged in name order (see [`layers`]).
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        if path.is_dir() {
            let table = layers::load_dir(path)?;
            return Config::from_table(&table, path).map_err(|issues| ConfigError::Invalid {
                path: path.to_owned(),
                issues,
            });
        }
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Config::parse(&text, path)
    }

    /// Validates config text. `origin` names the file in errors, and relative
    /// paths inside it (`password_file`, `ca_file`) resolve against its folder.
    pub fn parse(text: &str, origin: &Path) -> Result<Config, ConfigError> {
        let table: Table = text
            .parse()
            .map_err(|e: toml::de::Error| ConfigError::Syntax {
                path: origin.to_owned(),
                message: e.message().to_owned(),
            })?;
        let base = origin.parent().unwrap_or(Path::new("."));
        Config::from_table(&table, base).map_err(|issues| ConfigError::Invalid {
            path: origin.to_owned(),
            issues,
        })
    }

    fn from_table(root: &Table, base: &Path) -> Result<Config, Vec<Issue>> {
        let mut v = Validator {
            issues: Vec::new(),
            warnings: Vec::new(),
            base: base.to_owned(),
        };
        let sections: HashSet<&str> = KEYS
            .iter()
            .map(|k| section_of(k.path).trim_end_matches("[]"))
            .collect();
        for key in root.keys() {
            if !sections.contains(key.as_str()) {
                v.issue(key, "unknown section or key");
            }
        }
        let empty = Table::new();
        let mirror = v.section(root, "mirror").unwrap_or(&empty);
        let store = v.section(root, "store").unwrap_or(&empty);
        let telemetry = v.section(root, "telemetry").unwrap_or(&empty);
        let origin = v.section(root, "origin").unwrap_or(&empty);
        let containerd = v.section(root, "containerd").unwrap_or(&empty);

        let mirror_cfg = MirrorConfig {
            listen: v.addr(mirror, "mirror", "listen", "127.0.0.1:4001"),
            default_registry: v.opt_string(mirror, "mirror", "default_registry"),
            tag_stale_for: v.duration(mirror, "mirror", "tag_stale_for", "15m"),
            max_header_size: v.size(mirror, "mirror", "max_header_size", "16KiB"),
            drain_timeout: v.duration(mirror, "mirror", "drain_timeout", "10s"),
        };
        let store_cfg = StoreConfig {
            dir: v
                .opt_path(store, "store", "dir")
                .unwrap_or_else(default_store_dir),
            max_size: v.size(store, "store", "max_size", "100GiB"),
            verify_reads: v.bool(store, "store", "verify_reads", true),
            scrub_rate: v.size(store, "store", "scrub_rate", "4MiB"),
            scrub_every: v.duration(store, "store", "scrub_every", "24h"),
        };
        let admin = v.section(root, "admin").unwrap_or(&empty);
        let admin_cfg = AdminConfig {
            socket: v
                .opt_path(admin, "admin", "socket")
                .unwrap_or_else(|| store_cfg.dir.join("admin.sock")),
        };
        let log_format = match v
            .opt_string(telemetry, "telemetry", "log_format")
            .as_deref()
        {
            None | Some("text") => LogFormat::Text,
            Some("json") => LogFormat::Json,
            Some(other) => {
                v.issue(
                    "telemetry.log_format",
                    &format!("must be \"text\" or \"json\", not {other:?}"),
                );
                LogFormat::Text
            }
        };
        let telemetry_cfg = TelemetryConfig {
            listen: v.addr(telemetry, "telemetry", "listen", "127.0.0.1:4002"),
            log_format,
            log_level: v
                .opt_string(telemetry, "telemetry", "log_level")
                .unwrap_or_else(|| "info".into()),
        };
        let origin_cfg = OriginConfig {
            connect_timeout: v.duration(origin, "origin", "connect_timeout", "5s"),
            read_timeout: v.duration(origin, "origin", "read_timeout", "30s"),
            retries: v.integer(origin, "origin", "retries", 5, 0..=100) as u32,
            parallel_ranges: v.integer(origin, "origin", "parallel_ranges", 4, 1..=32) as usize,
            range_size: v.size(origin, "origin", "range_size", "8MiB"),
        };
        if !(1 << 20..=64 << 20).contains(&origin_cfg.range_size) {
            v.issue("origin.range_size", "must be between 1MiB and 64MiB");
        }
        let containerd_cfg = ContainerdConfig {
            configure_hosts: v.bool(containerd, "containerd", "configure_hosts", false),
            config: v
                .opt_path(containerd, "containerd", "config")
                .unwrap_or_else(|| PathBuf::from("/etc/containerd/config.toml")),
            certs_dir: v.opt_path(containerd, "containerd", "certs_dir"),
            dial_timeout: v
                .opt_string(containerd, "containerd", "dial_timeout")
                .unwrap_or_else(|| "500ms".into()),
            patch_config: v.bool(containerd, "containerd", "patch_config", false),
        };
        if let Err(e) = hostsd::options::parse_go_duration(&containerd_cfg.dial_timeout) {
            v.issue("containerd.dial_timeout", &e.to_string());
        }
        let registries = v.registries(root);
        let swarm = v.section(root, "swarm").unwrap_or(&empty);
        let swarm_cfg = v.swarm(swarm);
        let node = v.section(root, "node").unwrap_or(&empty);
        let node_cfg = v.node(node);
        let gpu = v.section(root, "gpu").unwrap_or(&empty);
        let gpu_cfg = v.gpu(gpu);
        let prewarm = v.section(root, "prewarm").unwrap_or(&empty);
        let prewarm_cfg = v.prewarm(prewarm);
        let sidecar_cfg = match root.get("sidecar") {
            Some(_) => v
                .section(root, "sidecar")
                .and_then(|t| v.sidecar(t, swarm_cfg.enabled)),
            None => None,
        };

        if let Some(default) = &mirror_cfg.default_registry {
            if !registries.iter().any(|r| &r.host == default) {
                v.issue(
                    "mirror.default_registry",
                    &format!("{default:?} is not the host of any [[registry]]"),
                );
            }
        }
        if mirror_cfg.listen == telemetry_cfg.listen {
            v.issue(
                "telemetry.listen",
                "must differ from mirror.listen (both are HTTP servers)",
            );
        }
        if store_cfg.max_size == 0 {
            v.issue("store.max_size", "must be larger than zero");
        }
        if store_cfg.scrub_every < Duration::from_secs(1) {
            v.issue("store.scrub_every", "must be at least 1s");
        }

        if v.issues.is_empty() {
            Ok(Config {
                mirror: mirror_cfg,
                store: store_cfg,
                admin: admin_cfg,
                telemetry: telemetry_cfg,
                origin: origin_cfg,
                containerd: containerd_cfg,
                swarm: swarm_cfg,
                node: node_cfg,
                gpu: gpu_cfg,
                prewarm: prewarm_cfg,
                sidecar: sidecar_cfg,
                registries,
                warnings: v.warnings,
            })
        } else {
            Err(v.issues)
        }
    }

    /// The registry config for a `?ns=` value, or `None` when it is not
    /// mirrored. With no registries configured, any syntactically valid host
    /// is mirrored over HTTPS.
    pub fn registry_for(&self, ns: &str) -> Option<RegistryConfig> {
        if self.registries.is_empty() {
            valid_host(ns).ok()?;
            return Some(RegistryConfig {
                host: ns.to_owned(),
                endpoint: default_endpoint(ns)?,
                credentials: None,
                ca_file: None,
                auth: Auth::default_for(ns),
            });
        }
        self.registries.iter().find(|r| r.host == ns).cloned()
    }
}

/// The default of key `path` as [`KEYS`] documents it. For keys whose
/// default is a plain value, the loader reads it from here, so it is
/// written once. An unknown path is a bug caught by the tests.
pub(crate) fn default_of(path: &str) -> &'static str {
    KEYS.iter()
        .find(|k| k.path == path)
        .map(|k| k.default)
        .unwrap_or("")
}

fn section_of(path: &str) -> &str {
    path.split_once('.').map_or(path, |(s, _)| s)
}

/// Where registry `host` really lives when no endpoint is configured.
pub fn default_endpoint(host: &str) -> Option<Url> {
    let real = if host == "docker.io" {
        "registry-1.docker.io"
    } else {
        host
    };
    Url::parse(&format!("https://{real}")).ok()
}

pub use crate::oci::valid_host;

fn default_store_dir() -> PathBuf {
    if running_as_root() {
        return PathBuf::from("/var/lib/damselfly");
    }
    if let Some(xdg) = std::env::var_os("XDG_CACHE_HOME").filter(|v| !v.is_empty()) {
        return PathBuf::from(xdg).join("damselfly");
    }
    match std::env::var_os("HOME").filter(|v| !v.is_empty()) {
        Some(home) => PathBuf::from(home).join(".cache/damselfly"),
        None => std::env::temp_dir().join("damselfly"),
    }
}

fn running_as_root() -> bool {
    use std::os::unix::fs::MetadataExt;
    // /proc/self is owned by the process's effective uid.
    std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0)
}

/// Collects issues while it converts raw TOML values.
struct Validator {
    issues: Vec<Issue>,
    warnings: Vec<Issue>,
    base: PathBuf,
}

impl Validator {
    fn issue(&mut self, path: &str, message: &str) {
        self.issues.push(Issue {
            path: path.to_owned(),
            message: message.to_owned(),
        });
    }

    fn warn(&mut self, path: &str, message: &str) {
        self.warnings.push(Issue {
            path: path.to_owned(),
            message: message.to_owned(),
        });
    }

    fn section<'a>(&mut self, root: &'a Table, name: &str) -> Option<&'a Table> {
        match root.get(name) {
            None => None,
            Some(Value::Table(t)) => {
                self.check_keys(t, name, name);
                Some(t)
            }
            Some(_) => {
                self.issue(name, "must be a table ([section])");
                None
            }
        }
    }

    /// Reports keys of `table` that KEYS does not declare under `schema`.
    fn check_keys(&mut self, table: &Table, schema: &str, shown: &str) {
        let prefix = format!("{schema}.");
        for key in table.keys() {
            let full = format!("{prefix}{key}");
            // `gpu.assume` and `prewarm.rule` are tables (or arrays of
            // tables) of their own: known when a key lives under them.
            let nested = [format!("{full}."), format!("{full}[].")];
            if !KEYS
                .iter()
                .any(|k| k.path == full || nested.iter().any(|n| k.path.starts_with(n.as_str())))
            {
                self.issue(&format!("{shown}.{key}"), "unknown key");
            }
        }
    }

    fn opt_string(&mut self, t: &Table, section: &str, key: &str) -> Option<String> {
        match t.get(key)? {
            Value::String(s) => Some(s.clone()),
            other => {
                self.issue(
                    &format!("{section}.{key}"),
                    &format!("must be a string, not {}", other.type_str()),
                );
                None
            }
        }
    }

    fn opt_path(&mut self, t: &Table, section: &str, key: &str) -> Option<PathBuf> {
        let s = self.opt_string(t, section, key)?;
        if s.is_empty() {
            self.issue(&format!("{section}.{key}"), "must not be empty");
            return None;
        }
        let p = PathBuf::from(s);
        Some(if p.is_absolute() {
            p
        } else {
            self.base.join(p)
        })
    }

    fn addr(&mut self, t: &Table, section: &str, key: &str, default: &str) -> SocketAddr {
        let fallback: SocketAddr = default
            .parse()
            .unwrap_or(SocketAddr::from(([127, 0, 0, 1], 0)));
        let Some(s) = self.opt_string(t, section, key) else {
            return fallback;
        };
        s.parse().unwrap_or_else(|_| {
            self.issue(
                &format!("{section}.{key}"),
                &format!("{s:?} is not an IP:port address"),
            );
            fallback
        })
    }

    fn duration(&mut self, t: &Table, section: &str, key: &str, default: &str) -> Duration {
        let parse = |s: &str| humantime::parse_duration(s);
        let fallback = parse(default).unwrap_or_default();
        let Some(s) = self.opt_string(t, section, key) else {
            return fallback;
        };
        parse(&s).unwrap_or_else(|e| {
            self.issue(
                &format!("{section}.{key}"),
                &format!("{s:?} is not a duration like \"30s\" or \"5m\": {e}"),
            );
            fallback
        })
    }

    fn size(&mut self, t: &Table, section: &str, key: &str, default: &str) -> u64 {
        let parse = |s: &str| s.parse::<bytesize::ByteSize>().map(|b| b.as_u64());
        let fallback = parse(default).unwrap_or_default();
        match t.get(key) {
            None => fallback,
            Some(Value::Integer(n)) if *n >= 0 => *n as u64,
            Some(Value::String(s)) => parse(s).unwrap_or_else(|e| {
                self.issue(
                    &format!("{section}.{key}"),
                    &format!("{s:?} is not a size like \"512MiB\" or \"100GiB\": {e}"),
                );
                fallback
            }),
            Some(other) => {
                self.issue(
                    &format!("{section}.{key}"),
                    &format!(
                        "must be a size string or a byte count, not {}",
                        other.type_str()
                    ),
                );
                fallback
            }
        }
    }

    fn bool(&mut self, t: &Table, section: &str, key: &str, default: bool) -> bool {
        match t.get(key) {
            None => default,
            Some(Value::Boolean(b)) => *b,
            Some(other) => {
                self.issue(
                    &format!("{section}.{key}"),
                    &format!("must be true or false, not {}", other.type_str()),
                );
                default
            }
        }
    }

    fn integer(
        &mut self,
        t: &Table,
        section: &str,
        key: &str,
        default: i64,
        range: std::ops::RangeInclusive<i64>,
    ) -> i64 {
        match t.get(key) {
            None => default,
            Some(Value::Integer(n)) if range.contains(n) => *n,
            Some(other) => {
                self.issue(
                    &format!("{section}.{key}"),
                    &format!(
                        "must be an integer in {}..={}, got {other}",
                        range.start(),
                        range.end()
                    ),
                );
                default
            }
        }
    }

    fn swarm(&mut self, t: &Table) -> SwarmConfig {
        const S: &str = "swarm";
        let explicit = t.get("enabled").map(|_| self.bool(t, S, "enabled", false));
        let listen = self
            .opt_string(t, S, "listen")
            .unwrap_or_else(|| "/ip4/0.0.0.0/tcp/4003".into());
        if let Err(e) = listen.parse::<libp2p::Multiaddr>() {
            self.issue(
                "swarm.listen",
                &format!("{listen:?} is not a multiaddr: {e}"),
            );
        }
        let data_listen = self.addr(t, S, "data_listen", "0.0.0.0:4004");
        let advertise = self.opt_string(t, S, "advertise").and_then(|a| {
            a.parse()
                .map_err(|_| self.issue("swarm.advertise", &format!("{a:?} is not an IP address")))
                .ok()
        });
        let bootstrap = match t.get("bootstrap") {
            None => Vec::new(),
            Some(Value::Array(items)) => items
                .iter()
                .enumerate()
                .filter_map(|(i, item)| match item {
                    Value::String(s) => match crate::swarm::control::Bootstrap::from_str(s) {
                        Ok(_) => Some(s.clone()),
                        Err(e) => {
                            self.issue(&format!("swarm.bootstrap[{i}]"), &e.to_string());
                            None
                        }
                    },
                    other => {
                        self.issue(
                            &format!("swarm.bootstrap[{i}]"),
                            &format!("must be a string, not {}", other.type_str()),
                        );
                        None
                    }
                })
                .collect(),
            Some(other) => {
                self.issue(
                    "swarm.bootstrap",
                    &format!("must be a list of strings, not {}", other.type_str()),
                );
                Vec::new()
            }
        };
        let insecure = self.bool(t, S, "insecure_no_cluster_key", false);
        let cluster_key_file = self.opt_path(t, S, "cluster_key_file");
        let mdns = self.bool(t, S, "mdns", false);
        // A section that says how to join a cluster means to join it: a
        // ConfigMap with bootstrap and a key but no `enabled = true` once left
        // a lab's swarm silently off (8x the origin's bytes).
        let joins: Vec<&'static str> = [
            ("bootstrap", !bootstrap.is_empty()),
            ("cluster_key_file", cluster_key_file.is_some()),
            ("insecure_no_cluster_key", insecure),
            ("mdns", mdns),
        ]
        .into_iter()
        .filter_map(|(k, set)| set.then_some(k))
        .collect();
        let enabled = explicit.unwrap_or(!joins.is_empty());
        match explicit {
            Some(false) if !joins.is_empty() => self.warn(
                "swarm.enabled",
                &format!(
                    "is false, so [swarm] {} are not used: this node is a single-node mirror",
                    joins.join(", ")
                ),
            ),
            None if joins.is_empty() && !t.is_empty() => {
                let mut keys: Vec<&str> = t.keys().map(String::as_str).collect();
                keys.sort_unstable();
                self.warn(
                    "swarm",
                    &format!(
                        "sets {} but nothing to join with (bootstrap, cluster_key_file, mdns):                          the swarm is off; write enabled = true to turn it on",
                        keys.join(", ")
                    ),
                );
            }
            _ => {}
        }
        match (&cluster_key_file, insecure) {
            (Some(_), true) => self.issue(
                "swarm.insecure_no_cluster_key",
                "contradicts swarm.cluster_key_file: set one or the other",
            ),
            (None, false) if enabled => self.issue(
                "swarm.cluster_key_file",
                "is required when the swarm is enabled (membership is closed by a pre-shared key); \
                 set swarm.insecure_no_cluster_key = true only on a trusted network",
            ),
            (Some(path), false) if enabled => {
                if let Err(e) = std::fs::metadata(path) {
                    self.issue(
                        "swarm.cluster_key_file",
                        &format!("cannot read {}: {e}", path.display()),
                    );
                } else if let Err(e) = crate::swarm::control::load_psk(path) {
                    self.issue("swarm.cluster_key_file", &e.to_string());
                }
            }
            _ => {}
        }
        let role = match self.opt_string(t, S, "role").as_deref() {
            None | Some("node") => crate::swarm::Role::Node,
            Some("seed") => crate::swarm::Role::Seed,
            Some(other) => {
                self.issue(
                    "swarm.role",
                    &format!("must be \"node\" or \"seed\", not {other:?}"),
                );
                crate::swarm::Role::Node
            }
        };
        let piece_size = self.size(t, S, "piece_size", "8MiB");
        if !(1 << 20..=64 << 20).contains(&piece_size) {
            self.issue("swarm.piece_size", "must be between 1MiB and 64MiB");
        }
        let hedge_after = self.duration(t, S, "hedge_after", "300ms");
        let stall_timeout = self.duration(t, S, "stall_timeout", "5s");
        let heartbeat = self.duration(t, S, "heartbeat", "1s");
        for (key, d) in [
            ("hedge_after", hedge_after),
            ("stall_timeout", stall_timeout),
            ("heartbeat", heartbeat),
        ] {
            if d < Duration::from_millis(10) {
                self.issue(&format!("swarm.{key}"), "must be at least 10ms");
            }
        }
        SwarmConfig {
            enabled,
            implied_by: if explicit.is_none() && enabled {
                joins
            } else {
                Vec::new()
            },
            listen,
            data_listen,
            advertise,
            bootstrap,
            dns_refresh: self.duration(t, S, "dns_refresh", "30s"),
            cluster_key_file: if insecure { None } else { cluster_key_file },
            data_tls: self.bool(t, S, "data_tls", true),
            mdns,
            role,
            piece_size,
            upload_limit: self.size(t, S, "upload_limit", "0"),
            download_limit: self.size(t, S, "download_limit", "0"),
            max_piece_transfers: self.integer(t, S, "max_piece_transfers", 8, 1..=256) as usize,
            max_uploads: self.integer(t, S, "max_uploads", 64, 1..=1024) as usize,
            hedge_after,
            stall_timeout,
            heartbeat,
        }
    }

    /// `auth` and the `ecr_*` keys of one `[[registry]]`.
    fn registry_auth(&mut self, t: &Table, at: &str, host: &str, has_user: bool) -> Auth {
        use crate::origin::ecr;
        let region = self.opt_string(t, at, "ecr_region");
        if let Some(r) = region.as_deref().filter(|r| !ecr::valid_region(r)) {
            self.issue(
                &format!("{at}.ecr_region"),
                &format!("{r:?} is not an AWS region like \"us-east-1\""),
            );
        }
        let endpoint = self
            .opt_string(t, at, "ecr_endpoint")
            .and_then(|s| match Url::parse(&s) {
                Ok(u) if matches!(u.scheme(), "http" | "https") && u.host_str().is_some() => {
                    Some(u)
                }
                _ => {
                    self.issue(
                        &format!("{at}.ecr_endpoint"),
                        &format!("{s:?} is not an http(s) URL"),
                    );
                    None
                }
            });
        let role_arn = self.opt_string(t, at, "role_arn");
        if let Some(r) = role_arn
            .as_deref()
            .filter(|r| !(r.starts_with("arn:") && r.contains(":role/")))
        {
            self.issue(
                &format!("{at}.role_arn"),
                &format!("{r:?} is not an IAM role ARN (arn:aws:iam::<account>:role/<name>)"),
            );
        }
        let parsed = ecr::parse_host(host);
        let kind = match self.opt_string(t, at, "auth").as_deref() {
            Some(k @ ("none" | "basic" | "ecr")) => k.to_owned(),
            Some(other) => {
                self.issue(
                    &format!("{at}.auth"),
                    &format!("must be \"none\", \"basic\" or \"ecr\", not {other:?}"),
                );
                return Auth::None;
            }
            None if has_user => "basic".into(),
            None if parsed.is_some() => "ecr".into(),
            None => "none".into(),
        };
        if kind != "ecr" {
            for key in ["ecr_region", "ecr_endpoint", "role_arn"] {
                if t.contains_key(key) {
                    self.issue(
                        &format!("{at}.{key}"),
                        &format!("is only used with auth = \"ecr\", not {kind:?}"),
                    );
                }
            }
        }
        match kind.as_str() {
            "basic" => {
                if !has_user {
                    self.issue(
                        &format!("{at}.auth"),
                        "\"basic\" needs username and password_file",
                    );
                }
                Auth::Basic
            }
            "ecr" => {
                if has_user {
                    self.issue(
                        &format!("{at}.username"),
                        "username and password_file are for auth = \"basic\", not \"ecr\"",
                    );
                }
                let Some(region) = region.or_else(|| parsed.as_ref().map(|p| p.region.clone()))
                else {
                    self.issue(
                        &format!("{at}.ecr_region"),
                        "is required with auth = \"ecr\" when the host is not an ECR host name",
                    );
                    return Auth::None;
                };
                Auth::Ecr(EcrAuth {
                    region,
                    account: parsed.as_ref().map(|p| p.account.clone()),
                    endpoint,
                    role_arn,
                    fips: parsed.is_some_and(|p| p.fips),
                })
            }
            _ => {
                if has_user {
                    self.issue(
                        &format!("{at}.username"),
                        "username and password_file need auth = \"basic\"",
                    );
                }
                Auth::None
            }
        }
    }

    fn registries(&mut self, root: &Table) -> Vec<RegistryConfig> {
        let items = match root.get("registry") {
            None => return Vec::new(),
            Some(Value::Array(items)) => items,
            Some(_) => {
                self.issue("registry", "must be an array of tables ([[registry]])");
                return Vec::new();
            }
        };
        let mut out = Vec::new();
        let mut seen = HashSet::new();
        for (i, item) in items.iter().enumerate() {
            let at = format!("registry[{i}]");
            let Value::Table(t) = item else {
                self.issue(&at, "must be a table");
                continue;
            };
            self.check_keys(t, "registry[]", &at);
            let Some(host) = self.opt_string(t, &at, "host") else {
                if !t.contains_key("host") {
                    self.issue(&format!("{at}.host"), "is required");
                }
                continue;
            };
            if let Err(e) = valid_host(&host) {
                self.issue(&format!("{at}.host"), &e);
                continue;
            }
            if !seen.insert(host.clone()) {
                self.issue(&format!("{at}.host"), &format!("{host:?} is listed twice"));
            }
            let endpoint = match self.opt_string(t, &at, "endpoint") {
                None => default_endpoint(&host),
                Some(s) => {
                    match Url::parse(&s) {
                        Ok(u)
                            if matches!(u.scheme(), "http" | "https")
                                && u.host_str().is_some()
                                && u.path() == "/"
                                && u.query().is_none()
                                && u.username().is_empty() =>
                        {
                            Some(u)
                        }
                        Ok(_) => {
                            self.issue(
                            &format!("{at}.endpoint"),
                            &format!("{s:?} must be http(s)://host[:port] with no path, query or user"),
                        );
                            None
                        }
                        Err(e) => {
                            self.issue(&format!("{at}.endpoint"), &format!("{s:?}: {e}"));
                            None
                        }
                    }
                }
            };
            let username = self.opt_string(t, &at, "username");
            let password_file = self.opt_path(t, &at, "password_file");
            let credentials = match (username, password_file) {
                (Some(username), Some(file)) => match std::fs::read_to_string(&file) {
                    Ok(p) => Some(Credentials {
                        username,
                        password: p.trim_end_matches(['\r', '\n']).to_owned(),
                    }),
                    Err(e) => {
                        self.issue(
                            &format!("{at}.password_file"),
                            &format!("cannot read {}: {e}", file.display()),
                        );
                        None
                    }
                },
                (Some(_), None) => {
                    self.issue(&format!("{at}.password_file"), "is required with username");
                    None
                }
                (None, Some(_)) => {
                    self.issue(&format!("{at}.username"), "is required with password_file");
                    None
                }
                (None, None) => None,
            };
            let ca_file = self.opt_path(t, &at, "ca_file");
            if let Some(ca) = &ca_file {
                if let Err(e) = std::fs::metadata(ca) {
                    self.issue(
                        &format!("{at}.ca_file"),
                        &format!("cannot read {}: {e}", ca.display()),
                    );
                }
            }
            let has_user = t.contains_key("username") || t.contains_key("password_file");
            let auth = self.registry_auth(t, &at, &host, has_user);
            if let Some(endpoint) = endpoint {
                out.push(RegistryConfig {
                    host,
                    endpoint,
                    credentials,
                    ca_file,
                    auth,
                });
            }
        }
        out
    }
}

/// The configuration reference, generated from [`KEYS`].
pub fn reference_markdown() -> String {
    let mut out = String::from("| key | type | default | meaning |\n|---|---|---|---|\n");
    for k in KEYS {
        out.push_str(&format!(
            "| `{}` | {} | {} | {} |\n",
            k.path,
            k.kind.replace('|', "\\|"),
            k.default,
            k.doc
        ));
    }
    out
}

#[cfg(test)]
mod tests;
