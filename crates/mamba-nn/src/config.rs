//! Model configuration: reads Hugging Face `config.json` files in either key family
//! (transformers' `hidden_size`/`num_hidden_layers`/`state_size`/… or the original
//! `d_model`/`n_layer`/`ssm_cfg`/…) and writes the transformers form.
//!
//! # Limits
//!
//! [`MambaConfig::validate`] (called by every constructor that reads a file) refuses sizes
//! beyond generous limits before anything is allocated from them, so a corrupt or hostile
//! `config.json` fails with an error naming the file, the field, the value and the limit.
//! The limits ([`MAX_VOCAB_SIZE`] = 2^20, [`MAX_D_MODEL`] = 2^15, [`MAX_LAYERS`] = 1024,
//! [`MAX_D_STATE`] = 4096, [`MAX_EXPAND`] = 64, [`MAX_D_CONV`] = 1024, [`MAX_HEADDIM`] = 2^14,
//! [`MAX_CHUNK_SIZE`] = 2^16, at most [`MAX_TENSOR_ELEMENTS`] = 2^34 elements in any tensor and
//! [`MAX_PARAMS`] = 2^36 parameters in all) are several times those of every published Mamba
//! (up to Falcon-Mamba 7B and Codestral-Mamba 7B: vocabulary ≤ 65 024, hidden size 4096,
//! 64 layers). Every product is computed with checked arithmetic.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};

/// Largest `vocab_size` accepted (2^20; published Mamba vocabularies are at most ~256k).
pub const MAX_VOCAB_SIZE: usize = 1 << 20;
/// Largest `hidden_size` / `d_model` (and `time_step_rank`) accepted (2^15; Falcon-Mamba 7B and
/// Codestral-Mamba use 4096).
pub const MAX_D_MODEL: usize = 1 << 15;
/// Largest `num_hidden_layers` accepted (Codestral-Mamba has 64 layers, Falcon-Mamba 7B 64).
pub const MAX_LAYERS: usize = 1024;
/// Largest `state_size` accepted (Mamba-1 uses 16, Mamba-2 128).
pub const MAX_D_STATE: usize = 4096;
/// Largest `expand` accepted (every published model uses 2).
pub const MAX_EXPAND: usize = 64;
/// Largest `conv_kernel` accepted (every published model uses 4).
pub const MAX_D_CONV: usize = 1024;
/// Largest Mamba-2 `head_dim` accepted (published models use 64).
pub const MAX_HEADDIM: usize = 1 << 14;
/// Largest Mamba-2 `chunk_size` accepted (published models use 256).
pub const MAX_CHUNK_SIZE: usize = 1 << 16;
/// Most elements in any one tensor (2^34, 64 GiB as f32; a 7B model's largest is ~2^28).
pub const MAX_TENSOR_ELEMENTS: u64 = 1 << 34;
/// Most parameters in a model (2^36 ≈ 69 billion; the largest published Mamba has ~7.3 billion).
pub const MAX_PARAMS: u64 = 1 << 36;
/// Largest `config.json` read (1 MiB; real ones are a few KiB).
pub const MAX_CONFIG_BYTES: u64 = 1 << 20;

/// Which mixer the blocks use.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Arch {
    /// Selective scan with per-channel `A` (Mamba, Gu & Dao 2023).
    Mamba1,
    /// Per-head scalar `A`, SSD (Mamba-2, Dao & Gu 2024).
    Mamba2,
    /// The non-selective baseline: `in_proj`, the time-invariant recurrence
    /// `h = A·h + B·x`, `y = C·h + D·x` with per-channel vectors, `out_proj` — no convolution and
    /// no gate, so nothing in the layer depends on the input's content.
    Lti,
}

/// Hyper-parameters of a Mamba language model. Field names mirror the reference implementation.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct MambaConfig {
    /// Mixer family.
    pub arch: Arch,
    /// Vocabulary size (rows of the embedding).
    pub vocab_size: usize,
    /// Residual width.
    pub d_model: usize,
    /// Number of blocks.
    pub n_layer: usize,
    /// State size `N` per channel (Mamba-1) or per head and group (Mamba-2).
    pub d_state: usize,
    /// `d_inner = expand · d_model`.
    pub expand: usize,
    /// Causal conv width.
    pub d_conv: usize,
    /// Rank of the Δ projection (Mamba-1; `ceil(d_model / 16)` by default).
    pub dt_rank: usize,
    /// Head dimension `P` (Mamba-2).
    pub headdim: usize,
    /// Groups of `B`/`C` (Mamba-2).
    pub ngroups: usize,
    /// SSD chunk length (Mamba-2).
    pub chunk_size: usize,
    /// Bias on the causal conv.
    pub conv_bias: bool,
    /// Bias on `in_proj` / `out_proj`.
    pub bias: bool,
    /// RMSNorm epsilon.
    pub norm_eps: f32,
    /// `lm_head` shares the embedding matrix.
    pub tie_embeddings: bool,
    /// Δ initialisation range and floor.
    pub dt_min: f32,
    /// Upper end of the Δ initialisation range.
    pub dt_max: f32,
    /// Floor of the initial Δ.
    pub dt_init_floor: f32,
    /// The special token ids `config.json` records, kept from a loaded checkpoint.
    #[serde(default)]
    pub special_tokens: SpecialTokens,
}

/// `bos_token_id`, `eos_token_id` and `pad_token_id` of `config.json` (what transformers'
/// generation uses); `None` is written as `null`. A new model has those of the transformers
/// defaults for Mamba (0, none, 0); a loaded one keeps its checkpoint's.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SpecialTokens {
    /// `bos_token_id`.
    pub bos: Option<u64>,
    /// `eos_token_id` (also the end-of-document token).
    pub eos: Option<u64>,
    /// `pad_token_id`.
    pub pad: Option<u64>,
}

impl Default for SpecialTokens {
    fn default() -> Self {
        Self { bos: Some(0), eos: None, pad: Some(0) }
    }
}

/// A `config.json` that cannot be used, naming the file and the field.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The file is not JSON.
    #[error("config {path} is not valid JSON: {source}")]
    Json {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: serde_json::Error,
    },
    /// A required field is absent under every accepted name.
    #[error("config {path}: missing `{field}` (also looked for {aliases})")]
    Missing {
        /// The file.
        path: PathBuf,
        /// The field's transformers name.
        field: &'static str,
        /// The other names tried.
        aliases: String,
    },
    /// A field has an impossible value.
    #[error("config {path}: `{field}` = {value}: {reason}")]
    Invalid {
        /// The file (or `<in memory>`).
        path: PathBuf,
        /// The field.
        field: &'static str,
        /// The value found.
        value: String,
        /// What was expected.
        reason: String,
    },
}

impl MambaConfig {
    /// A Mamba-1 config with the reference defaults (d_state 16, expand 2, d_conv 4,
    /// dt_rank = ⌈d_model/16⌉, conv bias, no linear bias, eps 1e-5, tied embeddings).
    pub fn mamba1(vocab_size: usize, d_model: usize, n_layer: usize) -> Self {
        Self {
            arch: Arch::Mamba1,
            vocab_size,
            d_model,
            n_layer,
            d_state: 16,
            expand: 2,
            d_conv: 4,
            dt_rank: d_model.div_ceil(16),
            headdim: 64,
            ngroups: 1,
            chunk_size: 256,
            conv_bias: true,
            bias: false,
            norm_eps: 1e-5,
            tie_embeddings: true,
            dt_min: 1e-3,
            dt_max: 1e-1,
            dt_init_floor: 1e-4,
            special_tokens: SpecialTokens::default(),
        }
    }

    /// A Mamba-2 config with the reference defaults (d_state 128, headdim 64, one group,
    /// chunk 256) — adjust fields as needed.
    pub fn mamba2(vocab_size: usize, d_model: usize, n_layer: usize) -> Self {
        Self { arch: Arch::Mamba2, d_state: 128, ..Self::mamba1(vocab_size, d_model, n_layer) }
    }

    /// `expand · d_model`.
    pub fn d_inner(&self) -> usize {
        self.expand * self.d_model
    }

    /// Mamba-2 heads, `d_inner / headdim`.
    pub fn nheads(&self) -> usize {
        self.d_inner() / self.headdim
    }

    /// Channels the causal conv runs over: `d_inner` (Mamba-1) or `d_inner + 2·G·N` (Mamba-2,
    /// the concatenation `xBC`).
    pub fn conv_dim(&self) -> usize {
        match self.arch {
            Arch::Mamba1 | Arch::Lti => self.d_inner(),
            Arch::Mamba2 => self.d_inner() + 2 * self.ngroups * self.d_state,
        }
    }

    /// Output width of `in_proj`: `2·d_inner` (Mamba-1: x, z), `d_inner` (LTI: x) or
    /// `2·d_inner + 2·G·N + H` (Mamba-2: z, xBC, dt).
    pub fn in_proj_dim(&self) -> usize {
        match self.arch {
            Arch::Mamba1 => 2 * self.d_inner(),
            Arch::Lti => self.d_inner(),
            Arch::Mamba2 => self.d_inner() + self.conv_dim() + self.nheads(),
        }
    }

    /// Number of parameters of the model this config describes (embedding, every block,
    /// `norm_f`, and `lm_head` when untied), or `None` if the count overflows `u64`.
    ///
    /// # Panics
    /// If a size is beyond the per-field limits ([`MambaConfig::validate`] rejects those).
    pub fn num_params(&self) -> Option<u64> {
        let (total, _) = self.tensor_sizes()?;
        Some(total)
    }

    /// The total parameter count and the largest tensor (its name and element count), with
    /// checked arithmetic: `None` on overflow. The shapes come from the model's own layer
    /// constructors ([`MambaLM::param_shapes`](crate::model::MambaLM::param_shapes)), so there is
    /// no second description of the model to keep in step; call it only once the per-field
    /// limits hold.
    fn tensor_sizes(&self) -> Option<(u64, (String, u64))> {
        let mut total = 0u64;
        let mut largest = (String::new(), 0u64);
        for (name, shape) in crate::model::MambaLM::param_shapes(self) {
            let n = shape.iter().try_fold(1u64, |a, &d| a.checked_mul(d as u64))?;
            total = total.checked_add(n)?;
            if n > largest.1 {
                largest = (name, n);
            }
        }
        Some((total, largest))
    }

    /// Checks that every size is within the [limits](self#limits) and that the sizes fit
    /// together; the error names the field, its value and the limit.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.validate_at(Path::new("<in memory>"))
    }

    fn validate_at(&self, path: &Path) -> Result<(), ConfigError> {
        let bad = |field: &'static str, value: usize, reason: &str| ConfigError::Invalid {
            path: path.to_path_buf(),
            field,
            value: value.to_string(),
            reason: reason.to_string(),
        };
        let in_range = |field: &'static str, v: usize, max: usize| {
            if v == 0 {
                Err(bad(field, v, "must be at least 1"))
            } else if v > max {
                Err(bad(field, v, &format!("must be at most {max} (the limit this crate accepts)")))
            } else {
                Ok(())
            }
        };
        in_range("vocab_size", self.vocab_size, MAX_VOCAB_SIZE)?;
        in_range("hidden_size", self.d_model, MAX_D_MODEL)?;
        in_range("num_hidden_layers", self.n_layer, MAX_LAYERS)?;
        in_range("state_size", self.d_state, MAX_D_STATE)?;
        in_range("expand", self.expand, MAX_EXPAND)?;
        in_range("conv_kernel", self.d_conv, MAX_D_CONV)?;
        match self.arch {
            Arch::Mamba1 => in_range("time_step_rank", self.dt_rank, MAX_D_MODEL)?,
            Arch::Lti => {}
            Arch::Mamba2 => {
                in_range("head_dim", self.headdim, MAX_HEADDIM)?;
                if !self.d_inner().is_multiple_of(self.headdim) {
                    let why = format!("must divide d_inner = expand · hidden_size = {}", self.d_inner());
                    return Err(bad("head_dim", self.headdim, &why));
                }
                if self.ngroups == 0 || !self.nheads().is_multiple_of(self.ngroups) {
                    let why = format!("must divide the number of heads {}", self.nheads());
                    return Err(bad("n_groups", self.ngroups, &why));
                }
                in_range("chunk_size", self.chunk_size, MAX_CHUNK_SIZE)?;
            }
        }
        let real = |field: &'static str, v: f32, ok: bool, what: &str| {
            if v.is_finite() && ok {
                Ok(())
            } else {
                Err(ConfigError::Invalid {
                    path: path.to_path_buf(),
                    field,
                    value: v.to_string(),
                    reason: format!("must be a finite number {what}"),
                })
            }
        };
        real("layer_norm_epsilon", self.norm_eps, self.norm_eps >= 0.0, "≥ 0")?;
        real("time_step_min", self.dt_min, self.dt_min > 0.0, "> 0")?;
        real("time_step_max", self.dt_max, self.dt_max >= self.dt_min, "≥ time_step_min")?;
        real("time_step_floor", self.dt_init_floor, self.dt_init_floor >= 0.0, "≥ 0")?;
        let too_big = |field: &'static str, value: String, reason: String| ConfigError::Invalid {
            path: path.to_path_buf(),
            field,
            value,
            reason,
        };
        let Some((total, (name, largest))) = self.tensor_sizes() else {
            return Err(too_big(
                "num_hidden_layers",
                self.n_layer.to_string(),
                "the parameter count overflows a 64-bit integer".into(),
            ));
        };
        if largest > MAX_TENSOR_ELEMENTS {
            let (field, value) = if name == "backbone.embeddings.weight" {
                ("vocab_size", self.vocab_size)
            } else {
                ("hidden_size", self.d_model)
            };
            return Err(too_big(
                field,
                value.to_string(),
                format!(
                    "tensor `{name}` would have {largest} elements, more than the limit \
                     {MAX_TENSOR_ELEMENTS} (2^34)"
                ),
            ));
        }
        if total > MAX_PARAMS {
            return Err(too_big(
                "num_hidden_layers",
                self.n_layer.to_string(),
                format!("the model would have {total} parameters, more than the limit {MAX_PARAMS} (2^36)"),
            ));
        }
        Ok(())
    }

    /// Reads a `config.json` of either key family and validates it.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self, ConfigError> {
        let path = path.as_ref();
        let io = |source| ConfigError::Io { path: path.into(), source };
        let len = std::fs::metadata(path).map_err(io)?.len();
        if len > MAX_CONFIG_BYTES {
            return Err(ConfigError::Invalid {
                path: path.into(),
                field: "(file size)",
                value: format!("{len} bytes"),
                reason: format!("a config.json is at most {MAX_CONFIG_BYTES} bytes"),
            });
        }
        let text = std::fs::read_to_string(path).map_err(io)?;
        let v: Value =
            serde_json::from_str(&text).map_err(|source| ConfigError::Json { path: path.into(), source })?;
        Self::from_json(&v, path)
    }

    /// Parses a config object (see [`MambaConfig::from_file`]); `path` is used in errors only.
    pub fn from_json(v: &Value, path: &Path) -> Result<Self, ConfigError> {
        let empty = Map::new();
        let Some(root) = v.as_object() else {
            return Err(ConfigError::Invalid {
                path: path.into(),
                field: "(top level)",
                value: json_kind(v).into(),
                reason: "expected a JSON object".into(),
            });
        };
        let ssm = root.get("ssm_cfg").and_then(Value::as_object).unwrap_or(&empty);
        let get = |names: &[&str]| -> Option<&Value> {
            names.iter().find_map(|n| root.get(*n).or_else(|| ssm.get(*n))).filter(|v| !v.is_null())
        };
        let missing = |names: &[&'static str]| ConfigError::Missing {
            path: path.into(),
            field: names[0],
            aliases: names[1..].iter().map(|n| format!("`{n}`")).collect::<Vec<_>>().join(", "),
        };
        let usize_of = |names: &[&'static str]| -> Result<Option<usize>, ConfigError> {
            match get(names) {
                None => Ok(None),
                Some(v) => v.as_u64().map(|x| Some(x as usize)).ok_or_else(|| ConfigError::Invalid {
                    path: path.into(),
                    field: names[0],
                    value: v.to_string(),
                    reason: "expected a non-negative integer".into(),
                }),
            }
        };
        let req = |names: &[&'static str]| usize_of(names)?.ok_or_else(|| missing(names));
        let f32_of =
            |names: &[&str], default: f32| get(names).and_then(Value::as_f64).map_or(default, |x| x as f32);
        let bool_of = |names: &[&str], default: bool| get(names).and_then(Value::as_bool).unwrap_or(default);

        let model_type = root.get("model_type").and_then(Value::as_str).unwrap_or("");
        let layer = ssm.get("layer").and_then(Value::as_str).unwrap_or("");
        let arch = if model_type == "mamba2" || layer == "Mamba2" || root.contains_key("num_heads") {
            Arch::Mamba2
        } else if model_type == "mamba-lti" {
            Arch::Lti
        } else {
            Arch::Mamba1
        };
        let d_model = req(&["hidden_size", "d_model"])?;
        let mut vocab_size = req(&["vocab_size"])?;
        // The original configs store the unpadded vocabulary and pad it at build time.
        if let Some(m) = usize_of(&["pad_vocab_size_multiple"])?.filter(|&m| m > 1)
            && root.get("hidden_size").is_none()
        {
            vocab_size = vocab_size.div_ceil(m).checked_mul(m).ok_or_else(|| ConfigError::Invalid {
                path: path.into(),
                field: "pad_vocab_size_multiple",
                value: m.to_string(),
                reason: format!("padding vocab_size = {vocab_size} to a multiple overflows"),
            })?;
        }
        let mut cfg = match arch {
            Arch::Mamba1 | Arch::Lti => Self { arch, ..Self::mamba1(vocab_size, d_model, 1) },
            Arch::Mamba2 => Self::mamba2(vocab_size, d_model, 1),
        };
        cfg.n_layer = req(&["num_hidden_layers", "n_layer"])?;
        cfg.d_state = usize_of(&["state_size", "d_state"])?.unwrap_or(cfg.d_state);
        cfg.expand = usize_of(&["expand"])?.unwrap_or(cfg.expand);
        cfg.d_conv = usize_of(&["conv_kernel", "d_conv"])?.unwrap_or(cfg.d_conv);
        // "auto" (a string) means the default.
        cfg.dt_rank = usize_of(&["time_step_rank", "dt_rank"]).ok().flatten().unwrap_or(cfg.dt_rank);
        cfg.headdim = usize_of(&["head_dim", "headdim"])?.unwrap_or(cfg.headdim);
        cfg.ngroups = usize_of(&["n_groups", "ngroups"])?.unwrap_or(cfg.ngroups);
        cfg.chunk_size = usize_of(&["chunk_size"])?.unwrap_or(cfg.chunk_size);
        cfg.conv_bias = bool_of(&["use_conv_bias", "conv_bias"], cfg.conv_bias);
        cfg.bias = bool_of(&["use_bias", "bias"], cfg.bias);
        cfg.norm_eps = f32_of(&["layer_norm_epsilon", "norm_epsilon", "rms_norm_eps"], cfg.norm_eps);
        cfg.tie_embeddings = bool_of(&["tie_word_embeddings", "tie_embeddings"], cfg.tie_embeddings);
        cfg.dt_min = f32_of(&["time_step_min", "dt_min"], cfg.dt_min);
        cfg.dt_max = f32_of(&["time_step_max", "dt_max"], cfg.dt_max);
        cfg.dt_init_floor = f32_of(&["time_step_floor", "dt_init_floor"], cfg.dt_init_floor);
        // A present key keeps its value (`null` → none); an absent one the default.
        let token_id = |name: &str, default: Option<u64>| match root.get(name) {
            None => default,
            Some(v) => v.as_u64(),
        };
        let d = SpecialTokens::default();
        cfg.special_tokens = SpecialTokens {
            bos: token_id("bos_token_id", d.bos),
            eos: token_id("eos_token_id", d.eos),
            pad: token_id("pad_token_id", d.pad),
        };
        cfg.validate_at(path)?;
        if arch == Arch::Mamba2
            && let Some(h) = usize_of(&["num_heads", "nheads"])?
            && h.checked_mul(cfg.headdim) != Some(cfg.d_inner())
        {
            return Err(ConfigError::Invalid {
                path: path.into(),
                field: "num_heads",
                value: h.to_string(),
                reason: format!(
                    "num_heads · head_dim = {h} · {} must equal expand · hidden_size = {}",
                    cfg.headdim,
                    cfg.d_inner()
                ),
            });
        }
        Ok(cfg)
    }

    /// The config as transformers writes it (`MambaConfig` / `Mamba2Config` keys), so the
    /// directory loads with `AutoModelForCausalLM.from_pretrained`.
    pub fn to_hf_json(&self) -> Value {
        let mut v = json!({
            "vocab_size": self.vocab_size,
            "hidden_size": self.d_model,
            "state_size": self.d_state,
            "num_hidden_layers": self.n_layer,
            "expand": self.expand,
            "conv_kernel": self.d_conv,
            "use_bias": self.bias,
            "use_conv_bias": self.conv_bias,
            "layer_norm_epsilon": self.norm_eps,
            "residual_in_fp32": true,
            "time_step_min": self.dt_min,
            "time_step_max": self.dt_max,
            "time_step_floor": self.dt_init_floor,
            "tie_word_embeddings": self.tie_embeddings,
            "pad_token_id": self.special_tokens.pad,
            "bos_token_id": self.special_tokens.bos,
            "eos_token_id": self.special_tokens.eos,
            "torch_dtype": "float32",
        });
        let m = v.as_object_mut().expect("an object");
        match self.arch {
            Arch::Mamba1 => {
                m.insert("model_type".into(), json!("mamba"));
                m.insert("architectures".into(), json!(["MambaForCausalLM"]));
                m.insert("time_step_rank".into(), json!(self.dt_rank));
            }
            Arch::Lti => {
                // Not a transformers architecture: only this crate reads it back.
                m.insert("model_type".into(), json!("mamba-lti"));
            }
            Arch::Mamba2 => {
                m.insert("model_type".into(), json!("mamba2"));
                m.insert("architectures".into(), json!(["Mamba2ForCausalLM"]));
                m.insert("num_heads".into(), json!(self.nheads()));
                m.insert("head_dim".into(), json!(self.headdim));
                m.insert("n_groups".into(), json!(self.ngroups));
                m.insert("chunk_size".into(), json!(self.chunk_size));
            }
        }
        v
    }
}

/// A short name of a JSON value's type, for error messages.
fn json_kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(v: Value) -> Result<MambaConfig, ConfigError> {
        MambaConfig::from_json(&v, Path::new("cfg.json"))
    }

    #[test]
    fn reads_transformers_keys() {
        let c = parse(json!({"model_type": "mamba", "vocab_size": 203, "hidden_size": 64, "num_hidden_layers": 2,
            "state_size": 8, "expand": 2, "conv_kernel": 3, "time_step_rank": 5, "tie_word_embeddings": true}))
        .unwrap();
        assert_eq!(
            (c.arch, c.vocab_size, c.d_model, c.n_layer, c.d_state, c.d_conv, c.dt_rank),
            (Arch::Mamba1, 203, 64, 2, 8, 3, 5)
        );
        assert_eq!((c.d_inner(), c.in_proj_dim(), c.conv_dim()), (128, 256, 128));
    }

    #[test]
    fn special_token_ids_are_kept_and_default_when_absent() {
        let mut v = json!({"hidden_size": 64, "num_hidden_layers": 2, "vocab_size": 100,
            "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": null});
        let c = parse(v.clone()).unwrap();
        assert_eq!(c.special_tokens, SpecialTokens { bos: Some(1), eos: Some(2), pad: None });
        let back = c.to_hf_json();
        assert_eq!(
            (&back["bos_token_id"], &back["eos_token_id"], &back["pad_token_id"]),
            (&json!(1), &json!(2), &Value::Null)
        );
        assert_eq!(parse(back).unwrap(), c, "round trip");
        for k in ["bos_token_id", "eos_token_id", "pad_token_id"] {
            v.as_object_mut().unwrap().remove(k);
        }
        assert_eq!(parse(v).unwrap().special_tokens, SpecialTokens::default());
    }

    #[test]
    fn reads_original_keys_and_pads_vocab() {
        let c = parse(json!({"d_model": 768, "n_layer": 24, "vocab_size": 50277, "ssm_cfg": {},
            "pad_vocab_size_multiple": 8, "tie_embeddings": true}))
        .unwrap();
        assert_eq!(
            (c.arch, c.d_model, c.n_layer, c.vocab_size, c.dt_rank, c.d_state),
            (Arch::Mamba1, 768, 24, 50280, 48, 16)
        );
    }

    #[test]
    fn reads_mamba2_with_derived_sizes() {
        let c = parse(
            json!({"model_type": "mamba2", "vocab_size": 203, "hidden_size": 64, "num_hidden_layers": 2,
            "state_size": 16, "expand": 2, "head_dim": 16, "num_heads": 8, "n_groups": 2, "chunk_size": 8}),
        )
        .unwrap();
        assert_eq!(
            (c.arch, c.nheads(), c.conv_dim(), c.in_proj_dim()),
            (Arch::Mamba2, 8, 128 + 64, 128 + 192 + 8)
        );
        let back = parse(c.to_hf_json()).unwrap();
        assert_eq!(back, c);
    }

    #[test]
    fn missing_field_names_it_and_its_aliases() {
        let e = parse(json!({"vocab_size": 10, "num_hidden_layers": 1})).unwrap_err().to_string();
        assert_eq!(e, "config cfg.json: missing `hidden_size` (also looked for `d_model`)");
    }

    #[test]
    fn impossible_values_name_the_field() {
        let e = parse(
            json!({"model_type": "mamba2", "vocab_size": 10, "hidden_size": 64, "num_hidden_layers": 1,
            "head_dim": 48}),
        )
        .unwrap_err()
        .to_string();
        assert_eq!(e, "config cfg.json: `head_dim` = 48: must divide d_inner = expand · hidden_size = 128");
        let e = parse(json!({"vocab_size": 0, "hidden_size": 8, "num_hidden_layers": 1}))
            .unwrap_err()
            .to_string();
        assert_eq!(e, "config cfg.json: `vocab_size` = 0: must be at least 1");
        let e = parse(json!({"vocab_size": "x", "hidden_size": 8, "num_hidden_layers": 1}))
            .unwrap_err()
            .to_string();
        assert_eq!(e, "config cfg.json: `vocab_size` = \"x\": expected a non-negative integer");
    }

    #[test]
    fn absurd_sizes_are_refused_naming_field_value_and_limit() {
        let base = || json!({"vocab_size": 256, "hidden_size": 64, "num_hidden_layers": 2});
        let with = |k: &str, v: Value| {
            let mut c = base();
            c[k] = v;
            parse(c).unwrap_err().to_string()
        };
        assert_eq!(
            with("hidden_size", json!(1_000_000_000u64)),
            "config cfg.json: `hidden_size` = 1000000000: must be at most 32768 (the limit this crate accepts)"
        );
        assert!(
            with("vocab_size", json!(1_000_000_000_000u64))
                .contains("`vocab_size` = 1000000000000: must be at most 1048576")
        );
        assert!(
            with("num_hidden_layers", json!(1_000_000_000u64))
                .contains("`num_hidden_layers` = 1000000000: must be at most 1024")
        );
        assert!(with("state_size", json!(1u64 << 40)).contains("`state_size`"));
        assert!(with("expand", json!(u64::MAX)).contains("`expand`"));
        assert!(with("conv_kernel", json!(1u64 << 33)).contains("`conv_kernel`"));
        assert!(with("time_step_rank", json!(1u64 << 20)).contains("`time_step_rank`"));
        assert!(with("layer_norm_epsilon", json!(-1.0)).contains("`layer_norm_epsilon`"));
        assert!(with("time_step_min", json!(1e300)).contains("`time_step_min` = inf"));
        // Each size within its limit, but the embedding too large.
        let e = parse(json!({"vocab_size": 1 << 20, "hidden_size": 1 << 15, "num_hidden_layers": 1}))
            .unwrap_err()
            .to_string();
        assert!(e.contains("`vocab_size` = 1048576: tensor `backbone.embeddings.weight` would have"), "{e}");
        // Each tensor within its limit, but too many parameters.
        let e = parse(json!({"vocab_size": 256, "hidden_size": 1 << 15, "num_hidden_layers": 1024}))
            .unwrap_err()
            .to_string();
        assert!(e.contains("parameters, more than the limit 68719476736 (2^36)"), "{e}");
        // Mamba-2 sizes and the original keys' padding.
        let m2 = |k: &str, v: Value| {
            let mut c = json!({"model_type": "mamba2", "vocab_size": 256, "hidden_size": 64,
                "num_hidden_layers": 1, "head_dim": 16});
            c[k] = v;
            parse(c).unwrap_err().to_string()
        };
        assert!(m2("head_dim", json!(0)).contains("`head_dim` = 0: must be at least 1"));
        assert!(m2("n_groups", json!(1u64 << 50)).contains("`n_groups`"));
        assert!(m2("chunk_size", json!(1u64 << 50)).contains("`chunk_size`"));
        assert!(m2("num_heads", json!(u64::MAX)).contains("`num_heads`"));
        let e =
            parse(json!({"d_model": 64, "n_layer": 1, "vocab_size": u64::MAX, "pad_vocab_size_multiple": 8}))
                .unwrap_err()
                .to_string();
        assert!(e.contains("`pad_vocab_size_multiple`"), "{e}");
        let e = parse(json!([1, 2])).unwrap_err().to_string();
        assert_eq!(e, "config cfg.json: `(top level)` = an array: expected a JSON object");
    }

    #[test]
    fn published_7b_configs_are_accepted() {
        // Falcon-Mamba 7B and Codestral-Mamba 7B (Mamba-2), as their config.json state them.
        let falcon = parse(json!({"model_type": "mamba", "vocab_size": 65024, "hidden_size": 4096,
            "num_hidden_layers": 64, "state_size": 16, "expand": 16, "conv_kernel": 4,
            "time_step_rank": 256, "tie_word_embeddings": false}))
        .unwrap();
        assert!(falcon.num_params().unwrap() > 7_000_000_000);
        let codestral = parse(json!({"model_type": "mamba2", "vocab_size": 32768, "hidden_size": 4096,
            "num_hidden_layers": 64, "state_size": 128, "expand": 2, "head_dim": 64, "num_heads": 128,
            "n_groups": 8, "chunk_size": 256, "tie_word_embeddings": false}))
        .unwrap();
        assert!(codestral.num_params().unwrap() > 7_000_000_000);
    }

    #[test]
    fn num_params_matches_the_built_model() {
        for mut c in
            [MambaConfig::mamba1(50, 16, 2), MambaConfig::mamba2(50, 32, 2), MambaConfig::mamba1(50, 16, 3)]
        {
            c.headdim = 16;
            c.d_state = 8;
            for (bias, tie) in [(false, true), (true, false)] {
                c.bias = bias;
                c.tie_embeddings = tie;
                let m = crate::model::MambaLM::new(c.clone(), 0).unwrap();
                assert_eq!(c.num_params(), Some(m.params.num_elements() as u64), "{c:?}");
            }
        }
        let lti = MambaConfig { arch: Arch::Lti, ..MambaConfig::mamba1(50, 16, 2) };
        let m = crate::model::MambaLM::new(lti.clone(), 0).unwrap();
        assert_eq!(lti.num_params(), Some(m.params.num_elements() as u64));
    }

    #[test]
    fn unreadable_and_non_json_files_name_the_file() {
        let e = MambaConfig::from_file("/nonexistent/config.json").unwrap_err().to_string();
        assert!(e.starts_with("cannot read config /nonexistent/config.json: "), "{e}");
        let dir = std::env::temp_dir().join(format!("mamba-nn-cfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("config.json");
        std::fs::write(&p, "{ not json").unwrap();
        let e = MambaConfig::from_file(&p).unwrap_err().to_string();
        assert!(e.starts_with(&format!("config {} is not valid JSON: ", p.display())), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
