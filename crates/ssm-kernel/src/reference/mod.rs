//! Naive reference kernels: straightforward loops over every index, written for clarity and
//! generic over [`Real`](crate::Real) (or in `f64` where only checks need them) so gradient
//! checks can run in `f64`. They take the same
//! args structs as the fast kernels and are the oracle every fast kernel is tested against.

pub mod conv;
pub mod lti;
pub mod mamba1;
pub mod mamba2;
pub mod norm;
