//! Kubernetes manifests, read like `kubectl apply -f` reads them.
//!
//! A path is a file or a directory (its `*.yaml`, `*.yml` and `*.json` files, sorted, not
//! recursive). A file holds one or more documents separated by `---` lines; empty documents
//! are skipped and a `kind: List` is expanded into its `items`. Every object is decoded into
//! its k8s-openapi type and validated (see `validate.rs`) before anything is returned, so a
//! caller either gets every object or the first error, never half a load.

use std::{
    collections::BTreeMap,
    fs,
    path::{Path, PathBuf},
};

use k8s_openapi::{
    api::{
        apps::v1::Deployment,
        core::v1::{Namespace, Pod, Service},
        discovery::v1::EndpointSlice,
        networking::v1::NetworkPolicy,
    },
    apimachinery::pkg::apis::meta::v1::ObjectMeta,
};
use serde::de::DeserializeOwned;
use serde_json::Value;
use serde_saphyr::{RenderOptions, SnippetMode, UserMessageFormatter};

use crate::validate::{self, Invalid};

/// The object kinds this source accepts, as (apiVersion, kind), in the order messages list them.
const SUPPORTED: &[(&str, &str)] = &[
    ("v1", "Namespace"),
    ("v1", "Pod"),
    ("v1", "Service"),
    ("apps/v1", "Deployment"),
    ("discovery.k8s.io/v1", "EndpointSlice"),
    ("networking.k8s.io/v1", "NetworkPolicy"),
];

/// Extensions of the files taken from a directory, as kubectl does.
const EXTENSIONS: &[&str] = &["yaml", "yml", "json"];

/// A decoded, validated Kubernetes object.
#[derive(Clone, Debug, PartialEq)]
pub enum Object {
    Namespace(Namespace),
    Pod(Pod),
    Deployment(Deployment),
    Service(Service),
    EndpointSlice(EndpointSlice),
    NetworkPolicy(NetworkPolicy),
}

impl Object {
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Namespace(_) => "Namespace",
            Self::Pod(_) => "Pod",
            Self::Deployment(_) => "Deployment",
            Self::Service(_) => "Service",
            Self::EndpointSlice(_) => "EndpointSlice",
            Self::NetworkPolicy(_) => "NetworkPolicy",
        }
    }

    pub fn metadata(&self) -> &ObjectMeta {
        match self {
            Self::Namespace(o) => &o.metadata,
            Self::Pod(o) => &o.metadata,
            Self::Deployment(o) => &o.metadata,
            Self::Service(o) => &o.metadata,
            Self::EndpointSlice(o) => &o.metadata,
            Self::NetworkPolicy(o) => &o.metadata,
        }
    }

    fn metadata_mut(&mut self) -> &mut ObjectMeta {
        match self {
            Self::Namespace(o) => &mut o.metadata,
            Self::Pod(o) => &mut o.metadata,
            Self::Deployment(o) => &mut o.metadata,
            Self::Service(o) => &mut o.metadata,
            Self::EndpointSlice(o) => &mut o.metadata,
            Self::NetworkPolicy(o) => &mut o.metadata,
        }
    }

    /// Decodes `value` as the type named by `api_version` and `kind`; `None` if unsupported.
    fn decode(api_version: &str, kind: &str, value: Value) -> Option<Result<Self, Invalid>> {
        Some(match (api_version, kind) {
            ("v1", "Namespace") => decode(value).map(Self::Namespace),
            ("v1", "Pod") => decode(value).map(Self::Pod),
            ("v1", "Service") => decode(value).map(Self::Service),
            ("apps/v1", "Deployment") => decode(value).map(Self::Deployment),
            ("discovery.k8s.io/v1", "EndpointSlice") => decode(value).map(Self::EndpointSlice),
            ("networking.k8s.io/v1", "NetworkPolicy") => decode(value).map(Self::NetworkPolicy),
            _ => return None,
        })
    }
}

/// One object and where it came from.
#[derive(Clone, Debug, PartialEq)]
pub struct Manifest {
    pub file: PathBuf,
    /// 1-based position of the document in its file.
    pub document: usize,
    pub object: Object,
}

impl Manifest {
    pub fn kind(&self) -> &'static str {
        self.object.kind()
    }

    /// The object's namespace ("default" if unset); "" for a Namespace, which has none.
    pub fn namespace(&self) -> &str {
        if !is_namespaced(self.kind()) {
            return "";
        }
        self.object
            .metadata()
            .namespace
            .as_deref()
            .unwrap_or("default")
    }

    pub fn name(&self) -> &str {
        self.object.metadata().name.as_deref().unwrap_or("")
    }

    /// `Kind namespace/name` (`Kind name` for a Namespace), for messages.
    pub fn describe(&self) -> String {
        describe(self.kind(), self.namespace(), self.name())
    }
}

/// Why a load was refused, and where.
///
/// Displays as `web.yaml: document 2: Service default/web: spec.ports[0].port: must be
/// between 1 and 65535 (got 70000)`, leaving out the parts that are unknown.
#[derive(Debug, thiserror::Error)]
#[error("{}", self.render())]
pub struct ManifestError {
    pub file: PathBuf,
    pub document: Option<usize>,
    /// `Kind namespace/name` of the object, once known.
    pub object: Option<String>,
    /// Path of the offending field, e.g. `spec.ports[0].port`.
    pub field: Option<String>,
    pub message: String,
}

impl ManifestError {
    fn render(&self) -> String {
        let mut out = format!("{}: ", self.file.display());
        if let Some(document) = self.document {
            out.push_str(&format!("document {document}: "));
        }
        for part in [&self.object, &self.field].into_iter().flatten() {
            out.push_str(part);
            out.push_str(": ");
        }
        out.push_str(&self.message);
        out
    }

    fn file(file: &Path, message: String) -> Self {
        Self {
            file: file.to_path_buf(),
            document: None,
            object: None,
            field: None,
            message,
        }
    }
}

/// The path that stands for standard input, as `kubectl apply -f -` has it.
pub const STDIN: &str = "-";

/// Reads every manifest under `paths` (`-` reads standard input), validates all of it, and
/// returns every object or the first error. The same (kind, namespace, name) twice anywhere
/// in the load is an error.
pub fn load_paths(paths: &[PathBuf]) -> Result<Vec<Manifest>, ManifestError> {
    let mut manifests = Vec::new();
    for path in paths {
        if path.as_os_str() == STDIN {
            let mut text = String::new();
            std::io::Read::read_to_string(&mut std::io::stdin(), &mut text)
                .map_err(|e| ManifestError::file(Path::new("stdin"), format!("read: {e}")))?;
            manifests.extend(parse_str(Path::new("stdin"), &text)?);
            continue;
        }
        for file in expand(path)? {
            let text = fs::read_to_string(&file)
                .map_err(|e| ManifestError::file(&file, format!("read: {e}")))?;
            manifests.extend(parse_str(&file, &text)?);
        }
    }
    check_duplicates(&manifests)?;
    Ok(manifests)
}

/// Parses and validates the content of one file; `file` is only used in messages and
/// recorded in each [`Manifest`].
pub fn parse_str(file: &Path, text: &str) -> Result<Vec<Manifest>, ManifestError> {
    let mut manifests = Vec::new();
    for document in split_documents(file, text)? {
        let context = Context {
            file,
            document: document.number,
            object: None,
            prefix: String::new(),
        };
        let value: Value = serde_saphyr::from_str(document.text).map_err(|e| {
            context.error(
                String::new(),
                format!("invalid YAML: {}", yaml_message(&e, document.lines_before)),
            )
        })?;
        // A document with nothing but comments, or an explicit null, holds no object.
        if !value.is_null() {
            collect_objects(&context, value, &mut manifests)?;
        }
    }
    check_duplicates(&manifests)?;
    Ok(manifests)
}

/// The files a path stands for.
fn expand(path: &Path) -> Result<Vec<PathBuf>, ManifestError> {
    let metadata =
        fs::metadata(path).map_err(|e| ManifestError::file(path, format!("stat: {e}")))?;
    if !metadata.is_dir() {
        return Ok(vec![path.to_path_buf()]);
    }
    let read_dir_error = |e: std::io::Error| ManifestError::file(path, format!("read_dir: {e}"));
    let mut files = Vec::new();
    for entry in fs::read_dir(path).map_err(read_dir_error)? {
        let file = entry.map_err(read_dir_error)?.path();
        let wanted = file
            .extension()
            .and_then(|e| e.to_str())
            .is_some_and(|e| EXTENSIONS.contains(&e));
        // fs::metadata follows symlinks, so a linked manifest counts and a linked directory does not.
        if wanted && fs::metadata(&file).is_ok_and(|m| m.is_file()) {
            files.push(file);
        }
    }
    files.sort();
    Ok(files)
}

/// One YAML document of a file.
struct Document<'a> {
    /// 1-based.
    number: usize,
    /// Lines of the file before this document, to report parser positions in file lines.
    lines_before: u64,
    text: &'a str,
}

/// Splits on `---` lines, as kubectl's YAML reader does, so that document numbers and error
/// positions refer to the file the user wrote, and empty documents keep their number.
fn split_documents<'a>(file: &Path, text: &'a str) -> Result<Vec<Document<'a>>, ManifestError> {
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let mut chunks = Vec::new();
    let (mut start, mut start_line, mut offset) = (0, 0u64, 0);
    for (index, line) in text.split_inclusive('\n').enumerate() {
        let line_number = index as u64 + 1;
        let rest = line.trim_end_matches(['\n', '\r']).strip_prefix("---");
        if let Some(rest) = rest.filter(|r| r.is_empty() || r.starts_with([' ', '\t'])) {
            let rest = rest.trim();
            if !rest.is_empty() && !rest.starts_with('#') {
                return Err(ManifestError::file(
                    file,
                    format!(
                        "line {line_number}: only a comment may follow the document separator \"---\""
                    ),
                ));
            }
            chunks.push((start_line, &text[start..offset]));
            start = offset + line.len();
            start_line = line_number;
        }
        offset += line.len();
    }
    chunks.push((start_line, &text[start..]));
    // Comments or directives before a leading `---` are a preamble, not a document.
    if chunks.len() > 1 && is_preamble(chunks[0].1) {
        chunks.remove(0);
    }
    Ok(chunks
        .into_iter()
        .enumerate()
        .map(|(index, (lines_before, text))| Document {
            number: index + 1,
            lines_before,
            text,
        })
        .collect())
}

fn is_preamble(text: &str) -> bool {
    text.lines().all(|line| {
        let line = line.trim();
        line.is_empty() || line.starts_with('#') || line.starts_with('%')
    })
}

/// The parser's message with its position in file lines, without a source snippet.
fn yaml_message(error: &serde_saphyr::Error, lines_before: u64) -> String {
    let formatter = UserMessageFormatter;
    let mut options = RenderOptions::new(&formatter);
    options.snippets = SnippetMode::Off;
    options.line_offset = lines_before;
    error.render_with_options(options)
}

/// Where in the input an object is, for errors.
struct Context<'a> {
    file: &'a Path,
    document: usize,
    object: Option<String>,
    /// Field path of the object inside its document: `items[3]` in a List, else empty.
    prefix: String,
}

impl Context<'_> {
    fn error(&self, field: String, message: String) -> ManifestError {
        let field = join_field(&self.prefix, &field);
        ManifestError {
            file: self.file.to_path_buf(),
            document: Some(self.document),
            object: self.object.clone(),
            field: (!field.is_empty()).then_some(field),
            message,
        }
    }

    fn invalid(&self, invalid: Invalid) -> ManifestError {
        self.error(invalid.field, invalid.message)
    }
}

/// Decodes, defaults and validates the object in `value` (or each item of a List).
fn collect_objects(
    context: &Context<'_>,
    value: Value,
    out: &mut Vec<Manifest>,
) -> Result<(), ManifestError> {
    let Value::Object(mut map) = value else {
        return Err(context.error(
            String::new(),
            format!(
                "expected an object with apiVersion and kind, got {}",
                json_type(&value)
            ),
        ));
    };
    let api_version = required_string(context, &map, "apiVersion")?;
    let kind = required_string(context, &map, "kind")?;
    if (api_version.as_str(), kind.as_str()) == ("v1", "List") {
        let items = match map.remove("items") {
            None | Some(Value::Null) => Vec::new(),
            Some(Value::Array(items)) => items,
            Some(other) => {
                return Err(context.error(
                    "items".into(),
                    format!("expected a list, got {}", json_type(&other)),
                ));
            }
        };
        for (index, item) in items.into_iter().enumerate() {
            let item_context = Context {
                file: context.file,
                document: context.document,
                object: None,
                prefix: join_field(&context.prefix, &format!("items[{index}]")),
            };
            collect_objects(&item_context, item, out)?;
        }
        return Ok(());
    }

    let context = Context {
        object: Some(describe_raw(&kind, &map)),
        prefix: context.prefix.clone(),
        ..*context
    };
    let mut object = Object::decode(&api_version, &kind, Value::Object(map))
        .ok_or_else(|| {
            context.error(
                String::new(),
                format!(
                    "unsupported kind \"{kind}\" in apiVersion \"{api_version}\"; supported: {}",
                    SUPPORTED
                        .iter()
                        .map(|(v, k)| format!("{v} {k}"))
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            )
        })?
        .map_err(|e| context.invalid(e))?;
    // kubectl fills in the namespace of its context; with no kubeconfig that is "default".
    if is_namespaced(object.kind()) && object.metadata().namespace.is_none() {
        object.metadata_mut().namespace = Some("default".into());
    }
    validate::object(&object).map_err(|e| context.invalid(e))?;
    out.push(Manifest {
        file: context.file.to_path_buf(),
        document: context.document,
        object,
    });
    Ok(())
}

fn required_string(
    context: &Context<'_>,
    map: &serde_json::Map<String, Value>,
    key: &str,
) -> Result<String, ManifestError> {
    match map.get(key) {
        Some(Value::String(s)) if !s.is_empty() => Ok(s.clone()),
        None | Some(Value::Null) => Err(context.error(key.into(), "is required".into())),
        Some(Value::String(_)) => Err(context.error(key.into(), "must not be empty".into())),
        Some(other) => Err(context.error(
            key.into(),
            format!("expected a string, got {}", json_type(other)),
        )),
    }
}

/// `describe` from the raw object, before it is decoded, so decode errors can name it.
fn describe_raw(kind: &str, map: &serde_json::Map<String, Value>) -> String {
    let metadata = map.get("metadata");
    let field = |key| metadata.and_then(|m| m.get(key)).and_then(Value::as_str);
    match field("name") {
        Some(name) if is_namespaced(kind) => {
            describe(kind, field("namespace").unwrap_or("default"), name)
        }
        Some(name) => describe(kind, "", name),
        None => kind.to_string(),
    }
}

fn describe(kind: &str, namespace: &str, name: &str) -> String {
    if namespace.is_empty() {
        format!("{kind} {name}")
    } else {
        format!("{kind} {namespace}/{name}")
    }
}

/// Every supported kind but Namespace lives in a namespace.
fn is_namespaced(kind: &str) -> bool {
    kind != "Namespace"
}

fn decode<T: DeserializeOwned>(value: Value) -> Result<T, Invalid> {
    serde_path_to_error::deserialize(value).map_err(|e| {
        let path = e.path().to_string();
        Invalid {
            // serde_path_to_error names the root ".".
            field: if path == "." { String::new() } else { path },
            message: e.into_inner().to_string(),
        }
    })
}

fn join_field(prefix: &str, field: &str) -> String {
    match (prefix.is_empty(), field.is_empty()) {
        (true, _) => field.to_string(),
        (false, true) => prefix.to_string(),
        (false, false) => format!("{prefix}.{field}"),
    }
}

fn json_type(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}

/// Refuses a load that defines the same object twice: later documents would silently win.
fn check_duplicates(manifests: &[Manifest]) -> Result<(), ManifestError> {
    let mut seen = BTreeMap::new();
    for manifest in manifests {
        let key = (manifest.kind(), manifest.namespace(), manifest.name());
        if let Some(first) = seen.insert(key, manifest) {
            return Err(ManifestError {
                file: manifest.file.clone(),
                document: Some(manifest.document),
                object: Some(manifest.describe()),
                field: None,
                message: format!(
                    "defined twice: already defined in {} document {}",
                    first.file.display(),
                    first.document
                ),
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests;
