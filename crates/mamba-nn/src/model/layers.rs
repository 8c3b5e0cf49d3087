//! The small layers the blocks are made of — [`Linear`], [`Conv1d`], [`RmsNorm`], [`Embedding`] —
//! each with its tape forward and its few-rows decode form side by side.

use ssm_kernel::conv::{ConvArgs, ConvDims, conv1d_step};

use super::builder::{Init, ParamBuilder};
use super::lora::Lora;
use super::mixer::SeqLayout;
use crate::checkpoint::CheckpointError;
use crate::ops;
use crate::params::{ParamId, ParamStore, Weight};
use crate::tape::{Tape, Var};
use crate::tensor::data;
use ssm_kernel::qweight::{QMATVEC_MAX_ROWS, qlinear, qmatvec_f32};

/// `y = x Wᵀ (+ b)` with `weight` (out, in) and `bias` (out) — PyTorch's `nn.Linear` — plus,
/// when a LoRA adapter is attached, `scale · (x Aᵀ) Bᵀ` ([`Lora`]).
#[derive(Clone, Copy, Debug)]
pub struct Linear {
    /// `weight`, (out, in).
    pub weight: ParamId,
    /// `bias`, (out).
    pub bias: Option<ParamId>,
    /// Input features.
    pub d_in: usize,
    /// Output features.
    pub d_out: usize,
    /// A low-rank adapter added to the product, if any ([`MambaLM::add_lora`](super::MambaLM::add_lora)).
    pub lora: Option<Lora>,
}

impl Linear {
    /// Registers `weight` (out, in) with `init` and, when `bias`, a zero `bias` (out).
    pub fn new(
        b: &mut ParamBuilder,
        (d_out, d_in): (usize, usize),
        bias: bool,
        init: Init,
    ) -> Result<Self, CheckpointError> {
        let weight = b.matrix("weight", &[d_out, d_in], init)?;
        let bias = if bias { Some(b.param("bias", &[d_out], Init::Const(0.0))?) } else { None };
        Ok(Self { weight, bias, d_in, d_out, lora: None })
    }

    /// PyTorch's default `Linear`: weight and bias both U(±1/√in).
    pub fn torch_default(
        b: &mut ParamBuilder,
        (d_out, d_in): (usize, usize),
    ) -> Result<Self, CheckpointError> {
        let init = Init::Kaiming { fan_in: d_in, scale: 1.0 };
        let weight = b.matrix("weight", &[d_out, d_in], init)?;
        let bias = Some(b.param("bias", &[d_out], init)?);
        Ok(Self { weight, bias, d_in, d_out, lora: None })
    }

    /// `x` (…, in) → (…, out) on the tape.
    pub fn forward(&self, tape: &mut Tape, x: Var) -> Var {
        let w = tape.param(self.weight);
        let b = self.bias.map(|b| tape.param(b));
        match &self.lora {
            Some(l) => {
                let (a, bm) = (tape.param(l.a), tape.param(l.b));
                ops::linear_lora(tape, x, w, b, a, bm, l.scale)
            }
            None => ops::linear(tape, x, w, b),
        }
    }

    /// Outputs `rows` of [`Linear::forward`], (…, rows.len()), on the tape without computing
    /// the others ([`ops::linear_rows`]). With an adapter the whole product is taken and the
    /// block cut out of it.
    pub fn forward_rows(&self, tape: &mut Tape, x: Var, rows: std::ops::Range<usize>) -> Var {
        if self.lora.is_some() {
            let y = self.forward(tape, x);
            return ops::narrow_last(tape, y, rows.start, rows.len());
        }
        let w = tape.param(self.weight);
        let b = self.bias.map(|b| tape.param(b));
        ops::linear_rows(tape, x, w, b, rows)
    }

    /// Decode: `out` (m, out) = `x` (m, in) · Wᵀ (+ b) for a few rows `m`, reading each weight
    /// once for all rows, from the f32 or the packed weight.
    pub fn step(&self, p: &ParamStore, x: &[f32], m: usize, out: &mut [f32]) {
        self.rows(p, x, m, out);
    }

    /// `out` (m, out) = `x` (m, in) · Wᵀ (+ b) for any number of rows — the few-row product for
    /// decode, the multi-threaded GEMM for a prefill chunk — from the f32 or the packed weight.
    /// An unmerged adapter adds its term (allocating its (m, rank) intermediate); serving merges
    /// adapters into the weights instead ([`MambaLM::merge_lora`](super::MambaLM::merge_lora)).
    pub fn rows(&self, p: &ParamStore, x: &[f32], m: usize, out: &mut [f32]) {
        self.base_rows(p, x, m, out);
        if let Some(lora) = &self.lora {
            lora.add_rows(p, x, m, self.d_in, &mut out[..m * self.d_out]);
        }
    }

    /// [`Linear::rows`] without the adapter.
    fn base_rows(&self, p: &ParamStore, x: &[f32], m: usize, out: &mut [f32]) {
        let (k, n) = (self.d_in, self.d_out);
        let out = &mut out[..m * n];
        let b = self.bias.map(|b| data(p.value(b)));
        match p.weight(self.weight) {
            Weight::Packed(q) => qlinear(x, q, b, m, out),
            Weight::F32(w) => {
                if m <= QMATVEC_MAX_ROWS {
                    qmatvec_f32(x, w, (m, k, n), out);
                } else {
                    ssm_kernel::gemm::gemm_par((m, k, n), 1.0, x, (k, 1), w, (1, k), 0.0, out, (n, 1));
                }
                if let Some(b) = b {
                    out.chunks_exact_mut(n).for_each(|row| row.iter_mut().zip(b).for_each(|(o, v)| *o += v));
                }
            }
        }
    }
}

/// The causal depthwise convolution with SiLU, `conv1d.weight` (C, 1, K) and `conv1d.bias` (C).
#[derive(Clone, Copy, Debug)]
pub struct Conv1d {
    /// `weight`, (C, 1, K).
    pub weight: ParamId,
    /// `bias`, (C).
    pub bias: Option<ParamId>,
    /// Channels `C`.
    pub channels: usize,
    /// Width `K`.
    pub width: usize,
}

impl Conv1d {
    /// Registers `weight` (C, 1, K) and, when `bias`, `bias` (C), both U(±1/√K).
    pub fn new(
        b: &mut ParamBuilder,
        channels: usize,
        width: usize,
        bias: bool,
    ) -> Result<Self, CheckpointError> {
        let init = Init::Kaiming { fan_in: width, scale: 1.0 };
        let weight = b.param("weight", &[channels, 1, width], init)?;
        let bias = if bias { Some(b.param("bias", &[channels], init)?) } else { None };
        Ok(Self { weight, bias, channels, width })
    }

    /// `silu(conv(x))` for `x` (B, L, C) on the tape, restarting at the document starts of
    /// `seq` (B, L), continuing from its initial conv state (B, C, K) and back-propagating its
    /// final conv state's gradient, when given.
    pub fn forward(&self, tape: &mut Tape, x: Var, seq: &SeqLayout) -> Var {
        let w = tape.param(self.weight);
        let b = self.bias.map(|b| tape.param(b));
        let dstate_last = seq.final_grad.as_ref().map(|g| g.conv.clone());
        ops::conv1d(tape, x, w, b, true, seq.resets.as_ref(), seq.init.map(|i| i.conv), dstate_last)
    }

    /// Decode: one time step `x` (B, C) → `out` (B, C), rolling `state` (B, C, K) (the last K
    /// inputs, oldest first).
    pub fn step(&self, p: &ParamStore, x: &[f32], batch: usize, state: &mut [f32], out: &mut [f32]) {
        let dims = ConvDims::new(batch, 1, self.channels, self.width);
        let args = ConvArgs {
            x,
            weight: data(p.value(self.weight)),
            bias: self.bias.map(|b| data(p.value(b))),
            silu: true,
            resets: None,
        };
        conv1d_step(&dims, &args, state, out);
    }
}

impl Conv1d {
    /// Prefill: `x` (B, L, C) — the chunk's conv inputs — → `out` (B, L, C), the `K − 1` inputs
    /// before the chunk taken from `state` (B, C, K), which is left holding the last `K`.
    pub fn prefill(&self, p: &ParamStore, x: &[f32], batch: usize, state: &mut [f32], out: &mut [f32]) {
        let l = x.len() / (batch * self.channels).max(1);
        let dims = ConvDims::new(batch, l, self.channels, self.width);
        let args = ConvArgs {
            x,
            weight: data(p.value(self.weight)),
            bias: self.bias.map(|b| data(p.value(b))),
            silu: true,
            resets: None,
        };
        ssm_kernel::conv::conv1d_chunk(&dims, &args, state, out);
    }
}

/// RMSNorm over the last dimension, `x · rsqrt(mean(x²) + eps) · weight`.
#[derive(Clone, Copy, Debug)]
pub struct RmsNorm {
    /// `weight`, (d).
    pub weight: ParamId,
    /// Epsilon.
    pub eps: f32,
}

impl RmsNorm {
    /// Registers `weight` (d), initialised to ones.
    pub fn new(b: &mut ParamBuilder, d: usize, eps: f32) -> Result<Self, CheckpointError> {
        Ok(Self { weight: b.param("weight", &[d], Init::Const(1.0))?, eps })
    }

    /// `x` (…, d) normalised, on the tape.
    pub fn forward(&self, tape: &mut Tape, x: Var) -> Var {
        let w = tape.param(self.weight);
        ops::rms_norm(tape, x, w, self.eps)
    }

    /// Decode: rows of `x` (m, d) → `out` (m, d).
    pub fn step(&self, p: &ParamStore, x: &[f32], out: &mut [f32]) {
        let w = data(p.value(self.weight));
        ssm_kernel::norm::rms_rows(x, w, w.len(), self.eps, out);
    }
}

/// Token embedding, `weight` (V, d) drawn N(0, 0.02²).
#[derive(Clone, Copy, Debug)]
pub struct Embedding {
    /// `weight`, (V, d).
    pub weight: ParamId,
    /// Vocabulary size `V`.
    pub vocab: usize,
    /// Width `d`.
    pub dim: usize,
    /// A LoRA adapter on the lookup, if any: `a` holds Aᵀ (V, r), `b` is B (d, r).
    pub lora: Option<Lora>,
}

impl Embedding {
    /// Registers `weight` (V, d).
    pub fn new(b: &mut ParamBuilder, vocab: usize, dim: usize) -> Result<Self, CheckpointError> {
        Ok(Self { weight: b.matrix("weight", &[vocab, dim], Init::Normal(0.02))?, vocab, dim, lora: None })
    }

    /// Rows of `weight` for token ids `ids` laid out as `shape` → (shape…, d), on the tape.
    pub fn forward(&self, tape: &mut Tape, ids: &[usize], shape: &[usize]) -> Var {
        let w = tape.param(self.weight);
        let e = ops::embedding(tape, ids, shape, w);
        match &self.lora {
            Some(l) => {
                let (at, b) = (tape.param(l.a), tape.param(l.b));
                let t = ops::embedding(tape, ids, shape, at);
                let t = ops::scale(tape, t, l.scale);
                let u = ops::linear(tape, t, b, None);
                ops::add(tape, e, u)
            }
            None => e,
        }
    }

    /// Decode: copies the rows of `ids` into `out` (len(ids), d), plus the adapter's term.
    ///
    /// # Panics
    /// If an id is outside the vocabulary.
    #[track_caller]
    pub fn step(&self, p: &ParamStore, ids: &[usize], out: &mut [f32]) {
        let d = self.dim;
        let w = p.weight(self.weight);
        for (b, &id) in ids.iter().enumerate() {
            assert!(
                id < self.vocab,
                "embedding: token id {id} is outside the vocabulary (size {})",
                self.vocab
            );
            let row = &mut out[b * d..(b + 1) * d];
            match w {
                Weight::F32(w) => row.copy_from_slice(&w[id * d..(id + 1) * d]),
                Weight::Packed(q) => q.dequantize_row(id, row),
            }
            if let Some(l) = &self.lora {
                let (at, b, r) = (data(p.value(l.a)), data(p.value(l.b)), l.rank);
                let t = &at[id * r..(id + 1) * r];
                for (o, brow) in row.iter_mut().zip(b.chunks_exact(r)) {
                    *o += l.scale * brow.iter().zip(t).map(|(x, y)| x * y).sum::<f32>();
                }
            }
        }
    }
}
