//! What the two generation endpoints' responses share: the request id and vLLM's usage rules
//! (`stream_options`, `--enable-force-include-usage`, `--enable-prompt-tokens-details`, where
//! the `system_fingerprint` goes in a stream), and the engine's stop reason on the wire.

use axum::http::HeaderMap;
use protocol::fields::Str;
use protocol::request::StreamOptions;
use protocol::response::{PromptTokensDetails, StopReasonWire};

use crate::engine::StopReason;

use super::state::AppState;

impl From<&StopReason> for StopReasonWire {
    fn from(r: &StopReason) -> Self {
        match r {
            StopReason::Token(t) => Self::Token(*t),
            StopReason::Text(s) => Self::Text(s.clone()),
        }
    }
}

/// The id a response is built on: the `X-Request-Id` header, else the body's `request_id`,
/// else a random UUID (hex, as vLLM's `random_uuid`).
pub fn request_id_base(headers: &HeaderMap, body_request_id: Option<&Str>) -> String {
    headers
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
        .or_else(|| body_request_id.map(|s| s.0.clone()))
        .unwrap_or_else(|| uuid::Uuid::new_v4().simple().to_string())
}

/// How usage is reported for one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UsagePolicy {
    /// A final chunk with `choices: []` and `usage` (streaming).
    pub include: bool,
    /// `usage` on every chunk (streaming).
    pub continuous: bool,
    /// `prompt_tokens_details.cached_tokens` is filled.
    pub prompt_details: bool,
}

impl UsagePolicy {
    /// vLLM's `should_include_usage`: `--enable-force-include-usage` turns on both; otherwise
    /// `stream_options` decides (its `include_usage` defaults to true when the object is sent).
    pub fn new(state: &AppState, stream_options: Option<&StreamOptions>) -> Self {
        let (include, continuous) = if state.config.enable_force_include_usage {
            (true, true)
        } else if let Some(options) = stream_options {
            let include = options.include_usage.is_some_and(|b| b.0);
            let continuous = include && options.continuous_usage_stats.is_some_and(|b| b.0);
            (include, continuous)
        } else {
            (false, false)
        };
        Self {
            include,
            continuous,
            prompt_details: state.config.enable_prompt_tokens_details,
        }
    }

    /// `prompt_tokens_details` for `cached` prompt tokens, when enabled.
    pub fn details(&self, cached: Option<usize>) -> Option<PromptTokensDetails> {
        cached
            .filter(|_| self.prompt_details)
            .map(|cached_tokens| PromptTokensDetails { cached_tokens })
    }

    /// A stream stamps the fingerprint on its finishing chunks unless a usage chunk (which
    /// carries it) follows.
    pub fn fingerprint_on_finish(
        &self,
        finished: bool,
        fingerprint: &Option<String>,
    ) -> Option<String> {
        if finished && !self.include {
            fingerprint.clone()
        } else {
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::server::test_support::{test_config, test_state};
    use protocol::fields::LaxBool;

    #[test]
    fn stop_reasons_keep_their_kind() {
        assert_eq!(
            StopReasonWire::from(&StopReason::Token(2)),
            StopReasonWire::Token(2)
        );
        assert_eq!(
            StopReasonWire::from(&StopReason::Text("\n".into())),
            StopReasonWire::Text("\n".into())
        );
    }

    #[test]
    fn usage_policy_follows_vllm() {
        let (state, _rx) = test_state(test_config(), true);
        let opts = |include: Option<bool>, continuous: Option<bool>| StreamOptions {
            include_usage: include.map(LaxBool),
            continuous_usage_stats: continuous.map(LaxBool),
        };
        let p = UsagePolicy::new(&state, None);
        assert!(!p.include && !p.continuous);
        let p = UsagePolicy::new(&state, Some(&opts(Some(true), None)));
        assert!(p.include && !p.continuous);
        let p = UsagePolicy::new(&state, Some(&opts(Some(false), Some(true))));
        assert!(!p.include && !p.continuous);
        let p = UsagePolicy::new(&state, Some(&opts(Some(true), Some(true))));
        assert!(p.include && p.continuous);
        assert_eq!(p.details(Some(3)), None);
        assert_eq!(p.fingerprint_on_finish(true, &Some("f".into())), None);

        let mut config = test_config();
        config.enable_force_include_usage = true;
        config.enable_prompt_tokens_details = true;
        let (state, _rx) = test_state(config, true);
        let p = UsagePolicy::new(&state, None);
        assert!(p.include && p.continuous);
        assert_eq!(
            p.details(Some(3)),
            Some(PromptTokensDetails { cached_tokens: 3 })
        );
    }

    #[test]
    fn request_id_sources() {
        let mut h = HeaderMap::new();
        let body = Str("body-id".into());
        assert_eq!(request_id_base(&h, Some(&body)), "body-id");
        assert_eq!(request_id_base(&h, None).len(), 32);
        h.insert("x-request-id", "hdr".parse().unwrap());
        assert_eq!(request_id_base(&h, Some(&body)), "hdr");
    }
}
