//! The map registry in sluice-common matches the maps every compiled object declares, and
//! the program registry names programs its object has.
// A test binary: a panic in a helper is the failure report.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;

use aya_obj::Object;
use sluice_common::{MAPS, MapDef};
use sluice_datapath::PROGRAMS;

/// `(type, key size, value size, max_entries)` of a map definition.
type Shape = (u32, usize, usize, u32);

fn object_maps(bytes: &[u8]) -> BTreeMap<String, Shape> {
    let object = Object::parse(bytes).expect("parse the object");
    object
        .maps
        .iter()
        // Sections the compiler made (.rodata, .bss) are not declared maps.
        .filter(|(name, _)| !name.starts_with('.'))
        .map(|(name, m)| {
            let shape = (
                m.map_type(),
                m.key_size() as usize,
                m.value_size() as usize,
                m.max_entries(),
            );
            (name.clone(), shape)
        })
        .collect()
}

fn shape(def: &MapDef) -> Shape {
    (
        def.kind as u32,
        def.key_size,
        def.value_size,
        def.max_entries,
    )
}

/// Every difference between the registry and the object.
fn mismatches(registry: &[MapDef], object: &BTreeMap<String, Shape>) -> Vec<String> {
    let mut problems = Vec::new();
    for def in registry {
        match object.get(def.name) {
            None => problems.push(format!("{}: not in the object", def.name)),
            Some(found) if *found != shape(def) => problems.push(format!(
                "{}: object has (type, key, value, max_entries) {found:?}, the registry {:?}",
                def.name,
                shape(def)
            )),
            Some(_) => {}
        }
    }
    for name in object.keys() {
        if !registry.iter().any(|d| d.name == name) {
            problems.push(format!("{name}: not in the registry"));
        }
    }
    problems
}

#[test]
fn registry_matches_every_object() {
    for object in sluice_datapath::Object::ALL {
        let problems = mismatches(&MAPS, &object_maps(object.bytes()));
        assert!(problems.is_empty(), "{object:?}: {}", problems.join("\n"));
    }
}

#[test]
fn a_wrong_declaration_is_caught() {
    let object = object_maps(sluice_datapath::object_bytes());
    let mut registry = MAPS.to_vec();
    registry[sluice_common::MapId::Conntrack as usize].value_size += 8;
    registry.retain(|d| d.name != "frag4");
    let problems = mismatches(&registry, &object);
    assert_eq!(problems.len(), 2, "{problems:?}");
    assert!(problems[0].starts_with("ct4: object has"), "{problems:?}");
    assert_eq!(problems[1], "frag4: not in the registry");
}

#[test]
fn every_program_is_in_its_object() {
    for program in PROGRAMS {
        let object = Object::parse(program.object.bytes()).expect("parse the object");
        assert!(
            object.programs.contains_key(program.name),
            "{} is not in {:?}",
            program.name,
            program.object
        );
    }
}
