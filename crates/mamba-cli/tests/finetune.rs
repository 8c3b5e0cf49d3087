//! Fine-tuning from a Hugging Face directory with the `mamba` binary: `train --from` with no
//! steps reproduces the model, flags that contradict it are named, and a LoRA run's adapter
//! gives the same loss applied with `--adapter` as merged by `mamba merge`.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use mamba_nn::model::MambaLM;
use mamba_nn::tape::Tape;
use mamba_nn::tensor::data;

fn mamba(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_mamba")).args(args).output().expect("run mamba")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn fixture(case: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../mamba-nn/tests/fixtures").join(case)
}

fn tmp(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("mamba-ft-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// A small byte-level text file.
fn text_file(tag: &str) -> PathBuf {
    let p = tmp(&format!("{tag}.txt"));
    let text: String =
        (0..600).map(|i| ["to be or not. ", "the rest is silence\n", "so it goes; "][i % 3]).collect();
    std::fs::write(&p, text).unwrap();
    p
}

fn logits(m: &MambaLM, ids: &[usize]) -> Vec<f32> {
    let mut tape = Tape::inference(&m.params);
    let l = m.forward(&mut tape, ids, 1, ids.len());
    data(tape.value(l)).to_vec()
}

fn eval_loss(args: &[&str]) -> f64 {
    let o = mamba(&[&["eval", "--json", "--seq-len", "32"], args].concat());
    assert!(o.status.success(), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    v["loss"].as_f64().unwrap()
}

#[test]
fn from_with_no_steps_reproduces_the_model_and_records_its_base() {
    let data = text_file("zero");
    for case in ["mamba1-untied", "mamba2-g2"] {
        let out = tmp(&format!("zero-{case}"));
        let o = mamba(&[
            "train",
            "--from",
            s(&fixture(case)),
            "--data",
            s(&data),
            "--steps",
            "0",
            "--seq-len",
            "16",
            "--out",
            s(&out),
        ]);
        assert!(o.status.success(), "{case}: {}", stderr(&o));
        let base = MambaLM::from_pretrained(fixture(case)).unwrap();
        let tuned = MambaLM::from_pretrained(&out).unwrap();
        assert_eq!(tuned.config, base.config, "{case}: same architecture, vocabulary and token ids");
        let ids: Vec<usize> = (0..20).map(|i| (i * 37 + 5) % 200).collect();
        assert_eq!(logits(&tuned, &ids), logits(&base, &ids), "{case}: same logits");
        let src: serde_json::Value =
            serde_json::from_slice(&std::fs::read(out.join("source.json")).unwrap()).unwrap();
        let recorded = PathBuf::from(src["from"]["dir"].as_str().unwrap());
        assert_eq!(recorded, fixture(case).canonicalize().unwrap(), "{case}: source.json records the base");
        let _ = std::fs::remove_dir_all(&out);
    }
    let _ = std::fs::remove_file(&data);
}

#[test]
fn flags_that_contradict_the_base_are_named_and_nothing_is_written() {
    let data = text_file("conflict");
    let out = tmp("conflict");
    let o = mamba(&[
        "train",
        "--from",
        s(&fixture("mamba1-untied")),
        "--data",
        s(&data),
        "--d-model",
        "48",
        "--arch",
        "mamba2",
        "--out",
        s(&out),
    ]);
    assert!(!o.status.success());
    let e = stderr(&o);
    assert!(
        e.contains("--d-model 48 (the model has 40)") && e.contains("--arch mamba2 (the model has mamba1)"),
        "{e}"
    );
    assert!(!out.exists(), "no run directory for a refused run");
    let o = mamba(&["train", "--data", s(&data), "--lora-rank", "4"]);
    assert!(!o.status.success() && stderr(&o).contains("--from"), "{}", stderr(&o));
    let o = mamba(&[
        "train",
        "--from",
        s(&fixture("mamba2-g2")),
        "--data",
        s(&data),
        "--lora-rank",
        "2",
        "--lora-targets",
        "x_proj",
        "--out",
        s(&out),
    ]);
    let e = stderr(&o);
    assert!(!o.status.success() && e.contains("`x_proj`") && e.contains("in_proj, out_proj"), "{e}");
    assert!(!out.exists());
    let _ = std::fs::remove_file(&data);
}

#[test]
fn a_lora_run_applied_as_adapter_equals_its_merge() {
    let data = text_file("lora");
    let base = fixture("mamba1-untied");
    let run = tmp("lora-run");
    let o = mamba(&[
        "train",
        "--from",
        s(&base),
        "--data",
        s(&data),
        "--lora-rank",
        "2",
        "--lora-alpha",
        "4",
        "--lora-targets",
        "in_proj,x_proj,dt_proj,out_proj",
        "--steps",
        "4",
        "--eval-every",
        "2",
        "--seq-len",
        "32",
        "--batch-size",
        "2",
        "--lr",
        "1e-2",
        "--out",
        s(&run),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let cfg: serde_json::Value =
        serde_json::from_slice(&std::fs::read(run.join("adapter_config.json")).unwrap()).unwrap();
    assert_eq!((cfg["r"].as_u64(), cfg["lora_alpha"].as_f64()), (Some(2), Some(4.0)));
    assert!(!run.join("model.safetensors").exists(), "the run holds the adapter, not a copy of the base");
    let src: serde_json::Value =
        serde_json::from_slice(&std::fs::read(run.join("source.json")).unwrap()).unwrap();
    assert_eq!(
        (src["from"]["lora"]["rank"].as_u64(), src["from"]["lora"]["alpha"].as_f64()),
        (Some(2), Some(4.0))
    );
    let base_loss = eval_loss(&["--model", s(&base), "--data", s(&data)]);
    let adapted = eval_loss(&["--model", s(&base), "--adapter", s(&run), "--data", s(&data)]);
    assert!((adapted - base_loss).abs() > 1e-4, "the adapter changes the loss: {adapted} vs {base_loss}");
    let merged = tmp("lora-merged");
    let o = mamba(&["merge", "--model", s(&base), "--adapter", s(&run), "--out", s(&merged)]);
    assert!(o.status.success(), "{}", stderr(&o));
    let merged_loss = eval_loss(&["--model", s(&merged), "--data", s(&data)]);
    assert!((merged_loss - adapted).abs() < 1e-5, "merged {merged_loss} vs adapter {adapted}");
    // A second merge into the same place is refused rather than overwriting it.
    let o = mamba(&["merge", "--model", s(&base), "--adapter", s(&run), "--out", s(&merged)]);
    assert!(!o.status.success() && stderr(&o).contains("not empty"), "{}", stderr(&o));
    for d in [run, merged] {
        let _ = std::fs::remove_dir_all(d);
    }
    let _ = std::fs::remove_file(&data);
}

/// A word-level tokenizer.json over the words of [`text_file`].
const WORDLEVEL: &str = r#"{"version": "1.0", "truncation": null, "padding": null, "added_tokens": [],
    "normalizer": null, "pre_tokenizer": {"type": "Whitespace"}, "post_processor": null, "decoder": null,
    "model": {"type": "WordLevel", "unk_token": "[UNK]", "vocab": {"[UNK]": 0, "to": 1, "be": 2, "or": 3,
        "not": 4, ".": 5, "the": 6, "rest": 7, "is": 8, "silence": 9, "so": 10, "it": 11, "goes": 12, ";": 13}}}"#;

#[test]
fn from_a_model_with_a_tokenizer_trains_on_its_tokens_and_carries_its_files() {
    let base = tmp("tok-base");
    std::fs::create_dir_all(&base).unwrap();
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(fixture("mamba2-g2").join(f), base.join(f)).unwrap();
    }
    std::fs::write(base.join("tokenizer.json"), WORDLEVEL).unwrap();
    std::fs::write(base.join("tokenizer_config.json"), r#"{"model_max_length": 2048}"#).unwrap();
    let data = text_file("tok");
    let out = tmp("tok-run");
    // Without --data there is nothing to tokenize with the model's tokenizer.
    let o = mamba(&["train", "--from", s(&base), "--out", s(&out)]);
    assert!(!o.status.success() && stderr(&o).contains("give --data"), "{}", stderr(&o));
    let o = mamba(&[
        "train",
        "--from",
        s(&base),
        "--data",
        s(&data),
        "--steps",
        "2",
        "--eval-every",
        "2",
        "--seq-len",
        "8",
        "--batch-size",
        "2",
        "--out",
        s(&out),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    for f in ["tokenizer.json", "tokenizer_config.json"] {
        assert_eq!(
            std::fs::read(out.join(f)).unwrap(),
            std::fs::read(base.join(f)).unwrap(),
            "{f} carried over"
        );
    }
    let src: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("source.json")).unwrap()).unwrap();
    assert_eq!(src["data"]["Text"]["hf_tokenizer"], true, "{src}");
    // The run scores text with the model's tokenizer: the same token count as the base.
    let o = mamba(&["eval", "--json", "--seq-len", "32", "--model", s(&out), "--data", s(&data)]);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert!(v["loss"].as_f64().is_some_and(f64::is_finite), "{v}");
    assert_eq!(v["tokens"].as_u64(), Some(2600 - 2600usize.div_ceil(32) as u64), "word tokens, not bytes");
    for d in [base, out] {
        let _ = std::fs::remove_dir_all(d);
    }
    let _ = std::fs::remove_file(&data);
}
