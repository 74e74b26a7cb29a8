//! Services: admission of the ClusterIPs they ask for, allocation of the others, and the
//! check that a Service without a selector has EndpointSlices to go with it.

use std::{collections::BTreeMap, net::Ipv4Addr};

use k8s_openapi::{api::core::v1::Service, apimachinery::pkg::apis::meta::v1::ObjectMeta};
use serde_json::Value;
use sluice_sources::{Manifest, Object};

use super::{Apply, new_uid};
use crate::{
    ipam,
    slices::SERVICE_NAME_LABEL,
    state::{LabState, Stored, key},
};

/// ClusterIPs taken, by the `namespace/name` of their Service: those of the lab and those
/// the apply asks for, so automatic allocation steps around them.
pub(super) type ClusterIps = BTreeMap<Ipv4Addr, String>;

impl Apply<'_> {
    /// Admits the ClusterIPs the applied Services ask for.
    pub(super) fn requested_cluster_ips(&mut self) -> ClusterIps {
        let mut claimed: ClusterIps = self
            .st
            .services
            .iter()
            .filter_map(|(k, s)| Some((cluster_ip(&s.object)?, k.clone())))
            .collect();
        for m in self.manifests {
            let Object::Service(svc) = &m.object else {
                continue;
            };
            let requested = svc.spec.as_ref().and_then(|s| s.cluster_ip.as_deref());
            match requested {
                None | Some("" | "None") => {}
                Some(text) => {
                    if let Err(message) = self.admit_cluster_ip(m, text, &mut claimed) {
                        self.violation(m, "spec.clusterIP", message);
                    }
                }
            }
        }
        claimed
    }

    /// Whether Service `m` may have the ClusterIP `text`; claims it if so.
    fn admit_cluster_ip(
        &self,
        m: &Manifest,
        text: &str,
        claimed: &mut ClusterIps,
    ) -> Result<(), String> {
        let k = key(m.namespace(), m.name());
        let previous = self.st.services.get(&k).and_then(|s| cluster_ip(&s.object));
        let Ok(ip) = text.parse::<Ipv4Addr>() else {
            return Err(format!("{text:?} is not an IPv4 address"));
        };
        let service_cidr = self.st.spec.service_cidr;
        if !ipam::is_assignable(service_cidr, ip) {
            return Err(format!(
                "{ip} is not in the lab's serviceCIDR {service_cidr}"
            ));
        }
        if let Some(previous) = previous.filter(|p| *p != ip) {
            return Err(format!("field is immutable: the Service has {previous}"));
        }
        if let Some(other) = claimed.get(&ip).filter(|o| **o != k) {
            return Err(format!("{ip} is already allocated to Service {other}"));
        }
        claimed.insert(ip, k);
        Ok(())
    }

    /// Stores a Service with its ClusterIP: the one it asks for, the one it has, or a new
    /// one.
    pub(super) fn service(
        &mut self,
        m: &Manifest,
        svc: &Service,
        applied: Value,
        claimed: &mut ClusterIps,
    ) {
        let k = key(m.namespace(), m.name());
        let previous = self.st.services.get(&k).cloned();
        let mut svc = svc.clone();
        if !has_selector(&svc)
            && !is_external_name(&svc)
            && !has_user_slices(&self.st, self.manifests, m.namespace(), m.name())
        {
            self.violation(
                m,
                "spec.selector",
                format!(
                    "required: without a selector the Service needs EndpointSlices labelled {SERVICE_NAME_LABEL}={} (none exist or are applied with it)",
                    m.name()
                ),
            );
        }
        let previous_ip = previous.as_ref().and_then(|p| cluster_ip(&p.object));
        let spec = svc.spec.get_or_insert_with(Default::default);
        let type_ = spec.type_.get_or_insert_with(|| "ClusterIP".into()).clone();
        if type_ != "ExternalName" {
            let ip = match spec.cluster_ip.as_deref() {
                Some("None") => Some("None".to_string()),
                Some(text) if !text.is_empty() => Some(text.to_string()),
                _ => match previous_ip {
                    Some(ip) => Some(ip.to_string()),
                    None => self.allocate_cluster_ip(m, &k, claimed),
                },
            };
            spec.cluster_ips = ip.clone().map(|ip| vec![ip]);
            spec.cluster_ip = ip;
        }
        self.allocate_node_ports(m, spec, previous.as_ref().map(|p| &p.object));
        // The VIP a LoadBalancer Service was given stays its own across applies.
        svc.status = previous.as_ref().and_then(|p| p.object.status.clone());
        svc.metadata.uid = previous
            .as_ref()
            .and_then(|p| p.object.metadata.uid.clone())
            .or_else(|| Some(new_uid()));
        svc.metadata.creation_timestamp = previous
            .as_ref()
            .and_then(|p| p.object.metadata.creation_timestamp.clone())
            .or_else(|| Some(self.when.clone()));
        self.line(m, previous.as_ref().map(|p| &p.applied), &applied);
        self.st.services.insert(
            k,
            Stored {
                applied: Some(applied),
                object: svc,
            },
        );
    }

    /// The lowest free address of the serviceCIDR, claimed for Service `k`.
    fn allocate_cluster_ip(
        &mut self,
        m: &Manifest,
        k: &str,
        claimed: &mut ClusterIps,
    ) -> Option<String> {
        let used = claimed.keys().copied().collect();
        let service_cidr = self.st.spec.service_cidr;
        match ipam::lowest_free(service_cidr, ipam::FIRST_CLUSTER_IP_OFFSET, &used) {
            Some(ip) => {
                claimed.insert(ip, k.to_string());
                Some(ip.to_string())
            }
            None => {
                self.violation(
                    m,
                    "spec.clusterIP",
                    format!("no free address in serviceCIDR {service_cidr}"),
                );
                None
            }
        }
    }
}

fn has_selector(svc: &Service) -> bool {
    svc.spec
        .as_ref()
        .and_then(|s| s.selector.as_ref())
        .is_some_and(|s| !s.is_empty())
}

fn is_external_name(svc: &Service) -> bool {
    svc.spec.as_ref().and_then(|s| s.type_.as_deref()) == Some("ExternalName")
}

/// Whether EndpointSlices for Service `namespace/name` exist or come with this apply.
fn has_user_slices(st: &LabState, manifests: &[Manifest], namespace: &str, name: &str) -> bool {
    let names_service = |meta: &ObjectMeta| {
        meta.namespace.as_deref() == Some(namespace)
            && meta
                .labels
                .as_ref()
                .and_then(|l| l.get(SERVICE_NAME_LABEL))
                .is_some_and(|s| s == name)
    };
    st.endpoint_slices
        .values()
        .any(|s| names_service(&s.object.metadata))
        || manifests
            .iter()
            .any(|m| matches!(&m.object, Object::EndpointSlice(s) if names_service(&s.metadata)))
}

pub fn cluster_ip(svc: &Service) -> Option<Ipv4Addr> {
    svc.spec.as_ref()?.cluster_ip.as_deref()?.parse().ok()
}
