//! `sluice-agent`: the per-node agent binary.

use std::{path::PathBuf, time::Duration};

use anyhow::Context;
use clap::{CommandFactory, Parser, error::ErrorKind};
use sluice_agent::{
    AgentConfig, EventsConfig, GcConfig, SourceConfig,
    cni::CniConfig,
    masquerade::MasqueradeConfig,
    policy_log::{PolicyLogConfig, PolicyLogMode},
    routing::RoutingConfig,
    source::KubernetesConfig,
};
use sluice_common::{CtConfig, RoutingMode};
use sluice_compiler::{Balancing, LbAlgorithm, maglev::TableSize};
use sluice_datapath::DatapathConfig;

#[derive(Parser)]
#[command(name = "sluice-agent", version, about = "sluice per-node agent")]
struct Args {
    /// Name of this node, as pods' spec.nodeName and the endpoints name it.
    #[arg(long, env = "SLUICE_NODE")]
    node: String,
    /// Network namespace (under /run/netns) to run in; omit to stay in the current one.
    #[arg(long, env = "SLUICE_NETNS")]
    netns: Option<String>,
    /// Where the desired objects come from: cluster-file (the lab's snapshot file) or
    /// kubernetes (the API server's list and watch API).
    #[arg(long, env = "SLUICE_SOURCE", value_enum, default_value_t = SourceKind::ClusterFile)]
    source: SourceKind,
    /// Snapshot file to watch; required with --source cluster-file.
    #[arg(long, env = "SLUICE_CLUSTER_FILE")]
    cluster_file: Option<PathBuf>,
    /// Kubeconfig for --source kubernetes; without it, the pod's service account
    /// (in-cluster), else $KUBECONFIG or ~/.kube/config.
    #[arg(long, env = "SLUICE_KUBECONFIG")]
    kubeconfig: Option<PathBuf>,
    /// The cluster's pod network for --source kubernetes (kubeadm's podSubnet, GKE's
    /// cluster IPv4 CIDR): no API object states it. Every Node's podCIDR must lie inside;
    /// without it, not checked.
    #[arg(long, env = "SLUICE_CLUSTER_CIDR")]
    cluster_cidr: Option<ipnet::Ipv4Net>,
    /// Ports node port Services may use (nodePort and healthCheckNodePort), FIRST-LAST; a
    /// snapshot with a Service outside it is refused whole.
    #[arg(long, env = "SLUICE_NODE_PORT_RANGE", default_value_t = sluice_sources::NodePortRange::default())]
    node_port_range: sluice_sources::NodePortRange,
    /// bpffs directory for pinned maps and links.
    #[arg(long, env = "SLUICE_PIN_DIR")]
    pin_dir: PathBuf,
    /// Unix socket for the CLI.
    #[arg(
        long,
        env = "SLUICE_API_SOCKET",
        default_value = "/run/sluice/agent.sock"
    )]
    api_socket: PathBuf,
    /// Seconds between full reconciles that re-read the kernel.
    #[arg(long, env = "SLUICE_RECONCILE_INTERVAL", default_value_t = 2.0)]
    reconcile_interval: f64,
    /// Rows each endpoint's policy map holds; an endpoint whose policy needs more fails
    /// closed and is reported by status and verify.
    #[arg(long, env = "SLUICE_POLICY_MAP_MAX", default_value_t = sluice_compiler::DEFAULT_POLICY_MAP_MAX)]
    policy_map_max: u32,
    /// How Services without the service.sluice.dev/lb-algorithm annotation pick the
    /// backend of a new connection: random (a hash of the flow over the backend slots) or
    /// maglev (consistent hashing).
    #[arg(long, env = "SLUICE_LB_ALGORITHM", default_value_t = LbAlgorithm::Random)]
    lb_algorithm: LbAlgorithm,
    /// Positions of every Maglev table (M): a prime from 3 to 65521; M * 2 bytes per
    /// Maglev frontend. Maglev keeps each backend's share within about 1% when M is at
    /// least 100 times the backends of a frontend.
    #[arg(long, env = "SLUICE_MAGLEV_TABLE_SIZE", default_value_t = TableSize::default())]
    maglev_table_size: TableSize,
    /// Conntrack table size, when the table is created (a pinned table keeps its size: the
    /// agent warns, and removing the pin resizes it at the next start).
    #[arg(long, env = "SLUICE_CT_MAX_ENTRIES", alias = "ct-max", default_value_t = DatapathConfig::default().ct_max_entries)]
    ct_max_entries: u32,
    /// Seconds an idle TCP connection keeps its conntrack entry before any reply.
    #[arg(long, env = "SLUICE_CT_TIMEOUT_SYN", default_value_t = CtConfig::default().tcp_syn_s, value_parser = seconds())]
    ct_timeout_syn: u32,
    /// Seconds an idle established TCP connection keeps its entry.
    #[arg(long, env = "SLUICE_CT_TIMEOUT_ESTABLISHED", default_value_t = CtConfig::default().tcp_established_s, value_parser = seconds())]
    ct_timeout_established: u32,
    /// Seconds an idle TCP connection keeps its entry after a FIN or RST.
    #[arg(long, env = "SLUICE_CT_TIMEOUT_CLOSING", default_value_t = CtConfig::default().tcp_closing_s, value_parser = seconds())]
    ct_timeout_closing: u32,
    /// Seconds an idle UDP, SCTP or ICMP flow keeps its entry.
    #[arg(long, env = "SLUICE_CT_TIMEOUT_NON_TCP", default_value_t = CtConfig::default().non_tcp_s, value_parser = seconds())]
    ct_timeout_non_tcp: u32,
    /// Seconds between runs of the conntrack garbage collector.
    #[arg(long, env = "SLUICE_CT_GC_INTERVAL", default_value_t = 30.0)]
    ct_gc_interval: f64,
    /// Conntrack fill (entries over capacity, above 0 and at most 1) from which the garbage
    /// collector runs at once and also removes closed and half-open TCP connections, so the
    /// LRU does not evict established ones.
    #[arg(long, env = "SLUICE_CT_PRESSURE_THRESHOLD", default_value_t = 0.8, value_parser = fill)]
    ct_pressure_threshold: f64,
    /// Seconds between two looks at the conntrack fill (the kernel's own count of the
    /// table: a look costs a microsecond and walks nothing).
    #[arg(long, env = "SLUICE_CT_PRESSURE_INTERVAL", default_value_t = 1.0)]
    ct_pressure_interval: f64,
    /// Entries of the service map (one per service port plus one per backend slot) and of
    /// the backend map.
    #[arg(long, env = "SLUICE_LB_MAP_MAX", default_value_t = DatapathConfig::default().lb_max_entries)]
    lb_map_max: u32,
    /// Flows the observer keeps for `sluice observe` (Hubble's default).
    #[arg(long, env = "SLUICE_FLOWS_MAX", default_value_t = sluice_observer::DEFAULT_FLOWS_MAX)]
    flows_max: usize,
    /// Datapath flow events (drops, traces, policy verdicts, closes): on or off. Off, the
    /// datapath emits nothing; drops are still counted in the metrics.
    #[arg(long, env = "SLUICE_EVENTS", default_value = "on", value_parser = ["on", "off"])]
    events: String,
    /// Events per second per CPU; more are counted as suppressed. 0: no limit.
    #[arg(long, env = "SLUICE_EVENT_RATE", default_value_t = sluice_agent::DEFAULT_EVENT_RATE)]
    event_rate: u32,
    /// Events a CPU may emit at once above the rate.
    #[arg(long, env = "SLUICE_EVENT_BURST", default_value_t = sluice_agent::DEFAULT_EVENT_BURST)]
    event_burst: u32,
    /// Serve Prometheus metrics on this address (`GET /metrics`), e.g. 0.0.0.0:9962.
    #[arg(long, env = "SLUICE_METRICS_ADDRESS")]
    metrics_address: Option<std::net::SocketAddr>,
    /// Log policy decisions (one JSON line per connection, GKE's format): allow, deny or all.
    #[arg(long, env = "SLUICE_POLICY_LOG")]
    policy_log: Option<PolicyLogMode>,
    /// The policy action log file; rotated files get .1, .2, ... appended.
    #[arg(
        long,
        env = "SLUICE_POLICY_LOG_FILE",
        default_value = "/var/log/sluice/policy_action.log"
    )]
    policy_log_file: PathBuf,
    /// Bytes after which the policy log is rotated.
    #[arg(long, env = "SLUICE_POLICY_LOG_MAX_SIZE", default_value_t = PolicyLogConfig::DEFAULT_MAX_SIZE)]
    policy_log_max_size: u64,
    /// Policy log files kept, the active one included.
    #[arg(long, env = "SLUICE_POLICY_LOG_MAX_FILES", default_value_t = PolicyLogConfig::DEFAULT_MAX_FILES,
          value_parser = clap::value_parser!(u32).range(1..))]
    policy_log_max_files: u32,
    /// Policy log lines per second; more are dropped and counted in
    /// sluice_policy_log_suppressed_total. 0: no limit.
    #[arg(long, env = "SLUICE_POLICY_LOG_RATE", default_value_t = PolicyLogConfig::DEFAULT_RATE)]
    policy_log_rate: u32,
    /// How pod traffic reaches other nodes: local (one node), tunnel (VXLAN, the sender's
    /// identity as VNI) or native (the underlay routes pod CIDRs).
    #[arg(long, env = "SLUICE_ROUTING_MODE", default_value_t = RoutingMode::Local)]
    routing_mode: RoutingMode,
    /// The device toward the other nodes; required for tunnel and native.
    #[arg(long, env = "SLUICE_UNDERLAY_DEVICE")]
    underlay_device: Option<String>,
    /// The collect-metadata VXLAN device the agent creates in tunnel mode.
    #[arg(long, env = "SLUICE_TUNNEL_DEVICE", default_value_t = RoutingConfig::default().tunnel_device)]
    tunnel_device: String,
    /// The tunnel device's UDP port.
    #[arg(long, env = "SLUICE_TUNNEL_PORT", default_value_t = RoutingConfig::default().tunnel_port)]
    tunnel_port: u16,
    /// SNAT pod traffic leaving the cluster to the node's address (ip-masq-agent), on the
    /// underlay device.
    #[arg(long, env = "SLUICE_MASQUERADE")]
    masquerade: bool,
    /// A destination prefix pod traffic keeps its address to (repeatable); without one,
    /// ip-masq-agent's GKE defaults. The cluster itself is never masqueraded.
    #[arg(long = "non-masquerade-cidr", env = "SLUICE_NON_MASQUERADE_CIDR", value_name = "CIDR", requires = "masquerade",
          value_delimiter = ',',
          value_parser = sluice_agent::masquerade::parse_cidr)]
    non_masquerade_cidrs: Vec<ipnet::Ipv4Net>,
    /// The cgroup (v2 directory) holding the node's own processes: their connections to
    /// ClusterIPs and NodePorts are load-balanced by socket programs attached to it. Refused
    /// if it is the root or holds a process of another network namespace. Without it, no
    /// socket programs are attached.
    #[arg(long, env = "SLUICE_HOST_CGROUP")]
    host_cgroup: Option<PathBuf>,
    /// The cgroup (v2 directory) above every pod of the node (the kubelet's `kubepods`):
    /// a pod's connect() and sendto() to a ClusterIP or another frontend are translated to
    /// a backend once, by socket programs attached to it, instead of in every packet.
    /// Refused if it is the root or holds a process of the node's or the host's network
    /// namespace. Without it, pods' connections are translated per packet.
    #[arg(long, env = "SLUICE_POD_CGROUP")]
    pod_cgroup: Option<PathBuf>,
    /// Where the CNI endpoint registry (and so the IPAM allocations) is kept across
    /// restarts.
    #[arg(long, env = "SLUICE_STATE_DIR", default_value_os_t = CniConfig::default().state_dir)]
    state_dir: PathBuf,
    /// Seconds a CNI ADD waits for the new endpoint's policy to be realized (and for its Pod
    /// object, if the source lacks it) before it fails.
    #[arg(long, env = "SLUICE_CNI_ADD_TIMEOUT",
          default_value_t = CniConfig::default().add_timeout.as_secs_f64())]
    cni_add_timeout: f64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum SourceKind {
    ClusterFile,
    Kubernetes,
}

/// A lifetime in seconds: zero would expire every entry at its first packet.
fn seconds() -> clap::builder::RangedI64ValueParser<u32> {
    clap::value_parser!(u32).range(1..)
}

/// A fill ratio: above 0 and at most 1.
fn fill(text: &str) -> Result<f64, String> {
    match text.parse::<f64>() {
        Ok(fill) if fill > 0.0 && fill <= 1.0 => Ok(fill),
        Ok(_) => Err("a fill above 0 and at most 1".into()),
        Err(e) => Err(e.to_string()),
    }
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    // `requires` counts SLUICE_MASQUERADE=false as given: the CIDRs would be ignored unseen.
    if !args.masquerade && !args.non_masquerade_cidrs.is_empty() {
        Args::command()
            .error(
                ErrorKind::MissingRequiredArgument,
                "--non-masquerade-cidr (SLUICE_NON_MASQUERADE_CIDR) needs --masquerade \
                 (SLUICE_MASQUERADE=true)",
            )
            .exit();
    }
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        // Colours only for a person at a terminal: a log file, journald or `kubectl logs`
        // gets plain text.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    // Enter the node's netns before any thread exists: every thread the runtime starts
    // inherits it, while the mount namespace (and so bpffs) stays the host's.
    if let Some(netns) = &args.netns {
        sluice_netns::NetNs::named(netns.as_str())
            .enter()
            .context("entering the node's network namespace")?;
    }
    let source = match args.source {
        SourceKind::ClusterFile => {
            // The lab file states its own clusterCIDR; a kubeconfig would go unused.
            if args.kubeconfig.is_some() || args.cluster_cidr.is_some() {
                anyhow::bail!("--kubeconfig and --cluster-cidr apply to --source kubernetes only");
            }
            SourceConfig::ClusterFile(
                args.cluster_file
                    .context("--cluster-file is required with --source cluster-file")?,
            )
        }
        SourceKind::Kubernetes if args.cluster_file.is_some() => {
            anyhow::bail!("--cluster-file applies to --source cluster-file only");
        }
        SourceKind::Kubernetes => SourceConfig::Kubernetes(KubernetesConfig {
            kubeconfig: args.kubeconfig,
            cluster_cidr: args.cluster_cidr,
            debounce: Default::default(),
        }),
    };
    let config = AgentConfig {
        node: args.node,
        source,
        node_port_range: args.node_port_range,
        pin_dir: args.pin_dir,
        api_socket: args.api_socket,
        reconcile_interval: Duration::from_secs_f64(args.reconcile_interval.max(0.1)),
        policy_map_max: args.policy_map_max,
        balancing: Balancing {
            algorithm: args.lb_algorithm,
            maglev_table_size: args.maglev_table_size,
        },
        datapath: DatapathConfig {
            ct_max_entries: args.ct_max_entries,
            lb_max_entries: args.lb_map_max,
            ct_timeouts: CtConfig {
                tcp_syn_s: args.ct_timeout_syn,
                tcp_established_s: args.ct_timeout_established,
                tcp_closing_s: args.ct_timeout_closing,
                non_tcp_s: args.ct_timeout_non_tcp,
            },
        },
        ct_gc: GcConfig {
            interval: Duration::from_secs_f64(args.ct_gc_interval.max(0.1)),
            pressure_threshold: args.ct_pressure_threshold,
            pressure_interval: Duration::from_secs_f64(args.ct_pressure_interval.max(0.1)),
        },
        flows_max: args.flows_max,
        events: EventsConfig {
            enabled: args.events == "on",
            rate: args.event_rate,
            burst: args.event_burst,
        },
        metrics_address: args.metrics_address,
        policy_log: args.policy_log.map(|mode| PolicyLogConfig {
            mode,
            path: args.policy_log_file,
            max_size: args.policy_log_max_size,
            max_files: args.policy_log_max_files,
            rate: args.policy_log_rate,
        }),
        routing: RoutingConfig {
            mode: args.routing_mode,
            underlay_device: args.underlay_device,
            tunnel_device: args.tunnel_device,
            tunnel_port: args.tunnel_port,
            masquerade: MasqueradeConfig {
                enabled: args.masquerade,
                non_masquerade_cidrs: args.non_masquerade_cidrs,
            },
        },
        host_cgroup: args.host_cgroup,
        pod_cgroup: args.pod_cgroup,
        cni: CniConfig {
            state_dir: args.state_dir,
            add_timeout: Duration::from_secs_f64(args.cni_add_timeout.max(0.1)),
        },
    };
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting tokio")?
        .block_on(sluice_agent::run(config))
        .context("agent failed")
}
