//! The CPU tier's flags in vLLM's two spellings: `--kv-offloading-size GiB` (with
//! `--kv-offloading-backend native`, the default), or `--kv-transfer-config` naming the
//! `OffloadingConnector` with its `kv_connector_extra_config`. Keys that would change what the
//! tier does and that it cannot honour are errors, not notes.

use offload::{CpuOffloadConfig, FsTierConfig};
use serde_json::Value;

use super::ServeArgs;

const GIB: f64 = (1u64 << 30) as f64;

/// The CPU tier the flags ask for, if any. `block_size` is the device pool's.
pub fn cpu_offload(
    args: &ServeArgs,
    block_size: usize,
) -> Result<Option<CpuOffloadConfig>, String> {
    let transfer = args
        .kv_transfer_config
        .as_ref()
        .filter(|c| c["kv_connector"] == "OffloadingConnector");
    match (args.kv_offloading_size, transfer) {
        (Some(_), Some(_)) => Err(
            "--kv-offloading-size and an OffloadingConnector --kv-transfer-config both configure \
             the CPU tier: give one of them"
                .into(),
        ),
        (Some(gib), None) => {
            match args.kv_offloading_backend.as_deref() {
                None | Some("native") => {}
                Some(other) => {
                    return Err(format!(
                        "--kv-offloading-backend {other} is not available here (native only)"
                    ))
                }
            }
            if !(gib.is_finite() && gib > 0.0) {
                return Err(format!(
                    "--kv-offloading-size must be a positive GiB count, got {gib}"
                ));
            }
            Ok(Some(CpuOffloadConfig {
                cpu_bytes: (gib * GIB) as u64,
                offload_prompt_only: true,
                self_describing_events: false,
                storage: None,
            }))
        }
        (None, Some(config)) => extra_config(config, block_size).map(Some),
        (None, None) => match args.kv_offloading_backend {
            Some(_) => Err("--kv-offloading-backend needs --kv-offloading-size".into()),
            None => Ok(None),
        },
    }
}

/// `kv_connector_extra_config` of an `OffloadingConnector`.
fn extra_config(config: &Value, block_size: usize) -> Result<CpuOffloadConfig, String> {
    let extra = match &config["kv_connector_extra_config"] {
        Value::Object(m) => m.clone(),
        Value::Null => Default::default(),
        other => {
            return Err(format!(
                "kv_connector_extra_config must be an object, got {other}"
            ))
        }
    };
    let mut cfg = CpuOffloadConfig {
        cpu_bytes: 0,
        offload_prompt_only: true,
        self_describing_events: false,
        storage: None,
    };
    let mut tiering = false;
    let flag = |key: &str, v: &Value| {
        v.as_bool()
            .ok_or_else(|| format!("kv_connector_extra_config.{key} must be true or false"))
    };
    for (key, v) in &extra {
        match key.as_str() {
            "cpu_bytes_to_use" => {
                cfg.cpu_bytes = v.as_f64().filter(|b| *b >= 1.0).map(|b| b as u64).ok_or_else(
                    || format!("kv_connector_extra_config.cpu_bytes_to_use must be a positive byte count, got {v}"),
                )?
            }
            "offload_prompt_only" => cfg.offload_prompt_only = flag(key, v)?,
            "self_describing_kv_events" => cfg.self_describing_events = flag(key, v)?,
            "spec_name" => match v.as_str() {
                Some("CPUOffloadingSpec") => {}
                Some("TieringOffloadingSpec") => tiering = true,
                _ => return Err(format!("unknown offloading spec_name {v}")),
            },
            "secondary_tiers" => cfg.storage = Some(secondary_tiers(v)?),
            "eviction_policy" => {
                if v.as_str() != Some("lru") {
                    return Err(format!("eviction_policy {v} is not available here (lru only)"));
                }
            }
            // One block per chunk: a chunk is the device block here.
            "block_size" if v.as_u64() == Some(block_size as u64) => {}
            "blocks_per_chunk" if v.as_u64() == Some(1) => {}
            "block_size" | "blocks_per_chunk" => {
                return Err(format!(
                    "kv_connector_extra_config.{key} {v}: the CPU tier stores one device block \
                     ({block_size} tokens) per chunk here"
                ))
            }
            other => return Err(format!("unknown kv_connector_extra_config key {other}")),
        }
    }
    match (tiering, cfg.storage.is_some()) {
        (true, false) => {
            return Err("spec_name TieringOffloadingSpec needs secondary_tiers".into());
        }
        (false, true) => {
            return Err("secondary_tiers need spec_name TieringOffloadingSpec".into());
        }
        _ => {}
    }
    if cfg.cpu_bytes == 0 {
        return Err(
            "the OffloadingConnector needs kv_connector_extra_config.cpu_bytes_to_use".into(),
        );
    }
    Ok(cfg)
}

/// `secondary_tiers`: one `fs` tier (llm-d's tiered-prefix-cache guide).
fn secondary_tiers(v: &Value) -> Result<FsTierConfig, String> {
    let [tier] = v.as_array().map(Vec::as_slice).unwrap_or_default() else {
        return Err(format!("secondary_tiers must list one tier, got {v}"));
    };
    if tier["type"] != "fs" {
        return Err(format!(
            "secondary tier {tier}: only type fs is available here"
        ));
    }
    let threads = |key: &str| -> Result<usize, String> {
        match &tier[key] {
            Value::Null => Ok(4),
            n => n
                .as_u64()
                .filter(|n| (1..=256).contains(n))
                .map(|n| n as usize)
                .ok_or_else(|| format!("secondary tier {key} must be 1..=256, got {n}")),
        }
    };
    for key in tier.as_object().into_iter().flat_map(|o| o.keys()) {
        let known = [
            "type",
            "root_dir",
            "n_read_threads",
            "n_write_threads",
            "max_bytes",
        ];
        if !known.contains(&key.as_str()) {
            return Err(format!("unknown secondary tier key {key}"));
        }
    }
    let root_dir = tier["root_dir"]
        .as_str()
        .filter(|d| !d.is_empty())
        .ok_or("the fs secondary tier needs root_dir")?;
    let max_bytes = match &tier["max_bytes"] {
        Value::Null => None,
        v => Some(
            v.as_f64()
                .filter(|b| *b >= 1.0)
                .map(|b| b as u64)
                .ok_or_else(|| format!("secondary tier max_bytes must be a byte count, got {v}"))?,
        ),
    };
    Ok(FsTierConfig {
        root_dir: root_dir.into(),
        read_threads: threads("n_read_threads")?,
        write_threads: threads("n_write_threads")?,
        max_bytes,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::{Cli, Command};
    use clap::Parser;

    fn args(extra: &[&str]) -> ServeArgs {
        let mut argv = vec!["agent", "serve", "m"];
        argv.extend_from_slice(extra);
        match Cli::try_parse_from(argv).unwrap().command {
            Command::Serve(a) => *a,
        }
    }

    #[test]
    fn both_spellings() {
        let short = cpu_offload(&args(&["--kv-offloading-size", "0.5"]), 16)
            .unwrap()
            .unwrap();
        assert_eq!(short.cpu_bytes, 1 << 29);
        assert!(short.offload_prompt_only && !short.self_describing_events);
        let long = cpu_offload(
            &args(&[
                "--kv-transfer-config",
                r#"{"kv_connector":"OffloadingConnector","kv_role":"kv_both","kv_connector_extra_config":{"cpu_bytes_to_use":1000000,"offload_prompt_only":false,"self_describing_kv_events":true,"spec_name":"CPUOffloadingSpec","block_size":16}}"#,
            ]),
            16,
        )
        .unwrap()
        .unwrap();
        assert_eq!(long.cpu_bytes, 1_000_000);
        assert!(!long.offload_prompt_only && long.self_describing_events);
        assert_eq!(cpu_offload(&args(&[]), 16), Ok(None));
    }

    #[test]
    fn refusals_say_why() {
        let err = |a: &[&str]| cpu_offload(&args(a), 16).unwrap_err();
        assert!(err(&[
            "--kv-offloading-size",
            "1",
            "--kv-offloading-backend",
            "lmcache"
        ])
        .contains("native only"));
        assert!(err(&["--kv-offloading-backend", "native"]).contains("needs --kv-offloading-size"));
        assert!(err(&["--kv-offloading-size", "0"]).contains("positive"));
        let long = |extra: &str| {
            format!(
                r#"{{"kv_connector":"OffloadingConnector","kv_role":"kv_both","kv_connector_extra_config":{extra}}}"#
            )
        };
        assert!(err(&[
            "--kv-transfer-config",
            &long(r#"{"cpu_bytes_to_use":1e9,"spec_name":"TieringOffloadingSpec"}"#)
        ])
        .contains("needs secondary_tiers"));
        assert!(err(&["--kv-transfer-config", &long(r#"{"cpu_bytes_to_use":1e9,"spec_name":"TieringOffloadingSpec","secondary_tiers":[{"type":"s3"}]}"#)]).contains("only type fs"));
        let tiered = cpu_offload(&args(&["--kv-transfer-config", &long(r#"{"cpu_bytes_to_use":1e9,"spec_name":"TieringOffloadingSpec","secondary_tiers":[{"type":"fs","root_dir":"/mnt/kv","n_read_threads":16,"n_write_threads":8}]}"#)]), 16).unwrap().unwrap();
        assert_eq!(
            tiered.storage,
            Some(FsTierConfig {
                root_dir: "/mnt/kv".into(),
                read_threads: 16,
                write_threads: 8,
                max_bytes: None,
            })
        );
        assert!(err(&[
            "--kv-transfer-config",
            &long(r#"{"cpu_bytes_to_use":1e9,"block_size":256}"#)
        ])
        .contains("one device block"));
        assert!(err(&[
            "--kv-transfer-config",
            &long(r#"{"cpu_bytes_to_use":1e9,"colour":"red"}"#)
        ])
        .contains("unknown kv_connector_extra_config key colour"));
        assert!(err(&["--kv-transfer-config", &long("{}")]).contains("cpu_bytes_to_use"));
        assert!(err(&[
            "--kv-offloading-size",
            "1",
            "--kv-transfer-config",
            &long(r#"{"cpu_bytes_to_use":1}"#)
        ])
        .contains("give one"));
    }
}
