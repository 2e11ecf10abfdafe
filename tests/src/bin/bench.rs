//! Benchmarks (commands and results in docs/BENCHMARKS.md).
//!
//! - `serve-load`: drives a running server with concurrent streaming completions and reports
//!   time to first token, inter-token latency and aggregate output tokens/s.
//! - `batching-gain`: issue 2's ratio (b), paired: rounds of one stream then N streams back to
//!   back against one running server, each round's ratio and their median.
//! - `oracle-decode`: single-stream greedy decoding with candle-transformers' quantized llama
//!   on the same GGUF, the peer for the agent's single-stream figure.
//! - `tier-reload`, `storage-read`: issue 18's tier figures (reload vs recompute; the storage
//!   tier's read rate vs a plain sequential read of the same files).

use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};
use e2e::oracle::Oracle;
use e2e::sse::{Event, SseStream};
use e2e::{LONG_TEXT, SERVED_MODEL};
use serde_json::json;

#[derive(Parser)]
#[command(about = "Benchmarks for the agent")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Concurrent streaming completions against a running server.
    ServeLoad {
        #[command(flatten)]
        load: Load,
        /// Requests in flight at once.
        #[arg(long, default_value_t = 1)]
        concurrency: usize,
        /// Requests in all.
        #[arg(long, default_value_t = 8)]
        requests: usize,
        /// Shared-prefix workload: request k's prompt is a pseudo-random group's long prefix
        /// (LONG_TEXT, about 200 tokens, headed by the group number) followed by `--prompt`
        /// and k. 0: every request sends `--prompt` alone.
        #[arg(long, default_value_t = 0)]
        prefix_groups: usize,
        /// Agents' base URLs whose summed prefix-cache hit rate over the run is printed.
        #[arg(long = "agent-metrics")]
        agent_metrics: Vec<String>,
    },
    /// Issue 2's ratio (b), paired: `--rounds` times, `--single-requests` requests on one
    /// stream, then `--requests` requests on `--concurrency` streams, against one running
    /// server; prints each half's aggregate output tokens/s, each round's ratio and the median
    /// ratio. On a machine whose speed drifts, a slow patch then hits both halves of a round
    /// instead of one whole run.
    BatchingGain {
        #[command(flatten)]
        load: Load,
        #[arg(long, default_value_t = 16)]
        concurrency: usize,
        #[arg(long, default_value_t = 4)]
        single_requests: usize,
        #[arg(long, default_value_t = 32)]
        requests: usize,
        #[arg(long, default_value_t = 3)]
        rounds: usize,
    },
    /// Routing overhead, paired: the same one-token streamed request alternately direct to an
    /// agent and through the router (which picks that agent: it holds the prompt's prefix);
    /// prints both TTFT distributions and the median of the per-pair differences.
    RouterOverhead {
        /// The agent the router will pick for this prompt.
        #[arg(long)]
        direct: String,
        #[arg(long)]
        router: String,
        /// Pairs to measure.
        #[arg(long, default_value_t = 200)]
        pairs: usize,
        #[arg(long, default_value = SERVED_MODEL)]
        model: String,
        #[arg(
            long,
            default_value = "The lighthouse keeper looked at the sea and said"
        )]
        prompt: String,
        /// Time a whole GET of this path (e.g. /v1/models, which the router passes through)
        /// instead of a completion's TTFT: the HTTP hop without the model's noise.
        #[arg(long)]
        get_path: Option<String>,
    },
    /// Issue 18's tier figure, paired per round: a fresh `--tokens`-token prompt (recomputed),
    /// another fresh one that pushes it out of a device pool sized for one, then the first
    /// again (reloaded from the CPU tier); prints both TTFT distributions and the median
    /// per-round ratio. Start the agent with `--kv-offloading-size` and such a pool.
    TierReload {
        #[arg(long)]
        url: String,
        #[arg(long, default_value_t = 5)]
        rounds: usize,
        #[arg(long, default_value_t = 2000)]
        tokens: usize,
        #[arg(long, default_value = SERVED_MODEL)]
        model: String,
        /// The agent's storage tier folder: each round then also reloads a third prompt after
        /// dropping the page cache of every file under it (cold storage).
        #[arg(long)]
        cold_files: Option<PathBuf>,
    },
    /// The storage tier's read rate, paired per round: `--blocks` block files of the default
    /// model's layout written under `--dir`, then, with their pages dropped before each side,
    /// one request's read of all of them by the tier (as one reload reads its run) and
    /// `cat … | dd of=/dev/null` of the same files, alternating which goes first.
    StorageRead {
        #[arg(long)]
        dir: PathBuf,
        #[arg(long, default_value_t = 500)]
        blocks: usize,
        #[arg(long, default_value_t = 5)]
        rounds: usize,
    },
    /// Single-stream greedy decoding with candle-transformers `quantized_llama`.
    OracleDecode {
        /// GGUF file.
        #[arg(long)]
        model: PathBuf,
        /// Tokens to generate.
        #[arg(long, default_value_t = 128)]
        tokens: usize,
        /// Prompt token ids, comma-separated (default: `<|im_start|>` alone).
        #[arg(long, value_delimiter = ',', default_value = "1")]
        prompt_ids: Vec<u32>,
    },
}

/// The server and the streamed greedy completion that the load modes send.
#[derive(clap::Args)]
struct Load {
    /// Base URL of the server.
    #[arg(long, default_value = "http://127.0.0.1:8000")]
    url: String,
    /// Tokens generated per request (`ignore_eos`, so exactly this many).
    #[arg(long, default_value_t = 128)]
    max_tokens: usize,
    #[arg(long, default_value = SERVED_MODEL)]
    model: String,
    #[arg(
        long,
        default_value = "Write a long story about a lighthouse keeper and the sea."
    )]
    prompt: String,
}

impl Load {
    fn url(&self) -> String {
        self.url.trim_end_matches('/').to_string()
    }

    /// The request body for `prompt`.
    fn body(&self, prompt: String) -> serde_json::Value {
        json!({
            "model": self.model,
            "prompt": prompt,
            "max_tokens": self.max_tokens,
            "ignore_eos": true,
            "temperature": 0.0,
            "stream": true,
            "stream_options": {"include_usage": true},
        })
    }
}

/// Timings of one streamed request.
struct Sample {
    ttft: Duration,
    /// Gaps between consecutive chunks that carried text.
    itl: Vec<Duration>,
    completion_tokens: usize,
}

async fn one_request(
    client: &reqwest::Client,
    url: &str,
    body: &serde_json::Value,
) -> anyhow::Result<Sample> {
    let start = Instant::now();
    let resp = client
        .post(format!("{url}/v1/completions"))
        .json(body)
        .send()
        .await
        .context("sending the request")?;
    if !resp.status().is_success() {
        let status = resp.status();
        let text = resp.text().await.unwrap_or_default();
        bail!("server answered {status}: {text}");
    }
    let mut stream = SseStream::new(resp);
    let mut ttft = None;
    let mut last = start;
    let mut itl = Vec::new();
    let mut completion_tokens = None;
    while let Some(event) = stream.next().await.map_err(anyhow::Error::msg)? {
        let Event::Json(chunk) = event else { break };
        if let Some(err) = chunk.get("error") {
            bail!("error chunk: {err}");
        }
        if let Some(n) = chunk["usage"]["completion_tokens"].as_u64() {
            completion_tokens = Some(n as usize);
        }
        let has_text = chunk["choices"][0]["text"]
            .as_str()
            .is_some_and(|t| !t.is_empty());
        if has_text {
            let now = Instant::now();
            match ttft {
                None => ttft = Some(now - start),
                Some(_) => itl.push(now - last),
            }
            last = now;
        }
    }
    Ok(Sample {
        ttft: ttft.context("no text was streamed")?,
        itl,
        completion_tokens: completion_tokens.context("no usage chunk")?,
    })
}

/// Nearest-rank percentile of sorted values.
fn percentile<T: Copy + Default>(sorted: &[T], p: f64) -> T {
    if sorted.is_empty() {
        return T::default();
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// Request `k`'s group in the shared-prefix workload: a fixed pseudo-random sequence (SplitMix64
/// of k), so groups neither cycle in step with a round-robin over the pods nor come in order.
fn group_of(k: usize, groups: usize) -> usize {
    let mut z = (k as u64).wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    ((z ^ (z >> 31)) % groups as u64) as usize
}

async fn serve_load(
    load: Load,
    concurrency: usize,
    requests: usize,
    prefix_groups: usize,
    agent_metrics: Vec<String>,
) -> anyhow::Result<()> {
    anyhow::ensure!(
        concurrency > 0 && requests > 0,
        "concurrency and requests must be > 0"
    );
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(3600))
        .build()?;
    let url = load.url();
    let body = Arc::new(move |k: usize| {
        let prompt = match prefix_groups {
            0 => load.prompt.clone(),
            g => format!(
                "[document {}] {LONG_TEXT}\n{} ({k})",
                group_of(k, g),
                load.prompt
            ),
        };
        load.body(prompt)
    });
    let hits_before = prefix_cache_counters(&client, &agent_metrics).await?;
    let (samples, wall) = run_load(&client, &url, concurrency, requests, body).await?;

    let mut ttft: Vec<Duration> = samples.iter().map(|s| s.ttft).collect();
    let mut itl: Vec<Duration> = samples.iter().flat_map(|s| s.itl.iter().copied()).collect();
    ttft.sort();
    itl.sort();
    let tokens: usize = samples.iter().map(|s| s.completion_tokens).sum();
    let mean_itl = itl.iter().sum::<Duration>().as_secs_f64() / itl.len().max(1) as f64;
    println!("requests            {}", samples.len());
    println!("concurrency         {concurrency}");
    println!("output tokens       {tokens}");
    println!("wall time           {:.2} s", wall.as_secs_f64());
    println!(
        "TTFT p50 / p90      {:.1} / {:.1} ms",
        ms(percentile(&ttft, 50.0)),
        ms(percentile(&ttft, 90.0))
    );
    println!(
        "ITL  p50 / p90      {:.1} / {:.1} ms",
        ms(percentile(&itl, 50.0)),
        ms(percentile(&itl, 90.0))
    );
    println!(
        "per-stream decode   {:.1} tokens/s (1 / mean ITL)",
        1.0 / mean_itl.max(1e-9)
    );
    println!(
        "output throughput   {:.1} tokens/s (aggregate)",
        throughput(&samples, wall)
    );
    if !agent_metrics.is_empty() {
        let after = prefix_cache_counters(&client, &agent_metrics).await?;
        let [q, device, tiers] = [0, 1, 2].map(|i| after[i] - hits_before[i]);
        println!(
            "prefix cache hits   {:.3} device + {:.3} tiers (tokens over the agents: {device} + \
             {tiers} of {q})",
            device / q.max(1.0),
            tiers / q.max(1.0),
        );
    }
    Ok(())
}

/// `requests` streamed completions (request `k`'s body is `body(k)`) on `concurrency`
/// connections; their samples and the wall time of the whole run.
async fn run_load(
    client: &reqwest::Client,
    url: &str,
    concurrency: usize,
    requests: usize,
    body: Arc<impl Fn(usize) -> serde_json::Value + Send + Sync + 'static>,
) -> anyhow::Result<(Vec<Sample>, Duration)> {
    let next = Arc::new(AtomicUsize::new(0));
    let start = Instant::now();
    let workers: Vec<_> = (0..concurrency)
        .map(|_| {
            let (client, url, body, next) =
                (client.clone(), url.to_string(), body.clone(), next.clone());
            tokio::spawn(async move {
                let mut samples = Vec::new();
                loop {
                    let k = next.fetch_add(1, Ordering::Relaxed);
                    if k >= requests {
                        break;
                    }
                    samples.push(one_request(&client, &url, &body(k)).await?);
                }
                anyhow::Ok(samples)
            })
        })
        .collect();
    let mut samples = Vec::new();
    for w in workers {
        samples.extend(w.await??);
    }
    Ok((samples, start.elapsed()))
}

/// Aggregate output tokens/s of a run.
fn throughput(samples: &[Sample], wall: Duration) -> f64 {
    let tokens: usize = samples.iter().map(|s| s.completion_tokens).sum();
    tokens as f64 / wall.as_secs_f64()
}

async fn batching_gain(
    load: Load,
    concurrency: usize,
    single_requests: usize,
    requests: usize,
    rounds: usize,
) -> anyhow::Result<()> {
    anyhow::ensure!(
        concurrency > 0 && single_requests > 0 && requests > 0 && rounds > 0,
        "concurrency, requests and rounds must be > 0"
    );
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(3600))
        .build()?;
    let url = load.url();
    let body = Arc::new(move |_: usize| load.body(load.prompt.clone()));
    let mut ratios = Vec::new();
    for round in 1..=rounds {
        let (one, wall) = run_load(&client, &url, 1, single_requests, body.clone()).await?;
        let single = throughput(&one, wall);
        let (many, wall) = run_load(&client, &url, concurrency, requests, body.clone()).await?;
        let batched = throughput(&many, wall);
        ratios.push(batched / single);
        println!(
            "round {round}: 1 stream {single:.1} tokens/s, {concurrency} streams {batched:.1} \
             tokens/s, ratio {:.2}x",
            batched / single
        );
    }
    ratios.sort_by(f64::total_cmp);
    println!(
        "median ratio        {:.2}x over {rounds} rounds",
        ratios[(ratios.len() - 1) / 2]
    );
    Ok(())
}

/// Summed `vllm:prefix_cache_hits_total` and `vllm:prefix_cache_queries_total` of `agents`.
/// Summed over the agents: prefix-cache queries, device hits and tier hits (tokens).
async fn prefix_cache_counters(
    client: &reqwest::Client,
    agents: &[String],
) -> anyhow::Result<[f64; 3]> {
    let mut sums = [0.0; 3];
    for a in agents {
        let text = client
            .get(format!("{a}/metrics"))
            .send()
            .await?
            .text()
            .await?;
        let m = e2e::Metrics::parse(&text).map_err(anyhow::Error::msg)?;
        sums[0] += m.value("vllm:prefix_cache_queries_total");
        sums[1] += m.value("vllm:prefix_cache_hits_total");
        sums[2] += m.value("vllm:external_prefix_cache_hits_total");
    }
    Ok(sums)
}

async fn router_overhead(
    direct: String,
    router: String,
    pairs: usize,
    model: String,
    prompt: String,
    get_path: Option<String>,
) -> anyhow::Result<()> {
    anyhow::ensure!(pairs > 0, "pairs must be > 0");
    let client = reqwest::Client::builder()
        .tcp_nodelay(true)
        .timeout(Duration::from_secs(600))
        .build()?;
    let body = json!({"model": model, "prompt": prompt, "max_tokens": 1, "temperature": 0,
                      "stream": true, "stream_options": {"include_usage": true}});
    let measure = |url: &String| {
        let (client, body, url) = (&client, &body, url.clone());
        let get_path = get_path.clone();
        async move {
            match get_path {
                None => Ok(one_request(client, &url, body).await?.ttft),
                Some(path) => {
                    let start = Instant::now();
                    let resp = client.get(format!("{url}{path}")).send().await?;
                    anyhow::ensure!(resp.status().is_success(), "GET {path}: {}", resp.status());
                    resp.bytes().await?;
                    anyhow::Ok(start.elapsed())
                }
            }
        }
    };
    // Warm both paths (connections, the prefix cache) before measuring.
    for url in [&direct, &router, &direct, &router] {
        measure(url).await?;
    }
    let (mut d, mut r, mut diff) = (Vec::new(), Vec::new(), Vec::new());
    for i in 0..pairs {
        // Alternate which side goes first so drift does not favour one.
        let (first, second) = if i % 2 == 0 {
            (&direct, &router)
        } else {
            (&router, &direct)
        };
        let a = measure(first).await?;
        let b = measure(second).await?;
        let (td, tr) = if i % 2 == 0 { (a, b) } else { (b, a) };
        d.push(td);
        r.push(tr);
        diff.push(tr.as_secs_f64() - td.as_secs_f64());
    }
    d.sort();
    r.sort();
    diff.sort_by(f64::total_cmp);
    println!("pairs: {pairs}");
    let what = if get_path.is_some() { "GET" } else { "TTFT" };
    println!(
        "direct {what} p50 / p90:  {:.2} / {:.2} ms",
        ms(percentile(&d, 50.0)),
        ms(percentile(&d, 90.0))
    );
    println!(
        "router {what} p50 / p90:  {:.2} / {:.2} ms",
        ms(percentile(&r, 50.0)),
        ms(percentile(&r, 90.0))
    );
    println!(
        "router - direct, per pair: p25 {:.3} / p50 {:.3} / p75 {:.3} ms",
        percentile(&diff, 25.0) * 1e3,
        percentile(&diff, 50.0) * 1e3,
        percentile(&diff, 75.0) * 1e3
    );
    Ok(())
}

fn oracle_decode(model: PathBuf, tokens: usize, prompt_ids: Vec<u32>) -> anyhow::Result<()> {
    anyhow::ensure!(tokens > 1, "--tokens must be at least 2");
    let load = Instant::now();
    let mut oracle = Oracle::load(&model)?;
    println!("load                {:.2} s", load.elapsed().as_secs_f64());
    // One short warm-up so that page faults and allocator growth are not timed.
    oracle.greedy(&prompt_ids, 2)?;
    let run = oracle.greedy(&prompt_ids, tokens)?;
    println!("prompt tokens       {}", prompt_ids.len());
    println!("prefill + 1st token {:.1} ms", ms(run.prefill_time));
    println!(
        "decode              {:.1} tokens/s ({} tokens after the first)",
        (tokens - 1) as f64 / run.decode_time.as_secs_f64(),
        tokens - 1
    );
    Ok(())
}

async fn tier_reload(
    url: String,
    rounds: usize,
    tokens: usize,
    model: String,
    cold_files: Option<PathBuf>,
) -> anyhow::Result<()> {
    anyhow::ensure!(rounds > 0 && tokens > 16, "need rounds > 0 and tokens > 16");
    let client = reqwest::Client::builder()
        .tcp_nodelay(true)
        .timeout(Duration::from_secs(600))
        .build()?;
    // Distinct prompts from a fixed sequence: no two share a block.
    let mut next = 12_345u64;
    let mut fresh = || {
        (0..tokens)
            .map(|_| {
                next = next.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
                100 + (next >> 33) as u32 % 39_000
            })
            .collect::<Vec<u32>>()
    };
    let body = |prompt: &[u32]| {
        json!({"model": model, "prompt": prompt, "max_tokens": 1, "temperature": 0,
               "stream": true, "stream_options": {"include_usage": true}})
    };
    let (mut cold, mut warm, mut ratio) = (Vec::new(), Vec::new(), Vec::new());
    let (mut dropped, mut dropped_ratio) = (Vec::new(), Vec::new());
    for _ in 0..rounds {
        let p = fresh();
        let c = one_request(&client, &url, &body(&p)).await?.ttft;
        one_request(&client, &url, &body(&fresh())).await?;
        let w = one_request(&client, &url, &body(&p)).await?.ttft;
        cold.push(c);
        warm.push(w);
        ratio.push(c.as_secs_f64() / w.as_secs_f64());
        if let Some(dir) = &cold_files {
            let p = fresh();
            let c = one_request(&client, &url, &body(&p)).await?.ttft;
            one_request(&client, &url, &body(&fresh())).await?;
            // Writes finish off the request path: let them land before their pages go.
            tokio::time::sleep(Duration::from_millis(500)).await;
            drop_file_pages(dir)?;
            let d = one_request(&client, &url, &body(&p)).await?.ttft;
            dropped.push(d);
            dropped_ratio.push(c.as_secs_f64() / d.as_secs_f64());
        }
    }
    cold.sort();
    warm.sort();
    ratio.sort_by(f64::total_cmp);
    println!("rounds: {rounds}, prompt tokens: {tokens}");
    println!("recomputed TTFT p50: {:.1} ms", ms(percentile(&cold, 50.0)));
    println!("reloaded   TTFT p50: {:.1} ms", ms(percentile(&warm, 50.0)));
    println!(
        "recomputed / reloaded, per round: median {:.1}x",
        percentile(&ratio, 50.0)
    );
    if cold_files.is_some() {
        dropped.sort();
        dropped_ratio.sort_by(f64::total_cmp);
        println!(
            "reloaded, file pages dropped, TTFT p50: {:.1} ms",
            ms(percentile(&dropped, 50.0))
        );
        println!(
            "recomputed / reloaded with pages dropped, per round: median {:.1}x",
            percentile(&dropped_ratio, 50.0)
        );
    }
    Ok(())
}

/// The regular files under `dir`, recursively.
fn files_under(dir: &std::path::Path) -> anyhow::Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).with_context(|| format!("listing {}", d.display()))? {
            let path = entry?.path();
            if path.is_dir() {
                stack.push(path);
            } else if path.is_file() {
                out.push(path);
            }
        }
    }
    out.sort();
    Ok(out)
}

/// Writes back and evicts from the page cache every file under `dir`, so the next read of
/// them goes to the device; returns how many.
fn drop_file_pages(dir: &std::path::Path) -> anyhow::Result<usize> {
    use std::os::fd::AsRawFd;
    let files = files_under(dir)?;
    for path in &files {
        // A file the sweeper just removed is simply gone.
        let Ok(f) = std::fs::File::open(path) else {
            continue;
        };
        f.sync_data()?;
        // SAFETY: a valid open descriptor; fadvise only hints the kernel.
        let rc = unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
        anyhow::ensure!(rc == 0, "posix_fadvise on {}: error {rc}", path.display());
    }
    Ok(files.len())
}

fn storage_read(dir: PathBuf, blocks: usize, rounds: usize) -> anyhow::Result<()> {
    use offload::files::BlockFiles;
    use offload::storage::{Done, StorageTier};
    anyhow::ensure!(blocks > 0 && rounds > 0, "need blocks > 0 and rounds > 0");
    std::fs::create_dir_all(&dir)?;
    // The default model's block: 30 layers, 16 tokens, 3 KV heads of 64, float16.
    let layout = kvcache::BlockLayout {
        num_layers: 30,
        num_blocks: 1,
        block_size: 16,
        num_kv_heads: 3,
        head_dim: 64,
        dtype: "float16",
        dtype_bytes: 2,
    };
    let block_bytes = layout.block_bytes();
    let files = BlockFiles::open(&dir, "storage-read-bench", &layout, "sha256_cbor")
        .map_err(anyhow::Error::msg)?;
    let hashes: Vec<kvcache::BlockHash> = (0..blocks as u64)
        .map(|i| {
            let mut d = [0u8; 32];
            d[..8].copy_from_slice(&i.to_le_bytes());
            kvcache::BlockHash::from_digest(&d)
        })
        .collect();
    let mut data = vec![0u8; block_bytes];
    for (i, h) in hashes.iter().enumerate() {
        data.iter_mut()
            .enumerate()
            .for_each(|(j, b)| *b = (i * 31 + j) as u8);
        files.write(h, &data, std::time::SystemTime::now())?;
    }
    let base = files.base().to_path_buf();
    let paths: Vec<PathBuf> = files_under(&base)?
        .into_iter()
        .filter(|p| p.extension().is_some_and(|e| e == "bin"))
        .collect();
    let file_bytes: u64 = paths
        .iter()
        .map(|p| std::fs::metadata(p).map(|m| m.len()))
        .sum::<std::io::Result<u64>>()?;
    let mut tier = StorageTier::start(files, block_bytes, 1, 1, None);
    let tier_read = |tier: &mut StorageTier| -> anyhow::Result<f64> {
        drop_file_pages(&base)?;
        let start = Instant::now();
        tier.fetch("bench", hashes.clone(), 0);
        loop {
            for done in tier.poll() {
                if let Done::Read { blocks: got, .. } = done {
                    anyhow::ensure!(got.len() == blocks, "read {} of {blocks}", got.len());
                    return Ok(start.elapsed().as_secs_f64());
                }
            }
            std::thread::sleep(Duration::from_micros(200));
        }
    };
    let dd_read = || -> anyhow::Result<f64> {
        drop_file_pages(&base)?;
        let start = Instant::now();
        let mut cat = std::process::Command::new("cat")
            .args(&paths)
            .stdout(std::process::Stdio::piped())
            .spawn()
            .context("running cat")?;
        let pipe = cat.stdout.take().context("cat's stdout")?;
        let dd = std::process::Command::new("dd")
            .args(["of=/dev/null", "bs=1M", "status=none"])
            .stdin(pipe)
            .status()
            .context("running dd")?;
        anyhow::ensure!(cat.wait()?.success() && dd.success(), "cat | dd failed");
        Ok(start.elapsed().as_secs_f64())
    };
    let (mut ours, mut plain, mut ratio) = (Vec::new(), Vec::new(), Vec::new());
    for i in 0..rounds {
        let (t, d) = if i % 2 == 0 {
            let t = tier_read(&mut tier)?;
            (t, dd_read()?)
        } else {
            let d = dd_read()?;
            (tier_read(&mut tier)?, d)
        };
        ours.push(file_bytes as f64 / t / 1e6);
        plain.push(file_bytes as f64 / d / 1e6);
        ratio.push(d / t);
    }
    for v in [&mut ours, &mut plain, &mut ratio] {
        v.sort_by(f64::total_cmp);
    }
    println!(
        "{blocks} files, {:.1} MB, rounds: {rounds}",
        file_bytes as f64 / 1e6
    );
    println!(
        "storage tier read (one request's run): p50 {:.0} MB/s",
        percentile(&ours, 50.0)
    );
    println!(
        "cat | dd of the same files:            p50 {:.0} MB/s",
        percentile(&plain, 50.0)
    );
    println!(
        "tier / dd, per round: median {:.2}",
        percentile(&ratio, 50.0)
    );
    std::fs::remove_dir_all(&base)?;
    Ok(())
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::ServeLoad {
            load,
            concurrency,
            requests,
            prefix_groups,
            agent_metrics,
        } => tokio::runtime::Runtime::new()?.block_on(serve_load(
            load,
            concurrency,
            requests,
            prefix_groups,
            agent_metrics,
        )),
        Command::BatchingGain {
            load,
            concurrency,
            single_requests,
            requests,
            rounds,
        } => tokio::runtime::Runtime::new()?.block_on(batching_gain(
            load,
            concurrency,
            single_requests,
            requests,
            rounds,
        )),
        Command::RouterOverhead {
            direct,
            router,
            pairs,
            model,
            prompt,
            get_path,
        } => tokio::runtime::Runtime::new()?.block_on(router_overhead(
            direct.trim_end_matches('/').to_string(),
            router.trim_end_matches('/').to_string(),
            pairs,
            model,
            prompt,
            get_path,
        )),
        Command::TierReload {
            url,
            rounds,
            tokens,
            model,
            cold_files,
        } => tokio::runtime::Runtime::new()?.block_on(tier_reload(
            url.trim_end_matches('/').to_string(),
            rounds,
            tokens,
            model,
            cold_files,
        )),
        Command::StorageRead {
            dir,
            blocks,
            rounds,
        } => storage_read(dir, blocks, rounds),
        Command::OracleDecode {
            model,
            tokens,
            prompt_ids,
        } => oracle_decode(model, tokens, prompt_ids),
    }
}
