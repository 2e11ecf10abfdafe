//! Every wire type of the crate. `kv_transfer_params` are vLLM's NixlConnector contract with
//! routers, sidecars and the other pod (reference: vllm-compat.md §7, tiers-pd.md §5); the
//! side channel between our own pods is ours: one TCP connection per decode-side client,
//! frames of a big-endian u32 length and a JSON message.

use std::io::{Read, Write};

use kvcache::{BlockId, BlockLayout};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

/// The side channel refuses frames above this size (a frame carries at most a pool's keys).
pub const MAX_FRAME: usize = 4 << 20;

/// A request's `kv_transfer_params`, as much of them as this connector reads.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct RequestParams {
    /// Prefill leg: compute the prompt, keep its blocks for a decode pod.
    pub do_remote_decode: bool,
    /// Decode leg: pull the prompt's blocks from `remote`.
    pub remote: Option<RemotePrefill>,
}

/// Where a decode leg's blocks are (the prefill response's params, passed on verbatim).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemotePrefill {
    pub engine_id: String,
    pub request_id: String,
    pub block_ids: Vec<BlockId>,
    pub host: String,
    pub port: u16,
}

impl RequestParams {
    /// Reads the params; `Err` says what is wrong with a decode leg's (the request then
    /// prefills locally).
    pub fn parse(params: Option<&Value>) -> Result<Self, String> {
        let Some(p) = params.filter(|p| !p.is_null()) else {
            return Ok(Self::default());
        };
        let Some(p) = p.as_object() else {
            return Err("kv_transfer_params must be an object".into());
        };
        let flag = |k: &str| p.get(k).and_then(Value::as_bool).unwrap_or(false);
        let mut out = Self {
            do_remote_decode: flag("do_remote_decode"),
            remote: None,
        };
        if !flag("do_remote_prefill") {
            return Ok(out);
        }
        let text = |k: &str| -> Result<String, String> {
            match p.get(k) {
                Some(Value::String(s)) if !s.is_empty() => Ok(s.clone()),
                Some(Value::Number(n)) if k == "remote_engine_id" => Ok(n.to_string()),
                _ => Err(format!("kv_transfer_params.{k} must be a non-empty string")),
            }
        };
        let port = p
            .get("remote_port")
            .and_then(Value::as_u64)
            .filter(|&n| (1..=65535).contains(&n))
            .ok_or("kv_transfer_params.remote_port must be a port number")?;
        out.remote = Some(RemotePrefill {
            engine_id: text("remote_engine_id")?,
            request_id: text("remote_request_id")?,
            block_ids: block_ids(p.get("remote_block_ids"))?,
            host: text("remote_host")?,
            port: port as u16,
        });
        Ok(out)
    }
}

/// `remote_block_ids`: a list of block ids, or (vLLM with one KV cache group) a list holding
/// one such list.
fn block_ids(v: Option<&Value>) -> Result<Vec<BlockId>, String> {
    const WHAT: &str = "kv_transfer_params.remote_block_ids must be a list of block ids";
    let list = match v.and_then(Value::as_array) {
        Some(l) if l.len() == 1 && l[0].is_array() => l[0].as_array().ok_or(WHAT)?,
        Some(l) => l,
        None => return Err(WHAT.into()),
    };
    list.iter()
        .map(|b| {
            b.as_u64()
                .and_then(|b| BlockId::try_from(b).ok())
                .ok_or_else(|| WHAT.to_string())
        })
        .collect()
}

/// The prefill leg's answer (a response's top-level `kv_transfer_params`), in the
/// NixlConnector's shape.
#[derive(Debug, Clone)]
pub struct PrefillAnswer<'a> {
    pub engine_id: &'a str,
    pub request_id: &'a str,
    pub block_ids: &'a [BlockId],
    pub host: &'a str,
    pub port: u16,
    pub num_tokens: usize,
    /// Unix seconds at which unread blocks are freed.
    pub expiry_unix: f64,
    pub generation: u64,
}

impl PrefillAnswer<'_> {
    pub fn to_json(&self) -> Value {
        json!({
            "do_remote_prefill": true,
            "do_remote_decode": false,
            "remote_block_ids": self.block_ids,
            "remote_engine_id": self.engine_id,
            "remote_request_id": self.request_id,
            "remote_host": self.host,
            "remote_port": self.port,
            "tp_size": 1,
            "dcp_size": 1,
            "pp_size": 1,
            "remote_num_tokens": self.num_tokens,
            "remote_blocks_expiry_time": self.expiry_unix,
            "remote_registration_generation": self.generation,
            "transfer_mode": "read",
        })
    }
}

/// The pool geometry both sides must share for a block to mean the same bytes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PoolShape {
    pub num_layers: usize,
    pub block_size: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub dtype: String,
}

impl From<&BlockLayout> for PoolShape {
    fn from(l: &BlockLayout) -> Self {
        Self {
            num_layers: l.num_layers,
            block_size: l.block_size,
            num_kv_heads: l.num_kv_heads,
            head_dim: l.head_dim,
            dtype: l.dtype.to_string(),
        }
    }
}

/// One registered array of a producer's pool (a layer's K or V).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RemoteArray {
    pub addr: u64,
    pub len: u64,
    #[serde(with = "b64")]
    pub rkey: Vec<u8>,
}

/// What a decode pod needs to read a producer's blocks.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerMetadata {
    pub engine_id: String,
    /// Random per start: a restarted producer at the same address is another peer.
    pub generation: u64,
    #[serde(with = "b64")]
    pub worker_address: Vec<u8>,
    pub shape: PoolShape,
    /// In `BlockLayout::regions` order: layer by layer, K then V.
    pub arrays: Vec<RemoteArray>,
}

impl PeerMetadata {
    /// Which endpoint serves this peer.
    pub fn key(&self) -> String {
        format!("{}/{}", self.engine_id, self.generation)
    }
}

/// Decode side to producer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum ChannelRequest {
    /// "I will read these blocks of that request": checked against what the producer holds
    /// (the ids and a digest of their tokens), which renews the lease.
    Claim {
        engine_id: String,
        request_id: String,
        block_ids: Vec<BlockId>,
        tokens_digest: u64,
        /// Send the metadata (the client has none for this producer's generation).
        want_metadata: bool,
    },
    /// Still working: keep the blocks.
    Renew { request_id: String },
    /// Done reading (or giving up): free the blocks.
    Release { request_id: String },
}

/// Producer to decode side.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "reply", rename_all = "snake_case")]
pub enum ChannelReply {
    Claimed {
        expires_in_ms: u64,
        generation: u64,
        metadata: Option<PeerMetadata>,
    },
    Renewed {
        expires_in_ms: u64,
    },
    /// `held`: the blocks were still pinned (a read that finished before this is good).
    Released {
        held: bool,
    },
    Refused {
        reason: String,
    },
}

/// xxh3 of the token ids (little-endian u32s) a claim covers.
pub fn tokens_digest(tokens: &[u32]) -> u64 {
    let mut h = xxhash_rust::xxh3::Xxh3::new();
    for t in tokens {
        h.update(&t.to_le_bytes());
    }
    h.digest()
}

pub fn write_frame<T: Serialize>(w: &mut impl Write, msg: &T) -> std::io::Result<()> {
    let body = serde_json::to_vec(msg)?;
    let mut frame = Vec::with_capacity(4 + body.len());
    frame.extend_from_slice(&(body.len() as u32).to_be_bytes());
    frame.extend_from_slice(&body);
    w.write_all(&frame)?;
    w.flush()
}

pub fn read_frame<T: for<'de> Deserialize<'de>>(r: &mut impl Read) -> std::io::Result<T> {
    let mut len = [0u8; 4];
    r.read_exact(&mut len)?;
    let len = u32::from_be_bytes(len) as usize;
    if len > MAX_FRAME {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("a {len}-byte frame is over the side channel's limit"),
        ));
    }
    let mut body = vec![0u8; len];
    r.read_exact(&mut body)?;
    serde_json::from_slice(&body)
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))
}

mod b64 {
    use base64::Engine as _;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(bytes: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&base64::engine::general_purpose::STANDARD.encode(bytes))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let text = String::deserialize(d)?;
        base64::engine::general_purpose::STANDARD
            .decode(text)
            .map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::Engine as _;

    #[test]
    fn a_prefill_answer_reads_back_as_a_decode_legs_params() {
        let ids = [3, 9, 4];
        let answer = PrefillAnswer {
            engine_id: "e1",
            request_id: "cmpl-x-0",
            block_ids: &ids,
            host: "10.0.0.7",
            port: 5600,
            num_tokens: 50,
            expiry_unix: 1.0e9,
            generation: 7,
        }
        .to_json();
        // The fields vLLM's NixlConnector writes (tiers-pd.md §5).
        for key in [
            "do_remote_prefill",
            "do_remote_decode",
            "remote_block_ids",
            "remote_engine_id",
            "remote_request_id",
            "remote_host",
            "remote_port",
            "tp_size",
            "dcp_size",
            "pp_size",
            "remote_num_tokens",
            "remote_blocks_expiry_time",
            "remote_registration_generation",
            "transfer_mode",
        ] {
            assert!(answer.get(key).is_some(), "{key}");
        }
        let back = RequestParams::parse(Some(&answer)).unwrap();
        assert!(!back.do_remote_decode);
        assert_eq!(
            back.remote,
            Some(RemotePrefill {
                engine_id: "e1".into(),
                request_id: "cmpl-x-0".into(),
                block_ids: vec![3, 9, 4],
                host: "10.0.0.7".into(),
                port: 5600,
            })
        );
    }

    #[test]
    fn the_sidecars_prefill_leg_params_ask_for_a_remote_decode() {
        // What llm-d's sidecar sends on the prefill leg (tiers-pd.md §4).
        let p = json!({"do_remote_decode": true, "do_remote_prefill": false,
            "remote_engine_id": null, "remote_block_ids": null, "remote_host": null,
            "remote_port": null});
        let parsed = RequestParams::parse(Some(&p)).unwrap();
        assert!(parsed.do_remote_decode && parsed.remote.is_none());
        assert_eq!(
            RequestParams::parse(None).unwrap(),
            RequestParams::default()
        );
    }

    #[test]
    fn bad_decode_leg_params_say_what_is_wrong() {
        let base = json!({"do_remote_prefill": true, "remote_engine_id": "e",
            "remote_request_id": "r", "remote_block_ids": [[1, 2]], "remote_host": "h",
            "remote_port": 5600});
        assert_eq!(
            RequestParams::parse(Some(&base))
                .unwrap()
                .remote
                .unwrap()
                .block_ids,
            vec![1, 2]
        );
        for (key, value, says) in [
            ("remote_block_ids", json!([1, -2]), "remote_block_ids"),
            ("remote_block_ids", json!("1,2"), "remote_block_ids"),
            ("remote_port", json!(70000), "remote_port"),
            ("remote_host", json!(""), "remote_host"),
            ("remote_request_id", Value::Null, "remote_request_id"),
        ] {
            let mut p = base.clone();
            p[key] = value;
            let err = RequestParams::parse(Some(&p)).unwrap_err();
            assert!(err.contains(says), "{err}");
        }
        assert!(RequestParams::parse(Some(&json!([1]))).is_err());
    }

    #[test]
    fn frames_round_trip_and_oversized_ones_are_refused() {
        let msg = ChannelRequest::Claim {
            engine_id: "e".into(),
            request_id: "r".into(),
            block_ids: vec![1, 2, 3],
            tokens_digest: tokens_digest(&[1, 2, 3]),
            want_metadata: true,
        };
        let mut buf = Vec::new();
        write_frame(&mut buf, &msg).unwrap();
        let back: ChannelRequest = read_frame(&mut buf.as_slice()).unwrap();
        assert_eq!(back, msg);
        let mut huge = ((MAX_FRAME + 1) as u32).to_be_bytes().to_vec();
        huge.extend_from_slice(b"{}");
        assert!(read_frame::<ChannelRequest>(&mut huge.as_slice()).is_err());
        let meta = PeerMetadata {
            engine_id: "e".into(),
            generation: 1,
            worker_address: vec![0, 255, 7],
            shape: PoolShape {
                num_layers: 1,
                block_size: 16,
                num_kv_heads: 1,
                head_dim: 8,
                dtype: "float16".into(),
            },
            arrays: vec![RemoteArray {
                addr: 4096,
                len: 512,
                rkey: vec![9; 20],
            }],
        };
        let text = serde_json::to_string(&meta).unwrap();
        assert!(text.contains(&base64::engine::general_purpose::STANDARD.encode([0, 255, 7])));
        assert_eq!(serde_json::from_str::<PeerMetadata>(&text).unwrap(), meta);
    }
}
