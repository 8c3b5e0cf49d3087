//! Causal depthwise 1-D convolution (Mamba's `conv1d`), with optional bias and fused SiLU.
//!
//! For every batch row `b`, time `t` and channel `c` (a `(B, L, C)` channels-last input, a
//! `(C, K)` weight):
//!
//! ```text
//! y[b, t, c] = bias[c] + Σ_{k=0}^{K−1} w[c, k] · x[b, t − (K−1) + k, c]     (x = 0 for t < 0)
//! y ← silu(y)   when `silu` is set
//! ```
//!
//! This is PyTorch's `Conv1d(C, C, K, groups=C, padding=K−1)` truncated to the first `L` outputs.
//! [`conv1d_fwd`] can also return the conv state after the sequence (the last `K` inputs per
//! channel), from which [`conv1d_step`] continues token by token.
//!
//! The kernels here are SIMD over channels (8 lanes, on the [`isa`](crate::isa) level chosen at
//! run time) and run independent (batch row, time block) tasks on the current rayon pool.
//! [`crate::reference::conv`] holds the naive loops with the same arguments.
//!
//! ```
//! use ssm_kernel::conv::{conv1d_fwd, ConvArgs, ConvDims, ConvOut};
//! // B=1, L=3, C=1, K=2: y_t = w0·x_{t−1} + w1·x_t
//! let dims = ConvDims::new(1, 3, 1, 2);
//! let (x, w) = ([1.0f32, 2.0, 3.0], [10.0f32, 1.0]);
//! let mut y = [0.0f32; 3];
//! conv1d_fwd(&dims, &ConvArgs::new(&x, &w), ConvOut { y: &mut y, state_out: None });
//! assert_eq!(y, [1.0, 12.0, 23.0]);
//! ```

mod fast;
mod from_state;
mod types;

pub use fast::{conv_state, conv1d_bwd, conv1d_chunk, conv1d_fwd, conv1d_step};
pub(crate) use fast::{first_reader_tap, first_tap};
pub use from_state::{conv_state_bwd, conv_state_from, conv1d_bwd_from, conv1d_fwd_from};
pub use types::{ConvArgs, ConvDims, ConvGrads, ConvOut};
pub(crate) use types::{check_step, check_upstream};

#[cfg(test)]
mod tests;
