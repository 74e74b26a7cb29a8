//! The API resources the fake serves: the six kinds sluice watches, each at the path the
//! real API server lists it cluster-wide.

use std::fmt;

/// One served resource (a plural name under its group and version).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Resource {
    Nodes,
    Namespaces,
    Pods,
    Services,
    EndpointSlices,
    NetworkPolicies,
}

impl Resource {
    pub const ALL: [Resource; 6] = [
        Resource::Nodes,
        Resource::Namespaces,
        Resource::Pods,
        Resource::Services,
        Resource::EndpointSlices,
        Resource::NetworkPolicies,
    ];

    /// `apiVersion` of its objects.
    pub fn api_version(self) -> &'static str {
        match self {
            Resource::Nodes | Resource::Namespaces | Resource::Pods | Resource::Services => "v1",
            Resource::EndpointSlices => "discovery.k8s.io/v1",
            Resource::NetworkPolicies => "networking.k8s.io/v1",
        }
    }

    /// `kind` of its objects; the list's kind is this with `List` appended.
    pub fn kind(self) -> &'static str {
        match self {
            Resource::Nodes => "Node",
            Resource::Namespaces => "Namespace",
            Resource::Pods => "Pod",
            Resource::Services => "Service",
            Resource::EndpointSlices => "EndpointSlice",
            Resource::NetworkPolicies => "NetworkPolicy",
        }
    }

    /// The plural name in its URL.
    pub fn plural(self) -> &'static str {
        match self {
            Resource::Nodes => "nodes",
            Resource::Namespaces => "namespaces",
            Resource::Pods => "pods",
            Resource::Services => "services",
            Resource::EndpointSlices => "endpointslices",
            Resource::NetworkPolicies => "networkpolicies",
        }
    }

    /// Whether its objects live in a namespace (the key then includes it).
    pub fn namespaced(self) -> bool {
        !matches!(self, Resource::Nodes | Resource::Namespaces)
    }

    /// The resource served at `/api/v1/<plural>` (empty `group`) or
    /// `/apis/<group>/<version>/<plural>`.
    pub fn from_path(group: &str, version: &str, plural: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|r| {
            let api_version = match group {
                "" => version.to_owned(),
                group => format!("{group}/{version}"),
            };
            r.plural() == plural && r.api_version() == api_version
        })
    }

    /// The resource whose objects have `kind`.
    pub fn of_kind(kind: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|r| r.kind() == kind)
    }
}

impl fmt::Display for Resource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.plural())
    }
}
