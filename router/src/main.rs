//! `router`: the KV-cache-aware OpenAI proxy. Loads the model's tokenizer, builds the prefix
//! index and the scheduling profile, starts the pods' monitors and event subscribers (per pod,
//! or one centralized SUB), pod discovery if asked, and serves HTTP.

use std::io::IsTerminal;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use router::config::{self, Args};
use router::events::{EventIngest, IngestConfig};
use router::index::routed::RoutedPrefixes;
use router::index::PrefixIndex;
use router::load::MonitorConfig;
use router::metrics::RouterMetrics;
use router::pods::{self, IndexHooks, Origin, PodSet};
use router::proxy::{self, RouterState};
use router::scoring::Scheduler;

fn main() -> ExitCode {
    // Colour only for a terminal: log collectors get plain text.
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_ansi(std::io::stdout().is_terminal())
        .init();
    let args = Args::parse();
    let result = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(anyhow::Error::from)
        .and_then(|rt| rt.block_on(run(args)));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // The chain of causes, never a backtrace (RUST_BACKTRACE is for panics).
            tracing::error!("{e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(args: Args) -> anyhow::Result<()> {
    anyhow::ensure!(
        !args.pods.is_empty() || args.pod_discovery.is_some(),
        "no pods: give --pod (repeatable) or --pod-discovery dns:SERVICE:PORT"
    );
    let (model_path, hub_id) = prompt::hub_cache::resolve(&args.model, args.revision.as_deref())?;
    let tokenizer = prompt::load(&model_path)
        .with_context(|| format!("loading the tokenizer of {}", model_path.display()))?;
    let model = args
        .served_model_name
        .clone()
        .or(hub_id)
        .unwrap_or_else(|| tokenizer.name.clone());
    let max_model_len = args
        .max_model_len
        .or(tokenizer.context_length)
        .with_context(|| {
            format!(
                "{} does not say its context length: give --max-model-len",
                model_path.display()
            )
        })?;
    let scheduling = config::scheduling(&args, &model)?;
    for line in &scheduling.ignored {
        tracing::info!("{line}");
    }
    let routed = scheduling
        .routed
        .map(|cfg| Arc::new(RoutedPrefixes::new(cfg)));
    let index = Arc::new(PrefixIndex::new(scheduling.index.clone())?);
    let topic_filter = scheduling
        .topic_filter
        .clone()
        .unwrap_or_else(|| args.topic_filter.clone());

    let monitor_client = reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(1))
        .build()?;
    let scrape = Duration::from_millis(args.scrape_interval_ms.max(1));
    let monitor = MonitorConfig {
        scrape_interval: scrape,
        health_every: (args.health_interval_ms / args.scrape_interval_ms.max(1)).max(1) as u32,
        timeout: Duration::from_secs(1),
    };
    let ingest = Arc::new(EventIngest::start(
        index.clone(),
        IngestConfig {
            topic_filter,
            ..IngestConfig::default()
        },
    ));
    if let Some(endpoint) = &scheduling.events_bind {
        let from = scheduling
            .events_bind_from
            .as_deref()
            .unwrap_or("the config");
        let bound = ingest.bind(endpoint).with_context(|| {
            format!(
                "centralized KV events mode ({from}) binds {endpoint} for the pods' publishers \
                 to connect to, and it could not: another process holds the port (a second \
                 router, or a pod whose --kv-events-config endpoint binds it). Free the port, \
                 move it, or drop {from} to subscribe to each pod's own publisher instead"
            )
        })?;
        tracing::info!(
            endpoint = bound,
            from,
            "centralized KV events mode: pods publish to this router's SUB"
        );
    }
    let hooks = IndexHooks {
        ingest: ingest.clone(),
        index: index.clone(),
        routed: routed.clone(),
    };
    let pods = Arc::new(PodSet::new(monitor_client, monitor, Arc::new(hooks)));
    for spec in config::pod_specs(&args, &scheduling)? {
        pods.add(spec, Origin::Static);
    }
    if let Some(discovery) = args.pod_discovery.clone() {
        tokio::spawn(pods::discover(
            pods.clone(),
            discovery,
            Duration::from_millis(args.discovery_interval_ms.max(100)),
            args.pod_events_port,
            args.pod_replay_port,
        ));
    }

    let state = Arc::new(RouterState {
        pods,
        index,
        routed,
        scheduler: Scheduler::new(scheduling.profile.clone()),
        tokenizer: Arc::new(tokenizer),
        metrics: RouterMetrics::new()?,
        client: reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(2))
            // Below the pods' idle keep-alive (vLLM's 5 s, the agent's --http-header-timeout),
            // so a pooled connection is not reused just as its pod closes it.
            .pool_idle_timeout(Duration::from_secs(4))
            .tcp_nodelay(true)
            .build()?,
        stale_after: args.stale_after(),
        max_body_bytes: args.max_body_bytes,
        max_model_len,
        expose_admin_routes: args.expose_admin_routes,
        events: ingest.stats(),
        choosing: Default::default(),
    });
    let listener = args.listen.bind().await?;
    tracing::info!(
        addr = args.listen.addr(),
        model,
        profile = %scheduling.profile.name,
        picker = scheduling.profile.picker.plugin_type(),
        "router listening"
    );
    httpserve::serve(
        listener,
        proxy::app(state),
        args.http.limits(),
        httpserve::shutdown_signal(),
    )
    .await;
    Ok(())
}
