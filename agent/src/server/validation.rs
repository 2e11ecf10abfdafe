//! Request checks and the translation of request fields into engine [`SamplingParams`], with
//! vLLM's messages and order: raw "before" validators, unsupported features, length limits
//! (reference §1: `max_tokens > max_model_len` is a 400, otherwise the output budget is clamped
//! to `max_model_len - prompt_len`), then `SamplingParams` argument checks.

use std::collections::HashMap;

use protocol::python::py_float;
use protocol::request::CommonFields;
use protocol::ApiError;
use serde_json::Value;

use crate::engine::SamplingParams;

/// vLLM's default `max_tokens` for `/v1/completions`.
pub const DEFAULT_COMPLETION_MAX_TOKENS: i64 = 16;
/// Most sequences (`n`) one request may ask for.
pub const MAX_N: i64 = 1024;
/// vLLM's `cache_salt` length limit.
const MAX_CACHE_SALT_CHARS: usize = 1024;

/// Features vLLM has and this server does not: a 400 rather than silently different output.
pub fn check_unsupported(common: &CommonFields) -> Result<(), ApiError> {
    let unsupported = |field: &str| {
        ApiError::invalid(format!("`{field}` is not supported by this server."), field)
    };
    if common.use_beam_search.is_some_and(|b| b.0) {
        return Err(unsupported("use_beam_search"));
    }
    if common.allowed_token_ids.is_some() {
        return Err(unsupported("allowed_token_ids"));
    }
    if common.bad_words.as_ref().is_some_and(|w| !w.0.is_empty()) {
        return Err(unsupported("bad_words"));
    }
    if common.logprob_token_ids.is_some() {
        return Err(unsupported("logprob_token_ids"));
    }
    if common.structured_outputs.is_some() {
        return Err(unsupported("structured_outputs"));
    }
    if let Some(format) = &common.response_format {
        if format.0.get("type").and_then(Value::as_str) != Some("text") {
            return Err(unsupported("response_format"));
        }
    }
    if let Some(salt) = &common.cache_salt {
        if salt.0.is_empty() {
            return Err(ApiError::invalid(
                "Parameter 'cache_salt' must be a non-empty string if provided.",
                "cache_salt",
            ));
        }
        if salt.0.chars().count() > MAX_CACHE_SALT_CHARS {
            return Err(ApiError::invalid(
                format!("`cache_salt` must be at most {MAX_CACHE_SALT_CHARS} characters."),
                "cache_salt",
            ));
        }
    }
    if let Some(p) = common.priority.filter(|p| p.0 != 0) {
        return Err(ApiError::bad_request(format!(
            "Got priority {} but Priority scheduling is not enabled.",
            p.0
        )));
    }
    Ok(())
}

/// The request's `prompt_logprobs`; vLLM refuses them on a stream.
pub fn prompt_logprobs(common: &CommonFields) -> Result<Option<i64>, ApiError> {
    let k = common.prompt_logprobs.map(|l| l.0);
    if common.stream() && k.is_some_and(|k| k > 0 || k == -1) {
        return Err(ApiError::invalid(
            "`prompt_logprobs` are not available when `stream=True`.",
            "prompt_logprobs",
        ));
    }
    Ok(k)
}

/// `n`, checked as `SamplingParams` does.
pub fn check_n(n: i64) -> Result<usize, ApiError> {
    if n < 1 {
        return Err(ApiError::bad_request(format!(
            "n must be at least 1, got {n}."
        )));
    }
    if n > MAX_N {
        return Err(ApiError::bad_request(format!(
            "n must be at most {MAX_N}, got {n}."
        )));
    }
    Ok(n as usize)
}

/// A requested output length above the context length is a 400 before anything is tokenized.
pub fn check_requested_max_tokens(
    requested: Option<i64>,
    param: &str,
    max_model_len: usize,
) -> Result<(), ApiError> {
    match requested {
        Some(m) if m > max_model_len as i64 => Err(ApiError::invalid_value(
            format!(
                "{param}={m} cannot be greater than max_model_len={max_model_len}. Please \
                 request fewer output tokens."
            ),
            param,
            m,
        )),
        _ => Ok(()),
    }
}

/// `truncate_prompt_tokens`: keeps the last `limit` tokens (-1: as many as fit).
pub fn truncate_prompt(
    tokens: &mut Vec<u32>,
    limit: i64,
    max_model_len: usize,
    requested_max_tokens: Option<i64>,
    max_tokens_param: &str,
) -> Result<(), ApiError> {
    let max_input = max_model_len as i64 - requested_max_tokens.unwrap_or(0).max(0);
    let keep = if limit == -1 { max_input } else { limit };
    if limit < -1 || limit == 0 {
        return Err(ApiError::invalid_value(
            format!("truncate_prompt_tokens must be an integer >= 1 or -1, got {limit}."),
            "truncate_prompt_tokens",
            limit,
        ));
    }
    if keep > max_input {
        return Err(ApiError::invalid_value(
            format!(
                "truncate_prompt_tokens={limit} cannot be greater than max_model_len - \
                 {max_tokens_param} = {max_input}. Please request a smaller truncation size."
            ),
            "truncate_prompt_tokens",
            limit,
        ));
    }
    let keep = keep.max(0) as usize;
    if tokens.len() > keep {
        tokens.drain(..tokens.len() - keep);
    }
    Ok(())
}

/// Prompt token ids: non-empty and inside the vocabulary.
pub fn check_prompt_tokens(tokens: &[u32], vocab_size: usize) -> Result<(), ApiError> {
    if tokens.is_empty() {
        return Err(ApiError::bad_request("The decoder prompt cannot be empty"));
    }
    if let Some(max) = tokens.iter().max().filter(|m| **m as usize >= vocab_size) {
        return Err(ApiError::bad_request(format!(
            "Token id {max} is out of vocabulary"
        )));
    }
    Ok(())
}

/// Raw token ids from a request, as engine ids (anything past `u32` is out of vocabulary).
pub fn token_ids(raw: &[i64], vocab_size: usize) -> Result<Vec<u32>, ApiError> {
    raw.iter()
        .map(|&id| {
            u32::try_from(id)
                .ok()
                .filter(|t| (*t as usize) < vocab_size)
                .ok_or_else(|| ApiError::bad_request(format!("Token id {id} is out of vocabulary")))
        })
        .collect()
}

/// The output budget of one prompt. A prompt that leaves no room for output is a 400; a
/// request for more than fits is clamped (vLLM 0.33).
pub fn output_budget(
    prompt_len: usize,
    requested: Option<i64>,
    max_tokens_param: &str,
    max_model_len: usize,
) -> Result<usize, ApiError> {
    if prompt_len >= max_model_len {
        return Err(ApiError::invalid_value(
            format!(
                "This model's maximum context length is {max_model_len} tokens. However, your \
                 prompt contains {prompt_len} input tokens, which leaves no room for output \
                 tokens. Please reduce the length of the input prompt."
            ),
            "input_tokens",
            prompt_len,
        ));
    }
    let room = max_model_len - prompt_len;
    match requested {
        None => Ok(room),
        Some(m) if m < 1 => Err(ApiError::invalid_value(
            format!("max_tokens must be at least 1, got {m}."),
            max_tokens_param,
            m,
        )),
        Some(m) => Ok((m as usize).min(room)),
    }
}

/// What the server checks requests against.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub vocab_size: usize,
    pub max_logprobs: usize,
}

/// `SamplingParams` for one sequence, checked in vLLM's `_verify_args` order. `logprobs` and
/// `prompt_logprobs` are the requested counts (`-1`: the whole vocabulary).
pub fn sampling_params(
    common: &CommonFields,
    max_tokens: usize,
    logprobs: Option<i64>,
    prompt_logprobs: Option<i64>,
    limits: Limits,
) -> Result<SamplingParams, ApiError> {
    let float = |f: Option<protocol::fields::LaxFloat>, default: f64| f.map_or(default, |v| v.0);
    let presence_penalty = float(common.presence_penalty, 0.0);
    let frequency_penalty = float(common.frequency_penalty, 0.0);
    let repetition_penalty = float(common.repetition_penalty, 1.0);
    let temperature = float(common.temperature, 1.0);
    let top_p = float(common.top_p, 1.0);
    let top_k = common.top_k.map_or(0, |k| k.0);
    let min_p = float(common.min_p, 0.0);
    let min_tokens = common.min_tokens.map_or(0, |m| m.0);

    if !(-2.0..=2.0).contains(&presence_penalty) {
        return Err(ApiError::bad_request(format!(
            "presence_penalty must be in [-2, 2], got {}.",
            py_float(presence_penalty)
        )));
    }
    if !(-2.0..=2.0).contains(&frequency_penalty) {
        return Err(ApiError::bad_request(format!(
            "frequency_penalty must be in [-2, 2], got {}.",
            py_float(frequency_penalty)
        )));
    }
    if !repetition_penalty.is_finite() {
        return Err(ApiError::bad_request(format!(
            "repetition_penalty must be a finite number, got {}.",
            py_float(repetition_penalty)
        )));
    }
    if repetition_penalty <= 0.0 {
        return Err(ApiError::bad_request(format!(
            "repetition_penalty must be greater than zero, got {}.",
            py_float(repetition_penalty)
        )));
    }
    if !temperature.is_finite() {
        return Err(ApiError::invalid_value(
            format!(
                "temperature must be a finite number, got {}.",
                py_float(temperature)
            ),
            "temperature",
            py_float(temperature),
        ));
    }
    if temperature < 0.0 {
        return Err(ApiError::invalid_value(
            format!(
                "temperature must be non-negative, got {}.",
                py_float(temperature)
            ),
            "temperature",
            py_float(temperature),
        ));
    }
    if !(top_p > 0.0 && top_p <= 1.0) {
        return Err(ApiError::invalid_value(
            format!("top_p must be in (0, 1], got {}.", py_float(top_p)),
            "top_p",
            py_float(top_p),
        ));
    }
    if top_k < -1 {
        return Err(ApiError::bad_request(format!(
            "top_k must be 0 (disable), or at least 1, got {top_k}."
        )));
    }
    if !(0.0..=1.0).contains(&min_p) {
        return Err(ApiError::bad_request(format!(
            "min_p must be in [0, 1], got {}.",
            py_float(min_p)
        )));
    }
    if min_tokens < 0 {
        return Err(ApiError::bad_request(format!(
            "min_tokens must be greater than or equal to 0, got {min_tokens}."
        )));
    }
    if min_tokens as usize > max_tokens {
        return Err(ApiError::bad_request(format!(
            "min_tokens must be less than or equal to max_tokens={max_tokens}, got {min_tokens}."
        )));
    }
    let logprobs = logprob_count(logprobs, "logprobs", "sample", limits)?;
    let prompt_logprobs = logprob_count(prompt_logprobs, "prompt_logprobs", "prompt", limits)?;
    let stop = common
        .stop
        .as_ref()
        .map(|s| s.0.clone())
        .unwrap_or_default();
    if stop.iter().any(String::is_empty) {
        return Err(ApiError::bad_request(
            "stop cannot contain an empty string.",
        ));
    }
    let stop_token_ids = common
        .stop_token_ids
        .as_ref()
        .map(|ids| {
            ids.0
                .iter()
                .map(|&id| {
                    u32::try_from(id).map_err(|_| {
                        ApiError::bad_request(format!(
                            "stop_token_ids must contain only non-negative integers, got {id}."
                        ))
                    })
                })
                .collect::<Result<Vec<_>, _>>()
        })
        .transpose()?
        .unwrap_or_default();
    let logit_bias = logit_bias(common, limits.vocab_size)?;

    Ok(SamplingParams {
        temperature: temperature as f32,
        top_p: top_p as f32,
        top_k: top_k.clamp(-1, i64::from(i32::MAX)) as i32,
        min_p: min_p as f32,
        repetition_penalty: repetition_penalty as f32,
        presence_penalty: presence_penalty as f32,
        frequency_penalty: frequency_penalty as f32,
        // vLLM takes any int64 seed; the engine's RNG takes its two's-complement bits.
        seed: common.seed.map(|s| s.0 as u64),
        max_tokens,
        min_tokens: min_tokens as usize,
        stop,
        stop_token_ids,
        ignore_eos: common.ignore_eos.is_some_and(|b| b.0),
        include_stop_str_in_output: common.include_stop_str_in_output.is_some_and(|b| b.0),
        logprobs,
        prompt_logprobs,
        logit_bias,
        skip_special_tokens: common.skip_special_tokens.0,
        spaces_between_special_tokens: common.spaces_between_special_tokens.0,
    })
}

/// A logprobs count (`-1`: the whole vocabulary) checked against `--max-logprobs`; `kind`
/// names it in vLLM's message ("sample" or "prompt").
fn logprob_count(
    k: Option<i64>,
    field: &str,
    kind: &str,
    limits: Limits,
) -> Result<Option<usize>, ApiError> {
    let Some(k) = k else { return Ok(None) };
    if k < -1 {
        return Err(ApiError::invalid_value(
            format!("{field} must be non-negative or -1, got {k}."),
            field,
            k,
        ));
    }
    let k = if k == -1 {
        limits.vocab_size
    } else {
        k as usize
    };
    if k > limits.max_logprobs {
        return Err(ApiError::invalid_value(
            format!(
                "Requested {kind} logprobs of {k}, which is greater than max allowed: {}",
                limits.max_logprobs
            ),
            field,
            k,
        ));
    }
    Ok(Some(k))
}

/// `logit_bias`: string keys parsed as token ids, biases clamped to [-100, 100] (OpenAI),
/// ids checked against the vocabulary.
fn logit_bias(common: &CommonFields, vocab_size: usize) -> Result<HashMap<u32, f32>, ApiError> {
    let Some(bias) = &common.logit_bias else {
        return Ok(HashMap::new());
    };
    let mut out = HashMap::new();
    let mut out_of_vocab = Vec::new();
    for (key, value) in &bias.0 {
        let id: i64 = key.trim().parse().map_err(|_| {
            ApiError::bad_request(format!(
                "invalid literal for int() with base 10: {}",
                protocol::python::py_str(key)
            ))
        })?;
        match u32::try_from(id)
            .ok()
            .filter(|t| (*t as usize) < vocab_size)
        {
            Some(t) => {
                out.insert(t, value.clamp(-100.0, 100.0) as f32);
            }
            None => out_of_vocab.push(id),
        }
    }
    if !out_of_vocab.is_empty() {
        let list = format!(
            "[{}]",
            out_of_vocab
                .iter()
                .map(i64::to_string)
                .collect::<Vec<_>>()
                .join(", ")
        );
        return Err(ApiError::invalid_value(
            format!(
                "token_id(s) {list} in logit_bias contain out-of-vocab token ids. Vocabulary \
                 size: {vocab_size}"
            ),
            "logit_bias",
            list,
        ));
    }
    Ok(out)
}

/// The engine parameters of choice `index` of a request: vLLM's `ParentRequest` gives child
/// `i` the seed `seed + i`.
pub fn child_params(params: &SamplingParams, index: usize) -> SamplingParams {
    let mut child = params.clone();
    child.seed = params.seed.map(|s| s.wrapping_add(index as u64));
    child
}

#[cfg(test)]
mod tests {
    use super::*;
    use protocol::fields::FloatDict;
    use serde_json::json;

    fn common(v: Value) -> CommonFields {
        serde_json::from_value(v).unwrap()
    }

    const LIMITS: Limits = Limits {
        vocab_size: 100,
        max_logprobs: 20,
    };

    #[test]
    fn budget_follows_reference_rules() {
        // Clamped to what is left of the context.
        assert_eq!(output_budget(90, Some(50), "max_tokens", 100).unwrap(), 10);
        assert_eq!(output_budget(10, None, "max_tokens", 100).unwrap(), 90);
        assert_eq!(output_budget(10, Some(5), "max_tokens", 100).unwrap(), 5);
        let e = output_budget(100, Some(5), "max_tokens", 100).unwrap_err();
        assert!(e.message.starts_with(
            "This model's maximum context length is 100 tokens. However, your prompt contains \
             100 input tokens"
        ));
        assert_eq!(e.param.as_deref(), Some("input_tokens"));
        let e = output_budget(10, Some(0), "max_tokens", 100).unwrap_err();
        assert_eq!(
            e.message,
            "max_tokens must be at least 1, got 0. (parameter=max_tokens, value=0)"
        );
        assert!(output_budget(10, Some(-3), "max_tokens", 100).is_err());
        let e = check_requested_max_tokens(Some(101), "max_completion_tokens", 100).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("max_completion_tokens"));
        check_requested_max_tokens(Some(100), "max_tokens", 100).unwrap();
    }

    #[test]
    fn sampling_param_ranges() {
        let err = |v: Value| {
            sampling_params(&common(v), 16, None, None, LIMITS)
                .unwrap_err()
                .message
        };
        assert_eq!(
            err(json!({"temperature": -1})),
            "temperature must be non-negative, got -1.0. (parameter=temperature, value=-1.0)"
        );
        assert!(err(json!({"top_p": 0})).starts_with("top_p must be in (0, 1], got 0.0."));
        assert!(err(json!({"top_p": 1.5})).starts_with("top_p must be in (0, 1]"));
        assert_eq!(
            err(json!({"top_k": -2})),
            "top_k must be 0 (disable), or at least 1, got -2."
        );
        assert_eq!(
            err(json!({"min_p": 1.5})),
            "min_p must be in [0, 1], got 1.5."
        );
        assert_eq!(
            err(json!({"repetition_penalty": 0})),
            "repetition_penalty must be greater than zero, got 0.0."
        );
        assert_eq!(
            err(json!({"presence_penalty": 2.5})),
            "presence_penalty must be in [-2, 2], got 2.5."
        );
        assert_eq!(
            err(json!({"frequency_penalty": -3})),
            "frequency_penalty must be in [-2, 2], got -3.0."
        );
        assert_eq!(
            err(json!({"min_tokens": 20})),
            "min_tokens must be less than or equal to max_tokens=16, got 20."
        );
        assert_eq!(
            err(json!({"stop": ["a", ""]})),
            "stop cannot contain an empty string."
        );
        assert!(err(json!({"logit_bias": {"500": 1}})).contains("out-of-vocab"));
        assert!(err(json!({"logit_bias": {"x": 1}})).starts_with("invalid literal for int()"));
        assert!(err(json!({"temperature": "nan"})).starts_with("temperature must be a finite"));
    }

    #[test]
    fn sampling_params_translation() {
        let mut c = common(
            json!({"temperature": 0, "top_k": -1, "seed": -1, "stop": "x",
                                  "stop_token_ids": [5], "ignore_eos": true}),
        );
        c.logit_bias = Some(FloatDict(vec![("7".into(), 500.0)]));
        let p = sampling_params(&c, 10, Some(3), None, LIMITS).unwrap();
        assert_eq!(p.temperature, 0.0);
        assert_eq!(p.top_k, -1);
        assert_eq!(p.seed, Some(u64::MAX));
        assert_eq!(p.stop, vec!["x".to_string()]);
        assert_eq!(p.stop_token_ids, vec![5]);
        assert!(p.ignore_eos);
        assert_eq!(p.logprobs, Some(3));
        assert_eq!(p.logit_bias.get(&7), Some(&100.0));
        assert_eq!(p.max_tokens, 10);
        assert_eq!(child_params(&p, 2).seed, Some(1));
        let e = sampling_params(&common(json!({})), 10, Some(21), None, LIMITS).unwrap_err();
        assert_eq!(
            e.message,
            "Requested sample logprobs of 21, which is greater than max allowed: 20 \
             (parameter=logprobs, value=21)"
        );
        assert!(sampling_params(&common(json!({})), 10, Some(-1), None, LIMITS).is_err());
        let p = sampling_params(&common(json!({})), 10, None, Some(0), LIMITS).unwrap();
        assert_eq!((p.logprobs, p.prompt_logprobs), (None, Some(0)));
        let e = sampling_params(&common(json!({})), 10, None, Some(30), LIMITS).unwrap_err();
        assert!(e
            .message
            .starts_with("Requested prompt logprobs of 30, which is greater than max allowed"));
        let defaults = sampling_params(&common(json!({})), 10, None, None, LIMITS).unwrap();
        assert_eq!(defaults.temperature, 1.0);
        assert!(defaults.skip_special_tokens);
    }

    #[test]
    fn unsupported_features_are_refused() {
        assert!(check_unsupported(&common(json!({"use_beam_search": true}))).is_err());
        assert!(
            check_unsupported(&common(json!({"response_format": {"type": "json_object"}})))
                .is_err()
        );
        check_unsupported(&common(json!({"response_format": {"type": "text"}}))).unwrap();
        assert!(check_unsupported(&common(json!({"cache_salt": ""}))).is_err());
        assert!(check_unsupported(&common(json!({"priority": 1}))).is_err());
        check_unsupported(&common(json!({"priority": 0, "bad_words": []}))).unwrap();
    }

    #[test]
    fn prompt_tokens_and_truncation() {
        assert!(check_prompt_tokens(&[], 10).is_err());
        assert_eq!(
            check_prompt_tokens(&[1, 12, 3], 10).unwrap_err().message,
            "Token id 12 is out of vocabulary"
        );
        assert!(token_ids(&[1, -1], 10).is_err());
        assert_eq!(token_ids(&[1, 9], 10).unwrap(), vec![1, 9]);
        let mut t = vec![1, 2, 3, 4, 5];
        truncate_prompt(&mut t, 2, 100, Some(16), "max_tokens").unwrap();
        assert_eq!(t, vec![4, 5]);
        let mut t = vec![1, 2, 3];
        assert!(truncate_prompt(&mut t, 90, 100, Some(16), "max_tokens").is_err());
        assert!(truncate_prompt(&mut t, 0, 100, None, "max_tokens").is_err());
        truncate_prompt(&mut t, -1, 100, None, "max_tokens").unwrap();
        assert_eq!(t, vec![1, 2, 3]);
    }

    #[test]
    fn n_limits() {
        assert_eq!(
            check_n(0).unwrap_err().message,
            "n must be at least 1, got 0."
        );
        assert_eq!(check_n(3).unwrap(), 3);
        assert!(check_n(MAX_N + 1).is_err());
    }
}
