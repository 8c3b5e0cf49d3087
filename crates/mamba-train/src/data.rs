//! Training text: files tokenized into a deterministic train/validation split, seeded random
//! training windows, deterministic validation batches, and the small resumable [`Rng`].
//!
//! ```
//! use mamba_train::data::{Rng, sample_batch, val_batches};
//!
//! let tokens: Vec<u32> = (0..100).collect();
//! let mut rng = Rng::new(42);
//! let batch = sample_batch(&tokens, &mut rng, 4, 8); // 4 windows of 8 + 1 tokens
//! assert_eq!(batch.len(), 4 * 9);
//! assert!(batch.chunks(9).all(|w| w.windows(2).all(|p| p[1] == p[0] + 1)));
//! let val: Vec<Vec<usize>> = val_batches(&tokens, 4, 8, 1000).collect();
//! assert_eq!(val.iter().map(|b| b.len() / 9).sum::<usize>(), 12); // ⌊99 / 8⌋ windows
//! ```

use std::path::{Path, PathBuf};

use ssm_kernel::rng::SplitMix64;

use crate::tokenizer::Tokenizer;

/// Training data that cannot be read or is too small.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    /// The data path does not exist.
    #[error("{path}: no such file or directory")]
    Missing {
        /// The path given.
        path: PathBuf,
    },
    /// A file or directory could not be read.
    #[error("{path}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// A file is not UTF-8 text.
    #[error("{path}: not UTF-8 text (invalid byte at offset {offset})")]
    NotUtf8 {
        /// The file.
        path: PathBuf,
        /// Byte offset of the first invalid sequence.
        offset: usize,
    },
    /// A line of a `.jsonl` file is not a JSON object with a string `"text"` field.
    #[error(
        "{path}, line {line}: {reason} (each line of a .jsonl file must be a JSON object whose \
         \"text\" field holds one document)"
    )]
    Jsonl {
        /// The file.
        path: PathBuf,
        /// The line, from 1.
        line: usize,
        /// What is wrong.
        reason: String,
    },
    /// The data holds no tokens (an empty file, or a directory without non-empty files).
    #[error("{path}: no data (found {files} file(s) and 0 tokens)")]
    Empty {
        /// The path given.
        path: PathBuf,
        /// Files read.
        files: usize,
    },
    /// A split is too short for one training window.
    #[error(
        "{path}: the {split} split has {found} tokens, but a sequence length of {seq_len} needs at \
         least {needed} (seq_len + 2) in each split; the data has {total} tokens in all \
         (validation = the last 10%) — use more data or a shorter sequence length"
    )]
    TooShort {
        /// The path given.
        path: PathBuf,
        /// `"train"` or `"validation"`.
        split: &'static str,
        /// Tokens in that split.
        found: usize,
        /// Tokens needed.
        needed: usize,
        /// The sequence length asked for.
        seq_len: usize,
        /// Tokens in both splits.
        total: usize,
    },
}

/// A token file (`mamba eval --tokens`) that cannot be read or is not a JSON array of arrays
/// of token ids.
#[derive(Debug, thiserror::Error)]
pub enum TokenFileError {
    /// The file could not be read.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The file is not JSON.
    #[error("{path} is not valid JSON (expected an array of arrays of token ids): {source}")]
    Json {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: serde_json::Error,
    },
    /// The top level is not an array.
    #[error("{path}: expected a JSON array of arrays of token ids, found {found}")]
    NotArray {
        /// The file.
        path: PathBuf,
        /// What the file holds instead.
        found: String,
    },
    /// A sequence is not an array.
    #[error("{path}: sequence {index}: expected an array of token ids, found {found}")]
    NotSequence {
        /// The file.
        path: PathBuf,
        /// The sequence's index.
        index: usize,
        /// What it holds instead.
        found: String,
    },
    /// A token id is not a non-negative integer.
    #[error(
        "{path}: sequence {index}, position {pos}: expected a non-negative integer token id, found {found}"
    )]
    BadId {
        /// The file.
        path: PathBuf,
        /// The sequence's index.
        index: usize,
        /// The position in the sequence.
        pos: usize,
        /// The value found.
        found: String,
    },
}

/// Reads a token file: a JSON array of arrays of token ids, each inner array one sequence (the
/// format of `mamba eval --tokens FILE`). Ids are not checked against a vocabulary here
/// (see `MambaLM::check_ids`).
///
/// # Errors
/// [`TokenFileError`] naming the file and, for a bad element, the sequence index, the position
/// and what was expected.
pub fn read_token_file(path: &Path) -> Result<Vec<Vec<usize>>, TokenFileError> {
    let bytes = std::fs::read(path).map_err(|source| TokenFileError::Io { path: path.into(), source })?;
    parse_token_file(path, &bytes)
}

/// Parses the bytes of a token file (see [`read_token_file`]); `path` is used in errors only.
pub fn parse_token_file(path: &Path, bytes: &[u8]) -> Result<Vec<Vec<usize>>, TokenFileError> {
    use serde_json::Value;
    let v: Value =
        serde_json::from_slice(bytes).map_err(|source| TokenFileError::Json { path: path.into(), source })?;
    let short = |v: &Value| {
        let s = v.to_string();
        if s.len() > 40 { format!("{}…", s.chars().take(40).collect::<String>()) } else { s }
    };
    let Value::Array(seqs) = v else {
        return Err(TokenFileError::NotArray { path: path.into(), found: short(&v) });
    };
    seqs.iter()
        .enumerate()
        .map(|(index, s)| {
            let Value::Array(ids) = s else {
                return Err(TokenFileError::NotSequence { path: path.into(), index, found: short(s) });
            };
            ids.iter()
                .enumerate()
                .map(|(pos, id)| {
                    id.as_u64().and_then(|x| usize::try_from(x).ok()).ok_or_else(|| TokenFileError::BadId {
                        path: path.into(),
                        index,
                        pos,
                        found: short(id),
                    })
                })
                .collect()
        })
        .collect()
}

/// The text files under `path`: `path` itself if it is a file; for a directory, every regular
/// file below it, recursively, skipping names that start with `.`, sorted by their path (so the
/// order is the same on every machine).
pub fn text_files(path: &Path) -> Result<Vec<PathBuf>, DataError> {
    let meta = std::fs::metadata(path).map_err(|source| {
        if source.kind() == std::io::ErrorKind::NotFound {
            DataError::Missing { path: path.into() }
        } else {
            DataError::Io { path: path.into(), source }
        }
    })?;
    if !meta.is_dir() {
        return Ok(vec![path.to_path_buf()]);
    }
    let mut files = Vec::new();
    let mut dirs = vec![path.to_path_buf()];
    while let Some(dir) = dirs.pop() {
        let io = |source| DataError::Io { path: dir.clone(), source };
        for entry in std::fs::read_dir(&dir).map_err(io)? {
            let entry = entry.map_err(io)?;
            if entry.file_name().to_string_lossy().starts_with('.') {
                continue;
            }
            let p = entry.path();
            // Follow symlinks: `metadata`, not `entry.file_type()`.
            let m = std::fs::metadata(&p).map_err(|source| DataError::Io { path: p.clone(), source })?;
            if m.is_dir() {
                dirs.push(p);
            } else if m.is_file() {
                files.push(p);
            }
        }
    }
    files.sort();
    Ok(files)
}

/// One UTF-8 text file.
fn read_file(path: &Path) -> Result<String, DataError> {
    let bytes = std::fs::read(path).map_err(|source| DataError::Io { path: path.into(), source })?;
    String::from_utf8(bytes)
        .map_err(|e| DataError::NotUtf8 { path: path.into(), offset: e.utf8_error().valid_up_to() })
}

/// One document of a corpus.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Document {
    /// Where it came from, for messages: the file, or `file:line` for a `.jsonl` line.
    pub source: String,
    /// Its text.
    pub text: String,
}

/// The documents under `path`: each of its [`text_files`] is one document, except a file whose
/// name ends in `.jsonl`, which holds one document per line — a JSON object whose `"text"`
/// field is the document, the form in which Hugging Face datasets export text. Blank lines and
/// empty documents are skipped.
///
/// # Errors
/// [`DataError::Missing`], [`DataError::Io`], [`DataError::NotUtf8`] naming the file, and
/// [`DataError::Jsonl`] naming the file and line of a malformed `.jsonl` line.
pub fn read_documents(path: &Path) -> Result<Vec<Document>, DataError> {
    let mut docs = Vec::new();
    for f in text_files(path)? {
        let text = read_file(&f)?;
        if f.extension().is_some_and(|e| e == "jsonl") {
            for (i, line) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
                let bad = |reason: String| DataError::Jsonl { path: f.clone(), line: i + 1, reason };
                let v: serde_json::Value =
                    serde_json::from_str(line).map_err(|e| bad(format!("not JSON: {e}")))?;
                let text = match v.get("text") {
                    Some(serde_json::Value::String(t)) => t.clone(),
                    Some(other) => return Err(bad(format!("\"text\" is {other}, not a string"))),
                    None if v.is_object() => return Err(bad("no \"text\" field".into())),
                    None => return Err(bad(format!("expected a JSON object, found {line:.40}"))),
                };
                if !text.is_empty() {
                    docs.push(Document { source: format!("{}:{}", f.display(), i + 1), text });
                }
            }
        } else if !text.is_empty() {
            docs.push(Document { source: f.display().to_string(), text });
        }
    }
    Ok(docs)
}

/// `text` tokenized in pieces of about [`ENCODE_CHUNK`] bytes cut after a newline.
fn encode(tok: &dyn Tokenizer, text: &str) -> Vec<u32> {
    let mut tokens = Vec::new();
    let mut rest = text;
    while !rest.is_empty() {
        let cut = if rest.len() <= ENCODE_CHUNK {
            rest.len()
        } else {
            match rest.as_bytes()[ENCODE_CHUNK..].iter().position(|&b| b == b'\n') {
                Some(i) => ENCODE_CHUNK + i + 1,
                None => rest.len(),
            }
        };
        let (piece, tail) = rest.split_at(cut);
        tokens.extend(tok.encode(piece).into_iter().map(|id| {
            u32::try_from(id).unwrap_or_else(|_| panic!("{}: token id {id} exceeds u32", tok.name()))
        }));
        rest = tail;
    }
    tokens
}

/// Texts are encoded in pieces of about this many bytes, cut after a newline, so a large file
/// never becomes one huge tokenizer call.
const ENCODE_CHUNK: usize = 1 << 20;

/// A tokenized corpus split into training and validation tokens.
#[derive(Clone, Debug)]
pub struct TextData {
    /// The path it was loaded from (named in errors).
    pub path: PathBuf,
    /// The training tokens.
    pub train: Vec<u32>,
    /// The validation tokens: the last whole documents, or the last `⌊n/10⌋` tokens (see
    /// [`TextData::load`]).
    pub val: Vec<u32>,
    /// How many documents the corpus holds.
    pub documents: usize,
}

impl TextData {
    /// Reads the documents of `path` ([`read_documents`]: a text file, a directory of them, or
    /// `.jsonl` files) and tokenizes each on its own with `tok` (in pieces of about 1 MiB cut
    /// after a newline); the token sequences are concatenated in order, each preceded by the
    /// end-of-document token `eos` when one is given (so it separates every two documents and a
    /// window position holding it starts a document), with nothing in between otherwise.
    ///
    /// Validation holds out whole documents: the last ones, as few as make up at least a tenth
    /// of the tokens. With a single document — or when the last documents would make up more
    /// than half of the tokens — it is the last `⌊n/10⌋` tokens instead. The split is
    /// deterministic.
    ///
    /// # Errors
    /// As [`read_documents`], and [`DataError::Empty`] when there are no tokens at all. Call
    /// [`TextData::ensure_len`] to check the splits against a sequence length.
    pub fn load(path: &Path, tok: &dyn Tokenizer, eos: Option<u32>) -> Result<Self, DataError> {
        let docs: Vec<Vec<u32>> = read_documents(path)?
            .iter()
            .map(|d| eos.into_iter().chain(encode(tok, &d.text)).collect())
            .collect();
        let n: usize = docs.iter().map(Vec::len).sum();
        if n == 0 {
            // Walk the files again only to say how many there were.
            return Err(DataError::Empty { path: path.into(), files: text_files(path)?.len() });
        }
        // The fewest trailing documents that hold at least a tenth of the tokens.
        let (mut held, mut k) = (0usize, 0usize);
        while held < n / 10 && k < docs.len() {
            k += 1;
            held += docs[docs.len() - k].len();
        }
        let whole_documents = docs.len() > 1 && held > 0 && held <= n / 2;
        let mut tokens: Vec<u32> = docs.concat();
        if !whole_documents {
            return Ok(Self { documents: docs.len(), ..Self::from_tokens(path, tokens)? });
        }
        let val = tokens.split_off(n - held);
        Ok(Self { path: path.into(), train: tokens, val, documents: docs.len() })
    }

    /// Splits already tokenized data (last `⌊n/10⌋` tokens are validation); `path` is only used in
    /// error messages.
    pub fn from_tokens(path: &Path, mut tokens: Vec<u32>) -> Result<Self, DataError> {
        if tokens.is_empty() {
            return Err(DataError::Empty { path: path.into(), files: 0 });
        }
        let n_val = tokens.len() / 10;
        let val = tokens.split_off(tokens.len() - n_val);
        Ok(Self { path: path.into(), train: tokens, val, documents: 1 })
    }

    /// Checks that each split holds at least `seq_len + 2` tokens, so that [`sample_batch`] has
    /// at least two distinct windows of `seq_len + 1` tokens to draw from and [`val_batches`]
    /// yields at least one window.
    pub fn ensure_len(&self, seq_len: usize) -> Result<(), DataError> {
        let needed = seq_len + 2;
        let total = self.train.len() + self.val.len();
        for (split, found) in [("train", self.train.len()), ("validation", self.val.len())] {
            if found < needed {
                return Err(DataError::TooShort {
                    path: self.path.clone(),
                    split,
                    found,
                    needed,
                    seq_len,
                    total,
                });
            }
        }
        Ok(())
    }
}

/// `batch` windows of `seq_len + 1` consecutive tokens at offsets drawn uniformly from `rng`,
/// row-major `(batch, seq_len + 1)`: inputs are each row's first `seq_len` tokens, targets its
/// last `seq_len`.
///
/// # Panics
/// If `tokens` holds fewer than `seq_len + 1` tokens.
#[track_caller]
pub fn sample_batch(tokens: &[u32], rng: &mut Rng, batch: usize, seq_len: usize) -> Vec<usize> {
    let w = seq_len + 1;
    assert!(tokens.len() >= w, "sample_batch: {} tokens cannot hold a window of {w}", tokens.len());
    let starts = (tokens.len() - w + 1) as u64;
    let mut out = Vec::with_capacity(batch * w);
    for _ in 0..batch {
        let s = rng.below(starts) as usize;
        out.extend(tokens[s..s + w].iter().map(|&t| t as usize));
    }
    out
}

/// Deterministic validation batches over the first `min(max_tokens, tokens.len())` tokens.
///
/// Window `i` is `tokens[i·L .. i·L + L + 1]` (`L = seq_len`): consecutive windows share one
/// token, so every covered token after the first is a prediction target exactly once. The
/// windows that fit entirely are grouped `batch` at a time, row-major `(rows, seq_len + 1)`; the
/// last batch may have fewer rows (`rows = len / (seq_len + 1)`). Nothing is yielded when not
/// even one window fits.
///
/// # Panics
/// If `batch` or `seq_len` is 0.
#[track_caller]
pub fn val_batches(
    tokens: &[u32],
    batch: usize,
    seq_len: usize,
    max_tokens: usize,
) -> impl Iterator<Item = Vec<usize>> + '_ {
    assert!(
        batch > 0 && seq_len > 0,
        "val_batches: batch ({batch}) and seq_len ({seq_len}) must be positive"
    );
    let covered = max_tokens.min(tokens.len());
    let windows = covered.saturating_sub(1) / seq_len;
    (0..windows.div_ceil(batch)).map(move |b| {
        let rows = batch.min(windows - b * batch);
        let mut out = Vec::with_capacity(rows * (seq_len + 1));
        for r in 0..rows {
            let s = (b * batch + r) * seq_len;
            out.extend(tokens[s..s + seq_len + 1].iter().map(|&t| t as usize));
        }
        out
    })
}

/// The data sampler's generator: [`SplitMix64`] (Steele, Lea & Flood 2014), the workspace's one
/// generator, plus the draws sampling needs. Small, fast, statistically good for sampling data,
/// and its whole state is one `u64`, so a trainer checkpoints it with [`Rng::state`] and resumes
/// with [`Rng::from_state`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rng {
    inner: SplitMix64,
}

impl Rng {
    /// A generator seeded with `seed` (every seed, including 0, is fine).
    pub fn new(seed: u64) -> Self {
        Self { inner: SplitMix64::new(seed) }
    }

    /// The generator whose [`Rng::state`] was `state`: it continues the same sequence.
    pub fn from_state(state: u64) -> Self {
        Self { inner: SplitMix64::from_state(state) }
    }

    /// The whole state.
    pub fn state(&self) -> u64 {
        self.inner.state()
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.inner.next_u64()
    }

    /// A uniform integer in `0..n`, without modulo bias (Lemire's multiply-shift with
    /// rejection).
    ///
    /// # Panics
    /// If `n == 0`.
    #[track_caller]
    pub fn below(&mut self, n: u64) -> u64 {
        assert!(n > 0, "Rng::below(0): empty range");
        let threshold = n.wrapping_neg() % n; // 2^64 mod n
        loop {
            let m = (self.next_u64() as u128) * (n as u128);
            if (m as u64) >= threshold {
                return (m >> 64) as u64;
            }
        }
    }

    /// A uniform `f32` in `[0, 1)` (24 random bits).
    pub fn next_f32(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 * (1.0 / (1u32 << 24) as f32)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tokenizer::ByteTokenizer;

    fn tmpdir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("mamba-train-data-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn rng_known_values_resume_and_range() {
        // Reference values of SplitMix64 with seed 1234567 (from the original C implementation).
        let mut r = Rng::new(1234567);
        let expect = [6457827717110365317u64, 3203168211198807973, 9817491932198370423];
        for e in expect {
            assert_eq!(r.next_u64(), e);
        }
        let mut resumed = Rng::from_state(r.state());
        assert_eq!(resumed.next_u64(), r.next_u64());
        let mut counts = [0usize; 7];
        for _ in 0..70_000 {
            counts[r.below(7) as usize] += 1;
        }
        assert!(counts.iter().all(|&c| (9_000..11_000).contains(&c)), "{counts:?}");
        assert_eq!(r.below(1), 0);
        let f = (0..1000).map(|_| r.next_f32()).fold((1.0f32, 0.0f32), |(lo, hi), x| (lo.min(x), hi.max(x)));
        assert!(f.0 >= 0.0 && f.1 < 1.0 && f.0 < 0.01 && f.1 > 0.99, "{f:?}");
    }

    #[test]
    fn load_file_and_sorted_recursive_directory() {
        let d = tmpdir("load");
        std::fs::create_dir_all(d.join("b/sub")).unwrap();
        std::fs::write(d.join("b/sub/z.txt"), "333").unwrap();
        std::fs::write(d.join("a.txt"), "1111").unwrap();
        std::fs::write(d.join("b/x.txt"), "22").unwrap();
        std::fs::write(d.join(".hidden"), "ignored").unwrap();
        let files = text_files(&d).unwrap();
        assert_eq!(files, [d.join("a.txt"), d.join("b/sub/z.txt"), d.join("b/x.txt")]);
        let docs: Vec<String> = read_documents(&d).unwrap().into_iter().map(|d| d.text).collect();
        assert_eq!(docs, ["1111", "333", "22"], "one document per file");
        let td = TextData::load(&d, &ByteTokenizer, None).unwrap();
        let all: Vec<u32> = "111133322".bytes().map(u32::from).collect();
        // 9 tokens: ⌊9/10⌋ = 0 validation tokens.
        assert_eq!((td.train.clone(), td.val.len()), (all, 0));

        let f = d.join("big.txt");
        let text: String = (0..1000).map(|i| char::from(b'a' + (i % 26) as u8)).collect();
        std::fs::write(&f, &text).unwrap();
        let td = TextData::load(&f, &ByteTokenizer, None).unwrap();
        assert_eq!((td.train.len(), td.val.len()), (900, 100));
        let mut joined = td.train.clone();
        joined.extend(&td.val);
        assert_eq!(joined, text.bytes().map(u32::from).collect::<Vec<_>>());
        let again = TextData::load(&f, &ByteTokenizer, None).unwrap();
        assert_eq!((again.train, again.val), (td.train, td.val));
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn jsonl_documents_and_whole_document_validation() {
        let d = tmpdir("jsonl");
        std::fs::create_dir_all(&d).unwrap();
        let f = d.join("docs.jsonl");
        // 20 documents of 10..29 bytes, a blank line, an empty document, an extra field.
        let mut lines: Vec<String> =
            (0..20).map(|i| serde_json::json!({ "text": "x".repeat(10 + i), "id": i }).to_string()).collect();
        lines.insert(3, String::new());
        lines.insert(5, r#"{"text": ""}"#.into());
        std::fs::write(&f, lines.join("\n")).unwrap();
        let docs = read_documents(&f).unwrap();
        assert_eq!(docs.len(), 20);
        assert_eq!(docs[0].source, format!("{}:1", f.display()));
        assert_eq!(docs[3].text.len(), 13);
        let td = TextData::load(&f, &ByteTokenizer, None).unwrap();
        // 390 tokens: the fewest last documents holding ≥ 39 are the last two (29 + 28).
        assert_eq!((td.train.len(), td.val.len()), (390 - 57, 57));
        assert_eq!(td.documents, 20);
        // With an end-of-document token, every document is preceded by it and validation still
        // holds out whole documents (each with its separator): 410 tokens, the last two 30 + 29.
        let te = TextData::load(&f, &ByteTokenizer, Some(256)).unwrap();
        assert_eq!((te.train.len(), te.val.len()), (410 - 59, 59));
        assert_eq!(
            (te.train[0], te.train[1], te.train[11], te.train[12]),
            (256, u32::from(b'x'), 256, u32::from(b'x'))
        );
        assert_eq!(te.val[0], 256);
        assert_eq!(te.train.iter().chain(&te.val).filter(|&&t| t == 256).count(), 20);
        // Malformed lines are named by file and line.
        for (bad, want) in [
            ("{\"text\": 3}", "line 2: \"text\" is 3, not a string"),
            ("{\"body\": \"a\"}", "line 2: no \"text\" field"),
            ("[1, 2]", "line 2: expected a JSON object"),
            ("{\"text\": ", "line 2: not JSON"),
        ] {
            std::fs::write(&f, format!("{{\"text\": \"ok\"}}\n{bad}\n")).unwrap();
            let e = read_documents(&f).unwrap_err().to_string();
            assert!(e.starts_with(&f.display().to_string()) && e.contains(want), "{bad}: {e}");
        }
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn large_files_are_encoded_in_newline_pieces_losslessly() {
        let d = tmpdir("chunk");
        let f = d.join("big.txt");
        let line = "the quick brown fox ∑ jumps\n";
        let text = line.repeat(2 * ENCODE_CHUNK / line.len() + 7);
        std::fs::write(&f, &text).unwrap();
        let td = TextData::load(&f, &ByteTokenizer, None).unwrap();
        assert_eq!(td.train.len() + td.val.len(), text.len());
        assert!(td.train.iter().chain(&td.val).map(|&t| t as u8).eq(text.bytes()));
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn errors_name_the_path_and_what_is_wrong() {
        let d = tmpdir("err");
        let missing = d.join("nope.txt");
        let e = TextData::load(&missing, &ByteTokenizer, None).unwrap_err().to_string();
        assert_eq!(e, format!("{}: no such file or directory", missing.display()));

        let empty_dir = d.join("empty");
        std::fs::create_dir_all(&empty_dir).unwrap();
        std::fs::write(empty_dir.join("e.txt"), "").unwrap();
        let e = TextData::load(&empty_dir, &ByteTokenizer, None).unwrap_err().to_string();
        assert_eq!(e, format!("{}: no data (found 1 file(s) and 0 tokens)", empty_dir.display()));

        let bin = d.join("bin.txt");
        std::fs::write(&bin, b"ok\xff\xfe").unwrap();
        let e = TextData::load(&bin, &ByteTokenizer, None).unwrap_err().to_string();
        assert_eq!(e, format!("{}: not UTF-8 text (invalid byte at offset 2)", bin.display()));

        let unreadable = d.join("dir.txt");
        std::fs::create_dir_all(unreadable.join("x")).unwrap();
        // A directory whose only entry is a directory holding nothing: no files, no tokens.
        let e = TextData::load(&unreadable, &ByteTokenizer, None).unwrap_err().to_string();
        assert_eq!(e, format!("{}: no data (found 0 file(s) and 0 tokens)", unreadable.display()));

        let small = d.join("small.txt");
        std::fs::write(&small, "x".repeat(100)).unwrap();
        let td = TextData::load(&small, &ByteTokenizer, None).unwrap();
        assert!(td.ensure_len(8).is_ok()); // val has 10 = 8 + 2
        let e = td.ensure_len(9).unwrap_err().to_string();
        assert_eq!(
            e,
            format!(
                "{}: the validation split has 10 tokens, but a sequence length of 9 needs at least 11 \
                 (seq_len + 2) in each split; the data has 100 tokens in all (validation = the last \
                 10%) — use more data or a shorter sequence length",
                small.display()
            )
        );
        let e = td.ensure_len(100).unwrap_err().to_string();
        assert!(e.contains("the train split has 90 tokens") && e.contains("at least 102"), "{e}");
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn sample_batch_windows_are_in_bounds_and_seeded() {
        let tokens: Vec<u32> = (0..50).collect();
        let (b, l) = (64, 9);
        let x = sample_batch(&tokens, &mut Rng::new(7), b, l);
        assert_eq!(x.len(), b * (l + 1));
        let mut starts = std::collections::BTreeSet::new();
        for row in x.chunks(l + 1) {
            assert!(row[l] < 50);
            assert!(row.windows(2).all(|p| p[1] == p[0] + 1), "{row:?}");
            starts.insert(row[0]);
        }
        // Offsets cover the range, including both extremes, over a few batches.
        let mut rng = Rng::new(8);
        for _ in 0..20 {
            starts.extend(sample_batch(&tokens, &mut rng, b, l).chunks(l + 1).map(|r| r[0]));
        }
        assert_eq!(starts, (0..=40).collect());
        assert_eq!(x, sample_batch(&tokens, &mut Rng::new(7), b, l));
        assert_ne!(x, sample_batch(&tokens, &mut Rng::new(6), b, l));
        // Exactly one window: always offset 0.
        assert_eq!(
            sample_batch(&tokens[..10], &mut Rng::new(1), 2, 9),
            (0..10).chain(0..10).collect::<Vec<_>>()
        );
    }

    #[test]
    fn val_batches_cover_deterministically() {
        let tokens: Vec<u32> = (0..103).collect();
        let batches: Vec<Vec<usize>> = val_batches(&tokens, 4, 10, usize::MAX).collect();
        // ⌊102 / 10⌋ = 10 windows: batches of 4, 4, 2.
        assert_eq!(batches.iter().map(|b| b.len() / 11).collect::<Vec<_>>(), [4, 4, 2]);
        let rows: Vec<&[usize]> = batches.iter().flat_map(|b| b.chunks(11)).collect();
        for (i, r) in rows.iter().enumerate() {
            assert_eq!(*r, (i * 10..i * 10 + 11).collect::<Vec<_>>().as_slice());
        }
        // Targets (each row's last 10) are tokens 1..=100, each exactly once.
        let targets: Vec<usize> = rows.iter().flat_map(|r| r[1..].iter().copied()).collect();
        assert_eq!(targets, (1..=100).collect::<Vec<_>>());
        // max_tokens caps the coverage.
        let capped: Vec<Vec<usize>> = val_batches(&tokens, 4, 10, 31).collect();
        assert_eq!(capped.len(), 1);
        assert_eq!(capped[0].len(), 3 * 11);
        assert_eq!(val_batches(&tokens, 4, 10, 30).map(|b| b.len()).sum::<usize>(), 2 * 11);
        assert_eq!(val_batches(&tokens[..10], 4, 10, usize::MAX).count(), 0);
    }
}
