use std::sync::atomic::{AtomicUsize, Ordering};

use super::*;

const SERVICE: &str = "apiVersion: v1
kind: Service
metadata:
  name: web
spec:
  clusterIP: 10.96.0.10
  ports:
  - port: 80
";

/// A directory of its own under the system temp dir, removed on drop even if the test fails.
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> Self {
        static COUNTER: AtomicUsize = AtomicUsize::new(0);
        let path = std::env::temp_dir().join(format!(
            "sluice-sources-{}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        fs::create_dir_all(&path).expect("create temp dir");
        Self(path)
    }

    fn write(&self, name: &str, content: impl AsRef<[u8]>) -> PathBuf {
        let path = self.0.join(name);
        fs::write(&path, content).expect("write test file");
        path
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

fn parse(text: &str) -> Result<Vec<Manifest>, ManifestError> {
    parse_str(Path::new("web.yaml"), text)
}

fn parse_err(text: &str) -> ManifestError {
    match parse(text) {
        Ok(manifests) => panic!("accepted: {manifests:?}"),
        Err(e) => e,
    }
}

fn summary(manifests: &[Manifest]) -> Vec<(usize, String)> {
    manifests
        .iter()
        .map(|m| (m.document, m.describe()))
        .collect()
}

#[test]
fn error_display_names_file_document_object_and_field() {
    let text = format!(
        "apiVersion: v1\nkind: Namespace\nmetadata: {{name: web}}\n---\n{}",
        SERVICE.replace("port: 80", "port: 70000")
    );
    assert_eq!(
        parse_err(&text).to_string(),
        "web.yaml: document 2: Service default/web: spec.ports[0].port: \
         must be between 1 and 65535 (got 70000)"
    );
    let bare = ManifestError::file(Path::new("x.yaml"), "read: denied".into());
    assert_eq!(bare.to_string(), "x.yaml: read: denied");
}

#[test]
fn documents_are_numbered_as_written_and_empty_ones_skipped() {
    let text = format!(
        "# preamble comment\n---\n{SERVICE}---\n# only a comment\n--- # separator with a comment\n\n---\n~\n---\r\n{}",
        SERVICE
            .replace("name: web", "name: api")
            .replace('\n', "\r\n")
    );
    let manifests = parse(&text).expect("parses");
    assert_eq!(
        summary(&manifests),
        [
            (1, "Service default/web".to_string()),
            (5, "Service default/api".to_string())
        ]
    );
    assert!(parse("").expect("empty file parses").is_empty());
    assert!(parse("---\n---\n").expect("separators only").is_empty());
}

#[test]
fn object_accessors() {
    let text =
        format!("{SERVICE}---\napiVersion: v1\nkind: Namespace\nmetadata: {{name: team-a}}\n");
    let manifests = parse(&text).expect("parses");
    let service = &manifests[0];
    assert_eq!(
        (service.kind(), service.namespace(), service.name()),
        ("Service", "default", "web")
    );
    // kubectl's default namespace is written into the object, as the API server stores it.
    assert_eq!(
        service.object.metadata().namespace.as_deref(),
        Some("default")
    );
    let namespace = &manifests[1];
    assert_eq!(
        (
            namespace.kind(),
            namespace.namespace(),
            namespace.describe()
        ),
        ("Namespace", "", "Namespace team-a".to_string())
    );
    assert_eq!(namespace.object.metadata().namespace, None);
    assert_eq!(service.file, Path::new("web.yaml"));
}

#[test]
fn lists_are_expanded_and_errors_name_the_item() {
    let list = "apiVersion: v1
kind: List
items:
- {apiVersion: v1, kind: Namespace, metadata: {name: a}}
- apiVersion: v1
  kind: Service
  metadata: {name: web, namespace: a}
  spec:
    ports: [{port: 80, protocol: ICMP}]
";
    let error = parse_err(list);
    assert_eq!(error.document, Some(1));
    assert_eq!(error.object.as_deref(), Some("Service a/web"));
    assert_eq!(
        error.field.as_deref(),
        Some("items[1].spec.ports[0].protocol")
    );

    let manifests = parse(&list.replace("ICMP", "UDP")).expect("parses");
    assert_eq!(
        summary(&manifests),
        [
            (1, "Namespace a".to_string()),
            (1, "Service a/web".to_string())
        ]
    );
    assert!(
        parse("apiVersion: v1\nkind: List\nitems: []\n")
            .expect("empty list")
            .is_empty()
    );
}

#[test]
fn invalid_yaml_reports_the_file_line_and_column() {
    let text = format!("{SERVICE}---\napiVersion: v1\nkind: Namespace\nmetadata: {{name: [a\n");
    let error = parse_err(&text);
    assert_eq!(error.document, Some(2));
    assert!(
        error.message.starts_with("invalid YAML: "),
        "{}",
        error.message
    );
    // The unclosed bracket is on line 12 of the file, column 18.
    assert!(
        error.message.contains("line 12, column 18"),
        "{}",
        error.message
    );

    let error = parse_err("a: 1\na: 2\n");
    assert!(error.message.contains("duplicate mapping key"), "{error}");
    assert!(error.message.contains("line 2, column 1"), "{error}");
}

#[test]
fn content_after_a_separator_is_refused() {
    let error = parse_err(&format!("{SERVICE}--- {{a: 1}}\n"));
    assert_eq!(error.document, None);
    assert!(error.message.starts_with("line 9: "), "{error}");
}

#[test]
fn api_version_and_kind_are_required_and_must_be_supported() {
    let cases = [
        (
            "kind: Service\nmetadata: {name: a}\n",
            Some("apiVersion"),
            "is required",
        ),
        (
            "apiVersion: v1\nmetadata: {name: a}\n",
            Some("kind"),
            "is required",
        ),
        (
            "apiVersion: v1\nkind: 7\n",
            Some("kind"),
            "expected a string, got a number",
        ),
        (
            "- apiVersion: v1\n",
            None,
            "expected an object with apiVersion and kind, got a list",
        ),
        (
            "apiVersion: apps/v1\nkind: StatefulSet\nmetadata: {name: a}\n",
            None,
            "unsupported kind \"StatefulSet\" in apiVersion \"apps/v1\"; supported: v1 Namespace, \
             v1 Pod, v1 Service, apps/v1 Deployment, discovery.k8s.io/v1 EndpointSlice, \
             networking.k8s.io/v1 NetworkPolicy",
        ),
        (
            "apiVersion: extensions/v1beta1\nkind: Deployment\nmetadata: {name: a}\n",
            None,
            "unsupported kind \"Deployment\" in apiVersion \"extensions/v1beta1\"",
        ),
    ];
    for (text, field, message) in cases {
        let error = parse_err(text);
        assert_eq!(error.field.as_deref(), field, "{text}: {error}");
        assert!(error.message.contains(message), "{text}: {error}");
    }
    assert_eq!(
        parse_err("apiVersion: apps/v1\nkind: StatefulSet\nmetadata: {name: a}\n")
            .object
            .as_deref(),
        Some("StatefulSet default/a")
    );
}

#[test]
fn fields_of_the_wrong_type_name_the_path() {
    let cases = [
        (
            SERVICE.replace("port: 80", "port: eighty"),
            "spec.ports[0].port",
            "invalid type: string \"eighty\", expected i32",
        ),
        (
            SERVICE.replace("name: web", "name: web\n  labels: {version: 1.5}"),
            "metadata.labels.version",
            "invalid type: floating point `1.5`, expected a string",
        ),
        (
            SERVICE.replace("  ports:\n  - port: 80\n", "  ports: {port: 80}\n"),
            "spec.ports",
            "invalid type: map, expected a sequence",
        ),
    ];
    for (text, field, message) in cases {
        let error = parse_err(&text);
        assert_eq!(error.field.as_deref(), Some(field), "{error}");
        assert!(error.message.contains(message), "{error}");
        assert_eq!(error.object.as_deref(), Some("Service default/web"));
    }
}

#[test]
fn the_same_object_twice_is_refused_naming_both_places() {
    let error = parse_err(&format!("{SERVICE}---\n{SERVICE}"));
    assert_eq!(
        error.to_string(),
        "web.yaml: document 2: Service default/web: \
         defined twice: already defined in web.yaml document 1"
    );
    // Same name, other namespace or other kind: distinct objects.
    let other_namespace = SERVICE.replace("name: web", "name: web\n  namespace: prod");
    assert_eq!(
        parse(&format!("{SERVICE}---\n{other_namespace}"))
            .expect("parses")
            .len(),
        2
    );

    let dir = TempDir::new();
    let a = dir.write("a.yaml", SERVICE);
    let b = dir.write("b.yaml", SERVICE.replace("10.96.0.10", "10.96.0.11"));
    let error = load_paths(&[a.clone(), b.clone()]).expect_err("duplicate across files");
    assert_eq!(error.file, b);
    assert_eq!(
        error.message,
        format!(
            "defined twice: already defined in {} document 1",
            a.display()
        )
    );
}

#[test]
fn directories_give_their_manifest_files_sorted() {
    let dir = TempDir::new();
    dir.write("b.yml", SERVICE.replace("name: web", "name: b"));
    dir.write("a.yaml", SERVICE.replace("name: web", "name: a"));
    dir.write(
        "c.json",
        r#"{"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "c"}}"#,
    );
    dir.write("README.md", "not a manifest");
    dir.write("d.yaml.bak", "not: a manifest");
    fs::create_dir(dir.0.join("nested.yaml")).expect("mkdir");
    fs::write(
        dir.0.join("nested.yaml").join("e.yaml"),
        SERVICE.replace("name: web", "name: e"),
    )
    .expect("write nested");

    let manifests = load_paths(std::slice::from_ref(&dir.0)).expect("loads");
    let names: Vec<_> = manifests
        .iter()
        .map(|m| (m.file.file_name().and_then(|n| n.to_str()), m.describe()))
        .collect();
    assert_eq!(
        names,
        [
            (Some("a.yaml"), "Service default/a".to_string()),
            (Some("b.yml"), "Service default/b".to_string()),
            (Some("c.json"), "Namespace c".to_string()),
        ]
    );
}

#[test]
fn unreadable_files_are_named() {
    let dir = TempDir::new();
    let missing = dir.0.join("missing.yaml");
    let error = load_paths(std::slice::from_ref(&missing)).expect_err("missing file");
    assert_eq!(error.file, missing);
    assert!(
        error.to_string().contains("missing.yaml: stat: "),
        "{error}"
    );

    let binary = dir.write("binary.yaml", [0xff, 0xfe, 0x00, 0x80]);
    let error = load_paths(std::slice::from_ref(&binary)).expect_err("not UTF-8");
    assert_eq!(error.file, binary);
    assert!(error.message.starts_with("read: "), "{error}");
}
