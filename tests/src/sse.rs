//! Reads an OpenAI-style server-sent event stream (`data: <json>\n\n` … `data: [DONE]\n\n`)
//! from a streaming HTTP response, one event at a time.

use serde_json::Value;

/// One `data:` event.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    Json(Value),
    Done,
}

/// An event stream over a `reqwest` response; dropping it closes the connection.
pub struct SseStream {
    resp: reqwest::Response,
    buf: Vec<u8>,
}

impl SseStream {
    pub fn new(resp: reqwest::Response) -> Self {
        Self {
            resp,
            buf: Vec::new(),
        }
    }

    /// The next event; `Ok(None)` at the end of the body.
    pub async fn next(&mut self) -> Result<Option<Event>, String> {
        loop {
            if let Some(event) = take_event(&mut self.buf)? {
                return Ok(Some(event));
            }
            match self.resp.chunk().await.map_err(|e| e.to_string())? {
                Some(bytes) => self.buf.extend_from_slice(&bytes),
                None if self.buf.iter().all(u8::is_ascii_whitespace) => return Ok(None),
                None => {
                    return Err(format!(
                        "stream ended inside an event: {:?}",
                        String::from_utf8_lossy(&self.buf)
                    ))
                }
            }
        }
    }

    /// Every remaining event up to the end of the body.
    pub async fn collect(mut self) -> Result<Vec<Event>, String> {
        let mut events = Vec::new();
        while let Some(e) = self.next().await? {
            events.push(e);
        }
        Ok(events)
    }
}

/// Removes and parses the first complete event (terminated by a blank line) from `buf`.
/// Events without a `data:` line (comments, keep-alives) are skipped.
fn take_event(buf: &mut Vec<u8>) -> Result<Option<Event>, String> {
    loop {
        let Some(end) = buf.windows(2).position(|w| w == b"\n\n") else {
            return Ok(None);
        };
        let raw: Vec<u8> = buf.drain(..end + 2).collect();
        let text = std::str::from_utf8(&raw).map_err(|e| format!("event is not UTF-8: {e}"))?;
        let data: Vec<&str> = text
            .lines()
            .filter_map(|l| l.strip_prefix("data:"))
            .map(|d| d.strip_prefix(' ').unwrap_or(d))
            .collect();
        if data.is_empty() {
            continue;
        }
        let data = data.join("\n");
        if data == "[DONE]" {
            return Ok(Some(Event::Done));
        }
        let json = serde_json::from_str(&data).map_err(|e| format!("bad event {data:?}: {e}"))?;
        return Ok(Some(Event::Json(json)));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn splits_events_and_keeps_partial_ones() {
        let mut buf = b": keep-alive\n\ndata: {\"a\":1}\n\ndata: [DONE]\n\ndata: {\"b\"".to_vec();
        assert_eq!(
            take_event(&mut buf).unwrap(),
            Some(Event::Json(json!({"a": 1})))
        );
        assert_eq!(take_event(&mut buf).unwrap(), Some(Event::Done));
        assert_eq!(take_event(&mut buf).unwrap(), None);
        assert_eq!(buf, b"data: {\"b\"");
        buf.extend_from_slice(b":2}\n\n");
        assert_eq!(
            take_event(&mut buf).unwrap(),
            Some(Event::Json(json!({"b": 2})))
        );
    }

    #[test]
    fn rejects_bad_json() {
        let mut buf = b"data: {oops}\n\n".to_vec();
        assert!(take_event(&mut buf).is_err());
    }
}
