//! Malformed input across `info`, `eval`, `generate` and `train`: every case must end with a
//! non-zero exit code (1, or clap's 2 for a bad flag) — never a panic, an abort or a signal —
//! and an error message that names the file, field or flag at fault.

use std::path::{Path, PathBuf};
use std::process::Command;

/// An existing text file (this one), for cases whose fault lies elsewhere.
const THIS_FILE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/bad_input.rs");

fn fixture(case: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../mamba-nn/tests/fixtures").join(case)
}

fn scratch() -> PathBuf {
    let d = std::env::temp_dir().join(format!("mamba-bad-input-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// A copy of the `mamba1` fixture model (config.json + model.safetensors) in `dir/name`.
fn model_copy(dir: &Path, name: &str) -> PathBuf {
    let m = dir.join(name);
    std::fs::create_dir_all(&m).unwrap();
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(fixture("mamba1").join(f), m.join(f)).unwrap();
    }
    m
}

/// Rewrites one key of a model copy's config.json.
fn set_config(m: &Path, key: &str, value: serde_json::Value) {
    let p = m.join("config.json");
    let mut v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
    v[key] = value;
    std::fs::write(p, serde_json::to_vec(&v).unwrap()).unwrap();
}

struct Case {
    name: String,
    args: Vec<String>,
    /// Every one of these must appear in stderr.
    expect: Vec<String>,
}

fn case(name: &str, args: &[&str], expect: &[&str]) -> Case {
    Case {
        name: name.into(),
        args: args.iter().map(|s| s.to_string()).collect(),
        expect: expect.iter().map(|s| s.to_string()).collect(),
    }
}

/// The model-directory cases, each checked through `info`, `generate` and `eval`.
fn model_cases(d: &Path) -> Vec<(String, PathBuf, Vec<String>)> {
    let mut out = Vec::new();
    let mut add = |name: &str, m: PathBuf, expect: &[&str]| {
        out.push((name.to_string(), m, expect.iter().map(|s| s.to_string()).collect()));
    };
    add("missing directory", d.join("no-such-model"), &["no-such-model"]);

    let m = model_copy(d, "no-config");
    std::fs::remove_file(m.join("config.json")).unwrap();
    add("no config.json", m, &["config.json"]);

    let m = model_copy(d, "config-not-json");
    std::fs::write(m.join("config.json"), b"{ this is not json").unwrap();
    add("config.json not JSON", m, &["config.json", "JSON"]);

    let m = model_copy(d, "config-empty");
    std::fs::write(m.join("config.json"), b"").unwrap();
    add("config.json empty", m, &["config.json"]);

    let m = model_copy(d, "config-no-hidden");
    let p = m.join("config.json");
    let mut v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
    v.as_object_mut().unwrap().remove("hidden_size");
    v.as_object_mut().unwrap().remove("d_model");
    std::fs::write(&p, serde_json::to_vec(&v).unwrap()).unwrap();
    add("config without hidden_size", m, &["hidden_size"]);

    let m = model_copy(d, "config-huge-hidden");
    set_config(&m, "hidden_size", 1_000_000_000u64.into());
    add("hidden size 10^9", m, &["hidden_size"]);

    let m = model_copy(d, "config-huge-vocab");
    set_config(&m, "vocab_size", 1_000_000_000_000u64.into());
    add("vocab 10^12", m, &["vocab_size"]);

    let m = model_copy(d, "config-huge-layers");
    set_config(&m, "num_hidden_layers", 1_000_000_000u64.into());
    add("10^9 layers", m, &["num_hidden_layers"]);

    let m = model_copy(d, "config-string-size");
    set_config(&m, "hidden_size", "wide".into());
    add("a size that is a string", m, &["hidden_size"]);

    let m = model_copy(d, "config-negative-size");
    set_config(&m, "state_size", (-16i64).into());
    add("a negative size", m, &["state_size"]);

    let m = model_copy(d, "config-more-layers");
    set_config(&m, "num_hidden_layers", 3u64.into());
    add("more layers than the weights", m, &["num_hidden_layers", "model.safetensors"]);

    let m = model_copy(d, "config-fewer-layers");
    set_config(&m, "num_hidden_layers", 1u64.into());
    add("fewer layers than the weights", m, &["num_hidden_layers", "model.safetensors"]);

    let m = d.join("nan-weights");
    let mut model = mamba_nn::model::MambaLM::from_pretrained(fixture("mamba1")).unwrap();
    let id = model.params.id("backbone.layers.1.mixer.out_proj.weight").unwrap();
    model.params.value_mut(id).as_slice_mut().unwrap()[..3].fill(f32::NAN);
    model.save_pretrained(&m).unwrap();
    add("NaN in the weights", m, &["backbone.layers.1.mixer.out_proj.weight", "3"]);

    let m = model_copy(d, "config-wrong-width");
    set_config(&m, "hidden_size", 40u64.into());
    add("a width the weights do not have", m, &["model.safetensors"]);

    let m = model_copy(d, "no-weights");
    std::fs::remove_file(m.join("model.safetensors")).unwrap();
    add("no model.safetensors", m, &["model.safetensors"]);

    let m = model_copy(d, "weights-truncated");
    let bytes = std::fs::read(m.join("model.safetensors")).unwrap();
    std::fs::write(m.join("model.safetensors"), &bytes[..bytes.len() / 2]).unwrap();
    add("truncated model.safetensors", m, &["model.safetensors"]);

    let m = model_copy(d, "weights-empty");
    std::fs::write(m.join("model.safetensors"), b"").unwrap();
    add("empty model.safetensors", m, &["model.safetensors"]);

    let m = model_copy(d, "weights-huge-header");
    let mut bytes = std::fs::read(m.join("model.safetensors")).unwrap();
    bytes[..8].copy_from_slice(&u64::MAX.to_le_bytes());
    std::fs::write(m.join("model.safetensors"), &bytes).unwrap();
    add("header length 2^64 − 1", m, &["model.safetensors"]);

    let m = model_copy(d, "weights-garbage-header");
    let mut bytes = std::fs::read(m.join("model.safetensors")).unwrap();
    for b in bytes[8..40].iter_mut() {
        *b = b'#';
    }
    std::fs::write(m.join("model.safetensors"), &bytes).unwrap();
    add("header not JSON", m, &["model.safetensors"]);
    out
}

fn all_cases(d: &Path) -> Vec<Case> {
    let mut cases = Vec::new();
    for (name, m, expect) in model_cases(d) {
        let ms = m.to_str().unwrap().to_string();
        let e: Vec<&str> = expect.iter().map(String::as_str).collect();
        cases.push(case(&format!("info: {name}"), &["info", "--model", &ms], &e));
        cases.push(case(
            &format!("generate: {name}"),
            &["generate", "--model", &ms, "--prompt-ids", "1,2", "--max-new-tokens", "3"],
            &e,
        ));
        cases.push(case(&format!("eval: {name}"), &["eval", "--model", &ms, "--data", THIS_FILE], &e));
    }
    let good = fixture("mamba1");
    let g = good.to_str().unwrap();
    let generate = |extra: &[&str]| -> Vec<String> {
        ["generate", "--model", g, "--prompt-ids", "1,2"].iter().chain(extra).map(|s| s.to_string()).collect()
    };
    for (name, extra, expect) in [
        ("negative temperature", vec!["--temperature", "-1"], "--temperature"),
        ("NaN temperature", vec!["--temperature", "nan"], "--temperature"),
        ("top-p 0", vec!["--top-p", "0"], "--top-p"),
        ("top-p above 1", vec!["--top-p", "1.5"], "--top-p"),
        ("10^12 new tokens", vec!["--max-new-tokens", "1000000000000"], "--max-new-tokens"),
        ("a prompt id that is not a number", vec!["--prompt-ids", "1,x"], "--prompt-ids"),
    ] {
        let mut args = generate(&extra);
        if name.starts_with("a prompt id") {
            args = ["generate", "--model", g, "--prompt-ids", "1,x"].iter().map(|s| s.to_string()).collect();
        }
        cases.push(Case { name: format!("generate: {name}"), args, expect: vec![expect.into()] });
    }
    cases.push(case(
        "generate: a prompt id outside the vocabulary",
        &["generate", "--model", g, "--prompt-ids", "1,99999"],
        &["99999", "vocabulary"],
    ));

    let tokens = |name: &str, body: &str| -> String {
        let p = d.join(name);
        std::fs::write(&p, body).unwrap();
        p.to_str().unwrap().to_string()
    };
    cases.push(case(
        "generate: a stop id outside the vocabulary",
        &["generate", "--model", g, "--prompt-ids", "1,2", "--stop-id", "99999"],
        &["--stop-id", "99999", "vocabulary"],
    ));
    for (name, body, expect) in [
        ("an empty prompt file", "", &["empty-prompts.txt", "no prompts"][..]),
        ("an empty line in a prompt file", "one\n\nthree\n", &["blank-line.txt", "line 2", "empty"][..]),
    ] {
        let file = tokens(if name.contains("line") { "blank-line.txt" } else { "empty-prompts.txt" }, body);
        cases.push(case(
            &format!("generate: {name}"),
            &["generate", "--model", g, "--prompt-file", &file],
            expect,
        ));
    }
    let absent = d.join("no-such-prompts.txt");
    cases.push(case(
        "generate: a prompt file that does not exist",
        &["generate", "--model", g, "--prompt-file", absent.to_str().unwrap()],
        &["no-such-prompts.txt"],
    ));
    for (name, body, expect) in [
        ("not JSON", "[[1, 2", "not-json.json"),
        ("a negative id", "[[1, -2, 3]]", "negative.json"),
        ("an id outside the vocabulary", "[[1, 999999, 3]]", "999999"),
        ("an object instead of arrays", "{\"a\": 1}", "object.json"),
        ("empty", "", "empty.json"),
    ] {
        let file = tokens(&format!("{}.json", name.split(' ').next_back().unwrap()), body);
        let expect = if expect.ends_with(".json") { file.clone() } else { expect.to_string() };
        cases.push(case(
            &format!("eval --tokens: {name}"),
            &["eval", "--model", g, "--tokens", &file],
            &[&expect],
        ));
    }
    cases.push(case(
        "eval --tokens: a missing file",
        &["eval", "--model", g, "--tokens", "/no/such/tokens.json"],
        &["/no/such/tokens.json"],
    ));
    cases.push(case(
        "eval: --seq-len 0",
        &["eval", "--model", g, "--data", THIS_FILE, "--seq-len", "0"],
        &["--seq-len"],
    ));
    cases.push(case(
        "eval: a missing --data file",
        &["eval", "--model", g, "--data", "/no/such.txt"],
        &["/no/such.txt"],
    ));
    let empty = tokens("empty.txt", "");
    cases.push(case("eval: an empty --data file", &["eval", "--model", g, "--data", &empty], &[&empty]));

    let corpus = tokens("corpus.txt", &"abc def ghi\n".repeat(200));
    let out = d.join("train-out");
    let o = out.to_str().unwrap().to_string();
    let train = |extra: &[&str]| -> Vec<String> {
        ["train", "--data", corpus.as_str(), "--out", o.as_str(), "--steps", "1"]
            .iter()
            .chain(extra)
            .map(|s| s.to_string())
            .collect()
    };
    for (name, extra, expect) in [
        ("--batch-size 0", vec!["--batch-size", "0"], "--batch-size"),
        ("--seq-len 0", vec!["--seq-len", "0"], "--seq-len"),
        ("--d-model 0", vec!["--d-model", "0"], "--d-model"),
        ("--n-layer 0", vec!["--n-layer", "0"], "--n-layer"),
        ("--eval-every 0", vec!["--eval-every", "0"], "--eval-every"),
        ("a negative learning rate", vec!["--lr", "-1e-3"], "--lr"),
        ("a NaN learning rate", vec!["--lr", "NaN"], "--lr"),
        ("a negative time budget", vec!["--time-budget", "-5"], "--time-budget"),
        ("a NaN time budget", vec!["--time-budget", "nan"], "--time-budget"),
        ("--keep-checkpoints 0", vec!["--keep-checkpoints", "0"], "--keep-checkpoints"),
    ] {
        cases.push(Case { name: format!("train: {name}"), args: train(&extra), expect: vec![expect.into()] });
    }
    // A non-number --steps replaces the --steps 1 of `train` (0 is valid: evaluate and
    // checkpoint the starting model).
    cases.push(case(
        "train: --steps many",
        &["train", "--data", &corpus, "--out", &o, "--steps", "many"],
        &["--steps"],
    ));
    cases.push(case(
        "train: a missing --data file",
        &["train", "--data", "/no/such/corpus.txt", "--out", &o],
        &["/no/such/corpus.txt"],
    ));
    cases.push(case("train: an empty --data file", &["train", "--data", &empty, "--out", &o], &[&empty]));
    let foreign = model_copy(d, "foreign-out");
    cases.push(case(
        "train: --out holding a downloaded model",
        &["train", "--data", &corpus, "--out", foreign.to_str().unwrap(), "--steps", "1"],
        &["not a training run directory", "model.safetensors"],
    ));
    cases.push(case(
        "train: --resume of a directory without a run",
        &["train", "--out", d.join("nothing-here").to_str().unwrap(), "--resume"],
        &["nothing-here"],
    ));
    let bad_tok = tokens("tokenizer-bad.json", "{\"model\": 17}");
    cases.push(case(
        "train: a corrupt --tokenizer",
        &["train", "--data", &corpus, "--tokenizer", &bad_tok, "--out", d.join("tok-out").to_str().unwrap()],
        &["tokenizer-bad.json"],
    ));
    cases
}

#[test]
fn malformed_input_fails_cleanly_naming_the_culprit() {
    let d = scratch();
    let cases = all_cases(&d);
    assert!(cases.len() >= 40, "{} cases", cases.len());
    let mut failures = Vec::new();
    for c in &cases {
        let o = Command::new(env!("CARGO_BIN_EXE_mamba")).args(&c.args).output().expect("run mamba");
        let err = String::from_utf8_lossy(&o.stderr);
        let code = o.status.code();
        let ok_code = matches!(code, Some(1) | Some(2));
        let missing: Vec<&String> = c.expect.iter().filter(|e| !err.contains(e.as_str())).collect();
        if !ok_code || err.contains("panicked") || !missing.is_empty() {
            failures.push(format!(
                "{}: exit {code:?}, missing {missing:?} in stderr:\n{}",
                c.name,
                err.lines().take(4).collect::<Vec<_>>().join("\n")
            ));
        }
    }
    let _ = std::fs::remove_dir_all(&d);
    assert!(
        failures.is_empty(),
        "{} of {} cases failed:\n\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n\n")
    );
}
