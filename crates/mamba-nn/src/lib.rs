//! `mamba-nn`: tensors, autograd, layers and the Mamba models.
//!
//! **Status: skeleton.** This crate will own the tensor type (on `ndarray`, matmul through
//! `matrixmultiply`), the hand-written reverse-mode autograd tape of coarse fused ops, the
//! layers (linear, embedding, RMSNorm, gated RMSNorm, causal conv, selective scans), the
//! Mamba-1 / Mamba-2 blocks and language models, recurrent inference state, and safetensors
//! checkpoint I/O in the Hugging Face layout.
//!
//! It builds on [`ssm_kernel`], which provides every scan and convolution kernel it calls.

pub use ssm_kernel;
