//! Training steps of the "S" model (Mamba-1: vocabulary 256, d_model 256, 4 layers, d_state 16)
//! at one window length, timed: what `cargo xtask bench long` runs once per configuration, in a
//! process of its own so that its peak memory is the configuration's.
//!
//! ```text
//! cargo run --release -p mamba-train --example train_window -- --seq-len 16384 --batch 1 \
//!     [--checkpoint-layers [--checkpoint-piece TOKENS]] [--steps 3] [--n-layer 4]
//! ```
//!
//! `--n-layer` deepens the model (same widths), `--mamba2` trains the Mamba-2 S model instead,
//! `--packed` lays documents into the windows (starts where a random token is 0 mod 100). Prints one JSON line: `{"seq_len", "batch",
//! "n_layer", "checkpoint_layers", "steps", "step_s" (median of
//! the timed steps, after one warm-up step), "tokens_per_s"}`. Each step is a whole training
//! step on random tokens: forward, loss, backward, clipping and AdamW.

use std::time::Instant;

use mamba_nn::config::MambaConfig;
use mamba_nn::model::{MambaLM, SeqLayout};
use mamba_nn::params::Grads;
use mamba_nn::tape::Tape;
use mamba_train::data::Rng;
use mamba_train::optim::{AdamW, AdamWConfig, clip_grad_norm};

fn arg<T: std::str::FromStr>(args: &[String], name: &str, default: T) -> T {
    match args.iter().position(|a| a == name) {
        Some(i) => args
            .get(i + 1)
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("{name} needs a number after it")),
        None => default,
    }
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let seq_len: usize = arg(&args, "--seq-len", 256);
    let batch: usize = arg(&args, "--batch", 8);
    let steps: usize = arg(&args, "--steps", 3);
    let n_layer: usize = arg(&args, "--n-layer", 4);
    let checkpoint = args.iter().any(|a| a == "--checkpoint-layers");
    let cfg = match args.iter().any(|a| a == "--mamba2") {
        true => MambaConfig { chunk_size: 64, ..MambaConfig::mamba2(256, 256, n_layer) },
        false => MambaConfig::mamba1(256, 256, n_layer),
    };
    let packed = args.iter().any(|a| a == "--packed");
    let mut model = MambaLM::new(cfg, 0).expect("the S config is valid");
    model.backbone.checkpoint_layers = checkpoint;
    model.backbone.checkpoint_piece = arg(&args, "--checkpoint-piece", model.backbone.checkpoint_piece);
    let mut opt = AdamW::new(&model.params, AdamWConfig::default());
    let mut grads = Grads::new(&model.params);
    let mut rng = Rng::new(1);
    let mut times = Vec::with_capacity(steps);
    for step in 0..=steps {
        // Windows of seq_len inputs plus the last target, as the trainer draws them.
        let ids: Vec<usize> = (0..batch * (seq_len + 1)).map(|_| rng.below(256) as usize).collect();
        let t0 = Instant::now();
        grads.zero();
        {
            let mut tape = Tape::new(&model.params);
            tape.release_values_in_backward();
            // --packed: documents of 100 tokens on average, reset at each start.
            let seq = match packed {
                true => SeqLayout::packed(ids.iter().map(|&t| t % 100 == 0).collect::<Vec<bool>>()),
                false => SeqLayout::default(),
            };
            let (_, loss) = model.forward_loss_seq(&mut tape, &ids, batch, seq_len + 1, &seq);
            tape.backward(loss, &mut grads);
        }
        clip_grad_norm(&model.params, &mut grads, 1.0);
        opt.step(&mut model.params, &grads, 1e-3);
        if step > 0 {
            times.push(t0.elapsed().as_secs_f64());
        }
    }
    times.sort_by(f64::total_cmp);
    let median = times[times.len() / 2];
    let line = serde_json::json!({
        "seq_len": seq_len,
        "batch": batch,
        "n_layer": n_layer,
        "checkpoint_layers": checkpoint,
        "steps": steps,
        "step_s": median,
        "tokens_per_s": (batch * seq_len) as f64 / median,
    });
    println!("{line}");
}
