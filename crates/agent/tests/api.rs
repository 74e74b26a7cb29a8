//! The local API and the probes of a real agent process: its datapath loaded, its socket
//! served by axum (needs root and bpffs; never skipped).

// Helpers outside #[test] functions panic too: a failed step fails the test.
#![allow(clippy::expect_used)]

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpListener},
    os::unix::net::UnixStream,
    path::{Path, PathBuf},
    process::{Child, Command},
    time::{Duration, Instant},
};

use sluice_api::{ApiError, Client, VerifyRequest, flow::ObserveRequest};
use sluice_datapath::PinDir;

/// The agent process and its files, stopped and removed on drop even when the test fails.
struct Agent {
    child: Child,
    dir: PathBuf,
    socket: PathBuf,
    metrics: SocketAddr,
    _pins: PinDir,
}

impl Agent {
    fn start(name: &str) -> Self {
        let pins = PinDir::unique(&format!("sluice-test-{name}-"));
        let dir = std::env::temp_dir().join(format!("sluice-test-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("test directory");
        // In a directory the agent makes itself, as /run/sluice on a node.
        let socket = dir.join("run").join("agent.sock");
        // An empty cluster: the agent is ready once it has realized it.
        sluice_store::Snapshot::default()
            .write_file(&dir.join("cluster.json"))
            .expect("write the cluster file");
        // A free loopback port: bound, read, released for the agent.
        let metrics = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port");
        let child = Command::new(env!("CARGO_BIN_EXE_sluice-agent"))
            .args(["--node", "node-1", "--reconcile-interval", "0.2"])
            .arg("--cluster-file")
            .arg(dir.join("cluster.json"))
            .arg("--pin-dir")
            .arg(pins.path())
            .arg("--api-socket")
            .arg(&socket)
            .arg("--state-dir")
            .arg(dir.join("state"))
            .arg("--metrics-address")
            .arg(metrics.to_string())
            .spawn()
            .expect("start sluice-agent");
        Self {
            child,
            dir,
            socket,
            metrics,
            _pins: pins,
        }
    }

    fn client(&self) -> Client {
        Client::new(&self.socket)
    }

    /// Waits until `/readyz` answers 200: the first pass realized the maps.
    fn wait_ready(&mut self) {
        let started = Instant::now();
        loop {
            match sluice_api::scrape(self.metrics, "/readyz", Duration::from_secs(2)) {
                Ok(body) => {
                    assert_eq!(body, "ready\n");
                    return;
                }
                Err(e) if started.elapsed() < Duration::from_secs(30) => {
                    if let Ok(Some(status)) = self.child.try_wait() {
                        panic!("the agent exited with {status} before it was ready: {e}");
                    }
                    std::thread::sleep(Duration::from_millis(50));
                }
                Err(e) => panic!("not ready after 30 s: {e}"),
            }
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// One raw HTTP/1.1 request on the socket: the status line and the body.
fn raw(socket: &Path, request: &str) -> (String, String) {
    let mut stream = UnixStream::connect(socket).expect("connect to the agent");
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    stream.write_all(request.as_bytes()).expect("write");
    let mut response = String::new();
    stream.read_to_string(&mut response).expect("read");
    let (head, body) = response.split_once("\r\n\r\n").expect("head and body");
    (
        head.lines().next().unwrap_or_default().to_string(),
        body.to_string(),
    )
}

#[test]
fn api_answers_typed_requests_and_refuses_the_rest() {
    let mut agent = Agent::start("api");
    agent.wait_ready();
    assert_eq!(
        sluice_api::scrape(agent.metrics, "/healthz", Duration::from_secs(2)).expect("healthz"),
        "ok\n"
    );
    let metrics =
        sluice_api::scrape(agent.metrics, "/metrics", Duration::from_secs(5)).expect("metrics");
    assert!(metrics.contains("sluice_build_info"), "{metrics}");

    let api = agent.client();
    let status = api.status().expect("status");
    assert!(status.healthy, "{status:?}");
    assert_eq!(status.node, "node-1");
    assert!(api.services().expect("services").is_empty());
    assert!(api.endpoints().expect("endpoints").is_empty());
    let report = api.verify(VerifyRequest { repair: false }).expect("verify");
    assert!(report.drift.is_empty(), "{:?}", report.drift);
    let flows: Vec<_> = api
        .observe(&ObserveRequest::default())
        .expect("observe")
        .collect::<Result<_, _>>()
        .expect("flows");
    assert!(flows.is_empty(), "{flows:?}");

    // A refusal carries its status and the agent's message, printed as before.
    let refused = api
        .endpoint("default/nobody")
        .expect_err("an unknown endpoint is refused");
    let text = refused.to_string();
    assert!(text.starts_with("agent at "), "{text}");
    assert!(
        text.contains("answered: no endpoint \"default/nobody\" on node node-1"),
        "{text}"
    );
    match refused {
        ApiError::Agent { status, .. } => assert_eq!(status.as_u16(), 404),
        other => panic!("not the agent's refusal: {other:?}"),
    }
    let close = "HTTP/1.1\r\nHost: agent\r\nConnection: close\r\n\r\n";
    let (status, body) = raw(&agent.socket, &format!("GET /v1/identity?id=many {close}"));
    assert!(status.starts_with("HTTP/1.1 400 "), "{status}");
    assert!(body.contains("malformed request"), "{body}");
    let (status, body) = raw(&agent.socket, &format!("GET /v1/nothing {close}"));
    assert!(status.starts_with("HTTP/1.1 404 "), "{status}");
    assert!(body.contains("no route GET /v1/nothing"), "{body}");
    let (status, _) = raw(&agent.socket, &format!("GET /v1/verify {close}"));
    assert!(status.starts_with("HTTP/1.1 405 "), "{status}");
}

/// Runs `python3 -c code` as nobody (uid and gid 65534): its exit status and stderr.
fn as_nobody(code: &str) -> (bool, String) {
    use std::os::unix::process::CommandExt;
    let out = Command::new("python3")
        .args(["-c", code])
        .uid(65534)
        .gid(65534)
        .output()
        .expect("python3 as nobody");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn only_root_reaches_the_api_and_the_probes_change_nothing() {
    use std::os::unix::fs::PermissionsExt;
    let mut agent = Agent::start("api-perms");
    agent.wait_ready();
    let mode = |p: &Path| std::fs::metadata(p).expect("stat").permissions().mode() & 0o777;
    assert_eq!(mode(&agent.socket), 0o600, "the socket");
    assert_eq!(
        mode(agent.socket.parent().expect("its directory")),
        0o700,
        "its directory"
    );

    // An unprivileged process can neither reach the socket's directory nor the socket.
    let connect = format!(
        "import socket; s = socket.socket(socket.AF_UNIX); s.connect({:?}); \
         s.sendall(b'GET /v1/status HTTP/1.1\\r\\nHost: a\\r\\n\\r\\n'); print(s.recv(100))",
        agent.socket.display().to_string()
    );
    let (ok, stderr) = as_nobody(&connect);
    assert!(
        !ok && stderr.contains("PermissionError"),
        "nobody connected: {stderr}"
    );
    // Even with the directory open to all, the socket itself refuses.
    let parent = agent.socket.parent().expect("its directory").to_path_buf();
    std::fs::set_permissions(&parent, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    std::fs::set_permissions(&agent.dir, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let (ok, stderr) = as_nobody(&connect);
    assert!(
        !ok && stderr.contains("PermissionError"),
        "nobody connected: {stderr}"
    );
    // Root still can.
    assert!(agent.client().status().expect("status").healthy);

    // The probes answer reads only: a write is refused and changes nothing.
    let post = format!(
        "import urllib.request as u, urllib.error as e\n\
         try:\n  u.urlopen(u.Request('http://{}/metrics', data=b'x', method='POST'), timeout=5)\n\
         except e.HTTPError as x:\n  print(x.code)\n",
        agent.metrics
    );
    let out = Command::new("python3")
        .args(["-c", &post])
        .output()
        .expect("python3");
    let code = String::from_utf8_lossy(&out.stdout).trim().to_string();
    assert_eq!(
        code,
        "405",
        "POST /metrics: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}
