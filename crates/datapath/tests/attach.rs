//! Attaching to a veth in a namespace created by the test (needs root; never skipped).

mod support;

use std::collections::BTreeSet;

use aya::programs::{SchedClassifier, TcAttachType};
use sluice_common::programs;
use sluice_datapath::{AttachRole, Datapath, DatapathConfig};
use support::{NetNs, PinDir};

/// Names of the tcx programs on `ifname` for `attach_type`, in the current netns.
fn tcx_programs(ifname: &str, attach_type: TcAttachType) -> Vec<String> {
    let (_, programs) = SchedClassifier::query_tcx(ifname, attach_type)
        .unwrap_or_else(|err| panic!("query_tcx {ifname}: {err}"));
    programs
        .iter()
        .map(|p| p.name_as_str().unwrap_or("?").to_owned())
        .collect()
}

fn tcx_program_ids(ifname: &str, attach_type: TcAttachType) -> Vec<u32> {
    let (_, programs) = SchedClassifier::query_tcx(ifname, attach_type)
        .unwrap_or_else(|err| panic!("query_tcx {ifname}: {err}"));
    programs.iter().map(|p| p.id()).collect()
}

#[test]
fn attach_detach_and_restart_swap() {
    let netns = NetNs::new();
    let links = netns.netlink();
    links.add_veth("lxc0", "eth0", None).unwrap();
    links.set_up("lxc0").unwrap();
    links.set_up("eth0").unwrap();
    let pins = PinDir::unique("sluice-test-");
    let pin_dir = pins.path().to_owned();

    netns.run(move || {
        let config = DatapathConfig::default();
        let mut first = Datapath::load(&pin_dir, &config).expect("load");
        first.attach(AttachRole::PodVeth, "lxc0").expect("attach");
        assert_eq!(
            tcx_programs("lxc0", TcAttachType::Ingress),
            [programs::FROM_CONTAINER]
        );
        assert_eq!(
            tcx_programs("lxc0", TcAttachType::Egress),
            [programs::TO_CONTAINER]
        );
        assert_eq!(
            first.attached(AttachRole::PodVeth).unwrap(),
            BTreeSet::from(["lxc0".to_owned()])
        );
        // Attaching again is idempotent: still one program per direction.
        first
            .attach(AttachRole::PodVeth, "lxc0")
            .expect("attach again");
        assert_eq!(tcx_programs("lxc0", TcAttachType::Ingress).len(), 1);
        assert!(first.runs(AttachRole::PodVeth, "lxc0"));
        let old_ids = tcx_program_ids("lxc0", TcAttachType::Ingress);

        // The agent exits: pinned links keep the programs attached.
        drop(first);
        assert_eq!(tcx_program_ids("lxc0", TcAttachType::Ingress), old_ids);

        // A restarted agent swaps its own programs into the pinned links.
        let mut second = Datapath::load(&pin_dir, &config).expect("reload");
        // The old load's programs, of the same names, are not this load's.
        assert!(!second.runs(AttachRole::PodVeth, "lxc0"));
        second
            .attach(AttachRole::PodVeth, "lxc0")
            .expect("attach after restart");
        let new_ids = tcx_program_ids("lxc0", TcAttachType::Ingress);
        assert_eq!(new_ids.len(), 1);
        assert_ne!(new_ids, old_ids, "the new program replaced the old one");
        assert!(second.runs(AttachRole::PodVeth, "lxc0"));
        assert_eq!(
            tcx_programs("lxc0", TcAttachType::Egress),
            [programs::TO_CONTAINER]
        );

        second.detach(AttachRole::PodVeth, "lxc0").expect("detach");
        assert!(tcx_programs("lxc0", TcAttachType::Ingress).is_empty());
        assert!(tcx_programs("lxc0", TcAttachType::Egress).is_empty());
        assert!(second.attached(AttachRole::PodVeth).unwrap().is_empty());
        // Detaching what is not attached is fine.
        second
            .detach(AttachRole::PodVeth, "lxc0")
            .expect("detach again");
    });
}

#[test]
fn interface_gone_and_recreated() {
    let netns = NetNs::new();
    let links = netns.netlink();
    links.add_veth("lxc1", "eth1", None).unwrap();
    let pins = PinDir::unique("sluice-test-");
    let pin_dir = pins.path().to_owned();

    netns.run(move || {
        let mut datapath = Datapath::load(&pin_dir, &DatapathConfig::default()).expect("load");
        datapath
            .attach(AttachRole::PodVeth, "lxc1")
            .expect("attach");
        links.delete_link("lxc1").unwrap();
        // A pod replaced by one whose veth has the same name: the defunct pinned link is
        // replaced by a new one.
        links.add_veth("lxc1", "eth1", None).unwrap();
        datapath
            .attach(AttachRole::PodVeth, "lxc1")
            .expect("attach to the new interface");
        assert_eq!(
            tcx_programs("lxc1", TcAttachType::Ingress),
            [programs::FROM_CONTAINER]
        );
        links.delete_link("lxc1").unwrap();
        datapath
            .detach(AttachRole::PodVeth, "lxc1")
            .expect("detach after the interface is gone");
        assert!(datapath.attached(AttachRole::PodVeth).unwrap().is_empty());
    });
}

#[test]
fn bad_interface_names_are_refused() {
    let pins = PinDir::unique("sluice-test-");
    let mut datapath = Datapath::load(pins.path(), &DatapathConfig::default()).expect("load");
    for name in ["", "..", "a/b", "eth0.100", "name-that-is-too-long"] {
        assert!(
            datapath.attach(AttachRole::PodVeth, name).is_err(),
            "{name:?}"
        );
        assert!(
            datapath.detach(AttachRole::PodVeth, name).is_err(),
            "{name:?}"
        );
    }
}

#[test]
fn links_are_pinned_by_role_and_an_older_agents_links_are_adopted() {
    let netns = NetNs::new();
    netns.netlink().add_veth("lxc2", "eth2", None).unwrap();
    let pins = PinDir::unique("sluice-test-");
    let pin_dir = pins.path().to_owned();

    netns.run(move || {
        let links = pin_dir.join("links");
        let mut first = Datapath::load(&pin_dir, &DatapathConfig::default()).expect("load");
        first.attach(AttachRole::PodVeth, "lxc2").expect("attach");
        for suffix in ["ingress", "egress"] {
            assert!(links.join("pod").join(format!("lxc2_{suffix}")).exists());
        }
        let old_ids = tcx_program_ids("lxc2", TcAttachType::Ingress);
        // An agent from before per-role directories pinned its links straight under links/.
        for suffix in ["ingress", "egress"] {
            let name = format!("lxc2_{suffix}");
            std::fs::rename(links.join("pod").join(&name), links.join(&name)).expect("rename");
        }
        drop(first);

        let mut second = Datapath::load(&pin_dir, &DatapathConfig::default()).expect("reload");
        assert_eq!(
            second.attached(AttachRole::PodVeth).unwrap(),
            BTreeSet::from(["lxc2".to_owned()])
        );
        second.attach(AttachRole::PodVeth, "lxc2").expect("attach");
        // Swapped into the adopted link: one program, a new one.
        let new_ids = tcx_program_ids("lxc2", TcAttachType::Ingress);
        assert_eq!(new_ids.len(), 1);
        assert_ne!(new_ids, old_ids);
        assert_eq!(tcx_programs("lxc2", TcAttachType::Egress).len(), 1);
        assert!(!links.join("lxc2_ingress").exists());
        second.detach(AttachRole::PodVeth, "lxc2").expect("detach");
        assert!(tcx_programs("lxc2", TcAttachType::Ingress).is_empty());
    });
}
