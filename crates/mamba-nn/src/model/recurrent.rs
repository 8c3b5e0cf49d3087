//! Recurrent inference: one token at a time with a fixed-size state, no tape, and no allocation
//! per token (every buffer lives in [`State`]).

use ssm_kernel::conv::{ConvArgs, ConvDims, conv1d_step};
use ssm_kernel::gemm::gemm;
use ssm_kernel::mamba1::{self, Scan1Args, Scan1Dims};
use ssm_kernel::mamba2::{self, Scan2Args, Scan2Dims};

use super::MambaLM;
use crate::config::{Arch, MambaConfig};
use crate::params::{ParamId, ParamStore};
use crate::tensor::data;

/// Parameter ids of one block, looked up once.
#[derive(Clone, Debug)]
struct LayerIds {
    norm: ParamId,
    in_proj: ParamId,
    in_proj_bias: Option<ParamId>,
    /// Absent for the LTI baseline.
    conv_w: Option<ParamId>,
    conv_b: Option<ParamId>,
    /// Mamba-1: x_proj, dt_proj.weight.
    x_proj: Option<ParamId>,
    dt_proj: Option<ParamId>,
    /// dt_proj.bias (Mamba-1) or dt_bias (Mamba-2); absent for the LTI baseline.
    dt_bias: Option<ParamId>,
    /// A_log, or the LTI baseline's `lti_A`.
    a_log: ParamId,
    /// The LTI baseline's `lti_B`, `lti_C`.
    lti_bc: Option<(ParamId, ParamId)>,
    d: ParamId,
    /// Mamba-2 gated norm.
    gnorm: Option<ParamId>,
    out_proj: ParamId,
    out_proj_bias: Option<ParamId>,
}

impl LayerIds {
    fn new(s: &ParamStore, i: usize) -> Self {
        let p = format!("backbone.layers.{i}");
        let id = |n: &str| s.id(&format!("{p}.{n}"));
        let req = |n: &str| id(n).unwrap_or_else(|| panic!("model has no parameter `{p}.{n}`"));
        Self {
            norm: req("norm.weight"),
            in_proj: req("mixer.in_proj.weight"),
            in_proj_bias: id("mixer.in_proj.bias"),
            conv_w: id("mixer.conv1d.weight"),
            conv_b: id("mixer.conv1d.bias"),
            x_proj: id("mixer.x_proj.weight"),
            dt_proj: id("mixer.dt_proj.weight"),
            dt_bias: id("mixer.dt_proj.bias").or_else(|| id("mixer.dt_bias")),
            a_log: id("mixer.A_log").unwrap_or_else(|| req("mixer.lti_A")),
            lti_bc: id("mixer.lti_B").zip(id("mixer.lti_C")),
            d: req("mixer.D"),
            gnorm: id("mixer.norm.weight"),
            out_proj: req("mixer.out_proj.weight"),
            out_proj_bias: id("mixer.out_proj.bias"),
        }
    }
}

/// The recurrent state of a batch of sequences, and the scratch each step reuses.
///
/// Layouts per layer (Hugging Face's cache layouts): `conv[l]` (B, conv_dim, K) — the last K
/// conv inputs, oldest first; `ssm[l]` (B, d_inner, N) for Mamba-1, (B, H, P, N) for Mamba-2.
#[derive(Clone, Debug)]
pub struct State {
    /// Batch size.
    pub batch: usize,
    /// Conv states, one per layer.
    pub conv: Vec<Vec<f32>>,
    /// SSM states, one per layer.
    pub ssm: Vec<Vec<f32>>,
    ids: Vec<LayerIds>,
    /// `A = −exp(A_log)` per layer.
    neg_a: Vec<Vec<f32>>,
    /// Residual stream (B, d), normalised copy (B, d), projections and mixer buffers.
    h: Vec<f32>,
    r: Vec<f32>,
    proj: Vec<f32>,
    xin: Vec<f32>,
    xc: Vec<f32>,
    z: Vec<f32>,
    dbc: Vec<f32>,
    dt: Vec<f32>,
    delta: Vec<f32>,
    bm: Vec<f32>,
    cm: Vec<f32>,
    y: Vec<f32>,
    out: Vec<f32>,
}

/// `out (m, n) = x (m, k) · Wᵀ (+ b)` with `w` (n, k).
///
/// A decode step has a handful of rows, where GEMM's packing costs more than the product: each
/// output is then a SIMD dot product of `x`'s row with one contiguous row of `W`, split over the
/// rayon pool when the matrix is large.
fn linear_rows(x: &[f32], w: &[f32], b: Option<&[f32]>, (m, k, n): (usize, usize, usize), out: &mut [f32]) {
    if m <= 4 {
        matvec_rows(x, w, (m, k, n), out);
    } else {
        gemm((m, k, n), 1.0, x, (k, 1), w, (1, k), 0.0, out, (n, 1));
    }
    if let Some(b) = b {
        for row in out.chunks_exact_mut(n) {
            row.iter_mut().zip(b).for_each(|(o, v)| *o += v);
        }
    }
}

/// `out[r, j] = ⟨x[r, :], w[j, :]⟩` for few rows `r`.
fn matvec_rows(x: &[f32], w: &[f32], (m, k, n): (usize, usize, usize), out: &mut [f32]) {
    use rayon::prelude::*;
    use ssm_kernel::simd::{self, W};
    let dot = |xr: &[f32], wr: &[f32]| -> f32 {
        let (mut a0, mut a1) = (wide::f32x8::ZERO, wide::f32x8::ZERO);
        let mut i = 0;
        while i + 2 * W <= k {
            a0 = simd::load(&xr[i..]).mul_add(simd::load(&wr[i..]), a0);
            a1 = simd::load(&xr[i + W..]).mul_add(simd::load(&wr[i + W..]), a1);
            i += 2 * W;
        }
        while i < k {
            let e = (i + W).min(k);
            a0 = simd::load(&xr[i..e]).mul_add(simd::load(&wr[i..e]), a0);
            i = e;
        }
        (a0 + a1).reduce_add()
    };
    for r in 0..m {
        let xr = &x[r * k..(r + 1) * k];
        let row = &mut out[r * n..(r + 1) * n];
        if n * k >= 1 << 17 {
            row.par_chunks_mut(64).enumerate().for_each(|(c, oc)| {
                for (jj, o) in oc.iter_mut().enumerate() {
                    let j = c * 64 + jj;
                    *o = dot(xr, &w[j * k..(j + 1) * k]);
                }
            });
        } else {
            for (j, o) in row.iter_mut().enumerate() {
                *o = dot(xr, &w[j * k..(j + 1) * k]);
            }
        }
    }
}

/// RMSNorm of each row of `x` over groups of `group` channels: `x · rsqrt(mean(x²) + eps) · w`.
fn rms_rows(x: &[f32], w: &[f32], group: usize, eps: f32, out: &mut [f32]) {
    for (xs, os) in x.chunks_exact(group).zip(out.chunks_exact_mut(group)) {
        let ms = xs.iter().map(|v| v * v).sum::<f32>() / group as f32;
        let r = 1.0 / (ms + eps).sqrt();
        os.copy_from_slice(xs);
        os.iter_mut().for_each(|o| *o *= r);
    }
    let d = w.len();
    for row in out.chunks_exact_mut(d) {
        row.iter_mut().zip(w).for_each(|(o, g)| *o *= g);
    }
}

/// Copies columns `start..start + len` of each of the `m` rows (width `n`) of `src` into `dst`.
fn take_cols(src: &[f32], n: usize, start: usize, len: usize, dst: &mut [f32]) {
    for (s, d) in src.chunks_exact(n).zip(dst.chunks_exact_mut(len)) {
        d.copy_from_slice(&s[start..start + len]);
    }
}

fn silu(v: f32) -> f32 {
    v / (1.0 + (-v).exp())
}

impl State {
    fn new(model: &MambaLM, batch: usize) -> Self {
        let cfg: &MambaConfig = &model.config;
        let s = &model.params;
        let (d, di, n, k) = (cfg.d_model, cfg.d_inner(), cfg.d_state, cfg.d_conv);
        let cd = cfg.conv_dim();
        let ssm_len = match cfg.arch {
            Arch::Mamba1 => batch * di * n,
            Arch::Lti => batch * di,
            Arch::Mamba2 => batch * cfg.nheads() * cfg.headdim * n,
        };
        let ids: Vec<LayerIds> = (0..cfg.n_layer).map(|i| LayerIds::new(s, i)).collect();
        // A = −exp(A_log); the LTI baseline uses its `lti_A` as is.
        let neg_a = ids
            .iter()
            .map(|l| {
                let a = data(s.value(l.a_log));
                if cfg.arch == Arch::Lti { a.to_vec() } else { a.iter().map(|v| -v.exp()).collect() }
            })
            .collect();
        let z = |len: usize| vec![0.0f32; len];
        Self {
            batch,
            conv: (0..cfg.n_layer).map(|_| z(batch * cd * k)).collect(),
            ssm: (0..cfg.n_layer).map(|_| z(ssm_len)).collect(),
            ids,
            neg_a,
            h: z(batch * d),
            r: z(batch * d),
            proj: z(batch * cfg.in_proj_dim()),
            xin: z(batch * cd),
            xc: z(batch * cd),
            z: z(batch * di),
            dbc: z(batch * (cfg.dt_rank + 2 * n).max(1)),
            dt: z(batch * cfg.dt_rank.max(cfg.nheads())),
            delta: z(batch * di.max(cfg.nheads())),
            bm: z(batch * cfg.ngroups.max(1) * n),
            cm: z(batch * cfg.ngroups.max(1) * n),
            y: z(batch * di),
            out: z(batch * d),
        }
    }

    /// Resets every sequence to the empty state.
    pub fn reset(&mut self) {
        self.conv.iter_mut().chain(self.ssm.iter_mut()).for_each(|v| v.fill(0.0));
    }
}

impl MambaLM {
    /// A zero state for `batch` sequences.
    pub fn new_state(&self, batch: usize) -> State {
        State::new(self, batch)
    }

    /// Feeds one token per sequence (`ids`, length B) through the model, updating `state`, and
    /// writes the next-token logits (B, V) into `logits`. Allocates nothing.
    ///
    /// # Panics
    /// If `ids.len()` or `logits.len()` does not match the state's batch, or an id is outside
    /// the vocabulary.
    #[track_caller]
    pub fn step(&self, ids: &[usize], state: &mut State, logits: &mut [f32]) {
        let cfg = &self.config;
        let s = &self.params;
        let bsz = state.batch;
        let (d, di, n, v) = (cfg.d_model, cfg.d_inner(), cfg.d_state, cfg.vocab_size);
        assert_eq!(ids.len(), bsz, "step: {} ids for a state of batch {bsz}", ids.len());
        assert_eq!(
            logits.len(),
            bsz * v,
            "step: logits buffer of {} for (B, V) = ({bsz}, {v})",
            logits.len()
        );
        let emb = data(s.value(s.id("backbone.embeddings.weight").expect("embedding")));
        for (b, &id) in ids.iter().enumerate() {
            assert!(id < v, "step: token id {id} is outside the vocabulary (size {v})");
            state.h[b * d..(b + 1) * d].copy_from_slice(&emb[id * d..(id + 1) * d]);
        }
        for l in 0..cfg.n_layer {
            let li = state.ids[l].clone();
            let val = |id: ParamId| data(s.value(id));
            rms_rows(&state.h, val(li.norm), d, cfg.norm_eps, &mut state.r);
            let pd = cfg.in_proj_dim();
            linear_rows(&state.r, val(li.in_proj), li.in_proj_bias.map(val), (bsz, d, pd), &mut state.proj);
            let cd = cfg.conv_dim();
            let (xstart, zstart) = match cfg.arch {
                Arch::Mamba1 | Arch::Lti => (0, di),
                Arch::Mamba2 => (di, 0),
            };
            take_cols(&state.proj, pd, xstart, cd, &mut state.xin[..bsz * cd]);
            if cfg.arch != Arch::Lti {
                take_cols(&state.proj, pd, zstart, di, &mut state.z);
            }
            match li.conv_w {
                Some(cw) => {
                    let cdims = ConvDims::new(bsz, 1, cd, cfg.d_conv);
                    let cargs = ConvArgs {
                        x: &state.xin[..bsz * cd],
                        weight: val(cw),
                        bias: li.conv_b.map(val),
                        silu: true,
                    };
                    conv1d_step(&cdims, &cargs, &mut state.conv[l], &mut state.xc[..bsz * cd]);
                }
                // The LTI baseline has no convolution.
                None => state.xc[..bsz * cd].copy_from_slice(&state.xin[..bsz * cd]),
            }
            match cfg.arch {
                Arch::Mamba1 => {
                    let r = cfg.dt_rank;
                    let xp = li.x_proj.expect("Mamba-1 x_proj");
                    linear_rows(&state.xc[..bsz * di], val(xp), None, (bsz, di, r + 2 * n), &mut state.dbc);
                    take_cols(&state.dbc, r + 2 * n, 0, r, &mut state.dt[..bsz * r]);
                    take_cols(&state.dbc, r + 2 * n, r, n, &mut state.bm[..bsz * n]);
                    take_cols(&state.dbc, r + 2 * n, r + n, n, &mut state.cm[..bsz * n]);
                    let dtp = li.dt_proj.expect("Mamba-1 dt_proj");
                    linear_rows(
                        &state.dt[..bsz * r],
                        val(dtp),
                        None,
                        (bsz, r, di),
                        &mut state.delta[..bsz * di],
                    );
                    let dims = Scan1Dims::new(bsz, 1, di, n);
                    let args = Scan1Args {
                        u: &state.xc[..bsz * di],
                        delta: &state.delta[..bsz * di],
                        a: &state.neg_a[l],
                        b: &state.bm[..bsz * n],
                        c: &state.cm[..bsz * n],
                        d: Some(val(li.d)),
                        z: Some(&state.z),
                        delta_bias: li.dt_bias.map(val),
                        delta_softplus: true,
                        h0: None,
                    };
                    mamba1::scan_step(&dims, &args, &mut state.ssm[l], &mut state.y);
                }
                Arch::Lti => {
                    let (bid, cid) = li.lti_bc.expect("LTI lti_B / lti_C");
                    let (a, bv, cv, dv) = (&state.neg_a[l], val(bid), val(cid), val(li.d));
                    let h = &mut state.ssm[l];
                    for b in 0..bsz {
                        for k in 0..di {
                            let (i, x) = (b * di + k, state.xc[b * di + k]);
                            h[i] = a[k] * h[i] + bv[k] * x;
                            state.y[i] = cv[k] * h[i] + dv[k] * x;
                        }
                    }
                }
                Arch::Mamba2 => {
                    let (g, h, p) = (cfg.ngroups, cfg.nheads(), cfg.headdim);
                    take_cols(&state.xc[..bsz * cd], cd, 0, di, &mut state.y);
                    take_cols(&state.xc[..bsz * cd], cd, di, g * n, &mut state.bm[..bsz * g * n]);
                    take_cols(&state.xc[..bsz * cd], cd, di + g * n, g * n, &mut state.cm[..bsz * g * n]);
                    take_cols(&state.proj, pd, di + cd, h, &mut state.delta[..bsz * h]);
                    let dims = Scan2Dims::new(bsz, 1, h, p, n).with_groups(g);
                    // The scan reads x from `xin` (free now) and writes y into `y`.
                    state.xin[..bsz * di].copy_from_slice(&state.y);
                    let args = Scan2Args {
                        x: &state.xin[..bsz * di],
                        delta: &state.delta[..bsz * h],
                        a: &state.neg_a[l],
                        b: &state.bm[..bsz * g * n],
                        c: &state.cm[..bsz * g * n],
                        d: Some(val(li.d)),
                        z: None,
                        delta_bias: li.dt_bias.map(val),
                        delta_softplus: true,
                        h0: None,
                    };
                    mamba2::scan_step(&dims, &args, &mut state.ssm[l], &mut state.y);
                    // Gated RMSNorm over groups of d_inner / G channels.
                    for (yv, zv) in state.y.iter_mut().zip(&state.z) {
                        *yv *= silu(*zv);
                    }
                    state.xin[..bsz * di].copy_from_slice(&state.y);
                    let gw = val(li.gnorm.expect("Mamba-2 norm"));
                    rms_rows(&state.xin[..bsz * di], gw, di / g, cfg.norm_eps, &mut state.y);
                }
            }
            linear_rows(&state.y, val(li.out_proj), li.out_proj_bias.map(val), (bsz, di, d), &mut state.out);
            state.h.iter_mut().zip(&state.out).for_each(|(h, o)| *h += o);
        }
        let nf = data(s.value(s.id("backbone.norm_f.weight").expect("norm_f")));
        rms_rows(&state.h, nf, d, cfg.norm_eps, &mut state.r);
        let head =
            if cfg.tie_embeddings { emb } else { data(s.value(s.id("lm_head.weight").expect("lm_head"))) };
        linear_rows(&state.r, head, None, (bsz, d, v), logits);
    }

    /// Greedy continuation of one prompt: prefills `prompt` through the full forward
    /// ([`MambaLM::prefill`]), then appends the argmax token `n_new` times with [`MambaLM::step`].
    /// Returns the new tokens and the logits of each generation step ((n_new, V), row-major).
    ///
    /// # Panics
    /// If the prompt is empty or holds an id outside the vocabulary.
    #[track_caller]
    pub fn generate_greedy(&self, prompt: &[usize], n_new: usize) -> (Vec<usize>, Vec<f32>) {
        let v = self.config.vocab_size;
        assert!(!prompt.is_empty(), "generate_greedy: empty prompt");
        let (all_logits, mut state) = self.prefill(prompt, 1, prompt.len());
        let mut logits = data(&all_logits)[(prompt.len() - 1) * v..].to_vec();
        let mut out = Vec::with_capacity(n_new);
        let mut all = Vec::with_capacity(n_new * v);
        for i in 0..n_new {
            all.extend_from_slice(&logits);
            let next = argmax(&logits);
            out.push(next);
            if i + 1 < n_new {
                self.step(&[next], &mut state, &mut logits);
            }
        }
        (out, all)
    }
}

/// Index of the largest value (the first one on ties).
pub fn argmax(v: &[f32]) -> usize {
    v.iter()
        .enumerate()
        .fold((0, f32::NEG_INFINITY), |best, (i, &x)| if x > best.1 { (i, x) } else { best })
        .0
}
