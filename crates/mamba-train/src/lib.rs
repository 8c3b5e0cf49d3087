//! `mamba-train`: everything needed to train a Mamba language model.
//!
//! This crate owns the training building blocks:
//! - [`optim`]: AdamW with decoupled weight decay and resumable state, global gradient-norm
//!   clipping, and the warmup + cosine learning-rate schedule.
//! - [`tokenizer`]: the [`tokenizer::Tokenizer`] trait, a lossless byte-level tokenizer, and
//!   Hugging Face `tokenizer.json` files (pure Rust, nothing downloaded).
//! - [`data`]: text files tokenized into a deterministic train/validation split, seeded random
//!   training windows, deterministic validation batches, and the small resumable [`data::Rng`].
//! - [`tasks`]: the Mamba paper's synthetic tasks (selective copying, induction heads) generated
//!   on the fly, with token accuracy.
//! - [`sample`]: text around the library's generation loop (the end-of-training sample, and
//!   streaming tokens to text).
//! - [`trainer`]: the training loop with metrics, plots and exact resume; [`run_dir`]: the run
//!   directory's lock and its atomically published checkpoints.
//! - [`collective`]: the sums data-parallel ranks exchange (one rank by default; a group of
//!   threads for tests).
//!
//! It builds on [`mamba_nn`] for the models, their parameters and gradients, and safetensors I/O.

pub mod collective;
pub mod data;
pub mod optim;
pub mod plot;
pub mod run_dir;
pub mod sample;
pub mod tasks;
pub mod tokenizer;
pub mod trainer;
