//! `cargo xtask machine`: what this machine can do, measured now — DRAM read bandwidth and f32
//! FMA peak, on 1 thread and on every thread asked for. Decode of a model too big for the caches
//! reads every weight once per token, so bandwidth / bytes per token bounds its tokens/s; the
//! bench report states each decode row against that bound.
//!
//! Bandwidth: each thread sums its slice of a 1 GiB buffer (far larger than any cache) with
//! wrapping integer adds, which vectorise freely and never limit the loop; the best of several
//! passes counts. FMA peak: each thread runs independent chains of 8-wide fused multiply-adds
//! (16 accumulators, enough to hide the FMA latency).

use std::hint::black_box;
use std::time::Instant;

/// Measured figures.
#[derive(Clone, Copy, Debug)]
pub struct Machine {
    /// Threads of the multi-threaded figures.
    pub threads: usize,
    /// DRAM read bandwidth, bytes/s, one thread.
    pub bandwidth_1: f64,
    /// DRAM read bandwidth, bytes/s, `threads` threads.
    pub bandwidth: f64,
    /// f32 FMA throughput, flop/s (an FMA is 2), one thread.
    pub flops_1: f64,
    /// The same on `threads` threads.
    pub flops: f64,
}

const BUF_BYTES: usize = 1 << 30;
const PASSES: usize = 5;

/// Measures with `threads` threads.
pub fn measure(threads: usize) -> Machine {
    let words = BUF_BYTES / 8;
    // Touch every page (distinct values, so nothing is deduplicated or zero-page backed).
    let buf: Vec<u64> = (0..words as u64).map(|i| i.wrapping_mul(0x9E37_79B9_7F4A_7C15)).collect();
    let bandwidth_1 = read_bandwidth(&buf, 1);
    let bandwidth = read_bandwidth(&buf, threads);
    drop(buf);
    Machine { threads, bandwidth_1, bandwidth, flops_1: fma_peak(1), flops: fma_peak(threads) }
}

fn read_bandwidth(buf: &[u64], threads: usize) -> f64 {
    let chunk = buf.len().div_ceil(threads);
    let mut best = f64::INFINITY;
    for _ in 0..PASSES {
        let t0 = Instant::now();
        std::thread::scope(|s| {
            for part in buf.chunks(chunk) {
                s.spawn(move || black_box(sum(part)));
            }
        });
        best = best.min(t0.elapsed().as_secs_f64());
    }
    std::mem::size_of_val(buf) as f64 / best
}

fn sum(v: &[u64]) -> u64 {
    let mut acc = [0u64; 8];
    let mut chunks = v.chunks_exact(8);
    for c in &mut chunks {
        for (a, x) in acc.iter_mut().zip(c) {
            *a = a.wrapping_add(*x);
        }
    }
    acc.iter().chain(chunks.remainder()).fold(0u64, |a, &x| a.wrapping_add(x))
}

fn fma_peak(threads: usize) -> f64 {
    const ITERS: usize = 20_000_000;
    let mut best = f64::INFINITY;
    for _ in 0..3 {
        let t0 = Instant::now();
        std::thread::scope(|s| {
            for i in 0..threads {
                s.spawn(move || black_box(fma_chains(ITERS, black_box(1.0 + i as f32 * 1e-9))));
            }
        });
        best = best.min(t0.elapsed().as_secs_f64());
    }
    // 16 accumulators × 8 lanes × 2 flops per iteration and thread.
    (threads * ITERS * 16 * 8 * 2) as f64 / best
}

/// `ITERS` rounds of 16 independent 8-wide FMAs `acc = acc · m + c`: with AVX2 + FMA where the
/// CPU has them (checked at run time; the workspace is not built for a particular CPU), else the
/// portable loop.
fn fma_chains(iters: usize, m: f32) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
        // SAFETY: the CPU has the features the function is compiled for (checked just above).
        return unsafe { fma_chains_avx2(iters, m) };
    }
    fma_chains_portable(iters, m)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx,avx2,fma")]
fn fma_chains_avx2(iters: usize, m: f32) -> f32 {
    use std::arch::x86_64::*;
    let (mv, cv) = (_mm256_set1_ps(m), _mm256_set1_ps(1e-7));
    let mut acc = [_mm256_set1_ps(0.5); 16];
    for _ in 0..iters {
        for a in &mut acc {
            *a = _mm256_fmadd_ps(*a, mv, cv);
        }
    }
    let mut out = [0f32; 8];
    let mut total = _mm256_setzero_ps();
    for a in acc {
        total = _mm256_add_ps(total, a);
    }
    // SAFETY: `out` holds 8 floats.
    unsafe { _mm256_storeu_ps(out.as_mut_ptr(), total) };
    out.iter().sum()
}

/// Portable form (scalar `a·m + c` on arrays, vectorised where the target allows).
fn fma_chains_portable(iters: usize, m: f32) -> f32 {
    let mut acc = [[0.5f32; 8]; 16];
    for _ in 0..iters {
        for a in &mut acc {
            for x in a.iter_mut() {
                *x = *x * m + 1e-7;
            }
        }
    }
    acc.iter().flatten().sum()
}

/// The report printed by `cargo xtask machine`.
pub fn report(m: &Machine) -> String {
    let gb = |b: f64| b / 1e9;
    format!(
        "DRAM read bandwidth   1 thread: {:6.1} GB/s   {} threads: {:6.1} GB/s\n\
         f32 FMA peak          1 thread: {:6.1} GFLOP/s   {} threads: {:6.1} GFLOP/s\n",
        gb(m.bandwidth_1),
        m.threads,
        gb(m.bandwidth),
        m.flops_1 / 1e9,
        m.threads,
        m.flops / 1e9
    )
}
