//! The router: vLLM's routes, `--api-key` bearer authentication on `/v1` and admin paths, the
//! `X-Request-Id` response header, the body-size limit, and the small endpoints (health, ping,
//! version, models, metrics, reset_prefix_cache, debug/kv_cache). Unknown routes and methods answer in vLLM's
//! error shape.

use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::header::{AUTHORIZATION, CONTENT_TYPE};
use axum::http::{HeaderValue, Method, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use protocol::response::{ModelCard, ModelList, ModelPermission, VersionResponse};
use protocol::ApiError;
use sha2::{Digest, Sha256};

use super::state::{unix_now, AppState};
use super::{chat, completions, embeddings, responses, tokenize};

const REQUEST_ID_HEADER: &str = "x-request-id";

/// The whole HTTP API over `state`.
pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/v1/completions", post(completions::create_completion))
        .route("/v1/chat/completions", post(chat::create_chat_completion))
        .route("/v1/embeddings", post(embeddings::create_embedding))
        .route("/v1/responses", post(responses::create_response))
        .route("/v1/models", get(models))
        .route("/tokenize", post(tokenize::tokenize))
        .route("/detokenize", post(tokenize::detokenize))
        .route("/health", get(health))
        .route("/ping", get(health).post(health))
        .route("/version", get(version))
        .route("/metrics", get(metrics))
        .route("/reset_prefix_cache", post(reset_prefix_cache))
        .route("/debug/kv_cache", get(debug_kv_cache))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        // Inside authentication: only an authorised request runs a prefill leg.
        .layer(middleware::from_fn_with_state(
            state.clone(),
            super::prefill_leg::prefill_leg,
        ))
        .layer(middleware::from_fn_with_state(state.clone(), authenticate))
        .layer(middleware::from_fn(request_id))
        .layer(DefaultBodyLimit::max(state.config.max_body_bytes))
        .with_state(state)
}

async fn not_found() -> Response {
    ApiError::http(StatusCode::NOT_FOUND).into_response()
}

async fn method_not_allowed() -> Response {
    ApiError::http(StatusCode::METHOD_NOT_ALLOWED).into_response()
}

/// vLLM's `AuthenticationMiddleware`: with `--api-key`, `/v1` requests need
/// `Authorization: Bearer <key>`; the 401 body is vLLM's `{"error": "Unauthorized"}`. The admin
/// endpoints need it too (vLLM leaves its dev-mode ones open; a key-protected pod should not let
/// anyone flush its cache or read its internals).
async fn authenticate(State(state): State<AppState>, request: Request, next: Next) -> Response {
    let keys = &state.config.api_keys;
    let guarded = !keys.is_empty()
        && request.method() != Method::OPTIONS
        && protocol::paths::needs_api_key(request.uri().path());
    if guarded && !bearer_matches(request.headers().get(AUTHORIZATION), keys) {
        return (
            StatusCode::UNAUTHORIZED,
            Json(serde_json::json!({"error": "Unauthorized"})),
        )
            .into_response();
    }
    next.run(request).await
}

/// Compares digests so the time taken does not depend on how much of a key matched.
fn bearer_matches(header: Option<&HeaderValue>, keys: &[String]) -> bool {
    let Some(value) = header.and_then(|h| h.to_str().ok()) else {
        return false;
    };
    let (scheme, token) = value.split_once(' ').unwrap_or((value, ""));
    if !scheme.eq_ignore_ascii_case("bearer") {
        return false;
    }
    let presented = Sha256::digest(token.as_bytes());
    keys.iter().fold(false, |found, key| {
        let expected = Sha256::digest(key.as_bytes());
        let diff = presented
            .iter()
            .zip(expected.iter())
            .fold(0u8, |acc, (a, b)| acc | (a ^ b));
        found | (diff == 0)
    })
}

/// Echoes `X-Request-Id` (or a fresh one) on every response.
async fn request_id(request: Request, next: Next) -> Response {
    let id = request
        .headers()
        .get(REQUEST_ID_HEADER)
        .cloned()
        .or_else(|| HeaderValue::from_str(&uuid::Uuid::new_v4().simple().to_string()).ok());
    let mut response = next.run(request).await;
    if let Some(id) = id {
        response.headers_mut().insert(REQUEST_ID_HEADER, id);
    }
    response
}

/// `/health` and `/ping`: 200 while the engine runs, 503 once it died.
async fn health(State(state): State<AppState>) -> StatusCode {
    if state.engine.is_alive() {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    }
}

async fn version() -> Json<VersionResponse> {
    Json(VersionResponse {
        version: env!("CARGO_PKG_VERSION"),
    })
}

async fn models(State(state): State<AppState>) -> Json<ModelList> {
    let created = unix_now();
    let data = state
        .config
        .served_model_names
        .iter()
        .map(|name| ModelCard {
            id: name.clone(),
            object: "model",
            created,
            owned_by: "vllm",
            root: Some(state.config.model_root.clone()),
            parent: None,
            max_model_len: Some(state.config.max_model_len),
            permission: vec![ModelPermission::new(
                format!("modelperm-{}", uuid::Uuid::new_v4().simple()),
                created,
            )],
        })
        .collect();
    Json(ModelList {
        object: "list",
        data,
    })
}

async fn metrics(State(state): State<AppState>) -> Response {
    (
        [(
            CONTENT_TYPE,
            HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
        )],
        state.metrics.render(),
    )
        .into_response()
}

/// Drops every cached block no request uses (vLLM answers 200 with an empty body either way).
/// vLLM's `reset_external` query flag (`reset_connector` in its engine API): the tiers below
/// the device are cleared too. Without it they keep their blocks, as in vLLM.
#[derive(Debug, Default, serde::Deserialize)]
struct ResetQuery {
    #[serde(default, alias = "reset_connector")]
    reset_external: bool,
}

async fn reset_prefix_cache(
    State(state): State<AppState>,
    axum::extract::Query(q): axum::extract::Query<ResetQuery>,
) -> Result<StatusCode, ApiError> {
    let all_freed = state.engine.reset_prefix_cache(q.reset_external).await?;
    if !all_freed {
        tracing::warn!("reset_prefix_cache: blocks still in use by running requests were kept");
    }
    Ok(StatusCode::OK)
}

/// The prefix cache's content, for checking a subscriber's reconstruction from KV events:
/// every cached block's hash in the events' 64-bit form and as the full hex digest, for the
/// device pool at the top level and per tier under `tiers` (the device as "GPU", as in the
/// events).
async fn debug_kv_cache(
    State(state): State<AppState>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let tiers = state.engine.cached_blocks().await?;
    let describe = |hashes: &[kvcache::BlockHash]| {
        serde_json::json!({
            "num_cached_blocks": hashes.len(),
            "block_hashes": hashes.iter().map(|h| h.to_u64()).collect::<Vec<_>>(),
            "block_digests": hashes.iter().map(|h| h.to_string()).collect::<Vec<_>>(),
        })
    };
    let mut body = tiers
        .first()
        .map_or_else(|| describe(&[]), |device| describe(&device.hashes));
    body["tiers"] = tiers
        .iter()
        .map(|t| (t.medium.as_str().to_string(), describe(&t.hashes)))
        .collect::<serde_json::Map<_, _>>()
        .into();
    Ok(Json(body))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::handle::EngineCommand;
    use crate::engine::{Finish, FinishReason, GenerateOutput, StopReason, TokenLogprob};
    use crate::server::test_support::{test_config, test_state, EOS_ID, MAX_MODEL_LEN, MODEL};
    use axum::body::Body;
    use serde_json::{json, Value};
    use std::sync::mpsc;
    use tower::ServiceExt;

    async fn send(
        router: Router,
        request: axum::http::Request<Body>,
    ) -> (StatusCode, axum::http::HeaderMap, String) {
        let response = router.oneshot(request).await.unwrap();
        let status = response.status();
        let headers = response.headers().clone();
        let body = axum::body::to_bytes(response.into_body(), usize::MAX)
            .await
            .unwrap();
        (status, headers, String::from_utf8(body.to_vec()).unwrap())
    }

    fn post_json(path: &str, body: &str) -> axum::http::Request<Body> {
        axum::http::Request::post(path)
            .header(CONTENT_TYPE, "application/json")
            .body(Body::from(body.to_string()))
            .unwrap()
    }

    async fn post(path: &str, body: Value) -> (StatusCode, Value) {
        let (state, _rx) = test_state(test_config(), true);
        let (status, _, text) = send(router(state), post_json(path, &body.to_string())).await;
        (status, serde_json::from_str(&text).unwrap())
    }

    fn error_of(body: &Value) -> (&str, Option<&str>, &str) {
        let e = &body["error"];
        (
            e["type"].as_str().unwrap(),
            e["param"].as_str(),
            e["message"].as_str().unwrap(),
        )
    }

    #[tokio::test]
    async fn malformed_bodies_are_vllm_400s() {
        let (state, _rx) = test_state(test_config(), true);
        let app = router(state);
        let cases = [
            post_json("/v1/completions", "{not json"),
            post_json("/v1/completions", "[1, 2]"),
            post_json("/v1/completions", ""),
            axum::http::Request::post("/v1/completions")
                .header(CONTENT_TYPE, "text/plain")
                .body(Body::from(r#"{"prompt": "hello"}"#))
                .unwrap(),
            axum::http::Request::post("/v1/chat/completions")
                .body(Body::from(r#"{"messages": []}"#))
                .unwrap(),
            axum::http::Request::post("/v1/completions")
                .header(CONTENT_TYPE, "application/json")
                .body(Body::from(&b"{\"prompt\": \"\xff\xfe\"}"[..]))
                .unwrap(),
        ];
        for request in cases {
            let (status, headers, body) = send(app.clone(), request).await;
            assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
            assert_eq!(headers[CONTENT_TYPE], "application/json");
            let v: Value = serde_json::from_str(&body).unwrap();
            assert_eq!(v["error"]["code"], 400);
            assert_eq!(v["error"]["type"], "BadRequestError");
        }
    }

    #[tokio::test]
    async fn oversized_body_is_413_in_error_shape() {
        let mut config = test_config();
        config.max_body_bytes = 1024;
        let (state, _rx) = test_state(config, true);
        let body = json!({"prompt": "hello ".repeat(1000)}).to_string();
        let (status, _, text) = send(router(state), post_json("/v1/completions", &body)).await;
        assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
        let v: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(v["error"]["code"], 413);
    }

    #[tokio::test]
    async fn huge_prompt_is_a_clean_400() {
        // A 12 MB prompt: refused from its length, without tokenizing it.
        let (status, body) = post(
            "/v1/completions",
            json!({"prompt": "hello ".repeat(2_000_000)}),
        )
        .await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert_eq!(error_of(&body).1, Some("input_text"));
    }

    #[tokio::test]
    async fn schema_errors() {
        let (status, body) = post(
            "/v1/completions",
            json!({"prompt": "x", "max_tokens": "many"}),
        )
        .await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        let (kind, param, msg) = error_of(&body);
        assert_eq!((kind, param), ("BadRequestError", Some("body.max_tokens")));
        assert!(
            msg.starts_with("1 validation error:\n  {'type': 'int_parsing'"),
            "{msg}"
        );
        let (_, body) = post("/v1/chat/completions", json!({"model": MODEL})).await;
        assert_eq!(error_of(&body).1, Some("body.messages"));
        let (_, body) = post("/v1/completions", json!({"prompt": [1, "a"]})).await;
        assert_eq!(error_of(&body).1, Some("body.prompt.1"));
    }

    #[tokio::test]
    async fn validation_errors() {
        let cases = [
            (
                json!({"prompt": "hello", "temperature": -0.5}),
                Some("temperature"),
            ),
            (json!({"prompt": "hello", "top_p": 0}), Some("top_p")),
            (json!({"prompt": "hello", "top_k": -5}), None),
            (json!({"prompt": "hello", "min_p": 2}), None),
            (json!({"prompt": "hello", "repetition_penalty": 0}), None),
            (json!({"prompt": "hello", "presence_penalty": 3}), None),
            (json!({"prompt": "hello", "frequency_penalty": -3}), None),
            (json!({"prompt": "hello", "n": 0}), None),
            (
                json!({"prompt": "hello", "max_tokens": 0}),
                Some("max_tokens"),
            ),
            (
                json!({"prompt": "hello", "max_tokens": -1}),
                Some("max_tokens"),
            ),
            (
                json!({"prompt": "hello", "max_tokens": MAX_MODEL_LEN + 1}),
                Some("max_tokens"),
            ),
            (json!({"prompt": "hello", "logprobs": 21}), Some("logprobs")),
            (
                json!({"prompt": "hello", "stream_options": {"include_usage": true}}),
                Some("stream_options"),
            ),
            (json!({"prompt": ""}), Some("prompt")),
            (json!({"prompt": [1, 2, 500]}), None),
            (
                json!({"prompt": vec![1u32; MAX_MODEL_LEN]}),
                Some("input_tokens"),
            ),
        ];
        for (body, param) in cases {
            let (status, v) = post("/v1/completions", body.clone()).await;
            assert_eq!(status, StatusCode::BAD_REQUEST, "{body} -> {v}");
            assert_eq!(error_of(&v).0, "BadRequestError", "{body}");
            assert_eq!(error_of(&v).1, param, "{body} -> {v}");
        }
        let chat_cases = [
            json!({"messages": []}),
            json!({"messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": 0}),
            json!({"messages": [{"role": "user", "content": "hi"}], "top_logprobs": 3}),
            json!({"messages": [{"role": "user", "content": "hi"}], "stream_options": {"include_usage": true}, "stream": false}),
            json!({"messages": [{"role": "user", "content": "hi"}], "tools": [{"type": "function", "function": {"name": "f"}}]}),
        ];
        for body in chat_cases {
            let (status, v) = post("/v1/chat/completions", body.clone()).await;
            assert_eq!(status, StatusCode::BAD_REQUEST, "{body} -> {v}");
        }
    }

    #[tokio::test]
    async fn unknown_model_is_404() {
        let (status, body) = post(
            "/v1/completions",
            json!({"model": "nope", "prompt": "hello"}),
        )
        .await;
        assert_eq!(status, StatusCode::NOT_FOUND);
        assert_eq!(
            body,
            json!({"error": {"message": "The model `nope` does not exist.", "type": "NotFoundError", "param": "model", "code": 404}})
        );
    }

    #[tokio::test]
    async fn dead_engine() {
        let (state, _rx) = test_state(test_config(), false);
        let app = router(state);
        let (status, _, body) = send(
            app.clone(),
            axum::http::Request::get("/health")
                .body(Body::empty())
                .unwrap(),
        )
        .await;
        assert_eq!(
            (status, body.as_str()),
            (StatusCode::SERVICE_UNAVAILABLE, "")
        );
        let (status, _, body) =
            send(app, post_json("/v1/completions", r#"{"prompt": "hello"}"#)).await;
        assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR);
        assert!(body.contains("EngineCore encountered an issue"));
    }

    #[tokio::test]
    async fn api_key_guards_v1_and_admin_routes() {
        let mut config = test_config();
        config.api_keys = vec!["secret".into()];
        let (state, _rx) = test_state(config, true);
        let app = router(state);
        let get = |path: &str, auth: Option<&str>| {
            let mut r = axum::http::Request::get(path);
            if let Some(a) = auth {
                r = r.header(AUTHORIZATION, a);
            }
            r.body(Body::empty()).unwrap()
        };
        let (status, _, body) = send(app.clone(), get("/v1/models", None)).await;
        assert_eq!(
            (status, body.as_str()),
            (StatusCode::UNAUTHORIZED, r#"{"error":"Unauthorized"}"#)
        );
        let (status, _, _) = send(app.clone(), get("/v1/models", Some("Bearer wrong"))).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED);
        let (status, _, _) = send(app.clone(), get("/v1/models", Some("bearer secret"))).await;
        assert_eq!(status, StatusCode::OK);
        let (status, _, _) = send(app.clone(), get("/health", None)).await;
        assert_eq!(status, StatusCode::OK);
        let (status, _, _) = send(app.clone(), get("/metrics", None)).await;
        assert_eq!(status, StatusCode::OK);
        // With the key both reach the engine, which this test does not run: e2e router_admin.
        let (status, _, _) = send(app.clone(), get("/debug/kv_cache", None)).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED);
        let reset = |auth: Option<&str>| {
            let mut r = axum::http::Request::post("/reset_prefix_cache");
            if let Some(a) = auth {
                r = r.header(AUTHORIZATION, a);
            }
            r.body(Body::empty()).unwrap()
        };
        let (status, _, _) = send(app.clone(), reset(None)).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED);
        let (status, _, _) = send(app, reset(Some("Bearer wrong"))).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED);
    }

    #[tokio::test]
    async fn small_endpoints() {
        let (state, _rx) = test_state(test_config(), true);
        let app = router(state);
        let get = |path: &str| {
            axum::http::Request::get(path)
                .header(REQUEST_ID_HEADER, "rid-1")
                .body(Body::empty())
                .unwrap()
        };
        let (status, headers, body) = send(app.clone(), get("/v1/models")).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(headers[REQUEST_ID_HEADER], "rid-1");
        let v: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v["object"], "list");
        assert_eq!(v["data"][0]["id"], MODEL);
        assert_eq!(v["data"][1]["id"], "alias");
        assert_eq!(v["data"][0]["max_model_len"], MAX_MODEL_LEN);
        assert_eq!(v["data"][0]["owned_by"], "vllm");
        assert_eq!(v["data"][0]["root"], "/models/test.gguf");
        assert_eq!(v["data"][0]["permission"][0]["object"], "model_permission");
        let (_, headers, body) = send(app.clone(), get("/metrics")).await;
        assert_eq!(
            headers[CONTENT_TYPE],
            "text/plain; version=0.0.4; charset=utf-8"
        );
        assert!(body.contains("vllm:num_requests_running"));
        let (_, _, body) = send(app.clone(), get("/version")).await;
        assert_eq!(
            body,
            format!(r#"{{"version":"{}"}}"#, env!("CARGO_PKG_VERSION"))
        );
        let (status, _, body) = send(
            app.clone(),
            axum::http::Request::post("/ping")
                .body(Body::empty())
                .unwrap(),
        )
        .await;
        assert_eq!((status, body.as_str()), (StatusCode::OK, ""));
        let (status, _, body) = send(app.clone(), get("/nope")).await;
        assert_eq!(status, StatusCode::NOT_FOUND);
        assert_eq!(
            body,
            r#"{"error":{"message":"Not Found","type":"Not Found","param":null,"code":404}}"#
        );
        let (status, headers, _) = send(app, get("/v1/completions")).await;
        assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED);
        assert_eq!(headers[REQUEST_ID_HEADER], "rid-1");
    }

    #[tokio::test]
    async fn tokenize_and_detokenize() {
        let (status, v) = post(
            "/tokenize",
            json!({"prompt": "hello world", "return_token_strs": true}),
        )
        .await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(
            v,
            json!({"count": 2, "max_model_len": MAX_MODEL_LEN, "tokens": [1, 2], "token_strs": ["hello", "world"]})
        );
        let (_, v) = post(
            "/tokenize",
            json!({"messages": [{"role": "user", "content": "hello"}]}),
        )
        .await;
        assert_eq!(v["tokens"], json!([6, 8, 1, 7, 6, 9]));
        assert_eq!(v["token_strs"], Value::Null);
        let (status, v) = post("/detokenize", json!({"tokens": [1, 2]})).await;
        assert_eq!(
            (status, v),
            (StatusCode::OK, json!({"prompt": "hello world"}))
        );
        let (status, _) = post("/detokenize", json!({"tokens": [1, 99]})).await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        let (status, _) = post("/tokenize", json!({"model": "x", "prompt": "hello"})).await;
        assert_eq!(status, StatusCode::NOT_FOUND);
    }

    /// Answers every request the router submits from a thread, like the engine would.
    fn answer_requests(
        rx: mpsc::Receiver<EngineCommand>,
        script: fn(usize) -> Vec<GenerateOutput>,
    ) {
        std::thread::spawn(move || {
            let mut k = 0;
            while let Ok(command) = rx.recv() {
                if let EngineCommand::Add { outputs, .. } = command {
                    for out in script(k) {
                        let _ = outputs.send(out);
                    }
                    k += 1;
                }
            }
        });
    }

    fn out(tokens: &[u32], text: &str, finish: Option<Finish>) -> GenerateOutput {
        GenerateOutput {
            token_ids: tokens.to_vec(),
            text: text.into(),
            logprobs: tokens
                .iter()
                .map(|&t| TokenLogprob {
                    token_id: t,
                    logprob: -0.5,
                    top: vec![(t, -0.5)],
                })
                .collect(),
            finish,
            prompt_logprobs: None,
            embedding: None,
            num_prompt_tokens: 1,
            num_cached_tokens: 0,
        }
    }

    fn two_tokens(_: usize) -> Vec<GenerateOutput> {
        vec![
            out(&[], "", None),
            out(&[3], "foo", None),
            out(
                &[EOS_ID],
                "",
                Some(Finish {
                    reason: FinishReason::Stop,
                    stop_reason: None,
                    error: None,
                    kv_transfer_params: None,
                }),
            ),
        ]
    }

    #[tokio::test]
    async fn completion_response_shape() {
        let (state, rx) = test_state(test_config(), true);
        answer_requests(rx, two_tokens);
        let request = axum::http::Request::post("/v1/completions")
            .header(CONTENT_TYPE, "application/json")
            .header(REQUEST_ID_HEADER, "abc")
            .body(Body::from(json!({"prompt": ["hello", "world"], "n": 2, "echo": true, "return_token_ids": true}).to_string()))
            .unwrap();
        let (status, _, body) = send(router(state), request).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        let mut v: Value = serde_json::from_str(&body).unwrap();
        assert!(v["created"].is_u64());
        v["created"] = json!(0);
        assert_eq!(
            v,
            json!({
                "id": "cmpl-abc", "object": "text_completion", "created": 0, "model": MODEL,
                "choices": [
                    {"index": 0, "text": "hellofoo", "logprobs": null, "finish_reason": "stop", "stop_reason": null,
                     "token_ids": [3, EOS_ID], "prompt_logprobs": null, "prompt_token_ids": [1]},
                    {"index": 1, "text": "hellofoo", "logprobs": null, "finish_reason": "stop", "stop_reason": null,
                     "token_ids": [3, EOS_ID], "prompt_logprobs": null, "prompt_token_ids": [1]},
                    {"index": 2, "text": "worldfoo", "logprobs": null, "finish_reason": "stop", "stop_reason": null,
                     "token_ids": [3, EOS_ID], "prompt_logprobs": null, "prompt_token_ids": [2]},
                    {"index": 3, "text": "worldfoo", "logprobs": null, "finish_reason": "stop", "stop_reason": null,
                     "token_ids": [3, EOS_ID], "prompt_logprobs": null, "prompt_token_ids": [2]}
                ],
                "service_tier": null, "system_fingerprint": "fp-test",
                "usage": {"prompt_tokens": 2, "total_tokens": 10, "completion_tokens": 8, "prompt_tokens_details": null},
                "kv_transfer_params": null
            })
        );
    }

    #[tokio::test]
    async fn completion_stream_bytes() {
        let (state, rx) = test_state(test_config(), true);
        answer_requests(rx, |_| {
            vec![
                out(&[3], "foo", None),
                out(
                    &[4],
                    "bar",
                    Some(Finish {
                        reason: FinishReason::Stop,
                        stop_reason: Some(StopReason::Text("x".into())),
                        error: None,
                        kv_transfer_params: None,
                    }),
                ),
            ]
        });
        let body = json!({"prompt": "hello", "stream": true, "logprobs": 0,
                          "stream_options": {"include_usage": true, "continuous_usage_stats": true}});
        let request = axum::http::Request::post("/v1/completions")
            .header(CONTENT_TYPE, "application/json")
            .header(REQUEST_ID_HEADER, "s1")
            .body(Body::from(body.to_string()))
            .unwrap();
        let (status, headers, text) = send(router(state), request).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(headers[CONTENT_TYPE], "text/event-stream; charset=utf-8");
        let created = text
            .split("\"created\":")
            .nth(1)
            .unwrap()
            .split(',')
            .next()
            .unwrap()
            .to_string();
        let expected = [
            r#"{"id":"cmpl-s1","object":"text_completion","created":C,"model":"test-model","choices":[{"index":0,"text":"foo","logprobs":{"text_offset":[0],"token_logprobs":[-0.5],"tokens":["foo"],"top_logprobs":[{"foo":-0.5}]},"finish_reason":null,"stop_reason":null,"prompt_token_ids":null,"token_ids":null}],"usage":{"prompt_tokens":1,"total_tokens":2,"completion_tokens":1}}"#,
            r#"{"id":"cmpl-s1","object":"text_completion","created":C,"model":"test-model","choices":[{"index":0,"text":"bar","logprobs":{"text_offset":[3],"token_logprobs":[-0.5],"tokens":["bar"],"top_logprobs":[{"bar":-0.5}]},"finish_reason":"stop","stop_reason":"x","prompt_token_ids":null,"token_ids":null}],"usage":{"prompt_tokens":1,"total_tokens":3,"completion_tokens":2}}"#,
            r#"{"id":"cmpl-s1","object":"text_completion","created":C,"model":"test-model","choices":[],"usage":{"prompt_tokens":1,"total_tokens":3,"completion_tokens":2},"system_fingerprint":"fp-test"}"#,
        ]
        .map(|e| format!("data: {}\n\n", e.replace("\"created\":C", &format!("\"created\":{created}"))))
        .concat()
            + "data: [DONE]\n\n";
        assert_eq!(text, expected);
    }

    #[tokio::test]
    async fn chat_stream_bytes() {
        let (state, rx) = test_state(test_config(), true);
        answer_requests(rx, |_| {
            vec![out(
                &[3],
                "foo",
                Some(Finish {
                    reason: FinishReason::Length,
                    stop_reason: None,
                    error: None,
                    kv_transfer_params: None,
                }),
            )]
        });
        let body = json!({"messages": [{"role": "user", "content": "hello"}], "stream": true});
        let request = axum::http::Request::post("/v1/chat/completions")
            .header(CONTENT_TYPE, "application/json")
            .header(REQUEST_ID_HEADER, "c1")
            .body(Body::from(body.to_string()))
            .unwrap();
        let (_, _, text) = send(router(state), request).await;
        let created = text
            .split("\"created\":")
            .nth(1)
            .unwrap()
            .split(',')
            .next()
            .unwrap()
            .to_string();
        let expected = [
            r#"{"id":"chatcmpl-c1","object":"chat.completion.chunk","created":C,"model":"test-model","choices":[{"index":0,"delta":{"role":"assistant","content":""},"logprobs":null,"finish_reason":null}],"prompt_token_ids":null}"#,
            r#"{"id":"chatcmpl-c1","object":"chat.completion.chunk","created":C,"model":"test-model","choices":[{"index":0,"delta":{"content":"foo"},"logprobs":null,"finish_reason":"length","stop_reason":null,"token_ids":null}],"system_fingerprint":"fp-test"}"#,
        ]
        .map(|e| format!("data: {}\n\n", e.replace("\"created\":C", &format!("\"created\":{created}"))))
        .concat()
            + "data: [DONE]\n\n";
        assert_eq!(text, expected);
    }

    #[tokio::test]
    async fn chat_response_shape_and_request() {
        let (state, rx) = test_state(test_config(), true);
        let (seen_tx, seen_rx) = mpsc::channel();
        std::thread::spawn(move || {
            while let Ok(EngineCommand::Add { request, outputs }) = rx.recv() {
                let _ = seen_tx.send(request);
                let _ = outputs.send(out(
                    &[2],
                    "world",
                    Some(Finish {
                        reason: FinishReason::Stop,
                        stop_reason: Some(StopReason::Token(EOS_ID)),
                        error: None,
                        kv_transfer_params: None,
                    }),
                ));
            }
        });
        let body = json!({"model": "alias", "messages": [{"role": "user", "content": "hello"}],
                          "logprobs": true, "top_logprobs": 1, "max_tokens": 5, "seed": 3, "temperature": 0.5});
        let (status, _, text) = send(
            router(state),
            post_json("/v1/chat/completions", &body.to_string()),
        )
        .await;
        assert_eq!(status, StatusCode::OK, "{text}");
        let v: Value = serde_json::from_str(&text).unwrap();
        assert!(v["id"].as_str().unwrap().starts_with("chatcmpl-"));
        assert_eq!(v["object"], "chat.completion");
        assert_eq!(v["model"], MODEL);
        assert_eq!(
            v["choices"][0],
            json!({"index": 0,
                   "message": {"role": "assistant", "content": "world", "refusal": null, "annotations": null,
                               "audio": null, "function_call": null, "reasoning": null},
                   "logprobs": {"content": [{"token": "world", "logprob": -0.5, "bytes": [119, 111, 114, 108, 100],
                                             "top_logprobs": [{"token": "world", "logprob": -0.5, "bytes": [119, 111, 114, 108, 100]}]}]},
                   "finish_reason": "stop", "stop_reason": EOS_ID, "token_ids": null})
        );
        assert_eq!(
            v["usage"],
            json!({"prompt_tokens": 6, "total_tokens": 7, "completion_tokens": 1, "prompt_tokens_details": null})
        );
        let request = seen_rx.recv().unwrap();
        assert_eq!(request.prompt_token_ids, vec![6, 8, 1, 7, 6, 9]);
        assert_eq!(request.params.max_tokens, 5);
        assert_eq!(request.params.seed, Some(3));
        assert_eq!(request.params.temperature, 0.5);
        assert_eq!(request.params.logprobs, Some(1));
    }
}
