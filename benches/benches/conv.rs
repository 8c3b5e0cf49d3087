//! Causal depthwise conv benchmarks: `conv/{fwd, fwd_bwd, step, fwd_ref}/…`.
//!
//! Elements are multiply-adds, `B·L·C·K` per call (`B·C·K` for a step).

use std::hint::black_box;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use mamba_benches::{config, fast, pools, slow, uniform};
use ssm_kernel::conv::{self, ConvArgs, ConvDims, ConvGrads, ConvOut};
use ssm_kernel::reference;
use ssm_kernel::testing::Rng;

/// Inputs and buffers of one conv problem.
struct Problem {
    dims: ConvDims,
    x: Vec<f32>,
    w: Vec<f32>,
    bias: Vec<f32>,
    dy: Vec<f32>,
}

impl Problem {
    fn new(dims: ConvDims) -> Self {
        let mut r = Rng(1);
        Self {
            dims,
            x: uniform(&mut r, dims.n_blc(), -1.0, 1.0),
            w: uniform(&mut r, dims.n_ck(), -0.5, 0.5),
            bias: uniform(&mut r, dims.channels, -0.1, 0.1),
            dy: uniform(&mut r, dims.n_blc(), -1.0, 1.0),
        }
    }

    /// Mamba's configuration: bias and fused SiLU.
    fn args(&self) -> ConvArgs<'_, f32> {
        ConvArgs { x: &self.x, weight: &self.w, bias: Some(&self.bias), silu: true, resets: None }
    }
}

fn bench_conv(c: &mut Criterion) {
    let (b, l, ch, k) = (8, 256, 1024, 4);
    let p = Problem::new(ConvDims::new(b, l, ch, k));
    let dims = p.dims;
    let args = p.args();
    let shape = format!("B{b}-L{l}-C{ch}-K{k}");
    let mut y = vec![0.0f32; dims.n_blc()];
    let mut dx = vec![0.0f32; dims.n_blc()];
    let mut dw = vec![0.0f32; dims.n_ck()];
    let mut db = vec![0.0f32; ch];

    let mut g = c.benchmark_group("conv");
    g.throughput(Throughput::Elements((b * l * ch * k) as u64));
    for (suffix, pool) in &pools() {
        g.bench_function(format!("fwd/{shape}{suffix}"), |bn| {
            pool.install(|| {
                bn.iter(|| conv::conv1d_fwd(&dims, &args, ConvOut { y: black_box(&mut y), state_out: None }))
            })
        });
        g.bench_function(format!("fwd_bwd/{shape}{suffix}"), |bn| {
            pool.install(|| {
                bn.iter(|| {
                    conv::conv1d_fwd(&dims, &args, ConvOut { y: black_box(&mut y), state_out: None });
                    conv::conv1d_bwd(
                        &dims,
                        &args,
                        &p.dy,
                        ConvGrads { dx: black_box(&mut dx), dweight: &mut dw, dbias: Some(&mut db) },
                    );
                })
            })
        });
    }

    // One decode step over the same channels.
    let d1 = ConvDims::new(b, 1, ch, k);
    let mut state = vec![0.0f32; d1.n_bck()];
    let mut y1 = vec![0.0f32; b * ch];
    let x1 = &p.x[..b * ch];
    let step_args = ConvArgs { x: x1, ..args };
    g.throughput(Throughput::Elements((b * ch * k) as u64));
    for (suffix, pool) in &pools() {
        g.bench_function(format!("step/B{b}-C{ch}-K{k}{suffix}"), |bn| {
            pool.install(|| bn.iter(|| conv::conv1d_step(&d1, &step_args, &mut state, black_box(&mut y1))))
        });
    }

    g.throughput(Throughput::Elements((b * l * ch * k) as u64));
    slow(&mut g);
    g.bench_function(format!("fwd_ref/{shape}"), |bn| {
        bn.iter(|| {
            reference::conv::conv1d_fwd(&dims, &args, ConvOut { y: black_box(&mut y), state_out: None })
        })
    });
    g.bench_function(format!("fwd_bwd_ref/{shape}"), |bn| {
        bn.iter(|| {
            reference::conv::conv1d_fwd(&dims, &args, ConvOut { y: black_box(&mut y), state_out: None });
            reference::conv::conv1d_bwd(
                &dims,
                &args,
                &p.dy,
                ConvGrads { dx: black_box(&mut dx), dweight: &mut dw, dbias: Some(&mut db) },
            );
        })
    });
    fast(&mut g);
    g.finish();
}

criterion_group! {
    name = benches;
    config = config();
    targets = bench_conv
}
criterion_main!(benches);
