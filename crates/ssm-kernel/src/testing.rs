//! Test helpers shared by the kernel tests (public so integration tests and benches can use them;
//! not part of the stable API).

/// Helpers that do not depend on proptest (so this module compiles without dev-dependencies).
mod proptest_free {
    /// A small deterministic generator for filling test tensors: the state of a
    /// [`SplitMix64`](crate::rng::SplitMix64), so `Rng(seed)` draws exactly
    /// `SplitMix64::new(seed)`'s stream.
    #[derive(Clone, Debug)]
    pub struct Rng(pub u64);

    impl Rng {
        /// Next raw 64-bit value.
        pub fn next_u64(&mut self) -> u64 {
            let mut g = crate::rng::SplitMix64::from_state(self.0);
            let v = g.next_u64();
            self.0 = g.state();
            v
        }

        /// Uniform in [lo, hi).
        pub fn uniform(&mut self, lo: f64, hi: f64) -> f64 {
            let u = (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64;
            lo + (hi - lo) * u
        }

        /// `n` values uniform in [lo, hi).
        pub fn vec(&mut self, n: usize, lo: f64, hi: f64) -> Vec<f64> {
            (0..n).map(|_| self.uniform(lo, hi)).collect()
        }
    }
}

pub use proptest_free::Rng;

/// Converts an `f64` vector to `f32`.
pub fn to_f32(v: &[f64]) -> Vec<f32> {
    v.iter().map(|&x| x as f32).collect()
}

/// Converts an `f32` vector to `f64`.
pub fn to_f64(v: &[f32]) -> Vec<f64> {
    v.iter().map(|&x| x as f64).collect()
}

/// Asserts `|got − want| ≤ atol + rtol·|want|` element-wise, naming the tensor and the worst index.
#[track_caller]
pub fn assert_close<A: Copy + Into<f64>, B: Copy + Into<f64>>(
    name: &str,
    got: &[A],
    want: &[B],
    rtol: f64,
    atol: f64,
) {
    assert_eq!(got.len(), want.len(), "{name}: length {} vs {}", got.len(), want.len());
    let mut worst: Option<(usize, f64, f64, f64)> = None;
    for (i, (&g, &w)) in got.iter().zip(want.iter()).enumerate() {
        let (g, w): (f64, f64) = (g.into(), w.into());
        let excess = (g - w).abs() - (atol + rtol * w.abs());
        if (excess > 0.0 || excess.is_nan()) && worst.is_none_or(|(_, e, _, _)| excess > e || excess.is_nan())
        {
            worst = Some((i, excess, g, w));
        }
    }
    if let Some((i, _, g, w)) = worst {
        panic!(
            "{name}: element {i}: got {g}, want {w} (|diff| {:.3e}, rtol {rtol:e}, atol {atol:e})",
            (g - w).abs()
        );
    }
}

/// Asserts `max|got − want| ≤ tol · max(max|want|, floor)`: a per-tensor relative error, the
/// measure used for gradients whose entries span orders of magnitude.
#[track_caller]
pub fn assert_rel_max<A: Copy + Into<f64>, B: Copy + Into<f64>>(
    name: &str,
    got: &[A],
    want: &[B],
    tol: f64,
    floor: f64,
) {
    assert_eq!(got.len(), want.len(), "{name}: length {} vs {}", got.len(), want.len());
    let scale = want.iter().map(|&w| Into::<f64>::into(w).abs()).fold(floor, f64::max);
    let (mut worst, mut at) = (0.0f64, 0usize);
    for (i, (&g, &w)) in got.iter().zip(want.iter()).enumerate() {
        let d = (Into::<f64>::into(g) - Into::<f64>::into(w)).abs();
        if d > worst || d.is_nan() {
            worst = d;
            at = i;
        }
    }
    assert!(
        worst <= tol * scale,
        "{name}: max|diff| {worst:.3e} at element {at} exceeds {tol:e} × max|want| {scale:.3e} (got {}, want {})",
        Into::<f64>::into(got[at]),
        Into::<f64>::into(want[at])
    );
}

/// `max_c Σ |x[i]|` over the elements `i` of channel `c = (i / inner) % channels`, for `x` laid
/// out as (…, channels, inner): the size of the summands of a gradient reduced to one value per
/// channel. Such a sum can cancel to near zero while its f32 rounding stays relative to the
/// summands, so this is the floor at which reduced gradients are compared.
pub fn channel_abs_sum(x: &[f64], channels: usize, inner: usize) -> f64 {
    let mut sums = vec![0.0f64; channels];
    for (i, v) in x.iter().enumerate() {
        sums[(i / inner) % channels] += v.abs();
    }
    sums.into_iter().fold(0.0, f64::max)
}

/// Central-difference gradient of a scalar function `f` with respect to `x[i]` for every `i`.
pub fn numeric_grad(x: &[f64], eps: f64, mut f: impl FnMut(&[f64]) -> f64) -> Vec<f64> {
    let mut xs = x.to_vec();
    (0..x.len())
        .map(|i| {
            let x0 = xs[i];
            xs[i] = x0 + eps;
            let fp = f(&xs);
            xs[i] = x0 - eps;
            let fm = f(&xs);
            xs[i] = x0;
            (fp - fm) / (2.0 * eps)
        })
        .collect()
}

/// `Σ w·y`: contracts an output with fixed random weights to make a scalar loss for
/// finite-difference checks (then `dy = w`).
pub fn dot(w: &[f64], y: &[f64]) -> f64 {
    w.iter().zip(y).map(|(a, b)| a * b).sum()
}

/// Proptest case count: `PROPTEST_CASES` when set, else `default` (kept small for 2-core CI).
pub fn cases(default: u32) -> u32 {
    std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// `x (m, k) · Wᵀ (+ b)` in f64 for `w` (n, k): the oracle of the mat-vec kernels.
pub fn naive_linear(x: &[f32], w: &[f32], b: Option<&[f32]>, (m, k, n): (usize, usize, usize)) -> Vec<f64> {
    let mut out = vec![0.0; m * n];
    for r in 0..m {
        for j in 0..n {
            let s: f64 = (0..k).map(|i| x[r * k + i] as f64 * w[j * k + i] as f64).sum();
            out[r * n + j] = s + b.map_or(0.0, |b| b[j] as f64);
        }
    }
    out
}

/// Random sequence starts for a (B, L) problem: each position starts a new sequence with
/// probability 1/4, so segments of length 1 and resets at `t = 0`, inside SIMD tiles and at
/// chunk boundaries all occur across cases.
pub fn random_resets(r: &mut Rng, n: usize) -> Vec<bool> {
    (0..n).map(|_| r.uniform(0.0, 1.0) < 0.25).collect()
}

/// The segments `(t0, t1)` of one row of sequence starts: split before every position marked
/// `true` (a leading segment before the first start included).
pub fn segments(resets: &[bool]) -> Vec<(usize, usize)> {
    let mut out = Vec::new();
    let mut t0 = 0;
    for (t, &r) in resets.iter().enumerate() {
        if r && t > t0 {
            out.push((t0, t));
            t0 = t;
        }
    }
    if t0 < resets.len() {
        out.push((t0, resets.len()));
    }
    out
}
