//! Kernel parameters of one namespace (what `sysctl -w` does inside it): /proc/sys/net
//! shows the values of the namespace of the thread that opens the file.

use std::{fs, path::PathBuf};

use crate::{NetNs, NetNsError, error::io_err};

/// `net.ipv4.ip_forward` → /proc/sys/net/ipv4/ip_forward. A key already written with
/// slashes is taken as it is (the form for interface names with a dot, like `eth0.100`).
fn sysctl_path(key: &str) -> PathBuf {
    let relative = if key.contains('/') {
        key.to_string()
    } else {
        key.replace('.', "/")
    };
    PathBuf::from("/proc/sys").join(relative)
}

impl NetNs {
    /// Writes each `(key, value)` in order, from one thread inside the namespace.
    pub fn set_sysctls(&self, settings: &[(&str, &str)]) -> Result<(), NetNsError> {
        self.run(|| {
            settings.iter().try_for_each(|(key, value)| {
                let path = sysctl_path(key);
                fs::write(&path, value).map_err(io_err("write", path))
            })
        })?
    }

    /// The value of `key`, without its trailing newline.
    pub fn sysctl(&self, key: &str) -> Result<String, NetNsError> {
        let path = sysctl_path(key);
        let value = self.run(|| fs::read_to_string(&path))?;
        Ok(value.map_err(io_err("read", &path))?.trim_end().to_string())
    }
}
