//! Dims, inputs and gradient buffers of the Mamba-1 selective scan.

use crate::check::{Layout, check_dims, check_len, check_opt_len};

/// Sizes of a Mamba-1 selective scan.
///
/// `B` batch, `L` sequence length, `D` channels (`d_inner`), `N` state size (`d_state`),
/// `G` groups of `B`/`C` (1 for Mamba-1; channel `d` uses group `d / (D / G)`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Scan1Dims {
    /// `B`.
    pub batch: usize,
    /// `L`.
    pub seqlen: usize,
    /// `D`.
    pub dim: usize,
    /// `N`.
    pub dstate: usize,
    /// `G` (must divide `D`).
    pub ngroups: usize,
}

impl Scan1Dims {
    /// Dims with one group (plain Mamba-1).
    pub fn new(batch: usize, seqlen: usize, dim: usize, dstate: usize) -> Self {
        Self { batch, seqlen, dim, dstate, ngroups: 1 }
    }

    /// The same dims with `G` groups.
    pub fn with_groups(self, ngroups: usize) -> Self {
        Self { ngroups, ..self }
    }

    /// Channels per group, `D / G`.
    #[inline]
    pub fn group_size(&self) -> usize {
        self.dim / self.ngroups
    }

    /// The group of channel `d`.
    #[inline]
    pub fn group_of(&self, d: usize) -> usize {
        d / self.group_size()
    }

    /// Panics unless `G ≥ 1`, `G` divides `D`, and `N ≥ 1`.
    #[track_caller]
    pub fn validate(&self, kernel: &str) {
        check_dims(kernel, self.ngroups >= 1, "ngroups must be at least 1");
        check_dims(kernel, self.dstate >= 1, "dstate must be at least 1");
        check_dims(
            kernel,
            self.dim.is_multiple_of(self.ngroups),
            format_args!("ngroups {} must divide dim {}", self.ngroups, self.dim),
        );
    }

    fn bld(&self) -> Layout {
        Layout::new("(B, L, D)", &[self.batch, self.seqlen, self.dim])
    }

    fn bl(&self) -> Layout {
        Layout::new("(B, L)", &[self.batch, self.seqlen])
    }

    fn blgn(&self) -> Layout {
        Layout::new("(B, L, G, N)", &[self.batch, self.seqlen, self.ngroups, self.dstate])
    }

    fn dn(&self) -> Layout {
        Layout::new("(D, N)", &[self.dim, self.dstate])
    }

    fn bdn(&self) -> Layout {
        Layout::new("(B, D, N)", &[self.batch, self.dim, self.dstate])
    }

    fn d(&self) -> Layout {
        Layout::new("(D)", &[self.dim])
    }

    /// Elements of a (B, L, D) tensor.
    pub fn n_bld(&self) -> usize {
        self.batch * self.seqlen * self.dim
    }
    /// Elements of a (B, L, G, N) tensor.
    pub fn n_blgn(&self) -> usize {
        self.batch * self.seqlen * self.ngroups * self.dstate
    }
    /// Elements of a (B, D, N) state.
    pub fn n_bdn(&self) -> usize {
        self.batch * self.dim * self.dstate
    }

    /// Recomputation chunks, `⌈L / CHUNK⌉` (see [`crate::mamba1::CHUNK`]).
    pub fn n_chunks(&self) -> usize {
        self.seqlen.div_ceil(crate::mamba1::CHUNK)
    }

    /// Elements of the forward's checkpoints, (B, ⌈L / CHUNK⌉, D, N).
    pub fn n_checkpoints(&self) -> usize {
        self.batch * self.n_chunks() * self.dim * self.dstate
    }

    pub(crate) fn ckpt_layout(&self) -> Layout {
        Layout::new("(B, ⌈L/CHUNK⌉, D, N)", &[self.batch, self.n_chunks(), self.dim, self.dstate])
    }
}

/// Inputs of a Mamba-1 selective scan. All tensors are row-major.
///
/// | field | layout |
/// |---|---|
/// | `u` | (B, L, D) |
/// | `delta` | (B, L, D), Δ before bias and softplus |
/// | `a` | (D, N), the continuous-time `A = −exp(A_log)` |
/// | `b`, `c` | (B, L, G, N) |
/// | `d` | (D), skip connection, optional |
/// | `z` | (B, L, D), gate, optional: `y ← y · silu(z)` |
/// | `delta_bias` | (D), added to Δ before softplus, optional |
/// | `h0` | (B, D, N), initial state, optional (zero when absent) |
/// | `resets` | (B, L), optional: `true` where a new sequence starts (see below) |
///
/// **Resets** (packed documents): where `resets[b, t]` is `true` the state entering step `t` is
/// taken as zero — `h_t = Δ_t u_t B_t`, as at the start of a fresh sequence — so nothing before
/// `t` reaches `t` or later, and no gradient flows back across it (a reset at `t = 0` makes
/// `h0` unused and its gradient zero).
#[derive(Clone, Copy, Debug)]
pub struct Scan1Args<'a, T> {
    /// `u`, (B, L, D).
    pub u: &'a [T],
    /// Δ, (B, L, D).
    pub delta: &'a [T],
    /// `A`, (D, N).
    pub a: &'a [T],
    /// `B`, (B, L, G, N).
    pub b: &'a [T],
    /// `C`, (B, L, G, N).
    pub c: &'a [T],
    /// `D`, (D).
    pub d: Option<&'a [T]>,
    /// Gate `z`, (B, L, D).
    pub z: Option<&'a [T]>,
    /// Δ bias, (D).
    pub delta_bias: Option<&'a [T]>,
    /// Apply softplus to Δ (+ bias).
    pub delta_softplus: bool,
    /// Initial state, (B, D, N).
    pub h0: Option<&'a [T]>,
    /// Sequence starts, (B, L).
    pub resets: Option<&'a [bool]>,
}

impl<'a, T> Scan1Args<'a, T> {
    /// Required inputs only: no `D`, gate, bias, softplus or initial state.
    pub fn new(u: &'a [T], delta: &'a [T], a: &'a [T], b: &'a [T], c: &'a [T]) -> Self {
        Self {
            u,
            delta,
            a,
            b,
            c,
            d: None,
            z: None,
            delta_bias: None,
            delta_softplus: false,
            h0: None,
            resets: None,
        }
    }

    /// Panics with a message naming the argument unless every length matches `dims`.
    #[track_caller]
    pub fn check(&self, kernel: &str, dims: &Scan1Dims) {
        dims.validate(kernel);
        check_len(kernel, "u", dims.bld(), self.u.len(), dims.n_bld());
        check_len(kernel, "delta", dims.bld(), self.delta.len(), dims.n_bld());
        check_len(kernel, "a", dims.dn(), self.a.len(), dims.dim * dims.dstate);
        check_len(kernel, "b", dims.blgn(), self.b.len(), dims.n_blgn());
        check_len(kernel, "c", dims.blgn(), self.c.len(), dims.n_blgn());
        check_opt_len(kernel, "d", dims.d(), self.d, dims.dim);
        check_opt_len(kernel, "z", dims.bld(), self.z, dims.n_bld());
        check_opt_len(kernel, "delta_bias", dims.d(), self.delta_bias, dims.dim);
        check_opt_len(kernel, "h0", dims.bdn(), self.h0, dims.n_bdn());
        check_opt_len(kernel, "resets", dims.bl(), self.resets, dims.batch * dims.seqlen);
    }
}

/// Output buffers of a Mamba-1 forward scan.
#[derive(Debug)]
pub struct Scan1Out<'a, T> {
    /// `y`, (B, L, D) (overwritten).
    pub y: &'a mut [T],
    /// Final state `h_L`, (B, D, N) (overwritten), optional.
    pub h_last: Option<&'a mut [T]>,
    /// Optional: the state at the start of every chunk of [`CHUNK`](crate::mamba1::CHUNK)
    /// steps, (B, ⌈L / CHUNK⌉, D, N) (overwritten; chunk 0 holds `h0`). Training keeps these
    /// for [`scan_bwd_with_checkpoints`](crate::mamba1::scan_bwd_with_checkpoints), which then
    /// skips re-running the forward.
    pub checkpoints: Option<&'a mut [T]>,
}

impl<'a, T> Scan1Out<'a, T> {
    /// Only `y`.
    pub fn new(y: &'a mut [T]) -> Self {
        Self { y, h_last: None, checkpoints: None }
    }

    /// `y` and the final state.
    pub fn with_state(y: &'a mut [T], h_last: &'a mut [T]) -> Self {
        Self { y, h_last: Some(h_last), checkpoints: None }
    }

    /// Panics with a message naming the argument unless every length matches `dims`.
    #[track_caller]
    pub fn check(&self, kernel: &str, dims: &Scan1Dims) {
        check_len(kernel, "y", dims.bld(), self.y.len(), dims.n_bld());
        check_opt_len(kernel, "h_last", dims.bdn(), self.h_last.as_deref(), dims.n_bdn());
        check_opt_len(
            kernel,
            "checkpoints",
            dims.ckpt_layout(),
            self.checkpoints.as_deref(),
            dims.n_checkpoints(),
        );
    }
}

/// Gradient buffers of a Mamba-1 scan. The backward **adds** into every buffer (`+=`), so the
/// caller zeroes them or accumulates across calls. An absent optional buffer skips that gradient,
/// and so does an absent optional input (no `d` in the args: `dd` is left untouched; likewise
/// `z`/`dz`, `delta_bias`/`ddelta_bias`, `h0`/`dh0`).
///
/// Layouts are those of the matching input in [`Scan1Args`]; `ddelta` is the gradient of the raw
/// Δ (before bias and softplus).
#[derive(Debug)]
pub struct Scan1Grads<'a, T> {
    /// d`u`, (B, L, D).
    pub du: &'a mut [T],
    /// dΔ, (B, L, D).
    pub ddelta: &'a mut [T],
    /// d`A`, (D, N).
    pub da: &'a mut [T],
    /// d`B`, (B, L, G, N).
    pub db: &'a mut [T],
    /// d`C`, (B, L, G, N).
    pub dc: &'a mut [T],
    /// d`D`, (D).
    pub dd: Option<&'a mut [T]>,
    /// d`z`, (B, L, D).
    pub dz: Option<&'a mut [T]>,
    /// dΔ bias, (D).
    pub ddelta_bias: Option<&'a mut [T]>,
    /// d`h0`, (B, D, N).
    pub dh0: Option<&'a mut [T]>,
}

impl<T> Scan1Grads<'_, T> {
    /// Panics with a message naming the argument unless every length matches `dims`.
    #[track_caller]
    pub fn check(&self, kernel: &str, dims: &Scan1Dims) {
        check_len(kernel, "du", dims.bld(), self.du.len(), dims.n_bld());
        check_len(kernel, "ddelta", dims.bld(), self.ddelta.len(), dims.n_bld());
        check_len(kernel, "da", dims.dn(), self.da.len(), dims.dim * dims.dstate);
        check_len(kernel, "db", dims.blgn(), self.db.len(), dims.n_blgn());
        check_len(kernel, "dc", dims.blgn(), self.dc.len(), dims.n_blgn());
        check_opt_len(kernel, "dd", dims.d(), self.dd.as_deref(), dims.dim);
        check_opt_len(kernel, "dz", dims.bld(), self.dz.as_deref(), dims.n_bld());
        check_opt_len(kernel, "ddelta_bias", dims.d(), self.ddelta_bias.as_deref(), dims.dim);
        check_opt_len(kernel, "dh0", dims.bdn(), self.dh0.as_deref(), dims.n_bdn());
    }
}

/// Checks the upstream gradients of a backward call: `dy` (B, L, D), `dh_last` (B, D, N).
#[track_caller]
pub fn check_upstream<T>(kernel: &str, dims: &Scan1Dims, dy: &[T], dh_last: Option<&[T]>) {
    check_len(kernel, "dy", dims.bld(), dy.len(), dims.n_bld());
    check_opt_len(kernel, "dh_last", dims.bdn(), dh_last, dims.n_bdn());
}
