//! `ssm-kernel`: the selective-scan and causal-convolution kernels under every Mamba layer.
//!
//! Each kernel takes plain `&[f32]` slices plus a dims struct; every argument's row-major layout
//! is documented on its args struct. Three families:
//!
//! - [`mamba1`]: the Mamba-1 selective scan (per-channel `A` of shape (D, N)), forward, backward
//!   and single-token step.
//! - [`mamba2`]: the Mamba-2 scan (per-head scalar `A`), sequential and chunked (SSD) forms,
//!   forward, backward and step.
//! - [`conv`]: the causal depthwise 1-D convolution with optional fused SiLU.
//! - [`norm`]: RMSNorm and the gated, grouped RMSNorm of Mamba-2, forward and backward.
//! - [`matvec`]: few-row products `x · Wᵀ` for decode steps.
//! - [`qweight`]: weight matrices stored as bf16, f16 or 8-bit blocks for inference, multiplied
//!   with f32 activations in f32 (decode mat-vec and prefill linear).
//! - [`xent`]: softmax cross-entropy over rows, forward and backward.
//! - [`lti`]: the linear time-invariant recurrence of the non-selective baseline.
//!
//! Smaller pieces: [`activation`] (the scalar activations), [`isa`] (the run-time choice of
//! instruction set), [`simd`] (the vector types of each instruction set, the activations' vector
//! forms and a dot product), [`cols`] (column blocks of fused projections), [`par`] (task and row-block
//! scheduling), [`pool`] (reused buffers), [`gemm`], and [`rng`] (the workspace's SplitMix64).
//!
//! The fast kernels are SIMD (16 lanes for Mamba-1, 8 elsewhere) on the instruction set chosen at
//! run time ([`isa`]: AVX-512, AVX2 or a portable baseline, whatever the build flags), and run
//! independent (batch, channel-block) tasks on the current rayon pool; choose the thread count
//! with `rayon::ThreadPool::install`. The
//! [`reference`] module holds naive loops with the same arguments, generic over `f32`/`f64`: they
//! are the oracle the fast kernels are tested against.
//!
//! ```
//! use ssm_kernel::mamba1::{self, Scan1Args, Scan1Dims, Scan1Out};
//! let dims = Scan1Dims::new(1, 3, 2, 1); // B=1, L=3, D=2, N=1
//! let u = [1.0f32, 2.0, 3.0, 4.0, 5.0, 6.0];
//! let delta = [0.5f32; 6];
//! let a = [-1.0f32, -2.0];
//! let (b, c) = ([1.0f32; 3], [1.0f32; 3]);
//! let mut y = [0.0f32; 6];
//! mamba1::scan_fwd(&dims, &Scan1Args::new(&u, &delta, &a, &b, &c),
//!                  Scan1Out::new(&mut y));
//! // t = 0: h = Δ·u·B = 0.5 for channel 0, so y = C·h = 0.5
//! assert!((y[0] - 0.5).abs() < 1e-6);
//! ```

pub mod activation;
pub mod check;
pub mod cols;
pub mod conv;
pub mod gemm;
pub mod isa;
pub mod lti;
pub mod mamba1;
pub mod mamba2;
pub mod matvec;
pub mod norm;
pub mod par;
pub mod pool;
pub mod qweight;
pub mod real;
pub mod reference;
pub mod rng;
pub mod simd;
pub mod team;
#[doc(hidden)]
pub mod testing;
pub mod xent;

pub use real::Real;

/// This crate's version.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
