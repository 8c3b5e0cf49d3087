//! Times [`gemm_par`] on the GEMM shapes of one `model/mamba2-S/train_step` (B8 L256 = 2048
//! tokens, d_model 256, `in_proj` 256 → 1064, `out_proj` 512 → 256, tied `lm_head` 256 → 256,
//! 4 layers) with the operand layouts `linear` uses, and again with `A` column-major and `B`
//! row-major — the layouts `matrixmultiply` packs with contiguous copies rather than element
//! gathers. Prints each shape's median time and GFLOP/s, and the GEMM total of one step.
//!
//! ```text
//! cargo run --release -p ssm-kernel --example gemm_shapes -- [REPS]
//! ```

use std::time::Instant;

use ssm_kernel::gemm::gemm_par;

/// (name, (m, k, n), A strides, B strides, calls per step).
type Shape = (&'static str, (usize, usize, usize), (usize, usize), (usize, usize), usize);

/// Median seconds of `reps` calls of `f` after two warm-up calls.
fn median(reps: usize, mut f: impl FnMut()) -> f64 {
    let mut times: Vec<f64> = (0..reps + 2)
        .map(|_| {
            let t0 = Instant::now();
            f();
            t0.elapsed().as_secs_f64()
        })
        .skip(2)
        .collect();
    times.sort_by(f64::total_cmp);
    times[times.len() / 2]
}

fn main() {
    let reps: usize = std::env::args().nth(1).map_or(20, |s| s.parse().expect("REPS must be a whole number"));
    let t = 2048;
    // linear: y = x·Wᵀ (x row-major, W (out, in) row-major), dx = dy·W, dW = dyᵀ·x.
    let shapes: [Shape; 9] = [
        ("in_proj fwd", (t, 256, 1064), (256, 1), (1, 256), 4),
        ("in_proj dX", (t, 1064, 256), (1064, 1), (256, 1), 4),
        ("in_proj dW", (1064, t, 256), (1, 1064), (256, 1), 4),
        ("out_proj fwd", (t, 512, 256), (512, 1), (1, 512), 4),
        ("out_proj dX", (t, 256, 512), (256, 1), (512, 1), 4),
        ("out_proj dW", (256, t, 512), (1, 256), (512, 1), 4),
        ("lm_head fwd", (t, 256, 256), (256, 1), (1, 256), 1),
        ("lm_head dX", (t, 256, 256), (256, 1), (256, 1), 1),
        ("lm_head dW", (256, t, 256), (1, 256), (256, 1), 1),
    ];
    let fill = |len: usize, s: usize| -> Vec<f32> {
        (0..len).map(|i| ((i * s % 97) as f32 - 48.0) / 48.0).collect()
    };
    println!("{} threads; per call: median ms, GFLOP/s", rayon::current_num_threads());
    println!("{:>13} {:>17}  {:>18}  {:>18}", "", "m × k × n", "as linear calls it", "A col-, B row-major");
    let (mut total, mut total_fast, mut flops) = (0.0, 0.0, 0.0);
    for (name, (m, k, n), sa, sb, calls) in shapes {
        let (a, b) = (fill(m * k, 37), fill(k * n, 53));
        let mut c = vec![0.0f32; m * n];
        let f = 2.0 * (m * k * n) as f64;
        let as_called = median(reps, || gemm_par((m, k, n), 1.0, &a, sa, &b, sb, 0.0, &mut c, (n, 1)));
        let fast = median(reps, || gemm_par((m, k, n), 1.0, &a, (1, m), &b, (n, 1), 0.0, &mut c, (n, 1)));
        println!(
            "{name:>13} {m:>5}×{k:>5}×{n:>5}  {:7.3} {:7.1}     {:7.3} {:7.1}",
            as_called * 1e3,
            f / as_called * 1e-9,
            fast * 1e3,
            f / fast * 1e-9
        );
        total += as_called * calls as f64;
        total_fast += fast * calls as f64;
        flops += f * calls as f64;
    }
    println!(
        "one step: {:.1} GFLOP in {:.1} ms ({:.1} GFLOP/s); with the contiguous-pack layouts {:.1} ms",
        flops * 1e-9,
        total * 1e3,
        flops / total * 1e-9,
        total_fast * 1e3
    );
}
