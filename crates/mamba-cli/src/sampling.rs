//! Choosing the next token from logits: greedy, or temperature / top-k / top-p sampling.

use mamba_train::data::Rng;

/// Sampling settings. `temperature == 0` is greedy.
#[derive(Clone, Copy, Debug)]
pub struct Sampling {
    /// Softmax temperature; 0 picks the argmax.
    pub temperature: f32,
    /// Keep only the `k` most likely tokens (0: all).
    pub top_k: usize,
    /// Keep the smallest set of most likely tokens whose probability reaches `p` (1: all).
    pub top_p: f32,
}

/// Picks a token from `logits` (one row of V). `scratch` is reused (no allocation after the
/// first call).
pub fn pick(logits: &[f32], s: &Sampling, rng: &mut Rng, scratch: &mut Vec<(f32, usize)>) -> usize {
    if s.temperature <= 0.0 {
        return mamba_train::mamba_nn::model::argmax(logits);
    }
    scratch.clear();
    scratch.extend(logits.iter().enumerate().map(|(i, &l)| (l / s.temperature, i)));
    scratch.sort_unstable_by(|a, b| b.0.total_cmp(&a.0));
    if s.top_k > 0 {
        scratch.truncate(s.top_k.min(scratch.len()));
    }
    let max = scratch[0].0;
    let mut total = 0.0f32;
    for e in scratch.iter_mut() {
        e.0 = (e.0 - max).exp();
        total += e.0;
    }
    if s.top_p < 1.0 {
        let (mut acc, mut keep) = (0.0f32, scratch.len());
        for (i, e) in scratch.iter().enumerate() {
            acc += e.0 / total;
            if acc >= s.top_p {
                keep = i + 1;
                break;
            }
        }
        scratch.truncate(keep);
        total = scratch.iter().map(|e| e.0).sum();
    }
    let u = (rng.next_u64() >> 11) as f32 / (1u64 << 53) as f32 * total;
    let mut acc = 0.0f32;
    for e in scratch.iter() {
        acc += e.0;
        if u < acc {
            return e.1;
        }
    }
    scratch.last().map_or(0, |e| e.1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_top_k_and_top_p() {
        let logits = [0.0f32, 3.0, 1.0, 2.9];
        let mut rng = Rng::new(1);
        let mut sc = Vec::new();
        let greedy = Sampling { temperature: 0.0, top_k: 0, top_p: 1.0 };
        assert_eq!(pick(&logits, &greedy, &mut rng, &mut sc), 1);
        // top-k 1 is greedy whatever the temperature.
        let k1 = Sampling { temperature: 5.0, top_k: 1, top_p: 1.0 };
        assert!((0..50).all(|_| pick(&logits, &k1, &mut rng, &mut sc) == 1));
        // top-k 2 only ever picks the two best.
        let k2 = Sampling { temperature: 1.0, top_k: 2, top_p: 1.0 };
        let picks: Vec<usize> = (0..200).map(|_| pick(&logits, &k2, &mut rng, &mut sc)).collect();
        assert!(picks.iter().all(|&t| t == 1 || t == 3) && picks.contains(&1) && picks.contains(&3));
        // A tiny top-p keeps only the best.
        let p = Sampling { temperature: 1.0, top_k: 0, top_p: 0.01 };
        assert!((0..50).all(|_| pick(&logits, &p, &mut rng, &mut sc) == 1));
        // Full sampling reaches every token eventually.
        let all = Sampling { temperature: 2.0, top_k: 0, top_p: 1.0 };
        let mut seen = [false; 4];
        for _ in 0..2000 {
            seen[pick(&logits, &all, &mut rng, &mut sc)] = true;
        }
        assert!(seen.iter().all(|&s| s));
    }
}
