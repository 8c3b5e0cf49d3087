//! Tests of the fused mixer kernels: the forward against an `f64` composition of the reference
//! conv and scan with the gated norm written out, the backward against central differences of
//! that reference, and the overwrite / thread-count / error behaviour.

use proptest::prelude::*;

use super::*;
use crate::conv::{ConvArgs, ConvDims, ConvOut};
use crate::reference::{conv as refconv, mamba2 as ref2};
use crate::testing::{Rng, assert_close, assert_rel_max, cases, dot, numeric_grad, random_resets, to_f32};

/// Owned parameters: conv weight (C, K), conv bias (C), dt_bias, a, d (H), norm weight (d_inner).
#[derive(Clone, Debug)]
struct Params {
    conv_w: Vec<f64>,
    conv_b: Vec<f64>,
    dt_bias: Vec<f64>,
    a: Vec<f64>,
    d: Vec<f64>,
    norm_w: Vec<f64>,
    /// Sequence starts, (B, L).
    resets: Option<Vec<bool>>,
}

/// The f32 parameters (conv_w, conv_b, dt_bias, a, d, norm_w) and the starts.
type P32 = ([Vec<f32>; 6], Option<Vec<bool>>);

const EPS: f64 = 1e-5;

impl Params {
    fn random(dims: &MixerDims, seed: u64) -> Self {
        let mut r = Rng(seed);
        let (c, k, h) = (dims.conv_dim(), dims.width, dims.nheads);
        Self {
            conv_w: r.vec(c * k, -0.6, 0.6),
            conv_b: r.vec(c, -0.3, 0.3),
            dt_bias: r.vec(h, -1.5, 0.5),
            a: r.vec(h, -2.0, -0.3),
            d: r.vec(h, -1.0, 1.0),
            norm_w: r.vec(dims.d_inner(), 0.5, 1.5),
            resets: None,
        }
    }

    /// With random sequence starts.
    fn with_resets(self, dims: &MixerDims, seed: u64) -> Self {
        Self { resets: Some(random_resets(&mut Rng(seed ^ 0x5e7), dims.batch * dims.seqlen)), ..self }
    }

    fn f32(&self) -> P32 {
        let v =
            [&self.conv_w, &self.conv_b, &self.dt_bias, &self.a, &self.d, &self.norm_w].map(|v| to_f32(v));
        (v, self.resets.clone())
    }
}

fn view(p: &P32) -> MixerParams<'_> {
    let (v, resets) = p;
    MixerParams {
        conv_w: &v[0],
        conv_b: Some(&v[1]),
        dt_bias: &v[2],
        a: &v[3],
        d: &v[4],
        norm_w: &v[5],
        eps: EPS as f32,
        resets: resets.as_deref(),
    }
}

/// `f64` reference forward: split the projection, conv + SiLU and scan by the reference
/// kernels, then `y·silu(z)` normalised per group and scaled. Returns (out, rstd, h_last, y).
fn reference(dims: &MixerDims, proj: &[f64], p: &Params) -> (Vec<f64>, Vec<f64>, Vec<f64>, Vec<f64>) {
    let MixerDims { batch, seqlen: l, nheads: h, headdim: pd, dstate: n, ngroups: g, width: k } = *dims;
    let (dp, di, gn, cd, rows) = (dims.proj_dim(), dims.d_inner(), dims.gn(), dims.conv_dim(), batch * l);
    let cols = |src: &[f64], stride: usize, off: usize, w: usize| -> Vec<f64> {
        (0..rows).flat_map(|r| src[r * stride + off..r * stride + off + w].to_vec()).collect()
    };
    let (z, xbc, dt) = (cols(proj, dp, 0, di), cols(proj, dp, di, cd), cols(proj, dp, di + cd, h));
    let mut conv = vec![0.0; rows * cd];
    let resets = p.resets.as_deref();
    let cargs = ConvArgs { x: &xbc, weight: &p.conv_w, bias: Some(&p.conv_b), silu: true, resets };
    refconv::conv1d_fwd(&ConvDims::new(batch, l, cd, k), &cargs, ConvOut { y: &mut conv, state_out: None });
    let (x, b, c) = (cols(&conv, cd, 0, di), cols(&conv, cd, di, gn), cols(&conv, cd, di + gn, gn));
    let sdims = Scan2Dims::new(batch, l, h, pd, n).with_groups(g);
    let args = Scan2Args {
        d: Some(&p.d),
        delta_bias: Some(&p.dt_bias),
        delta_softplus: true,
        resets,
        ..Scan2Args::new(&x, &dt, &p.a, &b, &c)
    };
    let (mut y, mut hl) = (vec![0.0; rows * di], vec![0.0; batch * h * pd * n]);
    ref2::scan_fwd(&sdims, &args, Scan2Out { y: &mut y, h_last: Some(&mut hl) });
    let gs = di / g;
    let (mut out, mut rstd) = (vec![0.0; rows * di], vec![0.0; rows * g]);
    for r in 0..rows {
        for gg in 0..g {
            let c0 = r * di + gg * gs;
            let v: Vec<f64> = (c0..c0 + gs).map(|i| y[i] * z[i] / (1.0 + (-z[i]).exp())).collect();
            let rs = 1.0 / (v.iter().map(|a| a * a).sum::<f64>() / gs as f64 + EPS).sqrt();
            rstd[r * g + gg] = rs;
            for (j, vj) in v.iter().enumerate() {
                out[c0 + j] = vj * rs * p.norm_w[gg * gs + j];
            }
        }
    }
    (out, rstd, hl, y)
}

/// (out, rstd, h_last, y) of the f32 kernel, every buffer starting NaN.
fn fwd32(dims: &MixerDims, proj: &[f32], p: &P32) -> (Vec<f32>, Vec<f32>, Vec<f32>, Vec<f32>) {
    let rows = dims.batch * dims.seqlen;
    let mut out = vec![f32::NAN; rows * dims.d_inner()];
    let mut rstd = vec![f32::NAN; rows * dims.ngroups];
    let mut hl = vec![f32::NAN; dims.batch * dims.nheads * dims.headdim * dims.dstate];
    let mut y = vec![f32::NAN; rows * dims.d_inner()];
    let o = MixerOut { out: &mut out, rstd: &mut rstd, y: Some(&mut y), h_last: Some(&mut hl) };
    mixer_fwd(dims, proj, &view(p), o);
    (out, rstd, hl, y)
}

/// The gradients of `Σ w·out` as one vector per input: proj, conv_w, conv_b, dt_bias, a, d,
/// norm_w. `dproj` starts NaN when `overwrite` (every element must be written), else zero.
fn bwd32(dims: &MixerDims, proj: &[f32], p: &P32, w: &[f32], overwrite: bool) -> Vec<Vec<f32>> {
    let (_, rstd, _, y) = fwd32(dims, proj, p);
    let v = &p.0;
    let mut g: Vec<Vec<f32>> =
        [proj.len(), v[0].len(), v[1].len(), v[2].len(), v[3].len(), v[4].len(), v[5].len()]
            .iter()
            .map(|&n| vec![0.0; n])
            .collect();
    if overwrite {
        g[0].fill(f32::NAN);
    }
    let [dproj, dcw, dcb, ddb, da, dd, dnw] = &mut g[..] else { unreachable!() };
    let grads = MixerGrads {
        dproj,
        overwrite_dproj: overwrite,
        dconv_w: dcw,
        dconv_b: Some(dcb),
        ddt_bias: ddb,
        da,
        dd,
        dnorm_w: dnw,
    };
    mixer_bwd(dims, proj, &view(p), (&rstd, &y), w, grads);
    g
}

fn arb_dims() -> impl Strategy<Value = (MixerDims, u64)> {
    (
        (1usize..=3, prop::sample::select(vec![1usize, 2, 5, 16, 17, 33, 40])),
        (1usize..=2, 1usize..=2),
        prop::sample::select(vec![8usize, 16]),
        prop::sample::select(vec![4usize, 8, 16]),
        1usize..=5,
        any::<u64>(),
    )
        .prop_filter_map("G·N must be a multiple of 8", |((batch, l), (g, hpg), p, n, k, seed)| {
            let dims =
                MixerDims { batch, seqlen: l, nheads: g * hpg, headdim: p, dstate: n, ngroups: g, width: k };
            dims.supported().then_some((dims, seed))
        })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(cases(24)))]

    /// Odd L (inside and across the 16-step blocks), 1–3 batch rows, 1–2 groups, K 1–5.
    #[test]
    fn prop_fwd_matches_reference((dims, seed) in arb_dims()) {
        let proj = Rng(seed ^ 1).vec(dims.batch * dims.seqlen * dims.proj_dim(), -1.5, 1.5);
        let p = Params::random(&dims, seed);
        let p = if seed & 1 == 1 { p.with_resets(&dims, seed) } else { p };
        let (out, rstd, hl, y) = fwd32(&dims, &to_f32(&proj), &p.f32());
        let (wo, wr, wh, wy) = reference(&dims, &proj, &p);
        assert_close("out", &out, &wo, 1e-4, 1e-5);
        assert_close("y", &y, &wy, 1e-4, 1e-5);
        assert_close("rstd", &rstd, &wr, 1e-4, 1e-6);
        assert_close("h_last", &hl, &wh, 1e-4, 1e-5);
    }

    /// The backward against the f32 kernel itself in the other mode: overwriting a NaN-filled
    /// `dproj` gives exactly what adding into a zeroed one gives.
    #[test]
    fn prop_overwrite_equals_add((dims, seed) in arb_dims()) {
        let proj = to_f32(&Rng(seed ^ 1).vec(dims.batch * dims.seqlen * dims.proj_dim(), -1.5, 1.5));
        let p = Params::random(&dims, seed);
        let p = if seed & 1 == 1 { p.with_resets(&dims, seed) } else { p }.f32();
        let w = to_f32(&Rng(seed ^ 2).vec(dims.batch * dims.seqlen * dims.d_inner(), -1.0, 1.0));
        let (a, b) = (bwd32(&dims, &proj, &p, &w, true), bwd32(&dims, &proj, &p, &w, false));
        prop_assert_eq!(a, b);
    }
}

/// Every gradient against central differences of the f64 reference: one block with K = 3 and
/// two groups; L = 21 (two blocks) with one group and K = 4, without and with sequence starts;
/// L = 37 with starts, K = 2 and two groups.
#[test]
fn bwd_matches_finite_differences() {
    let cases = [
        (MixerDims { batch: 2, seqlen: 7, nheads: 2, headdim: 8, dstate: 4, ngroups: 2, width: 3 }, false),
        (MixerDims { batch: 1, seqlen: 21, nheads: 2, headdim: 8, dstate: 8, ngroups: 1, width: 4 }, false),
        (MixerDims { batch: 2, seqlen: 21, nheads: 2, headdim: 8, dstate: 8, ngroups: 1, width: 4 }, true),
        (MixerDims { batch: 1, seqlen: 37, nheads: 4, headdim: 8, dstate: 4, ngroups: 2, width: 2 }, true),
    ];
    for (ci, (dims, resets)) in cases.iter().enumerate() {
        let seed = 40 + ci as u64;
        let proj = Rng(seed).vec(dims.batch * dims.seqlen * dims.proj_dim(), -1.5, 1.5);
        let p = Params::random(dims, seed);
        let p = if *resets { p.with_resets(dims, seed) } else { p };
        let w = Rng(seed ^ 7).vec(dims.batch * dims.seqlen * dims.d_inner(), -1.0, 1.0);
        let got = bwd32(dims, &to_f32(&proj), &p.f32(), &to_f32(&w), false);
        let loss = |proj: &[f64], p: &Params| dot(&w, &reference(dims, proj, p).0);
        let want: Vec<Vec<f64>> = vec![
            numeric_grad(&proj, 1e-6, |x| loss(x, &p)),
            numeric_grad(&p.conv_w, 1e-6, |x| loss(&proj, &Params { conv_w: x.to_vec(), ..p.clone() })),
            numeric_grad(&p.conv_b, 1e-6, |x| loss(&proj, &Params { conv_b: x.to_vec(), ..p.clone() })),
            numeric_grad(&p.dt_bias, 1e-6, |x| loss(&proj, &Params { dt_bias: x.to_vec(), ..p.clone() })),
            numeric_grad(&p.a, 1e-6, |x| loss(&proj, &Params { a: x.to_vec(), ..p.clone() })),
            numeric_grad(&p.d, 1e-6, |x| loss(&proj, &Params { d: x.to_vec(), ..p.clone() })),
            numeric_grad(&p.norm_w, 1e-6, |x| loss(&proj, &Params { norm_w: x.to_vec(), ..p.clone() })),
        ];
        let names = ["dproj", "dconv_w", "dconv_b", "ddt_bias", "da", "dd", "dnorm_w"];
        for ((name, g), wv) in names.iter().zip(&got).zip(&want) {
            assert_rel_max(&format!("case {ci}: {name}"), g, wv, 2e-3, 1e-3);
        }
    }
}

/// Batch rows are the tasks and the partial sums are added in batch order: one thread and
/// three give identical results.
#[test]
fn thread_count_does_not_change_results() {
    let dims = MixerDims { batch: 3, seqlen: 37, nheads: 4, headdim: 16, dstate: 8, ngroups: 2, width: 4 };
    let proj = to_f32(&Rng(3).vec(dims.batch * dims.seqlen * dims.proj_dim(), -1.5, 1.5));
    let p = Params::random(&dims, 3).f32();
    let w = to_f32(&Rng(4).vec(dims.batch * dims.seqlen * dims.d_inner(), -1.0, 1.0));
    let run = |threads: usize| {
        let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
        pool.install(|| (fwd32(&dims, &proj, &p), bwd32(&dims, &proj, &p, &w, false)))
    };
    assert_eq!(run(1), run(3));
}

#[test]
#[should_panic(expected = "mamba2::mixer_fwd")]
fn unsupported_dims_panic() {
    let dims = MixerDims { batch: 1, seqlen: 2, nheads: 2, headdim: 5, dstate: 4, ngroups: 1, width: 4 };
    assert!(!dims.supported());
    let p = Params::random(&dims, 1).f32();
    fwd32(&dims, &vec![0.0; 2 * dims.proj_dim()], &p);
}

#[test]
#[should_panic(expected = "`proj` has")]
fn wrong_projection_length_panics() {
    let dims = MixerDims { batch: 1, seqlen: 2, nheads: 2, headdim: 8, dstate: 4, ngroups: 2, width: 4 };
    let p = Params::random(&dims, 1).f32();
    fwd32(&dims, &vec![0.0; 2 * dims.proj_dim() - 1], &p);
}
