//! The wire format against bytes written by msgspec (testdata/make_vectors.py, vLLM's struct
//! layout re-declared in Python): decoding both layouts, and re-encoding the map layout byte for
//! byte.

use kvevents::{
    decode_batch, encode_batch, BlockRemoved, BlockStored, DecodeError, Encoding, EventBatch,
    ExternalBlockHash as H, ExtraKey, KvEvent,
};

const MAP: &[u8] = include_bytes!("../testdata/batch_map.msgpack");
const ARRAY: &[u8] = include_bytes!("../testdata/batch_array.msgpack");

fn stored(hashes: Vec<H>, parent: Option<H>, tokens: Vec<u32>) -> BlockStored {
    BlockStored {
        block_hashes: hashes,
        parent_block_hash: parent,
        token_ids: tokens,
        block_size: 4,
        lora_id: None,
        medium: Some("GPU".into()),
        lora_name: None,
        extra_keys: None,
        group_idx: None,
    }
}

/// The batch make_vectors.py writes.
fn expected() -> EventBatch {
    EventBatch {
        ts: 1763712000.25,
        events: vec![
            KvEvent::BlockStored(stored(
                vec![H::Int(u64::MAX), H::Int(7)],
                None,
                [1, 200, 70000, 3].repeat(2),
            )),
            KvEvent::BlockStored(BlockStored {
                extra_keys: Some(vec![Some(vec![ExtraKey::Str("salt".into())])]),
                ..stored(
                    vec![H::Bytes((0..32).collect())],
                    Some(H::Bytes(vec![9; 32])),
                    vec![5, 6, 7, 8],
                )
            }),
            KvEvent::BlockRemoved(BlockRemoved {
                block_hashes: vec![H::Int(7), H::Int(1 << 63)],
                medium: Some("GPU".into()),
                group_idx: None,
            }),
            KvEvent::BlockStored(BlockStored {
                lora_id: Some(3),
                medium: Some("CPU".into()),
                lora_name: Some("adapter".into()),
                group_idx: Some(1),
                ..stored(vec![H::Int(11)], Some(H::Int(7)), vec![1, 2, 3, 4])
            }),
            KvEvent::AllBlocksCleared,
        ],
        data_parallel_rank: None,
    }
}

#[test]
fn decodes_msgspec_map_layout() {
    assert_eq!(decode_batch(MAP).unwrap(), expected());
}

#[test]
fn decodes_msgspec_array_layout() {
    assert_eq!(decode_batch(ARRAY).unwrap(), expected());
}

#[test]
fn map_layout_is_byte_identical_to_msgspec() {
    assert_eq!(encode_batch(&expected(), Encoding::Map), MAP);
}

#[test]
fn array_layout_round_trips_and_trims_unset_trailing_fields() {
    let bytes = encode_batch(&expected(), Encoding::Array);
    assert_eq!(decode_batch(&bytes).unwrap(), expected());
    // First event: tag + the 7 fields every release has, nothing after.
    let first_event_offset = 1 + 9 + 1; // batch fixarray, f64, events fixarray
    assert_eq!(bytes[first_event_offset], 0x98, "fixarray of 8");
    assert!(bytes.len() < ARRAY.len());
}

#[test]
fn rank_and_unknown_events_and_fields_are_handled() {
    // A newer publisher: an unknown event type, an unknown field, a rank, an extra batch item.
    let payload = {
        let mut b = vec![0x94, 0xcb];
        b.extend_from_slice(&2.5f64.to_be_bytes());
        b.push(0x92);
        // {"type": "Lookahead", "x": 1}
        b.extend_from_slice(&[0x82, 0xa4]);
        b.extend_from_slice(b"type");
        b.push(0xa9);
        b.extend_from_slice(b"Lookahead");
        b.extend_from_slice(&[0xa1, b'x', 0x01]);
        // {"type": "BlockRemoved", "block_hashes": [5], "medium": nil, "locality": {"a": [1]}}
        b.extend_from_slice(&[0x84, 0xa4]);
        b.extend_from_slice(b"type");
        b.push(0xac);
        b.extend_from_slice(b"BlockRemoved");
        b.push(0xac);
        b.extend_from_slice(b"block_hashes");
        b.extend_from_slice(&[0x91, 0x05, 0xa6]);
        b.extend_from_slice(b"medium");
        b.push(0xc0);
        b.push(0xa8);
        b.extend_from_slice(b"locality");
        b.extend_from_slice(&[0x81, 0xa1, b'a', 0x91, 0x01]);
        b.extend_from_slice(&[0x02, 0xc3]); // rank 2, then an unknown trailing item
        b
    };
    let batch = decode_batch(&payload).unwrap();
    assert_eq!(batch.ts, 2.5);
    assert_eq!(batch.data_parallel_rank, Some(2));
    assert_eq!(
        batch.events,
        vec![
            KvEvent::Unknown("Lookahead".into()),
            KvEvent::BlockRemoved(BlockRemoved {
                block_hashes: vec![H::Int(5)],
                medium: None,
                group_idx: None
            })
        ]
    );
}

#[test]
fn malformed_payloads_are_errors_not_panics() {
    for cut in 0..MAP.len() {
        assert!(decode_batch(&MAP[..cut]).is_err(), "prefix of {cut} bytes");
    }
    let mut trailing = MAP.to_vec();
    trailing.push(0xc0);
    assert_eq!(decode_batch(&trailing), Err(DecodeError::TrailingBytes));
    // A huge announced array length with nothing behind it.
    assert!(decode_batch(&[0x92, 0x00, 0xdd, 0xff, 0xff, 0xff, 0xff]).is_err());
    // A stored event without its token ids.
    let bad = [
        0x92, 0x00, 0x91, 0x92, 0xab, b'B', b'l', b'o', b'c', b'k', b'S', b't', b'o', b'r', b'e',
        b'd', 0x90,
    ];
    assert_eq!(decode_batch(&bad), Err(DecodeError::Missing("token_ids")));
}
