//! Dims, inputs, outputs and gradient buffers of the causal depthwise conv.

use crate::check::{Layout, check_dims, check_len, check_opt_len};

/// Sizes of a causal depthwise conv.
///
/// `B` batch, `L` sequence length, `C` channels, `K` kernel width (`d_conv`, 4 in Mamba).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConvDims {
    /// `B`.
    pub batch: usize,
    /// `L`.
    pub seqlen: usize,
    /// `C`.
    pub channels: usize,
    /// `K` (at least 1).
    pub width: usize,
}

impl ConvDims {
    /// Dims `(B, L, C, K)`.
    pub fn new(batch: usize, seqlen: usize, channels: usize, width: usize) -> Self {
        Self { batch, seqlen, channels, width }
    }

    /// Panics unless `K ≥ 1`.
    #[track_caller]
    pub fn validate(&self, kernel: &str) {
        check_dims(kernel, self.width >= 1, "width must be at least 1");
    }

    pub(crate) fn blc(&self) -> Layout {
        Layout::new("(B, L, C)", &[self.batch, self.seqlen, self.channels])
    }

    pub(crate) fn ck(&self) -> Layout {
        Layout::new("(C, K)", &[self.channels, self.width])
    }

    pub(crate) fn c(&self) -> Layout {
        Layout::new("(C)", &[self.channels])
    }

    pub(crate) fn bck(&self) -> Layout {
        Layout::new("(B, C, K)", &[self.batch, self.channels, self.width])
    }

    pub(crate) fn bc(&self) -> Layout {
        Layout::new("(B, C)", &[self.batch, self.channels])
    }

    /// Elements of a (B, L, C) tensor.
    pub fn n_blc(&self) -> usize {
        self.batch * self.seqlen * self.channels
    }

    /// Elements of a (C, K) weight.
    pub fn n_ck(&self) -> usize {
        self.channels * self.width
    }

    /// Elements of a (B, C, K) conv state.
    pub fn n_bck(&self) -> usize {
        self.batch * self.channels * self.width
    }
}

/// Inputs of a causal depthwise conv. All tensors are row-major.
///
/// | field | layout |
/// |---|---|
/// | `x` | (B, L, C), channels last |
/// | `weight` | (C, K), PyTorch's `[C, 1, K]` with the middle axis squeezed |
/// | `bias` | (C), optional |
///
/// `y[b, t, c] = bias[c] + Σ_k weight[c, k] · x[b, t − (K−1) + k, c]` (x is zero before the
/// sequence start), then `y ← silu(y)` when `silu` is set.
///
/// **Resets** (packed documents): with `resets` (B, L), a position `t` with `resets[b, t]` set
/// starts a new sequence — `x` counts as zero before it for every output at `t` or later, as
/// `causal_conv1d`'s `seq_idx` does.
#[derive(Clone, Copy, Debug)]
pub struct ConvArgs<'a, T> {
    /// `x`, (B, L, C).
    pub x: &'a [T],
    /// Conv weight, (C, K).
    pub weight: &'a [T],
    /// Conv bias, (C).
    pub bias: Option<&'a [T]>,
    /// Apply SiLU to the output.
    pub silu: bool,
    /// Sequence starts, (B, L), optional.
    pub resets: Option<&'a [bool]>,
}

impl<'a, T> ConvArgs<'a, T> {
    /// Required inputs only: no bias, no SiLU.
    pub fn new(x: &'a [T], weight: &'a [T]) -> Self {
        Self { x, weight, bias: None, silu: false, resets: None }
    }

    /// Panics with a message naming the argument unless every length matches `dims`.
    #[track_caller]
    pub fn check(&self, kernel: &str, dims: &ConvDims) {
        dims.validate(kernel);
        check_len(kernel, "x", dims.blc(), self.x.len(), dims.n_blc());
        check_len(kernel, "weight", dims.ck(), self.weight.len(), dims.n_ck());
        check_opt_len(kernel, "bias", dims.c(), self.bias, dims.channels);
        let bl = Layout::new("(B, L)", &[dims.batch, dims.seqlen]);
        check_opt_len(kernel, "resets", bl, self.resets, dims.batch * dims.seqlen);
    }
}

/// Output buffers of a conv forward.
#[derive(Debug)]
pub struct ConvOut<'a, T> {
    /// `y`, (B, L, C) (overwritten).
    pub y: &'a mut [T],
    /// The conv state after this prefill, (B, C, K) (overwritten), optional: the last `K` inputs
    /// `x[b, L−K .. L, c]` of every channel, oldest first, zero for positions before the sequence
    /// start. It is the `state` that [`conv1d_step`](super::conv1d_step) continues from.
    pub state_out: Option<&'a mut [T]>,
}

impl<T> ConvOut<'_, T> {
    /// Panics with a message naming the argument unless every length matches `dims`.
    #[track_caller]
    pub fn check(&self, kernel: &str, dims: &ConvDims) {
        check_len(kernel, "y", dims.blc(), self.y.len(), dims.n_blc());
        check_opt_len(kernel, "state_out", dims.bck(), self.state_out.as_deref(), dims.n_bck());
    }
}

/// Gradient buffers of a conv. The backward **adds** into every buffer (`+=`), so the caller
/// zeroes them or accumulates across calls. An absent `dbias` skips that gradient, and so does an
/// absent `args.bias` (as in every kernel of this crate: no input, no gradient).
#[derive(Debug)]
pub struct ConvGrads<'a, T> {
    /// d`x`, (B, L, C).
    pub dx: &'a mut [T],
    /// d`weight`, (C, K).
    pub dweight: &'a mut [T],
    /// d`bias`, (C).
    pub dbias: Option<&'a mut [T]>,
}

impl<T> ConvGrads<'_, T> {
    /// Panics with a message naming the argument unless every length matches `dims`.
    #[track_caller]
    pub fn check(&self, kernel: &str, dims: &ConvDims) {
        check_len(kernel, "dx", dims.blc(), self.dx.len(), dims.n_blc());
        check_len(kernel, "dweight", dims.ck(), self.dweight.len(), dims.n_ck());
        check_opt_len(kernel, "dbias", dims.c(), self.dbias.as_deref(), dims.channels);
    }
}

/// Checks the upstream gradient of a backward call: `dy` (B, L, C).
#[track_caller]
pub fn check_upstream<T>(kernel: &str, dims: &ConvDims, dy: &[T]) {
    check_len(kernel, "dy", dims.blc(), dy.len(), dims.n_blc());
}

/// Checks the arguments of a step: `dims.seqlen == 1`, `args` as usual (`x` is then (B, C)),
/// `state` (B, C, K) and `y` (B, C).
#[track_caller]
pub fn check_step<T>(kernel: &str, dims: &ConvDims, args: &ConvArgs<T>, state: &[T], y: &[T]) {
    check_dims(kernel, dims.seqlen == 1, "a step takes seqlen 1");
    args.check(kernel, dims);
    check_len(kernel, "state", dims.bck(), state.len(), dims.n_bck());
    check_len(kernel, "y", dims.bc(), y.len(), dims.batch * dims.channels);
}
