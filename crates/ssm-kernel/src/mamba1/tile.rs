//! A tile of up to 16 consecutive channels of one batch row: the unit of SIMD work of the fast
//! Mamba-1 kernels. Lane `l` of every vector is channel `d0 + l`; lanes past the last channel
//! are zero-filled and never stored.

use super::Scan1Args;
use crate::par::SharedMut;
use crate::simd::{self, Mask, V16};

/// Lanes of a tile: Mamba-1 kernels use 16-lane vectors.
pub(crate) const W: usize = 16;

/// How the lanes of a tile map to groups of `B`/`C`.
#[derive(Clone, Copy)]
pub(crate) enum Groups {
    /// Every lane uses group `g`: `B`/`C` values are broadcast.
    Uniform(usize),
    /// Lanes straddle groups (`D / G` is not a multiple of 8): lane `l` uses `g[l]`.
    Mixed([usize; W]),
}

/// Per-tile constants.
pub(crate) struct Tile<V: V16> {
    /// First channel.
    pub d0: usize,
    /// Channels in the tile (1..=8).
    pub w: usize,
    /// `A[d0 + l, n]` in lane `l` of `a[n]`.
    pub a: crate::pool::V16Buf<V>,
    /// `D[d0 + l]` (zero when absent).
    pub dskip: V,
    /// Δ bias (zero when absent).
    pub bias: V,
    pub groups: Groups,
    /// Every `Δ·A` of this tile is ≤ 0 (softplus makes Δ ≥ 0 and all its `A` are ≤ 0), so the
    /// cheaper [`simd::exp_nonpos`] applies.
    pub nonpos: bool,
}

impl<V: V16> Tile<V> {
    #[inline(always)]
    pub fn new(args: &Scan1Args<f32>, dim: usize, n: usize, group_size: usize, d0: usize) -> Self {
        let w = (dim - d0).min(W);
        // From this thread's pool (given back on drop): the tiles are rebuilt every call.
        let mut a = crate::pool::V16Buf::zeroed(n);
        for (k, ak) in a.iter_mut().enumerate() {
            let mut v = [0.0f32; W];
            for l in 0..w {
                v[l] = args.a[(d0 + l) * n + k];
            }
            *ak = V::from_array(v);
        }
        // Matches, not `map_or` closures: a closure LLVM does not inline is compiled for the
        // baseline.
        let dskip = match args.d {
            Some(d) => V::load(&d[d0..d0 + w]),
            None => V::ZERO,
        };
        let bias = match args.delta_bias {
            Some(b) => V::load(&b[d0..d0 + w]),
            None => V::ZERO,
        };
        let g0 = d0 / group_size;
        let glast = (d0 + w - 1) / group_size;
        let groups = if g0 == glast {
            Groups::Uniform(g0)
        } else {
            let mut g = [g0; W];
            for l in 0..w {
                g[l] = (d0 + l) / group_size;
            }
            Groups::Mixed(g)
        };
        let nonpos =
            args.delta_softplus && (d0..d0 + w).all(|d| args.a[d * n..(d + 1) * n].iter().all(|&v| v <= 0.0));
        Self { d0, w, a, dskip, bias, groups, nonpos }
    }

    /// Δ after bias and softplus, and d(Δ)/d(raw Δ), from the raw Δ vector.
    #[inline(always)]
    pub fn delta(&self, raw: V, softplus: bool, want_grad: bool) -> (V, V) {
        let v = raw + self.bias;
        if softplus {
            let (dt, sig) = simd::softplus_sigmoid(v);
            let g = if want_grad {
                let big = v.simd_gt(V::splat(20.0));
                big.select(V::splat(1.0), sig)
            } else {
                V::ZERO
            };
            (dt, g)
        } else {
            (v, V::splat(1.0))
        }
    }

    /// Reads the tile's lanes of a (…, D, N) state: `h[k]` lane `l` = `s[(d0 + l) * n + k]`
    /// where `s` starts at the batch row.
    #[inline(always)]
    pub fn load_state(&self, s: &[f32], n: usize, h: &mut [V]) {
        for (k, hk) in h.iter_mut().enumerate() {
            let mut v = [0.0f32; W];
            for l in 0..self.w {
                v[l] = s[(self.d0 + l) * n + k];
            }
            *hk = V::from_array(v);
        }
    }

    /// Writes (or adds, with `add`) the tile's lanes into a (…, D, N) state whose batch row
    /// starts at `base`: element `base + (d0 + l) * n + k` gets lane `l` of `h[k]`.
    ///
    /// # Safety
    /// No other task may touch this tile's channels of that batch row concurrently.
    #[inline(always)]
    pub unsafe fn store_state(&self, s: &SharedMut<f32>, base: usize, n: usize, h: &[V], add: bool) {
        for (k, hk) in h.iter().enumerate() {
            let v = hk.to_array();
            for l in 0..self.w {
                let i = base + (self.d0 + l) * n + k;
                // SAFETY: the caller owns these channels of the batch row.
                unsafe { if add { s.add(i, v[l]) } else { s.write(i, v[l]) } }
            }
        }
    }
}

/// `B`/`C` values of one time step as seen by the lanes of a tile.
pub(crate) trait Bc<V: V16> {
    /// `B[·, k]` per lane.
    fn b(&self, k: usize) -> V;
    /// `C[·, k]` per lane.
    fn c(&self, k: usize) -> V;
    /// Adds the lanes of `v` (first `w` of them) into column `k` of a (G, N) gradient row, each
    /// into the group its lane reads.
    fn accum(&self, dst: &mut [f32], k: usize, w: usize, v: V);
}

/// Every lane reads the same group: values are broadcast from one row of `N`.
pub(crate) struct UniformBc<'a> {
    /// The group's `N` values of `B` at this step.
    pub b: &'a [f32],
    /// The group's `N` values of `C` at this step.
    pub c: &'a [f32],
    /// `g · N`: the group's offset within a (G, N) row.
    pub goff: usize,
}

impl<V: V16> Bc<V> for UniformBc<'_> {
    #[inline(always)]
    fn b(&self, k: usize) -> V {
        V::splat(self.b[k])
    }
    #[inline(always)]
    fn c(&self, k: usize) -> V {
        V::splat(self.c[k])
    }
    #[inline(always)]
    fn accum(&self, dst: &mut [f32], k: usize, _w: usize, v: V) {
        dst[self.goff + k] += v.reduce_add();
    }
}

/// Lanes straddle groups: lane `l` reads `row[off[l] + k]` (gathered).
pub(crate) struct MixedBc<'a> {
    pub b: &'a [f32],
    pub c: &'a [f32],
    pub off: [usize; W],
}

impl<V: V16> Bc<V> for MixedBc<'_> {
    #[inline(always)]
    fn b(&self, k: usize) -> V {
        V::from_array(std::array::from_fn::<f32, W, _>(|l| self.b[self.off[l] + k]))
    }
    #[inline(always)]
    fn c(&self, k: usize) -> V {
        V::from_array(std::array::from_fn::<f32, W, _>(|l| self.c[self.off[l] + k]))
    }
    #[inline(always)]
    fn accum(&self, dst: &mut [f32], k: usize, w: usize, v: V) {
        let a = v.to_array();
        for l in 0..w {
            dst[self.off[l] + k] += a[l];
        }
    }
}

/// Lane offsets of a mixed tile within a (G, N) row: `g[l] · n`.
#[inline(always)]
pub(crate) fn mixed_offsets(gs: &[usize; W], n: usize) -> [usize; W] {
    std::array::from_fn(|l| gs[l] * n)
}

/// A small state buffer: a stack array when `NN > 0` (the compile-time state size, so loops over
/// `N` unroll and the state can live in registers), else a heap vector of the runtime size.
pub(crate) struct StateBuf<V: V16, const NN: usize> {
    arr: [V; NN],
    vec: crate::pool::V16Buf<V>,
}

impl<V: V16, const NN: usize> StateBuf<V, NN> {
    /// A zeroed buffer of `n` vectors (`n == NN` when `NN > 0`).
    #[inline(always)]
    pub fn new(n: usize) -> Self {
        debug_assert!(NN == 0 || NN == n);
        Self { arr: [V::ZERO; NN], vec: crate::pool::V16Buf::zeroed(if NN == 0 { n } else { 0 }) }
    }

    /// The buffer as a slice.
    #[inline(always)]
    pub fn get(&mut self) -> &mut [V] {
        if NN > 0 { &mut self.arr[..] } else { &mut self.vec[..] }
    }

    /// The buffer as a shared slice.
    #[inline(always)]
    pub fn arr_or_vec(&self) -> &[V] {
        if NN > 0 { &self.arr[..] } else { &self.vec[..] }
    }
}

/// Calls `f::<V, NN>()` with `NN` the compile-time state size for the common sizes (1, 2, 4, 8, 16,
/// 32, 64) and `NN = 0` (runtime size) otherwise.
macro_rules! dispatch_n {
    ($n:expr, $f:ident :: <$v:ty> ( $($arg:expr),* $(,)? )) => {
        match $n {
            1 => $f::<$v, 1>($($arg),*),
            2 => $f::<$v, 2>($($arg),*),
            4 => $f::<$v, 4>($($arg),*),
            8 => $f::<$v, 8>($($arg),*),
            16 => $f::<$v, 16>($($arg),*),
            32 => $f::<$v, 32>($($arg),*),
            64 => $f::<$v, 64>($($arg),*),
            _ => $f::<$v, 0>($($arg),*),
        }
    };
}
pub(crate) use dispatch_n;
