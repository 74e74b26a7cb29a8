//! What the runtime says through the environment (SPEC.md, "Parameters").

use crate::CniError;

/// `CNI_COMMAND`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Command {
    Add,
    Del,
    Check,
    Status,
    Version,
    Gc,
}

impl Command {
    pub fn name(self) -> &'static str {
        match self {
            Self::Add => "ADD",
            Self::Del => "DEL",
            Self::Check => "CHECK",
            Self::Status => "STATUS",
            Self::Version => "VERSION",
            Self::Gc => "GC",
        }
    }
}

/// The `CNI_*` variables.
#[derive(Clone, Debug)]
pub struct Runtime {
    pub command: Command,
    container_id: Option<String>,
    netns: Option<String>,
    ifname: Option<String>,
    args: Option<String>,
}

/// The pod a container belongs to, from `CNI_ARGS` as the kubelet's runtime passes it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodRef {
    pub namespace: String,
    pub name: String,
}

impl Runtime {
    /// Reads the variables through `var` (the process environment, or a test's map); an
    /// empty value counts as unset.
    pub fn from_vars(var: impl Fn(&str) -> Option<String>) -> Result<Self, CniError> {
        let get = |name: &str| var(name).filter(|v| !v.is_empty());
        let command = match get("CNI_COMMAND").as_deref() {
            None => return Err(CniError::NoCommand),
            Some("ADD") => Command::Add,
            Some("DEL") => Command::Del,
            Some("CHECK") => Command::Check,
            Some("STATUS") => Command::Status,
            Some("VERSION") => Command::Version,
            Some("GC") => Command::Gc,
            Some(other) => return Err(CniError::UnknownCommand(other.into())),
        };
        Ok(Self {
            command,
            container_id: get("CNI_CONTAINERID"),
            netns: get("CNI_NETNS"),
            ifname: get("CNI_IFNAME"),
            args: get("CNI_ARGS"),
        })
    }

    fn required(&self, var: &'static str, value: Option<&String>) -> Result<String, CniError> {
        value.cloned().ok_or(CniError::MissingVar {
            var,
            command: self.command.name(),
        })
    }

    pub fn container_id(&self) -> Result<String, CniError> {
        self.required("CNI_CONTAINERID", self.container_id.as_ref())
    }

    pub fn netns(&self) -> Result<String, CniError> {
        self.required("CNI_NETNS", self.netns.as_ref())
    }

    /// DEL may come after the namespace is gone, without one.
    pub fn netns_if_given(&self) -> Option<&str> {
        self.netns.as_deref()
    }

    pub fn ifname(&self) -> Result<String, CniError> {
        self.required("CNI_IFNAME", self.ifname.as_ref())
    }

    /// `K8S_POD_NAMESPACE` and `K8S_POD_NAME` of `CNI_ARGS` (`KEY=VALUE` pairs joined by
    /// `;`): the Pod whose labels give the endpoint its identity.
    pub fn pod(&self) -> Result<PodRef, CniError> {
        let args = self.required("CNI_ARGS", self.args.as_ref())?;
        let (mut namespace, mut name) = (None, None);
        for pair in args.split(';').filter(|p| !p.is_empty()) {
            let (key, value) = pair
                .split_once('=')
                .ok_or_else(|| CniError::BadArgs(format!("{pair:?} is no KEY=VALUE pair")))?;
            match key {
                "K8S_POD_NAMESPACE" => namespace = Some(value.to_string()),
                "K8S_POD_NAME" => name = Some(value.to_string()),
                _ => {}
            }
        }
        let missing = |key| CniError::BadArgs(format!("{key} is missing or empty"));
        Ok(PodRef {
            namespace: namespace
                .filter(|v| !v.is_empty())
                .ok_or_else(|| missing("K8S_POD_NAMESPACE"))?,
            name: name
                .filter(|v| !v.is_empty())
                .ok_or_else(|| missing("K8S_POD_NAME"))?,
        })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "test")]

    use super::*;

    fn runtime(vars: &[(&str, &str)]) -> Result<Runtime, CniError> {
        Runtime::from_vars(|name| {
            vars.iter()
                .find(|(k, _)| *k == name)
                .map(|(_, v)| (*v).to_string())
        })
    }

    /// containerd's CNI_ARGS (unknown keys, IgnoreUnknown) give the pod; a pair without
    /// `=`, or a missing or empty pod key, is refused naming it.
    #[test]
    fn cni_args_name_the_pod() {
        let args = "IgnoreUnknown=1;K8S_POD_NAMESPACE=shop;K8S_POD_NAME=web-0;K8S_POD_UID=u";
        let pod = runtime(&[("CNI_COMMAND", "ADD"), ("CNI_ARGS", args)])
            .unwrap()
            .pod()
            .unwrap();
        assert_eq!(
            pod,
            PodRef {
                namespace: "shop".into(),
                name: "web-0".into()
            }
        );
        for (args, named) in [
            ("K8S_POD_NAMESPACE=shop;junk", "\"junk\""),
            ("K8S_POD_NAMESPACE=shop", "K8S_POD_NAME"),
            ("K8S_POD_NAMESPACE=;K8S_POD_NAME=web-0", "K8S_POD_NAMESPACE"),
        ] {
            let error = runtime(&[("CNI_COMMAND", "ADD"), ("CNI_ARGS", args)])
                .unwrap()
                .pod()
                .unwrap_err();
            assert!(error.to_string().contains(named), "{args}: {error}");
        }
    }

    /// An empty variable is an unset one; the command is checked first.
    #[test]
    fn variables_are_required_by_name() {
        assert!(matches!(runtime(&[]), Err(CniError::NoCommand)));
        assert!(matches!(
            runtime(&[("CNI_COMMAND", "add")]),
            Err(CniError::UnknownCommand(_))
        ));
        let add = runtime(&[("CNI_COMMAND", "ADD"), ("CNI_NETNS", "")]).unwrap();
        let error = add.netns().unwrap_err();
        assert_eq!(error.to_string(), "CNI_NETNS is not set (ADD needs it)");
    }
}
