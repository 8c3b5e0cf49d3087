//! A tutorial in Rust: a Mamba model on continuous sequences, its shapes, the
//! non-selective LTI block, and a tiny training loop with cross-entropy and Adam.
//!
//! ```sh
//! cargo run --release -p mamba-train --example tutorial
//! ```
//!
//! The task: each time step carries 10 random features; the label at step t is the index (of 5)
//! of the largest running sum of the first 5 features over steps 0..=t. Getting it right needs
//! memory of the whole prefix, which is what a state-space model has. The running sums are a
//! linear function of the prefix, so the time-invariant block learns them as well as Mamba does;
//! where selection matters (selective copying, `docs/results.md`) the two part ways.

use mamba_nn::config::{Arch, MambaConfig};
use mamba_nn::model::MambaModel;
use mamba_nn::ops;
use mamba_nn::params::Grads;
use mamba_nn::tape::Tape;
use mamba_nn::tensor::{data, from_vec};
use mamba_train::data::Rng;
use mamba_train::optim::{AdamW, AdamWConfig, clip_grad_norm};

const B: usize = 32;
const L: usize = 50;
const IN: usize = 10;
const OUT: usize = 5;

/// A batch: inputs (B, L, 10) and the label of every step (B·L).
fn batch(rng: &mut Rng) -> (Vec<f32>, Vec<i64>) {
    let x: Vec<f32> = (0..B * L * IN).map(|_| rng.next_f32() * 2.0 - 1.0).collect();
    let mut y = Vec::with_capacity(B * L);
    for b in 0..B {
        let mut sums = [0.0f32; OUT];
        for t in 0..L {
            for (k, s) in sums.iter_mut().enumerate() {
                *s += x[(b * L + t) * IN + k];
            }
            let best = (0..OUT).max_by(|&i, &j| sums[i].total_cmp(&sums[j])).unwrap();
            y.push(best as i64);
        }
    }
    (x, y)
}

fn main() {
    // 1. Shapes: input projection → Mamba blocks → output head.
    let model = MambaModel::new(IN, 64, OUT);
    let mut tape = Tape::inference(&model.params);
    let x = tape.constant(from_vec(&[B, L, IN], vec![0.1; B * L * IN]));
    let y = model.forward(&mut tape, x);
    println!("input {:?} -> output {:?}", [B, L, IN], tape.value(y).shape());
    println!("parameters: {} tensors, {} scalars", model.params.len(), model.params.num_elements());

    // 2. The linear time-invariant block as the mixer (vectors A, B, C, D; h = A·h + B·x,
    //    y = C·h + D·x), the non-selective baseline.
    let lti_cfg = MambaConfig { arch: Arch::Lti, ..MambaConfig::mamba1(OUT, 64, 2) };
    let lti = MambaModel::with_config(lti_cfg, IN, OUT, 0).expect("valid config");
    println!("LTI baseline: {} scalars", lti.params.num_elements());

    // 3. Train both with cross-entropy and AdamW for the same number of steps.
    for (name, mut m) in [("Mamba", model), ("LTI", lti)] {
        let mut opt = AdamW::new(&m.params, AdamWConfig { lr: 3e-3, ..Default::default() });
        let mut grads = Grads::new(&m.params);
        let mut rng = Rng::new(7);
        for step in 1..=150 {
            let (xs, ys) = batch(&mut rng);
            grads.zero();
            let mut tape = Tape::new(&m.params);
            let x = tape.constant(from_vec(&[B, L, IN], xs));
            let logits = m.forward(&mut tape, x);
            let loss = ops::cross_entropy(&mut tape, logits, &ys);
            let value = data(tape.value(loss))[0];
            let acc = mamba_train::tasks::accuracy(data(tape.value(logits)), &ys, OUT);
            tape.backward(loss, &mut grads);
            drop(tape);
            clip_grad_norm(&m.params, &mut grads, 1.0);
            opt.step(&mut m.params, &grads, 3e-3);
            if step % 25 == 0 {
                println!("{name:>5} step {step:>3}  loss {value:.4}  accuracy {:.1}%", 100.0 * acc);
            }
        }
    }
}
