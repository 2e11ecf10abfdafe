//! Router end-to-end harness: agents on fixed ports that publish KV events ([`Pod`], which can
//! be killed and restarted on the same ports), the router binary in front of them
//! ([`RouterProc`]), and a TCP relay that can cut a connection for a while ([`Relay`]).
//!
//! Processes write their output to a log file in the temp dir (shown in failure messages,
//! echoed with `E2E_AGENT_LOG=1` at the end of each start) and are killed when dropped.

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::{agent_bin, file_from_env, model_path, Metrics, Reply, SERVED_MODEL};

const STARTUP_TIMEOUT: Duration = Duration::from_secs(60);

/// The router binary: `$ROUTER_BIN`, else `release/router` under the target directory.
pub fn router_bin() -> PathBuf {
    file_from_env(
        "ROUTER_BIN",
        crate::target_dir().join("release/router"),
        "router binary",
        "build it with `cargo build --release -p router`",
    )
}

/// `n` distinct loopback ports nobody listens on now (all held open at once while choosing).
pub fn reserve_ports(n: usize) -> Vec<u16> {
    let listeners: Vec<TcpListener> = (0..n)
        .map(|_| TcpListener::bind("127.0.0.1:0").expect("binding a loopback port"))
        .collect();
    listeners
        .iter()
        .map(|l| l.local_addr().expect("local address").port())
        .collect()
}

/// A child process with its output in a log file; killed and reaped on drop.
struct Proc {
    child: Child,
    log: PathBuf,
}

impl Proc {
    fn spawn(mut cmd: Command, label: &str) -> Proc {
        static COUNTER: AtomicUsize = AtomicUsize::new(0);
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let log = std::env::temp_dir().join(format!("e2e-{}-{label}-{n}.log", std::process::id()));
        let file = std::fs::File::create(&log).expect("creating a process log file");
        let err = file.try_clone().expect("cloning a log file handle");
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::from(file))
            .stderr(Stdio::from(err))
            .spawn()
            .unwrap_or_else(|e| panic!("cannot spawn {label}: {e}"));
        Proc { child, log }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends SIGTERM, as Kubernetes does to stop a pod.
    fn terminate(&self) {
        let status = Command::new("kill")
            .args(["-TERM", &self.pid().to_string()])
            .status()
            .expect("running kill");
        assert!(status.success(), "kill -TERM {}", self.pid());
    }

    /// The exit status once the process has exited, waiting at most `timeout`.
    async fn exited_within(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn log(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(200)..].join("\n")
    }

    /// Polls `url` until it answers 200; panics with the log if the process exits or the
    /// timeout passes.
    async fn wait_healthy(&mut self, client: &reqwest::Client, url: &str, what: &str) {
        let deadline = Instant::now() + STARTUP_TIMEOUT;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("{what} exited with {status}:\n{}", self.log());
            }
            let r = client.get(url).timeout(Duration::from_secs(2)).send().await;
            if matches!(&r, Ok(r) if r.status().as_u16() == 200) {
                if std::env::var_os("E2E_AGENT_LOG").is_some() {
                    eprintln!("[{what}]\n{}", self.log());
                }
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{what} not healthy after {STARTUP_TIMEOUT:?}:\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.log);
    }
}

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(300))
        .build()
        .expect("building an HTTP client")
}

async fn reply(resp: reqwest::Response) -> Reply {
    let status = resp.status().as_u16();
    let bytes = resp.bytes().await.unwrap_or_default();
    let body = serde_json::from_slice(&bytes)
        .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into_owned()));
    Reply { status, body }
}

async fn metrics_of(client: &reqwest::Client, url: String) -> Metrics {
    let text = client
        .get(&url)
        .send()
        .await
        .unwrap_or_else(|e| panic!("GET {url}: {e}"))
        .text()
        .await
        .unwrap_or_default();
    Metrics::parse(&text).unwrap_or_else(|e| panic!("bad metrics page at {url}: {e}"))
}

/// An agent serving the default model on fixed ports, publishing KV events (PUB) with a replay
/// socket (ROUTER).
pub struct Pod {
    proc: Option<Proc>,
    pub http: u16,
    /// The port its PUB binds; or, in centralized mode, the subscriber's port it connects to.
    pub events: u16,
    pub replay: u16,
    /// Centralized mode: the PUB connects to a subscriber that binds `events`.
    connects: bool,
    extra: Vec<String>,
    client: reqwest::Client,
}

impl Pod {
    /// Starts `agent serve` on three fresh ports with `extra` flags.
    pub async fn start(extra: &[&str]) -> Pod {
        let ports = reserve_ports(3);
        Self::launched(ports[0], ports[1], ports[2], false, extra).await
    }

    /// Starts an agent whose PUB connects to `tcp://127.0.0.1:<subscriber_port>` (vLLM's
    /// rule: an endpoint without a wildcard connects), for a router bound there.
    pub async fn start_publishing_to(subscriber_port: u16, extra: &[&str]) -> Pod {
        let ports = reserve_ports(2);
        Self::launched(ports[0], subscriber_port, ports[1], true, extra).await
    }

    async fn launched(http: u16, events: u16, replay: u16, connects: bool, extra: &[&str]) -> Pod {
        let mut pod = Pod {
            proc: None,
            http,
            events,
            replay,
            connects,
            extra: extra.iter().map(|s| s.to_string()).collect(),
            client: client(),
        };
        pod.launch().await;
        pod
    }

    async fn launch(&mut self) {
        let host = if self.connects { "127.0.0.1" } else { "*" };
        let events = json!({
            "enable_kv_cache_events": true,
            "publisher": "zmq",
            "endpoint": format!("tcp://{host}:{}", self.events),
            "replay_endpoint": format!("tcp://*:{}", self.replay),
            "topic": format!("kv@127.0.0.1:{}@{SERVED_MODEL}", self.http),
        });
        let mut cmd = Command::new(agent_bin());
        cmd.arg("serve")
            .arg(model_path())
            .args(["--served-model-name", SERVED_MODEL, "--host", "127.0.0.1"])
            .args(["--port", &self.http.to_string()])
            .args(["--kv-events-config", &events.to_string()])
            .args(&self.extra);
        let mut proc = Proc::spawn(cmd, "agent");
        proc.wait_healthy(&self.client, &self.url("/health"), "agent")
            .await;
        self.proc = Some(proc);
    }

    /// Kills the agent (as a crash would).
    pub fn kill(&mut self) {
        self.proc = None;
    }

    /// Kills the agent and starts a new one on the same ports.
    pub async fn restart(&mut self) {
        self.kill();
        self.launch().await;
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.http)
    }

    /// `--pod` for the router: `NAME=URL,events=…,replay=…` (events through `events_port`,
    /// e.g. a [`Relay`]'s, when given).
    pub fn spec(&self, name: &str, events_port: Option<u16>) -> String {
        format!(
            "{name}=http://127.0.0.1:{},events=tcp://127.0.0.1:{},replay=tcp://127.0.0.1:{}",
            self.http,
            events_port.unwrap_or(self.events),
            self.replay
        )
    }

    /// The agent's process id (panics when it is not running).
    pub fn pid(&self) -> u32 {
        self.proc.as_ref().expect("the pod is running").pid()
    }

    pub fn log(&self) -> String {
        self.proc.as_ref().map(Proc::log).unwrap_or_default()
    }

    pub async fn post(&self, path: &str, body: &Value) -> Reply {
        let r = self.client.post(self.url(path)).json(body).send().await;
        reply(r.unwrap_or_else(|e| panic!("POST {path}: {e}\n{}", self.log()))).await
    }

    pub async fn metrics(&self) -> Metrics {
        metrics_of(&self.client, self.url("/metrics")).await
    }

    /// `GET /debug/kv_cache`.
    pub async fn debug_kv_cache(&self) -> Value {
        let r = self
            .client
            .get(self.url("/debug/kv_cache"))
            .send()
            .await
            .unwrap_or_else(|e| panic!("GET /debug/kv_cache: {e}"));
        r.json().await.expect("JSON from /debug/kv_cache")
    }

    /// The 64-bit hashes of the blocks in the agent's prefix cache (`GET /debug/kv_cache`).
    pub async fn cached_block_hashes(&self) -> std::collections::HashSet<u64> {
        let body = self.debug_kv_cache().await;
        body["block_hashes"]
            .as_array()
            .unwrap_or_else(|| panic!("no block_hashes in {body}"))
            .iter()
            .map(|h| h.as_u64().unwrap_or_else(|| panic!("bad hash {h}")))
            .collect()
    }
}

/// The router binary on a fresh port.
pub struct RouterProc {
    _proc: Proc,
    pub port: u16,
    client: reqwest::Client,
}

/// A routed request's answer and the pod that served it (`x-router-pod`).
#[derive(Debug, Clone)]
pub struct Routed {
    pub reply: Reply,
    pub pod: Option<String>,
}

impl RouterProc {
    /// Starts `router --model <default> --served-model-name SmolLM2-135M-Instruct --host
    /// 127.0.0.1 --port <free> <args…>` and waits for its `/health` (some pod healthy).
    pub async fn start(args: &[String]) -> RouterProc {
        let port = reserve_ports(1)[0];
        let mut cmd = Command::new(router_bin());
        cmd.arg("--model")
            .arg(model_path())
            .args(["--served-model-name", SERVED_MODEL, "--host", "127.0.0.1"])
            .args(["--port", &port.to_string()])
            .args(args);
        let mut proc = Proc::spawn(cmd, "router");
        let client = client();
        let health = format!("http://127.0.0.1:{port}/health");
        proc.wait_healthy(&client, &health, "router").await;
        RouterProc {
            _proc: proc,
            port,
            client,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    pub fn pid(&self) -> u32 {
        self._proc.pid()
    }

    /// Sends the router SIGTERM.
    pub fn terminate(&self) {
        self._proc.terminate();
    }

    /// The router's exit status once it has exited, waiting at most `timeout`.
    pub async fn exited_within(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        self._proc.exited_within(timeout).await
    }

    pub fn log(&self) -> String {
        self._proc.log()
    }

    pub fn client(&self) -> &reqwest::Client {
        &self.client
    }

    pub async fn post(&self, path: &str, body: &Value) -> Routed {
        let r = self
            .client
            .post(self.url(path))
            .json(body)
            .send()
            .await
            .unwrap_or_else(|e| panic!("POST {path} via router: {e}\n{}", self.log()));
        let pod = r
            .headers()
            .get("x-router-pod")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        Routed {
            reply: reply(r).await,
            pod,
        }
    }

    /// POSTs and requires a 200; returns the serving pod's name.
    pub async fn post_ok(&self, path: &str, body: &Value) -> String {
        let r = self.post(path, body).await;
        assert_eq!(
            r.reply.status,
            200,
            "POST {path} via router -> {}\nrouter log:\n{}",
            r.reply.body,
            self.log()
        );
        r.pod.expect("x-router-pod header on a routed answer")
    }

    pub async fn metrics(&self) -> Metrics {
        metrics_of(&self.client, self.url("/metrics")).await
    }

    /// [`RouterProc::post_ok`], also returning the prompt blocks the router matched on the
    /// chosen pod (the increase of `router_prefix_hit_blocks_sum`; requests go one at a time).
    pub async fn post_matched(&self, path: &str, body: &Value) -> (String, f64) {
        let before = self.metrics().await.value("router_prefix_hit_blocks_sum");
        let pod = self.post_ok(path, body).await;
        let after = self.metrics().await.value("router_prefix_hit_blocks_sum");
        (pod, after - before)
    }

    /// Polls `/metrics` until `ok` holds; panics with the router log after 15 s.
    pub async fn wait_for(&self, what: &str, ok: impl Fn(&Metrics) -> bool) -> Metrics {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let m = self.metrics().await;
            if ok(&m) {
                return m;
            }
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {what}\nrouter log:\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// Agents `a` and `b` started with `flags`, and a router in front of both.
pub async fn pods_behind_router(flags: &[&str]) -> (Pod, Pod, RouterProc) {
    let (a, b) = tokio::join!(Pod::start(flags), Pod::start(flags));
    let router = RouterProc::start(&pod_flags([a.spec("a", None), b.spec("b", None)])).await;
    (a, b, router)
}

/// A completion that keeps a pod busy for a long time (2000 tokens, EOS ignored).
pub fn long_completion() -> Value {
    json!({
        "model": SERVED_MODEL,
        "prompt": "Write a very long story about a lighthouse keeper.",
        "max_tokens": 2000,
        "ignore_eos": true,
    })
}

/// `--pod SPEC` for each spec, for [`RouterProc::start`].
pub fn pod_flags(specs: impl IntoIterator<Item = String>) -> Vec<String> {
    specs
        .into_iter()
        .flat_map(|spec| ["--pod".to_string(), spec])
        .collect()
}

/// A TCP relay from a local port to a target port, whose connections can be cut and the port
/// closed for a while ([`Relay::cut`]) and opened again ([`Relay::restore`]).
pub struct Relay {
    pub port: u16,
    target: u16,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Relay {
    pub async fn start(target: u16) -> Relay {
        let mut relay = Relay {
            port: reserve_ports(1)[0],
            target,
            task: None,
        };
        relay.restore().await;
        relay
    }

    /// Closes the listening port and every relayed connection.
    pub fn cut(&mut self) {
        // Dropping the accept task drops the listener and the set of relayed connections.
        if let Some(t) = self.task.take() {
            t.abort();
        }
    }

    /// Listens again on the same port.
    pub async fn restore(&mut self) {
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", self.port))
            .await
            .expect("binding the relay port");
        let target = self.target;
        self.task = Some(tokio::spawn(async move {
            let mut conns = tokio::task::JoinSet::new();
            while let Ok((mut inbound, _)) = listener.accept().await {
                conns.spawn(async move {
                    if let Ok(mut out) = tokio::net::TcpStream::connect(("127.0.0.1", target)).await
                    {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut out).await;
                    }
                });
            }
        }));
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.cut();
    }
}

/// One of `pod`'s KV event stream counters on a router's `/metrics` (`batches`, `replays`,
/// `resets`...), 0 before its stream counted anything.
pub fn pod_events(m: &Metrics, pod: &str, counter: &str) -> f64 {
    m.get(
        "router_pod_kv_events",
        &[("pod", pod), ("counter", counter)],
    )
    .unwrap_or(0.0)
}

/// Sum over pods of a counter's increase between two scrapes each.
pub fn counter_delta(before: &[Metrics], after: &[Metrics], name: &str) -> f64 {
    before
        .iter()
        .zip(after)
        .map(|(b, a)| a.value(name) - b.value(name))
        .sum()
}
