//! The scalar `f32` activations and their derivatives, as every crate in the workspace computes
//! them. They are the [`Real`] trait's methods (the generic reference kernels use those on
//! `f32` and `f64`), so there is one implementation; the 8- and 16-lane SIMD versions live in
//! [`crate::simd`] and are tested against these.
//!
//! ```
//! use ssm_kernel::activation::{silu, softplus};
//! assert_eq!(silu(0.0), 0.0);
//! assert_eq!(softplus(30.0), 30.0); // passes through above 20, as PyTorch does
//! ```

use crate::real::Real;

/// Logistic sigmoid `σ(v) = 1 / (1 + e^{−v})`.
#[inline]
pub fn sigmoid(v: f32) -> f32 {
    Real::sigmoid(v)
}

/// SiLU: `v · σ(v)`.
#[inline]
pub fn silu(v: f32) -> f32 {
    Real::silu(v)
}

/// `d silu / dv = σ(v) · (1 + v · (1 − σ(v)))`.
#[inline]
pub fn silu_grad(v: f32) -> f32 {
    Real::silu_grad(v)
}

/// Softplus as PyTorch computes it (threshold 20): `v` above 20, else `ln(1 + e^v)`.
#[inline]
pub fn softplus(v: f32) -> f32 {
    Real::softplus(v)
}

/// `d softplus / dv`: 1 above 20, else `σ(v)`.
#[inline]
pub fn softplus_grad(v: f32) -> f32 {
    Real::softplus_grad(v)
}

/// `a[i] = −exp(a_log[i])`: Mamba's parametrisation of the negative decay `A` by `A_log` (so
/// `dA_log = dA ⊙ A`).
///
/// # Panics
/// If the lengths differ.
#[track_caller]
pub fn neg_exp(a_log: &[f32], a: &mut [f32]) {
    assert_eq!(a_log.len(), a.len(), "neg_exp: {} values into {}", a_log.len(), a.len());
    a.iter_mut().zip(a_log).for_each(|(o, v)| *o = -v.exp());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn match_f64_formulas() {
        for v in [-30.0f32, -5.0, -0.5, 0.0, 0.7, 4.0, 19.9, 20.5, 60.0] {
            let x = v as f64;
            let s = 1.0 / (1.0 + (-x).exp());
            let close = |got: f32, want: f64| (got as f64 - want).abs() <= 1e-6 * want.abs().max(1.0);
            assert!(close(sigmoid(v), s), "sigmoid({v})");
            assert!(close(silu(v), x * s), "silu({v})");
            assert!(close(silu_grad(v), s * (1.0 + x * (1.0 - s))), "silu_grad({v})");
            let sp = if x > 20.0 { x } else { x.exp().ln_1p() };
            assert!(close(softplus(v), sp), "softplus({v})");
            assert!(close(softplus_grad(v), if x > 20.0 { 1.0 } else { s }), "softplus_grad({v})");
        }
    }
}
