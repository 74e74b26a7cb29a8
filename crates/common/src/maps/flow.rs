//! The flow cache (`bpf/lib/flow.h`): established flows from a pod of the node, decided
//! once by the slow path. Written by the datapath; user space bumps the
//! generation and reads the counters.

/// `struct flow4_key`: a packet's tuple as it leaves the source pod, and that pod's veth.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Flow4Key {
    pub saddr: u32,
    pub daddr: u32,
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
    pub pad: [u8; 3],
    pub ifindex: u32,
}

/// `struct flow4_entry`: how the slow path delivered the flow's packet.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Flow4Entry {
    /// The kernel's tick count (jiffies) when decided.
    pub decided_jiffies: u64,
    pub saddr: u32,
    pub daddr: u32,
    pub sport: u16,
    pub dport: u16,
    /// The destination pod's host-side veth, or the underlay device.
    pub ifindex: u32,
    pub generation: u32,
    pub dmac: [u8; 6],
    pub smac: [u8; 6],
    pub tcp_flags: u8,
    /// What the L4 checksum field held when decided (`FLOW4_L4_CSUM_*`).
    pub l4_csum: u8,
    /// The destination veth's MTU when decided.
    pub mtu: u16,
    /// What the rewrite adds to the L4 checksum field.
    pub l4_csum_delta: u16,
    /// The key's addresses and protocol summed as in the L4 pseudo-header.
    pub pseudo_base: u16,
    /// The node the flow is sent to through `ifindex`; 0 for a pod of this node.
    pub next_hop: u32,
    /// `FLOW4_TUNNEL` with the VNI (the sender's identity) when the flow goes through
    /// the tunnel, `ifindex` then the tunnel device; 0 otherwise.
    pub tunnel: u32,
}

/// `struct flow4_slot`: one slot of the flow cache (`flow4`, an array indexed by a hash
/// of the key), the decision and the key it is for; `seq` is odd while the datapath
/// writes it.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Flow4Slot {
    pub seq: u32,
    pub key: Flow4Key,
    pub entry: Flow4Entry,
}

/// `struct flow4_stats`: what the flow cache did (`flow4_stats`, index 0, per CPU).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Flow4Stats {
    /// Packets forwarded from the cache.
    pub hits: u64,
    /// Decisions the slow path recorded.
    pub decided: u64,
}

/// `struct host_route4`: what host routing found for a local pod's address (`host_route4`,
/// an array indexed by a hash of the address), written by the datapath; `seq` is odd
/// while it writes it.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct HostRoute4 {
    pub seq: u32,
    pub daddr: u32,
    /// The kernel's tick count (jiffies) when found.
    pub decided_jiffies: u64,
    /// The pod's host-side veth.
    pub ifindex: u32,
    pub generation: u32,
    pub dmac: [u8; 6],
    pub smac: [u8; 6],
    /// The veth's MTU when found.
    pub mtu: u16,
    pub pad: [u8; 2],
}

plain_data!(Flow4Key, Flow4Entry, Flow4Slot, Flow4Stats, HostRoute4);

const _: () = {
    assert!(size_of::<Flow4Key>() == 20);
    assert!(size_of::<Flow4Entry>() == 56);
    assert!(size_of::<Flow4Slot>() == 80);
    assert!(size_of::<Flow4Stats>() == 16);
    assert!(size_of::<HostRoute4>() == 40);
};
