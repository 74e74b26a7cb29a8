//! The plugin binary run as a runtime runs it, against a node namespace with a real agent
//! and pod namespaces the test creates: ADD (result checked), CHECK, DEL twice, STATUS,
//! VERSION, GC, an agent restart that keeps the allocations, and every error case with its
//! code (needs root and bpffs; never skipped).

#![allow(clippy::expect_used, clippy::unwrap_used, reason = "test")]

mod support;

use std::net::Ipv4Addr;

use serde_json::{Value, json};
use sluice_api::cni::CniAttachment;
use sluice_cni::host_interface;
use sluice_netns::{NetNs, Netlink, OwnedNetNs};
use support::{Node, ROUTER, net_conf, pod, pod_args, snapshot, vars};

/// ADD is refused after this long when the Pod object never shows up.
const ADD_TIMEOUT: &str = "3";

fn has_link(node: &Node, name: &str) -> bool {
    node.netns.netlink().and_then(|nl| nl.index(name)).is_ok()
}

#[test]
fn add_check_del_status_version_and_every_error() {
    let objects = json!({"pods": [pod("web", "web", None), pod("api", "api", None)]});
    let mut node = Node::start(
        "cni-ops",
        &snapshot(1, objects),
        &["--cni-add-timeout", ADD_TIMEOUT],
    );
    let conf = net_conf("1.0.0", &node.socket).to_string();
    let web_ns = OwnedNetNs::unique("sluice-test-cni-web-").unwrap();
    let web_path = web_ns.path().display().to_string();
    let web_args = pod_args("default", "web");
    let web = vars("ADD", "c0ffee01", &web_path, &web_args);

    status_and_version(&node);

    // ADD: the result as the spec shapes it, the wiring in the kernel, the endpoint policed.
    let add = node.plugin(&web, &conf);
    let result = add.result();
    println!("CNI ADD result: {result}");
    let host = host_interface("c0ffee01", "eth0");
    check_add_result(&node, &result, &web_ns, &host);
    println!("CNI ADD took {:?}", add.elapsed);

    // CHECK, with ADD's result as prevResult.
    let mut check_conf = net_conf("1.0.0", &node.socket);
    check_conf["prevResult"] = result.clone();
    let check = node.plugin(
        &vars("CHECK", "c0ffee01", &web_path, &web_args),
        &check_conf.to_string(),
    );
    assert!(check.success, "{}", check.stdout);

    // An agent restart keeps the registry: the pod stays policed, the address stays taken.
    node.restart_agent(&["--cni-add-timeout", ADD_TIMEOUT]);
    let check = node.plugin(
        &vars("CHECK", "c0ffee01", &web_path, &web_args),
        &check_conf.to_string(),
    );
    assert!(check.success, "{}", check.stdout);
    let api_ns = OwnedNetNs::unique("sluice-test-cni-api-").unwrap();
    let api_path = api_ns.path().display().to_string();
    let api_args = pod_args("default", "api");
    let api = node
        .plugin(&vars("ADD", "c0ffee02", &api_path, &api_args), &conf)
        .result();
    assert_eq!(api["ips"][0]["address"], "10.244.7.3/32");

    errors(&node, &conf, &web_path, &web_args);

    gc(&node, &host);
    waits_for_the_pod(&node, &conf);

    // DEL twice; then DEL of a container never added, and DEL after the netns is gone.
    for _ in 0..2 {
        let del = node.plugin(&vars("DEL", "c0ffee01", &web_path, &web_args), &conf);
        assert!(del.success, "{}", del.stdout);
        assert_eq!(del.stdout, "");
    }
    assert!(!has_link(&node, &host));
    assert!(node.client().cni_check(&attachment("c0ffee01")).is_err());
    let never = node.plugin(&vars("DEL", "deadbeef", "", ""), &conf);
    assert!(never.success, "{}", never.stdout);
    drop(api_ns);
    let gone = node.plugin(&vars("DEL", "c0ffee02", &api_path, &api_args), &conf);
    assert!(gone.success, "{}", gone.stdout);
    assert!(!has_link(&node, &host_interface("c0ffee02", "eth0")));
    let status = node.client().cni_status().unwrap();
    assert_eq!(status.allocated, 0, "{status:?}");
    assert!(status.ready);
    // The freed address is handed out again.
    let again = node.plugin(&web, &conf).result();
    assert_eq!(again["ips"][0]["address"], "10.244.7.2/32");
    assert!(
        node.plugin(&vars("DEL", "c0ffee01", &web_path, &web_args), &conf)
            .success
    );
    // Every link the plugin made is gone but the router's.
    let left: Vec<String> = node
        .netns
        .netlink()
        .and_then(|nl: Netlink| nl.links())
        .unwrap()
        .into_iter()
        .map(|l| l.name)
        .filter(|n| n.starts_with("lxc"))
        .collect();
    assert!(left.is_empty(), "{left:?}");
}

/// STATUS succeeds silently once the agent realized a pass; VERSION lists 1.0.0 and 1.1.0.
fn status_and_version(node: &Node) {
    let status = node.plugin(
        &vars("STATUS", "", "", ""),
        &net_conf("1.1.0", &node.socket).to_string(),
    );
    assert!(status.success, "{} {}", status.stdout, status.stderr);
    assert_eq!(status.stdout, "");
    let version = node.plugin(&[("CNI_COMMAND", "VERSION")], r#"{"cniVersion":"1.0.0"}"#);
    assert_eq!(
        version.result(),
        json!({"cniVersion": "1.0.0", "supportedVersions": ["1.0.0", "1.1.0"]})
    );
}

/// ADD's result as the spec shapes it, the wiring in the kernel, the endpoint policed.
fn check_add_result(node: &Node, result: &Value, web_ns: &NetNs, host: &str) {
    let web_path = web_ns.path().display().to_string();
    assert_eq!(result["cniVersion"], "1.0.0");
    assert_eq!(result["interfaces"][0]["name"], host);
    assert!(result["interfaces"][0].get("sandbox").is_none());
    assert_eq!(result["interfaces"][1]["name"], "eth0");
    assert_eq!(result["interfaces"][1]["sandbox"], web_path.as_str());
    assert!(
        result["interfaces"][1]["mac"]
            .as_str()
            .is_some_and(|m| m.len() == 17)
    );
    assert_eq!(
        result["ips"],
        json!([{"address": "10.244.7.2/32", "gateway": ROUTER, "interface": 1}])
    );
    assert_eq!(
        result["routes"],
        json!([{"dst": "0.0.0.0/0", "gw": ROUTER}])
    );
    assert_eq!(result["dns"], json!({}));
    assert!(has_link(node, host));
    assert!(has_link(node, sluice_netns::ROUTER_INTERFACE));
    let inside = web_ns.netlink().unwrap();
    let addresses = inside.addresses("eth0").unwrap();
    assert!(
        addresses.contains(&"10.244.7.2/32".parse().unwrap()),
        "{addresses:?}"
    );
    let endpoint = node.client().endpoint("default/web").unwrap();
    assert_eq!(endpoint.interface, host);
    assert_eq!(endpoint.ipv4, Ipv4Addr::new(10, 244, 7, 2));
}

/// GC with only web (c0ffee01) valid removes api (c0ffee02); without its list it refuses.
fn gc(node: &Node, host: &str) {
    // GC with only web valid: api's veth and record go, web's stay.
    let mut gc_conf = net_conf("1.1.0", &node.socket);
    gc_conf["cni.dev/valid-attachments"] = json!([{"containerID": "c0ffee01", "ifname": "eth0"}]);
    gc_conf["cni.dev/attachments"] = gc_conf["cni.dev/valid-attachments"].clone();
    let gc = node.plugin(
        &[("CNI_COMMAND", "GC"), ("CNI_PATH", "/opt/cni/bin")],
        &gc_conf.to_string(),
    );
    assert!(gc.success, "{}", gc.stdout);
    assert_eq!(gc.stdout, "");
    assert!(!has_link(node, &host_interface("c0ffee02", "eth0")));
    assert!(has_link(node, host));
    let kept: Vec<_> = node
        .client()
        .cni_endpoints()
        .unwrap()
        .into_iter()
        .map(|e| e.attachment)
        .collect();
    assert_eq!(kept, [attachment("c0ffee01")]);

    // GC without its list would remove everything: refused.
    let no_list = node.plugin(
        &[("CNI_COMMAND", "GC")],
        &net_conf("1.1.0", &node.socket).to_string(),
    );
    assert_eq!(no_list.error_code(), 7);
    assert!(has_link(node, host));
}

/// A Pod the source never knows is refused once the wait runs out, leaving nothing; one
/// that shows up while ADD waits is attached.
fn waits_for_the_pod(node: &Node, conf: &str) {
    // A pod the source does not know: refused once the wait runs out, nothing left behind.
    let ghost_ns = OwnedNetNs::unique("sluice-test-cni-ghost-").unwrap();
    let ghost_path = ghost_ns.path().display().to_string();
    let ghost_args = pod_args("default", "ghost");
    let ghost = node.plugin(&vars("ADD", "c0ffee03", &ghost_path, &ghost_args), conf);
    assert_eq!(ghost.error_code(), 11, "{}", ghost.stdout);
    assert!(
        ghost.stdout.contains("Pod default/ghost"),
        "{}",
        ghost.stdout
    );
    assert!(!has_link(node, &host_interface("c0ffee03", "eth0")));
    assert!(node.client().cni_check(&attachment("c0ffee03")).is_err());

    // A Pod that shows up while ADD waits (a watch a little behind the kubelet): ADD
    // returns once it is known and its endpoint realized.
    let late_ns = OwnedNetNs::unique("sluice-test-cni-late-").unwrap();
    let late_path = late_ns.path().display().to_string();
    let late_args = pod_args("default", "late");
    let late = std::thread::scope(|scope| {
        let adding =
            scope.spawn(|| node.plugin(&vars("ADD", "c0ffee04", &late_path, &late_args), conf));
        // Once the agent holds the attachment, ADD is waiting for the Pod.
        while !node
            .client()
            .cni_endpoints()
            .unwrap()
            .iter()
            .any(|e| e.attachment == attachment("c0ffee04"))
        {
            assert!(!adding.is_finished(), "ADD ended before the Pod existed");
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        let pods = json!({"pods": [pod("web", "web", None), pod("api", "api", None), pod("late", "late", None)]});
        snapshot(2, pods).write_file(node.cluster_file()).unwrap();
        adding.join().unwrap()
    });
    let late = late.result();
    // .3 is free again: GC released it.
    assert_eq!(late["ips"][0]["address"], "10.244.7.3/32", "{late}");
    assert!(node.client().endpoint("default/late").is_ok());
    assert!(
        node.plugin(&vars("DEL", "c0ffee04", &late_path, &late_args), conf)
            .success
    );
}

fn attachment(container_id: &str) -> CniAttachment {
    CniAttachment {
        container_id: container_id.into(),
        ifname: "eth0".into(),
    }
}

/// Every error case, with the spec's code.
fn errors(node: &Node, conf: &str, netns: &str, args: &str) {
    let add = |container: &'static str| vars("ADD", container, netns, args);
    let code = |vars: &[(&str, &str)], stdin: &str| node.plugin(vars, stdin).error_code();
    let with = |key: &str, value: Value| {
        let mut conf: Value = serde_json::from_str(conf).unwrap();
        conf[key] = value;
        conf.to_string()
    };
    // 6: the configuration is no JSON (or lacks a required field).
    assert_eq!(code(&add("e1"), "{not json"), 6);
    assert_eq!(
        code(&add("e1"), r#"{"cniVersion":"1.0.0","type":"sluice-cni"}"#),
        6
    );
    // 7: a configuration this plugin cannot use.
    assert_eq!(code(&add("e1"), &with("name", json!(""))), 7);
    assert_eq!(code(&add("e1"), &with("type", json!("bridge"))), 7);
    // 1: a version it does not speak.
    assert_eq!(code(&add("e1"), &with("cniVersion", json!("0.2.0"))), 1);
    // 4: missing or unknown variables.
    assert_eq!(code(&[], conf), 4);
    assert_eq!(code(&[("CNI_COMMAND", "FROB")], conf), 4);
    for missing in ["CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME", "CNI_ARGS"] {
        let vars: Vec<_> = add("e1")
            .into_iter()
            .filter(|(k, _)| *k != missing)
            .collect();
        assert_eq!(code(&vars, conf), 4, "without {missing}");
    }
    let no_pod = vars(
        "ADD",
        "e1",
        netns,
        "IgnoreUnknown=1;K8S_POD_NAMESPACE=default",
    );
    assert_eq!(code(&no_pod, conf), 4);
    // 3: the namespace does not exist; CHECK of a container the agent does not know.
    assert_eq!(
        code(
            &vars("ADD", "e1", "/run/netns/sluice-test-no-such", args),
            conf
        ),
        3
    );
    assert_eq!(code(&vars("CHECK", "e1", netns, args), conf), 3);
    // 11: the agent cannot be reached; STATUS then answers 50.
    let away = with("agentSocket", json!("/run/sluice-test-no-agent.sock"));
    assert_eq!(code(&add("e1"), &away), 11);
    assert_eq!(code(&vars("DEL", "e1", netns, args), &away), 11);
    assert_eq!(code(&[("CNI_COMMAND", "STATUS")], &away), 50);
    // None of them left anything behind.
    assert!(!has_link(node, &host_interface("e1", "eth0")));
    assert_eq!(node.client().cni_status().unwrap().allocated, 2);
}

/// In tunnel mode the agent gives the pod the underlay's MTU less VXLAN's 50 bytes, on both
/// ends of its veth.
#[test]
fn a_pod_of_a_tunnel_node_gets_the_underlay_mtu_less_the_tunnel_overhead() {
    let objects = json!({"pods": [pod("web", "web", None)]});
    let node = Node::start_with(
        "cni-mtu",
        &snapshot(1, objects),
        &["--routing-mode", "tunnel", "--underlay-device", "underlay0"],
        |netns| {
            let nl = netns.netlink().unwrap();
            nl.add_veth("underlay0", "underlay1", None).unwrap();
            nl.set_mtu("underlay0", 1400).unwrap();
            nl.add_address("underlay0", "172.16.7.1/24".parse().unwrap())
                .unwrap();
            nl.set_up("underlay1").unwrap();
            nl.set_up("underlay0").unwrap();
        },
    );
    let conf = net_conf("1.0.0", &node.socket).to_string();
    let web_ns = OwnedNetNs::unique("sluice-test-cni-mtu-").unwrap();
    let web_path = web_ns.path().display().to_string();
    let args = pod_args("default", "web");
    node.plugin(&vars("ADD", "c0ffee11", &web_path, &args), &conf)
        .result();
    assert_eq!(web_ns.netlink().unwrap().mtu("eth0").unwrap(), 1350);
    let host = host_interface("c0ffee11", "eth0");
    assert_eq!(node.netns.netlink().unwrap().mtu(&host).unwrap(), 1350);
    assert!(
        node.plugin(&vars("DEL", "c0ffee11", &web_path, &args), &conf)
            .success
    );
}
