//! `mamba eval`: next-token cross-entropy exactly as transformers computes it with
//! `labels = input_ids` (logits[:, :-1] against ids[:, 1:]), summed over every sequence and
//! divided by the number of predicted tokens.

use std::path::PathBuf;

use anyhow::{Context, bail};
use clap::Args;
use mamba_nn::model::MambaLM;
use mamba_nn::tape::Tape;
use mamba_nn::tensor::data;
use mamba_train::tokenizer::load_tokenizer;

/// Arguments of `mamba eval`.
#[derive(Args, Debug)]
pub struct EvalArgs {
    /// Model directory (config.json + model.safetensors; tokenizer.json if not byte-level).
    #[arg(long)]
    model: PathBuf,
    /// Text file (or directory of text files) to score, cut into sequences of --seq-len tokens.
    #[arg(long, required_unless_present = "tokens", conflicts_with = "tokens")]
    data: Option<PathBuf>,
    /// JSON file holding an array of arrays of token ids; each inner array is one sequence.
    #[arg(long)]
    tokens: Option<PathBuf>,
    /// Tokens per sequence when scoring --data.
    #[arg(long, default_value_t = 1024, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(2..))]
    seq_len: usize,
    /// Print one JSON line: {"loss": x, "tokens": n, "ppl": p} (plus "bits_per_byte" for --data).
    #[arg(long)]
    json: bool,
    /// Worker threads (0: one per core).
    #[arg(long, default_value_t = 0)]
    pub threads: usize,
}

/// Sum of next-token negative log-likelihoods of `seq` and the number of predictions.
fn score(model: &MambaLM, seq: &[usize]) -> (f64, usize) {
    if seq.len() < 2 {
        return (0.0, 0);
    }
    let mut tape = Tape::inference(&model.params);
    let (_, loss) = model.forward_loss(&mut tape, seq, 1, seq.len());
    let n = seq.len() - 1;
    (data(tape.value(loss))[0] as f64 * n as f64, n)
}

/// Scores the sequences and prints the loss, perplexity and bits per byte.
pub fn run(a: EvalArgs) -> anyhow::Result<()> {
    let model =
        MambaLM::from_pretrained(&a.model).with_context(|| format!("loading {}", a.model.display()))?;
    let (seqs, bytes): (Vec<Vec<usize>>, Option<usize>) = match (&a.data, &a.tokens) {
        (_, Some(path)) => (mamba_train::data::read_token_file(path)?, None),
        (Some(path), None) => {
            if a.seq_len < 2 {
                bail!("--seq-len must be at least 2, got {}", a.seq_len);
            }
            let tok = load_tokenizer(&a.model)?;
            let text = mamba_train::data::read_text(path)?;
            let ids = tok.encode(&text);
            (ids.chunks(a.seq_len).map(<[usize]>::to_vec).collect(), Some(text.len()))
        }
        (None, None) => bail!("give --data PATH or --tokens FILE.json"),
    };
    let input = a.data.as_ref().or(a.tokens.as_ref()).map(|p| p.display().to_string()).unwrap_or_default();
    for (i, s) in seqs.iter().enumerate() {
        model.check_ids(s).with_context(|| format!("{input}: sequence {i}"))?;
    }
    let (mut nll, mut n) = (0.0f64, 0usize);
    for s in &seqs {
        let (l, k) = score(&model, s);
        nll += l;
        n += k;
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
        outln!("{line}");
    } else {
        outln!("loss          {loss:.6} nats per token ({n} tokens)");
        outln!("perplexity    {ppl:.4}");
        if let Some(b) = bpb {
            outln!("bits per byte {b:.4}");
        }
    }
    Ok(())
}
