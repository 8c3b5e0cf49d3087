//! Mamba-1 selective scan: per-channel `A` (D, N), shared `B`/`C` per group.
//!
//! For every batch row `b` and channel `d`, with `Δ_t = softplus(delta_t + bias)` (or the raw
//! `delta_t` when softplus is off):
//!
//! ```text
//! h_t = exp(Δ_t · A[d]) ⊙ h_{t−1} + (Δ_t · u_t) · B_t        (state, N values)
//! y_t = ⟨h_t, C_t⟩ + D[d] · u_t,   then   y_t ← y_t · silu(z_t) if a gate is given
//! ```
//!
//! starting from `h0` (zero when absent). See `docs/kernel.md` for the backward derivation.

mod types;

pub use types::{Scan1Args, Scan1Dims, Scan1Grads, Scan1Out, check_upstream};
