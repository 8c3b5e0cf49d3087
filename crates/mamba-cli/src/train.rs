//! `mamba train`.

use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::{Args, ValueEnum};
use indicatif::{ProgressBar, ProgressStyle};
use mamba_nn::config::{Arch, MambaConfig};
use mamba_nn::model::MambaLM;
use mamba_train::data::TextData;
use mamba_train::run_dir::RunDir;
use mamba_train::tasks::Task;
use mamba_train::tokenizer::{ByteTokenizer, Tokenizer, load_tokenizer};
use mamba_train::trainer::{Metrics, Objective, Progress, StepInfo, TrainConfig, Trainer};
use serde::{Deserialize, Serialize};

/// Model families `--arch` accepts.
#[derive(Clone, Copy, Debug, ValueEnum, Serialize, Deserialize, PartialEq, Eq)]
pub enum ArchArg {
    /// Mamba: selective scan with per-channel A.
    Mamba1,
    /// Mamba-2: per-head scalar A, chunked SSD.
    Mamba2,
    /// Non-selective baseline (time-invariant, no conv or gate): h = A·h + B·x, y = C·h + D·x between projections.
    Lti,
}

/// Synthetic tasks `--task` accepts.
#[derive(Clone, Copy, Debug, ValueEnum, Serialize, Deserialize, PartialEq, Eq)]
pub enum TaskArg {
    /// Copy the data tokens scattered among noise, in order (Mamba paper §4.1).
    SelectiveCopying,
    /// Recall the token that followed a trigger's first occurrence.
    InductionHeads,
}

/// Arguments of `mamba train`.
#[derive(Args, Debug)]
pub struct TrainArgs {
    /// Text file or directory of text files to train on (byte-level tokens unless --tokenizer).
    #[arg(long, conflicts_with = "task")]
    data: Option<PathBuf>,
    /// Train on a synthetic task instead of text.
    #[arg(long, value_enum)]
    task: Option<TaskArg>,
    /// A Hugging Face tokenizer.json for --data (default: bytes, vocabulary 256).
    #[arg(long, requires = "data")]
    tokenizer: Option<PathBuf>,
    /// Run directory (default: a new runs/run-NNN).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Continue the run in --out exactly where its last checkpoint stopped.
    #[arg(long, requires = "out")]
    resume: bool,
    /// Model family.
    #[arg(long, value_enum, default_value_t = ArchArg::Mamba1)]
    arch: ArchArg,
    /// Residual width.
    #[arg(long, default_value_t = 256)]
    d_model: usize,
    /// Number of blocks.
    #[arg(long, default_value_t = 4)]
    n_layer: usize,
    /// SSM state size.
    #[arg(long, default_value_t = 16)]
    d_state: usize,
    /// d_inner = expand · d_model.
    #[arg(long, default_value_t = 2)]
    expand: usize,
    /// Mamba-2 head dimension.
    #[arg(long, default_value_t = 64)]
    headdim: usize,
    /// Tokens per training window (text).
    #[arg(long, default_value_t = 256)]
    seq_len: usize,
    /// Sequences per batch.
    #[arg(long, default_value_t = 8)]
    batch_size: usize,
    /// Peak learning rate (warmup, then cosine decay to a tenth of it).
    #[arg(long, default_value_t = 2e-3)]
    lr: f32,
    /// Stop after N optimizer steps (default: 2000, unless --time-budget).
    #[arg(long)]
    steps: Option<u64>,
    /// Stop when SECS seconds are spent, including the final evaluation.
    #[arg(long, value_name = "SECS")]
    time_budget: Option<f64>,
    /// Evaluate, write metrics and checkpoint every N steps.
    #[arg(long, default_value_t = 200)]
    eval_every: u64,
    /// Checkpoints to keep under <out>/checkpoints (the newest ones). Each is published whole:
    /// a crash at any moment leaves the previous one complete for --resume.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u64).range(1..))]
    keep_checkpoints: u64,
    /// Seed of the initialisation and the data sampler.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Worker threads (0: one per core).
    #[arg(long, default_value_t = 0)]
    pub threads: usize,
}

/// What a run trains on, saved as `source.json` so `--resume` needs no repeat of it.
#[derive(Clone, Debug, Serialize, Deserialize)]
enum Source {
    /// Text at a path, bytes or a tokenizer.json (copied into the run directory).
    Text { path: PathBuf, hf_tokenizer: bool },
    /// A synthetic task.
    Task(TaskArg),
    /// The built-in generated corpus.
    Builtin,
}

/// Size of the built-in corpus, in bytes.
const BUILTIN_BYTES: usize = 600_000;

fn next_run_dir() -> PathBuf {
    (1..)
        .map(|i| PathBuf::from(format!("runs/run-{i:03}")))
        .find(|p| !p.exists())
        .expect("some run number is free")
}

fn task_of(t: TaskArg) -> Task {
    match t {
        TaskArg::SelectiveCopying => Task::SelectiveCopying,
        TaskArg::InductionHeads => Task::InductionHeads,
    }
}

fn objective(source: &Source, dir: &Path) -> anyhow::Result<Objective> {
    Ok(match source {
        Source::Task(t) => Objective::Task(task_of(*t)),
        Source::Builtin => {
            let text = crate::corpus::arithmetic(BUILTIN_BYTES, 0);
            let tokenizer: Box<dyn Tokenizer> = Box::new(ByteTokenizer);
            let ids = tokenizer.encode(&text).into_iter().map(|t| t as u32).collect();
            let data = TextData::from_tokens(Path::new("<built-in arithmetic corpus>"), ids)?;
            Objective::Text { data, tokenizer }
        }
        Source::Text { path, hf_tokenizer } => {
            let tokenizer: Box<dyn Tokenizer> =
                if *hf_tokenizer { load_tokenizer(dir)? } else { Box::new(ByteTokenizer) };
            let data = TextData::load(path, &*tokenizer)?;
            Objective::Text { data, tokenizer }
        }
    })
}

/// A progress bar with loss, tokens/s and ETA.
struct Bar(ProgressBar);

impl Progress for Bar {
    fn on_step(&mut self, i: &StepInfo) {
        self.0.set_length(i.planned.max(i.step));
        self.0.set_position(i.step);
        self.0.set_message(format!("loss {:.4}  {:.0} tok/s", i.loss, i.tokens_per_s));
    }

    fn on_eval(&mut self, m: &Metrics) {
        let acc = m.val_accuracy.map(|a| format!("  val acc {:.1}%", 100.0 * a)).unwrap_or_default();
        self.0.println(format!(
            "step {:>6}  tokens {:>9}  train {:.4}  val {:.4}{acc}  lr {:.2e}  {:.0} tok/s  {:.0}s",
            m.step, m.tokens, m.train_loss, m.val_loss, m.lr, m.tokens_per_s, m.elapsed_s
        ));
    }
}

/// Runs `mamba train`.
pub fn run(a: TrainArgs) -> anyhow::Result<()> {
    // The objective is built once: for a new run it also decides the vocabulary and length.
    let (mut trainer, source, obj) = if a.resume {
        let dir = a.out.clone().expect("clap requires --out with --resume");
        let src_path = dir.join("source.json");
        let text = std::fs::read_to_string(&src_path)
            .with_context(|| format!("cannot resume: reading {}", src_path.display()))?;
        let source: Source = serde_json::from_str(&text)
            .with_context(|| format!("{}: not a source description", src_path.display()))?;
        let run = RunDir::open(&dir)?;
        let mut t = Trainer::resume_run(run)?;
        if let Some((ck, skipped)) = t.resumed_from() {
            for note in skipped {
                eprintln!("skipping an incomplete checkpoint: {note}");
            }
            eprintln!("resuming from {}", ck.path.display());
        }
        if let Some(b) = a.time_budget {
            t.config.time_budget = Some(b);
        }
        if let Some(s) = a.steps {
            t.config.steps = Some(s);
        }
        eprintln!("resuming {} at step {} ({} tokens)", dir.display(), t.step, t.tokens);
        let obj = objective(&source, &dir)?;
        (t, source, obj)
    } else {
        let source = match (&a.data, a.task) {
            (Some(p), _) => Source::Text { path: p.clone(), hf_tokenizer: a.tokenizer.is_some() },
            (None, Some(t)) => Source::Task(t),
            (None, None) => Source::Builtin,
        };
        let dir = a.out.clone().unwrap_or_else(next_run_dir);
        let run = RunDir::create(&dir)?;
        if let Some(tj) = &a.tokenizer {
            std::fs::copy(tj, dir.join("tokenizer.json"))
                .with_context(|| format!("copying {}", tj.display()))?;
        }
        std::fs::write(dir.join("source.json"), serde_json::to_vec_pretty(&source)?)
            .with_context(|| format!("writing {}", dir.join("source.json").display()))?;
        let (steps, time_budget) = match (a.steps, a.time_budget, &source) {
            (None, None, Source::Builtin) => (None, Some(100.0)),
            (None, None, _) => (Some(2000), None),
            (s, t, _) => (s, t),
        };
        let obj = objective(&source, &dir)?;
        let (vocab, seq_len) = match &obj {
            Objective::Text { tokenizer, .. } => (tokenizer.vocab_size(), a.seq_len),
            Objective::Task(t) => (t.vocab_size(), t.seq_len()),
        };
        let mut cfg = match a.arch {
            ArchArg::Mamba1 => MambaConfig::mamba1(vocab, a.d_model, a.n_layer),
            ArchArg::Mamba2 => {
                MambaConfig { chunk_size: 64, ..MambaConfig::mamba2(vocab, a.d_model, a.n_layer) }
            }
            ArchArg::Lti => {
                MambaConfig { arch: Arch::Lti, ..MambaConfig::mamba1(vocab, a.d_model, a.n_layer) }
            }
        };
        (cfg.d_state, cfg.expand, cfg.headdim) = (a.d_state, a.expand, a.headdim);
        cfg.validate().context("model configuration")?;
        let model = MambaLM::new(cfg, a.seed)?;
        let tc = TrainConfig {
            seq_len,
            batch_size: a.batch_size,
            lr: a.lr,
            min_lr: a.lr / 10.0,
            steps,
            time_budget,
            eval_every: a.eval_every,
            seed: a.seed,
            keep_checkpoints: a.keep_checkpoints as usize,
            ..TrainConfig::default()
        };
        eprintln!(
            "training {} ({:.2} M parameters) on {} into {}",
            match a.arch {
                ArchArg::Mamba1 => "Mamba",
                ArchArg::Mamba2 => "Mamba-2",
                ArchArg::Lti => "the LTI baseline",
            },
            model.params.num_elements() as f64 / 1e6,
            match &source {
                Source::Text { path, .. } => path.display().to_string(),
                Source::Task(t) => format!("the {t:?} task"),
                Source::Builtin => "the built-in arithmetic corpus (generated, offline)".to_string(),
            },
            dir.display()
        );
        (Trainer::with_run(model, tc, run), source, obj)
    };
    let dir = trainer.dir().to_path_buf();
    let bar = ProgressBar::new(trainer.config.steps.unwrap_or(1000));
    bar.set_style(
        ProgressStyle::with_template("{bar:30} {pos}/{len} {msg}  ETA {eta}")
            .expect("a valid template")
            .progress_chars("=> "),
    );
    let mut progress = Bar(bar);
    let m = trainer.run(&obj, &mut progress)?;
    progress.0.finish_and_clear();
    println!(
        "final validation loss {:.4} nats per token after {} steps, {} tokens, {:.0} s",
        m.val_loss, m.step, m.tokens, m.elapsed_s
    );
    if let Some(acc) = m.val_accuracy {
        println!("final validation accuracy {:.1}%", 100.0 * acc);
    }
    if let Objective::Text { tokenizer, .. } = &obj {
        let prompt = match source {
            Source::Builtin => "12+",
            _ => "\n",
        };
        let sample = mamba_train::sample::sample_text(&trainer.model, &**tokenizer, prompt, 200, 1);
        println!("sample:\n{sample}");
        std::fs::write(dir.join("sample.txt"), &sample)
            .with_context(|| format!("writing {}", dir.join("sample.txt").display()))?;
    }
    println!("run directory {} (metrics.jsonl, loss.svg, model in Hugging Face layout)", dir.display());
    Ok(())
}
