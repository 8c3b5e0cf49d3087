//! `mamba eval`: next-token cross-entropy exactly as transformers computes it with
//! `labels = input_ids` (logits[:, :-1] against ids[:, 1:]), summed over every sequence and
//! divided by the number of predicted tokens. Sequences run through the chunked prefill path
//! (no tape), so memory does not grow with `--seq-len`.

use std::path::PathBuf;

use anyhow::{Context, bail};
use clap::Args;
use mamba_nn::model::{Cache, Decoder};
use mamba_train::tokenizer::load_tokenizer;

/// Arguments of `mamba eval`.
#[derive(Args, Debug)]
pub struct EvalArgs {
    /// Model directory (config.json + model.safetensors; tokenizer.json if not byte-level).
    #[arg(long)]
    model: PathBuf,
    /// Text to score: a text file, cut into sequences of --seq-len tokens; or documents — a
    /// .jsonl file (one JSON object per line, the document in its "text" field) or a directory
    /// of text files (each one document) — each scored whole from a fresh state.
    #[arg(long, required_unless_present = "tokens", conflicts_with = "tokens")]
    data: Option<PathBuf>,
    /// JSON file holding an array of arrays of token ids; each inner array is one sequence.
    #[arg(long)]
    tokens: Option<PathBuf>,
    /// Tokens per sequence when scoring --data.
    #[arg(long, default_value_t = 1024, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(2..))]
    seq_len: usize,
    /// Score the whole input as one stream: each sequence starts from the state the previous
    /// one left (and its first token is predicted) instead of from the empty state.
    #[arg(long)]
    carry_state: bool,
    /// Precede each document with the model's end-of-document token (config.json's
    /// eos_token_id), as `mamba train --packing reset|plain` lays documents out, so that each
    /// document's first token is scored too.
    #[arg(long, requires = "data", conflicts_with = "carry_state")]
    eos_prefix: bool,
    /// Print one JSON line: {"loss": x, "tokens": n, "ppl": p} (plus "bits_per_byte" for --data,
    /// and "documents" when documents are scored one by one).
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

/// Sum of next-token negative log-likelihoods of `seq` and the number of predictions, run in
/// chunks through `dec` (bounded memory for any length) from the state in `cache`.
fn score(dec: &mut Decoder, cache: &mut Cache, seq: &[usize]) -> (f64, usize) {
    if seq.len() < 2 {
        return (0.0, 0);
    }
    let n = seq.len() - 1;
    (dec.score(&seq[..n], &seq[1..], cache), n)
}

/// Scores the sequences and prints the loss, perplexity and bits per byte.
pub fn run(a: EvalArgs) -> anyhow::Result<()> {
    let model = crate::model_dir::load(&a.model, a.adapter.as_deref(), a.dtype)?;
    let mut documents = None;
    let (seqs, bytes): (Vec<Vec<usize>>, Option<usize>) = match (&a.data, &a.tokens) {
        (_, Some(path)) => (mamba_train::data::read_token_file(path)?, None),
        (Some(path), None) => {
            if a.seq_len < 2 {
                bail!("--seq-len must be at least 2, got {}", a.seq_len);
            }
            let tok = load_tokenizer(&a.model)?;
            let docs = mamba_train::data::read_documents(path)?;
            let bytes = docs.iter().map(|d| d.text.len()).sum();
            let prefix = match (a.eos_prefix, model.config.special_tokens.eos) {
                (false, _) => None,
                (true, Some(e)) => Some(e as usize),
                (true, None) => {
                    bail!("--eos-prefix: {} names no eos_token_id", a.model.join("config.json").display())
                }
            };
            let ids: Vec<Vec<usize>> =
                docs.iter().map(|d| prefix.into_iter().chain(tok.encode(&d.text)).collect()).collect();
            if ids.len() > 1 && !a.carry_state {
                // Documents: each one whole, from the empty state (the decoder runs it in
                // chunks, so memory does not grow with its length).
                documents = Some(ids.len());
                (ids, Some(bytes))
            } else {
                (ids.concat().chunks(a.seq_len).map(<[usize]>::to_vec).collect(), Some(bytes))
            }
        }
        (None, None) => bail!("give --data PATH or --tokens FILE.json"),
    };
    let input = a.data.as_ref().or(a.tokens.as_ref()).map(|p| p.display().to_string()).unwrap_or_default();
    for (i, s) in seqs.iter().enumerate() {
        model.check_ids(s).with_context(|| format!("{input}: sequence {i}"))?;
    }
    let (mut nll, mut n) = (0.0f64, 0usize);
    let mut dec = Decoder::new(&model, 1);
    let mut cache = Cache::new(&model, 1);
    if a.carry_state {
        // One stream: each sequence continues the previous one's state, and its first token is
        // predicted from the previous sequence's last.
        let stream: Vec<usize> = seqs.concat();
        (nll, n) = score(&mut dec, &mut cache, &stream);
    } else {
        for s in &seqs {
            cache.reset();
            let (l, k) = score(&mut dec, &mut cache, s);
            nll += l;
            n += k;
        }
    }
    if n == 0 {
        bail!("nothing to score in {input}: every sequence has fewer than 2 tokens");
    }
    let loss = nll / n as f64;
    if !loss.is_finite() {
        bail!(
            "the loss on {input} is {loss} (not finite): the model's outputs overflow on this input; \
             no score is printed"
        );
    }
    let ppl = loss.exp();
    // With --data every predicted token is counted against the bytes it covers (the first
    // token of each sequence is not predicted, so this is a slight over-estimate per sequence).
    let bpb = bytes.map(|b| nll / std::f64::consts::LN_2 / b as f64);
    if a.json {
        let mut line = serde_json::json!({ "loss": loss, "tokens": n, "ppl": ppl });
        if let Some(b) = bpb {
            line["bits_per_byte"] = serde_json::json!(b);
        }
        if let Some(d) = documents {
            line["documents"] = serde_json::json!(d);
        }
        outln!("{line}");
    } else {
        let docs = documents.map(|d| format!(", {d} documents each from a fresh state")).unwrap_or_default();
        outln!("loss          {loss:.6} nats per token ({n} tokens{docs})");
        outln!("perplexity    {ppl:.4}");
        if let Some(b) = bpb {
            outln!("bits per byte {b:.4}");
        }
    }
    Ok(())
}
