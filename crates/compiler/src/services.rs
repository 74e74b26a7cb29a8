//! Services: every frontend of each port (ClusterIP, node ports, external IPs, load
//! balancer IPs) with its slots, backends, source ranges and health check.

use std::{collections::BTreeSet, net::Ipv4Addr};

use ipnet::{IpNet, Ipv4Net};
use k8s_openapi::api::{
    core::v1::{Service, ServicePort, ServiceSpec},
    discovery::v1::EndpointSlice,
};
use sluice_common::{
    BACKEND_STATE_ACTIVE, LB4_SCOPE_DEFAULT, LB4_SCOPE_INTERNAL, Lb4Backend, Lb4BackendKey, Lb4Key,
    Lb4Service, Lb4SourceRangeKey, SOURCE_RANGE_ALLOWED, SVC_FLAG_LOCAL, SVC_FLAG_SOURCE_RANGES,
    SVC_FLAG_TWO_SCOPES, SVC_FLAG_WILDCARD,
    kinds::{FrontendKind, ServiceKind, UnknownServiceKind},
};

use crate::{
    Compilation, Frontend, HealthCheck, ObjectRef, PortProblem, Problem, ServicePortRef,
    ValueField,
    backends::{Scope, SliceBackend, backends_for, local_ready_endpoints, slot_backends},
    balancing::{self, Balancing, FrontendOptions},
    object_name, port_number, protocol_number,
    topology::{Distribution, Place},
    unsupported,
};

/// The addresses of one Service besides its ClusterIP, and its traffic policies.
struct ServiceAddresses {
    kind: ServiceKind,
    vip: Ipv4Addr,
    external_ips: Vec<Ipv4Addr>,
    load_balancer_ips: Vec<Ipv4Addr>,
    /// externalTrafficPolicy Local: node port, external IP and load balancer frontends.
    external_local: bool,
    /// internalTrafficPolicy Local: the ClusterIP frontend.
    internal_local: bool,
    /// Which backends the frontends under traffic policy Cluster prefer.
    distribution: Distribution,
    /// loadBalancerSourceRanges of a LoadBalancer Service, IPv4 ones parsed; None: any
    /// source. Some and empty (every range IPv6 or unparsable) admits no IPv4 source.
    source_ranges: Option<Vec<Ipv4Net>>,
    /// Affinity and the backend selection algorithm, the same on every frontend.
    balancing: FrontendOptions,
}

impl ServiceAddresses {
    /// Whether the traffic policy that applies to `frontend` is Local.
    fn local(&self, frontend: FrontendKind) -> bool {
        if frontend.is_external() {
            self.external_local
        } else {
            self.internal_local
        }
    }
}

/// The backends a frontend's slots hold, in slot order, and for an external frontend with
/// traffic policy Local the cluster-wide ones its internal scope holds for the node's own
/// processes.
struct FrontendSlots {
    slots: Vec<(Ipv4Addr, u16)>,
    internal: Option<Vec<(Ipv4Addr, u16)>>,
}

/// One frontend of a service port, before it is programmed.
struct FrontendAt {
    frontend: FrontendKind,
    address: Ipv4Addr,
    port: u16,
}

impl Compilation {
    pub(crate) fn service(
        &mut self,
        object: &ObjectRef,
        service: &Service,
        slices: &[&EndpointSlice],
        balancing: Balancing,
    ) {
        let owner = object_name(object);
        let Some(spec) = &service.spec else {
            self.problem(Problem::NoSpec {
                object: object.clone(),
            });
            return;
        };
        let kind = match spec
            .type_
            .as_deref()
            .map_or(Ok(ServiceKind::ClusterIP), str::parse)
        {
            // DNS-only: there is no address to program.
            Ok(ServiceKind::ExternalName) => return,
            Ok(kind) => kind,
            Err(UnknownServiceKind(other)) => {
                self.problem(Problem::ServiceType {
                    service: object.clone(),
                    value: other,
                });
                return;
            }
        };
        let vip = match spec.cluster_ip.as_deref().unwrap_or("") {
            // Headless: clients resolve the endpoints themselves.
            "None" => return,
            "" => {
                self.problem(Problem::NoClusterIp {
                    service: object.clone(),
                });
                return;
            }
            ip => match ip.parse::<Ipv4Addr>() {
                Ok(vip) => vip,
                Err(_) => {
                    self.problem(Problem::ClusterIpNotIpv4 {
                        service: object.clone(),
                        value: ip.to_string(),
                    });
                    return;
                }
            },
        };
        if let Some(holder) = self.vip_owners.get(&vip) {
            self.problem(Problem::ClusterIpTaken {
                service: object.clone(),
                vip,
                holder: holder.clone(),
            });
            return;
        }
        self.vip_owners.insert(vip, owner);
        // What the datapath cannot do for this Service is said, not half-done silently.
        for field in unsupported::service_fields(object, service) {
            self.problem(Problem::Unsupported(field));
        }
        self.state.services.insert(
            Lb4Key::wildcard(vip),
            Lb4Service::frontend(0, SVC_FLAG_WILDCARD),
        );
        let options = balancing::frontend_options(object, service, balancing, &mut self.problems);
        let addresses = self.service_addresses(object, kind, vip, service, spec, options);
        for port in spec.ports.iter().flatten() {
            self.port(object, &addresses, port, slices);
        }
        if kind == ServiceKind::LoadBalancer && addresses.external_local {
            self.health_check(object, spec, slices);
        }
    }

    /// The Service's healthCheckNodePort, if it has one; a port another Service already
    /// answers on is kept by that one and reported.
    fn health_check(&mut self, object: &ObjectRef, spec: &ServiceSpec, slices: &[&EndpointSlice]) {
        let Some(port) = spec.health_check_node_port.and_then(port_number) else {
            return;
        };
        if let Some(holder) = self.state.health_checks.get(&port) {
            let holder = format!("{}/{}", holder.namespace, holder.name);
            self.problem(Problem::HealthCheckPortTaken {
                service: object.clone(),
                port,
                holder,
            });
            return;
        }
        self.state.health_checks.insert(
            port,
            HealthCheck {
                namespace: object.namespace.clone(),
                name: object.name.clone(),
                local_endpoints: local_ready_endpoints(slices, &self.node),
            },
        );
    }

    /// The Service's external and load balancer addresses, parsed; one that is not an
    /// IPv4 address is reported and left out.
    fn service_addresses(
        &mut self,
        object: &ObjectRef,
        kind: ServiceKind,
        vip: Ipv4Addr,
        service: &Service,
        spec: &ServiceSpec,
        balancing: FrontendOptions,
    ) -> ServiceAddresses {
        let external_ips = spec.external_ips.iter().flatten().map(String::as_str);
        let external_ips = self.ipv4_values(object, ValueField::ExternalIp, external_ips);
        let ingress = service
            .status
            .as_ref()
            .and_then(|s| s.load_balancer.as_ref())
            .and_then(|lb| lb.ingress.as_ref())
            .into_iter()
            .flatten()
            .filter_map(|i| i.ip.as_deref());
        let load_balancer_ips = if kind == ServiceKind::LoadBalancer {
            self.ipv4_values(object, ValueField::LoadBalancerIngress, ingress)
        } else {
            Vec::new()
        };
        let ranges = spec
            .load_balancer_source_ranges
            .as_ref()
            .filter(|r| kind == ServiceKind::LoadBalancer && !r.is_empty());
        let source_ranges = ranges.map(|ranges| self.source_ranges(object, ranges));
        let local = |policy: Option<&String>| policy.is_some_and(|p| p == "Local");
        ServiceAddresses {
            kind,
            vip,
            external_ips,
            load_balancer_ips,
            external_local: local(spec.external_traffic_policy.as_ref()),
            internal_local: local(spec.internal_traffic_policy.as_ref()),
            distribution: Distribution::of(service),
            source_ranges,
            balancing,
        }
    }

    /// The IPv4 ranges of `ranges`, sorted; IPv6 ones cannot match an IPv4 client and are
    /// skipped, unparsable ones reported.
    fn source_ranges(&mut self, object: &ObjectRef, ranges: &[String]) -> Vec<Ipv4Net> {
        let mut parsed = BTreeSet::new();
        for range in ranges {
            match range.trim().parse::<IpNet>() {
                Ok(IpNet::V4(net)) => {
                    parsed.insert(net.trunc());
                }
                Ok(IpNet::V6(_)) => {}
                Err(_) => self.problem(Problem::ServiceValue {
                    service: object.clone(),
                    field: ValueField::SourceRange,
                    value: range.clone(),
                }),
            }
        }
        parsed.into_iter().collect()
    }

    /// `values` parsed as IPv4 addresses, sorted and deduplicated; the others reported.
    fn ipv4_values<'a>(
        &mut self,
        object: &ObjectRef,
        field: ValueField,
        values: impl Iterator<Item = &'a str>,
    ) -> Vec<Ipv4Addr> {
        let mut addresses = BTreeSet::new();
        for value in values {
            match value.parse::<Ipv4Addr>() {
                Ok(address) => {
                    addresses.insert(address);
                }
                Err(_) => self.problem(Problem::ServiceValue {
                    service: object.clone(),
                    field,
                    value: value.to_string(),
                }),
            }
        }
        addresses.into_iter().collect()
    }

    fn port(
        &mut self,
        object: &ObjectRef,
        addresses: &ServiceAddresses,
        port: &ServicePort,
        slices: &[&EndpointSlice],
    ) {
        let port_name = port.name.as_deref().unwrap_or("");
        let port_problem = |problem| Problem::ServicePort {
            service: object.clone(),
            port: ServicePortRef {
                name: port_name.to_string(),
                port: port.port,
            },
            problem,
        };
        let Some(proto) = protocol_number(port.protocol.as_ref()) else {
            let protocol = port.protocol.clone().unwrap_or_default();
            self.problem(port_problem(PortProblem::Protocol(protocol)));
            return;
        };
        let Some(number) = port_number(port.port) else {
            self.problem(port_problem(PortProblem::OutOfRange));
            return;
        };
        let mut frontends = vec![FrontendAt {
            frontend: FrontendKind::ClusterIP,
            address: addresses.vip,
            port: number,
        }];
        if matches!(
            addresses.kind,
            ServiceKind::NodePort | ServiceKind::LoadBalancer
        ) {
            match port.node_port {
                Some(node_port) => match port_number(node_port) {
                    Some(node_port) => {
                        frontends.extend(self.node_addresses.iter().map(|&address| FrontendAt {
                            frontend: FrontendKind::NodePort,
                            address,
                            port: node_port,
                        }))
                    }
                    None => self.problem(port_problem(PortProblem::NodePortOutOfRange(node_port))),
                },
                // A LoadBalancer may go without node ports (allocateLoadBalancerNodePorts).
                None if addresses.kind == ServiceKind::NodePort => {
                    self.problem(port_problem(PortProblem::NoNodePort))
                }
                None => {}
            }
        }
        let at = |frontend, ips: &[Ipv4Addr]| {
            ips.iter()
                .map(move |&address| FrontendAt {
                    frontend,
                    address,
                    port: number,
                })
                .collect::<Vec<_>>()
        };
        frontends.extend(at(FrontendKind::ExternalIP, &addresses.external_ips));
        frontends.extend(at(FrontendKind::LoadBalancer, &addresses.load_balancer_ips));

        let backends = backends_for(port_name, proto, slices, &mut self.problems);
        let mut programmed = false;
        for at in frontends {
            let key = Lb4Key::new(at.address, at.port, proto, 0);
            if let Some(holder) = self.frontend_owners.get(&key) {
                let problem =
                    if *holder == object_name(object) && at.frontend == FrontendKind::ClusterIP {
                        PortProblem::ListedTwice {
                            vip: at.address,
                            port: at.port,
                            proto,
                        }
                    } else {
                        PortProblem::FrontendTaken {
                            frontend: at.frontend,
                            address: at.address,
                            port: at.port,
                            proto,
                            holder: holder.clone(),
                        }
                    };
                self.problem(port_problem(problem));
                continue;
            }
            let place = Place {
                node: &self.node,
                zone: self.zone.as_deref(),
            };
            let cluster = slot_backends(&backends, Scope::Cluster(addresses.distribution, place));
            let local = addresses.local(at.frontend);
            // kube-proxy sends the node's own connections to an externalTrafficPolicy Local
            // frontend to any endpoint: those slots sit beside the local ones.
            let mut internal = (local && at.frontend.is_external()).then(|| cluster.clone());
            let mut slots = if local {
                slot_backends(&backends, Scope::Node(&self.node))
            } else {
                cluster
            };
            // Slots are numbered by u16; a longer list cannot be addressed.
            let longest = slots.len().max(internal.as_ref().map_or(0, Vec::len));
            if longest > usize::from(u16::MAX) {
                self.problem(port_problem(PortProblem::TooManyBackends {
                    count: longest,
                    used: u16::MAX,
                }));
                slots.truncate(usize::from(u16::MAX));
                if let Some(internal) = &mut internal {
                    internal.truncate(usize::from(u16::MAX));
                }
            }
            let slots = FrontendSlots { slots, internal };
            self.frontend(object, addresses, port_name, &at, proto, slots);
            programmed = true;
        }
        if programmed {
            self.backends(proto, &backends);
        }
    }

    /// Programs one frontend with its slots (at most `u16::MAX` each), its internal ones
    /// beside it in `LB4_SCOPE_INTERNAL`, and for a load balancer frontend the source
    /// ranges it admits.
    fn frontend(
        &mut self,
        object: &ObjectRef,
        addresses: &ServiceAddresses,
        port_name: &str,
        at: &FrontendAt,
        proto: u8,
        FrontendSlots { slots, internal }: FrontendSlots,
    ) {
        let local = addresses.local(at.frontend);
        let mut flags = at.frontend.flag() | if local { SVC_FLAG_LOCAL } else { 0 };
        if let Some(internal) = &internal {
            flags |= SVC_FLAG_TWO_SCOPES;
            self.slots(
                at,
                proto,
                LB4_SCOPE_INTERNAL,
                at.frontend.flag(),
                addresses,
                internal,
            );
        }
        if let (FrontendKind::LoadBalancer, Some(ranges)) = (at.frontend, &addresses.source_ranges)
        {
            flags |= SVC_FLAG_SOURCE_RANGES;
            for range in ranges {
                self.state.source_ranges.insert(
                    Lb4SourceRangeKey::new(
                        at.address,
                        at.port,
                        proto,
                        range.network(),
                        range.prefix_len(),
                    ),
                    SOURCE_RANGE_ALLOWED,
                );
            }
        }
        self.slots(at, proto, LB4_SCOPE_DEFAULT, flags, addresses, &slots);
        let key = Lb4Key::new(at.address, at.port, proto, 0);
        self.frontend_owners.insert(key, object_name(object));
        self.state.frontends.push(Frontend {
            service: object_name(object),
            port_name: port_name.to_string(),
            kind: addresses.kind,
            frontend: at.frontend,
            local,
            address: at.address,
            port: at.port,
            protocol: proto,
            backends: slots,
        });
    }

    /// The frontend (slot 0, with `flags`) of `at` in `scope` and its `slots`.
    fn slots(
        &mut self,
        at: &FrontendAt,
        proto: u8,
        scope: u8,
        flags: u16,
        addresses: &ServiceAddresses,
        slots: &[(Ipv4Addr, u16)],
    ) {
        let count = u16::try_from(slots.len()).unwrap_or(u16::MAX);
        let key = Lb4Key::new(at.address, at.port, proto, 0).in_scope(scope);
        for (slot, &(address, backend_port)) in (1..=count).zip(slots) {
            self.state.services.insert(
                Lb4Key { slot, ..key },
                Lb4Service::slot(address, backend_port),
            );
        }
        let options = addresses.balancing;
        balancing::insert_frontend(
            &mut self.state,
            &mut self.maglev_tables,
            key,
            options.frontend(count, flags),
            options,
            slots,
        );
    }

    /// Every backend of a programmed port that may take traffic: those in its slots, and
    /// the serving-terminating ones, whose established connections keep working.
    fn backends(&mut self, proto: u8, backends: &[SliceBackend]) {
        for backend in backends.iter().filter(|b| b.may_take_traffic()) {
            self.state.backends.insert(
                Lb4BackendKey::new(backend.address, backend.port, proto),
                Lb4Backend {
                    state: BACKEND_STATE_ACTIVE,
                    ..Lb4Backend::default()
                },
            );
        }
    }
}
