//! SIMD vectors for every instruction-set level, and the vector maths on them: a lean `exp`,
//! sigmoid, SiLU, softplus, loads and stores of partial vectors, and a dot product.
//!
//! Kernels are generic over a vector type — [`V8`] (8 lanes) or [`V16`] (16 lanes) — and are
//! instantiated per level by [`simd_fn!`](crate::simd_fn) (see [`crate::isa`]):
//!
//! | level | 8 lanes | 16 lanes |
//! |---|---|---|
//! | portable | `wide::f32x8` | `wide::f32x16` |
//! | avx2 | [`avx::A8`] (one `__m256`) | [`avx::A16`] (two) |
//! | avx512 | [`avx::A8`] | [`avx512::Z16`] (one `__m512`) |
//!
//! `wide` picks its instructions when it is compiled, so it cannot follow a choice made at run
//! time: the AVX2 and AVX-512 types call `std::arch` intrinsics, which compile to single
//! instructions inside the `#[target_feature]` functions the dispatcher runs. The portable
//! level keeps `wide`, which gives SSE2 on x86-64 and NEON on aarch64.
//!
//! Results differ between levels only by rounding: the portable level does not fuse `a·b + c`,
//! and the reciprocal estimate under [`sigmoid`] differs (it is refined by a Newton step on
//! every level).

use std::fmt::Debug;
use std::ops::{Add, AddAssign, Div, Index, IndexMut, Mul, MulAssign, Neg, Sub, SubAssign};

#[cfg(target_arch = "x86_64")]
pub mod avx;
#[cfg(target_arch = "x86_64")]
pub mod avx512;
mod portable;

/// A lane mask from a comparison of two `V`s.
pub trait Mask<V>: Copy {
    /// Per lane: `if_true` where the mask is set, else `if_false`.
    fn select(self, if_true: V, if_false: V) -> V;
}

/// A vector of `LANES` f32 values. All methods are `#[inline(always)]`, so they compile to the
/// instructions of the function they are inlined into.
pub trait Vf32:
    Copy
    + Send
    + Sync
    + Debug
    + 'static
    + Add<Output = Self>
    + Sub<Output = Self>
    + Mul<Output = Self>
    + Div<Output = Self>
    + Neg<Output = Self>
    + AddAssign
    + SubAssign
    + MulAssign
{
    /// Lanes per vector.
    const LANES: usize;
    /// All lanes 0.
    const ZERO: Self;
    /// All lanes 1.
    const ONE: Self;
    /// The lanes as an array (`[f32; LANES]`).
    type Arr: Copy + Debug + AsRef<[f32]> + AsMut<[f32]> + Index<usize, Output = f32> + IndexMut<usize>;
    /// The result of a lane comparison.
    type Mask: Mask<Self>;

    /// All lanes `x`.
    fn splat(x: f32) -> Self;
    /// The vector holding `a`.
    fn from_array(a: Self::Arr) -> Self;
    /// The lanes.
    fn to_array(self) -> Self::Arr;
    /// `self · m + a` (fused where the level has FMA).
    fn mul_add(self, m: Self, a: Self) -> Self;
    /// `a − self · m` (fused where the level has FMA).
    fn mul_neg_add(self, m: Self, a: Self) -> Self;
    /// Lane maximum (either operand when one is NaN).
    fn fast_max(self, o: Self) -> Self;
    /// Lane minimum (either operand when one is NaN).
    fn fast_min(self, o: Self) -> Self;
    /// `|x|`.
    fn abs(self) -> Self;
    /// `1/x`: an estimate (relative error ≤ 1.5·2⁻¹²) or exact, depending on the level.
    fn recip(self) -> Self;
    /// `√x`.
    fn sqrt(self) -> Self;
    /// The sum of the lanes (the order of the additions depends on the level).
    fn reduce_add(self) -> f32;
    /// Lanes where `self > o`.
    fn simd_gt(self, o: Self) -> Self::Mask;
    /// Lanes where `self ≥ o`.
    fn simd_ge(self, o: Self) -> Self::Mask;
    /// Reads each lane's bits as an i32 `t`, and returns the f32 whose bits are
    /// `(t << 23) + bits(1.0)` (wrapping): the `2^k` step of [`exp`].
    fn shl23_add_one(self) -> Self;

    /// Loads `src[..min(len, LANES)]`, zero-filling the missing lanes.
    fn load(src: &[f32]) -> Self;
    /// Loads `src[..LANES]`: one vector load.
    ///
    /// # Panics
    /// If `src` is shorter than `LANES`.
    fn load_full(src: &[f32]) -> Self;
    /// Stores the first `dst.len().min(LANES)` lanes of `v` into `dst`. By default a full
    /// vector store, or the lanes copied through [`Vf32::to_array`] into a shorter `dst`; a
    /// level with masked or half-width stores overrides it.
    #[inline(always)]
    fn store(dst: &mut [f32], v: Self) {
        if dst.len() >= Self::LANES {
            Self::store_full(dst, v)
        } else {
            let n = dst.len();
            dst.copy_from_slice(&v.to_array().as_ref()[..n]);
        }
    }
    /// Stores `v` into `dst[..LANES]`: one vector store.
    ///
    /// # Panics
    /// If `dst` is shorter than `LANES`.
    fn store_full(dst: &mut [f32], v: Self);

    /// Adds the first `dst.len().min(LANES)` lanes of `v` into `dst`.
    #[inline(always)]
    fn add_store(dst: &mut [f32], v: Self) {
        let cur = Self::load(dst);
        Self::store(dst, cur + v);
    }

    /// Adds `v` into `dst[..LANES]`.
    ///
    /// # Panics
    /// If `dst` is shorter than `LANES`.
    #[inline(always)]
    fn add_store_full(dst: &mut [f32], v: Self) {
        let cur = Self::load_full(dst);
        Self::store_full(dst, cur + v);
    }

    /// The lanes of a slice of vectors, in order.
    #[inline(always)]
    fn as_f32s(v: &[Self]) -> &[f32] {
        // SAFETY: every vector type is `LANES` f32 values with no padding (checked by the
        // `layout` test), and any f32 alignment is met by a vector's.
        unsafe { std::slice::from_raw_parts(v.as_ptr().cast(), v.len() * Self::LANES) }
    }

    /// [`Vf32::as_f32s`], mutable.
    #[inline(always)]
    fn as_f32s_mut(v: &mut [Self]) -> &mut [f32] {
        // SAFETY: as in `as_f32s`; every bit pattern is a valid f32.
        unsafe { std::slice::from_raw_parts_mut(v.as_mut_ptr().cast(), v.len() * Self::LANES) }
    }
}

/// An 8-lane [`Vf32`].
pub trait V8: Vf32<Arr = [f32; 8]> {}
impl<T: Vf32<Arr = [f32; 8]>> V8 for T {}

/// A 16-lane [`Vf32`].
pub trait V16: Vf32<Arr = [f32; 16]> {}
impl<T: Vf32<Arr = [f32; 16]>> V16 for T {}

/// Lanes of an 8-lane vector (the width most kernels use).
pub const W: usize = 8;

/// `e^x` per lane, for finite `x`.
///
/// Cody–Waite range reduction `x = k·ln2 + r` with `|r| ≤ ln2/2`, a degree-6 polynomial for
/// `e^r`, and `2^k` built in the exponent bits. Inputs are clamped to [-87.3, 88.3], so the result
/// never underflows to a subnormal: for `x < -87.3` it returns ≈1.2e-38 instead of the true tiny
/// value (an absolute error below 2e-38); above 88.3 it returns e^88.3 (the largest power of two
/// the exponent trick can build is 2^127). Relative error ≤ 2 ulp on the clamped range.
#[inline(always)]
pub fn exp<V: Vf32>(x: V) -> V {
    exp_impl::<false, V>(x)
}

/// [`exp`] for inputs known to be ≤ 0 (such as `Δ·A` with `Δ ≥ 0`, `A ≤ 0`): skips the upper
/// clamp. A positive input gives a wrong result, so callers must guarantee the sign.
#[inline(always)]
pub fn exp_nonpos<V: Vf32>(x: V) -> V {
    exp_impl::<true, V>(x)
}

/// Shared body of [`exp`] and [`exp_nonpos`].
#[inline(always)]
pub fn exp_impl<const NONPOS: bool, V: Vf32>(x: V) -> V {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // 1.5·2²³: adding it rounds to an integer (to nearest) and leaves that integer in the low
    // mantissa bits, so `k` and `2^k` come out of one FMA and integer ops, with no converts.
    const MAGIC: f32 = 12_582_912.0;
    let mut x = x.fast_max(V::splat(-87.3));
    if !NONPOS {
        x = x.fast_min(V::splat(88.3));
    }
    let t = x.mul_add(V::splat(LOG2E), V::splat(MAGIC));
    let k = t - V::splat(MAGIC);
    let r = k.mul_neg_add(V::splat(LN2_HI), x);
    let r = k.mul_neg_add(V::splat(LN2_LO), r);
    // e^r ≈ 1 + r + r²/2 + … + r⁶/720 (Horner)
    let mut p = V::splat(1.0 / 720.0);
    p = p.mul_add(r, V::splat(1.0 / 120.0));
    p = p.mul_add(r, V::splat(1.0 / 24.0));
    p = p.mul_add(r, V::splat(1.0 / 6.0));
    p = p.mul_add(r, V::splat(0.5));
    p = p.mul_add(r, V::splat(1.0));
    p = p.mul_add(r, V::splat(1.0));
    // bits(t) = bits(MAGIC) + k, and (bits(MAGIC) << 23) wraps to −(127 << 23) + bits(1.0)… so
    // (bits(t) << 23) + bits(1.0) = (k + 127) << 23, the bits of 2^k.
    p * t.shl23_add_one()
}

/// Logistic sigmoid per lane. The reciprocal is the level's estimate refined by one Newton
/// step (relative error ~1e-7), which is several times cheaper than a division.
#[inline(always)]
pub fn sigmoid<V: Vf32>(x: V) -> V {
    let d = V::ONE + exp(-x);
    let r = d.recip();
    r * (-d).mul_add(r, V::splat(2.0))
}

/// `x · σ(x)` per lane.
#[inline(always)]
pub fn silu<V: Vf32>(x: V) -> V {
    x * sigmoid(x)
}

/// Softplus as the reference computes it: `x` above 20, else `ln(1 + e^x)`.
#[inline(always)]
pub fn softplus<V: Vf32>(x: V) -> V {
    softplus_sigmoid(x).0
}

/// `(softplus(x), σ(x))` from one `exp`.
///
/// `softplus(x) = max(x, 0) + log1p(e^{−|x|})` and `log1p(e) = 2·atanh(s)` with
/// `s = e / (2 + e) ≤ 1/3`, summed to `s¹³` (absolute error < 1e-7). Above 20 this returns `x`
/// exactly, as the reference's pass-through does (the log term is below half an ulp of `x`).
#[inline(always)]
pub fn softplus_sigmoid<V: Vf32>(x: V) -> (V, V) {
    let one = V::ONE;
    let e = exp(-x.abs());
    let s = e / (V::splat(2.0) + e);
    let z = s * s;
    let mut p = V::splat(1.0 / 13.0);
    p = p.mul_add(z, V::splat(1.0 / 11.0));
    p = p.mul_add(z, V::splat(1.0 / 9.0));
    p = p.mul_add(z, V::splat(1.0 / 7.0));
    p = p.mul_add(z, V::splat(1.0 / 5.0));
    p = p.mul_add(z, V::splat(1.0 / 3.0));
    p = p.mul_add(z, one);
    let log1p = (s + s) * p;
    let big = x.simd_gt(V::splat(20.0));
    let sp = big.select(x, x.fast_max(V::ZERO) + log1p);
    // σ(x) = 1 / (1 + e^{−x}): with e = e^{−|x|}, that is 1/(1+e) for x ≥ 0 and e/(1+e) below.
    let r = one / (one + e);
    let sig = x.simd_ge(V::ZERO).select(r, e * r);
    (sp, sig)
}

crate::simd_fn! {
    /// `Σ a·b` over the common length, on the active level (two 16-lane accumulators).
    pub fn dot[V: f16](a: &[f32], b: &[f32]) -> f32 {
        dot_with::<V>(a, b)
    }
}

/// [`dot`] with vector type `V`, for kernels already inside a dispatched body: two independent
/// accumulators of `V`, so the multiply-adds of consecutive vectors overlap.
#[inline(always)]
pub fn dot_with<V: Vf32>(a: &[f32], b: &[f32]) -> f32 {
    let n = a.len().min(b.len());
    let (a, b) = (&a[..n], &b[..n]);
    let w = V::LANES;
    let (mut s0, mut s1) = (V::ZERO, V::ZERO);
    let mut i = 0;
    while i + 2 * w <= n {
        s0 = V::load_full(&a[i..]).mul_add(V::load_full(&b[i..]), s0);
        s1 = V::load_full(&a[i + w..]).mul_add(V::load_full(&b[i + w..]), s1);
        i += 2 * w;
    }
    while i < n {
        s0 = V::load(&a[i..]).mul_add(V::load(&b[i..]), s0);
        i += w;
    }
    (s0 + s1).reduce_add()
}

crate::simd_fn! {
    /// `out[j] = σ(z[j])` over the common length, on the active level (8 lanes at a time; the
    /// last partial vector is loaded and stored with zero padding).
    pub fn sigmoid_slice[V: f8](z: &[f32], out: &mut [f32]) {
        sigmoid_slice_in::<V>(z, out)
    }
}

/// [`sigmoid_slice`] on vector type `V`.
#[inline(always)]
pub fn sigmoid_slice_in<V: Vf32>(z: &[f32], out: &mut [f32]) {
    for (zc, oc) in z.chunks(V::LANES).zip(out.chunks_mut(V::LANES)) {
        V::store(oc, sigmoid(V::load(zc)));
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
    use crate::isa::Isa;

    /// Runs `$f::<V>()` for every vector type of every level this CPU supports, inside a function
    /// compiled for the level.
    macro_rules! each_type {
        ($f:ident) => {{
            $f::<wide::f32x8>();
            $f::<wide::f32x16>();
            #[cfg(target_arch = "x86_64")]
            {
                if Isa::Avx2.supported() {
                    // SAFETY: checked just above.
                    unsafe { crate::isa::in_avx2(|| ($f::<avx::A8>(), $f::<avx::A16>())) };
                }
                if Isa::Avx512.supported() {
                    // SAFETY: checked just above.
                    unsafe { crate::isa::in_avx512(|| $f::<avx512::Z16>()) };
                }
            }
        }};
    }

    /// `V` filled with `f(lane)`.
    fn lanes<V: Vf32>(f: impl Fn(usize) -> f32) -> V {
        let mut a = V::ZERO.to_array();
        for i in 0..V::LANES {
            a[i] = f(i);
        }
        V::from_array(a)
    }

    #[test]
    fn layout() {
        fn check<V: Vf32>() {
            assert_eq!(std::mem::size_of::<V>(), 4 * V::LANES);
            assert_eq!(std::mem::size_of::<V::Arr>(), 4 * V::LANES);
            assert!(std::mem::align_of::<V>() >= 4);
            let v: Vec<V> = (0..3).map(|j| lanes::<V>(|i| (j * V::LANES + i) as f32)).collect();
            let f = V::as_f32s(&v);
            assert!(f.iter().enumerate().all(|(i, x)| *x == i as f32));
        }
        each_type!(check);
    }

    #[test]
    fn exp_matches_std_within_2ulp_relative() {
        fn check<V: Vf32>() {
            let mut worst = 0.0f64;
            let mut x = -87.0f32;
            while x < 88.0 {
                let v = lanes::<V>(|i| x + 0.01 * i as f32);
                let got = exp(v).to_array();
                for i in 0..V::LANES {
                    let xi = v.to_array()[i] as f64;
                    worst = worst.max(((got[i] as f64) - xi.exp()).abs() / xi.exp());
                }
                x += 0.173;
            }
            assert!(worst < 2.5e-7, "{}: worst relative error {worst}", std::any::type_name::<V>());
        }
        each_type!(check);
    }

    #[test]
    fn exp_nonpos_matches_exp_on_nonpositive_inputs() {
        fn check<V: Vf32>() {
            let mut x = -87.0f32;
            while x <= 0.0 {
                let v = lanes::<V>(|i| x * [1.0, 0.5, 0.25, 0.1, 0.01, -0.0, 0.7, 0.9][i % 8]);
                assert_eq!(exp(v).to_array().as_ref(), exp_nonpos(v).to_array().as_ref(), "x = {x}");
                x += 0.37;
            }
        }
        each_type!(check);
    }

    #[test]
    fn exp_clamps_instead_of_overflowing_or_nan() {
        fn check<V: Vf32>() {
            let xs = [-1e4f32, -200.0, -87.3, 0.0, 1.0, 88.0, 200.0, 1e4];
            let got = exp(lanes::<V>(|i| xs[i % 8])).to_array();
            assert!(got[0] >= 0.0 && got[0] < 2e-38);
            assert!(got[1] >= 0.0 && got[1] < 2e-38);
            assert_eq!(got[3], 1.0);
            assert!((got[4] - std::f32::consts::E).abs() < 1e-6);
            assert!(got.as_ref().iter().all(|v| v.is_finite()));
        }
        each_type!(check);
    }

    #[test]
    fn softplus_silu_and_sigmoid_are_accurate_everywhere() {
        fn check<V: Vf32>() {
            let mut x = -40.0f32;
            let (mut worst_sp, mut worst_sig, mut worst_silu, mut worst_sg) =
                (0.0f64, 0.0f64, 0.0f64, 0.0f64);
            while x < 40.0 {
                let v = lanes::<V>(|i| x + 0.0113 * i as f32);
                let (sp, sig) = softplus_sigmoid(v);
                let (sp, sig, si, sg) =
                    (sp.to_array(), sig.to_array(), silu(v).to_array(), sigmoid(v).to_array());
                for i in 0..V::LANES {
                    let xi = v.to_array()[i] as f64;
                    let want_sp = if xi > 20.0 { xi } else { xi.exp().ln_1p() };
                    let want_sig = 1.0 / (1.0 + (-xi).exp());
                    worst_sp = worst_sp.max((sp[i] as f64 - want_sp).abs() / want_sp);
                    worst_sig = worst_sig.max((sig[i] as f64 - want_sig).abs() / want_sig);
                    worst_sg = worst_sg.max((sg[i] as f64 - want_sig).abs() / want_sig);
                    worst_silu =
                        worst_silu.max((si[i] as f64 - xi * want_sig).abs() / (xi * want_sig).abs().max(1.0));
                }
                x += 0.0917;
            }
            let name = std::any::type_name::<V>();
            assert!(worst_sp < 4e-7, "{name}: softplus worst error {worst_sp}");
            assert!(worst_sig < 4e-7, "{name}: sigmoid (softplus_sigmoid) worst relative error {worst_sig}");
            assert!(worst_sg < 1e-6, "{name}: sigmoid worst relative error {worst_sg}");
            assert!(worst_silu < 1e-6, "{name}: silu worst error {worst_silu}");
        }
        each_type!(check);
    }

    #[test]
    fn partial_loads_stores_and_lane_ops() {
        fn check<V: Vf32>() {
            for n in 0..=V::LANES {
                let src: Vec<f32> = (0..n).map(|i| i as f32 + 1.0).collect();
                let v = V::load(&src).to_array();
                for i in 0..V::LANES {
                    assert_eq!(v[i], if i < n { i as f32 + 1.0 } else { 0.0 }, "n = {n}");
                }
                let mut d = vec![0.5f32; n];
                V::store(&mut d, V::splat(4.0));
                assert!(d.iter().all(|x| *x == 4.0));
                V::add_store(&mut d, V::splat(1.0));
                assert!(d.iter().all(|x| *x == 5.0));
            }
            let v = lanes::<V>(|i| i as f32 - 3.5);
            assert_eq!(v.reduce_add(), (0..V::LANES).map(|i| i as f32 - 3.5).sum::<f32>());
            let (a, m) = (v.abs().to_array(), v.simd_gt(V::ZERO).select(V::ONE, -V::ONE).to_array());
            let (mx, neg) = (v.fast_max(V::splat(1.0)).to_array(), (-v).to_array());
            let fused = v.mul_add(V::splat(2.0), V::ONE).to_array();
            let nfused = v.mul_neg_add(V::splat(2.0), V::ONE).to_array();
            for i in 0..V::LANES {
                let x = i as f32 - 3.5;
                assert_eq!(
                    (a[i], m[i], mx[i], neg[i]),
                    (x.abs(), if x > 0.0 { 1.0 } else { -1.0 }, x.max(1.0), -x)
                );
                assert_eq!((fused[i], nfused[i]), (2.0 * x + 1.0, 1.0 - 2.0 * x));
            }
            let r = lanes::<V>(|i| i as f32 + 0.5).recip().to_array();
            assert!((0..V::LANES).all(|i| (r[i] * (i as f32 + 0.5) - 1.0).abs() < 4e-4));
        }
        each_type!(check);
    }

    #[test]
    fn dot_matches_f64_at_every_length() {
        for n in [0usize, 1, 7, 15, 16, 17, 33, 100] {
            let a: Vec<f32> = (0..n).map(|i| (i as f32 * 0.37).sin()).collect();
            let b: Vec<f32> = (0..n).map(|i| (i as f32 * 0.11).cos()).collect();
            let want: f64 = a.iter().zip(&b).map(|(x, y)| *x as f64 * *y as f64).sum();
            assert!((dot(&a, &b) as f64 - want).abs() < 1e-5 * (1.0 + n as f64), "n = {n}");
        }
    }
}
