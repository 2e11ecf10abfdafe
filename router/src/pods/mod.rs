//! The pods the router sends requests to: a static list and DNS discovery of a headless
//! Service. Each pod carries its load monitor (a task scraping `/metrics` and probing
//! `/health`); joining and leaving are announced to [`PodHooks`] (the KV event ingest, which
//! subscribes to the pod's events and, when it leaves, drops its prefix-index entries).

mod spec;

use std::collections::{BTreeMap, HashSet};
use std::sync::{Arc, PoisonError, RwLock};
use std::time::Duration;

use tokio::task::JoinHandle;

use crate::events::{EventIngest, PodEndpoints};
use crate::index::routed::RoutedPrefixes;
use crate::index::PrefixIndex;
use crate::load::{self, MonitorConfig, PodLoad};

pub use spec::{discovered, Discovery, PodSpec, SpecError};

/// What else follows the pods in and out of the set.
pub trait PodHooks: Send + Sync {
    fn joined(&self, spec: &PodSpec);
    fn left(&self, name: &str);
    /// The pod's engine restarted (its cache is empty).
    fn restarted(&self, name: &str);
}

/// The KV event side of the pods: the ingest follows each pod's events (its own PUB, or the
/// centralized socket when the spec has no events endpoint) and forgets its index state when
/// it leaves; a restart clears the pod in the index and starts its event stream over.
pub struct IndexHooks {
    pub ingest: Arc<EventIngest>,
    pub index: Arc<PrefixIndex>,
    /// The routing history (`prefix-cache-scorer`), whose guesses die with the pod's cache.
    pub routed: Option<Arc<RoutedPrefixes>>,
}

impl PodHooks for IndexHooks {
    fn joined(&self, spec: &PodSpec) {
        // Before its events flow, so its STORAGE blocks go to the group from the first.
        self.index
            .set_storage_group(&spec.name, spec.storage.as_deref());
        let endpoints = PodEndpoints {
            events: spec.events.clone(),
            replay: spec.replay.clone(),
            topic_names: spec.topic_names(),
        };
        if let Err(e) = self.ingest.add_pod(&spec.name, endpoints) {
            tracing::error!(pod = %spec.name, "cannot follow the pod's KV events: {e}");
        }
    }

    fn left(&self, name: &str) {
        self.ingest.remove_pod(name);
        if let Some(r) = &self.routed {
            r.forget(name);
        }
    }

    fn restarted(&self, name: &str) {
        // Cleared here at once, so routing stops matching the old blocks even while the stream
        // thread is busy (a replay may wait on a dead socket); the stream then clears again in
        // order with its batches and refetches what the new engine already published.
        self.index.clear_pod(name);
        if let Some(r) = &self.routed {
            r.forget(name);
        }
        self.ingest.pod_restarted(name);
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    Static,
    Discovered,
}

/// One pod in the set.
pub struct Pod {
    pub spec: PodSpec,
    /// `spec.name`, shared with the index's names.
    pub name: Arc<str>,
    pub origin: Origin,
    pub load: Arc<PodLoad>,
    monitor: JoinHandle<()>,
}

impl Drop for Pod {
    fn drop(&mut self) {
        self.monitor.abort();
    }
}

/// The current pods, sorted by name (the stable order round-robin rotates over).
pub struct PodSet {
    pods: RwLock<Arc<Vec<Arc<Pod>>>>,
    client: reqwest::Client,
    monitor: MonitorConfig,
    hooks: Arc<dyn PodHooks>,
}

impl PodSet {
    /// An empty set; pods' monitors use `client`.
    pub fn new(client: reqwest::Client, monitor: MonitorConfig, hooks: Arc<dyn PodHooks>) -> Self {
        Self {
            pods: RwLock::new(Arc::new(Vec::new())),
            client,
            monitor,
            hooks,
        }
    }

    /// The pods now (a cheap snapshot).
    pub fn list(&self) -> Arc<Vec<Arc<Pod>>> {
        self.pods
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Adds a pod; one of the same name leaves first unless its spec is the same (then this
    /// is a no-op). Must run inside a Tokio runtime.
    pub fn add(&self, spec: PodSpec, origin: Origin) {
        if self.list().iter().any(|p| p.spec == spec) {
            return;
        }
        self.remove(&spec.name);
        self.hooks.joined(&spec);
        let load = Arc::new(PodLoad::new());
        let (hooks, name) = (self.hooks.clone(), spec.name.clone());
        let monitor = tokio::spawn(load::monitor(
            self.client.clone(),
            spec.url.clone(),
            load.clone(),
            self.monitor,
            move || hooks.restarted(&name),
        ));
        let pod = Arc::new(Pod {
            name: spec.name.as_str().into(),
            spec,
            origin,
            load,
            monitor,
        });
        self.update(|pods| {
            pods.insert(pod.name.clone(), pod);
        });
    }

    /// Removes a pod by name; false when there was none.
    pub fn remove(&self, name: &str) -> bool {
        let Some(old) = self.update(|pods| pods.remove(name)) else {
            return false;
        };
        // Requests still holding the pod finish; it just gets no new ones.
        old.monitor.abort();
        self.hooks.left(name);
        true
    }

    /// Makes the discovered pods exactly `specs` (static pods are left alone; a discovered
    /// pod named like a static one is skipped).
    pub fn reconcile_discovered(&self, specs: Vec<PodSpec>) {
        let current = self.list();
        let wanted: HashSet<&str> = specs.iter().map(|s| s.name.as_str()).collect();
        for p in current.iter() {
            if p.origin == Origin::Discovered && !wanted.contains(&*p.name) {
                tracing::info!(pod = %p.name, "pod left the service");
                self.remove(&p.name);
            }
        }
        for spec in specs {
            if current.iter().all(|p| *p.name != *spec.name) {
                tracing::info!(pod = %spec.name, "pod joined the service");
                self.add(spec, Origin::Discovered);
            }
        }
    }

    /// Applies `f` to the pods by name and publishes the result.
    fn update<T>(&self, f: impl FnOnce(&mut BTreeMap<Arc<str>, Arc<Pod>>) -> T) -> T {
        let mut guard = self.pods.write().unwrap_or_else(PoisonError::into_inner);
        let mut by_name: BTreeMap<Arc<str>, Arc<Pod>> =
            guard.iter().map(|p| (p.name.clone(), p.clone())).collect();
        let out = f(&mut by_name);
        *guard = Arc::new(by_name.into_values().collect());
        out
    }
}

/// Re-resolves `discovery` every `interval` and reconciles the discovered pods; a failed
/// lookup keeps the current ones (a DNS hiccup must not empty the set).
pub async fn discover(
    set: Arc<PodSet>,
    discovery: Discovery,
    interval: Duration,
    events_port: u16,
    replay_port: u16,
) {
    let Discovery::Dns {
        service,
        port,
        storage,
    } = discovery;
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        match tokio::net::lookup_host((service.as_str(), port)).await {
            Ok(addrs) => {
                let ips: std::collections::BTreeSet<_> = addrs.map(|a| a.ip()).collect();
                let specs = ips
                    .into_iter()
                    .map(|ip| discovered(ip, port, events_port, replay_port, storage.as_deref()))
                    .collect();
                set.reconcile_discovered(specs);
            }
            Err(e) => tracing::warn!(%service, "pod discovery lookup failed: {e}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::events::IngestConfig;
    use crate::index::IndexConfig;
    use kvevents::{BlockStored, ExternalBlockHash, KvEvent};

    fn set() -> (Arc<PodSet>, Arc<PrefixIndex>) {
        let index = Arc::new(PrefixIndex::new(IndexConfig::new("m")).unwrap());
        let hooks = IndexHooks {
            ingest: Arc::new(EventIngest::start(index.clone(), IngestConfig::default())),
            index: index.clone(),
            routed: None,
        };
        let set = PodSet::new(
            reqwest::Client::new(),
            MonitorConfig::default(),
            Arc::new(hooks),
        );
        (Arc::new(set), index)
    }

    fn names(set: &PodSet) -> Vec<String> {
        set.list().iter().map(|p| p.name.to_string()).collect()
    }

    fn store_one_block(index: &PrefixIndex, pod: &str) {
        let event = KvEvent::BlockStored(BlockStored {
            block_hashes: vec![ExternalBlockHash::Int(7)],
            parent_block_hash: None,
            token_ids: (0..16).collect(),
            block_size: 16,
            lora_id: None,
            medium: None,
            lora_name: None,
            extra_keys: None,
            group_idx: None,
        });
        index.apply(pod, &event);
    }

    fn indexed(index: &PrefixIndex) -> Vec<String> {
        let mut pods: Vec<String> = index.pods().iter().map(|p| p.to_string()).collect();
        pods.sort();
        pods
    }

    #[tokio::test]
    async fn pods_join_and_leave_with_their_index_state() {
        let (set, index) = set();
        set.add("b=http://127.0.0.1:1".parse().unwrap(), Origin::Static);
        set.add("a=http://127.0.0.1:2".parse().unwrap(), Origin::Static);
        assert_eq!(names(&set), ["a", "b"]);
        set.reconcile_discovered(vec![
            discovered("10.0.0.2".parse().unwrap(), 80, 0, 0, None),
            discovered("10.0.0.1".parse().unwrap(), 80, 0, 0, None),
        ]);
        assert_eq!(names(&set), ["10.0.0.1:80", "10.0.0.2:80", "a", "b"]);
        for pod in ["a", "b", "10.0.0.1:80"] {
            store_one_block(&index, pod);
        }
        assert_eq!(indexed(&index), ["10.0.0.1:80", "a", "b"]);
        // 10.0.0.1 leaves, 10.0.0.3 joins; static pods stay.
        set.reconcile_discovered(vec![
            discovered("10.0.0.2".parse().unwrap(), 80, 0, 0, None),
            discovered("10.0.0.3".parse().unwrap(), 80, 0, 0, None),
        ]);
        assert_eq!(names(&set), ["10.0.0.2:80", "10.0.0.3:80", "a", "b"]);
        assert_eq!(indexed(&index), ["a", "b"]);
        // The same spec again changes nothing; another spec under the name replaces the pod.
        set.add("a=http://127.0.0.1:2".parse().unwrap(), Origin::Static);
        assert_eq!(indexed(&index), ["a", "b"]);
        set.add("a=http://127.0.0.1:3".parse().unwrap(), Origin::Static);
        assert_eq!(indexed(&index), ["b"]);
        assert_eq!(set.list()[2].spec.url, "http://127.0.0.1:3");
        assert!(set.remove("b"));
        assert!(!set.remove("b"));
        assert!(indexed(&index).is_empty());
        set.reconcile_discovered(Vec::new());
        assert_eq!(names(&set), ["a"]);
    }

    #[tokio::test]
    async fn dns_discovery_resolves_localhost() {
        let (set, _index) = set();
        let task = tokio::spawn(discover(
            set.clone(),
            "dns:localhost:8123".parse().unwrap(),
            Duration::from_millis(20),
            5557,
            5558,
        ));
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while set.list().is_empty() && std::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        task.abort();
        let pods = set.list();
        assert!(
            pods.iter().any(|p| p.spec.url == "http://127.0.0.1:8123"
                && p.spec.events.as_deref() == Some("tcp://127.0.0.1:5557")
                && p.origin == Origin::Discovered),
            "{:?}",
            pods.iter().map(|p| &p.spec).collect::<Vec<_>>()
        );
    }
}
