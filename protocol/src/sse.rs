//! Server-sent events as vLLM frames them: every event is `data: <json>\n\n` and a stream
//! always ends with `data: [DONE]\n\n`, also after an error event.

use crate::ApiError;

/// The stream's last frame.
pub const DONE: &str = "data: [DONE]\n\n";

/// The frame of one event.
pub fn event(json: &str) -> String {
    format!("data: {json}\n\n")
}

/// The frame of a typed event (the Responses API's streams): `event: <type>` before the data.
/// Such streams end without `[DONE]`.
pub fn typed_event(kind: &str, json: &str) -> String {
    format!("event: {kind}\ndata: {json}\n\n")
}

/// How a stream that fails after its head ends: the error as an event, then `[DONE]`.
pub fn error_ending(error: &ApiError) -> String {
    event(&error.to_json()) + DONE
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames() {
        assert_eq!(event("{\"a\":1}"), "data: {\"a\":1}\n\n");
        assert_eq!(typed_event("t", "{}"), "event: t\ndata: {}\n\n");
        let ending = error_ending(&ApiError::internal("cut"));
        assert!(
            ending.starts_with("data: {\"error\":{\"message\":\"cut\""),
            "{ending}"
        );
        assert!(ending.ends_with("}\n\ndata: [DONE]\n\n"), "{ending}");
    }
}
