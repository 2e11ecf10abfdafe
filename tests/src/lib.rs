//! Test harness: starts real agent processes and talks HTTP to them.
//!
//! [`Agent`] owns one `agent serve` child process on a free loopback port; dropping it kills
//! and reaps the child. [`metrics`] parses `/metrics`, [`sse`] reads streamed responses and
//! [`oracle`] runs candle-transformers' quantized llama in-process as an independent reference.

pub mod cluster;
pub mod metrics;
pub mod oracle;
pub mod sse;

use std::io::{BufRead, BufReader, Read};
use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

pub use metrics::Metrics;

/// The name every test and script serves the default model under.
pub const SERVED_MODEL: &str = "SmolLM2-135M-Instruct";

/// The default model's file name under `<workspace>/models/`.
pub const MODEL_FILE: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";

/// How long an agent may take from spawn to a 200 on `/health`.
const STARTUP_TIMEOUT: Duration = Duration::from_secs(60);

/// Lines of agent output kept for failure messages.
const LOG_LINES_KEPT: usize = 200;

pub fn workspace_root() -> PathBuf {
    let manifest = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    manifest.parent().map(PathBuf::from).unwrap_or(manifest)
}

/// Where cargo puts its builds: `$CARGO_TARGET_DIR` (relative to the workspace, where the
/// scripts run cargo), else `<workspace>/target`.
pub fn target_dir() -> PathBuf {
    let dir = std::env::var_os("CARGO_TARGET_DIR").map_or_else(|| "target".into(), PathBuf::from);
    workspace_root().join(dir)
}

/// `$env` if set, else `default`; panics with `what` not found and `hint` if it is no file.
pub fn file_from_env(env: &str, default: PathBuf, what: &str, hint: &str) -> PathBuf {
    let path = std::env::var_os(env).map(PathBuf::from).unwrap_or(default);
    assert!(
        path.is_file(),
        "{what} not found at {}: {hint}, or point {env} at it",
        path.display()
    );
    path
}

/// The agent binary: `$AGENT_BIN`, else `release/agent` under [`target_dir`].
pub fn agent_bin() -> PathBuf {
    file_from_env(
        "AGENT_BIN",
        target_dir().join("release/agent"),
        "agent binary",
        "build it with `cargo build --release -p agent` (or run scripts/install.sh)",
    )
}

/// The model file: `$MODEL_PATH`, else `<workspace>/models/SmolLM2-135M-Instruct.Q4_1.gguf`.
pub fn model_path() -> PathBuf {
    file_from_env(
        "MODEL_PATH",
        workspace_root().join("models").join(MODEL_FILE),
        "model",
        "run scripts/install.sh to fetch it",
    )
}

/// A port nobody listens on right now (the agent binds it a moment later; a lost race is
/// retried by [`Agent::start`]).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap_or_else(|e| panic!("cannot find a free loopback port: {e}"))
}

/// A status code and the body, parsed as JSON when it is JSON (else a JSON string of the text).
#[derive(Debug, Clone)]
pub struct Reply {
    pub status: u16,
    pub body: Value,
}

impl Reply {
    /// Asserts a vLLM error reply: the status, and `{"error":{"message","type","param","code"}}`
    /// with a non-empty message and `code` equal to the status.
    pub fn assert_error(&self, status: u16, kind: &str) -> &Value {
        assert_eq!(
            self.status, status,
            "unexpected status; body: {}",
            self.body
        );
        let err = self
            .body
            .get("error")
            .unwrap_or_else(|| panic!("no `error` object in {}", self.body));
        for key in ["message", "type", "param", "code"] {
            assert!(
                err.get(key).is_some(),
                "error body lacks `{key}`: {}",
                self.body
            );
        }
        let message = err["message"].as_str().unwrap_or_default();
        assert!(!message.is_empty(), "empty error message: {}", self.body);
        assert_eq!(err["type"], kind, "error type: {}", self.body);
        assert_eq!(err["code"], json!(status), "error code: {}", self.body);
        err
    }
}

/// One running `agent serve` process. Dropping it kills and reaps the process.
pub struct Agent {
    child: Child,
    port: u16,
    log: Arc<Mutex<Vec<String>>>,
    client: reqwest::Client,
}

/// What an agent is started on: its MODEL argument, `--served-model-name` (None: the agent's
/// default) and extra environment.
#[derive(Debug, Clone)]
pub struct Launch {
    pub model: std::ffi::OsString,
    pub served_model_name: Option<String>,
    pub env: Vec<(String, std::ffi::OsString)>,
}

impl Default for Launch {
    /// The default model, served as `SmolLM2-135M-Instruct`.
    fn default() -> Self {
        Self {
            model: model_path().into(),
            served_model_name: Some(SERVED_MODEL.to_string()),
            env: Vec::new(),
        }
    }
}

impl Agent {
    /// Starts `agent serve <model> --served-model-name SmolLM2-135M-Instruct --host 127.0.0.1
    /// --port <free> <extra…>` and waits until `/health` answers 200. Panics with the agent's
    /// output when it exits or does not become healthy within 60 s.
    pub async fn start(extra: &[&str]) -> Agent {
        Self::launch(&Launch::default(), extra).await
    }

    /// [`Agent::start`] on another model argument, name or environment.
    pub async fn launch(launch: &Launch, extra: &[&str]) -> Agent {
        let mut last_failure = String::new();
        for _ in 0..5 {
            match Self::try_start(launch, extra).await {
                Ok(agent) => return agent,
                // Another process took the port between our probe and the agent's bind.
                Err(log) if log.contains("in use") => last_failure = log,
                Err(log) => panic!("agent failed to start with flags {extra:?}; output:\n{log}"),
            }
        }
        panic!("agent could not bind a free port in 5 tries; last output:\n{last_failure}")
    }

    async fn try_start(launch: &Launch, extra: &[&str]) -> Result<Agent, String> {
        let port = free_port();
        let mut cmd = Command::new(agent_bin());
        cmd.arg("serve").arg(&launch.model);
        if let Some(name) = &launch.served_model_name {
            cmd.args(["--served-model-name", name]);
        }
        let mut child = cmd
            .envs(launch.env.iter().map(|(k, v)| (k, v)))
            .args(["--host", "127.0.0.1"])
            .args(["--port", &port.to_string()])
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot spawn {}: {e}", agent_bin().display()));
        let log = Arc::new(Mutex::new(Vec::new()));
        if let Some(out) = child.stdout.take() {
            drain_into(out, log.clone());
        }
        if let Some(err) = child.stderr.take() {
            drain_into(err, log.clone());
        }
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(300))
            .build()
            .map_err(|e| format!("cannot build an HTTP client: {e}"))?;
        let mut agent = Agent {
            child,
            port,
            log,
            client,
        };
        let deadline = Instant::now() + STARTUP_TIMEOUT;
        loop {
            if let Ok(Some(status)) = agent.child.try_wait() {
                // Give the drain threads a moment to collect the last lines.
                tokio::time::sleep(Duration::from_millis(100)).await;
                return Err(format!("agent exited with {status}\n{}", agent.log()));
            }
            let health = agent
                .client
                .get(agent.url("/health"))
                .timeout(Duration::from_secs(2))
                .send()
                .await;
            if matches!(&health, Ok(r) if r.status().as_u16() == 200) {
                return Ok(agent);
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "agent not healthy after {STARTUP_TIMEOUT:?} (last: {health:?})\n{}",
                    agent.log()
                ));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn base_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base_url())
    }

    pub fn client(&self) -> &reqwest::Client {
        &self.client
    }

    /// The last lines the agent printed (stdout and stderr interleaved).
    pub fn log(&self) -> String {
        self.log.lock().map(|l| l.join("\n")).unwrap_or_default()
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Whether the process is still running.
    pub fn is_alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    async fn reply(&self, req: reqwest::RequestBuilder, what: &str) -> Reply {
        let resp = req
            .send()
            .await
            .unwrap_or_else(|e| panic!("{what} failed: {e}\nagent output:\n{}", self.log()));
        let status = resp.status().as_u16();
        let bytes = resp
            .bytes()
            .await
            .unwrap_or_else(|e| panic!("{what}: reading the body failed: {e}"));
        let body = serde_json::from_slice(&bytes)
            .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into_owned()));
        Reply { status, body }
    }

    /// POSTs a JSON body.
    pub async fn post(&self, path: &str, body: &Value) -> Reply {
        let req = self.client.post(self.url(path)).json(body);
        self.reply(req, &format!("POST {path}")).await
    }

    /// POSTs raw bytes as `application/json` (for malformed bodies).
    pub async fn post_raw(&self, path: &str, body: Vec<u8>) -> Reply {
        let req = self
            .client
            .post(self.url(path))
            .header("content-type", "application/json")
            .body(body);
        self.reply(req, &format!("POST {path}")).await
    }

    pub async fn get(&self, path: &str) -> Reply {
        self.reply(self.client.get(self.url(path)), &format!("GET {path}"))
            .await
    }

    /// POSTs a JSON body that must succeed with 200; returns the JSON.
    pub async fn post_ok(&self, path: &str, body: &Value) -> Value {
        let reply = self.post(path, body).await;
        assert_eq!(
            reply.status,
            200,
            "POST {path} {body} -> {}\nagent output:\n{}",
            reply.body,
            self.log()
        );
        reply.body
    }

    /// Token ids of `text` from the agent's `/tokenize` (no special tokens are added for this
    /// model either way).
    pub async fn tokenize(&self, text: &str) -> Vec<u32> {
        let body = self
            .post_ok("/tokenize", &json!({"model": SERVED_MODEL, "prompt": text}))
            .await;
        token_ids(&body["tokens"])
    }

    /// The text of `ids` from the agent's `/detokenize`.
    pub async fn detokenize(&self, ids: &[u32]) -> String {
        let body = self
            .post_ok(
                "/detokenize",
                &json!({"model": SERVED_MODEL, "tokens": ids}),
            )
            .await;
        body["prompt"].as_str().unwrap_or_default().to_string()
    }

    /// The parsed `/metrics` page.
    pub async fn metrics(&self) -> Metrics {
        let reply = self.get("/metrics").await;
        assert_eq!(reply.status, 200, "GET /metrics -> {}", reply.body);
        let text = reply.body.as_str().unwrap_or_default();
        Metrics::parse(text).unwrap_or_else(|e| panic!("bad /metrics page: {e}\n{text}"))
    }

    /// Polls `/metrics` until nothing runs, nothing waits and no KV block is in use; panics
    /// with the last values after `timeout`. Returns the idle metrics.
    pub async fn wait_idle(&self, timeout: Duration) -> Metrics {
        let deadline = Instant::now() + timeout;
        loop {
            let m = self.metrics().await;
            let running = m.value("vllm:num_requests_running");
            let waiting = m.value("vllm:num_requests_waiting");
            let usage = m.value("vllm:kv_cache_usage_perc");
            if running == 0.0 && waiting == 0.0 && usage == 0.0 {
                return m;
            }
            assert!(
                Instant::now() < deadline,
                "agent not idle after {timeout:?}: running={running} waiting={waiting} \
                 kv_cache_usage_perc={usage}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Reads lines from a child's pipe into the shared log on a background thread (so the child
/// never blocks on a full pipe). `E2E_AGENT_LOG=1` also echoes them.
fn drain_into<R: Read + Send + 'static>(pipe: R, log: Arc<Mutex<Vec<String>>>) {
    let echo = std::env::var_os("E2E_AGENT_LOG").is_some();
    std::thread::spawn(move || {
        for line in BufReader::new(pipe).lines() {
            let Ok(line) = line else { break };
            if echo {
                eprintln!("[agent] {line}");
            }
            if let Ok(mut log) = log.lock() {
                if log.len() == LOG_LINES_KEPT {
                    log.remove(0);
                }
                log.push(line);
            }
        }
    });
}

/// A JSON array of token ids as `u32`s; panics on anything else.
pub fn token_ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap_or_else(|| panic!("expected an array of token ids, got {v}"))
        .iter()
        .map(|t| {
            t.as_u64()
                .and_then(|t| u32::try_from(t).ok())
                .unwrap_or_else(|| panic!("bad token id {t} in {v}"))
        })
        .collect()
}

/// A greedy completion request for token-id prompts that always runs `max_tokens` steps and
/// returns the generated ids (`return_token_ids`).
pub fn greedy_ids_request(prompt: &[u32], max_tokens: usize) -> Value {
    json!({
        "model": SERVED_MODEL,
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0.0,
        "ignore_eos": true,
        "return_token_ids": true,
    })
}

/// Sends [`greedy_ids_request`] for every prompt at once; the responses in prompt order.
pub async fn greedy_all(agent: &Agent, prompts: &[Vec<u32>], max_tokens: usize) -> Vec<Value> {
    let bodies: Vec<_> = prompts
        .iter()
        .map(|p| greedy_ids_request(p, max_tokens))
        .collect();
    futures::future::join_all(bodies.iter().map(|b| agent.post_ok("/v1/completions", b))).await
}

/// The generated token ids of `choices[0]` in a completion response.
pub fn choice_token_ids(resp: &Value) -> Vec<u32> {
    token_ids(&resp["choices"][0]["token_ids"])
}

/// English text with varied vocabulary, long enough to cut prompts of a few hundred tokens from.
pub const LONG_TEXT: &str = "The history of computing is a story of abstraction layered on \
abstraction. Early machines were programmed by rewiring panels; later, stored programs let the \
same hardware run arbitrary instructions held in memory. Assemblers gave names to opcodes, \
compilers turned arithmetic formulas into machine code, and operating systems hid the details \
of disks, terminals and memory behind files, processes and virtual addresses. Networks joined \
machines together, first in laboratories and universities, then across continents, and the web \
turned those networks into a medium for documents, commerce and conversation. Each step made \
the previous layer invisible to most people, which is both the triumph and the risk of the \
field: what nobody looks at can quietly rot. Databases organised records into tables and \
indexes, caches kept hot data close to the processor, and schedulers decided which of many \
waiting tasks should run next. In 1969 a small team wrote an operating system in a few months; \
in 2024 a phone carries more memory than every computer of that decade combined. Language \
models are the newest layer: they predict the next token of text from the tokens before it, \
and serving them efficiently is again a question of memory, batching and scheduling.";

/// Runs `cmd`, which must fail, and returns its stdout and stderr together; panics when it
/// succeeds or when the output lacks one of `parts`.
pub fn failed_start(cmd: &mut std::process::Command, parts: &[&str]) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{cmd:?} succeeded:\n{text}");
    for part in parts {
        assert!(text.contains(part), "missing {part:?} in:\n{text}");
    }
    text
}

/// The body of GET `url` as text.
pub async fn get_text(client: &reqwest::Client, url: &str) -> String {
    let resp = client
        .get(url)
        .send()
        .await
        .unwrap_or_else(|e| panic!("GET {url}: {e}"));
    resp.text()
        .await
        .unwrap_or_else(|e| panic!("GET {url}: {e}"))
}

/// The peak resident memory of process `pid` so far (`VmHWM`), in MiB.
pub fn peak_rss_mib(pid: u32) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_else(|e| panic!("reading /proc/{pid}/status: {e}"));
    let kib: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("no VmHWM in /proc/{pid}/status"));
    kib / 1024.0
}
