//! One same-node measurement on fresh namespaces: the variant's rules or maps in the
//! node, then transactions, new connections and stream from the client (a pod's process
//! or the benchmark's threads, [`pod_client`](crate::pod_client)) to the measured
//! service, and what proves the traffic took the variant's path.

use std::{
    net::SocketAddrV4,
    time::{Duration, Instant},
};

use crate::{
    BenchError, BpfCost, Config, Durations, PerPacket, Proof, SERVER_IPS, Sample, Topology,
    Variant, decoy, iptables_binary, kproxy, kproxy::ServiceSpec, load, load::Rate, netns::NetNs,
    pod_client, pod_client::Client, services, sluice, vip_addr,
};

fn bpf_delta(before: [(Duration, u64); 2], after: [(Duration, u64); 2]) -> BpfCost {
    let per = |i: usize| {
        let runs = after[i].1.saturating_sub(before[i].1);
        let ns = after[i].0.saturating_sub(before[i].0).as_nanos() as f64;
        if runs == 0 { 0.0 } else { ns / runs as f64 }
    };
    let total = |i: usize| after[i].0.saturating_sub(before[i].0).as_nanos() as f64;
    let packets = after[0].1.saturating_sub(before[0].1);
    BpfCost {
        from_container_ns: per(0),
        to_container_ns: per(1),
        per_packet_ns: if packets == 0 {
            0.0
        } else {
            (total(0) + total(1)) / packets as f64
        },
        runs: after[0].1.saturating_sub(before[0].1) + after[1].1.saturating_sub(before[1].1),
    }
}

/// The variant's rules or maps in a topology's node.
enum Dataplane {
    Bare,
    Sluice(Box<sluice::Sluice>),
    Kproxy,
}

fn timed<T>(f: impl FnOnce() -> Result<T, BenchError>) -> Result<(T, Duration), BenchError> {
    let t = Instant::now();
    let out = f()?;
    Ok((out, t.elapsed()))
}

/// One measurement on fresh namespaces.
pub fn measure(
    config: &Config,
    variant: Variant,
    n: usize,
    rep: usize,
) -> Result<Sample, BenchError> {
    let svcs = services(n);
    let measured = svcs
        .last()
        .cloned()
        .ok_or_else(|| BenchError::Failed("no services".into()))?;
    let extra = decoy(n);
    let topo = Topology::new()?;
    let _servers = load::Server::start_all(&topo.servers)?;
    let (mut dataplane, program) = match variant {
        Variant::Bare => (Dataplane::Bare, None),
        Variant::Sluice => {
            let (dp, programming) = sluice::Sluice::start(&topo.node, &svcs)?;
            (Dataplane::Sluice(Box::new(dp)), Some(programming.total()))
        }
        Variant::Iptables => {
            let rules = kproxy::iptables_full(&svcs);
            let ((), took) = timed(|| {
                topo.node
                    .exec_stdin(&config.iptables_restore, &[], rules.as_bytes())
                    .map(drop)
            })?;
            (Dataplane::Kproxy, Some(took))
        }
        Variant::Nftables => {
            let rules = kproxy::nftables_full(&svcs, &[]);
            let ((), took) = timed(|| {
                topo.node
                    .exec_stdin("nft", &["-f", "-"], rules.as_bytes())
                    .map(drop)
            })?;
            (Dataplane::Kproxy, Some(took))
        }
    };
    let target = match variant {
        Variant::Bare => SocketAddrV4::new(SERVER_IPS[0], load::SERVER_PORT),
        _ => vip_addr(&measured),
    };

    let stats = |dp: &mut Dataplane| match dp {
        Dataplane::Sluice(s) => s.run_stats().map(Some),
        _ => Ok(None),
    };
    let pod = config
        .pod_client
        .then(pod_client::PodClient::new)
        .transpose()?;
    if let (Some(pod), Dataplane::Sluice(s)) = (&pod, &mut dataplane) {
        s.attach_pods(pod.cgroup())?;
    }
    let client = match &pod {
        Some(pod) => Client::Pod(pod, &topo.client),
        None => Client::Threads(&topo.client),
    };
    let created = |dp: &Dataplane| match dp {
        Dataplane::Sluice(s) => s.conntrack_created().map(Some),
        _ => Ok(None),
    };
    let before = stats(&mut dataplane)?;
    let rr = client.request_response(target, config.durations.rr)?;
    let mid = stats(&mut dataplane)?;
    let ct_before = created(&dataplane)?;
    let crr = client.connect_request_close(target, config.durations.crr)?;
    let after = stats(&mut dataplane)?;
    let ct_after = created(&dataplane)?;
    let stream_gbps = client.stream(target, config.durations.stream)?;
    let (bpf_rr, bpf_crr) = match (before, mid, after) {
        (Some(b), Some(m), Some(a)) => (Some(bpf_delta(b, m)), Some(bpf_delta(m, a))),
        _ => (None, None),
    };
    let ct_per_connection = ct_before
        .zip(ct_after)
        .map(|(b, a)| per_connection(a.saturating_sub(b), &crr, config.durations.crr));
    let per_packet = match (&pod, &mut dataplane) {
        (Some(_), Dataplane::Sluice(s)) => Some(measure_per_packet(
            s,
            &topo.client,
            target,
            &config.durations,
        )?),
        _ => None,
    };

    let proof = proof(config, variant, &topo, &dataplane, &measured, &crr)?;

    let incremental = match (&mut dataplane, variant) {
        (Dataplane::Bare, _) => None,
        (Dataplane::Sluice(s), _) => Some(s.add_service(&extra)?.total()),
        (Dataplane::Kproxy, Variant::Iptables) => {
            let rules = kproxy::iptables_add(&svcs, &extra);
            Some(
                timed(|| {
                    topo.node
                        .exec_stdin(&config.iptables_restore, &["--noflush"], rules.as_bytes())
                        .map(drop)
                })?
                .1,
            )
        }
        (Dataplane::Kproxy, _) => {
            let rules = kproxy::nftables_add(&extra);
            Some(
                timed(|| {
                    topo.node
                        .exec_stdin("nft", &["-f", "-"], rules.as_bytes())
                        .map(drop)
                })?
                .1,
            )
        }
    };
    Ok(Sample {
        variant,
        services: n,
        rep,
        program,
        incremental,
        rr,
        crr,
        stream_gbps,
        bpf_rr,
        bpf_crr,
        proof,
        ct_per_connection,
        per_packet,
    })
}

/// What proves the traffic went through the variant under test.
fn proof(
    config: &Config,
    variant: Variant,
    topo: &Topology,
    dataplane: &Dataplane,
    measured: &ServiceSpec,
    crr: &Rate,
) -> Result<Proof, BenchError> {
    Ok(match dataplane {
        Dataplane::Bare => Proof {
            what: "connections made straight to the backend",
            count: (crr.per_sec * config.durations.crr.as_secs_f64()) as u64,
        },
        Dataplane::Sluice(s) => Proof {
            what: "sluice conntrack entries created",
            count: s.conntrack_created()?,
        },
        Dataplane::Kproxy if variant == Variant::Iptables => {
            let listing = topo.node.exec(
                iptables_binary(&config.iptables_restore),
                &[
                    "-t",
                    "nat",
                    "-L",
                    &kproxy::svc_chain(measured),
                    "-v",
                    "-x",
                    "-n",
                ],
            )?;
            Proof {
                what: "packets through the measured KUBE-SVC chain's KUBE-SEP jumps",
                count: kproxy::parse_iptables_sep_packets(&listing),
            }
        }
        Dataplane::Kproxy => {
            let listing = kproxy::list_nft_counted_chain(&topo.node, measured)?;
            Proof {
                what: "packets counted in the measured service chain",
                count: kproxy::parse_nft_counter(&listing).unwrap_or(0),
            }
        }
    })
}

/// `count` per connection of a CRR phase of `duration` that achieved `crr`.
fn per_connection(count: u64, crr: &Rate, duration: Duration) -> f64 {
    let connections = crr.per_sec * duration.as_secs_f64();
    if connections > 0.0 {
        count as f64 / connections
    } else {
        0.0
    }
}

/// sluice's per-packet ClusterIP path, from the benchmark's threads in the client's
/// namespace (outside the pod's cgroup, so no socket program translates their connect()).
fn measure_per_packet(
    s: &mut sluice::Sluice,
    client: &NetNs,
    target: SocketAddrV4,
    durations: &Durations,
) -> Result<PerPacket, BenchError> {
    let rr = load::request_response(client, target, durations.rr)?;
    let (before, ct_before) = (s.run_stats()?, s.conntrack_created()?);
    let crr = load::connect_request_close(client, target, durations.crr, None)?;
    let (after, ct_after) = (s.run_stats()?, s.conntrack_created()?);
    Ok(PerPacket {
        rr,
        bpf_crr: bpf_delta(before, after),
        ct_per_connection: per_connection(ct_after.saturating_sub(ct_before), &crr, durations.crr),
        crr,
    })
}
