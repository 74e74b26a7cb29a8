//! Flow events (`events` ring buffer), their configuration and per-CPU counters.

pub const EVENT_DROP: u8 = 1;
pub const EVENT_TRACE: u8 = 4;
pub const EVENT_POLICY_VERDICT: u8 = 5;
pub const EVENT_CLOSE: u8 = 6;

pub const EVENT_F_SERVICE: u8 = 1 << 0;
pub const EVENT_F_REPLY: u8 = 1 << 1;
pub const EVENT_F_DENIED: u8 = 1 << 2;
pub const EVENT_F_HOST_ROW: u8 = 1 << 3;

/// One datapath event, as written to the `events` ring buffer.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct FlowEvent {
    pub time_ns: u64,
    pub type_: u8,
    pub direction: u8,
    pub reason: u8,
    pub proto: u8,
    pub tcp_flags: u8,
    pub flags: u8,
    pub pad: u16,
    pub ifindex: u32,
    pub src_identity: u32,
    pub dst_identity: u32,
    pub saddr: u32,
    pub daddr: u32,
    pub sport: u16,
    pub dport: u16,
    pub orig_daddr: u32,
    pub orig_dport: u16,
    pub pad2: u16,
    pub len: u32,
    pub pad3: u32,
}

impl FlowEvent {
    /// Reads an event from a ring buffer record; None if the record is too short.
    pub fn from_bytes(bytes: &[u8]) -> Option<Self> {
        if bytes.len() < size_of::<Self>() {
            return None;
        }
        // SAFETY: FlowEvent is #[repr(C)] plain data for which every bit pattern is valid,
        // and the length was checked; read_unaligned copes with any record alignment.
        Some(unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast::<Self>()) })
    }
}

pub const EVENT_CONFIG_F_ENABLED: u32 = 1 << 0;

#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct EventConfig {
    pub flags: u32,
    /// Events per second per CPU; 0: no limit.
    pub rate: u32,
    pub burst: u32,
    pub pad: u32,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct EventCounter {
    pub emitted: u64,
    pub suppressed: u64,
    pub lost: u64,
}

pub const EVENT_COUNTERS_MAX: u32 = 8 * 2;

/// Index into `event_counters`: type * 2 + direction.
pub fn event_counter_index(type_: u8, direction: u32) -> u32 {
    u32::from(type_) * 2 + direction
}

plain_data!(FlowEvent, EventConfig, EventCounter);

const _: () = {
    assert!(size_of::<FlowEvent>() == 56);
    assert!(size_of::<EventConfig>() == 16);
    assert!(size_of::<EventCounter>() == 24);
};
