//! LoRA adapters (Hu et al., 2021) on the mixers' projections, stored in PEFT's format.
//!
//! An adapter on a [`Linear`](super::Linear) with weight `W` (out, in) adds `scale · (x Aᵀ) Bᵀ` to its output,
//! with `A` (r, in), `B` (out, r) and `scale = α / r` (or `α / √r`, rsLoRA), so the layer
//! computes `x (W + scale · B A)ᵀ`. [`MambaLM::add_lora`] freezes every base parameter and adds
//! `A` drawn as PyTorch's default `Linear` init (U(±1/√in), PEFT's `init_lora_weights=True`)
//! and `B = 0`, so a fresh adapter leaves the model's output unchanged. Training then updates
//! only the adapters: the frozen weights get no gradient buffer and no optimizer state.
//!
//! On disk an adapter is a PEFT directory: `adapter_config.json` (`peft_type: "LORA"`, `r`,
//! `lora_alpha`, `target_modules`, `base_model_name_or_path`, …) and `adapter_model.safetensors`
//! with the keys `base_model.model.<module>.lora_A.weight` / `lora_B.weight`, e.g.
//! `base_model.model.backbone.layers.0.mixer.in_proj.lora_A.weight` — what
//! `PeftModel.from_pretrained` loads onto the transformers model. [`MambaLM::merge_lora`] folds
//! the adapters into the weights (`W ← W + scale · B A`) for serving or `mamba merge`.
//!
//! The modules an adapter can target are the mixers' projections ([`Mixer::linears`]): for
//! Mamba-1 `in_proj`, `x_proj`, `dt_proj` (its product, before Δ's bias and softplus) and
//! `out_proj`; for Mamba-2 `in_proj` and `out_proj` — and the token embedding (`embeddings`,
//! PEFT's `lora_embedding_A` (r, vocab) / `lora_embedding_B` (d, r): a token's vector gains
//! `scale · B A[:, id]`). As in PEFT, an embedding adapter changes the lookup only, not a tied
//! LM head; merging it therefore unties the head (which keeps the base matrix). Here every projection runs through
//! [`Linear`](super::Linear), so all are allowed. PEFT refuses `out_proj` on Mamba models (its
//! CUDA fast path bypasses the module), and transformers' Mamba-1 multiplies by
//! `dt_proj.weight` directly, so PEFT silently ignores an unmerged `dt_proj` adapter (checked
//! with transformers 5.24 / PEFT 0.21 by `scripts/check_peft_adapter.py`): adapters meant for
//! PEFT target `in_proj` and `x_proj` (Mamba-1) or `in_proj` (Mamba-2).
//!
//! [`Mixer::linears`]: super::mixer::Mixer::linears

use std::path::{Path, PathBuf};

use serde_json::{Value, json};
use ssm_kernel::gemm::gemm_par as gemm;

use super::builder::Init;
use super::init::InitRng;
use super::{LoadOptions, MambaLM, ModelError, WeightFormat};
use crate::checkpoint::{CheckpointError, TensorFile, write_atomic, write_tensors};
use crate::config::Arch;
use crate::params::ParamId;
use crate::tensor::{Tensor, data, data_mut};

/// The adapter of one [`Linear`]: `scale · (x Aᵀ) Bᵀ`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Lora {
    /// `lora_A.weight`, (rank, in).
    pub a: ParamId,
    /// `lora_B.weight`, (out, rank).
    pub b: ParamId,
    /// The rank `r`.
    pub rank: usize,
    /// `α / r` (or `α / √r`).
    pub scale: f32,
}

impl Lora {
    /// `out` (m, out) += `scale · (x Aᵀ) Bᵀ` for `x` (m, `d_in`) rows. The (m, r) intermediate
    /// lives on the stack when it fits [`LORA_STACK_FLOATS`] (every decode step: m ≤ 8 rows at
    /// r ≤ 128); a larger one (a prefill chunk) is allocated once per call.
    pub fn add_rows(&self, p: &crate::params::ParamStore, x: &[f32], m: usize, d_in: usize, out: &mut [f32]) {
        let (r, a, b) = (self.rank, data(p.value(self.a)), data(p.value(self.b)));
        let n = b.len() / r.max(1);
        let mut stack = [0.0f32; LORA_STACK_FLOATS];
        let mut heap = Vec::new();
        let t = if m * r <= LORA_STACK_FLOATS {
            &mut stack[..m * r]
        } else {
            heap.resize(m * r, 0.0);
            &mut heap[..]
        };
        gemm((m, d_in, r), self.scale, x, (d_in, 1), a, (1, d_in), 0.0, t, (r, 1));
        gemm((m, r, n), 1.0, t, (r, 1), b, (1, r), 1.0, out, (n, 1));
    }
}

/// Floats of an adapter's (m, r) intermediate kept on the stack in [`Lora::add_rows`] (4 KiB).
pub const LORA_STACK_FLOATS: usize = 1024;

/// How [`MambaLM::add_lora`] builds adapters.
#[derive(Clone, Debug, PartialEq)]
pub struct LoraConfig {
    /// Rank `r` (≥ 1).
    pub rank: usize,
    /// `α`: the adapter's output is scaled by `α / r`.
    pub alpha: f32,
    /// Module names to adapt in every layer (`in_proj`, `x_proj`, `dt_proj`, `out_proj`).
    pub targets: Vec<String>,
    /// rsLoRA's scale `α / √r` instead of `α / r`.
    pub rslora: bool,
}

impl LoraConfig {
    /// `α / r`, or `α / √r` with rsLoRA.
    pub fn scale(&self) -> f32 {
        let r = self.rank as f32;
        if self.rslora { self.alpha / r.sqrt() } else { self.alpha / r }
    }
}

/// An adapter that cannot be built, read or used, naming the file and field.
#[derive(Debug, thiserror::Error)]
pub enum AdapterError {
    /// A target that is not one of the adaptable modules.
    #[error("LoRA target `{target}` is not an adaptable module of a {arch} model; choose from {valid}")]
    UnknownTarget {
        /// The name given.
        target: String,
        /// The model family.
        arch: &'static str,
        /// The names that exist.
        valid: String,
    },
    /// An impossible setting.
    #[error("LoRA {field} = {value}: {reason}")]
    Invalid {
        /// The setting.
        field: &'static str,
        /// Its value.
        value: String,
        /// What is expected.
        reason: String,
    },
    /// The model already has adapters.
    #[error("the model already has LoRA adapters; merge them (merge_lora) before adding others")]
    AlreadyAttached,
    /// The operation needs adapters and the model has none.
    #[error("the model has no LoRA adapters")]
    NoAdapter,
    /// `adapter_config.json` is unreadable or asks for something this crate does not do.
    #[error("{path}: {reason}")]
    Config {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// A tensor of `adapter_model.safetensors` that names no adaptable module or has the
    /// wrong shape.
    #[error("{path}: tensor `{tensor}`: {reason}")]
    Tensor {
        /// The file.
        path: PathBuf,
        /// The tensor.
        tensor: String,
        /// What is wrong.
        reason: String,
    },
}

/// The adapters attached to a model.
#[derive(Clone, Debug, PartialEq)]
pub struct Adapters {
    /// Their settings.
    pub config: LoraConfig,
    /// Parameters of the store before the adapters were added (the base model's); the
    /// adapters' own follow.
    pub base_params: usize,
    /// Every adapted module, in the order of the model.
    pub modules: Vec<AdaptedModule>,
}

/// One adapted module.
#[derive(Clone, Debug, PartialEq)]
pub struct AdaptedModule {
    /// Its full name (`backbone.layers.0.mixer.in_proj`, `backbone.embeddings`).
    pub name: String,
    /// Its adapter. For the embedding, `a` is held transposed, (vocab, r), so that a token's
    /// row is contiguous; PEFT's `lora_embedding_A` is (r, vocab).
    pub lora: Lora,
    /// The weight it adapts.
    pub weight: ParamId,
    /// Whether it is the token embedding (`y = W[id] + scale · B Aᵀ[id]`) rather than a
    /// projection.
    pub embedding: bool,
}

/// The name of the token embedding as an adapter target.
pub const EMBEDDINGS: &str = "embeddings";
/// The token embedding's module name.
const EMBEDDING_MODULE: &str = "backbone.embeddings";

/// Names of the adapter files in a PEFT directory.
pub const ADAPTER_CONFIG: &str = "adapter_config.json";
/// See [`ADAPTER_CONFIG`].
pub const ADAPTER_WEIGHTS: &str = "adapter_model.safetensors";
/// PEFT's prefix of every adapter tensor (a `PeftModelForCausalLM` wrapping a `LoraModel`).
const PEFT_PREFIX: &str = "base_model.model.";

fn arch_name(arch: Arch) -> &'static str {
    match arch {
        Arch::Mamba1 => "Mamba-1",
        Arch::Mamba2 => "Mamba-2",
        Arch::Lti => "LTI",
    }
}

impl MambaLM {
    /// The modules an adapter can target in this model: its layers' projections and
    /// `embeddings` (see the [module docs](self)).
    pub fn lora_targets(&self) -> Vec<&'static str> {
        let layer = self.backbone.layers.first();
        let mut t: Vec<&'static str> =
            layer.map_or_else(Vec::new, |b| b.mixer.linears().into_iter().map(|(n, _)| n).collect());
        t.push(EMBEDDINGS);
        t
    }

    /// Freezes every parameter and attaches fresh adapters to the `config.targets` projections
    /// of every layer (`A` ~ U(±1/√in), `B = 0`) and to the token embedding when `embeddings`
    /// is a target (`A = 0`, `B` ~ N(0, 1), as PEFT draws them); the model's outputs are
    /// unchanged until the adapters are trained. Returns the number of adapted modules.
    ///
    /// # Errors
    /// A target that is not an adaptable module of this model, a zero rank or a non-finite
    /// α, or adapters already attached.
    pub fn add_lora(&mut self, config: &LoraConfig, seed: u64) -> Result<usize, AdapterError> {
        self.check_lora_config(config)?;
        let mut rng = InitRng::new(seed);
        let r = config.rank;
        self.attach(config, |module, (n, k)| {
            Ok(Some(if module == EMBEDDING_MODULE {
                (Init::Const(0.0).draw(&mut rng, &[r, k]), Init::Normal(1.0).draw(&mut rng, &[n, r]))
            } else {
                (Init::kaiming(k, 1.0).draw(&mut rng, &[r, k]), Init::Const(0.0).draw(&mut rng, &[n, r]))
            }))
        })
    }

    fn check_lora_config(&self, config: &LoraConfig) -> Result<(), AdapterError> {
        if self.lora.is_some() {
            return Err(AdapterError::AlreadyAttached);
        }
        if config.rank == 0 {
            return Err(AdapterError::Invalid {
                field: "rank",
                value: "0".into(),
                reason: "the rank must be at least 1".into(),
            });
        }
        if !config.alpha.is_finite() {
            return Err(AdapterError::Invalid {
                field: "alpha",
                value: config.alpha.to_string(),
                reason: "α must be a finite number".into(),
            });
        }
        let valid = self.lora_targets();
        if config.targets.is_empty() {
            return Err(AdapterError::Invalid {
                field: "targets",
                value: "(none)".into(),
                reason: format!("name at least one of {}", valid.join(", ")),
            });
        }
        for t in &config.targets {
            if !valid.contains(&t.as_str()) {
                return Err(AdapterError::UnknownTarget {
                    target: t.clone(),
                    arch: arch_name(self.config.arch),
                    valid: valid.join(", "),
                });
            }
        }
        Ok(())
    }

    /// Freezes the base and attaches an adapter to every targeted module for which `values`
    /// gives `(A, B)` (`values(module, (out, in))`; `None` skips the module).
    fn attach(
        &mut self,
        config: &LoraConfig,
        mut values: impl FnMut(&str, (usize, usize)) -> Result<Option<(Tensor, Tensor)>, AdapterError>,
    ) -> Result<usize, AdapterError> {
        let base_params = self.params.len();
        let frozen: Vec<ParamId> = self.params.iter().map(|(id, _)| id).collect();
        for id in frozen {
            self.params.set_trainable(id, false);
        }
        let mut modules = Vec::new();
        let mut failed = None;
        let store = &mut self.params;
        let scale_of = |rank: usize| {
            if config.rslora { config.alpha / (rank as f32).sqrt() } else { config.alpha / rank as f32 }
        };
        for (i, block) in self.backbone.layers.iter_mut().enumerate() {
            block.mixer = block.mixer.with_linears(&mut |name, lin| {
                if failed.is_some() || !config.targets.iter().any(|t| t == name) {
                    return;
                }
                let module = format!("backbone.layers.{i}.mixer.{name}");
                match values(&module, (lin.d_out, lin.d_in)) {
                    Ok(Some((a, b))) => {
                        let rank = a.shape()[0];
                        let a = store.add(format!("{module}.lora_A.weight"), a, true);
                        let b = store.add(format!("{module}.lora_B.weight"), b, true);
                        let lora = Lora { a, b, rank, scale: scale_of(rank) };
                        lin.lora = Some(lora);
                        modules.push(AdaptedModule {
                            name: module,
                            lora,
                            weight: lin.weight,
                            embedding: false,
                        });
                    }
                    Ok(None) => {}
                    Err(e) => failed = Some(e),
                }
            });
        }
        let emb = self.embeddings;
        if failed.is_none() && config.targets.iter().any(|t| t == EMBEDDINGS) {
            match values(EMBEDDING_MODULE, (emb.dim, emb.vocab)) {
                Ok(Some((a, b))) => {
                    let rank = a.shape()[0];
                    let a = store.add(format!("{EMBEDDING_MODULE}.lora_embedding_A"), transpose(&a), true);
                    let b = store.add(format!("{EMBEDDING_MODULE}.lora_embedding_B"), b, true);
                    let lora = Lora { a, b, rank, scale: scale_of(rank) };
                    self.embeddings.lora = Some(lora);
                    let name = EMBEDDING_MODULE.to_string();
                    modules.push(AdaptedModule { name, lora, weight: emb.weight, embedding: true });
                }
                Ok(None) => {}
                Err(e) => failed = Some(e),
            }
        }
        if let Some(e) = failed {
            self.remove_adapters(base_params);
            return Err(e);
        }
        let count = modules.len();
        self.lora = Some(Adapters { config: config.clone(), base_params, modules });
        Ok(count)
    }

    /// Detaches every adapter, drops the adapter parameters (the last ones of the store) and
    /// unfreezes the base.
    fn remove_adapters(&mut self, base_params: usize) {
        for block in &mut self.backbone.layers {
            block.mixer = block.mixer.with_linears(&mut |_, lin| lin.lora = None);
        }
        self.embeddings.lora = None;
        self.params.truncate(base_params);
        let ids: Vec<ParamId> = self.params.iter().map(|(id, _)| id).collect();
        for id in ids {
            self.params.set_trainable(id, true);
        }
        self.lora = None;
    }

    /// Folds every adapter into its weight, `W ← W + scale · B A` (in f32), and removes the
    /// adapters: the model then computes what it computed with them, at the base model's cost,
    /// and saves as a plain model ([`MambaLM::save_pretrained`]).
    ///
    /// # Errors
    /// [`ModelError::Packed`] when the weights are packed (merge before packing).
    pub fn merge_lora(&mut self) -> Result<(), ModelError> {
        let Some(ad) = self.lora.clone() else { return Err(AdapterError::NoAdapter.into()) };
        if self.params.is_packed() {
            return Err(ModelError::Packed);
        }
        // A tied LM head reads the embedding matrix, which an embedding adapter does not
        // change (PEFT adapts the lookup only): merged, the head keeps the base matrix.
        let tied = self.lm_head.weight == self.embeddings.weight;
        let head = ad
            .modules
            .iter()
            .any(|m| m.embedding && tied)
            .then(|| self.params.value(self.lm_head.weight).clone());
        for m in &ad.modules {
            let (l, r) = (m.lora, m.lora.rank);
            let (a, b) = (self.params.value(l.a).clone(), self.params.value(l.b).clone());
            let w = data_mut(self.params.value_mut(m.weight));
            if m.embedding {
                // W (V, d) += scale · Aᵀ (V, r) · Bᵀ (r, d)
                let (v, d) = (a.shape()[0], b.shape()[0]);
                gemm((v, r, d), l.scale, data(&a), (r, 1), data(&b), (1, r), 1.0, w, (d, 1));
            } else {
                // W (n, k) += scale · B (n, r) · A (r, k)
                let (n, k) = (b.shape()[0], a.shape()[1]);
                gemm((n, r, k), l.scale, data(&b), (r, 1), data(&a), (k, 1), 1.0, w, (k, 1));
            }
        }
        self.remove_adapters(ad.base_params);
        if let Some(head) = head {
            let id = self.params.add("lm_head.weight", head, true);
            self.params.mark_matrix(id);
            self.lm_head.weight = id;
            self.config.tie_embeddings = false;
        }
        Ok(())
    }

    /// Writes the adapters as a PEFT adapter directory (`adapter_config.json`,
    /// `adapter_model.safetensors`); `base` is recorded as `base_model_name_or_path`.
    ///
    /// # Errors
    /// No adapters attached; a file cannot be written.
    pub fn save_adapter(&self, dir: impl AsRef<Path>, base: &str) -> Result<(), ModelError> {
        let dir = dir.as_ref();
        let ad = self.lora.as_ref().ok_or(AdapterError::NoAdapter)?;
        std::fs::create_dir_all(dir).map_err(|source| CheckpointError::Io { path: dir.into(), source })?;
        let c = &ad.config;
        let config = json!({
            "peft_type": "LORA",
            "task_type": "CAUSAL_LM",
            "base_model_name_or_path": base,
            "r": c.rank,
            "lora_alpha": c.alpha,
            "target_modules": c.targets,
            "lora_dropout": 0.0,
            "bias": "none",
            "fan_in_fan_out": false,
            "use_rslora": c.rslora,
            "use_dora": false,
            "init_lora_weights": true,
            "inference_mode": true,
            "modules_to_save": Value::Null,
            "rank_pattern": {},
            "alpha_pattern": {},
        });
        let text = serde_json::to_vec_pretty(&config).expect("a JSON value serialises");
        write_atomic(&dir.join(ADAPTER_CONFIG), &text)?;
        let owned: Vec<(String, Tensor)> = ad
            .modules
            .iter()
            .flat_map(|m| {
                let (a, b) = (self.params.value(m.lora.a), self.params.value(m.lora.b).clone());
                let (n, [ka, kb]) = (&m.name, peft_keys(m.embedding));
                let a = if m.embedding { transpose(a) } else { a.clone() };
                [(format!("{PEFT_PREFIX}{n}{ka}"), a), (format!("{PEFT_PREFIX}{n}{kb}"), b)]
            })
            .collect();
        let tensors = owned.iter().map(|(n, t)| (n.clone(), t));
        let meta = [("format".to_string(), "pt".to_string())].into_iter().collect();
        write_tensors(dir.join(ADAPTER_WEIGHTS), tensors, Some(meta))?;
        Ok(())
    }

    /// [`MambaLM::from_pretrained_with`] plus the PEFT adapter in `adapter` merged into the
    /// weights ([`MambaLM::merge_lora`]) before they are packed into `options.dtype` (default:
    /// the checkpoint's own format): serving an adapter costs nothing over the base model.
    /// While merging, the weights are held in f32 (a 16-bit checkpoint briefly takes twice its
    /// size).
    ///
    /// # Errors
    /// As [`MambaLM::from_pretrained_with`] and [`MambaLM::load_adapter`].
    pub fn from_pretrained_with_adapter(
        dir: impl AsRef<Path>,
        adapter: impl AsRef<Path>,
        options: LoadOptions,
    ) -> Result<Self, ModelError> {
        let dir = dir.as_ref();
        let dtype = match options.dtype {
            Some(d) => d,
            None => Self::stored_format(&Self::open_weights(dir, &options)?),
        };
        let mut m =
            Self::from_pretrained_with(dir, LoadOptions { dtype: Some(WeightFormat::F32), ..options })?;
        m.load_adapter(adapter)?;
        m.merge_lora()?;
        m.pack_weights(dtype);
        Ok(m)
    }

    /// Reads a PEFT LoRA adapter directory and attaches it (the base frozen): `r`,
    /// `lora_alpha` and `use_rslora` from `adapter_config.json`, the modules and their values
    /// from the tensors of `adapter_model.safetensors`.
    ///
    /// # Errors
    /// A missing or malformed file; a setting this crate does not implement (DoRA, trained
    /// biases, `fan_in_fan_out`, per-module α, `modules_to_save`); a tensor
    /// naming no projection of this model or shaped for another one.
    pub fn load_adapter(&mut self, dir: impl AsRef<Path>) -> Result<usize, ModelError> {
        let dir = dir.as_ref();
        let config = read_adapter_config(&dir.join(ADAPTER_CONFIG))?;
        let wpath = dir.join(ADAPTER_WEIGHTS);
        let file = TensorFile::open(&wpath)?;
        // Every tensor must be an A or B of an adaptable module, each module with both.
        let valid = self.lora_targets();
        let mut modules: Vec<String> = Vec::new();
        for name in file.names() {
            let bad = |reason: String| AdapterError::Tensor {
                path: wpath.clone(),
                tensor: name.to_string(),
                reason,
            };
            let stem = name.strip_prefix(PEFT_PREFIX);
            let projection = stem
                .and_then(|n| n.strip_suffix(".lora_A.weight").or_else(|| n.strip_suffix(".lora_B.weight")));
            let embedding = stem.and_then(|n| {
                n.strip_suffix(".lora_embedding_A").or_else(|| n.strip_suffix(".lora_embedding_B"))
            });
            let module = projection.or(embedding).ok_or_else(|| {
                bad(format!(
                    "expected `{PEFT_PREFIX}<module>.lora_A.weight` / `.lora_B.weight`, or \
                     `.lora_embedding_A` / `.lora_embedding_B` (other PEFT types are not supported)"
                ))
            })?;
            let layer_projection = |m: &str| {
                m.strip_prefix("backbone.layers.").and_then(|rest| rest.split_once(".mixer.")).is_some_and(
                    |(i, t)| i.parse::<usize>().is_ok_and(|i| i < self.config.n_layer) && valid.contains(&t),
                )
            };
            let known = match (projection, embedding) {
                (Some(m), _) => layer_projection(m),
                (_, Some(m)) => m == EMBEDDING_MODULE,
                _ => false,
            };
            known.then_some(()).ok_or_else(|| {
                bad(format!(
                    "`{module}` is not an adaptable module of this {}-layer {} model \
                         (backbone.layers.<i>.mixer.<{}>, or backbone.embeddings with \
                         lora_embedding_A/B)",
                    self.config.n_layer,
                    arch_name(self.config.arch),
                    valid.join("|")
                ))
            })?;
            if !modules.iter().any(|m| m == module) {
                modules.push(module.to_string());
            }
        }
        if modules.is_empty() {
            return Err(AdapterError::Tensor {
                path: wpath,
                tensor: "(none)".into(),
                reason: "the file holds no LoRA tensors".into(),
            }
            .into());
        }
        let mut cfg = config;
        cfg.targets = valid
            .iter()
            .filter(|t| modules.iter().any(|m| m.ends_with(&format!(".{t}"))))
            .map(|t| t.to_string())
            .collect();
        self.check_lora_config(&cfg)?;
        let read = |module: &str, (n, k): (usize, usize)| -> Result<Option<(Tensor, Tensor)>, AdapterError> {
            if !modules.iter().any(|m| m == module) {
                return Ok(None);
            }
            let [ka, kb] = peft_keys(module == EMBEDDING_MODULE);
            let (an, bn) = (format!("{PEFT_PREFIX}{module}{ka}"), format!("{PEFT_PREFIX}{module}{kb}"));
            let tensor_err = |tensor: &str, reason: String| AdapterError::Tensor {
                path: wpath.clone(),
                tensor: tensor.to_string(),
                reason,
            };
            for t in [&an, &bn] {
                if !file.contains(t) {
                    return Err(tensor_err(
                        t,
                        "missing (every adapted module needs lora_A and lora_B)".into(),
                    ));
                }
            }
            let a = file.f32(&an).map_err(|e| tensor_err(&an, e.to_string()))?;
            let r = if a.ndim() == 2 { a.shape()[0] } else { 0 };
            if r == 0 || a.shape() != [r, k] {
                return Err(tensor_err(&an, format!("shape {:?}, expected (r, {k}) with r ≥ 1", a.shape())));
            }
            let b = file.f32(&bn).map_err(|e| tensor_err(&bn, e.to_string()))?;
            if b.shape() != [n, r] {
                return Err(tensor_err(&bn, format!("shape {:?}, expected ({n}, {r})", b.shape())));
            }
            Ok(Some((a, b)))
        };
        Ok(self.attach(&cfg, read)?)
    }
}

/// The suffixes of a module's A and B in PEFT's files.
fn peft_keys(embedding: bool) -> [&'static str; 2] {
    if embedding { [".lora_embedding_A", ".lora_embedding_B"] } else { [".lora_A.weight", ".lora_B.weight"] }
}

/// `t` (rows, cols) transposed into a new (cols, rows) tensor.
fn transpose(t: &Tensor) -> Tensor {
    let (rows, cols) = (t.shape()[0], t.shape()[1]);
    let v = data(t);
    let out: Vec<f32> = (0..cols * rows).map(|i| v[(i % rows) * cols + i / rows]).collect();
    crate::tensor::from_vec(&[cols, rows], out)
}

/// The `base_model_name_or_path` an adapter directory records (`BASE` when none).
pub(crate) fn recorded_base(dir: &Path) -> String {
    std::fs::read_to_string(dir.join(ADAPTER_CONFIG))
        .ok()
        .and_then(|t| serde_json::from_str::<Value>(&t).ok())
        .and_then(|v| v.get("base_model_name_or_path")?.as_str().map(str::to_string))
        .filter(|b| !b.is_empty())
        .unwrap_or_else(|| "BASE".to_string())
}

/// Reads the settings of a PEFT `adapter_config.json` that this crate can apply.
fn read_adapter_config(path: &Path) -> Result<LoraConfig, AdapterError> {
    let err = |reason: String| AdapterError::Config { path: path.into(), reason };
    let text = std::fs::read_to_string(path).map_err(|e| err(format!("cannot read it: {e}")))?;
    let v: Value = serde_json::from_str(&text).map_err(|e| err(format!("not valid JSON: {e}")))?;
    let get = |k: &str| v.get(k).filter(|x| !x.is_null());
    match get("peft_type").and_then(Value::as_str) {
        Some("LORA") => {}
        other => {
            return Err(err(format!(
                "`peft_type` is {}; only LoRA adapters (\"LORA\") are supported",
                other.map_or("missing".to_string(), |s| format!("{s:?}"))
            )));
        }
    }
    let rank = get("r").and_then(Value::as_u64).filter(|&r| r >= 1).ok_or_else(|| {
        err(format!(
            "`r` is {}, expected a positive integer",
            get("r").map_or("missing".into(), Value::to_string)
        ))
    })?;
    let alpha = match get("lora_alpha") {
        None => 8.0,
        Some(a) => a.as_f64().ok_or_else(|| err(format!("`lora_alpha` is {a}, expected a number")))? as f32,
    };
    let flag = |k: &str| get(k).and_then(Value::as_bool).unwrap_or(false);
    for (k, why) in [
        ("use_dora", "DoRA adapters are not supported"),
        ("fan_in_fan_out", "weights stored (in, out) are not supported"),
    ] {
        if flag(k) {
            return Err(err(format!("`{k}` is true: {why}")));
        }
    }
    if let Some(b) = get("bias").and_then(Value::as_str).filter(|b| *b != "none") {
        return Err(err(format!(
            "`bias` is {b:?}: adapters that train biases are not supported (\"none\" only)"
        )));
    }
    for k in ["alpha_pattern", "modules_to_save", "trainable_token_indices"] {
        let set = get(k).is_some_and(|x| {
            x.as_object().is_none_or(|o| !o.is_empty()) && x.as_array().is_none_or(|a| !a.is_empty())
        });
        if set {
            return Err(err(format!("`{k}` is set ({}): not supported", get(k).expect("checked"))));
        }
    }
    Ok(LoraConfig { rank: rank as usize, alpha, targets: Vec::new(), rslora: flag("use_rslora") })
}
