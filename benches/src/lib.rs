//! Shared setup of the `ssm-kernel` criterion benchmarks (the bench targets live in `benches/`).
//!
//! Run everything and write `target/bench/report.{json,md}` with `cargo xtask bench [FILTER]`.
//!
//! Bench ids read `<family>/<kernel>/<op>/<shape>`, e.g. `scan/mamba1/fwd/B8-L256-D512-N16`; each
//! fast kernel runs on a 2-thread pool (no suffix) and a 1-thread pool (suffix `/t1`), and the
//! naive reference loops run under `<op>_ref` (single-threaded by construction). Throughput is
//! counted in honest elements: state updates for scans (`B·L·D·N`, Mamba-2 `B·L·H·P·N`) and
//! multiply-adds for the conv (`B·L·C·K`).

use std::time::Duration;

use criterion::{BenchmarkGroup, Criterion, SamplingMode, measurement::WallTime};
use rayon::ThreadPool;
use ssm_kernel::testing::Rng;

/// Criterion settings for a 2-core machine: 10 samples, 1 s warm-up, 2.5 s of measurement.
pub fn config() -> Criterion {
    Criterion::default()
        .sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_millis(2500))
}

/// The pools every fast kernel is measured on, with the id suffix of each: 2 threads (`""`) and
/// 1 thread (`"/t1"`).
pub fn pools() -> Vec<(&'static str, ThreadPool)> {
    [(2, ""), (1, "/t1")]
        .into_iter()
        .map(|(n, suffix)| {
            let pool = rayon::ThreadPoolBuilder::new().num_threads(n).build().expect("build rayon pool");
            (suffix, pool)
        })
        .collect()
}

/// Settings for the slow naive reference loops: the minimum 10 samples of one iteration each
/// (flat sampling), a short warm-up.
pub fn slow(group: &mut BenchmarkGroup<'_, WallTime>) {
    group
        .sampling_mode(SamplingMode::Flat)
        .sample_size(10)
        .warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_secs(1));
}

/// Restores [`config`]'s settings on a group after [`slow`].
pub fn fast(group: &mut BenchmarkGroup<'_, WallTime>) {
    group
        .sampling_mode(SamplingMode::Auto)
        .sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_millis(2500));
}

/// `n` values uniform in `[lo, hi)` from a fixed-seed generator.
pub fn uniform(rng: &mut Rng, n: usize, lo: f64, hi: f64) -> Vec<f32> {
    (0..n).map(|_| rng.uniform(lo, hi) as f32).collect()
}
