//! What each pod contributes to the policy part, kept so that a Pod change compiles in
//! place when it moves nothing but its own ipcache entry: the common churn, a pod of a
//! Deployment replaced by one with the same labels and a new address.
//!
//! A pod is seen by everything else only through its identity's label set: whether the
//! set exists (identity numbering, collisions included), whether a pod of it has an
//! address (peer groups, the identities table), its pods' named ports and whether every
//! one of its addresses lies in each ipBlock. A change that keeps all of these for the
//! identities it leaves and joins, claims an address nobody else claims and is no local
//! endpoint changes only the ipcache entries of its old and new address. Anything else
//! is reported as [`NotInPlace`]: the caller compiles the part whole.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap, HashSet, hash_map::Entry},
    net::Ipv4Addr,
    rc::Rc,
};

use ipnet::Ipv4Net;
use sluice_common::{IDENTITY_WORLD, IpcacheEntry, IpcacheKey};
use sluice_store::{LocalEndpoint, Pod, selector::Labels};

use super::{
    Policy, PolicyInput,
    cidr::ipv4_blocks,
    identities,
    workloads::{Workload, workload},
};
mod local;
mod nodes;
mod relabel;

use self::nodes::Places;
pub(crate) use self::{
    local::Attached,
    relabel::{LocalIdentity, Renamed},
};
use crate::{
    changes::{ObjectKey, touched},
    identity,
    ipcache::Ipcache,
    namespace_or_default,
    nodes::Nodes,
    problem::Problems,
};

/// A Pod change moves more than its own ipcache entry: compile the workloads whole.
#[derive(Debug)]
pub(crate) struct NotInPlace;

/// What the full compile of the policy part resolved, borrowed for [`PodIndex::new`].
pub(super) struct Context<'a> {
    pub this: &'a str,
    pub namespaces: &'a BTreeMap<String, Labels>,
    pub cidrs: &'a BTreeSet<Ipv4Net>,
    pub selected_keys: &'a BTreeSet<String>,
    pub node_addresses: &'a BTreeMap<Ipv4Addr, IpcacheEntry>,
    pub nodes: &'a Nodes,
}

/// A named container port: (name, protocol, number).
type NamedPort = (String, u8, u16);

/// The pods of one identity, as far as others see them.
#[derive(Clone, PartialEq, Eq)]
struct IdentityUse {
    /// Pods with its label set, with or without an address.
    pods: u32,
    /// Those with an address in the ipcache.
    addressed: u32,
    /// The named ports of those, with how many pods have each.
    ports: BTreeMap<NamedPort, u32>,
    /// For each ipBlock of [`PodIndex::blocks`]: how many of those addresses it does not
    /// select.
    outside: Vec<u32>,
}

impl IdentityUse {
    fn new(blocks: usize) -> Self {
        Self {
            pods: 0,
            addressed: 0,
            ports: BTreeMap::new(),
            outside: vec![0; blocks],
        }
    }

    /// Counts (`add`) or uncounts an addressed pod.
    fn count(&mut self, address: Ipv4Addr, ports: &[NamedPort], blocks: &[Block4], add: bool) {
        let step = |n: &mut u32| {
            *n = if add { *n + 1 } else { n.saturating_sub(1) };
        };
        step(&mut self.pods);
        step(&mut self.addressed);
        for port in ports {
            let n = self.ports.entry(port.clone()).or_default();
            step(n);
            if *n == 0 {
                self.ports.remove(port);
            }
        }
        for (n, b) in self.outside.iter_mut().zip(blocks) {
            if !b.selects(address) {
                step(n);
            }
        }
    }

    /// What the rest of the compile reads of the identity: whether it exists, whether it
    /// is a peer, its named ports and the ipBlocks that select it.
    fn seen(&self) -> (bool, bool, Vec<&NamedPort>, Vec<bool>) {
        (
            self.pods > 0,
            self.addressed > 0,
            self.ports.keys().collect(),
            self.outside.iter().map(|&n| n == 0).collect(),
        )
    }
}

/// An ipBlock with an IPv4 CIDR.
#[derive(Clone, PartialEq, Eq)]
struct Block4 {
    cidr: Ipv4Net,
    except: Vec<Ipv4Net>,
}

impl Block4 {
    /// Whether the block selects a pod's /32, as `peers::World::block_identities` judges
    /// the prefixes of an identity.
    fn selects(&self, address: Ipv4Addr) -> bool {
        self.cidr.contains(&address) && !self.except.iter().any(|e| e.contains(&address))
    }
}

/// What the compile reads of a local endpoint's Pod: labels, address and named ports.
type LocalView = (Labels, Option<Ipv4Addr>, Vec<NamedPort>);

fn local_view(w: &Workload<'_>) -> LocalView {
    (Labels::clone(&w.labels), w.claimed, w.ports.clone())
}

/// A pod that is no local endpoint, as the index keeps it.
struct PodEntry {
    identity: u32,
    /// The address it claims; it holds it in the ipcache unless contested.
    address: Ipv4Addr,
    ports: Vec<NamedPort>,
    /// Its node's number in [`PodIndex::places`], when it names one.
    node: Option<u32>,
}

/// A pod as compiled alone, before it joins the index.
struct NewPod {
    entry: PodEntry,
    node: Option<String>,
    /// Its label set, when no pod had it before: a new identity.
    new_set: Option<Vec<String>>,
    labels: Labels,
}

/// An identity a Pod change made appear or vanish, for the policies to follow.
pub(crate) enum Moved {
    /// A label set no pod had, with its one pod.
    Appeared {
        identity: u32,
        set: Vec<String>,
        namespace: String,
        labels: Labels,
        address: Ipv4Addr,
        ports: Vec<NamedPort>,
    },
    /// The last pod of a label set went.
    Vanished { identity: u32 },
}

/// Every pod's contribution to the policy part, from one full compile of it.
pub(crate) struct PodIndex {
    this: String,
    namespaces: BTreeMap<String, Labels>,
    cidrs: BTreeSet<Ipv4Net>,
    selected_keys: BTreeSet<String>,
    blocks: Vec<Block4>,
    /// Label set -> its identity, for every set a pod has.
    numbers: HashMap<Vec<String>, u32>,
    /// And back: identity -> its label set, to know which sets a new one probes past.
    sets: HashMap<u32, Vec<String>>,
    identities: HashMap<u32, IdentityUse>,
    /// Sorted, so a namespace's pods are one range.
    pods: BTreeMap<ObjectKey, PodEntry>,
    /// The local endpoints with a Pod, and what the compile read of it: a change that
    /// keeps that (a status or annotation update) moves nothing.
    local: HashMap<ObjectKey, (LocalEndpoint, LocalView)>,
    /// Pods a change of which is compiled whole: local endpoints (their rows and flags
    /// follow their labels) and names the snapshot defines twice.
    whole: HashSet<ObjectKey>,
    /// Identities numbered past the one their hash names (a collision), with that one:
    /// when a number they probed past frees, they would move.
    displaced: BTreeMap<u32, u32>,
    /// Address -> how many pods claim it.
    claims: HashMap<Ipv4Addr, u32>,
    /// Namespaces some pod lives in. A Pod compiled in place leaves its namespace with a
    /// pod (its label set, which names the namespace, keeps one).
    populated: HashSet<String>,
    /// Namespaces the snapshot defines twice.
    namespaces_twice: HashSet<String>,
    /// Where the pods of `pods` run.
    places: Places,
    /// Namespaces where a pod has a label that [`identity::mimics_namespace`]: their
    /// relabel is compiled whole.
    mimicked: HashSet<String>,
    /// /32s the ipcache gives something else than a pod: node and router addresses, a
    /// policy CIDR or pod CIDR of one address.
    reserved: HashSet<Ipv4Addr>,
}

impl PodIndex {
    pub(super) fn new(
        context: &Context<'_>,
        input: &PolicyInput<'_>,
        workloads: &[Workload<'_>],
        sets: Vec<Rc<Vec<String>>>,
        policies: &[Policy<'_>],
    ) -> Self {
        let mut blocks = Vec::new();
        let mut ignored = Problems::default();
        for p in policies {
            for (cidr, except) in ipv4_blocks(p, &mut ignored) {
                let b = Block4 { cidr, except };
                if !blocks.contains(&b) {
                    blocks.push(b);
                }
            }
        }
        let mut whole: HashSet<ObjectKey> = input
            .endpoints
            .values()
            .map(|e| (e.namespace.clone(), e.pod.clone()))
            .collect();
        let mut names = HashSet::new();
        for pod in &input.snapshot.pods {
            let namespace = namespace_or_default(pod.namespace());
            let name = pod.name().unwrap_or("");
            if !names.insert((namespace, name)) {
                whole.insert((namespace.to_string(), name.to_string()));
            }
        }
        let mut local = HashMap::new();
        for endpoint in input.endpoints.values() {
            let key = (endpoint.namespace.as_str(), endpoint.pod.as_str());
            let at = workloads.binary_search_by(|w| (w.namespace, w.name).cmp(&key));
            if let (true, Ok(at)) = (names.contains(&key), at) {
                let key = (endpoint.namespace.clone(), endpoint.pod.clone());
                let view = local_view(&workloads[at]);
                local.insert(key, ((*endpoint).clone(), view));
            }
        }
        let mut reserved: HashSet<Ipv4Addr> = context.node_addresses.keys().copied().collect();
        let single = |c: &Ipv4Net| (c.prefix_len() == 32).then_some(c.addr());
        reserved.extend(context.cidrs.iter().filter_map(single));
        reserved.extend(
            context
                .nodes
                .remote_pod_cidrs()
                .filter_map(|(c, _)| single(&c)),
        );
        let mut index = Self {
            this: context.this.to_string(),
            namespaces: context.namespaces.clone(),
            cidrs: context.cidrs.clone(),
            selected_keys: context.selected_keys.clone(),
            blocks,
            numbers: HashMap::new(),
            sets: HashMap::new(),
            identities: HashMap::new(),
            pods: BTreeMap::new(),
            whole,
            local,
            claims: HashMap::new(),
            displaced: BTreeMap::new(),
            reserved,
            populated: HashSet::new(),
            mimicked: HashSet::new(),
            places: Places::default(),
            namespaces_twice: twice(
                input
                    .snapshot
                    .namespaces
                    .iter()
                    .filter_map(|n| n.metadata.name.as_deref()),
            ),
        };
        for (w, set) in workloads.iter().zip(sets) {
            index.add_workload(w, set);
        }
        index
    }

    /// Whether the index keeps the verdicts of the ipBlock `cidr` except `except`.
    pub(super) fn knows_block(&self, cidr: Ipv4Net, except: &[Ipv4Net]) -> bool {
        self.blocks
            .iter()
            .any(|b| b.cidr == cidr && b.except == except)
    }

    /// Takes the pod label keys the policies' selectors name, when only keys that leave
    /// every label set as it is change (neither high-cardinality nor read like a
    /// namespace's label): returns the keys gone and those come.
    #[allow(clippy::type_complexity)]
    pub(super) fn rekey(
        &mut self,
        keys: &BTreeSet<String>,
    ) -> Result<(Vec<String>, Vec<String>), NotInPlace> {
        let moves_sets = |k: &String| {
            identity::HIGH_CARDINALITY_KEYS.contains(&k.as_str()) || identity::mimics_namespace(k)
        };
        let old = &self.selected_keys;
        if old.symmetric_difference(keys).any(moves_sets) {
            return Err(NotInPlace);
        }
        let removed = old.difference(keys).cloned().collect();
        let added = keys.difference(old).cloned().collect();
        self.selected_keys = keys.clone();
        Ok((removed, added))
    }

    /// The value of the pod label `key` in the label set of `identity`, for a key that
    /// is no high-cardinality one and reads like no namespace's label.
    pub(super) fn label_value(
        &self,
        identity: u32,
        key: &str,
    ) -> Result<Option<String>, NotInPlace> {
        let set = self.sets.get(&identity).ok_or(NotInPlace)?;
        let prefix = format!("k8s:{key}=");
        Ok(set
            .iter()
            .find_map(|l| l.strip_prefix(&prefix))
            .map(str::to_string))
    }

    fn add_workload(&mut self, w: &Workload<'_>, set: Rc<Vec<String>>) {
        if !self.populated.contains(w.namespace) {
            self.populated.insert(w.namespace.to_string());
        }
        self.note_mimicry(w.namespace, &w.labels);
        if let Some(claimed) = w.claimed {
            *self.claims.entry(claimed).or_default() += 1;
        }
        if w.identity != IDENTITY_WORLD
            && !self.numbers.contains_key(&*set)
            && let Entry::Vacant(vacant) = self.numbers.entry(Vec::clone(&set))
        {
            let home = identity::home(vacant.key());
            if home != w.identity {
                self.displaced.insert(w.identity, home);
            }
            self.sets.insert(w.identity, vacant.key().clone());
            vacant.insert(w.identity);
        }
        let blocks = self.blocks.len();
        let used = self
            .identities
            .entry(w.identity)
            .or_insert_with(|| IdentityUse::new(blocks));
        match w.address {
            Some(address) => used.count(address, &w.ports, &self.blocks, true),
            None => used.pods += 1,
        }
        let key = (w.namespace.to_string(), w.name.to_string());
        if let (Some(address), false) = (w.claimed, self.whole.contains(&key)) {
            let entry = PodEntry {
                identity: w.identity,
                address,
                ports: w.ports.clone(),
                node: self.places.add(address, w.node),
            };
            self.pods.insert(key, entry);
        }
    }

    /// Remembers a namespace whose pod has a label that [`identity::mimics_namespace`].
    fn note_mimicry(&mut self, namespace: &str, labels: &Labels) {
        if labels.keys().any(|k| identity::mimics_namespace(k)) {
            self.mimicked.insert(namespace.to_string());
        }
    }

    /// Applies the Pod `key` written (`Some`) or deleted, changing its ipcache entries in
    /// place and recording them in `delta`; returns the identities that appeared or
    /// vanished with it, which the policies must follow (`follow`: they can). Says
    /// [`NotInPlace`] (with nothing changed) when it moves more than those.
    pub(crate) fn put(
        &mut self,
        key: &ObjectKey,
        pod: Option<&Pod>,
        nodes: &Nodes,
        ipcache: &mut Ipcache,
        delta: &mut BTreeMap<IpcacheKey, Option<IpcacheEntry>>,
        follow: bool,
    ) -> Result<Vec<Moved>, NotInPlace> {
        if self.whole.contains(key) {
            return self.local_unmoved(key, pod).map(|()| Vec::new());
        }
        let new = match pod {
            Some(pod) => self.alone(key, pod)?,
            None => None,
        };
        let old = self.pods.get(key);
        let contested = |o: &PodEntry| {
            self.reserved.contains(&o.address) || self.claims.get(&o.address) != Some(&1)
        };
        if old.is_some_and(contested) {
            return Err(NotInPlace);
        }
        if let Some(n) = &new {
            let held = self.claims.get(&n.entry.address).copied().unwrap_or(0);
            let own = old.is_some_and(|o| o.address == n.entry.address);
            if self.reserved.contains(&n.entry.address) || held != u32::from(own) {
                return Err(NotInPlace);
            }
        }
        let (uses, vanished) = self.uses_after(old, new.as_ref())?;
        if !follow && (!vanished.is_empty() || new.as_ref().is_some_and(|n| n.new_set.is_some())) {
            return Err(NotInPlace);
        }
        let mut moved = Vec::new();
        for identity in vanished {
            self.identities.remove(&identity);
            if let Some(set) = self.sets.remove(&identity) {
                self.numbers.remove(&set);
            }
            self.displaced.remove(&identity);
            moved.push(Moved::Vanished { identity });
        }
        self.identities.extend(uses);
        let kept = new.as_ref().map(|n| n.entry.address);
        if let Some(old) = self.pods.remove(key) {
            self.claims.remove(&old.address);
            self.places.remove(old.address, old.node);
            if kept != Some(old.address) {
                let k = IpcacheKey::new(old.address, 32);
                touched(delta, k, ipcache.remove(&k));
            }
        }
        if let Some(new) = new {
            let NewPod {
                mut entry,
                node,
                new_set,
                labels,
            } = new;
            entry.node = self.places.add(entry.address, node.as_deref());
            self.note_mimicry(&key.0, &labels);
            self.claims.insert(entry.address, 1);
            let k = IpcacheKey::new(entry.address, 32);
            let value = IpcacheEntry {
                identity: entry.identity,
                tunnel_endpoint: nodes.pod_tunnel(&self.this, node.as_deref(), entry.address),
            };
            // A status update that keeps identity and address writes nothing.
            if ipcache.get(&k) != Some(&value) {
                touched(delta, k, ipcache.insert(k, value));
            }
            if let Some(set) = new_set {
                let home = identity::home(&set);
                if home != entry.identity {
                    self.displaced.insert(entry.identity, home);
                }
                self.numbers.insert(set.clone(), entry.identity);
                self.sets.insert(entry.identity, set.clone());
                self.populated.insert(key.0.clone());
                moved.push(Moved::Appeared {
                    identity: entry.identity,
                    set,
                    namespace: key.0.clone(),
                    labels,
                    address: entry.address,
                    ports: entry.ports.clone(),
                });
            }
            self.pods.insert(key.clone(), entry);
        }
        Ok(moved)
    }

    /// Whether the Pod of a local endpoint changed nothing the compile reads.
    fn local_unmoved(&self, key: &ObjectKey, pod: Option<&Pod>) -> Result<(), NotInPlace> {
        let ((endpoint, view), pod) = self.local.get(key).zip(pod).ok_or(NotInPlace)?;
        let named = namespace_or_default(pod.namespace()) == key.0 && pod.name() == Some(&key.1);
        let now = workload(&key.0, &key.1, Some(pod), Some(endpoint), &self.namespaces);
        match now {
            Some(w) if named && local_view(&w) == *view => Ok(()),
            _ => Err(NotInPlace),
        }
    }

    /// The pod `pod` as the full compile would see it were it no local endpoint: None
    /// when it has no address (pending, host network, terminated).
    fn alone(&self, key: &ObjectKey, pod: &Pod) -> Result<Option<NewPod>, NotInPlace> {
        if namespace_or_default(pod.namespace()) != key.0 || pod.name() != Some(&key.1) {
            return Err(NotInPlace);
        }
        let Some(w) = workload(&key.0, &key.1, Some(pod), None, &self.namespaces) else {
            return Ok(None);
        };
        let Some(address) = w.address else {
            return Ok(None);
        };
        let set = identities::label_set(&w, &self.cidrs, &self.selected_keys);
        let (identity, new_set) = match self.numbers.get(&set) {
            Some(&identity) => (identity, None),
            None => (self.new_number(&set)?, Some(set)),
        };
        Ok(Some(NewPod {
            entry: PodEntry {
                identity,
                address,
                ports: w.ports,
                // Interned once it joins the index.
                node: None,
            },
            node: w.node.map(str::to_string),
            new_set,
            labels: w.labels.into_owned(),
        }))
    }

    /// The number a new label set takes without moving another: the one its hash names,
    /// or the first free one after, probing only past numbers of sets sorted before it
    /// (the full compile numbers sets in order). A number held by a set sorted after it
    /// would move that set: [`NotInPlace`].
    fn new_number(&self, set: &[String]) -> Result<u32, NotInPlace> {
        let exhausted = self.identities.contains_key(&IDENTITY_WORLD)
            || self.numbers.len() >= identity::label_span() as usize;
        if exhausted {
            return Err(NotInPlace);
        }
        let mut number = identity::home(set);
        loop {
            match self.sets.get(&number) {
                None => return Ok(number),
                Some(held) if held.as_slice() < set => {
                    number = identity::next_label_number(number);
                }
                Some(_) => return Err(NotInPlace),
            }
        }
    }

    /// The identities `old` leaves and `new` joins, counted after the change, if every one
    /// looks to the rest of the compile as it did before, or appears with its first pod
    /// (`new_set`), or vanishes with its last without moving another's number; with
    /// those that vanish.
    #[allow(clippy::type_complexity)]
    fn uses_after(
        &self,
        old: Option<&PodEntry>,
        new: Option<&NewPod>,
    ) -> Result<(Vec<(u32, IdentityUse)>, Vec<u32>), NotInPlace> {
        let appears = new
            .filter(|n| n.new_set.is_some())
            .map(|n| n.entry.identity);
        let new = new.map(|n| &n.entry);
        let ids: BTreeSet<u32> = old.iter().chain(&new).map(|p| p.identity).collect();
        let (mut out, mut vanished) = (Vec::new(), Vec::new());
        for id in ids {
            let before = match self.identities.get(&id) {
                Some(used) => used.clone(),
                None if appears == Some(id) => IdentityUse::new(self.blocks.len()),
                None => return Err(NotInPlace),
            };
            let mut after = before.clone();
            for (pod, add) in [(old, false), (new, true)] {
                if let Some(pod) = pod.filter(|p| p.identity == id) {
                    after.count(pod.address, &pod.ports, &self.blocks, add);
                }
            }
            if id == IDENTITY_WORLD {
                return Err(NotInPlace);
            }
            if after.pods == 0 {
                if self.frees_a_probe(id) {
                    return Err(NotInPlace);
                }
                vanished.push(id);
            } else if appears == Some(id) || after.seen() == before.seen() {
                out.push((id, after));
            } else {
                return Err(NotInPlace);
            }
        }
        Ok((out, vanished))
    }

    /// Whether freeing the number `id` would move an identity that probed past it.
    fn frees_a_probe(&self, id: u32) -> bool {
        let span = identity::label_span();
        // An identity found taken every number from its home up to its own, wrapping.
        self.displaced.iter().any(|(&number, &home)| {
            number != id && (id + span - home) % span < (number + span - home) % span
        })
    }
}

/// The names given more than once.
fn twice<'a>(names: impl Iterator<Item = &'a str>) -> HashSet<String> {
    let mut seen = HashSet::new();
    names
        .filter(|name| !seen.insert(*name))
        .map(str::to_string)
        .collect()
}
