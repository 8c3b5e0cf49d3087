//! Every instruction-set level this CPU runs gives the same results, within rounding.
//!
//! Each kernel family runs on one fixed problem per level (chosen with `isa::set`; this file is
//! its own test binary, so no other test sees the switch), and every output is compared with the
//! portable level's: `max |a − b| ≤ 2e-4 · max(max |b|, 1)` per output. The levels differ only in
//! rounding — the portable level does not fuse multiply-adds, sums in another order and refines
//! a different reciprocal estimate — so a wrong lane, a missed tail or a mask error shows as an
//! error of the size of the values themselves. Each level is also checked against the naive
//! reference loops by the unit tests, which `.ci/run` runs once per level (`MAMBA_SIMD`).

use ssm_kernel::conv::{self, ConvArgs, ConvDims, ConvGrads, ConvOut};
use ssm_kernel::isa::{self, Isa};
use ssm_kernel::mamba1::{self, Scan1Args, Scan1Dims, Scan1Grads, Scan1Out};
use ssm_kernel::mamba2::{
    self, MixerDims, MixerGrads, MixerOut, MixerParams, Scan2Args, Scan2Dims, Scan2Grads, Scan2Out,
};
use ssm_kernel::testing::{Rng, to_f32};
use ssm_kernel::{matvec, norm, qweight, simd, xent};

/// Named outputs of one run of every kernel family.
type Outputs = Vec<(String, Vec<f32>)>;

fn rand(r: &mut Rng, n: usize, lo: f64, hi: f64) -> Vec<f32> {
    to_f32(&r.vec(n, lo, hi))
}

/// Mamba-1: forward with state, backward, and a step (D = 45: two full 16-lane tiles and a
/// partial one; groups that straddle tiles; N = 16 and 5 for the unrolled and runtime paths).
fn mamba1(out: &mut Outputs) {
    for (n, g) in [(16usize, 3usize), (5, 1)] {
        let dims = Scan1Dims::new(2, 37, 45, n).with_groups(g);
        let mut r = Rng(11 + n as u64);
        let (bld, blgn) = (dims.n_bld(), dims.n_blgn());
        let u = rand(&mut r, bld, -1.0, 1.0);
        let delta = rand(&mut r, bld, -2.0, 1.0);
        let a = rand(&mut r, 45 * n, -2.0, -0.1);
        let (b, c) = (rand(&mut r, blgn, -1.0, 1.0), rand(&mut r, blgn, -1.0, 1.0));
        let (d, z, bias) =
            (rand(&mut r, 45, -1.0, 1.0), rand(&mut r, bld, -2.0, 2.0), rand(&mut r, 45, -1.0, 1.0));
        let resets: Vec<bool> = (0..2 * 37).map(|i| i % 37 == 0 || i == 20).collect();
        let args = Scan1Args {
            d: Some(&d),
            z: Some(&z),
            delta_bias: Some(&bias),
            delta_softplus: true,
            resets: Some(&resets),
            ..Scan1Args::new(&u, &delta, &a, &b, &c)
        };
        let (mut y, mut hl) = (vec![0.0f32; bld], vec![0.0f32; dims.n_bdn()]);
        mamba1::scan_fwd(&dims, &args, Scan1Out::with_state(&mut y, &mut hl));
        let dy = rand(&mut r, bld, -1.0, 1.0);
        let (mut du, mut dd_, mut da, mut db, mut dc) =
            (vec![0.0; bld], vec![0.0; bld], vec![0.0; 45 * n], vec![0.0; blgn], vec![0.0; blgn]);
        let (mut dd, mut dz, mut dbias) = (vec![0.0; 45], vec![0.0; bld], vec![0.0; 45]);
        let grads = Scan1Grads {
            du: &mut du,
            ddelta: &mut dd_,
            da: &mut da,
            db: &mut db,
            dc: &mut dc,
            dd: Some(&mut dd),
            dz: Some(&mut dz),
            ddelta_bias: Some(&mut dbias),
            dh0: None,
        };
        mamba1::scan_bwd(&dims, &args, &dy, None, grads);
        let sd = Scan1Dims::new(2, 1, 45, n).with_groups(g);
        let step_args = Scan1Args {
            d: Some(&d),
            z: Some(&z[..90]),
            delta_bias: Some(&bias),
            delta_softplus: true,
            ..Scan1Args::new(&u[..90], &delta[..90], &a, &b[..2 * g * n], &c[..2 * g * n])
        };
        let (mut state, mut ys) = (hl.clone(), vec![0.0f32; 90]);
        mamba1::scan_step(&sd, &step_args, &mut state, &mut ys);
        for (k, v) in [
            ("y", y),
            ("h_last", hl),
            ("du", du),
            ("ddelta", dd_),
            ("dA", da),
            ("dB", db),
            ("dC", dc),
            ("dD", dd),
            ("dz", dz),
            ("dbias", dbias),
            ("step state", state),
            ("step y", ys),
        ] {
            out.push((format!("mamba1 N{n} {k}"), v));
        }
    }
}

/// Mamba-2: the sequential scan (P = 12: a partial vector) and SSD, forward and backward, and a
/// step.
fn mamba2(out: &mut Outputs) {
    let dims = Scan2Dims::new(2, 29, 4, 12, 16).with_groups(2);
    let mut r = Rng(21);
    let (blhp, blh, blgn) = (dims.n_blhp(), dims.n_blh(), dims.n_blgn());
    let x = rand(&mut r, blhp, -1.0, 1.0);
    let delta = rand(&mut r, blh, -2.0, 1.0);
    let a = rand(&mut r, 4, -2.0, -0.1);
    let (b, c) = (rand(&mut r, blgn, -1.0, 1.0), rand(&mut r, blgn, -1.0, 1.0));
    let (d, z, bias) =
        (rand(&mut r, 4, -1.0, 1.0), rand(&mut r, blhp, -2.0, 2.0), rand(&mut r, 4, -1.0, 1.0));
    let resets: Vec<bool> = (0..2 * 29).map(|i| i % 29 == 0 || i == 13).collect();
    let args = Scan2Args {
        d: Some(&d),
        z: Some(&z),
        delta_bias: Some(&bias),
        delta_softplus: true,
        resets: Some(&resets),
        ..Scan2Args::new(&x, &delta, &a, &b, &c)
    };
    let dy = rand(&mut r, blhp, -1.0, 1.0);
    for (name, ssd) in [("seq", false), ("ssd", true)] {
        let (mut y, mut hl) = (vec![0.0f32; blhp], vec![0.0f32; dims.n_bhpn()]);
        let o = Scan2Out { y: &mut y, h_last: Some(&mut hl) };
        if ssd {
            mamba2::ssd_fwd(&dims, 8, &args, o)
        } else {
            mamba2::scan_fwd(&dims, &args, o)
        }
        let (mut dx, mut ddl, mut da, mut db, mut dc) =
            (vec![0.0; blhp], vec![0.0; blh], vec![0.0; 4], vec![0.0; blgn], vec![0.0; blgn]);
        let (mut dd, mut dz, mut dbias) = (vec![0.0; 4], vec![0.0; blhp], vec![0.0; 4]);
        let g = Scan2Grads {
            dx: &mut dx,
            ddelta: &mut ddl,
            da: &mut da,
            db: &mut db,
            dc: &mut dc,
            dd: Some(&mut dd),
            dz: Some(&mut dz),
            ddelta_bias: Some(&mut dbias),
            dh0: None,
        };
        if ssd {
            mamba2::ssd_bwd(&dims, 8, &args, &dy, None, g)
        } else {
            mamba2::scan_bwd(&dims, &args, &dy, None, g)
        }
        for (k, v) in [
            ("y", y),
            ("h_last", hl),
            ("dx", dx),
            ("ddelta", ddl),
            ("dA", da),
            ("dB", db),
            ("dC", dc),
            ("dD", dd),
            ("dz", dz),
            ("dbias", dbias),
        ] {
            out.push((format!("mamba2 {name} {k}"), v));
        }
    }
    let sd = dims.with_seqlen(1);
    let sargs = Scan2Args {
        d: Some(&d),
        z: Some(&z[..96]),
        delta_bias: Some(&bias),
        delta_softplus: true,
        ..Scan2Args::new(&x[..96], &delta[..8], &a, &b[..64], &c[..64])
    };
    let (mut state, mut ys) = (rand(&mut r, sd.n_bhpn(), -1.0, 1.0), vec![0.0f32; 96]);
    mamba2::scan_step(&sd, &sargs, &mut state, &mut ys);
    out.push(("mamba2 step state".into(), state));
    out.push(("mamba2 step y".into(), ys));
}

/// The fused Mamba-2 mixer core, forward and backward.
fn mixer(out: &mut Outputs) {
    let dims = MixerDims { batch: 2, seqlen: 23, nheads: 4, headdim: 16, dstate: 8, ngroups: 2, width: 4 };
    let mut r = Rng(31);
    let (dp, di, cd) = (dims.proj_dim(), dims.d_inner(), dims.conv_dim());
    let rows = 2 * 23;
    let proj = rand(&mut r, rows * dp, -1.0, 1.0);
    let (conv_w, conv_b) = (rand(&mut r, cd * 4, -0.5, 0.5), rand(&mut r, cd, -0.5, 0.5));
    let (dt_bias, a, d) =
        (rand(&mut r, 4, -1.0, 1.0), rand(&mut r, 4, -2.0, -0.1), rand(&mut r, 4, -1.0, 1.0));
    let norm_w = rand(&mut r, di, 0.5, 1.5);
    let resets: Vec<bool> = (0..rows).map(|i| i % 23 == 0 || i == 9).collect();
    let p = MixerParams {
        conv_w: &conv_w,
        conv_b: Some(&conv_b),
        dt_bias: &dt_bias,
        a: &a,
        d: &d,
        norm_w: &norm_w,
        eps: 1e-5,
        resets: Some(&resets),
    };
    let (mut o, mut rstd, mut y, mut hl) = (
        vec![0.0f32; rows * di],
        vec![0.0f32; rows * 2],
        vec![0.0f32; rows * di],
        vec![0.0f32; 2 * 4 * 16 * 8],
    );
    mamba2::mixer_fwd(
        &dims,
        &proj,
        &p,
        MixerOut { out: &mut o, rstd: &mut rstd, y: Some(&mut y), h_last: Some(&mut hl) },
    );
    let dout = rand(&mut r, rows * di, -1.0, 1.0);
    let (mut dproj, mut dcw, mut dcb) = (vec![0.0f32; rows * dp], vec![0.0f32; cd * 4], vec![0.0f32; cd]);
    let (mut ddt, mut da, mut dd, mut dnw) =
        (vec![0.0f32; 4], vec![0.0f32; 4], vec![0.0f32; 4], vec![0.0f32; di]);
    let g = MixerGrads {
        dproj: &mut dproj,
        overwrite_dproj: true,
        dconv_w: &mut dcw,
        dconv_b: Some(&mut dcb),
        ddt_bias: &mut ddt,
        da: &mut da,
        dd: &mut dd,
        dnorm_w: &mut dnw,
    };
    mamba2::mixer_bwd(&dims, &proj, &p, (&rstd, &y), &dout, g);
    for (k, v) in [
        ("out", o),
        ("rstd", rstd),
        ("h_last", hl),
        ("dproj", dproj),
        ("dconv_w", dcw),
        ("dconv_b", dcb),
        ("ddt_bias", ddt),
        ("dA", da),
        ("dD", dd),
        ("dnorm_w", dnw),
    ] {
        out.push((format!("mixer {k}"), v));
    }
}

/// The causal conv (C = 21: a partial vector; widths 4 and 5), forward, backward and a step.
fn conv(out: &mut Outputs) {
    for k in [4usize, 5] {
        let dims = ConvDims::new(2, 70, 21, k);
        let mut r = Rng(41 + k as u64);
        let x = rand(&mut r, dims.n_blc(), -1.0, 1.0);
        let (w, b) = (rand(&mut r, 21 * k, -0.5, 0.5), rand(&mut r, 21, -0.5, 0.5));
        let resets: Vec<bool> = (0..140).map(|i| i % 70 == 0 || i == 33).collect();
        let args = ConvArgs { bias: Some(&b), silu: true, resets: Some(&resets), ..ConvArgs::new(&x, &w) };
        let (mut y, mut st) = (vec![0.0f32; dims.n_blc()], vec![0.0f32; dims.n_bck()]);
        conv::conv1d_fwd(&dims, &args, ConvOut { y: &mut y, state_out: Some(&mut st) });
        let dy = rand(&mut r, dims.n_blc(), -1.0, 1.0);
        let (mut dx, mut dw, mut db) = (vec![0.0f32; dims.n_blc()], vec![0.0f32; 21 * k], vec![0.0f32; 21]);
        conv::conv1d_bwd(
            &dims,
            &args,
            &dy,
            ConvGrads { dx: &mut dx, dweight: &mut dw, dbias: Some(&mut db) },
        );
        let sd = ConvDims::new(2, 1, 21, k);
        let sargs = ConvArgs { bias: Some(&b), silu: true, ..ConvArgs::new(&x[..42], &w) };
        let mut ys = vec![0.0f32; 42];
        conv::conv1d_step(&sd, &sargs, &mut st, &mut ys);
        for (n, v) in
            [("y", y), ("dx", dx), ("dweight", dw), ("dbias", db), ("step state", st), ("step y", ys)]
        {
            out.push((format!("conv K{k} {n}"), v));
        }
    }
}

/// Norms, cross-entropy, dots, mat-vecs and the 16/8-bit weight formats.
fn small(out: &mut Outputs) {
    let mut r = Rng(51);
    let (rows, d) = (5usize, 37usize);
    let x = rand(&mut r, rows * d, -2.0, 2.0);
    let w = rand(&mut r, d, 0.5, 1.5);
    let mut y = vec![0.0f32; rows * d];
    norm::rms_rows(&x, &w, d, 1e-5, &mut y);
    out.push(("rms_rows".into(), y));
    let v = 1031;
    let logits = rand(&mut r, 7 * v, -4.0, 4.0);
    let targets: Vec<i64> = (0..7).map(|i| (i * 131) as i64).collect();
    let mut lse = vec![0.0f32; 7];
    let (sum, _) = xent::xent_fwd(v, &logits, &targets, &mut lse);
    let mut dl = vec![0.0f32; 7 * v];
    xent::xent_bwd(v, &logits, &targets, &lse, 0.5, &mut dl);
    out.push(("xent lse".into(), lse));
    out.push(("xent loss".into(), vec![sum as f32]));
    out.push(("xent dlogits".into(), dl));
    let (m, k, n) = (3usize, 301usize, 67usize);
    let xs = rand(&mut r, m * k, -1.0, 1.0);
    let ws = rand(&mut r, n * k, -1.0, 1.0);
    out.push(("dot".into(), vec![simd::dot(&xs[..k], &ws[..k])]));
    let mut mv = vec![0.0f32; m * n];
    matvec::matvec_rows(&xs, &ws, (m, k, n), &mut mv);
    out.push(("matvec_rows".into(), mv));
    // Activations already bf16 for bf16 weights: AVX-512's BF16 dot product rounds `x` to bf16
    // (qweight's unit tests check that rounding), the other levels do not.
    let xs_bf16: Vec<f32> = xs.iter().map(|&v| qweight::bf16_to_f32(qweight::bf16_from_f32(v))).collect();
    for f in qweight::WeightFormat::ALL {
        let q = qweight::QMatrix::quantize(&ws, n, k, f);
        let mut o = vec![0.0f32; m * n];
        let x = if f == qweight::WeightFormat::Bf16 { &xs_bf16 } else { &xs };
        qweight::qmatvec(x, &q, m, &mut o);
        out.push((format!("qmatvec {f}"), o));
    }
}

fn run_all() -> Outputs {
    let mut out = Outputs::new();
    mamba1(&mut out);
    mamba2(&mut out);
    mixer(&mut out);
    conv(&mut out);
    small(&mut out);
    out
}

#[test]
fn every_level_agrees_with_the_portable_one() {
    // One test function: `isa::set` is process-wide.
    assert!("sse9".parse::<Isa>().is_err());
    for l in Isa::ALL {
        assert_eq!(isa::set(l).is_ok(), l.supported(), "{l}: set succeeds exactly where the CPU has it");
    }
    let levels = Isa::available();
    eprintln!("levels on this CPU: {levels:?}");
    let mut runs = Vec::new();
    for &l in &levels {
        isa::set(l).unwrap();
        assert_eq!(isa::active(), l);
        // Both thread layouts: the kernels' task splits must not change results across levels.
        let pool = rayon::ThreadPoolBuilder::new().num_threads(3).build().unwrap();
        runs.push((l, pool.install(run_all)));
    }
    let (base_level, base) = &runs[0];
    assert_eq!(*base_level, Isa::Portable);
    let mut checked = 0;
    for (l, outs) in &runs[1..] {
        assert_eq!(outs.len(), base.len());
        for ((name, got), (_, want)) in outs.iter().zip(base) {
            assert_eq!(got.len(), want.len(), "{l} {name}: length");
            let scale = want.iter().fold(1.0f32, |m, v| m.max(v.abs()));
            let err = got.iter().zip(want).fold(0.0f32, |m, (a, b)| m.max((a - b).abs()));
            assert!(got.iter().all(|v| v.is_finite()), "{l} {name}: non-finite output");
            assert!(
                err <= 2e-4 * scale,
                "{l} {name}: max |Δ| {err:.3e} against portable (scale {scale:.3e})"
            );
            checked += 1;
        }
    }
    eprintln!("{checked} outputs compared");
}
