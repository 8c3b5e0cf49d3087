//! Tokenizers: the [`Tokenizer`] trait, the lossless [`ByteTokenizer`], and [`HfTokenizer`] for a
//! Hugging Face `tokenizer.json` (through the pure-Rust `tokenizers` crate; nothing is ever
//! downloaded).
//!
//! ```
//! use mamba_train::tokenizer::{ByteTokenizer, Tokenizer};
//!
//! let tok = ByteTokenizer;
//! let ids = tok.encode("Mamba ∑");
//! assert_eq!(&ids[..2], &[77, 97]);
//! assert_eq!(tok.decode(&ids), "Mamba ∑");
//! ```

use std::path::{Path, PathBuf};

/// Text ↔ token ids.
pub trait Tokenizer: Send + Sync {
    /// The ids of `text` (no special tokens added).
    fn encode(&self, text: &str) -> Vec<usize>;
    /// The text of `ids` (special tokens kept; ids the tokenizer does not know are handled as each
    /// implementation documents).
    fn decode(&self, ids: &[usize]) -> String;
    /// Number of ids this tokenizer can produce (every id is `< vocab_size()`).
    fn vocab_size(&self) -> usize;
    /// A short description for logs: `"bytes"` or the `tokenizer.json` path.
    fn name(&self) -> &str;
}

/// A `tokenizer.json` that cannot be read or parsed.
#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    /// The file could not be read.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The file is not a tokenizer the `tokenizers` crate understands.
    #[error("{path} is not a valid tokenizer.json: {reason}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// The parser's explanation.
        reason: String,
    },
}

/// The byte-level end-of-document token: the id after the 256 bytes. Byte-level models trained on
/// packed documents have a vocabulary of 257 and this `eos_token_id`.
pub const BYTE_EOS: u32 = 256;

/// One token per byte of the UTF-8 text: vocabulary 256, lossless for any text.
///
/// Decoding turns the ids back into bytes and reads them with `String::from_utf8_lossy`, so a
/// sequence that is not valid UTF-8 (e.g. a model's sample cut mid-character) decodes with
/// U+FFFD in place of each invalid part. Id 256 — the end-of-document token of byte-level models
/// trained on packed documents (`mamba train --packing`) — decodes to nothing; larger ids (a
/// model whose vocabulary is padded) to U+FFFD.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ByteTokenizer;

impl Tokenizer for ByteTokenizer {
    fn encode(&self, text: &str) -> Vec<usize> {
        text.bytes().map(usize::from).collect()
    }

    fn decode(&self, ids: &[usize]) -> String {
        let mut bytes = Vec::with_capacity(ids.len());
        for &id in ids {
            match u8::try_from(id) {
                Ok(b) => bytes.push(b),
                Err(_) if id == BYTE_EOS as usize => {}
                Err(_) => bytes.extend_from_slice("\u{FFFD}".as_bytes()),
            }
        }
        String::from_utf8_lossy(&bytes).into_owned()
    }

    fn vocab_size(&self) -> usize {
        256
    }

    fn name(&self) -> &str {
        "bytes"
    }
}

/// A Hugging Face `tokenizer.json` (BPE, WordLevel, WordPiece or Unigram, with its normalizer,
/// pre-tokenizer and decoder).
///
/// Encoding adds no special tokens (no BOS/EOS from a post-processor); decoding keeps special
/// tokens and skips ids the vocabulary does not contain.
pub struct HfTokenizer {
    inner: tokenizers::Tokenizer,
    name: String,
}

impl std::fmt::Debug for HfTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HfTokenizer").field("name", &self.name).finish_non_exhaustive()
    }
}

impl HfTokenizer {
    /// Loads the `tokenizer.json` at `path`.
    pub fn from_file(path: &Path) -> Result<Self, TokenizerError> {
        let bytes = std::fs::read(path).map_err(|source| TokenizerError::Io { path: path.into(), source })?;
        Self::from_bytes(path, &bytes)
    }

    /// Parses the contents of a `tokenizer.json`; `path` names it in errors and is its
    /// [`Tokenizer::name`].
    ///
    /// # Errors
    /// [`TokenizerError::Parse`] naming the file for anything the `tokenizers` crate refuses.
    pub fn from_bytes(path: &Path, bytes: &[u8]) -> Result<Self, TokenizerError> {
        let parse = |reason: String| TokenizerError::Parse { path: path.into(), reason };
        // Syntax first, with serde_json's line and column: the `tokenizers` crate panics on some
        // syntax errors inside the "decoder" object (below).
        serde_json::from_slice::<serde::de::IgnoredAny>(bytes).map_err(|e| parse(e.to_string()))?;
        // `tokenizers` 0.22.2 panics instead of returning an error when its decoder deserializer
        // fails (`DecoderWrapper::deserialize`: `.expect("Helper")`, decoders/mod.rs:90); the
        // property tests in `tests/malformed.rs` hit it with syntax errors inside "decoder",
        // which the check above now refuses first. Its parser still runs under `catch_unwind`
        // so that any other input reaching that `expect` becomes an error naming the file (the
        // process's panic hook still prints the crate's message). Only the crate's call is
        // guarded; no panic of our own code is caught this way.
        let loaded = std::panic::catch_unwind(|| tokenizers::Tokenizer::from_bytes(bytes)).map_err(|p| {
            let msg = p
                .downcast_ref::<String>()
                .map(String::as_str)
                .or_else(|| p.downcast_ref::<&str>().copied())
                .unwrap_or("a panic");
            parse(format!("the tokenizers crate panicked while parsing it: {msg}"))
        })?;
        let inner = loaded.map_err(|e| parse(e.to_string()))?;
        // A model can load and still fail on every word outside its vocabulary (a WordLevel or
        // BPE model whose `unk_token` is not in its vocab): encode a probe of such words now,
        // so the file is refused here rather than `encode` failing later.
        if let Err(e) = inner.encode_fast("probe ☃ \u{10FFFD}𝔘 zq", false) {
            return Err(parse(format!("it cannot encode text outside its vocabulary: {e}")));
        }
        Ok(Self { inner, name: path.display().to_string() })
    }
}

/// The end-of-text tokens of widely used tokenizers, in the order [`HfTokenizer::end_of_text`]
/// looks for them: GPT-2's and GPT-NeoX's (Mamba's and Pythia's), Llama-2's, Mistral's and T5's,
/// Llama-3's, Gemma's.
pub const END_OF_TEXT_TOKENS: [&str; 4] = ["<|endoftext|>", "</s>", "<|end_of_text|>", "<eos>"];

impl HfTokenizer {
    /// The id of `token` (a vocabulary entry or an added token), if the tokenizer has it.
    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// The tokenizer's end-of-text token and its id: the first of [`END_OF_TEXT_TOKENS`] that
    /// it declares as a special added token. `tokenizer.json` itself does not say which token
    /// ends a document (a model's `config.json` does), so this recognises the conventional
    /// names only.
    pub fn end_of_text(&self) -> Option<(&'static str, u32)> {
        let added = self.inner.get_added_tokens_decoder();
        END_OF_TEXT_TOKENS.into_iter().find_map(|name| {
            added.iter().find(|(_, t)| t.special && t.content == name).map(|(&id, _)| (name, id))
        })
    }
}

impl Tokenizer for HfTokenizer {
    /// # Panics
    /// If the `tokenizers` crate reports an encoding error (loading refuses a model that fails
    /// on words outside its vocabulary, the one such error seen).
    #[track_caller]
    fn encode(&self, text: &str) -> Vec<usize> {
        match self.inner.encode_fast(text, false) {
            Ok(enc) => enc.get_ids().iter().map(|&i| i as usize).collect(),
            Err(e) => panic!("{}: cannot encode text: {e}", self.name),
        }
    }

    /// # Panics
    /// If the `tokenizers` crate reports a decoding error.
    #[track_caller]
    fn decode(&self, ids: &[usize]) -> String {
        let ids: Vec<u32> = ids.iter().map(|&i| u32::try_from(i).unwrap_or(u32::MAX)).collect();
        match self.inner.decode(&ids, false) {
            Ok(s) => s,
            Err(e) => panic!("{}: cannot decode ids: {e}", self.name),
        }
    }

    fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    fn name(&self) -> &str {
        &self.name
    }
}

/// The tokenizer of a model directory: `model_dir/tokenizer.json` when that file exists,
/// [`ByteTokenizer`] otherwise (also when `model_dir` does not exist).
pub fn load_tokenizer(model_dir: &Path) -> Result<Box<dyn Tokenizer>, TokenizerError> {
    let path = model_dir.join("tokenizer.json");
    if path.is_file() { Ok(Box::new(HfTokenizer::from_file(&path)?)) } else { Ok(Box::new(ByteTokenizer)) }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmpdir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("mamba-train-tok-{tag}-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    /// A word-level tokenizer.json with `added` as its added tokens.
    fn wordlevel_with(added: &str) -> HfTokenizer {
        let json = format!(
            r#"{{"version": "1.0", "truncation": null, "padding": null, "added_tokens": [{added}],
            "normalizer": null, "pre_tokenizer": {{"type": "Whitespace"}}, "post_processor": null,
            "decoder": null, "model": {{"type": "WordLevel", "unk_token": "[UNK]",
            "vocab": {{"[UNK]": 0, "a": 1, "b": 2, "</s>": 3}}}}}}"#
        );
        HfTokenizer::from_bytes(Path::new("t.json"), json.as_bytes()).unwrap()
    }

    fn added(id: u32, content: &str, special: bool) -> String {
        format!(
            r#"{{"id": {id}, "content": "{content}", "single_word": false, "lstrip": false,
            "rstrip": false, "normalized": false, "special": {special}}}"#
        )
    }

    #[test]
    fn end_of_text_is_a_special_token_of_a_conventional_name() {
        // GPT-NeoX's <|endoftext|> as a special added token.
        let t = wordlevel_with(&added(4, "<|endoftext|>", true));
        assert_eq!(t.end_of_text(), Some(("<|endoftext|>", 4)));
        assert_eq!(t.token_id("<|endoftext|>"), Some(4));
        assert_eq!(t.token_id("b"), Some(2));
        assert_eq!(t.token_id("zzz"), None);
        // The first name of the list wins when there are several.
        let both = [added(4, "<eos>", true), added(5, "<|endoftext|>", true)].join(",");
        assert_eq!(wordlevel_with(&both).end_of_text(), Some(("<|endoftext|>", 5)));
        // A plain vocabulary entry named </s>, or an added token not marked special, is not taken
        // for the end of text; nor is an unconventional name.
        assert_eq!(wordlevel_with("").end_of_text(), None);
        assert_eq!(wordlevel_with(&added(4, "<|endoftext|>", false)).end_of_text(), None);
        assert_eq!(wordlevel_with(&added(4, "<|end|>", true)).end_of_text(), None);
    }

    #[test]
    fn bytes_round_trip_and_lossy_decode() {
        let t = ByteTokenizer;
        for s in ["", "hello", "ünïcödé ∑ 🐍\n\t\0", "a\u{FFFD}b"] {
            let ids = t.encode(s);
            assert_eq!(ids.len(), s.len());
            assert!(ids.iter().all(|&i| i < t.vocab_size()));
            assert_eq!(t.decode(&ids), s);
        }
        // Every byte value survives encode → bytes.
        let all: Vec<usize> = (0..256).collect();
        let text = t.decode(&all[..128]);
        assert_eq!(t.encode(&text), &all[..128]);
        // Not UTF-8: a lone continuation byte, a truncated 3-byte sequence, an out-of-range id.
        assert_eq!(t.decode(&[b'a' as usize, 0x80, b'b' as usize]), "a\u{FFFD}b");
        assert_eq!(t.decode(&[0xe2, 0x88]), "\u{FFFD}");
        assert_eq!(t.decode(&[b'x' as usize, 300]), "x\u{FFFD}");
        assert_eq!(t.decode(&[b'x' as usize, BYTE_EOS as usize, b'y' as usize]), "xy");
        assert_eq!(t.name(), "bytes");
    }

    const WORDLEVEL: &str = r#"{
        "version": "1.0", "truncation": null, "padding": null, "added_tokens": [],
        "normalizer": {"type": "Lowercase"},
        "pre_tokenizer": {"type": "Whitespace"},
        "post_processor": null, "decoder": null,
        "model": {"type": "WordLevel", "vocab": {"[UNK]": 0, "hello": 1, "world": 2, "mamba": 3},
                  "unk_token": "[UNK]"}
    }"#;

    /// GPT-2 style byte-level BPE (the pre-tokenizer regex needs the `fancy-regex` feature).
    const BPE: &str = r#"{
        "version": "1.0", "truncation": null, "padding": null, "added_tokens": [],
        "normalizer": null,
        "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true,
                          "use_regex": true},
        "post_processor": null,
        "decoder": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true,
                    "use_regex": true},
        "model": {"type": "BPE", "dropout": null, "unk_token": null,
                  "continuing_subword_prefix": null, "end_of_word_suffix": null,
                  "fuse_unk": false, "byte_fallback": false,
                  "vocab": {"a": 0, "b": 1, "Ġ": 2, "ab": 3, "Ġab": 4},
                  "merges": ["a b", "Ġ ab"]}
    }"#;

    #[test]
    fn hf_tokenizers_from_a_model_dir() {
        let d = tmpdir("hf");
        std::fs::write(d.join("tokenizer.json"), WORDLEVEL).unwrap();
        let t = load_tokenizer(&d).unwrap();
        assert_eq!(t.vocab_size(), 4);
        assert_eq!(t.encode("Hello mamba world  snake"), vec![1, 3, 2, 0]);
        assert_eq!(t.decode(&[1, 3, 2]), "hello mamba world");
        assert_eq!(t.name(), d.join("tokenizer.json").display().to_string());

        std::fs::write(d.join("tokenizer.json"), BPE).unwrap();
        let t = load_tokenizer(&d).unwrap();
        assert_eq!(t.vocab_size(), 5);
        assert_eq!(t.encode("ab ab"), vec![3, 4]);
        assert_eq!(t.encode("ba"), vec![1, 0]);
        assert_eq!(t.decode(&[3, 4, 2, 0]), "ab ab a");

        // No tokenizer.json (or no directory at all): bytes.
        std::fs::remove_file(d.join("tokenizer.json")).unwrap();
        assert_eq!(load_tokenizer(&d).unwrap().name(), "bytes");
        assert_eq!(load_tokenizer(&d.join("absent")).unwrap().vocab_size(), 256);
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn malformed_tokenizer_json_names_the_file() {
        let d = tmpdir("bad");
        let p = d.join("tokenizer.json");
        std::fs::write(&p, r#"{"model": {"type": "WordLevel", "vocab": 7}}"#).unwrap();
        let e = load_tokenizer(&d).err().expect("malformed file accepted").to_string();
        assert!(e.starts_with(&format!("{} is not a valid tokenizer.json: ", p.display())), "{e}");
        std::fs::write(&p, "not json").unwrap();
        let e = HfTokenizer::from_file(&p).unwrap_err().to_string();
        assert!(e.starts_with(&format!("{} is not a valid tokenizer.json: ", p.display())), "{e}");
        let e = HfTokenizer::from_file(&d.join("nope.json")).unwrap_err().to_string();
        assert!(e.starts_with(&format!("{}: ", d.join("nope.json").display())), "{e}");
        std::fs::remove_dir_all(&d).unwrap();
    }
}
