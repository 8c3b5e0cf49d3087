//! Mamba-1 and Mamba-2 language models over token ids.
//!
//! Residual pre-norm blocks, `h ← h + Mixer(RMSNorm(h))`, a final `norm_f`, and an `lm_head`
//! tied to the embedding unless the config unties it. Parameters carry their Hugging Face names
//! (`backbone.layers.{i}.mixer.in_proj.weight`, …), so checkpoints load and save by name.

pub mod init;
mod mixer;
pub mod recurrent;

pub use recurrent::{State, argmax};

use std::path::{Path, PathBuf};

use crate::checkpoint::{CheckpointError, TensorFile, load_params, save_params, write_atomic};
use crate::config::{ConfigError, MambaConfig};
use crate::ops;
use crate::params::ParamStore;
use crate::tape::{Tape, Var};

/// A model directory that cannot be loaded or saved.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// `config.json` is unusable.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// `model.safetensors` is unusable.
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
    /// The directory has no weights file.
    #[error("{dir}: no model.safetensors found")]
    NoWeights {
        /// The directory.
        dir: PathBuf,
    },
    /// A token id is outside the vocabulary.
    #[error("token id {id} at position {pos} is outside the vocabulary (size {vocab})")]
    TokenOutOfRange {
        /// The id.
        id: usize,
        /// Its flat position in the batch.
        pos: usize,
        /// The vocabulary size.
        vocab: usize,
    },
}

/// The residual blocks and `norm_f` on `h` (B, L, d_model).
fn backbone(tape: &mut Tape, cfg: &MambaConfig, h: Var) -> Var {
    backbone_with_states(tape, cfg, h, None)
}

/// [`backbone`], recording each block's final recurrent state into `states` when given.
fn backbone_with_states(
    tape: &mut Tape,
    cfg: &MambaConfig,
    mut h: Var,
    mut states: Option<&mut Vec<Option<mixer::LayerState>>>,
) -> Var {
    for i in 0..cfg.n_layer {
        let p = format!("backbone.layers.{i}");
        let w = tape.param_named(&format!("{p}.norm.weight"));
        let r = ops::rms_norm(tape, h, w, cfg.norm_eps);
        let slot = states.as_deref_mut().map(|s| &mut s[i]);
        let out = mixer::forward(tape, cfg, &format!("{p}.mixer"), r, slot);
        h = ops::add(tape, h, out);
    }
    let w = tape.param_named("backbone.norm_f.weight");
    ops::rms_norm(tape, h, w, cfg.norm_eps)
}

/// A Mamba model for continuous sequences (the seed's model): an input projection, Mamba blocks
/// and an output head, `(B, L, input_dim) → (B, L, output_dim)`.
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
        let mut rng = init::InitRng::new(seed);
        let mut params = ParamStore::new();
        init::init_linear(&mut rng, &mut params, "input_proj", config.d_model, input_dim);
        init::init_backbone(&config, &mut rng, &mut params);
        init::init_linear(&mut rng, &mut params, "output_head", output_dim, config.d_model);
        Ok(Self { config, input_dim, output_dim, params })
    }

    /// `y` (B, L, output_dim) for `x` (B, L, input_dim).
    pub fn forward(&self, tape: &mut Tape, x: Var) -> Var {
        let (w, b) = (tape.param_named("input_proj.weight"), tape.param_named("input_proj.bias"));
        let h = ops::linear(tape, x, w, Some(b));
        let hf = backbone(tape, &self.config, h);
        let (w, b) = (tape.param_named("output_head.weight"), tape.param_named("output_head.bias"));
        ops::linear(tape, hf, w, Some(b))
    }
}

/// A Mamba language model: its config and its parameters.
#[derive(Clone, Debug)]
pub struct MambaLM {
    /// Hyper-parameters.
    pub config: MambaConfig,
    /// Every parameter, under its Hugging Face name.
    pub params: ParamStore,
}

impl MambaLM {
    /// A freshly initialised model (the reference initialisation; see [`init::init_params`]).
    pub fn new(config: MambaConfig, seed: u64) -> Result<Self, ConfigError> {
        config.validate()?;
        let params = init::init_params(&config, seed);
        Ok(Self { config, params })
    }

    /// Loads a Hugging Face model directory (`config.json` + `model.safetensors`), Mamba or
    /// Mamba-2, with `lm_head.weight` absent, tied or separate. Tensors in the file that the model
    /// does not use are ignored.
    pub fn from_pretrained(dir: impl AsRef<Path>) -> Result<Self, ModelError> {
        let dir = dir.as_ref();
        let mut config = MambaConfig::from_file(dir.join("config.json"))?;
        let weights = dir.join("model.safetensors");
        if !weights.exists() {
            return Err(ModelError::NoWeights { dir: dir.into() });
        }
        let file = TensorFile::open(&weights)?;
        // A tied config with a separate lm_head in the file, or an untied one without: trust
        // the file.
        if config.tie_embeddings && file.contains("lm_head.weight") {
            let emb = ["backbone.embeddings.weight", "backbone.embedding.weight"]
                .iter()
                .find_map(|n| file.contains(n).then(|| file.f32(n)))
                .transpose()?;
            if emb.is_some_and(|e| Some(e) != file.f32("lm_head.weight").ok()) {
                config.tie_embeddings = false;
            }
        }
        let mut params = init::init_params(&config, 0);
        load_params(&mut params, &file, |name| match name {
            "backbone.embeddings.weight" => vec!["backbone.embedding.weight".into()],
            _ => vec![],
        })?;
        Ok(Self { config, params })
    }

    /// Saves `config.json` and `model.safetensors` in the layout transformers'
    /// `MambaForCausalLM` / `Mamba2ForCausalLM.from_pretrained` loads. Both files are written
    /// atomically.
    pub fn save_pretrained(&self, dir: impl AsRef<Path>) -> Result<(), ModelError> {
        let dir = dir.as_ref();
        std::fs::create_dir_all(dir).map_err(|source| CheckpointError::Io { path: dir.into(), source })?;
        let cfg = serde_json::to_vec_pretty(&self.config.to_hf_json()).expect("a JSON value serialises");
        write_atomic(&dir.join("config.json"), &cfg)?;
        save_params(&self.params, dir.join("model.safetensors"), |_| true)?;
        Ok(())
    }

    /// Checks every id against the vocabulary.
    pub fn check_ids(&self, ids: &[usize]) -> Result<(), ModelError> {
        let vocab = self.config.vocab_size;
        match ids.iter().position(|&id| id >= vocab) {
            Some(pos) => Err(ModelError::TokenOutOfRange { id: ids[pos], pos, vocab }),
            None => Ok(()),
        }
    }

    /// Logits (B, L, V) for token ids (B, L) (row-major, `ids.len() == batch · seqlen`).
    ///
    /// # Panics
    /// If `ids.len() != batch · seqlen` or an id is outside the vocabulary (check with
    /// [`MambaLM::check_ids`] first).
    #[track_caller]
    pub fn forward(&self, tape: &mut Tape, ids: &[usize], batch: usize, seqlen: usize) -> Var {
        assert_eq!(
            ids.len(),
            batch * seqlen,
            "forward: {} ids for batch {batch} × seqlen {seqlen}",
            ids.len()
        );
        let cfg = &self.config;
        let emb = tape.param_named("backbone.embeddings.weight");
        let h = ops::embedding(tape, ids, &[batch, seqlen], emb);
        let hf = backbone(tape, cfg, h);
        let head = if cfg.tie_embeddings { emb } else { tape.param_named("lm_head.weight") };
        ops::linear(tape, hf, head, None)
    }

    /// Runs a prompt batch (B, L) through the full (parallel) forward with no tape recording and
    /// returns the logits (B, L, V) and the recurrent state after the last token, ready for
    /// [`MambaLM::step`]. The LTI baseline has no state-returning kernel and is fed token by
    /// token instead.
    ///
    /// # Panics
    /// If `ids.len() != batch · seqlen` or an id is outside the vocabulary.
    #[track_caller]
    pub fn prefill(&self, ids: &[usize], batch: usize, seqlen: usize) -> (crate::tensor::Tensor, State) {
        assert_eq!(
            ids.len(),
            batch * seqlen,
            "prefill: {} ids for batch {batch} × seqlen {seqlen}",
            ids.len()
        );
        let cfg = &self.config;
        let v = cfg.vocab_size;
        let mut state = self.new_state(batch);
        if cfg.arch == crate::config::Arch::Lti {
            let mut logits = crate::tensor::zeros(&[batch, seqlen, v]);
            let mut row = vec![0.0f32; batch * v];
            let out = crate::tensor::data_mut(&mut logits);
            for t in 0..seqlen {
                let col: Vec<usize> = (0..batch).map(|b| ids[b * seqlen + t]).collect();
                self.step(&col, &mut state, &mut row);
                for b in 0..batch {
                    out[(b * seqlen + t) * v..(b * seqlen + t + 1) * v]
                        .copy_from_slice(&row[b * v..(b + 1) * v]);
                }
            }
            return (logits, state);
        }
        let mut tape = Tape::inference(&self.params);
        let emb = tape.param_named("backbone.embeddings.weight");
        let h = ops::embedding(&mut tape, ids, &[batch, seqlen], emb);
        let mut layer_states = vec![None; cfg.n_layer];
        let hf = backbone_with_states(&mut tape, cfg, h, Some(&mut layer_states));
        let head = if cfg.tie_embeddings { emb } else { tape.param_named("lm_head.weight") };
        let logits = ops::linear(&mut tape, hf, head, None);
        for (l, ls) in layer_states.into_iter().enumerate() {
            let ls = ls.expect("every Mamba block records its state");
            state.conv[l].copy_from_slice(&ls.conv);
            state.ssm[l].copy_from_slice(&ls.ssm);
        }
        let logits = tape.value(logits).clone();
        (logits, state)
    }

    /// Logits and the mean next-token cross-entropy exactly as transformers computes it with
    /// `labels = ids`: logits[:, :-1] against ids[:, 1:].
    pub fn forward_loss(&self, tape: &mut Tape, ids: &[usize], batch: usize, seqlen: usize) -> (Var, Var) {
        let logits = self.forward(tape, ids, batch, seqlen);
        let loss = ops::causal_lm_loss(tape, logits, ids);
        (logits, loss)
    }
}
