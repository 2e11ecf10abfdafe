//! Submitting a request's sequences to the engine and reading their outputs back.
//!
//! A request with `P` prompts and `n` choices becomes `P * n` engine requests; choice `i` of
//! prompt `p` has index `p * n + i` (vLLM's numbering) and, when `n > 1`, the id
//! `"{i}_{prompt_id}"` and seed `seed + i` (vLLM's `ParentRequest`). Engine ids get a random
//! suffix so a client reusing an `X-Request-Id` cannot collide with itself. Dropping the merged
//! stream drops every [`RequestStream`], which aborts unfinished requests and frees their blocks.

use futures::stream::{self, BoxStream, StreamExt};
use protocol::ApiError;

use crate::engine::{
    EngineHandle, Finish, FinishReason, GenerateOutput, GenerateRequest, ParentRequest,
    PromptLogprob, RequestStream, SamplingParams, TokenLogprob,
};

use super::validation::child_params;

/// One prompt, ready for the engine.
#[derive(Debug, Clone)]
pub struct PreparedPrompt {
    pub token_ids: Vec<u32>,
    /// The prompt as text (for `echo`).
    pub text: String,
    pub params: SamplingParams,
}

/// What the merged stream yields.
#[derive(Debug)]
pub enum ChoiceEvent {
    /// An output of choice `index`.
    Output(usize, GenerateOutput),
    /// Choice `index` ended without a final output: the engine died.
    Lost(usize),
}

/// Submits `n` sequences per prompt. `prompt_ids` names each prompt's engine request.
pub fn submit(
    engine: &EngineHandle,
    prompts: &[PreparedPrompt],
    prompt_ids: &[String],
    n: usize,
    cache_salt: Option<&str>,
    kv_transfer_params: Option<&serde_json::Value>,
) -> Result<BoxStream<'static, ChoiceEvent>, ApiError> {
    let mut streams = Vec::with_capacity(prompts.len() * n);
    for (p, (prompt, prompt_id)) in prompts.iter().zip(prompt_ids).enumerate() {
        let parent = (n > 1).then(|| ParentRequest::new(n));
        for i in 0..n {
            let id = if n == 1 {
                prompt_id.clone()
            } else {
                format!("{i}_{prompt_id}")
            };
            let request = GenerateRequest {
                request_id: format!("{id}-{:08x}", rand::random::<u32>()),
                prompt_token_ids: prompt.token_ids.clone(),
                params: child_params(&prompt.params, i),
                cache_salt: cache_salt.map(str::to_string),
                parent: parent.clone(),
                pooling: None,
                kv_transfer_params: kv_transfer_params.cloned(),
            };
            // An error drops the streams made so far, which aborts them.
            streams.push(choice_events(p * n + i, engine.generate(request)?));
        }
    }
    Ok(stream::select_all(streams).boxed())
}

/// The events of one choice; [`ChoiceEvent::Lost`] if it ends without a finish.
fn choice_events(index: usize, outputs: RequestStream) -> BoxStream<'static, ChoiceEvent> {
    stream::unfold(Some(outputs), move |state| async move {
        let mut outputs = state?;
        match outputs.recv().await {
            Some(out) => {
                let finished = out.finish.is_some();
                Some((
                    ChoiceEvent::Output(index, out),
                    (!finished).then_some(outputs),
                ))
            }
            None => Some((ChoiceEvent::Lost(index), None)),
        }
    })
    .boxed()
}

/// Everything one choice produced.
#[derive(Debug, Clone, PartialEq)]
pub struct ChoiceOutput {
    pub token_ids: Vec<u32>,
    pub text: String,
    pub logprobs: Vec<TokenLogprob>,
    /// With `prompt_logprobs`: prompt tokens 1.. (see [`GenerateOutput::prompt_logprobs`]).
    pub prompt_logprobs: Option<Vec<PromptLogprob>>,
    pub finish: Finish,
    pub num_cached_tokens: usize,
}

/// A choice's outputs so far.
#[derive(Debug, Default)]
struct Partial {
    token_ids: Vec<u32>,
    text: String,
    logprobs: Vec<TokenLogprob>,
    prompt_logprobs: Option<Vec<PromptLogprob>>,
    num_cached_tokens: usize,
    finish: Option<Finish>,
}

/// Waits for every choice to finish. A lost choice is a dead engine (500); a choice the engine
/// finished with an error is vLLM's `GenerationError` (500).
pub async fn collect(
    mut events: BoxStream<'static, ChoiceEvent>,
    num_choices: usize,
) -> Result<Vec<ChoiceOutput>, ApiError> {
    let mut partial: Vec<Partial> = (0..num_choices).map(|_| Partial::default()).collect();
    while let Some(event) = events.next().await {
        let (index, out) = match event {
            ChoiceEvent::Output(index, out) => (index, out),
            ChoiceEvent::Lost(_) => return Err(ApiError::engine_dead()),
        };
        let slot = &mut partial[index];
        slot.token_ids.extend(out.token_ids);
        slot.text.push_str(&out.text);
        slot.logprobs.extend(out.logprobs);
        if out.prompt_logprobs.is_some() {
            slot.prompt_logprobs = out.prompt_logprobs;
        }
        slot.num_cached_tokens = out.num_cached_tokens;
        if let Some(finish) = out.finish {
            if finish.reason == FinishReason::Error {
                return Err(ApiError::generation_failed());
            }
            slot.finish = Some(finish);
        }
    }
    partial
        .into_iter()
        .map(|p| {
            let finish = p.finish.ok_or_else(ApiError::engine_dead)?;
            Ok(ChoiceOutput {
                token_ids: p.token_ids,
                text: p.text,
                logprobs: p.logprobs,
                prompt_logprobs: p.prompt_logprobs,
                finish,
                num_cached_tokens: p.num_cached_tokens,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::handle::EngineCommand;
    use crate::server::test_support::{test_config, test_state};

    fn output(tokens: &[u32], text: &str, finish: Option<FinishReason>) -> GenerateOutput {
        GenerateOutput {
            token_ids: tokens.to_vec(),
            text: text.into(),
            logprobs: Vec::new(),
            finish: finish.map(|r| Finish::new(r, None)),
            prompt_logprobs: None,
            embedding: None,
            num_prompt_tokens: 2,
            num_cached_tokens: 0,
        }
    }

    fn prompt(seed: Option<u64>) -> PreparedPrompt {
        PreparedPrompt {
            token_ids: vec![1, 2],
            text: "hello world".into(),
            params: SamplingParams {
                seed,
                ..SamplingParams::default()
            },
        }
    }

    #[tokio::test]
    async fn fans_out_and_collects_in_choice_order() {
        let (state, rx) = test_state(test_config(), true);
        let prompts = [prompt(Some(10)), prompt(None)];
        let ids = ["cmpl-x-0".to_string(), "cmpl-x-1".to_string()];
        let events = submit(&state.engine, &prompts, &ids, 2, Some("salt"), None).unwrap();
        let mut senders = Vec::new();
        for _ in 0..4 {
            match rx.try_recv().unwrap() {
                EngineCommand::Add { request, outputs } => senders.push((request, outputs)),
                _ => panic!("expected Add"),
            }
        }
        let names: Vec<_> = senders.iter().map(|(r, _)| r.request_id.clone()).collect();
        assert!(names[0].starts_with("0_cmpl-x-0-"), "{names:?}");
        assert!(names[3].starts_with("1_cmpl-x-1-"), "{names:?}");
        assert_eq!(senders[0].0.params.seed, Some(10));
        assert_eq!(senders[1].0.params.seed, Some(11));
        assert_eq!(senders[2].0.params.seed, None);
        assert_eq!(senders[0].0.cache_salt.as_deref(), Some("salt"));
        for (i, (_, tx)) in senders.iter().enumerate() {
            tx.send(output(&[3], "foo", None)).unwrap();
            tx.send(output(&[i as u32], "x", Some(FinishReason::Length)))
                .unwrap();
        }
        let choices = collect(events, 4).await.unwrap();
        assert_eq!(choices.len(), 4);
        assert_eq!(choices[2].token_ids, vec![3, 2]);
        assert_eq!(choices[2].text, "foox");
        assert_eq!(choices[2].finish.reason, FinishReason::Length);
    }

    #[tokio::test]
    async fn lost_and_failed_choices_are_500s() {
        let (state, rx) = test_state(test_config(), true);
        let events = submit(&state.engine, &[prompt(None)], &["c".into()], 1, None, None).unwrap();
        let Ok(EngineCommand::Add { outputs, .. }) = rx.try_recv() else {
            panic!("expected Add")
        };
        drop(outputs);
        let e = collect(events, 1).await.unwrap_err();
        assert_eq!(e, ApiError::engine_dead());

        let events = submit(&state.engine, &[prompt(None)], &["c".into()], 1, None, None).unwrap();
        let Ok(EngineCommand::Add { outputs, .. }) = rx.try_recv() else {
            panic!("expected Add")
        };
        outputs
            .send(output(&[], "", Some(FinishReason::Error)))
            .unwrap();
        assert_eq!(
            collect(events, 1).await.unwrap_err(),
            ApiError::generation_failed()
        );
    }

    #[tokio::test]
    async fn dropping_the_stream_aborts_unfinished_requests() {
        let (state, rx) = test_state(test_config(), true);
        let events = submit(&state.engine, &[prompt(None)], &["c".into()], 1, None, None).unwrap();
        let Ok(EngineCommand::Add { request, .. }) = rx.try_recv() else {
            panic!("expected Add")
        };
        drop(events);
        match rx.try_recv() {
            Ok(EngineCommand::Abort(id)) => assert_eq!(id, request.request_id),
            _ => panic!("expected Abort"),
        }
    }

    #[test]
    fn dead_engine_refuses_submission() {
        let (state, _rx) = test_state(test_config(), false);
        let e = submit(&state.engine, &[prompt(None)], &["c".into()], 1, None, None).err();
        assert_eq!(e, Some(ApiError::engine_dead()));
    }
}
