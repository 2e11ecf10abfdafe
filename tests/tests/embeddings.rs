//! Issue 21: `/v1/embeddings` on the real model. The oracle: this model's LM head is its token
//! embedding, so the last token's final hidden state (LAST pooling, not normalised) times the
//! GGUF's `token_embd.weight` must give the logits candle's `quantized_llama` computes for the
//! same prompt. Then the API: batches of texts and token ids, L2 normalisation, base64 equal
//! to the floats, MEAN pooling, a warm prefix cache changing nothing, and vLLM's 400s.

use base64::Engine as _;
use e2e::oracle::{log_softmax, token_embeddings, top_k, Oracle};
use e2e::{model_path, Agent, Launch, SERVED_MODEL};
use serde_json::{json, Value};

const TEXT: &str = "Embeddings map a sentence to a point in a vector space.";

fn floats(v: &Value) -> Vec<f32> {
    v.as_array()
        .unwrap_or_else(|| panic!("not a list: {v}"))
        .iter()
        .map(|x| x.as_f64().unwrap() as f32)
        .collect()
}

fn norm(v: &[f32]) -> f32 {
    v.iter().map(|x| x * x).sum::<f32>().sqrt()
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

async fn embed(agent: &Agent, body: Value) -> Value {
    agent.post_ok("/v1/embeddings", &body).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn last_hidden_state_reproduces_the_oracle_logits() {
    // f32 weights on both sides (see tests/oracle.rs for why).
    std::env::set_var("CANDLE_DEQUANTIZE_ALL", "1");
    let launch = Launch {
        env: vec![("CANDLE_DEQUANTIZE_ALL".into(), "1".into())],
        ..Launch::default()
    };
    let agent = Agent::launch(
        &launch,
        &[
            "--pooler-config",
            r#"{"pooling_type": "LAST", "normalize": false}"#,
        ],
    )
    .await;
    let ids = agent.tokenize(TEXT).await;
    let r = embed(&agent, json!({"model": SERVED_MODEL, "input": TEXT})).await;
    let h = floats(&r["data"][0]["embedding"]);
    let (embedding, hidden) = token_embeddings(&model_path()).unwrap();
    assert_eq!(h.len(), hidden);
    let logits: Vec<f32> = embedding
        .chunks_exact(hidden)
        .map(|row| row.iter().zip(&h).map(|(w, x)| w * x).sum())
        .collect();
    let ours = log_softmax(&logits);
    let oracle = Oracle::load(&model_path())
        .unwrap()
        .greedy(&ids, 1)
        .unwrap()
        .first_logprobs;
    // The agent's own logits for the prompt come from the same hidden state: equal up to the
    // summation order of one matmul row.
    let gen = agent
        .post_ok(
            "/v1/completions",
            &json!({"model": SERVED_MODEL, "prompt": ids, "max_tokens": 1, "logprobs": 5,
                    "temperature": 0.0}),
        )
        .await;
    let top = gen["choices"][0]["logprobs"]["top_logprobs"][0]
        .as_object()
        .unwrap()
        .clone();
    assert_eq!(top.len(), 5, "{gen}");
    for (id, lp) in top_k(&ours, 5) {
        let text = agent.detokenize(&[id]).await;
        let agent_lp = top[&text].as_f64().unwrap() as f32;
        assert!(
            (agent_lp - lp).abs() < 1e-4,
            "token {id}: {lp} vs {agent_lp}"
        );
    }
    // The independent implementation: the agent and candle differ by up to ~2e-3 on this
    // prompt (attention summation order), the embedding path adds nothing to that.
    for (id, lp) in top_k(&oracle, 5) {
        let got = ours[id as usize];
        assert!(
            (got - lp).abs() < 5e-3,
            "token {id}: {got} from the embedding vs {lp} from the oracle"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embeddings_api() {
    let agent = Agent::start(&[]).await;
    let ids = agent.tokenize(TEXT).await;
    let r = embed(
        &agent,
        json!({"model": SERVED_MODEL, "input": [TEXT, "Something else entirely.", TEXT]}),
    )
    .await;
    assert_eq!(r["object"], "list");
    assert!(r["id"].as_str().unwrap().starts_with("embd-"), "{r}");
    assert_eq!(r["model"], SERVED_MODEL);
    let data = r["data"].as_array().unwrap();
    assert_eq!(data.len(), 3);
    let e: Vec<Vec<f32>> = data.iter().map(|d| floats(&d["embedding"])).collect();
    for (i, d) in data.iter().enumerate() {
        assert_eq!(
            (d["index"].as_u64(), d["object"].as_str()),
            (Some(i as u64), Some("embedding"))
        );
        assert_eq!(e[i].len(), 576);
        assert!(
            (norm(&e[i]) - 1.0).abs() < 1e-4,
            "not normalised: {}",
            norm(&e[i])
        );
    }
    // Same text, same embedding (the third one read the first's cached blocks); another
    // text, another point.
    assert!(max_diff(&e[0], &e[2]) < 1e-5);
    assert!(max_diff(&e[0], &e[1]) > 1e-2);
    let usage = &r["usage"];
    let second = agent.tokenize("Something else entirely.").await.len();
    assert_eq!(
        usage["prompt_tokens"],
        json!(2 * ids.len() + second),
        "{usage}"
    );
    assert_eq!(usage["completion_tokens"], 0);

    // Token ids in, and base64 out: the same floats.
    let b = embed(
        &agent,
        json!({"model": SERVED_MODEL, "input": ids, "encoding_format": "base64"}),
    )
    .await;
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(b["data"][0]["embedding"].as_str().unwrap())
        .unwrap();
    let decoded: Vec<f32> = bytes
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    assert!(max_diff(&decoded, &e[0]) < 1e-6);

    // vLLM's 400s, and the server stays healthy.
    for (body, param) in [
        (json!({"input": TEXT, "dimensions": 64}), "dimensions"),
        (
            json!({"input": TEXT, "encoding_format": "bytes"}),
            "encoding_format",
        ),
        (json!({"input": []}), ""),
        (json!({"input": [1, 99999999]}), ""),
        (json!({"input": "word ".repeat(9000)}), ""),
    ] {
        let reply = agent.post("/v1/embeddings", &body).await;
        let err = reply.assert_error(400, "BadRequestError");
        if !param.is_empty() {
            assert_eq!(err["param"], param, "{err}");
        }
    }
    let wrong_model = agent
        .post("/v1/embeddings", &json!({"model": "nope", "input": TEXT}))
        .await;
    wrong_model.assert_error(404, "NotFoundError");
    agent.wait_idle(std::time::Duration::from_secs(10)).await;
}

/// MEAN pooling against its definition: with a causal model, the LAST state of the prefix
/// `t0..=tk` is position k's state, so the unnormalised mean over a prompt is the mean of its
/// prefixes' LAST embeddings. The MEAN agent prefills in 16-token chunks, so its pooling spans
/// several steps.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mean_pooling_is_the_mean_of_the_positions() {
    let raw = |kind: &str| format!(r#"{{"pooling_type": "{kind}", "normalize": false}}"#);
    let mean_cfg = raw("MEAN");
    let last_cfg = raw("LAST");
    let mean_flags = [
        "--pooler-config",
        &mean_cfg,
        "--max-num-batched-tokens",
        "16",
    ];
    let last_flags = ["--pooler-config", &last_cfg];
    let (mean_agent, last_agent) =
        tokio::join!(Agent::start(&mean_flags), Agent::start(&last_flags));
    let ids = last_agent
        .tokenize(&format!("{TEXT} {TEXT} And one more time."))
        .await;
    assert!(ids.len() > 16, "{}", ids.len());
    let mean = floats(&embed(&mean_agent, json!({"input": ids})).await["data"][0]["embedding"]);
    let prefixes: Vec<&[u32]> = (1..=ids.len()).map(|k| &ids[..k]).collect();
    let r = embed(&last_agent, json!({"input": prefixes})).await;
    let states: Vec<Vec<f32>> = r["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| floats(&d["embedding"]))
        .collect();
    let mut expected = vec![0.0f32; mean.len()];
    for s in &states {
        for (e, x) in expected.iter_mut().zip(s) {
            *e += x / ids.len() as f32;
        }
    }
    let scale = expected.iter().map(|x| x.abs()).fold(0.0, f32::max);
    let diff = max_diff(&mean, &expected);
    assert!(
        diff < 1e-3 * scale.max(1.0),
        "mean off by {diff} (scale {scale})"
    );
    // And it is not the last position's state.
    assert!(max_diff(&mean, &states[ids.len() - 1]) > 1e-2 * scale.max(1.0));
    // Normalised by default.
    let agent = Agent::start(&["--pooler-config", r#"{"pooling_type": "MEAN"}"#]).await;
    let v = floats(&embed(&agent, json!({"input": ids})).await["data"][0]["embedding"]);
    assert!((norm(&v) - 1.0).abs() < 1e-4);
}
