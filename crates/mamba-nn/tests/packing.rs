//! Packed documents: a batch whose rows hold several documents, with the recurrent state reset
//! at each document start, gives every document the logits and the parameter gradients it gets
//! when run alone — for Mamba-1 and Mamba-2, on the sequential and the chunked (SSD) scan. The
//! documents start inside the kernels' SIMD tiles, time blocks and recomputation chunks, and
//! some are one token long.

use mamba_nn::config::MambaConfig;
use mamba_nn::model::{MambaLM, SeqLayout};
use mamba_nn::params::Grads;
use mamba_nn::tape::Tape;
use mamba_nn::tensor::{data, from_vec};
use ssm_kernel::testing::Rng;

const V: usize = 29;

/// Document lengths of each batch row (every row sums to the same `L`).
type Layout = Vec<Vec<usize>>;

/// Random token ids and logit weights for `batch · seqlen` positions.
fn problem(batch: usize, seqlen: usize, seed: u64) -> (Vec<usize>, Vec<f32>) {
    let mut r = Rng(seed);
    let ids = (0..batch * seqlen).map(|_| (r.next_u64() % V as u64) as usize).collect();
    let w = (0..batch * seqlen * V).map(|_| r.uniform(-1.0, 1.0) as f32).collect();
    (ids, w)
}

/// Logits and the parameter gradients of `Σ w · logits` for the packed batch.
fn packed(model: &MambaLM, layout: &Layout, ids: &[usize], w: &[f32]) -> (Vec<f32>, Grads) {
    let (batch, seqlen) = (layout.len(), layout[0].iter().sum::<usize>());
    let mut resets = vec![false; batch * seqlen];
    for (b, docs) in layout.iter().enumerate() {
        let mut t = 0;
        for &len in docs {
            resets[b * seqlen + t] = true;
            t += len;
        }
    }
    let mut tape = Tape::new(&model.params);
    let logits = model.forward_seq(&mut tape, ids, batch, seqlen, &SeqLayout::packed(resets));
    let out = data(tape.value(logits)).to_vec();
    let mut g = Grads::new(&model.params);
    tape.backward_from(logits, from_vec(&[batch, seqlen, V], w.to_vec()), &mut g);
    (out, g)
}

/// The same, running every document alone (batch 1, from a zero state) and summing the
/// gradients.
fn alone(model: &MambaLM, layout: &Layout, ids: &[usize], w: &[f32]) -> (Vec<f32>, Grads) {
    let seqlen = layout[0].iter().sum::<usize>();
    let mut out = vec![f32::NAN; ids.len() * V];
    let mut g = Grads::new(&model.params);
    for (b, docs) in layout.iter().enumerate() {
        let mut t = 0;
        for &len in docs {
            let at = b * seqlen + t;
            let mut tape = Tape::new(&model.params);
            let logits = model.forward(&mut tape, &ids[at..at + len], 1, len);
            out[at * V..(at + len) * V].copy_from_slice(data(tape.value(logits)));
            let seed = from_vec(&[1, len, V], w[at * V..(at + len) * V].to_vec());
            tape.backward_from(logits, seed, &mut g);
            t += len;
        }
    }
    (out, g)
}

fn check(name: &str, cfg: MambaConfig, layout: Layout) {
    let model = MambaLM::new(cfg, 5).unwrap();
    let (batch, seqlen) = (layout.len(), layout[0].iter().sum::<usize>());
    assert!(layout.iter().all(|docs| docs.iter().sum::<usize>() == seqlen));
    let (ids, w) = problem(batch, seqlen, 11);
    let (lp, gp) = packed(&model, &layout, &ids, &w);
    let (la, ga) = alone(&model, &layout, &ids, &w);
    let dl = lp.iter().zip(&la).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
    assert!(dl <= 1e-5, "{name}: packed logits differ from each document alone by {dl:e}");
    let mut checked = 0;
    for (id, p) in model.params.iter() {
        let (got, want) = (data(gp.get(id)), data(ga.get(id)));
        let scale = want.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        let diff = got.iter().zip(want).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
        assert!(
            diff <= 1e-4 * scale.max(1e-6),
            "{name}: gradient of {} differs from the documents' sum by {diff:e} (scale {scale:e})",
            p.name
        );
        checked += usize::from(scale > 0.0);
    }
    assert!(checked > 5, "{name}: only {checked} parameters had a gradient");
}

/// Two rows: documents starting inside a 16-step time block, across a 32-step chunk boundary,
/// and of length 1.
fn layout(seqlen: usize) -> Layout {
    let row0 = vec![37, 1, 21, seqlen - 59];
    let row1 = vec![1, 1, 15, 33, seqlen - 50];
    vec![row0, row1]
}

#[test]
fn mamba1_packed_documents_equal_each_alone() {
    // d_inner 80: five 16-channel tiles, the last block of the scan partly filled.
    let cfg = MambaConfig::mamba1(V, 40, 2);
    check("mamba1", cfg, layout(75));
}

#[test]
fn mamba2_sequential_packed_documents_equal_each_alone() {
    let mut cfg = MambaConfig::mamba2(V, 32, 2);
    (cfg.d_state, cfg.headdim, cfg.ngroups, cfg.chunk_size) = (8, 16, 2, 8);
    check("mamba2 sequential", cfg, layout(75));
}

#[test]
fn mamba2_ssd_packed_documents_equal_each_alone() {
    // N·P = 8192 and L ≥ 64: the backward runs the chunked SSD kernel on the packed rows
    // (chunks of 16, so documents start inside chunks), the sequential one on the short
    // documents alone.
    let mut cfg = MambaConfig::mamba2(V, 64, 1);
    (cfg.d_state, cfg.headdim, cfg.ngroups, cfg.chunk_size) = (128, 64, 1, 16);
    assert!(ssm_kernel::mamba2::use_ssd(&ssm_kernel::mamba2::Scan2Dims::new(2, 75, 2, 64, 128), true));
    check("mamba2 ssd", cfg, layout(75));
}

#[test]
fn without_resets_the_documents_leak_into_each_other() {
    // The test above can fail: the same packed rows without the starts differ from each alone.
    let model = MambaLM::new(MambaConfig::mamba1(V, 40, 2), 5).unwrap();
    let lay = layout(75);
    let (ids, w) = problem(2, 75, 11);
    let mut tape = Tape::inference(&model.params);
    let logits = model.forward(&mut tape, &ids, 2, 75);
    let plain = data(tape.value(logits)).to_vec();
    let (la, _) = alone(&model, &lay, &ids, &w);
    let dl = plain.iter().zip(&la).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
    assert!(dl > 1e-3, "documents did not interact without resets ({dl:e})");
}
