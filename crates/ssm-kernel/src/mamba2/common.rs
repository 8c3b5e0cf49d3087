//! Pieces shared by the sequential and chunked kernels.

use rayon::prelude::*;

use super::{Scan2Args, Scan2Dims};
use crate::Real;
use crate::par::SharedMut;
use crate::simd::{V8, W};

/// Effective Δ of flat (B, L, H) element `ih` of head `h` and `∂Δ_eff/∂Δ_raw`.
#[inline(always)]
pub(crate) fn dt_eff(args: &Scan2Args<f32>, ih: usize, h: usize) -> (f32, f32) {
    let mut v = args.delta[ih];
    if let Some(bias) = args.delta_bias {
        v += bias[h];
    }
    if args.delta_softplus { (v.softplus(), v.softplus_grad()) } else { (v, 1.0) }
}

/// Runs `$call` for `pv` vectors split into blocks of 8, then 4, then 1, with `$j0` the block's
/// first vector and `$m` its length as a constant (so `$call` can take it as a const generic).
/// A macro rather than a function taking a closure: a closure is compiled for the baseline
/// unless LLVM inlines it, and the kernels need it compiled into their instruction-set copies.
macro_rules! blocks {
    ($pv:expr, |$j0:ident, $m:ident| $call:expr) => {{
        let (pv, mut j) = ($pv, 0usize);
        while pv - j >= 8 {
            const $m: usize = 8;
            let $j0 = j;
            $call;
            j += 8;
        }
        if pv - j >= 4 {
            const $m: usize = 4;
            let $j0 = j;
            $call;
            j += 4;
        }
        while j < pv {
            const $m: usize = 1;
            let $j0 = j;
            $call;
            j += 1;
        }
    }};
}
pub(crate) use blocks;

/// `s[j0..j0 + M]` as an array (a plain loop: `std::array::from_fn`'s closure would be compiled
/// for the baseline unless inlined).
#[inline(always)]
pub(crate) fn take<V: Copy, const M: usize>(s: &[V], j0: usize) -> [V; M] {
    let mut a = [s[j0]; M];
    for (i, v) in a.iter_mut().enumerate().skip(1) {
        *v = s[j0 + i];
    }
    a
}

/// Copies a (P, N) state into the transposed, zero-padded (N, pv·8) vector layout.
#[inline(always)]
pub(crate) fn state_in<V: V8>(src: &[f32], pd: usize, n: usize, pv: usize, dst: &mut [V]) {
    let f = V::as_f32s_mut(dst);
    f.fill(0.0);
    for p in 0..pd {
        for k in 0..n {
            f[k * pv * W + p] = src[p * n + k];
        }
    }
}

/// Writes (or adds, when `add`) the (N, pv·8) vector state into a (P, N) slice.
#[inline(always)]
pub(crate) fn state_out<V: V8>(src: &[V], pd: usize, n: usize, pv: usize, dst: &mut [f32], add: bool) {
    let f = V::as_f32s(src);
    for p in 0..pd {
        for k in 0..n {
            let v = f[k * pv * W + p];
            if add {
                dst[p * n + k] += v;
            } else {
                dst[p * n + k] = v;
            }
        }
    }
}

/// Per-(b, h) task sums of the per-head gradients.
#[derive(Clone, Copy, Default, Debug)]
pub(crate) struct TaskScalars {
    pub da: f64,
    pub dd: f64,
    pub dbias: f64,
}

impl TaskScalars {
    /// Adds the task sums (tasks in (b, h) order) into the per-head gradient buffers; the bias
    /// gradient only when the args carry a bias (as the reference does).
    pub(crate) fn scatter(
        tasks: &[TaskScalars],
        dims: &Scan2Dims,
        args: &Scan2Args<f32>,
        da: &mut [f32],
        dd: Option<&mut [f32]>,
        dbias: Option<&mut [f32]>,
    ) {
        let h = dims.nheads;
        let mut sum = vec![TaskScalars::default(); h];
        for (i, s) in tasks.iter().enumerate() {
            let e = &mut sum[i % h];
            e.da += s.da;
            e.dd += s.dd;
            e.dbias += s.dbias;
        }
        for (i, e) in sum.iter().enumerate() {
            da[i] += e.da as f32;
        }
        if let Some(dd) = dd {
            for (i, e) in sum.iter().enumerate() {
                dd[i] += e.dd as f32;
            }
        }
        if let (Some(db), Some(_)) = (dbias, args.delta_bias) {
            for (i, e) in sum.iter().enumerate() {
                db[i] += e.dbias as f32;
            }
        }
    }
}

/// The per-head partials of `dB` and `dC`, (B, H, L, N) each and zeroed, from [`crate::pool`]:
/// the heads of a group share `B`/`C`, so each (b, h) task writes its own rows and
/// [`GroupPartials::finish`] sums them into the per-group gradients and gives the buffers back.
pub(crate) struct GroupPartials {
    pub db: Vec<f32>,
    pub dc: Vec<f32>,
}

impl GroupPartials {
    pub(crate) fn new(dims: &Scan2Dims) -> Self {
        let n = dims.batch * dims.nheads * dims.seqlen * dims.dstate;
        Self { db: crate::pool::take(n), dc: crate::pool::take(n) }
    }

    /// Adds the partials into `db` and `dc` (B, L, G, N).
    pub(crate) fn finish(self, dims: &Scan2Dims, db: &mut [f32], dc: &mut [f32]) {
        reduce_group_partials(dims, &self.db, db);
        reduce_group_partials(dims, &self.dc, dc);
        crate::pool::give(self.db);
        crate::pool::give(self.dc);
    }
}

/// What every backward task of the sequential and SSD kernels writes into, shared: its rows of
/// the `dB`/`dC` partials, of `dx`, `dΔ` and `dz`, and its block of `dh0` (tasks write
/// disjoint parts).
#[derive(Clone, Copy)]
pub(crate) struct BwdShared {
    pub db: SharedMut<f32>,
    pub dc: SharedMut<f32>,
    pub dx: SharedMut<f32>,
    pub ddelta: SharedMut<f32>,
    pub dz: Option<SharedMut<f32>>,
    pub dh0: Option<SharedMut<f32>>,
}

impl BwdShared {
    /// Views of `parts` and of the gradients the tasks write per element.
    pub(crate) fn new(
        parts: &mut GroupPartials,
        dx: &mut [f32],
        ddelta: &mut [f32],
        dz: Option<&mut [f32]>,
        dh0: Option<&mut [f32]>,
    ) -> Self {
        Self {
            db: SharedMut::new(&mut parts.db),
            dc: SharedMut::new(&mut parts.dc),
            dx: SharedMut::new(dx),
            ddelta: SharedMut::new(ddelta),
            dz: dz.map(SharedMut::new),
            dh0: dh0.map(SharedMut::new),
        }
    }
}

/// Adds per-head partials `part` (B, H, L, N) into the per-group gradient `out` (B, L, G, N).
fn reduce_group_partials(dims: &Scan2Dims, part: &[f32], out: &mut [f32]) {
    let Scan2Dims { seqlen, nheads, dstate: n, ngroups, .. } = *dims;
    if out.is_empty() {
        return;
    }
    let hpg = dims.group_size();
    out.par_chunks_mut(ngroups * n).enumerate().with_min_len(16).for_each(|(bt, row)| {
        let (b, t) = (bt / seqlen, bt % seqlen);
        for g in 0..ngroups {
            let o = &mut row[g * n..(g + 1) * n];
            for h in g * hpg..(g + 1) * hpg {
                let src = &part[((b * nheads + h) * seqlen + t) * n..][..n];
                for (o, s) in o.iter_mut().zip(src) {
                    *o += s;
                }
            }
        }
    });
}
