//! The router's own chained block keys (llm-d's request keys), independent of the engine's hash
//! algorithm and seed.
//!
//! Exact definition (FNV-1a 64-bit over canonical CBOR, RFC 8949 §4.2.1 "preferred
//! serialization": shortest head for every length and integer):
//! - root = FNV-1a-64( CBOR text string of the model name ), e.g. `"m"` → bytes `61 6d`;
//! - key(block) = FNV-1a-64( CBOR `[parent, [t0, t1, …], extra]` ), an array of 3 items:
//!   `parent` the previous block's key (or the root) as an unsigned integer, the block's token
//!   ids as an array of unsigned integers, and `extra` = `null` (`f6`) for a plain block or, when
//!   the event carries extra keys for it (LoRA name, cache salt, multimodal hashes), an array of
//!   them: text strings, integers (major type 0 or 1) and byte strings.
//!
//! Only full blocks get a key. A request's `cache_salt` keys its first block only, as the
//! engine's hash does: `extra` = `["<salt>"]` for block 0 and `null` after it (an empty salt is
//! no salt), exactly what the engine's BlockStored `extra_keys` say for such a chain, so salted
//! requests match blocks stored under the same salt and nothing else. LoRA and multimodal
//! extra keys are not derived from requests: such blocks never match (conservative: no false
//! hits).

use kvevents::ExtraKey;

const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;

/// FNV-1a 64 fed directly with CBOR items, so no buffer is built.
struct CborFnv(u64);

impl CborFnv {
    fn new() -> Self {
        Self(FNV_OFFSET)
    }

    #[inline]
    fn bytes(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0 ^ u64::from(b)).wrapping_mul(FNV_PRIME);
        }
    }

    /// A CBOR head (major type + argument) in its shortest form.
    #[inline]
    fn head(&mut self, major: u8, arg: u64) {
        let m = major << 5;
        if arg < 24 {
            self.bytes(&[m | arg as u8]);
        } else if arg <= u64::from(u8::MAX) {
            self.bytes(&[m | 24, arg as u8]);
        } else if arg <= u64::from(u16::MAX) {
            self.bytes(&[m | 25]);
            self.bytes(&(arg as u16).to_be_bytes());
        } else if arg <= u64::from(u32::MAX) {
            self.bytes(&[m | 26]);
            self.bytes(&(arg as u32).to_be_bytes());
        } else {
            self.bytes(&[m | 27]);
            self.bytes(&arg.to_be_bytes());
        }
    }

    fn uint(&mut self, v: u64) {
        self.head(0, v);
    }

    fn int(&mut self, v: i64) {
        if v >= 0 {
            self.head(0, v as u64);
        } else {
            // Major type 1 encodes -1 - n.
            self.head(1, !(v as u64));
        }
    }

    fn text(&mut self, s: &str) {
        self.head(3, s.len() as u64);
        self.bytes(s.as_bytes());
    }

    fn byte_string(&mut self, b: &[u8]) {
        self.head(2, b.len() as u64);
        self.bytes(b);
    }

    fn array(&mut self, len: usize) {
        self.head(4, len as u64);
    }

    fn null(&mut self) {
        self.bytes(&[0xf6]);
    }
}

/// The chain root for a model: FNV-1a-64 of the CBOR text string of its name.
pub fn root_key(model: &str) -> u64 {
    let mut h = CborFnv::new();
    h.text(model);
    h.0
}

/// One link of the chain: the key of a block with these tokens after `parent`.
pub fn chain_key(parent: u64, tokens: &[u32], extra: Option<&[ExtraKey]>) -> u64 {
    let mut h = CborFnv::new();
    h.array(3);
    h.uint(parent);
    h.array(tokens.len());
    for &t in tokens {
        h.uint(u64::from(t));
    }
    match extra {
        None => h.null(),
        Some(items) => {
            h.array(items.len());
            for item in items {
                match item {
                    ExtraKey::Str(s) => h.text(s),
                    ExtraKey::Int(i) => h.int(*i),
                    ExtraKey::Bytes(b) => h.byte_string(b),
                }
            }
        }
    }
    h.0
}

/// Keys of the full blocks of `tokens`, chained from `root`; a non-empty `cache_salt` is the
/// first block's extra key.
pub fn block_keys(
    root: u64,
    block_size: usize,
    tokens: &[u32],
    cache_salt: Option<&str>,
) -> Vec<u64> {
    let salt = cache_salt
        .filter(|s| !s.is_empty())
        .map(|s| [ExtraKey::Str(s.to_string())]);
    let mut parent = root;
    tokens
        .chunks_exact(block_size)
        .enumerate()
        .map(|(i, block)| {
            let extra = salt.as_ref().filter(|_| i == 0).map(|s| &s[..]);
            parent = chain_key(parent, block, extra);
            parent
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// FNV-1a-64 over explicit bytes, to check the streamed CBOR against hand-written encodings.
    fn fnv(bytes: &[u8]) -> u64 {
        let mut h = CborFnv::new();
        h.bytes(bytes);
        h.0
    }

    #[test]
    fn fnv_matches_published_vectors() {
        // From the FNV reference test suite (draft-eastlake-fnv).
        assert_eq!(fnv(b""), 0xcbf29ce484222325);
        assert_eq!(fnv(b"a"), 0xaf63dc4c8601ec8c);
        assert_eq!(fnv(b"foobar"), 0x85944171f73967e8);
    }

    #[test]
    fn root_is_fnv_of_cbor_text() {
        let mut expected = vec![0x60 | 5];
        expected.extend_from_slice(b"model");
        assert_eq!(root_key("model"), fnv(&expected));
        let long = "x".repeat(30);
        let mut expected = vec![0x78, 30];
        expected.extend_from_slice(long.as_bytes());
        assert_eq!(root_key(&long), fnv(&expected));
    }

    #[test]
    fn chain_key_is_fnv_of_canonical_cbor() {
        // [1000, [1, 23, 24, 255, 256, 65536], null]
        let bytes = [
            0x83, 0x19, 0x03, 0xe8, 0x86, 0x01, 0x17, 0x18, 0x18, 0x18, 0xff, 0x19, 0x01, 0x00,
            0x1a, 0x00, 0x01, 0x00, 0x00, 0xf6,
        ];
        assert_eq!(
            chain_key(1000, &[1, 23, 24, 255, 256, 65536], None),
            fnv(&bytes)
        );
        // [u64::MAX, [], ["lora", -1, -25, h'ab']]
        let mut bytes = vec![0x83, 0x1b];
        bytes.extend_from_slice(&[0xff; 8]);
        bytes.extend_from_slice(&[0x80, 0x84, 0x64]);
        bytes.extend_from_slice(b"lora");
        bytes.extend_from_slice(&[0x20, 0x38, 0x18, 0x41, 0xab]);
        let extra = [
            ExtraKey::Str("lora".into()),
            ExtraKey::Int(-1),
            ExtraKey::Int(-25),
            ExtraKey::Bytes(vec![0xab]),
        ];
        assert_eq!(chain_key(u64::MAX, &[], Some(&extra)), fnv(&bytes));
    }

    #[test]
    fn block_keys_chain_full_blocks_only() {
        let root = root_key("m");
        let tokens: Vec<u32> = (0..40).collect();
        let keys = block_keys(root, 16, &tokens, None);
        assert_eq!(keys.len(), 2);
        assert_eq!(keys[0], chain_key(root, &tokens[..16], None));
        assert_eq!(keys[1], chain_key(keys[0], &tokens[16..32], None));
        // Same tokens under another model or after another prefix give other keys.
        assert_ne!(block_keys(root_key("n"), 16, &tokens, None)[0], keys[0]);
        assert_ne!(chain_key(keys[1], &tokens[..16], None), keys[0]);
        assert!(block_keys(root, 16, &tokens[..15], None).is_empty());
        // Extra keys make a different block.
        assert_ne!(
            chain_key(root, &tokens[..16], Some(&[ExtraKey::Str("salt".into())])),
            keys[0]
        );
    }

    #[test]
    fn salt_keys_the_first_block_only() {
        let root = root_key("m");
        let tokens: Vec<u32> = (0..40).collect();
        let salt = [ExtraKey::Str("s".into())];
        let salted = block_keys(root, 16, &tokens, Some("s"));
        let first = chain_key(root, &tokens[..16], Some(&salt));
        assert_eq!(salted, [first, chain_key(first, &tokens[16..32], None)]);
        // An empty salt is no salt, as in the engine.
        assert_eq!(
            block_keys(root, 16, &tokens, Some("")),
            block_keys(root, 16, &tokens, None)
        );
    }
}
