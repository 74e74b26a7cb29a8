//! `sluice endpoint`, `sluice identity` and `sluice policy`: identities and policy as the
//! agent computed them and as the kernel holds them, shaped like cilium-dbg's output.

use clap::{Args, Subcommand, ValueEnum};
use sluice_api::{
    Client, EndpointEntry, EndpointPolicyView, EndpointStatus, IdentityEntry, PolicyRow, Protocol,
    RowState,
};

use crate::{Output, output::print_doc, table};

mod explain;

pub use explain::explain;

#[derive(Subcommand)]
pub enum EndpointCommand {
    /// Every local endpoint with its identity and policy enforcement.
    List,
    /// One endpoint, by `namespace/pod`, pod name or ifindex.
    Get { endpoint: String },
}

#[derive(Subcommand)]
pub enum IdentityCommand {
    /// Every identity the ipcache or a policy row names.
    List,
    /// One identity and the local endpoints that carry it.
    Get { id: u32 },
}

#[derive(Subcommand)]
pub enum PolicyCommand {
    /// The allow rows of an endpoint's policy map in the kernel, with their counters.
    Get { endpoint: String },
    /// Why a new connection is allowed or denied: from the compiled policy (no traffic),
    /// the source's egress and the destination's ingress with the NetworkPolicies, rules
    /// and peers behind each verdict, then whether the kernel's maps agree. Exit 0
    /// allowed, 1 denied (or the kernel disagrees), 2 an error.
    Explain(ExplainArgs),
}

#[derive(Args)]
pub struct ExplainArgs {
    /// The client: `namespace/pod` or an IPv4 address.
    #[arg(long)]
    pub from: String,
    /// The server: `namespace/pod` or an IPv4 address.
    #[arg(long)]
    pub to: String,
    /// The destination port (a Service's target port: policy judges after translation).
    #[arg(long)]
    pub port: u16,
    #[arg(long, value_enum, ignore_case = true, default_value_t = ExplainProtocol::Tcp)]
    pub protocol: ExplainProtocol,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
#[value(rename_all = "UPPER")]
pub enum ExplainProtocol {
    Tcp,
    Udp,
    Sctp,
}

impl From<ExplainProtocol> for Protocol {
    fn from(p: ExplainProtocol) -> Self {
        match p {
            ExplainProtocol::Tcp => Protocol::Tcp,
            ExplainProtocol::Udp => Protocol::Udp,
            ExplainProtocol::Sctp => Protocol::Sctp,
        }
    }
}

pub fn endpoint(client: &Client, command: &EndpointCommand, output: Output) -> anyhow::Result<()> {
    match command {
        EndpointCommand::List => {
            let endpoints: Vec<EndpointEntry> = client.endpoints()?;
            if output.structured() {
                return print_doc(output, &endpoints);
            }
            let mut rows = Vec::new();
            for e in &endpoints {
                let first = vec![
                    e.ifindex.to_string(),
                    format!("{}/{}", e.namespace, e.pod),
                    enforcement(e.ingress_enforced).to_string(),
                    enforcement(e.egress_enforced).to_string(),
                    e.identity.to_string(),
                ];
                let tail = [e.ipv4.to_string(), e.status.to_string()];
                push_with_labels(&mut rows, first, &e.labels, &tail);
            }
            table::print(
                &[
                    "ENDPOINT",
                    "POD",
                    "POLICY (ingress)",
                    "POLICY (egress)",
                    "IDENTITY",
                    "LABELS",
                    "IPV4",
                    "STATUS",
                ],
                &rows,
            );
            Ok(())
        }
        EndpointCommand::Get { endpoint } => {
            let e: EndpointEntry = client.endpoint(endpoint)?;
            if output.structured() {
                return print_doc(output, &e);
            }
            print_endpoint(&e);
            Ok(())
        }
    }
}

fn enforcement(enforced: bool) -> &'static str {
    if enforced { "Enabled" } else { "Disabled" }
}

/// One row with the first label, then a row per further label with only that cell filled,
/// as cilium-dbg prints label lists.
fn push_with_labels(
    rows: &mut Vec<Vec<String>>,
    first: Vec<String>,
    labels: &[String],
    tail: &[String],
) {
    let width = first.len();
    let mut row = first;
    row.push(labels.first().cloned().unwrap_or_default());
    row.extend(tail.iter().cloned());
    rows.push(row);
    for label in labels.iter().skip(1) {
        let mut more = vec![String::new(); width];
        more.push(label.clone());
        rows.push(more);
    }
}

fn print_endpoint(e: &EndpointEntry) {
    println!(
        "Endpoint:   {}/{} (ifindex {})",
        e.namespace, e.pod, e.ifindex
    );
    println!("Interface:  {}", e.interface);
    println!("IPv4:       {}", e.ipv4);
    println!("Identity:   {}", e.identity);
    for (n, label) in e.labels.iter().enumerate() {
        println!(
            "{}{label}",
            if n == 0 {
                "Labels:     "
            } else {
                "            "
            }
        );
    }
    println!("Ingress:    {}", enforcement(e.ingress_enforced));
    println!("Egress:     {}", enforcement(e.egress_enforced));
    println!(
        "Policies:   {}",
        if e.policies.is_empty() {
            "-".to_string()
        } else {
            e.policies.join(", ")
        }
    );
    println!(
        "Policy map: {} rows needed, {} max",
        e.policy_rows, e.policy_map_max
    );
    println!("Status:     {}", e.status);
    if e.status == EndpointStatus::FailsClosed {
        println!(
            "WARNING: fails closed: policy needs {} rows, map holds {}",
            e.policy_rows, e.policy_map_max
        );
    }
}

pub fn identity(client: &Client, command: &IdentityCommand, output: Output) -> anyhow::Result<()> {
    let identities: Vec<IdentityEntry> = match command {
        IdentityCommand::List => client.identities()?,
        IdentityCommand::Get { id } => {
            let one: IdentityEntry = client.identity(*id)?;
            if output.structured() {
                return print_doc(output, &one);
            }
            vec![one]
        }
    };
    if output.structured() {
        return print_doc(output, &identities);
    }
    let mut rows = Vec::new();
    for i in &identities {
        push_with_labels(
            &mut rows,
            vec![i.id.to_string()],
            &i.labels,
            &[i.endpoints.join(",")],
        );
    }
    table::print(&["ID", "LABELS", "ENDPOINTS"], &rows);
    Ok(())
}

pub fn policy(client: &Client, endpoint: &str, output: Output) -> anyhow::Result<()> {
    let view: EndpointPolicyView = client.policy(endpoint)?;
    if output.structured() {
        return print_doc(output, &view);
    }
    let mut rows = Vec::new();
    for r in &view.rows {
        let (verdict, packets, bytes) = match r.state {
            RowState::Missing => ("Missing", "-".to_string(), "-".to_string()),
            RowState::Realized | RowState::Unexpected => {
                ("Allow", r.packets.to_string(), r.bytes.to_string())
            }
        };
        let first = vec![verdict.to_string(), capitalized(r.direction.as_str())];
        let allowed_by = if r.state == RowState::Unexpected {
            "(not desired)".to_string()
        } else {
            r.allowed_by
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(",")
        };
        let tail = [
            port_proto(r),
            packets,
            bytes,
            r.prefix.to_string(),
            allowed_by,
        ];
        push_with_labels(&mut rows, first, &r.identity_labels, &tail);
    }
    table::print(
        &[
            "POLICY",
            "DIRECTION",
            "LABELS",
            "PORT/PROTO",
            "PACKETS",
            "BYTES",
            "PREFIX",
            "ALLOWED-BY",
        ],
        &rows,
    );
    let e = &view.endpoint;
    match view.map_max_entries {
        _ if e.status == EndpointStatus::FailsClosed => println!(
            "WARNING: {}/{} fails closed: policy needs {} rows, map holds {}",
            e.namespace, e.pod, e.policy_rows, e.policy_map_max
        ),
        None if e.ingress_enforced || e.egress_enforced => println!(
            "WARNING: no policy map installed for {}/{}: new connections are dropped",
            e.namespace, e.pod
        ),
        None => println!(
            "{}/{}: no policy map (no NetworkPolicy selects it: everything is allowed)",
            e.namespace, e.pod
        ),
        Some(_) => {}
    }
    Ok(())
}

fn capitalized(s: &str) -> String {
    let mut chars = s.chars();
    chars
        .next()
        .map(|c| c.to_uppercase().chain(chars).collect())
        .unwrap_or_default()
}

/// `ANY`, `ANY/TCP`, `80/TCP` or `8000-8015/TCP`.
fn port_proto(r: &PolicyRow) -> String {
    match r.ports {
        None => "ANY".to_string(),
        Some((0, u16::MAX)) => format!("ANY/{}", r.protocol),
        Some((first, last)) if first == last => format!("{first}/{}", r.protocol),
        Some((first, last)) => format!("{first}-{last}/{}", r.protocol),
    }
}
