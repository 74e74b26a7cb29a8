//! The flows of several agents as one stream, as Hubble Relay merges its peers': buffered
//! flows ordered by time across nodes, followed flows interleaved as they arrive. Each
//! agent filters its own flows; the merge only orders them and names their node.

use std::{sync::mpsc, thread};

use sluice_api::flow::Flow;

/// The flows one agent sent, with the node that agent runs on when the caller knows it
/// (a lab does; a bare list of sockets does not).
#[derive(Clone, Debug, Default)]
pub struct SourceFlows {
    pub node: Option<String>,
    pub flows: Vec<Flow>,
}

/// The `last` most recent of all `sources`' flows (every one if None), oldest first.
/// Flows of the same time keep the order of their sources, so the result is deterministic.
pub fn merge_last(sources: Vec<SourceFlows>, last: Option<usize>) -> Vec<Flow> {
    let mut all: Vec<Flow> = sources
        .into_iter()
        .flat_map(|s| {
            let node = s.node;
            s.flows.into_iter().map(move |f| tagged(f, node.as_deref()))
        })
        .collect();
    // Stable: an agent's own order survives among flows of equal time.
    all.sort_by_key(|f| f.time);
    let skip = last.map_or(0, |n| all.len().saturating_sub(n));
    all.split_off(skip)
}

/// What one of several followed sources produced.
#[derive(Debug)]
pub enum Arrival<E> {
    Flow(Box<Flow>),
    /// The source failed; it sends nothing more, the others go on.
    Failed {
        source: String,
        error: E,
    },
    /// The source's stream ended (its agent closed it).
    Ended {
        source: String,
    },
}

/// A followed source: its name for messages (a node or a socket), the node to tag its
/// flows with when the agent left it out, and its flows.
pub struct FollowSource<I> {
    pub name: String,
    pub node: Option<String>,
    pub flows: I,
}

/// Every source's flows as they arrive, each source read by a thread of its own (the
/// agents' streams block). Ends when every source has ended or failed; a source's thread
/// stops at its next flow once the returned iterator is dropped.
pub fn interleave<I, E>(sources: Vec<FollowSource<I>>) -> impl Iterator<Item = Arrival<E>>
where
    I: Iterator<Item = Result<Flow, E>> + Send + 'static,
    E: Send + 'static,
{
    let (sender, receiver) = mpsc::channel();
    for source in sources {
        let sender = sender.clone();
        thread::spawn(move || forward(source, &sender));
    }
    receiver.into_iter()
}

fn forward<I, E>(source: FollowSource<I>, sender: &mpsc::Sender<Arrival<E>>)
where
    I: Iterator<Item = Result<Flow, E>>,
{
    for item in source.flows {
        let arrival = match item {
            Ok(flow) => Arrival::Flow(Box::new(tagged(flow, source.node.as_deref()))),
            Err(error) => {
                let _ = sender.send(Arrival::Failed {
                    source: source.name,
                    error,
                });
                return;
            }
        };
        // The reader went away: nobody wants the rest.
        if sender.send(arrival).is_err() {
            return;
        }
    }
    let _ = sender.send(Arrival::Ended {
        source: source.name,
    });
}

/// A flow names the node it was seen on; the agent sets it, this covers one that has not
/// learnt its name yet.
fn tagged(mut flow: Flow, node: Option<&str>) -> Flow {
    if let (true, Some(node)) = (flow.node_name.is_empty(), node) {
        flow.node_name = node.to_string();
    }
    flow
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use sluice_api::flow::Timestamp;

    use super::*;

    /// A flow at `time` ns seen on `node` ("" when the agent left it out), told apart by
    /// its source port.
    fn flow(time: i64, node: &str, port: u16) -> Flow {
        serde_json::from_value(serde_json::json!({
            "time": Timestamp(time),
            "verdict": "FORWARDED",
            "IP": {"source": "10.244.1.5", "destination": "10.244.2.7", "ipVersion": "IPv4"},
            "l4": {"UDP": {"source_port": port, "destination_port": 53}},
            "source": {"identity": 1234},
            "destination": {"identity": 5678},
            "Type": "L3_L4",
            "node_name": node,
            "event_type": {"type": 4, "sub_type": 0},
            "traffic_direction": "EGRESS",
            "is_reply": false,
            "Summary": "UDP",
        }))
        .unwrap()
    }

    fn source(node: &str, times: &[i64]) -> SourceFlows {
        SourceFlows {
            node: Some(node.into()),
            flows: times.iter().map(|&t| flow(t, node, 1000)).collect(),
        }
    }

    fn times_and_nodes(flows: &[Flow]) -> Vec<(i64, &str)> {
        flows
            .iter()
            .map(|f| (f.time.0, f.node_name.as_str()))
            .collect()
    }

    #[test]
    fn buffered_flows_of_every_node_come_in_time_order() {
        let merged = merge_last(
            vec![source("node-1", &[10, 30, 50]), source("node-2", &[20, 40])],
            None,
        );
        assert_eq!(
            times_and_nodes(&merged),
            [
                (10, "node-1"),
                (20, "node-2"),
                (30, "node-1"),
                (40, "node-2"),
                (50, "node-1")
            ]
        );
    }

    #[test]
    fn last_n_are_the_most_recent_across_nodes_not_per_node() {
        // Each agent sent its own last 3; the newest 3 overall are all but one from node-2.
        let merged = merge_last(
            vec![
                source("node-1", &[1, 2, 60]),
                source("node-2", &[40, 50, 70]),
                SourceFlows::default(),
            ],
            Some(3),
        );
        assert_eq!(
            times_and_nodes(&merged),
            [(50, "node-2"), (60, "node-1"), (70, "node-2")]
        );
        assert!(merge_last(vec![source("node-1", &[1, 2])], Some(0)).is_empty());
        assert_eq!(
            merge_last(vec![source("node-1", &[1, 2])], Some(9)).len(),
            2
        );
    }

    #[test]
    fn equal_times_keep_the_order_of_sources_and_an_untagged_flow_gets_its_node() {
        let untagged = SourceFlows {
            node: Some("node-2".into()),
            flows: vec![flow(5, "", 1), flow(5, "", 2)],
        };
        let merged = merge_last(vec![source("node-1", &[5]), untagged], None);
        assert_eq!(
            times_and_nodes(&merged),
            [(5, "node-1"), (5, "node-2"), (5, "node-2")]
        );
        assert_eq!(merged[1].ports(), Some((1, 53)));
        // A node the agent named is never overwritten by the caller's guess.
        let named = SourceFlows {
            node: Some("elsewhere".into()),
            flows: vec![flow(1, "node-3", 1)],
        };
        assert_eq!(merge_last(vec![named], None)[0].node_name, "node-3");
    }

    /// A followed source that yields `flows` one by one, `gap` apart, then fails or ends.
    fn followed(
        name: &str,
        flows: Vec<Flow>,
        gap: Duration,
        fail: bool,
    ) -> FollowSource<impl Iterator<Item = Result<Flow, String>> + Send + 'static> {
        let error = fail.then(|| format!("{name}: connection reset"));
        let items = flows
            .into_iter()
            .map(Ok)
            .chain(error.map(Err))
            .inspect(move |_| std::thread::sleep(gap));
        FollowSource {
            name: name.into(),
            node: Some(name.into()),
            flows: items,
        }
    }

    #[test]
    fn followed_flows_interleave_by_arrival_and_a_failed_source_leaves_the_others() {
        let ms = Duration::from_millis;
        let arrivals: Vec<_> = interleave(vec![
            // node-1 is slow: its flows arrive after node-2's although they are older.
            followed(
                "node-1",
                vec![flow(1, "", 1), flow(2, "", 2)],
                ms(150),
                false,
            ),
            followed("node-2", vec![flow(9, "", 3)], ms(10), true),
        ])
        .collect();
        let mut flows = Vec::new();
        let mut failed = Vec::new();
        let mut ended = Vec::new();
        for a in arrivals {
            match a {
                Arrival::Flow(f) => flows.push((f.time.0, f.node_name)),
                Arrival::Failed { source, error } => failed.push((source, error)),
                Arrival::Ended { source } => ended.push(source),
            }
        }
        assert_eq!(
            flows,
            [
                (9, "node-2".to_string()),
                (1, "node-1".to_string()),
                (2, "node-1".to_string())
            ]
        );
        assert_eq!(
            failed,
            [("node-2".to_string(), "node-2: connection reset".to_string())]
        );
        assert_eq!(ended, ["node-1"]);
    }

    #[test]
    fn a_dropped_reader_stops_the_sources() {
        let endless = FollowSource {
            name: "node-1".to_string(),
            node: None,
            flows: (0..).map(|t| Ok::<_, String>(flow(t, "node-1", 1))),
        };
        let first: Vec<_> = interleave(vec![endless]).take(3).collect();
        assert_eq!(first.len(), 3);
    }
}
