//! Model directories: loading the model a command runs (optionally with a LoRA adapter merged
//! in, in the precision `--dtype` asks for), and carrying a model's tokenizer files along.

use std::path::Path;

use anyhow::Context;
use mamba_nn::model::{LoadOptions, MambaLM, WeightFormat};

/// The model in `dir` (with the PEFT adapter in `adapter` merged into its weights), its
/// matrices in `dtype` (default: the checkpoint's own format).
pub fn load(dir: &Path, adapter: Option<&Path>, dtype: Option<WeightFormat>) -> anyhow::Result<MambaLM> {
    let options = LoadOptions { dtype, ..LoadOptions::default() };
    match adapter {
        None => {
            MambaLM::from_pretrained_with(dir, options).with_context(|| format!("loading {}", dir.display()))
        }
        Some(a) => MambaLM::from_pretrained_with_adapter(dir, a, options)
            .with_context(|| format!("loading {} with the adapter {}", dir.display(), a.display())),
    }
}

/// The tokenizer files a Hugging Face model directory may hold beside its weights.
pub const TOKENIZER_FILES: [&str; 3] = ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"];

/// Copies those of [`TOKENIZER_FILES`] that `from` holds into `to`, so that `to` encodes text as
/// `from` did (here and in transformers).
pub fn copy_tokenizer_files(from: &Path, to: &Path) -> anyhow::Result<()> {
    for name in TOKENIZER_FILES {
        let src = from.join(name);
        if src.exists() {
            std::fs::copy(&src, to.join(name))
                .with_context(|| format!("copying {} to {}", src.display(), to.display()))?;
        }
    }
    Ok(())
}
