//! Flows, named as Hubble's flow JSON names them (`api/v1/flow/flow.proto` printed by
//! protojson with proto field names), so tools written for `hubble observe -o json` read
//! them: `time`, `verdict`, `drop_reason_desc`, `IP`, `l4`, `source`, `destination`, `Type`,
//! `node_name`, `event_type`, `traffic_direction`, `is_reply`, `Summary`... As protojson
//! does, zero values are left out, except `is_reply` (a wrapper type in the proto).

use std::{fmt, net::Ipv4Addr};

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Cilium's monitor message types, as `event_type.type` carries them.
pub const EVENT_TYPE_DROP: i32 = 1;
pub const EVENT_TYPE_TRACE: i32 = 4;
pub const EVENT_TYPE_POLICY_VERDICT: i32 = 5;
/// sluice's connection close (Cilium has no such monitor message).
pub const EVENT_TYPE_CLOSE: i32 = 6;

/// Cilium's trace observation points, as `event_type.sub_type` carries them for traces.
pub const TRACE_TO_ENDPOINT: i32 = 0;
pub const TRACE_FROM_ENDPOINT: i32 = 5;

/// Cilium's policy match types (`policy_match_type`).
pub const POLICY_MATCH_NONE: u32 = 0;
pub const POLICY_MATCH_L3_ONLY: u32 = 1;
pub const POLICY_MATCH_L3_L4: u32 = 2;
pub const POLICY_MATCH_L4_ONLY: u32 = 3;
pub const POLICY_MATCH_ALL: u32 = 4;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Flow {
    pub time: Timestamp,
    pub verdict: Verdict,
    /// Deprecated in Hubble but still printed: the drop reason's number.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub drop_reason: u32,
    /// Hubble's `DropReason` enum name (`POLICY_DENIED`), for drops and denied verdicts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub drop_reason_desc: Option<String>,
    #[serde(rename = "IP")]
    pub ip: Ip,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub l4: Option<Layer4>,
    pub source: Endpoint,
    pub destination: Endpoint,
    /// Always `L3_L4`.
    #[serde(rename = "Type")]
    pub flow_type: String,
    pub node_name: String,
    pub event_type: EventType,
    pub traffic_direction: TrafficDirection,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub policy_match_type: u32,
    /// Where a trace was observed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trace_observation_point: Option<TraceObservationPoint>,
    pub is_reply: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interface: Option<Interface>,
    /// The frontend the connection was addressed to, when a service translated it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub destination_service: Option<Service>,
    /// NetworkPolicies admitting an allowed policy verdict, by direction.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ingress_allowed_by: Vec<Policy>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub egress_allowed_by: Vec<Policy>,
    #[serde(rename = "Summary")]
    pub summary: String,
}

impl Flow {
    /// The endpoint the flow was observed at: the destination of an ingress flow, the
    /// source of an egress one.
    pub fn local(&self) -> &Endpoint {
        match self.traffic_direction {
            TrafficDirection::Ingress => &self.destination,
            TrafficDirection::Egress => &self.source,
        }
    }

    /// The other side of the connection.
    pub fn remote(&self) -> &Endpoint {
        match self.traffic_direction {
            TrafficDirection::Ingress => &self.source,
            TrafficDirection::Egress => &self.destination,
        }
    }

    pub fn is_policy_verdict(&self) -> bool {
        self.event_type.event_type == EVENT_TYPE_POLICY_VERDICT
    }

    /// Source and destination ports, when the protocol has them.
    pub fn ports(&self) -> Option<(u16, u16)> {
        match self.l4.as_ref()? {
            Layer4::Tcp(p) => Some((p.source_port, p.destination_port)),
            Layer4::Udp(p) => Some((p.source_port, p.destination_port)),
            Layer4::Sctp(p) => Some((p.source_port, p.destination_port)),
            Layer4::Icmpv4(_) => None,
        }
    }
}

fn is_zero(v: &u32) -> bool {
    *v == 0
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Verdict {
    Forwarded,
    Dropped,
}

impl Verdict {
    pub fn name(self) -> &'static str {
        match self {
            Verdict::Forwarded => "FORWARDED",
            Verdict::Dropped => "DROPPED",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum TrafficDirection {
    Ingress,
    Egress,
}

impl TrafficDirection {
    pub fn name(self) -> &'static str {
        match self {
            TrafficDirection::Ingress => "INGRESS",
            TrafficDirection::Egress => "EGRESS",
        }
    }
}

/// Hubble's `TraceObservationPoint`, of the points sluice observes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum TraceObservationPoint {
    /// Entering the pod (`to_container`).
    ToEndpoint,
    /// Leaving the pod (`from_container`).
    FromEndpoint,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ip {
    pub source: Ipv4Addr,
    pub destination: Ipv4Addr,
    #[serde(rename = "ipVersion")]
    pub ip_version: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Layer4 {
    #[serde(rename = "TCP")]
    Tcp(Tcp),
    #[serde(rename = "UDP")]
    Udp(Ports),
    #[serde(rename = "SCTP")]
    Sctp(Ports),
    #[serde(rename = "ICMPv4")]
    Icmpv4(Icmp),
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Tcp {
    pub source_port: u16,
    pub destination_port: u16,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub flags: Option<TcpFlags>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ports {
    pub source_port: u16,
    pub destination_port: u16,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Icmp {
    #[serde(rename = "type", default, skip_serializing_if = "is_zero")]
    pub icmp_type: u32,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub code: u32,
}

/// Hubble's `TCPFlags`: only the flags set are printed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub struct TcpFlags {
    #[serde(default, skip_serializing_if = "is_false")]
    pub fin: bool,
    #[serde(default, skip_serializing_if = "is_false")]
    pub syn: bool,
    #[serde(default, skip_serializing_if = "is_false")]
    pub rst: bool,
    #[serde(default, skip_serializing_if = "is_false")]
    pub psh: bool,
    #[serde(default, skip_serializing_if = "is_false")]
    pub ack: bool,
    #[serde(default, skip_serializing_if = "is_false")]
    pub urg: bool,
    #[serde(default, skip_serializing_if = "is_false")]
    pub ece: bool,
    #[serde(default, skip_serializing_if = "is_false")]
    pub cwr: bool,
}

fn is_false(v: &bool) -> bool {
    !*v
}

impl TcpFlags {
    /// From the TCP header's flag byte.
    pub fn from_bits(bits: u8) -> Self {
        Self {
            fin: bits & 0x01 != 0,
            syn: bits & 0x02 != 0,
            rst: bits & 0x04 != 0,
            psh: bits & 0x08 != 0,
            ack: bits & 0x10 != 0,
            urg: bits & 0x20 != 0,
            ece: bits & 0x40 != 0,
            cwr: bits & 0x80 != 0,
        }
    }

    /// In Hubble's order: `SYN, ACK`, `ACK, FIN`, `ACK, RST`.
    pub fn names(&self) -> Vec<&'static str> {
        [
            (self.syn, "SYN"),
            (self.ack, "ACK"),
            (self.rst, "RST"),
            (self.fin, "FIN"),
            (self.psh, "PSH"),
            (self.urg, "URG"),
            (self.ece, "ECE"),
            (self.cwr, "CWR"),
        ]
        .into_iter()
        .filter_map(|(set, name)| set.then_some(name))
        .collect()
    }
}

/// One side of a flow.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Endpoint {
    /// 0 when the address is in no known prefix.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub identity: u32,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub namespace: String,
    /// The identity's labels: `k8s:app=web`, `reserved:world`, `cidr:10.0.0.0/8`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub labels: Vec<String>,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub pod_name: String,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct EventType {
    #[serde(rename = "type")]
    pub event_type: i32,
    #[serde(default)]
    pub sub_type: i32,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Interface {
    pub index: u32,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub name: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Service {
    pub name: String,
    pub namespace: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Policy {
    pub name: String,
    pub namespace: String,
    /// `NetworkPolicy`.
    pub kind: String,
}

/// The filters of `sluice observe`, applied by the agent. Fields are ANDed; the values of
/// one field are ORed, as in Hubble's `FlowFilter`. Empty matches everything.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FlowFilter {
    /// `namespace/pod` or a pod name prefix (`namespace/` for a whole namespace).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub from_pod: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub to_pod: Vec<String>,
    /// Either side.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub pod: Vec<String>,
    /// Either side.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub namespace: Vec<String>,
    /// `key=value` or `key`, optionally with a source (`k8s:app=web`), on either side.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub label: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub verdict: Vec<Verdict>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub event_type: Vec<FlowEventType>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub protocol: Vec<FlowProtocol>,
    /// Source or destination port.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub port: Vec<u16>,
    /// Only flows at or after this time.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub since: Option<Timestamp>,
    /// Only flows at or before this time.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub until: Option<Timestamp>,
}

/// The event types a filter selects, named as `hubble observe --type` names them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum FlowEventType {
    Drop,
    Trace,
    PolicyVerdict,
    Close,
}

impl FlowEventType {
    /// The `event_type.type` of the flows it selects.
    pub fn code(self) -> i32 {
        match self {
            FlowEventType::Drop => EVENT_TYPE_DROP,
            FlowEventType::Trace => EVENT_TYPE_TRACE,
            FlowEventType::PolicyVerdict => EVENT_TYPE_POLICY_VERDICT,
            FlowEventType::Close => EVENT_TYPE_CLOSE,
        }
    }
}

/// The layer-4 protocols a filter selects.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FlowProtocol {
    Tcp,
    Udp,
    Sctp,
    #[serde(alias = "icmpv4")]
    Icmp,
}

impl FlowProtocol {
    /// Whether a flow's layer 4 is of this protocol.
    pub fn carries(self, l4: &Layer4) -> bool {
        matches!(
            (self, l4),
            (FlowProtocol::Tcp, Layer4::Tcp(_))
                | (FlowProtocol::Udp, Layer4::Udp(_))
                | (FlowProtocol::Sctp, Layer4::Sctp(_))
                | (FlowProtocol::Icmp, Layer4::Icmpv4(_))
        )
    }
}

impl std::str::FromStr for FlowProtocol {
    type Err = String;

    /// Any case, as Hubble takes it; `icmpv4` is `icmp`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "tcp" => Ok(FlowProtocol::Tcp),
            "udp" => Ok(FlowProtocol::Udp),
            "sctp" => Ok(FlowProtocol::Sctp),
            "icmp" | "icmpv4" => Ok(FlowProtocol::Icmp),
            _ => Err(format!("unknown protocol {s:?}: tcp, udp, sctp or icmp")),
        }
    }
}

/// The body of `POST` [`routes::OBSERVE`](crate::routes::OBSERVE).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ObserveRequest {
    /// The last N matching flows of the buffer; None: all it holds (with `follow`: none).
    #[serde(default)]
    pub last: Option<usize>,
    /// Keep sending new flows until the client hangs up.
    #[serde(default)]
    pub follow: bool,
    #[serde(default)]
    pub filter: FlowFilter,
}

/// A wall-clock time in nanoseconds since the Unix epoch, written as RFC 3339 in UTC with
/// nanoseconds (`2026-11-30T10:00:01.123456789Z`), as protojson writes timestamps.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Timestamp(pub i64);

impl Timestamp {
    pub fn seconds(self) -> i64 {
        self.0.div_euclid(1_000_000_000)
    }

    pub fn subsec_nanos(self) -> u32 {
        // rem_euclid of a positive divisor is in 0..1e9, which fits.
        u32::try_from(self.0.rem_euclid(1_000_000_000)).unwrap_or(0)
    }

    /// Calendar fields in UTC: (year, month 1-12, day 1-31, hour, minute, second).
    pub fn civil(self) -> (i64, u32, u32, u32, u32, u32) {
        let secs = self.seconds();
        let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
        let (y, m, d) = civil_from_days(days);
        let rem = u32::try_from(rem).unwrap_or(0);
        (y, m, d, rem / 3600, rem / 60 % 60, rem % 60)
    }

    /// Parses RFC 3339: `2026-11-30T10:00:01Z`, with optional fraction and a `Z` or
    /// `+hh:mm` offset.
    pub fn parse_rfc3339(s: &str) -> Option<Self> {
        let b = s.as_bytes();
        if b.len() < 20 || b[4] != b'-' || b[7] != b'-' || !matches!(b[10], b'T' | b't' | b' ') {
            return None;
        }
        if b[13] != b':' || b[16] != b':' {
            return None;
        }
        let num = |r: std::ops::Range<usize>| -> Option<i64> {
            let part = s.get(r)?;
            part.bytes()
                .all(|c| c.is_ascii_digit())
                .then(|| part.parse().ok())?
        };
        let (year, month, day) = (num(0..4)?, num(5..7)?, num(8..10)?);
        let (hour, minute, second) = (num(11..13)?, num(14..16)?, num(17..19)?);
        if !(1..=12).contains(&month) || !(1..=31).contains(&day) || hour > 23 || minute > 59 {
            return None;
        }
        if second > 60 {
            return None;
        }
        let mut rest = &s[19..];
        let mut nanos = 0i64;
        if let Some(frac) = rest.strip_prefix('.') {
            let digits = frac.bytes().take_while(u8::is_ascii_digit).count();
            if digits == 0 {
                return None;
            }
            for (i, c) in frac[..digits].bytes().enumerate() {
                if i < 9 {
                    nanos = nanos * 10 + i64::from(c - b'0');
                }
            }
            for _ in digits..9 {
                nanos *= 10;
            }
            rest = &frac[digits..];
        }
        let offset = match rest {
            "Z" | "z" => 0,
            _ if rest.len() == 6 && (rest.starts_with('+') || rest.starts_with('-')) => {
                let oh = num_of(&rest[1..3])?;
                let om = num_of(&rest[4..6])?;
                if &rest[3..4] != ":" {
                    return None;
                }
                let sign = if rest.starts_with('-') { -1 } else { 1 };
                sign * (oh * 3600 + om * 60)
            }
            _ => return None,
        };
        let days = days_from_civil(year, u32::try_from(month).ok()?, u32::try_from(day).ok()?);
        let secs = days * 86_400 + hour * 3600 + minute * 60 + second - offset;
        secs.checked_mul(1_000_000_000)?
            .checked_add(nanos)
            .map(Self)
    }
}

fn num_of(s: &str) -> Option<i64> {
    s.bytes()
        .all(|c| c.is_ascii_digit())
        .then(|| s.parse().ok())?
}

/// Howard Hinnant's `civil_from_days`: days since 1970-01-01 to a proleptic Gregorian date.
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    (
        y,
        u32::try_from(m).unwrap_or(1),
        u32::try_from(d).unwrap_or(1),
    )
}

/// The inverse of [`civil_from_days`].
fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let m = i64::from(m);
    let mp = if m > 2 { m - 3 } else { m + 9 };
    let doy = (153 * mp + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

impl fmt::Display for Timestamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (y, mo, d, h, mi, s) = self.civil();
        write!(
            f,
            "{y:04}-{mo:02}-{d:02}T{h:02}:{mi:02}:{s:02}.{:09}Z",
            self.subsec_nanos()
        )
    }
}

impl Serialize for Timestamp {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Timestamp {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let s = String::deserialize(deserializer)?;
        Timestamp::parse_rfc3339(&s)
            .ok_or_else(|| serde::de::Error::custom(format!("not an RFC 3339 time: {s:?}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_round_trip_through_rfc3339() {
        let t = Timestamp(1_796_032_801_123_456_789);
        assert_eq!(t.to_string(), "2026-11-30T10:00:01.123456789Z");
        assert_eq!(Timestamp::parse_rfc3339(&t.to_string()), Some(t));
        assert_eq!(
            Timestamp::parse_rfc3339("2026-11-30T11:00:01.5+01:00"),
            Some(Timestamp(1_796_032_801_500_000_000))
        );
        assert_eq!(Timestamp(0).to_string(), "1970-01-01T00:00:00.000000000Z");
        assert_eq!(
            Timestamp::parse_rfc3339("2000-02-29T00:00:00Z").map(|t| t.to_string()),
            Some("2000-02-29T00:00:00.000000000Z".into())
        );
        for bad in [
            "",
            "2026-11-30",
            "2026-13-01T00:00:00Z",
            "2026-11-30T10:00:01",
        ] {
            assert_eq!(Timestamp::parse_rfc3339(bad), None, "{bad}");
        }
    }

    #[test]
    fn tcp_flags_print_in_hubbles_order_and_only_when_set() {
        let flags = TcpFlags::from_bits(0x12);
        assert_eq!(flags.names(), ["SYN", "ACK"]);
        assert_eq!(
            serde_json::to_string(&flags).unwrap_or_default(),
            r#"{"SYN":true,"ACK":true}"#
        );
    }
}
