//! deploy/ against the Kubernetes schemas and against the agent itself: every manifest
//! validates with kubernetes-validate (scripts/setup.sh installs it), the agent ConfigMap's
//! keys are the agent's flags (both ways, with their defaults), and the DaemonSet, the CNI
//! configuration and the RBAC objects agree with each other. Needs no root: nothing here
//! loads eBPF or touches the network.

#![allow(
    clippy::expect_used,
    reason = "test helpers: a manifest without a field the tests read must fail loudly"
)]

use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    net::SocketAddr,
    path::{Path, PathBuf},
    process::Command,
    time::Instant,
};

use k8s_openapi::{
    api::{
        apps::v1::DaemonSet,
        core::v1::{ConfigMap, Container, HTTPGetAction, ServiceAccount},
        rbac::v1::{ClusterRole, ClusterRoleBinding},
    },
    apimachinery::pkg::util::intstr::IntOrString,
};
use serde::de::DeserializeOwned;

/// The schemas the manifests are checked against: the API version k8s-openapi is built for.
const KUBERNETES_VERSION: &str = "1.34";
/// Where scripts/setup.sh installs kubernetes-validate; SLUICE_KUBERNETES_VALIDATE overrides.
const KUBERNETES_VALIDATE: &str = "/opt/sluice/venv/bin/kubernetes-validate";
/// Files of deploy/ that are no Kubernetes objects, so have no schema to validate against.
const NOT_MANIFESTS: [&str; 2] = ["kustomization.yaml", "kind-cluster.yaml"];

/// Keys set to a cluster's value rather than the flag's default (the ConfigMap says why).
const CLUSTER_VALUES: [&str; 2] = ["SLUICE_SOURCE", "SLUICE_ROUTING_MODE"];
/// Keys the DaemonSet sets per pod rather than the ConfigMap.
const SET_BY_THE_DAEMONSET: [&str; 1] = ["SLUICE_NODE"];

fn deploy_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy")
}

fn read(name: &str) -> String {
    let path = deploy_dir().join(name);
    fs::read_to_string(&path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
}

fn parse<T: DeserializeOwned>(name: &str) -> T {
    serde_saphyr::from_str(&read(name)).unwrap_or_else(|e| panic!("parsing {name}: {e}"))
}

/// One flag of `sluice-agent --help`.
#[derive(Debug)]
struct Flag {
    long: String,
    env: Option<String>,
    default: Option<String>,
}

/// The text of `[label: ...]` in a help line.
fn bracket<'a>(line: &'a str, label: &str) -> Option<&'a str> {
    let start = line.find(&format!("[{label}: "))? + label.len() + 3;
    let end = line[start..].find(']')?;
    Some(&line[start..start + end])
}

/// The agent's flags, from its `--help` (one heading line per flag, its help on the next).
fn agent_flags() -> Vec<Flag> {
    let mut help = Command::new(env!("CARGO_BIN_EXE_sluice-agent"));
    help.arg("--help");
    // A SLUICE_* variable of this environment would show as the value after `env: NAME=`.
    for (name, _) in std::env::vars_os() {
        if name.to_string_lossy().starts_with("SLUICE_") {
            help.env_remove(name);
        }
    }
    let output = help
        .output()
        .unwrap_or_else(|e| panic!("running sluice-agent --help: {e}"));
    assert!(output.status.success(), "sluice-agent --help failed");
    let text = String::from_utf8_lossy(&output.stdout).into_owned();
    let lines: Vec<&str> = text.lines().collect();
    let mut flags = Vec::new();
    for (i, line) in lines.iter().enumerate() {
        let heading = line.trim_start();
        let Some(long) = heading
            .strip_prefix("--")
            .or_else(|| heading.split_once(", --").map(|(_, long)| long))
        else {
            continue;
        };
        let long = long
            .split_whitespace()
            .next()
            .unwrap_or_default()
            .to_owned();
        if long == "help" || long == "version" {
            continue;
        }
        let description = lines.get(i + 1).copied().unwrap_or_default();
        let env = bracket(description, "env").map(|env| env.trim_end_matches('=').to_owned());
        let default = bracket(description, "default").map(str::to_owned);
        flags.push(Flag { long, env, default });
    }
    assert!(
        flags.len() > 30,
        "only {} flags parsed from:\n{text}",
        flags.len()
    );
    flags
}

/// `--some-flag` is SLUICE_SOME_FLAG.
fn env_name(long: &str) -> String {
    format!("SLUICE_{}", long.to_uppercase().replace('-', "_"))
}

/// The agent ConfigMap: its set keys with their values, and the keys it shows commented out
/// (`  # SLUICE_X: ...` lines under `data:`), which leave their flag unset.
struct AgentConfigMap {
    name: String,
    set: BTreeMap<String, String>,
    commented: BTreeSet<String>,
}

fn agent_config_map() -> AgentConfigMap {
    let map: ConfigMap = parse("configmap.yaml");
    let text = read("configmap.yaml");
    let data = text
        .split_once("\ndata:\n")
        .map(|(_, data)| data)
        .expect("configmap.yaml has a data: section");
    let commented = data
        .lines()
        .filter_map(|line| line.trim_start().strip_prefix("# SLUICE_"))
        .filter_map(|rest| rest.split_once(':'))
        .map(|(name, _)| format!("SLUICE_{name}"))
        .collect();
    AgentConfigMap {
        name: map.metadata.name.expect("the ConfigMap has a name"),
        set: map
            .data
            .expect("the ConfigMap has data")
            .into_iter()
            .collect(),
        commented,
    }
}

fn daemonset() -> DaemonSet {
    parse("daemonset.yaml")
}

fn pod_spec(ds: &DaemonSet) -> &k8s_openapi::api::core::v1::PodSpec {
    ds.spec
        .as_ref()
        .and_then(|spec| spec.template.spec.as_ref())
        .expect("the DaemonSet has a pod template")
}

fn agent_container(ds: &DaemonSet) -> &Container {
    pod_spec(ds)
        .containers
        .iter()
        .find(|c| c.name == "agent")
        .expect("the DaemonSet has a container named agent")
}

fn init_container<'a>(ds: &'a DaemonSet, name: &str) -> &'a Container {
    pod_spec(ds)
        .init_containers
        .iter()
        .flatten()
        .find(|c| c.name == name)
        .unwrap_or_else(|| panic!("the DaemonSet has no init container {name}"))
}

/// The host path a container sees at `mount_path`: the hostPath volume mounted there.
fn host_path_at(ds: &DaemonSet, container: &Container, mount_path: &str) -> Option<String> {
    let mount = container
        .volume_mounts
        .iter()
        .flatten()
        .find(|m| m.mount_path == mount_path)?;
    pod_spec(ds)
        .volumes
        .iter()
        .flatten()
        .find(|v| v.name == mount.name)?
        .host_path
        .as_ref()
        .map(|h| h.path.clone())
}

#[test]
fn every_manifest_validates_against_the_kubernetes_schemas() {
    #[derive(serde::Deserialize)]
    struct Kustomization {
        resources: Vec<String>,
    }
    let kustomization: Kustomization = parse("kustomization.yaml");
    let listed: BTreeSet<String> = kustomization.resources.into_iter().collect();
    let present: BTreeSet<String> = fs::read_dir(deploy_dir())
        .expect("reading deploy/")
        .map(|entry| {
            entry
                .expect("a deploy/ entry")
                .file_name()
                .to_string_lossy()
                .into_owned()
        })
        .filter(|name| name.ends_with(".yaml") && !NOT_MANIFESTS.contains(&name.as_str()))
        .collect();
    assert_eq!(
        listed, present,
        "kustomization.yaml's resources must be every manifest of deploy/ (so each is validated and applied)"
    );

    let tool = std::env::var_os("SLUICE_KUBERNETES_VALIDATE")
        .map_or_else(|| PathBuf::from(KUBERNETES_VALIDATE), PathBuf::from);
    assert!(
        tool.exists(),
        "{} not found: run scripts/setup.sh (or set SLUICE_KUBERNETES_VALIDATE)",
        tool.display()
    );
    let started = Instant::now();
    // --strict: a misspelt field is an error, not a field the API server drops.
    let output = Command::new(&tool)
        .args([
            "--strict",
            "--quiet",
            "--kubernetes-version",
            KUBERNETES_VERSION,
        ])
        .args(listed.iter().map(|name| deploy_dir().join(name)))
        .output()
        .unwrap_or_else(|e| panic!("running {}: {e}", tool.display()));
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    // --quiet prints only warnings (an unknown kind is one) and failures.
    assert!(output.status.success() && said.trim().is_empty(), "{said}");
    println!(
        "kubernetes-validate {KUBERNETES_VERSION} --strict: {} manifests valid in {:.2} s",
        listed.len(),
        started.elapsed().as_secs_f64()
    );
}

#[test]
fn the_configmap_sets_every_agent_flag_with_its_default() {
    let flags = agent_flags();
    for flag in &flags {
        assert_eq!(
            flag.env.as_deref(),
            Some(env_name(&flag.long).as_str()),
            "--{} must be settable as {} (clap's env)",
            flag.long,
            env_name(&flag.long)
        );
    }
    let by_env: BTreeMap<String, &Flag> = flags.iter().map(|f| (env_name(&f.long), f)).collect();
    let map = agent_config_map();
    let ds = daemonset();
    let from_daemonset: BTreeSet<String> = agent_container(&ds)
        .env
        .iter()
        .flatten()
        .map(|e| e.name.clone())
        .filter(|name| name.starts_with("SLUICE_"))
        .collect();
    let expected: BTreeSet<String> = SET_BY_THE_DAEMONSET.iter().map(|s| s.to_string()).collect();
    assert_eq!(
        from_daemonset, expected,
        "SLUICE_ variables the DaemonSet sets itself"
    );

    let mut places: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    for name in map.set.keys() {
        places.entry(name).or_default().push("set in the ConfigMap");
    }
    for name in &map.commented {
        places
            .entry(name)
            .or_default()
            .push("commented out in the ConfigMap");
    }
    for name in &from_daemonset {
        places.entry(name).or_default().push("set by the DaemonSet");
    }
    for (name, where_) in &places {
        assert_eq!(where_.len(), 1, "{name} is {}", where_.join(" and "));
        assert!(
            by_env.contains_key(*name),
            "{name} ({}) is no sluice-agent flag",
            where_[0]
        );
    }
    for (name, flag) in &by_env {
        assert!(
            places.contains_key(name.as_str()),
            "--{} has no key {name} in deploy/configmap.yaml (set, or commented out if unset)",
            flag.long
        );
    }

    for (name, value) in &map.set {
        let Some(default) = by_env.get(name).and_then(|f| f.default.as_ref()) else {
            continue;
        };
        if !CLUSTER_VALUES.contains(&name.as_str()) {
            assert_eq!(value, default, "{name} is not the flag's default");
        }
    }
    for name in &map.commented {
        if let Some(flag) = by_env.get(name) {
            assert!(
                flag.default.is_none(),
                "{name} is commented out but --{} has a default ({:?}): set it",
                flag.long,
                flag.default
            );
        }
    }
    println!(
        "{} flags: {} set in ConfigMap {}, {} commented out, {} by the DaemonSet",
        flags.len(),
        map.set.len(),
        map.name,
        map.commented.len(),
        from_daemonset.len()
    );
}

/// The agent takes the ConfigMap's values: run with them, it gets past its flags and stops
/// at the first thing it does, entering a network namespace that does not exist, so it
/// touches nothing on this machine.
#[test]
fn the_agent_accepts_the_configmap_values() {
    let map = agent_config_map();
    let mut agent = Command::new(env!("CARGO_BIN_EXE_sluice-agent"));
    for (name, _) in std::env::vars_os() {
        if name.to_string_lossy().starts_with("SLUICE_") {
            agent.env_remove(name);
        }
    }
    let netns = format!("sluice-deploy-absent-{}", std::process::id());
    agent
        .envs(&map.set)
        .env("SLUICE_NODE", "node-a")
        .env("SLUICE_NETNS", &netns)
        .env("RUST_BACKTRACE", "0");
    let output = agent
        .output()
        .unwrap_or_else(|e| panic!("running sluice-agent: {e}"));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success());
    assert!(
        stderr.contains("entering the node's network namespace"),
        "the agent refused the ConfigMap's values:\n{stderr}"
    );
}

#[test]
fn the_cni_configuration_is_what_the_plugin_reads() {
    let cni: ConfigMap = parse("cni-configmap.yaml");
    let cni_name = cni.metadata.name.clone().expect("a name");
    let text = cni
        .data
        .as_ref()
        .and_then(|data| data.get("05-sluice.conflist"))
        .expect("sluice-cni-config holds 05-sluice.conflist");
    let conflist: serde_json::Value =
        serde_json::from_str(text).unwrap_or_else(|e| panic!("05-sluice.conflist: {e}"));
    assert_eq!(conflist["cniVersion"], "1.0.0");
    assert_eq!(conflist["name"], "sluice");
    let plugins = conflist["plugins"].as_array().expect("plugins is a list");
    assert_eq!(plugins.len(), 1, "{plugins:?}");
    assert_eq!(plugins[0]["type"], "sluice-cni");
    let socket = plugins[0]["agentSocket"].as_str().expect("agentSocket");

    let map = agent_config_map();
    assert_eq!(
        Some(socket),
        map.set.get("SLUICE_API_SOCKET").map(String::as_str),
        "the plugin's agentSocket is the agent's --api-socket"
    );
    // The plugin runs on the host: the agent's socket directory must be the host's.
    let ds = daemonset();
    let dir = Path::new(socket)
        .parent()
        .expect("a directory")
        .to_string_lossy();
    assert_eq!(
        host_path_at(&ds, agent_container(&ds), &dir).as_deref(),
        Some(&*dir),
        "the agent's {dir} is the host's"
    );

    let install = init_container(&ds, "install-cni");
    let script = install.command.as_ref().expect("a command").join(" ");
    for (host, inside) in [
        ("/opt/cni/bin", "/host/opt/cni/bin"),
        ("/etc/cni/net.d", "/host/etc/cni/net.d"),
    ] {
        assert_eq!(host_path_at(&ds, install, inside).as_deref(), Some(host));
        assert!(
            script.contains(inside),
            "install-cni writes {inside}: {script}"
        );
    }
    assert!(
        script.contains("/host/etc/cni/net.d/05-sluice.conflist"),
        "{script}"
    );
    assert!(script.contains("/host/opt/cni/bin/sluice-cni"), "{script}");
    let config_volume = pod_spec(&ds)
        .volumes
        .iter()
        .flatten()
        .find(|v| v.config_map.as_ref().map(|c| &c.name) == Some(&cni_name))
        .expect("a volume of sluice-cni-config");
    let mount = install
        .volume_mounts
        .iter()
        .flatten()
        .find(|m| m.name == config_volume.name)
        .expect("install-cni mounts sluice-cni-config");
    assert!(
        script.contains(&format!("{}/05-sluice.conflist", mount.mount_path)),
        "{script}"
    );
}

#[test]
fn the_daemonset_runs_the_agent_as_a_node_agent() {
    let ds = daemonset();
    let spec = pod_spec(&ds);
    let agent = agent_container(&ds);
    assert_eq!(spec.host_network, Some(true));
    assert_eq!(
        spec.priority_class_name.as_deref(),
        Some("system-node-critical")
    );
    let tolerations = spec.tolerations.as_ref().expect("tolerations");
    assert!(
        tolerations
            .iter()
            .any(|t| t.operator.as_deref() == Some("Exists") && t.key.is_none()),
        "every taint is tolerated: {tolerations:?}"
    );
    assert_eq!(
        agent.security_context.as_ref().and_then(|s| s.privileged),
        Some(true)
    );

    let node = agent
        .env
        .iter()
        .flatten()
        .find(|e| e.name == "SLUICE_NODE")
        .and_then(|e| e.value_from.as_ref())
        .and_then(|v| v.field_ref.as_ref())
        .map(|f| f.field_path.as_str());
    assert_eq!(
        node,
        Some("spec.nodeName"),
        "the node's name from the downward API"
    );

    let map = agent_config_map();
    let env_from: Vec<&str> = agent
        .env_from
        .iter()
        .flatten()
        .filter_map(|e| e.config_map_ref.as_ref().map(|c| c.name.as_str()))
        .collect();
    assert_eq!(env_from, [map.name.as_str()]);

    // Probes ask the metrics address, from the node's network (hostNetwork).
    let metrics: SocketAddr = map.set["SLUICE_METRICS_ADDRESS"]
        .parse()
        .expect("SLUICE_METRICS_ADDRESS is an address");
    let probe = |name: &str, probe: Option<&k8s_openapi::api::core::v1::Probe>| -> HTTPGetAction {
        probe
            .and_then(|p| p.http_get.clone())
            .unwrap_or_else(|| panic!("the agent has an HTTP {name} probe"))
    };
    for (name, get, path) in [
        (
            "startup",
            probe("startup", agent.startup_probe.as_ref()),
            "/healthz",
        ),
        (
            "liveness",
            probe("liveness", agent.liveness_probe.as_ref()),
            "/healthz",
        ),
        (
            "readiness",
            probe("readiness", agent.readiness_probe.as_ref()),
            "/readyz",
        ),
    ] {
        assert_eq!(get.path.as_deref(), Some(path), "{name} probe");
        assert_eq!(
            get.port,
            IntOrString::Int(metrics.port().into()),
            "{name} probe"
        );
        assert_eq!(get.host.as_deref(), Some("127.0.0.1"), "{name} probe");
    }
    assert!(
        metrics.ip().is_loopback() || metrics.ip().is_unspecified(),
        "the probes reach {metrics} on 127.0.0.1"
    );

    // Pins and state live on the host, so they outlive the agent's container.
    let pins = &map.set["SLUICE_PIN_DIR"];
    assert!(pins.starts_with("/sys/fs/bpf/"), "{pins}");
    assert_eq!(
        host_path_at(&ds, agent, "/sys/fs/bpf").as_deref(),
        Some("/sys/fs/bpf")
    );
    let state = &map.set["SLUICE_STATE_DIR"];
    assert_eq!(
        host_path_at(&ds, agent, state).as_deref(),
        Some(state.as_str())
    );
    let log_dir = Path::new(&map.set["SLUICE_POLICY_LOG_FILE"])
        .parent()
        .expect("a directory")
        .to_string_lossy()
        .into_owned();
    assert_eq!(host_path_at(&ds, agent, &log_dir), Some(log_dir.clone()));
}

#[test]
fn the_agent_may_only_read_what_it_compiles() {
    let account: ServiceAccount = parse("serviceaccount.yaml");
    let role: ClusterRole = parse("clusterrole.yaml");
    let binding: ClusterRoleBinding = parse("clusterrolebinding.yaml");
    let ds = daemonset();
    assert_eq!(pod_spec(&ds).service_account_name, account.metadata.name);
    assert_eq!(ds.metadata.namespace, account.metadata.namespace);
    assert_eq!(binding.role_ref.kind, "ClusterRole");
    assert_eq!(Some(&binding.role_ref.name), role.metadata.name.as_ref());
    let subjects = binding.subjects.expect("subjects");
    assert_eq!(subjects.len(), 1);
    assert_eq!(subjects[0].kind, "ServiceAccount");
    assert_eq!(Some(&subjects[0].name), account.metadata.name.as_ref());
    assert_eq!(subjects[0].namespace, account.metadata.namespace);

    let mut granted = BTreeSet::new();
    for rule in role.rules.expect("rules") {
        assert!(
            rule.verbs
                .iter()
                .all(|v| ["get", "list", "watch"].contains(&v.as_str())),
            "read only: {:?}",
            rule.verbs
        );
        assert!(rule.resource_names.is_none() && rule.non_resource_urls.is_none());
        for group in rule.api_groups.expect("apiGroups") {
            for resource in rule.resources.iter().flatten() {
                granted.insert(format!("{resource}.{group}"));
            }
        }
    }
    let wanted: BTreeSet<String> = [
        "nodes.",
        "namespaces.",
        "pods.",
        "services.",
        "endpointslices.discovery.k8s.io",
        "networkpolicies.networking.k8s.io",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    assert_eq!(granted, wanted);
}

#[test]
fn the_kind_cluster_leaves_the_pod_network_and_services_to_sluice() {
    let kind: serde_json::Value = parse("kind-cluster.yaml");
    assert_eq!(kind["networking"]["disableDefaultCNI"], true);
    assert_eq!(kind["networking"]["kubeProxyMode"], "none");
    // The DaemonSet reaches kind's API server by its control plane node's name.
    let ds = daemonset();
    let host = agent_container(&ds)
        .env
        .iter()
        .flatten()
        .find(|e| e.name == "KUBERNETES_SERVICE_HOST")
        .and_then(|e| e.value.clone());
    let name = kind["name"].as_str().expect("the cluster is named");
    assert_eq!(host, Some(format!("{name}-control-plane")));
    // The agent checks every Node's podCIDR against the cluster's pod network.
    let map = agent_config_map();
    assert_eq!(
        kind["networking"]["podSubnet"].as_str(),
        map.set.get("SLUICE_CLUSTER_CIDR").map(String::as_str)
    );
}

/// A value from the environment is checked as its flag's would be, and refused naming the
/// flag; `SLUICE_MASQUERADE=false` counts as given for clap, so CIDRs beside it are refused
/// by the agent rather than ignored.
#[test]
fn a_bad_environment_value_is_refused_naming_its_flag() {
    let refused = |vars: &[(&str, &str)]| -> String {
        let mut agent = Command::new(env!("CARGO_BIN_EXE_sluice-agent"));
        for (name, _) in std::env::vars_os() {
            if name.to_string_lossy().starts_with("SLUICE_") {
                agent.env_remove(name);
            }
        }
        // The paths do not exist: flags are checked before any of them is used.
        agent
            .env("SLUICE_NODE", "node-a")
            .env("SLUICE_CLUSTER_FILE", "/nonexistent/cluster.json")
            .env("SLUICE_PIN_DIR", "/nonexistent/pins")
            .envs(vars.iter().copied());
        let output = agent
            .output()
            .unwrap_or_else(|e| panic!("running sluice-agent: {e}"));
        assert!(!output.status.success(), "{vars:?} was accepted");
        String::from_utf8_lossy(&output.stderr).into_owned()
    };
    let err = refused(&[("SLUICE_MAGLEV_TABLE_SIZE", "16384")]);
    assert!(
        err.contains("--maglev-table-size") && err.contains("not prime"),
        "{err}"
    );
    let err = refused(&[("SLUICE_MASQUERADE", "yes")]);
    assert!(
        err.contains("--masquerade") && err.contains("true, false"),
        "{err}"
    );
    let err = refused(&[
        ("SLUICE_MASQUERADE", "false"),
        ("SLUICE_NON_MASQUERADE_CIDR", "10.0.0.0/8,192.168.0.0/16"),
    ]);
    assert!(
        err.contains("--non-masquerade-cidr") && err.contains("needs --masquerade"),
        "{err}"
    );
    let err = refused(&[
        ("SLUICE_MASQUERADE", "true"),
        ("SLUICE_NON_MASQUERADE_CIDR", "10.0.0.0/8,10.1.0.1/16"),
    ]);
    assert!(
        err.contains("--non-masquerade-cidr") && err.contains("host bits set"),
        "{err}"
    );
}
