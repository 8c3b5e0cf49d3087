//! `mamba info`.

use std::path::PathBuf;

use anyhow::Context;
use clap::Args;
use mamba_nn::config::Arch;
use mamba_nn::model::MambaLM;

/// Arguments of `mamba info`.
#[derive(Args, Debug)]
pub struct InfoArgs {
    /// Model directory (config.json + model.safetensors). Without it, only the kernels line.
    #[arg(long)]
    model: Option<PathBuf>,
}

/// Prints which kernels run on this CPU, and the architecture, parameter count and memory of a
/// model directory.
pub fn run(a: InfoArgs) -> anyhow::Result<()> {
    outln!("kernels      {}", kernels_line());
    let Some(dir) = a.model else { return Ok(()) };
    let model = MambaLM::from_pretrained(&dir).with_context(|| format!("loading {}", dir.display()))?;
    let c = &model.config;
    let arch = match c.arch {
        Arch::Mamba1 => "Mamba (selective scan, per-channel A)",
        Arch::Mamba2 => "Mamba-2 (SSD, per-head scalar A)",
        Arch::Lti => "LTI baseline (a time-invariant recurrence, no selection: h = A·h + B·x, y = C·h + D·x)",
    };
    let n = model.params.num_elements();
    outln!("model        {}", dir.display());
    outln!("architecture {arch}");
    outln!("layers       {}", c.n_layer);
    outln!("d_model      {} (d_inner {})", c.d_model, c.d_inner());
    outln!("d_state      {}", c.d_state);
    outln!("d_conv       {}", c.d_conv);
    match c.arch {
        Arch::Mamba1 => outln!("dt_rank      {}", c.dt_rank),
        Arch::Mamba2 => outln!(
            "heads        {} × {} (groups {}, chunk {})",
            c.nheads(),
            c.headdim,
            c.ngroups,
            c.chunk_size
        ),
        Arch::Lti => {}
    }
    outln!("vocab        {}", c.vocab_size);
    outln!("lm_head      {}", if c.tie_embeddings { "tied to the embedding" } else { "separate" });
    outln!("parameters   {n} ({:.2} M)", n as f64 / 1e6);
    outln!("memory       {:.1} MiB of f32 weights", n as f64 * 4.0 / (1 << 20) as f64);
    let state: usize = match c.arch {
        Arch::Mamba1 => c.d_inner() * c.d_state,
        Arch::Mamba2 => c.nheads() * c.headdim * c.d_state,
        Arch::Lti => c.d_inner(),
    } + if c.arch == Arch::Lti { 0 } else { c.conv_dim() * c.d_conv };
    outln!("state        {:.1} KiB per sequence for generation", (state * c.n_layer * 4) as f64 / 1024.0);
    Ok(())
}

/// The instruction set the kernels run on, what the CPU offers, and how it was chosen.
fn kernels_line() -> String {
    use mamba_nn::ssm_kernel::isa::{self, Isa};
    let active = isa::active();
    let offered: Vec<&str> = Isa::available().iter().rev().map(|l| l.name()).collect();
    let how = if isa::from_env().ok().flatten().is_some() {
        "set by MAMBA_SIMD"
    } else {
        "the fastest this CPU runs"
    };
    let bf16 = if isa::bf16_dot() {
        "; bf16 weights through the AVX-512 BF16 dot product for 2-8 sequences at a time, activations rounded to bf16"
    } else {
        ""
    };
    format!(
        "{active} ({how}; this CPU runs {}; MAMBA_SIMD={} overrides){bf16}",
        offered.join(", "),
        offered.join("|")
    )
}
