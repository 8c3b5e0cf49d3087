//! The Mamba paper's synthetic tasks (§4.1), generated on the fly, and token accuracy.
//!
//! Each generator returns `(inputs, targets)`, both row-major `(batch, seq_len)`: `inputs` are
//! token ids, `targets[b·L + t]` is the id the model must output at position `t` of row `b`
//! (the logits at `t` are scored directly, no shift), or [`IGNORE_INDEX`] (−100) where nothing
//! is scored — the convention of [`mamba_nn::ops::cross_entropy()`].
//!
//! The paper trains on 4096-token selective copying and 256-token induction heads; the defaults
//! here are scaled down so a 2-layer, `d_model = 64` model trains on a 2-core CPU in minutes,
//! while the tasks keep what makes them hard for a time-invariant (LTI) model: the positions that
//! matter are random in every sequence.
//!
//! ```
//! use mamba_train::data::Rng;
//! use mamba_train::tasks::Task;
//!
//! let task = Task::InductionHeads;
//! let (inputs, targets) = task.batch(&mut Rng::new(0), 2);
//! assert_eq!(inputs.len(), 2 * task.seq_len());
//! assert_eq!(targets.iter().filter(|&&t| t >= 0).count(), 2); // one scored position per row
//! ```

use mamba_nn::ops::IGNORE_INDEX;

use crate::data::Rng;

/// Selective copying: remember `num_tokens` data tokens scattered at random positions among
/// noise, and output them in order.
///
/// Ids: `0` = noise, `1` = copy marker, `2 .. 2 + num_symbols` = data symbols
/// (`vocab_size = num_symbols + 2`).
///
/// Layout of a row (`seq_len = context_len + num_tokens`):
///
/// ```text
/// position  0 ………………………… context_len−1 | context_len … context_len+num_tokens−1
/// input     noise, with num_tokens data   | marker × num_tokens
///           symbols at distinct random    |
///           positions (uniform symbols)   |
/// target    −100                          | the data symbols in order of position
/// ```
///
/// At the `j`-th marker the model must output the `j`-th data symbol of the context.
///
/// The defaults (context 64, 8 tokens, 8 symbols) are sized for a quick CPU demonstration: a
/// 2-layer `d_model = 64` Mamba-1 (batch 32, AdamW at 3e-3) passes 95 % validation accuracy in
/// about 1500 steps (≈ 75 s on 2 cores) and then reaches 99–100 %, while the LTI baseline of the
/// same size is at 73 % after 2000 steps and ≈ 89 % after 6000 (see the ignored test
/// `mamba_learns_selective_copying_and_lti_does_not`). At this short context an LTI model can
/// still partly memorise every position; the gap grows with `context_len` (the paper's 4096),
/// at a proportional cost per step.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SelectiveCopyingConfig {
    /// Length of the noisy context. Default 64 (paper: 4096).
    pub context_len: usize,
    /// Data tokens to copy. Default 8 (paper: 16).
    pub num_tokens: usize,
    /// Distinct data symbols. Default 8 (paper: 16 tokens in the vocabulary).
    pub num_symbols: usize,
}

impl Default for SelectiveCopyingConfig {
    fn default() -> Self {
        Self { context_len: 64, num_tokens: 8, num_symbols: 8 }
    }
}

impl SelectiveCopyingConfig {
    /// The noise id.
    pub const NOISE: usize = 0;
    /// The copy-marker id.
    pub const MARKER: usize = 1;

    /// `num_symbols + 2`.
    pub fn vocab_size(&self) -> usize {
        self.num_symbols + 2
    }

    /// `context_len + num_tokens`.
    pub fn seq_len(&self) -> usize {
        self.context_len + self.num_tokens
    }

    /// `batch` rows (see the type's docs for the layout).
    ///
    /// # Panics
    /// If `num_tokens > context_len` or `num_symbols == 0`.
    #[track_caller]
    pub fn batch(&self, rng: &mut Rng, batch: usize) -> (Vec<usize>, Vec<i64>) {
        let (c, k) = (self.context_len, self.num_tokens);
        assert!(k <= c && self.num_symbols > 0, "selective copying: {k} tokens do not fit a context of {c}");
        let l = self.seq_len();
        let mut inputs = vec![Self::NOISE; batch * l];
        let mut targets = vec![IGNORE_INDEX; batch * l];
        let mut positions: Vec<usize> = (0..c).collect();
        for b in 0..batch {
            // Partial Fisher–Yates: the first k entries become k distinct random positions.
            for i in 0..k {
                let j = i + rng.below((c - i) as u64) as usize;
                positions.swap(i, j);
            }
            let chosen = &mut positions[..k];
            chosen.sort_unstable();
            let row = &mut inputs[b * l..(b + 1) * l];
            let trow = &mut targets[b * l..(b + 1) * l];
            for (j, &p) in chosen.iter().enumerate() {
                let sym = 2 + rng.below(self.num_symbols as u64) as usize;
                row[p] = sym;
                row[c + j] = Self::MARKER;
                trow[c + j] = sym as i64;
            }
        }
        (inputs, targets)
    }
}

/// Induction heads: a trigger token appears once followed by an answer token; at the end the
/// trigger appears again and the model must output the answer.
///
/// Ids: `0` = trigger, `1 .. vocab_size` = ordinary tokens.
///
/// Layout of a row of length `seq_len = L`: every position holds a uniform ordinary token,
/// except position `p` (uniform in `0 ..= L−3`), which holds the trigger, followed by the answer
/// (an ordinary token) at `p + 1`, and position `L − 1`, which holds the trigger again. The only
/// scored position is `L − 1`, whose target is the answer. The trigger occurs exactly twice.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct InductionHeadsConfig {
    /// Sequence length. Default 64 (paper: 256 in training).
    pub seq_len: usize,
    /// Vocabulary including the trigger. Default 16 (as the paper).
    pub vocab_size: usize,
}

impl Default for InductionHeadsConfig {
    fn default() -> Self {
        Self { seq_len: 64, vocab_size: 16 }
    }
}

impl InductionHeadsConfig {
    /// The trigger id.
    pub const TRIGGER: usize = 0;

    /// `batch` rows (see the type's docs for the layout).
    ///
    /// # Panics
    /// If `seq_len < 3` or `vocab_size < 2`.
    #[track_caller]
    pub fn batch(&self, rng: &mut Rng, batch: usize) -> (Vec<usize>, Vec<i64>) {
        let (l, v) = (self.seq_len, self.vocab_size);
        assert!(l >= 3 && v >= 2, "induction heads: need seq_len ≥ 3 and vocab_size ≥ 2, got {l} and {v}");
        let mut inputs = vec![0usize; batch * l];
        let mut targets = vec![IGNORE_INDEX; batch * l];
        for b in 0..batch {
            let row = &mut inputs[b * l..(b + 1) * l];
            for x in row.iter_mut() {
                *x = 1 + rng.below(v as u64 - 1) as usize;
            }
            let p = rng.below(l as u64 - 2) as usize;
            row[p] = Self::TRIGGER;
            row[l - 1] = Self::TRIGGER;
            targets[b * l + l - 1] = row[p + 1] as i64;
        }
        (inputs, targets)
    }
}

/// A synthetic task with its default configuration.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Task {
    /// [`SelectiveCopyingConfig::default`]: vocabulary 10, length 72.
    SelectiveCopying,
    /// [`InductionHeadsConfig::default`]: vocabulary 16, length 64.
    InductionHeads,
}

impl Task {
    /// Every task.
    pub const ALL: [Task; 2] = [Task::SelectiveCopying, Task::InductionHeads];

    /// `"selective-copying"` or `"induction-heads"` (what [`str::parse`] accepts).
    pub fn name(&self) -> &'static str {
        match self {
            Task::SelectiveCopying => "selective-copying",
            Task::InductionHeads => "induction-heads",
        }
    }

    /// Ids are `< vocab_size()`.
    pub fn vocab_size(&self) -> usize {
        match self {
            Task::SelectiveCopying => SelectiveCopyingConfig::default().vocab_size(),
            Task::InductionHeads => InductionHeadsConfig::default().vocab_size,
        }
    }

    /// Length of every row.
    pub fn seq_len(&self) -> usize {
        match self {
            Task::SelectiveCopying => SelectiveCopyingConfig::default().seq_len(),
            Task::InductionHeads => InductionHeadsConfig::default().seq_len,
        }
    }

    /// `batch` fresh rows `(inputs, targets)`, each `(batch, seq_len)` row-major.
    pub fn batch(&self, rng: &mut Rng, batch: usize) -> (Vec<usize>, Vec<i64>) {
        match self {
            Task::SelectiveCopying => SelectiveCopyingConfig::default().batch(rng, batch),
            Task::InductionHeads => InductionHeadsConfig::default().batch(rng, batch),
        }
    }
}

impl std::fmt::Display for Task {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// A task name that is not one of [`Task::ALL`].
#[derive(Debug, thiserror::Error)]
#[error("unknown task `{0}`; expected one of: selective-copying, induction-heads")]
pub struct UnknownTask(pub String);

impl std::str::FromStr for Task {
    type Err = UnknownTask;

    fn from_str(s: &str) -> Result<Self, UnknownTask> {
        Task::ALL.into_iter().find(|t| t.name() == s).ok_or_else(|| UnknownTask(s.to_string()))
    }
}

/// Fraction of scored positions (target `≥ 0`) whose arg-max logit is the target.
///
/// `logits` is row-major `(positions, vocab)` (e.g. `(B, L, V)` flattened), `targets` one per
/// position. Ties go to the lowest id. Returns NaN when no position is scored.
///
/// # Panics
/// If `logits.len() != targets.len() · vocab`.
#[track_caller]
pub fn accuracy(logits: &[f32], targets: &[i64], vocab: usize) -> f32 {
    assert_eq!(
        logits.len(),
        targets.len() * vocab,
        "accuracy: {} logits for {} targets × vocab {vocab}",
        logits.len(),
        targets.len()
    );
    let (mut hit, mut n) = (0usize, 0usize);
    for (row, &t) in logits.chunks_exact(vocab).zip(targets) {
        if t < 0 {
            continue;
        }
        n += 1;
        let mut best = 0;
        for (i, &x) in row.iter().enumerate() {
            if x > row[best] {
                best = i;
            }
        }
        hit += usize::from(best as i64 == t);
    }
    if n == 0 { f32::NAN } else { hit as f32 / n as f32 }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn selective_copying_layout_and_answer_is_recoverable() {
        let cfg = SelectiveCopyingConfig::default();
        let (l, c, k) = (cfg.seq_len(), cfg.context_len, cfg.num_tokens);
        assert_eq!((Task::SelectiveCopying.seq_len(), Task::SelectiveCopying.vocab_size()), (72, 10));
        let (x, y) = Task::SelectiveCopying.batch(&mut Rng::new(3), 50);
        assert_eq!((x.len(), y.len()), (50 * l, 50 * l));
        let mut first_positions = std::collections::BTreeSet::new();
        for (row, trow) in x.chunks(l).zip(y.chunks(l)) {
            assert!(row.iter().all(|&t| t < cfg.vocab_size()));
            // Targets exactly on the marker positions.
            assert!(trow[..c].iter().all(|&t| t == IGNORE_INDEX));
            assert!(row[c..].iter().all(|&t| t == SelectiveCopyingConfig::MARKER));
            // The answer is the context's data symbols in order.
            let data: Vec<i64> = row[..c].iter().filter(|&&t| t >= 2).map(|&t| t as i64).collect();
            assert_eq!(data.len(), k);
            assert_eq!(&trow[c..], data.as_slice());
            assert!(row[..c].iter().all(|&t| t != SelectiveCopyingConfig::MARKER));
            first_positions.insert(row.iter().position(|&t| t >= 2).unwrap());
        }
        // The data really is at varying positions.
        assert!(first_positions.len() > 10, "{first_positions:?}");
        // Every symbol occurs.
        let seen: std::collections::BTreeSet<usize> = x.iter().copied().collect();
        assert_eq!(seen, (0..10).collect());
    }

    #[test]
    fn induction_heads_layout_and_answer_is_recoverable() {
        let t = Task::InductionHeads;
        let l = t.seq_len();
        let (x, y) = t.batch(&mut Rng::new(9), 200);
        let mut ps = std::collections::BTreeSet::new();
        for (row, trow) in x.chunks(l).zip(y.chunks(l)) {
            assert!(row.iter().all(|&v| v < t.vocab_size()));
            let triggers: Vec<usize> = (0..l).filter(|&i| row[i] == 0).collect();
            assert_eq!(triggers.len(), 2, "{row:?}");
            assert_eq!(triggers[1], l - 1);
            let p = triggers[0];
            assert!(p <= l - 3);
            ps.insert(p);
            assert!(trow[..l - 1].iter().all(|&v| v == IGNORE_INDEX));
            assert_eq!(trow[l - 1], row[p + 1] as i64);
            assert!(trow[l - 1] >= 1);
        }
        assert!(ps.contains(&0) && ps.len() > 40, "{ps:?}");
    }

    #[test]
    fn batches_are_seeded() {
        for t in Task::ALL {
            let a = t.batch(&mut Rng::new(5), 4);
            assert_eq!(a, t.batch(&mut Rng::new(5), 4));
            assert_ne!(a, t.batch(&mut Rng::new(6), 4));
            let mut r = Rng::new(5);
            let first = t.batch(&mut r, 4);
            assert_ne!(first, t.batch(&mut r, 4), "{t}: consecutive batches repeat");
            assert_eq!(t.name().parse::<Task>().unwrap(), t);
        }
        assert_eq!(
            "copying".parse::<Task>().unwrap_err().to_string(),
            "unknown task `copying`; expected one of: selective-copying, induction-heads"
        );
    }

    /// Trains `arch` (2 layers, d_model 64) on `task`; returns the validation accuracy after each
    /// evaluation. Slow: run with `cargo test -p mamba-train --release -- --ignored --nocapture`.
    fn train_task(arch: mamba_nn::config::Arch, task: Task, steps: u64) -> Vec<f32> {
        use crate::optim::{AdamW, AdamWConfig, LrSchedule, clip_grad_norm};
        use mamba_nn::config::MambaConfig;
        use mamba_nn::model::MambaLM;
        use mamba_nn::params::Grads;
        use mamba_nn::tape::Tape;
        use mamba_nn::tensor::data;

        let mut cfg = MambaConfig::mamba1(task.vocab_size(), 64, 2);
        cfg.arch = arch;
        let mut model = MambaLM::new(cfg, 0).unwrap();
        let mut grads = Grads::new(&model.params);
        let mut opt = AdamW::new(&model.params, AdamWConfig::default());
        // The cosine spans 3× the steps run, so the rate stays high (as in a longer run cut short).
        let sched = LrSchedule { max_lr: 3e-3, min_lr: 3e-4, warmup_steps: 50, total_steps: 3 * steps };
        let (mut rng, batch, l) = (Rng::new(1), 32, task.seq_len());
        let (vx, vy) = task.batch(&mut Rng::new(99), 256);
        let mut accs = Vec::new();
        let start = std::time::Instant::now();
        for step in 0..steps {
            let (x, y) = task.batch(&mut rng, batch);
            grads.zero();
            let mut tape = Tape::new(&model.params);
            let logits = model.forward(&mut tape, &x, batch, l);
            let loss = mamba_nn::ops::cross_entropy(&mut tape, logits, &y);
            let lv = data(tape.value(loss))[0];
            tape.backward(loss, &mut grads);
            clip_grad_norm(&model.params, &mut grads, 1.0);
            opt.step(&mut model.params, &grads, sched.lr(step));
            if (step + 1) % 100 == 0 || step + 1 == steps {
                let mut tape = Tape::inference(&model.params);
                let logits = model.forward(&mut tape, &vx, 256, l);
                let acc = accuracy(data(tape.value(logits)), &vy, task.vocab_size());
                eprintln!(
                    "{arch:?} {task} step {} loss {lv:.4} val acc {acc:.4} ({:.0}s)",
                    step + 1,
                    start.elapsed().as_secs_f32()
                );
                accs.push(acc);
            }
        }
        accs
    }

    /// The claim behind the selective-copying defaults: within the same 3000 steps (≈ 1.5 min
    /// each on 2 cores) Mamba passes 95 % validation accuracy and the LTI baseline does not.
    /// Measured with this test: Mamba 0.975 at step 1500, 0.995 at 2000, 0.9995 at 3000; LTI
    /// 0.73 at 2000, 0.79 at 3000 (and ≈ 0.89 after 6000 steps in a longer run).
    #[test]
    #[ignore = "trains two models for about 3 minutes"]
    fn mamba_learns_selective_copying_and_lti_does_not() {
        let steps = std::env::var("TASK_STEPS").ok().and_then(|s| s.parse().ok()).unwrap_or(3000);
        let best = |a: &[f32]| a.iter().copied().fold(0.0f32, f32::max);
        let mamba = train_task(mamba_nn::config::Arch::Mamba1, Task::SelectiveCopying, steps);
        assert!(best(&mamba) >= 0.95, "Mamba: {mamba:?}");
        let lti = train_task(mamba_nn::config::Arch::Lti, Task::SelectiveCopying, steps);
        assert!(best(&lti) < 0.95, "LTI: {lti:?}");
    }

    #[test]
    fn accuracy_counts_scored_argmax() {
        // 4 positions, vocab 3.
        let logits = [
            0.1, 0.9, 0.0, // argmax 1, target 1: hit
            5.0, 1.0, 2.0, // argmax 0, target 2: miss
            0.0, 0.0, 0.0, // ignored
            -1.0, -2.0, -0.5, // argmax 2, target 2: hit
        ];
        assert_eq!(accuracy(&logits, &[1, 2, IGNORE_INDEX, 2], 3), 2.0 / 3.0);
        assert_eq!(accuracy(&logits, &[1, 0, 0, 2], 3), 1.0);
        assert!(accuracy(&logits, &[IGNORE_INDEX; 4], 3).is_nan());
        // A perfect model for a generated batch scores 1.
        let task = Task::SelectiveCopying;
        let v = task.vocab_size();
        let (_, y) = task.batch(&mut Rng::new(1), 3);
        let mut perfect = vec![0.0f32; y.len() * v];
        for (i, &t) in y.iter().enumerate() {
            if t >= 0 {
                perfect[i * v + t as usize] = 1.0;
            }
        }
        assert_eq!(accuracy(&perfect, &y, v), 1.0);
    }
}
