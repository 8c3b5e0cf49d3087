//! Named parameters and their preallocated gradients.

use std::collections::HashMap;

use crate::tensor::{Tensor, zeros};

/// A parameter's index in its [`ParamStore`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ParamId(pub(crate) usize);

/// One trainable tensor.
#[derive(Clone, Debug)]
pub struct Param {
    /// Checkpoint name, e.g. `backbone.layers.0.mixer.in_proj.weight`.
    pub name: String,
    /// Current value.
    pub value: Tensor,
    /// Whether AdamW applies weight decay to it (no decay for `A_log`, `D`, dt biases, norms and
    /// biases).
    pub decay: bool,
}

/// Every parameter of a model, in creation order, addressable by id or by name.
#[derive(Clone, Debug, Default)]
pub struct ParamStore {
    params: Vec<Param>,
    index: HashMap<String, ParamId>,
}

impl ParamStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a parameter.
    ///
    /// # Panics
    /// If a parameter of that name exists (a model-building bug).
    #[track_caller]
    pub fn add(&mut self, name: impl Into<String>, value: Tensor, decay: bool) -> ParamId {
        let name = name.into();
        let id = ParamId(self.params.len());
        assert!(self.index.insert(name.clone(), id).is_none(), "parameter `{name}` added twice");
        self.params.push(Param { name, value, decay });
        id
    }

    /// The parameter `id`.
    pub fn get(&self, id: ParamId) -> &Param {
        &self.params[id.0]
    }

    /// The value of parameter `id`.
    pub fn value(&self, id: ParamId) -> &Tensor {
        &self.params[id.0].value
    }

    /// The value of parameter `id`, mutably.
    pub fn value_mut(&mut self, id: ParamId) -> &mut Tensor {
        &mut self.params[id.0].value
    }

    /// The id of the parameter called `name`.
    pub fn id(&self, name: &str) -> Option<ParamId> {
        self.index.get(name).copied()
    }

    /// All parameters with their ids, in creation order.
    pub fn iter(&self) -> impl Iterator<Item = (ParamId, &Param)> {
        self.params.iter().enumerate().map(|(i, p)| (ParamId(i), p))
    }

    /// Number of parameters (tensors).
    pub fn len(&self) -> usize {
        self.params.len()
    }

    /// Whether the store is empty.
    pub fn is_empty(&self) -> bool {
        self.params.is_empty()
    }

    /// Total number of scalars.
    pub fn num_elements(&self) -> usize {
        self.params.iter().map(|p| p.value.len()).sum()
    }
}

/// One gradient tensor per parameter, shaped like it, allocated once and accumulated into.
#[derive(Clone, Debug)]
pub struct Grads {
    grads: Vec<Tensor>,
}

impl Grads {
    /// Zero gradients for every parameter of `store`.
    pub fn new(store: &ParamStore) -> Self {
        Self { grads: store.params.iter().map(|p| zeros(p.value.shape())).collect() }
    }

    /// Sets every gradient to zero (no allocation).
    pub fn zero(&mut self) {
        for g in &mut self.grads {
            g.fill(0.0);
        }
    }

    /// The gradient of parameter `id`.
    pub fn get(&self, id: ParamId) -> &Tensor {
        &self.grads[id.0]
    }

    /// The gradient of parameter `id`, mutably.
    pub fn get_mut(&mut self, id: ParamId) -> &mut Tensor {
        &mut self.grads[id.0]
    }

    /// Moves the gradient of `id` out (leaving an empty placeholder, no allocation); the tape
    /// puts it back with [`Grads::put`].
    pub(crate) fn take(&mut self, id: ParamId) -> Tensor {
        std::mem::replace(&mut self.grads[id.0], zeros(&[0]))
    }

    pub(crate) fn put(&mut self, id: ParamId, t: Tensor) {
        self.grads[id.0] = t;
    }
}
