//! Fast conv kernels against the reference: forward, backward, step, finite differences.

use proptest::prelude::*;

use super::fast::{conv1d_bwd_tb, conv1d_fwd_tb};
use super::*;
use crate::reference::conv as reference;
use crate::testing::{
    Rng, assert_close, assert_rel_max, cases, dot, numeric_grad, random_resets, segments, to_f32, to_f64,
};

/// One random problem: dims, options, rows per task, data seed.
#[derive(Clone, Debug)]
struct Case {
    dims: ConvDims,
    bias: bool,
    silu: bool,
    tb: usize,
    seed: u64,
    /// With random sequence starts.
    resets: bool,
}

fn case() -> impl Strategy<Value = Case> {
    (
        1usize..=3,
        prop_oneof![Just(1usize), 1usize..=5, 1usize..=33],
        prop_oneof![1usize..=7, 9usize..=15, 17usize..=27, Just(8usize), Just(16usize)],
        1usize..=5,
        any::<bool>(),
        any::<bool>(),
        prop_oneof![1usize..=9, Just(usize::MAX)],
        any::<u64>(),
        any::<bool>(),
    )
        .prop_map(|(b, l, c, k, bias, silu, tb, seed, resets)| Case {
            dims: ConvDims::new(b, l, c, k),
            bias,
            silu,
            tb,
            seed,
            resets,
        })
}

/// Random data, already rounded to f32 (so f32 and f64 runs see the same inputs).
struct Data {
    x: Vec<f32>,
    w: Vec<f32>,
    bias: Vec<f32>,
    resets: Option<Vec<bool>>,
}

impl Data {
    fn new(dims: &ConvDims, seed: u64) -> Self {
        let mut r = Rng(seed);
        Self {
            x: to_f32(&r.vec(dims.n_blc(), -2.0, 2.0)),
            w: to_f32(&r.vec(dims.n_ck(), -1.0, 1.0)),
            bias: to_f32(&r.vec(dims.channels, -0.5, 0.5)),
            resets: None,
        }
    }

    /// [`Data::new`] with random sequence starts when `resets` is set.
    fn with_resets(dims: &ConvDims, seed: u64, resets: bool) -> Self {
        let mut d = Self::new(dims, seed);
        if resets {
            d.resets = Some(random_resets(&mut Rng(seed ^ 0x7e5e7), dims.batch * dims.seqlen));
        }
        d
    }

    fn args(&self, bias: bool, silu: bool) -> ConvArgs<'_, f32> {
        let bias = bias.then_some(&self.bias[..]);
        ConvArgs { x: &self.x, weight: &self.w, bias, silu, resets: self.resets.as_deref() }
    }
}

/// The same args in f64 (owned copies).
struct Args64 {
    x: Vec<f64>,
    w: Vec<f64>,
    bias: Option<Vec<f64>>,
    silu: bool,
    resets: Option<Vec<bool>>,
}

impl Args64 {
    fn new(a: &ConvArgs<f32>) -> Self {
        let (x, w, bias) = (to_f64(a.x), to_f64(a.weight), a.bias.map(to_f64));
        Self { x, w, bias, silu: a.silu, resets: a.resets.map(<[bool]>::to_vec) }
    }

    fn args(&self) -> ConvArgs<'_, f64> {
        let (bias, resets) = (self.bias.as_deref(), self.resets.as_deref());
        ConvArgs { x: &self.x, weight: &self.w, bias, silu: self.silu, resets }
    }
}

fn ref_fwd(dims: &ConvDims, a: &ConvArgs<f64>) -> (Vec<f64>, Vec<f64>) {
    let mut y = vec![0.0; dims.n_blc()];
    let mut st = vec![0.0; dims.n_bck()];
    reference::conv1d_fwd(dims, a, ConvOut { y: &mut y, state_out: Some(&mut st) });
    (y, st)
}

fn check_fwd(cs: &Case) {
    let d = Data::with_resets(&cs.dims, cs.seed, cs.resets);
    let args = d.args(cs.bias, cs.silu);
    let mut y = vec![f32::NAN; cs.dims.n_blc()];
    let mut st = vec![f32::NAN; cs.dims.n_bck()];
    conv1d_fwd_tb(&cs.dims, &args, ConvOut { y: &mut y, state_out: Some(&mut st) }, cs.tb);
    let (want_y, want_st) = ref_fwd(&cs.dims, &Args64::new(&args).args());
    assert_close("y", &y, &want_y, 1e-5, 1e-5);
    assert_close("state_out", &st, &want_st, 0.0, 0.0);
}

fn check_bwd(cs: &Case) {
    let dims = &cs.dims;
    let d = Data::with_resets(dims, cs.seed, cs.resets);
    let args = d.args(cs.bias, cs.silu);
    let mut r = Rng(cs.seed ^ 0x5eed);
    let dy = to_f32(&r.vec(dims.n_blc(), -1.0, 1.0));
    // Start from non-zero gradients: the backward must add into them.
    let dx0 = to_f32(&r.vec(dims.n_blc(), -1.0, 1.0));
    let dw0 = to_f32(&r.vec(dims.n_ck(), -1.0, 1.0));
    let db0 = to_f32(&r.vec(dims.channels, -1.0, 1.0));
    let (mut dx, mut dw, mut db) = (dx0.clone(), dw0.clone(), db0.clone());
    conv1d_bwd_tb(dims, &args, &dy, ConvGrads { dx: &mut dx, dweight: &mut dw, dbias: Some(&mut db) }, cs.tb);
    let a64 = Args64::new(&args);
    let (mut rdx, mut rdw, mut rdb) = (to_f64(&dx0), to_f64(&dw0), to_f64(&db0));
    reference::conv1d_bwd(
        dims,
        &a64.args(),
        &to_f64(&dy),
        ConvGrads { dx: &mut rdx, dweight: &mut rdw, dbias: Some(&mut rdb) },
    );
    assert_close("dx", &dx, &rdx, 1e-5, 1e-5);
    assert_rel_max("dweight", &dw, &rdw, 2e-6, 1.0);
    assert_rel_max("dbias", &db, &rdb, 2e-6, 1.0);
}

fn check_step_matches_forward(cs: &Case) {
    let dims = &cs.dims;
    let (b, l, c, k) = (dims.batch, dims.seqlen, dims.channels, dims.width);
    let d = Data::new(dims, cs.seed);
    let args = d.args(cs.bias, cs.silu);
    let mut y = vec![0.0f32; dims.n_blc()];
    let mut st_full = vec![0.0f32; dims.n_bck()];
    conv1d_fwd(dims, &args, ConvOut { y: &mut y, state_out: Some(&mut st_full) });
    let d1 = ConvDims::new(b, 1, c, k);
    let a64 = Args64::new(&args);
    let mut st = vec![0.0f32; dims.n_bck()];
    let mut st64 = vec![0.0f64; dims.n_bck()];
    let (mut xt, mut yt) = (vec![0.0f32; b * c], vec![0.0f32; b * c]);
    let (mut xt64, mut yt64) = (vec![0.0f64; b * c], vec![0.0f64; b * c]);
    let team = crate::team::Team::new(3);
    for t in 0..l {
        for bb in 0..b {
            let src = (bb * l + t) * c;
            xt[bb * c..(bb + 1) * c].copy_from_slice(&d.x[src..src + c]);
            xt64[bb * c..(bb + 1) * c].copy_from_slice(&a64.x[src..src + c]);
        }
        // Split over a decode team (however small): the same state and outputs.
        let (mut st_t, mut yt_t) = (st.clone(), vec![f32::NAN; b * c]);
        team.install_splitting_from(0, || {
            conv1d_step(&d1, &ConvArgs { x: &xt, ..args }, &mut st_t, &mut yt_t)
        });
        conv1d_step(&d1, &ConvArgs { x: &xt, ..args }, &mut st, &mut yt);
        assert_eq!((&st_t, &yt_t), (&st, &yt), "conv1d_step over a team");
        reference::conv1d_step(&d1, &ConvArgs { x: &xt64, ..a64.args() }, &mut st64, &mut yt64);
        assert_close("step y vs reference step", &yt, &yt64, 1e-5, 1e-5);
        for bb in 0..b {
            let dst = (bb * l + t) * c;
            assert_close("step y vs forward y", &yt[bb * c..(bb + 1) * c], &y[dst..dst + c], 1e-5, 1e-5);
        }
    }
    assert_close("step state vs state_out", &st, &st_full, 0.0, 0.0);
    assert_close("reference step state", &st64, &st_full, 0.0, 0.0);
}

/// The sequence cut into chunks of `chunk` steps, each run by [`conv1d_chunk`] with the state
/// carried, equals the reference forward over the whole sequence (outputs and final state).
fn check_chunks_match_reference(cs: &Case, chunk: usize) {
    let dims = &cs.dims;
    let (b, l, c, k) = (dims.batch, dims.seqlen, dims.channels, dims.width);
    let d = Data::new(dims, cs.seed);
    let args = d.args(cs.bias, cs.silu);
    let (want, want_state) = ref_fwd(dims, &Args64::new(&args).args());
    let mut state = vec![0.0f32; dims.n_bck()];
    let mut y = vec![f32::NAN; dims.n_blc()];
    for t0 in (0..l).step_by(chunk) {
        let lc = chunk.min(l - t0);
        let rows = |v: &[f32]| -> Vec<f32> {
            (0..b).flat_map(|bb| v[(bb * l + t0) * c..(bb * l + t0 + lc) * c].to_vec()).collect()
        };
        let xc = rows(&d.x);
        let mut yc = vec![f32::NAN; b * lc * c];
        conv1d_chunk(&ConvDims::new(b, lc, c, k), &ConvArgs { x: &xc, ..args }, &mut state, &mut yc);
        for bb in 0..b {
            y[(bb * l + t0) * c..(bb * l + t0 + lc) * c].copy_from_slice(&yc[bb * lc * c..(bb + 1) * lc * c]);
        }
    }
    assert_close(&format!("chunks of {chunk}: y"), &y, &want, 1e-5, 1e-5);
    assert_close(&format!("chunks of {chunk}: state"), &state, &want_state, 0.0, 0.0);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(cases(16)))]

    #[test]
    fn fast_fwd_matches_reference(cs in case()) {
        check_fwd(&cs);
    }

    #[test]
    fn fast_bwd_matches_reference(cs in case()) {
        check_bwd(&cs);
    }

    #[test]
    fn step_by_step_matches_forward_and_reference(cs in case()) {
        check_step_matches_forward(&cs);
    }

    #[test]
    fn chunks_carrying_the_state_match_reference(cs in case(), chunk in 1usize..=12) {
        check_chunks_match_reference(&cs, chunk);
    }
}

#[test]
fn default_blocking_on_a_long_sequence_matches_reference() {
    // Several tasks per batch row with the public entry points' own block size.
    for (i, dims) in [ConvDims::new(2, 300, 37, 4), ConvDims::new(1, 700, 8, 3)].iter().enumerate() {
        let cs = Case {
            dims: *dims,
            bias: true,
            silu: true,
            tb: super::fast::time_block(dims),
            seed: 42 + i as u64,
            resets: false,
        };
        check_fwd(&cs);
        check_bwd(&cs);
        check_fwd(&Case { resets: true, ..cs.clone() });
        check_bwd(&Case { resets: true, ..cs });
    }
}

#[test]
fn reference_resets_equal_running_each_segment_alone() {
    // The meaning of a reset, checked without the reset code: every segment on its own.
    for seed in 0..8 {
        let dims = ConvDims::new(2, 19, 5, 4);
        let d = Data::with_resets(&dims, 300 + seed, true);
        let a64 = Args64::new(&d.args(true, true));
        let (y, st) = ref_fwd(&dims, &a64.args());
        let (l, c, k) = (dims.seqlen, dims.channels, dims.width);
        for b in 0..2 {
            for (t0, t1) in segments(&a64.resets.as_ref().unwrap()[b * l..(b + 1) * l]) {
                let sd = ConvDims::new(1, t1 - t0, c, k);
                let x = a64.x[(b * l + t0) * c..(b * l + t1) * c].to_vec();
                let (ys, sts) = ref_fwd(&sd, &ConvArgs { x: &x, resets: None, ..a64.args() });
                assert_close("segment y", &y[(b * l + t0) * c..(b * l + t1) * c], &ys, 0.0, 0.0);
                if t1 == l {
                    assert_close("final state", &st[b * c * k..(b + 1) * c * k], &sts, 0.0, 0.0);
                }
            }
        }
    }
}

#[test]
fn fast_bwd_matches_f64_finite_differences_of_reference() {
    for (i, &(b, l, c, k, bias, silu, tb, resets)) in [
        (2, 6, 11, 4, true, true, 4, false),
        (1, 3, 9, 4, false, true, 2, false),
        (2, 9, 5, 3, true, false, 3, false),
        (1, 1, 3, 2, true, true, 1, false),
        (1, 7, 17, 5, false, true, 100, false),
        (2, 11, 9, 4, true, true, 3, true),
        (1, 13, 17, 4, false, true, 100, true),
    ]
    .iter()
    .enumerate()
    {
        let dims = ConvDims::new(b, l, c, k);
        let d = Data::with_resets(&dims, 900 + i as u64, resets);
        let args = d.args(bias, silu);
        let wy = to_f32(&Rng(31 + i as u64).vec(dims.n_blc(), -1.0, 1.0));
        let mut dx = vec![0.0f32; dims.n_blc()];
        let mut dw = vec![0.0f32; dims.n_ck()];
        let mut db = vec![0.0f32; c];
        conv1d_bwd_tb(
            &dims,
            &args,
            &wy,
            ConvGrads { dx: &mut dx, dweight: &mut dw, dbias: Some(&mut db) },
            tb,
        );
        let a64 = Args64::new(&args);
        let wy64 = to_f64(&wy);
        let loss = |x: &[f64], w: &[f64], bb: Option<&[f64]>| {
            let a = ConvArgs { x, weight: w, bias: bb, silu, resets: a64.resets.as_deref() };
            dot(&wy64, &ref_fwd(&dims, &a).0)
        };
        let bopt = a64.bias.as_deref();
        let eps = 1e-5;
        let ndx = numeric_grad(&a64.x, eps, |x| loss(x, &a64.w, bopt));
        let ndw = numeric_grad(&a64.w, eps, |w| loss(&a64.x, w, bopt));
        assert_rel_max("dx", &dx, &ndx, 1e-5, 1.0);
        assert_rel_max("dweight", &dw, &ndw, 1e-5, 1.0);
        match a64.bias.clone() {
            Some(b0) => {
                let ndb = numeric_grad(&b0, eps, |bb| loss(&a64.x, &a64.w, Some(bb)));
                assert_rel_max("dbias", &db, &ndb, 1e-5, 1.0);
            }
            // No bias input: its gradient buffer is left untouched.
            None => assert!(db.iter().all(|&v| v == 0.0), "dbias written without a bias: {db:?}"),
        }
    }
}

#[test]
fn gradients_accumulate_across_calls() {
    let dims = ConvDims::new(2, 5, 10, 4);
    let d = Data::new(&dims, 3);
    let args = d.args(true, true);
    let dy = to_f32(&Rng(4).vec(dims.n_blc(), -1.0, 1.0));
    let run = |times: usize| {
        let mut dx = vec![0.0f32; dims.n_blc()];
        let mut dw = vec![0.0f32; dims.n_ck()];
        for _ in 0..times {
            conv1d_bwd(&dims, &args, &dy, ConvGrads { dx: &mut dx, dweight: &mut dw, dbias: None });
        }
        (dx, dw)
    };
    let (dx1, dw1) = run(1);
    let (dx2, dw2) = run(2);
    let twice = |v: &[f32]| v.iter().map(|x| 2.0 * x).collect::<Vec<_>>();
    assert_close("dx", &dx2, &twice(&dx1), 1e-6, 1e-6);
    assert_close("dweight", &dw2, &twice(&dw1), 1e-6, 1e-6);
}

#[test]
fn results_do_not_depend_on_the_thread_count() {
    let dims = ConvDims::new(3, 200, 20, 4);
    let d = Data::new(&dims, 8);
    let args = d.args(true, true);
    let dy = to_f32(&Rng(9).vec(dims.n_blc(), -1.0, 1.0));
    let run = |threads: usize| {
        let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
        pool.install(|| {
            let mut y = vec![0.0f32; dims.n_blc()];
            conv1d_fwd(&dims, &args, ConvOut { y: &mut y, state_out: None });
            let mut dx = vec![0.0f32; dims.n_blc()];
            let mut dw = vec![0.0f32; dims.n_ck()];
            conv1d_bwd(&dims, &args, &dy, ConvGrads { dx: &mut dx, dweight: &mut dw, dbias: None });
            (y, dx, dw)
        })
    };
    assert_eq!(run(1), run(2));
}

#[test]
fn empty_problems_are_no_ops() {
    for dims in [ConvDims::new(0, 4, 3, 2), ConvDims::new(2, 0, 3, 2), ConvDims::new(2, 4, 0, 2)] {
        let x = vec![1.0f32; dims.n_blc()];
        let w = vec![1.0f32; dims.n_ck()];
        let mut y = vec![0.0f32; dims.n_blc()];
        let mut st = vec![7.0f32; dims.n_bck()];
        conv1d_fwd(&dims, &ConvArgs::new(&x, &w), ConvOut { y: &mut y, state_out: Some(&mut st) });
        assert!(st.iter().all(|&v| v == 0.0));
        let mut dx = vec![0.0f32; dims.n_blc()];
        let mut dw = vec![0.0f32; dims.n_ck()];
        conv1d_bwd(
            &dims,
            &ConvArgs::new(&x, &w),
            &y,
            ConvGrads { dx: &mut dx, dweight: &mut dw, dbias: None },
        );
        assert!(dw.iter().all(|&v| v == 0.0));
    }
}

#[test]
#[should_panic(
    expected = "conv::conv1d_fwd: `weight` has 7 elements, but its layout (C, K) = (2, 4) needs 8"
)]
fn fwd_wrong_weight_length_panics_naming_it() {
    let dims = ConvDims::new(1, 3, 2, 4);
    let mut y = vec![0.0f32; 6];
    conv1d_fwd(&dims, &ConvArgs::new(&[0.0; 6], &[0.0; 7]), ConvOut { y: &mut y, state_out: None });
}

#[test]
#[should_panic(expected = "conv::conv1d_bwd: `dy` has 5 elements")]
fn bwd_wrong_dy_length_panics_naming_it() {
    let dims = ConvDims::new(1, 3, 2, 4);
    let (mut dx, mut dw) = (vec![0.0f32; 6], vec![0.0f32; 8]);
    conv1d_bwd(
        &dims,
        &ConvArgs::new(&[0.0; 6], &[0.0; 8]),
        &[0.0; 5],
        ConvGrads { dx: &mut dx, dweight: &mut dw, dbias: None },
    );
}

#[test]
#[should_panic(expected = "conv::conv1d_bwd: `dbias` has 3 elements")]
fn bwd_wrong_dbias_length_panics_naming_it() {
    let dims = ConvDims::new(1, 3, 2, 4);
    let (mut dx, mut dw, mut db) = (vec![0.0f32; 6], vec![0.0f32; 8], vec![0.0f32; 3]);
    conv1d_bwd(
        &dims,
        &ConvArgs::new(&[0.0; 6], &[0.0; 8]),
        &[0.0; 6],
        ConvGrads { dx: &mut dx, dweight: &mut dw, dbias: Some(&mut db) },
    );
}

#[test]
#[should_panic(
    expected = "conv::conv1d_step: `state` has 6 elements, but its layout (B, C, K) = (1, 2, 4) needs 8"
)]
fn step_wrong_state_length_panics_naming_it() {
    let dims = ConvDims::new(1, 1, 2, 4);
    let (mut st, mut y) = (vec![0.0f32; 6], vec![0.0f32; 2]);
    conv1d_step(&dims, &ConvArgs::new(&[0.0; 2], &[0.0; 8]), &mut st, &mut y);
}

#[test]
#[should_panic(expected = "conv::conv1d_step: invalid dims: a step takes seqlen 1")]
fn step_rejects_seqlen_above_one() {
    let dims = ConvDims::new(1, 2, 2, 4);
    let (mut st, mut y) = (vec![0.0f32; 8], vec![0.0f32; 2]);
    conv1d_step(&dims, &ConvArgs::new(&[0.0; 4], &[0.0; 8]), &mut st, &mut y);
}

/// f64 reference of [`conv1d_fwd_from`]: the reference conv on `x` with the last `K − 1`
/// inputs of `state0` before each row (and no start there), cut back to the `L` outputs.
fn ref_fwd_from(dims: &ConvDims, a: &ConvArgs<f64>, state0: &[f64]) -> Vec<f64> {
    let (b, l, c, k) = (dims.batch, dims.seqlen, dims.channels, dims.width);
    let lp = l + k - 1;
    let mut xp = vec![0.0; b * lp * c];
    let mut rp = vec![false; b * lp];
    for bb in 0..b {
        for j in 0..k - 1 {
            for ch in 0..c {
                xp[(bb * lp + j) * c + ch] = state0[(bb * c + ch) * k + j + 1];
            }
        }
        xp[(bb * lp + k - 1) * c..(bb + 1) * lp * c].copy_from_slice(&a.x[bb * l * c..(bb + 1) * l * c]);
        if let Some(r) = a.resets {
            rp[bb * lp + k - 1..(bb + 1) * lp].copy_from_slice(&r[bb * l..(bb + 1) * l]);
        }
    }
    let pd = ConvDims::new(b, lp, c, k);
    let args = ConvArgs { x: &xp, resets: a.resets.map(|_| &rp[..]), ..*a };
    let (yp, _) = ref_fwd(&pd, &args);
    (0..b).flat_map(|bb| yp[(bb * lp + k - 1) * c..(bb + 1) * lp * c].to_vec()).collect()
}

#[test]
fn continuing_from_a_state_matches_the_chunked_forward_and_finite_differences() {
    for (i, &(b, l, c, k, resets)) in [
        (2, 9, 11, 4, false),
        (2, 9, 11, 4, true),
        (1, 2, 5, 4, true),
        (1, 13, 9, 3, true),
        (2, 1, 3, 4, false),
    ]
    .iter()
    .enumerate()
    {
        let dims = ConvDims::new(b, l, c, k);
        let d = Data::with_resets(&dims, 700 + i as u64, resets);
        let args = d.args(true, true);
        let state0 = to_f32(&Rng(40 + i as u64).vec(dims.n_bck(), -1.0, 1.0));
        let mut y = vec![f32::NAN; dims.n_blc()];
        let mut st = vec![f32::NAN; dims.n_bck()];
        conv1d_fwd_from(&dims, &args, &state0, ConvOut { y: &mut y, state_out: Some(&mut st) });
        let a64 = Args64::new(&args);
        let s64 = to_f64(&state0);
        assert_close("y vs reference with history", &y, &ref_fwd_from(&dims, &a64.args(), &s64), 1e-5, 1e-5);
        let mut st2 = vec![f32::NAN; dims.n_bck()];
        conv_state_from(&dims, &d.x, (c, 0), d.resets.as_deref(), &state0, &mut st2);
        assert_close("conv_state_from vs the forward's state", &st2, &st, 0.0, 0.0);
        if !resets {
            // The chunk kernel (itself checked against step-by-step decoding) agrees.
            let (mut st_c, mut y_c) = (state0.clone(), vec![f32::NAN; dims.n_blc()]);
            conv1d_chunk(&dims, &args, &mut st_c, &mut y_c);
            assert_close("y vs conv1d_chunk", &y, &y_c, 1e-6, 1e-6);
            assert_close("state vs conv1d_chunk", &st, &st_c, 0.0, 0.0);
        }
        // Gradients of Σ w·y against finite differences of the f64 reference.
        let w = to_f32(&Rng(90 + i as u64).vec(dims.n_blc(), -1.0, 1.0));
        let (mut dx, mut dw, mut db, mut ds) = (
            vec![0.0f32; dims.n_blc()],
            vec![0.0f32; dims.n_ck()],
            vec![0.0f32; c],
            vec![0.0f32; dims.n_bck()],
        );
        let grads = ConvGrads { dx: &mut dx, dweight: &mut dw, dbias: Some(&mut db) };
        conv1d_bwd_from(&dims, &args, &state0, &w, grads, Some(&mut ds));
        let w64 = to_f64(&w);
        let loss = |x: &[f64], wt: &[f64], s: &[f64]| {
            let a = ConvArgs { x, weight: wt, ..a64.args() };
            dot(&w64, &ref_fwd_from(&dims, &a, s))
        };
        let eps = 1e-5;
        assert_rel_max("dx", &dx, &numeric_grad(&a64.x, eps, |x| loss(x, &a64.w, &s64)), 1e-5, 1.0);
        assert_rel_max("dweight", &dw, &numeric_grad(&a64.w, eps, |wt| loss(&a64.x, wt, &s64)), 1e-5, 1.0);
        let nds = numeric_grad(&s64, eps, |s| loss(&a64.x, &a64.w, s));
        assert_rel_max("dstate0", &ds, &nds, 1e-5, 1.0);
        assert!(nds.iter().any(|v| v.abs() > 1e-3), "the state must matter");
    }
}

/// `conv_state_bwd` is the adjoint of `conv_state_from` / `conv_state`:
/// `⟨state(x, state0), g⟩ = ⟨x, dx⟩ + ⟨state0, dstate0⟩` for random `g`, on strided column
/// blocks, sequences shorter and longer than `K`, with and without sequence starts; and `dx`
/// stays zero outside the block.
#[test]
fn conv_state_bwd_is_the_adjoint_of_conv_state() {
    for (i, &(b, l, c, k, resets)) in [
        (2, 9, 5, 4, false),
        (2, 9, 5, 4, true),
        (3, 2, 3, 4, true),
        (2, 2, 3, 4, false),
        (1, 1, 7, 3, false),
        (2, 6, 4, 5, true),
    ]
    .iter()
    .enumerate()
    {
        let dims = ConvDims::new(b, l, c, k);
        let mut r = Rng(1300 + i as u64);
        // x: the columns 2..2+c of rows c + 3 wide.
        let (stride, offset) = (c + 3, 2);
        let x = to_f32(&r.vec(b * l * stride, -1.0, 1.0));
        let state0 = to_f32(&r.vec(dims.n_bck(), -1.0, 1.0));
        let g = to_f32(&r.vec(dims.n_bck(), -1.0, 1.0));
        let rs = resets.then(|| {
            let mut v = random_resets(&mut r, b * l);
            v[l - 1] = true; // a start inside the last K positions of row 0
            v
        });
        for with_state0 in [true, false] {
            let mut st = vec![f32::NAN; dims.n_bck()];
            if with_state0 {
                conv_state_from(&dims, &x, (stride, offset), rs.as_deref(), &state0, &mut st);
            } else {
                conv_state(&dims, &x, (stride, offset), rs.as_deref(), &mut st);
            }
            let mut dx = vec![0.0f32; x.len()];
            let mut ds = vec![0.0f32; dims.n_bck()];
            let dstate0 = with_state0.then_some(&mut ds[..]);
            conv_state_bwd(&dims, &g, (stride, offset), rs.as_deref(), &mut dx, dstate0);
            let lhs = dot(&to_f64(&st), &to_f64(&g));
            let rhs = dot(&to_f64(&x), &to_f64(&dx)) + dot(&to_f64(&state0), &to_f64(&ds));
            assert!(
                (lhs - rhs).abs() <= 1e-9 * (1.0 + lhs.abs()),
                "case {i}, state0 {with_state0}: {lhs} vs {rhs}"
            );
            assert!(lhs.abs() > 1e-3, "case {i}: the state must not be all zero");
            for (j, v) in dx.iter().enumerate() {
                let col = j % stride;
                if !(offset..offset + c).contains(&col) {
                    assert_eq!(*v, 0.0, "case {i}: dx outside the column block at {j}");
                }
            }
        }
    }
}
