//! The key table: every key damselfly accepts, with its type, default and
//! meaning. The loader reads plain defaults from here ([`default_of`]), the
//! unknown-key check walks it, and [`reference_markdown`] renders it for
//! `docs/configuration.md`.

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
        doc: "The pre-shared cluster key (64 hex characters, or the libp2p `swarm.key` format). Only nodes with the same key can connect (libp2p pnet), and only connected members reach the data plane. A regular file of at most 4 KiB.",
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
        default: "0",
        doc: "Most bytes per second this node sends to peers; `0` is unlimited.",
    },
    Key {
        path: "swarm.download_limit",
        kind: "size per second",
        default: "0",
        doc: "Most bytes per second this node takes from peers; `0` is unlimited.",
    },
    Key {
        path: "swarm.max_piece_transfers",
        kind: "integer",
        default: "16",
        doc: "Pieces fetched at once per download (pieces peers ask for are fetched besides). Pieces in flight at a crash are fetched again after the restart.",
    },
    Key {
        path: "swarm.relay_fanout",
        kind: "integer",
        default: "2",
        doc: "Peers each node passes a piece on to while it still pulls the blob (the piece's relay tree); `0`: every node takes every piece from its owner, which then uploads it to all of them.",
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
        doc: "File holding the password (trailing newline ignored): a regular file of at most 64 KiB. Read once at start-up.",
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

/// The default of key `path` as [`KEYS`] documents it. For keys whose
/// default is a plain value, the loader reads it from here, so it is
/// written once. An unknown path is a bug caught by the tests.
pub(crate) fn default_of(path: &str) -> &'static str {
    KEYS.iter()
        .find(|k| k.path == path)
        .map(|k| k.default)
        .unwrap_or("")
}

pub(super) fn section_of(path: &str) -> &str {
    path.split_once('.').map_or(path, |(s, _)| s)
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
