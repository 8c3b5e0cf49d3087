use proptest::prelude::*;

use super::*;
use crate::matvec::matvec_rows;
use crate::testing::{Rng, assert_rel_max, cases, naive_linear as naive, to_f32};

fn pool(threads: usize) -> rayon::ThreadPool {
    rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap()
}

/// The inner kernels this CPU runs on weights in `format`, fastest first.
fn paths(format: WeightFormat) -> Vec<Path> {
    [Path::Bf16Dot, Path::Avx2, Path::Portable].into_iter().filter(|p| p.runs(format)).collect()
}

/// `x` as `path` multiplies it: rounded to bf16 by the BF16 dot product, else itself.
fn x_seen(x: &[f32], path: Path) -> Vec<f32> {
    match path {
        Path::Bf16Dot => x.iter().map(|&v| bf16_to_f32(bf16_from_f32(v))).collect(),
        _ => x.to_vec(),
    }
}

/// `x` as [`qlinear`] multiplies it for `m` rows of `x` and weights in `format` on the active
/// level: the BF16 dot product runs where [`qmatvec`] does.
fn x_seen_by_qlinear(x: &[f32], format: WeightFormat, m: usize) -> Vec<f32> {
    let path = if m <= QLINEAR_MATVEC_MAX_ROWS { Path::best(format, m) } else { Path::Portable };
    x_seen(x, path)
}

/// Weights whose rows differ in magnitude (so Q8 blocks get different scales).
fn weights(r: &mut Rng, n: usize, k: usize) -> Vec<f32> {
    let mut w = to_f32(&r.vec(n * k, -1.0, 1.0));
    for (j, row) in w.chunks_mut(k.max(1)).enumerate() {
        let mag = 10f32.powi(j as i32 % 3 - 1);
        row.iter_mut().for_each(|v| *v *= mag);
    }
    w
}

#[test]
fn formats_parse_print_and_size() {
    for f in WeightFormat::ALL {
        assert_eq!(f.to_string().parse::<WeightFormat>(), Ok(f));
        assert_eq!(f.to_string().to_uppercase().parse::<WeightFormat>(), Ok(f));
    }
    assert_eq!("BF16".parse::<WeightFormat>(), Ok(WeightFormat::Bf16));
    assert_eq!("Q8".parse::<WeightFormat>(), Ok(WeightFormat::Q8));
    let err = "int4".parse::<WeightFormat>().unwrap_err();
    assert_eq!(err.to_string(), r#"unknown weight format "int4": expected one of f32, bf16, f16, q8"#);
    assert!(" f32".parse::<WeightFormat>().is_err());
    let bytes: Vec<f64> = WeightFormat::ALL.iter().map(|f| f.bytes_per_weight()).collect();
    assert_eq!(bytes, [4.0, 2.0, 2.0, 1.125]);
    // 3 rows of 33 inputs: Q8 has two blocks (32 + 1) per row.
    let sizes: Vec<usize> = WeightFormat::ALL.iter().map(|f| f.size_bytes(3, 33)).collect();
    assert_eq!(sizes, [396, 198, 198, 99 + 3 * 2 * 4]);
    for f in WeightFormat::ALL {
        let q = QMatrix::quantize(&[0.5; 99], 3, 33, f);
        assert_eq!((q.rows(), q.cols(), q.format(), q.size_bytes()), (3, 33, f, f.size_bytes(3, 33)));
        assert_eq!(q.storage().format(), f);
    }
}

/// Ties go to the even neighbour; the expected bit patterns are written out.
#[test]
fn bf16_rounds_to_nearest_even() {
    let table: [(u32, u16, &str); 11] = [
        (0x3F80_0000, 0x3F80, "1.0 is exact"),
        (0x3F80_7FFF, 0x3F80, "just under half an ulp rounds down"),
        (0x3F80_8000, 0x3F80, "tie, kept bit even: stays"),
        (0x3F80_8001, 0x3F81, "just over half an ulp rounds up"),
        (0x3F81_8000, 0x3F82, "tie, kept bit odd: up to even"),
        (0xBF81_8000, 0xBF82, "negative tie"),
        (0x7F7F_FFFF, 0x7F80, "f32::MAX overflows to inf"),
        (0x0000_8000, 0x0000, "subnormal tie to even zero"),
        (0x0001_8000, 0x0002, "subnormal tie up to even"),
        (0x7F80_0000, 0x7F80, "inf"),
        (0xFF80_0000, 0xFF80, "-inf"),
    ];
    for (bits, want, what) in table {
        let got = bf16_from_f32(f32::from_bits(bits));
        assert_eq!(got, want, "{what}: {bits:#010x} → {got:#06x}, want {want:#06x}");
    }
    // NaN stays NaN, also when its payload is only in the bits rounding drops.
    for bits in [0x7FC0_0000u32, 0x7F80_0001, 0xFF80_0001, 0x7FFF_FFFF] {
        let b = bf16_from_f32(f32::from_bits(bits));
        assert!(bf16_to_f32(b).is_nan(), "{bits:#010x} → {b:#06x} is not NaN");
        assert_eq!(b & 0x8000, (bits >> 16) as u16 & 0x8000, "sign of {bits:#010x}");
    }
    assert_eq!(bf16_to_f32(0x3F82), 1.015625);
}

#[test]
fn f16_rounds_to_nearest_even() {
    let one_ulp = 2f32.powi(-10);
    let table: [(f32, u16, &str); 6] = [
        (1.0, 0x3C00, "1.0"),
        (1.0 + one_ulp / 2.0, 0x3C00, "tie, even stays"),
        (1.0 + 1.5 * one_ulp, 0x3C02, "tie, odd goes up"),
        (65504.0, 0x7BFF, "largest finite"),
        (65520.0, 0x7C00, "tie past the largest finite: inf"),
        (-2.0, 0xC000, "-2"),
    ];
    for (x, want, what) in table {
        assert_eq!(f16_from_f32(x), want, "{what}: {x}");
        if f16_to_f32(want).is_finite() {
            assert!((f16_to_f32(want) - x).abs() <= one_ulp * x.abs(), "{what}");
        }
    }
    assert!(f16_to_f32(f16_from_f32(f32::NAN)).is_nan());
}

/// Relative error bounds of bf16 (2⁻⁸) and f16 (2⁻¹¹, normal range), and Q8's per-weight
/// bound `s/2` with `s = max|w|/127` of its block, including partial blocks.
#[test]
fn round_trip_error_bounds() {
    for (n, k) in [(3, 33), (4, 64), (2, 95), (5, 7), (1, 257)] {
        let mut r = Rng((n * 1000 + k) as u64);
        // Signs and magnitudes 10⁻⁴ … 10⁴ (inside f16's normal range, 6.1e-5 … 65504).
        let w: Vec<f32> = (0..n * k)
            .map(|_| {
                let v = 10f64.powf(r.uniform(-4.0, 4.0)) as f32;
                if r.uniform(0.0, 1.0) < 0.5 { -v } else { v }
            })
            .collect();
        for (format, bound) in [(WeightFormat::Bf16, 2f64.powi(-8)), (WeightFormat::F16, 2f64.powi(-11))] {
            let d = QMatrix::quantize(&w, n, k, format).dequantize();
            for (i, (&a, &b)) in w.iter().zip(&d).enumerate() {
                let rel = (a as f64 - b as f64).abs() / (a as f64).abs();
                assert!(
                    rel <= bound,
                    "{format} weight {i}: {a} → {b}, relative error {rel:.3e} > {bound:.3e}"
                );
            }
        }
        assert_eq!(QMatrix::quantize(&w, n, k, WeightFormat::F32).dequantize(), w);

        let q = QMatrix::quantize(&w, n, k, WeightFormat::Q8);
        let d = q.dequantize();
        let QStorage::Q8 { scales, .. } = q.storage() else { panic!("not Q8") };
        let nb = k.div_ceil(Q8_BLOCK);
        assert_eq!(scales.len(), n * nb);
        for j in 0..n {
            for b in 0..nb {
                let span = j * k + b * Q8_BLOCK..j * k + ((b + 1) * Q8_BLOCK).min(k);
                let amax = w[span.clone()].iter().fold(0.0f32, |a, v| a.max(v.abs()));
                let s = scales[j * nb + b];
                assert_eq!(s, amax / 127.0, "row {j} block {b}");
                for i in span {
                    // s/2, plus the f32 rounding of q·s (≤ 127·s·2⁻²⁴).
                    let err = (w[i] as f64 - d[i] as f64).abs();
                    let bound = s as f64 * (0.5 + 127.0 * 2f64.powi(-24));
                    assert!(
                        err <= bound,
                        "q8 row {j} weight {i}: {} → {}, |err| {err:.3e} > s/2 {bound:.3e}",
                        w[i],
                        d[i]
                    );
                }
            }
        }
    }
}

/// Q8's layout on a hand-made (2, 35) matrix: one full block and one partial block of 3 per
/// row, each with its own scale; a zero block has scale 0.
#[test]
fn q8_blocks_by_hand() {
    let mut w = vec![0.0f32; 2 * 35];
    for i in 0..32 {
        w[i] = i as f32 - 8.0; // row 0, block 0: max |w| = 23
        w[35 + i] = 0.0; // row 1, block 0: zeros
    }
    w[35 + 32..].copy_from_slice(&[-2.0, 0.25, 0.0]); // row 1, block 1
    let q = QMatrix::quantize(&w, 2, 35, WeightFormat::Q8);
    let QStorage::Q8 { q: qs, scales } = q.storage() else { panic!("not Q8") };
    assert_eq!(scales, &[23.0 / 127.0, 0.0, 0.0, 2.0 / 127.0]);
    assert_eq!(qs[0], -44); // -8 · 127/23 = -44.17
    assert_eq!(qs[31], 127);
    assert_eq!(&qs[32..35], &[0, 0, 0]);
    assert_eq!(&qs[35..67], &[0; 32]);
    assert_eq!(&qs[67..], &[-127, 16, 0]); // 0.25 · 63.5 = 15.875
    let mut row = vec![f32::NAN; 35];
    q.dequantize_row(1, &mut row);
    assert_eq!(&row[..32], &[0.0; 32]);
    assert_eq!(&row[32..], &[-127.0 * (2.0f32 / 127.0), 16.0 * (2.0f32 / 127.0), 0.0]);
    // Rows dequantize alike one at a time or together, in every format.
    for f in WeightFormat::ALL {
        let q = QMatrix::quantize(&w, 2, 35, f);
        let mut two = vec![f32::NAN; 70];
        q.dequantize_rows(0..2, &mut two);
        for j in 0..2 {
            q.dequantize_row(j, &mut row);
            assert_eq!(row, two[j * 35..(j + 1) * 35], "{f} row {j}");
        }
    }
}

#[test]
fn from_storage_and_from_f32_keep_the_data() {
    let w: Vec<f32> = (0..12).map(|i| i as f32 * 0.5 - 3.0).collect();
    let f = QMatrix::from_f32(w.clone(), 3, 4);
    assert_eq!(f, QMatrix::quantize(&w, 3, 4, WeightFormat::F32));
    for format in WeightFormat::ALL {
        let q = QMatrix::quantize(&w, 3, 4, format);
        let again = QMatrix::from_storage(q.storage().clone(), 3, 4);
        assert_eq!(again, q);
        assert_eq!(again.into_storage(), q.clone().into_storage());
    }
}

/// Every format, odd sizes (partial vectors, partial Q8 blocks, partial tiles, partial 32-value
/// steps of the BF16 dot product), `m` = 1–9 (9 takes two passes of the weights), every inner
/// kernel, against the f64 product of `x` as the kernel sees it (the BF16 dot product: rounded to
/// bf16) with the dequantized weights; the large cases split the outputs over a 2-thread pool.
#[test]
fn qmatvec_matches_naive_every_format() {
    let pool = pool(2);
    let team = crate::team::Team::new(3);
    let mut shapes = vec![];
    for k in [1, 7, 31, 32, 33, 64, 95, 257] {
        for n in [1, 5, 67] {
            shapes.extend((1..=9).map(|m| (m, k, n)));
        }
    }
    // m·n·k ≥ PAR_MIN_MACS: the parallel split, with a last partial task (from m = 4 on for
    // (64, 2049)).
    for m in [1, 2, 3, 4, 5, 8, 9] {
        shapes.extend([(m, 257, 2049), (m, 64, 2049)]);
    }
    for (m, k, n) in shapes {
        let mut r = Rng((m * 100_000 + k * 100 + n) as u64);
        let x = to_f32(&r.vec(m * k, -1.0, 1.0));
        let w = weights(&mut r, n, k);
        for format in WeightFormat::ALL {
            let q = QMatrix::quantize(&w, n, k, format);
            let d = q.dequantize();
            let mut outs = vec![];
            for path in paths(format) {
                let mut out = vec![f32::NAN; m * n];
                pool.install(|| qmatvec_path(&x, &q, m, &mut out, path));
                let name = format!("qmatvec {format} {path:?} (m, k, n) = ({m}, {k}, {n})");
                assert_rel_max(&name, &out, &naive(&x_seen(&x, path), &d, None, (m, k, n)), 1e-5, 1.0);
                outs.push(out);
            }
            let mut out = vec![f32::NAN; m * n];
            pool.install(|| qmatvec(&x, &q, m, &mut out));
            let best = paths(format).iter().position(|p| *p == Path::best(format, m)).unwrap();
            assert_eq!(out, outs[best], "qmatvec runs the active level's kernel");
            // Split over a decode team (3 parts, however small), the same outputs.
            let mut out = vec![f32::NAN; m * n];
            team.install_splitting_from(0, || qmatvec(&x, &q, m, &mut out));
            assert_eq!(out, outs[best], "qmatvec {format} ({m}, {k}, {n}) over a team");
            if format == WeightFormat::F32 {
                let mut out = vec![f32::NAN; m * n];
                team.install_splitting_from(0, || qmatvec_f32(&x, &w, (m, k, n), &mut out));
                assert_eq!(out, outs[best], "qmatvec_f32 ({m}, {k}, {n}) over a team");
            }
        }
    }
}

/// The BF16 dot product's error against the f32 activations: rounding `x` to bf16 moves each
/// product by at most 2⁻⁹ of itself, so `|out − x·deq(W)ᵀ| ≤ 2⁻⁹ · Σ|x·w|` (plus f32 rounding,
/// far below). Checked where the CPU has it, on rows of different magnitudes, `m` 1 and 8.
#[test]
fn bf16_dot_error_is_bounded_by_the_rounding_of_x() {
    if !Path::Bf16Dot.runs(WeightFormat::Bf16) {
        return;
    }
    for (m, k, n) in [(1, 1000, 37), (8, 257, 19)] {
        let mut r = Rng((m * 7 + k) as u64);
        let x = to_f32(&r.vec(m * k, -3.0, 3.0));
        let q = QMatrix::quantize(&weights(&mut r, n, k), n, k, WeightFormat::Bf16);
        let d = q.dequantize();
        let mut out = vec![f32::NAN; m * n];
        qmatvec_path(&x, &q, m, &mut out, Path::Bf16Dot);
        let mut worst = 0.0f64;
        for i in 0..m {
            for j in 0..n {
                let (xr, wr) = (&x[i * k..(i + 1) * k], &d[j * k..(j + 1) * k]);
                let exact: f64 = xr.iter().zip(wr).map(|(&a, &b)| a as f64 * b as f64).sum();
                let mass: f64 = xr.iter().zip(wr).map(|(&a, &b)| (a as f64 * b as f64).abs()).sum();
                let err = (out[i * n + j] as f64 - exact).abs();
                assert!(
                    err <= mass / 512.0 + 1e-6,
                    "(m, k, n) = ({m}, {k}, {n}) out[{i}, {j}]: error {err} > 2⁻⁹ · {mass}"
                );
                worst = worst.max(err / mass);
            }
        }
        // The bound is not vacuous: x really is rounded (an f32 product would be ~1e-7 off).
        assert!(worst > 1e-5, "(m, k, n) = ({m}, {k}, {n}): worst relative error {worst} — x not rounded?");
    }
}

/// A single row of `x` (one sequence's decode step) is multiplied in f32 with bf16 weights on
/// every CPU — the BF16 dot product, which rounds `x`, runs only from two rows — so the result
/// is the f32 product to f32 rounding, far inside the 2⁻⁹ that rounding `x` to bf16 would cost
/// (the inputs below are chosen so it would show: most are not bf16 values).
#[test]
fn bf16_one_row_keeps_x_f32() {
    let (k, n) = (1000, 37);
    let mut r = Rng(5);
    let x = to_f32(&r.vec(k, -3.0, 3.0));
    assert!(x.iter().filter(|&&v| bf16_to_f32(bf16_from_f32(v)) != v).count() > k / 2);
    let q = QMatrix::quantize(&weights(&mut r, n, k), n, k, WeightFormat::Bf16);
    let d = q.dequantize();
    let mut out = vec![f32::NAN; n];
    qmatvec(&x, &q, 1, &mut out);
    for j in 0..n {
        let wr = &d[j * k..(j + 1) * k];
        let exact: f64 = x.iter().zip(wr).map(|(&a, &b)| a as f64 * b as f64).sum();
        let mass: f64 = x.iter().zip(wr).map(|(&a, &b)| (a as f64 * b as f64).abs()).sum();
        let err = (out[j] as f64 - exact).abs();
        assert!(err <= mass * 1e-6, "out[{j}]: error {err:.3e} > 1e-6 · {mass:.3e}: x rounded?");
    }
}

/// Each row of `x` gets its own outputs (a mixed-up row or output index shows here even where
/// sums of random values are close).
#[test]
fn qmatvec_rows_and_outputs_in_place() {
    let (k, n) = (40, 9);
    for m in 1..=9 {
        // x[r] = e_r (a one in column r), so out[r, j] = w[j, r] exactly.
        let mut x = vec![0.0f32; m * k];
        (0..m).for_each(|r| x[r * k + r] = 1.0);
        let w: Vec<f32> = (0..n * k).map(|i| (i % 251) as f32).collect();
        for format in WeightFormat::ALL {
            let q = QMatrix::quantize(&w, n, k, format);
            let d = q.dequantize();
            for path in paths(format) {
                let mut out = vec![f32::NAN; m * n];
                qmatvec_path(&x, &q, m, &mut out, path);
                for r in 0..m {
                    for j in 0..n {
                        assert_eq!(out[r * n + j], d[j * k + r], "{format} {path:?} m {m}: out[{r}, {j}]");
                    }
                }
            }
        }
    }
}

/// The matvec path (small `m`), the dequantize-and-GEMM path (several blocks of weight rows, a
/// partial last one, blocks as parallel tasks), and F32's `linear_rows`, with and without a
/// bias, on a 2-thread pool.
#[test]
fn qlinear_matches_naive_every_format() {
    let pool = pool(2);
    for (k, n) in [(33, 67), (95, 300), (257, 521), (1100, 130)] {
        for m in [1, 4, 8, 16, 17, 40, 100] {
            let mut r = Rng((m * 100_000 + k * 100 + n) as u64);
            let x = to_f32(&r.vec(m * k, -1.0, 1.0));
            let w = weights(&mut r, n, k);
            let b = to_f32(&r.vec(n, -1.0, 1.0));
            for format in WeightFormat::ALL {
                let q = QMatrix::quantize(&w, n, k, format);
                let d = q.dequantize();
                for bias in [None, Some(&b[..])] {
                    let mut out = vec![f32::NAN; m * n];
                    pool.install(|| qlinear(&x, &q, bias, m, &mut out));
                    let name =
                        format!("qlinear {format} bias {} (m, k, n) = ({m}, {k}, {n})", bias.is_some());
                    let want = naive(&x_seen_by_qlinear(&x, format, m), &d, bias, (m, k, n));
                    assert_rel_max(&name, &out, &want, 1e-5, 1.0);
                    if format == WeightFormat::F32 {
                        let mut lin = vec![f32::NAN; m * n];
                        pool.install(|| linear_rows(&x, &w, bias, (m, k, n), &mut lin));
                        assert_eq!(out, lin, "{name}: F32 is linear_rows");
                    }
                }
            }
        }
    }
}

#[test]
fn empty_shapes() {
    for format in WeightFormat::ALL {
        // k = 0: every output is the bias (or zero).
        let q = QMatrix::quantize(&[], 3, 0, format);
        let mut out = [f32::NAN; 6];
        qmatvec(&[], &q, 2, &mut out);
        assert_eq!(out, [0.0; 6]);
        for m in [2, 20] {
            let mut out = vec![f32::NAN; m * 3];
            qlinear(&[], &q, Some(&[1.0, 2.0, 3.0]), m, &mut out);
            assert_eq!(out, [1.0, 2.0, 3.0].repeat(m), "{format} m {m}");
        }
        // m = 0 and n = 0.
        let q = QMatrix::quantize(&[1.0; 4], 1, 4, format);
        qmatvec(&[], &q, 0, &mut []);
        qlinear(&[], &q, None, 0, &mut []);
        let q = QMatrix::quantize(&[], 0, 4, format);
        qlinear(&[0.0; 80], &q, Some(&[]), 20, &mut []);
    }
}

#[test]
#[should_panic(expected = "qmatvec: x must be (m, k) = (2, 3), got 5 values")]
fn qmatvec_rejects_a_short_x() {
    let q = QMatrix::quantize(&[0.0; 12], 4, 3, WeightFormat::Bf16);
    qmatvec(&[0.0; 5], &q, 2, &mut [0.0; 8]);
}

#[test]
#[should_panic(expected = "qlinear: out must be (m, n) = (2, 4), got 7 values")]
fn qlinear_rejects_a_short_out() {
    let q = QMatrix::quantize(&[0.0; 12], 4, 3, WeightFormat::Q8);
    qlinear(&[0.0; 6], &q, None, 2, &mut [0.0; 7]);
}

#[test]
#[should_panic(expected = "qlinear: b must be (n) = (4), got 3 values")]
fn qlinear_rejects_a_short_bias() {
    let q = QMatrix::quantize(&[0.0; 12], 4, 3, WeightFormat::F16);
    qlinear(&[0.0; 6], &q, Some(&[0.0; 3]), 2, &mut [0.0; 8]);
}

#[test]
#[should_panic(expected = "QMatrix::quantize: w must be (n, k) = (4, 3), got 11 values")]
fn quantize_rejects_a_short_w() {
    QMatrix::quantize(&[0.0; 11], 4, 3, WeightFormat::Bf16);
}

#[test]
#[should_panic(expected = "QMatrix::quantize: Q8 needs finite weights; row 1, block 1 holds NaN")]
fn q8_rejects_nan() {
    let mut w = vec![0.0f32; 80];
    w[40 + 33] = f32::NAN;
    QMatrix::quantize(&w, 2, 40, WeightFormat::Q8);
}

#[test]
#[should_panic(
    expected = "QMatrix::from_storage: Q8 scales must be (n, k/32 rounded up) = (2, 2), got 2 values"
)]
fn from_storage_rejects_short_scales() {
    QMatrix::from_storage(QStorage::Q8 { q: vec![0; 80], scales: vec![0.0; 2] }, 2, 40);
}

#[test]
#[should_panic(expected = "QMatrix::dequantize_row: row 2 of a matrix with 2 rows")]
fn dequantize_row_rejects_a_bad_row() {
    QMatrix::quantize(&[0.0; 8], 2, 4, WeightFormat::F16).dequantize_row(2, &mut [0.0; 4]);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(cases(16)))]

    /// Random small shapes, formats and `m` (both qlinear paths) against the f64 product.
    #[test]
    fn products_match_naive(
        m in 1usize..40, k in 1usize..100, n in 1usize..90, f in 0usize..4, seed in any::<u64>(),
    ) {
        let format = WeightFormat::ALL[f];
        let mut r = Rng(seed);
        let x = to_f32(&r.vec(m * k, -2.0, 2.0));
        let w = weights(&mut r, n, k);
        let b = to_f32(&r.vec(n, -1.0, 1.0));
        let q = QMatrix::quantize(&w, n, k, format);
        let d = q.dequantize();
        let mut out = vec![f32::NAN; m * n];
        qmatvec(&x, &q, m, &mut out);
        let xs = x_seen(&x, Path::best(format, m));
        assert_rel_max("qmatvec", &out, &naive(&xs, &d, None, (m, k, n)), 1e-5, 1.0);
        qlinear(&x, &q, Some(&b), m, &mut out);
        let xs = x_seen_by_qlinear(&x, format, m);
        assert_rel_max("qlinear", &out, &naive(&xs, &d, Some(&b), (m, k, n)), 1e-5, 1.0);
    }
}

/// Seconds taken by `f`.
fn time(f: impl FnOnce()) -> f64 {
    let t0 = std::time::Instant::now();
    f();
    t0.elapsed().as_secs_f64()
}

/// The median of `v`.
fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Decode-step timing, not a test (run it on a quiet machine):
/// `cargo test --release -p ssm-kernel --lib qweight::tests::decode_timing -- --ignored --nocapture`.
///
/// 24 matrices of (3072, 768) — the 130m model's `in_proj` in every layer, 226 MB in f32, far
/// beyond L3 — one pass per step on a 2-thread pool: F32 through `matvec_rows` against every
/// format through `qmatvec`, at m = 1 and m = 8. The kernels take turns within each round (so
/// a change in the machine's memory bandwidth hits them alike); reported are the median and
/// minimum over the rounds, and the median of the per-round speed-ups over `matvec_rows`. Then
/// `qlinear`'s two paths over m, on 4 of the matrices.
#[test]
#[ignore = "timing, not a test"]
fn decode_timing() {
    let (layers, n, k, rounds) = (24, 3072, 768, 15);
    let pool = pool(2);
    let mut r = Rng(11);
    let ws: Vec<Vec<f32>> = (0..layers).map(|_| to_f32(&r.vec(n * k, -0.05, 0.05))).collect();
    let qs: Vec<Vec<QMatrix>> = WeightFormat::ALL
        .iter()
        .map(|&f| ws.iter().map(|w| QMatrix::quantize(w, n, k, f)).collect())
        .collect();
    println!("{layers} × ({n}, {k}) weights, 2 threads, {rounds} rounds");
    println!("{:<18} {:>2} {:>9} {:>9} {:>7} {:>8}", "kernel", "m", "med ms", "min ms", "GB/s", "speed-up");
    for m in [1, 8] {
        let x = to_f32(&r.vec(m * k, -1.0, 1.0));
        let mut out = vec![0.0f32; m * n];
        // Kernel 0: f32 matvec_rows; 1 + i: format i through qmatvec.
        let mut t = vec![vec![]; 1 + qs.len()];
        pool.install(|| {
            for round in 0..=rounds {
                let t0 = time(|| ws.iter().for_each(|w| matvec_rows(&x, w, (m, k, n), &mut out)));
                let tq: Vec<f64> =
                    qs.iter().map(|q| time(|| q.iter().for_each(|w| qmatvec(&x, w, m, &mut out)))).collect();
                if round > 0 {
                    t[0].push(t0);
                    tq.iter().enumerate().for_each(|(i, &v)| t[1 + i].push(v));
                }
            }
        });
        let bytes = |i: usize| {
            if i == 0 { 4 * layers * n * k } else { qs[i - 1].iter().map(QMatrix::size_bytes).sum() }
        };
        for i in 0..t.len() {
            let name = if i == 0 {
                "f32 matvec_rows".to_string()
            } else {
                format!("{} qmatvec", WeightFormat::ALL[i - 1])
            };
            let mut ratio: Vec<f64> = t[0].iter().zip(&t[i]).map(|(a, b)| a / b).collect();
            let mut ti = t[i].clone();
            let med = median(&mut ti);
            println!(
                "{name:<18} {m:>2} {:>9.2} {:>9.2} {:>7.1} {:>7.2}×",
                med * 1e3,
                ti[0] * 1e3,
                bytes(i) as f64 / med / 1e9,
                median(&mut ratio)
            );
        }
    }

    println!("\nqlinear's paths, 4 × ({n}, {k}), ms per pass (median of 5)");
    println!("{:<5} {:>4} {:>9} {:>9} {:>9}", "", "m", "qmatvec", "deq+gemm", "f32 gemm");
    for m in [8, 16, 24, 32, 48, 64, 256] {
        let x = to_f32(&r.vec(m * k, -1.0, 1.0));
        let mut out = vec![0.0f32; m * n];
        let mut med5 = |f: &mut dyn FnMut(&mut [f32])| {
            let mut v: Vec<f64> = (0..6).map(|_| time(|| f(&mut out))).skip(1).collect();
            median(&mut v) * 1e3
        };
        let f32_gemm = pool.install(|| {
            med5(&mut |o| {
                ws[..4].iter().for_each(|w| {
                    crate::gemm::gemm_par((m, k, n), 1.0, &x, (k, 1), w, (1, k), 0.0, o, (n, 1))
                })
            })
        });
        for (f, q) in WeightFormat::ALL.iter().zip(&qs).skip(1) {
            let mv = pool.install(|| med5(&mut |o| q[..4].iter().for_each(|w| qmatvec(&x, w, m, o))));
            let gm = pool.install(|| med5(&mut |o| q[..4].iter().for_each(|w| dequant_gemm(&x, w, m, o))));
            println!("{f:<5} {m:>4} {mv:>9.2} {gm:>9.2} {f32_gemm:>9.2}");
        }
    }
}

/// `qmatvec_f32` on a plain slice gives exactly `qmatvec` on the same weights as an F32
/// `QMatrix`, and matches the naive product, including the parallel split.
#[test]
fn qmatvec_f32_equals_qmatvec_on_an_f32_matrix() {
    let pool = pool(2);
    for (m, k, n) in [(1, 1, 1), (3, 33, 5), (8, 95, 67), (2, 257, 521), (5, 64, 2049), (9, 7, 3)] {
        let mut r = Rng((m * 7 + k * 11 + n) as u64);
        let x = to_f32(&r.vec(m * k, -1.0, 1.0));
        let w = weights(&mut r, n, k);
        let mut got = vec![f32::NAN; m * n];
        pool.install(|| qmatvec_f32(&x, &w, (m, k, n), &mut got));
        let mut want = vec![f32::NAN; m * n];
        pool.install(|| qmatvec(&x, &QMatrix::from_f32(w.clone(), n, k), m, &mut want));
        assert_eq!(got, want, "(m, k, n) = ({m}, {k}, {n})");
        assert_rel_max("qmatvec_f32 vs naive", &got, &naive(&x, &w, None, (m, k, n)), 1e-5, 1.0);
    }
}
