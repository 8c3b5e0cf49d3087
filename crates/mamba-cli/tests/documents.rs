//! Corpora of documents through `mamba eval`: a `.jsonl` file (or a directory of files) is
//! scored document by document, each from a fresh state, and the loss equals the token-weighted
//! mean of scoring each document on its own.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn mamba(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_mamba")).args(args).output().expect("run mamba")
}

fn tmp(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("mamba-docs-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

fn eval(model: &Path, data: &Path, extra: &[&str]) -> serde_json::Value {
    let args =
        [&["eval", "--json", "--model", model.to_str().unwrap(), "--data", data.to_str().unwrap()], extra];
    let o = mamba(&args.concat());
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    serde_json::from_slice(&o.stdout).unwrap()
}

#[test]
fn jsonl_documents_score_as_the_weighted_mean_of_each_alone() {
    let model = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../mamba-nn/tests/fixtures/mamba1-untied");
    let d = tmp("jsonl");
    std::fs::create_dir_all(&d).unwrap();
    let texts: Vec<String> = (0..5)
        .map(|i| (0..(7 + 13 * i)).map(|j| ["to be ", "or not\n", "so it goes; "][(i + j) % 3]).collect())
        .collect();
    let lines: Vec<String> = texts.iter().map(|t| serde_json::json!({ "text": t }).to_string()).collect();
    let jsonl = d.join("docs.jsonl");
    std::fs::write(&jsonl, lines.join("\n") + "\n").unwrap();
    let all = eval(&model, &jsonl, &[]);
    assert_eq!(all["documents"], 5);
    let (mut nll, mut n) = (0.0f64, 0u64);
    for (i, t) in texts.iter().enumerate() {
        let f = d.join(format!("doc{i}.txt"));
        std::fs::write(&f, t).unwrap();
        // One window longer than the document: scored whole from the empty state.
        let one = eval(&model, &f, &["--seq-len", "100000"]);
        let k = one["tokens"].as_u64().unwrap();
        nll += one["loss"].as_f64().unwrap() * k as f64;
        n += k;
    }
    assert_eq!(all["tokens"].as_u64(), Some(n));
    let (got, want) = (all["loss"].as_f64().unwrap(), nll / n as f64);
    assert!((got - want).abs() < 1e-5, "documents {got} vs weighted mean {want}");
    // A directory of the same documents, one per file, scores the same.
    std::fs::remove_file(&jsonl).unwrap();
    let dir = eval(&model, &d, &[]);
    assert_eq!((dir["documents"].as_u64(), dir["tokens"].as_u64()), (Some(5), Some(n)));
    assert!((dir["loss"].as_f64().unwrap() - want).abs() < 1e-5);
    // A malformed line is named.
    std::fs::write(&jsonl, "{\"text\": \"fine\"}\n{\"txt\": \"oops\"}\n").unwrap();
    let o = mamba(&["eval", "--model", model.to_str().unwrap(), "--data", jsonl.to_str().unwrap()]);
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && e.contains("docs.jsonl, line 2") && e.contains("no \"text\" field"),
        "{e}"
    );
    std::fs::remove_dir_all(&d).unwrap();
}

/// The `config.json` of a run directory.
fn run_config(run: &Path) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(run.join("config.json")).unwrap()).unwrap()
}

#[test]
fn training_on_documents_packs_them_with_an_end_of_document_token() {
    let d = tmp("pack");
    std::fs::create_dir_all(&d).unwrap();
    let lines: Vec<String> = (0..40)
        .map(|i| serde_json::json!({ "text": format!("speech {i}: {}", "words and more words ".repeat(3 + i % 5)) }))
        .map(|v| v.to_string())
        .collect();
    let jsonl = d.join("docs.jsonl");
    std::fs::write(&jsonl, lines.join("\n")).unwrap();
    let train = |out: &Path, extra: &[&str]| {
        let base = ["train", "--data", jsonl.to_str().unwrap(), "--out", out.to_str().unwrap()];
        let small =
            ["--steps", "2", "--eval-every", "2", "--d-model", "16", "--n-layer", "1", "--seq-len", "32"];
        mamba(&[&base[..], &small, extra].concat())
    };
    // Several documents: packed with resets by default; byte id 256 ends each document.
    let run = d.join("reset");
    let o = train(&run, &[]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let cfg = run_config(&run);
    assert_eq!((cfg["vocab_size"].as_u64(), cfg["eos_token_id"].as_u64()), (Some(257), Some(256)));
    let src: serde_json::Value =
        serde_json::from_slice(&std::fs::read(run.join("source.json")).unwrap()).unwrap();
    assert_eq!(src["data"]["Text"]["packing"], "reset");
    // Documents scored with the end-of-document token before each: one more target per document.
    let plain = eval(&run, &jsonl, &[]);
    let prefixed = eval(&run, &jsonl, &["--eos-prefix"]);
    assert_eq!(prefixed["tokens"].as_u64(), Some(plain["tokens"].as_u64().unwrap() + 40));
    // One stream: no separator, the byte vocabulary.
    let run = d.join("stream");
    let o = train(&run, &["--packing", "stream"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(run_config(&run)["vocab_size"].as_u64(), Some(256));
    // Resets the LTI baseline cannot do, and a token nobody named, are refused before any run.
    let run = d.join("lti");
    let o = train(&run, &["--arch", "lti"]);
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && e.contains("--packing reset") && e.contains("LTI"), "{e}");
    assert!(!run.exists());
    // Resuming with another packing is refused naming both.
    let o = mamba(&[
        "train",
        "--data",
        jsonl.to_str().unwrap(),
        "--out",
        d.join("reset").to_str().unwrap(),
        "--resume",
        "--packing",
        "plain",
    ]);
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && e.contains("--packing plain (the run has reset)"), "{e}");
    std::fs::remove_dir_all(&d).unwrap();
}

/// A word-level tokenizer.json whose added tokens are `added` (JSON objects).
fn wordlevel(added: &str) -> String {
    format!(
        r#"{{"version": "1.0", "truncation": null, "padding": null, "added_tokens": [{added}],
        "normalizer": null, "pre_tokenizer": {{"type": "Whitespace"}}, "post_processor": null,
        "decoder": null, "model": {{"type": "WordLevel", "unk_token": "[UNK]",
        "vocab": {{"[UNK]": 0, "words": 1, "and": 2, "more": 3, "speech": 4, ":": 5}}}}}}"#
    )
}

#[test]
fn a_new_model_with_a_tokenizer_packs_with_its_end_of_text_token() {
    let d = tmp("tok-eos");
    std::fs::create_dir_all(&d).unwrap();
    let lines: Vec<String> = (0..30)
        .map(|i| serde_json::json!({ "text": format!("speech {i}: {}", "words and more words ".repeat(2 + i % 4)) }))
        .map(|v| v.to_string())
        .collect();
    let jsonl = d.join("docs.jsonl");
    std::fs::write(&jsonl, lines.join("\n")).unwrap();
    let endoftext = r#"{"id": 6, "content": "<|endoftext|>", "single_word": false, "lstrip": false,
        "rstrip": false, "normalized": false, "special": true}"#;
    let (with_eos, without) = (d.join("with.json"), d.join("without.json"));
    std::fs::write(&with_eos, wordlevel(endoftext)).unwrap();
    std::fs::write(&without, wordlevel("")).unwrap();
    let train = |tok: &Path, out: &str, extra: &[&str]| {
        let base = ["train", "--data", jsonl.to_str().unwrap(), "--tokenizer", tok.to_str().unwrap()];
        let small =
            ["--steps", "2", "--eval-every", "2", "--d-model", "16", "--n-layer", "1", "--seq-len", "16"];
        let out = d.join(out);
        let o = mamba(&[&base[..], &["--out", out.to_str().unwrap()], &small, extra].concat());
        (o, out)
    };
    // The tokenizer's own <|endoftext|> (a special added token) ends each document.
    let (o, run) = train(&with_eos, "auto", &[]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let cfg = run_config(&run);
    assert_eq!((cfg["vocab_size"].as_u64(), cfg["eos_token_id"].as_u64()), (Some(7), Some(6)));
    // --eos-token names another.
    let (o, run) = train(&without, "named", &["--eos-token", ":"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(run_config(&run)["eos_token_id"].as_u64(), Some(5));
    // Neither: refused, naming the file and the way out, before any run directory is made.
    let (o, run) = train(&without, "none", &[]);
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && e.contains("without.json") && e.contains("--eos-token"), "{e}");
    assert!(!run.exists());
    // A token the tokenizer does not have.
    let (o, _) = train(&with_eos, "unknown", &["--eos-token", "</s>"]);
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && e.contains("--eos-token \"</s>\"") && e.contains("no such token"), "{e}");
    // Not with one stream, which has no separator.
    let (o, _) = train(&with_eos, "stream", &["--eos-token", ":", "--packing", "stream"]);
    assert!(!o.status.success() && String::from_utf8_lossy(&o.stderr).contains("--eos-token"));
    std::fs::remove_dir_all(&d).unwrap();
}
