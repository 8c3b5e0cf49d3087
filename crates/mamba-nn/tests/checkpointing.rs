//! Activation checkpointing (`Backbone::checkpoint_layers`) changes memory, not results: the
//! loss and every parameter gradient equal those of the plain tape, for every architecture,
//! with packed documents, and with LoRA adapters on a frozen model (where the blocks' inputs
//! need no gradient but their adapters do).

use mamba_nn::config::{Arch, MambaConfig};
use mamba_nn::model::{LoraConfig, MambaLM, SeqLayout};
use mamba_nn::params::Grads;
use mamba_nn::tape::Tape;
use mamba_nn::tensor::data;

const V: usize = 37;

fn ids(n: usize) -> Vec<usize> {
    (0..n).map(|i| (i * 11 + 5) % V).collect()
}

/// Loss and gradients of one packed batch (B 2, L 40), with or without checkpointing, and how
/// many values the tape held.
fn run(model: &MambaLM, checkpoint: bool) -> (f32, Grads, usize) {
    let mut m = model.clone();
    m.backbone.checkpoint_layers = checkpoint;
    let (b, l) = (2, 40);
    let x = ids(b * l);
    let resets: Vec<bool> = (0..b * l).map(|i| i % l == 17 || i % l == 18).collect();
    let mut tape = Tape::new(&m.params);
    let (_, loss) = m.forward_loss_seq(&mut tape, &x, b, l, &SeqLayout::packed(resets));
    let value = data(tape.value(loss))[0];
    let len = tape.len();
    let mut g = Grads::new(&m.params);
    tape.backward(loss, &mut g);
    (value, g, len)
}

fn check(name: &str, model: &MambaLM) {
    let (l0, g0, n0) = run(model, false);
    let (l1, g1, n1) = run(model, true);
    assert_eq!(l0, l1, "{name}: loss");
    assert!(n1 < n0 / 2, "{name}: the checkpointed tape holds {n1} values, the plain one {n0}");
    let mut nonzero = 0;
    for (id, p) in model.params.trainable() {
        let (a, b) = (data(g0.get(id)), data(g1.get(id)));
        let scale = a.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        let diff = a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0f32, f32::max);
        assert!(
            diff <= 1e-6 * scale.max(1e-6),
            "{name}: gradient of {} differs by {diff:e} (scale {scale:e})",
            p.name
        );
        nonzero += usize::from(scale > 0.0);
    }
    assert!(nonzero > 0, "{name}: no gradient at all");
}

#[test]
fn checkpointed_blocks_give_the_plain_gradients() {
    let m1 = MambaConfig::mamba1(V, 24, 3);
    let mut m2 = MambaConfig::mamba2(V, 32, 2);
    (m2.d_state, m2.headdim, m2.ngroups, m2.chunk_size) = (8, 16, 2, 8);
    for (name, cfg) in [("mamba1", m1), ("mamba2", m2)] {
        check(name, &MambaLM::new(cfg, 3).unwrap());
    }
    // The LTI baseline has no resets: plain rows.
    let lti = MambaLM::new(MambaConfig { arch: Arch::Lti, ..MambaConfig::mamba1(V, 24, 2) }, 4).unwrap();
    let x = ids(60);
    let grads = |checkpoint: bool| {
        let mut m = lti.clone();
        m.backbone.checkpoint_layers = checkpoint;
        let mut tape = Tape::new(&m.params);
        let (_, loss) = m.forward_loss(&mut tape, &x, 2, 30);
        let mut g = Grads::new(&m.params);
        tape.backward(loss, &mut g);
        g
    };
    let (a, b) = (grads(false), grads(true));
    for (id, p) in lti.params.trainable() {
        assert_eq!(data(a.get(id)), data(b.get(id)), "lti: gradient of {}", p.name);
    }
}

#[test]
fn checkpointed_blocks_train_lora_adapters_of_a_frozen_model() {
    let mut m = MambaLM::new(MambaConfig::mamba1(V, 24, 2), 5).unwrap();
    let cfg =
        LoraConfig { rank: 2, alpha: 4.0, targets: vec!["in_proj".into(), "x_proj".into()], rslora: false };
    m.add_lora(&cfg, 1).unwrap();
    // Make the adapters non-trivial (B starts at zero).
    for (id, p) in m.params.trainable().map(|(id, p)| (id, p.name.clone())).collect::<Vec<_>>() {
        if p.contains("lora_B") {
            m.params.value_mut(id).iter_mut().enumerate().for_each(|(i, v)| *v = 0.01 * (i % 7) as f32);
        }
    }
    check("mamba1 + LoRA", &m);
}

#[test]
fn releasing_values_in_the_backward_keeps_the_gradients() {
    let model = MambaLM::new(MambaConfig::mamba1(V, 24, 2), 7).unwrap();
    let x = ids(2 * 30);
    let run = |release: bool| {
        let mut tape = Tape::new(&model.params);
        if release {
            tape.release_values_in_backward();
        }
        let (logits, loss) = model.forward_loss(&mut tape, &x, 2, 30);
        let mut g = Grads::new(&model.params);
        tape.backward(loss, &mut g);
        (g, tape.value(logits).len())
    };
    let ((kept, n_kept), (released, n_released)) = (run(false), run(true));
    assert_eq!((n_kept, n_released), (2 * 30 * V, 0), "values after the backward");
    for (id, p) in model.params.trainable() {
        assert_eq!(data(kept.get(id)), data(released.get(id)), "gradient of {}", p.name);
    }
}

/// A long window recomputed in pieces (`Backbone::checkpoint_piece`), each seeded with the
/// gradient of the next one's initial state, gives the plain loss and gradients: pieces longer
/// and shorter than the conv (one position each), boundaries on, next to and between document
/// starts — Mamba-1; mixers without final-state gradients (Mamba-2) recompute whole blocks.
#[test]
fn checkpointed_blocks_recomputed_in_pieces_give_the_plain_gradients() {
    let (b, l) = (2, 40);
    let x = ids(b * l);
    let resets: Vec<bool> = (0..b * l).map(|i| matches!(i % l, 17 | 18 | 20) || i == l + 33).collect();
    let mut m2 = MambaConfig::mamba2(V, 32, 2);
    (m2.d_state, m2.headdim, m2.ngroups, m2.chunk_size) = (8, 16, 2, 8);
    for (name, cfg) in [("mamba1", MambaConfig::mamba1(V, 24, 3)), ("mamba2", m2)] {
        let model = MambaLM::new(cfg, 8).unwrap();
        let run = |checkpoint: bool, piece: usize| {
            let mut m = model.clone();
            (m.backbone.checkpoint_layers, m.backbone.checkpoint_piece) = (checkpoint, piece);
            let mut tape = Tape::new(&m.params);
            let (_, loss) = m.forward_loss_seq(&mut tape, &x, b, l, &SeqLayout::packed(resets.clone()));
            let value = data(tape.value(loss))[0];
            let mut g = Grads::new(&m.params);
            tape.backward(loss, &mut g);
            (value, g)
        };
        let (l0, g0) = run(false, 0);
        // Pieces of 7 positions (6 pieces), of 1, and of 20.
        for piece in [2 * 7, 2, 2 * 20] {
            let (l1, g1) = run(true, piece);
            assert!(
                (l0 - l1).abs() <= 1e-6 * l0.abs(),
                "{name}, pieces of {piece} tokens: loss {l1} vs {l0}"
            );
            for (id, p) in model.params.trainable() {
                let (a, c) = (data(g0.get(id)), data(g1.get(id)));
                let scale = a.iter().fold(0.0f32, |m, v| m.max(v.abs()));
                let diff = a.iter().zip(c).map(|(u, v)| (u - v).abs()).fold(0.0f32, f32::max);
                assert!(scale > 0.0, "{name}: no gradient for {}", p.name);
                assert!(
                    diff <= 1e-5 * scale,
                    "{name}, pieces of {piece} tokens: gradient of {} differs by {diff:e} (scale {scale:e})",
                    p.name
                );
            }
        }
    }
}
