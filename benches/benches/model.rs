//! Whole-model training steps: `model/{mamba1-S, mamba2-S}/train_step` — forward, loss and
//! backward of the "S" configs (vocab 256, d_model 256, 4 layers, d_state 16; Mamba-2 with
//! headdim 64 and chunk 64) on a batch of 8 × 256 tokens, 2 threads. Elements are tokens.

use std::hint::black_box;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use mamba_benches::{config, pools};
use mamba_nn::config::MambaConfig;
use mamba_nn::model::MambaLM;
use mamba_nn::params::Grads;
use mamba_nn::tape::Tape;

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

fn benches(cr: &mut Criterion) {
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
