//! kube-proxy's rule sets, in the exact shapes its iptables and nftables proxiers write
//! (pkg/proxy/iptables and pkg/proxy/nftables, as their proxier tests expect them), for
//! services with one TCP port: ClusterIP, and LoadBalancer (a node port and a load
//! balancer IP besides, externalTrafficPolicy Cluster) when [`ServiceSpec::external`] is set.

use std::{fmt::Write, net::Ipv4Addr};

use sha2::{Digest, Sha256};

use crate::{BenchError, netns::NetNs};

/// One service with one TCP port named `http`.
#[derive(Clone, Debug)]
pub struct ServiceSpec {
    pub namespace: String,
    pub name: String,
    pub vip: Ipv4Addr,
    pub port: u16,
    pub target_port: u16,
    pub backends: Vec<Ipv4Addr>,
    /// None: a ClusterIP service; Some: a LoadBalancer one.
    pub external: Option<External>,
}

/// The frontends of a LoadBalancer service besides its ClusterIP, externalTrafficPolicy
/// Cluster: `node_port` on every node address, `load_balancer_ip` (its
/// `status.loadBalancer.ingress[0].ip`) on `port`.
#[derive(Clone, Copy, Debug)]
pub struct External {
    pub node_port: u16,
    pub load_balancer_ip: Ipv4Addr,
}

impl ServiceSpec {
    /// kube-proxy's ServicePortName: `ns/svc:port`.
    fn port_name(&self) -> String {
        format!("{}/{}:http", self.namespace, self.name)
    }
}

const BASE32: &[u8; 32] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";

/// base32 (standard alphabet) of sha256(`input`), first `len` characters, as kube-proxy
/// names its chains.
fn hash_name(input: &str, len: usize) -> String {
    let digest = Sha256::digest(input.as_bytes());
    let mut out = String::with_capacity(len);
    let (mut acc, mut bits) = (0u32, 0u32);
    for byte in digest.iter() {
        acc = (acc << 8) | u32::from(*byte);
        bits += 8;
        while bits >= 5 && out.len() < len {
            bits -= 5;
            out.push(char::from(BASE32[((acc >> bits) & 31) as usize]));
        }
        acc &= (1 << bits) - 1;
        if out.len() == len {
            break;
        }
    }
    out
}

pub fn svc_chain(s: &ServiceSpec) -> String {
    format!(
        "KUBE-SVC-{}",
        hash_name(&format!("{}tcp", s.port_name()), 16)
    )
}

/// The chain node ports and load balancer IPs jump to (same hash as the service chain).
pub fn ext_chain(s: &ServiceSpec) -> String {
    format!(
        "KUBE-EXT-{}",
        hash_name(&format!("{}tcp", s.port_name()), 16)
    )
}

fn sep_chain(s: &ServiceSpec, backend: Ipv4Addr) -> String {
    format!(
        "KUBE-SEP-{}",
        hash_name(
            &format!("{}tcp{backend}:{}", s.port_name(), s.target_port),
            16
        )
    )
}

/// The pod CIDR kube-proxy is told about (`--cluster-cidr`): traffic from outside it to a
/// ClusterIP is masqueraded.
pub const CLUSTER_CIDR: &str = "10.0.0.0/8";

/// `KUBE-SERVICES` rules of one service: its ClusterIP to `KUBE-SVC-*`, its load balancer
/// IP to `KUBE-EXT-*`.
fn services_rule(out: &mut String, s: &ServiceSpec) {
    let _ = writeln!(
        out,
        "-A KUBE-SERVICES -m comment --comment \"{} cluster IP\" -m tcp -p tcp -d {} --dport {} -j {}",
        s.port_name(),
        s.vip,
        s.port,
        svc_chain(s)
    );
    if let Some(ext) = &s.external {
        let _ = writeln!(
            out,
            "-A KUBE-SERVICES -m comment --comment \"{} loadbalancer IP\" -m tcp -p tcp -d {} --dport {} -j {}",
            s.port_name(),
            ext.load_balancer_ip,
            s.port,
            ext_chain(s)
        );
    }
}

/// The `KUBE-NODEPORTS` rule of one service, if it has a node port.
fn nodeports_rule(out: &mut String, s: &ServiceSpec) {
    if let Some(ext) = &s.external {
        let _ = writeln!(
            out,
            "-A KUBE-NODEPORTS -m comment --comment {} -m tcp -p tcp --dport {} -j {}",
            s.port_name(),
            ext.node_port,
            ext_chain(s)
        );
    }
}

fn service_chains(out: &mut String, s: &ServiceSpec) {
    let _ = writeln!(out, ":{} - [0:0]", svc_chain(s));
    if s.external.is_some() {
        let _ = writeln!(out, ":{} - [0:0]", ext_chain(s));
    }
    for b in &s.backends {
        let _ = writeln!(out, ":{} - [0:0]", sep_chain(s, *b));
    }
}

fn service_rules(out: &mut String, s: &ServiceSpec) {
    let svc = svc_chain(s);
    let pn = s.port_name();
    if s.external.is_some() {
        // externalTrafficPolicy Cluster: whatever arrives from outside is masqueraded.
        let ext = ext_chain(s);
        let _ = writeln!(
            out,
            "-A {ext} -m comment --comment \"masquerade traffic for {pn} external destinations\" -j KUBE-MARK-MASQ"
        );
        let _ = writeln!(out, "-A {ext} -j {svc}");
    }
    let _ = writeln!(
        out,
        "-A {svc} -m comment --comment \"{pn} cluster IP\" -m tcp -p tcp -d {} --dport {} ! -s {CLUSTER_CIDR} -j KUBE-MARK-MASQ",
        s.vip, s.port
    );
    let n = s.backends.len();
    for (i, b) in s.backends.iter().enumerate() {
        let sep = sep_chain(s, *b);
        let probability = if i + 1 < n {
            format!(
                " -m statistic --mode random --probability {:.10}",
                1.0 / (n - i) as f64
            )
        } else {
            String::new()
        };
        let _ = writeln!(
            out,
            "-A {svc} -m comment --comment \"{pn} -> {b}:{}\"{probability} -j {sep}",
            s.target_port
        );
    }
    for b in &s.backends {
        let sep = sep_chain(s, *b);
        let _ = writeln!(
            out,
            "-A {sep} -m comment --comment {pn} -s {b} -j KUBE-MARK-MASQ"
        );
        let _ = writeln!(
            out,
            "-A {sep} -m comment --comment {pn} -m tcp -p tcp -j DNAT --to-destination {b}:{}",
            s.target_port
        );
    }
}

const NODEPORTS_RULE: &str = "-A KUBE-SERVICES -m comment --comment \"kubernetes service nodeports; NOTE: this must be the last rule in this chain\" -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS\n";

/// The full `nat` table for `iptables-restore` (flush mode, as on kube-proxy's first sync).
pub fn iptables_full(services: &[ServiceSpec]) -> String {
    let mut out = String::with_capacity(services.len() * 1200 + 4096);
    out.push_str("*nat\n:PREROUTING ACCEPT [0:0]\n:INPUT ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n:POSTROUTING ACCEPT [0:0]\n");
    out.push_str(":KUBE-SERVICES - [0:0]\n:KUBE-NODEPORTS - [0:0]\n:KUBE-POSTROUTING - [0:0]\n:KUBE-MARK-MASQ - [0:0]\n");
    for s in services {
        service_chains(&mut out, s);
    }
    out.push_str(
        "-A PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n",
    );
    out.push_str(
        "-A OUTPUT -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n",
    );
    out.push_str("-A POSTROUTING -m comment --comment \"kubernetes postrouting rules\" -j KUBE-POSTROUTING\n");
    for s in services {
        services_rule(&mut out, s);
    }
    out.push_str(NODEPORTS_RULE);
    for s in services {
        nodeports_rule(&mut out, s);
    }
    for s in services {
        service_rules(&mut out, s);
    }
    out.push_str("-A KUBE-MARK-MASQ -j MARK --or-mark 0x4000\n");
    out.push_str("-A KUBE-POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN\n");
    out.push_str("-A KUBE-POSTROUTING -j MARK --xor-mark 0x4000\n");
    out.push_str("-A KUBE-POSTROUTING -m comment --comment \"kubernetes service traffic requiring SNAT\" -j MASQUERADE --random-fully\n");
    out.push_str("COMMIT\n");
    out
}

/// One added service the way kube-proxy syncs it since MinimizeIPTablesRestore
/// (`iptables-restore --noflush`): the changed `KUBE-SERVICES` chain in full (and
/// `KUBE-NODEPORTS` when the service has a node port), plus the new service's chains.
pub fn iptables_add(services: &[ServiceSpec], added: &ServiceSpec) -> String {
    let mut out = String::with_capacity(services.len() * 200 + 4096);
    out.push_str("*nat\n:KUBE-SERVICES - [0:0]\n");
    if added.external.is_some() {
        out.push_str(":KUBE-NODEPORTS - [0:0]\n");
    }
    service_chains(&mut out, added);
    let all = || services.iter().chain(std::iter::once(added));
    for s in all() {
        services_rule(&mut out, s);
    }
    out.push_str(NODEPORTS_RULE);
    if added.external.is_some() {
        for s in all() {
            nodeports_rule(&mut out, s);
        }
    }
    service_rules(&mut out, added);
    out.push_str("COMMIT\n");
    out
}

const NFT_TABLE: &str = "ip kube-proxy";

fn nft_service_chain(s: &ServiceSpec) -> String {
    let id = format!("{}/{}/tcp/http", s.namespace, s.name);
    format!("service-{}-{id}", hash_name(&id, 8))
}

fn nft_external_chain(s: &ServiceSpec) -> String {
    let id = format!("{}/{}/tcp/http", s.namespace, s.name);
    format!("external-{}-{id}", hash_name(&id, 8))
}

fn nft_endpoint_chain(s: &ServiceSpec, b: Ipv4Addr) -> String {
    let id = format!("{}/{}/tcp/http__{b}/{}", s.namespace, s.name, s.target_port);
    format!("endpoint-{}-{id}", hash_name(&id, 8))
}

/// The base chains, maps and dispatch rules of kube-proxy's nftables mode.
fn nft_base(out: &mut String) {
    let t = NFT_TABLE;
    let _ = writeln!(
        out,
        "add table {t} {{ comment \"rules for kube-proxy\" ; }}"
    );
    for line in [
        "add chain TABLE mark-for-masquerade",
        "add rule TABLE mark-for-masquerade mark set mark or 0x4000",
        "add chain TABLE masquerading",
        "add rule TABLE masquerading mark and 0x4000 == 0 return",
        "add rule TABLE masquerading mark set mark xor 0x4000",
        "add rule TABLE masquerading masquerade fully-random",
        "add set TABLE cluster-ips { type ipv4_addr ; comment \"Active ClusterIPs\" ; }",
        "add map TABLE service-ips { type ipv4_addr . inet_proto . inet_service : verdict ; comment \"ClusterIP, ExternalIP and LoadBalancer IP traffic\" ; }",
        "add set TABLE nodeport-ips { type ipv4_addr ; comment \"IPs that accept NodePort traffic\" ; }",
        "add map TABLE service-nodeports { type inet_proto . inet_service : verdict ; comment \"NodePort traffic\" ; }",
        "add map TABLE no-endpoint-services { type ipv4_addr . inet_proto . inet_service : verdict ; comment \"vmap to drop or reject packets to services with no endpoints\" ; }",
        "add chain TABLE services",
        "add rule TABLE services ip daddr . meta l4proto . th dport vmap @service-ips",
        "add rule TABLE services ip daddr @nodeport-ips meta l4proto . th dport vmap @service-nodeports",
        "add chain TABLE service-endpoints-check",
        "add rule TABLE service-endpoints-check ip daddr . meta l4proto . th dport vmap @no-endpoint-services",
        "add chain TABLE cluster-ips-check",
        "add rule TABLE cluster-ips-check ip daddr @cluster-ips reject comment \"Reject traffic to invalid ports of ClusterIPs\"",
        "add chain TABLE filter-prerouting { type filter hook prerouting priority -110 ; }",
        "add chain TABLE filter-forward { type filter hook forward priority -110 ; }",
        "add rule TABLE filter-forward ct state new jump service-endpoints-check",
        "add rule TABLE filter-forward ct state new jump cluster-ips-check",
        "add chain TABLE filter-output { type filter hook output priority -110 ; }",
        "add rule TABLE filter-output ct state new jump service-endpoints-check",
        "add rule TABLE filter-output ct state new jump cluster-ips-check",
        "add chain TABLE nat-prerouting { type nat hook prerouting priority -100 ; }",
        "add rule TABLE nat-prerouting jump services",
        "add chain TABLE nat-output { type nat hook output priority -100 ; }",
        "add rule TABLE nat-output jump services",
        "add chain TABLE nat-postrouting { type nat hook postrouting priority 100 ; }",
        "add rule TABLE nat-postrouting jump masquerading",
    ] {
        out.push_str(&line.replace("TABLE", t));
        out.push('\n');
    }
}

/// The chains, rules and map elements of one service. `counted` adds a `counter` rule at
/// the head of its service chain (not in kube-proxy's shape; it proves the measured
/// connections went through these rules and costs one rule per new connection).
fn nft_service(out: &mut String, s: &ServiceSpec, counted: bool) {
    let t = NFT_TABLE;
    let chain = nft_service_chain(s);
    let _ = writeln!(out, "add chain {t} {chain}");
    if counted {
        let _ = writeln!(out, "add rule {t} {chain} counter");
    }
    let _ = writeln!(
        out,
        "add rule {t} {chain} ip daddr {} ip saddr != {CLUSTER_CIDR} jump mark-for-masquerade",
        s.vip
    );
    let mut vmap = Vec::with_capacity(s.backends.len());
    for (i, b) in s.backends.iter().enumerate() {
        let ep = nft_endpoint_chain(s, *b);
        let _ = writeln!(out, "add chain {t} {ep}");
        let _ = writeln!(
            out,
            "add rule {t} {ep} ip saddr {b} jump mark-for-masquerade"
        );
        let _ = writeln!(
            out,
            "add rule {t} {ep} meta l4proto tcp dnat to {b}:{}",
            s.target_port
        );
        vmap.push(format!("{i} : goto {ep}"));
    }
    let _ = writeln!(
        out,
        "add rule {t} {chain} numgen random mod {} vmap {{ {} }}",
        s.backends.len(),
        vmap.join(" , ")
    );
    if s.external.is_some() {
        // externalTrafficPolicy Cluster: whatever arrives from outside is masqueraded.
        let ext = nft_external_chain(s);
        let _ = writeln!(out, "add chain {t} {ext}");
        let _ = writeln!(out, "add rule {t} {ext} jump mark-for-masquerade");
        let _ = writeln!(out, "add rule {t} {ext} goto {chain}");
    }
    let _ = writeln!(out, "add element {t} cluster-ips {{ {} }}", s.vip);
    let _ = writeln!(
        out,
        "add element {t} service-ips {{ {} . tcp . {} : goto {chain} }}",
        s.vip, s.port
    );
    if let Some(external) = &s.external {
        let ext = nft_external_chain(s);
        let _ = writeln!(
            out,
            "add element {t} service-ips {{ {} . tcp . {} : goto {ext} }}",
            external.load_balancer_ip, s.port
        );
        let _ = writeln!(
            out,
            "add element {t} service-nodeports {{ tcp . {} : goto {ext} }}",
            external.node_port
        );
    }
}

/// The whole ruleset for `nft -f`, the last service counted; node ports listen on
/// `node_addresses` (kube-proxy's `nodeport-ips`, from `--nodeport-addresses primary`).
pub fn nftables_full(services: &[ServiceSpec], node_addresses: &[Ipv4Addr]) -> String {
    let mut out = String::with_capacity(services.len() * 1000 + 4096);
    nft_base(&mut out);
    for address in node_addresses {
        let _ = writeln!(out, "add element {NFT_TABLE} nodeport-ips {{ {address} }}");
    }
    for (i, s) in services.iter().enumerate() {
        nft_service(&mut out, s, i + 1 == services.len());
    }
    out
}

/// One added service, one `nft -f` transaction, as kube-proxy's nftables mode syncs it.
pub fn nftables_add(added: &ServiceSpec) -> String {
    let mut out = String::new();
    nft_service(&mut out, added, false);
    out
}

/// The measured Service's counted chain as `nft list chain` prints it in `node`.
pub fn list_nft_counted_chain(node: &NetNs, s: &ServiceSpec) -> Result<String, BenchError> {
    node.exec(
        "nft",
        &["list", "chain", "ip", "kube-proxy", &nft_service_chain(s)],
    )
}

/// The packets counted by the first `counter` in `nft list chain` output.
pub fn parse_nft_counter(listing: &str) -> Option<u64> {
    let rest = listing.split("counter packets ").nth(1)?;
    rest.split_whitespace().next()?.parse().ok()
}

/// Packets that jumped to a `KUBE-SEP-*` chain, summed over `iptables -L <chain> -v -x -n`.
pub fn parse_iptables_sep_packets(listing: &str) -> u64 {
    parse_iptables_jump_packets(listing, "KUBE-SEP-")
}

/// Packets that jumped to a chain named `prefix...`, summed over `iptables -L <chain> -v -x -n`.
pub fn parse_iptables_jump_packets(listing: &str, prefix: &str) -> u64 {
    listing
        .lines()
        .filter_map(|line| {
            let mut cols = line.split_whitespace();
            let pkts = cols.next()?.parse::<u64>().ok()?;
            let _bytes = cols.next()?;
            let target = cols.next()?;
            target.starts_with(prefix).then_some(pkts)
        })
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chain_names_match_kube_proxy_fixtures() {
        assert_eq!(hash_name("ns1/svc1:p80tcp", 16), "XPGD46QRK7WJZT7O");
        assert_eq!(
            hash_name("ns1/svc1:p80tcp10.180.0.1:80", 16),
            "SXIVWICOYRO3J4NJ"
        );
        assert_eq!(hash_name("ns1/svc1/tcp/p80", 8), "ULMVA6XW");
        assert_eq!(hash_name("ns1/svc1/tcp/p80__10.180.0.1/80", 8), "5OJB2KTY");
    }

    #[test]
    fn probabilities_as_kube_proxy_formats_them() {
        let s = ServiceSpec {
            namespace: "ns1".into(),
            name: "svc1".into(),
            vip: Ipv4Addr::new(172, 30, 0, 41),
            port: 80,
            target_port: 80,
            backends: vec![
                Ipv4Addr::new(10, 180, 0, 1),
                Ipv4Addr::new(10, 180, 0, 2),
                Ipv4Addr::new(10, 180, 0, 3),
            ],
            external: None,
        };
        let rules = iptables_full(std::slice::from_ref(&s));
        assert!(rules.contains("--probability 0.3333333333 -j KUBE-SEP-"));
        assert!(rules.contains("--probability 0.5000000000 -j KUBE-SEP-"));
        let nft = nftables_full(&[s], &[]);
        assert!(nft.contains("numgen random mod 3 vmap { 0 : goto endpoint-"));
    }

    #[test]
    fn load_balancer_services_get_node_port_and_load_balancer_rules() {
        let s = ServiceSpec {
            namespace: "ns2".into(),
            name: "svc2".into(),
            vip: Ipv4Addr::new(172, 30, 0, 42),
            port: 80,
            target_port: 80,
            backends: vec![Ipv4Addr::new(10, 180, 0, 2)],
            external: Some(External {
                node_port: 3001,
                load_balancer_ip: Ipv4Addr::new(1, 2, 3, 4),
            }),
        };
        let ext = ext_chain(&s);
        assert_eq!(&ext[9..], &svc_chain(&s)[9..], "KUBE-EXT-* shares the hash");
        let rules = iptables_full(std::slice::from_ref(&s));
        for line in [
            format!(
                "-A KUBE-NODEPORTS -m comment --comment ns2/svc2:http -m tcp -p tcp --dport 3001 -j {ext}"
            ),
            format!(
                "-A KUBE-SERVICES -m comment --comment \"ns2/svc2:http loadbalancer IP\" -m tcp -p tcp -d 1.2.3.4 --dport 80 -j {ext}"
            ),
            format!("-A {ext} -j {}", svc_chain(&s)),
        ] {
            assert!(rules.contains(&line), "{line} in\n{rules}");
        }
        let nft = nftables_full(&[s], &[Ipv4Addr::new(192, 168, 0, 2)]);
        for line in [
            "add element ip kube-proxy nodeport-ips { 192.168.0.2 }",
            "add rule ip kube-proxy external-WYWTN2IK-ns2/svc2/tcp/http goto service-WYWTN2IK-ns2/svc2/tcp/http",
            "add element ip kube-proxy service-ips { 1.2.3.4 . tcp . 80 : goto external-WYWTN2IK-ns2/svc2/tcp/http }",
            "add element ip kube-proxy service-nodeports { tcp . 3001 : goto external-WYWTN2IK-ns2/svc2/tcp/http }",
        ] {
            assert!(nft.contains(line), "{line} in\n{nft}");
        }
    }

    #[test]
    fn counters_parse() {
        assert_eq!(
            parse_nft_counter("chain x {\n\t\tcounter packets 42 bytes 2520\n}"),
            Some(42)
        );
        let listing = "Chain KUBE-SVC-X (1 references)\n    pkts      bytes target     prot opt in     out     source               destination\n       0        0 KUBE-MARK-MASQ  6    --  *      *      !10.0.0.0/8           10.100.0.10          tcp dpt:80\n       5      300 KUBE-SEP-A  0    --  *      *       0.0.0.0/0            0.0.0.0/0\n       7      420 KUBE-SEP-B  0    --  *      *       0.0.0.0/0            0.0.0.0/0\n";
        assert_eq!(parse_iptables_sep_packets(listing), 12);
    }
}
