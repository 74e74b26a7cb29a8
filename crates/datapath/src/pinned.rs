//! The pinned maps, opened from bpffs without loading any program.

use std::{fs, io, path::Path};

use aya::maps::{HashMap, IterableMap, Map, MapData, PerCpuArray};
use sluice_common::{
    Ct4Entry, Ct4Key, EndpointInfo, Lb4Backend, Lb4BackendKey, Lb4Key, Lb4Service, MetricsValue,
    names,
};

use crate::DatapathError;

/// Typed handles on the pinned maps, opened from bpffs with no programs loaded
/// (realizer, CLI, tests).
pub struct PinnedMaps {
    pub services: HashMap<MapData, Lb4Key, Lb4Service>,
    pub backends: HashMap<MapData, Lb4BackendKey, Lb4Backend>,
    pub conntrack: HashMap<MapData, Ct4Key, Ct4Entry>,
    pub endpoints: HashMap<MapData, u32, EndpointInfo>,
    pub metrics: PerCpuArray<MapData, MetricsValue>,
}

impl std::fmt::Debug for PinnedMaps {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PinnedMaps").finish_non_exhaustive()
    }
}

impl PinnedMaps {
    pub fn open(pin_dir: &Path) -> Result<Self, DatapathError> {
        Ok(Self {
            services: typed(pin_dir, names::SERVICES, HashMap::try_from)?,
            backends: typed(pin_dir, names::BACKENDS, HashMap::try_from)?,
            conntrack: typed(pin_dir, names::CONNTRACK, HashMap::try_from)?,
            endpoints: typed(pin_dir, names::ENDPOINTS, HashMap::try_from)?,
            metrics: typed(pin_dir, names::METRICS, PerCpuArray::try_from)?,
        })
    }

    /// `(name, max_entries)` of each map, read from the kernel's map info.
    pub fn capacities(&self) -> Result<Vec<(&'static str, u32)>, DatapathError> {
        let maps: [(&'static str, &MapData); 5] = [
            (names::SERVICES, self.services.map()),
            (names::BACKENDS, self.backends.map()),
            (names::CONNTRACK, self.conntrack.map()),
            (names::ENDPOINTS, self.endpoints.map()),
            (names::METRICS, self.metrics.map()),
        ];
        maps.into_iter()
            .map(|(name, map)| {
                let info = map
                    .info()
                    .map_err(|source| DatapathError::MapInfo { map: name, source })?;
                Ok((name, info.max_entries()))
            })
            .collect()
    }
}

fn typed<T>(
    pin_dir: &Path,
    name: &'static str,
    convert: impl FnOnce(Map) -> Result<T, aya::maps::MapError>,
) -> Result<T, DatapathError> {
    let path = pin_dir.join(name);
    let map_err = |source| DatapathError::Map {
        map: name,
        path: path.clone(),
        source,
    };
    let data = MapData::from_pin(&path).map_err(map_err)?;
    let map = Map::from_map_data(data).map_err(map_err)?;
    convert(map).map_err(map_err)
}

/// Removes `<pin_dir>` and everything pinned under it. Unpinning the links detaches
/// the programs; maps go away once no program or process holds them.
pub fn remove_pins(pin_dir: &Path) -> Result<(), DatapathError> {
    match fs::remove_dir_all(pin_dir) {
        Ok(()) => Ok(()),
        Err(err) if err.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(DatapathError::Io {
            call: "rm -r",
            path: pin_dir.into(),
            source,
        }),
    }
}
