//! `--kv-transfer-config` naming the `NixlConnector` (P/D disaggregation), as users' vLLM pod
//! specs carry it, with the side channel from vLLM's environment
//! (`VLLM_NIXL_SIDE_CHANNEL_HOST`, default localhost; `VLLM_NIXL_SIDE_CHANNEL_PORT`, 5600).
//! The data path underneath is ours (UCX), not NIXL's: see the README.

use std::time::Duration;

use kvtransfer::{KvRole, PdConfig};
use serde_json::Value;

use super::ServeArgs;

/// vLLM 0.33's default `kv_lease_duration`.
const DEFAULT_LEASE_SECS: f64 = 30.0;
/// How long a decode leg's read may take before it prefills locally instead.
const DEFAULT_TRANSFER_TIMEOUT_SECS: f64 = 10.0;

/// The P/D connector the flags ask for, if any. `env` reads the environment.
pub fn pd_transfer(
    args: &ServeArgs,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Option<PdConfig>, String> {
    let Some(config) = args
        .kv_transfer_config
        .as_ref()
        .filter(|c| c["kv_connector"] == "NixlConnector")
    else {
        return Ok(None);
    };
    let role = match &config["kv_role"] {
        Value::Null => KvRole::Both,
        Value::String(s) => KvRole::parse(s)?,
        other => return Err(format!("kv_role must be a string, got {other}")),
    };
    let engine_id = match &config["engine_id"] {
        Value::Null => uuid::Uuid::new_v4().to_string(),
        Value::String(s) if !s.is_empty() => s.clone(),
        other => return Err(format!("engine_id must be a non-empty string, got {other}")),
    };
    let mut lease = DEFAULT_LEASE_SECS;
    let mut timeout = DEFAULT_TRANSFER_TIMEOUT_SECS;
    match &config["kv_connector_extra_config"] {
        Value::Null => {}
        Value::Object(extra) => {
            for (key, v) in extra {
                let secs = || {
                    v.as_f64()
                        .filter(|s| s.is_finite() && *s > 0.0)
                        .ok_or_else(|| {
                            format!("kv_connector_extra_config.{key} must be a positive number of seconds, got {v}")
                        })
                };
                match key.as_str() {
                    "kv_lease_duration" => lease = secs()?,
                    "transfer_timeout" => timeout = secs()?,
                    "backends" => {
                        let names: Vec<&str> =
                            v.as_array().into_iter().flatten().filter_map(Value::as_str).collect();
                        if !names.contains(&"UCX") {
                            return Err(format!(
                                "kv_connector_extra_config.backends {v}: only UCX is available here"
                            ));
                        }
                    }
                    other => tracing::warn!(
                        "kv_connector_extra_config.{other} does not apply to this NixlConnector; ignored"
                    ),
                }
            }
        }
        other => {
            return Err(format!(
                "kv_connector_extra_config must be an object, got {other}"
            ))
        }
    }
    let host = env("VLLM_NIXL_SIDE_CHANNEL_HOST").unwrap_or_else(|| "localhost".into());
    let port = match env("VLLM_NIXL_SIDE_CHANNEL_PORT") {
        None => 5600,
        Some(p) => p
            .parse::<u16>()
            .ok()
            .filter(|&p| p > 0)
            .ok_or_else(|| format!("VLLM_NIXL_SIDE_CHANNEL_PORT {p:?} is not a port number"))?,
    };
    Ok(Some(PdConfig {
        role,
        engine_id,
        side_channel_host: host,
        side_channel_port: port,
        lease: Duration::from_secs_f64(lease),
        transfer_timeout: Duration::from_secs_f64(timeout),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    fn parse(config: &str, env: &[(&str, &str)]) -> Result<Option<PdConfig>, String> {
        let args = super::super::Cli::try_parse_from([
            "agent",
            "serve",
            "m.gguf",
            "--kv-transfer-config",
            config,
        ])
        .map_err(|e| e.to_string())?;
        let super::super::Command::Serve(serve) = args.command;
        let serve = *serve;
        let env: Vec<(String, String)> = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        pd_transfer(&serve, &|k| {
            env.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone())
        })
    }

    #[test]
    fn the_value_users_pod_specs_carry_today_is_accepted() {
        let c = parse(
            r#"{"kv_connector":"NixlConnector","kv_role":"kv_both"}"#,
            &[],
        )
        .unwrap()
        .unwrap();
        assert_eq!(c.role, KvRole::Both);
        assert_eq!(
            (c.side_channel_host.as_str(), c.side_channel_port),
            ("localhost", 5600)
        );
        assert_eq!(c.lease, Duration::from_secs(30));
        let c = parse(
            r#"{"kv_connector":"NixlConnector","kv_role":"kv_producer","engine_id":"p0","kv_connector_extra_config":{"kv_lease_duration":2,"backends":["UCX"]}}"#,
            &[("VLLM_NIXL_SIDE_CHANNEL_HOST", "10.1.2.3"), ("VLLM_NIXL_SIDE_CHANNEL_PORT", "5601")],
        )
        .unwrap()
        .unwrap();
        assert_eq!(c.role, KvRole::Producer);
        assert_eq!(c.engine_id, "p0");
        assert_eq!(
            (c.side_channel_host.as_str(), c.side_channel_port),
            ("10.1.2.3", 5601)
        );
        assert_eq!(c.lease, Duration::from_secs(2));
        assert!(parse(r#"{"kv_connector":"OffloadingConnector"}"#, &[])
            .unwrap()
            .is_none());
    }

    #[test]
    fn bad_values_are_start_up_errors() {
        for (config, says) in [
            (
                r#"{"kv_connector":"NixlConnector","kv_role":"kv_sometimes"}"#,
                "kv_role",
            ),
            (
                r#"{"kv_connector":"NixlConnector","kv_connector_extra_config":{"kv_lease_duration":0}}"#,
                "kv_lease_duration",
            ),
            (
                r#"{"kv_connector":"NixlConnector","kv_connector_extra_config":{"backends":["LIBFABRIC"]}}"#,
                "UCX",
            ),
            (
                r#"{"kv_connector":"NixlConnector","kv_connector_extra_config":[]}"#,
                "object",
            ),
        ] {
            let err = parse(config, &[]).unwrap_err();
            assert!(err.contains(says), "{config}: {err}");
        }
        let err = parse(
            r#"{"kv_connector":"NixlConnector"}"#,
            &[("VLLM_NIXL_SIDE_CHANNEL_PORT", "http")],
        )
        .unwrap_err();
        assert!(err.contains("VLLM_NIXL_SIDE_CHANNEL_PORT"), "{err}");
    }
}
