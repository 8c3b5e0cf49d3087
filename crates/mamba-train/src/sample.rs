//! Text in, text out around the library's generation loop ([`MambaLM::generate`]): the short
//! sample a training run ends with, and [`TextStream`], which turns generated tokens into text
//! as they arrive.

use mamba_nn::model::{MambaLM, Sampler, SamplingConfig};

use crate::tokenizer::Tokenizer;

/// `prompt` followed by `n` tokens sampled at temperature 0.8 with `seed` (an empty prompt
/// starts from token 0).
pub fn sample_text(model: &MambaLM, tok: &dyn Tokenizer, prompt: &str, n: usize, seed: u64) -> String {
    let ids = tok.encode(prompt);
    let ids = if ids.is_empty() { vec![0] } else { ids };
    let cfg = SamplingConfig { temperature: 0.8, top_k: 0, top_p: 1.0 };
    let sampler = Sampler::new(cfg, seed).expect("a valid sampling setting");
    let tokens: Vec<usize> = match model.generate(&ids, n, sampler) {
        Ok(g) => g.collect(),
        // The prompt's ids come from a tokenizer larger than the model: no sample.
        Err(_) => Vec::new(),
    };
    format!("{prompt}{}", tok.decode(&tokens))
}

/// Decodes a stream of tokens into text pieces. Only the tokens not yet emitted are decoded; a
/// piece that ends inside a multi-byte character (decoded as U+FFFD) waits for the next token to
/// complete it.
pub struct TextStream<'t> {
    tok: &'t dyn Tokenizer,
    pending: Vec<usize>,
}

impl<'t> TextStream<'t> {
    /// A stream decoding with `tok`.
    pub fn new(tok: &'t dyn Tokenizer) -> Self {
        Self { tok, pending: Vec::new() }
    }

    /// Adds `token`; returns the text it completes, if any.
    pub fn push(&mut self, token: usize) -> Option<String> {
        self.pending.push(token);
        let piece = self.tok.decode(&self.pending);
        if piece.ends_with('\u{FFFD}') {
            return None;
        }
        self.pending.clear();
        Some(piece)
    }

    /// Whatever is still pending, decoded as it is.
    pub fn finish(&mut self) -> String {
        let rest = self.tok.decode(&self.pending);
        self.pending.clear();
        rest
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tokenizer::ByteTokenizer;

    #[test]
    fn stream_holds_split_characters_back() {
        let tok = ByteTokenizer;
        let text = "né 😀!";
        let mut s = TextStream::new(&tok);
        let mut out = String::new();
        let mut held = 0;
        for b in text.bytes() {
            match s.push(b as usize) {
                Some(p) => out += &p,
                None => held += 1,
            }
        }
        out += &s.finish();
        assert_eq!(out, text);
        assert_eq!(held, 1 + 3, "é waits for one byte, the emoji for three");
    }
}
