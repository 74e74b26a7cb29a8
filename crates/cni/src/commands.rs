//! The operations: ADD, DEL, CHECK, STATUS, VERSION and GC.

use std::time::Duration;

use ipnet::Ipv4Net;
use serde::de::DeserializeOwned;
use sluice_api::{
    ApiError, Client,
    cni::{CniAddRequest, CniAllocation, CniAttachment},
};
use sluice_netns::{
    Guest, NetNs, NetNsError, Netlink, ROUTER_INTERFACE, add_router_interface, wire_guest,
};

use crate::{
    CniError, Command, Runtime, host_interface,
    spec::{
        AddResult, DEFAULT_AGENT_SOCKET, Dns, Interface, IpConfig, LATEST_VERSION, NetConf,
        PLUGIN_TYPE, RouteConfig, SUPPORTED_VERSIONS, VersionRequest, VersionResult, supported,
    },
};

pub fn dispatch(runtime: &Runtime, stdin: &[u8]) -> Result<String, CniError> {
    if runtime.command == Command::Version {
        return version(stdin);
    }
    let config = config(stdin)?;
    let agent = Client::new(socket(&config));
    match runtime.command {
        Command::Add => add(runtime, &config, &agent),
        Command::Del => del(runtime, &agent).map(|()| String::new()),
        Command::Check => check(runtime, &config, &agent).map(|()| String::new()),
        Command::Status => status(&agent).map(|()| String::new()),
        Command::Gc => gc(&config, &agent).map(|()| String::new()),
        Command::Version => version(stdin),
    }
}

/// How much longer than the agent the plugin waits for an attached endpoint's answer.
const ATTACH_MARGIN: Duration = Duration::from_secs(5);

fn socket(config: &NetConf) -> &str {
    config
        .agent_socket
        .as_deref()
        .unwrap_or(DEFAULT_AGENT_SOCKET)
}

/// The configuration, checked: a version this plugin speaks, a name, this plugin's type.
fn config(stdin: &[u8]) -> Result<NetConf, CniError> {
    let config: NetConf = decode(stdin)?;
    if !supported(&config.cni_version) {
        return Err(CniError::Version(config.cni_version));
    }
    if config.name.is_empty() {
        return Err(CniError::InvalidConfig("name is empty".into()));
    }
    if config.plugin_type != PLUGIN_TYPE {
        return Err(CniError::InvalidConfig(format!(
            "type is {:?}, not {PLUGIN_TYPE:?}",
            config.plugin_type
        )));
    }
    if config.agent_socket.as_deref() == Some("") {
        return Err(CniError::InvalidConfig("agentSocket is empty".into()));
    }
    Ok(config)
}

/// Decodes the configuration on stdin; a value of the wrong shape is refused naming its
/// field, not only a position in the text.
fn decode<T: DeserializeOwned>(stdin: &[u8]) -> Result<T, CniError> {
    let mut reader = serde_json::Deserializer::from_slice(stdin);
    let value = serde_path_to_error::deserialize(&mut reader).map_err(|e| {
        let field = e.path().to_string();
        let error = e.into_inner();
        // serde_path_to_error names the root ".".
        if field == "." {
            CniError::Decode(error)
        } else {
            CniError::DecodeField { field, error }
        }
    })?;
    reader.end().map_err(CniError::Decode)?;
    Ok(value)
}

fn version(stdin: &[u8]) -> Result<String, CniError> {
    let request: VersionRequest = decode(stdin)?;
    let cni_version = if supported(&request.cni_version) {
        request.cni_version
    } else {
        LATEST_VERSION.to_string()
    };
    let answer = VersionResult {
        cni_version,
        supported_versions: SUPPORTED_VERSIONS.map(String::from).to_vec(),
    };
    serde_json::to_string(&answer).map_err(CniError::Decode)
}

fn attachment(runtime: &Runtime) -> Result<CniAttachment, CniError> {
    Ok(CniAttachment {
        container_id: runtime.container_id()?,
        ifname: runtime.ifname()?,
    })
}

fn open_netns(path: &str) -> Result<NetNs, CniError> {
    NetNs::at_path(path).map_err(|_| CniError::NoNetns(path.to_string()))
}

fn add(runtime: &Runtime, config: &NetConf, agent: &Client) -> Result<String, CniError> {
    let attachment = attachment(runtime)?;
    let netns_path = runtime.netns()?;
    let pod = runtime.pod()?;
    let pod_netns = open_netns(&netns_path)?;
    let interface = host_interface(&attachment.container_id, &attachment.ifname);
    let allocation = agent.cni_add(&CniAddRequest {
        attachment: attachment.clone(),
        netns: netns_path.clone(),
        namespace: pod.namespace,
        pod: pod.name,
        interface: interface.clone(),
    })?;
    let node = Netlink::current()?;
    // A veth of this name is this attachment's, left by an ADD that died half way: a
    // retried ADD starts afresh.
    remove_veth(&node, &interface)?;
    // The agent answers within its own timeout; the plugin waits a little longer, so the
    // agent's reason reaches the runtime rather than a bare timeout.
    let patient =
        Client::new(socket(config)).with_timeout(allocation.attach_timeout + ATTACH_MARGIN);
    let attached = wire(&node, &pod_netns, &attachment, &allocation)
        .and_then(|()| patient.cni_attached(&attachment).map_err(CniError::from));
    if let Err(e) = attached {
        // Nothing half-made stays: the runtime may never call DEL after a failed ADD.
        let _ = remove_veth(&node, &interface);
        let _ = agent.cni_del(&attachment);
        return Err(e);
    }
    let result = AddResult {
        cni_version: config.cni_version.clone(),
        interfaces: vec![
            Interface {
                name: interface.clone(),
                mac: node.mac(&interface).ok(),
                sandbox: None,
            },
            Interface {
                name: attachment.ifname.clone(),
                mac: pod_netns.netlink()?.mac(&attachment.ifname).ok(),
                sandbox: Some(netns_path),
            },
        ],
        ips: vec![IpConfig {
            address: Ipv4Net::from(allocation.endpoint.address),
            gateway: Some(allocation.router),
            interface: Some(1),
        }],
        routes: vec![RouteConfig {
            dst: Ipv4Net::default(),
            gw: Some(allocation.router),
        }],
        dns: Dns::default(),
    };
    serde_json::to_string(&result).map_err(CniError::Decode)
}

/// The router address on the node (made once, by the first ADD), then the pod's veth.
fn wire(
    node: &Netlink,
    pod_netns: &NetNs,
    attachment: &CniAttachment,
    allocation: &CniAllocation,
) -> Result<(), CniError> {
    if !has_link(node, ROUTER_INTERFACE)?
        && let Err(e) = add_router_interface(node, allocation.router, None)
        // Another ADD may have made it meanwhile.
        && !has_link(node, ROUTER_INTERFACE)?
    {
        return Err(e.into());
    }
    wire_guest(
        node,
        pod_netns,
        &Guest {
            interface: &allocation.endpoint.interface,
            device: &attachment.ifname,
            address: allocation.endpoint.address,
            router: allocation.router,
            mtu: allocation.mtu,
            alias: None,
        },
    )?;
    Ok(())
}

fn has_link(node: &Netlink, name: &str) -> Result<bool, CniError> {
    match node.index(name) {
        Ok(_) => Ok(true),
        Err(NetNsError::NoInterface { .. }) => Ok(false),
        Err(e) => Err(e.into()),
    }
}

/// Deletes the host-side veth (and with it the pod's end); one already gone is fine.
fn remove_veth(node: &Netlink, interface: &str) -> Result<(), CniError> {
    if has_link(node, interface)? {
        node.delete_link(interface)?;
    }
    Ok(())
}

/// Idempotent: the veth and the agent's record go if they exist, whether or not the pod's
/// namespace still does.
fn del(runtime: &Runtime, agent: &Client) -> Result<(), CniError> {
    let attachment = attachment(runtime)?;
    let interface = host_interface(&attachment.container_id, &attachment.ifname);
    remove_veth(&Netlink::current()?, &interface)?;
    agent.cni_del(&attachment)?;
    Ok(())
}

/// The agent still holds the attachment and polices it; both veth ends exist, the pod's
/// with the address ADD returned (and `prevResult` names, if given).
fn check(runtime: &Runtime, config: &NetConf, agent: &Client) -> Result<(), CniError> {
    let attachment = attachment(runtime)?;
    let pod_netns = open_netns(&runtime.netns()?)?;
    let state = agent.cni_check(&attachment)?;
    let endpoint = &state.endpoint;
    if state.realized_generation.is_none() {
        return Err(CniError::Check(format!(
            "the agent does not police interface {} ({}) now",
            endpoint.interface, endpoint.address
        )));
    }
    let interface = host_interface(&attachment.container_id, &attachment.ifname);
    if !has_link(&Netlink::current()?, &interface)? {
        return Err(CniError::Check(format!(
            "host interface {interface} is missing"
        )));
    }
    let inside = pod_netns.netlink()?;
    let addresses = inside.addresses(&attachment.ifname).map_err(|e| match e {
        NetNsError::NoInterface { .. } => CniError::Check(format!(
            "interface {} is missing in {}",
            attachment.ifname,
            pod_netns.name()
        )),
        other => other.into(),
    })?;
    let want = ipnet::IpNet::from(Ipv4Net::from(endpoint.address));
    if !addresses.contains(&want) {
        return Err(CniError::Check(format!(
            "interface {} has {addresses:?}, not {want}",
            attachment.ifname
        )));
    }
    if let Some(previous) = &config.prev_result {
        let previous: AddResult = serde_json::from_value(previous.clone())
            .map_err(|e| CniError::InvalidConfig(format!("prevResult: {e}")))?;
        if !previous
            .ips
            .iter()
            .any(|ip| ip.address.addr() == endpoint.address)
        {
            return Err(CniError::Check(format!(
                "prevResult does not name the pod's address {}",
                endpoint.address
            )));
        }
    }
    Ok(())
}

/// Removes every attachment the agent holds that the runtime's list lacks, as DEL would.
fn gc(config: &NetConf, agent: &Client) -> Result<(), CniError> {
    let valid = config
        .valid_attachments
        .as_ref()
        .or(config.attachments.as_ref())
        .ok_or_else(|| {
            CniError::InvalidConfig(
                "GC needs cni.dev/valid-attachments (removing every attachment is never meant)"
                    .into(),
            )
        })?;
    let node = Netlink::current()?;
    for endpoint in agent.cni_endpoints()? {
        let attachment = &endpoint.attachment;
        let kept = valid
            .iter()
            .any(|v| v.container_id == attachment.container_id && v.ifname == attachment.ifname);
        if !kept {
            remove_veth(&node, &endpoint.interface)?;
            agent.cni_del(attachment)?;
        }
    }
    Ok(())
}

/// Succeeds (printing nothing) when the agent can take pods; else code 50 with its reason.
fn status(agent: &Client) -> Result<(), CniError> {
    let status = agent.cni_status().map_err(|e| match e {
        ApiError::Connect { .. } => CniError::NotAvailable(e.to_string()),
        other => CniError::NotAvailable(format!("asking the agent: {other}")),
    })?;
    if status.ready {
        return Ok(());
    }
    Err(CniError::NotAvailable(format!(
        "the agent cannot take pods: {}",
        status.reason.as_deref().unwrap_or("not ready")
    )))
}
