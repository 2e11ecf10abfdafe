//! `--kv-events-config`: vLLM's `KVEventsConfig` keys and defaults, validated at start-up, plus
//! our one extra key `event_encoding` ("map", the default, or "array" for consumers written
//! against vLLM <= 0.23), and the `VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES` switch.

use kvevents::Encoding;
use serde::Deserialize;
use serde_json::Value;

/// Where the events go.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PublisherKind {
    Zmq,
    Null,
}

/// How block hashes travel: vLLM's 64-bit form (last 8 digest bytes, big-endian) or the full
/// digest as msgpack bin.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HashForm {
    Int,
    Bytes,
}

#[derive(Debug, Clone, PartialEq)]
pub struct KvEventsConfig {
    pub enable_kv_cache_events: bool,
    pub publisher: PublisherKind,
    pub endpoint: String,
    pub replay_endpoint: Option<String>,
    pub buffer_steps: usize,
    pub hwm: i32,
    pub max_queue_size: usize,
    pub topic: String,
    pub encoding: Encoding,
    pub hash_form: HashForm,
}

#[derive(Debug, thiserror::Error)]
pub enum KvEventsConfigError {
    #[error("--kv-events-config: {0}")]
    Invalid(String),
    #[error("VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES={0:?}: expected 0 or 1")]
    BadHashEnv(String),
}

/// The JSON as vLLM spells it; every key optional, unknown keys rejected.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Raw {
    #[serde(default)]
    enable_kv_cache_events: bool,
    publisher: Option<PublisherKind>,
    #[serde(default = "default_endpoint")]
    endpoint: String,
    replay_endpoint: Option<String>,
    #[serde(default = "default_buffer_steps")]
    buffer_steps: usize,
    #[serde(default = "default_hwm")]
    hwm: i32,
    #[serde(default = "default_max_queue_size")]
    max_queue_size: usize,
    #[serde(default)]
    topic: String,
    #[serde(default)]
    event_encoding: Option<String>,
}

fn default_endpoint() -> String {
    "tcp://*:5557".into()
}
fn default_buffer_steps() -> usize {
    10_000
}
fn default_hwm() -> i32 {
    100_000
}
fn default_max_queue_size() -> usize {
    100_000
}

impl KvEventsConfig {
    /// Parses the flag's JSON; `int_hashes_env` is `VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES`.
    pub fn parse(json: &Value, int_hashes_env: Option<&str>) -> Result<Self, KvEventsConfigError> {
        let invalid = |m: String| KvEventsConfigError::Invalid(m);
        let raw: Raw = serde_json::from_value(json.clone()).map_err(|e| invalid(e.to_string()))?;
        // vLLM: the publisher defaults to zmq when events are enabled, null otherwise.
        let publisher = raw.publisher.unwrap_or(if raw.enable_kv_cache_events {
            PublisherKind::Zmq
        } else {
            PublisherKind::Null
        });
        check_endpoint("endpoint", &raw.endpoint).map_err(invalid)?;
        if let Some(replay) = &raw.replay_endpoint {
            check_endpoint("replay_endpoint", replay).map_err(invalid)?;
        }
        if raw.hwm < 0 {
            return Err(invalid(format!("hwm must be >= 0, got {}", raw.hwm)));
        }
        if raw.max_queue_size == 0 {
            return Err(invalid("max_queue_size must be >= 1".into()));
        }
        let encoding = match raw.event_encoding.as_deref() {
            None => Encoding::Map,
            Some(e) => e
                .parse()
                .map_err(|e: kvevents::UnknownEncoding| invalid(e.to_string()))?,
        };
        let hash_form = match int_hashes_env.map(str::trim) {
            None | Some("1") | Some("true") | Some("True") => HashForm::Int,
            Some("0") | Some("false") | Some("False") => HashForm::Bytes,
            Some(other) => return Err(KvEventsConfigError::BadHashEnv(other.to_string())),
        };
        Ok(Self {
            enable_kv_cache_events: raw.enable_kv_cache_events,
            publisher,
            endpoint: raw.endpoint,
            replay_endpoint: raw.replay_endpoint,
            buffer_steps: raw.buffer_steps,
            hwm: raw.hwm,
            max_queue_size: raw.max_queue_size,
            topic: raw.topic,
            encoding,
            hash_form,
        })
    }

    /// Whether anything is published (vLLM: enabled and a non-null publisher).
    pub fn publishes(&self) -> bool {
        self.enable_kv_cache_events && self.publisher == PublisherKind::Zmq
    }
}

/// vLLM's rule: the PUB socket binds when the endpoint is a wildcard or local transport
/// (`*`, `::`, ipc, inproc) and connects otherwise, so a central subscriber can bind.
pub fn binds(endpoint: &str) -> bool {
    endpoint.contains('*')
        || endpoint.contains("::")
        || endpoint.starts_with("ipc://")
        || endpoint.starts_with("inproc://")
}

fn check_endpoint(key: &str, endpoint: &str) -> Result<(), String> {
    let ok = ["tcp://", "ipc://", "inproc://"].iter().any(|scheme| {
        endpoint
            .strip_prefix(scheme)
            .is_some_and(|rest| !rest.is_empty())
    });
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{key} {endpoint:?} is not a ZMQ endpoint (tcp://, ipc:// or inproc://)"
        ))
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn defaults_match_vllm() {
        let c = KvEventsConfig::parse(&json!({}), None).unwrap();
        assert!(!c.enable_kv_cache_events);
        assert_eq!(c.publisher, PublisherKind::Null);
        assert_eq!(c.endpoint, "tcp://*:5557");
        assert_eq!(c.replay_endpoint, None);
        assert_eq!(
            (c.buffer_steps, c.hwm, c.max_queue_size),
            (10_000, 100_000, 100_000)
        );
        assert_eq!(c.topic, "");
        assert_eq!(c.encoding, Encoding::Map);
        assert_eq!(c.hash_form, HashForm::Int);
        assert!(!c.publishes());
        let on = KvEventsConfig::parse(&json!({"enable_kv_cache_events": true}), None).unwrap();
        assert_eq!(on.publisher, PublisherKind::Zmq);
        assert!(on.publishes());
        let null = json!({"enable_kv_cache_events": true, "publisher": "null"});
        assert!(!KvEventsConfig::parse(&null, None).unwrap().publishes());
    }

    #[test]
    fn every_key_and_the_extras() {
        let c = KvEventsConfig::parse(
            &json!({"enable_kv_cache_events": true, "publisher": "zmq",
                    "endpoint": "tcp://router:5557", "replay_endpoint": "tcp://*:5558",
                    "buffer_steps": 5, "hwm": 7, "max_queue_size": 9,
                    "topic": "kv@10.0.0.1:8000@m", "event_encoding": "array"}),
            Some("0"),
        )
        .unwrap();
        assert_eq!(c.replay_endpoint.as_deref(), Some("tcp://*:5558"));
        assert_eq!((c.buffer_steps, c.hwm, c.max_queue_size), (5, 7, 9));
        assert_eq!(c.topic, "kv@10.0.0.1:8000@m");
        assert_eq!(c.encoding, Encoding::Array);
        assert_eq!(c.hash_form, HashForm::Bytes);
    }

    #[test]
    fn invalid_configs_are_clear_errors() {
        let bad = [
            json!({"enable_kv_cache_events": "yes"}),
            json!({"publisher": "kafka"}),
            json!({"endpoint": "localhost:5557"}),
            json!({"replay_endpoint": "tcp://"}),
            json!({"hwm": -1}),
            json!({"max_queue_size": 0}),
            json!({"buffer_steps": -3}),
            json!({"event_encoding": "json"}),
            json!({"enable_kv_cache_event": true}),
            json!([1]),
        ];
        for b in bad {
            let e = KvEventsConfig::parse(&b, None).unwrap_err().to_string();
            assert!(e.starts_with("--kv-events-config: "), "{b}: {e}");
        }
        assert!(matches!(
            KvEventsConfig::parse(&json!({}), Some("yes")),
            Err(KvEventsConfigError::BadHashEnv(_))
        ));
    }

    #[test]
    fn bind_or_connect_rule() {
        assert!(binds("tcp://*:5557"));
        assert!(binds("tcp://[::]:5557"));
        assert!(binds("ipc:///tmp/kv"));
        assert!(binds("inproc://kv"));
        assert!(!binds("tcp://10.0.0.5:5557"));
        assert!(!binds("tcp://router.svc:5557"));
    }
}
