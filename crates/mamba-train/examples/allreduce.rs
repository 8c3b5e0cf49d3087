//! Times `Collective::all_reduce_sum` over MPI for a gradient-sized buffer: what a data-parallel
//! step adds to its compute (`docs/distributed.md`).
//!
//! ```text
//! cargo build --release -p mamba-train --features mpi --example allreduce
//! mpirun -np 2 target/release/examples/allreduce [FLOATS]   # default 1,817,856: the S model
//! ```
//!
//! Rank 0 prints one JSON line: `{"ranks", "floats", "bytes", "median_ms", "min_ms"}` over 30
//! timed calls after 5 warm-up calls.

use std::time::Instant;

use mamba_train::collective::{Collective, Mpi};

fn main() {
    let floats: usize = std::env::args().nth(1).map_or(1_817_856, |s| s.parse().expect("FLOATS: a number"));
    let comm = Mpi::init().expect("MPI initialises");
    let mut buf: Vec<f32> = (0..floats).map(|i| (i % 97) as f32 * 1e-3).collect();
    let mut times = Vec::new();
    for i in 0..35 {
        let t0 = Instant::now();
        comm.all_reduce_sum(&mut buf);
        if i >= 5 {
            times.push(t0.elapsed().as_secs_f64() * 1e3);
        }
        // Keep the values from growing without bound.
        buf.iter_mut().for_each(|v| *v /= comm.size() as f32);
    }
    times.sort_by(f64::total_cmp);
    if comm.rank() == 0 {
        println!(
            "{}",
            serde_json::json!({"ranks": comm.size(), "floats": floats, "bytes": floats * 4,
                               "median_ms": times[times.len() / 2], "min_ms": times[0]})
        );
    }
}
