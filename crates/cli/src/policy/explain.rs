//! `sluice policy explain`: asks the agent of the flow's source (and, in a lab, the
//! destination's agent when it runs elsewhere) why the flow is allowed or denied, and
//! prints the answer as prose or JSON.

use std::net::Ipv4Addr;

use sluice_api::explain::{
    AllowedBy, ExplainRequest, ExplainVerdict, ExplainedDirection, ExplainedEnd, KernelCheck,
    KernelFound, PolicyExplanation,
};

use super::ExplainArgs;
use crate::{EXIT_DENIED, Output, agents::Agents, output::print_doc};

/// Prints the explanation; exits 0 when allowed, 1 when denied or the kernel disagrees,
/// 2 on an error (an unknown pod, no agent), naming what failed.
pub fn explain(
    agents: impl FnOnce() -> anyhow::Result<Agents>,
    node: Option<&str>,
    args: &ExplainArgs,
    output: Output,
) -> anyhow::Result<()> {
    // An error goes to main, which prints it and exits 2.
    let explanation = ask(agents, node, args)?;
    if output.structured() {
        print_doc(output, &explanation)?;
    } else {
        print(&explanation);
    }
    if !explanation.allowed || !explanation.kernel_agrees() {
        std::process::exit(EXIT_DENIED.into());
    }
    Ok(())
}

/// The explanation, each direction's kernel check made by the agent of its side's node.
fn ask(
    agents: impl FnOnce() -> anyhow::Result<Agents>,
    node: Option<&str>,
    args: &ExplainArgs,
) -> anyhow::Result<PolicyExplanation> {
    let request = ExplainRequest {
        from: args.from.clone(),
        to: args.to.clone(),
        port: args.port,
        protocol: args.protocol.into(),
    };
    let agents = agents()?;
    // The source's agent answers first; an address as source has none, so the
    // destination's does.
    let first = if args.from.parse::<Ipv4Addr>().is_ok() {
        &args.to
    } else {
        &args.from
    };
    let mut explanation = agents
        .of_endpoint(node, first)?
        .client()
        .explain(&request)?;
    if node.is_some() || !matches!(agents, Agents::Lab(_)) {
        return Ok(explanation);
    }
    for ingress in [false, true] {
        let direction = if ingress {
            &explanation.ingress
        } else {
            &explanation.egress
        };
        let KernelCheck::NotOnThisNode { node: Some(other) } = &direction.kernel else {
            continue;
        };
        let theirs = agents
            .one(Some(other.as_str()))?
            .client()
            .explain(&request)?;
        if ingress {
            explanation.ingress = theirs.ingress;
        } else {
            explanation.egress = theirs.egress;
        }
    }
    Ok(explanation)
}

fn print(e: &PolicyExplanation) {
    println!(
        "Flow:     {} -> {}, {}/{}",
        end(&e.from),
        end(&e.to),
        e.port,
        e.protocol
    );
    println!(
        "Verdict:  {} (from the compiled policy; no traffic was sent)",
        if e.allowed { "ALLOWED" } else { "DENIED" }
    );
    println!();
    print_direction("Egress of", &e.from, &e.egress);
    println!();
    print_direction("Ingress of", &e.to, &e.ingress);
    if !e.kernel_agrees() {
        println!();
        println!(
            "WARNING: the kernel's maps disagree with the desired state for this flow \
             (`sluice verify` lists the drift, `--repair` fixes it)"
        );
        if e.generation != e.realized_generation {
            println!(
                "(node {} explained generation {} but has realized {} so far: ask again)",
                e.node, e.generation, e.realized_generation
            );
        }
    }
}

/// `x/a (10.244.0.3, identity 1234)` or `192.0.2.7 (identity 2: reserved:world)`.
fn end(end: &ExplainedEnd) -> String {
    let labels = if end.pod.is_none() && !end.labels.is_empty() {
        format!(": {}", end.labels.join(","))
    } else {
        String::new()
    };
    let identity = format!("identity {}{labels}", end.identity);
    match (&end.pod, end.address) {
        (Some(pod), Some(address)) => format!("{pod} ({address}, {identity})"),
        (Some(pod), None) => format!("{pod} (no address, {identity})"),
        (None, Some(address)) => format!("{address} ({identity})"),
        (None, None) => format!("({identity})"),
    }
}

fn print_direction(what: &str, side: &ExplainedEnd, d: &ExplainedDirection) {
    let who = side
        .pod
        .clone()
        .or(side.address.map(|a| a.to_string()))
        .unwrap_or_default();
    let isolated_by = d.isolated_by.join(", ");
    let reason = match d.verdict {
        ExplainVerdict::NotAPod => "allowed: not a pod, no NetworkPolicy governs it".to_string(),
        ExplainVerdict::NotIsolated => format!(
            "allowed: not isolated for {} (no NetworkPolicy selecting it has {} in its \
             policyTypes), allowed by default",
            d.direction, d.direction
        ),
        ExplainVerdict::Allowed => format!("allowed: isolated by {isolated_by}; allowed by"),
        ExplainVerdict::Denied => format!(
            "DENIED: isolated by {isolated_by}, and no {} rule of them matches",
            d.direction
        ),
        ExplainVerdict::FailsClosed => format!(
            "DENIED: isolated by {isolated_by}, but its policy does not fit its map: it fails \
             closed (raise --policy-map-max)"
        ),
    };
    println!("{what} {who}: {reason}");
    for allow in &d.allowed_by {
        println!("  {}", allowed_by(allow, &d.direction.to_string()));
    }
    println!("  kernel: {}", kernel(&d.kernel));
}

/// `x/allow-ns-y spec.ingress[0].from[1] {"namespaceSelector":..}, ports[0]`.
fn allowed_by(allow: &AllowedBy, direction: &str) -> String {
    match allow {
        AllowedBy::Host => "the pod's own node (reserved:host): always allowed".to_string(),
        AllowedBy::Rule {
            policy,
            rule,
            peer,
            port,
            peer_spec,
        } => {
            let peers = if direction == "ingress" { "from" } else { "to" };
            let peer = match (peer, peer_spec) {
                (Some(n), Some(spec)) => format!(".{peers}[{n}] {spec}"),
                (Some(n), None) => format!(".{peers}[{n}]"),
                (None, _) => format!(" (no {peers}: every peer)"),
            };
            let port = match port {
                Some(n) => format!(", ports[{n}]"),
                None => ", every port (no ports)".to_string(),
            };
            format!("{policy} spec.{direction}[{rule}]{peer}{port}")
        }
    }
}

fn kernel(check: &KernelCheck) -> String {
    match check {
        KernelCheck::NotAPod => "nothing to check (not a pod)".to_string(),
        KernelCheck::NotOnThisNode { node } => match node {
            Some(node) => format!("not on this node (runs on {node}; ask its agent)"),
            None => "not on this node (no endpoint here)".to_string(),
        },
        KernelCheck::Checked {
            remote_identity,
            found,
            allowed,
            agrees,
        } => {
            let found = match found {
                KernelFound::NotEnforced => "direction not enforced".to_string(),
                KernelFound::FailsClosed => "endpoint flagged fails-closed".to_string(),
                KernelFound::NoPolicyMap => "no policy map installed".to_string(),
                KernelFound::NoRow => {
                    format!("no row for identity {remote_identity} or any peer")
                }
                KernelFound::Row {
                    identity,
                    packets,
                    bytes,
                } => format!(
                    "row for {} ({packets} packets, {bytes} bytes admitted)",
                    if *identity == 0 {
                        "any peer".to_string()
                    } else {
                        format!("identity {identity}")
                    }
                ),
            };
            format!(
                "{} ({}; peer identity {remote_identity} in the ipcache): {}",
                if *allowed { "allowed" } else { "denied" },
                found,
                if *agrees { "agrees" } else { "DISAGREES" }
            )
        }
    }
}
