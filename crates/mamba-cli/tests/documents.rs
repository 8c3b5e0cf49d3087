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
