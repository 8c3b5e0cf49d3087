//! `mamba-nn`: tensors, autograd, layers and the Mamba models.
//!
//! **Status: in progress.** Built so far: the tensor type ([`tensor`], on `ndarray`), named
//! parameters with preallocated gradients ([`params`]), the reverse-mode autograd tape of
//! coarse fused ops ([`tape`]), and the ops in [`ops`]. Still to come: the remaining layers, the
//! Mamba-1 / Mamba-2 blocks and language models, recurrent inference and safetensors checkpoint
//! I/O in the Hugging Face layout.
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
