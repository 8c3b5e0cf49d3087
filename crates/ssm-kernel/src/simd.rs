//! SIMD helpers on `wide::f32x8`: a lean vectorised `exp`, SiLU, softplus, and loads/stores of
//! partial vectors.
//!
//! Build with `-C target-cpu=native` (the workspace's `.cargo/config.toml` does): without AVX2+FMA
//! `f32x8` falls back to two SSE halves and `mul_add` is not fused.

use wide::{f32x8, i32x8};

/// Lanes in a vector.
pub const W: usize = 8;

/// `e^x` per lane, for finite `x`.
///
/// Cody–Waite range reduction `x = k·ln2 + r` with `|r| ≤ ln2/2`, a degree-6 polynomial for
/// `e^r`, and `2^k` built in the exponent bits. Inputs are clamped to [-87.3, 88.3], so the result
/// never underflows to a subnormal: for `x < -87.3` it returns ≈1.2e-38 instead of the true tiny
/// value (an absolute error below 2e-38); above 88.3 it returns e^88.3 (the largest power of two
/// the exponent trick can build is 2^127). Relative error ≤ 2 ulp on the clamped range.
#[inline(always)]
pub fn exp(x: f32x8) -> f32x8 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    let x = x.fast_max(f32x8::splat(-87.3)).fast_min(f32x8::splat(88.3));
    // Round to nearest with one convert each way (the default MXCSR mode), cheaper than `round`.
    let ki: i32x8 = (x * f32x8::splat(LOG2E)).fast_round_int();
    let k = f32x8::from_i32x8(ki);
    let r = k.mul_neg_add(f32x8::splat(LN2_HI), x);
    let r = k.mul_neg_add(f32x8::splat(LN2_LO), r);
    // e^r ≈ 1 + r + r²/2 + … + r⁶/720 (Horner)
    let mut p = f32x8::splat(1.0 / 720.0);
    p = p.mul_add(r, f32x8::splat(1.0 / 120.0));
    p = p.mul_add(r, f32x8::splat(1.0 / 24.0));
    p = p.mul_add(r, f32x8::splat(1.0 / 6.0));
    p = p.mul_add(r, f32x8::splat(0.5));
    p = p.mul_add(r, f32x8::splat(1.0));
    p = p.mul_add(r, f32x8::splat(1.0));
    let bits: i32x8 = (ki + i32x8::splat(127)) << 23;
    p * wide::bytemuck::cast::<i32x8, f32x8>(bits)
}

/// Logistic sigmoid per lane.
#[inline(always)]
pub fn sigmoid(x: f32x8) -> f32x8 {
    f32x8::splat(1.0) / (f32x8::splat(1.0) + exp(-x))
}

/// `x · σ(x)` per lane.
#[inline(always)]
pub fn silu(x: f32x8) -> f32x8 {
    x * sigmoid(x)
}

/// Softplus as the reference computes it: `x` above 20, else `ln(1 + e^x)`.
#[inline(always)]
pub fn softplus(x: f32x8) -> f32x8 {
    let big = x.simd_gt(f32x8::splat(20.0));
    let sp = (f32x8::splat(1.0) + exp(x)).ln();
    big.select(x, sp)
}

/// Hints the CPU to fetch the cache line holding `s[i]` (nothing when `i` is out of bounds or
/// on other architectures).
///
/// The scans walk time with a stride of a whole (D) row, so each access lands on a new line and
/// every other one on a new 4 KiB page, where hardware prefetchers stop; prefetching a few steps
/// ahead hides that latency.
#[inline(always)]
pub fn prefetch(s: &[f32], i: usize) {
    if i < s.len() {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `i` is in bounds, and a prefetch never faults or changes memory.
        unsafe {
            core::arch::x86_64::_mm_prefetch::<{ core::arch::x86_64::_MM_HINT_T0 }>(s.as_ptr().add(i).cast());
        }
    }
}

/// Loads `src[..min(len, 8)]`, zero-filling the missing lanes.
#[inline(always)]
pub fn load(src: &[f32]) -> f32x8 {
    if src.len() >= W { f32x8::from(<[f32; W]>::try_from(&src[..W]).unwrap()) } else { f32x8::from(src) }
}

/// Stores the first `dst.len().min(8)` lanes of `v` into `dst`.
#[inline(always)]
pub fn store(dst: &mut [f32], v: f32x8) {
    let a = v.to_array();
    let n = dst.len().min(W);
    dst[..n].copy_from_slice(&a[..n]);
}

/// Adds the first `dst.len().min(8)` lanes of `v` into `dst`.
#[inline(always)]
pub fn add_store(dst: &mut [f32], v: f32x8) {
    let a = v.to_array();
    for (d, x) in dst.iter_mut().zip(a.iter()) {
        *d += *x;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_matches_std_within_2ulp_relative() {
        let mut worst = 0.0f64;
        let mut x = -87.0f32;
        while x < 88.0 {
            let v = f32x8::new([x, x + 0.01, x + 0.02, x + 0.03, x + 0.04, x + 0.05, x + 0.06, x + 0.07]);
            let got = exp(v).to_array();
            for (i, g) in got.iter().enumerate() {
                let xi = v.to_array()[i] as f64;
                let want = xi.exp();
                let rel = ((*g as f64) - want).abs() / want;
                worst = worst.max(rel);
            }
            x += 0.173;
        }
        assert!(worst < 2.5e-7, "worst relative error {worst}");
    }

    #[test]
    fn exp_clamps_instead_of_overflowing_or_nan() {
        let got = exp(f32x8::new([-1e4, -200.0, -87.3, 0.0, 1.0, 88.0, 200.0, 1e4])).to_array();
        assert!(got[0] >= 0.0 && got[0] < 2e-38);
        assert!(got[1] >= 0.0 && got[1] < 2e-38);
        assert_eq!(got[3], 1.0);
        assert!((got[4] - std::f32::consts::E).abs() < 1e-6);
        assert!(got.iter().all(|v| v.is_finite()));
    }

    #[test]
    fn softplus_and_silu_match_scalar() {
        let xs = [-30.0f32, -5.0, -0.5, 0.0, 0.7, 3.0, 19.9, 25.0];
        let sp = softplus(f32x8::new(xs)).to_array();
        let si = silu(f32x8::new(xs)).to_array();
        for i in 0..8 {
            let x = xs[i] as f64;
            let want_sp = if x > 20.0 { x } else { x.exp().ln_1p() };
            let want_si = x / (1.0 + (-x).exp());
            assert!((sp[i] as f64 - want_sp).abs() <= 1e-6 * want_sp.abs().max(1.0), "softplus({x})");
            assert!((si[i] as f64 - want_si).abs() <= 1e-6 * want_si.abs().max(1.0), "silu({x})");
        }
    }

    #[test]
    fn partial_load_and_store() {
        let v = load(&[1.0, 2.0, 3.0]);
        assert_eq!(v.to_array(), [1.0, 2.0, 3.0, 0.0, 0.0, 0.0, 0.0, 0.0]);
        let mut d = [0.0f32; 3];
        store(&mut d, f32x8::splat(4.0));
        assert_eq!(d, [4.0; 3]);
        add_store(&mut d, f32x8::splat(1.0));
        assert_eq!(d, [5.0; 3]);
    }
}
