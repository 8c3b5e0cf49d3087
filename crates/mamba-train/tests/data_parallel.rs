//! Data-parallel training through the in-process collective: ranks that each train on their
//! share of every global batch take the steps one process takes on the whole batch, stay
//! identical, and leave a checkpoint that resumes on another number of ranks.

use std::path::{Path, PathBuf};

use mamba_nn::config::MambaConfig;
use mamba_nn::model::MambaLM;
use mamba_train::collective::{Collective, InProcess};
use mamba_train::data::TextData;
use mamba_train::tasks::Task;
use mamba_train::tokenizer::{ByteTokenizer, Tokenizer};
use mamba_train::trainer::{Objective, Progress, StepInfo, TrainConfig, TrainError, Trainer};

fn tmp(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("mamba-dp-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

fn text_objective() -> Objective {
    let text: String = (0..4000).map(|i| ["the cat sat. ", "a dog ran! ", "we sing.\n"][i % 3]).collect();
    let ids = ByteTokenizer.encode(&text).into_iter().map(|t| t as u32).collect();
    let data = TextData::from_tokens(Path::new("<test>"), ids).unwrap();
    Objective::Text { data, tokenizer: Box::new(ByteTokenizer) }
}

fn model() -> MambaLM {
    MambaLM::new(MambaConfig { d_state: 4, ..MambaConfig::mamba1(256, 16, 2) }, 5).unwrap()
}

fn config(steps: u64, batch: usize) -> TrainConfig {
    TrainConfig {
        seq_len: 24,
        batch_size: batch,
        lr: 3e-3,
        min_lr: 3e-4,
        warmup_steps: 2,
        steps: Some(steps),
        eval_every: 5,
        eval_tokens: 256,
        ..TrainConfig::default()
    }
}

/// Records every step's loss.
#[derive(Default)]
struct Losses(Vec<f64>);

impl Progress for Losses {
    fn on_step(&mut self, info: &StepInfo) {
        self.0.push(info.loss);
    }
}

/// Every parameter value, in order.
fn params(t: &Trainer) -> Vec<f32> {
    t.model.params.iter().flat_map(|(_, p)| p.value.iter().copied().collect::<Vec<_>>()).collect()
}

/// One rank's step losses and final parameters, or why it stopped.
type RankOutcome = Result<(Vec<f64>, Vec<f32>), TrainError>;

/// Runs `ranks` trainers as threads of one group (rank 0 into `dir`, the others into scratch
/// directories they never write): each rank's losses and final parameters.
fn train_group(
    ranks: usize,
    make: impl Fn(usize) -> Trainer + Sync,
    obj: &(impl Fn() -> Objective + Sync),
) -> Vec<RankOutcome> {
    std::thread::scope(|s| {
        let hs: Vec<_> = InProcess::group(ranks)
            .into_iter()
            .map(|c| {
                let make = &make;
                s.spawn(move || {
                    let rank = c.rank();
                    let mut t = make(rank).with_collective(Box::new(c))?;
                    let mut losses = Losses::default();
                    t.run(&obj(), &mut losses)?;
                    Ok((losses.0, params(&t)))
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

fn rel(a: f64, b: f64) -> f64 {
    (a - b).abs() / b.abs().max(1e-12)
}

fn assert_close(what: &str, got: &[f32], want: &[f32], tol: f32) {
    assert_eq!(got.len(), want.len(), "{what}: lengths");
    let worst = got.iter().zip(want).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
    assert!(worst <= tol, "{what}: max |Δ| {worst} > {tol}");
}

#[test]
fn two_ranks_take_the_steps_of_one_process_and_resume_on_one() {
    let obj = text_objective;
    let root = tmp("text");
    // One process, global batch 8, 10 steps.
    let mut single = Trainer::new(model(), config(10, 8), root.join("single")).unwrap();
    let mut want = Losses::default();
    single.run(&obj(), &mut want).unwrap();
    let want_params = params(&single);
    drop(single); // releases the run directory's lock for the resume below

    // Two ranks of 4 rows each.
    let dir2 = root.join("two");
    let make = |rank: usize| {
        let dir = if rank == 0 { dir2.clone() } else { root.join(format!("scratch-{rank}")) };
        Trainer::new(model(), config(10, 8), dir).unwrap()
    };
    let out = train_group(2, make, &obj);
    let (l0, p0) = out[0].as_ref().unwrap();
    let (l1, p1) = out[1].as_ref().unwrap();
    assert_eq!(l0, l1, "both ranks report the global loss");
    assert_eq!(p0, p1, "the ranks' parameters are bitwise equal");
    assert_eq!(l0.len(), want.0.len());
    for (s, (a, b)) in l0.iter().zip(&want.0).enumerate() {
        assert!(rel(*a, *b) <= 1e-5, "step {}: loss {a} on 2 ranks vs {b} on one", s + 1);
    }
    assert_close("parameters after 10 steps", p0, &want_params, 1e-6);
    // Only rank 0 wrote; the other rank's directory holds no checkpoint or metrics.
    assert!(dir2.join("metrics.jsonl").is_file());
    let scratch = root.join("scratch-1");
    assert!(!scratch.join("metrics.jsonl").exists() && !scratch.join("checkpoints/step-00000005").exists());

    // Resume the two-rank run's step-10 checkpoint on one process for 5 more steps, against the
    // single run resumed the same way.
    let more = |dir: &Path| {
        let mut t = Trainer::resume(dir).unwrap();
        t.config.steps = Some(15);
        let mut l = Losses::default();
        t.run(&obj(), &mut l).unwrap();
        (l.0, params(&t))
    };
    let (la, pa) = more(&dir2);
    let (lb, pb) = more(&root.join("single"));
    for (s, (a, b)) in la.iter().zip(&lb).enumerate() {
        assert!(rel(*a, *b) <= 1e-5, "resumed step {}: {a} vs {b}", s + 11);
    }
    assert_close("parameters after resuming", &pa, &pb, 1e-6);
    let _ = std::fs::remove_dir_all(&root);
}

#[test]
fn uneven_shares_of_a_task_batch_weigh_their_scored_targets() {
    // Three ranks over a batch of 8 rows (3 + 3 + 2), on selective copying.
    let task = || Objective::Task(Task::SelectiveCopying);
    let cfg = |steps| TrainConfig {
        batch_size: 8,
        lr: 3e-3,
        steps: Some(steps),
        eval_every: 4,
        ..TrainConfig::default()
    };
    let m = || {
        let v = Task::SelectiveCopying.vocab_size();
        MambaLM::new(MambaConfig { d_state: 4, ..MambaConfig::mamba1(v, 16, 1) }, 2).unwrap()
    };
    let root = tmp("task");
    let mut single = Trainer::new(m(), cfg(4), root.join("single")).unwrap();
    let mut want = Losses::default();
    single.run(&task(), &mut want).unwrap();
    let out = train_group(3, |r| Trainer::new(m(), cfg(4), root.join(format!("r{r}"))).unwrap(), &task);
    for (r, o) in out.iter().enumerate() {
        let (l, p) = o.as_ref().unwrap();
        for (s, (a, b)) in l.iter().zip(&want.0).enumerate() {
            assert!(rel(*a, *b) <= 1e-5, "rank {r} step {}: {a} vs {b}", s + 1);
        }
        assert_close(&format!("rank {r} parameters"), p, &params(&single), 1e-6);
    }
    let _ = std::fs::remove_dir_all(&root);
}

#[test]
fn ranks_whose_parameters_differ_are_stopped() {
    let root = tmp("drift");
    let make = |rank: usize| {
        // Rank 1 starts from other weights: the checksum at the first evaluation differs.
        let m = MambaLM::new(MambaConfig { d_state: 4, ..MambaConfig::mamba1(256, 16, 2) }, 5 + rank as u64)
            .unwrap();
        Trainer::new(m, config(10, 4), root.join(format!("r{rank}"))).unwrap()
    };
    let out = train_group(2, make, &text_objective);
    for o in out {
        match o {
            Err(e @ TrainError::Diverged { step: 5, .. }) => {
                assert!(e.to_string().contains("drifted apart"), "{e}");
            }
            other => panic!("expected the ranks to be stopped at step 5, got {:?}", other.map(|_| ())),
        }
    }
    // More ranks than rows, and a stateful run, are refused up front.
    let c = InProcess::group(3).remove(0);
    let t = Trainer::new(model(), config(1, 2), root.join("few")).unwrap();
    let e = t.with_collective(Box::new(c)).err().expect("batch 2 over 3 ranks");
    assert!(e.to_string().contains("--batch-size 2"), "{e}");
    let c = InProcess::group(2).remove(0);
    let t = Trainer::new(model(), TrainConfig { stateful: true, ..config(1, 4) }, root.join("st")).unwrap();
    assert!(t.with_collective(Box::new(c)).err().expect("stateful").to_string().contains("--stateful"));
    let _ = std::fs::remove_dir_all(&root);
}

#[test]
fn a_time_budget_ends_every_rank_at_the_same_step() {
    // Each rank times its own steps; rank 0's clock decides when all of them stop and how long
    // the learning-rate schedule is, so the ranks neither wait on each other forever nor drift.
    let root = tmp("budget");
    let make = |rank: usize| {
        let cfg = TrainConfig { steps: None, time_budget: Some(1.5), eval_every: 1000, ..config(0, 4) };
        Trainer::new(model(), cfg, root.join(format!("r{rank}"))).unwrap()
    };
    let out = train_group(2, make, &text_objective);
    let (l0, p0) = out[0].as_ref().unwrap();
    let (l1, p1) = out[1].as_ref().unwrap();
    assert!(l0.len() > 2, "{} steps in 1.5 s", l0.len());
    assert_eq!((l0, p0), (l1, p1), "both ranks took the same steps");
    let _ = std::fs::remove_dir_all(&root);
}
