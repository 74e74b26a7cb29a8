//! Every program of the datapath, declared once with the role of what it attaches to and
//! its hook. The loader loads every program here and attaches a role's programs together;
//! a program for an existing hook kind is one more entry in [`PROGRAMS`].
//!
//! Links are pinned per role, as `<pin_dir>/links/<role>/<target>_<suffix>`; bpffs reserves
//! names containing a dot, so targets with a dot are refused.

use aya::programs::TcAttachType;
use sluice_common::programs::{
    FROM_CONTAINER, FROM_NETDEV, FROM_TUNNEL, POD4_CONNECT, POD4_GETPEERNAME, POD4_RECVMSG,
    POD4_SENDMSG, SOCK4_CONNECT, SOCK4_GETPEERNAME, SOCK4_RECVMSG, SOCK4_SENDMSG, TO_CONTAINER,
    TO_NETDEV, TO_TUNNEL,
};

/// What a group of programs is attached to: the pod's host-side veth, the node's tunnel
/// device and its underlay device, the cgroup of the node's own processes and the parent
/// cgroup of the node's pods.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum AttachRole {
    /// The host side of a pod's veth pair, one per local endpoint.
    PodVeth,
    /// The node's collect-metadata VXLAN device (tunnel routing mode).
    TunnelDevice,
    /// The node's underlay device, toward the other nodes and the world.
    Netdev,
    /// The cgroup holding the node's own processes (socket load balancing); its one
    /// target is [`HOST_CGROUP_TARGET`].
    HostCgroup,
    /// The parent of the node's pods' cgroups (socket load balancing for pods); its one
    /// target is [`POD_CGROUP_TARGET`].
    PodCgroup,
}

/// The name the host cgroup's links are pinned under, whatever the cgroup's path.
pub const HOST_CGROUP_TARGET: &str = "host";
/// The name the pods' cgroup's links are pinned under, whatever the cgroup's path.
pub const POD_CGROUP_TARGET: &str = "pods";

impl AttachRole {
    pub const ALL: [AttachRole; 5] = [
        AttachRole::PodVeth,
        AttachRole::TunnelDevice,
        AttachRole::Netdev,
        AttachRole::HostCgroup,
        AttachRole::PodCgroup,
    ];

    /// For a cgroup role, the one target its links are pinned under.
    pub const fn cgroup_target(self) -> Option<&'static str> {
        match self {
            AttachRole::HostCgroup => Some(HOST_CGROUP_TARGET),
            AttachRole::PodCgroup => Some(POD_CGROUP_TARGET),
            AttachRole::PodVeth | AttachRole::TunnelDevice | AttachRole::Netdev => None,
        }
    }

    /// The directory under `<pin_dir>/links/` holding this role's pinned links.
    pub const fn pin_dir_name(self) -> &'static str {
        match self {
            AttachRole::PodVeth => "pod",
            AttachRole::TunnelDevice => "tunnel",
            AttachRole::Netdev => "netdev",
            AttachRole::HostCgroup | AttachRole::PodCgroup => "cgroup",
        }
    }

    /// The programs attached for this role.
    pub fn programs(self) -> impl Iterator<Item = &'static ProgramDef> {
        PROGRAMS.iter().filter(move |p| p.role == self)
    }
}

/// Where a program is attached: the program type the loader loads it as, and the hook.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Hook {
    /// A tc classifier on a tcx hook of an interface.
    Tcx(TcAttachType),
    /// A cgroup socket address hook; the program's section names which one
    /// (`cgroup/connect4`...), as aya takes the attach type from it, and so does the link
    /// suffix.
    CgroupSockAddr,
}

/// The compiled objects, one per C file of `bpf/` (one file per attach point). They share
/// every map through the pins.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Object {
    /// `bpf/lxc.c`: the pod's veth.
    Lxc,
    /// `bpf/tunnel.c`: the node's tunnel device.
    Tunnel,
    /// `bpf/host.c`: the node's underlay device.
    Host,
    /// `bpf/sock.c`: the node's cgroup and its pods' cgroup.
    Sock,
}

impl Object {
    pub const ALL: [Object; 4] = [Object::Lxc, Object::Tunnel, Object::Host, Object::Sock];

    /// The object's ELF bytes, embedded at build time.
    pub fn bytes(self) -> &'static [u8] {
        match self {
            Object::Lxc => LXC_OBJECT,
            Object::Tunnel => TUNNEL_OBJECT,
            Object::Host => HOST_OBJECT,
            Object::Sock => SOCK_OBJECT,
        }
    }
}

/// Which build of the objects to load: today's map layout, or the previous one
/// (`-DSLUICE_LAYOUT_V1`, see `sluice_common::migrations`) that the upgrade test runs as
/// the datapath an agent of that layout left behind.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ObjectBuild {
    #[default]
    Current,
    LayoutV1,
}

impl ObjectBuild {
    /// The ELF bytes of `object` in this build.
    pub fn bytes(self, object: Object) -> &'static [u8] {
        match (self, object) {
            (ObjectBuild::Current, object) => object.bytes(),
            (ObjectBuild::LayoutV1, Object::Lxc) => LXC_OBJECT_V1,
            (ObjectBuild::LayoutV1, Object::Tunnel) => TUNNEL_OBJECT_V1,
            (ObjectBuild::LayoutV1, Object::Host) => HOST_OBJECT_V1,
            (ObjectBuild::LayoutV1, Object::Sock) => SOCK_OBJECT_V1,
        }
    }
}

static LXC_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/lxc.o"));
static TUNNEL_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/tunnel.o"));
static HOST_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/host.o"));
static SOCK_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/sock.o"));
static LXC_OBJECT_V1: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/layout-v1/lxc.o"));
static TUNNEL_OBJECT_V1: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/layout-v1/tunnel.o"));
static HOST_OBJECT_V1: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/layout-v1/host.o"));
static SOCK_OBJECT_V1: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/layout-v1/sock.o"));

/// One program of a C object.
#[derive(Clone, Copy, Debug)]
pub struct ProgramDef {
    /// The function name in the object.
    pub name: &'static str,
    pub object: Object,
    pub role: AttachRole,
    pub hook: Hook,
    /// Ends the link's pin name; holds no `_`, so the target is what precedes the last one.
    pub link_suffix: &'static str,
}

pub const PROGRAMS: [ProgramDef; 14] = [
    // Packets leaving the pod.
    ProgramDef {
        name: FROM_CONTAINER,
        object: Object::Lxc,
        role: AttachRole::PodVeth,
        hook: Hook::Tcx(TcAttachType::Ingress),
        link_suffix: "ingress",
    },
    // Packets entering the pod.
    ProgramDef {
        name: TO_CONTAINER,
        object: Object::Lxc,
        role: AttachRole::PodVeth,
        hook: Hook::Tcx(TcAttachType::Egress),
        link_suffix: "egress",
    },
    // Pod traffic from other nodes, decapsulated.
    ProgramDef {
        name: FROM_TUNNEL,
        object: Object::Tunnel,
        role: AttachRole::TunnelDevice,
        hook: Hook::Tcx(TcAttachType::Ingress),
        link_suffix: "ingress",
    },
    // What the node's stack routes into the tunnel.
    ProgramDef {
        name: TO_TUNNEL,
        object: Object::Tunnel,
        role: AttachRole::TunnelDevice,
        hook: Hook::Tcx(TcAttachType::Egress),
        link_suffix: "egress",
    },
    // External frontends from outside the node, and their SNATed replies.
    ProgramDef {
        name: FROM_NETDEV,
        object: Object::Host,
        role: AttachRole::Netdev,
        hook: Hook::Tcx(TcAttachType::Ingress),
        link_suffix: "ingress",
    },
    // Pod traffic leaving the cluster: egress masquerading.
    ProgramDef {
        name: TO_NETDEV,
        object: Object::Host,
        role: AttachRole::Netdev,
        hook: Hook::Tcx(TcAttachType::Egress),
        link_suffix: "egress",
    },
    // connect() of the node's TCP and UDP sockets: a frontend becomes a backend.
    ProgramDef {
        name: SOCK4_CONNECT,
        object: Object::Sock,
        role: AttachRole::HostCgroup,
        hook: Hook::CgroupSockAddr,
        link_suffix: "connect4",
    },
    // sendto() of unconnected UDP sockets.
    ProgramDef {
        name: SOCK4_SENDMSG,
        object: Object::Sock,
        role: AttachRole::HostCgroup,
        hook: Hook::CgroupSockAddr,
        link_suffix: "sendmsg4",
    },
    // recvfrom() of UDP replies: the backend shown as the frontend.
    ProgramDef {
        name: SOCK4_RECVMSG,
        object: Object::Sock,
        role: AttachRole::HostCgroup,
        hook: Hook::CgroupSockAddr,
        link_suffix: "recvmsg4",
    },
    // getpeername() of connected sockets.
    ProgramDef {
        name: SOCK4_GETPEERNAME,
        object: Object::Sock,
        role: AttachRole::HostCgroup,
        hook: Hook::CgroupSockAddr,
        link_suffix: "getpeername4",
    },
    // The same four hooks for the pods' sockets.
    ProgramDef {
        name: POD4_CONNECT,
        object: Object::Sock,
        role: AttachRole::PodCgroup,
        hook: Hook::CgroupSockAddr,
        link_suffix: "connect4",
    },
    ProgramDef {
        name: POD4_SENDMSG,
        object: Object::Sock,
        role: AttachRole::PodCgroup,
        hook: Hook::CgroupSockAddr,
        link_suffix: "sendmsg4",
    },
    ProgramDef {
        name: POD4_RECVMSG,
        object: Object::Sock,
        role: AttachRole::PodCgroup,
        hook: Hook::CgroupSockAddr,
        link_suffix: "recvmsg4",
    },
    ProgramDef {
        name: POD4_GETPEERNAME,
        object: Object::Sock,
        role: AttachRole::PodCgroup,
        hook: Hook::CgroupSockAddr,
        link_suffix: "getpeername4",
    },
];

pub(crate) const LINK_SUFFIX_SEPARATOR: char = '_';

/// File name of the pinned link of `program` on `target`.
pub(crate) fn link_pin_name(target: &str, program: &ProgramDef) -> String {
    format!("{target}{LINK_SUFFIX_SEPARATOR}{}", program.link_suffix)
}

/// The target of a link pinned as `file_name` for a program of `role`, if it is one.
pub(crate) fn link_target(role: AttachRole, file_name: &str) -> Option<&str> {
    let (target, suffix) = file_name.rsplit_once(LINK_SUFFIX_SEPARATOR)?;
    role.programs()
        .any(|p| p.link_suffix == suffix)
        .then_some(target)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pin_names_round_trip() {
        for role in AttachRole::ALL {
            for program in role.programs() {
                assert!(!program.link_suffix.contains(LINK_SUFFIX_SEPARATOR));
                let name = link_pin_name("lxc_a1", program);
                assert_eq!(link_target(role, &name), Some("lxc_a1"));
            }
        }
        assert_eq!(link_target(AttachRole::PodVeth, "lxc0_sideways"), None);
    }
}
