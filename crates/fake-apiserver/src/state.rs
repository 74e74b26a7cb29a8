//! What the fake holds: objects, their event history (to serve a watch from any
//! resourceVersion still in it), open watches and the faults queued for the next requests.
//! One global resourceVersion, as etcd's revision is for the real server.

use std::collections::{BTreeMap, VecDeque};

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

#[derive(Default)]
pub(crate) struct State {
    revision: u64,
    /// Watches from a resourceVersion below this get 410 Gone: history before it is gone.
    compacted: u64,
    objects: BTreeMap<Resource, BTreeMap<Key, Value>>,
    history: BTreeMap<Resource, Vec<(u64, EventType, Value)>>,
    watches: Vec<Watch>,
    faults: BTreeMap<Resource, VecDeque<Fault>>,
    /// Lists with pages still to serve, by the number in their continue token.
    paged: BTreeMap<u64, Paged>,
    next_token: u64,
    pub(crate) requests: Vec<RequestLog>,
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
    items: Vec<Value>,
}

/// What a request gets: a status answer, a list, or a watch stream.
pub(crate) enum Answer {
    Status(u16, Value),
    List(Value),
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
        object["apiVersion"] = json!(resource.api_version());
        object["kind"] = json!(resource.kind());
        if resource.namespaced() && object["metadata"].get("namespace").is_none() {
            object["metadata"]["namespace"] = json!("default");
        }
        object["metadata"]["resourceVersion"] = json!(revision.to_string());
        let objects = self.objects.entry(resource).or_default();
        let kind = if objects.contains_key(&key) {
            EventType::Modified
        } else {
            // A uid, as the server assigns on create; kept across updates.
            object["metadata"]["uid"] = json!(format!("00000000-0000-0000-0000-{revision:012}"));
            EventType::Added
        };
        if let Some(old) = objects.get(&key) {
            object["metadata"]["uid"] = old["metadata"]["uid"].clone();
        }
        objects.insert(key, object.clone());
        self.record(resource, revision, kind, object);
        Some(revision)
    }

    /// Deletes an object; its DELETED event carries the final state under a new version.
    pub(crate) fn delete(&mut self, resource: Resource, key: &str) -> Option<u64> {
        let mut object = self.objects.get_mut(&resource)?.remove(key)?;
        self.revision += 1;
        let revision = self.revision;
        object["metadata"]["resourceVersion"] = json!(revision.to_string());
        self.record(resource, revision, EventType::Deleted, object);
        Some(revision)
    }

    fn record(&mut self, resource: Resource, revision: u64, kind: EventType, object: Value) {
        let bytes = line(kind.word(), &object);
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
            w.tx.send(Ok(bytes.clone())).is_ok()
        });
        self.history
            .entry(resource)
            .or_default()
            .push((revision, kind, object));
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
                let items: Vec<Value> = self
                    .objects
                    .get(&resource)
                    .into_iter()
                    .flat_map(BTreeMap::values)
                    .map(|o| {
                        // Items of a list carry no kind or apiVersion: the list's say it.
                        let mut o = o.clone();
                        if let Some(map) = o.as_object_mut() {
                            map.remove("kind");
                            map.remove("apiVersion");
                        }
                        o
                    })
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
        let items = paged.items.get(offset..end).unwrap_or_default().to_vec();
        let mut metadata = json!({"resourceVersion": revision.to_string()});
        if end < paged.items.len() {
            metadata["continue"] = json!(format!("{token}:{end}"));
            metadata["remainingItemCount"] = json!(paged.items.len() - end);
        } else {
            self.paged.remove(&token);
        }
        Answer::List(json!({
            "kind": format!("{}List", resource.kind()),
            "apiVersion": resource.api_version(),
            "metadata": metadata,
            "items": items,
        }))
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
        for (_, kind, object) in self
            .history
            .get(&resource)
            .into_iter()
            .flatten()
            .filter(|(revision, _, _)| *revision > from)
        {
            let _ = tx.send(Ok(line(kind.word(), object)));
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
