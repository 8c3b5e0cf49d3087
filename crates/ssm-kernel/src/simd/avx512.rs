//! The AVX-512 level's 16-lane vector [`Z16`] (one `__m512`); its 8-lane type is AVX2's
//! [`A8`](super::avx::A8).
//!
//! # Safety
//! Every method calls AVX-512F intrinsics. `Z16` values are only created inside bodies that
//! [`simd_fn!`](crate::simd_fn) runs on [`Isa::Avx512`](crate::isa::Isa), after the CPU was
//! checked; the methods are `#[inline(always)]`, so they compile into those bodies.

use std::arch::x86_64::*;
use std::ops::{Add, AddAssign, Div, Mul, MulAssign, Neg, Sub, SubAssign};

use super::{Mask, Vf32};

/// 16 f32 lanes in one AVX-512 register.
#[derive(Clone, Copy, Debug)]
#[repr(transparent)]
pub struct Z16(pub __m512);

/// A 16-lane mask register.
#[derive(Clone, Copy, Debug)]
pub struct M16(pub __mmask16);

macro_rules! binop {
    ($tr:ident, $f:ident, $tra:ident, $fa:ident, $intr:ident) => {
        impl $tr for Z16 {
            type Output = Z16;
            #[inline(always)]
            fn $f(self, o: Z16) -> Z16 {
                // SAFETY: see the module documentation.
                Z16(unsafe { $intr(self.0, o.0) })
            }
        }
        impl $tra for Z16 {
            #[inline(always)]
            fn $fa(&mut self, o: Z16) {
                *self = $tr::$f(*self, o);
            }
        }
    };
}

binop!(Add, add, AddAssign, add_assign, _mm512_add_ps);
binop!(Sub, sub, SubAssign, sub_assign, _mm512_sub_ps);
binop!(Mul, mul, MulAssign, mul_assign, _mm512_mul_ps);

impl Div for Z16 {
    type Output = Z16;
    #[inline(always)]
    fn div(self, o: Z16) -> Z16 {
        // SAFETY: see the module documentation.
        Z16(unsafe { _mm512_div_ps(self.0, o.0) })
    }
}

impl Neg for Z16 {
    type Output = Z16;
    #[inline(always)]
    fn neg(self) -> Z16 {
        // SAFETY: see the module documentation.
        Z16(unsafe {
            _mm512_castsi512_ps(_mm512_xor_si512(_mm512_castps_si512(self.0), _mm512_set1_epi32(i32::MIN)))
        })
    }
}

impl Mask<Z16> for M16 {
    #[inline(always)]
    fn select(self, if_true: Z16, if_false: Z16) -> Z16 {
        // SAFETY: see the module documentation.
        Z16(unsafe { _mm512_mask_blend_ps(self.0, if_false.0, if_true.0) })
    }
}

/// The mask of the first `n` lanes (`n ≤ 16`).
#[inline(always)]
fn first(n: usize) -> __mmask16 {
    ((1u32 << n) - 1) as __mmask16
}

impl Vf32 for Z16 {
    const LANES: usize = 16;
    // SAFETY (both): `__m512` is 16 f32 lanes; any bits are valid.
    const ZERO: Self = Z16(unsafe { std::mem::transmute::<[f32; 16], __m512>([0.0; 16]) });
    const ONE: Self = Z16(unsafe { std::mem::transmute::<[f32; 16], __m512>([1.0; 16]) });
    type Arr = [f32; 16];
    type Mask = M16;

    #[inline(always)]
    fn splat(x: f32) -> Self {
        // SAFETY: see the module documentation.
        Z16(unsafe { _mm512_set1_ps(x) })
    }
    #[inline(always)]
    fn from_array(a: [f32; 16]) -> Self {
        // SAFETY: reads the 16 values of `a`.
        Z16(unsafe { _mm512_loadu_ps(a.as_ptr()) })
    }
    #[inline(always)]
    fn to_array(self) -> [f32; 16] {
        let mut a = [0.0f32; 16];
        // SAFETY: writes the 16 values of `a`.
        unsafe { _mm512_storeu_ps(a.as_mut_ptr(), self.0) };
        a
    }
    #[inline(always)]
    fn mul_add(self, m: Self, a: Self) -> Self {
        // SAFETY: see the module documentation.
        Z16(unsafe { _mm512_fmadd_ps(self.0, m.0, a.0) })
    }
    #[inline(always)]
    fn mul_neg_add(self, m: Self, a: Self) -> Self {
        // SAFETY: see the module documentation.
        Z16(unsafe { _mm512_fnmadd_ps(self.0, m.0, a.0) })
    }
    #[inline(always)]
    fn fast_max(self, o: Self) -> Self {
        // SAFETY: see the module documentation.
        Z16(unsafe { _mm512_max_ps(self.0, o.0) })
    }
    #[inline(always)]
    fn fast_min(self, o: Self) -> Self {
        // SAFETY: see the module documentation.
        Z16(unsafe { _mm512_min_ps(self.0, o.0) })
    }
    #[inline(always)]
    fn abs(self) -> Self {
        // SAFETY: see the module documentation.
        Z16(unsafe { _mm512_abs_ps(self.0) })
    }
    #[inline(always)]
    fn recip(self) -> Self {
        // SAFETY: see the module documentation.
        Z16(unsafe { _mm512_rcp14_ps(self.0) })
    }
    #[inline(always)]
    fn sqrt(self) -> Self {
        // SAFETY: see the module documentation.
        Z16(unsafe { _mm512_sqrt_ps(self.0) })
    }
    #[inline(always)]
    fn reduce_add(self) -> f32 {
        // SAFETY: see the module documentation.
        unsafe {
            let lo = _mm512_castps512_ps256(self.0);
            let hi = _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(self.0)));
            super::avx::A8(_mm256_add_ps(lo, hi)).reduce_add()
        }
    }
    #[inline(always)]
    fn simd_gt(self, o: Self) -> M16 {
        // SAFETY: see the module documentation.
        M16(unsafe { _mm512_cmp_ps_mask::<_CMP_GT_OQ>(self.0, o.0) })
    }
    #[inline(always)]
    fn simd_ge(self, o: Self) -> M16 {
        // SAFETY: see the module documentation.
        M16(unsafe { _mm512_cmp_ps_mask::<_CMP_GE_OQ>(self.0, o.0) })
    }
    #[inline(always)]
    fn shl23_add_one(self) -> Self {
        // SAFETY: see the module documentation.
        Z16(unsafe {
            let t = _mm512_slli_epi32::<23>(_mm512_castps_si512(self.0));
            _mm512_castsi512_ps(_mm512_add_epi32(t, _mm512_set1_epi32(0x3f80_0000)))
        })
    }
    #[inline(always)]
    fn load(src: &[f32]) -> Self {
        if src.len() >= 16 {
            Self::load_full(src)
        } else {
            // SAFETY: the mask covers `src.len()` lanes; masked-off lanes are not read.
            Z16(unsafe { _mm512_maskz_loadu_ps(first(src.len()), src.as_ptr()) })
        }
    }
    #[inline(always)]
    fn load_full(src: &[f32]) -> Self {
        let s = &src[..16];
        // SAFETY: `s` holds 16 values.
        Z16(unsafe { _mm512_loadu_ps(s.as_ptr()) })
    }
    #[inline(always)]
    fn store(dst: &mut [f32], v: Self) {
        if dst.len() >= 16 {
            Self::store_full(dst, v)
        } else {
            // SAFETY: the mask covers `dst.len()` lanes; masked-off lanes are not written.
            unsafe { _mm512_mask_storeu_ps(dst.as_mut_ptr(), first(dst.len()), v.0) }
        }
    }
    #[inline(always)]
    fn store_full(dst: &mut [f32], v: Self) {
        let d = &mut dst[..16];
        // SAFETY: `d` holds 16 values.
        unsafe { _mm512_storeu_ps(d.as_mut_ptr(), v.0) }
    }
}
