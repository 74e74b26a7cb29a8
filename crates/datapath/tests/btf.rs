//! The C structs in the object's BTF match their Rust mirrors in sluice-common.
//!
//! aya-obj keeps BTF struct members private, so this reads the `.BTF` section itself;
//! only STRUCT members are needed and the format is simple (linux/btf.h).
// A test binary: a panic in a helper is the failure report.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;

use object::{Object, ObjectSection};
use sluice_common::{FieldLayout, LAYOUTS, LAYOUTS_V1, StructLayout};

const BTF_MAGIC: u16 = 0xeb9f;
const BTF_KIND_STRUCT: u32 = 4;

/// A struct as BTF describes it: size and member byte offsets by name.
#[derive(Debug)]
struct BtfStruct {
    size: usize,
    members: BTreeMap<String, usize>,
}

fn u16_at(data: &[u8], off: usize) -> u16 {
    u16::from_le_bytes([data[off], data[off + 1]])
}

fn u32_at(data: &[u8], off: usize) -> u32 {
    u32::from_le_bytes([data[off], data[off + 1], data[off + 2], data[off + 3]])
}

fn string_at(strings: &[u8], off: usize) -> String {
    let end = strings[off..].iter().position(|&b| b == 0).unwrap() + off;
    String::from_utf8(strings[off..end].to_vec()).unwrap()
}

/// Every named STRUCT in a little-endian BTF blob.
fn parse_btf_structs(btf: &[u8]) -> BTreeMap<String, BtfStruct> {
    assert_eq!(u16_at(btf, 0), BTF_MAGIC, "BTF magic");
    let hdr_len = u32_at(btf, 4) as usize;
    let type_off = u32_at(btf, 8) as usize;
    let type_len = u32_at(btf, 12) as usize;
    let str_off = u32_at(btf, 16) as usize;
    let str_len = u32_at(btf, 20) as usize;
    let types = &btf[hdr_len + type_off..hdr_len + type_off + type_len];
    let strings = &btf[hdr_len + str_off..hdr_len + str_off + str_len];

    let mut structs = BTreeMap::new();
    let mut pos = 0;
    while pos < types.len() {
        let name_off = u32_at(types, pos) as usize;
        let info = u32_at(types, pos + 4);
        let size = u32_at(types, pos + 8) as usize;
        let vlen = (info & 0xffff) as usize;
        let kind = (info >> 24) & 0x1f;
        let kind_flag = info >> 31 == 1;
        pos += 12;
        // Bytes that follow the common header, by kind.
        let extra = match kind {
            1 | 14 | 17 => 4,             // INT, VAR, DECL_TAG
            3 => 12,                      // ARRAY
            4 | 5 | 15 | 19 => vlen * 12, // STRUCT, UNION, DATASEC, ENUM64
            6 | 13 => vlen * 8,           // ENUM, FUNC_PROTO
            2 | 7..=12 | 16 | 18 => 0,    // PTR, FWD, TYPEDEF, qualifiers, FUNC, FLOAT, TYPE_TAG
            other => panic!("unknown BTF kind {other}"),
        };
        if kind == BTF_KIND_STRUCT && name_off != 0 {
            let mut members = BTreeMap::new();
            for i in 0..vlen {
                let member = pos + i * 12;
                let name = string_at(strings, u32_at(types, member) as usize);
                let raw_offset = u32_at(types, member + 8);
                // With kind_flag the top byte is a bitfield size; shared structs have none.
                let bitfield_size = if kind_flag { raw_offset >> 24 } else { 0 };
                assert_eq!(bitfield_size, 0, "bitfield {name} in a shared struct");
                let bit_offset = raw_offset & if kind_flag { 0x00ff_ffff } else { u32::MAX };
                assert_eq!(bit_offset % 8, 0, "{name} is not byte aligned");
                members.insert(name, (bit_offset / 8) as usize);
            }
            structs.insert(string_at(strings, name_off), BtfStruct { size, members });
        }
        pos += extra;
    }
    structs
}

fn object_structs() -> BTreeMap<String, BtfStruct> {
    structs_of(sluice_datapath::object_bytes())
}

fn structs_of(object: &[u8]) -> BTreeMap<String, BtfStruct> {
    let file = object::File::parse(object).expect("parse ELF");
    let section = file.section_by_name(".BTF").expect(".BTF section");
    parse_btf_structs(section.data().expect("section data"))
}

/// Every difference between the Rust layout and the C struct.
fn mismatches(layout: &StructLayout, structs: &BTreeMap<String, BtfStruct>) -> Vec<String> {
    let Some(c) = structs.get(layout.name) else {
        return vec![format!("struct {} is not in the object's BTF", layout.name)];
    };
    let mut problems = Vec::new();
    if c.size != layout.size {
        problems.push(format!(
            "{}: C size {} != Rust size {}",
            layout.name, c.size, layout.size
        ));
    }
    for field in layout.fields {
        match c.members.get(field.name) {
            None => problems.push(format!("{}.{}: not in C", layout.name, field.name)),
            Some(&offset) if offset != field.offset => problems.push(format!(
                "{}.{}: C offset {offset} != Rust offset {}",
                layout.name, field.name, field.offset
            )),
            Some(_) => {}
        }
    }
    for name in c.members.keys() {
        if !layout.fields.iter().any(|f| f.name == name) {
            problems.push(format!("{}.{name}: not in the Rust mirror", layout.name));
        }
    }
    problems
}

#[test]
fn btf_layouts_match() {
    let structs = object_structs();
    let problems: Vec<String> = LAYOUTS
        .iter()
        .flat_map(|layout| mismatches(layout, &structs))
        .collect();
    assert!(
        problems.is_empty(),
        "layout mismatches:\n{}",
        problems.join("\n")
    );
    assert_eq!(LAYOUTS.len(), 32, "every shared struct is compared");
}

/// The earlier layouts the migrations read match the test objects built with them.
#[test]
fn layout_1_mirrors_match_the_layout_1_objects() {
    use sluice_datapath::{Object, ObjectBuild};
    for object in Object::ALL {
        let structs = structs_of(ObjectBuild::LayoutV1.bytes(object));
        let problems: Vec<String> = LAYOUTS_V1
            .iter()
            .flat_map(|layout| mismatches(layout, &structs))
            .collect();
        assert!(problems.is_empty(), "{object:?}:\n{}", problems.join("\n"));
    }
}

#[test]
fn wrong_layouts_are_caught() {
    let structs = object_structs();
    let wrong_offset = StructLayout {
        name: "ct4_key",
        size: 16,
        fields: &[
            FieldLayout {
                name: "saddr",
                offset: 0,
            },
            FieldLayout {
                name: "daddr",
                offset: 4,
            },
            FieldLayout {
                name: "sport",
                offset: 10,
            },
            FieldLayout {
                name: "dport",
                offset: 8,
            },
            FieldLayout {
                name: "proto",
                offset: 12,
            },
            FieldLayout {
                name: "scope",
                offset: 13,
            },
            FieldLayout {
                name: "pad",
                offset: 14,
            },
        ],
    };
    assert_eq!(mismatches(&wrong_offset, &structs).len(), 2);

    let missing_field = StructLayout {
        name: "metrics_value",
        size: 16,
        fields: &[FieldLayout {
            name: "packets",
            offset: 0,
        }],
    };
    assert_eq!(
        mismatches(&missing_field, &structs),
        ["metrics_value.bytes: not in the Rust mirror"]
    );

    let wrong_size = StructLayout {
        name: "lb4_backend",
        size: 8,
        fields: &[
            FieldLayout {
                name: "state",
                offset: 0,
            },
            FieldLayout {
                name: "pad",
                offset: 1,
            },
        ],
    };
    assert_eq!(mismatches(&wrong_size, &structs).len(), 1);

    let unknown = StructLayout {
        name: "no_such_struct",
        size: 4,
        fields: &[],
    };
    assert_eq!(mismatches(&unknown, &structs).len(), 1);
}
