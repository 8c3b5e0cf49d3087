//! SIMD helpers: a lean vectorised `exp`, SiLU, softplus, and loads/stores of partial vectors,
//! for 8-lane (`wide::f32x8`, re-exported at this level) and 16-lane (`x16`, `wide::f32x16`)
//! vectors, generated from one definition.
//!
//! Build with `-C target-cpu=native` (the workspace's `.cargo/config.toml` does): without AVX2+FMA
//! `f32x8` falls back to two SSE halves and `mul_add` is not fused.

/// Defines the lane-typed helpers for one vector width.
macro_rules! lane_fns {
    ($v:ident, $vi:ident, $w:expr) => {
        use wide::{$v, $vi};

        pub use super::prefetch;

        /// The vector type.
        pub type V = $v;

        /// Lanes in a vector.
        pub const W: usize = $w;

        /// `e^x` per lane, for finite `x`.
        ///
        /// Cody–Waite range reduction `x = k·ln2 + r` with `|r| ≤ ln2/2`, a degree-6 polynomial for
        /// `e^r`, and `2^k` built in the exponent bits. Inputs are clamped to [-87.3, 88.3], so the result
        /// never underflows to a subnormal: for `x < -87.3` it returns ≈1.2e-38 instead of the true tiny
        /// value (an absolute error below 2e-38); above 88.3 it returns e^88.3 (the largest power of two
        /// the exponent trick can build is 2^127). Relative error ≤ 2 ulp on the clamped range.
        #[inline(always)]
        pub fn exp(x: $v) -> $v {
            exp_impl::<false>(x)
        }

        /// [`exp`] for inputs known to be ≤ 0 (such as `Δ·A` with `Δ ≥ 0`, `A ≤ 0`): skips the upper
        /// clamp. A positive input gives a wrong result, so callers must guarantee the sign.
        #[inline(always)]
        pub fn exp_nonpos(x: $v) -> $v {
            exp_impl::<true>(x)
        }

        /// Shared body of [`exp`] and [`exp_nonpos`].
        #[inline(always)]
        pub fn exp_impl<const NONPOS: bool>(x: $v) -> $v {
            const LOG2E: f32 = std::f32::consts::LOG2_E;
            const LN2_HI: f32 = 0.693_359_4;
            const LN2_LO: f32 = -2.121_944_4e-4;
            // 1.5·2²³: adding it rounds to an integer (to nearest) and leaves that integer in the low
            // mantissa bits, so `k` and `2^k` come out of one FMA and integer ops, with no converts.
            const MAGIC: f32 = 12_582_912.0;
            let mut x = x.fast_max($v::splat(-87.3));
            if !NONPOS {
                x = x.fast_min($v::splat(88.3));
            }
            let t = x.mul_add($v::splat(LOG2E), $v::splat(MAGIC));
            let k = t - $v::splat(MAGIC);
            let r = k.mul_neg_add($v::splat(LN2_HI), x);
            let r = k.mul_neg_add($v::splat(LN2_LO), r);
            // e^r ≈ 1 + r + r²/2 + … + r⁶/720 (Horner)
            let mut p = $v::splat(1.0 / 720.0);
            p = p.mul_add(r, $v::splat(1.0 / 120.0));
            p = p.mul_add(r, $v::splat(1.0 / 24.0));
            p = p.mul_add(r, $v::splat(1.0 / 6.0));
            p = p.mul_add(r, $v::splat(0.5));
            p = p.mul_add(r, $v::splat(1.0));
            p = p.mul_add(r, $v::splat(1.0));
            // bits(t) = bits(MAGIC) + k, and (bits(MAGIC) << 23) wraps to −(127 << 23) + bits(1.0)… so
            // (bits(t) << 23) + bits(1.0) = (k + 127) << 23, the bits of 2^k.
            let tb: $vi = wide::bytemuck::cast(t);
            let bits = (tb << 23) + $vi::splat(0x3f80_0000);
            p * wide::bytemuck::cast::<$vi, $v>(bits)
        }

        /// Logistic sigmoid per lane. The reciprocal is the hardware estimate refined by one
        /// Newton step (relative error ~1e-7), which is several times cheaper than a division.
        #[inline(always)]
        pub fn sigmoid(x: $v) -> $v {
            let d = $v::splat(1.0) + exp(-x);
            let r = d.recip();
            r * (-d).mul_add(r, $v::splat(2.0))
        }

        /// `x · σ(x)` per lane.
        #[inline(always)]
        pub fn silu(x: $v) -> $v {
            x * sigmoid(x)
        }

        /// Softplus as the reference computes it: `x` above 20, else `ln(1 + e^x)`.
        #[inline(always)]
        pub fn softplus(x: $v) -> $v {
            softplus_sigmoid(x).0
        }

        /// `(softplus(x), σ(x))` from one `exp`.
        ///
        /// `softplus(x) = max(x, 0) + log1p(e^{−|x|})` and `log1p(e) = 2·atanh(s)` with
        /// `s = e / (2 + e) ≤ 1/3`, summed to `s¹³` (absolute error < 1e-7). Above 20 this returns `x`
        /// exactly, as the reference's pass-through does (the log term is below half an ulp of `x`).
        #[inline(always)]
        pub fn softplus_sigmoid(x: $v) -> ($v, $v) {
            let one = $v::splat(1.0);
            let e = exp(-x.abs());
            let s = e / ($v::splat(2.0) + e);
            let z = s * s;
            let mut p = $v::splat(1.0 / 13.0);
            p = p.mul_add(z, $v::splat(1.0 / 11.0));
            p = p.mul_add(z, $v::splat(1.0 / 9.0));
            p = p.mul_add(z, $v::splat(1.0 / 7.0));
            p = p.mul_add(z, $v::splat(1.0 / 5.0));
            p = p.mul_add(z, $v::splat(1.0 / 3.0));
            p = p.mul_add(z, one);
            let log1p = (s + s) * p;
            let big = x.simd_gt($v::splat(20.0));
            let sp = big.select(x, x.fast_max($v::ZERO) + log1p);
            // σ(x) = 1 / (1 + e^{−x}): with e = e^{−|x|}, that is 1/(1+e) for x ≥ 0 and e/(1+e) below.
            let r = one / (one + e);
            let sig = x.simd_ge($v::ZERO).select(r, e * r);
            (sp, sig)
        }

        /// Loads `src[..min(len, W)]`, zero-filling the missing lanes.
        #[inline(always)]
        pub fn load(src: &[f32]) -> $v {
            if src.len() >= W { $v::from(<[f32; $w]>::try_from(&src[..W]).unwrap()) } else { $v::from(src) }
        }

        /// Loads `src[..W]`: one vector load, no partial-load path.
        ///
        /// # Panics
        /// If `src` is shorter than `W`.
        #[inline(always)]
        pub fn load_full(src: &[f32]) -> $v {
            $v::from(*<&[f32; $w]>::try_from(&src[..W]).unwrap())
        }

        /// Stores `v` into `dst[..W]`: one vector store.
        ///
        /// # Panics
        /// If `dst` is shorter than `W`.
        #[inline(always)]
        pub fn store_full(dst: &mut [f32], v: $v) {
            *<&mut [f32; $w]>::try_from(&mut dst[..W]).unwrap() = v.to_array();
        }

        /// Adds `v` into `dst[..W]`.
        ///
        /// # Panics
        /// If `dst` is shorter than `W`.
        #[inline(always)]
        pub fn add_store_full(dst: &mut [f32], v: $v) {
            let d = <&mut [f32; $w]>::try_from(&mut dst[..W]).unwrap();
            *d = ($v::from(*d) + v).to_array();
        }

        /// Stores the first `dst.len().min(W)` lanes of `v` into `dst`.
        #[inline(always)]
        pub fn store(dst: &mut [f32], v: $v) {
            let a = v.to_array();
            if dst.len() >= W {
                // A fixed-size copy: one vector store (the variable-length copy below would be a
                // `memmove` call).
                *<&mut [f32; $w]>::try_from(&mut dst[..W]).unwrap() = a;
            } else {
                let n = dst.len();
                dst.copy_from_slice(&a[..n]);
            }
        }

        /// Adds the first `dst.len().min(W)` lanes of `v` into `dst`.
        #[inline(always)]
        pub fn add_store(dst: &mut [f32], v: $v) {
            if dst.len() >= W {
                let d = <&mut [f32; $w]>::try_from(&mut dst[..W]).unwrap();
                *d = ($v::from(*d) + v).to_array();
            } else {
                let a = v.to_array();
                for (d, x) in dst.iter_mut().zip(a.iter()) {
                    *d += *x;
                }
            }
        }
    };
}

/// 8-lane helpers (`wide::f32x8`, AVX2); also re-exported at the module level.
pub mod x8 {
    lane_fns!(f32x8, i32x8, 8);
}

/// 16-lane helpers (`wide::f32x16`: one AVX-512 register, or two AVX2 halves without it).
pub mod x16 {
    lane_fns!(f32x16, i32x16, 16);
}

pub use x8::*;

/// `Σ a·b` over the common length, with sixteen independent partial sums so it vectorises (a
/// plain iterator sum is one serial chain of dependent adds).
#[inline]
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0.0f32; 16];
    let (ac, bc) = (a.chunks_exact(16), b.chunks_exact(16));
    let tail: f32 = ac.remainder().iter().zip(bc.remainder()).map(|(x, y)| x * y).sum();
    for (x, y) in ac.zip(bc) {
        for i in 0..16 {
            acc[i] = x[i].mul_add(y[i], acc[i]);
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// `out[j] = σ(z[j])` over the common length, eight lanes at a time (the SIMD [`sigmoid`]; the
/// last partial vector is loaded and stored with zero padding).
#[inline]
pub fn sigmoid_slice(z: &[f32], out: &mut [f32]) {
    for (zc, oc) in z.chunks(W).zip(out.chunks_mut(W)) {
        store(oc, sigmoid(load(zc)));
    }
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

/// Hints the CPU to fetch every cache line of `s[start..start + len]` (clipped to `s`) into L2,
/// for data a loop will reach after the current block of work: rows of a wide matrix cross a
/// 4 KiB page every row or two, where hardware prefetchers stop.
#[inline(always)]
pub fn prefetch_range_l2(s: &[f32], start: usize, len: usize) {
    let end = (start + len).min(s.len());
    let mut i = start;
    while i < end {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `i < s.len()`, and a prefetch never faults or changes memory.
        unsafe {
            core::arch::x86_64::_mm_prefetch::<{ core::arch::x86_64::_MM_HINT_T1 }>(s.as_ptr().add(i).cast());
        }
        i += 16;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use wide::f32x8;

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
    fn exp_nonpos_matches_exp_on_nonpositive_inputs() {
        let mut x = -87.0f32;
        while x <= 0.0 {
            let v = f32x8::new([x, x * 0.5, x * 0.25, x * 0.1, x * 0.01, -0.0, x * 0.7, x * 0.9]);
            assert_eq!(exp(v).to_array(), exp_nonpos(v).to_array(), "x = {x}");
            x += 0.37;
        }
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
    fn softplus_sigmoid_is_accurate_everywhere() {
        let mut x = -40.0f32;
        let (mut worst_sp, mut worst_sig) = (0.0f64, 0.0f64);
        while x < 40.0 {
            let v =
                f32x8::new([x, x + 0.011, x + 0.023, x + 0.031, x + 0.047, x + 0.053, x + 0.067, x + 0.079]);
            let (sp, sig) = softplus_sigmoid(v);
            for (i, xi) in v.to_array().iter().enumerate() {
                let xi = *xi as f64;
                let want_sp = if xi > 20.0 { xi } else { xi.exp().ln_1p() };
                let want_sig = 1.0 / (1.0 + (-xi).exp());
                worst_sp = worst_sp.max((sp.to_array()[i] as f64 - want_sp).abs() / want_sp);
                worst_sig = worst_sig.max((sig.to_array()[i] as f64 - want_sig).abs() / want_sig);
            }
            x += 0.0917;
        }
        assert!(worst_sp < 4e-7, "softplus worst error {worst_sp}");
        assert!(worst_sig < 4e-7, "sigmoid worst relative error {worst_sig}");
    }

    #[test]
    fn sixteen_lanes_match_eight() {
        let xs: Vec<f32> = (0..16).map(|i| -30.0 + 3.7 * i as f32).collect();
        let v16 = x16::load(&xs);
        let (lo, hi) = (x8::load(&xs[..8]), x8::load(&xs[8..]));
        let cat = |a: x8::V, b: x8::V| [a.to_array(), b.to_array()].concat();
        assert_eq!(x16::exp(v16).to_array().to_vec(), cat(x8::exp(lo), x8::exp(hi)));
        let (sp, sg) = x16::softplus_sigmoid(v16);
        let ((sp0, sg0), (sp1, sg1)) = (x8::softplus_sigmoid(lo), x8::softplus_sigmoid(hi));
        assert_eq!(sp.to_array().to_vec(), cat(sp0, sp1));
        assert_eq!(sg.to_array().to_vec(), cat(sg0, sg1));
        let mut out = [0.0f32; 11];
        x16::store(&mut out, v16);
        assert_eq!(&out[..], &xs[..11]);
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
