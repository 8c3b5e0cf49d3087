//! Generation through the library API on a model directory (config.json + model.safetensors,
//! any Hugging Face Mamba or Mamba-2 checkpoint): greedy, then sampled, then a batch of prompts
//! decoded in lockstep with a [`Decoder`] and a [`Cache`].
//!
//! ```text
//! cargo run --release -p mamba-nn --example generate -- crates/mamba-nn/tests/fixtures/mamba1 1,2,3 10
//! ```
//! Arguments: the model directory, the prompt's token ids (comma-separated; default `1,2,3`) and
//! the number of new tokens (default 20). Token ids only: text needs a tokenizer, which
//! `mamba-train` (and `mamba generate --prompt`) adds.

use std::process::ExitCode;

use mamba_nn::model::{Cache, Decoder, MambaLM, Sampler, SamplingConfig, argmax};

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let dir = args.next().ok_or("usage: generate MODEL_DIR [PROMPT_IDS] [NEW_TOKENS]")?;
    let prompt: Vec<usize> = match args.next() {
        Some(s) => s.split(',').map(|t| t.trim().parse()).collect::<Result<_, _>>()?,
        None => vec![1, 2, 3],
    };
    let n: usize = args.next().map_or(Ok(20), |s| s.parse())?;

    let model = MambaLM::from_pretrained(&dir)?;
    let c = &model.config;
    println!("{dir}: {:?}, {} layers, d_model {}, vocab {}", c.arch, c.n_layer, c.d_model, c.vocab_size);

    // 1. Greedy: an iterator of tokens; prefill happens in `generate`, one recurrent step per token.
    let greedy: Vec<usize> = model.generate(&prompt, n, Sampler::greedy())?.collect();
    println!("greedy:  {prompt:?} -> {greedy:?}");

    // 2. Sampled (temperature, top-k, top-p, seed), streamed token by token.
    let cfg = SamplingConfig { temperature: 0.8, top_k: 50, top_p: 0.95 };
    let mut generation = model.generate(&prompt, n, Sampler::new(cfg, 42)?)?;
    print!("sampled: {prompt:?} ->");
    for token in generation.by_ref() {
        print!(" {token}");
    }
    println!(
        "\n         prefill {:.0} tokens/s, decode {:.0} tokens/s",
        generation.prefill_tokens_per_s(),
        generation.decode_tokens_per_s()
    );

    // 3. A batch of two prompts of equal length, greedy, with the lower-level Decoder and Cache.
    let batch = 2;
    let v = c.vocab_size;
    let second: Vec<usize> = prompt.iter().map(|&t| (t + 1) % v).collect();
    let ids: Vec<usize> = prompt.iter().chain(&second).copied().collect();
    let mut dec = Decoder::new(&model, batch);
    let mut cache = Cache::new(&model, batch);
    let mut logits = vec![0.0f32; batch * v];
    dec.prefill(&ids, &mut cache, &mut logits);
    let mut out = vec![Vec::new(); batch];
    for _ in 0..n {
        let next: Vec<usize> = logits.chunks_exact(v).map(argmax).collect();
        for (o, &t) in out.iter_mut().zip(&next) {
            o.push(t);
        }
        dec.step(&next, &mut cache, &mut logits);
    }
    assert_eq!(out[0], greedy, "the batched decoder's first row is the greedy continuation");
    println!("batch:   {second:?} -> {:?}", out[1]);
    Ok(())
}
