//! Mamba-1 selective scan: per-channel `A` (D, N), shared `B`/`C` per group.
//!
//! For every batch row `b` and channel `d`, with `Δ_t = softplus(delta_t + bias)` (or the raw
//! `delta_t` + bias when softplus is off):
//!
//! ```text
//! h_t = exp(Δ_t · A[d]) ⊙ h_{t−1} + (Δ_t · u_t) · B_t        (state, N values)
//! y_t = ⟨h_t, C_t⟩ + D[d] · u_t,   then   y_t ← y_t · silu(z_t) if a gate is given
//! ```
//!
//! starting from `h0` (zero when absent). Fast kernels: [`scan_fwd`], [`scan_bwd`] (see the
//! memory policy in its docs), [`scan_step`]; the naive oracle is in
//! [`crate::reference::mamba1`]. `docs/kernel.md` derives the backward.

mod bwd;
mod fwd;
mod step;
#[cfg(test)]
mod tests;
mod tile;
mod types;

pub use bwd::{CHUNK, scan_bwd, scan_bwd_with_checkpoints};
pub use fwd::scan_fwd;
pub use step::scan_step;
pub use types::{Scan1Args, Scan1Dims, Scan1Grads, Scan1Out, check_upstream};
