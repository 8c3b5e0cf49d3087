//! `mamba train`.

use std::path::{Path, PathBuf};

use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::{Context, bail};
use clap::parser::ValueSource;
use clap::{ArgMatches, Args, ValueEnum};
use indicatif::{ProgressBar, ProgressStyle};
use mamba_nn::config::{Arch, MambaConfig};
use mamba_nn::model::MambaLM;
use mamba_train::data::TextData;
use mamba_train::run_dir::RunDir;
use mamba_train::tasks::Task;
use mamba_train::tokenizer::{ByteTokenizer, HfTokenizer, Tokenizer};
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
    /// Train on a synthetic task instead of text. Unless given, the model and schedule flags then
    /// take the settings that solve it (docs/results.md): --d-model 64 --n-layer 2
    /// --batch-size 32 --lr 3e-3 --eval-every 250 --time-budget 90.
    #[arg(long, value_enum)]
    task: Option<TaskArg>,
    /// A Hugging Face tokenizer.json for --data (default: bytes, vocabulary 256).
    #[arg(long, requires = "data")]
    tokenizer: Option<PathBuf>,
    /// Run directory (default: a new runs/run-NNN).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Continue the run in --out exactly where its newest complete checkpoint stopped. With it,
    /// only --steps, --time-budget, --keep-checkpoints and --threads may change; other flags, if
    /// given, must match the run's own settings.
    #[arg(long, requires = "out")]
    resume: bool,
    /// Model family.
    #[arg(long, value_enum, default_value_t = ArchArg::Mamba1)]
    arch: ArchArg,
    /// Residual width.
    #[arg(long, default_value_t = 256, value_parser = crate::flags::at_least_one())]
    d_model: usize,
    /// Number of blocks.
    #[arg(long, default_value_t = 4, value_parser = crate::flags::at_least_one())]
    n_layer: usize,
    /// SSM state size.
    #[arg(long, default_value_t = 16, value_parser = crate::flags::at_least_one())]
    d_state: usize,
    /// d_inner = expand · d_model.
    #[arg(long, default_value_t = 2, value_parser = crate::flags::at_least_one())]
    expand: usize,
    /// Mamba-2 head dimension.
    #[arg(long, default_value_t = 64, value_parser = crate::flags::at_least_one())]
    headdim: usize,
    /// Tokens per training window (text).
    #[arg(long, default_value_t = 256, value_parser = crate::flags::at_least_one())]
    seq_len: usize,
    /// Sequences per batch.
    #[arg(long, default_value_t = 8, value_parser = crate::flags::at_least_one())]
    batch_size: usize,
    /// Peak learning rate (warmup, then cosine decay to a tenth of it).
    #[arg(long, default_value_t = 2e-3, value_parser = crate::flags::positive_f32, allow_hyphen_values = true)]
    lr: f32,
    /// Stop after N optimizer steps (default: 2000, unless --time-budget).
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    steps: Option<u64>,
    /// Stop when SECS seconds are spent, including the final evaluation.
    #[arg(long, value_name = "SECS", value_parser = crate::flags::positive_f64, allow_hyphen_values = true)]
    time_budget: Option<f64>,
    /// Evaluate, write metrics and checkpoint every N steps.
    #[arg(long, default_value_t = 200, value_parser = clap::value_parser!(u64).range(1..))]
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

/// The training objective of `source`; `tokenizer_json` is read when the source uses a Hugging
/// Face tokenizer.
fn objective(source: &Source, tokenizer_json: &Path) -> anyhow::Result<Objective> {
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
            let tokenizer: Box<dyn Tokenizer> = if *hf_tokenizer {
                Box::new(HfTokenizer::from_file(tokenizer_json)?)
            } else {
                Box::new(ByteTokenizer)
            };
            let data = TextData::load(path, &*tokenizer)?;
            Objective::Text { data, tokenizer }
        }
    })
}

/// A progress bar with loss, tokens/s and ETA.
struct Bar(ProgressBar);

impl Progress for Bar {
    fn stop_requested(&self) -> bool {
        STOP.load(Ordering::SeqCst)
    }

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

/// Whether flag `id` (its field name) was given on the command line.
fn given(m: &ArgMatches, id: &str) -> bool {
    matches!(m.value_source(id), Some(ValueSource::CommandLine))
}

/// The task settings of docs/results.md, for every such flag not given.
fn task_defaults(a: &mut TrainArgs, m: &ArgMatches) {
    if a.task.is_none() {
        return;
    }
    if !given(m, "d_model") {
        a.d_model = 64;
    }
    if !given(m, "n_layer") {
        a.n_layer = 2;
    }
    if !given(m, "batch_size") {
        a.batch_size = 32;
    }
    if !given(m, "lr") {
        a.lr = 3e-3;
    }
    if !given(m, "eval_every") {
        a.eval_every = 250;
    }
    if a.steps.is_none() && a.time_budget.is_none() {
        a.time_budget = Some(90.0);
    }
}

/// The flags given with `--resume` that disagree with the run's settings, as `--flag given (the
/// run has value)`.
fn resume_conflicts(a: &TrainArgs, m: &ArgMatches, t: &Trainer, source: &Source) -> Vec<String> {
    let (c, tc) = (&t.model.config, &t.config);
    let arch = match c.arch {
        Arch::Mamba1 => ArchArg::Mamba1,
        Arch::Mamba2 => ArchArg::Mamba2,
        Arch::Lti => ArchArg::Lti,
    };
    let mut out = Vec::new();
    let mut check = |id: &str, given_v: String, run_v: String| {
        if given(m, id) && given_v != run_v {
            out.push(format!("--{} {given_v} (the run has {run_v})", id.replace('_', "-")));
        }
    };
    check("arch", format!("{:?}", a.arch), format!("{arch:?}"));
    check("d_model", a.d_model.to_string(), c.d_model.to_string());
    check("n_layer", a.n_layer.to_string(), c.n_layer.to_string());
    check("d_state", a.d_state.to_string(), c.d_state.to_string());
    check("expand", a.expand.to_string(), c.expand.to_string());
    if c.arch == Arch::Mamba2 {
        check("headdim", a.headdim.to_string(), c.headdim.to_string());
    }
    check("seq_len", a.seq_len.to_string(), tc.seq_len.to_string());
    check("batch_size", a.batch_size.to_string(), tc.batch_size.to_string());
    check("lr", a.lr.to_string(), tc.lr.to_string());
    check("eval_every", a.eval_every.to_string(), tc.eval_every.to_string());
    check("seed", a.seed.to_string(), tc.seed.to_string());
    let (run_data, run_task) = match source {
        Source::Text { path, .. } => (path.display().to_string(), "none".to_string()),
        Source::Task(t) => ("none".to_string(), format!("{t:?}")),
        Source::Builtin => ("the built-in corpus".to_string(), "none".to_string()),
    };
    check("data", a.data.as_ref().map_or("none".into(), |p| p.display().to_string()), run_data);
    check("task", a.task.map_or("none".into(), |t| format!("{t:?}")), run_task);
    if given(m, "tokenizer") {
        out.push("--tokenizer (the run keeps the tokenizer.json it started with)".to_string());
    }
    out
}

/// Set by the first SIGINT / SIGTERM: the trainer finishes its step, checkpoints and stops. A
/// second one ends the process at once.
static STOP: AtomicBool = AtomicBool::new(false);

fn install_stop_handler() -> anyhow::Result<()> {
    ctrlc::set_handler(|| {
        if STOP.swap(true, Ordering::SeqCst) {
            eprintln!("\nstopped at once; the newest complete checkpoint is intact");
            std::process::exit(130);
        }
        eprintln!("\nstopping after this step and saving a checkpoint (press Ctrl-C again to quit now)");
    })
    .context("installing the Ctrl-C handler")
}

/// Runs `mamba train`; `m` tells which flags were given.
pub fn run(mut a: TrainArgs, m: &ArgMatches) -> anyhow::Result<()> {
    task_defaults(&mut a, m);
    // The objective is built once: for a new run it also decides the vocabulary and length.
    let (mut trainer, source, obj) = if a.resume {
        let dir = a.out.clone().expect("clap requires --out with --resume");
        let run = RunDir::open(&dir)?;
        let src_path = dir.join("source.json");
        let text = std::fs::read_to_string(&src_path)
            .with_context(|| format!("cannot resume: reading {}", src_path.display()))?;
        let source: Source = serde_json::from_str(&text)
            .with_context(|| format!("{}: not a source description", src_path.display()))?;
        let mut t = Trainer::resume_run(run)?;
        let conflicts = resume_conflicts(&a, m, &t, &source);
        if !conflicts.is_empty() {
            bail!(
                "--resume continues {} with its own settings; these flags disagree with them: {}. \
                 Drop them (only --steps, --time-budget, --keep-checkpoints and --threads may change), \
                 or start a new run with another --out",
                dir.display(),
                conflicts.join(", ")
            );
        }
        if given(m, "keep_checkpoints") {
            t.config.keep_checkpoints = a.keep_checkpoints as usize;
        }
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
        let obj = objective(&source, &dir.join("tokenizer.json"))?;
        (t, source, obj)
    } else {
        let source = match (&a.data, a.task) {
            (Some(p), _) => Source::Text { path: p.clone(), hf_tokenizer: a.tokenizer.is_some() },
            (None, Some(t)) => Source::Task(t),
            (None, None) => Source::Builtin,
        };
        // The data first: a missing or unusable file leaves no run directory behind.
        let obj = objective(&source, a.tokenizer.as_deref().unwrap_or(Path::new("tokenizer.json")))?;
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
    install_stop_handler()?;
    let m = trainer.run(&obj, &mut progress)?;
    progress.0.finish_and_clear();
    outln!(
        "final validation loss {:.4} nats per token after {} steps, {} tokens, {:.0} s",
        m.val_loss,
        m.step,
        m.tokens,
        m.elapsed_s
    );
    if let Some(acc) = m.val_accuracy {
        outln!("final validation accuracy {:.1}%", 100.0 * acc);
    }
    if let Objective::Text { tokenizer, .. } = &obj {
        let prompt = match source {
            Source::Builtin => "12+",
            _ => "\n",
        };
        let sample = mamba_train::sample::sample_text(&trainer.model, &**tokenizer, prompt, 200, 1);
        outln!("sample:\n{sample}");
        std::fs::write(dir.join("sample.txt"), &sample)
            .with_context(|| format!("writing {}", dir.join("sample.txt").display()))?;
    }
    outln!("run directory {} (metrics.jsonl, loss.svg, model in Hugging Face layout)", dir.display());
    Ok(())
}
