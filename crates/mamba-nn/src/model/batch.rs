//! [`BatchGeneration`]: several prompts of different lengths generated together. Each prompt is
//! prefilled on its own (chunked, bounded memory) into its row of one [`Cache`]; then every
//! step feeds all unfinished sequences through one batched [`Decoder::step`], which reads each
//! weight once for all of them. A sequence that is finished — its token budget spent, or the
//! stop token produced — leaves the batch at once, so the others never wait for it and never
//! compute for it. Each prompt's tokens equal what [`MambaLM::generate`] gives for it alone
//! with the same sampler (every prompt samples from its own copy).
//!
//! ```
//! use mamba_nn::config::MambaConfig;
//! use mamba_nn::model::{MambaLM, Request, Sampler};
//!
//! let model = MambaLM::new(MambaConfig::mamba1(32, 16, 2), 0).unwrap();
//! let requests = [Request::new(&[1, 2, 3], 5), Request::new(&[7], 2)];
//! let out = model.generate_batch(&requests, Sampler::greedy(), None).unwrap().run();
//! assert_eq!(out.tokens[0].len(), 5);
//! assert_eq!(out.tokens[1].len(), 2);
//! ```

use std::time::{Duration, Instant};

use super::cache::Cache;
use super::decode::Decoder;
use super::generate::Sampler;
use super::{MambaLM, ModelError};

/// One prompt of a batch and how many tokens to generate for it.
#[derive(Clone, Copy, Debug)]
pub struct Request<'a> {
    /// Token ids to continue (not empty).
    pub prompt: &'a [usize],
    /// Most new tokens (fewer if the stop token comes first).
    pub max_new_tokens: usize,
}

impl<'a> Request<'a> {
    /// Continue `prompt` by at most `max_new_tokens` tokens.
    pub fn new(prompt: &'a [usize], max_new_tokens: usize) -> Self {
        Self { prompt, max_new_tokens }
    }
}

/// What a finished [`BatchGeneration`] produced.
#[derive(Clone, Debug, PartialEq)]
pub struct BatchOutput {
    /// New tokens per request, in request order (the stop token included when it ended one).
    pub tokens: Vec<Vec<usize>>,
    /// Prompt tokens prefilled per second (all prompts).
    pub prefill_tokens_per_s: f64,
    /// New tokens per second over the whole batch (the aggregate rate).
    pub decode_tokens_per_s: f64,
}

/// Several prompts generated together; see the [module docs](self).
#[derive(Debug)]
pub struct BatchGeneration<'m> {
    decoder: Decoder<'m>,
    /// The unfinished sequences' states, one row each.
    cache: Cache,
    /// Per row of `cache`: its request.
    rows: Vec<usize>,
    /// Per row: the token to feed at the next step.
    last: Vec<usize>,
    /// (rows, V) logits of the last step.
    logits: Vec<f32>,
    /// Per request: its sampler, remaining budget, tokens so far.
    samplers: Vec<Sampler>,
    remaining: Vec<usize>,
    tokens: Vec<Vec<usize>>,
    stop_token: Option<usize>,
    /// Whether the logits are waiting to be sampled (right after the prefill) rather than the
    /// last tokens waiting to be fed.
    fresh: bool,
    /// (request, token) pairs of the last [`BatchGeneration::step`].
    produced: Vec<(usize, usize)>,
    prompt_tokens: usize,
    generated: usize,
    prefill_time: Duration,
    decode_time: Duration,
}

impl<'m> BatchGeneration<'m> {
    /// One step for every unfinished sequence: feeds each its last token (except right after
    /// the prefill), samples the next, and drops the sequences that are now finished. Returns
    /// the (request index, token) pairs produced, or `None` once every request is finished.
    pub fn step(&mut self) -> Option<&[(usize, usize)]> {
        if self.rows.is_empty() {
            return None;
        }
        let t0 = Instant::now();
        let v = self.decoder.model().config.vocab_size;
        let b = self.rows.len();
        if !self.fresh {
            self.decoder.step(&self.last, &mut self.cache, &mut self.logits[..b * v]);
        }
        self.fresh = false;
        self.produced.clear();
        for (r, &req) in self.rows.iter().enumerate() {
            let token = self.samplers[req].pick(&self.logits[r * v..(r + 1) * v]);
            self.tokens[req].push(token);
            self.remaining[req] -= 1;
            self.last[r] = token;
            self.produced.push((req, token));
        }
        self.generated += b;
        // Drop the finished rows, last first so the swaps never move a row still to visit.
        for r in (0..b).rev() {
            let req = self.rows[r];
            if self.remaining[req] == 0 || Some(self.last[r]) == self.stop_token {
                self.cache.swap_remove_row(r);
                self.rows.swap_remove(r);
                self.last.swap_remove(r);
            }
        }
        self.decode_time += t0.elapsed();
        Some(&self.produced)
    }

    /// Runs every request to the end.
    pub fn run(mut self) -> BatchOutput {
        while self.step().is_some() {}
        BatchOutput {
            prefill_tokens_per_s: self.prefill_tokens_per_s(),
            decode_tokens_per_s: self.decode_tokens_per_s(),
            tokens: self.tokens,
        }
    }

    /// New tokens per request so far.
    pub fn tokens(&self) -> &[Vec<usize>] {
        &self.tokens
    }

    /// Number of unfinished sequences.
    pub fn active(&self) -> usize {
        self.rows.len()
    }

    /// Prompt tokens prefilled per second.
    pub fn prefill_tokens_per_s(&self) -> f64 {
        self.prompt_tokens as f64 / self.prefill_time.as_secs_f64().max(1e-9)
    }

    /// New tokens per second over the batch so far.
    pub fn decode_tokens_per_s(&self) -> f64 {
        self.generated as f64 / self.decode_time.as_secs_f64().max(1e-9)
    }
}

impl MambaLM {
    /// Generates for several prompts at once (see [`BatchGeneration`]): prefills each now, and
    /// each [`BatchGeneration::step`] advances all unfinished ones by a token. Every request
    /// samples from its own copy of `sampler`; a sequence ends after `max_new_tokens` tokens or
    /// after producing `stop_token`.
    ///
    /// # Errors
    /// An empty prompt or an id outside the vocabulary (the first such request's; its position
    /// in that prompt is in the error).
    pub fn generate_batch(
        &self,
        requests: &[Request],
        sampler: Sampler,
        stop_token: Option<usize>,
    ) -> Result<BatchGeneration<'_>, ModelError> {
        for r in requests {
            if r.prompt.is_empty() {
                return Err(ModelError::EmptyPrompt);
            }
            self.check_ids(r.prompt)?;
        }
        let t0 = Instant::now();
        let n = requests.len();
        let v = self.config.vocab_size;
        let mut decoder = Decoder::new(self, n.max(1));
        let mut cache = Cache::new(self, n);
        let mut logits = vec![0.0f32; n * v];
        let mut one = Cache::new(self, 1);
        for (i, r) in requests.iter().enumerate() {
            one.reset();
            decoder.prefill(r.prompt, &mut one, &mut logits[i * v..(i + 1) * v]);
            cache.copy_row(i, &one, 0);
        }
        let mut batch = BatchGeneration {
            decoder,
            cache,
            rows: (0..n).collect(),
            last: vec![0; n],
            logits,
            samplers: vec![sampler; n],
            remaining: requests.iter().map(|r| r.max_new_tokens).collect(),
            tokens: requests.iter().map(|r| Vec::with_capacity(r.max_new_tokens.min(1 << 16))).collect(),
            stop_token,
            fresh: true,
            produced: Vec::with_capacity(n),
            prompt_tokens: requests.iter().map(|r| r.prompt.len()).sum(),
            generated: 0,
            prefill_time: t0.elapsed(),
            decode_time: Duration::ZERO,
        };
        // Requests with no budget are finished before the first step.
        for r in (0..n).rev() {
            if batch.remaining[r] == 0 {
                batch.cache.swap_remove_row(r);
                batch.rows.swap_remove(r);
                batch.last.swap_remove(r);
                // Keep each row's prefill logits with its row.
                let last = batch.rows.len();
                if r != last {
                    batch.logits.copy_within(last * v..(last + 1) * v, r * v);
                }
            }
        }
        Ok(batch)
    }
}
