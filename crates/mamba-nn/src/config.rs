//! Model configuration: reads Hugging Face `config.json` files in either key family
//! (transformers' `hidden_size`/`num_hidden_layers`/`state_size`/… or the original
//! `d_model`/`n_layer`/`ssm_cfg`/…) and writes the transformers form.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};

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

    /// Checks that the sizes fit together; the error names the field.
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
        for (field, v) in [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.d_model),
            ("num_hidden_layers", self.n_layer),
            ("state_size", self.d_state),
            ("expand", self.expand),
            ("conv_kernel", self.d_conv),
        ] {
            if v == 0 {
                return Err(bad(field, v, "must be at least 1"));
            }
        }
        match self.arch {
            Arch::Mamba1 => {
                if self.dt_rank == 0 {
                    return Err(bad("time_step_rank", 0, "must be at least 1"));
                }
            }
            Arch::Lti => {}
            Arch::Mamba2 => {
                if self.headdim == 0 || !self.d_inner().is_multiple_of(self.headdim) {
                    let why = format!("must divide d_inner = expand · hidden_size = {}", self.d_inner());
                    return Err(bad("head_dim", self.headdim, &why));
                }
                if self.ngroups == 0 || !self.nheads().is_multiple_of(self.ngroups) {
                    let why = format!("must divide the number of heads {}", self.nheads());
                    return Err(bad("n_groups", self.ngroups, &why));
                }
                if self.chunk_size == 0 {
                    return Err(bad("chunk_size", 0, "must be at least 1"));
                }
            }
        }
        Ok(())
    }

    /// Reads a `config.json` of either key family and validates it.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self, ConfigError> {
        let path = path.as_ref();
        let text =
            std::fs::read_to_string(path).map_err(|source| ConfigError::Io { path: path.into(), source })?;
        let v: Value =
            serde_json::from_str(&text).map_err(|source| ConfigError::Json { path: path.into(), source })?;
        Self::from_json(&v, path)
    }

    /// Parses a config object (see [`MambaConfig::from_file`]); `path` is used in errors only.
    pub fn from_json(v: &Value, path: &Path) -> Result<Self, ConfigError> {
        let empty = Map::new();
        let root = v.as_object().unwrap_or(&empty);
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
            vocab_size = vocab_size.div_ceil(m) * m;
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
        if arch == Arch::Mamba2
            && let Some(h) = usize_of(&["num_heads", "nheads"])?
            && h * cfg.headdim != cfg.d_inner()
        {
            return Err(ConfigError::Invalid {
                path: path.into(),
                field: "num_heads",
                value: h.to_string(),
                reason: format!(
                    "num_heads · head_dim = {} must equal expand · hidden_size = {}",
                    h * cfg.headdim,
                    cfg.d_inner()
                ),
            });
        }
        cfg.validate_at(path)?;
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
            "pad_token_id": 0,
            "bos_token_id": 0,
            "eos_token_id": null,
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
