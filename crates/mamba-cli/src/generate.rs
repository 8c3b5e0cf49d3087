//! `mamba generate`.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use clap::Args;
use mamba_nn::model::{MambaLM, Request, Sampler, SamplingConfig};
use mamba_train::sample::TextStream;
use mamba_train::tokenizer::{Tokenizer, load_tokenizer};

/// Arguments of `mamba generate`.
#[derive(Args, Debug)]
pub struct GenerateArgs {
    /// Model directory: a `mamba train` run or any Hugging Face Mamba / Mamba-2 directory
    /// (uses its tokenizer.json when present, bytes otherwise).
    #[arg(long)]
    model: PathBuf,
    /// Text to continue.
    #[arg(long, conflicts_with_all = ["prompt_ids", "prompt_file"])]
    prompt: Option<String>,
    /// Token ids to continue, comma-separated (e.g. 1,2,3).
    #[arg(long, value_delimiter = ',', conflicts_with = "prompt_file")]
    prompt_ids: Option<Vec<usize>>,
    /// File of prompts, one per line, generated together as one batch (each continuation equals
    /// what the prompt gives alone; a finished one leaves the batch).
    #[arg(long)]
    prompt_file: Option<PathBuf>,
    /// Token id that ends a sequence when generated (e.g. the tokenizer's end-of-text id).
    #[arg(long)]
    stop_id: Option<usize>,
    /// Tokens to generate (at most 100,000,000; nothing is allocated up front for them).
    #[arg(long, default_value_t = 200, value_parser = clap::value_parser!(u64).range(0..=100_000_000))]
    max_new_tokens: u64,
    /// Sampling temperature; 0 is greedy.
    #[arg(long, default_value_t = 0.8, value_parser = crate::flags::non_negative_f32, allow_hyphen_values = true)]
    temperature: f32,
    /// Sample only among the k most likely tokens (0: no limit).
    #[arg(long, default_value_t = 0)]
    top_k: usize,
    /// Sample only among the most likely tokens whose probability adds up to p (1: no limit).
    #[arg(long, default_value_t = 1.0, value_parser = crate::flags::probability, allow_hyphen_values = true)]
    top_p: f32,
    /// Seed of the sampler: the same model, prompt, settings and seed give the same text.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Print one JSON line at the end instead of streaming text:
    /// {"tokens": [new ids], "text": "…", "prefill_tokens_per_s": x, "decode_tokens_per_s": y,
    /// "weight_bytes_per_token": bytes of weights a decode step reads};
    /// with --prompt-file, {"results": [{"tokens": […], "text": "…"}, …], "prefill_tokens_per_s":
    /// x, "decode_tokens_per_s": y} with y the aggregate rate over the batch.
    #[arg(long)]
    json: bool,
    /// Precision of the weight matrices (projections, embedding, LM head): f32, bf16, f16 or
    /// q8 (8-bit with a scale per 32 weights); the SSM parameters and the state stay f32.
    /// Default: the checkpoint's own (f32, or bf16 / f16 for a 16-bit checkpoint).
    #[arg(long, value_parser = crate::flags::weight_format)]
    dtype: Option<mamba_nn::model::WeightFormat>,
    /// A LoRA adapter directory (PEFT format, e.g. a `mamba train --lora-rank` run) to apply to
    /// --model: merged into the weights at load, so it runs at the base model's speed.
    #[arg(long)]
    adapter: Option<std::path::PathBuf>,
    /// Worker threads (0: one per core).
    #[arg(long, default_value_t = 0)]
    pub threads: usize,
}

/// Generates from a model directory, streaming the text as it is produced.
pub fn run(a: GenerateArgs) -> anyhow::Result<()> {
    let sampling = SamplingConfig { temperature: a.temperature, top_k: a.top_k, top_p: a.top_p };
    let sampler = Sampler::new(sampling, a.seed).context("--temperature / --top-p")?;
    let model = crate::model_dir::load(&a.model, a.adapter.as_deref(), a.dtype)?;
    let tok = load_tokenizer(&a.model)?;
    if let Some(stop) = a.stop_id {
        model.check_ids(&[stop]).context("--stop-id")?;
    }
    if let Some(path) = &a.prompt_file {
        return run_batch(&a, &model, &*tok, path, sampler);
    }
    let prompt: Vec<usize> = match (&a.prompt, &a.prompt_ids) {
        (_, Some(ids)) => ids.clone(),
        (Some(text), None) => tok.encode(text),
        (None, None) => tok.encode("\n"),
    };
    if prompt.is_empty() {
        bail!("the prompt is empty after tokenization; give --prompt TEXT or --prompt-ids");
    }
    model.check_ids(&prompt).context("--prompt-ids")?;
    let mut generation = model.generate(&prompt, a.max_new_tokens as usize, sampler)?;
    let mut stdout = std::io::stdout().lock();
    // The tokens up to and including the stop id, if one comes.
    let mut ended = false;
    let mut next = |g: &mut mamba_nn::model::Generation| {
        if ended {
            return None;
        }
        let t = g.next()?;
        ended = Some(t) == a.stop_id;
        Some(t)
    };
    if a.json {
        let tokens: Vec<usize> = std::iter::from_fn(|| next(&mut generation)).collect();
        let line = serde_json::json!({
            "tokens": tokens,
            "text": tok.decode(&tokens),
            "prefill_tokens_per_s": generation.prefill_tokens_per_s(),
            "decode_tokens_per_s": generation.decode_tokens_per_s(),
            "weight_bytes_per_token": model.weight_bytes_per_token(),
        });
        writeln!(stdout, "{line}")?;
        return Ok(());
    }
    write!(stdout, "{}", tok.decode(&prompt))?;
    let mut text = TextStream::new(&*tok);
    let mut n = 0;
    while let Some(token) = next(&mut generation) {
        n += 1;
        if let Some(piece) = text.push(token) {
            write!(stdout, "{piece}")?;
            stdout.flush()?;
        }
    }
    writeln!(stdout, "{}", text.finish())?;
    eprintln!(
        "[{} prompt tokens at {:.0} tokens/s; {n} new tokens at {:.0} tokens/s]",
        prompt.len(),
        generation.prefill_tokens_per_s(),
        generation.decode_tokens_per_s()
    );
    Ok(())
}

/// `--prompt-file`: every line a prompt, generated as one batch; the continuations are printed
/// in the file's order once all are done.
fn run_batch(
    a: &GenerateArgs,
    model: &MambaLM,
    tok: &dyn Tokenizer,
    path: &Path,
    sampler: Sampler,
) -> anyhow::Result<()> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading --prompt-file {}", path.display()))?;
    let mut prompts = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let ids = tok.encode(line);
        if ids.is_empty() {
            bail!("{} line {}: the prompt is empty (every line is one prompt)", path.display(), i + 1);
        }
        model.check_ids(&ids).with_context(|| format!("{} line {}", path.display(), i + 1))?;
        prompts.push(ids);
    }
    if prompts.is_empty() {
        bail!("{}: no prompts (the file is empty; write one prompt per line)", path.display());
    }
    let requests: Vec<Request> = prompts.iter().map(|p| Request::new(p, a.max_new_tokens as usize)).collect();
    let out = model.generate_batch(&requests, sampler, a.stop_id)?.run();
    let mut stdout = std::io::stdout().lock();
    if a.json {
        let results: Vec<serde_json::Value> =
            out.tokens.iter().map(|t| serde_json::json!({ "tokens": t, "text": tok.decode(t) })).collect();
        let line = serde_json::json!({
            "results": results,
            "prefill_tokens_per_s": out.prefill_tokens_per_s,
            "decode_tokens_per_s": out.decode_tokens_per_s,
            "weight_bytes_per_token": model.weight_bytes_per_token(),
        });
        writeln!(stdout, "{line}")?;
        return Ok(());
    }
    for (i, (p, t)) in prompts.iter().zip(&out.tokens).enumerate() {
        if i > 0 {
            writeln!(stdout)?;
        }
        writeln!(stdout, "{}{}", tok.decode(p), tok.decode(t))?;
    }
    let new: usize = out.tokens.iter().map(Vec::len).sum();
    eprintln!(
        "[{} prompts, {} prompt tokens at {:.0} tokens/s; {new} new tokens at {:.0} tokens/s over the batch]",
        prompts.len(),
        prompts.iter().map(Vec::len).sum::<usize>(),
        out.prefill_tokens_per_s,
        out.decode_tokens_per_s
    );
    Ok(())
}
