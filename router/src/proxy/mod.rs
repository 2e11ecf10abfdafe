//! The HTTP front: `/v1/completions`, `/v1/chat/completions` and `/v1/responses` are scored
//! and forwarded to the best pod (streams passed through chunk by chunk), `/v1/models`,
//! `/v1/embeddings` and anything else unknown go to the least loaded pod, and `/health` and
//! `/metrics` are the router's own.

mod forward;
mod sse;

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::{HeaderMap, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use futures::StreamExt;
use prompt::{Endpoint, Preprocessor, PromptKey};
use protocol::ApiError;
use serde_json::{Map, Value};

use crate::events::IngestStats;
use crate::index::routed::RoutedPrefixes;
use crate::index::PrefixIndex;
use crate::metrics::RouterMetrics;
use crate::pods::PodSet;
use crate::scoring::{PodView, Scheduler, Scorer};

pub use forward::{Attempt, POD_HEADER};

/// Bodies up to this size are tokenized on the request's task; larger ones on the blocking
/// pool, so that one long prompt does not stall the other requests' I/O.
const INLINE_TOKENIZE_BYTES: usize = 16 << 10;

/// Everything the handlers share.
pub struct RouterState {
    pub pods: Arc<PodSet>,
    pub index: Arc<PrefixIndex>,
    /// The routing history, when the profile scores with `prefix-cache-scorer`.
    pub routed: Option<Arc<RoutedPrefixes>>,
    pub scheduler: Scheduler,
    pub tokenizer: Arc<Preprocessor>,
    pub metrics: RouterMetrics,
    /// Client for forwarded requests (no overall timeout: streams last as long as they last).
    pub client: reqwest::Client,
    pub stale_after: Duration,
    pub max_body_bytes: usize,
    /// Prompts longer than this many tokens can hold are not tokenized.
    pub max_model_len: usize,
    /// Whether clients may reach the pods' admin endpoints through the router.
    pub expose_admin_routes: bool,
    pub events: Arc<IngestStats>,
    /// Serializes ranking with counting the chosen pod's new request in flight, so requests
    /// arriving together see each other's choice instead of all picking the same pod.
    pub choosing: std::sync::Mutex<()>,
}

type AppState = Arc<RouterState>;

pub fn app(state: AppState) -> axum::Router {
    axum::Router::new()
        .route("/v1/completions", post(completions))
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/responses", post(responses))
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .fallback(passthrough)
        .with_state(state)
}

/// One routing decision: the candidates in order and what the chosen one matched.
pub struct Decision {
    pub order: Vec<Arc<crate::pods::Pod>>,
    /// Leading prompt blocks each pod in `order` holds.
    pub prefix_blocks: Vec<usize>,
    pub latency: Duration,
    /// The request already counted in flight on `order[0]`, taken when it was chosen.
    pub first_in_flight: Option<crate::load::InFlight>,
    /// The prompt's blocks for the routing history (recorded for `order[0]` when chosen, and
    /// for a fallback pod that takes the request instead).
    pub routed_keys: Vec<u64>,
}

impl RouterState {
    /// Ranks the pods for a prompt (`None`: score by load only). Healthy pods come first,
    /// in the picker's order; unhealthy ones follow as a last resort.
    pub fn decide(&self, prompt: Option<&PromptKey>, arrived: Instant) -> Decision {
        let pods = self.pods.list();
        let profile = self.scheduler.profile();
        let keys = match prompt {
            Some(p) if profile.uses_prefix() => {
                self.index.block_keys(&p.tokens, p.cache_salt.as_deref())
            }
            _ => Vec::new(),
        };
        let matches = if profile.uses(Scorer::PrecisePrefixCache) {
            self.index.longest_prefix(&keys)
        } else {
            Vec::new()
        };
        let routed_keys = match &self.routed {
            Some(r) => r.truncate(&keys).to_vec(),
            None => Vec::new(),
        };
        // Poisoning only means another decision panicked; the guarded data is nothing.
        let _choosing = self
            .choosing
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let now = Instant::now();
        let (healthy, sick): (Vec<_>, Vec<_>) = pods.iter().partition(|p| p.load.is_healthy());
        let mut order = Vec::with_capacity(pods.len());
        let mut prefix_blocks = Vec::with_capacity(pods.len());
        for group in [healthy, sick] {
            let routed = match &self.routed {
                Some(r) => r.scores(&routed_keys, group.iter().map(|p| &*p.name)),
                None => vec![0.0; group.len()],
            };
            let views: Vec<PodView> = group
                .iter()
                .zip(routed)
                .map(|(p, routed_score)| {
                    let m = matches.iter().find(|m| *m.pod == *p.name);
                    PodView {
                        load: p.load.view(now, self.stale_after),
                        prefix_score: m.map_or(0.0, |m| m.score),
                        prefix_blocks: m.map_or(0, |m| m.blocks),
                        routed_score,
                    }
                })
                .collect();
            for i in self.scheduler.rank(&views).order {
                order.push((*group[i]).clone());
                prefix_blocks.push(views[i].prefix_blocks);
            }
        }
        let first_in_flight = order.first().map(|p| p.load.dispatch());
        // Recorded as chosen (the gateway's PreRequest), under the lock: requests arriving
        // together with one prefix follow the first instead of scattering before it answers.
        if let (Some(r), Some(first)) = (&self.routed, order.first()) {
            r.record(&first.name, &routed_keys);
        }
        Decision {
            order,
            prefix_blocks,
            latency: arrived.elapsed(),
            first_in_flight,
            routed_keys,
        }
    }
}

/// The generation endpoints the router reads the prompt of.
#[derive(Debug, Clone, Copy)]
enum Scored {
    Completions,
    Chat,
    /// Read as the chat it amounts to (`protocol::responses`).
    Responses,
}

async fn completions(State(s): State<AppState>, req: Request) -> Response {
    route(s, Some(Scored::Completions), req).await
}

async fn chat_completions(State(s): State<AppState>, req: Request) -> Response {
    route(s, Some(Scored::Chat), req).await
}

async fn responses(State(s): State<AppState>, req: Request) -> Response {
    route(s, Some(Scored::Responses), req).await
}

/// Requests the router does not score (`/v1/models`, `/tokenize`, `/version`, …): to the pod
/// the profile ranks best without a prompt. Admin endpoints only when exposed.
async fn passthrough(State(s): State<AppState>, req: Request) -> Response {
    let path = req.uri().path();
    // `OPTIONS *` and other targets that are no path: the agent's 404, not a tour of the pods.
    let no_path = !path.starts_with('/');
    if no_path || (!s.expose_admin_routes && protocol::paths::is_admin(path)) {
        return ApiError::http(StatusCode::NOT_FOUND).into_response();
    }
    route(s, None, req).await
}

/// Reads the body, decides (by the prompt of a generation `endpoint` when the profile scores
/// prefixes, else by load only) and forwards.
async fn route(s: AppState, endpoint: Option<Scored>, req: Request) -> Response {
    let arrived = Instant::now();
    let (parts, body) = req.into_parts();
    let body = match read_body(&parts.headers, body, s.max_body_bytes).await {
        Ok(b) => b,
        Err(e) => return e.into_response(),
    };
    let prompt = match endpoint {
        Some(e) if s.scheduler.profile().uses_prefix() => {
            prompt_key(&s.tokenizer, e, &body, s.max_model_len).await
        }
        _ => None,
    };
    let decision = s.decide(prompt.as_ref(), arrived);
    let attempt = Attempt {
        method: parts.method,
        path_and_query: path_and_query(&parts.uri),
        headers: parts.headers,
        body,
    };
    forward::send(&s, decision, attempt).await
}

async fn prompt_key(
    tokenizer: &Arc<Preprocessor>,
    endpoint: Scored,
    body: &Bytes,
    max_model_len: usize,
) -> Option<PromptKey> {
    let parse = move |bytes: &[u8], t: &Preprocessor| {
        let obj: Map<String, Value> = serde_json::from_slice(bytes).ok()?;
        match endpoint {
            Scored::Completions => t.prompt(Endpoint::Completions, &obj, max_model_len),
            Scored::Chat => t.prompt(Endpoint::ChatCompletions, &obj, max_model_len),
            Scored::Responses => {
                let (chat, _) = protocol::responses::to_chat_body(&obj).ok()?;
                t.prompt(Endpoint::ChatCompletions, &chat, max_model_len)
            }
        }
    };
    if body.len() <= INLINE_TOKENIZE_BYTES {
        return parse(body, tokenizer);
    }
    let (t, b) = (tokenizer.clone(), body.clone());
    tokio::task::spawn_blocking(move || parse(&b, &t))
        .await
        .ok()
        .flatten()
}

/// 200 while at least one pod passes its health probe, else 503 (as a pod's `/health`).
async fn health(State(s): State<AppState>) -> StatusCode {
    if s.pods.list().iter().any(|p| p.load.is_healthy()) {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    }
}

async fn metrics(State(s): State<AppState>) -> Response {
    let page = s
        .metrics
        .render(&s.pods.list(), s.stale_after, s.index.stats(), &s.events);
    let mut headers = HeaderMap::new();
    headers.insert(
        axum::http::header::CONTENT_TYPE,
        axum::http::HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
    );
    (headers, page).into_response()
}

/// Up to this much is reserved for a body on its `Content-Length` alone, before it arrives.
const UNPROVEN_BODY_BYTES: usize = 1 << 20;

/// The whole body, as the agent reads it: 413 over `limit` (refused by `Content-Length` before
/// reading when it says so), 400 when the client's body breaks off, 408 when it pauses too long. The buffer grows to the
/// declared length in one step once that much starts to arrive, so a large body is not copied
/// over and over, and a connection that only declares a size holds little.
async fn read_body(headers: &HeaderMap, body: Body, limit: usize) -> Result<Bytes, ApiError> {
    let declared = headers
        .get(axum::http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    if declared.is_some_and(|n| n > limit) {
        return Err(ApiError::payload_too_large(limit));
    }
    let mut buf = Vec::with_capacity(declared.unwrap_or(0).min(UNPROVEN_BODY_BYTES));
    let mut chunks = body.into_data_stream();
    while let Some(chunk) = chunks.next().await {
        let chunk = chunk.map_err(|e| match httpserve::body_timeout(&e) {
            Some(waited) => ApiError::body_timeout(waited),
            None => ApiError::unreadable_body(),
        })?;
        let len = buf.len() + chunk.len();
        if len > limit {
            return Err(ApiError::payload_too_large(limit));
        }
        if let Some(d) = declared.filter(|&d| len > buf.capacity() && d >= len) {
            buf.reserve_exact(d - buf.len());
        }
        buf.extend_from_slice(&chunk);
    }
    Ok(Bytes::from(buf))
}

fn path_and_query(uri: &axum::http::Uri) -> String {
    uri.path_and_query()
        .map_or_else(|| uri.path().to_string(), |pq| pq.as_str().to_string())
}

/// Whether a method carries a body worth forwarding.
pub(crate) fn has_body(method: &Method) -> bool {
    !matches!(*method, Method::GET | Method::HEAD)
}
