//! Packet and byte counters by drop reason and direction (`metrics`).

pub const METRIC_DIR_EGRESS: u32 = 0;
pub const METRIC_DIR_INGRESS: u32 = 1;
pub const METRICS_MAX: u32 = 256 * 2;

/// Index into the metrics array: reason * 2 + direction.
pub fn metrics_index(reason: u8, dir: u32) -> u32 {
    u32::from(reason) * 2 + dir
}

#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct MetricsValue {
    pub packets: u64,
    pub bytes: u64,
}

plain_data!(MetricsValue);

const _: () = {
    assert!(size_of::<MetricsValue>() == 16);
};
