//! Tests of the fast Mamba-2 kernels against the reference loops, of the reference backward
//! against finite differences, and of the structural identities (SSD = sequential, Mamba-2 =
//! Mamba-1 with repeated A/Δ, step = scan).

use proptest::prelude::*;

use super::*;
use crate::mamba1::{Scan1Args, Scan1Dims, Scan1Out};
use crate::reference::{mamba1 as ref1, mamba2 as ref2};
use crate::testing::{
    Rng, assert_close, assert_rel_max, cases, channel_abs_sum, dot, numeric_grad, random_resets, to_f32,
};

/// Which optional inputs a test problem carries.
#[derive(Clone, Copy, Debug)]
struct Opts {
    d: bool,
    z: bool,
    bias: bool,
    softplus: bool,
    h0: bool,
    /// Random sequence starts.
    resets: bool,
}

const ALL: Opts = Opts { d: true, z: true, bias: true, softplus: true, h0: true, resets: false };
const NONE: Opts = Opts { d: false, z: false, bias: false, softplus: false, h0: false, resets: false };
const ALL_RESETS: Opts = Opts { resets: true, ..ALL };

/// Owned inputs of a scan.
#[derive(Clone, Debug)]
struct Data<T> {
    x: Vec<T>,
    delta: Vec<T>,
    a: Vec<T>,
    b: Vec<T>,
    c: Vec<T>,
    d: Option<Vec<T>>,
    z: Option<Vec<T>>,
    bias: Option<Vec<T>>,
    h0: Option<Vec<T>>,
    softplus: bool,
    resets: Option<Vec<bool>>,
}

impl Data<f64> {
    fn random(dims: &Scan2Dims, seed: u64, o: Opts) -> Self {
        let mut r = Rng(seed);
        let h = dims.nheads;
        let delta = if o.softplus { r.vec(dims.n_blh(), -3.0, 0.5) } else { r.vec(dims.n_blh(), 0.02, 0.6) };
        let a = r.vec(h, -1.0, 1.0).iter().map(|v| -v.exp()).collect();
        Self {
            x: r.vec(dims.n_blhp(), -1.0, 1.0),
            delta,
            a,
            b: r.vec(dims.n_blgn(), -1.0, 1.0),
            c: r.vec(dims.n_blgn(), -1.0, 1.0),
            d: o.d.then(|| r.vec(h, -1.0, 1.0)),
            z: o.z.then(|| r.vec(dims.n_blhp(), -2.0, 2.0)),
            bias: o.bias.then(|| r.vec(h, if o.softplus { -1.0 } else { 0.0 }, 0.3)),
            h0: o.h0.then(|| r.vec(dims.n_bhpn(), -1.0, 1.0)),
            softplus: o.softplus,
            resets: o.resets.then(|| random_resets(&mut r, dims.batch * dims.seqlen)),
        }
    }

    fn f32(&self) -> Data<f32> {
        let f = |v: &Vec<f64>| to_f32(v);
        Data {
            x: f(&self.x),
            delta: f(&self.delta),
            a: f(&self.a),
            b: f(&self.b),
            c: f(&self.c),
            d: self.d.as_ref().map(f),
            z: self.z.as_ref().map(f),
            bias: self.bias.as_ref().map(f),
            h0: self.h0.as_ref().map(f),
            softplus: self.softplus,
            resets: self.resets.clone(),
        }
    }

    /// The tensor a numeric gradient perturbs, by the index used in [`GRAD_NAMES`].
    fn field(&mut self, i: usize) -> Option<&mut Vec<f64>> {
        match i {
            0 => Some(&mut self.x),
            1 => Some(&mut self.delta),
            2 => Some(&mut self.a),
            3 => Some(&mut self.b),
            4 => Some(&mut self.c),
            5 => self.d.as_mut(),
            6 => self.z.as_mut(),
            7 => self.bias.as_mut(),
            _ => self.h0.as_mut(),
        }
    }
}

impl<T: Copy> Data<T> {
    fn args(&self) -> Scan2Args<'_, T> {
        Scan2Args {
            d: self.d.as_deref(),
            z: self.z.as_deref(),
            delta_bias: self.bias.as_deref(),
            delta_softplus: self.softplus,
            h0: self.h0.as_deref(),
            resets: self.resets.as_deref(),
            ..Scan2Args::new(&self.x, &self.delta, &self.a, &self.b, &self.c)
        }
    }

    /// The inputs of time step `t` only (seqlen 1), without `h0`.
    fn at(&self, dims: &Scan2Dims, t: usize) -> Data<T> {
        let rows = |v: &Vec<T>, w: usize| -> Vec<T> {
            (0..dims.batch).flat_map(|b| v[(b * dims.seqlen + t) * w..][..w].to_vec()).collect()
        };
        let (hp, gn) = (dims.nheads * dims.headdim, dims.ngroups * dims.dstate);
        Data {
            x: rows(&self.x, hp),
            delta: rows(&self.delta, dims.nheads),
            a: self.a.clone(),
            b: rows(&self.b, gn),
            c: rows(&self.c, gn),
            d: self.d.clone(),
            z: self.z.as_ref().map(|z| rows(z, hp)),
            bias: self.bias.clone(),
            h0: None,
            softplus: self.softplus,
            resets: None,
        }
    }
}

/// Gradient tensors in the order of [`GRAD_NAMES`].
type Grads<T> = [Vec<T>; 9];
const GRAD_NAMES: [&str; 9] = ["dx", "ddelta", "da", "db", "dc", "dd", "dz", "ddelta_bias", "dh0"];

fn zero_grads<T: Copy + Default>(dims: &Scan2Dims) -> Grads<T> {
    let z = |n: usize| vec![T::default(); n];
    [
        z(dims.n_blhp()),
        z(dims.n_blh()),
        z(dims.nheads),
        z(dims.n_blgn()),
        z(dims.n_blgn()),
        z(dims.nheads),
        z(dims.n_blhp()),
        z(dims.nheads),
        z(dims.n_bhpn()),
    ]
}

fn grads_view<T>(g: &mut Grads<T>) -> Scan2Grads<'_, T> {
    let [dx, ddelta, da, db, dc, dd, dz, dbias, dh0] = g;
    Scan2Grads {
        dx,
        ddelta,
        da,
        db,
        dc,
        dd: Some(dd),
        dz: Some(dz),
        ddelta_bias: Some(dbias),
        dh0: Some(dh0),
    }
}

/// The kernel under test.
#[derive(Clone, Copy, Debug)]
enum Kern {
    Seq,
    Ssd(usize),
}

fn ref_fwd(dims: &Scan2Dims, d: &Data<f64>) -> (Vec<f64>, Vec<f64>) {
    let mut y = vec![0.0; dims.n_blhp()];
    let mut hl = vec![0.0; dims.n_bhpn()];
    ref2::scan_fwd(dims, &d.args(), Scan2Out { y: &mut y, h_last: Some(&mut hl) });
    (y, hl)
}

fn fast_fwd(k: Kern, dims: &Scan2Dims, d: &Data<f32>) -> (Vec<f32>, Vec<f32>) {
    let mut y = vec![f32::NAN; dims.n_blhp()];
    let mut hl = vec![f32::NAN; dims.n_bhpn()];
    let out = Scan2Out { y: &mut y, h_last: Some(&mut hl) };
    match k {
        Kern::Seq => scan_fwd(dims, &d.args(), out),
        Kern::Ssd(q) => ssd_fwd(dims, q, &d.args(), out),
    }
    (y, hl)
}

fn ref_bwd(dims: &Scan2Dims, d: &Data<f64>, dy: &[f64], dhl: &[f64]) -> Grads<f64> {
    let mut g = zero_grads(dims);
    ref2::scan_bwd(dims, &d.args(), dy, Some(dhl), grads_view(&mut g));
    g
}

fn fast_bwd(k: Kern, dims: &Scan2Dims, d: &Data<f32>, dy: &[f32], dhl: &[f32]) -> Grads<f32> {
    let mut g = zero_grads(dims);
    match k {
        Kern::Seq => scan_bwd(dims, &d.args(), dy, Some(dhl), grads_view(&mut g)),
        Kern::Ssd(q) => ssd_bwd(dims, q, &d.args(), dy, Some(dhl), grads_view(&mut g)),
    }
    g
}

/// Fixed random weights of the scalar loss `Σ w·y + Σ w2·h_last`.
fn loss_weights(dims: &Scan2Dims, seed: u64) -> (Vec<f64>, Vec<f64>) {
    let mut r = Rng(seed ^ 0xABCD);
    (r.vec(dims.n_blhp(), -1.0, 1.0), r.vec(dims.n_bhpn(), -1.0, 1.0))
}

fn check_fwd(k: Kern, dims: &Scan2Dims, d: &Data<f64>) {
    let (y, hl) = ref_fwd(dims, d);
    let (yf, hlf) = fast_fwd(k, dims, &d.f32());
    assert_rel_max(&format!("{k:?} y"), &yf, &y, 1e-4, 1.0);
    assert_rel_max(&format!("{k:?} h_last"), &hlf, &hl, 1e-4, 1.0);
}

/// The floor of the relative check for each gradient of the loss `Σ w·y + Σ w2·h_last`, given
/// the reference gradients `want`.
///
/// Gradients reduced over positions (`dD`, `dΔ_bias`) can cancel to near zero while their f32
/// rounding stays relative to their summands ([`channel_abs_sum`]). The fast backward forms `dA`
/// from the carried inner product `M(t) = ⟨h_{t−1}, G_t⟩`, updated by differences of sums over
/// `P·N` products, so `dA` (exactly zero for one step without `h0`) is compared at the scale
/// of `Σ|h_last ⊙ w2|`.
fn grad_floors(dims: &Scan2Dims, d: &Data<f64>, w: &[f64], w2: &[f64], want: &Grads<f64>) -> [f64; 9] {
    let (h, p) = (dims.nheads, dims.headdim);
    let (_, hl) = ref_fwd(dims, d);
    let mut floors = [1e-2f64; 9];
    floors[2] = floors[2].max(hl.iter().zip(w2).map(|(h, g)| (h * g).abs()).sum());
    let dy_x: Vec<f64> = w.iter().zip(&d.x).map(|(w, x)| w * x).collect();
    // With the gate, |silu(z)| < 2 for the drawn z.
    floors[5] = floors[5].max(channel_abs_sum(&dy_x, h, p) * 2.0);
    floors[7] = floors[7].max(channel_abs_sum(&want[1], h, 1));
    floors
}

fn check_bwd(k: Kern, dims: &Scan2Dims, d: &Data<f64>, seed: u64) {
    let (w, w2) = loss_weights(dims, seed);
    let want = ref_bwd(dims, d, &w, &w2);
    let got = fast_bwd(k, dims, &d.f32(), &to_f32(&w), &to_f32(&w2));
    let floors = grad_floors(dims, d, &w, &w2, &want);
    for i in 0..9 {
        assert_rel_max(&format!("{k:?} {}", GRAD_NAMES[i]), &got[i], &want[i], 3e-4, floors[i]);
    }
}

/// Dims and options drawn by the property tests.
fn arb_case() -> impl Strategy<Value = (Scan2Dims, Opts, u64, usize)> {
    (
        (1usize..=2, prop::sample::select(vec![1usize, 2, 3, 7, 16, 33])),
        (1usize..=2, 1usize..=2),
        prop::sample::select(vec![1usize, 5, 16, 64]),
        prop::sample::select(vec![1usize, 4, 16, 64]),
        prop::array::uniform6(any::<bool>()),
        any::<u64>(),
        1usize..=40,
    )
        .prop_map(|((batch, l), (g, hpg), p, n, f, seed, q)| {
            let dims = Scan2Dims::new(batch, l, g * hpg, p, n).with_groups(g);
            let o = Opts { d: f[0], z: f[1], bias: f[2], softplus: f[3], h0: f[4], resets: f[5] };
            (dims, o, seed, q)
        })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(cases(24)))]

    #[test]
    fn prop_seq_fwd_matches_reference((dims, o, seed, _q) in arb_case()) {
        check_fwd(Kern::Seq, &dims, &Data::random(&dims, seed, o));
    }

    #[test]
    fn prop_ssd_fwd_matches_reference((dims, o, seed, q) in arb_case()) {
        check_fwd(Kern::Ssd(q), &dims, &Data::random(&dims, seed, o));
    }

    #[test]
    fn prop_seq_bwd_matches_reference((dims, o, seed, _q) in arb_case()) {
        check_bwd(Kern::Seq, &dims, &Data::random(&dims, seed, o), seed);
    }

    #[test]
    fn prop_ssd_bwd_matches_reference((dims, o, seed, q) in arb_case()) {
        check_bwd(Kern::Ssd(q), &dims, &Data::random(&dims, seed, o), seed);
    }

    #[test]
    fn prop_step_by_step_matches_full_scan((dims, o, seed, _q) in arb_case()) {
        let d = Data::random(&dims, seed, Opts { resets: false, ..o });
        let (y, hl) = ref_fwd(&dims, &d);
        let d32 = d.f32();
        let one = dims.with_seqlen(1);
        let mut st64 = d.h0.clone().unwrap_or_else(|| vec![0.0; dims.n_bhpn()]);
        let mut st32 = to_f32(&st64);
        let hp = dims.nheads * dims.headdim;
        let team = crate::team::Team::new(3);
        for t in 0..dims.seqlen {
            let mut y64 = vec![0.0f64; one.n_blhp()];
            let mut y32 = vec![f32::NAN; one.n_blhp()];
            let s64 = d.at(&dims, t);
            ref2::scan_step(&one, &s64.args(), &mut st64, &mut y64);
            let s32 = d32.at(&dims, t);
            // Split over a decode team (however small): the same state and outputs.
            let (mut st_t, mut y_t) = (st32.clone(), vec![f32::NAN; one.n_blhp()]);
            team.install_splitting_from(0, || scan_step(&one, &s32.args(), &mut st_t, &mut y_t));
            scan_step(&one, &s32.args(), &mut st32, &mut y32);
            assert_eq!((&st_t, &y_t), (&st32, &y32), "scan_step over a team");
            let want: Vec<f64> = (0..dims.batch)
                .flat_map(|b| y[(b * dims.seqlen + t) * hp..][..hp].to_vec())
                .collect();
            assert_close("reference step y", &y64, &want, 1e-10, 1e-10);
            assert_rel_max("fast step y", &y32, &want, 1e-4, 1.0);
        }
        assert_close("reference step state", &st64, &hl, 1e-10, 1e-10);
        assert_rel_max("fast step state", &st32, &hl, 1e-4, 1.0);
    }
}

/// Finite-difference check of a backward (`got`, per tensor) against the f64 reference forward.
fn check_numeric<T: Copy + Into<f64>>(
    what: &str,
    dims: &Scan2Dims,
    d: &Data<f64>,
    seed: u64,
    got: &Grads<T>,
    tol: f64,
) {
    let (w, w2) = loss_weights(dims, seed);
    for i in 0..9 {
        let mut base = d.clone();
        let Some(v) = base.field(i).cloned() else {
            continue;
        };
        let num = numeric_grad(&v, 1e-5, |xs| {
            let mut p = base.clone();
            *p.field(i).unwrap() = xs.to_vec();
            let (y, hl) = ref_fwd(dims, &p);
            dot(&w, &y) + dot(&w2, &hl)
        });
        assert_rel_max(&format!("{what} {}", GRAD_NAMES[i]), &got[i], &num, tol, 1e-3);
    }
}

fn small_dims() -> [Scan2Dims; 2] {
    [Scan2Dims::new(2, 5, 2, 3, 2), Scan2Dims::new(1, 7, 4, 9, 3).with_groups(2)]
}

#[test]
fn reference_bwd_matches_finite_differences() {
    for (k, dims) in small_dims().iter().enumerate() {
        for (j, o) in [ALL, NONE, ALL_RESETS].into_iter().enumerate() {
            let seed = 11 + (k * 3 + j) as u64;
            let d = Data::random(dims, seed, o);
            let (w, w2) = loss_weights(dims, seed);
            let g = ref_bwd(dims, &d, &w, &w2);
            check_numeric("reference", dims, &d, seed, &g, 1e-6);
        }
    }
}

#[test]
fn fast_bwds_match_finite_differences() {
    for (k, dims) in small_dims().iter().enumerate() {
        for (j, o) in [ALL, NONE, ALL_RESETS].into_iter().enumerate() {
            let seed = 31 + (k * 3 + j) as u64;
            let d = Data::random(dims, seed, o);
            let (w, w2) = loss_weights(dims, seed);
            let (w, w2) = (to_f32(&w), to_f32(&w2));
            for kern in [Kern::Seq, Kern::Ssd(2), Kern::Ssd(3), Kern::Ssd(64)] {
                let g = fast_bwd(kern, dims, &d.f32(), &w, &w2);
                check_numeric(&format!("{kern:?}"), dims, &d, seed, &g, 2e-3);
            }
        }
    }
}

#[test]
fn ssd_chunked_equals_sequential() {
    let dims = Scan2Dims::new(2, 100, 4, 16, 8).with_groups(2);
    let d = Data::random(&dims, 5, ALL).f32();
    ssd_equals_sequential(&dims, &d);
    let with_resets = Data::random(&dims, 6, ALL_RESETS).f32();
    ssd_equals_sequential(&dims, &with_resets);
}

fn ssd_equals_sequential(dims: &Scan2Dims, d: &Data<f32>) {
    let dims = *dims;
    let (y, hl) = fast_fwd(Kern::Seq, &dims, d);
    let dy = to_f32(&Rng(9).vec(dims.n_blhp(), -1.0, 1.0));
    let dhl = to_f32(&Rng(10).vec(dims.n_bhpn(), -1.0, 1.0));
    let gs = fast_bwd(Kern::Seq, &dims, d, &dy, &dhl);
    for q in [1, 16, 37, 64, 100, 1000] {
        let (ys, hls) = fast_fwd(Kern::Ssd(q), &dims, d);
        assert_rel_max(&format!("y q={q}"), &ys, &y, 1e-5, 1.0);
        assert_rel_max(&format!("h_last q={q}"), &hls, &hl, 1e-5, 1.0);
        let g = fast_bwd(Kern::Ssd(q), &dims, d, &dy, &dhl);
        for i in 0..9 {
            assert_rel_max(&format!("{} q={q}", GRAD_NAMES[i]), &g[i], &gs[i], 1e-4, 1e-2);
        }
    }
}

#[test]
fn mamba2_equals_mamba1_with_repeated_a_and_delta() {
    mamba2_equals_mamba1(ALL, 77);
    // The two references implement resets separately; Mamba-1's is checked against running
    // each segment alone.
    mamba2_equals_mamba1(ALL_RESETS, 78);
}

fn mamba2_equals_mamba1(o: Opts, seed: u64) {
    let (b, l, h, p, n, g) = (2, 9, 4, 3, 5, 2);
    let dims = Scan2Dims::new(b, l, h, p, n).with_groups(g);
    let d = Data::random(&dims, seed, o);
    let (y2, hl2) = ref_fwd(&dims, &d);
    let dim = h * p;
    let rep = |v: &[f64]| -> Vec<f64> { v.iter().flat_map(|&x| vec![x; p]).collect() };
    let delta1 = rep(&d.delta);
    let a1: Vec<f64> = d.a.iter().flat_map(|&x| vec![x; p * n]).collect();
    let dvec = rep(d.d.as_ref().unwrap());
    let bias = rep(d.bias.as_ref().unwrap());
    let args1 = Scan1Args {
        d: Some(&dvec),
        z: d.z.as_deref(),
        delta_bias: Some(&bias),
        delta_softplus: true,
        h0: d.h0.as_deref(),
        resets: d.resets.as_deref(),
        ..Scan1Args::new(&d.x, &delta1, &a1, &d.b, &d.c)
    };
    let dims1 = Scan1Dims::new(b, l, dim, n).with_groups(g);
    let mut y1 = vec![0.0; b * l * dim];
    let mut hl1 = vec![0.0; b * dim * n];
    ref1::scan_fwd(&dims1, &args1, Scan1Out::with_state(&mut y1, &mut hl1));
    assert_close("y", &y2, &y1, 1e-12, 1e-12);
    assert_close("h_last", &hl2, &hl1, 1e-12, 1e-12);
    let (yf, _) = fast_fwd(Kern::Seq, &dims, &d.f32());
    assert_rel_max("fast y", &yf, &y1, 1e-5, 1.0);
}

#[test]
fn final_state_gradient_flows_into_dh0() {
    let dims = Scan2Dims::new(2, 6, 2, 5, 3);
    let mut o = NONE;
    o.h0 = true;
    let d = Data::random(&dims, 3, o);
    let dy = vec![0.0; dims.n_blhp()];
    let dhl = Rng(4).vec(dims.n_bhpn(), -1.0, 1.0);
    // dh0 = (Π_t ā_t) · dh_last per (b, h).
    let want: Vec<f64> = (0..dims.n_bhpn())
        .map(|i| {
            let bh = i / (dims.headdim * dims.dstate);
            let (bb, hh) = (bh / dims.nheads, bh % dims.nheads);
            let lsum: f64 =
                (0..dims.seqlen).map(|t| d.delta[(bb * dims.seqlen + t) * dims.nheads + hh] * d.a[hh]).sum();
            lsum.exp() * dhl[i]
        })
        .collect();
    let g = ref_bwd(&dims, &d, &dy, &dhl);
    assert_close("reference dh0", &g[8], &want, 1e-12, 1e-12);
    for k in [Kern::Seq, Kern::Ssd(4)] {
        let g = fast_bwd(k, &dims, &d.f32(), &to_f32(&dy), &to_f32(&dhl));
        assert_close(&format!("{k:?} dh0"), &g[8], &want, 1e-5, 1e-6);
        assert!(g[0].iter().all(|v| v.abs() > 0.0), "dx must see dh_last");
    }
    // L = 0: the state passes straight through.
    let dims0 = dims.with_seqlen(0);
    let d0 = Data::random(&dims0, 3, o);
    for k in [Kern::Seq, Kern::Ssd(4)] {
        let (_, hl) = fast_fwd(k, &dims0, &d0.f32());
        assert_close(&format!("{k:?} L=0 h_last"), &hl, d0.h0.as_ref().unwrap(), 1e-7, 0.0);
        let g = fast_bwd(k, &dims0, &d0.f32(), &[], &to_f32(&dhl));
        assert_close(&format!("{k:?} L=0 dh0"), &g[8], &dhl, 1e-7, 0.0);
    }
}

#[test]
#[should_panic(
    expected = "mamba2::scan_fwd: `delta` has 5 elements, but its layout (B, L, H) = (1, 2, 3) needs 6"
)]
fn seq_fwd_wrong_delta_length_panics() {
    let dims = Scan2Dims::new(1, 2, 3, 4, 2);
    let mut d = Data::random(&dims, 1, NONE).f32();
    d.delta.pop();
    fast_fwd(Kern::Seq, &dims, &d);
}

#[test]
#[should_panic(expected = "mamba2::ssd_bwd: `dh_last` has")]
fn ssd_bwd_wrong_dh_last_length_panics() {
    let dims = Scan2Dims::new(1, 2, 2, 4, 2);
    let d = Data::random(&dims, 1, NONE).f32();
    fast_bwd(Kern::Ssd(2), &dims, &d, &vec![0.0; dims.n_blhp()], &[0.0; 3]);
}

#[test]
#[should_panic(expected = "mamba2::scan_step: `state` has")]
fn step_wrong_state_length_panics() {
    let dims = Scan2Dims::new(1, 1, 2, 4, 2);
    let d = Data::random(&dims, 1, NONE).f32();
    let mut st = vec![0.0; 3];
    let mut y = vec![0.0; dims.n_blhp()];
    scan_step(&dims, &d.args(), &mut st, &mut y);
}

#[test]
#[should_panic(expected = "invalid dims: ngroups 2 must divide nheads 3")]
fn groups_must_divide_heads() {
    let dims = Scan2Dims::new(1, 2, 3, 4, 2).with_groups(2);
    Scan2Dims::validate(&dims, "mamba2::scan_fwd");
}

#[test]
fn auto_kernels_match_reference() {
    // N·P = 8192 and L ≥ 64: the backward takes the SSD path, the forward the sequential one;
    // at N·P = 4096 both are sequential.
    assert!(!use_ssd(&Scan2Dims::new(1, 70, 2, 64, 64), true));
    let dims = Scan2Dims::new(1, 70, 2, 64, 128);
    assert!(use_ssd(&dims, true) && !use_ssd(&dims, false));
    let d = Data::random(&dims, 21, ALL);
    let (y, hl) = ref_fwd(&dims, &d);
    let d32 = d.f32();
    let mut yf = vec![0.0f32; dims.n_blhp()];
    let mut hlf = vec![0.0f32; dims.n_bhpn()];
    let out = Scan2Out { y: &mut yf, h_last: Some(&mut hlf) };
    scan_fwd_auto(&dims, AUTO_CHUNK, &d32.args(), out);
    assert_rel_max("auto y", &yf, &y, 1e-4, 1.0);
    assert_rel_max("auto h_last", &hlf, &hl, 1e-4, 1.0);
    let (w, w2) = loss_weights(&dims, 21);
    let want = ref_bwd(&dims, &d, &w, &w2);
    let mut g = zero_grads(&dims);
    let floors = grad_floors(&dims, &d, &w, &w2, &want);
    let (w, w2) = (to_f32(&w), to_f32(&w2));
    scan_bwd_auto(&dims, AUTO_CHUNK, &d32.args(), &w, Some(&w2), grads_view(&mut g));
    for i in 0..9 {
        assert_rel_max(&format!("auto {}", GRAD_NAMES[i]), &g[i], &want[i], 3e-4, floors[i]);
    }
}
