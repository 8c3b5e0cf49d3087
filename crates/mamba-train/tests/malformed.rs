//! Malformed inputs to the `tokenizer.json` loader and the token-file parser of
//! `mamba eval --tokens`: deterministic cases, then property tests over arbitrary bytes and
//! mutations of valid files. The property: never a panic; `Ok`, or an error naming the file.
//! Raise the case counts with `PROPTEST_CASES`.

use std::path::{Path, PathBuf};

use mamba_train::data::{parse_token_file, read_token_file};
use mamba_train::tokenizer::{HfTokenizer, Tokenizer, load_tokenizer};
use proptest::prelude::*;

const WORDLEVEL: &str = r#"{"version": "1.0", "truncation": null, "padding": null, "added_tokens": [],
    "normalizer": {"type": "Lowercase"}, "pre_tokenizer": {"type": "Whitespace"},
    "post_processor": null, "decoder": null,
    "model": {"type": "WordLevel", "vocab": {"[UNK]": 0, "hello": 1, "world": 2}, "unk_token": "[UNK]"}}"#;

const BPE: &str = r#"{"version": "1.0", "truncation": null, "padding": null,
    "added_tokens": [{"id": 5, "content": "<s>", "single_word": false, "lstrip": false, "rstrip": false,
                      "normalized": false, "special": true}],
    "normalizer": null,
    "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true},
    "post_processor": null,
    "decoder": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true},
    "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
              "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false,
              "vocab": {"a": 0, "b": 1, "Ġ": 2, "ab": 3, "Ġab": 4}, "merges": ["a b", "Ġ ab"]}}"#;

const UNIGRAM: &str = r#"{"version": "1.0", "truncation": null, "padding": null, "added_tokens": [],
    "normalizer": null, "pre_tokenizer": {"type": "Metaspace", "replacement": "▁", "prepend_scheme": "always", "split": true},
    "post_processor": null, "decoder": {"type": "Metaspace", "replacement": "▁", "prepend_scheme": "always", "split": true},
    "model": {"type": "Unigram", "unk_id": 0, "vocab": [["<unk>", 0.0], ["▁a", -1.0], ["b", -2.0], ["▁", -3.0], ["a", -2.5]],
              "byte_fallback": false}}"#;

fn tmpdir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("mamba-train-malformed-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

const TOK: &str = "fuzz/tokenizer.json";

/// Loads `bytes` as a tokenizer; if it loads, encodes and decodes a little (must not panic).
fn load(bytes: &[u8]) -> Result<(), String> {
    let t = HfTokenizer::from_bytes(Path::new(TOK), bytes).map_err(|e| e.to_string())?;
    let ids = t.encode("hello world ab ba a");
    let _ = t.decode(&ids);
    let _ = t.decode(&[0, 1, 2, 3, 1 << 40]);
    let _ = t.vocab_size();
    Ok(())
}

#[test]
fn malformed_tokenizer_files_are_errors_naming_the_file() {
    for good in [WORDLEVEL, BPE, UNIGRAM] {
        load(good.as_bytes()).unwrap();
    }
    let deep = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
    for bad in [
        "",
        "{",
        "null",
        "[]",
        "{}",
        r#"{"model": {"type": "WordLevel", "vocab": {"a": -1}, "unk_token": "a"}}"#,
        r#"{"model": {"type": "WordLevel", "vocab": {"a": 99999999999}, "unk_token": "a"}}"#,
        r#"{"model": {"type": "BPE", "vocab": {"a": 0}, "merges": ["a b"]}}"#,
        r#"{"model": {"type": "Unigram", "unk_id": 7, "vocab": [["a", 0.0]]}}"#,
        &WORDLEVEL[..WORDLEVEL.len() / 2],
        &deep,
    ] {
        let e = load(bad.as_bytes()).expect_err(bad);
        assert!(e.starts_with(&format!("{TOK} is not a valid tokenizer.json: ")), "{e}");
    }
    // Loads, but cannot encode a word outside its vocabulary: its unk_token is not in the
    // vocab (found by the mutation test below).
    let no_unk = WORDLEVEL.replace(r#""[UNK]": 0, "#, "");
    let e = load(no_unk.as_bytes()).unwrap_err();
    assert!(e.starts_with(&format!("{TOK} is not a valid tokenizer.json: ")), "{e}");
    assert!(e.contains("cannot encode text outside its vocabulary"), "{e}");
    // A decoder of the wrong type.
    let odd_decoder = WORDLEVEL.replace(r#""decoder": null"#, r#""decoder": 5"#);
    let e = load(odd_decoder.as_bytes()).unwrap_err();
    assert!(e.starts_with(&format!("{TOK} is not a valid tokenizer.json: ")), "{e}");
    let e = load(&[0xff, 0xfe, 0x00]).unwrap_err();
    assert!(e.starts_with(TOK), "{e}");
    // Through a model directory: an empty tokenizer.json is an error, not bytes.
    let d = tmpdir("tok");
    std::fs::write(d.join("tokenizer.json"), "").unwrap();
    let e = load_tokenizer(&d).err().unwrap().to_string();
    assert!(e.starts_with(&d.join("tokenizer.json").display().to_string()), "{e}");
    std::fs::remove_dir_all(&d).unwrap();
}

const TOKENS: &str = "fuzz/tokens.json";

fn tokens(text: &str) -> Result<Vec<Vec<usize>>, String> {
    parse_token_file(Path::new(TOKENS), text.as_bytes()).map_err(|e| e.to_string())
}

#[test]
fn malformed_token_files_name_file_sequence_and_position() {
    assert_eq!(tokens("[[1, 2, 3], [], [0]]").unwrap(), vec![vec![1, 2, 3], vec![], vec![0]]);
    assert_eq!(tokens("[]").unwrap(), Vec::<Vec<usize>>::new());
    let e = tokens("").unwrap_err();
    assert!(
        e.starts_with("fuzz/tokens.json is not valid JSON (expected an array of arrays of token ids): "),
        "{e}"
    );
    assert!(tokens("[[1, 2], [3").unwrap_err().starts_with("fuzz/tokens.json is not valid JSON"));
    assert_eq!(
        tokens(r#"{"ids": [1]}"#).unwrap_err(),
        r#"fuzz/tokens.json: expected a JSON array of arrays of token ids, found {"ids":[1]}"#
    );
    assert_eq!(
        tokens("[[1], 2]").unwrap_err(),
        "fuzz/tokens.json: sequence 1: expected an array of token ids, found 2"
    );
    for (bad, found) in
        [("-1", "-1"), ("1.5", "1.5"), ("\"7\"", "\"7\""), ("[3]", "[3]"), ("1e300", "1e+300")]
    {
        assert_eq!(
            tokens(&format!("[[0], [1, 2, {bad}]]")).unwrap_err(),
            format!(
                "fuzz/tokens.json: sequence 1, position 2: expected a non-negative integer token id, found {found}"
            )
        );
    }
    // Ids too large for u64 are refused; ids up to u64::MAX parse (the model checks the vocabulary).
    assert!(tokens("[[18446744073709551616]]").unwrap_err().contains("sequence 0, position 0"));
    assert_eq!(tokens("[[18446744073709551615]]").unwrap(), vec![vec![usize::MAX]]);
    let deep = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
    assert!(tokens(&deep).unwrap_err().starts_with("fuzz/tokens.json is not valid JSON"));
    let e = read_token_file(Path::new("/nonexistent/tokens.json")).unwrap_err().to_string();
    assert!(e.starts_with("/nonexistent/tokens.json: "), "{e}");
}

/// One random edit of a valid file.
fn mutate(mut b: Vec<u8>, (kind, at, garbage): &(u8, usize, Vec<u8>)) -> Vec<u8> {
    let n = b.len().max(1);
    match kind % 4 {
        0 => {
            if !b.is_empty() {
                b[at % n] ^= 1 << (garbage[0] % 8);
            }
        }
        1 => b.truncate(at % n),
        2 => {
            let at = at % (b.len() + 1);
            b.splice(at..at, garbage.iter().copied());
        }
        _ => {
            // Replace a run of digits by a number from the garbage (small, huge or negative).
            let digits: Vec<usize> = (0..b.len()).filter(|&i| b[i].is_ascii_digit()).collect();
            if let Some(&i) = digits.get(at % digits.len().max(1)) {
                let num = match garbage[0] % 4 {
                    0 => "-1".to_string(),
                    1 => u64::MAX.to_string(),
                    2 => "1e999".to_string(),
                    _ => garbage.len().to_string(),
                };
                let mut j = i;
                while j < b.len() && b[j].is_ascii_digit() {
                    j += 1;
                }
                b.splice(i..j, num.into_bytes());
            }
        }
    }
    b
}

fn edit() -> impl Strategy<Value = (u8, usize, Vec<u8>)> {
    (any::<u8>(), any::<usize>(), proptest::collection::vec(any::<u8>(), 1..12))
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 128, ..ProptestConfig::default() })]

    #[test]
    fn tokenizer_loader_never_panics_on_arbitrary_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
        if let Err(e) = load(&bytes) {
            prop_assert!(e.starts_with(TOK), "{}", e);
        }
    }

    #[test]
    fn tokenizer_loader_never_panics_on_mutated_files(
        which in 0usize..3,
        edits in proptest::collection::vec(edit(), 1..4),
    ) {
        let base = [WORDLEVEL, BPE, UNIGRAM][which].as_bytes().to_vec();
        let b = edits.iter().fold(base, mutate);
        if let Err(e) = load(&b) {
            prop_assert!(e.starts_with(TOK), "{}", e);
        }
    }

    #[test]
    fn token_file_parser_never_panics(
        bytes in proptest::collection::vec(any::<u8>(), 0..100),
        seqs in proptest::collection::vec(proptest::collection::vec(any::<u64>(), 0..8), 0..5),
        edits in proptest::collection::vec(edit(), 1..4),
    ) {
        if let Err(e) = parse_token_file(Path::new(TOKENS), &bytes) {
            prop_assert!(e.to_string().starts_with(TOKENS), "{}", e);
        }
        let valid = serde_json::to_vec(&seqs).unwrap();
        prop_assert_eq!(
            parse_token_file(Path::new(TOKENS), &valid).unwrap(),
            seqs.iter().map(|s| s.iter().map(|&x| x as usize).collect::<Vec<_>>()).collect::<Vec<_>>()
        );
        let b = edits.iter().fold(valid, mutate);
        if let Err(e) = parse_token_file(Path::new(TOKENS), &b) {
            prop_assert!(e.to_string().starts_with(TOKENS), "{}", e);
        }
    }
}
