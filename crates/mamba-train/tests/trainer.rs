//! The training loop: exact resume, a non-finite loss stops the run and keeps the last good
//! checkpoint, the run directory's files.

use std::path::PathBuf;

use mamba_nn::config::MambaConfig;
use mamba_nn::model::{LoraConfig, MambaLM};
use mamba_nn::tensor::data;
use mamba_train::data::TextData;
use mamba_train::tasks::Task;
use mamba_train::tokenizer::{ByteTokenizer, Tokenizer};
use mamba_train::trainer::{Metrics, Objective, Silent, TrainConfig, TrainError, Trainer};

fn tmp(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("mamba-train-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

fn text_objective() -> Objective {
    let text: String = (0..4000).map(|i| ["the cat sat. ", "a dog ran! ", "we sing.\n"][i % 3]).collect();
    let tok = ByteTokenizer;
    let ids = tok.encode(&text).into_iter().map(|t| t as u32).collect();
    let data = TextData::from_tokens(std::path::Path::new("<test>"), ids).unwrap();
    Objective::Text { data, tokenizer: Box::new(ByteTokenizer) }
}

fn tiny_model(seed: u64) -> MambaLM {
    MambaLM::new(MambaConfig { d_state: 4, ..MambaConfig::mamba1(256, 16, 1) }, seed).unwrap()
}

fn config(steps: u64) -> TrainConfig {
    TrainConfig {
        seq_len: 32,
        batch_size: 2,
        lr: 3e-3,
        min_lr: 3e-4,
        warmup_steps: 2,
        steps: Some(steps),
        eval_every: 3,
        eval_tokens: 512,
        ..TrainConfig::default()
    }
}

fn metrics(dir: &std::path::Path) -> Vec<Metrics> {
    std::fs::read_to_string(dir.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[test]
fn resume_continues_exactly() {
    let obj = text_objective();
    // Straight through: 6 steps.
    let d1 = tmp("straight");
    let mut t = Trainer::new(tiny_model(1), config(6), &d1).unwrap();
    let (initial, _) = t.evaluate(&obj);
    let straight = t.run(&obj, &mut Silent).unwrap();
    let straight_params: Vec<Vec<f32>> =
        t.model.params.iter().map(|(_, p)| data(&p.value).to_vec()).collect();
    // 3 steps, then a fresh process-like resume from the directory for 3 more.
    let d2 = tmp("resumed");
    let mut a = Trainer::new(tiny_model(1), config(3), &d2).unwrap();
    a.run(&obj, &mut Silent).unwrap();
    drop(a);
    let mut b = Trainer::resume(&d2).unwrap();
    assert_eq!((b.step, b.tokens), (3, 3 * 2 * 32));
    b.config.steps = Some(6);
    let resumed = b.run(&obj, &mut Silent).unwrap();
    let resumed_params: Vec<Vec<f32>> = b.model.params.iter().map(|(_, p)| data(&p.value).to_vec()).collect();
    assert_eq!(resumed_params, straight_params, "parameters after resume differ");
    assert_eq!(
        (resumed.step, resumed.tokens, resumed.val_loss),
        (straight.step, straight.tokens, straight.val_loss)
    );
    assert_eq!(resumed.train_loss, straight.train_loss);
    // Both directories hold the model at the top, two complete checkpoints (the newest two),
    // and one metrics line per evaluation.
    for d in [&d1, &d2] {
        for f in ["config.json", "model.safetensors", "loss.svg", "checkpoints/latest"] {
            assert!(d.join(f).exists(), "{} missing in {}", f, d.display());
        }
        for step in ["step-00000003", "step-00000006"] {
            for f in
                ["config.json", "model.safetensors", "optimizer.safetensors", "trainer.json", "manifest.json"]
            {
                let p = d.join("checkpoints").join(step).join(f);
                assert!(p.exists(), "{} missing", p.display());
            }
        }
        assert_eq!(
            std::fs::read(d.join("model.safetensors")).unwrap(),
            std::fs::read(d.join("checkpoints/step-00000006/model.safetensors")).unwrap(),
            "the top-level model is the latest checkpoint's"
        );
        let m = metrics(d);
        assert_eq!(m.iter().map(|m| m.step).collect::<Vec<_>>(), vec![3, 6]);
        assert!(m.iter().all(|m| m.val_loss.is_finite() && m.tokens_per_s > 0.0));
    }
    // Learning happened.
    assert!(straight.val_loss < initial - 0.1, "val loss {} from {initial}", straight.val_loss);
    let _ = std::fs::remove_dir_all(&d1);
    let _ = std::fs::remove_dir_all(&d2);
}

/// A LoRA run: only the adapters train (the base parameters end bit-identical), the
/// checkpoints hold the PEFT adapter and the adapters' optimizer state only, and a resume (base
/// loaded from where `with_base` recorded it, adapter on top) continues exactly.
#[test]
fn lora_runs_train_only_the_adapters_and_resume_exactly() {
    let obj = text_objective();
    let base_dir = tmp("lora-base");
    let base = tiny_model(4);
    base.save_pretrained(&base_dir).unwrap();
    let lora =
        LoraConfig { rank: 2, alpha: 4.0, targets: vec!["in_proj".into(), "out_proj".into()], rslora: false };
    let adapted = || {
        let mut m = MambaLM::from_pretrained(&base_dir).unwrap();
        m.add_lora(&lora, 7).unwrap();
        m
    };
    let d1 = tmp("lora-straight");
    // Adapters start at B = 0 and learn slowly on a random base: a larger step.
    let lora_config = |steps| TrainConfig { lr: 3e-2, min_lr: 3e-3, ..config(steps) };
    let mut t = Trainer::new(adapted(), lora_config(6), &d1).unwrap().with_base(&base_dir);
    let (initial, _) = t.evaluate(&obj);
    let straight = t.run(&obj, &mut Silent).unwrap();
    assert!(straight.val_loss < initial - 0.05, "val loss {} from {initial}", straight.val_loss);
    for (id, p) in base.params.iter() {
        assert_eq!(data(&t.model.params.value(id).clone()), data(&p.value), "frozen {} changed", p.name);
    }
    let opt =
        mamba_nn::checkpoint::TensorFile::open(d1.join("checkpoints/step-00000006/optimizer.safetensors"))
            .unwrap();
    let names: Vec<&str> = opt.names().collect();
    assert_eq!(names.len(), 2 * 2 * 2, "exp_avg and exp_avg_sq of A and B of two projections: {names:?}");
    assert!(names.iter().all(|n| n.contains(".lora_")), "{names:?}");
    for f in ["adapter_config.json", "adapter_model.safetensors"] {
        assert!(d1.join(f).exists() && d1.join("checkpoints/step-00000006").join(f).exists(), "{f}");
    }
    assert!(!d1.join("model.safetensors").exists(), "a LoRA run does not copy the base");
    let adapter = |m: &MambaLM| -> Vec<Vec<f32>> {
        m.params.trainable().map(|(_, p)| data(&p.value).to_vec()).collect()
    };
    let straight_adapter = adapter(&t.model);
    let d2 = tmp("lora-resumed");
    let mut a = Trainer::new(adapted(), lora_config(3), &d2).unwrap().with_base(&base_dir);
    a.run(&obj, &mut Silent).unwrap();
    drop(a);
    let mut b = Trainer::resume(&d2).unwrap();
    assert_eq!(b.base(), Some(base_dir.as_path()));
    b.config.steps = Some(6);
    let resumed = b.run(&obj, &mut Silent).unwrap();
    assert_eq!(adapter(&b.model), straight_adapter, "adapters after resume differ");
    assert_eq!((resumed.val_loss, resumed.train_loss), (straight.val_loss, straight.train_loss));
    // The trained adapter, loaded onto the base, is what the trainer evaluated.
    let mut loaded = MambaLM::from_pretrained(&base_dir).unwrap();
    loaded.load_adapter(&d1).unwrap();
    assert_eq!(adapter(&loaded), straight_adapter);
    for d in [d1, d2, base_dir] {
        let _ = std::fs::remove_dir_all(d);
    }
}

#[test]
fn non_finite_loss_stops_and_keeps_the_last_checkpoint() {
    let obj = text_objective();
    let dir = tmp("nan");
    let mut t = Trainer::new(tiny_model(2), config(3), &dir).unwrap();
    t.run(&obj, &mut Silent).unwrap();
    let saved = std::fs::read(dir.join("model.safetensors")).unwrap();
    // Corrupt the live model: the next loss is NaN.
    let id = t.model.params.id("backbone.norm_f.weight").unwrap();
    t.model.params.value_mut(id).fill(f32::NAN);
    t.config.steps = Some(10);
    let err = t.run(&obj, &mut Silent).unwrap_err();
    assert!(matches!(err, TrainError::NonFinite { step: 4, what: "loss", .. }), "{err}");
    let msg = err.to_string();
    assert!(msg.starts_with("step 4: the loss is NaN (not finite); training stopped."), "{msg}");
    assert!(msg.contains(&dir.display().to_string()), "{msg}");
    assert_eq!(
        std::fs::read(dir.join("model.safetensors")).unwrap(),
        saved,
        "the last good checkpoint was overwritten"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn task_training_reports_accuracy() {
    let dir = tmp("task");
    let model = MambaLM::new(
        MambaConfig { d_state: 4, ..MambaConfig::mamba1(Task::SelectiveCopying.vocab_size(), 16, 1) },
        0,
    )
    .unwrap();
    let cfg = TrainConfig { seq_len: Task::SelectiveCopying.seq_len(), ..config(2) };
    let m = Trainer::new(model, cfg, &dir)
        .unwrap()
        .run(&Objective::Task(Task::SelectiveCopying), &mut Silent)
        .unwrap();
    let acc = m.val_accuracy.expect("tasks report accuracy");
    assert!((0.0..=1.0).contains(&acc), "{acc}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn too_short_data_is_an_error_naming_the_source() {
    let tok = ByteTokenizer;
    let ids = tok.encode("short text, far too short for a window").into_iter().map(|t| t as u32).collect();
    let data = TextData::from_tokens(std::path::Path::new("tiny.txt"), ids).unwrap();
    let obj = Objective::Text { data, tokenizer: Box::new(ByteTokenizer) };
    let dir = tmp("short");
    let err = Trainer::new(tiny_model(3), config(2), &dir).unwrap().run(&obj, &mut Silent).unwrap_err();
    assert!(err.to_string().contains("tiny.txt"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// A stateful run (rows reading the text in order, each window from the previous one's state,
/// restarting at an end-of-document token) resumes exactly: the carried state and the rows'
/// positions are in the checkpoint. And it differs from a stateless run, so the state is used.
#[test]
fn stateful_runs_carry_the_state_and_resume_exactly() {
    let eos = 256u32;
    let text: String = (0..3000).map(|i| ["the cat sat. ", "a dog ran! ", "we sing.\n"][i % 3]).collect();
    // Documents of 97 tokens, each preceded by the end-of-document id.
    let ids: Vec<u32> = text
        .bytes()
        .enumerate()
        .flat_map(|(i, b)| (i % 97 == 0).then_some(eos).into_iter().chain([u32::from(b)]))
        .collect();
    let text_data = TextData::from_tokens(std::path::Path::new("<test>"), ids).unwrap();
    let obj = Objective::Text { data: text_data, tokenizer: Box::new(ByteTokenizer) };
    let model = || MambaLM::new(MambaConfig { d_state: 4, ..MambaConfig::mamba1(257, 16, 1) }, 3).unwrap();
    let cfg = |steps, stateful| TrainConfig { stateful, reset_token: Some(eos), ..config(steps) };
    let params = |t: &Trainer| -> Vec<Vec<f32>> {
        t.model.params.iter().map(|(_, p)| data(&p.value).to_vec()).collect()
    };
    let d1 = tmp("stateful-straight");
    let mut t = Trainer::new(model(), cfg(6, true), &d1).unwrap();
    let straight = t.run(&obj, &mut Silent).unwrap();
    let straight_params = params(&t);
    let d2 = tmp("stateful-resumed");
    let mut a = Trainer::new(model(), cfg(3, true), &d2).unwrap();
    a.run(&obj, &mut Silent).unwrap();
    drop(a);
    let mut b = Trainer::resume(&d2).unwrap();
    b.config.steps = Some(6);
    let resumed = b.run(&obj, &mut Silent).unwrap();
    assert_eq!(params(&b), straight_params, "parameters after a stateful resume differ");
    assert_eq!((resumed.train_loss, resumed.val_loss), (straight.train_loss, straight.val_loss));
    // Without the state (and its ordered rows) the run is another one.
    let d3 = tmp("stateless");
    let mut c = Trainer::new(model(), cfg(6, false), &d3).unwrap();
    c.run(&obj, &mut Silent).unwrap();
    assert_ne!(params(&c), straight_params);
    for d in [d1, d2, d3] {
        let _ = std::fs::remove_dir_all(d);
    }
}
