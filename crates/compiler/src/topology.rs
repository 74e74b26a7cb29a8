//! Traffic distribution (KEP-4444, KEP-3015) and topology aware routing (KEP-2433): which
//! of a Service's ready backends a node prefers under traffic policy Cluster, from the
//! zone in its Node labels and each endpoint's node, zone and hints. A preference only
//! narrows: when no ready backend is close, every ready backend is used, so a Service never
//! loses its backends to topology.

use k8s_openapi::api::core::v1::Service;

use crate::backends::SliceBackend;

/// The annotation of topology aware routing, which predates `spec.trafficDistribution`.
pub(crate) const TOPOLOGY_MODE_ANNOTATION: &str = "service.kubernetes.io/topology-mode";

/// Which ready backends a Service's frontends prefer under traffic policy Cluster.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) enum Distribution {
    /// No preference: every ready backend.
    #[default]
    Any,
    /// `topology-mode: Auto`: those hinted for this node's zone. The EndpointSlice
    /// controller leaves hints out when zones are too unbalanced, and then all are used.
    HintedZone,
    /// `PreferClose` (`PreferSameZone`): those in this node's zone, by their hints, else
    /// by their `zone`, which is what the controller hints for this value.
    SameZone,
    /// `PreferSameNode`: those on this node, else those in its zone.
    SameNode,
}

/// Where the node compiled for is.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Place<'a> {
    pub(crate) node: &'a str,
    /// Its zone label; without one, zones decide nothing.
    pub(crate) zone: Option<&'a str>,
}

/// What a `spec.trafficDistribution` value asks for; None for one not implemented.
pub(crate) fn traffic_distribution(value: &str) -> Option<Distribution> {
    match value {
        "" => Some(Distribution::Any),
        "PreferClose" | "PreferSameZone" => Some(Distribution::SameZone),
        "PreferSameNode" => Some(Distribution::SameNode),
        _ => None,
    }
}

/// What a `topology-mode` annotation value asks for, in the spellings Kubernetes accepts;
/// None for one not implemented.
pub(crate) fn topology_mode(value: &str) -> Option<Distribution> {
    match value {
        "" | "Disabled" | "disabled" => Some(Distribution::Any),
        "Auto" | "auto" => Some(Distribution::HintedZone),
        _ => None,
    }
}

impl Distribution {
    /// The Service's. The annotation, when it enables topology, takes precedence over the
    /// field, as Kubernetes documents; a value not implemented (reported by `unsupported`)
    /// asks for nothing.
    pub(crate) fn of(service: &Service) -> Self {
        let mode = service
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(TOPOLOGY_MODE_ANNOTATION))
            .and_then(|mode| topology_mode(mode))
            .unwrap_or_default();
        if mode != Self::Any {
            return mode;
        }
        service
            .spec
            .as_ref()
            .and_then(|s| s.traffic_distribution.as_deref())
            .and_then(traffic_distribution)
            .unwrap_or_default()
    }

    /// The backends of `ready` that `place` prefers, in their order.
    pub(crate) fn closest<'a>(
        self,
        ready: Vec<&'a SliceBackend>,
        place: Place<'_>,
    ) -> Vec<&'a SliceBackend> {
        let same_zone = |hinted_only| within(&ready, place.zone, |b| b.zones(hinted_only));
        let closer = match self {
            Self::Any => None,
            Self::HintedZone => same_zone(true),
            Self::SameZone => same_zone(false),
            Self::SameNode => {
                within(&ready, Some(place.node), SliceBackend::nodes).or_else(|| same_zone(false))
            }
        };
        closer.unwrap_or(ready)
    }
}

/// The backends of `ready` placed (by `places`) `here`, when every one has a place and at
/// least one is here; else None. Like kube-proxy, which ignores hints unless every ready
/// endpoint has them: a half-updated set must not pull all traffic to a few backends.
fn within<'a>(
    ready: &[&'a SliceBackend],
    here: Option<&str>,
    places: impl Fn(&SliceBackend) -> Vec<&str>,
) -> Option<Vec<&'a SliceBackend>> {
    let here = here?;
    let mut close = Vec::new();
    for &backend in ready {
        let at = places(backend);
        if at.is_empty() {
            return None;
        }
        if at.contains(&here) {
            close.push(backend);
        }
    }
    (!close.is_empty()).then_some(close)
}

impl SliceBackend {
    /// The zones that should use it: its hints, else (unless `hinted_only`) its zone.
    fn zones(&self, hinted_only: bool) -> Vec<&str> {
        match &self.zone_hints {
            Some(hints) => hints.iter().map(String::as_str).collect(),
            None if hinted_only => Vec::new(),
            None => self.zone.as_deref().into_iter().collect(),
        }
    }

    /// The nodes that should use it: its hints, else its node.
    fn nodes(&self) -> Vec<&str> {
        match &self.node_hints {
            Some(hints) => hints.iter().map(String::as_str).collect(),
            None => self.node.as_deref().into_iter().collect(),
        }
    }
}
