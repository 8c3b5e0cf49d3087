//! Where a training step's time goes, op by op.
//!
//! Runs forward + loss + backward of the "S" configs the `model/*/train_step` benchmarks use
//! (vocab 256, d_model 256, 4 layers, d_state 16; B8 L256) on a profiled tape and prints each
//! op's forward and backward wall-clock time, summed over the steps, and the median step.
//!
//! ```text
//! cargo run --release -p mamba-nn --example profile_step -- mamba2 20
//! ```
//! Arguments: the architecture (`mamba1` or `mamba2`, default `mamba2`) and the number of
//! profiled steps (default 10; two unprofiled warm-up steps come first).

use std::time::Instant;

use mamba_nn::config::MambaConfig;
use mamba_nn::model::MambaLM;
use mamba_nn::params::Grads;
use mamba_nn::tape::{Profile, Tape};

fn main() {
    // As the `mamba` binary does: freed activations stay in the heap for the next step.
    mamba_nn::tensor::keep_freed_memory();
    // Inside a pool, as the benchmark and the CLI run a step: the step's serial parts then run on
    // a worker, not on a third thread that sleeps through every parallel region.
    let pool = rayon::ThreadPoolBuilder::new().build().expect("a rayon pool");
    pool.install(run);
}

fn run() {
    let mut args = std::env::args().skip(1);
    let arch = args.next().unwrap_or_else(|| "mamba2".into());
    let steps: usize = args.next().map_or(10, |s| s.parse().expect("steps must be a whole number"));
    let cfg = match arch.as_str() {
        "mamba1" => MambaConfig::mamba1(256, 256, 4),
        "mamba2" => {
            let mut c = MambaConfig::mamba2(256, 256, 4);
            (c.d_state, c.headdim, c.chunk_size) = (16, 64, 64);
            c
        }
        other => panic!("unknown architecture `{other}` (expected mamba1 or mamba2)"),
    };
    let (batch, seqlen) = (8, 256);
    let model = MambaLM::new(cfg, 0).expect("valid config");
    let ids: Vec<usize> = (0..batch * seqlen).map(|i| (i * 7919 + 13) % 256).collect();
    let mut grads = Grads::new(&model.params);
    let mut total = Profile::default();
    let mut times = Vec::new();
    for step in 0..steps + 2 {
        grads.zero();
        let t0 = Instant::now();
        let mut tape = Tape::profiled(&model.params);
        let (_, loss) = model.forward_loss(&mut tape, &ids, batch, seqlen);
        tape.backward(loss, &mut grads);
        if step >= 2 {
            times.push(t0.elapsed().as_secs_f64());
            total.merge(tape.profile().expect("profiled tape"));
        }
    }
    println!("{arch}-S, B{batch} L{seqlen}, {steps} steps, {} threads", rayon::current_num_threads());
    print!("{}", total.table());
    times.sort_by(f64::total_cmp);
    let per_step = times[times.len() / 2];
    println!("median {:.1} ms/step, {:.0} tokens/s", per_step * 1e3, (batch * seqlen) as f64 / per_step);
}
