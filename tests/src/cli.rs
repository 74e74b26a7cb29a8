//! Support for the tests of the `sluice` command (tests/tests/cli_*.rs): a small app to
//! apply, a directory removed on drop, and the binary run with input on stdin.

use std::{fs, io::Write, path::PathBuf, process::Stdio};

use crate::TestLab;

/// A pod `web` serving TCP 80 behind the Service `web`, and a pod `client`.
pub const WEB_AND_CLIENT: &str = "apiVersion: v1
kind: Pod
metadata: {name: web, labels: {app: web}}
spec:
  containers: [{name: web, image: nginx, ports: [{containerPort: 80}]}]
---
apiVersion: v1
kind: Pod
metadata: {name: client, labels: {app: client}}
spec:
  containers: [{name: client, image: curl}]
---
apiVersion: v1
kind: Service
metadata: {name: web}
spec:
  selector: {app: web}
  ports: [{port: 80, protocol: TCP}]
";

/// Removes a directory a test made, also when it fails.
pub struct RemoveDir(pub PathBuf);

impl Drop for RemoveDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

impl TestLab {
    /// `sluice <args>` against this lab with `input` on stdin.
    pub fn cli_stdin(&self, args: &[&str], input: &str) -> std::process::Output {
        let mut child = self
            .cli_command(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        child
            .stdin
            .take()
            .unwrap()
            .write_all(input.as_bytes())
            .unwrap();
        child.wait_with_output().unwrap()
    }
}
