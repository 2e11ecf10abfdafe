//! The fuzz targets: per decoder, seeds (valid inputs of each shape we know), the tokens its
//! format is made of, and a check that panics when an invariant breaks.

use std::sync::OnceLock;

use kvevents::{
    decode_batch, decode_seq, encode_batch, encode_seq, parse_replay_request, BlockRemoved,
    BlockStored, Encoding, EventBatch, ExternalBlockHash, ExtraKey, KvEvent, ReplayReply,
};
use protocol::body::{request_object, WireRequest};
use protocol::request::{
    ChatCompletionRequest, CompletionRequest, DetokenizeRequest, TokenizeRequest,
};
use protocol::ApiError;
use router::config::EndpointPickerConfig;
use router::index::{IndexConfig, PrefixIndex};

/// What a check made of an input: a decoder accepted it (it is kept for further mutation) or
/// refused it cleanly.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Accepted,
    Rejected,
}

pub struct Target {
    pub name: &'static str,
    pub seeds: fn() -> Vec<Vec<u8>>,
    pub dictionary: &'static [&'static [u8]],
    pub check: fn(&[u8]) -> Verdict,
    pub max_len: usize,
}

pub const TARGETS: &[Target] = &[
    Target {
        name: "kv_event_batch",
        seeds: batch_seeds,
        dictionary: &[
            b"BlockStored",
            b"BlockRemoved",
            b"AllBlocksCleared",
            b"block_hashes",
            b"parent_block_hash",
            b"token_ids",
            b"extra_keys",
            b"medium",
            b"\xa3GPU",
            b"\x93",
            b"\xc0",
        ],
        check: check_batch,
        max_len: 4096,
    },
    Target {
        name: "replay_frames",
        seeds: frame_seeds,
        dictionary: &[
            b"\x00",
            b"\x08\xff\xff\xff\xff\xff\xff\xff\xff",
            b"\x08\0\0\0\0\0\0\0\x01",
        ],
        check: check_frames,
        max_len: 1024,
    },
    Target {
        name: "openai_request",
        seeds: request_seeds,
        dictionary: &[
            b"\"prompt\"",
            b"\"messages\"",
            b"\"role\"",
            b"\"content\"",
            b"\"model\"",
            b"\"max_tokens\"",
            b"\"n\"",
            b"\"logprobs\"",
            b"\"top_logprobs\"",
            b"\"stream\"",
            b"\"stream_options\"",
            b"\"tools\"",
            b"\"tool_choice\"",
            b"\"truncate_prompt_tokens\"",
            b"\"cache_salt\"",
            b"\"kv_transfer_params\"",
            b"\"add_special_tokens\"",
            b"\"response_format\"",
            b"null",
            b"true",
            b"1e400",
            b"-1",
            b"18446744073709551616",
            b"[]",
            b"{}",
            b"\"\\ud800\"",
        ],
        check: check_request,
        max_len: 4096,
    },
    Target {
        name: "router_yaml",
        seeds: yaml_seeds,
        dictionary: &[
            b"plugins:",
            b"schedulingProfiles:",
            b"- type: ",
            b"pluginRef: ",
            b"weight: ",
            b"parameters: ",
            b"precise-prefix-cache-scorer",
            b"load-aware-scorer",
            b"max-score-picker",
            b"indexerConfig:",
            b"blockSize: ",
            b"tierWeights:",
            b"maxBlocksPerPod: ",
            b"&a ",
            b"*a",
            b"!!binary ",
            b"~",
            b".nan",
            b"-.inf",
            b"1e999",
        ],
        check: check_yaml,
        max_len: 4096,
    },
];

pub fn target(name: &str) -> Option<&'static Target> {
    TARGETS.iter().find(|t| t.name == name)
}

// ---- KV event batches -------------------------------------------------------------------

fn sample_batches() -> Vec<EventBatch> {
    let stored = |hashes: Vec<ExternalBlockHash>, parent, extra| {
        KvEvent::BlockStored(BlockStored {
            token_ids: (0..hashes.len() as u32 * 4).collect(),
            block_hashes: hashes,
            parent_block_hash: parent,
            block_size: 4,
            lora_id: None,
            medium: Some("GPU".into()),
            lora_name: None,
            extra_keys: extra,
            group_idx: None,
        })
    };
    vec![
        EventBatch {
            ts: 1.7e9,
            events: vec![
                stored(
                    vec![ExternalBlockHash::Int(1), ExternalBlockHash::Int(u64::MAX)],
                    None,
                    None,
                ),
                KvEvent::BlockRemoved(BlockRemoved {
                    block_hashes: vec![ExternalBlockHash::Int(1)],
                    medium: Some("CPU".into()),
                    group_idx: Some(0),
                }),
            ],
            data_parallel_rank: None,
        },
        EventBatch {
            ts: 0.5,
            events: vec![
                stored(
                    vec![ExternalBlockHash::Bytes(vec![7; 32])],
                    Some(ExternalBlockHash::Bytes(vec![1; 32])),
                    Some(vec![Some(vec![
                        ExtraKey::Str("salt".into()),
                        ExtraKey::Int(-3),
                        ExtraKey::Bytes(vec![9]),
                    ])]),
                ),
                KvEvent::AllBlocksCleared,
                KvEvent::Unknown("BlockMoved".into()),
            ],
            data_parallel_rank: Some(3),
        },
        EventBatch {
            ts: 0.0,
            events: vec![],
            data_parallel_rank: None,
        },
    ]
}

fn batch_seeds() -> Vec<Vec<u8>> {
    let mut seeds = Vec::new();
    for b in sample_batches() {
        seeds.push(encode_batch(&b, Encoding::Map));
        seeds.push(encode_batch(&b, Encoding::Array));
    }
    seeds
}

/// The router's index, small, shared by all inputs: applying any decoded batch must not panic
/// and must keep its bounds.
fn index() -> &'static PrefixIndex {
    static INDEX: OnceLock<PrefixIndex> = OnceLock::new();
    INDEX.get_or_init(|| {
        let mut cfg = IndexConfig::new("fuzz");
        cfg.block_size = 4;
        cfg.max_keys = 1024;
        cfg.max_blocks_per_pod = 512;
        cfg.shards = 4;
        PrefixIndex::new(cfg).expect("a valid index config")
    })
}

/// Bit-exact `ts`, so a NaN compares equal to itself.
fn same(a: &EventBatch, b: &EventBatch) -> bool {
    let strip = |x: &EventBatch| EventBatch {
        ts: 0.0,
        ..x.clone()
    };
    a.ts.to_bits() == b.ts.to_bits() && strip(a) == strip(b)
}

fn check_batch(bytes: &[u8]) -> Verdict {
    let Ok(batch) = decode_batch(bytes) else {
        return Verdict::Rejected;
    };
    for encoding in [Encoding::Map, Encoding::Array] {
        let again = decode_batch(&encode_batch(&batch, encoding)).unwrap_or_else(|e| {
            panic!("{encoding:?} re-encoding of {batch:?} does not decode: {e}")
        });
        assert!(
            same(&again, &batch),
            "{encoding:?} round trip changed {batch:?} into {again:?}"
        );
    }
    let index = index();
    index.apply_batch("fuzz-pod", &batch);
    let stats = index.stats();
    assert!(
        stats.keys <= 1024 + 4,
        "key table over its bound: {stats:?}"
    );
    assert!(
        stats.engine_hashes <= 512,
        "pod over its block bound: {stats:?}"
    );
    Verdict::Accepted
}

// ---- Replay frames ----------------------------------------------------------------------

/// An input as frames: each is one length byte, then that many bytes (cut at the end).
fn frames_of(bytes: &[u8]) -> Vec<&[u8]> {
    let mut frames = Vec::new();
    let mut rest = bytes;
    while let Some((&len, tail)) = rest.split_first() {
        let n = (len as usize).min(tail.len());
        frames.push(&tail[..n]);
        rest = &tail[n..];
    }
    frames
}

fn framed(frames: &[&[u8]]) -> Vec<u8> {
    let mut out = Vec::new();
    for f in frames {
        out.push(f.len().min(255) as u8);
        out.extend_from_slice(&f[..f.len().min(255)]);
    }
    out
}

fn frame_seeds() -> Vec<Vec<u8>> {
    let payload = encode_batch(&sample_batches()[0], Encoding::Map);
    let payload = &payload[..payload.len().min(255)];
    vec![
        framed(&[b"", &encode_seq(5)]),
        framed(&[b"", &encode_seq(0), payload]),
        framed(&[b"", &kvevents::REPLAY_END_SEQ.to_be_bytes(), b""]),
        framed(&[b"kv@10.0.0.1:8000@m", &encode_seq(9), payload]),
    ]
}

fn check_frames(bytes: &[u8]) -> Verdict {
    let frames = frames_of(bytes);
    let mut verdict = Verdict::Rejected;
    if let Some(start) = parse_replay_request(&frames) {
        assert!(frames.len() == 2 && frames[0].is_empty() && frames[1] == encode_seq(start));
        verdict = Verdict::Accepted;
    }
    match ReplayReply::from_frames(&frames) {
        Some(ReplayReply::End) => {
            assert_eq!(frames[1], kvevents::REPLAY_END_SEQ.to_be_bytes());
            verdict = Verdict::Accepted;
        }
        Some(ReplayReply::Batch { seq, payload }) => {
            assert!(frames.len() == 3 && frames[0].is_empty());
            assert_eq!(frames[1], encode_seq(seq));
            assert_ne!(seq as i64, kvevents::REPLAY_END_SEQ);
            assert_eq!(payload, frames[2]);
            check_batch(payload);
            verdict = Verdict::Accepted;
        }
        None => {}
    }
    // A live message: topic, seq, payload.
    if let [_, seq, payload] = frames.as_slice() {
        if let Some(s) = decode_seq(seq) {
            assert_eq!(encode_seq(s), **seq);
            check_batch(payload);
            verdict = Verdict::Accepted;
        }
    }
    verdict
}

// ---- OpenAI requests --------------------------------------------------------------------

fn request_seeds() -> Vec<Vec<u8>> {
    [
        r#"{"model": "m", "prompt": "Hello, my name is", "max_tokens": 8, "temperature": 0}"#,
        r#"{"model": "m", "prompt": [1, 2, 3], "n": 2, "logprobs": 3, "echo": true, "stop": ["\n"]}"#,
        r#"{"prompt": ["a", "b"], "stream": true, "stream_options": {"include_usage": true}, "seed": 7}"#,
        r#"{"prompt": "x", "truncate_prompt_tokens": 4, "cache_salt": "s", "kv_transfer_params": {"do_remote_decode": true}}"#,
        r#"{"model": "m", "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}], "max_completion_tokens": 5}"#,
        r#"{"messages": [{"role": "user", "content": [{"type": "text", "text": "Hi"}]}], "logprobs": true, "top_logprobs": 2}"#,
        r#"{"messages": [{"role": "user", "content": "weather?"}], "tools": [{"type": "function", "function": {"name": "get", "parameters": {"type": "object"}}}], "tool_choice": "auto", "parallel_tool_calls": false}"#,
        r#"{"messages": [{"role": "assistant", "content": null, "tool_calls": [{"id": "1", "type": "function", "function": {"name": "get", "arguments": "{}"}}]}, {"role": "tool", "tool_call_id": "1", "content": "sunny"}], "add_generation_prompt": false, "continue_final_message": true}"#,
        r#"{"model": "m", "prompt": "tokenize me", "add_special_tokens": false}"#,
        r#"{"model": "m", "tokens": [1, 2, 3]}"#,
        r#"{"prompt": "x", "response_format": {"type": "json_object"}, "logit_bias": {"1": -100}, "best_of": 2}"#,
    ]
    .iter()
    .map(|s| s.as_bytes().to_vec())
    .collect()
}

/// The default model's text side when installed; the request target checks the router's
/// prompt extraction with it.
fn preprocessor() -> Option<&'static prompt::Preprocessor> {
    static MODEL: OnceLock<Option<prompt::Preprocessor>> = OnceLock::new();
    MODEL
        .get_or_init(|| {
            let path = std::env::var_os("FUZZ_MODEL").map_or_else(
                || {
                    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                        .join("../models/SmolLM2-135M-Instruct.Q4_1.gguf")
                },
                Into::into,
            );
            path.is_file().then(|| prompt::load(&path).ok()).flatten()
        })
        .as_ref()
}

/// A refusal must be a client error in vLLM's shape.
fn client_error(e: &ApiError, what: &str) {
    assert!(
        e.status.is_client_error(),
        "{what}: {} {}",
        e.status,
        e.message
    );
    assert!(
        e.to_json().starts_with("{\"error\":"),
        "{what}: {}",
        e.to_json()
    );
}

fn parsed<T: WireRequest>(obj: &serde_json::Map<String, serde_json::Value>, what: &str) -> Verdict {
    match T::from_json(obj) {
        Ok(_) => Verdict::Accepted,
        Err(e) => {
            client_error(&e, what);
            Verdict::Rejected
        }
    }
}

fn check_request(bytes: &[u8]) -> Verdict {
    let obj = match request_object(bytes) {
        Ok(obj) => obj,
        Err(e) => {
            client_error(&e, "request_object");
            return Verdict::Rejected;
        }
    };
    let verdicts = [
        parsed::<CompletionRequest>(&obj, "completion"),
        parsed::<ChatCompletionRequest>(&obj, "chat"),
        parsed::<TokenizeRequest>(&obj, "tokenize"),
        parsed::<DetokenizeRequest>(&obj, "detokenize"),
    ];
    for (check, what) in [
        (
            protocol::raw::check_completion_raw as fn(&_) -> _,
            "completion raw",
        ),
        (protocol::raw::check_chat_raw, "chat raw"),
    ] {
        if let Err(e) = check(&obj) {
            client_error(&e, what);
        }
    }
    if let Some(p) = preprocessor() {
        // The router's prompt extraction: whatever the body, an answer or None, never a panic.
        for endpoint in [
            prompt::Endpoint::Completions,
            prompt::Endpoint::ChatCompletions,
        ] {
            let _ = p.prompt(endpoint, &obj, 512);
        }
    }
    if verdicts.contains(&Verdict::Accepted) {
        Verdict::Accepted
    } else {
        Verdict::Rejected
    }
}

// ---- Router YAML ------------------------------------------------------------------------

fn yaml_seeds() -> Vec<Vec<u8>> {
    let mut seeds: Vec<Vec<u8>> = [
        router::config::Policy::PrefixAware,
        router::config::Policy::LoadAware,
        router::config::Policy::RoundRobin,
        router::config::Policy::Random,
    ]
    .into_iter()
    .map(|p| p.yaml().into_bytes())
    .collect();
    seeds.push(include_bytes!("../../router/testdata/endpoint-picker.yaml").to_vec());
    seeds
}

fn check_yaml(bytes: &[u8]) -> Verdict {
    let Ok(text) = std::str::from_utf8(bytes) else {
        return Verdict::Rejected;
    };
    let Ok(cfg) = EndpointPickerConfig::from_yaml(text) else {
        return Verdict::Rejected;
    };
    let mut verdict = Verdict::Rejected;
    for profile in [None, Some("default")] {
        if let Ok(s) = cfg.resolve(profile, "m", 16) {
            // What resolves must build: the index takes its settings as they are.
            let _ = PrefixIndex::new(s.index.clone());
            verdict = Verdict::Accepted;
        }
    }
    verdict
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_seed_is_accepted() {
        for t in TARGETS {
            for (i, seed) in (t.seeds)().iter().enumerate() {
                assert_eq!((t.check)(seed), Verdict::Accepted, "{} seed {i}", t.name);
                assert!(seed.len() <= t.max_len, "{} seed {i} too long", t.name);
            }
        }
    }

    #[test]
    fn frames_round_trip() {
        let frames: [&[u8]; 3] = [b"", b"12345678", b"p"];
        assert_eq!(frames_of(&framed(&frames)), frames);
        assert_eq!(frames_of(&[5, 1, 2]), vec![&[1u8, 2][..]]);
    }
}
