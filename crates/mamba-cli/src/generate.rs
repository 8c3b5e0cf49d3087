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

fn generate(
    model: &MambaLM,
    tok: &dyn mamba_train::tokenizer::Tokenizer,
    prompt: &[usize],
    a: &GenerateArgs,
) -> anyhow::Result<String> {
    let v = model.config.vocab_size;
    let sampling = Sampling { temperature: a.temperature, top_k: a.top_k, top_p: a.top_p };
    let mut rng = Rng::new(a.seed);
    let t0 = Instant::now();
    let (all, mut state) = model.prefill(prompt, 1, prompt.len());
    let prefill_s = t0.elapsed().as_secs_f64();
    let mut logits = data(&all)[(prompt.len() - 1) * v..].to_vec();
    let mut scratch = Vec::new();
    let mut out: Vec<usize> = Vec::with_capacity(a.max_new_tokens);
    let mut printed = String::new();
    let mut stdout = std::io::stdout().lock();
    if !a.json {
        write!(stdout, "{}", tok.decode(prompt))?;
    }
    let t1 = Instant::now();
    for i in 0..a.max_new_tokens {
        let next = pick(&logits, &sampling, &mut rng, &mut scratch);
        out.push(next);
        if !a.json {
            // Decode everything generated so far and print what is new, so multi-byte
            // characters and merged tokens come out whole.
            let text = tok.decode(&out);
            let stable = text.trim_end_matches('\u{FFFD}');
            if stable.len() > printed.len() && stable.starts_with(printed.as_str()) {
                write!(stdout, "{}", &stable[printed.len()..])?;
                stdout.flush()?;
                printed = stable.to_string();
            }
        }
        if i + 1 < a.max_new_tokens {
            model.step(&[next], &mut state, &mut logits);
        }
    }
    let decode_s = t1.elapsed().as_secs_f64();
    let text = tok.decode(&out);
    if a.json {
        let line = serde_json::json!({
            "tokens": out,
            "text": text,
            "prefill_tokens_per_s": prompt.len() as f64 / prefill_s.max(1e-9),
            "decode_tokens_per_s": out.len() as f64 / decode_s.max(1e-9),
        });
        writeln!(stdout, "{line}")?;
    } else {
        if text.len() > printed.len() && text.starts_with(printed.as_str()) {
            write!(stdout, "{}", &text[printed.len()..])?;
        }
        writeln!(stdout)?;
        eprintln!(
            "[{} prompt tokens at {:.0} tokens/s; {} new tokens at {:.0} tokens/s]",
            prompt.len(),
            prompt.len() as f64 / prefill_s.max(1e-9),
            out.len(),
            out.len() as f64 / decode_s.max(1e-9)
        );
    }
    Ok(text)
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
    let v = model.config.vocab_size;
    let (all, mut state) = model.prefill(&ids, 1, ids.len());
    let mut logits = data(&all)[(ids.len() - 1) * v..].to_vec();
    let sampling = Sampling { temperature: 0.8, top_k: 0, top_p: 1.0 };
    let (mut rng, mut scratch, mut out) = (Rng::new(seed), Vec::new(), Vec::with_capacity(n));
    for i in 0..n {
        let next = pick(&logits, &sampling, &mut rng, &mut scratch);
        out.push(next);
        if i + 1 < n {
            model.step(&[next], &mut state, &mut logits);
        }
    }
    format!("{prompt}{}", tok.decode(&out))
}
