//! Incremental detokenization of a generated sequence, the way vLLM and HF TGI do it: decode a
//! small window of recent tokens (from `prefix_offset`) and emit only what the newest token added,
//! holding text back while it ends inside a multi-byte UTF-8 character.

/// Turns token ids into text (the tokenizer, seen from the detokenizer).
pub trait TokenDecoder {
    fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> String;
}

/// Prompt tokens kept as decoding context (vLLM's `INITIAL_INCREMENTAL_DETOKENIZATION_OFFSET`):
/// tokenizers such as SentencePiece decode a token differently at the start of a text.
const PROMPT_CONTEXT_TOKENS: usize = 5;

/// Decodes one sequence's output token by token.
pub struct IncrementalDetokenizer {
    /// The decoding window: tokens from `prefix_offset` on; older ones are dropped.
    ids: Vec<u32>,
    /// Tokens in `ids` before this index were already emitted; `ids[..read_offset]` decodes to
    /// the text the next token's text is measured against.
    read_offset: usize,
    skip_special_tokens: bool,
}

impl IncrementalDetokenizer {
    pub fn new(prompt_token_ids: &[u32], skip_special_tokens: bool) -> Self {
        let context =
            &prompt_token_ids[prompt_token_ids.len().saturating_sub(PROMPT_CONTEXT_TOKENS)..];
        Self {
            ids: context.to_vec(),
            read_offset: context.len(),
            skip_special_tokens,
        }
    }

    /// Appends one token; returns the newly decodable text (empty while the text ends inside a
    /// multi-byte UTF-8 character, i.e. decoding ends with U+FFFD).
    pub fn push(&mut self, decoder: &dyn TokenDecoder, token_id: u32) -> String {
        self.ids.push(token_id);
        let prefix_text = decoder.decode(&self.ids[..self.read_offset], self.skip_special_tokens);
        let new_text = decoder.decode(&self.ids, self.skip_special_tokens);
        // Lengths in chars, as vLLM compares Python strings.
        let prefix_chars = prefix_text.chars().count();
        if new_text.chars().count() <= prefix_chars || new_text.ends_with('\u{FFFD}') {
            return String::new();
        }
        let start = new_text
            .char_indices()
            .nth(prefix_chars)
            .map_or(new_text.len(), |(i, _)| i);
        // The window slides: the old read offset becomes the prefix offset.
        self.ids.drain(..self.read_offset);
        self.read_offset = self.ids.len();
        new_text[start..].to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A byte-level vocabulary: each token is a byte string, some of them partial UTF-8
    /// sequences; id 0 is a special token.
    struct ByteVocab(Vec<Vec<u8>>);

    const SPECIAL: u32 = 0;

    impl ByteVocab {
        fn new() -> Self {
            let e_acute = "é".as_bytes();
            let crab = "🦀".as_bytes();
            Self(vec![
                b"<s>".to_vec(),
                b"a".to_vec(),
                b" b".to_vec(),
                vec![e_acute[0]],
                vec![e_acute[1]],
                crab[..1].to_vec(),
                crab[1..3].to_vec(),
                crab[3..].to_vec(),
                b"!".to_vec(),
            ])
        }
    }

    impl TokenDecoder for ByteVocab {
        fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> String {
            let bytes: Vec<u8> = ids
                .iter()
                .filter(|&&id| !(skip_special_tokens && id == SPECIAL))
                .flat_map(|&id| self.0[id as usize].iter().copied())
                .collect();
            String::from_utf8_lossy(&bytes).into_owned()
        }
    }

    fn stream(prompt: &[u32], output: &[u32], skip: bool) -> Vec<String> {
        let vocab = ByteVocab::new();
        let mut d = IncrementalDetokenizer::new(prompt, skip);
        output.iter().map(|&id| d.push(&vocab, id)).collect()
    }

    #[test]
    fn pushes_concatenate_to_the_full_decode() {
        let vocab = ByteVocab::new();
        let output = [1, 3, 4, 2, 5, 6, 7, 8, 0, 3, 4, 5, 6, 7, 1];
        for skip in [true, false] {
            let deltas = stream(&[1, 2, 2, 2, 2, 2, 2], &output, skip);
            assert_eq!(deltas.concat(), vocab.decode(&output, skip));
            assert!(deltas.iter().all(|d| !d.contains('\u{FFFD}')), "{deltas:?}");
        }
    }

    #[test]
    fn text_is_held_until_the_character_completes() {
        let deltas = stream(&[], &[1, 3, 4, 5, 6, 7, 8], true);
        assert_eq!(deltas, vec!["a", "", "é", "", "", "🦀", "!"]);
    }

    #[test]
    fn prompt_ending_mid_character_behaves_like_vllm() {
        // The prompt's dangling first byte of "é" is context: the token completing it adds no
        // character over the context's U+FFFD, so (as in vLLM) only what follows is new text.
        let deltas = stream(&[1, 3], &[4, 8], true);
        assert_eq!(deltas, vec!["", "!"]);
    }

    #[test]
    fn window_stays_bounded() {
        let vocab = ByteVocab::new();
        let mut d = IncrementalDetokenizer::new(&[1; 100], true);
        assert_eq!(d.ids.len(), PROMPT_CONTEXT_TOKENS);
        for _ in 0..1000 {
            d.push(&vocab, 2);
        }
        assert!(d.ids.len() <= 2, "{}", d.ids.len());
    }
}
