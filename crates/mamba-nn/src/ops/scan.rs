//! The selective scans of Mamba-1 and Mamba-2 as single tape nodes, on
//! [`ssm_kernel::mamba1`] and [`ssm_kernel::mamba2`].
//!
//! Both take `A_log` and form `A = −exp(A_log)` inside, so the parameter gradient is
//! `dA_log = dA ⊙ A`. Their inputs are argument structs in the kernels' style: the required
//! `Var`s in `new(..)`, the optional ones as builder methods (or public fields):
//!
//! ```no_run
//! # use mamba_nn::ops::{Scan1Vars, selective_scan1};
//! # fn f(tape: &mut mamba_nn::tape::Tape, [u, dt, a_log, b, c, d, z, bias]: [mamba_nn::tape::Var; 8]) {
//! let args = Scan1Vars::new(u, dt, a_log, b, c).with_d(d).with_z(z).with_delta_bias(bias).with_delta_softplus(true);
//! let y = selective_scan1(tape, args);
//! # }
//! ```
//!
//! Memory policy: the Mamba-1 node keeps the forward's chunk checkpoints ((B, ⌈L/32⌉, D, N)
//! states) so its backward skips a forward pass; the Mamba-2 node keeps nothing but its dims and
//! lets [`ssm_kernel::mamba2::scan_bwd_auto`] recompute.

use ssm_kernel::mamba1::{self, Scan1Args, Scan1Dims, Scan1Grads, Scan1Out};
use ssm_kernel::mamba2::{self, AUTO_CHUNK, Scan2Args, Scan2Dims, Scan2Grads, Scan2Out};
use ssm_kernel::pool::{self, F32Buf};

use super::{Resets, check_resets};
use crate::tape::{Backward, InputGrad, InputList, Slot, Tape, Var, grad_or_scratch};
use crate::tensor::{Tensor, data, data_mut, for_overwrite, from_vec};

/// `A = −exp(A_log)` ([`ssm_kernel::activation::neg_exp`]) in a buffer from this thread's
/// [`pool`] (give it back with [`pool::give`]).
pub(crate) fn neg_exp(a_log: &[f32]) -> Vec<f32> {
    let mut a = pool::take_for_overwrite(a_log.len());
    ssm_kernel::activation::neg_exp(a_log, &mut a);
    a
}

/// `dA_log (+)= dA ⊙ A` (as `A = −exp(A_log)`), then gives the pooled `dA` and `A` back.
pub(crate) fn finish_da(da_log: Option<InputGrad>, da: Vec<f32>, a: Vec<f32>) {
    if let Some(mut dal) = da_log {
        dal.add_or_write_each(da.iter().zip(&a).map(|(&ga, &av)| ga * av));
    }
    pool::give(da);
    pool::give(a);
}

/// Panics unless `t` has shape `want`, naming the op, the argument and both shapes.
#[track_caller]
fn expect_shape(op: &str, name: &str, t: &Tensor, want: &[usize], layout: &str) {
    assert_eq!(t.shape(), want, "{op}: {name} must be {layout} = {want:?}, got {:?}", t.shape());
}

/// The inputs of a Mamba-1 selective scan ([`selective_scan1`]), as [`Scan1Args`] names them:
/// `u`, `delta`, `A_log`, `B`, `C` required, the skip `D`, the gate `z`, the Δ bias and the
/// initial state `h0` optional, and whether Δ goes through softplus.
#[derive(Clone, Debug)]
pub struct Scan1Vars {
    /// Input `u`, (B, L, D).
    pub u: Var,
    /// Time steps before bias and softplus, (B, L, D).
    pub delta: Var,
    /// `A_log`, (D, N); the scan uses `A = −exp(A_log)`.
    pub a_log: Var,
    /// `B`, (B, L, N) or (B, L, G, N) with `G` dividing `D`.
    pub b: Var,
    /// `C`, shaped like `B`.
    pub c: Var,
    /// The skip `D`, (D).
    pub d: Option<Var>,
    /// The gate `z`, (B, L, D): `y ← y · silu(z)`.
    pub z: Option<Var>,
    /// Added to `delta` before the softplus, (D).
    pub delta_bias: Option<Var>,
    /// `Δ = softplus(delta + delta_bias)` when set, else `delta + delta_bias`.
    pub delta_softplus: bool,
    /// The initial state, (B, D, N); zero when `None`.
    pub h0: Option<Var>,
    /// Document starts, (B, L) (see [`Resets`]): the state restarts from zero at each.
    pub resets: Option<Resets>,
    /// A gradient of the final state `h_L`, (B, D, N), that the backward adds to the one from
    /// the output: the loss has a term `⟨dh_last, h_L⟩` (a later window's start, run after this
    /// one's backward is built).
    pub dh_last: Option<Vec<f32>>,
}

impl Scan1Vars {
    /// The required inputs; no `D`, gate, bias, softplus or initial state.
    pub fn new(u: Var, delta: Var, a_log: Var, b: Var, c: Var) -> Self {
        let (d, z, delta_bias, h0, resets, dh_last) = (None, None, None, None, None, None);
        Self { u, delta, a_log, b, c, d, z, delta_bias, delta_softplus: false, h0, resets, dh_last }
    }

    /// With a gradient of the final state, (B, D, N) (see [`Scan1Vars::dh_last`]).
    pub fn with_dh_last(self, dh_last: Option<Vec<f32>>) -> Self {
        Self { dh_last, ..self }
    }

    /// With the skip `D` (D).
    pub fn with_d(self, d: Var) -> Self {
        Self { d: Some(d), ..self }
    }

    /// With the gate `z` (B, L, D).
    pub fn with_z(self, z: Var) -> Self {
        Self { z: Some(z), ..self }
    }

    /// With the Δ bias (D).
    pub fn with_delta_bias(self, delta_bias: Var) -> Self {
        Self { delta_bias: Some(delta_bias), ..self }
    }

    /// With `Δ = softplus(delta + bias)` (`true`) or without the softplus.
    pub fn with_delta_softplus(self, on: bool) -> Self {
        Self { delta_softplus: on, ..self }
    }

    /// With the initial state `h0` (B, D, N).
    pub fn with_h0(self, h0: Var) -> Self {
        Self { h0: Some(h0), ..self }
    }

    /// With document starts (B, L).
    pub fn with_resets(self, resets: Option<Resets>) -> Self {
        Self { resets, ..self }
    }
}

/// The inputs of a Mamba-2 selective scan ([`selective_scan2`]), as [`Scan2Args`] names them,
/// plus the SSD chunk length its backward (and an SSD forward) uses.
#[derive(Clone, Debug)]
pub struct Scan2Vars {
    /// Input `x`, (B, L, H, P).
    pub x: Var,
    /// Time steps before bias and softplus, (B, L, H).
    pub delta: Var,
    /// `A_log`, (H); the scan uses `A = −exp(A_log)`.
    pub a_log: Var,
    /// `B`, (B, L, G, N) with `G` dividing `H`.
    pub b: Var,
    /// `C`, shaped like `B`.
    pub c: Var,
    /// The skip `D`, (H).
    pub d: Option<Var>,
    /// The gate `z`, (B, L, H, P): `y ← y · silu(z)`.
    pub z: Option<Var>,
    /// Added to `delta` before the softplus, (H).
    pub delta_bias: Option<Var>,
    /// `Δ = softplus(delta + delta_bias)` when set, else `delta + delta_bias`.
    pub delta_softplus: bool,
    /// The initial state, (B, H, P, N); zero when `None`.
    pub h0: Option<Var>,
    /// Steps per chunk when the chunked (SSD) kernel runs (see
    /// [`ssm_kernel::mamba2::use_ssd`]); the result does not depend on it beyond rounding.
    pub chunk_size: usize,
    /// Document starts, (B, L) (see [`Resets`]): the state restarts from zero at each.
    pub resets: Option<Resets>,
}

impl Scan2Vars {
    /// The required inputs; no `D`, gate, bias, softplus or initial state, chunks of
    /// [`AUTO_CHUNK`].
    pub fn new(x: Var, delta: Var, a_log: Var, b: Var, c: Var) -> Self {
        Self {
            x,
            delta,
            a_log,
            b,
            c,
            d: None,
            z: None,
            delta_bias: None,
            delta_softplus: false,
            h0: None,
            chunk_size: AUTO_CHUNK,
            resets: None,
        }
    }

    /// With the skip `D` (H).
    pub fn with_d(self, d: Var) -> Self {
        Self { d: Some(d), ..self }
    }

    /// With the gate `z` (B, L, H, P).
    pub fn with_z(self, z: Var) -> Self {
        Self { z: Some(z), ..self }
    }

    /// With the Δ bias (H).
    pub fn with_delta_bias(self, delta_bias: Var) -> Self {
        Self { delta_bias: Some(delta_bias), ..self }
    }

    /// With `Δ = softplus(delta + bias)` (`true`) or without the softplus.
    pub fn with_delta_softplus(self, on: bool) -> Self {
        Self { delta_softplus: on, ..self }
    }

    /// With the initial state `h0` (B, H, P, N).
    pub fn with_h0(self, h0: Var) -> Self {
        Self { h0: Some(h0), ..self }
    }

    /// With SSD chunks of `chunk_size` steps (at least 1).
    pub fn with_chunk_size(self, chunk_size: usize) -> Self {
        Self { chunk_size, ..self }
    }

    /// With document starts (B, L).
    pub fn with_resets(self, resets: Option<Resets>) -> Self {
        Self { resets, ..self }
    }
}

/// Where a scan node's inputs sit in its input list (`x` is Mamba-1's `u`).
#[derive(Clone, Copy, Debug)]
struct ScanInputs {
    x: Slot,
    delta: Slot,
    a_log: Slot,
    b: Slot,
    c: Slot,
    d: Option<Slot>,
    z: Option<Slot>,
    delta_bias: Option<Slot>,
    h0: Option<Slot>,
}

impl ScanInputs {
    /// Lists the inputs in order, required first.
    #[allow(clippy::too_many_arguments)]
    fn list(
        inputs: &mut InputList,
        [x, delta, a_log, b, c]: [Var; 5],
        [d, z, delta_bias, h0]: [Option<Var>; 4],
    ) -> Self {
        Self {
            x: inputs.push(x),
            delta: inputs.push(delta),
            a_log: inputs.push(a_log),
            b: inputs.push(b),
            c: inputs.push(c),
            d: inputs.push_opt(d),
            z: inputs.push_opt(z),
            delta_bias: inputs.push_opt(delta_bias),
            h0: inputs.push_opt(h0),
        }
    }

    /// The values of the optional inputs `[d, z, delta_bias, h0]`.
    fn optional<'a>(&self, inputs: &[&'a Tensor]) -> [Option<&'a [f32]>; 4] {
        [self.d, self.z, self.delta_bias, self.h0].map(|s| s.map(|s| data(s.value(inputs))))
    }

    /// The gradients of the optional inputs `[d, z, delta_bias, h0]`, ready to be added into.
    fn optional_grads<'g>(&self, grads: &mut [Option<InputGrad<'g>>]) -> [Option<&'g mut [f32]>; 4] {
        [self.d, self.z, self.delta_bias, self.h0]
            .map(|s| s.and_then(|s| s.grad(grads)).map(InputGrad::zero_if_overwrite))
    }
}

/// Mamba-1 selective scan, `y` (B, L, D).
///
/// With `Δ = softplus(delta + delta_bias)` (softplus and bias optional) and `A = −exp(A_log)`:
/// `h_t = exp(Δ_t A) ⊙ h_{t−1} + Δ_t u_t B_t`, `y_t = ⟨h_t, C_t⟩ + D u_t`, then
/// `y_t ← y_t · silu(z_t)` when a gate is given; `h_{−1} = h0` (zero when absent). Shapes are
/// on [`Scan1Vars`].
///
/// # Panics
/// If the shapes disagree (the message names the argument and both shapes).
#[track_caller]
pub fn selective_scan1(tape: &mut Tape, args: Scan1Vars) -> Var {
    scan1(tape, args, false).0
}

/// [`selective_scan1`], also returning the final state `h_L` (B, D, N) as a plain tensor. The
/// final state is a constant: no gradient flows back through it (use it to carry state across
/// documents or to start recurrent generation); `h0` is differentiable.
///
/// # Panics
/// As [`selective_scan1`].
#[track_caller]
pub fn selective_scan1_with_state(tape: &mut Tape, args: Scan1Vars) -> (Var, Tensor) {
    let (y, h) = scan1(tape, args, true);
    (y, h.expect("the final state was requested"))
}

#[track_caller]
fn scan1(tape: &mut Tape, v: Scan1Vars, want_state: bool) -> (Var, Option<Tensor>) {
    const OP: &str = "selective_scan1";
    let Scan1Vars { u, delta, a_log, b, c, d, z, delta_bias, delta_softplus, h0, resets, dh_last } = v;
    let uv = tape.value(u);
    assert_eq!(uv.ndim(), 3, "{OP}: u must be (B, L, D), got {:?}", uv.shape());
    let (bsz, l, dim) = (uv.shape()[0], uv.shape()[1], uv.shape()[2]);
    let av = tape.value(a_log);
    assert!(
        av.ndim() == 2 && av.shape()[0] == dim,
        "{OP}: A_log must be (D, N) = ({dim}, N) for u {:?}, got {:?}",
        uv.shape(),
        av.shape()
    );
    let n = av.shape()[1];
    let bv = tape.value(b);
    let g = match *bv.shape() {
        [b0, l0, n0] if (b0, l0, n0) == (bsz, l, n) => 1,
        [b0, l0, g, n0] if (b0, l0, n0) == (bsz, l, n) && g >= 1 && dim.is_multiple_of(g) => g,
        _ => panic!(
            "{OP}: B must be (B, L, N) or (B, L, G, N) with G dividing D, for u {:?} and A_log {:?}, got {:?}",
            uv.shape(),
            av.shape(),
            bv.shape()
        ),
    };
    expect_shape(OP, "delta", tape.value(delta), uv.shape(), "(B, L, D)");
    expect_shape(OP, "C", tape.value(c), bv.shape(), "like B");
    for (name, v, want, layout) in [
        ("D", d, vec![dim], "(D)"),
        ("z", z, vec![bsz, l, dim], "(B, L, D)"),
        ("delta_bias", delta_bias, vec![dim], "(D)"),
        ("h0", h0, vec![bsz, dim, n], "(B, D, N)"),
    ] {
        if let Some(v) = v {
            expect_shape(OP, name, tape.value(v), &want, layout);
        }
    }
    check_resets(OP, resets.as_ref(), bsz, l);
    if let Some(dh) = &dh_last {
        assert_eq!(
            dh.len(),
            bsz * dim * n,
            "{OP}: dh_last must be (B, D, N) = ({bsz}, {dim}, {n}), got {} values",
            dh.len()
        );
    }
    let dims = Scan1Dims::new(bsz, l, dim, n).with_groups(g);
    let mut inputs = InputList::new();
    let at = ScanInputs::list(&mut inputs, [u, delta, a_log, b, c], [d, z, delta_bias, h0]);
    let tracked = tape.is_recording() && inputs.vars().iter().any(|&v| tape.needs_grad(v));
    let a = neg_exp(data(av));
    let val = |v: Option<Var>| v.map(|v| data(tape.value(v)));
    let args = Scan1Args {
        u: data(uv),
        delta: data(tape.value(delta)),
        a: &a,
        b: data(bv),
        c: data(tape.value(c)),
        d: val(d),
        z: val(z),
        delta_bias: val(delta_bias),
        delta_softplus,
        h0: val(h0),
        resets: resets.as_deref(),
    };
    let mut y = for_overwrite(uv.shape());
    let mut h_last = want_state.then(|| vec![0.0f32; dims.n_bdn()]);
    let mut checkpoints = if tracked { pool::take(dims.n_checkpoints()) } else { Vec::new() };
    let out = Scan1Out {
        y: data_mut(&mut y),
        h_last: h_last.as_deref_mut(),
        checkpoints: tracked.then_some(&mut checkpoints[..]),
    };
    mamba1::scan_fwd(&dims, &args, out);
    pool::give(a);
    let h_last = h_last.map(|h| from_vec(&[bsz, dim, n], h));
    let node = Scan1Backward { at, dims, delta_softplus, checkpoints, resets, dh_last };
    (tape.push(y, inputs.vars(), node), h_last)
}

/// Saved: the inputs' positions, dims, the softplus flag, the forward's chunk checkpoints
/// (B, ⌈L/32⌉, D, N) and the final state's given gradient.
struct Scan1Backward {
    at: ScanInputs,
    dims: Scan1Dims,
    delta_softplus: bool,
    checkpoints: Vec<f32>,
    resets: Option<Resets>,
    dh_last: Option<Vec<f32>>,
}

impl Drop for Scan1Backward {
    /// The checkpoints go back to the pool for the next step's forward.
    fn drop(&mut self) {
        pool::give(std::mem::take(&mut self.checkpoints));
    }
}

impl Backward for Scan1Backward {
    fn name(&self) -> &'static str {
        "selective_scan1"
    }

    fn reads_output(&self) -> bool {
        false
    }

    /// `ssm_kernel::mamba1::scan_bwd_with_checkpoints`, which adds into every gradient (fresh
    /// buffers are zeroed first); `dA_log` from `dA`.
    fn backward(&self, inputs: &[&Tensor], _: &Tensor, dout: &Tensor, grads: &mut [Option<InputGrad<'_>>]) {
        let (dims, at) = (&self.dims, self.at);
        let val = |s: Slot| data(s.value(inputs));
        let a = neg_exp(val(at.a_log));
        let [d, z, delta_bias, h0] = at.optional(inputs);
        let args = Scan1Args {
            u: val(at.x),
            delta: val(at.delta),
            a: &a,
            b: val(at.b),
            c: val(at.c),
            d,
            z,
            delta_bias,
            delta_softplus: self.delta_softplus,
            h0,
            resets: self.resets.as_deref(),
        };
        let mut da = pool::take(a.len());
        let [mut s0, mut s1, mut s3, mut s4]: [F32Buf; 4] = Default::default();
        let da_log = at.a_log.grad(grads);
        let g = Scan1Grads {
            du: grad_or_scratch(at.x.grad(grads), &mut s0, dims.n_bld()),
            ddelta: grad_or_scratch(at.delta.grad(grads), &mut s1, dims.n_bld()),
            da: &mut da,
            db: grad_or_scratch(at.b.grad(grads), &mut s3, dims.n_blgn()),
            dc: grad_or_scratch(at.c.grad(grads), &mut s4, dims.n_blgn()),
            dd: None,
            dz: None,
            ddelta_bias: None,
            dh0: None,
        };
        let [dd, dz, ddelta_bias, dh0] = at.optional_grads(grads);
        let g = Scan1Grads { dd, dz, ddelta_bias, dh0, ..g };
        let dh_last = self.dh_last.as_deref();
        mamba1::scan_bwd_with_checkpoints(dims, &args, &self.checkpoints, data(dout), dh_last, g);
        finish_da(da_log, da, a);
    }
}

/// Mamba-2 selective scan (per-head scalar `A`), `y` (B, L, H, P).
///
/// With `Δ = softplus(delta + delta_bias)` (softplus and bias optional), `A = −exp(A_log)` and
/// head `h` in group `g = h / (H/G)`: `h_t = exp(Δ_t A_h) h_{t−1} + Δ_t x_t ⊗ B_t[g]`,
/// `y_t = h_t C_t[g] + D_h x_t`, then `y_t ← y_t · silu(z_t)` when a gate is given;
/// `h_{−1} = h0` (zero when absent). Shapes are on [`Scan2Vars`].
///
/// # Panics
/// If the shapes disagree (the message names the argument and both shapes).
#[track_caller]
pub fn selective_scan2(tape: &mut Tape, args: Scan2Vars) -> Var {
    scan2(tape, args, false).0
}

/// [`selective_scan2`], also returning the final state `h_L` (B, H, P, N) — HF's `ssm_state`
/// layout — as a plain tensor through which no gradient flows.
///
/// # Panics
/// As [`selective_scan2`].
#[track_caller]
pub fn selective_scan2_with_state(tape: &mut Tape, args: Scan2Vars) -> (Var, Tensor) {
    let (y, h) = scan2(tape, args, true);
    (y, h.expect("the final state was requested"))
}

#[track_caller]
fn scan2(tape: &mut Tape, v: Scan2Vars, want_state: bool) -> (Var, Option<Tensor>) {
    const OP: &str = "selective_scan2";
    let Scan2Vars { x, delta, a_log, b, c, d, z, delta_bias, delta_softplus, h0, chunk_size, resets } = v;
    assert!(chunk_size >= 1, "{OP}: chunk_size must be at least 1");
    let xv = tape.value(x);
    assert_eq!(xv.ndim(), 4, "{OP}: x must be (B, L, H, P), got {:?}", xv.shape());
    let (bsz, l, h, p) = (xv.shape()[0], xv.shape()[1], xv.shape()[2], xv.shape()[3]);
    let bv = tape.value(b);
    let (g, n) = match *bv.shape() {
        [b0, l0, g, n] if (b0, l0) == (bsz, l) && g >= 1 && h.is_multiple_of(g) => (g, n),
        _ => panic!(
            "{OP}: B must be (B, L, G, N) with G dividing H, for x {:?}, got {:?}",
            xv.shape(),
            bv.shape()
        ),
    };
    expect_shape(OP, "delta", tape.value(delta), &[bsz, l, h], "(B, L, H)");
    expect_shape(OP, "A_log", tape.value(a_log), &[h], "(H)");
    expect_shape(OP, "C", tape.value(c), bv.shape(), "like B");
    for (name, v, want, layout) in [
        ("D", d, vec![h], "(H)"),
        ("z", z, vec![bsz, l, h, p], "(B, L, H, P)"),
        ("delta_bias", delta_bias, vec![h], "(H)"),
        ("h0", h0, vec![bsz, h, p, n], "(B, H, P, N)"),
    ] {
        if let Some(v) = v {
            expect_shape(OP, name, tape.value(v), &want, layout);
        }
    }
    check_resets(OP, resets.as_ref(), bsz, l);
    let dims = Scan2Dims::new(bsz, l, h, p, n).with_groups(g);
    let mut inputs = InputList::new();
    let at = ScanInputs::list(&mut inputs, [x, delta, a_log, b, c], [d, z, delta_bias, h0]);
    let a = neg_exp(data(tape.value(a_log)));
    let val = |v: Option<Var>| v.map(|v| data(tape.value(v)));
    let args = Scan2Args {
        x: data(xv),
        delta: data(tape.value(delta)),
        a: &a,
        b: data(bv),
        c: data(tape.value(c)),
        d: val(d),
        z: val(z),
        delta_bias: val(delta_bias),
        delta_softplus,
        h0: val(h0),
        resets: resets.as_deref(),
    };
    let mut y = for_overwrite(xv.shape());
    let mut h_last = want_state.then(|| vec![0.0f32; dims.n_bhpn()]);
    let out = Scan2Out { y: data_mut(&mut y), h_last: h_last.as_deref_mut() };
    mamba2::scan_fwd_auto(&dims, chunk_size, &args, out);
    pool::give(a);
    let h_last = h_last.map(|s| from_vec(&[bsz, h, p, n], s));
    let node = Scan2Backward { at, dims, delta_softplus, chunk_size, resets };
    (tape.push(y, inputs.vars(), node), h_last)
}

/// Saved: the inputs' positions, dims, the softplus flag and the SSD chunk length (the backward
/// recomputes the states).
struct Scan2Backward {
    at: ScanInputs,
    dims: Scan2Dims,
    delta_softplus: bool,
    chunk_size: usize,
    resets: Option<Resets>,
}

impl Backward for Scan2Backward {
    fn name(&self) -> &'static str {
        "selective_scan2"
    }

    fn reads_output(&self) -> bool {
        false
    }

    /// `ssm_kernel::mamba2::scan_bwd_auto`, which adds into every gradient (fresh buffers are
    /// zeroed first); `dA_log` from `dA`.
    fn backward(&self, inputs: &[&Tensor], _: &Tensor, dout: &Tensor, grads: &mut [Option<InputGrad<'_>>]) {
        let (dims, at) = (&self.dims, self.at);
        let val = |s: Slot| data(s.value(inputs));
        let a = neg_exp(val(at.a_log));
        let [d, z, delta_bias, h0] = at.optional(inputs);
        let args = Scan2Args {
            x: val(at.x),
            delta: val(at.delta),
            a: &a,
            b: val(at.b),
            c: val(at.c),
            d,
            z,
            delta_bias,
            delta_softplus: self.delta_softplus,
            h0,
            resets: self.resets.as_deref(),
        };
        let mut da = pool::take(a.len());
        let [mut s0, mut s1, mut s3, mut s4]: [F32Buf; 4] = Default::default();
        let da_log = at.a_log.grad(grads);
        let g = Scan2Grads {
            dx: grad_or_scratch(at.x.grad(grads), &mut s0, dims.n_blhp()),
            ddelta: grad_or_scratch(at.delta.grad(grads), &mut s1, dims.n_blh()),
            da: &mut da,
            db: grad_or_scratch(at.b.grad(grads), &mut s3, dims.n_blgn()),
            dc: grad_or_scratch(at.c.grad(grads), &mut s4, dims.n_blgn()),
            dd: None,
            dz: None,
            ddelta_bias: None,
            dh0: None,
        };
        let [dd, dz, ddelta_bias, dh0] = at.optional_grads(grads);
        let g = Scan2Grads { dd, dz, ddelta_bias, dh0, ..g };
        mamba2::scan_bwd_auto(dims, self.chunk_size, &args, data(dout), None, g);
        finish_da(da_log, da, a);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::check::{check_accumulates, check_op, random};
    use crate::params::ParamStore;
    use crate::tensor::zeros;
    use ssm_kernel::reference;

    /// f64 reference of the Mamba-1 node: `A = −exp(A_log)`, then the naive scan loop.
    /// Inputs: u, delta, A_log, B, C, D, z, delta_bias[, h0].
    fn ref1(x: &[Vec<f64>], dims: Scan1Dims) -> Vec<f64> {
        let a: Vec<f64> = x[2].iter().map(|v| -v.exp()).collect();
        let args = Scan1Args {
            d: Some(&x[5]),
            z: Some(&x[6]),
            delta_bias: Some(&x[7]),
            delta_softplus: true,
            h0: x.get(8).map(|h| h.as_slice()),
            ..Scan1Args::new(&x[0], &x[1], &a, &x[3], &x[4])
        };
        let mut y = vec![0.0; dims.n_bld()];
        reference::mamba1::scan_fwd(&dims, &args, Scan1Out::new(&mut y));
        y
    }

    /// The node on every input of `inputs1`: D, gate, bias and softplus.
    fn vars1(v: &[Var]) -> Scan1Vars {
        Scan1Vars::new(v[0], v[1], v[2], v[3], v[4])
            .with_d(v[5])
            .with_z(v[6])
            .with_delta_bias(v[7])
            .with_delta_softplus(true)
    }

    fn inputs1(bsz: usize, l: usize, dim: usize, n: usize, bc_shape: &[usize]) -> Vec<Tensor> {
        vec![
            random(&[bsz, l, dim], 1),
            random(&[bsz, l, dim], 2) - 1.0,
            random(&[dim, n], 3) * 0.5,
            random(bc_shape, 4),
            random(bc_shape, 5),
            random(&[dim], 6),
            random(&[bsz, l, dim], 7) * 2.0,
            random(&[dim], 8) * 0.5,
        ]
    }

    #[test]
    fn scan1_backward_matches_finite_differences() {
        // L = 37 > 32 crosses a checkpoint chunk boundary.
        let (bsz, l, dim, n) = (2, 37, 3, 5);
        let dims = Scan1Dims::new(bsz, l, dim, n);
        check_op(
            inputs1(bsz, l, dim, n, &[bsz, l, n]),
            |t, v| selective_scan1(t, vars1(v)),
            |x| ref1(x, dims),
            1e-3,
        );
    }

    #[test]
    fn scan1_groups_and_initial_state_match_finite_differences() {
        let (bsz, l, dim, n, g) = (1, 34, 4, 3, 2);
        let dims = Scan1Dims::new(bsz, l, dim, n).with_groups(g);
        let mut inputs = inputs1(bsz, l, dim, n, &[bsz, l, g, n]);
        inputs.push(random(&[bsz, dim, n], 9));
        check_op(
            inputs,
            |t, v| {
                let (y, _) = selective_scan1_with_state(t, vars1(v).with_h0(v[8]));
                y
            },
            |x| ref1(x, dims),
            1e-3,
        );
    }

    #[test]
    fn scan1_final_state_matches_reference() {
        let (bsz, l, dim, n) = (2, 40, 3, 4);
        let dims = Scan1Dims::new(bsz, l, dim, n);
        let ins = inputs1(bsz, l, dim, n, &[bsz, l, n]);
        let store = ParamStore::new();
        let mut tape = Tape::new(&store);
        let v: Vec<Var> = ins.iter().map(|t| tape.leaf(t.clone())).collect();
        let (_, h) =
            selective_scan1_with_state(&mut tape, Scan1Vars::new(v[0], v[1], v[2], v[3], v[4]).with_d(v[5]));
        let x: Vec<Vec<f64>> = ins.iter().map(|t| data(t).iter().map(|&a| a as f64).collect()).collect();
        let a: Vec<f64> = x[2].iter().map(|v| -v.exp()).collect();
        let args = Scan1Args { d: Some(&x[5]), ..Scan1Args::new(&x[0], &x[1], &a, &x[3], &x[4]) };
        let (mut y, mut hw) = (vec![0.0; dims.n_bld()], vec![0.0; dims.n_bdn()]);
        reference::mamba1::scan_fwd(&dims, &args, Scan1Out::with_state(&mut y, &mut hw));
        assert_eq!(h.shape(), &[bsz, dim, n]);
        ssm_kernel::testing::assert_rel_max("h_last", data(&h), &hw, 1e-5, 1.0);
    }

    /// f64 reference of the Mamba-2 node. Inputs: x, delta, A_log, B, C, D, z, delta_bias[, h0].
    fn ref2(x: &[Vec<f64>], dims: Scan2Dims) -> Vec<f64> {
        let a: Vec<f64> = x[2].iter().map(|v| -v.exp()).collect();
        let args = Scan2Args {
            d: Some(&x[5]),
            z: Some(&x[6]),
            delta_bias: Some(&x[7]),
            delta_softplus: true,
            h0: x.get(8).map(|h| h.as_slice()),
            ..Scan2Args::new(&x[0], &x[1], &a, &x[3], &x[4])
        };
        let mut y = vec![0.0; dims.n_blhp()];
        reference::mamba2::scan_fwd(&dims, &args, Scan2Out { y: &mut y, h_last: None });
        y
    }

    #[test]
    fn scan2_backward_matches_finite_differences() {
        for (bsz, l, h, p, n, g, with_h0) in [(2, 9, 2, 3, 5, 1, false), (1, 11, 4, 3, 2, 2, true)] {
            let dims = Scan2Dims::new(bsz, l, h, p, n).with_groups(g);
            let mut inputs = vec![
                random(&[bsz, l, h, p], 1),
                random(&[bsz, l, h], 2) - 1.0,
                random(&[h], 3) * 0.5,
                random(&[bsz, l, g, n], 4),
                random(&[bsz, l, g, n], 5),
                random(&[h], 6),
                random(&[bsz, l, h, p], 7) * 2.0,
                random(&[h], 8) * 0.5,
            ];
            if with_h0 {
                inputs.push(random(&[bsz, h, p, n], 9));
            }
            check_op(
                inputs,
                |t, v| {
                    let args = Scan2Vars::new(v[0], v[1], v[2], v[3], v[4])
                        .with_d(v[5])
                        .with_z(v[6])
                        .with_delta_bias(v[7])
                        .with_delta_softplus(true);
                    let (y, hl) = selective_scan2_with_state(t, Scan2Vars { h0: v.get(8).copied(), ..args });
                    assert_eq!(hl.shape(), &[bsz, h, p, n]);
                    y
                },
                |x| ref2(x, dims),
                1e-3,
            );
        }
    }

    #[test]
    #[should_panic(expected = "selective_scan1: delta must be (B, L, D) = [2, 5, 3], got [2, 5, 4]")]
    fn scan1_shape_mismatch_panics() {
        let store = ParamStore::new();
        let mut tape = Tape::new(&store);
        let u = tape.constant(zeros(&[2, 5, 3]));
        let dl = tape.constant(zeros(&[2, 5, 4]));
        let a = tape.constant(zeros(&[3, 2]));
        let b = tape.constant(zeros(&[2, 5, 2]));
        selective_scan1(&mut tape, Scan1Vars::new(u, dl, a, b, b).with_delta_softplus(true));
    }

    #[test]
    #[should_panic(
        expected = "selective_scan2: B must be (B, L, G, N) with G dividing H, for x [1, 4, 3, 2], got [1, 4, 2, 5]"
    )]
    fn scan2_group_mismatch_panics() {
        let store = ParamStore::new();
        let mut tape = Tape::new(&store);
        let x = tape.constant(zeros(&[1, 4, 3, 2]));
        let dl = tape.constant(zeros(&[1, 4, 3]));
        let a = tape.constant(zeros(&[3]));
        let b = tape.constant(zeros(&[1, 4, 2, 5]));
        selective_scan2(&mut tape, Scan2Vars::new(x, dl, a, b, b).with_delta_softplus(true));
    }

    /// Both write modes of every gradient slot, for both scans; Mamba-2 on dims whose backward
    /// takes the SSD path (N·P > 4096, L ≥ 64) at two chunk lengths, which must agree.
    #[test]
    fn fresh_and_accumulated_gradients() {
        let (bsz, l, dim, n) = (1, 40, 3, 4);
        let mut ins = inputs1(bsz, l, dim, n, &[bsz, l, n]);
        ins.push(random(&[bsz, dim, n], 9));
        check_accumulates(ins, |t, v| selective_scan1_with_state(t, vars1(v).with_h0(v[8])).0);
        let (bsz, l, h, p, n, g) = (1, 70, 2, 64, 80, 1);
        let ins = vec![
            random(&[bsz, l, h, p], 1),
            random(&[bsz, l, h], 2) - 1.0,
            random(&[h], 3) * 0.5,
            random(&[bsz, l, g, n], 4),
            random(&[bsz, l, g, n], 5),
            random(&[h], 6),
            random(&[bsz, l, h, p], 7),
            random(&[h], 8) * 0.5,
        ];
        assert!(ssm_kernel::mamba2::use_ssd(&Scan2Dims::new(bsz, l, h, p, n), true));
        let build = |q: usize| {
            move |t: &mut Tape, v: &[Var]| {
                let args = Scan2Vars::new(v[0], v[1], v[2], v[3], v[4])
                    .with_d(v[5])
                    .with_z(v[6])
                    .with_delta_bias(v[7])
                    .with_delta_softplus(true)
                    .with_chunk_size(q);
                selective_scan2(t, args)
            }
        };
        check_accumulates(ins.clone(), build(32));
        let grads = |q: usize| {
            let store = ParamStore::new();
            let mut tape = Tape::new(&store);
            let v: Vec<Var> = ins.iter().map(|t| tape.leaf(t.clone())).collect();
            let y = build(q)(&mut tape, &v);
            let seed = random(tape.value(y).shape(), 3);
            tape.backward_from(y, seed, &mut crate::params::Grads::new(&store));
            v.iter().map(|&x| data(tape.grad(x).unwrap()).to_vec()).collect::<Vec<_>>()
        };
        for (i, (a, b)) in grads(32).iter().zip(grads(256)).enumerate() {
            let b: Vec<f64> = b.iter().map(|&v| v as f64).collect();
            ssm_kernel::testing::assert_rel_max(&format!("chunk 32 vs 256, d(input {i})"), a, &b, 1e-4, 1e-3);
        }
    }
}
