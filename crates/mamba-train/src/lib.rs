//! `mamba-train`: everything needed to train a Mamba language model.
//!
//! **Status: skeleton.** This crate will own AdamW, the learning-rate schedule, gradient
//! clipping, the fused cross-entropy loss, tokenizers (byte-level and `tokenizer.json`), data
//! loading, the training loop, checkpoints and metrics.
//!
//! It builds on [`mamba_nn`] for the models and their gradients.

pub use mamba_nn;
