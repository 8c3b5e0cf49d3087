//! Named parameters and their preallocated gradients, and the reduced-precision (packed) form
//! of the weight matrices that inference can run from.

use std::collections::HashMap;

use ssm_kernel::qweight::{QMatrix, WeightFormat};

use crate::tensor::{Tensor, data, zeros};

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
    /// Whether training updates it. A frozen parameter (a base weight under a LoRA adapter)
    /// gets no gradient buffer, no gradient on the tape and no optimizer state.
    pub trainable: bool,
}

/// Every parameter of a model, in creation order, addressable by id or by name.
///
/// Weight matrices (registered with [`ParamStore::mark_matrix`]: projections, embedding, LM
/// head) can be *packed* into a [`WeightFormat`] for inference ([`ParamStore::pack_matrices`]):
/// the f32 value is then dropped and [`ParamStore::weight`] serves the packed matrix, which the
/// decode and prefill paths multiply directly. A store with packed weights is inference-only:
/// the tape refuses it ([`ParamStore::is_packed`]).
#[derive(Clone, Debug, Default)]
pub struct ParamStore {
    params: Vec<Param>,
    index: HashMap<String, ParamId>,
    /// Per parameter: whether it is a weight matrix, and its packed form.
    matrix: Vec<bool>,
    packed: Vec<Option<QMatrix>>,
    /// The format matrices are packed into as they are registered (loading straight into a
    /// reduced precision, one tensor at a time).
    pack_on_add: Option<WeightFormat>,
}

/// A weight matrix as inference reads it: the f32 parameter value, or its packed form.
#[derive(Clone, Copy, Debug)]
pub enum Weight<'a> {
    /// Row-major f32 values.
    F32(&'a [f32]),
    /// Packed ([`ParamStore::pack_matrices`]).
    Packed(&'a QMatrix),
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
        self.params.push(Param { name, value, decay, trainable: true });
        self.matrix.push(false);
        self.packed.push(None);
        id
    }

    /// Adds weight matrix `name` already packed (loaded straight into a reduced precision); its
    /// f32 value is empty.
    ///
    /// # Panics
    /// If a parameter of that name exists.
    #[track_caller]
    pub fn add_packed(&mut self, name: impl Into<String>, q: QMatrix, decay: bool) -> ParamId {
        let id = self.add(name, zeros(&[0]), decay);
        self.matrix[id.0] = true;
        self.packed[id.0] = Some(q);
        id
    }

    /// The format matrices are packed into as they are added, if any.
    pub fn packing_on_add(&self) -> Option<WeightFormat> {
        self.pack_on_add
    }

    /// Marks parameter `id` (2-D or more: (n, k…)) as a weight matrix inference may pack; packs
    /// it at once if a format was set with [`ParamStore::pack_matrices_on_add`].
    pub fn mark_matrix(&mut self, id: ParamId) {
        self.matrix[id.0] = true;
        if let Some(f) = self.pack_on_add {
            self.pack(id, f);
        }
    }

    /// Packs every weight matrix registered from now on into `format` as it is added (a model
    /// loads straight into that precision, never holding all its f32 matrices at once).
    pub fn pack_matrices_on_add(&mut self, format: WeightFormat) {
        self.pack_on_add = (format != WeightFormat::F32).then_some(format);
    }

    /// Packs every weight matrix into `format` (`F32` leaves them as they are). A matrix holding
    /// a non-finite value stays f32 (quantizing it would be meaningless; loading reports such
    /// weights). Returns the number of matrices packed.
    ///
    /// # Panics
    /// If the matrices are already packed into another format.
    #[track_caller]
    pub fn pack_matrices(&mut self, format: WeightFormat) -> usize {
        if format == WeightFormat::F32 {
            return 0;
        }
        let ids: Vec<ParamId> = (0..self.params.len()).filter(|&i| self.matrix[i]).map(ParamId).collect();
        ids.into_iter().filter(|&id| self.pack(id, format)).count()
    }

    /// Packs `id`; `false` when it holds a non-finite value (left f32).
    #[track_caller]
    fn pack(&mut self, id: ParamId, format: WeightFormat) -> bool {
        if let Some(q) = &self.packed[id.0] {
            assert_eq!(
                q.format(),
                format,
                "`{}` is already packed as {}",
                self.params[id.0].name,
                q.format()
            );
            return true;
        }
        let value = &self.params[id.0].value;
        let v = data(value);
        if v.iter().any(|x| !x.is_finite()) {
            return false;
        }
        let n = value.shape()[0];
        let k = v.len() / n.max(1);
        self.packed[id.0] = Some(QMatrix::quantize(v, n, k, format));
        self.params[id.0].value = zeros(&[0]);
        true
    }

    /// Whether any parameter is packed (then only the inference paths can run the model).
    pub fn is_packed(&self) -> bool {
        self.packed.iter().any(Option::is_some)
    }

    /// Whether parameter `id` is packed.
    pub fn is_packed_param(&self, id: ParamId) -> bool {
        self.packed[id.0].is_some()
    }

    /// Weight matrix `id` as inference reads it.
    pub fn weight(&self, id: ParamId) -> Weight<'_> {
        match &self.packed[id.0] {
            Some(q) => Weight::Packed(q),
            None => Weight::F32(data(&self.params[id.0].value)),
        }
    }

    /// Bytes of parameter `id` as stored (packed or f32).
    pub fn stored_bytes(&self, id: ParamId) -> usize {
        match &self.packed[id.0] {
            Some(q) => q.size_bytes(),
            None => self.params[id.0].value.len() * 4,
        }
    }

    /// Removes every parameter from the `len`-th on (the ids of those before stay valid).
    pub fn truncate(&mut self, len: usize) {
        for p in self.params.drain(len.min(self.params.len())..) {
            self.index.remove(&p.name);
        }
        self.matrix.truncate(len);
        self.packed.truncate(len);
    }

    /// Freezes or unfreezes parameter `id` (see [`Param::trainable`]). Gradient buffers and
    /// optimizer state are sized when they are made ([`Grads::new`]), so set this before.
    pub fn set_trainable(&mut self, id: ParamId, trainable: bool) {
        self.params[id.0].trainable = trainable;
    }

    /// Whether parameter `id` is trained.
    pub fn is_trainable(&self, id: ParamId) -> bool {
        self.params[id.0].trainable
    }

    /// The trainable parameters with their ids, in creation order.
    pub fn trainable(&self) -> impl Iterator<Item = (ParamId, &Param)> {
        self.iter().filter(|(_, p)| p.trainable)
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

    /// Total number of scalars (packed matrices included).
    pub fn num_elements(&self) -> usize {
        let own =
            |(p, q): (&Param, &Option<QMatrix>)| q.as_ref().map_or(p.value.len(), |q| q.rows() * q.cols());
        self.params.iter().zip(&self.packed).map(own).sum()
    }
}

/// One gradient tensor per trainable parameter, shaped like it, allocated once and accumulated
/// into (a frozen parameter's is empty).
#[derive(Clone, Debug)]
pub struct Grads {
    grads: Vec<Tensor>,
}

impl Grads {
    /// Zero gradients for every trainable parameter of `store` (empty ones for frozen ones).
    pub fn new(store: &ParamStore) -> Self {
        let shape = |p: &Param| if p.trainable { zeros(p.value.shape()) } else { zeros(&[0]) };
        Self { grads: store.params.iter().map(shape).collect() }
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

    /// Total values over every gradient (frozen parameters' are empty).
    pub fn len(&self) -> usize {
        self.grads.iter().map(Tensor::len).sum()
    }

    /// Whether there are no gradient values at all.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Copies every gradient, in parameter order, into `flat` ([`Grads::len`] values): with
    /// [`Grads::read_flat`], how data-parallel ranks sum their gradients in one buffer.
    ///
    /// # Panics
    /// If `flat` does not hold [`Grads::len`] values.
    #[track_caller]
    pub fn write_flat(&self, flat: &mut [f32]) {
        assert_eq!(
            flat.len(),
            self.len(),
            "Grads::write_flat: {} values for {} gradients",
            flat.len(),
            self.len()
        );
        let mut at = 0;
        for g in &self.grads {
            let v = g.as_slice().expect("gradients are contiguous");
            flat[at..at + v.len()].copy_from_slice(v);
            at += v.len();
        }
    }

    /// Sets every gradient from `flat`, laid out as [`Grads::write_flat`] writes it.
    ///
    /// # Panics
    /// If `flat` does not hold [`Grads::len`] values.
    #[track_caller]
    pub fn read_flat(&mut self, flat: &[f32]) {
        assert_eq!(
            flat.len(),
            self.len(),
            "Grads::read_flat: {} values for {} gradients",
            flat.len(),
            self.len()
        );
        let mut at = 0;
        for g in &mut self.grads {
            let v = g.as_slice_mut().expect("gradients are contiguous");
            let n = v.len();
            v.copy_from_slice(&flat[at..at + n]);
            at += n;
        }
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
