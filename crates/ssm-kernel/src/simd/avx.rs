//! The AVX2 level's vectors: [`A8`] (one `__m256`) and [`A16`] (two).
//!
//! # Safety
//! Every method calls AVX/AVX2/FMA intrinsics. The types are only created inside bodies that
//! [`simd_fn!`](crate::simd_fn) runs on [`Isa::Avx2`](crate::isa::Isa) or above, after the CPU
//! was checked; the methods are `#[inline(always)]`, so they compile into those bodies.

use std::arch::x86_64::*;
use std::ops::{Add, AddAssign, Div, Mul, MulAssign, Neg, Sub, SubAssign};

use super::{Mask, Vf32};

/// 8 f32 lanes in one AVX register.
#[derive(Clone, Copy, Debug)]
#[repr(transparent)]
pub struct A8(pub __m256);

/// 16 f32 lanes in two AVX registers (lanes 0–7, then 8–15).
#[derive(Clone, Copy, Debug)]
#[repr(C)]
pub struct A16(pub A8, pub A8);

macro_rules! binop {
    ($t:ident, $tr:ident, $f:ident, $tra:ident, $fa:ident, $intr:ident) => {
        impl $tr for A8 {
            type Output = A8;
            #[inline(always)]
            fn $f(self, o: A8) -> A8 {
                // SAFETY: see the module documentation.
                A8(unsafe { $intr(self.0, o.0) })
            }
        }
        impl $tra for A8 {
            #[inline(always)]
            fn $fa(&mut self, o: A8) {
                *self = $tr::$f(*self, o);
            }
        }
        impl $tr for A16 {
            type Output = A16;
            #[inline(always)]
            fn $f(self, o: A16) -> A16 {
                A16($tr::$f(self.0, o.0), $tr::$f(self.1, o.1))
            }
        }
        impl $tra for A16 {
            #[inline(always)]
            fn $fa(&mut self, o: A16) {
                *self = $tr::$f(*self, o);
            }
        }
    };
}

binop!(A8, Add, add, AddAssign, add_assign, _mm256_add_ps);
binop!(A8, Sub, sub, SubAssign, sub_assign, _mm256_sub_ps);
binop!(A8, Mul, mul, MulAssign, mul_assign, _mm256_mul_ps);

impl Div for A8 {
    type Output = A8;
    #[inline(always)]
    fn div(self, o: A8) -> A8 {
        // SAFETY: see the module documentation.
        A8(unsafe { _mm256_div_ps(self.0, o.0) })
    }
}

impl Div for A16 {
    type Output = A16;
    #[inline(always)]
    fn div(self, o: A16) -> A16 {
        A16(self.0 / o.0, self.1 / o.1)
    }
}

impl Neg for A8 {
    type Output = A8;
    #[inline(always)]
    fn neg(self) -> A8 {
        // SAFETY: see the module documentation.
        A8(unsafe { _mm256_xor_ps(self.0, _mm256_set1_ps(-0.0)) })
    }
}

impl Neg for A16 {
    type Output = A16;
    #[inline(always)]
    fn neg(self) -> A16 {
        A16(-self.0, -self.1)
    }
}

impl Mask<A8> for A8 {
    #[inline(always)]
    fn select(self, if_true: A8, if_false: A8) -> A8 {
        // SAFETY: see the module documentation.
        A8(unsafe { _mm256_blendv_ps(if_false.0, if_true.0, self.0) })
    }
}

impl Mask<A16> for A16 {
    #[inline(always)]
    fn select(self, if_true: A16, if_false: A16) -> A16 {
        A16(self.0.select(if_true.0, if_false.0), self.1.select(if_true.1, if_false.1))
    }
}

impl Vf32 for A8 {
    const LANES: usize = 8;
    // SAFETY (both): `__m256` is 8 f32 lanes; any bits are valid.
    const ZERO: Self = A8(unsafe { std::mem::transmute::<[f32; 8], __m256>([0.0; 8]) });
    const ONE: Self = A8(unsafe { std::mem::transmute::<[f32; 8], __m256>([1.0; 8]) });
    type Arr = [f32; 8];
    type Mask = A8;

    #[inline(always)]
    fn splat(x: f32) -> Self {
        // SAFETY: see the module documentation.
        A8(unsafe { _mm256_set1_ps(x) })
    }
    #[inline(always)]
    fn from_array(a: [f32; 8]) -> Self {
        // SAFETY: reads the 8 values of `a`.
        A8(unsafe { _mm256_loadu_ps(a.as_ptr()) })
    }
    #[inline(always)]
    fn to_array(self) -> [f32; 8] {
        let mut a = [0.0f32; 8];
        // SAFETY: writes the 8 values of `a`.
        unsafe { _mm256_storeu_ps(a.as_mut_ptr(), self.0) };
        a
    }
    #[inline(always)]
    fn mul_add(self, m: Self, a: Self) -> Self {
        // SAFETY: see the module documentation.
        A8(unsafe { _mm256_fmadd_ps(self.0, m.0, a.0) })
    }
    #[inline(always)]
    fn mul_neg_add(self, m: Self, a: Self) -> Self {
        // SAFETY: see the module documentation.
        A8(unsafe { _mm256_fnmadd_ps(self.0, m.0, a.0) })
    }
    #[inline(always)]
    fn fast_max(self, o: Self) -> Self {
        // SAFETY: see the module documentation.
        A8(unsafe { _mm256_max_ps(self.0, o.0) })
    }
    #[inline(always)]
    fn fast_min(self, o: Self) -> Self {
        // SAFETY: see the module documentation.
        A8(unsafe { _mm256_min_ps(self.0, o.0) })
    }
    #[inline(always)]
    fn abs(self) -> Self {
        // SAFETY: see the module documentation.
        A8(unsafe { _mm256_andnot_ps(_mm256_set1_ps(-0.0), self.0) })
    }
    #[inline(always)]
    fn recip(self) -> Self {
        // SAFETY: see the module documentation.
        A8(unsafe { _mm256_rcp_ps(self.0) })
    }
    #[inline(always)]
    fn sqrt(self) -> Self {
        // SAFETY: see the module documentation.
        A8(unsafe { _mm256_sqrt_ps(self.0) })
    }
    #[inline(always)]
    fn reduce_add(self) -> f32 {
        // SAFETY: see the module documentation.
        unsafe {
            let s = _mm_add_ps(_mm256_castps256_ps128(self.0), _mm256_extractf128_ps::<1>(self.0));
            let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
            let s = _mm_add_ss(s, _mm_movehdup_ps(s));
            _mm_cvtss_f32(s)
        }
    }
    #[inline(always)]
    fn simd_gt(self, o: Self) -> A8 {
        // SAFETY: see the module documentation.
        A8(unsafe { _mm256_cmp_ps::<_CMP_GT_OQ>(self.0, o.0) })
    }
    #[inline(always)]
    fn simd_ge(self, o: Self) -> A8 {
        // SAFETY: see the module documentation.
        A8(unsafe { _mm256_cmp_ps::<_CMP_GE_OQ>(self.0, o.0) })
    }
    #[inline(always)]
    fn shl23_add_one(self) -> Self {
        // SAFETY: see the module documentation.
        A8(unsafe {
            let t = _mm256_slli_epi32::<23>(_mm256_castps_si256(self.0));
            _mm256_castsi256_ps(_mm256_add_epi32(t, _mm256_set1_epi32(0x3f80_0000)))
        })
    }
    #[inline(always)]
    fn load(src: &[f32]) -> Self {
        if src.len() >= 8 {
            Self::load_full(src)
        } else {
            let mut a = [0.0f32; 8];
            a[..src.len()].copy_from_slice(src);
            Self::from_array(a)
        }
    }
    #[inline(always)]
    fn load_full(src: &[f32]) -> Self {
        let s = &src[..8];
        // SAFETY: `s` holds 8 values.
        A8(unsafe { _mm256_loadu_ps(s.as_ptr()) })
    }
    #[inline(always)]
    fn store_full(dst: &mut [f32], v: Self) {
        let d = &mut dst[..8];
        // SAFETY: `d` holds 8 values.
        unsafe { _mm256_storeu_ps(d.as_mut_ptr(), v.0) }
    }
}

impl Vf32 for A16 {
    const LANES: usize = 16;
    const ZERO: Self = A16(A8::ZERO, A8::ZERO);
    const ONE: Self = A16(A8::ONE, A8::ONE);
    type Arr = [f32; 16];
    type Mask = A16;

    #[inline(always)]
    fn splat(x: f32) -> Self {
        let v = A8::splat(x);
        A16(v, v)
    }
    #[inline(always)]
    fn from_array(a: [f32; 16]) -> Self {
        A16(A8::load_full(&a[..8]), A8::load_full(&a[8..]))
    }
    #[inline(always)]
    fn to_array(self) -> [f32; 16] {
        let mut a = [0.0f32; 16];
        A8::store_full(&mut a[..8], self.0);
        A8::store_full(&mut a[8..], self.1);
        a
    }
    #[inline(always)]
    fn mul_add(self, m: Self, a: Self) -> Self {
        A16(self.0.mul_add(m.0, a.0), self.1.mul_add(m.1, a.1))
    }
    #[inline(always)]
    fn mul_neg_add(self, m: Self, a: Self) -> Self {
        A16(self.0.mul_neg_add(m.0, a.0), self.1.mul_neg_add(m.1, a.1))
    }
    #[inline(always)]
    fn fast_max(self, o: Self) -> Self {
        A16(self.0.fast_max(o.0), self.1.fast_max(o.1))
    }
    #[inline(always)]
    fn fast_min(self, o: Self) -> Self {
        A16(self.0.fast_min(o.0), self.1.fast_min(o.1))
    }
    #[inline(always)]
    fn abs(self) -> Self {
        A16(self.0.abs(), self.1.abs())
    }
    #[inline(always)]
    fn recip(self) -> Self {
        A16(self.0.recip(), self.1.recip())
    }
    #[inline(always)]
    fn sqrt(self) -> Self {
        A16(self.0.sqrt(), self.1.sqrt())
    }
    #[inline(always)]
    fn reduce_add(self) -> f32 {
        (self.0 + self.1).reduce_add()
    }
    #[inline(always)]
    fn simd_gt(self, o: Self) -> A16 {
        A16(self.0.simd_gt(o.0), self.1.simd_gt(o.1))
    }
    #[inline(always)]
    fn simd_ge(self, o: Self) -> A16 {
        A16(self.0.simd_ge(o.0), self.1.simd_ge(o.1))
    }
    #[inline(always)]
    fn shl23_add_one(self) -> Self {
        A16(self.0.shl23_add_one(), self.1.shl23_add_one())
    }
    #[inline(always)]
    fn load(src: &[f32]) -> Self {
        if src.len() >= 16 {
            Self::load_full(src)
        } else {
            let lo = A8::load(src);
            let hi = if src.len() > 8 { A8::load(&src[8..]) } else { A8::ZERO };
            A16(lo, hi)
        }
    }
    #[inline(always)]
    fn load_full(src: &[f32]) -> Self {
        let s = &src[..16];
        A16(A8::load_full(&s[..8]), A8::load_full(&s[8..]))
    }
    #[inline(always)]
    fn store(dst: &mut [f32], v: Self) {
        if dst.len() >= 16 {
            Self::store_full(dst, v)
        } else {
            let n = dst.len();
            A8::store(&mut dst[..n.min(8)], v.0);
            if n > 8 {
                A8::store(&mut dst[8..], v.1);
            }
        }
    }
    #[inline(always)]
    fn store_full(dst: &mut [f32], v: Self) {
        let d = &mut dst[..16];
        A8::store_full(&mut d[..8], v.0);
        A8::store_full(&mut d[8..], v.1);
    }
}
