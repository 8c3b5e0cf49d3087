//! `mamba merge`: a base model plus a LoRA adapter → one plain model directory.

use std::path::PathBuf;

use anyhow::{Context, bail};
use clap::Args;
use mamba_nn::model::{LoadOptions, MambaLM, WeightFormat};

/// Arguments of `mamba merge`.
#[derive(Args, Debug)]
pub struct MergeArgs {
    /// The base model directory the adapter was trained on.
    #[arg(long)]
    model: PathBuf,
    /// The LoRA adapter directory (PEFT format: adapter_config.json + adapter_model.safetensors),
    /// e.g. a `mamba train --lora-rank` run.
    #[arg(long)]
    adapter: PathBuf,
    /// Where to write the merged model (config.json, model.safetensors in f32, and the base's
    /// tokenizer files); must not exist or be empty.
    #[arg(long)]
    out: PathBuf,
}

/// Writes `W + scale·B·A` for every adapted projection, and the rest of the base unchanged.
pub fn run(a: MergeArgs) -> anyhow::Result<()> {
    if std::fs::read_dir(&a.out).is_ok_and(|mut d| d.next().is_some()) {
        bail!("{} is not empty; choose a new --out for the merged model", a.out.display());
    }
    let options = LoadOptions { dtype: Some(WeightFormat::F32), ..LoadOptions::default() };
    let mut model = MambaLM::from_pretrained_with(&a.model, options)
        .with_context(|| format!("loading {}", a.model.display()))?;
    let n = model
        .load_adapter(&a.adapter)
        .with_context(|| format!("loading the adapter {}", a.adapter.display()))?;
    model.merge_lora()?;
    model.save_pretrained(&a.out).with_context(|| format!("writing {}", a.out.display()))?;
    crate::model_dir::copy_tokenizer_files(&a.model, &a.out)?;
    outln!("merged {n} adapted projections of {} into {}", a.adapter.display(), a.out.display());
    Ok(())
}
