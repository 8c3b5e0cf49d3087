//! [`ParamBuilder`]: registers a model's parameters by scoped name, once, with their shapes —
//! from a random initialisation or from a checkpoint, through the same layer constructors.
//!
//! A layer asks for its parameters by local name (`in_proj.weight`) inside a scope
//! (`backbone.layers.3.mixer`) and keeps the returned [`ParamId`]s; nothing on the forward or
//! decode path looks a parameter up by name again.
//!
//! ```
//! use mamba_nn::model::builder::{Init, ParamBuilder};
//! use mamba_nn::model::init::InitRng;
//! use mamba_nn::params::ParamStore;
//!
//! let mut store = ParamStore::new();
//! let mut b = ParamBuilder::init(&mut store, InitRng::new(0));
//! let mut layer = b.pp("backbone.layers.0");
//! let w = layer.param("norm.weight", &[4], Init::Const(1.0)).unwrap();
//! assert_eq!(store.get(w).name, "backbone.layers.0.norm.weight");
//! ```

use crate::checkpoint::{CheckpointError, TensorFile};
use crate::model::init::InitRng;
use crate::params::{ParamId, ParamStore};
use crate::tensor::{Tensor, from_vec};

/// How a parameter is initialised when the builder draws random weights (ignored when loading).
#[derive(Clone, Copy, Debug)]
pub enum Init {
    /// Every element `v`.
    Const(f32),
    /// PyTorch's default `Linear` / `Conv1d` init (Kaiming uniform, a = √5): U(±1/√fan_in),
    /// times `scale` (1 unless rescaled, e.g. `out_proj`'s 1/√n_layer).
    Kaiming {
        /// The layer's fan-in.
        fan_in: usize,
        /// A factor applied after drawing.
        scale: f32,
    },
    /// U(lo, hi).
    Uniform(f64, f64),
    /// N(0, std²).
    Normal(f64),
    /// `ln U(lo, hi)` (Mamba-2's `A_log`).
    LogUniform(f64, f64),
    /// Mamba-1's `A_log[d, n] = ln(n + 1)` for a (D, N) tensor.
    S4dReal,
    /// The dt bias: Δ drawn log-uniform in [min, max], floored, stored as its inverse softplus
    /// `Δ + ln(−expm1(−Δ))` so that `softplus(bias) = Δ`.
    DtBias {
        /// Lower end of Δ.
        min: f32,
        /// Upper end of Δ.
        max: f32,
        /// Floor of Δ.
        floor: f32,
    },
}

impl Init {
    /// PyTorch's default `Linear` / `Conv1d` init for `fan_in`, times `scale`.
    pub const fn kaiming(fan_in: usize, scale: f32) -> Self {
        Init::Kaiming { fan_in, scale }
    }

    /// A tensor of `shape` drawn from `rng`.
    pub fn draw(self, rng: &mut InitRng, shape: &[usize]) -> Tensor {
        let n: usize = shape.iter().product();
        let mut v = |f: &mut dyn FnMut(&mut InitRng) -> f64| -> Tensor {
            from_vec(shape, (0..n).map(|_| f(rng) as f32).collect())
        };
        match self {
            Init::Const(c) => from_vec(shape, vec![c; n]),
            Init::Kaiming { fan_in, scale } => {
                let b = 1.0 / (fan_in as f64).sqrt();
                let mut t = v(&mut |r| r.uniform(-b, b));
                if scale != 1.0 {
                    t.mapv_inplace(|x| x * scale);
                }
                t
            }
            Init::Uniform(lo, hi) => v(&mut |r| r.uniform(lo, hi)),
            Init::Normal(std) => v(&mut |r| std * r.normal()),
            Init::LogUniform(lo, hi) => v(&mut |r| r.uniform(lo, hi).ln()),
            Init::S4dReal => {
                let per = *shape.last().expect("A_log has a last dimension");
                from_vec(shape, (0..n).map(|j| ((j % per) as f32 + 1.0).ln()).collect())
            }
            Init::DtBias { min, max, floor } => {
                let (lo, hi) = ((min as f64).ln(), (max as f64).ln());
                v(&mut |r| {
                    let dt = r.uniform(lo, hi).exp().max(floor as f64);
                    dt + (-(-dt).exp_m1()).ln()
                })
            }
        }
    }
}

/// Where parameter values come from.
enum Source<'f> {
    /// Random initialisation.
    Init(InitRng),
    /// A checkpoint, by name (or one of the names `aliases` gives).
    Load { file: &'f TensorFile, aliases: fn(&str) -> Vec<String> },
    /// No values: only each parameter's full name and shape are recorded (the store is not
    /// touched), so a config's sizes can be checked before anything is allocated.
    Plan(Vec<(String, Vec<usize>)>),
}

/// The source a builder reads from: owned by the root builder, borrowed by scoped ones.
enum SourceRef<'a, 'f> {
    Owned(Source<'f>),
    Borrowed(&'a mut Source<'f>),
}

/// Registers parameters under a scoped name prefix. See the [module docs](self).
pub struct ParamBuilder<'a, 'f> {
    store: &'a mut ParamStore,
    source: SourceRef<'a, 'f>,
    prefix: String,
}

impl<'a> ParamBuilder<'a, 'static> {
    /// A root builder that draws every parameter from `rng`.
    pub fn init(store: &'a mut ParamStore, rng: InitRng) -> Self {
        Self { store, source: SourceRef::Owned(Source::Init(rng)), prefix: String::new() }
    }
}

impl<'a, 'f> ParamBuilder<'a, 'f> {
    /// A root builder that reads every parameter from `file` under its full name, or under one
    /// of the names `aliases(full_name)` lists (e.g. the original checkpoints'
    /// `backbone.embedding.weight` for `backbone.embeddings.weight`). A singleton dimension may
    /// differ (conv weights are (C, 1, K) in PyTorch and may be stored as (C, K)).
    pub fn load(store: &'a mut ParamStore, file: &'f TensorFile, aliases: fn(&str) -> Vec<String>) -> Self {
        Self { store, source: SourceRef::Owned(Source::Load { file, aliases }), prefix: String::new() }
    }

    /// A root builder that records names and shapes only ([`ParamBuilder::into_plan`]); the
    /// ids it returns index the plan, not `store`, which stays empty.
    pub(crate) fn plan(store: &'a mut ParamStore) -> Self {
        Self { store, source: SourceRef::Owned(Source::Plan(Vec::new())), prefix: String::new() }
    }

    /// The (full name, shape) of every parameter a [`ParamBuilder::plan`] builder registered,
    /// in registration order.
    pub(crate) fn into_plan(self) -> Vec<(String, Vec<usize>)> {
        match self.source {
            SourceRef::Owned(Source::Plan(p)) => p,
            _ => Vec::new(),
        }
    }

    fn source(&mut self) -> &mut Source<'f> {
        match &mut self.source {
            SourceRef::Owned(s) => s,
            SourceRef::Borrowed(s) => s,
        }
    }

    /// A builder for the scope `name` inside this one (`"backbone"`, then `"layers.0"`, …).
    pub fn pp(&mut self, name: &str) -> ParamBuilder<'_, 'f> {
        let prefix =
            if self.prefix.is_empty() { name.to_string() } else { format!("{}.{name}", self.prefix) };
        let source = match &mut self.source {
            SourceRef::Owned(s) => s,
            SourceRef::Borrowed(s) => &mut **s,
        };
        ParamBuilder { store: &mut *self.store, source: SourceRef::Borrowed(source), prefix }
    }

    /// The full name of `name` in this scope.
    pub fn full_name(&self, name: &str) -> String {
        if self.prefix.is_empty() { name.to_string() } else { format!("{}.{name}", self.prefix) }
    }

    /// Registers parameter `name` of `shape` in this scope and returns its id: drawn with `init`,
    /// or read from the checkpoint. AdamW decays it unless it is a vector or `A_log` (see
    /// [`Param::decay`](crate::params::Param::decay)).
    ///
    /// # Errors
    /// Loading: the tensor is missing, has another shape, or is not a float type.
    pub fn param(&mut self, name: &str, shape: &[usize], init: Init) -> Result<ParamId, CheckpointError> {
        let full = self.full_name(name);
        let value = match self.source() {
            Source::Plan(plan) => {
                plan.push((full, shape.to_vec()));
                return Ok(ParamId(plan.len() - 1));
            }
            Source::Init(rng) => init.draw(rng, shape),
            Source::Load { file, aliases } => file.f32_as(&full, &aliases(&full), shape)?,
        };
        let decay = shape.len() >= 2 && name != "A_log";
        Ok(self.store.add(full, value, decay))
    }

    /// [`ParamBuilder::param`] for a weight matrix (a projection, the embedding, the LM head):
    /// marked so inference may run it in a reduced precision ([`ParamStore::mark_matrix`]).
    pub fn matrix(&mut self, name: &str, shape: &[usize], init: Init) -> Result<ParamId, CheckpointError> {
        // Loading into a reduced precision: decode and pack block by block.
        if let Some(format) = self.store.packing_on_add() {
            let full = self.full_name(name);
            if let Source::Load { file, aliases } = self.source()
                && let Some(q) = file.packed_as(&full, &aliases(&full), shape, format)?
            {
                return Ok(self.store.add_packed(full, q, true));
            }
        }
        let id = self.param(name, shape, init)?;
        if !matches!(self.source(), Source::Plan(_)) {
            self.store.mark_matrix(id);
        }
        Ok(id)
    }

    /// Whether the checkpoint holds `name` in this scope (always `true` when initialising).
    pub fn has(&self, name: &str) -> bool {
        let source = match &self.source {
            SourceRef::Owned(s) => s,
            SourceRef::Borrowed(s) => &**s,
        };
        match source {
            Source::Init(_) | Source::Plan(_) => true,
            Source::Load { file, .. } => file.contains(&self.full_name(name)),
        }
    }
}
