//! The tokenizer: a `tokenizers::Tokenizer` built from GGUF metadata or read from a Hugging Face
//! `tokenizer.json`, plus the special-token facts the engine needs (EOS ids, BOS/EOS strings,
//! which ids are special) and per-token bytes for logprobs.

use std::collections::{HashMap, HashSet};
use std::sync::OnceLock;

use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::decoders::DecoderWrapper;
use tokenizers::models::bpe::{Vocab, BPE};
use tokenizers::normalizers::unicode::NFC;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::{AddedToken, SplitDelimiterBehavior};

use protocol::ApiError;

use crate::gguf::{MetaValue, Metadata};
use crate::LoadError;

/// `token_type` value llama.cpp uses for control (special) tokens.
const TOKEN_TYPE_CONTROL: u32 = 3;
/// `token_type` value for user-defined tokens: matched whole, but not special.
const TOKEN_TYPE_USER_DEFINED: u32 = 4;

/// Split regexes of llama.cpp's `tokenizer.ggml.pre` families (as in their tokenizer.json).
const REGEX_QWEN2: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const REGEX_LLAMA3: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// A loaded tokenizer. `Send + Sync`: shared read-only by the server and the engine.
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    eos_token_ids: Vec<u32>,
    bos_token: Option<String>,
    eos_token: Option<String>,
    special_ids: HashSet<u32>,
    /// Whether the decoder is byte-level (GPT-2 style), so vocab strings map to bytes by table.
    byte_level: bool,
    /// Longest vocabulary entry in characters: a text longer than `max_model_len` times this
    /// cannot fit, and is refused before the tokenizer spends time and memory on it.
    max_chars_per_token: usize,
}

impl Tokenizer {
    /// Wraps a built tokenizer. `eos_token_ids` are the ids that end generation.
    pub fn new(
        inner: tokenizers::Tokenizer,
        eos_token_ids: Vec<u32>,
        bos_token: Option<String>,
        eos_token: Option<String>,
    ) -> Self {
        let special_ids = inner
            .get_added_tokens_decoder()
            .into_iter()
            .filter(|(_, t)| t.special)
            .map(|(id, _)| id)
            .collect();
        let byte_level = matches!(inner.get_decoder(), Some(DecoderWrapper::ByteLevel(_)));
        let max_chars_per_token = (0..inner.get_vocab_size(true) as u32)
            .filter_map(|id| inner.id_to_token(id))
            .map(|t| t.chars().count())
            .max()
            .unwrap_or(1)
            .max(1);
        Self {
            inner,
            eos_token_ids,
            bos_token,
            eos_token,
            special_ids,
            byte_level,
            max_chars_per_token,
        }
    }

    /// Builds the tokenizer llama.cpp describes in GGUF metadata (`tokenizer.ggml.*`). Only
    /// byte-level BPE (`tokenizer.ggml.model = gpt2`) is supported.
    pub fn from_gguf(ct: &Metadata) -> Result<Self, LoadError> {
        let model = gguf_string(ct, "tokenizer.ggml.model")?;
        if model != "gpt2" {
            return Err(LoadError::Tokenizer(format!(
                "unsupported GGUF tokenizer model \"{model}\" (supported: gpt2 byte-level BPE)"
            )));
        }
        let tokens = gguf_strings(ct, "tokenizer.ggml.tokens")?;
        let vocab: Vocab = tokens
            .iter()
            .enumerate()
            .map(|(i, t)| (t.clone(), i as u32))
            .collect();
        let merges = gguf_strings(ct, "tokenizer.ggml.merges")?
            .into_iter()
            .map(|m| match m.split_once(' ') {
                Some((a, b)) => Ok((a.to_string(), b.to_string())),
                None => Err(LoadError::Tokenizer(format!("malformed merge \"{m}\""))),
            })
            .collect::<Result<Vec<_>, _>>()?;
        let bpe = BPE::builder()
            .vocab_and_merges(vocab, merges)
            .build()
            .map_err(|e| LoadError::Tokenizer(format!("building BPE: {e}")))?;
        let mut inner = tokenizers::Tokenizer::new(bpe);

        let pre = match ct.contains_key("tokenizer.ggml.pre") {
            true => gguf_string(ct, "tokenizer.ggml.pre")?,
            false => "gpt2".to_string(),
        };
        let byte_level =
            |use_regex| PreTokenizerWrapper::from(ByteLevel::new(false, true, use_regex));
        let split = |regex: &str| -> Result<PreTokenizerWrapper, LoadError> {
            let split = Split::new(
                SplitPattern::Regex(regex.to_string()),
                SplitDelimiterBehavior::Isolated,
                false,
            )
            .map_err(|e| LoadError::Tokenizer(format!("pre-tokenizer regex: {e}")))?;
            Ok(split.into())
        };
        let pre_tokenizer: PreTokenizerWrapper = match pre.as_str() {
            "smollm" => Sequence::new(vec![Digits::new(true).into(), byte_level(true)]).into(),
            "qwen2" => {
                inner
                    .with_normalizer(Some(NFC))
                    .map_err(|e| LoadError::Tokenizer(e.to_string()))?;
                Sequence::new(vec![split(REGEX_QWEN2)?, byte_level(false)]).into()
            }
            "llama3" | "llama-bpe" | "smaug-bpe" => {
                Sequence::new(vec![split(REGEX_LLAMA3)?, byte_level(false)]).into()
            }
            _ => byte_level(true),
        };
        inner.with_pre_tokenizer(Some(pre_tokenizer));
        inner.with_decoder(Some(ByteLevelDecoder::default()));

        let types = match ct.get("tokenizer.ggml.token_type") {
            Some(v) => v
                .as_array()
                .ok_or_else(|| {
                    LoadError::Tokenizer("tokenizer.ggml.token_type: not an array".into())
                })?
                .iter()
                .map(gguf_u32)
                .collect::<Result<Vec<_>, _>>()?,
            None => Vec::new(),
        };
        let added = |kind: u32, special: bool| -> Vec<AddedToken> {
            types
                .iter()
                .zip(&tokens)
                .filter(|(t, _)| **t == kind)
                .map(|(_, tok)| AddedToken::from(tok.clone(), special))
                .collect()
        };
        inner
            .add_special_tokens(added(TOKEN_TYPE_CONTROL, true))
            .map_err(|e| LoadError::Tokenizer(e.to_string()))?;
        inner
            .add_tokens(added(TOKEN_TYPE_USER_DEFINED, false))
            .map_err(|e| LoadError::Tokenizer(e.to_string()))?;

        let token_of = |key: &str| -> Result<Option<(u32, String)>, LoadError> {
            let Some(v) = ct.get(key) else {
                return Ok(None);
            };
            let id = gguf_u32(v)?;
            match tokens.get(id as usize) {
                Some(t) => Ok(Some((id, t.clone()))),
                None => Err(LoadError::Tokenizer(format!(
                    "{key} = {id} is outside the vocabulary"
                ))),
            }
        };
        let bos = token_of("tokenizer.ggml.bos_token_id")?;
        let eos = token_of("tokenizer.ggml.eos_token_id")?;
        let eos_ids = eos.iter().map(|(id, _)| *id).collect();
        Ok(Self::new(
            inner,
            eos_ids,
            bos.map(|(_, t)| t),
            eos.map(|(_, t)| t),
        ))
    }

    /// The longest vocabulary entry, in characters.
    pub fn max_chars_per_token(&self) -> usize {
        self.max_chars_per_token
    }

    /// vLLM's check before tokenizing: a text of `chars` characters must be able to fit in
    /// `max_model_len` tokens of the longest vocabulary entry.
    pub fn check_length(&self, chars: usize, max_model_len: usize) -> Result<(), ApiError> {
        let max_chars = max_model_len.saturating_mul(self.max_chars_per_token);
        if chars <= max_chars {
            return Ok(());
        }
        Err(ApiError::invalid_value(
            format!(
                "You passed {chars} input characters. However, the model's context length is \
                 only {max_model_len} tokens (at most {max_chars} characters). Please reduce \
                 the length of the input prompt."
            ),
            "input_text",
            chars,
        ))
    }

    /// Encodes enough of the end of `text` for its last `keep` tokens (a request with
    /// `truncate_prompt_tokens` keeps only those): a tail of `keep + 1` tokens' worth of the
    /// longest entry holds at least `keep + 1` tokens, and the one cut at the start is among
    /// those the caller drops. So a huge text costs the tokenizer no more than a short one.
    pub fn encode_tail(
        &self,
        text: &str,
        keep: usize,
        add_special_tokens: bool,
    ) -> Result<Vec<u32>, LoadError> {
        let max_chars = keep
            .saturating_add(1)
            .saturating_mul(self.max_chars_per_token);
        let start = text
            .char_indices()
            .rev()
            .nth(max_chars.saturating_sub(1))
            .map_or(0, |(i, _)| i);
        self.encode(&text[start..], add_special_tokens)
    }

    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>, LoadError> {
        let enc = self
            .inner
            .encode_fast(text, add_special_tokens)
            .map_err(|e| LoadError::Tokenizer(format!("encode: {e}")))?;
        Ok(enc.get_ids().to_vec())
    }

    /// Decodes ids to text. Never fails: unknown ids are skipped and incomplete UTF-8 becomes
    /// U+FFFD.
    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> String {
        match self.inner.decode(ids, skip_special_tokens) {
            Ok(s) => s,
            // Decoders only fail on malformed configurations; the raw bytes are the best answer.
            Err(_) => {
                let bytes: Vec<u8> = ids
                    .iter()
                    .filter(|id| !skip_special_tokens || !self.is_special(**id))
                    .flat_map(|id| self.token_bytes(*id))
                    .collect();
                String::from_utf8_lossy(&bytes).into_owned()
            }
        }
    }

    /// The raw vocabulary string of `id` (e.g. `Ġthe` for byte-level BPE).
    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    /// The bytes `id` decodes to on its own; empty for an unknown id.
    pub fn token_bytes(&self, id: u32) -> Vec<u8> {
        let Some(token) = self.inner.id_to_token(id) else {
            return Vec::new();
        };
        if self.byte_level {
            // Same rule as the ByteLevel decoder: map every char back to its byte, or, if any
            // char is outside the table (added tokens), take the string as is.
            let table = char_to_byte();
            let mapped: Option<Vec<u8>> = token.chars().map(|c| table.get(&c).copied()).collect();
            return mapped.unwrap_or_else(|| token.into_bytes());
        }
        if let Some(hex) = token.strip_prefix("<0x").and_then(|t| t.strip_suffix('>')) {
            if let Ok(b) = u8::from_str_radix(hex, 16) {
                return vec![b];
            }
        }
        self.inner
            .decode(&[id], false)
            .map(String::into_bytes)
            .unwrap_or_else(|_| token.into_bytes())
    }

    /// Number of ids, added tokens included.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    pub fn eos_token_ids(&self) -> &[u32] {
        &self.eos_token_ids
    }

    pub fn bos_token(&self) -> Option<&str> {
        self.bos_token.as_deref()
    }

    pub fn eos_token(&self) -> Option<&str> {
        self.eos_token.as_deref()
    }

    pub fn is_special(&self, id: u32) -> bool {
        self.special_ids.contains(&id)
    }

    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// The wrapped `tokenizers` tokenizer (e.g. to serialise it as tokenizer.json).
    pub fn inner(&self) -> &tokenizers::Tokenizer {
        &self.inner
    }
}

/// Inverse of GPT-2's `bytes_to_unicode`: the printable char each byte is spelled with.
fn char_to_byte() -> &'static HashMap<char, u8> {
    static TABLE: OnceLock<HashMap<char, u8>> = OnceLock::new();
    TABLE.get_or_init(|| {
        let printable = |b: u8| matches!(b, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF);
        let mut next = 256u32;
        (0..=255u8)
            .map(|b| {
                let c = if printable(b) {
                    char::from(b)
                } else {
                    let c = char::from_u32(next).unwrap_or(char::REPLACEMENT_CHARACTER);
                    next += 1;
                    c
                };
                (c, b)
            })
            .collect()
    })
}

fn gguf_string(ct: &Metadata, key: &str) -> Result<String, LoadError> {
    ct.get(key)
        .ok_or_else(|| LoadError::Tokenizer(format!("GGUF metadata has no {key}")))?
        .as_str()
        .map(str::to_string)
        .ok_or_else(|| LoadError::Tokenizer(format!("{key}: not a string")))
}

fn gguf_strings(ct: &Metadata, key: &str) -> Result<Vec<String>, LoadError> {
    let bad = || LoadError::Tokenizer(format!("{key}: not an array of strings"));
    ct.get(key)
        .ok_or_else(|| LoadError::Tokenizer(format!("GGUF metadata has no {key}")))?
        .as_array()
        .ok_or_else(bad)?
        .iter()
        .map(|v| v.as_str().map(str::to_string).ok_or_else(bad))
        .collect()
}

fn gguf_u32(v: &MetaValue) -> Result<u32, LoadError> {
    v.as_int()
        .and_then(|n| u32::try_from(n).ok())
        .ok_or_else(|| LoadError::Tokenizer(format!("expected a token id/type, got {v:?}")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::{gguf_path, smollm};

    /// Expected ids from HF `tokenizers` 0.23.3 (Python) on the equivalent tokenizer built from
    /// the GGUF metadata (`pip install tokenizers gguf`):
    /// ```python
    /// from gguf import GGUFReader
    /// from tokenizers import Tokenizer, AddedToken, models, pre_tokenizers, decoders
    /// r = GGUFReader("models/SmolLM2-135M-Instruct.Q4_1.gguf")
    /// toks = r.fields["tokenizer.ggml.tokens"].contents()
    /// merges = [tuple(m.split(" ", 1)) for m in r.fields["tokenizer.ggml.merges"].contents()]
    /// types = r.fields["tokenizer.ggml.token_type"].contents()
    /// tok = Tokenizer(models.BPE({t: i for i, t in enumerate(toks)}, merges))
    /// tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
    ///     pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    /// tok.decoder = decoders.ByteLevel()
    /// tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
    ///                         for t, ty in zip(toks, types) if ty == 3])
    /// for t in texts: print(repr(t), tok.encode(t).ids)
    /// ```
    const VECTORS: &[(&str, &[u32])] = &[
        ("What is the capital of France?", &[1780, 314, 260, 3575, 282, 4649, 47]),
        (
            "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n",
            &[
                1, 9690, 198, 2683, 359, 253, 5356, 5646, 11173, 3365, 3511, 308, 34519, 28, 7018,
                411, 407, 19712, 8182, 2, 198, 1, 4093, 198, 1780, 314, 260, 3575, 282, 4649, 47,
                2, 198, 1, 520, 9531, 198,
            ],
        ),
        (
            "In 2024, 12345 people paid $3.50 each (≈ €3.20).",
            &[
                788, 216, 34, 32, 34, 36, 28, 216, 33, 34, 35, 36, 37, 701, 5940, 1885, 35, 30,
                37, 32, 971, 365, 40533, 226, 24927, 35, 30, 34, 32, 595,
            ],
        ),
        (
            "  leading spaces,\ttabs\n\nand   newlines  ",
            &[216, 2899, 5600, 28, 197, 100, 7366, 198, 198, 397, 256, 725, 5110, 256],
        ),
        (
            "Ünïcödé: 日本語のテキスト, emoji 🦀🚀, ∑x²",
            &[
                142, 246, 94, 25972, 83, 7466, 84, 2756, 42, 17097, 241, 115, 40993, 179, 120,
                248, 26453, 11100, 224, 10391, 251, 10391, 134, 11100, 226, 28, 649, 33777, 15107,
                116, 218, 10813, 244, 218, 28, 19995, 235, 104, 19133,
            ],
        ),
        (
            "def f(x):\n    return x**2  # it's <|endoftext|> done",
            &[1604, 275, 24, 104, 727, 472, 1003, 1792, 828, 34, 216, 907, 357, 506, 216, 0, 2294],
        ),
    ];

    #[test]
    fn matches_hf_tokenizers_and_round_trips() {
        let Some(m) = smollm() else { return };
        let tok = &m.tokenizer;
        for (text, ids) in VECTORS {
            assert_eq!(tok.encode(text, false).unwrap(), *ids, "{text:?}");
            // No post-processor: add_special_tokens adds nothing (no BOS for this model).
            assert_eq!(tok.encode(text, true).unwrap(), *ids, "{text:?}");
            assert_eq!(tok.decode(ids, false), *text);
        }
        let chat = VECTORS[1].1;
        assert_eq!(
            tok.decode(chat, true),
            "system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face\nuser\n\
             What is the capital of France?\nassistant\n"
        );
    }

    /// Pre-tokenizer splits of the `tokenizer.ggml.pre` families, and the unsupported model.
    #[test]
    fn gguf_pre_tokenizer_families() {
        use tokenizers::{OffsetReferential, OffsetType, PreTokenizedString, PreTokenizer};
        let Some(path) = Some(gguf_path()).filter(|p| p.is_file()) else {
            eprintln!("SKIPPED: default GGUF not found");
            return;
        };
        let mut ct = Metadata::read_path(&path).unwrap();
        let mut splits = |pre: &str, text: &str| -> Vec<String> {
            let v = MetaValue::String(pre.to_string());
            ct.entries.insert("tokenizer.ggml.pre".into(), v);
            let tok = Tokenizer::from_gguf(&ct).unwrap();
            let mut s = PreTokenizedString::from(text);
            tok.inner()
                .get_pre_tokenizer()
                .unwrap()
                .pre_tokenize(&mut s)
                .unwrap();
            s.get_splits(OffsetReferential::Original, OffsetType::Byte)
                .into_iter()
                .map(|(s, _, _)| s.to_string())
                .collect()
        };
        // qwen2/llama3: the splits candle's GGUF tokenizer tests expect for the families'
        // tokenizer.json regexes.
        let text = "Hello'Ve world 123\n\n  foo";
        let qwen2 = [
            "Hello", "'Ve", "Ġworld", "Ġ", "1", "2", "3", "ĊĊ", "Ġ", "Ġfoo",
        ];
        assert_eq!(splits("qwen2", text), qwen2);
        let llama3 = ["Hello", "'Ve", "Ġworld", "Ġ", "123", "ĊĊ", "Ġ", "Ġfoo"];
        assert_eq!(splits("llama3", text), llama3);
        // smollm and plain gpt2: as Python tokenizers 0.23.3 `pre_tokenize_str` splits them.
        let smollm = [
            "Hello", "'", "Ve", "Ġworld", "Ġ", "1", "2", "3", "ĊĊĠ", "Ġfoo",
        ];
        assert_eq!(splits("smollm", text), smollm);
        let gpt2 = ["Hello", "'", "Ve", "Ġworld", "Ġ123", "ĊĊĠ", "Ġfoo"];
        assert_eq!(splits("some-other-bpe", text), gpt2);

        let llama = MetaValue::String("llama".into());
        ct.entries.insert("tokenizer.ggml.model".into(), llama);
        let err = Tokenizer::from_gguf(&ct).err().unwrap();
        assert!(
            err.to_string()
                .contains("unsupported GGUF tokenizer model \"llama\""),
            "{err}"
        );
    }

    #[test]
    fn special_tokens_and_token_bytes() {
        let Some(m) = smollm() else { return };
        let tok = &m.tokenizer;
        assert_eq!(tok.vocab_size(), 49152);
        assert_eq!(tok.token_to_id("<|im_start|>"), Some(1));
        assert_eq!(tok.encode("<|im_end|>", false).unwrap(), [2]);
        assert!(tok.is_special(0) && tok.is_special(1) && tok.is_special(2) && tok.is_special(16));
        assert!(!tok.is_special(17) && !tok.is_special(260));
        assert_eq!(tok.id_to_token(216).as_deref(), Some("Ġ"));
        assert_eq!(tok.id_to_token(49152), None);

        assert_eq!(tok.token_bytes(216), b" ");
        assert_eq!(tok.token_bytes(198), b"\n");
        assert_eq!(tok.token_bytes(3575), b" capital");
        assert_eq!(tok.token_bytes(2), b"<|im_end|>");
        assert_eq!(tok.token_bytes(49152), b"");
        // "🦀" (F0 9F A6 80) is three tokens; the first (F0 9F) alone is half a character.
        let crab = tok.encode("🦀", false).unwrap();
        let bytes: Vec<u8> = crab.iter().flat_map(|&id| tok.token_bytes(id)).collect();
        assert_eq!(bytes, "🦀".as_bytes());
        assert!(crab.len() > 1);
        assert_eq!(tok.decode(&crab[..1], false), "\u{FFFD}");
        // Unknown ids are skipped, not errors.
        assert_eq!(tok.decode(&[1780, 999_999, 314], false), "What is");
    }
}
