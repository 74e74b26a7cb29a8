//! How a Service's frontends choose backends: sessionAffinity ClientIP and its timeout,
//! and the algorithm for new connections (random, or Maglev by the
//! `service.sluice.dev/lb-algorithm` annotation or the node's default).

use std::{collections::BTreeMap, net::Ipv4Addr, sync::Arc};

use k8s_openapi::api::core::v1::Service;
pub use sluice_common::kinds::LbAlgorithm;
use sluice_common::{Lb4Key, Lb4Service, SVC_FLAG_AFFINITY, SVC_FLAG_MAGLEV};

use crate::{
    DesiredState, ObjectRef, Problem,
    maglev::{self, TableSize},
    problem::Problems,
};

/// The annotation that picks a Service's algorithm, overriding the node's default.
pub const LB_ALGORITHM_ANNOTATION: &str = "service.sluice.dev/lb-algorithm";

/// sessionAffinityConfig.clientIP.timeoutSeconds when unset (the API's default, 3 hours).
pub const DEFAULT_AFFINITY_TIMEOUT: u32 = 10800;

/// The API server's upper bound of the timeout (one day).
const MAX_AFFINITY_TIMEOUT: i32 = 86400;

/// The node's load-balancing settings (`--lb-algorithm`, `--maglev-table-size`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Balancing {
    /// For Services without the annotation.
    pub algorithm: LbAlgorithm,
    /// M of every Maglev table.
    pub maglev_table_size: TableSize,
}

/// What every frontend of one Service carries in its `lb4_services` value.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct FrontendOptions {
    /// `SVC_FLAG_AFFINITY` and `SVC_FLAG_MAGLEV`, as they apply.
    pub flags: u16,
    /// Seconds; 0 without affinity.
    pub affinity_timeout: u32,
    /// The table size when the Service uses Maglev.
    pub maglev: Option<TableSize>,
}

impl FrontendOptions {
    /// The frontend (slot 0) value of a frontend of kind `kind` (`SVC_FLAG_CLUSTER_IP`...)
    /// with `count` backend slots.
    pub fn frontend(&self, count: u16, kind: u16) -> Lb4Service {
        Lb4Service {
            maglev_size: self.maglev.map_or(0, TableSize::get),
            affinity_timeout: self.affinity_timeout,
            ..Lb4Service::frontend(count, kind | self.flags)
        }
    }
}

/// The balancing options of `service` (named `object`). A value the API would refuse is
/// reported and the Service is programmed with what the report says.
pub(crate) fn frontend_options(
    object: &ObjectRef,
    service: &Service,
    balancing: Balancing,
    problems: &mut Problems,
) -> FrontendOptions {
    let mut options = FrontendOptions::default();
    let mut invalid = |field, value: String, fallback| {
        problems.insert(Problem::BalancingSetting {
            service: object.clone(),
            field,
            value,
            fallback,
        });
    };
    let annotation = service
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(LB_ALGORITHM_ANNOTATION));
    let algorithm = match annotation.map(|v| v.parse::<LbAlgorithm>()) {
        None => balancing.algorithm,
        Some(Ok(algorithm)) => algorithm,
        Some(Err(_)) => {
            invalid(
                "metadata.annotations[service.sluice.dev/lb-algorithm]",
                annotation.cloned().unwrap_or_default(),
                "not random or maglev: the node's default algorithm applies",
            );
            balancing.algorithm
        }
    };
    if algorithm == LbAlgorithm::Maglev {
        options.flags |= SVC_FLAG_MAGLEV;
        options.maglev = Some(balancing.maglev_table_size);
    }

    let Some(spec) = &service.spec else {
        return options;
    };
    match spec.session_affinity.as_deref() {
        None | Some("None") => {}
        Some("ClientIP") => {
            let timeout = spec
                .session_affinity_config
                .as_ref()
                .and_then(|c| c.client_ip.as_ref())
                .and_then(|c| c.timeout_seconds);
            options.flags |= SVC_FLAG_AFFINITY;
            options.affinity_timeout = match timeout {
                None => DEFAULT_AFFINITY_TIMEOUT,
                Some(seconds @ 1..=MAX_AFFINITY_TIMEOUT) => seconds.unsigned_abs(),
                Some(seconds) => {
                    invalid(
                        "spec.sessionAffinityConfig.clientIP.timeoutSeconds",
                        seconds.to_string(),
                        "not from 1 to 86400: the default 10800 applies",
                    );
                    DEFAULT_AFFINITY_TIMEOUT
                }
            };
        }
        Some(other) => invalid(
            "spec.sessionAffinity",
            other.to_string(),
            "not None or ClientIP: no affinity",
        ),
    }
    options
}

/// Inserts the frontend `key` (slot 0) with `value` and, for a Maglev Service with
/// backends, its table computed from `backends` (in slot order). Every kind of frontend of
/// a Service (ClusterIP, NodePort, LoadBalancer, external IP) goes through here, so each
/// gets the Service's options and its own table.
pub(crate) fn insert_frontend(
    state: &mut DesiredState,
    tables: &mut MaglevTables,
    key: Lb4Key,
    value: Lb4Service,
    options: FrontendOptions,
    backends: &[(Ipv4Addr, u16)],
) {
    state.services.insert(key, value);
    if let Some(size) = options.maglev.filter(|_| !backends.is_empty()) {
        let table = tables
            .entry((backends.to_vec(), size))
            .or_insert_with(|| maglev::table(backends, size).into());
        state.maglev.insert(key, Arc::clone(table));
    }
}

/// Maglev tables of one compilation by their backends (in slot order) and size.
pub(crate) type MaglevTables = BTreeMap<(Vec<(Ipv4Addr, u16)>, TableSize), Arc<[u16]>>;
