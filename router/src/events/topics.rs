//! Which known pod a centralized-mode topic names. A pod answers to its own name, to its URL's
//! `HOST:PORT` (our topic `kv@HOST:PORT@MODEL`) and to its bare `HOST` (llm-d's charts set
//! `kv@$(POD_IP)@MODEL`). A topic naming none of them gets no state: otherwise anyone who can
//! reach the bound socket could grow the index and the metrics without bound.

use std::collections::HashMap;
use std::sync::{Arc, PoisonError, RwLock};

/// Topic names -> pod, shared by the ingest (which registers pods) and the centralized receiver.
#[derive(Debug, Default)]
pub struct TopicNames {
    names: RwLock<HashMap<String, Arc<str>>>,
}

impl TopicNames {
    /// `pod` answers to `names` (besides any it had). A name two pods claim goes to the last.
    pub fn insert(&self, pod: &Arc<str>, names: &[String]) {
        let mut map = self.names.write().unwrap_or_else(PoisonError::into_inner);
        map.insert(pod.to_string(), pod.clone());
        for n in names {
            map.insert(n.clone(), pod.clone());
        }
    }

    /// Forgets every name of `pod`.
    pub fn remove(&self, pod: &str) {
        let mut map = self.names.write().unwrap_or_else(PoisonError::into_inner);
        map.retain(|_, p| &**p != pod);
    }

    /// The pod the topic's pod part (`kv@<this>@model`) names, if it is known.
    pub fn resolve(&self, name: &str) -> Option<Arc<str>> {
        let map = self.names.read().unwrap_or_else(PoisonError::into_inner);
        map.get(name).cloned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_pods_answer_to_their_names_and_nothing_else_does() {
        let t = TopicNames::default();
        let a: Arc<str> = "a".into();
        t.insert(&a, &["10.0.0.1:8000".into(), "10.0.0.1".into()]);
        for name in ["a", "10.0.0.1:8000", "10.0.0.1"] {
            assert_eq!(t.resolve(name).as_deref(), Some("a"), "{name}");
        }
        assert_eq!(t.resolve("10.0.0.2:8000"), None);
        t.remove("a");
        assert_eq!(t.resolve("10.0.0.1"), None);
        assert_eq!(t.resolve("a"), None);
    }
}
