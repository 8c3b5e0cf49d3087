//! Mamba-1 and Mamba-2 language models over token ids, built from one typed struct per layer.
//!
//! | file | what it holds |
//! |---|---|
//! | [`builder`] | [`ParamBuilder`]: scoped parameter registration, random init or checkpoint |
//! | [`layers`] | [`Linear`], [`Conv1d`], [`RmsNorm`], [`Embedding`] |
//! | [`mixer`] | the [`Mixer`] trait (forward + recurrent step) and [`LayerCache`] |
//! | [`mamba1`], [`mamba2`], [`lti`] | the three mixer kinds |
//! | [`block`] | the residual [`Block`] and the [`Backbone`] |
//! | [`checkpoint`] | activation checkpointing: a block recomputed in the backward |
//! | [`cache`], [`decode`], [`generate`] | recurrent inference: [`Cache`], [`Decoder`], [`Sampler`], [`Generation`] |
//! | [`continuous`] | [`MambaModel`], the same blocks on continuous inputs |
//!
//! Residual pre-norm blocks, `h ← h + Mixer(RMSNorm(h))`, a final `norm_f`, and an `lm_head`
//! tied to the embedding unless the config unties it. Parameters carry their Hugging Face names
//! (`backbone.layers.{i}.mixer.in_proj.weight`, …), so checkpoints load and save by name.

pub mod batch;
pub mod block;
pub mod builder;
pub mod cache;
pub mod checkpoint;
pub mod continuous;
pub mod decode;
pub mod generate;
pub mod init;
pub mod layers;
pub mod lora;
pub mod lti;
pub mod mamba1;
pub mod mamba2;
pub mod mixer;

pub use batch::{BatchGeneration, BatchOutput, Request};
pub use block::{Backbone, Block};
pub use builder::{Init, ParamBuilder};
pub use cache::Cache;
pub use checkpoint::checkpointed;
pub use continuous::MambaModel;
pub use decode::{DEFAULT_PREFILL_CHUNK, Decoder};
pub use generate::{Generation, Sampler, SamplingConfig, SamplingError, argmax};
pub use layers::{Conv1d, Embedding, Linear, RmsNorm};
pub use lora::{AdaptedModule, AdapterError, Adapters, Lora, LoraConfig};
pub use lti::LtiMixer;
pub use mamba1::Mamba1Mixer;
pub use mamba2::Mamba2Mixer;
pub use mixer::{LayerCache, LayerInit, Mixer, SeqLayout};

use std::path::{Path, PathBuf};

use crate::checkpoint::{CheckpointError, TensorFile, save_params, write_atomic};
use crate::config::{ConfigError, MambaConfig};
use crate::ops;
use crate::params::ParamStore;
use crate::tape::{Tape, Var};
use init::InitRng;
pub use ssm_kernel::qweight::WeightFormat;

/// A model directory that cannot be loaded or saved.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// `config.json` is unusable.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// `model.safetensors` is unusable.
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
    /// The directory holds a LoRA adapter, not a model.
    #[error(
        "{dir} holds a LoRA adapter (adapter_config.json), not a model: apply it to its base model \
         with --model {base} --adapter {dir} (or merge them with `mamba merge`)"
    )]
    IsAdapter {
        /// The directory.
        dir: PathBuf,
        /// Its `base_model_name_or_path`, or a placeholder when it names none.
        base: String,
    },
    /// The directory has no weights file.
    #[error("{dir}: no model.safetensors (or model.safetensors.index.json with its shards) found")]
    NoWeights {
        /// The directory.
        dir: PathBuf,
    },
    /// The weight matrices are packed for inference ([`MambaLM::pack_weights`]), and the
    /// operation needs the f32 weights.
    #[error(
        "the model's weight matrices are packed for inference (a reduced-precision dtype); saving \
         and training need the f32 weights: load the model again without one"
    )]
    Packed,
    /// The model has LoRA adapters, or an adapter could not be built or read.
    #[error(transparent)]
    Adapter(#[from] AdapterError),
    /// Saving a model whose adapters are not merged.
    #[error(
        "the model has LoRA adapters: save them with save_adapter, or merge them into the weights \
         (merge_lora) to save a plain model"
    )]
    AdaptersAttached,
    /// Generation was asked to continue an empty prompt.
    #[error("the prompt is empty: generation needs at least one token to continue")]
    EmptyPrompt,
    /// `config.json` and the weights file disagree on the number of layers.
    #[error(
        "{config} says num_hidden_layers = {config_layers}, but {weights} holds {file_layers} \
         layer(s) (tensors `backbone.layers.{{i}}.*`)"
    )]
    LayerCount {
        /// The config file.
        config: PathBuf,
        /// The weights file.
        weights: PathBuf,
        /// Layers the config states.
        config_layers: usize,
        /// Layers in the weights file (one more than the largest layer index found).
        file_layers: usize,
    },
    /// A weight is NaN or infinite (refused unless [`LoadOptions::allow_non_finite`]).
    #[error(
        "{path}: tensor `{tensor}` has {count} non-finite value(s) (NaN or ±inf); {others} other \
         tensor(s) have some too"
    )]
    NonFinite {
        /// The weights file.
        path: PathBuf,
        /// The first tensor (in parameter order) holding a non-finite value.
        tensor: String,
        /// How many of its values are NaN or infinite.
        count: usize,
        /// How many other tensors hold non-finite values.
        others: usize,
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

/// How [`MambaLM::from_pretrained_with`] treats what it loads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LoadOptions {
    /// Accept weights that are NaN or infinite (for tools that inspect a damaged checkpoint).
    /// By default ([`MambaLM::from_pretrained`]) such weights are refused with
    /// [`ModelError::NonFinite`].
    pub allow_non_finite: bool,
    /// Memory-map the weights file ([`TensorFile::open`], the default) rather than read it
    /// into memory first ([`TensorFile::read`]): the model is then never held twice while it
    /// loads. Sharded checkpoints are always mapped.
    pub mmap: bool,
    /// The precision of the weight matrices (projections, embedding, LM head), packed tensor
    /// by tensor as they load ([`ParamStore::pack_matrices`]); `None` keeps the checkpoint's
    /// own: BF16 or F16 matrices stay 16-bit, anything else is f32. The SSM parameters, conv,
    /// norms and biases are always f32. A packed model runs through [`Decoder`] only (prefill,
    /// decode, scoring), not the tape.
    pub dtype: Option<WeightFormat>,
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self { allow_non_finite: false, mmap: true, dtype: Some(WeightFormat::F32) }
    }
}

/// A Mamba language model: its config, its parameters and the layers that index them.
#[derive(Clone, Debug)]
pub struct MambaLM {
    /// Hyper-parameters.
    pub config: MambaConfig,
    /// Every parameter, under its Hugging Face name.
    pub params: ParamStore,
    /// `backbone.embeddings`, (V, d_model).
    pub embeddings: Embedding,
    /// `backbone.layers.*` and `backbone.norm_f`.
    pub backbone: Backbone,
    /// `lm_head`, (V, d_model) without bias: the embedding matrix itself when tied.
    pub lm_head: Linear,
    /// LoRA adapters on the mixers' projections, if attached ([`MambaLM::add_lora`],
    /// [`MambaLM::load_adapter`]); the base parameters are then frozen.
    pub lora: Option<Adapters>,
}

/// Other names a checkpoint may give a tensor: the original state-spaces checkpoints call the
/// embedding `backbone.embedding.weight`.
fn aliases(name: &str) -> Vec<String> {
    match name {
        "backbone.embeddings.weight" => vec!["backbone.embedding.weight".into()],
        _ => vec![],
    }
}

impl MambaLM {
    /// Registers the whole model through `b` and returns its layers: the embedding, the blocks,
    /// `norm_f`, and `lm_head` unless tied — in this order, which is also the order of the
    /// random draws.
    fn layers(
        config: &MambaConfig,
        b: &mut ParamBuilder,
    ) -> Result<(Embedding, Backbone, Linear), CheckpointError> {
        let (v, d) = (config.vocab_size, config.d_model);
        let mut bb = b.pp("backbone");
        let embeddings = Embedding::new(&mut bb.pp("embeddings"), v, d)?;
        let backbone = Backbone::new(&mut bb, config)?;
        let weight = if config.tie_embeddings {
            embeddings.weight
        } else {
            b.matrix("lm_head.weight", &[v, d], Init::Normal(0.02))?
        };
        Ok((embeddings, backbone, Linear { weight, bias: None, d_in: d, d_out: v, lora: None }))
    }

    /// The (full name, shape) of every parameter of a model of `config`, in registration order,
    /// from the same layer constructors that build it — nothing is allocated. `config` must have
    /// passed its per-field limits ([`MambaConfig::validate`] checks them first).
    pub fn param_shapes(config: &MambaConfig) -> Vec<(String, Vec<usize>)> {
        let mut unused = ParamStore::new();
        let mut b = ParamBuilder::plan(&mut unused);
        Self::layers(config, &mut b).expect("planning reads no file");
        b.into_plan()
    }

    /// A freshly initialised model (the reference initialisation: each layer's constructor
    /// states its parameters' init), drawn from `seed`.
    pub fn new(config: MambaConfig, seed: u64) -> Result<Self, ConfigError> {
        config.validate()?;
        let mut params = ParamStore::new();
        let mut b = ParamBuilder::init(&mut params, InitRng::new(seed));
        let (embeddings, backbone, lm_head) =
            Self::layers(&config, &mut b).expect("random initialisation reads no file");
        Ok(Self { config, params, embeddings, backbone, lm_head, lora: None })
    }

    /// Loads a Hugging Face model directory (`config.json` + `model.safetensors`), Mamba or
    /// Mamba-2, with `lm_head.weight` absent, tied or separate. Tensors in the file that the model
    /// does not use are ignored; weights that are NaN or infinite are refused. Same as
    /// [`MambaLM::from_pretrained_with`] with the default [`LoadOptions`].
    pub fn from_pretrained(dir: impl AsRef<Path>) -> Result<Self, ModelError> {
        Self::from_pretrained_with(dir, LoadOptions::default())
    }

    /// [`MambaLM::from_pretrained`] with `options`.
    ///
    /// Nothing is allocated from the config's sizes before they are checked: the config is
    /// validated against its [limits](crate::config#limits), the weights file is indexed
    /// ([`TensorFile::from_bytes`]'s checks), the number of layers in the file must equal the
    /// config's, and each tensor's shape is checked against the config before it is decoded.
    ///
    /// # Errors
    /// [`ModelError::Config`], [`ModelError::NoWeights`], [`ModelError::Checkpoint`] (an invalid
    /// file, or a tensor missing or of another shape), [`ModelError::LayerCount`], and
    /// [`ModelError::NonFinite`] unless `options.allow_non_finite`.
    pub fn from_pretrained_with(dir: impl AsRef<Path>, options: LoadOptions) -> Result<Self, ModelError> {
        let dir = dir.as_ref();
        let config_path = dir.join("config.json");
        if !config_path.exists() && dir.join(lora::ADAPTER_CONFIG).exists() {
            return Err(ModelError::IsAdapter { dir: dir.into(), base: lora::recorded_base(dir) });
        }
        let mut config = MambaConfig::from_file(&config_path)?;
        let file = Self::open_weights(dir, &options)?;
        let weights = file.path().to_path_buf();
        let file_layers = file
            .names()
            .filter_map(|n| n.strip_prefix("backbone.layers.")?.split('.').next()?.parse::<usize>().ok())
            .max()
            .map_or(0, |i| i.saturating_add(1));
        if file_layers != config.n_layer {
            return Err(ModelError::LayerCount {
                config: config_path,
                weights,
                config_layers: config.n_layer,
                file_layers,
            });
        }
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
        let mut params = ParamStore::new();
        let dtype = options.dtype.unwrap_or_else(|| Self::stored_format(&file));
        params.pack_matrices_on_add(dtype);
        let mut b = ParamBuilder::load(&mut params, &file, aliases);
        let (embeddings, backbone, lm_head) = Self::layers(&config, &mut b)?;
        if !options.allow_non_finite {
            let mut bad = params.iter().filter_map(|(_, p)| {
                let count = p.value.iter().filter(|v| !v.is_finite()).count();
                (count > 0).then(|| (p.name.clone(), count))
            });
            if let Some((tensor, count)) = bad.next() {
                let others = bad.count();
                return Err(ModelError::NonFinite { path: weights, tensor, count, others });
            }
        }
        Ok(Self { config, params, embeddings, backbone, lm_head, lora: None })
    }

    /// The format the checkpoint stores its matrices in (its embedding's dtype): 16-bit stays
    /// 16-bit, anything else is f32.
    fn stored_format(file: &TensorFile) -> WeightFormat {
        let emb = ["backbone.embeddings.weight", "backbone.embedding.weight"]
            .into_iter()
            .find(|n| file.contains(n));
        match emb.and_then(|n| file.dtype(n)) {
            Some(safetensors::Dtype::BF16) => WeightFormat::Bf16,
            Some(safetensors::Dtype::F16) => WeightFormat::F16,
            _ => WeightFormat::F32,
        }
    }

    /// Packs the weight matrices into `format` for inference (see [`LoadOptions::dtype`]); a
    /// no-op for `F32`. Returns the number of matrices packed.
    ///
    /// # Panics
    /// If they are already packed into another format.
    pub fn pack_weights(&mut self, format: WeightFormat) -> usize {
        self.params.pack_matrices(format)
    }

    /// Bytes of weights one decode step reads: every parameter as stored, except that an
    /// embedding not tied to the LM head is read one row per token.
    pub fn weight_bytes_per_token(&self) -> usize {
        let emb = self.embeddings.weight;
        let tied = self.lm_head.weight == emb;
        let all: usize = self.params.iter().map(|(id, _)| self.params.stored_bytes(id)).sum();
        if tied {
            all
        } else {
            all - self.params.stored_bytes(emb)
                + self.params.stored_bytes(emb) / self.config.vocab_size.max(1)
        }
    }

    /// The weights of model directory `dir`: `model.safetensors`, or the shards listed in
    /// `model.safetensors.index.json`; mapped or read as `options.mmap` says.
    fn open_weights(dir: &Path, options: &LoadOptions) -> Result<TensorFile, ModelError> {
        let single = dir.join("model.safetensors");
        let index = dir.join("model.safetensors.index.json");
        Ok(if single.exists() {
            if options.mmap { TensorFile::open(&single)? } else { TensorFile::read(&single)? }
        } else if index.exists() {
            TensorFile::open_sharded(&index)?
        } else {
            return Err(ModelError::NoWeights { dir: dir.into() });
        })
    }

    /// Saves `config.json` and `model.safetensors` in the layout transformers'
    /// `MambaForCausalLM` / `Mamba2ForCausalLM.from_pretrained` loads. Both files are written
    /// atomically.
    pub fn save_pretrained(&self, dir: impl AsRef<Path>) -> Result<(), ModelError> {
        let dir = dir.as_ref();
        if self.params.is_packed() {
            return Err(ModelError::Packed);
        }
        if self.lora.is_some() {
            return Err(ModelError::AdaptersAttached);
        }
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
        self.forward_seq(tape, ids, batch, seqlen, &SeqLayout::default())
    }

    /// [`MambaLM::forward`] with the rows laid out by `seq`: with document starts (a packed
    /// batch), every layer restarts its recurrent state at each, so the logits of a document
    /// equal those of running it alone.
    ///
    /// # Panics
    /// As [`MambaLM::forward`], or if `seq.resets` is not (B, L), or resets are given to a model
    /// with the LTI baseline mixer.
    #[track_caller]
    pub fn forward_seq(
        &self,
        tape: &mut Tape,
        ids: &[usize],
        batch: usize,
        seqlen: usize,
        seq: &SeqLayout,
    ) -> Var {
        self.forward_from(tape, ids, (batch, seqlen), seq, None, None)
    }

    /// [`MambaLM::forward_seq`] continuing from the recurrent state `init` (one [`LayerInit`]
    /// per block: differentiable values on the tape, or constants from a [`Cache`] by
    /// [`Cache::to_tape`]) and, with `end`, writing the state after the last token into it (no
    /// gradient flows through that). Consecutive windows of a long sequence, each started from
    /// the previous one's `end`, give the logits of the whole sequence at once.
    ///
    /// # Panics
    /// As [`MambaLM::forward_seq`], or if `init` or `end` do not match the model and batch.
    #[track_caller]
    pub fn forward_from(
        &self,
        tape: &mut Tape,
        ids: &[usize],
        (batch, seqlen): (usize, usize),
        seq: &SeqLayout,
        init: Option<&[LayerInit]>,
        end: Option<&mut Cache>,
    ) -> Var {
        assert_eq!(
            ids.len(),
            batch * seqlen,
            "forward: {} ids for batch {batch} × seqlen {seqlen}",
            ids.len()
        );
        let h = self.embeddings.forward(tape, ids, &[batch, seqlen]);
        let hf = self.backbone.forward_from(tape, h, seq, init, end);
        self.lm_head.forward(tape, hf)
    }

    /// Logits and the mean next-token cross-entropy exactly as transformers computes it with
    /// `labels = ids`: logits[:, :-1] against ids[:, 1:].
    pub fn forward_loss(&self, tape: &mut Tape, ids: &[usize], batch: usize, seqlen: usize) -> (Var, Var) {
        self.forward_loss_seq(tape, ids, batch, seqlen, &SeqLayout::default())
    }

    /// [`MambaLM::forward_loss`] with the rows laid out by `seq` (see [`MambaLM::forward_seq`]).
    pub fn forward_loss_seq(
        &self,
        tape: &mut Tape,
        ids: &[usize],
        batch: usize,
        seqlen: usize,
        seq: &SeqLayout,
    ) -> (Var, Var) {
        let logits = self.forward_seq(tape, ids, batch, seqlen, seq);
        let loss = ops::causal_lm_loss(tape, logits, ids);
        (logits, loss)
    }
}
