//! Fast Mamba-1 kernels against the reference, and every backward against finite differences.

use proptest::prelude::*;

use super::*;
use crate::reference::mamba1 as refk;
use crate::testing::{
    Rng, assert_close, assert_rel_max, cases, channel_abs_sum, dot, numeric_grad, random_resets, segments,
    to_f32, to_f64,
};

/// A random problem in f64 (converted to f32 for the fast kernels).
#[derive(Clone, Debug)]
struct Case {
    dims: Scan1Dims,
    u: Vec<f64>,
    delta: Vec<f64>,
    a: Vec<f64>,
    b: Vec<f64>,
    c: Vec<f64>,
    d: Option<Vec<f64>>,
    z: Option<Vec<f64>>,
    bias: Option<Vec<f64>>,
    softplus: bool,
    h0: Option<Vec<f64>>,
    /// Sequence starts, (B, L).
    resets: Option<Vec<bool>>,
    /// Upstream gradients.
    dy: Vec<f64>,
    dh_last: Option<Vec<f64>>,
}

struct Opts {
    d: bool,
    z: bool,
    bias: bool,
    h0: bool,
    dh_last: bool,
    resets: bool,
}

impl Case {
    fn new(dims: Scan1Dims, o: Opts, seed: u64) -> Self {
        let mut r = Rng(seed);
        let (nbld, nblgn, nbdn) = (dims.n_bld(), dims.n_blgn(), dims.n_bdn());
        let softplus = o.bias;
        Self {
            dims,
            u: r.vec(nbld, -1.0, 1.0),
            // Raw Δ: with softplus it may be negative; without, it must be a positive step.
            delta: if softplus { r.vec(nbld, -3.0, 1.0) } else { r.vec(nbld, 0.01, 0.6) },
            a: (0..dims.dim * dims.dstate).map(|_| -r.uniform(-1.5, 1.0).exp()).collect(),
            b: r.vec(nblgn, -1.0, 1.0),
            c: r.vec(nblgn, -1.0, 1.0),
            d: o.d.then(|| r.vec(dims.dim, -1.0, 1.0)),
            z: o.z.then(|| r.vec(nbld, -2.0, 2.0)),
            bias: o.bias.then(|| r.vec(dims.dim, -1.0, 1.0)),
            softplus,
            h0: o.h0.then(|| r.vec(nbdn, -1.0, 1.0)),
            resets: o.resets.then(|| random_resets(&mut r, dims.batch * dims.seqlen)),
            dy: r.vec(nbld, -1.0, 1.0),
            dh_last: o.dh_last.then(|| r.vec(nbdn, -1.0, 1.0)),
        }
    }
}

impl Case {
    /// The size of the terms `dD` sums, `max_d Σ_{b,l} |dy·u|` (×2 with the gate, `|silu(z)| < 2`
    /// here): its f32 rounding is relative to them, not to the sum, which can cancel to near 0.
    fn dd_scale(&self) -> f64 {
        let terms: Vec<f64> = self.dy.iter().zip(&self.u).map(|(dy, u)| dy * u).collect();
        let gate = if self.z.is_some() { 2.0 } else { 1.0 };
        channel_abs_sum(&terms, self.dims.dim, 1) * gate
    }
}

/// The same case in f32.
struct Case32 {
    u: Vec<f32>,
    delta: Vec<f32>,
    a: Vec<f32>,
    b: Vec<f32>,
    c: Vec<f32>,
    d: Option<Vec<f32>>,
    z: Option<Vec<f32>>,
    bias: Option<Vec<f32>>,
    h0: Option<Vec<f32>>,
    dy: Vec<f32>,
    dh_last: Option<Vec<f32>>,
}

impl Case {
    fn f32(&self) -> Case32 {
        let o = |v: &Option<Vec<f64>>| v.as_deref().map(to_f32);
        Case32 {
            u: to_f32(&self.u),
            delta: to_f32(&self.delta),
            a: to_f32(&self.a),
            b: to_f32(&self.b),
            c: to_f32(&self.c),
            d: o(&self.d),
            z: o(&self.z),
            bias: o(&self.bias),
            h0: o(&self.h0),
            dy: to_f32(&self.dy),
            dh_last: o(&self.dh_last),
        }
    }

    fn args(&self) -> Scan1Args<'_, f64> {
        Scan1Args {
            u: &self.u,
            delta: &self.delta,
            a: &self.a,
            b: &self.b,
            c: &self.c,
            d: self.d.as_deref(),
            z: self.z.as_deref(),
            delta_bias: self.bias.as_deref(),
            delta_softplus: self.softplus,
            h0: self.h0.as_deref(),
            resets: self.resets.as_deref(),
        }
    }
}

impl Case32 {
    fn args<'a>(&'a self, case: &'a Case) -> Scan1Args<'a, f32> {
        let softplus = case.softplus;
        Scan1Args {
            u: &self.u,
            delta: &self.delta,
            a: &self.a,
            b: &self.b,
            c: &self.c,
            d: self.d.as_deref(),
            z: self.z.as_deref(),
            delta_bias: self.bias.as_deref(),
            delta_softplus: softplus,
            h0: self.h0.as_deref(),
            resets: case.resets.as_deref(),
        }
    }
}

/// Owned gradient buffers, zero-initialised.
#[derive(Clone, Debug, PartialEq)]
struct G<T> {
    du: Vec<T>,
    ddelta: Vec<T>,
    da: Vec<T>,
    db: Vec<T>,
    dc: Vec<T>,
    dd: Vec<T>,
    dz: Vec<T>,
    dbias: Vec<T>,
    dh0: Vec<T>,
}

impl<T: crate::Real> G<T> {
    fn zeros(d: &Scan1Dims) -> Self {
        let z = |n| vec![T::zero(); n];
        Self {
            du: z(d.n_bld()),
            ddelta: z(d.n_bld()),
            da: z(d.dim * d.dstate),
            db: z(d.n_blgn()),
            dc: z(d.n_blgn()),
            dd: z(d.dim),
            dz: z(d.n_bld()),
            dbias: z(d.dim),
            dh0: z(d.n_bdn()),
        }
    }

    fn view(&mut self) -> Scan1Grads<'_, T> {
        Scan1Grads {
            du: &mut self.du,
            ddelta: &mut self.ddelta,
            da: &mut self.da,
            db: &mut self.db,
            dc: &mut self.dc,
            dd: Some(&mut self.dd),
            dz: Some(&mut self.dz),
            ddelta_bias: Some(&mut self.dbias),
            dh0: Some(&mut self.dh0),
        }
    }

    fn named(&self) -> Vec<(&'static str, &[T])> {
        vec![
            ("du", &self.du),
            ("ddelta", &self.ddelta),
            ("da", &self.da),
            ("db", &self.db),
            ("dc", &self.dc),
            ("dd", &self.dd),
            ("dz", &self.dz),
            ("dbias", &self.dbias),
            ("dh0", &self.dh0),
        ]
    }
}

fn ref_fwd(case: &Case) -> (Vec<f64>, Vec<f64>) {
    let mut y = vec![0.0; case.dims.n_bld()];
    let mut hl = vec![0.0; case.dims.n_bdn()];
    refk::scan_fwd(&case.dims, &case.args(), Scan1Out::with_state(&mut y, &mut hl));
    (y, hl)
}

fn fast_fwd(case: &Case, c32: &Case32) -> (Vec<f32>, Vec<f32>) {
    let mut y = vec![0.0; case.dims.n_bld()];
    let mut hl = vec![0.0; case.dims.n_bdn()];
    scan_fwd(&case.dims, &c32.args(case), Scan1Out::with_state(&mut y, &mut hl));
    (y, hl)
}

fn ref_bwd(case: &Case) -> G<f64> {
    let mut g = G::zeros(&case.dims);
    refk::scan_bwd(&case.dims, &case.args(), &case.dy, case.dh_last.as_deref(), g.view());
    g
}

fn fast_bwd(case: &Case, c32: &Case32) -> G<f32> {
    let mut g = G::zeros(&case.dims);
    scan_bwd(&case.dims, &c32.args(case), &c32.dy, c32.dh_last.as_deref(), g.view());
    g
}

/// The loss whose gradient the backward computes: `Σ dy·y + Σ dh_last·h_last`.
fn loss(case: &Case) -> f64 {
    let (y, hl) = ref_fwd(case);
    dot(&case.dy, &y) + case.dh_last.as_deref().map_or(0.0, |w| dot(w, &hl))
}

/// Finite-difference gradients of [`loss`] for every input, in the order of [`G::named`].
fn fd_grads(case: &Case) -> G<f64> {
    let eps = 1e-6;
    let mut out = G::zeros(&case.dims);
    macro_rules! fd {
        ($field:ident, $dst:ident) => {{
            let x0 = case.$field.clone();
            out.$dst = numeric_grad(&x0, eps, |x| {
                let mut c = case.clone();
                c.$field = x.to_vec();
                loss(&c)
            });
        }};
        (opt $field:ident, $dst:ident) => {{
            if let Some(x0) = case.$field.clone() {
                out.$dst = numeric_grad(&x0, eps, |x| {
                    let mut c = case.clone();
                    c.$field = Some(x.to_vec());
                    loss(&c)
                });
            }
        }};
    }
    fd!(u, du);
    fd!(delta, ddelta);
    fd!(a, da);
    fd!(b, db);
    fd!(c, dc);
    fd!(opt d, dd);
    fd!(opt z, dz);
    fd!(opt bias, dbias);
    fd!(opt h0, dh0);
    out
}

fn dims_strategy() -> impl Strategy<Value = (Scan1Dims, bool, bool, bool, bool, bool, u64)> {
    (
        1usize..3,
        prop_oneof![Just(1usize), 2..20usize, Just(65), Just(130)],
        prop_oneof![Just(1usize), 2..20usize, Just(24), Just(70)],
        prop_oneof![Just(1usize), Just(4), Just(16), Just(64)],
        1usize..3,
        any::<(bool, bool, bool, bool, bool)>(),
        any::<u64>(),
    )
        .prop_map(|(bsz, l, d, n, g, (od, oz, ob, oh, odl), seed)| {
            // Groups must divide D.
            let d = if d % g == 0 { d } else { d * g };
            (Scan1Dims::new(bsz, l, d, n).with_groups(g), od, oz, ob, oh, odl, seed)
        })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(cases(24)))]

    #[test]
    fn fast_forward_matches_reference((dims, d, z, bias, h0, dl, seed) in dims_strategy()) {
        let case = Case::new(dims, Opts { d, z, bias, h0, dh_last: dl, resets: seed & 1 == 1 }, seed);
        let (y, hl) = fast_fwd(&case, &case.f32());
        let (yr, hlr) = ref_fwd(&case);
        assert_close("y", &y, &yr, 1e-4, 1e-4);
        assert_close("h_last", &hl, &hlr, 1e-4, 1e-4);
    }

    #[test]
    fn fast_backward_matches_reference((dims, d, z, bias, h0, dl, seed) in dims_strategy()) {
        let case = Case::new(dims, Opts { d, z, bias, h0, dh_last: dl, resets: seed & 1 == 1 }, seed);
        let g = fast_bwd(&case, &case.f32());
        let gr = ref_bwd(&case);
        // dD and dbias are sums over (batch, position) that can cancel: their floors are the
        // sizes of the summands, at which their f32 rounding happens.
        let dd_floor = case.dd_scale();
        let dbias_floor = channel_abs_sum(&gr.ddelta, dims.dim, 1);
        for ((name, got), (_, want)) in g.named().into_iter().zip(gr.named()) {
            let floor = match name {
                "dd" => dd_floor,
                "dbias" => dbias_floor,
                _ => 0.0,
            };
            assert_rel_max(name, got, want, 1e-4, floor.max(1e-3));
        }
    }

    #[test]
    fn fast_step_matches_full_scan((dims, d, z, bias, h0, _dl, seed) in dims_strategy()) {
        let case = Case::new(dims, Opts { d, z, bias, h0, dh_last: false, resets: false }, seed);
        let c32 = case.f32();
        let (y_full, h_full) = fast_fwd(&case, &c32);
        let Scan1Dims { batch, seqlen, dim, dstate: n, ngroups } = dims;
        let mut state = c32.h0.clone().unwrap_or_else(|| vec![0.0; dims.n_bdn()]);
        let mut state_ref: Vec<f64> = to_f64(&state);
        let sd = Scan1Dims { seqlen: 1, ..dims };
        let mut y_steps = vec![0.0f32; dims.n_bld()];
        for t in 0..seqlen {
            let pick = |v: &[f32], w: usize| -> Vec<f32> {
                (0..batch).flat_map(|b| v[(b * seqlen + t) * w..(b * seqlen + t + 1) * w].to_vec()).collect()
            };
            let (u, dl, bb, cc) = (pick(&c32.u, dim), pick(&c32.delta, dim), pick(&c32.b, ngroups * n), pick(&c32.c, ngroups * n));
            let zz = c32.z.as_deref().map(|z| pick(z, dim));
            let args = Scan1Args { u: &u, delta: &dl, a: &c32.a, b: &bb, c: &cc, d: c32.d.as_deref(), z: zz.as_deref(),
                delta_bias: c32.bias.as_deref(), delta_softplus: case.softplus, h0: None, resets: None };
            let mut y = vec![0.0f32; batch * dim];
            // Split over a decode team (however small): the same state and outputs.
            let (mut state_t, mut y_t) = (state.clone(), vec![f32::NAN; batch * dim]);
            TEAM.with(|team| team.install_splitting_from(0, || scan_step(&sd, &args, &mut state_t, &mut y_t)));
            scan_step(&sd, &args, &mut state, &mut y);
            assert_eq!((&state_t, &y_t), (&state, &y), "scan_step over a team");
            // The reference step agrees too.
            let (u64_, dl64, bb64, cc64) = (to_f64(&u), to_f64(&dl), to_f64(&bb), to_f64(&cc));
            let zz64 = zz.as_deref().map(to_f64);
            let args64 = Scan1Args { u: &u64_, delta: &dl64, a: &case.a, b: &bb64, c: &cc64,
                d: case.d.as_deref(), z: zz64.as_deref(), delta_bias: case.bias.as_deref(),
                delta_softplus: case.softplus, h0: None, resets: None };
            let mut yr = vec![0.0f64; batch * dim];
            refk::scan_step(&sd, &args64, &mut state_ref, &mut yr);
            assert_close("step y vs reference step", &y, &yr, 1e-4, 1e-4);
            for b in 0..batch {
                y_steps[(b * seqlen + t) * dim..(b * seqlen + t + 1) * dim].copy_from_slice(&y[b * dim..(b + 1) * dim]);
            }
        }
        assert_close("y (steps vs scan)", &y_steps, &y_full, 1e-4, 1e-4);
        assert_close("state (steps vs scan)", &state, &h_full, 1e-4, 1e-4);
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(cases(16)))]

    #[test]
    fn checkpoints_match_reference_and_feed_the_backward(
        (dims, d, z, bias, h0, dl, seed) in dims_strategy(),
    ) {
        let case = Case::new(dims, Opts { d, z, bias, h0, dh_last: dl, resets: seed & 1 == 1 }, seed);
        let c32 = case.f32();
        let (mut y, mut y_ref) = (vec![0.0f32; dims.n_bld()], vec![0.0f64; dims.n_bld()]);
        let mut ck = vec![f32::NAN; dims.n_checkpoints()];
        let mut ck_ref = vec![f64::NAN; dims.n_checkpoints()];
        let out = Scan1Out { y: &mut y, h_last: None, checkpoints: Some(&mut ck) };
        scan_fwd(&dims, &c32.args(&case), out);
        let out_ref = Scan1Out { y: &mut y_ref, h_last: None, checkpoints: Some(&mut ck_ref) };
        refk::scan_fwd(&dims, &case.args(), out_ref);
        assert_close("checkpoints", &ck, &ck_ref, 1e-4, 1e-4);
        let plain = fast_bwd(&case, &c32);
        let mut g = G::zeros(&dims);
        scan_bwd_with_checkpoints(&dims, &c32.args(&case), &ck, &c32.dy, c32.dh_last.as_deref(), g.view());
        for ((name, got), (_, want)) in g.named().into_iter().zip(plain.named()) {
            assert_close(name, got, want, 1e-6, 1e-6);
        }
    }
}

/// Finite-difference cases: small, covering every option and groups.
fn fd_cases() -> Vec<Case> {
    let all = || Opts { d: true, z: true, bias: true, h0: true, dh_last: true, resets: false };
    vec![
        Case::new(Scan1Dims::new(2, 5, 3, 2), all(), 1),
        Case::new(Scan1Dims::new(1, 7, 4, 3).with_groups(2), all(), 2),
        Case::new(
            Scan1Dims::new(1, 4, 9, 2),
            Opts { d: false, z: false, bias: false, h0: false, dh_last: false, resets: false },
            3,
        ),
        Case::new(Scan1Dims::new(1, 3, 10, 1).with_groups(5), all(), 4),
        Case::new(Scan1Dims::new(2, 9, 3, 2), Opts { resets: true, ..all() }, 6),
        Case::new(Scan1Dims::new(1, 8, 4, 3).with_groups(2), Opts { resets: true, ..all() }, 7),
    ]
}

#[test]
fn reference_backward_matches_finite_differences_f64() {
    for case in fd_cases() {
        let g = ref_bwd(&case);
        let fd = fd_grads(&case);
        for ((name, got), (_, want)) in g.named().into_iter().zip(fd.named()) {
            assert_rel_max(&format!("{name} {:?}", case.dims), got, want, 1e-6, 1e-8);
        }
    }
}

#[test]
fn fast_backward_matches_finite_differences_f64() {
    // Includes a sequence longer than one recomputation chunk.
    let mut cases = fd_cases();
    cases.push(Case::new(
        Scan1Dims::new(1, CHUNK + 9, 9, 2),
        Opts { d: true, z: true, bias: true, h0: true, dh_last: true, resets: false },
        5,
    ));
    cases.push(Case::new(
        Scan1Dims::new(1, CHUNK + 9, 9, 2),
        Opts { d: true, z: true, bias: true, h0: true, dh_last: true, resets: true },
        8,
    ));
    for case in cases {
        let g = fast_bwd(&case, &case.f32());
        let fd = fd_grads(&case);
        for ((name, got), (_, want)) in g.named().into_iter().zip(fd.named()) {
            assert_rel_max(&format!("{name} {:?}", case.dims), got, want, 1e-4, 1e-6);
        }
    }
}

/// A case cut to rows `t0..t1` of batch row `b`, starting from `h0` (absent: zero).
fn sub_case(case: &Case, b: usize, (t0, t1): (usize, usize), h0: Option<Vec<f64>>) -> Case {
    let Scan1Dims { seqlen, dim, dstate: n, ngroups, .. } = case.dims;
    let rows = |v: &[f64], w: usize| v[(b * seqlen + t0) * w..(b * seqlen + t1) * w].to_vec();
    let gn = ngroups * n;
    Case {
        dims: Scan1Dims::new(1, t1 - t0, dim, n).with_groups(ngroups),
        u: rows(&case.u, dim),
        delta: rows(&case.delta, dim),
        b: rows(&case.b, gn),
        c: rows(&case.c, gn),
        z: case.z.as_deref().map(|z| rows(z, dim)),
        h0,
        resets: None,
        dy: rows(&case.dy, dim),
        dh_last: None,
        ..case.clone()
    }
}

#[test]
fn reference_resets_equal_running_each_segment_alone() {
    // The meaning of a reset, checked without the reset code: every segment run on its own.
    for seed in 0..6 {
        let o = Opts { d: true, z: true, bias: true, h0: true, dh_last: false, resets: true };
        let case = Case::new(Scan1Dims::new(2, 23, 5, 3), o, 100 + seed);
        let (y, hl) = ref_fwd(&case);
        let Scan1Dims { seqlen, dim, dstate: n, .. } = case.dims;
        for b in 0..2 {
            let resets = &case.resets.as_ref().unwrap()[b * seqlen..(b + 1) * seqlen];
            for (t0, t1) in segments(resets) {
                // Only a first segment that is not itself a reset continues from h0.
                let h0 = (t0 == 0 && !resets[0])
                    .then(|| case.h0.as_ref().unwrap()[b * dim * n..(b + 1) * dim * n].to_vec());
                let (ys, hs) = ref_fwd(&sub_case(&case, b, (t0, t1), h0));
                let want = &y[(b * seqlen + t0) * dim..(b * seqlen + t1) * dim];
                assert_close("segment y", want, &ys, 1e-12, 1e-12);
                if t1 == seqlen {
                    assert_close("final state", &hl[b * dim * n..(b + 1) * dim * n], &hs, 1e-12, 1e-12);
                }
            }
        }
    }
}

#[test]
fn final_state_gradient_flows_into_dh0() {
    // Only dh_last is non-zero; dh0 must be ∏_t exp(Δ_t A) ⊙ dh_last (computed here by hand).
    let dims = Scan1Dims::new(1, 5, 3, 2);
    let mut case =
        Case::new(dims, Opts { d: true, z: false, bias: false, h0: true, dh_last: true, resets: false }, 9);
    case.dy.fill(0.0);
    let g = fast_bwd(&case, &case.f32());
    for d in 0..3 {
        for k in 0..2 {
            let decay: f64 = (0..5).map(|t| (case.delta[t * 3 + d] * case.a[d * 2 + k]).exp()).product();
            let want = decay * case.dh_last.as_ref().unwrap()[d * 2 + k];
            assert!(
                (g.dh0[d * 2 + k] as f64 - want).abs() < 1e-5,
                "dh0[{d},{k}] = {} want {want}",
                g.dh0[d * 2 + k]
            );
        }
    }
    assert!(g.dh0.iter().any(|&v| v.abs() > 1e-3), "dh0 must not be trivially zero");
}

#[test]
fn backward_accumulates_into_existing_gradients() {
    let case = Case::new(
        Scan1Dims::new(1, 6, 5, 4),
        Opts { d: true, z: true, bias: true, h0: true, dh_last: true, resets: false },
        11,
    );
    let c32 = case.f32();
    let once = fast_bwd(&case, &c32);
    let mut g = G::zeros(&case.dims);
    scan_bwd(&case.dims, &c32.args(&case), &c32.dy, c32.dh_last.as_deref(), g.view());
    scan_bwd(&case.dims, &c32.args(&case), &c32.dy, c32.dh_last.as_deref(), g.view());
    for ((name, twice), (_, one)) in g.named().into_iter().zip(once.named()) {
        let doubled: Vec<f32> = one.iter().map(|v| 2.0 * v).collect();
        assert_close(name, twice, &doubled, 1e-6, 1e-6);
    }
}

#[test]
fn single_thread_and_many_tasks_agree() {
    // Batch 1 splits channels over several tasks (partial dB/dC); a 1-thread pool does not.
    let case = Case::new(
        Scan1Dims::new(1, 33, 70, 4),
        Opts { d: true, z: true, bias: true, h0: true, dh_last: true, resets: false },
        13,
    );
    let c32 = case.f32();
    let pool = |t| rayon::ThreadPoolBuilder::new().num_threads(t).build().unwrap();
    let g1 = pool(1).install(|| fast_bwd(&case, &c32));
    let g4 = pool(4).install(|| fast_bwd(&case, &c32));
    for ((name, a), (_, b)) in g1.named().into_iter().zip(g4.named()) {
        assert_close(name, a, b, 1e-5, 1e-6);
    }
}

#[test]
#[should_panic(
    expected = "mamba1::scan_fwd: `b` has 5 elements, but its layout (B, L, G, N) = (1, 2, 1, 3) needs 6"
)]
fn wrong_length_panics_naming_the_argument() {
    let dims = Scan1Dims::new(1, 2, 2, 3);
    let (u, a, b, c) = (vec![0.0f32; 4], vec![0.0f32; 6], vec![0.0f32; 5], vec![0.0f32; 6]);
    let mut y = vec![0.0f32; 4];
    scan_fwd(&dims, &Scan1Args::new(&u, &u, &a, &b, &c), Scan1Out::new(&mut y));
}

#[test]
#[should_panic(expected = "mamba1::scan_bwd: `dy` has 3 elements")]
fn wrong_upstream_length_panics() {
    let dims = Scan1Dims::new(1, 2, 2, 3);
    let (u, a, bc) = (vec![0.0f32; 4], vec![0.0f32; 6], vec![0.0f32; 6]);
    let mut g = G::<f32>::zeros(&dims);
    scan_bwd(&dims, &Scan1Args::new(&u, &u, &a, &bc, &bc), &[0.0; 3], None, g.view());
}

#[test]
#[should_panic(expected = "ngroups 3 must divide dim 4")]
fn groups_must_divide_channels() {
    let dims = Scan1Dims::new(1, 1, 4, 1).with_groups(3);
    let v = vec![0.0f32; 4];
    let mut y = vec![0.0f32; 4];
    scan_fwd(&dims, &Scan1Args::new(&v, &v, &v, &v[..3], &v[..3]), Scan1Out::new(&mut y));
}

thread_local! {
    /// A decode team for the step tests (3 threads, so parts are uneven).
    static TEAM: crate::team::Team = crate::team::Team::new(3);
}
