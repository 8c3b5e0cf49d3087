//! [`MambaModel`]: the Mamba blocks on continuous sequences — an input projection, the
//! [`Backbone`] and an output head, `(B, L, input_dim) → (B, L, output_dim)`.

use super::block::Backbone;
use super::builder::ParamBuilder;
use super::init::InitRng;
use super::layers::Linear;
use super::mixer::SeqLayout;
use crate::config::{ConfigError, MambaConfig};
use crate::params::ParamStore;
use crate::tape::{Tape, Var};

/// A Mamba model for continuous sequences: `input_proj`, Mamba blocks and `output_head`.
///
/// ```
/// use mamba_nn::model::MambaModel;
/// use mamba_nn::tape::Tape;
/// use mamba_nn::tensor::zeros;
///
/// let model = MambaModel::new(10, 64, 5);
/// let mut tape = Tape::inference(&model.params);
/// let x = tape.constant(zeros(&[32, 50, 10]));
/// let y = model.forward(&mut tape, x);
/// assert_eq!(tape.value(y).shape(), &[32, 50, 5]);
/// ```
#[derive(Clone, Debug)]
pub struct MambaModel {
    /// Hyper-parameters of the blocks (`d_model` is the hidden width; `vocab_size` is unused).
    pub config: MambaConfig,
    /// Input features.
    pub input_dim: usize,
    /// Output features.
    pub output_dim: usize,
    /// `input_proj.*`, `backbone.*`, `output_head.*`.
    pub params: ParamStore,
    /// `input_proj`, (hidden, input_dim) with bias.
    pub input_proj: Linear,
    /// The blocks and `norm_f`.
    pub backbone: Backbone,
    /// `output_head`, (output_dim, hidden) with bias.
    pub output_head: Linear,
}

impl MambaModel {
    /// Two Mamba-1 blocks of width `hidden_dim` (d_state 16, expand 2), seed 0.
    ///
    /// # Panics
    /// If a size is zero.
    #[track_caller]
    pub fn new(input_dim: usize, hidden_dim: usize, output_dim: usize) -> Self {
        let config = MambaConfig::mamba1(output_dim.max(1), hidden_dim, 2);
        Self::with_config(config, input_dim, output_dim, 0).unwrap_or_else(|e| panic!("MambaModel::new: {e}"))
    }

    /// A model with blocks from `config` (any arch), initialised from `seed`.
    pub fn with_config(
        config: MambaConfig,
        input_dim: usize,
        output_dim: usize,
        seed: u64,
    ) -> Result<Self, ConfigError> {
        config.validate()?;
        let mut params = ParamStore::new();
        let mut b = ParamBuilder::init(&mut params, InitRng::new(seed));
        let d = config.d_model;
        let built = (|| {
            let input_proj = Linear::torch_default(&mut b.pp("input_proj"), (d, input_dim))?;
            let backbone = Backbone::new(&mut b.pp("backbone"), &config)?;
            let output_head = Linear::torch_default(&mut b.pp("output_head"), (output_dim, d))?;
            Ok::<_, crate::checkpoint::CheckpointError>((input_proj, backbone, output_head))
        })();
        let (input_proj, backbone, output_head) = built.expect("random initialisation reads no file");
        Ok(Self { config, input_dim, output_dim, params, input_proj, backbone, output_head })
    }

    /// `y` (B, L, output_dim) for `x` (B, L, input_dim).
    pub fn forward(&self, tape: &mut Tape, x: Var) -> Var {
        let h = self.input_proj.forward(tape, x);
        let hf = self.backbone.forward(tape, h, &SeqLayout::default(), None);
        self.output_head.forward(tape, hf)
    }
}
