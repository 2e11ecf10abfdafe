//! Byte mutations: a deterministic RNG and the edits the runner applies to an input, biased
//! to what breaks decoders (boundary numbers, length prefixes, format tokens, splices).

/// xorshift64*: deterministic from its seed, so a finding can be replayed.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(seed.max(1))
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// Uniform in `0..n` (`n` > 0).
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }
}

/// Single bytes that sit on boundaries or mean something in msgpack, JSON or YAML.
const BYTES: &[u8] = &[
    0x00, 0x01, 0x7f, 0x80, 0xff, 0xc0, 0xc1, 0xc2, 0xc3, 0xc4, 0xca, 0xcb, 0xcc, 0xcd, 0xce, 0xcf,
    0xd0, 0xd3, 0xd9, 0xda, 0xdb, 0xdc, 0xdd, 0xde, 0xdf, 0x90, 0x91, 0x93, 0x9f, 0x80, 0x81, 0x8f,
    0xa0, 0xbf, b'"', b'{', b'}', b'[', b']', b',', b':', b'\\', b'-', b'0', b'9', b'e', b'.',
    b'\n', b' ', b'#', b'&', b'*', b'!', b'|', b'>',
];

/// Numbers at the edges of the widths decoders read, big-endian as msgpack and our seqs are.
const WORDS: &[u64] = &[
    0,
    1,
    0x7f,
    0xff,
    0x7fff,
    0xffff,
    0x7fff_ffff,
    0xffff_ffff,
    0x8000_0000_0000_0000,
    u64::MAX,
];

/// One to four edits of `input`; `pool` is spliced from and `dictionary` inserted from; the
/// result is at most `max_len` bytes.
pub fn mutate(
    rng: &mut Rng,
    input: &[u8],
    pool: &[Vec<u8>],
    dictionary: &[&[u8]],
    max_len: usize,
) -> Vec<u8> {
    let mut out = input.to_vec();
    for _ in 0..1 + rng.below(4) {
        let len = out.len();
        let at = rng.below(len + 1);
        match rng.below(10) {
            0 if len > 0 => {
                let i = rng.below(len);
                out[i] ^= 1 << rng.below(8);
            }
            1 if len > 0 => {
                let i = rng.below(len);
                out[i] = BYTES[rng.below(BYTES.len())];
            }
            2 => {
                let n = 1 + rng.below(8);
                let bytes: Vec<u8> = (0..n).map(|_| rng.next_u64() as u8).collect();
                out.splice(at..at, bytes);
            }
            3 if len > 0 => {
                let n = 1 + rng.below((len - at).clamp(1, 16));
                out.drain(at..(at + n).min(len));
            }
            4 if len > 0 => {
                let from = rng.below(len);
                let n = 1 + rng.below((len - from).min(64));
                let chunk = out[from..from + n].to_vec();
                out.splice(at..at, chunk);
            }
            5 if !pool.is_empty() => {
                let other = &pool[rng.below(pool.len())];
                let from = rng.below(other.len() + 1);
                out.truncate(at);
                out.extend_from_slice(&other[from..]);
            }
            6 => {
                let word = WORDS[rng.below(WORDS.len())].to_be_bytes();
                let width = [1, 2, 4, 8][rng.below(4)];
                let bytes = &word[8 - width..];
                let end = (at + width).min(len);
                out.splice(at..end, bytes.iter().copied());
            }
            7 => out.truncate(at),
            8 if !dictionary.is_empty() => {
                let token = dictionary[rng.below(dictionary.len())];
                out.splice(at..at, token.iter().copied());
            }
            _ => {
                // Repeat a byte run: deep nesting and long strings.
                if len > 0 {
                    let i = rng.below(len);
                    let n = 1 + rng.below(256);
                    out.splice(i..i, std::iter::repeat_n(out[i], n));
                }
            }
        }
    }
    out.truncate(max_len);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deterministic_and_bounded() {
        let pool = vec![b"{\"a\": 1}".to_vec()];
        let run = |seed| {
            let mut rng = Rng::new(seed);
            (0..200)
                .map(|_| mutate(&mut rng, b"{\"prompt\": \"x\"}", &pool, &[b"null"], 40))
                .collect::<Vec<_>>()
        };
        assert_eq!(run(7), run(7));
        assert_ne!(run(7), run(8));
        assert!(run(7).iter().all(|m| m.len() <= 40));
        assert!(run(7)
            .iter()
            .any(|m| m.as_slice() != b"{\"prompt\": \"x\"}"));
    }
}
