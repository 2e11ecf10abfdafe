//! `agent serve MODEL [vllm serve flags]`: loads the model, sizes the KV cache, starts the
//! engine thread and serves the OpenAI-compatible API until SIGINT/SIGTERM.

use std::io::IsTerminal;
use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use clap::ValueEnum;
use tracing::{error, info, warn};
use tracing_subscriber::EnvFilter;

use agent::cli::{Cli, Command, ServeArgs};
use agent::engine::{self, EngineConfig};
use agent::kv_events::{self, KvEventsConfig};
use agent::metrics::{CacheConfigInfo, Metrics};
use agent::model;
use agent::server::{self, AppState, ServerConfig};
use kvcache::{KvConnector, KvEventSink, NullSink};
use offload::files::BlockFiles;
use offload::{CpuOffloadConnector, StorageTier};

/// Largest request body accepted. vLLM has no limit; this one is far above any prompt that
/// fits a context, so long prompts still get vLLM's "too long" 400 rather than a 413.
const MAX_REQUEST_BODY_BYTES: usize = 64 << 20;

fn main() -> ExitCode {
    let cli = Cli::parse_args();
    match cli.command {
        Command::Serve(args) => {
            init_tracing(&args.uvicorn_log_level);
            match serve(&args) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    error!("{e:#}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

/// RUST_LOG when set, else VLLM_LOGGING_LEVEL (as llm-d's pod specs set it), else
/// `--uvicorn-log-level`.
fn init_tracing(uvicorn_level: &str) {
    let vllm_level = std::env::var("VLLM_LOGGING_LEVEL").ok();
    let level = agent::cli::log_level(vllm_level.as_deref(), uvicorn_level);
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(level));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stdout().is_terminal())
        .init();
}

/// One line per flag given that means nothing here; an error for one that cannot be
/// honoured without changing results.
fn note_compat_flags(args: &ServeArgs) -> Result<()> {
    for note in agent::cli::compatibility_notes(args).map_err(anyhow::Error::msg)? {
        info!("{note}");
    }
    Ok(())
}

fn serve(args: &ServeArgs) -> Result<()> {
    note_compat_flags(args)?;
    let kv_events_config = args
        .kv_events_config
        .as_ref()
        .map(|json| {
            let env = std::env::var("VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES").ok();
            KvEventsConfig::parse(json, env.as_deref())
        })
        .transpose()?;
    if args.block_size == 0 {
        bail!("--block-size must be at least 1");
    }
    let (model_path, hub_id) =
        prompt::hub_cache::resolve(&args.model_path(), args.revision.as_deref())?;
    info!("loading model {}", model_path.display());
    let loaded = model::load(&model_path)
        .with_context(|| format!("failed to load model {}", model_path.display()))?;

    let model_max_len = loaded.config.max_position_embeddings;
    let max_model_len = match args.max_model_len() {
        None => model_max_len,
        Some(0) => bail!("--max-model-len must be at least 1"),
        Some(len)
            if len > model_max_len
                && std::env::var("VLLM_ALLOW_LONG_MAX_MODEL_LEN").as_deref() != Ok("1") =>
        {
            bail!(
                "User-specified max_model_len ({len}) is greater than the derived max_model_len \
                 (max_position_embeddings={model_max_len} in the model's config). To allow \
                 overriding this maximum, set the env var VLLM_ALLOW_LONG_MAX_MODEL_LEN=1."
            )
        }
        Some(len) => len,
    };

    let kv_bytes = args.kv_cache_bytes();
    let kv_dtype = args.kv_dtype();
    let bytes_per_block = loaded
        .model
        .kv_layout(1, args.block_size)
        .bytes_per_block(kv_dtype);
    let num_blocks = usize::try_from(kv_bytes / bytes_per_block as u64).unwrap_or(usize::MAX);
    let capacity = num_blocks.saturating_mul(args.block_size);
    if max_model_len > capacity {
        bail!(
            "KV cache too small for max_model_len: one request of {max_model_len} tokens needs \
             {} bytes of KV cache, but --kv-cache-memory-bytes={kv_bytes} holds {num_blocks} \
             blocks of {} tokens ({capacity} tokens). Increase --kv-cache-memory-bytes or \
             decrease --max-model-len (at most {capacity}).",
            max_model_len.div_ceil(args.block_size) * bytes_per_block,
            args.block_size,
        );
    }

    let served_model_names = if args.served_model_name.is_empty() {
        vec![hub_id.unwrap_or_else(|| loaded.name.clone())]
    } else {
        args.served_model_name.clone()
    };
    let model_name = served_model_names[0].clone();
    let hash_algo = args.prefix_caching_hash_algo;
    let config = EngineConfig {
        block_size: args.block_size,
        num_blocks,
        kv_dtype,
        max_num_seqs: args.max_num_seqs,
        max_num_batched_tokens: args.max_num_batched_tokens,
        max_model_len,
        enable_prefix_caching: args.prefix_caching(),
        hash_algo,
        hash_seed: std::env::var("PYTHONHASHSEED").ok(),
        log_requests: args.enable_log_requests && !args.disable_log_requests,
    };
    info!(
        "KV cache: {num_blocks} blocks of {} tokens ({kv_bytes} bytes, {kv_dtype:?}), \
         max_model_len {max_model_len}, prefix caching {} ({hash_algo})",
        args.block_size,
        if config.enable_prefix_caching {
            "on"
        } else {
            "off"
        },
    );

    let metrics = Arc::new(
        Metrics::new(
            &model_name,
            max_model_len,
            &CacheConfigInfo {
                block_size: args.block_size,
                num_gpu_blocks: num_blocks,
                enable_prefix_caching: config.enable_prefix_caching,
                prefix_caching_hash_algo: hash_algo.to_string(),
                cache_dtype: args
                    .kv_cache_dtype
                    .to_possible_value()
                    .map(|v| v.get_name().to_string())
                    .unwrap_or_default(),
            },
        )
        .context("registering metrics")?,
    );
    let fingerprint = server::system_fingerprint(&format!(
        "{model_name}|{}|{max_model_len}|{}|{num_blocks}|{hash_algo}|{}",
        model_path.display(),
        args.block_size,
        config.enable_prefix_caching
    ));
    let tokenizer = Arc::new(loaded.tokenizer);
    let chat_template = loaded.chat_template.map(Arc::new);
    if chat_template.is_none() {
        warn!("the model has no chat template: /v1/chat/completions will refuse requests");
    }
    let sink: Box<dyn KvEventSink> = match kv_events_config.filter(KvEventsConfig::publishes) {
        Some(events) => {
            let (sink, endpoints) = kv_events::start(&events, metrics.clone())?;
            info!(
                "KV events: publishing on {} (topic {:?}, {} encoding), replay on {}",
                endpoints.events,
                events.topic,
                events.encoding,
                endpoints.replay.as_deref().unwrap_or("none"),
            );
            Box::new(sink)
        }
        None => Box::new(NullSink),
    };
    let pd =
        agent::cli::pd_transfer(args, &|k| std::env::var(k).ok()).map_err(anyhow::Error::msg)?;
    let tiers = agent::cli::cpu_offload(args, args.block_size).map_err(anyhow::Error::msg)?;
    if pd.is_some() && tiers.is_some() {
        anyhow::bail!(
            "--kv-offloading-size with a NixlConnector --kv-transfer-config: the KV tiers and \
             P/D transfer cannot be combined yet (vLLM's MultiConnector is not implemented)"
        );
    }
    let connector: Option<Box<dyn KvConnector>> = match pd {
        Some(cfg) => {
            info!(
                "KV transfer: NixlConnector-compatible P/D over UCX, role {:?}, engine {}, side channel {}:{}, lease {:?}",
                cfg.role, cfg.engine_id, cfg.side_channel_host, cfg.side_channel_port, cfg.lease
            );
            Some(Box::new(kvtransfer::PdConnector::new(cfg, args.block_size)))
        }
        None => match tiers {
            None => None,
            Some(cfg) => {
                let mut tier =
                    CpuOffloadConnector::new(cfg.clone(), args.block_size, bytes_per_block)
                        .map_err(anyhow::Error::msg)?;
                let (_, capacity) = tier.usage();
                info!(
                    "CPU KV tier: {capacity} blocks ({} bytes), {} blocks stored",
                    cfg.cpu_bytes,
                    if cfg.offload_prompt_only {
                        "prompt"
                    } else {
                        "all"
                    },
                );
                if let Some(fs) = &cfg.storage {
                    let layout = model::kv_pool::block_layout(
                        &loaded.model.kv_layout(num_blocks, args.block_size),
                        kv_dtype,
                    );
                    let seed = config.hash_seed.as_deref().unwrap_or("");
                    let files = BlockFiles::open(
                        &fs.root_dir,
                        &model_name,
                        &layout,
                        &format!("{hash_algo}/{seed}"),
                    )
                    .map_err(anyhow::Error::msg)?;
                    info!(
                        "storage KV tier: {} ({} read, {} write threads)",
                        files.base().display(),
                        fs.read_threads,
                        fs.write_threads
                    );
                    let storage = StorageTier::start(
                        files,
                        bytes_per_block,
                        fs.read_threads,
                        fs.write_threads,
                        fs.max_bytes,
                    );
                    tier = tier.with_storage(storage);
                }
                Some(Box::new(tier))
            }
        },
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let engine = engine::start(
        config,
        loaded.model,
        tokenizer.clone(),
        metrics.clone(),
        sink,
        connector,
        runtime.handle(),
    )
    .context("starting the engine")?;

    if !args.disable_log_stats {
        let every =
            agent::stats_log::interval(std::env::var("VLLM_LOG_STATS_INTERVAL").ok().as_deref());
        runtime.spawn(agent::stats_log::run(metrics.clone(), every));
    }
    let state = AppState::new(
        engine,
        tokenizer,
        chat_template,
        metrics,
        ServerConfig {
            served_model_names,
            model_root: model_path.display().to_string(),
            max_model_len,
            max_logprobs: args.max_logprobs,
            api_keys: args.api_keys(),
            enable_prompt_tokens_details: args.enable_prompt_tokens_details,
            enable_force_include_usage: args.enable_force_include_usage,
            system_fingerprint: Some(fingerprint),
            max_body_bytes: MAX_REQUEST_BODY_BYTES,
            pooling: args.pooler_config.unwrap_or_default(),
        },
    );

    runtime.block_on(run_http(args, state))
}

/// Binds and serves until SIGTERM or SIGINT, then lets in-flight requests finish (at most
/// `--shutdown-grace`).
async fn run_http(args: &ServeArgs, state: AppState) -> Result<()> {
    let listener = args.listen.bind().await?;
    let local: SocketAddr = listener.local_addr().context("reading the bound address")?;
    let app = server::router(state);
    info!("Starting vLLM-compatible API server on http://{local}");
    info!("Uvicorn running on http://{local} (Press CTRL+C to quit)");
    httpserve::serve(
        listener,
        app,
        args.http.limits(),
        httpserve::shutdown_signal(),
    )
    .await;
    Ok(())
}
