//! `mamba train`.

use std::path::{Path, PathBuf};

use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::{Context, bail};
use clap::parser::ValueSource;
use clap::{ArgMatches, Args, ValueEnum};
use indicatif::{ProgressBar, ProgressStyle};
use mamba_nn::config::{Arch, MambaConfig};
use mamba_nn::model::{LoadOptions, LoraConfig, MambaLM, WeightFormat};
use mamba_train::collective::{Collective, Solo};
use mamba_train::data::TextData;
use mamba_train::data::read_documents;
use mamba_train::run_dir::RunDir;
use mamba_train::tasks::Task;
use mamba_train::tokenizer::{BYTE_EOS, ByteTokenizer, HfTokenizer, Tokenizer};
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

/// How `--data` with several documents is laid into training windows.
#[derive(Clone, Copy, Debug, ValueEnum, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum PackingArg {
    /// Every document preceded by an end-of-document token, and the model's recurrent state
    /// reset to zero at each: no document sees another.
    Reset,
    /// The end-of-document token between documents, but the state flows from one into the next.
    Plain,
    /// One stream of text: no separator, no reset.
    Stream,
}

/// Arguments of `mamba train`.
#[derive(Args, Debug)]
pub struct TrainArgs {
    /// Text to train on (byte-level tokens unless --tokenizer): a text file; a directory of text
    /// files, each one document; or a .jsonl file, one JSON object per line with the document in
    /// its "text" field. Several documents are packed densely into windows as --packing says;
    /// validation holds out the last whole documents.
    #[arg(long, conflicts_with = "task")]
    data: Option<PathBuf>,
    /// How several documents are packed into windows: `reset` puts an end-of-document token
    /// before each (bytes: id 256, so the vocabulary is 257; a tokenizer.json: the --from model's
    /// eos_token_id, else --eos-token, else the tokenizer's own end-of-text token) and restarts
    /// the recurrent state there; `plain` keeps the token but lets the state flow across;
    /// `stream` concatenates the texts. Default: reset when --data holds more than one
    /// document, else stream.
    #[arg(long, value_enum, requires = "data")]
    packing: Option<PackingArg>,
    /// The token of --tokenizer that ends a document when a new model packs documents (e.g.
    /// "<|endoftext|>"); written to config.json as eos_token_id. Default: the tokenizer's
    /// special token named <|endoftext|>, </s>, <|end_of_text|> or <eos>, the first it has.
    #[arg(long, requires = "tokenizer")]
    eos_token: Option<String>,
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
    /// only --steps, --time-budget, --keep-checkpoints, --threads and --checkpoint-layers (to
    /// turn it on) may change; other flags, if given, must match the run's own settings.
    #[arg(long, requires = "out")]
    resume: bool,
    /// Fine-tune a trained model instead of starting from random weights: a `mamba train` run or
    /// any Hugging Face Mamba / Mamba-2 directory (config.json + safetensors, converted to f32;
    /// its tokenizer.json when present, else bytes). Its architecture and vocabulary are kept
    /// (architecture flags, if given, must match it) and checkpoints load where it did.
    #[arg(long, value_name = "DIR", conflicts_with_all = ["task", "tokenizer", "resume"])]
    from: Option<PathBuf>,
    /// Train a LoRA adapter of this rank on the --from model, which stays frozen: only the
    /// adapters get gradients and optimizer state, and checkpoints hold only them, as a PEFT
    /// adapter directory (run it with `--model BASE --adapter RUN`, or `mamba merge`).
    #[arg(long, value_name = "R", requires = "from", value_parser = crate::flags::at_least_one())]
    lora_rank: Option<usize>,
    /// LoRA α: the adapters' output is scaled by α / rank (default: the rank, a scale of 1).
    #[arg(long, requires = "lora_rank", value_parser = crate::flags::positive_f32, allow_hyphen_values = true)]
    lora_alpha: Option<f32>,
    /// Comma-separated modules to adapt — in every layer, Mamba-1: in_proj, x_proj, dt_proj,
    /// out_proj; Mamba-2: in_proj, out_proj — and `embeddings`, the token embedding (worth it
    /// when the new text uses tokens the base rarely saw). Default: those an adapter loaded in
    /// PEFT really applies (in_proj,x_proj for Mamba-1, in_proj for Mamba-2). All run here;
    /// PEFT refuses out_proj on Mamba models, and transformers' Mamba reads dt_proj's weight
    /// directly, so PEFT ignores a dt_proj adapter unless it is merged (`mamba merge`).
    #[arg(long, requires = "lora_rank", value_delimiter = ',')]
    lora_targets: Option<Vec<String>>,
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
    /// Activation checkpointing: keep only each block's input and recompute the block in the
    /// backward: less memory for long windows, large batches and deep models (docs/results.md:
    /// at a 16k window 0.48× the peak memory on 4 layers, 0.16× on 24) for about a third more
    /// time; same results.
    #[arg(long)]
    checkpoint_layers: bool,
    /// Stateful training: each of the --batch-size rows reads the training text in order, one
    /// window after another, starting each window from the recurrent state its previous window
    /// ended in (no gradient flows back into the previous window), so the model learns to use
    /// context longer than --seq-len. The state restarts at document starts (--packing reset).
    #[arg(long, conflicts_with = "task")]
    stateful: bool,
    /// Peak learning rate (warmup, then cosine decay to a tenth of it).
    #[arg(long, default_value_t = 2e-3, value_parser = crate::flags::positive_f32, allow_hyphen_values = true)]
    lr: f32,
    /// Stop after N optimizer steps (default: 2000, unless --time-budget). 0 evaluates and
    /// checkpoints the starting model (e.g. a --from model) without training it.
    #[arg(long, value_parser = clap::value_parser!(u64).range(0..))]
    steps: Option<u64>,
    /// Stop when SECS seconds are spent, including the final evaluation.
    #[arg(long, value_name = "SECS", value_parser = crate::flags::positive_f64, allow_hyphen_values = true)]
    time_budget: Option<f64>,
    /// Evaluate, write metrics and checkpoint every N steps.
    #[arg(long, default_value_t = 200, value_parser = clap::value_parser!(u64).range(1..))]
    eval_every: u64,
    /// Validation tokens scored at each evaluation (text; fewer make evaluating a large model
    /// quicker and noisier).
    #[arg(long, default_value_t = 100_000, value_parser = crate::flags::at_least_one())]
    eval_tokens: usize,
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

/// What a run trains on and what it starts from, saved as `source.json` so `--resume` needs no
/// repeat of it.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct SourceFile {
    /// The training data.
    data: Source,
    /// The trained model the run started from (`--from`), and its adapter settings.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    from: Option<Base>,
}

/// A `--from` model.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct Base {
    /// Its directory (absolute).
    dir: PathBuf,
    /// The adapters' settings, when the run trains LoRA adapters on it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    lora: Option<LoraSpec>,
}

/// `--lora-rank`, `--lora-alpha` and `--lora-targets` of a run, as `source.json` records them.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct LoraSpec {
    rank: usize,
    alpha: f32,
    targets: Vec<String>,
}

impl SourceFile {
    /// Reads `source.json` (also the older form that held only the data source).
    fn read(path: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot resume: reading {}", path.display()))?;
        serde_json::from_str::<SourceFile>(&text)
            .or_else(|_| serde_json::from_str::<Source>(&text).map(|data| SourceFile { data, from: None }))
            .with_context(|| format!("{}: not a source description", path.display()))
    }
}

/// The training data of a run.
#[derive(Clone, Debug, Serialize, Deserialize)]
enum Source {
    /// Text at a path, bytes or a tokenizer.json (copied into the run directory), packed with
    /// an end-of-document token `eos` (none in runs from before packing).
    Text {
        path: PathBuf,
        hf_tokenizer: bool,
        #[serde(default = "stream")]
        packing: PackingArg,
        #[serde(default)]
        eos: Option<u32>,
    },
    /// A synthetic task.
    Task(TaskArg),
    /// The built-in generated corpus.
    Builtin,
}

fn stream() -> PackingArg {
    PackingArg::Stream
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
        Source::Text { path, hf_tokenizer, packing, eos } => {
            let tokenizer: Box<dyn Tokenizer> = if *hf_tokenizer {
                Box::new(HfTokenizer::from_file(tokenizer_json)?)
            } else {
                Box::new(ByteTokenizer)
            };
            let eos = if *packing == PackingArg::Stream { None } else { *eos };
            let data = TextData::load(path, &*tokenizer, eos)?;
            Objective::Text { data, tokenizer }
        }
    })
}

/// A new model of the architecture the flags give, for a vocabulary of `vocab`.
fn new_model(a: &TrainArgs, vocab: usize) -> anyhow::Result<MambaLM> {
    let mut cfg = match a.arch {
        ArchArg::Mamba1 => MambaConfig::mamba1(vocab, a.d_model, a.n_layer),
        ArchArg::Mamba2 => MambaConfig { chunk_size: 64, ..MambaConfig::mamba2(vocab, a.d_model, a.n_layer) },
        ArchArg::Lti => MambaConfig { arch: Arch::Lti, ..MambaConfig::mamba1(vocab, a.d_model, a.n_layer) },
    };
    (cfg.d_state, cfg.expand, cfg.headdim) = (a.d_state, a.expand, a.headdim);
    cfg.validate().context("model configuration")?;
    Ok(MambaLM::new(cfg, a.seed)?)
}

/// The `--from` model in `base` (f32), checked against the architecture flags given and the
/// data's vocabulary, with fresh LoRA adapters when `--lora-rank` asks for them.
fn start_from(a: &TrainArgs, m: &ArgMatches, base: &Path, obj: &Objective) -> anyhow::Result<MambaLM> {
    let options = LoadOptions { dtype: Some(WeightFormat::F32), ..LoadOptions::default() };
    let mut model =
        MambaLM::from_pretrained_with(base, options).with_context(|| format!("--from {}", base.display()))?;
    let c = &model.config;
    let mut conflicts = Vec::new();
    let mut check = |id: &str, given_v: String, model_v: String| {
        if given(m, id) && given_v != model_v {
            conflicts.push(format!("--{} {given_v} (the model has {model_v})", id.replace('_', "-")));
        }
    };
    check("arch", flag_value(a.arch), flag_value(arch_arg(c.arch)));
    check("d_model", a.d_model.to_string(), c.d_model.to_string());
    check("n_layer", a.n_layer.to_string(), c.n_layer.to_string());
    check("d_state", a.d_state.to_string(), c.d_state.to_string());
    check("expand", a.expand.to_string(), c.expand.to_string());
    check("headdim", a.headdim.to_string(), c.headdim.to_string());
    if !conflicts.is_empty() {
        bail!(
            "--from {} keeps that model's architecture; these flags disagree with it: {}. Drop them",
            base.display(),
            conflicts.join(", ")
        );
    }
    let vocab = match obj {
        Objective::Text { tokenizer, .. } => tokenizer.vocab_size(),
        Objective::Task(t) => t.vocab_size(),
    };
    if vocab > c.vocab_size {
        bail!(
            "--from {}: the data's tokenizer has {vocab} tokens but the model's vocabulary only {}",
            base.display(),
            c.vocab_size
        );
    }
    if let Some(rank) = a.lora_rank {
        let default_targets: &[&str] = match c.arch {
            Arch::Mamba1 => &["in_proj", "x_proj"],
            Arch::Mamba2 | Arch::Lti => &["in_proj"],
        };
        let targets =
            a.lora_targets.clone().unwrap_or_else(|| default_targets.iter().map(|t| t.to_string()).collect());
        let cfg = LoraConfig { rank, alpha: a.lora_alpha.unwrap_or(rank as f32), targets, rslora: false };
        model.add_lora(&cfg, a.seed).context("--lora-targets / --lora-rank")?;
    }
    Ok(model)
}

/// How a value-enum flag is spelled on the command line.
fn flag_value_of(v: impl ValueEnum) -> String {
    v.to_possible_value().map_or_else(String::new, |v| v.get_name().to_string())
}

/// The end-of-document token packing with `--from base` (its config's eos_token_id) or into a
/// new model (bytes: [`BYTE_EOS`]; a tokenizer.json: `eos_token`, else its end-of-text token)
/// uses.
fn end_of_document(
    base: Option<&Path>,
    tokenizer_json: Option<&Path>,
    eos_token: Option<&str>,
    packing: PackingArg,
) -> anyhow::Result<u32> {
    let how = flag_value_of(packing);
    match base {
        Some(b) => {
            let cfg = MambaConfig::from_file(b.join("config.json"))
                .with_context(|| format!("--from {}", b.display()))?;
            match cfg.special_tokens.eos {
                Some(e) => Ok(u32::try_from(e).context("eos_token_id")?),
                None => bail!(
                    "--packing {how} separates documents by the model's end-of-document token, but {} \
                     names no eos_token_id; use --packing stream",
                    b.join("config.json").display()
                ),
            }
        }
        None => match tokenizer_json {
            Some(path) => {
                let tok = HfTokenizer::from_file(path)?;
                match eos_token {
                    Some(t) => tok
                        .token_id(t)
                        .with_context(|| format!("--eos-token {t:?}: {} has no such token", path.display())),
                    None => match tok.end_of_text() {
                        Some((_, id)) => Ok(id),
                        None => bail!(
                            "--packing {how} with a new model: {} declares none of the usual \
                             end-of-text tokens ({}) as a special token, so which token ends a \
                             document is not known; name it with --eos-token, or use --packing stream",
                            path.display(),
                            mamba_train::tokenizer::END_OF_TEXT_TOKENS.join(", ")
                        ),
                    },
                }
            }
            None => Ok(BYTE_EOS),
        },
    }
}

/// How `--arch` spells `arch` on the command line.
fn flag_value(arch: ArchArg) -> String {
    arch.to_possible_value().map_or_else(String::new, |v| v.get_name().to_string())
}

/// The `--arch` value of a model family.
fn arch_arg(arch: Arch) -> ArchArg {
    match arch {
        Arch::Mamba1 => ArchArg::Mamba1,
        Arch::Mamba2 => ArchArg::Mamba2,
        Arch::Lti => ArchArg::Lti,
    }
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
    let arch = arch_arg(c.arch);
    let mut out = Vec::new();
    let mut check = |id: &str, given_v: String, run_v: String| {
        if given(m, id) && given_v != run_v {
            out.push(format!("--{} {given_v} (the run has {run_v})", id.replace('_', "-")));
        }
    };
    check("arch", flag_value(a.arch), flag_value(arch));
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
    check("eval_tokens", a.eval_tokens.to_string(), tc.eval_tokens.to_string());
    check("seed", a.seed.to_string(), tc.seed.to_string());
    check("stateful", a.stateful.to_string(), tc.stateful.to_string());
    let (run_data, run_task) = match source {
        Source::Text { path, .. } => (path.display().to_string(), "none".to_string()),
        Source::Task(t) => ("none".to_string(), format!("{t:?}")),
        Source::Builtin => ("the built-in corpus".to_string(), "none".to_string()),
    };
    check("data", a.data.as_ref().map_or("none".into(), |p| p.display().to_string()), run_data);
    check("task", a.task.map_or("none".into(), |t| format!("{t:?}")), run_task);
    if let (Some(p), Source::Text { packing, .. }) = (a.packing, source) {
        check("packing", flag_value_of(p), flag_value_of(*packing));
    }
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

/// This process's place in a data-parallel run: one rank of the `mpirun` world (built with the
/// `mpi` feature and started by `mpirun` with more than one process), else the only one.
fn ranks() -> anyhow::Result<Box<dyn Collective>> {
    #[cfg(feature = "mpi")]
    {
        let world = mamba_train::collective::Mpi::init().map_err(anyhow::Error::msg)?;
        if world.size() > 1 {
            return Ok(Box::new(world));
        }
    }
    Ok(Box::new(Solo))
}

/// Runs `mamba train`; `m` tells which flags were given.
pub fn run(mut a: TrainArgs, m: &ArgMatches) -> anyhow::Result<()> {
    task_defaults(&mut a, m);
    let comm = ranks()?;
    // Rank 0 owns the run directory and alone writes and reports; the others follow it.
    let lead = comm.rank() == 0;
    if comm.size() > 1 && a.out.is_none() {
        bail!("training on {} ranks needs --out (every rank must name the same run directory)", comm.size());
    }
    let claim = |dir: &Path, resume: bool| -> anyhow::Result<RunDir> {
        Ok(match (lead, resume) {
            (false, _) => RunDir::follow(dir),
            (true, true) => RunDir::open(dir)?,
            (true, false) => RunDir::create(dir)?,
        })
    };
    // The objective is built once: for a new run it also decides the vocabulary and length.
    let (trainer, source, obj) = if a.resume {
        let dir = a.out.clone().expect("clap requires --out with --resume");
        let run = claim(&dir, true)?;
        let source = SourceFile::read(&dir.join("source.json"))?.data;
        let mut t = Trainer::resume_run(run)?;
        let conflicts = resume_conflicts(&a, m, &t, &source);
        if !conflicts.is_empty() {
            bail!(
                "--resume continues {} with its own settings; these flags disagree with them: {}. \
                 Drop them (only --steps, --time-budget, --keep-checkpoints, --threads and \
                 --checkpoint-layers may change), \
                 or start a new run with another --out",
                dir.display(),
                conflicts.join(", ")
            );
        }
        if given(m, "keep_checkpoints") {
            t.config.keep_checkpoints = a.keep_checkpoints as usize;
        }
        if a.checkpoint_layers {
            t.config.checkpoint_layers = true;
            t.model.backbone.checkpoint_layers = true;
        }
        if let Some((ck, skipped)) = t.resumed_from().filter(|_| lead) {
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
        if lead {
            eprintln!("resuming {} at step {} ({} tokens)", dir.display(), t.step, t.tokens);
        }
        let obj = objective(&source, &dir.join("tokenizer.json"))?;
        (t, source, obj)
    } else {
        // A --from model's own tokenizer, when it has one.
        let base =
            a.from.as_ref().map(|d| d.canonicalize().with_context(|| format!("--from {}", d.display())));
        let base = base.transpose()?;
        let tokenizer_json = match &base {
            Some(b) => Some(b.join("tokenizer.json")).filter(|t| t.exists()),
            None => a.tokenizer.clone(),
        };
        let source = match (&a.data, a.task) {
            (Some(p), _) => {
                let packing = match a.packing {
                    Some(pk) => pk,
                    None if read_documents(p)?.len() > 1 => PackingArg::Reset,
                    None => PackingArg::Stream,
                };
                if packing == PackingArg::Reset && (a.arch == ArchArg::Lti && base.is_none()) {
                    bail!(
                        "--packing reset: the LTI baseline cannot restart its state; use --packing plain or stream"
                    );
                }
                let hf_tokenizer = tokenizer_json.is_some();
                if a.eos_token.is_some() && (base.is_some() || packing == PackingArg::Stream) {
                    bail!(
                        "--eos-token names the end-of-document token of a new model that packs \
                         documents (not with --from, whose config.json names it, nor with --packing stream)"
                    );
                }
                let eos = match packing {
                    PackingArg::Stream => None,
                    _ => Some(end_of_document(
                        base.as_deref(),
                        tokenizer_json.as_deref(),
                        a.eos_token.as_deref(),
                        packing,
                    )?),
                };
                Source::Text { path: p.clone(), hf_tokenizer, packing, eos }
            }
            (None, Some(t)) => Source::Task(t),
            (None, None) if tokenizer_json.is_some() => {
                bail!(
                    "the --from model has its own tokenizer; give --data (the built-in corpus is byte-level)"
                )
            }
            (None, None) => Source::Builtin,
        };
        // The data and the starting model first: a missing or unusable file leaves no run
        // directory behind.
        let obj = objective(&source, tokenizer_json.as_deref().unwrap_or(Path::new("tokenizer.json")))?;
        let pretrained = match &base {
            Some(b) => Some(start_from(&a, m, b, &obj)?),
            None => None,
        };
        let dir = a.out.clone().unwrap_or_else(next_run_dir);
        let run = claim(&dir, false)?;
        match (&base, &a.tokenizer) {
            _ if !lead => {}
            (Some(b), _) => crate::model_dir::copy_tokenizer_files(b, &dir)?,
            (None, Some(tj)) => {
                std::fs::copy(tj, dir.join("tokenizer.json"))
                    .with_context(|| format!("copying {}", tj.display()))?;
            }
            (None, None) => {}
        }
        let lora = pretrained.as_ref().and_then(|m| m.lora.as_ref()).map(|l| LoraSpec {
            rank: l.config.rank,
            alpha: l.config.alpha,
            targets: l.config.targets.clone(),
        });
        let file = SourceFile { data: source.clone(), from: base.clone().map(|dir| Base { dir, lora }) };
        if lead {
            std::fs::write(dir.join("source.json"), serde_json::to_vec_pretty(&file)?)
                .with_context(|| format!("writing {}", dir.join("source.json").display()))?;
        }
        let (steps, time_budget) = match (a.steps, a.time_budget, &source) {
            (None, None, Source::Builtin) => (None, Some(100.0)),
            (None, None, _) => (Some(2000), None),
            (s, t, _) => (s, t),
        };
        let (vocab, seq_len) = match &obj {
            Objective::Text { tokenizer, .. } => (tokenizer.vocab_size(), a.seq_len),
            Objective::Task(t) => (t.vocab_size(), t.seq_len()),
        };
        let (eos, reset_token) = match &source {
            Source::Text { packing, eos, .. } => (*eos, eos.filter(|_| *packing == PackingArg::Reset)),
            _ => (None, None),
        };
        let model = match pretrained {
            Some(m) => m,
            None => {
                // A byte-level model that packs documents also has the end-of-document id.
                let vocab = eos.map_or(vocab, |e| vocab.max(e as usize + 1));
                let mut m = new_model(&a, vocab)?;
                m.config.special_tokens.eos = eos.map(u64::from);
                m
            }
        };
        if reset_token.is_some() && model.config.arch == Arch::Lti {
            bail!(
                "--packing reset: the LTI baseline cannot restart its state; use --packing plain or stream"
            );
        }
        let tc = TrainConfig {
            seq_len,
            batch_size: a.batch_size,
            lr: a.lr,
            min_lr: a.lr / 10.0,
            steps,
            time_budget,
            eval_every: a.eval_every,
            eval_tokens: a.eval_tokens,
            seed: a.seed,
            keep_checkpoints: a.keep_checkpoints as usize,
            reset_token,
            checkpoint_layers: a.checkpoint_layers,
            stateful: a.stateful,
            ..TrainConfig::default()
        };
        let what = match (&base, &model.lora) {
            (Some(b), Some(l)) => format!(
                "LoRA adapters (rank {}, on {}) of {}",
                l.config.rank,
                l.config.targets.join(", "),
                b.display()
            ),
            (Some(b), None) => b.display().to_string(),
            (None, _) => match model.config.arch {
                Arch::Mamba1 => "Mamba".to_string(),
                Arch::Mamba2 => "Mamba-2".to_string(),
                Arch::Lti => "the LTI baseline".to_string(),
            },
        };
        let trainable: usize = model.params.trainable().map(|(_, p)| p.value.len()).sum();
        let ranks = match comm.size() {
            1 => String::new(),
            n => format!(", {n} ranks of {} rows", a.batch_size.div_ceil(n)),
        };
        if lead {
            eprintln!(
                "training {what} ({:.2} M parameters, {:.2} M trained) on {} into {}{ranks}",
                model.params.num_elements() as f64 / 1e6,
                trainable as f64 / 1e6,
                match &source {
                    Source::Text { path, .. } => path.display().to_string(),
                    Source::Task(t) => format!("the {t:?} task"),
                    Source::Builtin => "the built-in arithmetic corpus (generated, offline)".to_string(),
                },
                dir.display()
            );
        }
        let trainer = Trainer::with_run(model, tc, run);
        let trainer = match base {
            Some(b) => trainer.with_base(b),
            None => trainer,
        };
        (trainer, source, obj)
    };
    let mut trainer = trainer.with_collective(comm)?;
    let dir = trainer.dir().to_path_buf();
    let bar =
        if lead { ProgressBar::new(trainer.config.steps.unwrap_or(1000)) } else { ProgressBar::hidden() };
    bar.set_style(
        ProgressStyle::with_template("{bar:30} {pos}/{len} {msg}  ETA {eta}")
            .expect("a valid template")
            .progress_chars("=> "),
    );
    let mut progress = Bar(bar);
    install_stop_handler()?;
    let m = trainer.run(&obj, &mut progress)?;
    progress.0.finish_and_clear();
    if !lead {
        return Ok(());
    }
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
    match (trainer.model.lora.is_some(), trainer.base()) {
        (true, Some(b)) => outln!(
            "run directory {} (metrics.jsonl, loss.svg, the LoRA adapter in PEFT layout: run it with \
             --model {} --adapter {}, or merge it with mamba merge)",
            dir.display(),
            b.display(),
            dir.display()
        ),
        _ => {
            outln!("run directory {} (metrics.jsonl, loss.svg, model in Hugging Face layout)", dir.display())
        }
    }
    Ok(())
}
