//! Mamba's causal depthwise `conv1d` (+ bias, optional fused SiLU), on
//! [`ssm_kernel::conv`].

use ssm_kernel::conv::{
    ConvArgs, ConvDims, ConvGrads, ConvOut, conv_state_bwd, conv1d_bwd, conv1d_bwd_from, conv1d_fwd,
    conv1d_fwd_from,
};

use ssm_kernel::pool::F32Buf;

use super::{Resets, check_resets};
use crate::tape::{Backward, InputGrad, InputList, Slot, Tape, Var, grad_or_scratch};
use crate::tensor::{Tensor, data, data_mut, for_overwrite};

/// `y[b, t, c] = bias[c] + Σ_k w[c, k] · x[b, t − (K−1) + k, c]` (x = 0 before the start), then
/// `y ← silu(y)` when `silu` is set: PyTorch's `Conv1d(C, C, K, groups=C, padding=K−1)` cut to
/// the first `L` outputs.
///
/// Shapes: `x` (B, L, C) channels-last, `w` (C, 1, K) as Hugging Face stores `conv1d.weight`, or
/// (C, K); `bias` (C); `y` (B, L, C); `resets` (B, L), optional document starts (see
/// [`Resets`]): `x` counts as zero before the start of each output's document; `state0`
/// (B, C, K), optional and differentiable, the conv state the sequence continues from (the last
/// `K` inputs before it, oldest first, as a decoder's cache holds them) in place of zeros;
/// `dstate_last` (B, C, K), optional: a gradient of the conv state after the sequence (as
/// [`ssm_kernel::conv::conv_state_from`] takes it) that the backward adds into those of `x`
/// and `state0` — the loss has a term `⟨dstate_last, state_L⟩`.
///
/// # Panics
/// If the shapes disagree (the message names them).
#[track_caller]
pub fn conv1d(
    tape: &mut Tape,
    x: Var,
    w: Var,
    bias: Option<Var>,
    silu: bool,
    resets: Option<&Resets>,
    state0: Option<Var>,
    dstate_last: Option<Vec<f32>>,
) -> Var {
    let (xv, wv) = (tape.value(x), tape.value(w));
    assert_eq!(xv.ndim(), 3, "conv1d: x must be (B, L, C), got {:?}", xv.shape());
    let (bsz, l, c) = (xv.shape()[0], xv.shape()[1], xv.shape()[2]);
    let k = match *wv.shape() {
        [wc, 1, k] | [wc, k] if wc == c => k,
        _ => panic!(
            "conv1d: weight must be ({c}, 1, K) or ({c}, K) for x {:?}, got {:?}",
            xv.shape(),
            wv.shape()
        ),
    };
    let bv = bias.map(|b| tape.value(b));
    if let Some(bv) = bv {
        assert_eq!(
            bv.shape(),
            &[c],
            "conv1d: bias must be ({c}) for x {:?}, got {:?}",
            xv.shape(),
            bv.shape()
        );
    }
    check_resets("conv1d", resets, bsz, l);
    if let Some(s) = state0 {
        let sv = tape.value(s);
        assert_eq!(
            sv.shape(),
            &[bsz, c, k],
            "conv1d: state0 must be (B, C, K) = ({bsz}, {c}, {k}), got {:?}",
            sv.shape()
        );
    }
    if let Some(d) = &dstate_last {
        assert_eq!(
            d.len(),
            bsz * c * k,
            "conv1d: dstate_last must be (B, C, K) = ({bsz}, {c}, {k}), got {} values",
            d.len()
        );
    }
    let dims = ConvDims::new(bsz, l, c, k);
    let args =
        ConvArgs { x: data(xv), weight: data(wv), bias: bv.map(data), silu, resets: resets.map(|r| &r[..]) };
    // The kernel writes every output.
    let mut y = for_overwrite(xv.shape());
    let out = ConvOut { y: data_mut(&mut y), state_out: None };
    match state0 {
        Some(s) => conv1d_fwd_from(&dims, &args, data(tape.value(s)), out),
        None => conv1d_fwd(&dims, &args, out),
    }
    let mut inputs = InputList::new();
    let at = ConvInputs {
        x: inputs.push(x),
        w: inputs.push(w),
        bias: inputs.push_opt(bias),
        state0: inputs.push_opt(state0),
    };
    tape.push(y, inputs.vars(), Conv1dBackward { at, dims, silu, resets: resets.cloned(), dstate_last })
}

/// Where `conv1d`'s inputs sit in its input list.
#[derive(Clone, Copy, Debug)]
struct ConvInputs {
    x: Slot,
    w: Slot,
    bias: Option<Slot>,
    state0: Option<Slot>,
}

/// Saved: the inputs' positions, the dims, the SiLU flag (the kernel recomputes the
/// pre-activation from `x`) and the final state's given gradient.
struct Conv1dBackward {
    at: ConvInputs,
    dims: ConvDims,
    silu: bool,
    resets: Option<Resets>,
    dstate_last: Option<Vec<f32>>,
}

impl Backward for Conv1dBackward {
    fn name(&self) -> &'static str {
        "conv1d"
    }

    fn reads_output(&self) -> bool {
        false
    }

    /// `ssm_kernel::conv::conv1d_bwd`, which adds into every gradient (fresh buffers are zeroed
    /// first).
    fn backward(&self, inputs: &[&Tensor], _: &Tensor, dout: &Tensor, grads: &mut [Option<InputGrad<'_>>]) {
        let (dims, at) = (&self.dims, self.at);
        let args = ConvArgs {
            x: data(at.x.value(inputs)),
            weight: data(at.w.value(inputs)),
            bias: at.bias.map(|b| data(b.value(inputs))),
            silu: self.silu,
            resets: self.resets.as_deref(),
        };
        let (mut sx, mut sw) = (F32Buf::default(), F32Buf::default());
        let dx = grad_or_scratch(at.x.grad(grads), &mut sx, dims.n_blc());
        let dweight = grad_or_scratch(at.w.grad(grads), &mut sw, dims.n_ck());
        let dbias = at.bias.and_then(|b| b.grad(grads)).map(InputGrad::zero_if_overwrite);
        let g = ConvGrads { dx: &mut *dx, dweight, dbias };
        let mut dstate0 = at.state0.and_then(|s| s.grad(grads)).map(InputGrad::zero_if_overwrite);
        match at.state0 {
            Some(s) => {
                let ds0 = dstate0.as_deref_mut();
                conv1d_bwd_from(dims, &args, data(s.value(inputs)), data(dout), g, ds0);
            }
            None => conv1d_bwd(dims, &args, data(dout), g),
        }
        if let Some(dst) = &self.dstate_last {
            conv_state_bwd(dims, dst, (dims.channels, 0), args.resets, dx, dstate0);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::check::{check_accumulates, check_op, random};
    use crate::params::ParamStore;
    use crate::tensor::zeros;

    /// f64 reference: the causal depthwise conv written out, then optional SiLU.
    fn reference(
        x: &[f64],
        w: &[f64],
        b: Option<&[f64]>,
        (bsz, l, c, k): (usize, usize, usize, usize),
        silu: bool,
    ) -> Vec<f64> {
        let mut y = vec![0.0; bsz * l * c];
        for bi in 0..bsz {
            for t in 0..l {
                for ch in 0..c {
                    let mut acc = b.map_or(0.0, |b| b[ch]);
                    for j in 0..k {
                        if let Some(src) = (t + j).checked_sub(k - 1) {
                            acc += w[ch * k + j] * x[(bi * l + src) * c + ch];
                        }
                    }
                    y[(bi * l + t) * c + ch] = if silu { acc / (1.0 + (-acc).exp()) } else { acc };
                }
            }
        }
        y
    }

    #[test]
    fn backward_matches_finite_differences() {
        let (bsz, l, c, k) = (2, 7, 5, 4);
        for (silu, with_bias, three_d) in [(true, true, true), (false, false, false), (true, false, false)] {
            let wshape: Vec<usize> = if three_d { vec![c, 1, k] } else { vec![c, k] };
            let mut inputs = vec![random(&[bsz, l, c], 1), random(&wshape, 2)];
            if with_bias {
                inputs.push(random(&[c], 3));
            }
            check_op(
                inputs,
                |t, v| conv1d(t, v[0], v[1], v.get(2).copied(), silu, None, None, None),
                |x| reference(&x[0], &x[1], x.get(2).map(|b| b.as_slice()), (bsz, l, c, k), silu),
                1e-4,
            );
        }
    }

    #[test]
    fn continuing_from_a_state_matches_finite_differences() {
        // The state's last K − 1 inputs stand before the sequence: the reference runs on them
        // prepended and keeps the last L outputs; its gradient is checked too.
        let (bsz, l, c, k) = (2, 6, 3, 4);
        let inputs = vec![random(&[bsz, l, c], 4), random(&[c, k], 5), random(&[bsz, c, k], 6)];
        check_op(
            inputs,
            |t, v| conv1d(t, v[0], v[1], None, true, None, Some(v[2]), None),
            |x| {
                let lp = l + k - 1;
                let mut xp = vec![0.0; bsz * lp * c];
                for b in 0..bsz {
                    for j in 0..k - 1 {
                        for ch in 0..c {
                            xp[(b * lp + j) * c + ch] = x[2][(b * c + ch) * k + j + 1];
                        }
                    }
                    xp[(b * lp + k - 1) * c..(b + 1) * lp * c]
                        .copy_from_slice(&x[0][b * l * c..(b + 1) * l * c]);
                }
                let yp = reference(&xp, &x[1], None, (bsz, lp, c, k), true);
                (0..bsz).flat_map(|b| yp[(b * lp + k - 1) * c..(b + 1) * lp * c].to_vec()).collect()
            },
            1e-4,
        );
    }

    #[test]
    #[should_panic(expected = "conv1d: weight must be (3, 1, K) or (3, K) for x [1, 2, 3], got [4, 1, 4]")]
    fn weight_shape_mismatch_panics() {
        let store = ParamStore::new();
        let mut tape = Tape::new(&store);
        let x = tape.constant(zeros(&[1, 2, 3]));
        let w = tape.constant(zeros(&[4, 1, 4]));
        conv1d(&mut tape, x, w, None, false, None, None, None);
    }

    #[test]
    fn fresh_and_accumulated_gradients() {
        let ins = vec![random(&[2, 7, 5], 1), random(&[5, 1, 4], 2), random(&[5], 3)];
        check_accumulates(ins, |t, v| conv1d(t, v[0], v[1], Some(v[2]), true, None, None, None));
    }
}
