//! A conversation rendered with the model's chat template, as vLLM's chat preprocessing does it:
//! text content parts joined, message keys passed through, `chat_template_kwargs`, `documents`
//! and `tools` as template variables, and `continue_final_message` cutting what the template put
//! after the last message. Errors are the 400s vLLM gives.

use protocol::fields::{Dict, LaxBool};
use protocol::request::{ChatFields, ChatMessageIn, ContentPart, MessageContent, TokenizeRequest};
use protocol::ApiError;
use serde_json::{Map, Value};

use crate::ChatTemplate;

/// One rendering of a conversation with the model's chat template.
pub struct ChatRender<'a> {
    pub messages: &'a [ChatMessageIn],
    pub add_generation_prompt: bool,
    pub continue_final_message: bool,
    pub chat_template_kwargs: Option<&'a Dict>,
    pub documents: Option<&'a [Dict]>,
    pub tools: Option<&'a [Dict]>,
}

/// A message's content as the template sees it: text parts joined by newlines (vLLM's
/// "string" content format).
pub fn content_text(message: &ChatMessageIn) -> Result<String, ApiError> {
    match &message.content {
        None => Ok(String::new()),
        Some(MessageContent::Text(text)) => Ok(text.clone()),
        Some(MessageContent::Parts(parts)) => {
            let texts = parts
                .iter()
                .map(|part| match part {
                    ContentPart::Text(t) => Ok(t.as_str()),
                    ContentPart::Other(kind) => Err(ApiError::bad_request(format!(
                        "Content part type '{kind}' is not supported: this model only accepts \
                         text."
                    ))),
                })
                .collect::<Result<Vec<_>, _>>()?;
            Ok(texts.join("\n"))
        }
    }
}

/// Renders the conversation to the prompt text.
pub fn render(template: Option<&ChatTemplate>, r: &ChatRender<'_>) -> Result<String, ApiError> {
    let template = template.ok_or_else(|| {
        ApiError::bad_request(
            "As of transformers v4.44, default chat template is no longer allowed, so you must \
             provide a chat template if the tokenizer does not define one.",
        )
    })?;
    if r.continue_final_message && r.add_generation_prompt {
        return Err(ApiError::bad_request(
            "continue_final_message and add_generation_prompt are not compatible. Use \
             continue_final_message when you want the model to continue the final message, and \
             add_generation_prompt when you want to add a header that will prompt it to start a \
             new assistant message instead.",
        ));
    }
    let mut conversation = Vec::with_capacity(r.messages.len());
    for message in r.messages {
        let mut m = Map::new();
        m.insert("role".into(), Value::String(message.role.clone()));
        m.insert("content".into(), Value::String(content_text(message)?));
        m.extend(message.extra.clone());
        conversation.push(Value::Object(m));
    }
    let mut kwargs = r
        .chat_template_kwargs
        .map(|d| d.0.clone())
        .unwrap_or_default();
    kwargs.insert(
        "continue_final_message".into(),
        Value::Bool(r.continue_final_message),
    );
    if let Some(documents) = r.documents {
        kwargs.insert(
            "documents".into(),
            Value::Array(
                documents
                    .iter()
                    .map(|d| Value::Object(d.0.clone()))
                    .collect(),
            ),
        );
    }
    if let Some(tools) = r.tools {
        kwargs.insert(
            "tools".into(),
            Value::Array(tools.iter().map(|d| Value::Object(d.0.clone())).collect()),
        );
    }
    let rendered = template
        .render(
            &Value::Array(conversation),
            r.add_generation_prompt,
            Some(&kwargs),
        )
        .map_err(|e| ApiError::bad_request(e.to_string()))?;
    if !r.continue_final_message {
        return Ok(rendered);
    }
    // transformers: cut everything the template put after the final message's content.
    let last = r
        .messages
        .last()
        .map(content_text)
        .transpose()?
        .unwrap_or_default();
    let not_found = || {
        ApiError::bad_request(
            "continue_final_message is set but the final message does not appear in the chat \
             after applying the chat template! This can happen if the chat template deletes \
             portions of the final message. Please verify the chat template and final message \
             in your chat to ensure they are compatible.",
        )
    };
    let stripped = last.trim();
    let at = rendered.rfind(stripped).ok_or_else(not_found)?;
    let keep = if rendered[at..].starts_with(last.trim_start()) {
        last.trim_start().len()
    } else {
        stripped.len()
    };
    Ok(rendered[..at + keep].to_string())
}

impl<'a> ChatRender<'a> {
    /// The characters of the messages' text, which the rendered prompt contains at least: a
    /// conversation that cannot fit is refused on this count before the template copies it.
    pub fn content_chars(&self) -> usize {
        let text_chars = |m: &ChatMessageIn| match &m.content {
            None => 0,
            Some(MessageContent::Text(t)) => t.chars().count(),
            Some(MessageContent::Parts(parts)) => parts
                .iter()
                .map(|p| match p {
                    ContentPart::Text(t) => t.chars().count(),
                    ContentPart::Other(_) => 0,
                })
                .sum(),
        };
        self.messages.iter().map(text_chars).sum()
    }

    /// The rendering a chat request asks for, with vLLM's defaults (a generation prompt, no
    /// continued final message).
    pub fn of_chat(fields: &'a ChatFields) -> Self {
        Self {
            documents: fields.documents.as_deref(),
            ..Self::with_defaults(
                &fields.messages,
                fields.add_generation_prompt,
                fields.continue_final_message,
                fields.chat_template_kwargs.as_ref(),
                fields.tools.as_deref(),
            )
        }
    }

    /// The rendering of `/tokenize`'s `messages`, with the same defaults (no documents).
    pub fn of_tokenize(request: &'a TokenizeRequest, messages: &'a [ChatMessageIn]) -> Self {
        Self::with_defaults(
            messages,
            request.add_generation_prompt,
            request.continue_final_message,
            request.chat_template_kwargs.as_ref(),
            request.tools.as_deref(),
        )
    }

    fn with_defaults(
        messages: &'a [ChatMessageIn],
        add_generation_prompt: Option<LaxBool>,
        continue_final_message: Option<LaxBool>,
        chat_template_kwargs: Option<&'a Dict>,
        tools: Option<&'a [Dict]>,
    ) -> Self {
        Self {
            messages,
            add_generation_prompt: add_generation_prompt.is_none_or(|b| b.0),
            continue_final_message: continue_final_message.is_some_and(|b| b.0),
            chat_template_kwargs,
            documents: None,
            tools,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CHATML: &str = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}";

    fn chatml() -> ChatTemplate {
        ChatTemplate::new(CHATML, None, Some("<|im_end|>".into())).unwrap()
    }

    fn msgs(v: Value) -> Vec<ChatMessageIn> {
        serde_json::from_value(v).unwrap()
    }

    fn plain(
        messages: &[ChatMessageIn],
        add_generation_prompt: bool,
        cont: bool,
    ) -> ChatRender<'_> {
        ChatRender {
            messages,
            add_generation_prompt,
            continue_final_message: cont,
            chat_template_kwargs: None,
            documents: None,
            tools: None,
        }
    }

    #[test]
    fn renders_chatml() {
        let m = msgs(serde_json::json!([
            {"role": "user", "content": [{"type": "text", "text": "hello"}, {"type": "text", "text": "world"}]}
        ]));
        let text = render(Some(&chatml()), &plain(&m, true, false)).unwrap();
        assert_eq!(
            text,
            "<|im_start|>user\nhello\nworld<|im_end|>\n<|im_start|>assistant\n"
        );
    }

    #[test]
    fn continue_final_message_cuts_the_turn_end() {
        let m = msgs(serde_json::json!([
            {"role": "user", "content": "hello"},
            {"role": "assistant", "content": "foo bar"}
        ]));
        let text = render(Some(&chatml()), &plain(&m, false, true)).unwrap();
        assert_eq!(
            text,
            "<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\nfoo bar"
        );
        assert!(render(Some(&chatml()), &plain(&m, true, true)).is_err());
    }

    #[test]
    fn refusals() {
        let m = msgs(serde_json::json!([{"role": "user", "content": [{"type": "image_url"}]}]));
        let e = render(Some(&chatml()), &plain(&m, true, false)).unwrap_err();
        assert!(e.message.contains("image_url"));
        assert!(render(None, &plain(&m, true, false)).is_err());
    }

    #[test]
    fn chat_requests_default_to_a_generation_prompt() {
        let fields: ChatFields = serde_json::from_value(serde_json::json!({
            "messages": [{"role": "user", "content": "hello"}]
        }))
        .unwrap();
        let r = ChatRender::of_chat(&fields);
        assert!(r.add_generation_prompt && !r.continue_final_message);
        let fields: ChatFields = serde_json::from_value(serde_json::json!({
            "messages": [{"role": "assistant", "content": "foo"}],
            "add_generation_prompt": false, "continue_final_message": "true"
        }))
        .unwrap();
        let r = ChatRender::of_chat(&fields);
        assert!(!r.add_generation_prompt && r.continue_final_message);
    }
}
