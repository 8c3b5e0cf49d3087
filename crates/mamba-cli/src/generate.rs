//! `mamba generate`.

use std::io::Write;
use std::path::PathBuf;

use anyhow::{Context, bail};
use clap::Args;
use mamba_nn::model::{MambaLM, Sampler, SamplingConfig};
use mamba_train::sample::TextStream;
use mamba_train::tokenizer::load_tokenizer;

/// Arguments of `mamba generate`.
#[derive(Args, Debug)]
pub struct GenerateArgs {
    /// Model directory: a `mamba train` run or any Hugging Face Mamba / Mamba-2 directory
    /// (uses its tokenizer.json when present, bytes otherwise).
    #[arg(long)]
    model: PathBuf,
    /// Text to continue.
    #[arg(long, conflicts_with = "prompt_ids")]
    prompt: Option<String>,
    /// Token ids to continue, comma-separated (e.g. 1,2,3).
    #[arg(long, value_delimiter = ',')]
    prompt_ids: Option<Vec<usize>>,
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
    /// {"tokens": [new ids], "text": "…", "prefill_tokens_per_s": x, "decode_tokens_per_s": y}.
    #[arg(long)]
    json: bool,
    /// Worker threads (0: one per core).
    #[arg(long, default_value_t = 0)]
    pub threads: usize,
}

/// Generates from a model directory, streaming the text as it is produced.
pub fn run(a: GenerateArgs) -> anyhow::Result<()> {
    let sampling = SamplingConfig { temperature: a.temperature, top_k: a.top_k, top_p: a.top_p };
    let sampler = Sampler::new(sampling, a.seed).context("--temperature / --top-p")?;
    let model =
        MambaLM::from_pretrained(&a.model).with_context(|| format!("loading {}", a.model.display()))?;
    let tok = load_tokenizer(&a.model)?;
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
    if a.json {
        let tokens: Vec<usize> = generation.by_ref().collect();
        let line = serde_json::json!({
            "tokens": tokens,
            "text": tok.decode(&tokens),
            "prefill_tokens_per_s": generation.prefill_tokens_per_s(),
            "decode_tokens_per_s": generation.decode_tokens_per_s(),
        });
        writeln!(stdout, "{line}")?;
        return Ok(());
    }
    write!(stdout, "{}", tok.decode(&prompt))?;
    let mut text = TextStream::new(&*tok);
    let mut n = 0;
    for token in generation.by_ref() {
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
