//! The training loop: sampling, forward/backward, clipping, AdamW with warmup + cosine decay,
//! periodic evaluation, `metrics.jsonl`, a loss-curve plot, and atomic checkpoints from which a
//! run resumes exactly.
//!
//! A run directory ([`RunDir`]) holds, after every evaluation, a checkpoint
//! `checkpoints/step-N/` published whole (see [`crate::run_dir`]) with:
//!
//! | file | what |
//! |---|---|
//! | `config.json`, `model.safetensors` | the model in Hugging Face layout (loads in transformers); also linked at the top of the run directory |
//! | `adapter_config.json`, `adapter_model.safetensors` | instead, when the model has LoRA adapters: the PEFT adapter (the base stays where [`Trainer::with_base`] says) |
//! | `optimizer.safetensors` | AdamW moments (`exp_avg.<param>`, `exp_avg_sq.<param>`) of the trainable parameters; for a stateful run also the recurrent state carried into the next step (`carry.layers.<i>.conv`, `carry.layers.<i>.ssm`) |
//! | `trainer.json` | step, tokens, elapsed time, RNG state (a stateful run: each row's position), the training config and the curves |
//! | `manifest.json` | the step and every file's size |
//!
//! and at its top `metrics.jsonl` (one JSON object per evaluation, appended after the checkpoint
//! is published) and `loss.svg`. A crash at any moment leaves the previous checkpoint complete,
//! and a resume continues exactly from the newest complete one.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use mamba_nn::checkpoint::{CheckpointError, TensorFile, write_atomic, write_tensors};
use mamba_nn::model::lora::ADAPTER_CONFIG;
use mamba_nn::model::{Cache, MambaLM, ModelError, SeqLayout};
use mamba_nn::ops;
use mamba_nn::params::Grads;
use mamba_nn::tape::Tape;
use mamba_nn::tensor::{Tensor, data as values, from_vec};
use serde::{Deserialize, Serialize};

use crate::collective::{Collective, Solo, gather_f64, share};
use crate::data::{DataError, Rng, TextData, sample_batch, val_batches};
use crate::optim::{AdamW, AdamWConfig, LrSchedule, clip_grad_norm};
use crate::plot::{Series, svg};
use crate::run_dir::{Checkpoint, RunDir, RunDirError};
use crate::tasks::{Task, accuracy};
use crate::tokenizer::Tokenizer;

/// What the model is trained on.
pub enum Objective {
    /// Next-token prediction on tokenized text.
    Text {
        /// Train / validation token streams.
        data: TextData,
        /// The tokenizer that produced them (used for samples).
        tokenizer: Box<dyn Tokenizer>,
    },
    /// A synthetic task with accuracy as its metric.
    Task(Task),
}

/// Hyper-parameters of a run (saved in `trainer.json`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TrainConfig {
    /// Tokens per training window (text) — the task's own length is used for tasks.
    pub seq_len: usize,
    /// Sequences per micro-batch.
    pub batch_size: usize,
    /// Micro-batches whose gradients are summed per optimizer step.
    pub grad_accum: usize,
    /// Peak learning rate.
    pub lr: f32,
    /// Final learning rate of the cosine decay.
    pub min_lr: f32,
    /// Linear warmup steps.
    pub warmup_steps: u64,
    /// AdamW decoupled weight decay (matrices only; never `A_log`, `D`, biases, norms).
    pub weight_decay: f32,
    /// Global gradient-norm clip.
    pub grad_clip: f32,
    /// Stop after this many steps.
    pub steps: Option<u64>,
    /// Stop when this many seconds of training (and the final evaluation) are spent.
    pub time_budget: Option<f64>,
    /// Evaluate and checkpoint every this many steps.
    pub eval_every: u64,
    /// Validation tokens per evaluation (the whole split when smaller).
    pub eval_tokens: usize,
    /// Seed of the data sampler.
    pub seed: u64,
    /// Checkpoints kept in `checkpoints/` (the newest ones; at least 1).
    #[serde(default = "default_keep")]
    pub keep_checkpoints: usize,
    /// Text packed as documents separated by an end-of-document token: this token's id. Every
    /// window position holding it starts a document, where the model's recurrent state
    /// restarts from zero (training and validation). `None`: windows are one stream.
    #[serde(default)]
    pub reset_token: Option<u32>,
    /// Activation checkpointing: keep only each block's input and recompute the block in the
    /// backward (`Backbone::checkpoint_layers`) — far less memory for long windows, for a second
    /// forward pass. Results are unchanged.
    #[serde(default)]
    pub checkpoint_layers: bool,
    /// Stateful training (text): each batch row walks through the training tokens in order,
    /// window after window, and each window starts from the recurrent state the row's previous
    /// window ended in (detached: no gradient flows into the previous step), restarting at
    /// document starts (`reset_token`) and where a row wraps around to the beginning.
    #[serde(default)]
    pub stateful: bool,
}

fn default_keep() -> usize {
    2
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            seq_len: 256,
            batch_size: 8,
            grad_accum: 1,
            lr: 2e-3,
            min_lr: 2e-4,
            warmup_steps: 100,
            weight_decay: 0.1,
            grad_clip: 1.0,
            steps: Some(1000),
            time_budget: None,
            eval_every: 200,
            eval_tokens: 100_000,
            seed: 0,
            keep_checkpoints: default_keep(),
            reset_token: None,
            checkpoint_layers: false,
            stateful: false,
        }
    }
}

/// The rows' layout for a batch of token ids: packed documents starting at every `reset_token`
/// (see [`TrainConfig::reset_token`]), or plain rows.
fn layout(ids: &[usize], reset_token: Option<u32>) -> SeqLayout {
    match reset_token {
        Some(eos) => SeqLayout::packed(ids.iter().map(|&t| t == eos as usize).collect::<Vec<bool>>()),
        None => SeqLayout::default(),
    }
}

/// One line of `metrics.jsonl`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Metrics {
    /// Optimizer steps taken.
    pub step: u64,
    /// Training tokens seen.
    pub tokens: u64,
    /// Mean training loss since the previous evaluation (nats per token).
    pub train_loss: f64,
    /// Validation loss (nats per token).
    pub val_loss: f64,
    /// Validation accuracy (synthetic tasks).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub val_accuracy: Option<f64>,
    /// Learning rate of the last step.
    pub lr: f64,
    /// Training throughput since the run (or resume) started.
    pub tokens_per_s: f64,
    /// Seconds spent training (accumulated across resumes).
    pub elapsed_s: f64,
}

/// Progress after one step, for a progress display.
#[derive(Clone, Debug)]
pub struct StepInfo {
    /// Steps taken.
    pub step: u64,
    /// Planned steps (estimated from the time budget when there is no step limit).
    pub planned: u64,
    /// Loss of this step.
    pub loss: f64,
    /// Training tokens per second.
    pub tokens_per_s: f64,
    /// Seconds spent.
    pub elapsed_s: f64,
}

/// Receives progress; the CLI draws a progress bar from it.
pub trait Progress {
    /// After every optimizer step.
    fn on_step(&mut self, _info: &StepInfo) {}
    /// Asked before every step: `true` makes the trainer evaluate, checkpoint and return
    /// [`TrainError::Interrupted`] (the CLI answers Ctrl-C this way).
    fn stop_requested(&self) -> bool {
        false
    }
    /// After every evaluation.
    fn on_eval(&mut self, _m: &Metrics) {}
}

/// A no-op [`Progress`].
pub struct Silent;
impl Progress for Silent {}

/// Why a run stopped with an error. The last good checkpoint is always left in place.
#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    /// Data could not be used.
    #[error(transparent)]
    Data(#[from] DataError),
    /// A checkpoint file could not be read or written.
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
    /// The model could not be loaded or saved.
    #[error(transparent)]
    Model(#[from] ModelError),
    /// A file of the run directory could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The loss or the gradient stopped being finite.
    #[error(
        "step {step}: the {what} is {value} (not finite); training stopped. The last good checkpoint \
         in {dir} is intact — resume from it with a lower learning rate (--lr) or stronger clipping"
    )]
    NonFinite {
        /// The step.
        step: u64,
        /// `loss` or `gradient norm`.
        what: &'static str,
        /// The value.
        value: f64,
        /// The run directory.
        dir: PathBuf,
    },
    /// Training was asked to stop ([`Progress::stop_requested`]); a checkpoint of this step was
    /// written first.
    #[error(
        "stopped at step {step} on request; checkpoint saved in {checkpoint}. Continue with: \
         mamba train --out {dir} --resume"
    )]
    Interrupted {
        /// The step.
        step: u64,
        /// The checkpoint written.
        checkpoint: PathBuf,
        /// The run directory.
        dir: PathBuf,
    },
    /// The run directory cannot be claimed, opened or checkpointed.
    #[error(transparent)]
    RunDir(#[from] RunDirError),
    /// `trainer.json` is unusable.
    #[error("cannot resume from {path}: {reason}")]
    Resume {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The data-parallel ranks' parameters differ (checked at every evaluation).
    #[error(
        "step {step}: the ranks' parameters have drifted apart (checksums by rank: {checksums:?}); \
         training stopped. The last checkpoint in {dir} holds rank 0's parameters"
    )]
    Diverged {
        /// The step.
        step: u64,
        /// Each rank's parameter checksum.
        checksums: Vec<f64>,
        /// The run directory.
        dir: PathBuf,
    },
    /// This run cannot be split over the ranks given.
    #[error("data-parallel training over {ranks} ranks: {reason}")]
    Parallel {
        /// The number of ranks.
        ranks: usize,
        /// What does not fit.
        reason: String,
    },
}

/// `trainer.json`.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct TrainerState {
    step: u64,
    tokens: u64,
    elapsed_s: f64,
    rng: u64,
    config: TrainConfig,
    /// (tokens, train loss) and (tokens, val loss) history for the plot.
    train_curve: Vec<(f64, f64)>,
    val_curve: Vec<(f64, f64)>,
    /// The pretrained model the run started from, if any (a LoRA run's checkpoints hold only
    /// the adapter, and resuming reads the base from here).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    base: Option<PathBuf>,
    /// A stateful run: each batch row's next position in the training tokens.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    cursors: Option<Vec<usize>>,
}

/// Where a stateful run's rows are and the state they carry (see [`TrainConfig::stateful`]).
#[derive(Clone, Debug)]
struct Stream {
    /// Each row's next window start in the training tokens.
    cursors: Vec<usize>,
    /// The state after each row's last window, (B rows).
    carry: Cache,
}

impl Stream {
    /// Rows spread evenly over `n` tokens, from a zero state.
    fn new(model: &MambaLM, n: usize, batch: usize) -> Self {
        Self {
            cursors: (0..batch).map(|r| r * (n / batch.max(1))).collect(),
            carry: Cache::new(model, batch),
        }
    }

    /// The next window of every row — inputs (B, L) and their next-token targets — advancing the
    /// rows; a row without `L + 1` tokens left wraps to the start, from a zero state.
    fn next(&mut self, tokens: &[u32], seq_len: usize) -> (Vec<usize>, Vec<i64>) {
        let b = self.cursors.len();
        let (mut inputs, mut targets) = (Vec::with_capacity(b * seq_len), Vec::with_capacity(b * seq_len));
        for r in 0..b {
            if self.cursors[r] + seq_len + 1 > tokens.len() {
                self.cursors[r] = 0;
                self.carry.reset_row(r);
            }
            let w = &tokens[self.cursors[r]..self.cursors[r] + seq_len + 1];
            inputs.extend(w[..seq_len].iter().map(|&t| t as usize));
            targets.extend(w[1..].iter().map(|&t| i64::from(t)));
            self.cursors[r] += seq_len;
        }
        (inputs, targets)
    }

    /// The carried state as named tensors for a checkpoint.
    fn tensors(&self, model: &MambaLM) -> Vec<(String, Tensor)> {
        let b = self.carry.batch;
        let mut out = Vec::new();
        for (i, (l, block)) in self.carry.layers.iter().zip(&model.backbone.layers).enumerate() {
            let (cs, ss) = block.mixer.cache_shapes();
            out.push((format!("carry.layers.{i}.conv"), from_vec(&[vec![b], cs].concat(), l.conv.clone())));
            out.push((format!("carry.layers.{i}.ssm"), from_vec(&[vec![b], ss].concat(), l.ssm.clone())));
        }
        out
    }

    /// The stream a checkpoint recorded: `cursors` from `trainer.json`, the state from `file`.
    fn load(model: &MambaLM, cursors: Vec<usize>, file: &TensorFile) -> Result<Self, CheckpointError> {
        let b = cursors.len();
        let mut carry = Cache::new(model, b);
        for (i, (l, block)) in carry.layers.iter_mut().zip(&model.backbone.layers).enumerate() {
            let (cs, ss) = block.mixer.cache_shapes();
            l.conv = values(&file.f32_shaped(&format!("carry.layers.{i}.conv"), &[vec![b], cs].concat())?)
                .to_vec();
            l.ssm =
                values(&file.f32_shaped(&format!("carry.layers.{i}.ssm"), &[vec![b], ss].concat())?).to_vec();
        }
        Ok(Self { cursors, carry })
    }
}

/// A model, its optimizer and the loop state of one run directory.
pub struct Trainer {
    /// The model being trained.
    pub model: MambaLM,
    opt: AdamW,
    grads: Grads,
    rng: Rng,
    /// Steps taken.
    pub step: u64,
    /// Training tokens seen.
    pub tokens: u64,
    elapsed_before: f64,
    /// The run's hyper-parameters.
    pub config: TrainConfig,
    run: RunDir,
    /// The checkpoint this trainer resumed from, and why any newer one was skipped.
    resumed: Option<(Checkpoint, Vec<String>)>,
    train_curve: Vec<(f64, f64)>,
    val_curve: Vec<(f64, f64)>,
    base: Option<PathBuf>,
    /// A stateful run's rows (made at its first step).
    stream: Option<Stream>,
    /// The data-parallel group this trainer is one rank of ([`Solo`] unless
    /// [`Trainer::with_collective`]).
    comm: Box<dyn Collective>,
    /// The gradients in one buffer for the ranks' sum (empty with one rank).
    flat: Vec<f32>,
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> TrainError + '_ {
    move |source| TrainError::Io { path: path.to_path_buf(), source }
}

impl Trainer {
    /// A new run of `model` into directory `dir`, which it claims ([`RunDir::create`]: absent or
    /// empty, then locked).
    pub fn new(model: MambaLM, config: TrainConfig, dir: impl Into<PathBuf>) -> Result<Self, TrainError> {
        Ok(Self::with_run(model, config, RunDir::create(dir)?))
    }

    /// A new run of `model` in the run directory `run` (claimed by the caller, who may have put
    /// its data description there first).
    pub fn with_run(mut model: MambaLM, config: TrainConfig, run: RunDir) -> Self {
        model.backbone.checkpoint_layers = config.checkpoint_layers;
        let opt = AdamW::new(
            &model.params,
            AdamWConfig { lr: config.lr, weight_decay: config.weight_decay, ..Default::default() },
        );
        let grads = Grads::new(&model.params);
        let rng = Rng::new(config.seed);
        Self {
            model,
            opt,
            grads,
            rng,
            step: 0,
            tokens: 0,
            elapsed_before: 0.0,
            config,
            run,
            resumed: None,
            train_curve: Vec::new(),
            val_curve: Vec::new(),
            base: None,
            stream: None,
            comm: Box::new(Solo),
            flat: Vec::new(),
        }
    }

    /// Makes this trainer rank `comm.rank()` of a data-parallel group of `comm.size()` ranks.
    ///
    /// Every rank draws the same global batch of `--batch-size` rows from the same seeded
    /// sampler and trains on its share ([`crate::collective::share`]); the ranks sum their gradients,
    /// each scaled by its share of the batch's targets, so every rank applies the same clipped
    /// AdamW step and the parameters stay identical (checked by a checksum at every evaluation).
    /// Only rank 0 writes the run's files. A checkpoint is the same whatever the number of
    /// ranks, so a run resumes on any number.
    ///
    /// # Errors
    /// [`TrainError::Parallel`] if the batch has fewer rows than there are ranks, or the run is
    /// stateful (its rows carry state from window to window and are not split yet).
    pub fn with_collective(mut self, comm: Box<dyn Collective>) -> Result<Self, TrainError> {
        let ranks = comm.size();
        if ranks > 1 && self.config.batch_size < ranks {
            return Err(TrainError::Parallel {
                ranks,
                reason: format!("--batch-size {} gives some rank no rows", self.config.batch_size),
            });
        }
        if ranks > 1 && self.config.stateful {
            return Err(TrainError::Parallel { ranks, reason: "--stateful runs on one rank only".into() });
        }
        self.flat = if ranks > 1 { vec![0.0; self.grads.len()] } else { Vec::new() };
        self.comm = comm;
        Ok(self)
    }

    /// Records `dir` as the pretrained model this run started from (in `trainer.json`, and as
    /// an adapter's `base_model_name_or_path`). A run whose model has LoRA adapters checkpoints
    /// only the adapters, and resumes by loading this base and the adapter on top.
    pub fn with_base(mut self, dir: impl Into<PathBuf>) -> Self {
        self.base = Some(dir.into());
        self
    }

    /// The pretrained model the run started from, if any.
    pub fn base(&self) -> Option<&Path> {
        self.base.as_deref()
    }

    /// Reopens the run in `dir` ([`RunDir::open`]) exactly where its newest complete checkpoint
    /// left it.
    pub fn resume(dir: impl Into<PathBuf>) -> Result<Self, TrainError> {
        Self::resume_run(RunDir::open(dir)?)
    }

    /// Continues the run in `run` from its newest complete checkpoint ([`RunDir::latest`]):
    /// model, optimizer moments, step, token count, sampler RNG and curves. Lines of
    /// `metrics.jsonl` from after that checkpoint are dropped.
    pub fn resume_run(run: RunDir) -> Result<Self, TrainError> {
        let (ck, skipped) = run.latest()?;
        let path = ck.path.join("trainer.json");
        let text = std::fs::read_to_string(&path).map_err(io_err(&path))?;
        let st: TrainerState = serde_json::from_str(&text)
            .map_err(|e| TrainError::Resume { path: path.clone(), reason: e.to_string() })?;
        let model = if ck.path.join(ADAPTER_CONFIG).exists() {
            let base = st.base.as_ref().ok_or_else(|| TrainError::Resume {
                path: path.clone(),
                reason: "the checkpoint holds a LoRA adapter, but no base model is recorded".into(),
            })?;
            let mut m = MambaLM::from_pretrained(base).map_err(|e| TrainError::Resume {
                path: base.clone(),
                reason: format!(
                    "the run's base model (its LoRA adapter applies to it) cannot be loaded: {e}"
                ),
            })?;
            m.load_adapter(&ck.path)?;
            m
        } else {
            MambaLM::from_pretrained(&ck.path)?
        };
        let opt_file = TensorFile::open(ck.path.join("optimizer.safetensors"))?;
        if !run.is_follower() {
            drop_metrics_after(&run.path().join("metrics.jsonl"), st.step)?;
        }
        let mut t = Self::with_run(model, st.config, run);
        t.opt.load_state(&opt_file, st.step)?;
        t.step = st.step;
        t.tokens = st.tokens;
        t.elapsed_before = st.elapsed_s;
        t.rng = Rng::from_state(st.rng);
        t.train_curve = st.train_curve;
        t.val_curve = st.val_curve;
        t.base = st.base;
        if let Some(cursors) = st.cursors {
            t.stream = Some(Stream::load(&t.model, cursors, &opt_file)?);
        }
        t.resumed = Some((ck, skipped));
        Ok(t)
    }

    /// The checkpoint this trainer resumed from and, for each newer checkpoint that was not
    /// complete, why it was skipped.
    pub fn resumed_from(&self) -> Option<&(Checkpoint, Vec<String>)> {
        self.resumed.as_ref()
    }

    /// The run directory.
    pub fn dir(&self) -> &Path {
        self.run.path()
    }

    /// One optimizer step (with gradient accumulation); returns the mean loss.
    fn train_step(&mut self, obj: &Objective, lr: f32) -> Result<f64, TrainError> {
        let cfg = &self.config;
        let accum = cfg.grad_accum.max(1);
        self.grads.zero();
        let mut total = 0.0f64;
        // This rank's rows of each global batch, and its share of the batch's loss.
        let rows = share(cfg.batch_size, self.comm.rank(), self.comm.size());
        for _ in 0..accum {
            let mut frac = 1.0f64;
            let mut tape = Tape::new(&self.model.params);
            // The loss is read before the backward; nothing after it.
            tape.release_values_in_backward();
            let loss = match obj {
                Objective::Text { data, .. } if cfg.stateful => {
                    let (b, l) = (cfg.batch_size, cfg.seq_len);
                    let stream =
                        self.stream.get_or_insert_with(|| Stream::new(&self.model, data.train.len(), b));
                    let (inputs, targets) = stream.next(&data.train, l);
                    let seq = layout(&inputs, cfg.reset_token);
                    let init = stream.carry.to_tape(&self.model, &mut tape, false);
                    let mut end = Cache::new(&self.model, b);
                    let logits = self.model.forward_from(
                        &mut tape,
                        &inputs,
                        (b, l),
                        &seq,
                        Some(&init),
                        Some(&mut end),
                    );
                    stream.carry = end;
                    ops::cross_entropy(&mut tape, logits, &targets)
                }
                Objective::Text { data, .. } => {
                    let all = sample_batch(&data.train, &mut self.rng, cfg.batch_size, cfg.seq_len);
                    let w = cfg.seq_len + 1;
                    let ids = &all[rows.start * w..rows.end * w];
                    frac = rows.len() as f64 / cfg.batch_size as f64;
                    let seq = layout(ids, cfg.reset_token);
                    self.model.forward_loss_seq(&mut tape, ids, rows.len(), w, &seq).1
                }
                Objective::Task(task) => {
                    let (all_ids, all_targets) = task.batch(&mut self.rng, cfg.batch_size);
                    let l = task.seq_len();
                    let (ids, targets) =
                        (&all_ids[rows.start * l..rows.end * l], &all_targets[rows.start * l..rows.end * l]);
                    // The loss is a mean over scored targets, which rows may hold unequally.
                    let scored = |t: &[i64]| t.iter().filter(|&&v| v >= 0).count();
                    frac = scored(targets) as f64 / scored(&all_targets).max(1) as f64;
                    let logits = self.model.forward(&mut tape, ids, rows.len(), l);
                    ops::cross_entropy(&mut tape, logits, targets)
                }
            };
            let value = values(tape.value(loss))[0] as f64;
            // With several ranks a rank's non-finite loss reaches every rank through the sums
            // below (and is reported there), so that no rank leaves a collective the others enter.
            if !value.is_finite() && self.comm.size() == 1 {
                return Err(TrainError::NonFinite {
                    step: self.step + 1,
                    what: "loss",
                    value,
                    dir: self.dir().to_path_buf(),
                });
            }
            total += value * frac;
            let seed =
                mamba_nn::tensor::from_vec(tape.value(loss).shape(), vec![(frac / accum as f64) as f32]);
            tape.backward_from(loss, seed, &mut self.grads);
        }
        if self.comm.size() > 1 {
            // The global batch's mean gradient and loss: the ranks' scaled shares, summed.
            self.grads.write_flat(&mut self.flat);
            self.comm.all_reduce_sum(&mut self.flat);
            self.grads.read_flat(&self.flat);
            let mut t = [total];
            self.comm.all_reduce_sum_f64(&mut t);
            total = t[0];
            if !total.is_finite() {
                return Err(TrainError::NonFinite {
                    step: self.step + 1,
                    what: "loss",
                    value: total,
                    dir: self.dir().to_path_buf(),
                });
            }
        }
        let norm = clip_grad_norm(&self.model.params, &mut self.grads, cfg.grad_clip) as f64;
        if !norm.is_finite() {
            return Err(TrainError::NonFinite {
                step: self.step + 1,
                what: "gradient norm",
                value: norm,
                dir: self.dir().to_path_buf(),
            });
        }
        self.opt.step(&mut self.model.params, &self.grads, lr);
        self.step += 1;
        self.tokens += (accum * cfg.batch_size * self.seq_len_of(obj)) as u64;
        Ok(total / accum as f64)
    }

    fn seq_len_of(&self, obj: &Objective) -> usize {
        match obj {
            Objective::Text { .. } => self.config.seq_len,
            Objective::Task(t) => t.seq_len(),
        }
    }

    /// Validation loss (and accuracy for tasks), with no tape recording.
    pub fn evaluate(&self, obj: &Objective) -> (f64, Option<f64>) {
        let cfg = &self.config;
        match obj {
            Objective::Text { data, .. } => {
                let (mut sum, mut n) = (0.0f64, 0usize);
                for ids in val_batches(&data.val, cfg.batch_size, cfg.seq_len, cfg.eval_tokens) {
                    let rows = ids.len() / (cfg.seq_len + 1);
                    let mut tape = Tape::inference(&self.model.params);
                    let seq = layout(&ids, cfg.reset_token);
                    let (_, loss) = self.model.forward_loss_seq(&mut tape, &ids, rows, cfg.seq_len + 1, &seq);
                    let targets = rows * cfg.seq_len;
                    sum += values(tape.value(loss))[0] as f64 * targets as f64;
                    n += targets;
                }
                (sum / n.max(1) as f64, None)
            }
            Objective::Task(task) => {
                // A fixed validation set: the same seed every evaluation.
                let mut rng = Rng::new(cfg.seed ^ 0x5EED_0F7A_5C00);
                let (mut loss, mut acc, batches) = (0.0f64, 0.0f64, 8);
                for _ in 0..batches {
                    let (ids, targets) = task.batch(&mut rng, cfg.batch_size);
                    let mut tape = Tape::inference(&self.model.params);
                    let logits = self.model.forward(&mut tape, &ids, cfg.batch_size, task.seq_len());
                    let l = ops::cross_entropy(&mut tape, logits, &targets);
                    loss += values(tape.value(l))[0] as f64;
                    acc += accuracy(values(tape.value(logits)), &targets, task.vocab_size()) as f64;
                }
                (loss / batches as f64, Some(acc / batches as f64))
            }
        }
    }

    /// What every rank of a group does next, decided together: stop if any rank was asked to;
    /// end, and plan the learning-rate schedule, as rank 0's clock says (ranks that timed their
    /// steps apart would otherwise leave the loop, or set the learning rate, differently).
    fn agree(&self, stop: bool, done: bool, planned: u64) -> (bool, bool, u64) {
        if self.comm.size() == 1 {
            return (stop, done, planned);
        }
        let lead = self.comm.rank() == 0;
        let mut v = [f64::from(u8::from(stop)), if lead { f64::from(u8::from(done)) } else { 0.0 }, 0.0];
        if lead {
            v[2] = planned as f64;
        }
        self.comm.all_reduce_sum_f64(&mut v);
        (v[0] > 0.0, v[1] > 0.0, v[2] as u64)
    }

    /// A checksum of every parameter value (position-weighted, in f64): equal on ranks whose
    /// parameters are bitwise equal.
    fn param_checksum(&self) -> f64 {
        let mut sum = 0.0f64;
        for (_, p) in self.model.params.iter() {
            for (i, &v) in p.value.iter().enumerate() {
                sum += v as f64 * (1 + i % 7) as f64;
            }
        }
        sum
    }

    /// Errors if the ranks' parameters differ ([`TrainError::Diverged`]).
    fn check_ranks_agree(&self) -> Result<(), TrainError> {
        if self.comm.size() == 1 {
            return Ok(());
        }
        let sums = gather_f64(self.comm.as_ref(), self.param_checksum());
        if sums.iter().any(|&s| s.to_bits() != sums[0].to_bits()) {
            return Err(TrainError::Diverged {
                step: self.step,
                checksums: sums,
                dir: self.dir().to_path_buf(),
            });
        }
        Ok(())
    }

    /// Writes the checkpoint files, `metrics.jsonl` line and plot (see the module docs); only
    /// rank 0 of a data-parallel group writes.
    fn checkpoint(&self, m: &Metrics) -> Result<(), TrainError> {
        if self.comm.rank() != 0 {
            return Ok(());
        }
        let st = TrainerState {
            step: self.step,
            tokens: self.tokens,
            elapsed_s: m.elapsed_s,
            rng: self.rng.state(),
            config: self.config.clone(),
            train_curve: self.train_curve.clone(),
            val_curve: self.val_curve.clone(),
            base: self.base.clone(),
            cursors: self.stream.as_ref().map(|s| s.cursors.clone()),
        };
        let json = serde_json::to_vec_pretty(&st).expect("trainer state serialises");
        let carry = self.stream.as_ref().map(|s| s.tensors(&self.model)).unwrap_or_default();
        self.run.save(self.step, self.config.keep_checkpoints, |tmp| -> Result<(), TrainError> {
            if self.model.lora.is_some() {
                let base = self.base.as_ref().map_or(String::new(), |b| b.display().to_string());
                self.model.save_adapter(tmp, &base)?;
            } else {
                self.model.save_pretrained(tmp)?;
            }
            let state = self.opt.state().into_iter().chain(carry.iter().map(|(n, t)| (n.clone(), t)));
            write_tensors(tmp.join("optimizer.safetensors"), state, None)?;
            write_atomic(&tmp.join("trainer.json"), &json)?;
            Ok(())
        })?;
        let path = self.dir().join("metrics.jsonl");
        let mut f =
            std::fs::OpenOptions::new().create(true).append(true).open(&path).map_err(io_err(&path))?;
        let line = serde_json::to_string(m).expect("metrics serialise");
        writeln!(f, "{line}").map_err(io_err(&path))?;
        let plot = svg(
            "Loss",
            "training tokens",
            "nats per token",
            &[
                Series { name: "train", color: "#1f77b4", points: &self.train_curve },
                Series { name: "validation", color: "#d62728", points: &self.val_curve },
            ],
        );
        write_atomic(&self.dir().join("loss.svg"), plot.as_bytes())?;
        Ok(())
    }

    /// Trains until the step limit or the time budget, evaluating and checkpointing every
    /// `eval_every` steps and at the end. Returns the final metrics.
    ///
    /// With a time budget, a step is started only if it and the final evaluation (timed at the
    /// previous evaluation, with a margin) still fit; the learning-rate schedule's length is
    /// re-estimated from the measured step time.
    pub fn run(&mut self, obj: &Objective, progress: &mut dyn Progress) -> Result<Metrics, TrainError> {
        if let Objective::Text { data, .. } = obj {
            data.ensure_len(self.config.seq_len)?;
        }
        let start = Instant::now();
        let (start_step, start_tokens) = (self.step, self.tokens);
        let mut window = (0.0f64, 0u64);
        // The plot gets a training-loss point about ten times per evaluation interval.
        let plot_every = (self.config.eval_every / 10).max(1);
        let mut plot_window = (0.0f64, 0u64);
        let mut eval_cost = 0.0f64;
        let mut last: Option<Metrics> = None;
        let mut lr = 0.0f32;
        let mut stopped = false;
        loop {
            let stop = progress.stop_requested();
            let run_s = start.elapsed().as_secs_f64();
            let spent = self.elapsed_before + run_s;
            let steps_run = self.step - start_step;
            let per_step = if steps_run > 0 { run_s / steps_run as f64 } else { 0.0 };
            let done = self.config.steps.is_some_and(|s| self.step >= s)
                || self.config.time_budget.is_some_and(|b| spent + per_step + 1.2 * eval_cost + 0.5 > b);
            let planned = match (self.config.steps, self.config.time_budget) {
                (Some(s), _) => s,
                (None, Some(b)) if per_step > 0.0 => {
                    self.step + ((b - spent - eval_cost) / per_step).max(1.0) as u64
                }
                _ => self.step + 1000,
            };
            let (stop, done, planned) = self.agree(stop, done, planned);
            if stop {
                stopped = true;
                break;
            }
            if done {
                break;
            }
            let sched = LrSchedule {
                max_lr: self.config.lr,
                min_lr: self.config.min_lr,
                warmup_steps: self.config.warmup_steps,
                total_steps: planned.max(self.config.warmup_steps + 1),
            };
            lr = sched.lr(self.step);
            let loss = self.train_step(obj, lr)?;
            window = (window.0 + loss, window.1 + 1);
            plot_window = (plot_window.0 + loss, plot_window.1 + 1);
            if self.step.is_multiple_of(plot_every) {
                self.train_curve.push((self.tokens as f64, plot_window.0 / plot_window.1 as f64));
                plot_window = (0.0, 0);
            }
            let info = self.info(planned, loss, start, start_tokens);
            progress.on_step(&info);
            last = None;
            if self.step.is_multiple_of(self.config.eval_every.max(1)) {
                let t0 = Instant::now();
                let m = self.eval_and_save(obj, &mut window, lr, &info)?;
                eval_cost = t0.elapsed().as_secs_f64();
                progress.on_eval(&m);
                last = Some(m);
            }
        }
        let m = match last {
            Some(m) => m,
            None => {
                let info = self.info(self.step, f64::NAN, start, start_tokens);
                let m = self.eval_and_save(obj, &mut window, lr, &info)?;
                progress.on_eval(&m);
                m
            }
        };
        if stopped {
            let dir = self.dir().to_path_buf();
            let checkpoint = self.run.checkpoint_path(self.step);
            return Err(TrainError::Interrupted { step: self.step, checkpoint, dir });
        }
        Ok(m)
    }

    fn info(&self, planned: u64, loss: f64, start: Instant, start_tokens: u64) -> StepInfo {
        let run_s = start.elapsed().as_secs_f64();
        StepInfo {
            step: self.step,
            planned,
            loss,
            tokens_per_s: (self.tokens - start_tokens) as f64 / run_s.max(1e-9),
            elapsed_s: self.elapsed_before + run_s,
        }
    }

    fn eval_and_save(
        &mut self,
        obj: &Objective,
        window: &mut (f64, u64),
        lr: f32,
        info: &StepInfo,
    ) -> Result<Metrics, TrainError> {
        self.check_ranks_agree()?;
        let (val_loss, val_accuracy) = self.evaluate(obj);
        let train_loss = if window.1 > 0 { window.0 / window.1 as f64 } else { f64::NAN };
        *window = (0.0, 0);
        self.val_curve.push((self.tokens as f64, val_loss));
        let m = Metrics {
            step: self.step,
            tokens: self.tokens,
            train_loss,
            val_loss,
            val_accuracy,
            lr: lr as f64,
            tokens_per_s: info.tokens_per_s,
            elapsed_s: info.elapsed_s,
        };
        self.checkpoint(&m)?;
        Ok(m)
    }
}

/// Rewrites `metrics.jsonl` without the lines of steps after `step` (written after a checkpoint
/// that a crash then lost, or after the one a resume starts from).
fn drop_metrics_after(path: &Path, step: u64) -> Result<(), TrainError> {
    let Ok(text) = std::fs::read_to_string(path) else { return Ok(()) };
    let keep: Vec<&str> = text
        .lines()
        .filter(|l| {
            let s = serde_json::from_str::<serde_json::Value>(l).ok().and_then(|v| v.get("step")?.as_u64());
            s.is_none_or(|s| s <= step)
        })
        .collect();
    if keep.len() != text.lines().count() {
        let mut out = keep.join("\n");
        out.push('\n');
        write_atomic(path, out.as_bytes())?;
    }
    Ok(())
}
