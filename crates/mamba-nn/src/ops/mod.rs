//! Differentiable ops. Each file holds one op: its forward (a function taking the [`Tape`]
//! and input [`Var`]s), its [`Backward`] struct (holding only what the backward needs, with its
//! inputs' positions by name), and its tests — including an f64 central-difference check of the
//! backward against an f64 reference forward written in the test. The numerics are
//! `ssm_kernel`'s: an op checks shapes, calls the kernels on its tensors' slices and records
//! the node.
//!
//! [`Tape`]: crate::tape::Tape
//! [`Var`]: crate::tape::Var
//! [`Backward`]: crate::tape::Backward

pub mod activation;
#[cfg(test)]
pub(crate) mod check;
pub mod conv;
pub mod cross_entropy;
pub mod elementwise;
pub mod embedding;
pub mod linear;
pub mod lora;
pub mod lti;
pub mod mamba2_core;
pub mod rmsnorm;
pub mod scan;
pub mod shape;

/// Document starts of a packed batch, (B, L) row-major: `true` where a new document begins, so
/// every recurrent state (conv inputs and SSM state) restarts from zero there — no information
/// and no gradient crosses it. Shared (cheaply cloned) by all layers of one forward.
pub type Resets = std::sync::Arc<[bool]>;

/// Panics unless `resets` has `batch · seqlen` entries, naming the op.
#[track_caller]
pub(crate) fn check_resets(op: &str, resets: Option<&Resets>, batch: usize, seqlen: usize) {
    if let Some(r) = resets {
        assert_eq!(
            r.len(),
            batch * seqlen,
            "{op}: resets must be (B, L) = ({batch}, {seqlen}), got {} entries",
            r.len()
        );
    }
}

pub use activation::{exp, silu, softplus};
pub use conv::conv1d;
pub use cross_entropy::{IGNORE_INDEX, causal_lm_loss, cross_entropy};
pub use elementwise::{add, add_broadcast_last, mul, scale};
pub use embedding::embedding;
pub use linear::{linear, linear_rows};
pub use lora::linear_lora;
pub use lti::lti_scan;
pub use mamba2_core::{Mamba2Params, Mamba2Spec, Mamba2State, mamba2_core, mamba2_core_with_state};
pub use rmsnorm::{gated_rms_norm, rms_norm};
pub use scan::{
    Scan1Vars, Scan2Vars, selective_scan1, selective_scan1_with_state, selective_scan2,
    selective_scan2_with_state,
};
pub use shape::{concat_last, narrow_last, reshape};
