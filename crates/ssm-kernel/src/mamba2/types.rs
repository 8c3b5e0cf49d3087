//! Dims, inputs and gradient buffers of the Mamba-2 scan.

use crate::check::{Layout, check_dims, check_len, check_opt_len};

/// Sizes of a Mamba-2 scan.
///
/// `B` batch, `L` sequence length, `H` heads, `P` head dimension (`headdim`), `N` state size
/// (`d_state`), `G` groups of `B`/`C` (head `h` uses group `h / (H / G)`). The mixer's
/// `d_inner` is `H · P`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Scan2Dims {
    /// `B`.
    pub batch: usize,
    /// `L`.
    pub seqlen: usize,
    /// `H`.
    pub nheads: usize,
    /// `P`.
    pub headdim: usize,
    /// `N`.
    pub dstate: usize,
    /// `G` (must divide `H`).
    pub ngroups: usize,
}

impl Scan2Dims {
    /// Dims with one group.
    pub fn new(batch: usize, seqlen: usize, nheads: usize, headdim: usize, dstate: usize) -> Self {
        Self { batch, seqlen, nheads, headdim, dstate, ngroups: 1 }
    }

    /// The same dims with `G` groups.
    pub fn with_groups(self, ngroups: usize) -> Self {
        Self { ngroups, ..self }
    }

    /// The same dims with sequence length `L`.
    pub fn with_seqlen(self, seqlen: usize) -> Self {
        Self { seqlen, ..self }
    }

    /// Heads per group, `H / G`.
    #[inline]
    pub fn group_size(&self) -> usize {
        self.nheads / self.ngroups
    }

    /// The group of head `h`.
    #[inline]
    pub fn group_of(&self, h: usize) -> usize {
        h / self.group_size()
    }

    /// Panics unless `G ≥ 1`, `G` divides `H`, `N ≥ 1` and `P ≥ 1`.
    #[track_caller]
    pub fn validate(&self, kernel: &str) {
        check_dims(kernel, self.ngroups >= 1, "ngroups must be at least 1");
        check_dims(kernel, self.dstate >= 1, "dstate must be at least 1");
        check_dims(kernel, self.headdim >= 1, "headdim must be at least 1");
        check_dims(
            kernel,
            self.nheads.is_multiple_of(self.ngroups),
            format_args!("ngroups {} must divide nheads {}", self.ngroups, self.nheads),
        );
    }

    fn blhp(&self) -> Layout {
        Layout::new("(B, L, H, P)", &[self.batch, self.seqlen, self.nheads, self.headdim])
    }

    fn bl(&self) -> Layout {
        Layout::new("(B, L)", &[self.batch, self.seqlen])
    }

    fn blh(&self) -> Layout {
        Layout::new("(B, L, H)", &[self.batch, self.seqlen, self.nheads])
    }

    fn blgn(&self) -> Layout {
        Layout::new("(B, L, G, N)", &[self.batch, self.seqlen, self.ngroups, self.dstate])
    }

    fn bhpn(&self) -> Layout {
        Layout::new("(B, H, P, N)", &[self.batch, self.nheads, self.headdim, self.dstate])
    }

    fn h(&self) -> Layout {
        Layout::new("(H)", &[self.nheads])
    }

    /// Elements of a (B, L, H, P) tensor.
    pub fn n_blhp(&self) -> usize {
        self.batch * self.seqlen * self.nheads * self.headdim
    }
    /// Elements of a (B, L, H) tensor.
    pub fn n_blh(&self) -> usize {
        self.batch * self.seqlen * self.nheads
    }
    /// Elements of a (B, L, G, N) tensor.
    pub fn n_blgn(&self) -> usize {
        self.batch * self.seqlen * self.ngroups * self.dstate
    }
    /// Elements of a (B, H, P, N) state.
    pub fn n_bhpn(&self) -> usize {
        self.batch * self.nheads * self.headdim * self.dstate
    }
    /// `B · L · H · P · N`: state updates of a full scan (the work measure of benchmarks).
    pub fn elements(&self) -> usize {
        self.n_blhp() * self.dstate
    }
}

/// Inputs of a Mamba-2 scan. All tensors are row-major.
///
/// | field | layout |
/// |---|---|
/// | `x` | (B, L, H, P) |
/// | `delta` | (B, L, H), Δ before bias and softplus |
/// | `a` | (H), the continuous-time `A = −exp(A_log)`, one scalar per head |
/// | `b`, `c` | (B, L, G, N) |
/// | `d` | (H), skip connection, optional |
/// | `z` | (B, L, H, P), gate, optional: `y ← y · silu(z)` |
/// | `delta_bias` | (H), added to Δ before softplus (`dt_bias`), optional |
/// | `h0` | (B, H, P, N), initial state (HF's `ssm_state` layout), optional (zero when absent) |
/// | `resets` | (B, L), optional: `true` where a new sequence starts |
///
/// **Resets** (packed documents, the reference implementation's `seq_idx`): where
/// `resets[b, t]` is `true` the state entering step `t` is taken as zero, so nothing before `t`
/// reaches `t` or later and no gradient flows back across it (a reset at `t = 0` makes `h0`
/// unused and its gradient zero).
#[derive(Clone, Copy, Debug)]
pub struct Scan2Args<'a, T> {
    /// `x`, (B, L, H, P).
    pub x: &'a [T],
    /// Δ, (B, L, H).
    pub delta: &'a [T],
    /// `A`, (H).
    pub a: &'a [T],
    /// `B`, (B, L, G, N).
    pub b: &'a [T],
    /// `C`, (B, L, G, N).
    pub c: &'a [T],
    /// `D`, (H).
    pub d: Option<&'a [T]>,
    /// Gate `z`, (B, L, H, P).
    pub z: Option<&'a [T]>,
    /// Δ bias, (H).
    pub delta_bias: Option<&'a [T]>,
    /// Apply softplus to Δ (+ bias).
    pub delta_softplus: bool,
    /// Initial state, (B, H, P, N).
    pub h0: Option<&'a [T]>,
    /// Sequence starts, (B, L).
    pub resets: Option<&'a [bool]>,
}

impl<'a, T> Scan2Args<'a, T> {
    /// Required inputs only: no `D`, gate, bias, softplus or initial state.
    pub fn new(x: &'a [T], delta: &'a [T], a: &'a [T], b: &'a [T], c: &'a [T]) -> Self {
        Self {
            x,
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
    pub fn check(&self, kernel: &str, dims: &Scan2Dims) {
        dims.validate(kernel);
        check_len(kernel, "x", dims.blhp(), self.x.len(), dims.n_blhp());
        check_len(kernel, "delta", dims.blh(), self.delta.len(), dims.n_blh());
        check_len(kernel, "a", dims.h(), self.a.len(), dims.nheads);
        check_len(kernel, "b", dims.blgn(), self.b.len(), dims.n_blgn());
        check_len(kernel, "c", dims.blgn(), self.c.len(), dims.n_blgn());
        check_opt_len(kernel, "d", dims.h(), self.d, dims.nheads);
        check_opt_len(kernel, "z", dims.blhp(), self.z, dims.n_blhp());
        check_opt_len(kernel, "delta_bias", dims.h(), self.delta_bias, dims.nheads);
        check_opt_len(kernel, "h0", dims.bhpn(), self.h0, dims.n_bhpn());
        check_opt_len(kernel, "resets", dims.bl(), self.resets, dims.batch * dims.seqlen);
    }
}

/// Output buffers of a Mamba-2 forward scan.
#[derive(Debug)]
pub struct Scan2Out<'a, T> {
    /// `y`, (B, L, H, P) (overwritten).
    pub y: &'a mut [T],
    /// Final state `h_L`, (B, H, P, N) (overwritten), optional.
    pub h_last: Option<&'a mut [T]>,
}

impl<T> Scan2Out<'_, T> {
    /// Panics with a message naming the argument unless every length matches `dims`.
    #[track_caller]
    pub fn check(&self, kernel: &str, dims: &Scan2Dims) {
        check_len(kernel, "y", dims.blhp(), self.y.len(), dims.n_blhp());
        check_opt_len(kernel, "h_last", dims.bhpn(), self.h_last.as_deref(), dims.n_bhpn());
    }
}

/// Gradient buffers of a Mamba-2 scan. The backward **adds** into every buffer (`+=`), so the
/// caller zeroes them or accumulates across calls. An absent optional buffer skips that gradient.
///
/// Layouts are those of the matching input in [`Scan2Args`]; `ddelta` is the gradient of the raw
/// Δ (before bias and softplus).
#[derive(Debug)]
pub struct Scan2Grads<'a, T> {
    /// d`x`, (B, L, H, P).
    pub dx: &'a mut [T],
    /// dΔ, (B, L, H).
    pub ddelta: &'a mut [T],
    /// d`A`, (H).
    pub da: &'a mut [T],
    /// d`B`, (B, L, G, N).
    pub db: &'a mut [T],
    /// d`C`, (B, L, G, N).
    pub dc: &'a mut [T],
    /// d`D`, (H).
    pub dd: Option<&'a mut [T]>,
    /// d`z`, (B, L, H, P).
    pub dz: Option<&'a mut [T]>,
    /// dΔ bias, (H).
    pub ddelta_bias: Option<&'a mut [T]>,
    /// d`h0`, (B, H, P, N).
    pub dh0: Option<&'a mut [T]>,
}

impl<T> Scan2Grads<'_, T> {
    /// Panics with a message naming the argument unless every length matches `dims`.
    #[track_caller]
    pub fn check(&self, kernel: &str, dims: &Scan2Dims) {
        check_len(kernel, "dx", dims.blhp(), self.dx.len(), dims.n_blhp());
        check_len(kernel, "ddelta", dims.blh(), self.ddelta.len(), dims.n_blh());
        check_len(kernel, "da", dims.h(), self.da.len(), dims.nheads);
        check_len(kernel, "db", dims.blgn(), self.db.len(), dims.n_blgn());
        check_len(kernel, "dc", dims.blgn(), self.dc.len(), dims.n_blgn());
        check_opt_len(kernel, "dd", dims.h(), self.dd.as_deref(), dims.nheads);
        check_opt_len(kernel, "dz", dims.blhp(), self.dz.as_deref(), dims.n_blhp());
        check_opt_len(kernel, "ddelta_bias", dims.h(), self.ddelta_bias.as_deref(), dims.nheads);
        check_opt_len(kernel, "dh0", dims.bhpn(), self.dh0.as_deref(), dims.n_bhpn());
    }
}

/// Checks the upstream gradients of a backward call: `dy` (B, L, H, P), `dh_last` (B, H, P, N).
#[track_caller]
pub fn check_upstream<T>(kernel: &str, dims: &Scan2Dims, dy: &[T], dh_last: Option<&[T]>) {
    check_len(kernel, "dy", dims.blhp(), dy.len(), dims.n_blhp());
    check_opt_len(kernel, "dh_last", dims.bhpn(), dh_last, dims.n_bhpn());
}

/// Checks the buffers of a single step: `dims.seqlen == 1`, no `h0` in `args` (the state is
/// `state`), `state` (B, H, P, N) and `y` (B, H, P).
#[track_caller]
pub(crate) fn check_step<T>(kernel: &str, dims: &Scan2Dims, args: &Scan2Args<T>, state: &[T], y: &[T]) {
    check_dims(kernel, dims.seqlen == 1, "a step takes seqlen 1");
    check_dims(kernel, args.h0.is_none(), "a step takes its state in `state`, not `h0`");
    args.check(kernel, dims);
    check_len(kernel, "state", dims.bhpn(), state.len(), dims.n_bhpn());
    check_len(kernel, "y", dims.blhp(), y.len(), dims.n_blhp());
}
