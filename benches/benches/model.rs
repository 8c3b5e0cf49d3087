//! Whole-model training steps, 2 threads, elements are tokens:
//! - `model/{mamba1-S, mamba2-S}/train_step` — forward, loss and backward of the "S" configs
//!   (vocab 256, d_model 256, 4 layers, d_state 16; Mamba-2 with headdim 64 and chunk 64) on a
//!   batch of 8 × 256 tokens;
//! - `model/mamba1-130m/{finetune_full, finetune_lora}` — a whole fine-tuning step (forward,
//!   loss, backward, clipping, AdamW) of the mamba-130m shape (vocab 50,280, d_model 768, 24
//!   layers) on 2 × 256 tokens: every parameter trained, or LoRA adapters of rank 8 on
//!   `in_proj` and `x_proj` with the base frozen.

use std::hint::black_box;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use mamba_benches::{config, pools};
use mamba_nn::config::MambaConfig;
use mamba_nn::model::{LoraConfig, MambaLM};
use mamba_nn::params::Grads;
use mamba_nn::tape::Tape;
use mamba_train::optim::{AdamW, AdamWConfig, clip_grad_norm};

fn bench_model(cr: &mut Criterion, name: &str, cfg: MambaConfig) {
    // As the `mamba` binary does: freed activations stay in the heap for the next step.
    mamba_nn::tensor::keep_freed_memory();
    let (batch, seqlen) = (8, 256);
    let model = MambaLM::new(cfg, 0).expect("valid config");
    let ids: Vec<usize> = (0..batch * seqlen).map(|i| (i * 7919 + 13) % 256).collect();
    let mut grads = Grads::new(&model.params);
    let mut grp = cr.benchmark_group(format!("model/{name}"));
    grp.throughput(Throughput::Elements((batch * seqlen) as u64));
    for (suffix, pool) in pools().into_iter().take(1) {
        grp.bench_function(format!("train_step{suffix}"), |bn| {
            pool.install(|| {
                bn.iter(|| {
                    grads.zero();
                    let mut tape = Tape::new(&model.params);
                    let (_, loss) = model.forward_loss(&mut tape, black_box(&ids), batch, seqlen);
                    tape.backward(loss, &mut grads);
                })
            })
        });
    }
    grp.finish();
}

/// One fine-tuning step of `model` per iteration, as `mamba train` runs it.
fn bench_finetune(cr: &mut Criterion, name: &str, model: &mut MambaLM) {
    mamba_nn::tensor::keep_freed_memory();
    let (batch, seqlen) = (2, 256);
    let ids: Vec<usize> = (0..batch * (seqlen + 1)).map(|i| (i * 7919 + 13) % 50_000).collect();
    let mut grads = Grads::new(&model.params);
    let mut opt = AdamW::new(&model.params, AdamWConfig::default());
    let mut grp = cr.benchmark_group("model/mamba1-130m");
    grp.throughput(Throughput::Elements((batch * seqlen) as u64));
    let (_, pool) = pools().into_iter().next().expect("a 2-thread pool");
    grp.bench_function(name, |bn| {
        pool.install(|| {
            bn.iter(|| {
                grads.zero();
                let mut tape = Tape::new(&model.params);
                let (_, loss) = model.forward_loss(&mut tape, black_box(&ids), batch, seqlen + 1);
                tape.backward(loss, &mut grads);
                drop(tape);
                clip_grad_norm(&model.params, &mut grads, 1.0);
                opt.step(&mut model.params, &grads, 1e-4);
            })
        })
    });
    grp.finish();
}

fn benches(cr: &mut Criterion) {
    let shape = MambaConfig::mamba1(50_280, 768, 24);
    let mut full = MambaLM::new(shape.clone(), 0).expect("valid config");
    bench_finetune(cr, "finetune_full", &mut full);
    drop(full);
    let mut lora = MambaLM::new(shape, 0).expect("valid config");
    let targets = vec!["in_proj".to_string(), "x_proj".to_string()];
    lora.add_lora(&LoraConfig { rank: 8, alpha: 16.0, targets, rslora: false }, 0).expect("valid targets");
    bench_finetune(cr, "finetune_lora", &mut lora);
    drop(lora);
    bench_model(cr, "mamba1-S", MambaConfig::mamba1(256, 256, 4));
    let mut m2 = MambaConfig::mamba2(256, 256, 4);
    (m2.d_state, m2.headdim, m2.chunk_size) = (16, 64, 64);
    bench_model(cr, "mamba2-S", m2);
}

criterion_group! {
    name = group;
    config = config();
    targets = benches
}
criterion_main!(group);
