//! The CRI calls a kubelet makes for a pod sandbox, blocking, on a runtime of the client's
//! own (the tests are synchronous).

use std::path::{Path, PathBuf};

use hyper_util::rt::TokioIo;
use tokio::net::UnixStream;
use tonic::{
    Status,
    transport::{Channel, Endpoint, Uri},
};

/// The messages and client generated from `tests/cri/cri.proto` (package runtime.v1).
pub mod proto {
    #![allow(clippy::all, clippy::pedantic, reason = "generated code")]
    tonic::include_proto!("runtime.v1");
}

use proto::runtime_service_client::RuntimeServiceClient;

/// The CRI API version the client speaks.
pub const CRI_API_VERSION: &str = "v1";

pub struct CriClient {
    runtime: tokio::runtime::Runtime,
    client: RuntimeServiceClient<Channel>,
}

impl CriClient {
    /// Connects to the runtime's gRPC socket at `socket`.
    pub fn connect(socket: &Path) -> Result<Self, String> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| format!("tokio runtime: {e}"))?;
        let path: PathBuf = socket.to_path_buf();
        // gRPC wants a URI; the connector ignores it and dials the socket.
        let endpoint = Endpoint::from_static("http://cri.invalid");
        let channel = runtime
            .block_on(
                endpoint.connect_with_connector(tower::service_fn(move |_: Uri| {
                    let path = path.clone();
                    async move { UnixStream::connect(path).await.map(TokioIo::new) }
                })),
            )
            .map_err(|e| format!("connect to {}: {e:?}", socket.display()))?;
        Ok(Self {
            runtime,
            client: RuntimeServiceClient::new(channel),
        })
    }

    pub fn version(&mut self) -> Result<proto::VersionResponse, Status> {
        let request = proto::VersionRequest {
            version: CRI_API_VERSION.into(),
        };
        let call = self.client.version(request);
        self.runtime.block_on(call).map(tonic::Response::into_inner)
    }

    /// Runs a sandbox and returns its id.
    pub fn run_pod_sandbox(&mut self, config: proto::PodSandboxConfig) -> Result<String, Status> {
        let request = proto::RunPodSandboxRequest {
            config: Some(config),
            runtime_handler: String::new(),
        };
        let call = self.client.run_pod_sandbox(request);
        let response = self.runtime.block_on(call)?;
        Ok(response.into_inner().pod_sandbox_id)
    }

    /// The sandbox's status and, verbose, the runtime's `info` about it.
    pub fn pod_sandbox_status(
        &mut self,
        id: &str,
    ) -> Result<proto::PodSandboxStatusResponse, Status> {
        let request = proto::PodSandboxStatusRequest {
            pod_sandbox_id: id.into(),
            verbose: true,
        };
        let call = self.client.pod_sandbox_status(request);
        self.runtime.block_on(call).map(tonic::Response::into_inner)
    }

    pub fn stop_pod_sandbox(&mut self, id: &str) -> Result<(), Status> {
        let request = proto::StopPodSandboxRequest {
            pod_sandbox_id: id.into(),
        };
        let call = self.client.stop_pod_sandbox(request);
        self.runtime.block_on(call).map(drop)
    }

    pub fn remove_pod_sandbox(&mut self, id: &str) -> Result<(), Status> {
        let request = proto::RemovePodSandboxRequest {
            pod_sandbox_id: id.into(),
        };
        let call = self.client.remove_pod_sandbox(request);
        self.runtime.block_on(call).map(drop)
    }

    /// Every sandbox the runtime knows.
    pub fn list_pod_sandbox(&mut self) -> Result<Vec<proto::PodSandbox>, Status> {
        let call = self
            .client
            .list_pod_sandbox(proto::ListPodSandboxRequest { filter: None });
        let response = self.runtime.block_on(call)?;
        Ok(response.into_inner().items)
    }
}
