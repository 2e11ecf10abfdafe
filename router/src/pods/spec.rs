//! How a pod is named on the command line:
//! `--pod [NAME=]URL[,events=EP][,replay=EP][,storage=GROUP]` and
//! `--pod-discovery dns:SERVICE:PORT[,storage=GROUP]`.

use std::str::FromStr;

/// One pod's addresses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodSpec {
    /// The pod's identity in the index and in metrics; llm-d's topics name a pod `HOST:PORT`.
    pub name: String,
    /// Base URL of its HTTP API, without a trailing slash.
    pub url: String,
    /// Its KV-events PUB endpoint (pod-discovery mode).
    pub events: Option<String>,
    /// Its replay ROUTER endpoint.
    pub replay: Option<String>,
    /// The storage group whose shared tier it mounts (see `index`).
    pub storage: Option<String>,
}

impl PodSpec {
    /// The names its KV-event topics may carry besides its own: its URL's `HOST:PORT` and
    /// `HOST` (see `events::topics`).
    pub fn topic_names(&self) -> Vec<String> {
        let authority = self
            .url
            .split_once("://")
            .map_or(self.url.as_str(), |(_, rest)| rest)
            .split('/')
            .next()
            .unwrap_or_default();
        let host = authority
            .rsplit_once(':')
            .map_or(authority, |(host, _)| host)
            .trim_start_matches('[')
            .trim_end_matches(']');
        [authority, host]
            .into_iter()
            .filter(|n| !n.is_empty() && *n != self.name)
            .map(str::to_string)
            .collect()
    }
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum SpecError {
    #[error("pod URL {0:?} must start with http:// or https:// and name a host")]
    Url(String),
    #[error("unknown pod option {0:?} (expected events=…, replay=… or storage=…)")]
    Option(String),
    #[error("pod discovery {0:?} must be dns:SERVICE:PORT[,storage=GROUP]")]
    Discovery(String),
    #[error("storage group name must not be empty")]
    Storage,
}

impl FromStr for PodSpec {
    type Err = SpecError;

    fn from_str(s: &str) -> Result<Self, SpecError> {
        let mut parts = s.split(',');
        let first = parts.next().unwrap_or_default().trim();
        let (name, url) = if first.starts_with("http://") || first.starts_with("https://") {
            (None, first)
        } else {
            match first.split_once('=') {
                Some((n, u)) if !n.is_empty() => (Some(n.to_string()), u),
                _ => return Err(SpecError::Url(first.to_string())),
            }
        };
        let url = url.trim_end_matches('/');
        let authority = url
            .strip_prefix("http://")
            .or_else(|| url.strip_prefix("https://"))
            .map(|rest| rest.split('/').next().unwrap_or_default())
            .filter(|a| !a.is_empty())
            .ok_or_else(|| SpecError::Url(url.to_string()))?;
        let mut spec = PodSpec {
            name: name.unwrap_or_else(|| authority.to_string()),
            url: url.to_string(),
            events: None,
            replay: None,
            storage: None,
        };
        for part in parts {
            match part.trim().split_once('=') {
                Some(("events", ep)) => spec.events = Some(ep.to_string()),
                Some(("replay", ep)) => spec.replay = Some(ep.to_string()),
                Some(("storage", group)) => spec.storage = Some(storage_group(group)?),
                _ => return Err(SpecError::Option(part.to_string())),
            }
        }
        Ok(spec)
    }
}

fn storage_group(name: &str) -> Result<String, SpecError> {
    let name = name.trim();
    if name.is_empty() {
        return Err(SpecError::Storage);
    }
    Ok(name.to_string())
}

/// Where pods come from besides the static list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Discovery {
    /// The addresses a DNS name resolves to (a headless Service), with the pods' HTTP port;
    /// `storage`: the group every discovered pod is in (one Deployment mounting one volume).
    Dns {
        service: String,
        port: u16,
        storage: Option<String>,
    },
}

impl FromStr for Discovery {
    type Err = SpecError;

    fn from_str(s: &str) -> Result<Self, SpecError> {
        let bad = || SpecError::Discovery(s.to_string());
        let mut parts = s.split(',');
        let rest = parts
            .next()
            .unwrap_or_default()
            .strip_prefix("dns:")
            .ok_or_else(bad)?;
        let (service, port) = rest.rsplit_once(':').ok_or_else(bad)?;
        if service.is_empty() {
            return Err(bad());
        }
        let mut storage = None;
        for part in parts {
            match part.trim().split_once('=') {
                Some(("storage", group)) => storage = Some(storage_group(group)?),
                _ => return Err(bad()),
            }
        }
        Ok(Discovery::Dns {
            service: service.to_string(),
            port: port.parse().map_err(|_| bad())?,
            storage,
        })
    }
}

/// The spec of a discovered pod at `ip`: HTTP on `port`, events and replay on the given ports
/// of the same address (replay 0: none), in the storage group `storage`.
pub fn discovered(
    ip: std::net::IpAddr,
    port: u16,
    events_port: u16,
    replay_port: u16,
    storage: Option<&str>,
) -> PodSpec {
    let host = match ip {
        std::net::IpAddr::V4(v4) => v4.to_string(),
        std::net::IpAddr::V6(v6) => format!("[{v6}]"),
    };
    PodSpec {
        name: format!("{host}:{port}"),
        url: format!("http://{host}:{port}"),
        events: Some(format!("tcp://{host}:{events_port}")),
        replay: (replay_port != 0).then(|| format!("tcp://{host}:{replay_port}")),
        storage: storage.map(str::to_string),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topic_names_are_the_url_authority_and_host() {
        let spec = |name: &str, url: &str| PodSpec {
            name: name.into(),
            url: url.into(),
            events: None,
            replay: None,
            storage: None,
        };
        assert_eq!(
            spec("a", "http://10.0.0.1:8000").topic_names(),
            ["10.0.0.1:8000", "10.0.0.1"]
        );
        assert_eq!(
            spec("10.0.0.1:8000", "http://10.0.0.1:8000").topic_names(),
            ["10.0.0.1"]
        );
        assert_eq!(
            spec("b", "http://[fd00::1]:8000/").topic_names(),
            ["[fd00::1]:8000", "fd00::1"]
        );
    }

    #[test]
    fn pod_specs() {
        let p: PodSpec =
            "a=http://10.0.0.1:8000/,events=tcp://10.0.0.1:5557,replay=tcp://10.0.0.1:5558"
                .parse()
                .unwrap();
        assert_eq!(
            p,
            PodSpec {
                name: "a".into(),
                url: "http://10.0.0.1:8000".into(),
                events: Some("tcp://10.0.0.1:5557".into()),
                replay: Some("tcp://10.0.0.1:5558".into()),
                storage: None,
            }
        );
        let p: PodSpec = "http://127.0.0.1:8001".parse().unwrap();
        assert_eq!((p.name.as_str(), p.events), ("127.0.0.1:8001", None));
        let p: PodSpec = "http://h:1,storage=nfs-a".parse().unwrap();
        assert_eq!(p.storage.as_deref(), Some("nfs-a"));
        assert_eq!(
            "ftp://x".parse::<PodSpec>(),
            Err(SpecError::Url("ftp://x".into()))
        );
        assert_eq!(
            "http://".parse::<PodSpec>(),
            Err(SpecError::Url("http:".into()))
        );
        assert_eq!(
            "http://h:1,bogus=1".parse::<PodSpec>(),
            Err(SpecError::Option("bogus=1".into()))
        );
    }

    #[test]
    fn discovery_specs() {
        assert_eq!(
            "dns:vllm.ns.svc.cluster.local:8000".parse::<Discovery>(),
            Ok(Discovery::Dns {
                service: "vllm.ns.svc.cluster.local".into(),
                port: 8000,
                storage: None,
            })
        );
        assert_eq!(
            "dns:vllm:8000,storage=shared".parse::<Discovery>(),
            Ok(Discovery::Dns {
                service: "vllm".into(),
                port: 8000,
                storage: Some("shared".into()),
            })
        );
        assert_eq!(
            "dns:vllm:8000,storage=".parse::<Discovery>(),
            Err(SpecError::Storage)
        );
        for bad in [
            "vllm:8000",
            "dns:vllm",
            "dns::80",
            "dns:v:http",
            "dns:v:80,bogus=1",
        ] {
            assert!(bad.parse::<Discovery>().is_err(), "{bad}");
        }
        let p = discovered("10.1.2.3".parse().unwrap(), 8000, 5557, 0, Some("g"));
        assert_eq!(p.name, "10.1.2.3:8000");
        assert_eq!(p.events.as_deref(), Some("tcp://10.1.2.3:5557"));
        assert_eq!(p.replay, None);
        assert_eq!(p.storage.as_deref(), Some("g"));
        let p = discovered("::1".parse().unwrap(), 80, 1, 2, None);
        assert_eq!(p.url, "http://[::1]:80");
    }
}
