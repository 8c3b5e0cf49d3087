//! AdamW with decoupled weight decay, global gradient-norm clipping, and the warmup + cosine
//! learning-rate schedule.
//!
//! The update follows PyTorch's `torch.optim.AdamW` (non-`amsgrad`, non-fused) term for term, so a
//! run can be compared with a PyTorch one:
//!
//! ```text
//! t      ← t + 1
//! p      ← p · (1 − lr·wd)                      only if the parameter has `decay == true`
//! m      ← β₁·m + (1 − β₁)·g
//! v      ← β₂·v + (1 − β₂)·g²
//! p      ← p − (lr / (1 − β₁ᵗ)) · m / (√v / √(1 − β₂ᵗ) + ε)
//! ```
//!
//! The bias corrections are computed in f64 and rounded to f32 once per step.
//!
//! ```
//! use mamba_nn::params::{Grads, ParamStore};
//! use mamba_nn::tensor::from_vec;
//! use mamba_train::optim::{AdamW, AdamWConfig};
//!
//! let mut store = ParamStore::new();
//! let w = store.add("w", from_vec(&[1], vec![1.0]), false);
//! let mut grads = Grads::new(&store);
//! grads.get_mut(w).fill(0.5);
//! let mut opt = AdamW::new(&store, AdamWConfig::default());
//! opt.step(&mut store, &grads, 0.1);
//! // The first bias-corrected step moves by lr·sign(g) (up to ε).
//! assert!((store.value(w)[[0]] - 0.9).abs() < 1e-6);
//! ```

use mamba_nn::checkpoint::{CheckpointError, TensorFile};
use mamba_nn::params::{Grads, ParamId, ParamStore};
use mamba_nn::tensor::{Tensor, data, data_mut, zeros};

/// AdamW hyper-parameters (defaults: the Mamba paper's language-model recipe, β = (0.9, 0.95),
/// weight decay 0.1).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamWConfig {
    /// Peak learning rate. [`AdamW::step`] takes the learning rate of each step explicitly (from an
    /// [`LrSchedule`]); this field records the configured peak. Default `1e-3`.
    pub lr: f32,
    /// Decay of the first moment. Default `0.9`.
    pub beta1: f32,
    /// Decay of the second moment. Default `0.95`.
    pub beta2: f32,
    /// Added to the denominator. Default `1e-8`.
    pub eps: f32,
    /// Decoupled weight decay, applied as `p -= lr·wd·p` to parameters with `decay == true`.
    /// Default `0.1`.
    pub weight_decay: f32,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        Self { lr: 1e-3, beta1: 0.9, beta2: 0.95, eps: 1e-8, weight_decay: 0.1 }
    }
}

/// AdamW optimiser state: one first-moment and one second-moment tensor per parameter, allocated
/// once in [`AdamW::new`], and the number of steps taken.
#[derive(Clone, Debug)]
pub struct AdamW {
    /// Hyper-parameters.
    pub config: AdamWConfig,
    /// The parameters this optimiser was built for, in store order.
    ids: Vec<ParamId>,
    /// Their names (for checkpoints and error messages).
    names: Vec<String>,
    /// First moments `m`, shaped like each parameter.
    exp_avg: Vec<Tensor>,
    /// Second moments `v`, shaped like each parameter.
    exp_avg_sq: Vec<Tensor>,
    /// Steps taken.
    step: u64,
}

impl AdamW {
    /// Zero moments for every trainable parameter of `store` (frozen ones get none), step count 0.
    pub fn new(store: &ParamStore, config: AdamWConfig) -> Self {
        let mut ids = Vec::with_capacity(store.len());
        let mut names = Vec::with_capacity(store.len());
        let mut exp_avg = Vec::with_capacity(store.len());
        let mut exp_avg_sq = Vec::with_capacity(store.len());
        for (id, p) in store.trainable() {
            ids.push(id);
            names.push(p.name.clone());
            exp_avg.push(zeros(p.value.shape()));
            exp_avg_sq.push(zeros(p.value.shape()));
        }
        Self { config, ids, names, exp_avg, exp_avg_sq, step: 0 }
    }

    /// Steps taken so far (the `t` of the bias corrections of the last step).
    pub fn step_count(&self) -> u64 {
        self.step
    }

    /// One AdamW update of every parameter of `store` with learning rate `lr` (see the module
    /// docs for the formula). Allocates nothing.
    ///
    /// # Panics
    /// If `store` or `grads` do not match the store this optimiser was built for (a different
    /// number of parameters, or a parameter whose shape changed).
    #[track_caller]
    pub fn step(&mut self, store: &mut ParamStore, grads: &Grads, lr: f32) {
        let trainable = store.trainable().count();
        assert_eq!(
            trainable,
            self.ids.len(),
            "AdamW::step: the store has {trainable} trainable parameters, the optimiser was built for {}",
            self.ids.len()
        );
        self.step += 1;
        let AdamWConfig { beta1, beta2, eps, weight_decay, .. } = self.config;
        let t = self.step as i32;
        let bc1 = 1.0 - (beta1 as f64).powi(t);
        let bc2 = 1.0 - (beta2 as f64).powi(t);
        let step_size = (lr as f64 / bc1) as f32;
        let bc2_sqrt = bc2.sqrt() as f32;
        let decay_factor = 1.0 - lr * weight_decay;
        let (one_m_b1, one_m_b2) = (1.0 - beta1, 1.0 - beta2);
        for (i, &id) in self.ids.iter().enumerate() {
            let g = grads.get(id);
            let param = store.get(id);
            let decay = param.decay;
            assert!(
                param.value.shape() == self.exp_avg[i].shape() && g.shape() == self.exp_avg[i].shape(),
                "AdamW::step: parameter `{}` has shape {:?} and gradient {:?}, the optimiser holds {:?}",
                self.names[i],
                param.value.shape(),
                g.shape(),
                self.exp_avg[i].shape()
            );
            let g = data(g);
            let p = data_mut(store.value_mut(id));
            let m = data_mut(&mut self.exp_avg[i]);
            let v = data_mut(&mut self.exp_avg_sq[i]);
            for j in 0..p.len() {
                let gj = g[j];
                let mut pj = p[j];
                if decay {
                    pj *= decay_factor;
                }
                let mj = beta1 * m[j] + one_m_b1 * gj;
                let vj = beta2 * v[j] + one_m_b2 * gj * gj;
                m[j] = mj;
                v[j] = vj;
                p[j] = pj - step_size * mj / (vj.sqrt() / bc2_sqrt + eps);
            }
        }
    }

    /// The optimiser's tensors for a checkpoint: `exp_avg.<param name>` then
    /// `exp_avg_sq.<param name>` for every parameter, in store order. Save the step count
    /// alongside (e.g. in the file's metadata) and pass it to [`AdamW::load_state`].
    pub fn state(&self) -> Vec<(String, &Tensor)> {
        let m = self.names.iter().zip(&self.exp_avg).map(|(n, t)| (format!("exp_avg.{n}"), t));
        let v = self.names.iter().zip(&self.exp_avg_sq).map(|(n, t)| (format!("exp_avg_sq.{n}"), t));
        m.chain(v).collect()
    }

    /// Restores the moments written by [`AdamW::state`] from `file` and sets the step count to
    /// `step`, so the next [`AdamW::step`] is bit for bit the one the saved run would have taken.
    ///
    /// Every moment must be present with its parameter's shape; on error the optimiser is left
    /// unchanged.
    pub fn load_state(&mut self, file: &TensorFile, step: u64) -> Result<(), CheckpointError> {
        let mut m = Vec::with_capacity(self.names.len());
        let mut v = Vec::with_capacity(self.names.len());
        for (i, n) in self.names.iter().enumerate() {
            m.push(file.f32_shaped(&format!("exp_avg.{n}"), self.exp_avg[i].shape())?);
            v.push(file.f32_shaped(&format!("exp_avg_sq.{n}"), self.exp_avg_sq[i].shape())?);
        }
        self.exp_avg = m;
        self.exp_avg_sq = v;
        self.step = step;
        Ok(())
    }
}

/// Scales every gradient in place so that their global L2 norm is at most `max_norm`, and returns
/// the norm before clipping.
///
/// The norm `√(Σ g²)` over the gradients of `store`'s trainable parameters is accumulated in
/// f64. When it exceeds `max_norm`, every gradient is multiplied by `max_norm / norm` (as
/// PyTorch's `clip_grad_norm_`, without its `1e-6` in the denominator). A non-finite norm (NaN or ∞) is
/// returned as is and nothing is scaled, so the caller can detect it and skip the step.
///
/// `store` supplies the parameter ids: [`Grads`] exposes its tensors only by [`ParamId`].
pub fn clip_grad_norm(store: &ParamStore, grads: &mut Grads, max_norm: f32) -> f32 {
    let mut sum = 0.0f64;
    for (id, _) in store.trainable() {
        sum += data(grads.get(id)).iter().map(|&g| (g as f64) * (g as f64)).sum::<f64>();
    }
    let norm = sum.sqrt();
    if norm.is_finite() && norm > max_norm as f64 {
        let scale = (max_norm as f64 / norm) as f32;
        for (id, _) in store.trainable() {
            data_mut(grads.get_mut(id)).iter_mut().for_each(|g| *g *= scale);
        }
    }
    norm as f32
}

/// Linear warmup then cosine decay.
///
/// ```text
/// lr(s) = max_lr · (s + 1) / warmup_steps                                  s < warmup_steps
/// lr(s) = min_lr + ½ (max_lr − min_lr) (1 + cos(π (s − warmup) / (total − warmup)))
///                                                                          warmup ≤ s < total
/// lr(s) = min_lr                                                           s ≥ total_steps
/// ```
///
/// Steps count from 0, so the first step already trains (`max_lr / warmup_steps`) and the last
/// warmup step reaches `max_lr`; the cosine starts at `max_lr` and reaches `min_lr` at
/// `total_steps`. With `warmup_steps == 0` there is no warmup.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LrSchedule {
    /// Peak learning rate, reached at the end of warmup.
    pub max_lr: f32,
    /// Final learning rate, from `total_steps` on.
    pub min_lr: f32,
    /// Steps of linear warmup.
    pub warmup_steps: u64,
    /// Step at which the cosine reaches `min_lr`.
    pub total_steps: u64,
}

impl LrSchedule {
    /// The learning rate of step `step` (counted from 0).
    pub fn lr(&self, step: u64) -> f32 {
        if step < self.warmup_steps {
            return (self.max_lr as f64 * (step + 1) as f64 / self.warmup_steps as f64) as f32;
        }
        if step >= self.total_steps {
            return self.min_lr;
        }
        let progress = (step - self.warmup_steps) as f64 / (self.total_steps - self.warmup_steps) as f64;
        let (max, min) = (self.max_lr as f64, self.min_lr as f64);
        (min + 0.5 * (max - min) * (1.0 + (std::f64::consts::PI * progress).cos())) as f32
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mamba_nn::checkpoint::write_tensors;
    use mamba_nn::tensor::from_vec;

    fn tiny() -> (ParamStore, ParamId, ParamId) {
        let mut s = ParamStore::new();
        let w = s.add("layer.weight", from_vec(&[2], vec![1.0, -2.0]), true);
        let b = s.add("layer.bias", from_vec(&[1], vec![0.5]), false);
        (s, w, b)
    }

    /// The update written out in f64 for one scalar, for comparison.
    fn reference(p: f64, m: f64, v: f64, g: f64, t: i32, lr: f64, decay: bool) -> (f64, f64, f64) {
        let (b1, b2, eps, wd) = (0.9f64, 0.95f64, 1e-8f64, 0.1f64);
        let p = if decay { p * (1.0 - lr * wd) } else { p };
        let m = b1 * m + (1.0 - b1) * g;
        let v = b2 * v + (1.0 - b2) * g * g;
        let mhat = m / (1.0 - b1.powi(t));
        let vhat = v / (1.0 - b2.powi(t));
        (p - lr * mhat / (vhat.sqrt() + eps), m, v)
    }

    #[test]
    fn two_steps_match_hand_computation() {
        let (mut s, w, b) = tiny();
        let mut grads = Grads::new(&s);
        let mut opt = AdamW::new(&s, AdamWConfig::default());
        let gs = [[0.3f32, -0.1, 2.0], [-0.2, 0.4, 1.0]];
        let lrs = [0.01f32, 0.005];
        let mut expect = [(1.0f64, 0.0, 0.0, true), (-2.0, 0.0, 0.0, true), (0.5, 0.0, 0.0, false)];
        for step in 0..2 {
            data_mut(grads.get_mut(w)).copy_from_slice(&gs[step][..2]);
            data_mut(grads.get_mut(b)).copy_from_slice(&gs[step][2..]);
            opt.step(&mut s, &grads, lrs[step]);
            for (k, e) in expect.iter_mut().enumerate() {
                let (p, m, v) =
                    reference(e.0, e.1, e.2, gs[step][k] as f64, step as i32 + 1, lrs[step] as f64, e.3);
                *e = (p, m, v, e.3);
            }
            let got = [s.value(w)[[0]], s.value(w)[[1]], s.value(b)[[0]]];
            for k in 0..3 {
                assert!((got[k] as f64 - expect[k].0).abs() < 1e-6, "step {step} param {k}: {got:?}");
            }
        }
        assert_eq!(opt.step_count(), 2);
        // Hand-computed first step of the no-decay bias: lr·sign(g) exactly (up to ε), and of the
        // decayed weight 1.0: 1.0·(1 − 0.01·0.1) − 0.01. The second step is in `expect`.
        let (p1, _, _) = reference(0.5, 0.0, 0.0, 2.0, 1, 0.01, false);
        assert!((p1 - 0.49).abs() < 1e-9);
        let (p1, _, _) = reference(1.0, 0.0, 0.0, 0.3, 1, 0.01, true);
        assert!((p1 - (0.999 - 0.01)).abs() < 1e-9);
        // Decay matters: the decayed weights differ from a no-decay run with the same gradients.
        let (mut s2, w2, _) = tiny();
        let mut opt2 = AdamW::new(&s2, AdamWConfig { weight_decay: 0.0, ..AdamWConfig::default() });
        for step in 0..2 {
            let mut g2 = Grads::new(&s2);
            data_mut(g2.get_mut(w2)).copy_from_slice(&gs[step][..2]);
            opt2.step(&mut s2, &g2, lrs[step]);
        }
        assert!((s2.value(w2)[[0]] - s.value(w)[[0]]).abs() > 1e-5);
    }

    #[test]
    fn drives_a_quadratic_to_its_minimum() {
        // f(p) = Σ c_i (p_i − t_i)², gradient 2 c_i (p_i − t_i); no decay so the minimum is t.
        let target = [3.0f32, -1.0, 0.25, 10.0];
        let curv = [1.0f32, 10.0, 0.1, 2.0];
        let mut s = ParamStore::new();
        let id = s.add("x", from_vec(&[4], vec![0.0; 4]), false);
        let mut grads = Grads::new(&s);
        let mut opt = AdamW::new(&s, AdamWConfig::default());
        let sched = LrSchedule { max_lr: 0.1, min_lr: 1e-4, warmup_steps: 10, total_steps: 3000 };
        for step in 0..3000 {
            let x = data(s.value(id)).to_vec();
            let g = data_mut(grads.get_mut(id));
            for i in 0..4 {
                g[i] = 2.0 * curv[i] * (x[i] - target[i]);
            }
            opt.step(&mut s, &grads, sched.lr(step));
        }
        for i in 0..4 {
            assert!((s.value(id)[[i]] - target[i]).abs() < 1e-2, "{:?}", s.value(id));
        }
    }

    #[test]
    fn resume_is_bit_exact() {
        let (mut s, w, b) = tiny();
        let mut grads = Grads::new(&s);
        let mut opt = AdamW::new(&s, AdamWConfig::default());
        let set = |grads: &mut Grads, k: f32| {
            data_mut(grads.get_mut(w)).copy_from_slice(&[0.3 * k, -0.7 + k]);
            data_mut(grads.get_mut(b)).copy_from_slice(&[1.0 / k]);
        };
        for k in 1..4 {
            set(&mut grads, k as f32);
            opt.step(&mut s, &grads, 0.01);
        }
        let dir = std::env::temp_dir().join(format!("mamba-train-optim-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("optim.safetensors");
        let names: Vec<String> = opt.state().into_iter().map(|(n, _)| n).collect();
        assert_eq!(
            names,
            [
                "exp_avg.layer.weight",
                "exp_avg.layer.bias",
                "exp_avg_sq.layer.weight",
                "exp_avg_sq.layer.bias"
            ]
        );
        write_tensors(&path, opt.state(), None).unwrap();
        let file = TensorFile::open(&path).unwrap();

        let mut s2 = s.clone();
        let mut fresh = AdamW::new(&s2, AdamWConfig::default());
        fresh.load_state(&file, opt.step_count()).unwrap();
        assert_eq!(fresh.step_count(), 3);
        set(&mut grads, 4.0);
        opt.step(&mut s, &grads, 0.01);
        fresh.step(&mut s2, &grads, 0.01);
        for (id, p) in s.iter() {
            let a: Vec<u32> = data(&p.value).iter().map(|x| x.to_bits()).collect();
            let b: Vec<u32> = data(s2.value(id)).iter().map(|x| x.to_bits()).collect();
            assert_eq!(a, b, "{}", p.name);
        }

        // A moment of the wrong shape is refused, naming the tensor and both shapes.
        let mut other = ParamStore::new();
        other.add("layer.weight", from_vec(&[3], vec![0.0; 3]), true);
        other.add("layer.bias", from_vec(&[1], vec![0.0]), false);
        let mut wrong = AdamW::new(&other, AdamWConfig::default());
        let e = wrong.load_state(&file, 3).unwrap_err().to_string();
        assert_eq!(
            e,
            format!("{}: tensor `exp_avg.layer.weight` has shape [2], expected [3]", path.display())
        );
        assert_eq!(wrong.step_count(), 0);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn clip_scales_only_above_max_and_returns_pre_clip_norm() {
        let (s, w, b) = tiny();
        let mut grads = Grads::new(&s);
        data_mut(grads.get_mut(w)).copy_from_slice(&[3.0, 0.0]);
        data_mut(grads.get_mut(b)).copy_from_slice(&[4.0]);
        assert_eq!(clip_grad_norm(&s, &mut grads, 10.0), 5.0);
        assert_eq!(data(grads.get(w)), &[3.0, 0.0]);
        assert_eq!(clip_grad_norm(&s, &mut grads, 1.0), 5.0);
        assert!((data(grads.get(w))[0] - 0.6).abs() < 1e-7);
        assert!((data(grads.get(b))[0] - 0.8).abs() < 1e-7);
        assert!((clip_grad_norm(&s, &mut grads, 1.0) - 1.0).abs() < 1e-6);
        // Large values: the f64 sum does not overflow where an f32 one would.
        data_mut(grads.get_mut(w)).copy_from_slice(&[3e20, 0.0]);
        data_mut(grads.get_mut(b)).copy_from_slice(&[4e20]);
        let n = clip_grad_norm(&s, &mut grads, 1.0);
        assert!((n / 5e20 - 1.0).abs() < 1e-6, "{n}");
        // Non-finite: returned as is, nothing scaled.
        data_mut(grads.get_mut(w)).copy_from_slice(&[f32::NAN, 2.0]);
        assert!(clip_grad_norm(&s, &mut grads, 1.0).is_nan());
        assert_eq!(data(grads.get(w))[1], 2.0);
        data_mut(grads.get_mut(w)).copy_from_slice(&[f32::INFINITY, 2.0]);
        assert_eq!(clip_grad_norm(&s, &mut grads, 1.0), f32::INFINITY);
        assert_eq!(data(grads.get(w))[1], 2.0);
    }

    #[test]
    fn schedule_endpoints_and_monotonicity() {
        let s = LrSchedule { max_lr: 1e-3, min_lr: 1e-5, warmup_steps: 100, total_steps: 1000 };
        assert!((s.lr(0) - 1e-5).abs() < 1e-12);
        assert_eq!(s.lr(99), 1e-3);
        assert_eq!(s.lr(100), 1e-3);
        assert!((s.lr(550) - (1e-5 + 0.5 * (1e-3 - 1e-5))).abs() < 1e-9);
        assert_eq!(s.lr(1000), 1e-5);
        assert_eq!(s.lr(5000), 1e-5);
        for t in 0..99 {
            assert!(s.lr(t + 1) > s.lr(t), "warmup not increasing at {t}");
        }
        for t in 100..1100 {
            assert!(s.lr(t + 1) <= s.lr(t), "decay not monotone at {t}");
        }
        assert!(s.lr(999) > 1e-5 && s.lr(999) < 1.001e-5);
        let no_warmup = LrSchedule { warmup_steps: 0, ..s };
        assert_eq!(no_warmup.lr(0), 1e-3);
    }
}
