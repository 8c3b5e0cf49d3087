//! [`Decoder`]: recurrent inference. It binds a model's weights (borrowed, so they cannot change
//! under it), owns every scratch buffer, and runs a batch of sequences either through the full
//! parallel forward ([`Decoder::prefill`]) or one token at a time ([`Decoder::step`]) against a
//! [`Cache`].

use ssm_kernel::team::Team;

use super::MambaLM;
use super::block::StepBufs;
use super::cache::Cache;

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
    /// Prefill chunk length and its buffers, grown on first use: the residual stream, the
    /// normalised rows and a block's output (B, chunk, d_model), the mixers' scratch, the
    /// chunk's ids.
    chunk: usize,
    ph: Vec<f32>,
    pr: Vec<f32>,
    pout: Vec<f32>,
    pscratch: Vec<f32>,
    chunk_ids: Vec<usize>,
    /// [`Decoder::score`]'s LM-head block: logits, log-sum-exps and targets.
    head_logits: Vec<f32>,
    head_lse: Vec<f32>,
    head_targets: Vec<i64>,
    /// The threads [`Decoder::step`]'s kernels split over ([`ssm_kernel::team`]), kept
    /// spinning between a step's many small kernels instead of woken for each: made by the
    /// first step (a decoder that only prefills or scores never starts them).
    team: Option<Team>,
    /// The team's size: the threads of the rayon pool the decoder was made in (1: no team).
    team_threads: usize,
}

/// Default [`Decoder::prefill_chunk`].
pub const DEFAULT_PREFILL_CHUNK: usize = 512;

/// Rows of logits [`Decoder::score`] computes at a time.
const HEAD_ROWS: usize = 64;

impl<'m> Decoder<'m> {
    /// A decoder for caches of up to `batch` sequences of `model`.
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
            chunk: DEFAULT_PREFILL_CHUNK,
            ph: Vec::new(),
            pr: Vec::new(),
            pout: Vec::new(),
            pscratch: Vec::new(),
            chunk_ids: Vec::new(),
            head_logits: Vec::new(),
            head_lse: Vec::new(),
            head_targets: Vec::new(),
            team: None,
            team_threads: rayon::current_num_threads(),
        }
    }

    /// The model this decoder runs.
    pub fn model(&self) -> &'m MambaLM {
        self.model
    }

    /// The most sequences a cache may hold for this decoder (each call runs the cache's batch).
    pub fn batch(&self) -> usize {
        self.batch
    }

    /// The batch of `cache`, checked against the decoder's capacity and the logits buffer.
    #[track_caller]
    fn check(&self, what: &str, cache: &Cache, logits: &[f32]) -> usize {
        let (b, v) = (cache.batch, self.model.config.vocab_size);
        assert!(
            b <= self.batch,
            "{what}: a cache of batch {b} for a decoder of at most {} sequences",
            self.batch
        );
        assert_eq!(logits.len(), b * v, "{what}: logits buffer of {} for (B, V) = ({b}, {v})", logits.len());
        b
    }

    /// Tokens per sequence that [`Decoder::prefill`] and [`Decoder::score`] run through the
    /// layers at once (default [`DEFAULT_PREFILL_CHUNK`]); their memory is this many tokens'
    /// activations of one layer, whatever the prompt's length.
    pub fn prefill_chunk(&self) -> usize {
        self.chunk
    }

    /// Sets [`Decoder::prefill_chunk`] (at least 1).
    pub fn with_prefill_chunk(mut self, tokens: usize) -> Self {
        self.chunk = tokens.max(1);
        self
    }

    /// Runs prompts `ids` (B, L) (row-major, `L = ids.len() / B`) through the parallel forward —
    /// no tape — in chunks of [`Decoder::prefill_chunk`] tokens, continuing from the state in
    /// `cache` (the empty state of [`Cache::new`] for new prompts) and leaving in it the state
    /// after the last token; writes the next-token logits of the last position (B, V) into
    /// `logits`. The LM head runs on the last position only. Memory does not grow with `L`.
    ///
    /// # Panics
    /// If `ids` is empty or not B rows, the cache or logits do not match the batch, or an id is
    /// outside the vocabulary (check with [`MambaLM::check_ids`]).
    #[track_caller]
    pub fn prefill(&mut self, ids: &[usize], cache: &mut Cache, logits: &mut [f32]) {
        let d = self.model.config.d_model;
        let bsz = self.check("prefill", cache, logits);
        assert!(
            !ids.is_empty() && ids.len().is_multiple_of(bsz),
            "prefill: {} ids do not make {bsz} non-empty rows",
            ids.len()
        );
        let l = ids.len() / bsz;
        let mut t0 = 0;
        while t0 < l {
            let lc = self.chunk.min(l - t0);
            self.forward_chunk(ids, l, t0, lc, cache);
            t0 += lc;
            if t0 == l {
                for b in 0..bsz {
                    let last = (b * lc + lc - 1) * d;
                    self.r[b * d..(b + 1) * d].copy_from_slice(&self.ph[last..last + d]);
                }
            }
        }
        let m = self.model;
        let n = bsz * d;
        m.backbone.norm_f.step(&m.params, &self.r[..n], &mut self.h[..n]);
        m.lm_head.step(&m.params, &self.h[..n], bsz, logits);
    }

    /// Scores sequences: `inputs` (B, L) run through the model as [`Decoder::prefill`] runs
    /// them (in chunks, continuing from and updating `cache`), and returns the sum over all
    /// B·L positions of `−ln p(targets[i] | inputs up to i)` in nats, with `targets` (B, L) the
    /// token that follows each input. The LM head runs on a few dozen rows at a time.
    ///
    /// # Panics
    /// As [`Decoder::prefill`], or if `targets` is not (B, L) or holds an id outside the
    /// vocabulary.
    #[track_caller]
    pub fn score(&mut self, inputs: &[usize], targets: &[usize], cache: &mut Cache) -> f64 {
        let (bsz, d, v) = (cache.batch, self.model.config.d_model, self.model.config.vocab_size);
        assert!(
            bsz <= self.batch,
            "score: a cache of batch {bsz} for a decoder of at most {} sequences",
            self.batch
        );
        assert!(
            !inputs.is_empty() && inputs.len().is_multiple_of(bsz) && targets.len() == inputs.len(),
            "score: {} inputs and {} targets do not make {bsz} equal non-empty rows",
            inputs.len(),
            targets.len()
        );
        let l = inputs.len() / bsz;
        let m = self.model;
        let mut nll = 0.0;
        let mut t0 = 0;
        while t0 < l {
            let lc = self.chunk.min(l - t0);
            self.forward_chunk(inputs, l, t0, lc, cache);
            // norm_f and the LM head over blocks of rows: (rows, V) logits at a time.
            let rows = bsz * lc;
            let mut normed = std::mem::take(&mut self.pr);
            m.backbone.norm_f.step(&m.params, &self.ph[..rows * d], &mut normed[..rows * d]);
            for r0 in (0..rows).step_by(HEAD_ROWS) {
                let nr = HEAD_ROWS.min(rows - r0);
                self.head_logits.resize(nr * v, 0.0);
                self.head_lse.resize(nr, 0.0);
                self.head_targets.clear();
                for r in r0..r0 + nr {
                    let (b, t) = (r / lc, r % lc);
                    let target = targets[b * l + t0 + t];
                    assert!(target < v, "score: target id {target} is outside the vocabulary (size {v})");
                    self.head_targets.push(target as i64);
                }
                m.lm_head.rows(&m.params, &normed[r0 * d..(r0 + nr) * d], nr, &mut self.head_logits);
                nll +=
                    ssm_kernel::xent::xent_fwd(v, &self.head_logits, &self.head_targets, &mut self.head_lse)
                        .0;
            }
            self.pr = normed;
            t0 += lc;
        }
        nll
    }

    /// Runs tokens `t0..t0 + lc` of every row of `ids` (B, l) through the blocks, continuing
    /// from `cache`; leaves the residual stream (B, lc, d_model) in `self.ph`.
    fn forward_chunk(&mut self, ids: &[usize], l: usize, t0: usize, lc: usize, cache: &mut Cache) {
        let (bsz, d) = (cache.batch, self.model.config.d_model);
        let m = self.model;
        let p = &m.params;
        let rows = bsz * lc;
        let need = m.backbone.layers.iter().map(|b| b.mixer.prefill_scratch_len(bsz, lc)).max().unwrap_or(0);
        for (buf, n) in [
            (&mut self.ph, rows * d),
            (&mut self.pr, rows * d),
            (&mut self.pout, rows * d),
            (&mut self.pscratch, need),
        ] {
            if buf.len() < n {
                buf.resize(n, 0.0);
            }
        }
        self.chunk_ids.clear();
        for b in 0..bsz {
            self.chunk_ids.extend_from_slice(&ids[b * l + t0..b * l + t0 + lc]);
        }
        m.embeddings.step(p, &self.chunk_ids, &mut self.ph[..rows * d]);
        for ((block, consts), state) in m.backbone.layers.iter().zip(&self.consts).zip(&mut cache.layers) {
            let (h, r, out) =
                (&mut self.ph[..rows * d], &mut self.pr[..rows * d], &mut self.pout[..rows * d]);
            block.norm.step(p, h, r);
            block.mixer.prefill(p, consts, r, lc, state, &mut self.pscratch, out);
            h.iter_mut().zip(out.iter()).for_each(|(h, o)| *h += o);
        }
    }

    /// Feeds one token per sequence (`ids`, length B), updating `cache`, and writes the
    /// next-token logits (B, V) into `logits`. Allocates nothing.
    ///
    /// # Panics
    /// If `ids`, the cache or the logits do not match the batch, or an id is outside the
    /// vocabulary.
    #[track_caller]
    pub fn step(&mut self, ids: &[usize], cache: &mut Cache, logits: &mut [f32]) {
        if self.team_threads <= 1 {
            return self.step_on_team(ids, cache, logits);
        }
        // Out of `self` while the step borrows it; back after (a panicking step drops it, and
        // the next step makes a new one).
        let team = self.team.take().unwrap_or_else(|| Team::new(self.team_threads));
        team.install(|| self.step_on_team(ids, cache, logits));
        self.team = Some(team);
    }

    /// [`Decoder::step`] with the team (if any) installed.
    #[track_caller]
    fn step_on_team(&mut self, ids: &[usize], cache: &mut Cache, logits: &mut [f32]) {
        let bsz = self.check("step", cache, logits);
        assert_eq!(ids.len(), bsz, "step: {} ids for a cache of batch {bsz}", ids.len());
        let m = self.model;
        let p = &m.params;
        let n = bsz * m.config.d_model;
        let (h, r, out) = (&mut self.h[..n], &mut self.r[..n], &mut self.out[..n]);
        m.embeddings.step(p, ids, h);
        for ((block, consts), state) in m.backbone.layers.iter().zip(&self.consts).zip(&mut cache.layers) {
            let bufs = StepBufs { r: &mut *r, out: &mut *out, scratch: &mut self.scratch };
            block.step(p, consts, h, state, bufs);
        }
        m.backbone.norm_f.step(p, h, r);
        m.lm_head.step(p, r, bsz, logits);
    }
}
