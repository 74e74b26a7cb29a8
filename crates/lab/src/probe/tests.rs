use super::*;

#[test]
fn protocols_parse_in_any_case() {
    assert_eq!("tcp".parse::<Protocol>(), Ok(Protocol::Tcp));
    assert_eq!("UDP".parse::<Protocol>(), Ok(Protocol::Udp));
    assert_eq!("Sctp".parse::<Protocol>(), Ok(Protocol::Sctp));
    assert!("icmp".parse::<Protocol>().is_err());
}

#[test]
fn sctp_is_not_runnable_with_a_reason() {
    assert!(unrunnable(Protocol::Sctp).is_some_and(|why| !why.is_empty()));
    assert_eq!(unrunnable(Protocol::Udp), None);
}

#[test]
fn the_truth_table_marks_allowed_and_denied() {
    let probe = |from: &str, to: &str, protocol, allowed| Probe {
        from: from.into(),
        to: to.into(),
        address: Ipv4Addr::LOCALHOST,
        port: 80,
        protocol,
        allowed,
        detail: String::new(),
        outcome: if allowed {
            Outcome::Allowed
        } else {
            Outcome::DeniedByPolicy {
                direction: "ingress",
                endpoint: None,
            }
        },
    };
    let matrix = ProbeMatrix {
        via: Via::PodIp,
        sources: vec!["x/a".into(), "x/b".into()],
        destinations: vec!["x/a".into(), "x/b".into()],
        probes: vec![
            probe("x/a", "x/a", Protocol::Tcp, true),
            probe("x/a", "x/b", Protocol::Tcp, false),
            probe("x/b", "x/a", Protocol::Tcp, true),
            probe("x/b", "x/b", Protocol::Tcp, true),
            probe("x/a", "x/b", Protocol::Udp, true),
        ],
    };
    assert_eq!(
        matrix.render(),
        "80/TCP via pod-ip: 3 of 4 allowed\n\
         -   x/a x/b\n\
         x/a .   X\n\
         x/b .   .\n\
         \n\
         80/UDP via pod-ip: 1 of 4 allowed\n\
         -   x/a x/b\n\
         x/a ?   .\n\
         x/b ?   ?\n\
         \n"
        .to_string()
            + LEGEND
            + "\n"
    );
    assert_eq!(matrix.allowed("x/a", "x/b", 80, Protocol::Tcp), Some(false));
    assert_eq!(matrix.allowed("x/a", "x/b", 81, Protocol::Tcp), None);
}

#[test]
fn every_outcome_has_its_own_mark() {
    let outcomes = [
        Outcome::Allowed,
        Outcome::DeniedByPolicy {
            direction: "egress",
            endpoint: Some("x/a".into()),
        },
        Outcome::Refused,
        Outcome::Unreachable,
        Outcome::Dropped {
            reason: "INVALID_SOURCE_IP".into(),
        },
        Outcome::TimedOut,
        Outcome::NotRunnable { why: "no".into() },
        Outcome::NotRouted,
    ];
    let marks: BTreeSet<char> = outcomes.iter().map(Outcome::mark).collect();
    assert_eq!(marks.len(), outcomes.len());
    for o in &outcomes {
        assert!(
            LEGEND.contains(&format!("{} ", o.mark())),
            "{o:?} in the legend"
        );
    }
}
