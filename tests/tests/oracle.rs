//! Acceptance 1: the agent's batched, paged, chunked-prefill forward pass generates exactly what
//! an independent implementation (candle-transformers `quantized_llama`, run one sequence at a
//! time) generates for the same GGUF.
//!
//! 20 prompts of different lengths (several longer than the 64-token step budget, so their
//! prefill is split into chunks and interleaved with other requests' decode steps) are sent at
//! once; every greedy token must match, and the first step's top-5 logprobs must agree within
//! [`LOGPROB_TOLERANCE`].
//!
//! Both sides run the GGUF with candle's `CANDLE_DEQUANTIZE_ALL=1` (weights dequantized to f32
//! at load). With the Q4_1 matmuls, candle quantizes every activation row to 8 bits per block
//! of 32, and this model's large activations turn 1e-7 differences in attention summation order
//! into logit differences of ~0.5: the oracle disagrees with itself by 0.47 between a one-shot
//! prefill and an incremental one, so no other paged/chunked implementation can match it token
//! for token over 32 steps. On f32 weights the two agree to ~1e-4 at every step.

use std::time::Instant;

use e2e::oracle::{top_k, Oracle};
use e2e::{choice_token_ids, greedy_ids_request, model_path, Agent, LONG_TEXT};
use futures::future::join_all;

const STEPS: usize = 32;
const TOP: usize = 5;
/// Observed agreement on f32 weights is ~1e-4; this leaves room for a different (but correct)
/// summation order in attention and chunked prefill, and nothing more.
const LOGPROB_TOLERANCE: f32 = 1e-3;
/// The agent's step budget: prompts longer than this are prefilled in several chunks.
const BATCHED_TOKENS: usize = 64;

fn prompts() -> Vec<String> {
    let chat = |q: &str| {
        format!(
            "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging \
             Face<|im_end|>\n<|im_start|>user\n{q}<|im_end|>\n<|im_start|>assistant\n"
        )
    };
    let words: Vec<&str> = LONG_TEXT.split(' ').collect();
    let slice = |from: usize, len: usize| words[from..from + len].join(" ");
    vec![
        "Hello".to_string(),
        "The capital of France is".to_string(),
        chat("What is the capital of France?"),
        chat("Write a haiku about the sea."),
        "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n".to_string(),
        "1, 2, 3, 5, 8, 13, 21,".to_string(),
        "Le chat est assis sur le tapis et regarde".to_string(),
        "Once upon a time, in a small village at the edge of the forest,".to_string(),
        "Q: How many legs does a spider have?\nA:".to_string(),
        "Ünïcödé and emoji 🚀 make tokenizers work hard:".to_string(),
        chat("Explain in one sentence what a KV cache is."),
        "SELECT name, COUNT(*) FROM users GROUP BY".to_string(),
        LONG_TEXT.to_string(),
        slice(0, 90),
        slice(20, 120),
        slice(60, 75),
        chat(&slice(5, 100)),
        format!(
            "Summarise the following text.\n\n{}\n\nSummary:",
            slice(30, 110)
        ),
        format!(
            "{}\n\nTranslate the first sentence into French:",
            slice(0, 40)
        ),
        "a".to_string(),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_greedy_matches_candle_quantized_llama() {
    // Inherited by the agent process; read by candle in this process when the oracle loads.
    std::env::set_var("CANDLE_DEQUANTIZE_ALL", "1");
    // The oracle keeps its KV cache in f32; so does the agent here (`--dtype float32`). The
    // default 16-bit KV storage moves first-step logprobs by ~2e-3, more than the tolerance.
    let agent = Agent::start(&[
        "--dtype",
        "float32",
        "--max-num-batched-tokens",
        &BATCHED_TOKENS.to_string(),
        "--max-num-seqs",
        "32",
        "--max-model-len",
        "1024",
    ])
    .await;

    let mut prompt_ids = Vec::new();
    for p in prompts() {
        prompt_ids.push(agent.tokenize(&p).await);
    }
    let lengths: Vec<usize> = prompt_ids.iter().map(Vec::len).collect();
    assert!(
        lengths.iter().filter(|&&n| n > 100).count() >= 4,
        "too few long prompts to exercise chunked prefill: {lengths:?}"
    );

    let bodies: Vec<_> = prompt_ids
        .iter()
        .map(|ids| {
            let mut body = greedy_ids_request(ids, STEPS);
            body["logprobs"] = TOP.into();
            body
        })
        .collect();
    let started = Instant::now();
    let responses = join_all(bodies.iter().map(|b| agent.post_ok("/v1/completions", b))).await;
    println!("agent: 20 concurrent requests in {:?}", started.elapsed());
    let health = agent.get("/health").await;
    assert_eq!(health.status, 200, "agent unhealthy after the batch");
    drop(agent);

    let path = model_path();
    let started = Instant::now();
    let expected = tokio::task::spawn_blocking(move || {
        let mut oracle = Oracle::load(&path).expect("the oracle loads the GGUF");
        prompt_ids
            .iter()
            .map(|ids| oracle.greedy(ids, STEPS).expect("oracle forward"))
            .collect::<Vec<_>>()
    })
    .await
    .expect("oracle thread");
    println!("oracle: 20 sequential decodes in {:?}", started.elapsed());

    let mut failures = Vec::new();
    for (i, (resp, want)) in responses.iter().zip(&expected).enumerate() {
        let got = choice_token_ids(resp);
        if got != want.tokens {
            failures.push(format!(
                "prompt {i} ({} tokens): tokens differ\n  agent:  {got:?}\n  oracle: {:?}",
                lengths[i], want.tokens
            ));
            continue;
        }
        let logprobs = &resp["choices"][0]["logprobs"];
        let oracle_top = top_k(&want.first_logprobs, TOP + 1);
        let chosen = logprobs["token_logprobs"][0].as_f64().unwrap_or(f64::NAN) as f32;
        let oracle_chosen = want.first_logprobs[want.tokens[0] as usize];
        if (chosen - oracle_chosen).abs() > LOGPROB_TOLERANCE || chosen.is_nan() {
            failures.push(format!(
                "prompt {i}: chosen token logprob {chosen} vs oracle {oracle_chosen}"
            ));
        }
        // `top_logprobs` is keyed by token text, so tokens with the same text collapse into one
        // entry; compare values: rank by rank when all five are there, else each must be one
        // of the oracle's top values.
        let mut got_top: Vec<f32> = logprobs["top_logprobs"][0]
            .as_object()
            .map(|m| {
                m.values()
                    .map(|v| v.as_f64().unwrap_or(f64::NAN) as f32)
                    .collect()
            })
            .unwrap_or_default();
        got_top.sort_by(|a, b| b.total_cmp(a));
        let close = |a: f32, b: f32| (a - b).abs() <= LOGPROB_TOLERANCE;
        let ok = if got_top.len() >= TOP {
            got_top
                .iter()
                .zip(&oracle_top)
                .all(|(g, (_, o))| close(*g, *o))
        } else {
            got_top.len() >= TOP - 2
                && got_top
                    .iter()
                    .all(|g| oracle_top.iter().any(|(_, o)| close(*g, *o)))
        };
        if !ok {
            failures.push(format!(
                "prompt {i}: first-step top-{TOP} logprobs {got_top:?} vs oracle {oracle_top:?} \
                 (tolerance {LOGPROB_TOLERANCE}); agent logprobs: {logprobs}"
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} prompts disagree with the oracle:\n{}",
        failures.len(),
        expected.len(),
        failures.join("\n")
    );
}
