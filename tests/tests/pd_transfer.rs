//! Issue 19: prefill/decode disaggregation between real agents over real UCX on loopback.
//! Greedy output through a prefill pod and a decode pod equals the aggregated output, with the
//! decode pod computing at most the last partial block, over tcp and over shared memory; a
//! prefill pod killed mid-run costs local prefills, not failures; unread pinned blocks are freed
//! when their lease lapses; bad `kv_transfer_params` give a local prefill; nothing leaks.

use std::time::Duration;

use e2e::{choice_token_ids, free_port, greedy_all, greedy_ids_request, Agent, Launch, LONG_TEXT};
use serde_json::{json, Value};

const MAX_TOKENS: usize = 12;
const BLOCK: usize = 16;

/// A prefill (`kv_producer`) and a decode (`kv_consumer`) agent on `tls`, plus a plain one.
struct Pods {
    prefill: Option<Agent>,
    decode: Agent,
    plain: Agent,
}

async fn pods(tls: &str, extra_config: Value) -> Pods {
    let env = |port: u16| Launch {
        env: vec![
            ("UCX_TLS".into(), tls.into()),
            ("UCX_NET_DEVICES".into(), "lo".into()),
            ("VLLM_NIXL_SIDE_CHANNEL_HOST".into(), "127.0.0.1".into()),
            (
                "VLLM_NIXL_SIDE_CHANNEL_PORT".into(),
                port.to_string().into(),
            ),
        ],
        ..Launch::default()
    };
    let config = |role: &str| {
        json!({"kv_connector": "NixlConnector", "kv_role": role, "engine_id": role,
               "kv_connector_extra_config": extra_config})
        .to_string()
    };
    let (p, d) = (config("kv_producer"), config("kv_consumer"));
    let details = "--enable-prompt-tokens-details";
    let (p_env, d_env) = (env(free_port()), env(free_port()));
    let (p_args, d_args) = (
        ["--kv-transfer-config", &p],
        ["--kv-transfer-config", &d, details],
    );
    let (prefill, decode, plain) = tokio::join!(
        Agent::launch(&p_env, &p_args),
        Agent::launch(&d_env, &d_args),
        Agent::start(&[]),
    );
    Pods {
        prefill: Some(prefill),
        decode,
        plain,
    }
}

impl Pods {
    fn prefill(&self) -> &Agent {
        self.prefill.as_ref().expect("the prefill pod is running")
    }

    /// One request through the decode pod with the prefill pod named in llm-d's header.
    async fn disaggregated(&self, body: &Value) -> Value {
        let host_port = format!("127.0.0.1:{}", self.prefill_port());
        let resp = self
            .decode
            .client()
            .post(self.decode.url("/v1/completions"))
            .header("x-prefiller-host-port", host_port)
            .json(body)
            .send()
            .await
            .expect("decode pod answers");
        assert_eq!(resp.status().as_u16(), 200);
        resp.json().await.expect("a JSON body")
    }

    fn prefill_port(&self) -> u16 {
        self.prefill.as_ref().map_or(1, Agent::port)
    }

    /// Neither pod holds a block any more (the prefill pod's pins all released).
    async fn assert_no_leak(&self) {
        let idle = Duration::from_secs(20);
        self.decode.wait_idle(idle).await;
        if let Some(p) = &self.prefill {
            let m = p.wait_idle(idle).await;
            assert_eq!(m.value("agent_kv_transfer_pinned_blocks"), 0.0);
        }
    }
}

/// 20 prompts of 40 to 211 tokens, most not a whole number of blocks.
async fn prompts(agent: &Agent) -> Vec<Vec<u32>> {
    let ids = agent.tokenize(LONG_TEXT).await;
    (0..20)
        .map(|i| {
            let start = i * 7 % 20;
            ids[start..start + 40 + i * 9].to_vec()
        })
        .collect()
}

async fn same_output_as_aggregated(tls: &str) {
    let pods = pods(tls, json!({})).await;
    let prompts = prompts(&pods.plain).await;
    let aggregated = greedy_all(&pods.plain, &prompts, MAX_TOKENS).await;
    let bodies: Vec<Value> = prompts
        .iter()
        .map(|p| greedy_ids_request(p, MAX_TOKENS))
        .collect();
    let split = futures::future::join_all(bodies.iter().map(|b| pods.disaggregated(b))).await;
    for (i, (s, a)) in split.iter().zip(&aggregated).enumerate() {
        assert_eq!(
            choice_token_ids(s),
            choice_token_ids(a),
            "prompt {i} over {tls}"
        );
        // Everything but the block holding the last prompt token came from elsewhere.
        let len = prompts[i].len();
        let cached = s["usage"]["prompt_tokens_details"]["cached_tokens"]
            .as_u64()
            .unwrap_or(0) as usize;
        assert_eq!(
            cached,
            (len - 1) / BLOCK * BLOCK,
            "prompt {i} ({len} tokens) over {tls}"
        );
    }
    let m = pods.decode.metrics().await;
    assert_eq!(m.value("vllm:nixl_xfer_time_seconds_count"), 20.0, "{tls}");
    assert_eq!(m.value("vllm:nixl_num_failed_transfers_total"), 0.0);
    assert_eq!(
        m.value("agent_kv_transfer_local_prefill_fallbacks_total"),
        0.0
    );
    // The decode pod computed only the tails: at most one block per prompt.
    let pulled: usize = prompts.iter().map(|p| (p.len() - 1) / BLOCK * BLOCK).sum();
    let total: usize = prompts.iter().map(Vec::len).sum();
    assert_eq!(
        m.value("vllm:external_prefix_cache_hits_total"),
        pulled as f64
    );
    assert!(total - pulled <= 20 * BLOCK);
    pods.assert_no_leak().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disaggregated_output_equals_aggregated_over_tcp() {
    same_output_as_aggregated("tcp").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disaggregated_output_equals_aggregated_over_shared_memory() {
    same_output_as_aggregated("shm,tcp").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_prefill_pod_killed_mid_run_costs_local_prefills_not_failures() {
    let mut pods = pods("tcp", json!({})).await;
    let prompts = prompts(&pods.plain).await;
    let aggregated = greedy_all(&pods.plain, &prompts, MAX_TOKENS).await;
    let bodies: Vec<Value> = prompts
        .iter()
        .map(|p| greedy_ids_request(p, MAX_TOKENS))
        .collect();
    let host_port = format!("127.0.0.1:{}", pods.prefill_port());
    let sends = bodies.iter().map(|b| {
        let decode = &pods.decode;
        let host_port = host_port.clone();
        async move {
            decode
                .client()
                .post(decode.url("/v1/completions"))
                .header("x-prefiller-host-port", host_port)
                .json(b)
                .send()
                .await
        }
    });
    let all = futures::future::join_all(sends);
    let kill = async {
        tokio::time::sleep(Duration::from_millis(400)).await;
        pods.prefill.take();
    };
    let (replies, ()) = tokio::join!(all, kill);
    for (i, (r, a)) in replies.into_iter().zip(&aggregated).enumerate() {
        let r = r.expect("the decode pod answers");
        assert_eq!(r.status().as_u16(), 200, "request {i}");
        let body: Value = r.json().await.expect("JSON");
        assert_eq!(choice_token_ids(&body), choice_token_ids(a), "request {i}");
    }
    let m = pods.decode.metrics().await;
    let fell_back = m.value("agent_kv_transfer_prefill_leg_failures_total")
        + m.value("agent_kv_transfer_local_prefill_fallbacks_total");
    assert!(
        fell_back > 0.0,
        "the kill came after every request was done"
    );
    pods.assert_no_leak().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unread_pinned_blocks_are_freed_when_the_lease_lapses() {
    let pods = pods("tcp", json!({"kv_lease_duration": 1})).await;
    let prompt = prompts(&pods.plain).await.swap_remove(10);
    let mut leg = greedy_ids_request(&prompt, 1);
    leg["kv_transfer_params"] = json!({"do_remote_decode": true, "do_remote_prefill": false});
    let answer = pods.prefill().post_ok("/v1/completions", &leg).await;
    let params = answer["kv_transfer_params"].clone();
    let blocks = params["remote_block_ids"].as_array().map_or(0, Vec::len);
    assert_eq!(blocks, prompt.len() / BLOCK, "{params}");
    let m = pods.prefill().metrics().await;
    assert_eq!(m.value("agent_kv_transfer_pinned_blocks"), blocks as f64);
    assert!(m.value("vllm:kv_cache_usage_perc") > 0.0);
    // Nobody reads them: a second later they are free.
    let m = pods.prefill().wait_idle(Duration::from_secs(10)).await;
    assert_eq!(m.value("vllm:nixl_num_kv_expired_reqs_total"), 1.0);
    assert_eq!(m.value("agent_kv_transfer_pinned_blocks"), 0.0);
    // A decode leg that comes too late prefills locally, with the same output.
    let mut late = greedy_ids_request(&prompt, MAX_TOKENS);
    late["kv_transfer_params"] = params;
    let out = pods.decode.post_ok("/v1/completions", &late).await;
    let want = pods
        .plain
        .post_ok("/v1/completions", &greedy_ids_request(&prompt, MAX_TOKENS))
        .await;
    assert_eq!(choice_token_ids(&out), choice_token_ids(&want));
    let m = pods.decode.metrics().await;
    assert_eq!(
        m.value("agent_kv_transfer_local_prefill_fallbacks_total"),
        1.0
    );
    pods.assert_no_leak().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_kv_transfer_params_give_a_local_prefill() {
    let pods = pods("tcp", json!({})).await;
    let prompt = prompts(&pods.plain).await.swap_remove(12);
    let want = choice_token_ids(
        &pods
            .plain
            .post_ok("/v1/completions", &greedy_ids_request(&prompt, MAX_TOKENS))
            .await,
    );
    let mut leg = greedy_ids_request(&prompt, 1);
    leg["kv_transfer_params"] = json!({"do_remote_decode": true});
    let good = pods.prefill().post_ok("/v1/completions", &leg).await["kv_transfer_params"].clone();
    let dead_port = free_port();
    let variants = [
        ("remote_engine_id", json!("nobody")),
        ("remote_block_ids", json!([3, 2, 1])),
        ("remote_block_ids", json!([9999999])),
        ("remote_block_ids", json!("1,2")),
        ("remote_request_id", json!("never-prefilled")),
        ("remote_port", json!(dead_port)),
        ("remote_host", json!("no-such-host.invalid")),
    ];
    for (i, (key, value)) in variants.iter().enumerate() {
        let mut params = good.clone();
        params[*key] = value.clone();
        let mut body = greedy_ids_request(&prompt, MAX_TOKENS);
        body["kv_transfer_params"] = params;
        let out = pods.decode.post_ok("/v1/completions", &body).await;
        assert_eq!(choice_token_ids(&out), want, "{key} = {value}");
        let m = pods.decode.metrics().await;
        assert_eq!(
            m.value("agent_kv_transfer_local_prefill_fallbacks_total"),
            (i + 1) as f64,
            "{key} = {value}"
        );
        // Local prefills fill the decode pod's own cache: start clean for the next one.
        let reset = pods.decode.post("/reset_prefix_cache", &json!({})).await;
        assert_eq!(reset.status, 200);
    }
    // The good params still work after all that (the blocks were never released).
    let mut body = greedy_ids_request(&prompt, MAX_TOKENS);
    body["kv_transfer_params"] = good;
    let out = pods.decode.post_ok("/v1/completions", &body).await;
    assert_eq!(choice_token_ids(&out), want);
    assert_eq!(
        pods.decode
            .metrics()
            .await
            .value("vllm:nixl_xfer_time_seconds_count"),
        1.0
    );
    pods.assert_no_leak().await;
}
