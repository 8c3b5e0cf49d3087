//! The selective scans of Mamba-1 and Mamba-2 as single tape nodes, on
//! [`ssm_kernel::mamba1`] and [`ssm_kernel::mamba2`].
//!
//! Both take `A_log` and form `A = −exp(A_log)` inside, so the parameter gradient is
//! `dA_log = dA ⊙ A`. Memory policy: the Mamba-1 node keeps the forward's chunk checkpoints
//! ((B, ⌈L/32⌉, D, N) states) so its backward skips a forward pass; the Mamba-2 node keeps
//! nothing but its dims and lets [`ssm_kernel::mamba2::scan_bwd_auto`] recompute.

use ssm_kernel::mamba1::{self, Scan1Args, Scan1Dims, Scan1Grads, Scan1Out};
use ssm_kernel::mamba2::{self, Scan2Args, Scan2Dims, Scan2Grads, Scan2Out};

use crate::ops::pool;
use crate::tape::{Backward, Tape, Var};
use crate::tensor::{Tensor, data, data_mut, for_overwrite, from_vec};

/// `A = −exp(A_log)` in a buffer from this thread's [`pool`](crate::ops::pool) (give it back
/// with [`pool::give`]).
pub(crate) fn neg_exp(a_log: &[f32]) -> Vec<f32> {
    let mut a = pool::take(a_log.len());
    a.iter_mut().zip(a_log).for_each(|(o, v)| *o = -v.exp());
    a
}

/// The gradient buffer of `slot`, or a zeroed scratch of `n` values in `scratch` when the input
/// needs no gradient (the kernels always write their required gradients).
fn or_scratch<'a>(slot: Option<&'a mut [f32]>, scratch: &'a mut Vec<f32>, n: usize) -> &'a mut [f32] {
    match slot {
        Some(s) => s,
        None => {
            scratch.clear();
            scratch.resize(n, 0.0);
            scratch
        }
    }
}

/// Positions of the optional inputs in a scan node's input list.
#[derive(Clone, Copy, Debug, Default)]
struct Optional {
    d: Option<usize>,
    z: Option<usize>,
    delta_bias: Option<usize>,
    h0: Option<usize>,
}

impl Optional {
    /// Appends the present optional inputs to `inputs`, recording where each went.
    fn push(
        inputs: &mut Vec<Var>,
        d: Option<Var>,
        z: Option<Var>,
        bias: Option<Var>,
        h0: Option<Var>,
    ) -> Self {
        let mut at = |v: Option<Var>| {
            v.map(|v| {
                inputs.push(v);
                inputs.len() - 1
            })
        };
        Self { d: at(d), z: at(z), delta_bias: at(bias), h0: at(h0) }
    }

    /// The optional inputs' values, `[d, z, delta_bias, h0]`.
    fn values<'a>(self, inputs: &[&'a Tensor]) -> [Option<&'a [f32]>; 4] {
        [self.d, self.z, self.delta_bias, self.h0].map(|i| i.map(|i| data(inputs[i])))
    }

    /// Every gradient slot of a scan node as a flat slice: the five required inputs in order
    /// (x or u, Δ, A_log, B, C) and the optional ones as `[d, z, delta_bias, h0]`.
    fn slots<'a>(self, dinputs: &'a mut [Option<&mut Tensor>]) -> Slots<'a> {
        let mut all: Vec<Option<&'a mut [f32]>> =
            dinputs.iter_mut().map(|s| s.as_deref_mut().map(data_mut)).collect();
        let mut take = |i: Option<usize>| i.and_then(|i| all[i].take());
        let required = [0, 1, 2, 3, 4].map(|i| take(Some(i)));
        let optional = [self.d, self.z, self.delta_bias, self.h0].map(&mut take);
        Slots { required, optional }
    }
}

/// See [`Optional::slots`].
struct Slots<'a> {
    required: [Option<&'a mut [f32]>; 5],
    optional: [Option<&'a mut [f32]>; 4],
}

/// `dA_log += dA ⊙ A` (as `A = −exp(A_log)`), then returns the pooled `A` and `dA`.
fn finish_da(da_log: Option<&mut [f32]>, da: Vec<f32>, a: Vec<f32>) {
    if let Some(dal) = da_log {
        for ((g, &ga), &av) in dal.iter_mut().zip(&da).zip(&a) {
            *g += ga * av;
        }
    }
    pool::give(da);
    pool::give(a);
}

/// Panics unless `t` has shape `want`, naming the op, the argument and both shapes.
#[track_caller]
fn expect_shape(op: &str, name: &str, t: &Tensor, want: &[usize], layout: &str) {
    assert_eq!(t.shape(), want, "{op}: {name} must be {layout} = {want:?}, got {:?}", t.shape());
}

/// Mamba-1 selective scan, `y` (B, L, D).
///
/// With `Δ = softplus(delta + delta_bias)` (softplus and bias optional) and `A = −exp(A_log)`:
/// `h_t = exp(Δ_t A) ⊙ h_{t−1} + Δ_t u_t B_t`, `y_t = ⟨h_t, C_t⟩ + D u_t`, then
/// `y_t ← y_t · silu(z_t)` when a gate is given; `h_{−1} = 0`.
///
/// Shapes: `u`, `delta` (B, L, D); `a_log` (D, N); `b`, `c` (B, L, N) or (B, L, G, N) with `G`
/// dividing `D`; `d`, `delta_bias` (D); `z` (B, L, D).
///
/// # Panics
/// If the shapes disagree (the message names the argument and both shapes).
#[track_caller]
pub fn selective_scan1(
    tape: &mut Tape,
    u: Var,
    delta: Var,
    a_log: Var,
    b: Var,
    c: Var,
    d: Option<Var>,
    z: Option<Var>,
    delta_bias: Option<Var>,
    softplus: bool,
) -> Var {
    scan1(tape, u, delta, a_log, b, c, d, z, delta_bias, None, softplus, false).0
}

/// [`selective_scan1`] from an initial state `h0` (B, D, N) (zero when `None`; differentiable),
/// also returning the final state `h_L` (B, D, N) as a plain tensor. The final state is a
/// constant: no gradient flows back through it (use it to carry state across documents or to
/// start recurrent generation).
///
/// # Panics
/// As [`selective_scan1`], and if `h0` is not (B, D, N).
#[track_caller]
pub fn selective_scan1_with_state(
    tape: &mut Tape,
    u: Var,
    delta: Var,
    a_log: Var,
    b: Var,
    c: Var,
    d: Option<Var>,
    z: Option<Var>,
    delta_bias: Option<Var>,
    h0: Option<Var>,
    softplus: bool,
) -> (Var, Tensor) {
    let (y, h) = scan1(tape, u, delta, a_log, b, c, d, z, delta_bias, h0, softplus, true);
    (y, h.expect("the final state was requested"))
}

#[track_caller]
fn scan1(
    tape: &mut Tape,
    u: Var,
    delta: Var,
    a_log: Var,
    b: Var,
    c: Var,
    d: Option<Var>,
    z: Option<Var>,
    delta_bias: Option<Var>,
    h0: Option<Var>,
    softplus: bool,
    want_state: bool,
) -> (Var, Option<Tensor>) {
    const OP: &str = "selective_scan1";
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
    let dims = Scan1Dims::new(bsz, l, dim, n).with_groups(g);
    let mut inputs = vec![u, delta, a_log, b, c];
    let opt = Optional::push(&mut inputs, d, z, delta_bias, h0);
    let tracked = tape.is_recording() && inputs.iter().any(|&v| tape.needs_grad(v));
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
        delta_softplus: softplus,
        h0: val(h0),
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
    (tape.push(y, &inputs, Scan1Backward { dims, opt, softplus, checkpoints }), h_last)
}

/// Saved: dims, where the optional inputs are, the softplus flag and the forward's chunk
/// checkpoints (B, ⌈L/32⌉, D, N).
struct Scan1Backward {
    dims: Scan1Dims,
    opt: Optional,
    softplus: bool,
    checkpoints: Vec<f32>,
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

    fn backward(&self, inputs: &[&Tensor], _: &Tensor, dout: &Tensor, dinputs: &mut [Option<&mut Tensor>]) {
        let dims = &self.dims;
        let a = neg_exp(data(inputs[2]));
        let [d, z, delta_bias, h0] = self.opt.values(inputs);
        let args = Scan1Args {
            u: data(inputs[0]),
            delta: data(inputs[1]),
            a: &a,
            b: data(inputs[3]),
            c: data(inputs[4]),
            d,
            z,
            delta_bias,
            delta_softplus: self.softplus,
            h0,
        };
        let Slots { required: [du, ddelta, da_log, db, dc], optional: [dd, dz, ddelta_bias, dh0] } =
            self.opt.slots(dinputs);
        let mut da = pool::take(a.len());
        let (mut s0, mut s1, mut s3, mut s4) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        let grads = Scan1Grads {
            du: or_scratch(du, &mut s0, dims.n_bld()),
            ddelta: or_scratch(ddelta, &mut s1, dims.n_bld()),
            da: &mut da,
            db: or_scratch(db, &mut s3, dims.n_blgn()),
            dc: or_scratch(dc, &mut s4, dims.n_blgn()),
            dd,
            dz,
            ddelta_bias,
            dh0,
        };
        mamba1::scan_bwd_with_checkpoints(dims, &args, &self.checkpoints, data(dout), None, grads);
        finish_da(da_log, da, a);
    }
}

/// Mamba-2 selective scan (per-head scalar `A`), `y` (B, L, H, P).
///
/// With `Δ = softplus(delta + delta_bias)` (softplus and bias optional), `A = −exp(A_log)` and
/// head `h` in group `g = h / (H/G)`: `h_t = exp(Δ_t A_h) h_{t−1} + Δ_t x_t ⊗ B_t[g]`,
/// `y_t = h_t C_t[g] + D_h x_t`, then `y_t ← y_t · silu(z_t)` when a gate is given; `h_{−1} = 0`.
///
/// Shapes: `x` (B, L, H, P); `delta` (B, L, H); `a_log`, `d`, `delta_bias` (H); `b`, `c`
/// (B, L, G, N) with `G` dividing `H`; `z` (B, L, H, P).
///
/// # Panics
/// If the shapes disagree (the message names the argument and both shapes).
#[track_caller]
pub fn selective_scan2(
    tape: &mut Tape,
    x: Var,
    delta: Var,
    a_log: Var,
    b: Var,
    c: Var,
    d: Option<Var>,
    z: Option<Var>,
    delta_bias: Option<Var>,
    softplus: bool,
) -> Var {
    scan2(tape, x, delta, a_log, b, c, d, z, delta_bias, None, softplus, false).0
}

/// [`selective_scan2`] from an initial state `h0` (B, H, P, N) (zero when `None`;
/// differentiable), also returning the final state `h_L` (B, H, P, N) — HF's `ssm_state`
/// layout — as a plain tensor through which no gradient flows.
///
/// # Panics
/// As [`selective_scan2`], and if `h0` is not (B, H, P, N).
#[track_caller]
pub fn selective_scan2_with_state(
    tape: &mut Tape,
    x: Var,
    delta: Var,
    a_log: Var,
    b: Var,
    c: Var,
    d: Option<Var>,
    z: Option<Var>,
    delta_bias: Option<Var>,
    h0: Option<Var>,
    softplus: bool,
) -> (Var, Tensor) {
    let (y, h) = scan2(tape, x, delta, a_log, b, c, d, z, delta_bias, h0, softplus, true);
    (y, h.expect("the final state was requested"))
}

#[track_caller]
fn scan2(
    tape: &mut Tape,
    x: Var,
    delta: Var,
    a_log: Var,
    b: Var,
    c: Var,
    d: Option<Var>,
    z: Option<Var>,
    delta_bias: Option<Var>,
    h0: Option<Var>,
    softplus: bool,
    want_state: bool,
) -> (Var, Option<Tensor>) {
    const OP: &str = "selective_scan2";
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
    let dims = Scan2Dims::new(bsz, l, h, p, n).with_groups(g);
    let mut inputs = vec![x, delta, a_log, b, c];
    let opt = Optional::push(&mut inputs, d, z, delta_bias, h0);
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
        delta_softplus: softplus,
        h0: val(h0),
    };
    let mut y = for_overwrite(xv.shape());
    let mut h_last = want_state.then(|| vec![0.0f32; dims.n_bhpn()]);
    mamba2::scan_fwd_auto(&dims, &args, Scan2Out { y: data_mut(&mut y), h_last: h_last.as_deref_mut() });
    pool::give(a);
    let h_last = h_last.map(|s| from_vec(&[bsz, h, p, n], s));
    (tape.push(y, &inputs, Scan2Backward { dims, opt, softplus }), h_last)
}

/// Saved: dims, where the optional inputs are and the softplus flag (the backward recomputes
/// the states).
struct Scan2Backward {
    dims: Scan2Dims,
    opt: Optional,
    softplus: bool,
}

impl Backward for Scan2Backward {
    fn name(&self) -> &'static str {
        "selective_scan2"
    }

    fn backward(&self, inputs: &[&Tensor], _: &Tensor, dout: &Tensor, dinputs: &mut [Option<&mut Tensor>]) {
        let dims = &self.dims;
        let a = neg_exp(data(inputs[2]));
        let [d, z, delta_bias, h0] = self.opt.values(inputs);
        let args = Scan2Args {
            x: data(inputs[0]),
            delta: data(inputs[1]),
            a: &a,
            b: data(inputs[3]),
            c: data(inputs[4]),
            d,
            z,
            delta_bias,
            delta_softplus: self.softplus,
            h0,
        };
        let Slots { required: [dx, ddelta, da_log, db, dc], optional: [dd, dz, ddelta_bias, dh0] } =
            self.opt.slots(dinputs);
        let mut da = pool::take(a.len());
        let (mut s0, mut s1, mut s3, mut s4) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        let grads = Scan2Grads {
            dx: or_scratch(dx, &mut s0, dims.n_blhp()),
            ddelta: or_scratch(ddelta, &mut s1, dims.n_blh()),
            da: &mut da,
            db: or_scratch(db, &mut s3, dims.n_blgn()),
            dc: or_scratch(dc, &mut s4, dims.n_blgn()),
            dd,
            dz,
            ddelta_bias,
            dh0,
        };
        mamba2::scan_bwd_auto(dims, &args, data(dout), None, grads);
        finish_da(da_log, da, a);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::check::{check_op, random};
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
            |t, v| selective_scan1(t, v[0], v[1], v[2], v[3], v[4], Some(v[5]), Some(v[6]), Some(v[7]), true),
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
                let (y, _) = selective_scan1_with_state(
                    t,
                    v[0],
                    v[1],
                    v[2],
                    v[3],
                    v[4],
                    Some(v[5]),
                    Some(v[6]),
                    Some(v[7]),
                    Some(v[8]),
                    true,
                );
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
        let (_, h) = selective_scan1_with_state(
            &mut tape,
            v[0],
            v[1],
            v[2],
            v[3],
            v[4],
            Some(v[5]),
            None,
            None,
            None,
            false,
        );
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
                    let (y, hl) = selective_scan2_with_state(
                        t,
                        v[0],
                        v[1],
                        v[2],
                        v[3],
                        v[4],
                        Some(v[5]),
                        Some(v[6]),
                        Some(v[7]),
                        v.get(8).copied(),
                        true,
                    );
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
        selective_scan1(&mut tape, u, dl, a, b, b, None, None, None, true);
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
        selective_scan2(&mut tape, x, dl, a, b, b, None, None, None, true);
    }
}
