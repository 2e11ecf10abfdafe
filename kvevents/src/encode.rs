//! Batch encoding as vLLM's msgspec does it: the batch is the positional array
//! `[ts, events, data_parallel_rank]`; each event is a tagged map or a positional array with
//! the tag first, fields in declaration order. The map form is byte-identical to msgspec's
//! (`omit_defaults`: unset optional fields left out); the array form ends after the last set
//! optional field, so decoders of older releases, which reject longer arrays, still read it.

use crate::msgpack::Writer;
use crate::types::{Encoding, EventBatch, ExternalBlockHash, ExtraKey, KvEvent};

/// The msgpack payload of one live message (or one replayed batch).
pub fn encode_batch(batch: &EventBatch, encoding: Encoding) -> Vec<u8> {
    let size: usize = batch
        .events
        .iter()
        .map(|e| match e {
            KvEvent::BlockStored(s) => 64 + s.token_ids.len() * 3 + s.block_hashes.len() * 9,
            _ => 64,
        })
        .sum();
    let mut w = Writer::with_capacity(32 + size);
    w.array(3);
    w.f64(batch.ts);
    w.array(batch.events.len());
    for event in &batch.events {
        write_event(&mut w, event, encoding);
    }
    opt_int(&mut w, batch.data_parallel_rank);
    w.into_vec()
}

fn write_event(w: &mut Writer, event: &KvEvent, enc: Encoding) {
    match event {
        KvEvent::BlockStored(s) => {
            let has_extra = s.extra_keys.is_some();
            let has_group = s.group_idx.is_some();
            // Map: each unset optional field is left out. Array: positional, so an unset field
            // before a set one is nil; trailing unset ones are left out for older decoders.
            let (extra, group) = match enc {
                Encoding::Map => (has_extra, has_group),
                Encoding::Array => (has_extra || has_group, has_group),
            };
            header(
                w,
                enc,
                event.tag(),
                7 + usize::from(extra) + usize::from(group),
            );
            name(w, enc, "block_hashes");
            hashes(w, &s.block_hashes);
            name(w, enc, "parent_block_hash");
            match &s.parent_block_hash {
                Some(h) => hash(w, h),
                None => w.nil(),
            }
            name(w, enc, "token_ids");
            w.array(s.token_ids.len());
            s.token_ids.iter().for_each(|&t| w.uint(t as u64));
            name(w, enc, "block_size");
            w.uint(s.block_size as u64);
            name(w, enc, "lora_id");
            opt_int(w, s.lora_id);
            name(w, enc, "medium");
            opt_str(w, s.medium.as_deref());
            name(w, enc, "lora_name");
            opt_str(w, s.lora_name.as_deref());
            if extra {
                name(w, enc, "extra_keys");
                match &s.extra_keys {
                    Some(keys) => extra_keys(w, keys),
                    None => w.nil(),
                }
            }
            if group {
                name(w, enc, "group_idx");
                opt_int(w, s.group_idx);
            }
        }
        KvEvent::BlockRemoved(r) => {
            header(w, enc, event.tag(), 2 + usize::from(r.group_idx.is_some()));
            name(w, enc, "block_hashes");
            hashes(w, &r.block_hashes);
            name(w, enc, "medium");
            opt_str(w, r.medium.as_deref());
            if r.group_idx.is_some() {
                name(w, enc, "group_idx");
                opt_int(w, r.group_idx);
            }
        }
        KvEvent::AllBlocksCleared | KvEvent::Unknown(_) => header(w, enc, event.tag(), 0),
    }
}

/// The container and the tag: `{"type": tag, ...}` or `[tag, ...]`.
fn header(w: &mut Writer, enc: Encoding, tag: &str, num_fields: usize) {
    match enc {
        Encoding::Map => {
            w.map(num_fields + 1);
            w.str("type");
        }
        Encoding::Array => w.array(num_fields + 1),
    }
    w.str(tag);
}

/// A field's key (map form only; the array form is positional).
fn name(w: &mut Writer, enc: Encoding, field: &str) {
    if enc == Encoding::Map {
        w.str(field);
    }
}

fn hash(w: &mut Writer, h: &ExternalBlockHash) {
    match h {
        ExternalBlockHash::Int(v) => w.uint(*v),
        ExternalBlockHash::Bytes(b) => w.bin(b),
    }
}

fn hashes(w: &mut Writer, hs: &[ExternalBlockHash]) {
    w.array(hs.len());
    hs.iter().for_each(|h| hash(w, h));
}

fn opt_int(w: &mut Writer, v: Option<i64>) {
    match v {
        Some(v) => w.sint(v),
        None => w.nil(),
    }
}

fn opt_str(w: &mut Writer, v: Option<&str>) {
    match v {
        Some(s) => w.str(s),
        None => w.nil(),
    }
}

fn extra_keys(w: &mut Writer, keys: &[Option<Vec<ExtraKey>>]) {
    w.array(keys.len());
    for block in keys {
        let Some(items) = block else {
            w.nil();
            continue;
        };
        w.array(items.len());
        for item in items {
            match item {
                ExtraKey::Str(s) => w.str(s),
                ExtraKey::Int(i) => w.sint(*i),
                ExtraKey::Bytes(b) => w.bin(b),
            }
        }
    }
}
