//! `DropReason` and the `DROP_*` defines in bpf/lib/common.h must name the same codes.

use sluice_common::DropReason;

#[test]
fn drop_reasons_match_the_c_header() {
    let header = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../bpf/lib/common.h"
    ))
    .unwrap();
    let mut in_c: Vec<(String, u8)> = header
        .lines()
        .filter_map(|l| l.strip_prefix("#define DROP_"))
        .map(|l| {
            let mut words = l.split_whitespace();
            (
                words.next().unwrap().to_string(),
                words.next().unwrap().parse().unwrap(),
            )
        })
        .collect();
    let mut in_rust: Vec<(String, u8)> = DropReason::ALL
        .iter()
        .map(|r| (r.name().to_string(), r.code()))
        .collect();
    in_c.sort();
    in_rust.sort();
    assert_eq!(in_c, in_rust);
    for (_, code) in &in_c {
        assert!(DropReason::from_code(*code).is_some());
    }
}
