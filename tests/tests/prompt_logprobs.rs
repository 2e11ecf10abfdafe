//! Issue 21: prompt logprobs on the real model. `prompt_logprobs` (vLLM's extra field) and
//! completions' `echo` + `logprobs` report, for every prompt token after the first, the
//! logprob the model gave it; they agree with what generation from the shorter prefix reports,
//! read nothing from the prefix cache (so a cached prompt gives the same numbers), cover
//! prompts longer than one step's logits bound, and are refused on streams as vLLM does.

use e2e::{Agent, LONG_TEXT, SERVED_MODEL};
use serde_json::{json, Value};

const PROMPT: &str = "The quick brown fox jumps over the lazy dog while the farmer watches \
                      from the porch of his old wooden house";

fn completion(prompt: &[u32], extra: Value) -> Value {
    let mut body = json!({"model": SERVED_MODEL, "prompt": prompt, "max_tokens": 1,
                          "temperature": 0.0});
    for (k, v) in extra.as_object().cloned().unwrap_or_default() {
        body[k] = v;
    }
    body
}

/// The logprob and rank of prompt token `k` (`prompt_logprobs[k][str(id)]`).
fn entry(list: &Value, k: usize, id: u32) -> (f64, u64) {
    let e = &list[k][id.to_string()];
    (
        e["logprob"]
            .as_f64()
            .unwrap_or_else(|| panic!("no entry {k}/{id}: {list}")),
        e["rank"]
            .as_u64()
            .unwrap_or_else(|| panic!("no rank {k}/{id}: {list}")),
    )
}

/// The rank-1 token of prompt position `k` and its logprob.
fn top1(list: &Value, k: usize) -> (u32, f64) {
    let map = list[k]
        .as_object()
        .unwrap_or_else(|| panic!("position {k}: {list}"));
    let (id, e) = map
        .iter()
        .find(|(_, e)| e["rank"] == 1)
        .unwrap_or_else(|| panic!("no rank-1 entry at {k}: {list}"));
    (id.parse().unwrap(), e["logprob"].as_f64().unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prompt_logprobs_agree_with_generation() {
    let agent = Agent::start(&["--enable-prompt-tokens-details"]).await;
    let ids = agent.tokenize(PROMPT).await;
    assert!(
        ids.len() > 16,
        "the prompt must fill a block: {}",
        ids.len()
    );

    // Cache the prompt's blocks first: the prompt-logprobs request must not read them.
    agent
        .post_ok("/v1/completions", &completion(&ids, json!({})))
        .await;
    let r = agent
        .post_ok(
            "/v1/completions",
            &completion(&ids, json!({"prompt_logprobs": 2})),
        )
        .await;
    let list = &r["choices"][0]["prompt_logprobs"];
    assert_eq!(list.as_array().map(Vec::len), Some(ids.len()), "{list}");
    assert!(list[0].is_null(), "{list}");
    assert_eq!(
        r["usage"]["prompt_tokens_details"]["cached_tokens"], 0,
        "{r}"
    );
    for (k, &id) in ids.iter().enumerate().skip(1) {
        let (lp, rank) = entry(list, k, id);
        assert!(lp <= 0.0 && rank >= 1, "position {k}: {list}");
        // The prompt token plus the top 2, one of which it may be.
        let n = list[k].as_object().unwrap().len();
        assert!((2..=3).contains(&n), "position {k} has {n} entries: {list}");
        let (_, best) = top1(list, k);
        assert!(lp <= best + 1e-6, "position {k}: {list}");
        if rank == 1 {
            assert!((lp - best).abs() < 1e-6);
        }
    }

    // Position k's distribution is the one generation sees after the first k tokens.
    for k in [3, 9, ids.len() - 1] {
        let g = agent
            .post_ok(
                "/v1/completions",
                &completion(&ids[..k], json!({"logprobs": 1})),
            )
            .await;
        let lp = &g["choices"][0]["logprobs"];
        let greedy_text = lp["tokens"][0].as_str().unwrap().to_string();
        let greedy_lp = lp["token_logprobs"][0].as_f64().unwrap();
        let (best_id, best_lp) = top1(list, k);
        let best_text = agent.detokenize(&[best_id]).await;
        assert_eq!(best_text, greedy_text, "position {k}");
        assert!(
            (best_lp - greedy_lp).abs() < 2e-3,
            "position {k}: prompt {best_lp} vs generation {greedy_lp}"
        );
    }

    // Again, now that the prompt is cached twice over: the same numbers.
    let again = agent
        .post_ok(
            "/v1/completions",
            &completion(&ids, json!({"prompt_logprobs": 2})),
        )
        .await;
    for (k, &id) in ids.iter().enumerate().skip(1) {
        let (a, b) = (
            entry(list, k, id).0,
            entry(&again["choices"][0]["prompt_logprobs"], k, id).0,
        );
        assert!((a - b).abs() < 1e-4, "position {k}: {a} vs {b}");
    }

    // echo + logprobs: the prompt's tokens lead the choice's logprobs.
    let e = agent
        .post_ok(
            "/v1/completions",
            &json!({"model": SERVED_MODEL, "prompt": PROMPT, "echo": true, "logprobs": 1,
                    "max_tokens": 3, "temperature": 0.0}),
        )
        .await;
    let choice = &e["choices"][0];
    assert!(choice["text"].as_str().unwrap().starts_with(PROMPT), "{e}");
    let lp = &choice["logprobs"];
    assert_eq!(
        lp["tokens"].as_array().unwrap().len(),
        ids.len() + 3,
        "{lp}"
    );
    assert!(
        lp["token_logprobs"][0].is_null() && lp["top_logprobs"][0].is_null(),
        "{lp}"
    );
    for (k, &id) in ids.iter().enumerate().skip(1) {
        let got = lp["token_logprobs"][k].as_f64().unwrap();
        let want = entry(list, k, id).0;
        assert!(
            (got - want).abs() < 1e-4,
            "echo position {k}: {got} vs {want}"
        );
    }
    assert_eq!(
        choice["prompt_logprobs"].as_array().map(Vec::len),
        Some(ids.len()),
        "echo with logprobs also fills prompt_logprobs"
    );
    // echo with max_tokens 0: the prompt and its logprobs only.
    let only = agent
        .post_ok(
            "/v1/completions",
            &json!({"model": SERVED_MODEL, "prompt": PROMPT, "echo": true, "logprobs": 0,
                    "max_tokens": 0}),
        )
        .await;
    assert_eq!(only["choices"][0]["text"], PROMPT);
    let tokens = &only["choices"][0]["logprobs"]["tokens"];
    assert_eq!(tokens.as_array().unwrap().len(), ids.len(), "{only}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn long_prompts_chat_and_refusals() {
    let agent = Agent::start(&[]).await;
    // Longer than one step's bound on logits rows (256 tokens).
    let ids = agent.tokenize(&format!("{LONG_TEXT} {LONG_TEXT}")).await;
    assert!(ids.len() > 300, "{}", ids.len());
    let r = agent
        .post_ok(
            "/v1/completions",
            &completion(&ids, json!({"prompt_logprobs": 0})),
        )
        .await;
    let list = &r["choices"][0]["prompt_logprobs"];
    assert_eq!(list.as_array().map(Vec::len), Some(ids.len()));
    for (k, &id) in ids.iter().enumerate().skip(1) {
        assert_eq!(list[k].as_object().unwrap().len(), 1, "position {k}");
        entry(list, k, id);
    }

    let chat = agent
        .post_ok(
            "/v1/chat/completions",
            &json!({"model": SERVED_MODEL, "max_tokens": 1, "prompt_logprobs": 1,
                    "messages": [{"role": "user", "content": "Hello there"}]}),
        )
        .await;
    let n = chat["usage"]["prompt_tokens"].as_u64().unwrap() as usize;
    assert_eq!(
        chat["prompt_logprobs"].as_array().map(Vec::len),
        Some(n),
        "{chat}"
    );

    let refused = agent
        .post(
            "/v1/completions",
            &completion(&ids[..5], json!({"prompt_logprobs": 1, "stream": true})),
        )
        .await;
    let err = refused.assert_error(400, "BadRequestError");
    assert_eq!(err["param"], "prompt_logprobs", "{err}");
    let refused = agent
        .post(
            "/v1/completions",
            &completion(&ids[..5], json!({"prompt_logprobs": 21})),
        )
        .await;
    refused.assert_error(400, "BadRequestError");
    // The server is still healthy and its blocks are free.
    agent.wait_idle(std::time::Duration::from_secs(10)).await;
}
