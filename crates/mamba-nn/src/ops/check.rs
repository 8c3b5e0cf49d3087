//! Finite-difference checking of op backwards (tests only).

use crate::params::{Grads, ParamStore};
use crate::tape::{Tape, Var};
use crate::tensor::{Tensor, data, from_vec};

/// A tensor of `shape` with deterministic values in (−1, 1).
pub fn random(shape: &[usize], seed: u64) -> Tensor {
    let n: usize = shape.iter().product();
    let mut rng = ssm_kernel::testing::Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ 0xD1B5);
    from_vec(shape, rng.vec(n, -1.0, 1.0).into_iter().map(|v| v as f32).collect())
}

/// Checks an op's backward: builds it on leaves holding `inputs`, back-propagates a fixed random
/// weighting `w` of its output (loss = Σ w·y), and compares every input's gradient with central
/// differences (in f64) of `reference`, an f64 re-implementation of the forward on the flattened
/// inputs. Also checks the f32 forward against the reference. Tolerance: per tensor,
/// `max|Δ| ≤ tol · max(max|want|, 1e-3)`.
#[track_caller]
pub fn check_op(
    inputs: Vec<Tensor>,
    build: impl Fn(&mut Tape, &[Var]) -> Var,
    reference: impl Fn(&[Vec<f64>]) -> Vec<f64>,
    tol: f64,
) {
    let store = ParamStore::new();
    let mut tape = Tape::new(&store);
    let vars: Vec<Var> = inputs.iter().map(|t| tape.leaf(t.clone())).collect();
    let out = build(&mut tape, &vars);
    let x64: Vec<Vec<f64>> = inputs.iter().map(|t| data(t).iter().map(|&v| v as f64).collect()).collect();
    let y_ref = reference(&x64);
    let y = data(tape.value(out)).to_vec();
    ssm_kernel::testing::assert_rel_max("forward", &y, &y_ref, 1e-5, 1.0);
    let w = random(tape.value(out).shape(), 99);
    let w64: Vec<f64> = data(&w).iter().map(|&v| v as f64).collect();
    let mut grads = Grads::new(&store);
    tape.backward_from(out, w, &mut grads);
    let eps = 1e-6;
    for (i, v) in vars.iter().enumerate() {
        let got = tape.grad(*v).map(|g| data(g).to_vec()).unwrap_or_else(|| vec![0.0; inputs[i].len()]);
        let want = ssm_kernel::testing::numeric_grad(&x64[i], eps, |xi| {
            let mut xs = x64.clone();
            xs[i] = xi.to_vec();
            ssm_kernel::testing::dot(&w64, &reference(&xs))
        });
        ssm_kernel::testing::assert_rel_max(&format!("d(input {i})"), &got, &want, tol, 1e-3);
    }
}

/// Checks that an op's backward honours both modes of its [`InputGrad`](crate::tape::InputGrad)s:
/// it **overwrites** a fresh gradient buffer (the tape hands the first gradient of a value over
/// in a recycled buffer, NaN-poisoned in test builds) and **adds** to one that already holds a
/// gradient. The gradients of `op(x) + op(x)` — the later use of every input (back-propagated
/// first) overwrites, the other accumulates — must be exactly twice those of `op(x)`.
#[track_caller]
pub fn check_accumulates(inputs: Vec<Tensor>, op: impl Fn(&mut Tape, &[Var]) -> Var) {
    let grads_of = |twice: bool| {
        let store = ParamStore::new();
        let mut tape = Tape::new(&store);
        let vars: Vec<Var> = inputs.iter().map(|t| tape.leaf(t.clone())).collect();
        let mut out = op(&mut tape, &vars);
        if twice {
            let again = op(&mut tape, &vars);
            out = crate::ops::add(&mut tape, out, again);
        }
        let seed = random(tape.value(out).shape(), 5);
        tape.backward_from(out, seed, &mut Grads::new(&store));
        vars.iter().map(|v| tape.grad(*v).map(|g| data(g).to_vec()).unwrap_or_default()).collect::<Vec<_>>()
    };
    let (once, twice) = (grads_of(false), grads_of(true));
    for (i, (a, b)) in once.iter().zip(&twice).enumerate() {
        let want: Vec<f64> = a.iter().map(|&v| 2.0 * v as f64).collect();
        ssm_kernel::testing::assert_rel_max(&format!("accumulated d(input {i})"), b, &want, 1e-6, 1e-6);
    }
}
