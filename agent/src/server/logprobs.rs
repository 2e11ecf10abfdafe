//! Engine logprobs → the completions and chat `logprobs` objects, as vLLM builds them.
//!
//! vLLM keeps, per generated token, a dict `{token_id: logprob}` with the sampled token first
//! and then the top-k in rank order (the sampled token appears once). Completions report the
//! first `k + 1` entries keyed by token text, chat the first `k` entries as a list. Token texts
//! are each id decoded on its own (special tokens kept), or `token_id:<id>` with
//! `return_tokens_as_token_ids`. Logprobs are floored at -9999.0.

use prompt::Tokenizer;
use protocol::response::{
    ChatLogprobEntry, ChatTopLogprob, CompletionLogprobs, PromptLogprobMap, PromptLogprobs,
    PromptTokenLogprob, TopLogprobMap,
};

use crate::engine::{PromptLogprob, TokenLogprob};

/// vLLM's floor for `-inf` logprobs (JSON cannot carry infinities).
const MIN_LOGPROB: f64 = -9999.0;

/// How token ids are spelled in logprobs.
pub struct TokenNamer<'a> {
    tokenizer: &'a Tokenizer,
    as_ids: bool,
}

impl<'a> TokenNamer<'a> {
    pub fn new(tokenizer: &'a Tokenizer, as_ids: bool) -> Self {
        Self { tokenizer, as_ids }
    }

    pub fn name(&self, id: u32) -> String {
        if self.as_ids {
            format!("token_id:{id}")
        } else {
            self.tokenizer.decode(&[id], false)
        }
    }
}

fn floor(lp: f32) -> f64 {
    f64::from(lp).max(MIN_LOGPROB)
}

/// The step's `(token_id, logprob)` entries in vLLM's dict order: sampled token first, then the
/// top alternatives it is not among.
fn dict_order(step: &TokenLogprob) -> Vec<(u32, f32)> {
    let mut entries = Vec::with_capacity(step.top.len() + 1);
    entries.push((step.token_id, step.logprob));
    entries.extend(
        step.top
            .iter()
            .copied()
            .filter(|(id, _)| *id != step.token_id),
    );
    entries
}

/// Completions `logprobs` for `steps`; `initial_offset` is the length in characters of the
/// text already sent for this choice (streaming).
pub fn completion_logprobs(
    steps: &[TokenLogprob],
    num_top: usize,
    namer: &TokenNamer<'_>,
    initial_offset: usize,
) -> CompletionLogprobs {
    let mut out = CompletionLogprobs::default();
    let mut offset = initial_offset;
    for step in steps {
        let token = namer.name(step.token_id);
        out.text_offset.push(offset);
        offset += token.chars().count();
        out.token_logprobs.push(Some(floor(step.logprob)));
        let mut top = TopLogprobMap::default();
        for (id, lp) in dict_order(step).into_iter().take(num_top + 1) {
            top.insert(namer.name(id), floor(lp));
        }
        out.tokens.push(token);
        out.top_logprobs.push(Some(top));
    }
    out
}

/// Completions `logprobs` with `echo`: the prompt's tokens first (the first one without a
/// logprob, as vLLM reports it), then the generated ones.
pub fn echo_completion_logprobs(
    prompt_token_ids: &[u32],
    prompt: &[PromptLogprob],
    generated: &[TokenLogprob],
    num_top: usize,
    namer: &TokenNamer<'_>,
) -> CompletionLogprobs {
    let mut out = CompletionLogprobs::default();
    let Some(&first) = prompt_token_ids.first() else {
        return completion_logprobs(generated, num_top, namer, 0);
    };
    let token = namer.name(first);
    out.text_offset.push(0);
    let offset = token.chars().count();
    out.tokens.push(token);
    out.token_logprobs.push(None);
    out.top_logprobs.push(None);
    let steps: Vec<TokenLogprob> = prompt
        .iter()
        .map(|p| p.entry.clone())
        .chain(generated.iter().cloned())
        .collect();
    out.extend(completion_logprobs(&steps, num_top, namer, offset));
    out
}

/// vLLM's `prompt_logprobs` field: `null` for the first prompt token, then per token a map
/// from token id to `{logprob, rank, decoded_token}`, the prompt token first, then the top
/// alternatives (ranks 1, 2, …) it is not among.
pub fn prompt_logprobs(prompt: &[PromptLogprob], namer: &TokenNamer<'_>) -> PromptLogprobs {
    let entry = |id: u32, lp: f32, rank: usize| {
        let decoded_token = namer.name(id);
        let logprob = floor(lp);
        (
            id,
            PromptTokenLogprob {
                logprob,
                rank,
                decoded_token,
            },
        )
    };
    let mut list = Vec::with_capacity(prompt.len() + 1);
    list.push(None);
    for p in prompt {
        let step = &p.entry;
        let mut map = vec![entry(step.token_id, step.logprob, p.rank)];
        map.extend(
            step.top
                .iter()
                .enumerate()
                .filter(|(_, (id, _))| *id != step.token_id)
                .map(|(i, &(id, lp))| entry(id, lp, i + 1)),
        );
        list.push(Some(PromptLogprobMap(map)));
    }
    list
}

/// Chat `logprobs.content` entries for `steps`.
pub fn chat_logprobs(
    steps: &[TokenLogprob],
    num_top: usize,
    namer: &TokenNamer<'_>,
) -> Vec<ChatLogprobEntry> {
    steps
        .iter()
        .map(|step| {
            let token = namer.name(step.token_id);
            ChatLogprobEntry {
                bytes: Some(token.as_bytes().to_vec()),
                token,
                logprob: floor(step.logprob),
                top_logprobs: dict_order(step)
                    .into_iter()
                    .take(num_top)
                    .map(|(id, lp)| {
                        let token = namer.name(id);
                        ChatTopLogprob {
                            bytes: Some(token.as_bytes().to_vec()),
                            token,
                            logprob: floor(lp),
                        }
                    })
                    .collect(),
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::server::test_support::test_tokenizer;

    fn step(token_id: u32, logprob: f32, top: &[(u32, f32)]) -> TokenLogprob {
        TokenLogprob {
            token_id,
            logprob,
            top: top.to_vec(),
        }
    }

    #[test]
    fn completion_logprobs_shape() {
        let tok = test_tokenizer();
        let namer = TokenNamer::new(&tok, false);
        // "hello" (id 1) sampled; it is also the top-1 alternative.
        let steps = [
            step(1, -0.5, &[(1, -0.5), (2, -1.5)]),
            step(2, f32::NEG_INFINITY, &[(1, -0.1), (3, -2.0)]),
        ];
        let lp = completion_logprobs(&steps, 2, &namer, 7);
        assert_eq!(
            serde_json::to_string(&lp).unwrap(),
            r#"{"text_offset":[7,12],"token_logprobs":[-0.5,-9999.0],"tokens":["hello","world"],"top_logprobs":[{"hello":-0.5,"world":-1.5},{"world":-9999.0,"hello":-0.10000000149011612,"foo":-2.0}]}"#
        );
        let lp = completion_logprobs(&steps[..1], 0, &namer, 0);
        assert_eq!(
            serde_json::to_string(&lp.top_logprobs).unwrap(),
            r#"[{"hello":-0.5}]"#
        );
    }

    #[test]
    fn prompt_logprobs_and_echo_shapes() {
        let tok = test_tokenizer();
        let namer = TokenNamer::new(&tok, false);
        // Prompt "hello world": "world" (2) was the second most likely after "hello" (1).
        let prompt = [PromptLogprob {
            entry: step(2, -1.5, &[(1, -0.5), (2, -1.5)]),
            rank: 2,
        }];
        assert_eq!(
            serde_json::to_string(&prompt_logprobs(&prompt, &namer)).unwrap(),
            r#"[null,{"2":{"logprob":-1.5,"rank":2,"decoded_token":"world"},"1":{"logprob":-0.5,"rank":1,"decoded_token":"hello"}}]"#
        );
        let generated = [step(3, -0.25, &[(3, -0.25)])];
        let lp = echo_completion_logprobs(&[1, 2], &prompt, &generated, 1, &namer);
        assert_eq!(
            serde_json::to_string(&lp).unwrap(),
            r#"{"text_offset":[0,5,10],"token_logprobs":[null,-1.5,-0.25],"tokens":["hello","world","foo"],"top_logprobs":[null,{"world":-1.5,"hello":-0.5},{"foo":-0.25}]}"#
        );
    }

    #[test]
    fn chat_logprobs_shape() {
        let tok = test_tokenizer();
        let namer = TokenNamer::new(&tok, false);
        let steps = [step(2, -1.0, &[(1, -0.25), (2, -1.0)])];
        let entries = chat_logprobs(&steps, 2, &namer);
        assert_eq!(
            serde_json::to_string(&entries).unwrap(),
            r#"[{"token":"world","logprob":-1.0,"bytes":[119,111,114,108,100],"top_logprobs":[{"token":"world","logprob":-1.0,"bytes":[119,111,114,108,100]},{"token":"hello","logprob":-0.25,"bytes":[104,101,108,108,111]}]}]"#
        );
        assert!(chat_logprobs(&steps, 0, &namer)[0].top_logprobs.is_empty());
        let ids = TokenNamer::new(&tok, true);
        assert_eq!(chat_logprobs(&steps, 1, &ids)[0].token, "token_id:2");
    }
}
