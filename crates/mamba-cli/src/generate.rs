//! `mamba generate`.

use std::io::Write;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, bail};
use clap::Args;
use mamba_train::data::Rng;
use mamba_train::mamba_nn::model::MambaLM;
use mamba_train::mamba_nn::tensor::data;
use mamba_train::tokenizer::load_tokenizer;

use crate::sampling::{Sampling, pick};

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
    /// Tokens to generate.
    #[arg(long, default_value_t = 200)]
    max_new_tokens: usize,
    /// Sampling temperature; 0 is greedy.
    #[arg(long, default_value_t = 0.8)]
    temperature: f32,
    /// Sample only among the k most likely tokens (0: no limit).
    #[arg(long, default_value_t = 0)]
    top_k: usize,
    /// Sample only among the most likely tokens whose probability adds up to p (1: no limit).
    #[arg(long, default_value_t = 1.0)]
    top_p: f32,
    /// Seed of the sampler.
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
    if !(0.0..=1.0).contains(&a.top_p) || a.top_p == 0.0 {
        bail!("--top-p must be in (0, 1], got {}", a.top_p);
    }
    if a.temperature < 0.0 || !a.temperature.is_finite() {
        bail!("--temperature must be ≥ 0, got {}", a.temperature);
    }
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
    generate(&model, &*tok, &prompt, &a)?;
    Ok(())
}

/// The tokens of one continuation and how long its two phases took.
struct Continuation {
    tokens: Vec<usize>,
    prefill_s: f64,
    decode_s: f64,
}

/// Prefills `prompt` through the full forward, then chooses `n` tokens one step at a time,
/// calling `on_token` with each as soon as it is chosen.
fn continue_prompt(
    model: &MambaLM,
    prompt: &[usize],
    n: usize,
    sampling: &Sampling,
    seed: u64,
    mut on_token: impl FnMut(usize) -> anyhow::Result<()>,
) -> anyhow::Result<Continuation> {
    let v = model.config.vocab_size;
    let mut rng = Rng::new(seed);
    let t0 = Instant::now();
    let (all, mut state) = model.prefill(prompt, 1, prompt.len());
    let prefill_s = t0.elapsed().as_secs_f64();
    let mut logits = data(&all)[(prompt.len() - 1) * v..].to_vec();
    let (mut scratch, mut tokens) = (Vec::new(), Vec::with_capacity(n));
    let t1 = Instant::now();
    for i in 0..n {
        let next = pick(&logits, sampling, &mut rng, &mut scratch);
        tokens.push(next);
        on_token(next)?;
        if i + 1 < n {
            model.step(&[next], &mut state, &mut logits);
        }
    }
    Ok(Continuation { tokens, prefill_s, decode_s: t1.elapsed().as_secs_f64() })
}

fn generate(
    model: &MambaLM,
    tok: &dyn mamba_train::tokenizer::Tokenizer,
    prompt: &[usize],
    a: &GenerateArgs,
) -> anyhow::Result<()> {
    let sampling = Sampling { temperature: a.temperature, top_k: a.top_k, top_p: a.top_p };
    let mut stdout = std::io::stdout().lock();
    if a.json {
        let c = continue_prompt(model, prompt, a.max_new_tokens, &sampling, a.seed, |_| Ok(()))?;
        let line = serde_json::json!({
            "tokens": c.tokens,
            "text": tok.decode(&c.tokens),
            "prefill_tokens_per_s": prompt.len() as f64 / c.prefill_s.max(1e-9),
            "decode_tokens_per_s": c.tokens.len() as f64 / c.decode_s.max(1e-9),
        });
        writeln!(stdout, "{line}")?;
        return Ok(());
    }
    write!(stdout, "{}", tok.decode(prompt))?;
    // Streaming: only the tokens not yet printed are decoded; a piece that ends inside a
    // multi-byte character (decoded as U+FFFD) waits for the next token to complete it.
    let mut pending: Vec<usize> = Vec::new();
    let c = continue_prompt(model, prompt, a.max_new_tokens, &sampling, a.seed, |t| {
        pending.push(t);
        let piece = tok.decode(&pending);
        if !piece.ends_with('\u{FFFD}') {
            write!(stdout, "{piece}")?;
            stdout.flush()?;
            pending.clear();
        }
        Ok(())
    })?;
    writeln!(stdout, "{}", tok.decode(&pending))?;
    eprintln!(
        "[{} prompt tokens at {:.0} tokens/s; {} new tokens at {:.0} tokens/s]",
        prompt.len(),
        prompt.len() as f64 / c.prefill_s.max(1e-9),
        c.tokens.len(),
        c.tokens.len() as f64 / c.decode_s.max(1e-9)
    );
    Ok(())
}

/// A short sample for the end of training: `n` tokens after `prompt`, temperature 0.8.
pub fn sample_text(
    model: &MambaLM,
    tok: &dyn mamba_train::tokenizer::Tokenizer,
    prompt: &str,
    n: usize,
    seed: u64,
) -> String {
    let ids = tok.encode(prompt);
    let ids = if ids.is_empty() { vec![0] } else { ids };
    let sampling = Sampling { temperature: 0.8, top_k: 0, top_p: 1.0 };
    let c = continue_prompt(model, &ids, n, &sampling, seed, |_| Ok(())).expect("the callback cannot fail");
    format!("{prompt}{}", tok.decode(&c.tokens))
}
