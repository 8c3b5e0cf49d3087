//! `mamba-train`: everything needed to train a Mamba language model.
//!
//! This crate owns the training building blocks:
//! - [`optim`]: AdamW with decoupled weight decay and resumable state, global gradient-norm
//!   clipping, and the warmup + cosine learning-rate schedule.
//!
//! It builds on [`mamba_nn`] for the models, their parameters and gradients, and safetensors I/O.

pub mod optim;

pub use mamba_nn;
