//! Text generation: a [`Sampler`] (greedy, or temperature / top-k / top-p with a seed) and
//! [`Generation`], the one generation loop — an iterator that prefills the prompt, then yields
//! one token per step — which the CLI streams from and the end-of-training sample uses.
//!
//! ```
//! use mamba_nn::config::MambaConfig;
//! use mamba_nn::model::{MambaLM, Sampler, SamplingConfig};
//!
//! let model = MambaLM::new(MambaConfig::mamba1(32, 16, 2), 0).unwrap();
//! let sampler = Sampler::new(SamplingConfig { temperature: 0.8, ..SamplingConfig::default() }, 7).unwrap();
//! let tokens: Vec<usize> = model.generate(&[1, 2, 3], 10, sampler).unwrap().collect();
//! assert_eq!(tokens.len(), 10);
//! ```

use std::time::{Duration, Instant};

use ssm_kernel::rng::SplitMix64;

use super::cache::Cache;
use super::decode::Decoder;
use super::{MambaLM, ModelError};

/// How the next token is chosen from the logits.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SamplingConfig {
    /// Softmax temperature; 0 picks the most likely token (greedy).
    pub temperature: f32,
    /// Keep only the `k` most likely tokens (0: all).
    pub top_k: usize,
    /// Keep the smallest set of most likely tokens whose probability reaches `p` (1: all).
    pub top_p: f32,
}

impl Default for SamplingConfig {
    /// Greedy.
    fn default() -> Self {
        Self { temperature: 0.0, top_k: 0, top_p: 1.0 }
    }
}

/// A sampling setting that cannot be used.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum SamplingError {
    /// The temperature is negative or not finite.
    #[error("temperature must be a finite number ≥ 0 (0 is greedy), got {0}")]
    Temperature(f32),
    /// `top_p` is outside (0, 1].
    #[error("top-p must be in (0, 1] (1 keeps every token), got {0}")]
    TopP(f32),
}

/// Picks tokens from logits as its [`SamplingConfig`] says, with its own seeded random stream.
#[derive(Clone, Debug)]
pub struct Sampler {
    config: SamplingConfig,
    rng: SplitMix64,
    /// (scaled logit or weight, token) pairs, reused.
    scratch: Vec<(f32, usize)>,
}

impl Sampler {
    /// A sampler with `config`, its random stream seeded by `seed`.
    ///
    /// # Errors
    /// A negative or non-finite temperature, or `top_p` outside (0, 1].
    pub fn new(config: SamplingConfig, seed: u64) -> Result<Self, SamplingError> {
        let t = config.temperature;
        if !(t.is_finite() && t >= 0.0) {
            return Err(SamplingError::Temperature(t));
        }
        if !(config.top_p > 0.0 && config.top_p <= 1.0) {
            return Err(SamplingError::TopP(config.top_p));
        }
        Ok(Self { config, rng: SplitMix64::new(seed), scratch: Vec::new() })
    }

    /// Always the most likely token.
    pub fn greedy() -> Self {
        Self { config: SamplingConfig::default(), rng: SplitMix64::new(0), scratch: Vec::new() }
    }

    /// Its settings.
    pub fn config(&self) -> SamplingConfig {
        self.config
    }

    /// The next token for one row of logits (V). Allocates nothing after the first call.
    pub fn pick(&mut self, logits: &[f32]) -> usize {
        let s = self.config;
        if s.temperature <= 0.0 {
            return argmax(logits);
        }
        let mut sc = std::mem::take(&mut self.scratch);
        sc.clear();
        sc.extend(logits.iter().enumerate().map(|(i, &l)| (l, i)));
        // Order matters only to top-k (which k) and top-p (walked from the best): the k best
        // are selected in linear time and only they sorted; plain sampling sorts nothing (a full
        // sort of a 50k vocabulary cost about as much as a q8 decode step's projections).
        let best_first = |a: &(f32, usize), b: &(f32, usize)| b.0.total_cmp(&a.0);
        if s.top_k > 0 && s.top_k < sc.len() {
            sc.select_nth_unstable_by(s.top_k - 1, best_first);
            sc.truncate(s.top_k);
        }
        if s.top_k > 0 || s.top_p < 1.0 {
            sc.sort_unstable_by(best_first);
        }
        // Weights exp((l − max) / T): the difference is taken before dividing, so however small
        // T is, every exponent is ≤ 0 and the best token weighs 1 (no overflow to ∞ − ∞).
        let max = sc.iter().fold(f32::NEG_INFINITY, |m, e| m.max(e.0));
        let mut total = 0.0f32;
        for e in sc.iter_mut() {
            e.0 = ((e.0 - max) / s.temperature).exp();
            total += e.0;
        }
        if s.top_p < 1.0 {
            let (mut acc, mut keep) = (0.0f32, sc.len());
            for (i, e) in sc.iter().enumerate() {
                acc += e.0 / total;
                if acc >= s.top_p {
                    keep = i + 1;
                    break;
                }
            }
            sc.truncate(keep);
            total = sc.iter().map(|e| e.0).sum();
        }
        let u = (self.rng.next_u64() >> 11) as f32 / (1u64 << 53) as f32 * total;
        let mut acc = 0.0f32;
        let mut pick = sc.last().map_or(0, |e| e.1);
        for e in sc.iter() {
            acc += e.0;
            if u < acc {
                pick = e.1;
                break;
            }
        }
        self.scratch = sc;
        pick
    }
}

/// Index of the largest value (the first one on ties).
pub fn argmax(v: &[f32]) -> usize {
    v.iter()
        .enumerate()
        .fold((0, f32::NEG_INFINITY), |best, (i, &x)| if x > best.1 { (i, x) } else { best })
        .0
}

/// A continuation of one prompt, token by token: see [`MambaLM::generate`].
#[derive(Debug)]
pub struct Generation<'m> {
    decoder: Decoder<'m>,
    cache: Cache,
    sampler: Sampler,
    /// The logits the next token is drawn from (V).
    logits: Vec<f32>,
    last: Option<usize>,
    remaining: usize,
    prompt_len: usize,
    generated: usize,
    prefill_time: Duration,
    decode_time: Duration,
}

impl<'m> Generation<'m> {
    /// The logits (V) the last token yielded was drawn from (before it: the prompt's).
    pub fn logits(&self) -> &[f32] {
        &self.logits
    }

    /// Prompt tokens per second of the prefill.
    pub fn prefill_tokens_per_s(&self) -> f64 {
        self.prompt_len as f64 / self.prefill_time.as_secs_f64().max(1e-9)
    }

    /// Generated tokens per second so far (steps and sampling).
    pub fn decode_tokens_per_s(&self) -> f64 {
        self.generated as f64 / self.decode_time.as_secs_f64().max(1e-9)
    }

    /// The recurrent state after the prompt and every token fed back so far.
    pub fn cache(&self) -> &Cache {
        &self.cache
    }
}

impl Iterator for Generation<'_> {
    type Item = usize;

    /// Feeds the previous token back (one recurrent step) and draws the next one.
    fn next(&mut self) -> Option<usize> {
        if self.remaining == 0 {
            return None;
        }
        let t0 = Instant::now();
        if let Some(prev) = self.last {
            self.decoder.step(&[prev], &mut self.cache, &mut self.logits);
        }
        let token = self.sampler.pick(&self.logits);
        self.last = Some(token);
        self.remaining -= 1;
        self.generated += 1;
        self.decode_time += t0.elapsed();
        Some(token)
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        (self.remaining, Some(self.remaining))
    }
}

impl MambaLM {
    /// Continues `prompt` by `max_new_tokens` tokens: prefills it through the full forward now,
    /// then each [`Iterator::next`] feeds the previous token back through one recurrent step and
    /// draws the next with `sampler`. The feed-back step for the last token is never run.
    ///
    /// # Errors
    /// An empty prompt or an id outside the vocabulary.
    pub fn generate(
        &self,
        prompt: &[usize],
        max_new_tokens: usize,
        sampler: Sampler,
    ) -> Result<Generation<'_>, ModelError> {
        if prompt.is_empty() {
            return Err(ModelError::EmptyPrompt);
        }
        self.check_ids(prompt)?;
        let t0 = Instant::now();
        let mut decoder = Decoder::new(self, 1);
        let mut cache = Cache::new(self, 1);
        let mut logits = vec![0.0f32; self.config.vocab_size];
        decoder.prefill(prompt, &mut cache, &mut logits);
        Ok(Generation {
            decoder,
            cache,
            sampler,
            logits,
            last: None,
            remaining: max_new_tokens,
            prompt_len: prompt.len(),
            generated: 0,
            prefill_time: t0.elapsed(),
            decode_time: Duration::ZERO,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_top_k_and_top_p() {
        let logits = [0.0f32, 3.0, 1.0, 2.9];
        let sampler = |temperature, top_k, top_p| {
            Sampler::new(SamplingConfig { temperature, top_k, top_p }, 1).unwrap()
        };
        assert_eq!(Sampler::greedy().pick(&logits), 1);
        assert_eq!(sampler(0.0, 0, 1.0).pick(&logits), 1);
        // top-k 1 is greedy whatever the temperature.
        let mut k1 = sampler(5.0, 1, 1.0);
        assert!((0..50).all(|_| k1.pick(&logits) == 1));
        // top-k 2 only ever picks the two best.
        let mut k2 = sampler(1.0, 2, 1.0);
        let picks: Vec<usize> = (0..200).map(|_| k2.pick(&logits)).collect();
        assert!(picks.iter().all(|&t| t == 1 || t == 3) && picks.contains(&1) && picks.contains(&3));
        // A tiny top-p keeps only the best.
        let mut p = sampler(1.0, 0, 0.01);
        assert!((0..50).all(|_| p.pick(&logits) == 1));
        // Full sampling reaches every token eventually.
        let mut all = sampler(2.0, 0, 1.0);
        let mut seen = [false; 4];
        for _ in 0..2000 {
            seen[all.pick(&logits)] = true;
        }
        assert!(seen.iter().all(|&s| s));
    }

    #[test]
    fn tiny_temperatures_are_greedy() {
        let logits = [1.0f32, 3.0, -2.0, 2.999];
        // A logit gap of 1e-3 is a weight of exp(-1e-3 / T): about e^-100 at T = 1e-5.
        for t in [1e-5f32, 1e-20, 1e-38, f32::MIN_POSITIVE] {
            let mut s = Sampler::new(SamplingConfig { temperature: t, ..Default::default() }, 3).unwrap();
            assert!((0..100).all(|_| s.pick(&logits) == 1), "temperature {t}");
        }
        // Huge logits too.
        let big = [3e38f32, -3e38, 1e38];
        let mut s = Sampler::new(SamplingConfig { temperature: 1e-30, ..Default::default() }, 3).unwrap();
        assert_eq!(s.pick(&big), 0);
    }

    #[test]
    fn sampling_frequencies_follow_the_softmax() {
        // Two tokens with logits 0 and ln 3 at temperature 1: the second 3/4 of the time.
        let logits = [0.0f32, 3f32.ln()];
        let mut s = Sampler::new(SamplingConfig { temperature: 1.0, ..Default::default() }, 11).unwrap();
        let n = 20_000;
        let ones = (0..n).filter(|_| s.pick(&logits) == 1).count() as f64 / n as f64;
        assert!((ones - 0.75).abs() < 0.02, "frequency of the likelier token {ones}");
    }

    #[test]
    fn bad_settings_are_errors() {
        let cfg = |temperature, top_p| SamplingConfig { temperature, top_k: 0, top_p };
        assert_eq!(Sampler::new(cfg(-1.0, 1.0), 0).unwrap_err(), SamplingError::Temperature(-1.0));
        assert!(matches!(Sampler::new(cfg(f32::NAN, 1.0), 0), Err(SamplingError::Temperature(_))));
        assert_eq!(Sampler::new(cfg(1.0, 0.0), 0).unwrap_err(), SamplingError::TopP(0.0));
        assert_eq!(Sampler::new(cfg(1.0, 1.5), 0).unwrap_err(), SamplingError::TopP(1.5));
        let msg = Sampler::new(cfg(1.0, 1.5), 0).unwrap_err().to_string();
        assert!(msg.contains("top-p") && msg.contains("1.5"), "{msg}");
    }
}
