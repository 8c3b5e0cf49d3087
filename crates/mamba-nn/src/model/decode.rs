//! [`Decoder`]: recurrent inference. It binds a model's weights (borrowed, so they cannot change
//! under it), owns every scratch buffer, and runs a batch of sequences either through the full
//! parallel forward ([`Decoder::prefill`]) or one token at a time ([`Decoder::step`]) against a
//! [`Cache`].

use super::MambaLM;
use super::block::StepBufs;
use super::cache::Cache;
use crate::tape::Tape;
use crate::tensor::data;

/// Runs `batch` sequences of a model; see the [module docs](self).
///
/// ```
/// use mamba_nn::config::MambaConfig;
/// use mamba_nn::model::{Cache, Decoder, MambaLM};
///
/// let mut config = MambaConfig::mamba2(32, 16, 2);
/// (config.headdim, config.d_state) = (8, 16); // d_inner 32 = 4 heads of 8
/// let model = MambaLM::new(config, 0).unwrap();
/// let mut dec = Decoder::new(&model, 1);
/// let mut cache = Cache::new(&model, 1);
/// let mut logits = vec![0.0; 32];
/// dec.prefill(&[1, 2, 3], &mut cache, &mut logits); // logits of the token after 3
/// dec.step(&[4], &mut cache, &mut logits); // … and after 4
/// ```
#[derive(Debug)]
pub struct Decoder<'m> {
    model: &'m MambaLM,
    batch: usize,
    /// Per block, [`Mixer::decode_consts`](super::Mixer::decode_consts).
    consts: Vec<Vec<f32>>,
    /// The residual rows (B, d_model), the normalised rows and a block's output rows.
    h: Vec<f32>,
    r: Vec<f32>,
    out: Vec<f32>,
    /// The largest mixer scratch of any block.
    scratch: Vec<f32>,
}

impl<'m> Decoder<'m> {
    /// A decoder for `batch` sequences of `model`.
    pub fn new(model: &'m MambaLM, batch: usize) -> Self {
        let p = &model.params;
        let layers = &model.backbone.layers;
        let consts = layers.iter().map(|b| b.mixer.decode_consts(p)).collect();
        let scratch = layers.iter().map(|b| b.mixer.scratch_len(batch)).max().unwrap_or(0);
        let d = model.config.d_model;
        let z = |n: usize| vec![0.0f32; n];
        Self {
            model,
            batch,
            consts,
            h: z(batch * d),
            r: z(batch * d),
            out: z(batch * d),
            scratch: z(scratch),
        }
    }

    /// The model this decoder runs.
    pub fn model(&self) -> &'m MambaLM {
        self.model
    }

    /// Number of sequences.
    pub fn batch(&self) -> usize {
        self.batch
    }

    #[track_caller]
    fn check(&self, what: &str, cache: &Cache, logits: &[f32]) {
        let (b, v) = (self.batch, self.model.config.vocab_size);
        assert_eq!(cache.batch, b, "{what}: a cache of batch {} for a decoder of batch {b}", cache.batch);
        assert_eq!(logits.len(), b * v, "{what}: logits buffer of {} for (B, V) = ({b}, {v})", logits.len());
    }

    /// Runs prompts `ids` (B, L) (row-major, `L = ids.len() / B`) through the full parallel
    /// forward — no tape, no gradient — from the empty state, leaves the state after the last
    /// token in `cache`, and writes the next-token logits of the last position (B, V) into
    /// `logits`. The LM head runs on the last position only.
    ///
    /// # Panics
    /// If `ids` is empty or not B rows, the cache or logits do not match the batch, or an id is
    /// outside the vocabulary (check with [`MambaLM::check_ids`]).
    #[track_caller]
    pub fn prefill(&mut self, ids: &[usize], cache: &mut Cache, logits: &mut [f32]) {
        let (bsz, d) = (self.batch, self.model.config.d_model);
        self.check("prefill", cache, logits);
        assert!(
            !ids.is_empty() && ids.len().is_multiple_of(bsz),
            "prefill: {} ids do not make {bsz} non-empty rows",
            ids.len()
        );
        let l = ids.len() / bsz;
        let m = self.model;
        let mut tape = Tape::inference(&m.params);
        let h = m.embeddings.forward(&mut tape, ids, &[bsz, l]);
        let hf = m.backbone.forward(&mut tape, h, Some(cache));
        let hv = data(tape.value(hf));
        for b in 0..bsz {
            let last = (b * l + l - 1) * d;
            self.r[b * d..(b + 1) * d].copy_from_slice(&hv[last..last + d]);
        }
        m.lm_head.step(&m.params, &self.r, bsz, logits);
    }

    /// Feeds one token per sequence (`ids`, length B), updating `cache`, and writes the
    /// next-token logits (B, V) into `logits`. Allocates nothing.
    ///
    /// # Panics
    /// If `ids`, the cache or the logits do not match the batch, or an id is outside the
    /// vocabulary.
    #[track_caller]
    pub fn step(&mut self, ids: &[usize], cache: &mut Cache, logits: &mut [f32]) {
        let bsz = self.batch;
        assert_eq!(ids.len(), bsz, "step: {} ids for a decoder of batch {bsz}", ids.len());
        self.check("step", cache, logits);
        let m = self.model;
        let p = &m.params;
        m.embeddings.step(p, ids, &mut self.h);
        for ((block, consts), state) in m.backbone.layers.iter().zip(&self.consts).zip(&mut cache.layers) {
            let bufs = StepBufs { r: &mut self.r, out: &mut self.out, scratch: &mut self.scratch };
            block.step(p, consts, &mut self.h, state, bufs);
        }
        m.backbone.norm_f.step(p, &self.h, &mut self.r);
        m.lm_head.step(p, &self.r, bsz, logits);
    }
}
