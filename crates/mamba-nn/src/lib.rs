//! `mamba-nn`: tensors, autograd, layers and the Mamba models.
//!
//! - [`tensor`]: the tensor type (`ndarray`, row-major) and helpers;
//! - [`params`]: named parameters and their preallocated gradients;
//! - [`tape`]: the reverse-mode autograd tape of coarse fused ops (`docs/autograd.md`);
//! - [`ops`]: the differentiable ops, each with its hand-written backward and f64
//!   finite-difference test;
//! - [`model`]: Mamba-1 / Mamba-2 (and the LTI baseline) language models, one typed struct per
//!   layer with its tape forward and recurrent step side by side, the reference initialisation,
//!   Hugging Face `from_pretrained` / `save_pretrained`, and generation ([`model::Decoder`],
//!   [`model::Sampler`], [`model::MambaLM::generate`]); [`model::MambaModel`] for continuous
//!   inputs;
//! - [`config`] and [`checkpoint`]: `config.json` (either key family) and safetensors I/O with
//!   errors naming the file, tensor and shapes.
//!
//! The models are checked against transformers in `tests/against_transformers.rs`; a tutorial
//! (shapes, the LTI block, a training loop with cross-entropy and AdamW) is
//! `crates/mamba-train/examples/tutorial.rs`, and `examples/generate.rs` generates from a model
//! directory.
//!
//! It builds on [`ssm_kernel`], which provides every scan, convolution and GEMM kernel it calls.
//!
//! ```
//! use mamba_nn::{ops::linear, params::{Grads, ParamStore}, tape::Tape, tensor::from_vec};
//!
//! let mut store = ParamStore::new();
//! let w = store.add("proj.weight", from_vec(&[1, 2], vec![3.0, 4.0]), true);
//! let mut grads = Grads::new(&store);
//! let mut tape = Tape::new(&store);
//! let x = tape.constant(from_vec(&[1, 2], vec![1.0, 2.0]));
//! let wv = tape.param(w);
//! let y = linear(&mut tape, x, wv, None); // y = 1·3 + 2·4 = 11
//! assert_eq!(tape.value(y).as_slice().unwrap(), &[11.0]);
//! tape.backward(y, &mut grads);
//! assert_eq!(grads.get(w).as_slice().unwrap(), &[1.0, 2.0]); // dy/dW = x
//! ```

pub mod checkpoint;
pub mod config;
pub mod model;
pub mod ops;
pub mod params;
pub mod tape;
pub mod tensor;

pub use ssm_kernel;
