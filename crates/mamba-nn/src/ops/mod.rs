//! Differentiable ops. Each file holds one op: its forward (a function taking the [`Tape`]
//! and input [`Var`]s), its [`Backward`] struct (holding only what the backward needs), and its
//! tests — including an f64 central-difference check of the backward against an f64 reference
//! forward written in the test.
//!
//! [`Tape`]: crate::tape::Tape
//! [`Var`]: crate::tape::Var
//! [`Backward`]: crate::tape::Backward

#[cfg(test)]
pub(crate) mod check;
pub mod linear;

pub use linear::linear;
