//! The float trait the generic reference kernels are written over (`f32` and `f64`).

use std::fmt::Debug;
use std::iter::Sum;
use std::ops::{AddAssign, MulAssign, SubAssign};

use num_traits::{Float, FromPrimitive};

/// A real number type: `f32` for production, `f64` for gradient checks.
pub trait Real:
    Float + FromPrimitive + AddAssign + SubAssign + MulAssign + Sum + Debug + Send + Sync + 'static
{
    /// Converts an `f64` constant.
    #[inline]
    fn c(v: f64) -> Self {
        Self::from_f64(v).expect("constant fits")
    }

    /// Logistic sigmoid `1 / (1 + e^-x)`.
    #[inline]
    fn sigmoid(self) -> Self {
        Self::one() / (Self::one() + (-self).exp())
    }

    /// `x · σ(x)`.
    #[inline]
    fn silu(self) -> Self {
        self * self.sigmoid()
    }

    /// Derivative of SiLU: `σ(x) · (1 + x · (1 − σ(x)))`.
    #[inline]
    fn silu_grad(self) -> Self {
        let s = self.sigmoid();
        s * (Self::one() + self * (Self::one() - s))
    }

    /// Softplus as the reference computes it: `x` above 20, else `ln(1 + e^x)`.
    #[inline]
    fn softplus(self) -> Self {
        if self > Self::c(20.0) { self } else { self.exp().ln_1p() }
    }

    /// Derivative of [`Real::softplus`]: 1 above 20, else `σ(x)`.
    #[inline]
    fn softplus_grad(self) -> Self {
        if self > Self::c(20.0) { Self::one() } else { self.sigmoid() }
    }
}

impl Real for f32 {}
impl Real for f64 {}
