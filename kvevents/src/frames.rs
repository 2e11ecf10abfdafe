//! ZMQ framing around the msgpack payload. Live messages are `[topic, seq, payload]` with seq an
//! 8-byte big-endian unsigned counter of batches. Replay (a ROUTER socket): a DEALER sends
//! `["", start_seq]`; the answer is `["", seq, payload]` per buffered batch with seq >= start,
//! then `["", -1 as signed 8-byte big-endian, ""]`.

/// The seq value of the replay end marker.
pub const REPLAY_END_SEQ: i64 = -1;

pub fn encode_seq(seq: u64) -> [u8; 8] {
    seq.to_be_bytes()
}

/// The seq of a frame, or None if it is not 8 bytes.
pub fn decode_seq(frame: &[u8]) -> Option<u64> {
    Some(u64::from_be_bytes(frame.try_into().ok()?))
}

/// The start seq of a replay request: the frames after the ROUTER's identity, `["", seq]`.
/// None when malformed.
pub fn parse_replay_request<F: AsRef<[u8]>>(frames: &[F]) -> Option<u64> {
    match frames {
        [empty, start] if empty.as_ref().is_empty() => decode_seq(start.as_ref()),
        _ => None,
    }
}

/// One reply frame set of the replay socket, after the empty delimiter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReplayReply<'a> {
    Batch { seq: u64, payload: &'a [u8] },
    End,
}

impl<'a> ReplayReply<'a> {
    /// Parses a reply as a DEALER receives it, `["", seq, payload]`; None when malformed.
    pub fn from_frames<F: AsRef<[u8]>>(frames: &'a [F]) -> Option<Self> {
        match frames {
            [empty, seq, payload] if empty.as_ref().is_empty() => {
                Self::parse(seq.as_ref(), payload.as_ref())
            }
            _ => None,
        }
    }

    /// Parses `[seq, payload]` (the frames after the empty delimiter); None when malformed.
    pub fn parse(seq: &[u8], payload: &'a [u8]) -> Option<Self> {
        let raw = decode_seq(seq)?;
        if raw as i64 == REPLAY_END_SEQ {
            return Some(Self::End);
        }
        Some(Self::Batch { seq: raw, payload })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seq_round_trip_and_end_marker() {
        assert_eq!(encode_seq(1), [0, 0, 0, 0, 0, 0, 0, 1]);
        assert_eq!(decode_seq(&encode_seq(u64::MAX - 7)), Some(u64::MAX - 7));
        assert_eq!(decode_seq(&[1, 2, 3]), None);
        let end = REPLAY_END_SEQ.to_be_bytes();
        assert_eq!(end, [0xff; 8]);
        assert_eq!(ReplayReply::parse(&end, b""), Some(ReplayReply::End));
        assert_eq!(
            ReplayReply::parse(&encode_seq(5), b"x"),
            Some(ReplayReply::Batch {
                seq: 5,
                payload: b"x"
            })
        );
        assert_eq!(ReplayReply::parse(b"short", b""), None);
        let frames = [b"".to_vec(), encode_seq(3).to_vec(), b"p".to_vec()];
        assert_eq!(
            ReplayReply::from_frames(&frames),
            Some(ReplayReply::Batch {
                seq: 3,
                payload: b"p"
            })
        );
        assert_eq!(ReplayReply::from_frames(&frames[1..]), None);
        assert_eq!(ReplayReply::from_frames(&[b"x", &end[..], b""]), None);
    }

    #[test]
    fn replay_requests() {
        let seq = encode_seq(7);
        assert_eq!(parse_replay_request(&[&b""[..], &seq]), Some(7));
        assert_eq!(parse_replay_request(&[&b"x"[..], &seq]), None);
        assert_eq!(parse_replay_request(&[&b""[..], b"123"]), None);
        assert_eq!(parse_replay_request(&[&seq[..]]), None);
        assert_eq!(parse_replay_request::<&[u8]>(&[]), None);
    }
}
