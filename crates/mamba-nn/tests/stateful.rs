//! State carried across windows: a long (packed) sequence run as consecutive windows, each
//! starting from the state the previous one ended in, gives the logits of running it whole —
//! for Mamba-1 and Mamba-2, with document starts inside the windows and a window shorter than
//! the conv — and the initial states are differentiable inputs whose gradient matches finite
//! differences.

use mamba_nn::config::MambaConfig;
use mamba_nn::model::{Cache, MambaLM, SeqLayout};
use mamba_nn::params::Grads;
use mamba_nn::tape::Tape;
use mamba_nn::tensor::{data, from_vec};
use ssm_kernel::testing::Rng;

const V: usize = 23;

fn configs() -> Vec<(&'static str, MambaConfig)> {
    let mut m2 = MambaConfig::mamba2(V, 32, 2);
    (m2.d_state, m2.headdim, m2.ngroups, m2.chunk_size) = (8, 16, 2, 8);
    vec![("mamba1", MambaConfig::mamba1(V, 24, 2)), ("mamba2", m2)]
}

/// Rows of a batch: ids (B, L) and document starts.
fn batch(b: usize, l: usize, seed: u64) -> (Vec<usize>, Vec<bool>) {
    let mut r = Rng(seed);
    let ids = (0..b * l).map(|_| (r.next_u64() % V as u64) as usize).collect();
    let resets = (0..b * l).map(|_| r.uniform(0.0, 1.0) < 0.06).collect();
    (ids, resets)
}

/// A non-trivial recurrent state of `b` sequences: every value uniform in [-1, 1].
fn random_state(model: &MambaLM, b: usize, seed: u64) -> Cache {
    let mut start = Cache::new(model, b);
    let mut r = Rng(seed);
    for layer in &mut start.layers {
        layer.conv.iter_mut().chain(layer.ssm.iter_mut()).for_each(|v| *v = r.uniform(-1.0, 1.0) as f32);
    }
    start
}

/// Columns `t0..t1` of each row of a (B, L) array.
fn cols<T: Copy>(v: &[T], (b, l): (usize, usize), (t0, t1): (usize, usize)) -> Vec<T> {
    (0..b).flat_map(|r| v[r * l + t0..r * l + t1].to_vec()).collect()
}

#[test]
fn windows_carrying_the_state_equal_one_long_forward() {
    let (b, l) = (2, 70);
    for (name, cfg) in configs() {
        let model = MambaLM::new(cfg, 9).unwrap();
        let (ids, resets) = batch(b, l, 3);
        let mut tape = Tape::inference(&model.params);
        let whole = model.forward_seq(&mut tape, &ids, b, l, &SeqLayout::packed(resets.clone()));
        let want = data(tape.value(whole)).to_vec();
        // Windows of uneven lengths, one shorter than the conv's width.
        let mut state = Cache::new(&model, b);
        let mut got = vec![f32::NAN; want.len()];
        let mut t0 = 0;
        for len in [17, 2, 30, 21] {
            let t1 = t0 + len;
            let mut tape = Tape::inference(&model.params);
            let init = state.to_tape(&model, &mut tape, false);
            let seq = SeqLayout::packed(cols(&resets, (b, l), (t0, t1)));
            let mut end = Cache::new(&model, b);
            let y = model.forward_from(
                &mut tape,
                &cols(&ids, (b, l), (t0, t1)),
                (b, len),
                &seq,
                Some(&init),
                Some(&mut end),
            );
            let yv = data(tape.value(y));
            for r in 0..b {
                got[(r * l + t0) * V..(r * l + t1) * V].copy_from_slice(&yv[r * len * V..(r + 1) * len * V]);
            }
            state = end;
            t0 = t1;
        }
        assert_eq!(t0, l);
        let diff = got.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
        assert!(diff <= 1e-5, "{name}: windows differ from the whole sequence by {diff:e}");
    }
}

#[test]
fn initial_state_gradients_match_finite_differences() {
    let (b, l) = (2, 9);
    for (name, cfg) in configs() {
        let model = MambaLM::new(cfg, 4).unwrap();
        let (ids, resets) = batch(b, l, 8);
        let seq = SeqLayout::packed(resets);
        let start = random_state(&model, b, 21);
        let mut r = Rng(22);
        let w: Vec<f32> = (0..b * l * V).map(|_| r.uniform(-1.0, 1.0) as f32).collect();
        // The loss Σ w·logits, accumulated in f64.
        let loss = |st: &Cache| -> f64 {
            let mut tape = Tape::inference(&model.params);
            let init = st.to_tape(&model, &mut tape, false);
            let y = model.forward_from(&mut tape, &ids, (b, l), &seq, Some(&init), None);
            data(tape.value(y)).iter().zip(&w).map(|(&a, &b)| a as f64 * b as f64).sum()
        };
        let mut tape = Tape::new(&model.params);
        let init = start.to_tape(&model, &mut tape, true);
        let y = model.forward_from(&mut tape, &ids, (b, l), &seq, Some(&init), None);
        let mut g = Grads::new(&model.params);
        tape.backward_from(y, from_vec(&[b, l, V], w.clone()), &mut g);
        let eps = 1e-2f32;
        for (li, vars) in init.iter().enumerate() {
            for (what, var) in [("conv", vars.conv), ("ssm", vars.ssm)] {
                let grad = data(tape.grad(var).expect("the initial state is a leaf")).to_vec();
                let scale = grad.iter().fold(0.0f32, |m, v| m.max(v.abs()));
                assert!(scale > 1e-4, "{name}: layer {li} {what} state gets no gradient");
                // Central differences at a spread of coordinates.
                let n = grad.len();
                for i in (0..n).step_by((n / 12).max(1)) {
                    let bump = |d: f32| {
                        let mut st = start.clone();
                        let v = if what == "conv" { &mut st.layers[li].conv } else { &mut st.layers[li].ssm };
                        v[i] += d;
                        loss(&st)
                    };
                    let fd = (bump(eps) - bump(-eps)) / (2.0 * eps as f64);
                    let tol = 2e-3 * scale as f64 + 1e-4;
                    assert!(
                        (grad[i] as f64 - fd).abs() <= tol,
                        "{name}: layer {li} {what}[{i}]: gradient {} vs finite difference {fd}",
                        grad[i]
                    );
                }
            }
        }
    }
}

#[test]
fn checkpointed_blocks_carry_and_differentiate_the_state_too() {
    let (b, l) = (2, 12);
    for (name, cfg) in configs() {
        let model = MambaLM::new(cfg, 6).unwrap();
        let (ids, resets) = batch(b, l, 5);
        let seq = SeqLayout::packed(resets);
        let start = random_state(&model, b, 2);
        let run = |checkpoint: bool, piece: usize| {
            let mut m = model.clone();
            (m.backbone.checkpoint_layers, m.backbone.checkpoint_piece) = (checkpoint, piece);
            let mut tape = Tape::new(&m.params);
            let init = start.to_tape(&m, &mut tape, true);
            let mut end = Cache::new(&m, b);
            let (_, loss) = {
                let y = m.forward_from(&mut tape, &ids, (b, l), &seq, Some(&init), Some(&mut end));
                let targets: Vec<i64> = ids.iter().map(|&t| t as i64).collect();
                (y, mamba_nn::ops::cross_entropy(&mut tape, y, &targets))
            };
            let mut g = Grads::new(&m.params);
            tape.backward(loss, &mut g);
            let dinit: Vec<Vec<f32>> = init
                .iter()
                .flat_map(|i| [i.conv, i.ssm])
                .map(|v| tape.grad(v).map(|t| data(t).to_vec()).unwrap_or_default())
                .collect();
            (g, dinit, end)
        };
        let (g0, d0, e0) = run(false, 0);
        // Whole blocks, then pieces of 5 and of 1 position (for Mamba-1; Mamba-2 recomputes
        // whole blocks).
        for piece in [usize::MAX, 2 * 5, 2] {
            let (g1, d1, e1) = run(true, piece);
            let max_diff =
                |a: &[f32], c: &[f32]| a.iter().zip(c).map(|(x, y)| (x - y).abs()).fold(0.0f32, f32::max);
            let flat = |c: &Cache| {
                c.layers.iter().flat_map(|s| s.conv.iter().chain(&s.ssm)).copied().collect::<Vec<f32>>()
            };
            let de = max_diff(&flat(&e0), &flat(&e1));
            assert!(de <= 1e-6, "{name}, pieces of {piece}: final states differ by {de:e}");
            for (a, c) in d0.iter().zip(&d1) {
                let diff = max_diff(a, c);
                assert!(
                    diff <= 2e-6,
                    "{name}, pieces of {piece}: initial-state gradient differs by {diff:e}"
                );
            }
            for (id, p) in model.params.trainable() {
                let diff = max_diff(data(g0.get(id)), data(g1.get(id)));
                assert!(
                    diff <= 2e-6,
                    "{name}, pieces of {piece}: gradient of {} differs by {diff:e}",
                    p.name
                );
            }
        }
    }
}
