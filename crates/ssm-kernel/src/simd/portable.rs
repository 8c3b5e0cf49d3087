//! The portable level's vectors: `wide::f32x8` and `wide::f32x16`, whatever instructions `wide`
//! was compiled for (SSE2 on x86-64 by default, NEON on aarch64).

use super::{Mask, Vf32};

macro_rules! wide_vf32 {
    ($v:ident, $vi:ident, $n:expr) => {
        impl Mask<wide::$v> for wide::$v {
            #[inline(always)]
            fn select(self, if_true: wide::$v, if_false: wide::$v) -> wide::$v {
                wide::Select::select(self, if_true, if_false)
            }
        }

        #[allow(deprecated)] // `wide`'s comparison traits: the inherent forms are not in 1.7.
        impl Vf32 for wide::$v {
            const LANES: usize = $n;
            const ZERO: Self = wide::$v::ZERO;
            const ONE: Self = wide::$v::ONE;
            type Arr = [f32; $n];
            type Mask = wide::$v;

            #[inline(always)]
            fn splat(x: f32) -> Self {
                wide::$v::splat(x)
            }
            #[inline(always)]
            fn from_array(a: [f32; $n]) -> Self {
                wide::$v::from(a)
            }
            #[inline(always)]
            fn to_array(self) -> [f32; $n] {
                wide::$v::to_array(self)
            }
            #[inline(always)]
            fn mul_add(self, m: Self, a: Self) -> Self {
                wide::$v::mul_add(self, m, a)
            }
            #[inline(always)]
            fn mul_neg_add(self, m: Self, a: Self) -> Self {
                wide::$v::mul_neg_add(self, m, a)
            }
            #[inline(always)]
            fn fast_max(self, o: Self) -> Self {
                wide::$v::fast_max(self, o)
            }
            #[inline(always)]
            fn fast_min(self, o: Self) -> Self {
                wide::$v::fast_min(self, o)
            }
            #[inline(always)]
            fn abs(self) -> Self {
                wide::$v::abs(self)
            }
            #[inline(always)]
            fn recip(self) -> Self {
                wide::$v::recip(self)
            }
            #[inline(always)]
            fn sqrt(self) -> Self {
                wide::$v::sqrt(self)
            }
            #[inline(always)]
            fn reduce_add(self) -> f32 {
                wide::$v::reduce_add(self)
            }
            #[inline(always)]
            fn simd_gt(self, o: Self) -> Self {
                wide::CmpGt::simd_gt(self, o)
            }
            #[inline(always)]
            fn simd_ge(self, o: Self) -> Self {
                wide::CmpGe::simd_ge(self, o)
            }
            #[inline(always)]
            fn shl23_add_one(self) -> Self {
                let t: wide::$vi = wide::bytemuck::cast(self);
                wide::bytemuck::cast((t << 23) + wide::$vi::splat(0x3f80_0000))
            }
            #[inline(always)]
            fn load(src: &[f32]) -> Self {
                if src.len() >= $n { Self::load_full(src) } else { wide::$v::from(src) }
            }
            #[inline(always)]
            fn load_full(src: &[f32]) -> Self {
                wide::$v::from(*<&[f32; $n]>::try_from(&src[..$n]).unwrap())
            }
            #[inline(always)]
            fn store_full(dst: &mut [f32], v: Self) {
                *<&mut [f32; $n]>::try_from(&mut dst[..$n]).unwrap() = v.to_array();
            }
        }
    };
}

wide_vf32!(f32x8, i32x8, 8);
wide_vf32!(f32x16, i32x16, 16);
