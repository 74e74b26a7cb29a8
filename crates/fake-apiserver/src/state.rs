//! What the fake holds: objects, their event history (to serve a watch from any
//! resourceVersion still in it), open watches and the faults queued for the next requests.
//! One global resourceVersion, as etcd's revision is for the real server.
//!
//! Objects are kept encoded, once, and shared by the store, the history and the lists
//! being paged: a simulated cluster of hundreds of thousands of objects then costs little
//! more than its JSON, and serving a page or an event copies bytes, not trees.

use std::{
    collections::{BTreeMap, VecDeque},
    sync::Arc,
};

use serde_json::{Value, json};
use tokio::sync::mpsc;

use crate::{Fault, RequestLog, Resource};

/// What a watch connection is sent: a chunk, or the end of the connection without the
/// final chunk (a dropped connection, as the client sees it).
pub(crate) type Chunk = Result<Vec<u8>, std::io::Error>;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum EventType {
    Added,
    Modified,
    Deleted,
}

impl EventType {
    fn word(self) -> &'static str {
        match self {
            EventType::Added => "ADDED",
            EventType::Modified => "MODIFIED",
            EventType::Deleted => "DELETED",
        }
    }
}

struct Watch {
    resource: Resource,
    tx: mpsc::UnboundedSender<Chunk>,
    bookmarks: bool,
    /// The next event is cut half way and the connection dropped.
    cut_next: bool,
}

/// `namespace/name`, or `name` for cluster-scoped objects.
type Key = String;

/// An object as a list serves it: JSON without `kind` and `apiVersion` (the list's say
/// them; a watch event adds them, see [`line`]).
type Encoded = Arc<[u8]>;

struct Stored {
    /// Kept across updates, as the server keeps it.
    uid: String,
    json: Encoded,
}

/// What the server sent on watches and lists of one resource: the API server's side of
/// an agent's cost.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Traffic {
    /// ADDED, MODIFIED and DELETED events sent on watches (bookmarks and errors not
    /// counted).
    pub watch_events: u64,
    /// Bytes of those events, as sent.
    pub watch_bytes: u64,
    /// List pages answered, and their bytes.
    pub list_pages: u64,
    pub list_bytes: u64,
}

#[derive(Default)]
pub(crate) struct State {
    revision: u64,
    /// Watches from a resourceVersion below this get 410 Gone: history before it is gone.
    compacted: u64,
    objects: BTreeMap<Resource, BTreeMap<Key, Stored>>,
    history: BTreeMap<Resource, Vec<(u64, EventType, Encoded)>>,
    watches: Vec<Watch>,
    faults: BTreeMap<Resource, VecDeque<Fault>>,
    /// Lists with pages still to serve, by the number in their continue token.
    paged: BTreeMap<u64, Paged>,
    next_token: u64,
    pub(crate) requests: Vec<RequestLog>,
    pub(crate) traffic: BTreeMap<Resource, Traffic>,
}

/// A list or watch request, as its query parameters say.
pub(crate) struct Request<'a> {
    pub resource: Resource,
    pub watch: bool,
    pub resource_version: Option<&'a str>,
    pub bookmarks: bool,
    /// Items per page of a list; None: all at once.
    pub limit: Option<usize>,
    /// The `continue` token of the previous page.
    pub continue_token: Option<&'a str>,
}

/// A list being served page by page: every page comes from the objects as they were at
/// the first (the real server reads them at one version from etcd).
struct Paged {
    revision: u64,
    items: Vec<Encoded>,
}

/// What a request gets: a status answer, a list, or a watch stream.
pub(crate) enum Answer {
    Status(u16, Value),
    /// An encoded list.
    List(Vec<u8>),
    Watch(mpsc::UnboundedReceiver<Chunk>),
}

pub(crate) fn status(code: u16, reason: &str, message: String) -> Value {
    json!({
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    })
}

fn line(kind: &str, object: &Value) -> Vec<u8> {
    let mut bytes =
        serde_json::to_vec(&json!({"type": kind, "object": object})).unwrap_or_default();
    bytes.push(b'\n');
    bytes
}

/// A watch event's line for a stored object: its `kind` and `apiVersion` spliced in
/// front of its own fields (an encoded object always starts with `{` and has metadata).
fn event_line(resource: Resource, kind: EventType, json: &[u8]) -> Vec<u8> {
    let head = format!(
        r#"{{"type":"{}","object":{{"kind":"{}","apiVersion":"{}","#,
        kind.word(),
        resource.kind(),
        resource.api_version()
    );
    let mut bytes = Vec::with_capacity(head.len() + json.len() + 2);
    bytes.extend_from_slice(head.as_bytes());
    bytes.extend_from_slice(json.get(1..).unwrap_or_default());
    bytes.extend_from_slice(b"}\n");
    bytes
}

/// `object` without `kind` and `apiVersion`, encoded.
fn encode(mut object: Value) -> Encoded {
    if let Some(map) = object.as_object_mut() {
        map.remove("kind");
        map.remove("apiVersion");
    }
    serde_json::to_vec(&object).unwrap_or_default().into()
}

fn key_of(resource: Resource, object: &Value) -> Option<Key> {
    let meta = object.get("metadata")?;
    let name = meta.get("name")?.as_str()?;
    Some(if resource.namespaced() {
        let namespace = meta
            .get("namespace")
            .and_then(Value::as_str)
            .unwrap_or("default");
        format!("{namespace}/{name}")
    } else {
        name.to_owned()
    })
}

impl State {
    pub(crate) fn revision(&self) -> u64 {
        self.revision
    }

    /// Creates or replaces an object under the next resourceVersion and tells its watches.
    pub(crate) fn apply(&mut self, resource: Resource, mut object: Value) -> Option<u64> {
        let key = key_of(resource, &object)?;
        self.revision += 1;
        let revision = self.revision;
        if resource.namespaced() && object["metadata"].get("namespace").is_none() {
            object["metadata"]["namespace"] = json!("default");
        }
        object["metadata"]["resourceVersion"] = json!(revision.to_string());
        let objects = self.objects.entry(resource).or_default();
        let (kind, uid) = match objects.get(&key) {
            Some(old) => (EventType::Modified, old.uid.clone()),
            // A uid, as the server assigns on create.
            None => (
                EventType::Added,
                format!("00000000-0000-0000-0000-{revision:012}"),
            ),
        };
        object["metadata"]["uid"] = json!(uid);
        let json = encode(object);
        objects.insert(
            key,
            Stored {
                uid,
                json: Arc::clone(&json),
            },
        );
        self.record(resource, revision, kind, json);
        Some(revision)
    }

    /// Deletes an object; its DELETED event carries the final state under a new version.
    pub(crate) fn delete(&mut self, resource: Resource, key: &str) -> Option<u64> {
        let stored = self.objects.get_mut(&resource)?.remove(key)?;
        self.revision += 1;
        let revision = self.revision;
        let mut object: Value = serde_json::from_slice(&stored.json).ok()?;
        object["metadata"]["resourceVersion"] = json!(revision.to_string());
        self.record(resource, revision, EventType::Deleted, encode(object));
        Some(revision)
    }

    fn record(&mut self, resource: Resource, revision: u64, kind: EventType, json: Encoded) {
        let bytes = event_line(resource, kind, &json);
        let traffic = self.traffic.entry(resource).or_default();
        self.watches.retain_mut(|w| {
            if w.resource != resource {
                return true;
            }
            if w.cut_next {
                let half = bytes[..bytes.len() / 2].to_vec();
                let _ = w.tx.send(Ok(half));
                let _ = w.tx.send(Err(dropped()));
                return false;
            }
            traffic.watch_events += 1;
            traffic.watch_bytes += bytes.len() as u64;
            w.tx.send(Ok(bytes.clone())).is_ok()
        });
        self.history
            .entry(resource)
            .or_default()
            .push((revision, kind, json));
    }

    /// A BOOKMARK at the current version on every watch that asked for bookmarks.
    pub(crate) fn bookmark(&mut self) {
        let revision = self.revision.to_string();
        self.watches.retain(|w| {
            if !w.bookmarks {
                return true;
            }
            let object = json!({
                "kind": w.resource.kind(),
                "apiVersion": w.resource.api_version(),
                "metadata": {"resourceVersion": revision},
            });
            w.tx.send(Ok(line("BOOKMARK", &object))).is_ok()
        });
    }

    /// Forgets the history: a watch from an older version gets 410 Gone, and every open
    /// watch gets an ERROR event with a 410 Status and is closed (as when the server's
    /// watch cache can no longer serve it).
    pub(crate) fn compact(&mut self) {
        self.compacted = self.revision;
        self.history.clear();
        for w in self.watches.drain(..) {
            let _ = w.tx.send(Ok(line("ERROR", &gone(self.compacted))));
        }
    }

    /// Drops every open watch of `resource`: now, or half way through its next event.
    pub(crate) fn drop_watches(&mut self, resource: Resource, mid_event: bool) {
        if mid_event {
            for w in self.watches.iter_mut().filter(|w| w.resource == resource) {
                w.cut_next = true;
            }
        } else {
            self.watches.retain(|w| {
                if w.resource == resource {
                    let _ = w.tx.send(Err(dropped()));
                    return false;
                }
                true
            });
        }
    }

    pub(crate) fn inject(&mut self, resource: Resource, fault: Fault) {
        self.faults.entry(resource).or_default().push_back(fault);
    }

    pub(crate) fn watch_count(&self, resource: Resource) -> usize {
        self.watches
            .iter()
            .filter(|w| w.resource == resource)
            .count()
    }

    /// A page of a list: the first, or the one a continue token names (`<list>:<offset>`).
    fn list(&mut self, request: &Request<'_>) -> Answer {
        let resource = request.resource;
        let (token, revision, offset) = match request.continue_token {
            None | Some("") => {
                let items: Vec<Encoded> = self
                    .objects
                    .get(&resource)
                    .into_iter()
                    .flat_map(BTreeMap::values)
                    .map(|o| Arc::clone(&o.json))
                    .collect();
                self.next_token += 1;
                let token = self.next_token;
                let revision = self.revision;
                self.paged.insert(token, Paged { revision, items });
                (token, revision, 0)
            }
            Some(text) => {
                let parsed = text
                    .split_once(':')
                    .and_then(|(t, o)| Some((t.parse::<u64>().ok()?, o.parse::<usize>().ok()?)));
                match parsed.and_then(|(t, o)| Some((t, self.paged.get(&t)?.revision, o))) {
                    Some(found) => found,
                    None => {
                        let message = format!("the continue token {text:?} has expired");
                        return Answer::Status(410, status(410, "Expired", message));
                    }
                }
            }
        };
        let Some(paged) = self.paged.get(&token) else {
            return Answer::Status(500, status(500, "InternalError", "lost a list".into()));
        };
        let end = request
            .limit
            .filter(|&l| l > 0)
            .map_or(paged.items.len(), |l| (offset + l).min(paged.items.len()));
        let mut metadata = json!({"resourceVersion": revision.to_string()});
        let items = paged.items.get(offset..end).unwrap_or_default();
        let size: usize = items.iter().map(|i| i.len() + 1).sum();
        let mut body = Vec::with_capacity(size + 256);
        if end < paged.items.len() {
            metadata["continue"] = json!(format!("{token}:{end}"));
            metadata["remainingItemCount"] = json!(paged.items.len() - end);
        }
        body.extend_from_slice(
            format!(
                r#"{{"kind":"{}List","apiVersion":"{}","metadata":{metadata},"items":["#,
                resource.kind(),
                resource.api_version()
            )
            .as_bytes(),
        );
        for (i, item) in items.iter().enumerate() {
            if i > 0 {
                body.push(b',');
            }
            body.extend_from_slice(item);
        }
        body.extend_from_slice(b"]}");
        if end >= paged.items.len() {
            self.paged.remove(&token);
        }
        let traffic = self.traffic.entry(resource).or_default();
        traffic.list_pages += 1;
        traffic.list_bytes += body.len() as u64;
        Answer::List(body)
    }

    /// The next queued fault of `resource` that applies to this request.
    fn take_fault(&mut self, resource: Resource, watch: bool) -> Option<Fault> {
        let faults = self.faults.get_mut(&resource)?;
        let position = faults
            .iter()
            .position(|f| watch || !matches!(f, Fault::GoneOnWatchStart))?;
        faults.remove(position)
    }

    /// Answers a list (`watch` false) or a watch from `resource_version`.
    pub(crate) fn answer(&mut self, request: &Request<'_>) -> Answer {
        let answer = self.answer_inner(request);
        self.requests.push(RequestLog {
            resource: request.resource,
            watch: request.watch,
            resource_version: request.resource_version.map(str::to_owned),
            status: match &answer {
                Answer::Status(code, _) => *code,
                Answer::List(_) | Answer::Watch(_) => 200,
            },
        });
        answer
    }

    fn answer_inner(&mut self, request: &Request<'_>) -> Answer {
        let Request {
            resource,
            watch,
            resource_version,
            bookmarks,
            ..
        } = *request;
        match self.take_fault(resource, watch) {
            Some(Fault::Status(code)) => {
                let reason = match code {
                    429 => "TooManyRequests",
                    500 => "InternalError",
                    _ => "Unknown",
                };
                return Answer::Status(code, status(code, reason, format!("injected {code}")));
            }
            Some(Fault::GoneOnWatchStart) => {
                return Answer::Status(410, gone(self.compacted));
            }
            None => {}
        }
        if !watch {
            return self.list(request);
        }
        let from = match resource_version {
            None | Some("" | "0") => self.revision,
            Some(v) => match v.parse::<u64>() {
                Ok(v) => v,
                Err(_) => {
                    return Answer::Status(
                        400,
                        status(400, "BadRequest", format!("invalid resourceVersion {v:?}")),
                    );
                }
            },
        };
        let (tx, rx) = mpsc::unbounded_channel();
        if from < self.compacted {
            // The real server answers 200 and says it in the stream.
            let _ = tx.send(Ok(line("ERROR", &gone(self.compacted))));
            return Answer::Watch(rx);
        }
        let traffic = self.traffic.entry(resource).or_default();
        for (_, kind, json) in self
            .history
            .get(&resource)
            .into_iter()
            .flatten()
            .filter(|(revision, _, _)| *revision > from)
        {
            let bytes = event_line(resource, *kind, json);
            traffic.watch_events += 1;
            traffic.watch_bytes += bytes.len() as u64;
            let _ = tx.send(Ok(bytes));
        }
        self.watches.push(Watch {
            resource,
            tx,
            bookmarks,
            cut_next: false,
        });
        Answer::Watch(rx)
    }
}

fn gone(compacted: u64) -> Value {
    status(
        410,
        "Expired",
        format!("too old resource version: the oldest available is {compacted}"),
    )
}

fn dropped() -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::ConnectionAborted, "dropped by the test")
}
