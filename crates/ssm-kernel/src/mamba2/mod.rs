//! Mamba-2 scan (per-head scalar `A`): sequential and chunked SSD, forward / backward / step.
//!
//! # Layouts (row-major)
//!
//! | tensor | layout |
//! |---|---|
//! | `x`, `z`, `y` | (B, L, H, P) |
//! | `delta` | (B, L, H) |
//! | `a`, `d`, `delta_bias` | (H) |
//! | `b`, `c` | (B, L, G, N) |
//! | `h0`, `h_last` | (B, H, P, N) — HF's `ssm_state` layout |
//!
//! # Recurrence
//!
//! For batch row `b` and head `h` (group `g = h / (H/G)`), with `Δ_t = softplus(delta_t +
//! dt_bias[h])` (or without softplus / bias when disabled) and the scalar decay
//! `ā_t = exp(Δ_t · A[h])`:
//!
//! ```text
//! h_t[p, n] = ā_t · h_{t−1}[p, n] + Δ_t · x_t[p] · B_t[g, n]          (state, P × N)
//! y_t[p]    = Σ_n h_t[p, n] · C_t[g, n] + D[h] · x_t[p],   y_t ← y_t · silu(z_t) if gated
//! ```
//!
//! starting from `h0` (zero when absent).
//!
//! # Kernels
//!
//! - [`scan_fwd`], [`scan_bwd`], [`scan_step`]: the sequential recurrence, SIMD over `P` (see
//!   the `seq` module docs on the functions), one task per (b, h).
//! - [`ssd_fwd`], [`ssd_bwd`]: the chunked "state-space dual" form of the Mamba-2 paper, where
//!   the work inside a chunk is matrix products (see [`ssd_fwd`] for the algorithm and
//!   [`ssd_bwd`] for the hand-derived backward).
//! - [`scan_fwd_auto`], [`scan_bwd_auto`]: pick one of the two by the rule documented on
//!   [`use_ssd`] (sequential forward; SSD backward for large `N·P`), with the caller's SSD chunk
//!   length ([`AUTO_CHUNK`] by default).
//! - [`mixer_fwd`], [`mixer_bwd`]: the whole mixer core between `in_proj` and `out_proj` (conv,
//!   scan, gated RMSNorm) fused per batch row, for the training step; [`MixerDims::use_fused`]
//!   says when to prefer them over the separate kernels.
//!
//! All fast kernels are `f32`; [`crate::reference::mamba2`] holds the generic naive loops they are
//! tested against.

mod common;
mod mixer;
mod seq;
mod ssd;
mod types;

#[cfg(test)]
mod mixer_tests;
#[cfg(test)]
mod tests;

pub use mixer::{MixerDims, MixerGrads, MixerOut, MixerParams, mixer_bwd, mixer_fwd};
pub use seq::{scan_bwd, scan_fwd, scan_step};
pub use ssd::{AUTO_CHUNK, scan_bwd_auto, scan_fwd_auto, ssd_bwd, ssd_fwd, use_ssd};
pub(crate) use types::check_step;
pub use types::{Scan2Args, Scan2Dims, Scan2Grads, Scan2Out, check_upstream};
