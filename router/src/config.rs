//! Router configuration: the command line, and the scheduling YAML in the shape of llm-d's
//! `EndpointPickerConfig` (a `plugins` list of `type`/`name`/`parameters`, `schedulingProfiles`
//! referring to them with weights, one picker per profile). Without a YAML, `--policy` picks a
//! built-in profile written in the same YAML.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, ValueEnum};
use serde::Deserialize;
use serde_json::Value;

use crate::index::routed::RoutedConfig;
use crate::index::{IndexConfig, TierWeights};
use crate::pods::{Discovery, PodSpec};
use crate::scoring::{Picker, Profile, Scorer, WeightedScorer, DEFAULT_QUEUE_THRESHOLD};

/// `router`: a KV-cache-aware OpenAI proxy in front of agents or vLLM pods.
#[derive(Debug, Clone, Parser)]
#[command(name = "router", version)]
pub struct Args {
    #[command(flatten)]
    pub listen: httpserve::ListenArgs,
    #[command(flatten)]
    pub http: httpserve::HttpLimitArgs,
    /// The model the pods serve, for its tokenizer and chat template: a GGUF file, a Hugging
    /// Face directory, or a Hugging Face id in the local hub cache (the agent's MODEL).
    #[arg(long)]
    pub model: PathBuf,
    /// The revision of a Hugging Face id `--model` (default: main).
    #[arg(long)]
    pub revision: Option<String>,
    /// The model name clients send; seeds the prefix index's block keys (default, as the
    /// agent's: the Hugging Face id, else the GGUF file stem or directory name).
    #[arg(long)]
    pub served_model_name: Option<String>,
    /// A pod: `[NAME=]http://HOST:PORT[,events=tcp://HOST:5557][,replay=tcp://HOST:5558]
    /// [,storage=GROUP]`. NAME defaults to HOST:PORT (llm-d's topic `kv@HOST:PORT@MODEL` names
    /// the same pod); pods of one storage GROUP mount one shared storage tier, so a block in
    /// it counts for each of them. Repeatable.
    #[arg(long = "pod", value_name = "SPEC")]
    pub pods: Vec<PodSpec>,
    /// `dns:SERVICE:PORT[,storage=GROUP]`: the pods are the addresses SERVICE resolves to (a
    /// Kubernetes headless Service), re-resolved every `--discovery-interval-ms`; with
    /// storage=, all of them mount one shared storage tier.
    #[arg(long)]
    pub pod_discovery: Option<Discovery>,
    #[arg(long, default_value_t = 5000)]
    pub discovery_interval_ms: u64,
    /// KV events port of discovered pods (their PUB).
    #[arg(long, default_value_t = 5557)]
    pub pod_events_port: u16,
    /// Replay port of discovered pods (their ROUTER); 0 for none.
    #[arg(long, default_value_t = 5558)]
    pub pod_replay_port: u16,
    /// Centralized events: bind one SUB here (e.g. `tcp://*:5557`) that the pods' publishers
    /// connect to; events are attributed to pods by their topic `kv@HOST:PORT@MODEL`.
    #[arg(long)]
    pub events_bind: Option<String>,
    /// Topic prefix the event subscribers accept.
    #[arg(long, default_value = "kv@")]
    pub topic_filter: String,
    /// Scheduling YAML (llm-d EndpointPickerConfig); overrides `--policy`.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// The profile to use from `--config` (default: the first).
    #[arg(long)]
    pub profile: Option<String>,
    /// Built-in scheduling profile when there is no `--config`.
    #[arg(long, value_enum, default_value_t = Policy::PrefixAware)]
    pub policy: Policy,
    /// Tokens per KV block; must equal the pods' `--block-size`.
    #[arg(long, default_value_t = 16)]
    pub block_size: usize,
    #[arg(long, default_value_t = 50)]
    pub scrape_interval_ms: u64,
    /// A pod's load is unknown when its last good scrape is older than this.
    #[arg(long, default_value_t = 2000)]
    pub stale_after_ms: u64,
    /// `/health` is probed every this many milliseconds.
    #[arg(long, default_value_t = 500)]
    pub health_interval_ms: u64,
    /// Largest request body accepted.
    #[arg(long, default_value_t = 64 << 20)]
    pub max_body_bytes: usize,
    /// The pods' context length, as their `--max-model-len` (default: the model's, as the
    /// agent's). A prompt that cannot fit is routed by load without being tokenized, and the
    /// pod gives its 400.
    #[arg(long)]
    pub max_model_len: Option<usize>,
    /// Pass the pods' admin endpoints (`/reset_prefix_cache`, `/debug/…`, vLLM's dev-mode
    /// ones) through to clients; without it they answer 404 here.
    #[arg(long)]
    pub expose_admin_routes: bool,
}

impl Args {
    pub fn stale_after(&self) -> Duration {
        Duration::from_millis(self.stale_after_ms)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Policy {
    /// Precise prefix cache 3, KV utilization 2, queue 2, max-score picker (llm-d's sample).
    PrefixAware,
    /// Load only: KV utilization 1, queue 1, max-score picker.
    LoadAware,
    /// Each pod in turn.
    RoundRobin,
    /// Uniformly random.
    Random,
}

impl Policy {
    /// The built-in profile as an EndpointPickerConfig YAML: its scorers (with weights) and
    /// picker as plugins, referred to by one `default` profile. The prefix scorer has no
    /// parameters: the index takes `--block-size` and the defaults.
    pub fn yaml(self) -> String {
        let (scorers, picker): (&[(&str, u32)], &str) = match self {
            Self::PrefixAware => (
                &[
                    ("precise-prefix-cache-scorer", 3),
                    ("kv-cache-utilization-scorer", 2),
                    ("queue-scorer", 2),
                ],
                "max-score-picker",
            ),
            Self::LoadAware => (
                &[("kv-cache-utilization-scorer", 1), ("queue-scorer", 1)],
                "max-score-picker",
            ),
            Self::RoundRobin => (&[], "round-robin-picker"),
            Self::Random => (&[], "random-picker"),
        };
        let (mut plugins, mut refs) = (String::new(), String::new());
        for (kind, weight) in scorers {
            plugins += &format!("- type: {kind}\n");
            refs += &format!("  - pluginRef: {kind}\n    weight: {weight}\n");
        }
        format!(
            "kind: EndpointPickerConfig\nplugins:\n{plugins}- type: {picker}\n\
             schedulingProfiles:\n- name: default\n  plugins:\n{refs}  - pluginRef: {picker}\n"
        )
    }
}

/// llm-d's `EndpointPickerConfig`, the parts the router reads.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EndpointPickerConfig {
    #[serde(default)]
    pub plugins: Vec<PluginSpec>,
    #[serde(default)]
    pub scheduling_profiles: Vec<ProfileSpec>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct PluginSpec {
    #[serde(rename = "type")]
    pub kind: String,
    /// Defaults to the type.
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub parameters: Value,
}

impl PluginSpec {
    fn name(&self) -> &str {
        self.name.as_deref().unwrap_or(&self.kind)
    }
}

#[derive(Debug, Clone, Deserialize)]
pub struct ProfileSpec {
    pub name: String,
    #[serde(default)]
    pub plugins: Vec<PluginRef>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PluginRef {
    pub plugin_ref: String,
    #[serde(default)]
    pub weight: Option<f64>,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("invalid scheduling config: {0}")]
    Yaml(#[from] serde_norway::Error),
    #[error("scheduling config: {0}")]
    Invalid(String),
}

fn invalid(msg: impl Into<String>) -> ConfigError {
    ConfigError::Invalid(msg.into())
}

/// The resolved scheduling configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct Scheduling {
    pub profile: Profile,
    /// Index settings from the `precise-prefix-cache-scorer` parameters (also when the profile
    /// does not score with it: the index is still fed, for `/metrics` and later use).
    pub index: IndexConfig,
    /// `kvEventsConfig` of the prefix scorer: a centralized SUB endpoint and topic filter.
    pub events_bind: Option<String>,
    pub topic_filter: Option<String>,
    /// Which setting asked for centralized mode, for the log and for a bind error.
    pub events_bind_from: Option<String>,
    /// The `prefix-cache-scorer` parameters, when the profile scores with it.
    pub routed: Option<RoutedConfig>,
    /// One line per parameter given that the router does not read, saying why (logged at
    /// start-up).
    pub ignored: Vec<String>,
    /// The prefix scorer's `storageGroups`: pod name -> storage group.
    pub storage_groups: BTreeMap<String, String>,
}

impl EndpointPickerConfig {
    pub fn from_yaml(text: &str) -> Result<Self, ConfigError> {
        Ok(serde_norway::from_str(text)?)
    }

    pub fn from_file(path: &std::path::Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        Self::from_yaml(&text)
    }

    /// Resolves profile `name` (default: the first) against the plugins. `model` seeds the
    /// index; `block_size` is used unless the prefix scorer's parameters set one.
    pub fn resolve(
        &self,
        name: Option<&str>,
        model: &str,
        block_size: usize,
    ) -> Result<Scheduling, ConfigError> {
        let spec = match name {
            Some(n) => self
                .scheduling_profiles
                .iter()
                .find(|p| p.name == n)
                .ok_or_else(|| invalid(format!("no scheduling profile named {n:?}")))?,
            None => self
                .scheduling_profiles
                .first()
                .ok_or_else(|| invalid("no schedulingProfiles"))?,
        };
        let mut ignored = Vec::new();
        for plugin in &self.plugins {
            // Every plugin is checked, referenced or not: a typo must not pass unnoticed.
            if let PluginKind::ProfileHandler = plugin_kind(plugin)? {
                if name.is_none() && self.scheduling_profiles.len() > 1 {
                    return Err(invalid(format!(
                        "{} runs one scheduling profile, and the config has {}: keep one, or \
                         pick one with --profile",
                        plugin.kind,
                        self.scheduling_profiles.len()
                    )));
                }
            }
            ignored.extend(ignored_parameters(plugin));
        }
        let mut scorers = Vec::new();
        let mut picker = None;
        for r in &spec.plugins {
            let plugin = self
                .plugins
                .iter()
                .find(|p| p.name() == r.plugin_ref)
                .ok_or_else(|| {
                    invalid(format!(
                        "profile {:?} refers to unknown plugin {:?}",
                        spec.name, r.plugin_ref
                    ))
                })?;
            match plugin_kind(plugin)? {
                PluginKind::Scorer(scorer) => {
                    let weight = r.weight.unwrap_or(1.0);
                    if !weight.is_finite() || weight < 0.0 {
                        return Err(invalid(format!(
                            "weight {weight} of {:?} is not a non-negative number",
                            r.plugin_ref
                        )));
                    }
                    scorers.push(WeightedScorer {
                        name: r.plugin_ref.clone(),
                        scorer,
                        weight,
                    });
                }
                PluginKind::Picker(p) if picker.is_none() => picker = Some(p),
                PluginKind::Picker(_) => {
                    return Err(invalid(format!(
                        "profile {:?} has more than one picker",
                        spec.name
                    )))
                }
                PluginKind::ProfileHandler => {
                    return Err(invalid(format!(
                        "profile {:?} refers to the profile handler {:?}: it belongs in \
                         plugins only",
                        spec.name, r.plugin_ref
                    )))
                }
            }
        }
        let routed = match spec.plugins.iter().find_map(|r| {
            self.plugins
                .iter()
                .find(|p| p.name() == r.plugin_ref && p.kind == "prefix-cache-scorer")
        }) {
            Some(p) => Some(routed_parameters(&p.parameters)?),
            None => None,
        };
        let mut index = IndexConfig::new(model);
        index.block_size = block_size;
        let (mut events_bind, mut topic_filter) = (None, None);
        let mut storage_groups = BTreeMap::new();
        if let Some(p) = self
            .plugins
            .iter()
            .find(|p| p.kind == "precise-prefix-cache-scorer")
        {
            prefix_parameters(&p.parameters, &mut index)?;
            storage_groups = storage_group_parameters(&p.parameters["storageGroups"])?;
            let events = &p.parameters["kvEventsConfig"];
            events_bind = events["zmqEndpoint"].as_str().map(str::to_string);
            topic_filter = events["topicFilter"].as_str().map(str::to_string);
        }
        let events_bind_from = events_bind
            .as_ref()
            .map(|_| "kvEventsConfig.zmqEndpoint of the precise-prefix-cache-scorer".to_string());
        Ok(Scheduling {
            profile: Profile {
                name: spec.name.clone(),
                scorers,
                // llm-d's default picker.
                picker: picker.unwrap_or(Picker::MaxScore),
            },
            index,
            events_bind,
            topic_filter,
            events_bind_from,
            routed,
            ignored,
            storage_groups,
        })
    }
}

/// `storageGroups: [{name: GROUP, pods: [POD, …]}]`: the pods (by their `--pod` names) that
/// mount one shared storage tier.
fn storage_group_parameters(v: &Value) -> Result<BTreeMap<String, String>, ConfigError> {
    let mut of = BTreeMap::new();
    let groups = match v {
        Value::Null => return Ok(of),
        Value::Array(groups) => groups,
        other => {
            return Err(invalid(format!(
                "storageGroups must be a list of {{name, pods}}, got {other}"
            )))
        }
    };
    for g in groups {
        let (Some(name), Some(pods)) = (
            g["name"].as_str().filter(|n| !n.trim().is_empty()),
            g["pods"].as_array(),
        ) else {
            return Err(invalid(format!(
                "storageGroups entries need a name and a list of pods, got {g}"
            )));
        };
        for pod in pods {
            let pod = pod.as_str().ok_or_else(|| {
                invalid(format!("storageGroups {name:?}: pod {pod} is not a name"))
            })?;
            if let Some(other) = of.insert(pod.to_string(), name.to_string()) {
                return Err(invalid(format!(
                    "pod {pod:?} is in two storage groups, {other:?} and {name:?}"
                )));
            }
        }
    }
    Ok(of)
}

/// The `--pod` specs with the YAML's storage groups applied: a pod in a group there and with
/// another `storage=` on its flag, or a YAML pod no `--pod` names, is an error.
pub fn pod_specs(args: &Args, s: &Scheduling) -> Result<Vec<PodSpec>, ConfigError> {
    let mut specs = args.pods.clone();
    for (pod, group) in &s.storage_groups {
        let spec = specs.iter_mut().find(|p| &p.name == pod).ok_or_else(|| {
            invalid(format!(
                "storageGroups names pod {pod:?}, and no --pod has that name (discovered pods \
                 take their group from --pod-discovery …,storage=GROUP)"
            ))
        })?;
        match &spec.storage {
            Some(flag) if flag != group => {
                return Err(invalid(format!(
                    "pod {pod:?} is in storage group {flag:?} by its --pod flag and in \
                     {group:?} by storageGroups"
                )))
            }
            _ => spec.storage = Some(group.clone()),
        }
    }
    Ok(specs)
}

enum PluginKind {
    Scorer(Scorer),
    Picker(Picker),
    /// `single-profile-handler`: the one profile is the primary one (ours always is).
    ProfileHandler,
}

fn plugin_kind(p: &PluginSpec) -> Result<PluginKind, ConfigError> {
    Ok(match p.kind.as_str() {
        "precise-prefix-cache-scorer" => PluginKind::Scorer(Scorer::PrecisePrefixCache),
        "kv-cache-utilization-scorer" => PluginKind::Scorer(Scorer::KvCacheUtilization),
        "prefix-cache-scorer" => PluginKind::Scorer(Scorer::PrefixCache),
        "queue-scorer" => PluginKind::Scorer(Scorer::Queue),
        "load-aware-scorer" => {
            let threshold = match p.parameters.get("threshold") {
                None | Some(Value::Null) => DEFAULT_QUEUE_THRESHOLD,
                Some(v) => v.as_f64().filter(|t| *t > 0.0).ok_or_else(|| {
                    invalid(format!("load-aware-scorer threshold {v} must be > 0"))
                })?,
            };
            PluginKind::Scorer(Scorer::LoadAware { threshold })
        }
        "max-score-picker" => PluginKind::Picker(Picker::MaxScore),
        "random-picker" => PluginKind::Picker(Picker::Random),
        "round-robin-picker" => PluginKind::Picker(Picker::RoundRobin),
        "single-profile-handler" => PluginKind::ProfileHandler,
        other => return Err(invalid(format!("unknown plugin type {other:?}"))),
    })
}

/// llm-d's `indexerConfig` spellings: `tokenProcessorConfig.blockSize`,
/// `kvBlockIndexConfig.inMemoryConfig.{size, podCacheSize}`, `kvCacheBackendConfigs`, and this
/// router's `tierWeights.{gpu, cpu, storage}` and `maxBlocksPerPod`.
fn prefix_parameters(params: &Value, index: &mut IndexConfig) -> Result<(), ConfigError> {
    let indexer = &params["indexerConfig"];
    let positive = |v: &Value, what: &str| -> Result<Option<usize>, ConfigError> {
        match v {
            Value::Null => Ok(None),
            v => v
                .as_u64()
                .filter(|n| *n > 0)
                .map(|n| Some(n as usize))
                .ok_or_else(|| invalid(format!("{what} must be a positive integer, got {v}"))),
        }
    };
    let block = &indexer["tokenProcessorConfig"]["blockSize"];
    if let Some(b) = positive(block, "blockSize")? {
        index.block_size = b;
    }
    let mem = &indexer["kvBlockIndexConfig"]["inMemoryConfig"];
    if let Some(n) = positive(&mem["size"], "inMemoryConfig.size")? {
        index.max_keys = n;
    }
    if let Some(n) = positive(&mem["podCacheSize"], "inMemoryConfig.podCacheSize")? {
        index.max_pods_per_key = n;
    }
    if let Some(n) = positive(&params["maxBlocksPerPod"], "maxBlocksPerPod")? {
        index.max_blocks_per_pod = n;
    }
    let tiers = &params["tierWeights"];
    let default = TierWeights::default();
    let weight = |key: &str, d: f64| -> Result<f64, ConfigError> {
        match &tiers[key] {
            Value::Null => Ok(d),
            v => v
                .as_f64()
                .ok_or_else(|| invalid(format!("tierWeights.{key} must be a number"))),
        }
    };
    index.tier_weights = TierWeights {
        gpu: weight("gpu", default.gpu)?,
        cpu: weight("cpu", default.cpu)?,
        storage: weight("storage", default.storage)?,
    };
    // llm-d's spelling: `indexerConfig.kvCacheBackendConfigs: [{name, weight}]`.
    match &indexer["kvCacheBackendConfigs"] {
        Value::Null => {}
        Value::Array(backends) => {
            for b in backends {
                let (Some(name), Some(w)) = (b["name"].as_str(), b["weight"].as_f64()) else {
                    return Err(invalid(format!(
                        "kvCacheBackendConfigs entries need a name and a numeric weight, got {b}"
                    )));
                };
                let slot = match name.to_ascii_lowercase().as_str() {
                    "gpu" => &mut index.tier_weights.gpu,
                    "cpu" => &mut index.tier_weights.cpu,
                    "storage" => &mut index.tier_weights.storage,
                    other => {
                        return Err(invalid(format!(
                            "kvCacheBackendConfigs tier {other:?}: this router knows gpu, cpu \
                             and storage (events' media)"
                        )))
                    }
                };
                *slot = w;
            }
        }
        other => {
            return Err(invalid(format!(
                "kvCacheBackendConfigs must be a list of {{name, weight}}, got {other}"
            )))
        }
    }
    Ok(())
}

/// `prefix-cache-scorer`'s `maxPrefixBlocksToMatch` and `lruCapacityPerServer` (llm-d's
/// defaults when absent; 0 or less means the default, as there).
fn routed_parameters(params: &Value) -> Result<RoutedConfig, ConfigError> {
    let default = RoutedConfig::default();
    let count = |key: &str, d: usize| -> Result<usize, ConfigError> {
        match &params[key] {
            Value::Null => Ok(d),
            v => match v.as_i64() {
                Some(n) if n > 0 => Ok(n as usize),
                Some(_) => Ok(d),
                None => Err(invalid(format!(
                    "prefix-cache-scorer {key} must be an integer, got {v}"
                ))),
            },
        }
    };
    Ok(RoutedConfig {
        max_prefix_blocks: count("maxPrefixBlocksToMatch", default.max_prefix_blocks)?,
        lru_capacity_per_server: count("lruCapacityPerServer", default.lru_capacity_per_server)?,
    })
}

/// The parameters each plugin type reads, as dotted paths of object keys.
fn known_parameters(kind: &str) -> &'static [&'static str] {
    match kind {
        "precise-prefix-cache-scorer" => &[
            "indexerConfig.tokenProcessorConfig.blockSize",
            "indexerConfig.kvBlockIndexConfig.inMemoryConfig.size",
            "indexerConfig.kvBlockIndexConfig.inMemoryConfig.podCacheSize",
            "indexerConfig.kvCacheBackendConfigs",
            "kvEventsConfig.zmqEndpoint",
            "kvEventsConfig.topicFilter",
            "tierWeights.gpu",
            "tierWeights.cpu",
            "tierWeights.storage",
            "maxBlocksPerPod",
            "storageGroups",
        ],
        "prefix-cache-scorer" => &["maxPrefixBlocksToMatch", "lruCapacityPerServer"],
        "load-aware-scorer" => &["threshold"],
        _ => &[],
    }
}

/// Why a parameter llm-d's plugins take means nothing here, by its last key.
fn why_ignored(kind: &str, key: &str) -> &'static str {
    match (kind, key) {
        (_, "hashSeed") => {
            "the router keys blocks from each event's token_ids with its own chained hash \
             (seeded with the model name), so the pods' hash seed never matters"
        }
        (_, "enableMetrics" | "metricsLoggingInterval") => {
            "the index's figures are always on the router's /metrics"
        }
        (_, "tokenizersPoolConfig" | "tokenizersCacheDir" | "modelName") => {
            "requests are tokenized with --model's tokenizer"
        }
        (_, "concurrency") => "each pod's events are applied in order by one worker",
        (_, "discoverPods") => {
            "the router subscribes to each pod's own publisher (--pod events=, \
             --pod-discovery) unless zmqEndpoint makes it bind one socket for all"
        }
        ("prefix-cache-scorer", "hashBlockSize" | "blockSize") => {
            "blocks are the pods' KV blocks of token ids (--block-size), not characters"
        }
        ("prefix-cache-scorer", "autoTune") => "capacity is lruCapacityPerServer as given",
        _ => "not a parameter of this router",
    }
}

/// One line per parameter of `plugin` outside [`known_parameters`].
fn ignored_parameters(plugin: &PluginSpec) -> Vec<String> {
    let known = known_parameters(&plugin.kind);
    let mut out = Vec::new();
    let mut stack: Vec<(String, &Value)> = vec![(String::new(), &plugin.parameters)];
    while let Some((path, value)) = stack.pop() {
        let Value::Object(map) = value else { continue };
        for (key, v) in map {
            let full = if path.is_empty() {
                key.clone()
            } else {
                format!("{path}.{key}")
            };
            let below = format!("{full}.");
            if known.contains(&full.as_str()) {
                continue;
            }
            if known.iter().any(|k| k.starts_with(&below)) {
                stack.push((full, v));
                continue;
            }
            out.push(format!(
                "{} parameter {full} ignored: {}",
                plugin.name(),
                why_ignored(&plugin.kind, key)
            ));
        }
    }
    out.sort();
    out
}

/// The scheduling configuration the flags select: `--config` (and `--profile`) or the
/// built-in `--policy`. Flags for events override the YAML's `kvEventsConfig`.
pub fn scheduling(args: &Args, model: &str) -> Result<Scheduling, ConfigError> {
    let cfg = match &args.config {
        Some(path) => EndpointPickerConfig::from_file(path)?,
        None => EndpointPickerConfig::from_yaml(&args.policy.yaml())?,
    };
    let mut s = cfg.resolve(args.profile.as_deref(), model, args.block_size)?;
    if let Some(path) = &args.config {
        s.events_bind_from = s
            .events_bind_from
            .map(|from| format!("{from} in {}", path.display()));
    }
    if args.events_bind.is_some() {
        s.events_bind = args.events_bind.clone();
        s.events_bind_from = Some("--events-bind".into());
    }
    Ok(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(extra: &[&str]) -> Args {
        let mut argv = vec!["router", "--model", "m.gguf"];
        argv.extend_from_slice(extra);
        Args::try_parse_from(argv).unwrap()
    }

    /// The first profile of a YAML config, for model "m" and blocks of 16.
    fn resolve(yaml: &str) -> Result<Scheduling, ConfigError> {
        EndpointPickerConfig::from_yaml(yaml)?.resolve(None, "m", 16)
    }

    fn weights(s: &Scheduling) -> Vec<(Scorer, f64)> {
        s.profile
            .scorers
            .iter()
            .map(|w| (w.scorer, w.weight))
            .collect()
    }

    #[test]
    fn built_in_profiles() {
        let a = args(&["--pod", "http://127.0.0.1:8001", "--block-size", "32"]);
        let s = scheduling(&a, "m").unwrap();
        assert_eq!(s.profile.picker, Picker::MaxScore);
        assert_eq!(
            weights(&s),
            vec![
                (Scorer::PrecisePrefixCache, 3.0),
                (Scorer::KvCacheUtilization, 2.0),
                (Scorer::Queue, 2.0)
            ]
        );
        assert_eq!((s.index.block_size, s.index.model.as_str()), (32, "m"));
        assert!(s.profile.uses_prefix());
        for (policy, picker) in [
            ("round-robin", Picker::RoundRobin),
            ("random", Picker::Random),
            ("load-aware", Picker::MaxScore),
        ] {
            let s = scheduling(&args(&["--policy", policy]), "m").unwrap();
            assert_eq!(s.profile.picker, picker);
            assert!(!s.profile.uses_prefix());
        }
        let s = scheduling(&args(&["--policy", "load-aware"]), "m").unwrap();
        assert_eq!(
            weights(&s),
            vec![(Scorer::KvCacheUtilization, 1.0), (Scorer::Queue, 1.0)]
        );
        assert_eq!(s.index.block_size, 16);
    }

    #[test]
    fn llm_d_shaped_yaml() {
        let yaml = include_str!("../testdata/endpoint-picker.yaml");
        let cfg = EndpointPickerConfig::from_yaml(yaml).unwrap();
        let s = cfg.resolve(Some("default"), "m", 16).unwrap();
        assert_eq!(
            s.profile.scorers,
            vec![
                WeightedScorer {
                    name: "prefix".into(),
                    scorer: Scorer::PrecisePrefixCache,
                    weight: 2.5
                },
                WeightedScorer {
                    name: "load-aware-scorer".into(),
                    scorer: Scorer::LoadAware { threshold: 64.0 },
                    weight: 1.0
                },
            ]
        );
        assert_eq!(s.profile.picker, Picker::MaxScore);
        assert_eq!(s.index.block_size, 64);
        assert_eq!((s.index.max_keys, s.index.max_pods_per_key), (1000, 4));
        assert_eq!(s.index.max_blocks_per_pod, 5000);
        assert_eq!(s.index.tier_weights.cpu, 0.5);
        assert_eq!(s.index.tier_weights.gpu, 1.0);
        assert_eq!(s.events_bind.as_deref(), Some("tcp://*:5557"));
        assert!(s
            .events_bind_from
            .as_deref()
            .is_some_and(|f| f.contains("kvEventsConfig.zmqEndpoint")));
        assert_eq!(s.topic_filter.as_deref(), Some("kv@"));
        let first = cfg.resolve(None, "m", 16).unwrap();
        assert_eq!(first.profile.name, "other");
        assert_eq!(first.profile.picker, Picker::Random);
    }

    #[test]
    fn storage_groups_from_flags_and_yaml() {
        let yaml = |groups: &str| {
            format!(
                "plugins:\n- type: precise-prefix-cache-scorer\n  parameters:\n    \
                 storageGroups: {groups}\nschedulingProfiles:\n- name: d\n  plugins:\n  \
                 - pluginRef: precise-prefix-cache-scorer\n"
            )
        };
        let s = resolve(&yaml("[{name: nfs, pods: [a, b]}]")).unwrap();
        assert!(s.ignored.is_empty(), "{:?}", s.ignored);
        let a = args(&[
            "--pod",
            "a=http://h:1",
            "--pod",
            "b=http://h:2,storage=nfs",
            "--pod",
            "c=http://h:3,storage=x",
        ]);
        let groups: Vec<_> = pod_specs(&a, &s)
            .unwrap()
            .into_iter()
            .map(|p| (p.name, p.storage))
            .collect();
        let named = |n: &str, g: Option<&str>| (n.to_string(), g.map(str::to_string));
        assert_eq!(
            groups,
            [
                named("a", Some("nfs")),
                named("b", Some("nfs")),
                named("c", Some("x"))
            ]
        );
        let other = args(&["--pod", "a=http://h:1,storage=x"]);
        let err = pod_specs(&other, &s).unwrap_err().to_string();
        assert!(err.contains("\"x\" by its --pod flag"), "{err}");
        let missing = args(&["--pod", "a=http://h:1"]);
        let err = pod_specs(&missing, &s).unwrap_err().to_string();
        assert!(err.contains("names pod \"b\""), "{err}");
        for bad in [
            "{a: b}",
            "[{name: nfs}]",
            "[{name: '', pods: [a]}]",
            "[{name: g, pods: [1]}]",
        ] {
            assert!(resolve(&yaml(bad)).is_err(), "{bad}");
        }
        let err = resolve(&yaml("[{name: g, pods: [a]}, {name: h, pods: [a]}]")).unwrap_err();
        assert!(err.to_string().contains("two storage groups"), "{err}");
    }

    /// llm-d's CPU-tier guide: the approximate scorer with its LRU capacity, a profile handler.
    #[test]
    fn approximate_prefix_scorer_and_single_profile_handler() {
        let yaml = "plugins:\n- type: single-profile-handler\n- type: prefix-cache-scorer\n  \
                    parameters: {lruCapacityPerServer: 4000, hashBlockSize: 64, autoTune: false}\n\
                    - type: queue-scorer\nschedulingProfiles:\n- name: default\n  plugins:\n  \
                    - pluginRef: prefix-cache-scorer\n    weight: 3\n  - pluginRef: queue-scorer\n";
        let s = resolve(yaml).unwrap();
        assert_eq!(
            weights(&s),
            vec![(Scorer::PrefixCache, 3.0), (Scorer::Queue, 1.0)]
        );
        assert!(s.profile.uses_prefix());
        assert!(!s.profile.uses(Scorer::PrecisePrefixCache));
        assert_eq!(
            s.routed,
            Some(RoutedConfig {
                max_prefix_blocks: 256,
                lru_capacity_per_server: 4000
            })
        );
        assert_eq!(s.ignored.len(), 2, "{:?}", s.ignored);
        assert!(s.ignored[0].starts_with("prefix-cache-scorer parameter autoTune ignored"));
        assert!(s.ignored[1].contains("hashBlockSize ignored: blocks are the pods' KV blocks"));

        // Without the scorer in the profile there is no routing history.
        let s = scheduling(&args(&[]), "m").unwrap();
        assert_eq!((s.routed, s.ignored.len()), (None, 0));

        // One profile handler, several profiles: which one runs must be said.
        let two = "plugins:\n- type: single-profile-handler\n- type: random-picker\n\
                   schedulingProfiles:\n- name: a\n  plugins:\n  - pluginRef: random-picker\n\
                   - name: b\n  plugins:\n  - pluginRef: random-picker\n";
        let cfg = EndpointPickerConfig::from_yaml(two).unwrap();
        let e = cfg.resolve(None, "m", 16).unwrap_err().to_string();
        assert!(
            e.contains("single-profile-handler runs one scheduling profile"),
            "{e}"
        );
        assert_eq!(cfg.resolve(Some("b"), "m", 16).unwrap().profile.name, "b");
    }

    #[test]
    fn llm_d_tier_weights_spelling() {
        let yaml = "plugins:\n- type: precise-prefix-cache-scorer\n  parameters:\n    \
                    indexerConfig:\n      kvCacheBackendConfigs: [{name: GPU, weight: 1.0}, \
                    {name: cpu, weight: 0.6}, {name: storage, weight: 0.3}]\n\
                    schedulingProfiles:\n- name: default\n  plugins:\n  \
                    - pluginRef: precise-prefix-cache-scorer\n";
        let s = resolve(yaml).unwrap();
        let w = s.index.tier_weights;
        assert_eq!((w.gpu, w.cpu, w.storage), (1.0, 0.6, 0.3));
        assert!(s.ignored.is_empty(), "{:?}", s.ignored);
        let bad = yaml.replace("storage", "tape");
        let e = resolve(&bad).unwrap_err().to_string();
        assert!(e.contains("tier \"tape\""), "{e}");
    }

    /// llm-d's precise-prefix-cache-scorer parameters the router does not read are each named
    /// with why.
    #[test]
    fn llm_d_parameters_the_router_does_not_read_are_named() {
        let yaml = "plugins:\n- type: precise-prefix-cache-scorer\n  parameters:\n    \
                    indexerConfig:\n      tokenProcessorConfig: {blockSize: 16, hashSeed: \"42\"}\n      \
                    kvBlockIndexConfig: {enableMetrics: true, inMemoryConfig: {size: 100}}\n    \
                    kvEventsConfig: {zmqEndpoint: \"tcp://*:5557\", concurrency: 4}\n\
                    schedulingProfiles:\n- name: default\n  plugins:\n  \
                    - pluginRef: precise-prefix-cache-scorer\n";
        let s = resolve(yaml).unwrap();
        assert_eq!(s.index.max_keys, 100);
        let ignored = s.ignored.join("\n");
        assert_eq!(s.ignored.len(), 3, "{ignored}");
        assert!(ignored.contains(
            "indexerConfig.tokenProcessorConfig.hashSeed ignored: the router keys blocks from \
             each event's token_ids"
        ));
        assert!(ignored.contains("kvBlockIndexConfig.enableMetrics ignored"));
        assert!(ignored.contains("kvEventsConfig.concurrency ignored"));
    }

    #[test]
    fn config_errors_name_the_problem() {
        let err = |yaml: &str| {
            EndpointPickerConfig::from_yaml(yaml)
                .and_then(|c| c.resolve(None, "m", 16))
                .unwrap_err()
                .to_string()
        };
        assert!(err("plugins: []\nschedulingProfiles: []\n").contains("no schedulingProfiles"));
        assert!(
            err("schedulingProfiles:\n- name: a\n  plugins:\n  - pluginRef: x\n")
                .contains("unknown plugin \"x\"")
        );
        assert!(err(
            "plugins:\n- type: magic-scorer\nschedulingProfiles:\n- name: a\n  plugins:\n  - pluginRef: magic-scorer\n"
        )
        .contains("unknown plugin type \"magic-scorer\""));
        assert!(err(
            "plugins:\n- type: queue-scorer\nschedulingProfiles:\n- name: a\n  plugins:\n  - pluginRef: queue-scorer\n    weight: -1\n"
        )
        .contains("weight -1"));
        assert!(err("plugins: {").contains("invalid scheduling config"));
        // An unreferenced plugin is checked as well.
        assert!(err(
            "plugins:\n- type: typo-scorer\n- type: queue-scorer\nschedulingProfiles:\n- name: a\n  plugins:\n  - pluginRef: queue-scorer\n"
        )
        .contains("unknown plugin type \"typo-scorer\""));
    }
}
