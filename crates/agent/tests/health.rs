//! healthCheckNodePort servers with real sockets in a network namespace of the test's own
//! (needs root; never skipped): they bind the node's addresses, answer any path with
//! kube-proxy's JSON, 503 without local endpoints and 200 with, follow the compiled state
//! without restarting, and close their port when the Service goes.

use std::net::{Ipv4Addr, SocketAddr};

use http_body_util::{BodyExt, Empty};
use hyper::{Request, body::Bytes};
use hyper_util::rt::TokioIo;
use sluice_agent::health::HealthServers;
use sluice_compiler::{DesiredState, HealthCheck};
use sluice_netns::OwnedNetNs;
use tokio::net::TcpStream;

const NODE: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 11);
const PORT: u16 = 31000;

fn desired(local_endpoints: Option<usize>) -> DesiredState {
    let mut state = DesiredState {
        node_addresses: vec![NODE],
        ..DesiredState::default()
    };
    if let Some(local_endpoints) = local_endpoints {
        state.health_checks.insert(
            PORT,
            HealthCheck {
                namespace: "default".into(),
                name: "web".into(),
                local_endpoints,
            },
        );
    }
    state
}

/// `GET path` on the node's health check port: status and body.
async fn get(path: &str) -> std::io::Result<(u16, String)> {
    let stream = TcpStream::connect(SocketAddr::from((NODE, PORT))).await?;
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(std::io::Error::other)?;
    tokio::spawn(connection);
    let request = Request::get(path)
        .header("host", NODE.to_string())
        .body(Empty::<Bytes>::new())
        .map_err(std::io::Error::other)?;
    let response = sender
        .send_request(request)
        .await
        .map_err(std::io::Error::other)?;
    let status = response.status().as_u16();
    let body = response
        .into_body()
        .collect()
        .await
        .map_err(std::io::Error::other)?
        .to_bytes();
    Ok((status, String::from_utf8_lossy(&body).into_owned()))
}

#[test]
fn health_check_answers_follow_the_local_endpoints() {
    let ns = OwnedNetNs::unique("sluice-hc-").unwrap_or_else(|e| panic!("netns: {e}"));
    let netlink = ns.netlink().unwrap_or_else(|e| panic!("netlink: {e}"));
    netlink
        .set_up("lo")
        .unwrap_or_else(|e| panic!("lo up: {e}"));
    netlink
        .add_address("lo", ipnet::IpNet::from(ipnet::Ipv4Net::from(NODE)))
        .unwrap_or_else(|e| panic!("node address: {e}"));

    let answers = ns
        .run(|| {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap_or_else(|e| panic!("runtime: {e}"));
            runtime.block_on(async {
                let mut servers = HealthServers::default();
                servers.follow(&desired(Some(0))).await;
                assert_eq!(servers.ports(), [PORT]);
                let none = get("/healthz").await;
                servers.follow(&desired(Some(2))).await;
                let two = get("/any/path").await;
                servers.follow(&desired(None)).await;
                assert!(servers.ports().is_empty());
                let gone = get("/").await;
                (none, two, gone)
            })
        })
        .unwrap_or_else(|e| panic!("in the namespace: {e}"));

    let (none, two, gone) = answers;
    let body = |n: usize| {
        format!(r#"{{"service":{{"namespace":"default","name":"web"}},"localEndpoints":{n}}}"#)
    };
    assert_eq!(none.unwrap_or_else(|e| panic!("GET: {e}")), (503, body(0)));
    assert_eq!(two.unwrap_or_else(|e| panic!("GET: {e}")), (200, body(2)));
    let refused = gone.expect_err("the port is closed once the Service is gone");
    assert_eq!(
        refused.kind(),
        std::io::ErrorKind::ConnectionRefused,
        "{refused}"
    );
}
