//! The `mamba` binary end to end: help, errors for bad input, generation and evaluation against
//! the transformers fixtures, and a task run that resumes.

use std::path::PathBuf;
use std::process::{Command, Output};

use mamba_nn::checkpoint::TensorFile;
use mamba_nn::tensor::data;

fn mamba(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_mamba")).args(args).output().expect("run mamba")
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn fixture(case: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../mamba-nn/tests/fixtures").join(case)
}

fn tmp(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("mamba-cli-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

#[test]
fn help_lists_commands_and_defaults() {
    let o = mamba(&["--help"]);
    assert!(o.status.success());
    for cmd in ["train", "generate", "eval", "info"] {
        assert!(stdout(&o).contains(cmd), "{cmd} missing from --help:\n{}", stdout(&o));
    }
    let o = mamba(&["train", "--help"]);
    for flag in [
        "--data",
        "--task",
        "--arch",
        "--d-model",
        "--time-budget",
        "--resume",
        "[default: 256]",
        "[default: mamba1]",
    ] {
        assert!(stdout(&o).contains(flag), "{flag} missing from train --help:\n{}", stdout(&o));
    }
}

#[test]
fn missing_data_is_a_clear_error() {
    let out = tmp("missing");
    let o = mamba(&[
        "train",
        "--data",
        "/nonexistent/corpus.txt",
        "--out",
        out.to_str().unwrap(),
        "--steps",
        "1",
    ]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("/nonexistent/corpus.txt"), "{}", stderr(&o));
    let o = mamba(&["info", "--model", "/nonexistent/model"]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("/nonexistent/model/config.json"), "{}", stderr(&o));
    let _ = std::fs::remove_dir_all(&out);
}

#[test]
fn greedy_generation_matches_transformers() {
    for case in ["mamba1", "mamba2-g1"] {
        let fx = TensorFile::open(fixture(case).join("fixtures.safetensors")).unwrap();
        let (_, prompt) = fx.i64("gen_prompt").unwrap();
        let (_, want) = fx.i64("gen_tokens").unwrap();
        let ids: Vec<String> = prompt.iter().map(|t| t.to_string()).collect();
        let n = (want.len() - prompt.len()).to_string();
        let dir = fixture(case);
        let o = mamba(&[
            "generate",
            "--model",
            dir.to_str().unwrap(),
            "--prompt-ids",
            &ids.join(","),
            "--max-new-tokens",
            &n,
            "--temperature",
            "0",
            "--json",
        ]);
        assert!(o.status.success(), "{}", stderr(&o));
        let line: serde_json::Value = serde_json::from_str(stdout(&o).trim()).unwrap();
        let got: Vec<i64> = line["tokens"].as_array().unwrap().iter().map(|v| v.as_i64().unwrap()).collect();
        assert_eq!(got, want[prompt.len()..], "{case}");
        assert!(line["decode_tokens_per_s"].as_f64().unwrap() > 0.0);
    }
}

#[test]
fn eval_gives_the_transformers_loss() {
    for case in ["mamba1-untied", "mamba2-g2"] {
        let fx = TensorFile::open(fixture(case).join("fixtures.safetensors")).unwrap();
        let (shape, ids) = fx.i64("input_ids").unwrap();
        let seqs: Vec<Vec<i64>> = ids.chunks(shape[1]).map(<[i64]>::to_vec).collect();
        let path = tmp(&format!("tokens-{case}.json"));
        std::fs::write(&path, serde_json::to_string(&seqs).unwrap()).unwrap();
        let dir = fixture(case);
        let o =
            mamba(&["eval", "--model", dir.to_str().unwrap(), "--tokens", path.to_str().unwrap(), "--json"]);
        assert!(o.status.success(), "{}", stderr(&o));
        let line: serde_json::Value = serde_json::from_str(stdout(&o).trim()).unwrap();
        let want = data(&fx.f32("loss").unwrap())[0] as f64;
        let got = line["loss"].as_f64().unwrap();
        assert!((got - want).abs() < 1e-5, "{case}: mamba eval {got} vs transformers {want}");
        assert_eq!(line["tokens"].as_u64().unwrap() as usize, shape[0] * (shape[1] - 1));
        assert!((line["ppl"].as_f64().unwrap() / want.exp() - 1.0).abs() < 1e-4);
        let _ = std::fs::remove_file(&path);
    }
}

#[test]
fn task_run_writes_metrics_and_resumes() {
    let out = tmp("task");
    let o = out.to_str().unwrap();
    let common = [
        "--task",
        "selective-copying",
        "--d-model",
        "16",
        "--n-layer",
        "1",
        "--d-state",
        "4",
        "--eval-every",
        "2",
    ];
    let r = mamba(&[&["train", "--out", o, "--steps", "2"][..], &common[..]].concat());
    assert!(r.status.success(), "{}", stderr(&r));
    assert!(stdout(&r).contains("final validation accuracy"), "{}", stdout(&r));
    // The same --out without --resume is refused, naming the directory.
    let again = mamba(&[&["train", "--out", o, "--steps", "2"][..], &common[..]].concat());
    assert!(
        !again.status.success() && stderr(&again).contains("already holds a training run"),
        "{}",
        stderr(&again)
    );
    let r = mamba(&["train", "--out", o, "--resume", "--steps", "4"]);
    assert!(r.status.success(), "{}", stderr(&r));
    assert!(stderr(&r).contains("resuming") && stderr(&r).contains("at step 2"), "{}", stderr(&r));
    let metrics = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
    let steps: Vec<u64> = metrics
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["step"].as_u64().unwrap())
        .collect();
    assert_eq!(steps, vec![2, 4]);
    assert!(metrics.lines().all(|l| l.contains("val_accuracy")));
    let info = mamba(&["info", "--model", o]);
    assert!(info.status.success() && stdout(&info).contains("parameters"), "{}", stdout(&info));
    // The kernels line names the BF16 dot product exactly where bf16 weights go through it (the
    // level is this process's: the same CPU and MAMBA_SIMD).
    let says_bf16 = stdout(&info).lines().any(|l| l.starts_with("kernels") && l.contains("BF16 dot product"));
    assert_eq!(says_bf16, mamba_nn::ssm_kernel::isa::bf16_dot(), "{}", stdout(&info));
    let _ = std::fs::remove_dir_all(&out);
}

#[test]
fn streamed_text_is_the_decoded_tokens() {
    // Greedy, so the streamed run and the --json run choose the same tokens.
    let dir = fixture("mamba1-untied");
    let d = dir.to_str().unwrap();
    let common =
        ["generate", "--model", d, "--prompt", "The cat", "--max-new-tokens", "40", "--temperature", "0"];
    let json = mamba(&[&common[..], &["--json"]].concat());
    assert!(json.status.success(), "{}", stderr(&json));
    let line: serde_json::Value = serde_json::from_str(stdout(&json).trim()).unwrap();
    let bytes: Vec<u8> =
        line["tokens"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u8).collect();
    let streamed = mamba(&common);
    assert!(streamed.status.success(), "{}", stderr(&streamed));
    let want = format!("The cat{}\n", String::from_utf8_lossy(&bytes));
    assert_eq!(stdout(&streamed), want);
    assert!(stderr(&streamed).contains("new tokens at"), "{}", stderr(&streamed));
}

/// `--prompt-file` generates every line as one batch; each result equals the line generated
/// alone with `--prompt` (greedy and sampled), and `--stop-id` ends a sequence at that token.
#[test]
fn prompt_file_batches_equal_single_prompts() {
    let dir = fixture("mamba2-g2");
    let m = dir.to_str().unwrap();
    let lines = ["The quick", "a", "Once upon a time, there"];
    let file = tmp("prompts.txt");
    std::fs::write(&file, lines.join("\n") + "\n").unwrap();
    let f = file.to_str().unwrap();
    for sampling in [&["--temperature", "0"][..], &["--temperature", "0.9", "--seed", "3"][..]] {
        let run = |extra: &[&str]| -> serde_json::Value {
            let mut args = vec!["generate", "--model", m, "--max-new-tokens", "7", "--json"];
            args.extend_from_slice(sampling);
            args.extend_from_slice(extra);
            let o = mamba(&args);
            assert!(o.status.success(), "{args:?}: {}", stderr(&o));
            serde_json::from_str(stdout(&o).trim()).unwrap()
        };
        let batch = run(&["--prompt-file", f]);
        let results = batch["results"].as_array().unwrap();
        assert_eq!(results.len(), lines.len());
        for (line, got) in lines.iter().zip(results) {
            let alone = run(&["--prompt", line]);
            assert_eq!(got["tokens"], alone["tokens"], "{line:?} {sampling:?}");
            assert_eq!(got["text"], alone["text"], "{line:?}");
        }
        assert!(batch["decode_tokens_per_s"].as_f64().unwrap() > 0.0);
        // Stop at the first prompt's third token: it ends there, the others only if they
        // produce that token.
        let stop = results[0]["tokens"][2].as_u64().unwrap().to_string();
        let stopped = run(&["--prompt-file", f, "--stop-id", &stop]);
        for (full, got) in results.iter().zip(stopped["results"].as_array().unwrap()) {
            let full: Vec<u64> =
                full["tokens"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap()).collect();
            let end = full.iter().position(|t| t.to_string() == stop).map_or(full.len(), |i| i + 1);
            let got: Vec<u64> =
                got["tokens"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap()).collect();
            assert_eq!(got, full[..end], "stop id {stop}");
        }
    }
    let _ = std::fs::remove_file(&file);
}
