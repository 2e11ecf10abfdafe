//! Prefix-cache block hashing, byte-compatible with vLLM v1 (`kv_cache_utils.hash_block_tokens`,
//! `utils/hashing.py`): `hash(block) = H((parent or NONE_HASH, tuple(token_ids), extra_keys))`.
//!
//! Identical digests are what let a router (or a peer pod) predict which blocks this node holds
//! from the token ids alone, so the serialisations below reproduce Python's bytes exactly:
//! `cbor2.dumps(obj, canonical=True)` for the `*_cbor` algorithms and
//! `pickle.dumps(obj, protocol=5)` (CPython 3.11+) for `sha256` / `xxhash`.

use std::fmt;
use std::str::FromStr;

use sha2::{Digest, Sha256};

/// Seed `NONE_HASH` is derived from when `PYTHONHASHSEED` is not set
/// (vLLM `kv_cache_utils.DEFAULT_NONE_HASH_SEED`).
pub const DEFAULT_NONE_HASH_SEED: &str = "vllm-none-hash";

/// `--prefix-caching-hash-algo`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum HashAlgo {
    /// SHA-256 over the pickled tuple (vLLM's default).
    #[default]
    Sha256,
    /// SHA-256 over canonical CBOR: reproducible outside Python.
    Sha256Cbor,
    /// XXH3-128 over the pickled tuple.
    Xxhash,
    /// XXH3-128 over canonical CBOR.
    XxhashCbor,
}

/// A `--prefix-caching-hash-algo` value vLLM does not know.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown prefix-caching hash algorithm {0:?} (expected sha256, sha256_cbor, xxhash or xxhash_cbor)")]
pub struct UnknownHashAlgo(pub String);

impl HashAlgo {
    pub const ALL: [HashAlgo; 4] = [
        Self::Sha256,
        Self::Sha256Cbor,
        Self::Xxhash,
        Self::XxhashCbor,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Sha256 => "sha256",
            Self::Sha256Cbor => "sha256_cbor",
            Self::Xxhash => "xxhash",
            Self::XxhashCbor => "xxhash_cbor",
        }
    }

    /// `H(obj)`: serialise as vLLM does for this algorithm, then digest.
    fn hash(self, obj: &PyObj<'_>) -> BlockHash {
        let buf = match self {
            Self::Sha256Cbor | Self::XxhashCbor => cbor_dumps(obj),
            Self::Sha256 | Self::Xxhash => pickle_dumps(obj),
        };
        match self {
            Self::Sha256 | Self::Sha256Cbor => BlockHash::from_digest(&Sha256::digest(&buf)),
            // `xxhash.xxh3_128_digest`: the 128-bit value, big-endian.
            Self::Xxhash | Self::XxhashCbor => {
                BlockHash::from_digest(&xxhash_rust::xxh3::xxh3_128(&buf).to_be_bytes())
            }
        }
    }
}

impl FromStr for HashAlgo {
    type Err = UnknownHashAlgo;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|a| a.as_str() == s)
            .ok_or_else(|| UnknownHashAlgo(s.to_string()))
    }
}

impl fmt::Display for HashAlgo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A block digest: 32 bytes (sha256*) or 16 bytes (xxhash*). Parent links use the full digest.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BlockHash {
    len: u8,
    bytes: [u8; 32],
}

impl BlockHash {
    /// The hash of a digest (its first 32 bytes), e.g. one read back from a tier's files.
    pub fn from_digest(digest: &[u8]) -> Self {
        let n = digest.len().min(32);
        let mut bytes = [0u8; 32];
        bytes[..n].copy_from_slice(&digest[..n]);
        Self {
            len: n as u8,
            bytes,
        }
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes[..usize::from(self.len)]
    }

    /// The 64-bit form KV events carry by default: the digest's last 8 bytes, big-endian
    /// (vLLM `maybe_convert_block_hash` with `VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES=1`).
    pub fn to_u64(&self) -> u64 {
        let d = self.as_bytes();
        let mut last = [0u8; 8];
        last.copy_from_slice(&d[d.len() - 8..]);
        u64::from_be_bytes(last)
    }
}

impl fmt::Display for BlockHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.as_bytes()
            .iter()
            .try_for_each(|b| write!(f, "{b:02x}"))
    }
}

impl fmt::Debug for BlockHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "BlockHash({self})")
    }
}

/// One element of a block's extra-keys tuple. vLLM puts the LoRA name first (every block), then
/// the `cache_salt` (first block only); both are Python `str`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum ExtraKey {
    Str(String),
}

/// Computes chained block hashes for one algorithm and `NONE_HASH` seed.
#[derive(Debug, Clone)]
pub struct BlockHasher {
    algo: HashAlgo,
    none_hash: BlockHash,
}

impl BlockHasher {
    /// `seed` is the `PYTHONHASHSEED` string when set. Without it vLLM uses
    /// [`DEFAULT_NONE_HASH_SEED`] for sha256*, and a per-process random seed for xxhash*;
    /// we use the fixed default for every algorithm so that hashes stay reproducible.
    pub fn new(algo: HashAlgo, seed: Option<&str>) -> Self {
        // `NONE_HASH = hash_fn(seed)`: the seed is hashed as a Python str object.
        let none_hash = algo.hash(&PyObj::Str(seed.unwrap_or(DEFAULT_NONE_HASH_SEED)));
        Self { algo, none_hash }
    }

    pub fn algo(&self) -> HashAlgo {
        self.algo
    }

    /// The implicit parent of every first block.
    pub fn none_hash(&self) -> BlockHash {
        self.none_hash
    }

    /// Hash of one full block. `extra` empty means Python `None` (vLLM never hashes `()`).
    pub fn hash_block(
        &self,
        parent: Option<&BlockHash>,
        tokens: &[u32],
        extra: &[ExtraKey],
    ) -> BlockHash {
        let parent = parent.unwrap_or(&self.none_hash);
        let extra_objs: Vec<PyObj<'_>> = extra
            .iter()
            .map(|k| match k {
                ExtraKey::Str(s) => PyObj::Str(s),
            })
            .collect();
        let extra_obj = if extra_objs.is_empty() {
            PyObj::None
        } else {
            PyObj::Tuple(&extra_objs)
        };
        let items = [
            PyObj::Bytes(parent.as_bytes()),
            PyObj::Ints(tokens),
            extra_obj,
        ];
        self.algo.hash(&PyObj::Tuple(&items))
    }

    /// Appends to `hashes` the hashes of the full blocks of `tokens` not yet in it, chaining from
    /// its last element; a trailing partial block is not hashed (it can still change).
    pub fn extend_request_hashes(
        &self,
        hashes: &mut Vec<BlockHash>,
        tokens: &[u32],
        block_size: usize,
        cache_salt: Option<&str>,
    ) {
        assert!(block_size > 0, "block_size must be positive");
        let num_full = tokens.len() / block_size;
        for i in hashes.len()..num_full {
            // vLLM: the salt keys the first block only (an empty salt is no salt); the chain
            // carries it into every later block.
            let extra: Vec<ExtraKey> = match cache_salt {
                Some(salt) if i == 0 && !salt.is_empty() => vec![ExtraKey::Str(salt.to_string())],
                _ => Vec::new(),
            };
            let block = &tokens[i * block_size..(i + 1) * block_size];
            let hash = self.hash_block(hashes.last(), block, &extra);
            hashes.push(hash);
        }
    }
}

/// The Python object shapes a block hash is computed over.
enum PyObj<'a> {
    None,
    Bytes(&'a [u8]),
    Str(&'a str),
    /// A tuple of ints (the block's token ids).
    Ints(&'a [u32]),
    Tuple(&'a [PyObj<'a>]),
}

// --- canonical CBOR (RFC 8949 §4.2.1: shortest-form heads; no maps or floats occur here) ---

fn cbor_head(major: u8, value: u64, out: &mut Vec<u8>) {
    let m = major << 5;
    match value {
        0..=23 => out.push(m | value as u8),
        24..=0xff => out.extend_from_slice(&[m | 24, value as u8]),
        0x100..=0xffff => {
            out.push(m | 25);
            out.extend_from_slice(&(value as u16).to_be_bytes());
        }
        0x1_0000..=0xffff_ffff => {
            out.push(m | 26);
            out.extend_from_slice(&(value as u32).to_be_bytes());
        }
        _ => {
            out.push(m | 27);
            out.extend_from_slice(&value.to_be_bytes());
        }
    }
}

fn cbor_encode(obj: &PyObj<'_>, out: &mut Vec<u8>) {
    match obj {
        PyObj::None => out.push(0xf6),
        PyObj::Bytes(b) => {
            cbor_head(2, b.len() as u64, out);
            out.extend_from_slice(b);
        }
        PyObj::Str(s) => {
            cbor_head(3, s.len() as u64, out);
            out.extend_from_slice(s.as_bytes());
        }
        PyObj::Ints(ints) => {
            cbor_head(4, ints.len() as u64, out);
            ints.iter().for_each(|&v| cbor_head(0, u64::from(v), out));
        }
        PyObj::Tuple(items) => {
            cbor_head(4, items.len() as u64, out);
            items.iter().for_each(|item| cbor_encode(item, out));
        }
    }
}

/// `cbor2.dumps(obj, canonical=True)`.
fn cbor_dumps(obj: &PyObj<'_>) -> Vec<u8> {
    let mut out = Vec::with_capacity(64);
    cbor_encode(obj, &mut out);
    out
}

// --- pickle protocol 5, as CPython's C pickler writes it ---

mod op {
    pub const PROTO: u8 = 0x80;
    pub const FRAME: u8 = 0x95;
    pub const STOP: u8 = b'.';
    pub const NONE: u8 = b'N';
    pub const MARK: u8 = b'(';
    pub const TUPLE: u8 = b't';
    pub const EMPTY_TUPLE: u8 = b')';
    pub const TUPLE1: u8 = 0x85;
    pub const MEMOIZE: u8 = 0x94;
    pub const BININT: u8 = b'J';
    pub const BININT1: u8 = b'K';
    pub const BININT2: u8 = b'M';
    pub const LONG1: u8 = 0x8a;
    pub const SHORT_BINBYTES: u8 = b'C';
    pub const BINBYTES: u8 = b'B';
    pub const BINBYTES8: u8 = 0x8e;
    pub const SHORT_BINUNICODE: u8 = 0x8c;
    pub const BINUNICODE: u8 = b'X';
    pub const BINUNICODE8: u8 = 0x8d;
}

/// pickle's framing constants (`_FRAME_SIZE_MIN`, `_FRAME_SIZE_TARGET`) and FRAME header size.
const FRAME_SIZE_MIN: usize = 4;
const FRAME_SIZE_TARGET: usize = 64 * 1024;
const FRAME_HEADER_SIZE: usize = 9;

/// Output buffer with protocol-4+ framing: a frame opens lazily on the first write, is closed
/// at an opcode boundary once it reaches 64 KiB, and loses its header if it holds < 4 bytes.
/// Payloads of >= 64 KiB are written outside any frame.
struct Pickler {
    out: Vec<u8>,
    framing: bool,
    frame_start: Option<usize>,
}

impl Pickler {
    fn write(&mut self, data: &[u8]) {
        if self.framing && self.frame_start.is_none() {
            self.frame_start = Some(self.out.len());
            self.out.extend_from_slice(&[0; FRAME_HEADER_SIZE]);
        }
        self.out.extend_from_slice(data);
    }

    fn commit_frame(&mut self) {
        let Some(start) = self.frame_start.take() else {
            return;
        };
        let frame_len = self.out.len() - start - FRAME_HEADER_SIZE;
        if frame_len >= FRAME_SIZE_MIN {
            self.out[start] = op::FRAME;
            self.out[start + 1..start + FRAME_HEADER_SIZE]
                .copy_from_slice(&(frame_len as u64).to_le_bytes());
        } else {
            self.out.drain(start..start + FRAME_HEADER_SIZE);
        }
    }

    /// Called before each object is saved (where CPython checks whether to close the frame).
    fn opcode_boundary(&mut self) {
        if let Some(start) = self.frame_start {
            if self.out.len() - start - FRAME_HEADER_SIZE >= FRAME_SIZE_TARGET {
                self.commit_frame();
            }
        }
    }

    fn write_payload(&mut self, header: &[u8], data: &[u8]) {
        if data.len() >= FRAME_SIZE_TARGET {
            self.commit_frame();
            self.framing = false;
            self.write(header);
            self.write(data);
            self.framing = true;
        } else {
            self.write(header);
            self.write(data);
        }
    }

    /// Length-prefixed payload: 1-byte length, 4-byte or 8-byte little-endian length opcodes.
    fn sized(&mut self, ops: [u8; 3], data: &[u8]) {
        let mut header = Vec::with_capacity(9);
        match u32::try_from(data.len()) {
            Ok(n) if n <= 0xff => header.extend_from_slice(&[ops[0], n as u8]),
            Ok(n) => {
                header.push(ops[1]);
                header.extend_from_slice(&n.to_le_bytes());
            }
            Err(_) => {
                header.push(ops[2]);
                header.extend_from_slice(&(data.len() as u64).to_le_bytes());
            }
        }
        self.write_payload(&header, data);
        // Every bytes/str object is entered in the memo.
        self.write(&[op::MEMOIZE]);
    }

    fn int(&mut self, v: u32) {
        match v {
            0..=0xff => self.write(&[op::BININT1, v as u8]),
            0x100..=0xffff => {
                self.write(&[op::BININT2]);
                self.write(&(v as u16).to_le_bytes());
            }
            0x1_0000..=0x7fff_ffff => {
                self.write(&[op::BININT]);
                self.write(&v.to_le_bytes());
            }
            // Beyond i32: LONG1 with little-endian two's complement, plus a sign byte.
            _ => {
                self.write(&[op::LONG1, 5]);
                self.write(&v.to_le_bytes());
                self.write(&[0]);
            }
        }
    }

    fn save(&mut self, obj: &PyObj<'_>) {
        self.opcode_boundary();
        match obj {
            PyObj::None => self.write(&[op::NONE]),
            PyObj::Bytes(b) => self.sized([op::SHORT_BINBYTES, op::BINBYTES, op::BINBYTES8], b),
            PyObj::Str(s) => self.sized(
                [op::SHORT_BINUNICODE, op::BINUNICODE, op::BINUNICODE8],
                s.as_bytes(),
            ),
            PyObj::Ints(ints) => self.tuple(ints.len(), |p| {
                ints.iter().for_each(|&v| {
                    p.opcode_boundary();
                    p.int(v);
                })
            }),
            PyObj::Tuple(items) => {
                self.tuple(items.len(), |p| items.iter().for_each(|item| p.save(item)))
            }
        }
    }

    /// Tuple framing around its elements: `()`; `TUPLE1..3`; or `MARK ... TUPLE`. Non-empty
    /// tuples are memoised.
    fn tuple(&mut self, len: usize, save_items: impl FnOnce(&mut Self)) {
        if len == 0 {
            self.write(&[op::EMPTY_TUPLE]);
            return;
        }
        if len > 3 {
            self.write(&[op::MARK]);
        }
        save_items(self);
        if len > 3 {
            self.write(&[op::TUPLE]);
        } else {
            self.write(&[op::TUPLE1 + len as u8 - 1]);
        }
        self.write(&[op::MEMOIZE]);
    }
}

/// `pickle.dumps(obj, protocol=5)`.
fn pickle_dumps(obj: &PyObj<'_>) -> Vec<u8> {
    let mut p = Pickler {
        out: vec![op::PROTO, 5],
        framing: true,
        frame_start: None,
    };
    p.save(obj);
    p.write(&[op::STOP]);
    p.commit_frame();
    p.out
}

#[cfg(test)]
mod tests {
    //! Expected digests come from Python 3.11.7 with cbor2 6.2.1 and xxhash 4.1.0 (vLLM's own
    //! `utils/hashing.py` functions, inlined). Every vector below was printed by this one-liner,
    //! run as `python3 -c "$PY" <algo>`, with PY =
    //!
    //! ```text
    //! import sys,hashlib,pickle,cbor2,xxhash;a=sys.argv[1];ser=(lambda o:cbor2.dumps(o,canonical=True)) if a.endswith("_cbor") else (lambda o:pickle.dumps(o,protocol=pickle.HIGHEST_PROTOCOL));dig=(lambda b:hashlib.sha256(b).digest()) if a.startswith("sha") else xxhash.xxh3_128_digest;H=lambda o:dig(ser(o));N=H("vllm-none-hash");N42=H("42");B0=(1,300,70000,49151);B1=(0,255,256,65535);b0=H((N,B0,None));s0=H((N,B0,("tenant-a",)));print(*[x.hex() for x in (N,N42,b0,H((b0,B1,None)),s0,H((s0,B1,None)),H((N,(1,2,3,4),("my-lora","tenant-a"))),H((N42,B0,None)),H((N,tuple(i%50000 for i in range(30000)),None)),H((N,B0,("x"*70000,))))])
    //! ```
    //!
    //! The printed columns are the fields of [`Vectors`], in order.

    use super::*;

    const B0: [u32; 4] = [1, 300, 70000, 49151];
    const B1: [u32; 4] = [0, 255, 256, 65535];

    struct Vectors {
        algo: HashAlgo,
        /// `N = H("vllm-none-hash")`
        none_hash: &'static str,
        /// `N42 = H("42")`: NONE_HASH with PYTHONHASHSEED=42
        none_hash_seed42: &'static str,
        /// `b0 = H((N, B0, None))`
        block0: &'static str,
        /// `H((b0, B1, None))`
        block1: &'static str,
        /// `s0 = H((N, B0, ("tenant-a",)))`
        salted0: &'static str,
        /// `H((s0, B1, None))`
        salted1: &'static str,
        /// `H((N, (1,2,3,4), ("my-lora","tenant-a")))`
        lora_salt: &'static str,
        /// `H((N42, B0, None))`
        seed42_block0: &'static str,
        /// `H((N, tuple(i%50000 for i in range(30000)), None))`: pickle > 64 KiB, two frames
        big_block: &'static str,
        /// `H((N, B0, ("x"*70000,)))`: a str written outside any frame
        big_salt: &'static str,
    }

    const VECTORS: [Vectors; 4] = [
        Vectors {
            algo: HashAlgo::Sha256,
            none_hash: "066b1e8987e027138e98701c46128929378935f9b6cd1549105ae6b4f0d71198",
            none_hash_seed42: "c0bc02c9fc92a4944335649961b9e55cc41b194bece4801e8c6ef0f0f3f5884a",
            block0: "a121dcb03cb41f9d2cf9e036cfd3f4006db9d03b1ef20e5c2843a449d85ee9f5",
            block1: "6840579efebacd9a909dca0b5465ffdecc05bd3d30f1fb31bdc336d491493de5",
            salted0: "a3a43ec067440668868cf3c958d196eb2fd27d319da7763f2c922b701d8395f4",
            salted1: "a0d9b5fe59ca4435d0b07e5bf39be2f75bb285f4812f99876a52ead617c41e7d",
            lora_salt: "fa2674843fe17ced37541d76c76c65652ee1f335d7192480be50fac02f5f5bbd",
            seed42_block0: "07fdcfc1a5d1822716e7c5300f1d609381f29413d85f00a0b9e4a1776d5c880a",
            big_block: "be390f025b9960ff414fb49cfae3e29e8a62e2d6612575a75a205030d1ddbf24",
            big_salt: "ca0c734dc0119513ebc3bbf32d4673cac0e865e0d997d866b02531140b4551f2",
        },
        Vectors {
            algo: HashAlgo::Sha256Cbor,
            none_hash: "9bd96a485ad84efdafb72ee48a1d7a69bcead0f8f0433173941b276b9581eef0",
            none_hash_seed42: "9fa6eb003f14425eb9c8e6baacfbcaab26257357b829c7bfa74ffcc4f31c1780",
            block0: "0fae1e9320a149ffcaeca4da9a9f5f2ce620c9e33f8896dfd2d974e4fad3c748",
            block1: "4f41afbe3024672be1191418942953f06fc3220678c72ee1d8da60772a5893a8",
            salted0: "39494549d357ee0eeb7638501d130de88ada2875c67cf6a1de74d95b5c82bc4b",
            salted1: "c9d5f72162c5d7e2ddf16b9a67e981f102e135a479127ef9f71021a8061b8181",
            lora_salt: "bd484f3beed504a1a2b82db661abab859ca220a3d93e2088ae70161e88d7efb9",
            seed42_block0: "6ef5e851077f8f8b70a185170d5557ee887928d8a7f405093746e2a793034b7a",
            big_block: "169cc485b38d5490f2580c37430ecc209bc66245e849be7f42fca3c2a7568506",
            big_salt: "2d3f020a98225d123863a8afd19fba223d432d1b192f72c9f14352a4aa88df6f",
        },
        Vectors {
            algo: HashAlgo::Xxhash,
            none_hash: "d98f72b9c430d985211489af307f0229",
            none_hash_seed42: "b6cdd80ea04b31ad0b9fc22fff500882",
            block0: "466e1a39395ecf8d6bd64477da528f09",
            block1: "35f32bb4156af9b31f41fd6410f613bb",
            salted0: "f2905554ccdd237c8274a33eccc8e247",
            salted1: "acfcf828dc6935c04e153fd8275bb1d7",
            lora_salt: "709ee2df076ff8e9102a57ebfa1f4071",
            seed42_block0: "cee8f92eb750e18ba1007b4ef85adc99",
            big_block: "6c5e30dfa6133f2a9740502fcf926b89",
            big_salt: "023ecb0e05c118c7d1a0ebc8fd0ac9bd",
        },
        Vectors {
            algo: HashAlgo::XxhashCbor,
            none_hash: "a4e364baa0791a6f63bbf917db9b700d",
            none_hash_seed42: "a9d2e63407fce1a26c9dc9d7fa2d7caf",
            block0: "bffd7e9993db14c04d0ee40935ea05d0",
            block1: "b03e3380742ec74b5f0ef6c23387a5e6",
            salted0: "4d666ec7f20d551025bf9fb661a4e131",
            salted1: "97ac18c69ed6b64e05044dcfd1aa8f3c",
            lora_salt: "49efca992c5ed451892d67998f2714b8",
            seed42_block0: "b35b19c7da1982b1125af825d61c7a5e",
            big_block: "7b72cdf362eb15d83822b8ba284df1eb",
            big_salt: "899cdfaf9dd067037aa8e9e2f99e2c95",
        },
    ];

    fn hex(bytes: &[u8]) -> String {
        bytes.iter().map(|b| format!("{b:02x}")).collect()
    }

    fn salt(s: &str) -> Vec<ExtraKey> {
        vec![ExtraKey::Str(s.to_string())]
    }

    #[test]
    fn algo_names_round_trip() {
        for algo in HashAlgo::ALL {
            assert_eq!(algo.as_str().parse::<HashAlgo>(), Ok(algo));
            assert_eq!(algo.to_string(), algo.as_str());
        }
        assert_eq!("sha256".parse::<HashAlgo>(), Ok(HashAlgo::Sha256));
        assert_eq!("xxhash_cbor".parse::<HashAlgo>(), Ok(HashAlgo::XxhashCbor));
        assert_eq!(
            "md5".parse::<HashAlgo>(),
            Err(UnknownHashAlgo("md5".into()))
        );
        assert_eq!(
            "SHA256".parse::<HashAlgo>(),
            Err(UnknownHashAlgo("SHA256".into()))
        );
    }

    #[test]
    fn none_hash_matches_python() {
        for v in &VECTORS {
            assert_eq!(
                BlockHasher::new(v.algo, None).none_hash().to_string(),
                v.none_hash,
                "{}",
                v.algo
            );
            // Passing the default seed explicitly is the same as passing none.
            let explicit = BlockHasher::new(v.algo, Some(DEFAULT_NONE_HASH_SEED));
            assert_eq!(explicit.none_hash().to_string(), v.none_hash, "{}", v.algo);
            let seeded = BlockHasher::new(v.algo, Some("42"));
            assert_eq!(
                seeded.none_hash().to_string(),
                v.none_hash_seed42,
                "{}",
                v.algo
            );
        }
    }

    #[test]
    fn digest_sizes() {
        for v in &VECTORS {
            let h = BlockHasher::new(v.algo, None).hash_block(None, &B0, &[]);
            let expected = match v.algo {
                HashAlgo::Sha256 | HashAlgo::Sha256Cbor => 32,
                HashAlgo::Xxhash | HashAlgo::XxhashCbor => 16,
            };
            assert_eq!(h.as_bytes().len(), expected, "{}", v.algo);
        }
    }

    #[test]
    fn two_block_chain_matches_python() {
        for v in &VECTORS {
            let h = BlockHasher::new(v.algo, None);
            let b0 = h.hash_block(None, &B0, &[]);
            assert_eq!(b0.to_string(), v.block0, "{}", v.algo);
            // An explicit NONE_HASH parent is the same as no parent.
            assert_eq!(h.hash_block(Some(&h.none_hash()), &B0, &[]), b0);
            assert_eq!(
                h.hash_block(Some(&b0), &B1, &[]).to_string(),
                v.block1,
                "{}",
                v.algo
            );
        }
    }

    #[test]
    fn extra_keys_match_python() {
        for v in &VECTORS {
            let h = BlockHasher::new(v.algo, None);
            let s0 = h.hash_block(None, &B0, &salt("tenant-a"));
            assert_eq!(s0.to_string(), v.salted0, "{}", v.algo);
            assert_eq!(
                h.hash_block(Some(&s0), &B1, &[]).to_string(),
                v.salted1,
                "{}",
                v.algo
            );
            let keys = [
                ExtraKey::Str("my-lora".into()),
                ExtraKey::Str("tenant-a".into()),
            ];
            assert_eq!(
                h.hash_block(None, &[1, 2, 3, 4], &keys).to_string(),
                v.lora_salt
            );
        }
    }

    #[test]
    fn seeded_chain_matches_python() {
        for v in &VECTORS {
            let h = BlockHasher::new(v.algo, Some("42"));
            assert_eq!(
                h.hash_block(None, &B0, &[]).to_string(),
                v.seed42_block0,
                "{}",
                v.algo
            );
        }
    }

    #[test]
    fn large_inputs_match_python() {
        // Exercises pickle's 64 KiB frame split and the unframed large-str path.
        let big: Vec<u32> = (0..30000).map(|i| i % 50000).collect();
        let big_salt = "x".repeat(70000);
        for v in &VECTORS {
            let h = BlockHasher::new(v.algo, None);
            assert_eq!(
                h.hash_block(None, &big, &[]).to_string(),
                v.big_block,
                "{}",
                v.algo
            );
            assert_eq!(
                h.hash_block(None, &B0, &salt(&big_salt)).to_string(),
                v.big_salt
            );
        }
    }

    #[test]
    fn serialisations_are_byte_identical() {
        let parent: Vec<u8> = (0..32).collect();
        let ints = [
            0,
            23,
            24,
            255,
            256,
            65535,
            65536,
            0x7fff_ffff,
            0x8000_0000,
            u32::MAX,
        ];
        let items = [PyObj::Bytes(&parent), PyObj::Ints(&ints), PyObj::None];
        let obj = PyObj::Tuple(&items);
        // python3 -c 'import pickle;print(pickle.dumps((bytes(range(32)),(0,23,24,255,256,65535,65536,2**31-1,2**31,2**32-1),None),protocol=5).hex())'
        assert_eq!(
            hex(&pickle_dumps(&obj)),
            "80059550000000000000004320000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c\
             1d1e1f94284b004b174b184bff4d00014dffff4a000001004affffff7f8a0500000080008a05ffffffff\
             0074944e87942e"
        );
        // python3 -c 'import cbor2;print(cbor2.dumps((bytes(range(32)),(0,23,24,255,256,65535,65536,2**31-1,2**31,2**32-1),None),canonical=True).hex())'
        assert_eq!(
            hex(&cbor_dumps(&obj)),
            "835820000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f8a0017181818ff\
             19010019ffff1a000100001a7fffffff1a800000001afffffffff6"
        );
        let short = [PyObj::Str("a"), PyObj::Tuple(&[])];
        // python3 -c 'import pickle;print(pickle.dumps(("a",()),protocol=5).hex())'
        assert_eq!(
            hex(&pickle_dumps(&PyObj::Tuple(&short))),
            "80059508000000000000008c0161942986942e"
        );
    }

    #[test]
    fn to_u64_is_last_eight_bytes_big_endian() {
        let h = BlockHasher::new(HashAlgo::Sha256Cbor, None).none_hash();
        // python3 -c 'import hashlib,cbor2;d=hashlib.sha256(cbor2.dumps("vllm-none-hash",canonical=True)).digest();print(int.from_bytes(d,"big")&(2**64-1))'
        assert_eq!(h.to_u64(), 0x941b_276b_9581_eef0);
        let x = BlockHasher::new(HashAlgo::XxhashCbor, None).none_hash();
        assert_eq!(x.to_u64(), 0x63bb_f917_db9b_700d);
    }

    #[test]
    fn request_hashes_extend_incrementally() {
        for algo in HashAlgo::ALL {
            let h = BlockHasher::new(algo, None);
            let tokens: Vec<u32> = B0.iter().chain(B1.iter()).copied().chain([7, 8]).collect();
            let mut all = Vec::new();
            h.extend_request_hashes(&mut all, &tokens, 4, None);
            // Two full blocks; the 2 trailing tokens are not hashed.
            assert_eq!(all.len(), 2);
            assert_eq!(all[0], h.hash_block(None, &B0, &[]));
            assert_eq!(all[1], h.hash_block(Some(&all[0]), &B1, &[]));

            let mut inc = Vec::new();
            h.extend_request_hashes(&mut inc, &tokens[..5], 4, None);
            assert_eq!(inc.len(), 1);
            h.extend_request_hashes(&mut inc, &tokens, 4, None);
            assert_eq!(inc, all);

            let mut salted = Vec::new();
            h.extend_request_hashes(&mut salted, &tokens, 4, Some("tenant-a"));
            assert_eq!(salted[0], h.hash_block(None, &B0, &salt("tenant-a")));
            // Salt only on the first block; the second differs through its parent alone.
            assert_eq!(salted[1], h.hash_block(Some(&salted[0]), &B1, &[]));
            assert_ne!(salted[1], all[1]);

            let mut empty_salt = Vec::new();
            h.extend_request_hashes(&mut empty_salt, &tokens, 4, Some(""));
            assert_eq!(empty_salt, all);
        }
    }
}
