//! Reverse-mode autograd: an arena of values with `Copy` ids and one reverse loop.
//!
//! Every value a computation produces lives in the [`Tape`] and is named by a [`Var`]. An op
//! computes its output eagerly and, when recording and any input needs a gradient, pushes one
//! node holding its [`Backward`] implementation (and whatever it saved for it). Ops are coarse —
//! a whole linear layer, RMSNorm, selective scan or cross-entropy is one node — so the tape stays
//! short. [`Tape::backward`] walks the nodes once, last to first; parameter gradients are added
//! straight into the caller's preallocated [`Grads`].

use std::time::{Duration, Instant};

use crate::params::{Grads, ParamId, ParamStore};
use crate::tensor::{Tensor, data_mut, for_overwrite, recycle, zeros};

/// A value on a [`Tape`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Var(usize);

/// Position of one input in an op's input list, named by the op: a backward reads
/// `self.at.x.value(inputs)` and takes `self.at.x.grad(grads)` instead of `inputs[0]`.
///
/// Made by [`InputList::push`] while the forward lists its inputs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Slot(usize);

impl Slot {
    /// This input's value among a backward's `inputs`.
    #[inline]
    pub fn value<'t>(self, inputs: &[&'t Tensor]) -> &'t Tensor {
        inputs[self.0]
    }

    /// Takes this input's gradient out of a backward's `grads` (`None` when it needs none).
    #[inline]
    pub fn grad<'g>(self, grads: &mut [Option<InputGrad<'g>>]) -> Option<InputGrad<'g>> {
        grads[self.0].take()
    }
}

/// The input list of an op under construction: each [`InputList::push`] names the position it
/// gives out, so the op's backward reads its inputs by name (see [`Slot`]).
#[derive(Debug, Default)]
pub struct InputList(Vec<Var>);

impl InputList {
    /// An empty list.
    pub fn new() -> Self {
        Self(Vec::with_capacity(8))
    }

    /// Appends `v` and returns its position.
    pub fn push(&mut self, v: Var) -> Slot {
        self.0.push(v);
        Slot(self.0.len() - 1)
    }

    /// Appends `v` when present and returns its position.
    pub fn push_opt(&mut self, v: Option<Var>) -> Option<Slot> {
        v.map(|v| self.push(v))
    }

    /// The inputs, in order (for [`Tape::push`]).
    pub fn vars(&self) -> &[Var] {
        &self.0
    }
}

/// The gradient buffer of one input of a backward, and how to write it — the β of a GEMM:
///
/// - **overwrite** (β = 0): the buffer holds unspecified values (a recycled buffer: the input's
///   first gradient); every element must be written;
/// - **accumulate** (β = 1): the buffer holds gradient from other uses of the input; add to it.
///
/// The helpers do either in one pass, so an op never zero-fills a buffer it writes in full.
#[derive(Debug)]
pub struct InputGrad<'a> {
    buf: &'a mut Tensor,
    overwrite: bool,
}

impl<'a> InputGrad<'a> {
    /// The gradient `buf` of an input, to be overwritten (`overwrite`) or added into.
    pub fn new(buf: &'a mut Tensor, overwrite: bool) -> Self {
        Self { buf, overwrite }
    }

    /// Whether the buffer must be overwritten (it holds no gradient yet).
    #[inline]
    pub fn overwrites(&self) -> bool {
        self.overwrite
    }

    /// GEMM-style β for the buffer: 0.0 to overwrite, 1.0 to accumulate.
    #[inline]
    pub fn beta(&self) -> f32 {
        if self.overwrite { 0.0 } else { 1.0 }
    }

    /// The buffer's elements (row-major, shaped like the input), to write or add to according to
    /// [`InputGrad::overwrites`].
    #[inline]
    pub fn data(&mut self) -> &mut [f32] {
        data_mut(self.buf)
    }

    /// [`InputGrad::data`], keeping the buffer's borrow (for passing on to a kernel).
    #[inline]
    pub fn into_data(self) -> &'a mut [f32] {
        data_mut(self.buf)
    }

    /// The buffer as a tensor.
    #[inline]
    pub fn tensor(&mut self) -> &mut Tensor {
        self.buf
    }

    /// The elements ready to be **added** into: zero-filled first when the buffer must be
    /// overwritten. For kernels that only accumulate (`+=`) or write part of the buffer.
    pub fn zero_if_overwrite(self) -> &'a mut [f32] {
        let d = data_mut(self.buf);
        if self.overwrite {
            d.fill(0.0);
        }
        d
    }

    /// `buf = src` (overwrite) or `buf += src` (accumulate), element-wise.
    ///
    /// # Panics
    /// If `src` is not as long as the buffer.
    #[track_caller]
    pub fn add_or_write(&mut self, src: &[f32]) {
        let d = data_mut(self.buf);
        assert_eq!(
            d.len(),
            src.len(),
            "InputGrad::add_or_write: {} values into a buffer of {}",
            src.len(),
            d.len()
        );
        if self.overwrite {
            d.copy_from_slice(src);
        } else {
            d.iter_mut().zip(src).for_each(|(o, v)| *o += v);
        }
    }

    /// `buf[i] = v_i` (overwrite) or `buf[i] += v_i` (accumulate) for the values of `vals` in
    /// order; `vals` must yield one value per element.
    #[inline]
    pub fn add_or_write_each(&mut self, vals: impl IntoIterator<Item = f32>) {
        let d = data_mut(self.buf);
        if self.overwrite {
            d.iter_mut().zip(vals).for_each(|(o, v)| *o = v);
        } else {
            d.iter_mut().zip(vals).for_each(|(o, v)| *o += v);
        }
    }
}

/// The gradient buffer of `slot` ready to be added into (zeroed first when fresh), or — when
/// that input needs no gradient (a constant, a frozen parameter) — `n` pooled zeros held in
/// `scratch`, returned to the buffer pool when `scratch` is dropped. For kernels that always
/// write every gradient they are given: a frozen weight then costs no allocation per step.
pub fn grad_or_scratch<'a>(
    slot: Option<InputGrad<'a>>,
    scratch: &'a mut ssm_kernel::pool::F32Buf,
    n: usize,
) -> &'a mut [f32] {
    match slot {
        Some(g) => g.zero_if_overwrite(),
        None => {
            *scratch = ssm_kernel::pool::F32Buf::zeroed(n);
            scratch
        }
    }
}

/// The backward of one op.
pub trait Backward {
    /// The op's name, for error messages and profiles.
    fn name(&self) -> &'static str;

    /// Back-propagates `dout` (`∂loss/∂out`, shaped like `out`) into the gradients of the inputs.
    ///
    /// `inputs` are the input values and `out` the output value; read them by name through the
    /// op's saved [`Slot`]s. `grads[i]` is `Some` exactly for the inputs that need a gradient,
    /// shaped like `inputs[i]`: take it with [`Slot::grad`] and write it as its
    /// [`InputGrad`] says — **overwrite** a fresh buffer, **add** into one that already holds
    /// gradient (β = 0 or 1).
    fn backward(&self, inputs: &[&Tensor], out: &Tensor, dout: &Tensor, grads: &mut [Option<InputGrad<'_>>]);

    /// Whether [`Backward::backward`] reads `out`. An op that does not (most: they keep what
    /// they need among their inputs) lets a tape that releases values in the backward give
    /// the output back before the op's backward runs rather than after; it then gets an empty
    /// `out`.
    fn reads_output(&self) -> bool {
        true
    }

    /// [`Backward::backward`] with the parameters and their gradients at hand, for an op that
    /// back-propagates through a computation of its own on a tape of its own (activation
    /// checkpointing re-runs a layer in its backward) and adds that computation's parameter
    /// gradients straight into `params.grads`. `dout` is the op's to keep (as the seed of its
    /// own backward) or drop. The default ignores the parameters.
    fn backward_with(
        &self,
        params: ParamCtx<'_>,
        inputs: &[&Tensor],
        out: &Tensor,
        dout: Tensor,
        grads: &mut [Option<InputGrad<'_>>],
    ) {
        let _ = params;
        self.backward(inputs, out, &dout, grads);
        recycle(dout);
    }
}

/// What [`Backward::backward_with`] gets besides the op's own values: the parameters the tape
/// reads and the gradients of the trainable ones (which it adds into).
pub struct ParamCtx<'a> {
    /// The tape's parameters.
    pub params: &'a ParamStore,
    /// Their gradients (a parameter that is an input of the op itself is not in here while the
    /// op runs: its gradient is one of the op's input gradients).
    pub grads: &'a mut Grads,
}

enum Source {
    Value(Tensor),
    /// A value the tape reads in place and never gives back (see [`Tape::leaf_ref`]): its
    /// index in [`Tape`]'s `borrowed` (kept out of the [`Arena`], whose `Drop` must not
    /// extend the borrow).
    Borrowed(usize),
    Param(ParamId),
}

struct Node {
    inputs: Vec<Var>,
    op: Box<dyn Backward>,
}

struct Entry {
    src: Source,
    needs_grad: bool,
    node: Option<Node>,
}

/// The values and gradients of a tape. Kept apart from the parameter borrow so that its `Drop`
/// (which recycles the buffers) does not extend that borrow: a caller may update the parameters
/// once it is done with the tape, before the tape goes out of scope.
#[derive(Default)]
struct Arena {
    entries: Vec<Entry>,
    /// Gradients of non-parameter values after [`Tape::backward`] (kept for leaves).
    grads: Vec<Option<Tensor>>,
}

/// Gives every value and gradient buffer back to the thread's buffer pool, for the next step's
/// ops to reuse without zero-filling or page-faulting fresh memory.
impl Drop for Arena {
    fn drop(&mut self) {
        for e in self.entries.drain(..) {
            if let Source::Value(t) = e.src {
                recycle(t);
            }
        }
        for g in self.grads.drain(..).flatten() {
            recycle(g);
        }
    }
}

/// The autograd tape of one forward pass over the parameters `params`.
pub struct Tape<'p> {
    params: &'p ParamStore,
    arena: Arena,
    /// The values read in place ([`Source::Borrowed`]).
    borrowed: Vec<&'p Tensor>,
    record: bool,
    /// Whether a trainable parameter was read (see [`Tape::read_trainable`]).
    read_trainable: bool,
    /// Whether the backward gives each value back to the buffer pool once nothing needs it
    /// (see [`Tape::release_values_in_backward`]).
    release: bool,
    /// Per-op timings, when profiling (see [`Tape::profiled`]).
    profile: Option<Profile>,
}

/// Wall-clock time spent per op, from a [`Tape::profiled`] tape.
///
/// An op's forward time is the time from the previous value added to the tape to its own
/// [`Tape::push`] (ops compute eagerly, then push), so time spent between ops by the caller is
/// charged to the next op. Its backward time covers the op's `backward` and the gradient
/// buffers the tape made for it. Only recorded ops appear.
#[derive(Clone, Debug, Default)]
pub struct Profile {
    /// `(op name, calls, forward time, backward time)`, in first-seen order.
    pub ops: Vec<(&'static str, usize, Duration, Duration)>,
    last: Option<Instant>,
}

impl Profile {
    fn entry(&mut self, name: &'static str) -> &mut (&'static str, usize, Duration, Duration) {
        let i = match self.ops.iter().position(|e| e.0 == name) {
            Some(i) => i,
            None => {
                self.ops.push((name, 0, Duration::ZERO, Duration::ZERO));
                self.ops.len() - 1
            }
        };
        &mut self.ops[i]
    }

    /// Adds another profile's times into this one.
    pub fn merge(&mut self, other: &Profile) {
        for &(name, calls, f, b) in &other.ops {
            let e = self.entry(name);
            e.1 += calls;
            e.2 += f;
            e.3 += b;
        }
    }

    /// A table of the ops, slowest (forward + backward) first, with each op's share of the total.
    pub fn table(&self) -> String {
        let mut ops = self.ops.clone();
        ops.sort_by_key(|e| std::cmp::Reverse(e.2 + e.3));
        let total: f64 = ops.iter().map(|e| (e.2 + e.3).as_secs_f64()).sum();
        let ms = |d: Duration| d.as_secs_f64() * 1e3;
        let mut s = format!("{:<24} {:>7} {:>11} {:>11} {:>7}\n", "op", "calls", "fwd ms", "bwd ms", "share");
        for (name, calls, f, b) in ops {
            let share = 100.0 * (f + b).as_secs_f64() / total.max(f64::MIN_POSITIVE);
            s += &format!("{name:<24} {calls:>7} {:>11.2} {:>11.2} {share:>6.1}%\n", ms(f), ms(b));
        }
        s + &format!("{:<24} {:>7} {:>11} {:>11.2}\n", "total", "", "", total * 1e3)
    }
}

impl<'p> Tape<'p> {
    /// A recording tape: ops with a tracked input push backward nodes.
    pub fn new(params: &'p ParamStore) -> Self {
        Self {
            params,
            arena: Arena::default(),
            borrowed: Vec::new(),
            record: true,
            read_trainable: false,
            release: false,
            profile: None,
        }
    }

    /// A recording tape that also times every op's forward and backward (see [`Profile`]).
    pub fn profiled(params: &'p ParamStore) -> Self {
        let profile = Profile { last: Some(Instant::now()), ..Profile::default() };
        Self { profile: Some(profile), ..Self::new(params) }
    }

    /// The per-op timings so far, if this tape was made by [`Tape::profiled`].
    pub fn profile(&self) -> Option<&Profile> {
        self.profile.as_ref()
    }

    /// A non-recording tape: values only, nothing tracked, no backward possible.
    pub fn inference(params: &'p ParamStore) -> Self {
        Self { record: false, ..Self::new(params) }
    }

    /// Makes [`Tape::backward`] give every value back to the buffer pool as soon as the
    /// backward has passed it (all its consumers and its own op are done), so the values are
    /// gone while the gradients are made instead of both living until the tape is dropped: a
    /// lower peak for a training step. Values read after the backward are then empty; read the
    /// loss (or anything else) before it.
    pub fn release_values_in_backward(&mut self) {
        self.release = true;
    }

    /// The parameters this tape reads.
    pub fn params(&self) -> &'p ParamStore {
        self.params
    }

    /// Whether this tape records backward nodes.
    pub fn is_recording(&self) -> bool {
        self.record
    }

    fn add(&mut self, src: Source, needs_grad: bool, node: Option<Node>) -> Var {
        if let Some(p) = &mut self.profile {
            let now = Instant::now();
            if let (Some(node), Some(last)) = (&node, p.last) {
                let e = p.entry(node.op.name());
                e.1 += 1;
                e.2 += now - last;
            }
            p.last = Some(now);
        }
        self.arena.entries.push(Entry { src, needs_grad, node });
        Var(self.arena.entries.len() - 1)
    }

    /// A value that needs no gradient (inputs, masks, targets).
    pub fn constant(&mut self, t: Tensor) -> Var {
        self.add(Source::Value(t), false, None)
    }

    /// A value whose gradient is kept after [`Tape::backward`] (see [`Tape::grad`]); used by tests.
    pub fn leaf(&mut self, t: Tensor) -> Var {
        let rec = self.record;
        self.add(Source::Value(t), rec, None)
    }

    /// [`Tape::leaf`] of a value read in place, not copied: for a computation nested in another
    /// tape's op (activation checkpointing) that reads that op's input.
    pub fn leaf_ref(&mut self, t: &'p Tensor) -> Var {
        let rec = self.record;
        self.borrowed.push(t);
        self.add(Source::Borrowed(self.borrowed.len() - 1), rec, None)
    }

    /// [`Tape::constant`] of a value read in place, not copied.
    pub fn constant_ref(&mut self, t: &'p Tensor) -> Var {
        self.borrowed.push(t);
        self.add(Source::Borrowed(self.borrowed.len() - 1), false, None)
    }

    /// Moves the value of `v` out of the tape, leaving it empty: for a result the caller keeps
    /// once nothing else on the tape will read `v`.
    ///
    /// # Panics
    /// If `v` is a parameter or a borrowed value.
    #[track_caller]
    pub fn take_value(&mut self, v: Var) -> Tensor {
        match &mut self.arena.entries[v.0].src {
            Source::Value(t) => std::mem::replace(t, zeros(&[0])),
            Source::Borrowed(_) | Source::Param(_) => {
                panic!("take_value: value {} is not owned by the tape", v.0)
            }
        }
    }

    /// Parameter `id`, read in place (no copy); its gradient goes to [`Grads`] — unless it is
    /// frozen ([`ParamStore::set_trainable`]): then it is a constant, and ops that read only
    /// constants are not recorded.
    #[track_caller]
    pub fn param(&mut self, id: ParamId) -> Var {
        assert!(
            !self.params.is_packed_param(id),
            "the tape needs f32 weights, but `{}` is packed for inference; run the model through \
             `Decoder`, or load it without a reduced-precision dtype",
            self.params.get(id).name
        );
        let trainable = self.params.is_trainable(id);
        self.read_trainable |= trainable;
        let rec = self.record && trainable;
        self.add(Source::Param(id), rec, None)
    }

    /// Whether [`Tape::param`] has read a trainable parameter on this tape (recording or not).
    pub fn read_trainable(&self) -> bool {
        self.read_trainable
    }

    /// The value of `v`.
    pub fn value(&self, v: Var) -> &Tensor {
        match &self.arena.entries[v.0].src {
            Source::Value(t) => t,
            Source::Borrowed(i) => self.borrowed[*i],
            Source::Param(id) => self.params.value(*id),
        }
    }

    /// Whether `v` needs a gradient.
    pub fn needs_grad(&self, v: Var) -> bool {
        self.arena.entries[v.0].needs_grad
    }

    /// Records the output `value` of an op on `inputs` with its backward `op`. The node is kept
    /// only when recording and some input needs a gradient.
    pub fn push(&mut self, value: Tensor, inputs: &[Var], op: impl Backward + 'static) -> Var {
        self.push_tracked(value, inputs, false, op)
    }

    /// [`Tape::push`] for an op that also has gradients to give to parameters it does not list
    /// as inputs (see [`Backward::backward_with`]): with `own_params` set, the node is kept on
    /// a recording tape even when no input needs a gradient.
    pub fn push_tracked(
        &mut self,
        value: Tensor,
        inputs: &[Var],
        own_params: bool,
        op: impl Backward + 'static,
    ) -> Var {
        let tracked = self.record && (own_params || inputs.iter().any(|&v| self.needs_grad(v)));
        let node = tracked.then(|| Node { inputs: inputs.to_vec(), op: Box::new(op) });
        self.add(Source::Value(value), tracked, node)
    }

    /// Number of values on the tape.
    pub fn len(&self) -> usize {
        self.arena.entries.len()
    }

    /// Whether the tape is empty.
    pub fn is_empty(&self) -> bool {
        self.arena.entries.is_empty()
    }

    /// Back-propagates from the scalar `loss` (seed 1), adding parameter gradients into `grads`.
    ///
    /// # Panics
    /// If `loss` is not a single element or the tape does not record.
    #[track_caller]
    pub fn backward(&mut self, loss: Var, grads: &mut Grads) {
        let n = self.value(loss).len();
        assert_eq!(n, 1, "backward: the loss must be a single value, it has {n}");
        let seed = Tensor::from_elem(self.value(loss).raw_dim(), 1.0);
        self.backward_from(loss, seed, grads);
    }

    /// Back-propagates from `out` with `∂loss/∂out = seed`, adding parameter gradients into
    /// `grads` and keeping the gradients of leaves (see [`Tape::grad`]).
    ///
    /// # Panics
    /// If `seed` is not shaped like `out` or the tape does not record.
    #[track_caller]
    pub fn backward_from(&mut self, out: Var, seed: Tensor, grads: &mut Grads) {
        assert!(self.record, "backward on a non-recording (inference) tape");
        assert_eq!(
            seed.shape(),
            self.value(out).shape(),
            "backward_from: seed shape differs from the output's"
        );
        let mut vgrads: Vec<Option<Tensor>> = (0..self.arena.entries.len()).map(|_| None).collect();
        vgrads[out.0] = Some(seed);
        for idx in (0..self.arena.entries.len()).rev() {
            // Every consumer of value `idx` sits after it on the tape and is done; its own op
            // may still read it.
            let unread = self.arena.entries[idx].node.as_ref().is_some_and(|n| !n.op.reads_output());
            if self.release && unread {
                self.release_value(idx);
            }
            self.backward_node(idx, &mut vgrads, grads);
            if self.release {
                self.release_value(idx);
            }
        }
        self.arena.grads = vgrads;
    }

    /// Gives the value of entry `idx` back to the buffer pool, leaving it empty.
    fn release_value(&mut self, idx: usize) {
        if let Source::Value(t) = &mut self.arena.entries[idx].src
            && !t.is_empty()
        {
            recycle(std::mem::replace(t, zeros(&[0])));
        }
    }

    /// The backward of entry `idx`, if it is an op that received a gradient.
    fn backward_node(&mut self, idx: usize, vgrads: &mut [Option<Tensor>], grads: &mut Grads) {
        let Some(node) = &self.arena.entries[idx].node else { return };
        let Some(dout) = vgrads[idx].take() else { return };
        let started = self.profile.is_some().then(Instant::now);
        // Move each needed input gradient out of its home (parameter gradients from `grads`,
        // others from `vgrads`), let the op add into them, then put them back.
        let mut dins: Vec<Option<Tensor>> = Vec::with_capacity(node.inputs.len());
        let mut fresh = vec![false; node.inputs.len()];
        for (i, &v) in node.inputs.iter().enumerate() {
            let e = &self.arena.entries[v.0];
            if !e.needs_grad {
                dins.push(None);
                continue;
            }
            let repeated = node.inputs[..i].contains(&v);
            let shape = self.value(v).shape();
            dins.push(Some(match (&e.src, repeated) {
                (_, true) => zeros(shape),
                (Source::Param(id), false) => grads.take(*id),
                (Source::Value(_) | Source::Borrowed(_), false) => vgrads[v.0].take().unwrap_or_else(|| {
                    fresh[i] = true;
                    for_overwrite(shape)
                }),
            }));
        }
        {
            let inputs: Vec<&Tensor> = node.inputs.iter().map(|&v| self.value(v)).collect();
            let out_val = self.value(Var(idx));
            let mut slots: Vec<Option<InputGrad<'_>>> =
                dins.iter_mut().zip(&fresh).map(|(d, &f)| d.as_mut().map(|t| InputGrad::new(t, f))).collect();
            let ctx = ParamCtx { params: self.params, grads: &mut *grads };
            node.op.backward_with(ctx, &inputs, out_val, dout, &mut slots);
        }
        for (i, (&v, d)) in node.inputs.iter().zip(dins).enumerate() {
            let Some(d) = d else { continue };
            let first = node.inputs[..i].iter().position(|&u| u == v);
            match (first, &self.arena.entries[v.0].src) {
                // A repeated input: add into the first occurrence's buffer, which is home
                // again only after this loop, so accumulate into where it now lives.
                (Some(_), Source::Param(id)) => *grads.get_mut(*id) += &d,
                (Some(_), Source::Value(_) | Source::Borrowed(_)) => {
                    *vgrads[v.0].as_mut().expect("first occurrence was put back") += &d;
                }
                (None, Source::Param(id)) => grads.put(*id, d),
                (None, Source::Value(_) | Source::Borrowed(_)) => vgrads[v.0] = Some(d),
            }
        }
        if let (Some(p), Some(t0)) = (&mut self.profile, started) {
            let e = p.entry(node.op.name());
            e.3 += t0.elapsed();
        }
    }

    /// The gradient of a leaf (or any non-parameter value that received one) after
    /// [`Tape::backward`].
    pub fn grad(&self, v: Var) -> Option<&Tensor> {
        self.arena.grads.get(v.0).and_then(|g| g.as_ref())
    }
}
