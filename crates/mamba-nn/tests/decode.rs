//! The library's decoding API against the full forward, for every architecture: greedy tokens
//! from [`MambaLM::generate`] and the logits of every step equal what the full (parallel)
//! forward gives for the same sequence; a batched [`Decoder`] agrees with it row by row; and a
//! [`Generation`] streams the same tokens as the fixed-seed sampler picks.

use mamba_nn::config::{Arch, MambaConfig};
use mamba_nn::model::{Cache, Decoder, MambaLM, Sampler, SamplingConfig, SeqLayout, argmax};
use mamba_nn::tape::Tape;
use mamba_nn::tensor::data;

const V: usize = 40;

fn models() -> Vec<(&'static str, MambaLM)> {
    let m1 = MambaConfig::mamba1(V, 24, 2);
    let mut m2 = MambaConfig::mamba2(V, 32, 2);
    (m2.d_state, m2.headdim, m2.ngroups, m2.chunk_size) = (8, 16, 2, 4);
    let lti = MambaConfig { arch: Arch::Lti, ..MambaConfig::mamba1(V, 24, 2) };
    let mut untied = MambaConfig::mamba1(V, 24, 2);
    untied.tie_embeddings = false;
    [("mamba1", m1, 1), ("mamba2", m2, 2), ("lti", lti, 3), ("mamba1-untied", untied, 4)]
        .into_iter()
        .map(|(name, cfg, seed)| (name, MambaLM::new(cfg, seed).unwrap()))
        .collect()
}

/// Full-forward logits (B, L, V) of `ids` (B, L).
fn full_logits(model: &MambaLM, ids: &[usize], batch: usize) -> Vec<f32> {
    let mut tape = Tape::inference(&model.params);
    let logits = model.forward(&mut tape, ids, batch, ids.len() / batch);
    data(tape.value(logits)).to_vec()
}

fn assert_close(what: &str, got: &[f32], want: &[f32], tol: f32) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    let d = got.iter().zip(want).map(|(g, w)| (g - w).abs()).fold(0f32, f32::max);
    assert!(d <= tol, "{what}: max |diff| {d:.3e} exceeds {tol:e}");
}

fn on_threads(threads: usize, f: impl FnOnce() + Send) {
    rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap().install(f);
}

#[test]
fn greedy_generation_equals_the_full_forward() {
    for threads in [1, 3] {
        on_threads(threads, || {
            for (name, model) in models() {
                let prompt = [3usize, 17, 5, 29, 11];
                let n = 12;
                let mut g = model.generate(&prompt, n, Sampler::greedy()).unwrap();
                let (mut tokens, mut step_logits) = (Vec::new(), Vec::new());
                while let Some(t) = g.next() {
                    tokens.push(t);
                    step_logits.push(g.logits().to_vec());
                }
                assert_eq!(tokens.len(), n, "{name}");
                let all: Vec<usize> = prompt.iter().copied().chain(tokens.iter().copied()).collect();
                let full = full_logits(&model, &all, 1);
                for (i, (t, got)) in tokens.iter().zip(&step_logits).enumerate() {
                    let pos = prompt.len() - 1 + i;
                    let want = &full[pos * V..(pos + 1) * V];
                    assert_close(&format!("{name} ({threads} threads) step {i} logits"), got, want, 1e-4);
                    assert_eq!(*t, argmax(want), "{name}: greedy token {i} is not the full forward's argmax");
                }
            }
        });
    }
}

#[test]
fn batched_decoder_matches_the_full_forward_row_by_row() {
    for (name, model) in models() {
        let (batch, l, pre) = (3, 9, 4);
        let ids: Vec<usize> = (0..batch * l).map(|i| (i * 13 + 7) % V).collect();
        let full = full_logits(&model, &ids, batch);
        let mut dec = Decoder::new(&model, batch);
        let mut cache = Cache::new(&model, batch);
        let mut logits = vec![0.0f32; batch * V];
        let head: Vec<usize> = (0..batch).flat_map(|b| ids[b * l..b * l + pre].to_vec()).collect();
        dec.prefill(&head, &mut cache, &mut logits);
        let row = |b: usize, t: usize| &full[(b * l + t) * V..(b * l + t + 1) * V];
        for b in 0..batch {
            assert_close(
                &format!("{name} prefill row {b}"),
                &logits[b * V..(b + 1) * V],
                row(b, pre - 1),
                1e-4,
            );
        }
        for t in pre..l {
            let col: Vec<usize> = (0..batch).map(|b| ids[b * l + t]).collect();
            dec.step(&col, &mut cache, &mut logits);
            for b in 0..batch {
                assert_close(
                    &format!("{name} step t={t} row {b}"),
                    &logits[b * V..(b + 1) * V],
                    row(b, t),
                    1e-4,
                );
            }
        }
        // A reset cache starts over: prefilling row by row gives the batch's rows.
        let mut one = Decoder::new(&model, 1);
        let mut c1 = Cache::new(&model, 1);
        let mut l1 = vec![0.0f32; V];
        one.prefill(&ids[l..2 * l], &mut c1, &mut l1);
        assert_close(&format!("{name} single-row prefill"), &l1, row(1, l - 1), 1e-4);
        c1.reset();
        assert!(c1.layers.iter().all(|s| s.conv.iter().chain(&s.ssm).all(|&v| v == 0.0)), "{name}: reset");
    }
}

#[test]
fn sampled_generation_is_reproducible_and_follows_the_sampler() {
    let (_, model) = models().remove(1);
    let cfg = SamplingConfig { temperature: 0.9, top_k: 20, top_p: 0.95 };
    let run =
        |seed| model.generate(&[1, 2, 3], 15, Sampler::new(cfg, seed).unwrap()).unwrap().collect::<Vec<_>>();
    assert_eq!(run(5), run(5), "same seed, same tokens");
    assert_ne!(run(5), run(6), "another seed, other tokens");
    // The iterator's tokens are exactly the sampler's picks from its logits.
    let mut g = model.generate(&[1, 2, 3], 15, Sampler::new(cfg, 5).unwrap()).unwrap();
    let mut shadow = Sampler::new(cfg, 5).unwrap();
    while let Some(t) = g.next() {
        assert_eq!(t, shadow.pick(g.logits()), "the token is the sampler's pick from `logits()`");
    }
}

#[test]
fn bad_prompts_are_errors() {
    let (_, model) = models().remove(0);
    let e = model.generate(&[], 3, Sampler::greedy()).unwrap_err().to_string();
    assert!(e.contains("empty"), "{e}");
    let e = model.generate(&[1, V + 2], 3, Sampler::greedy()).unwrap_err().to_string();
    assert!(e.contains(&format!("{}", V + 2)) && e.contains("vocabulary"), "{e}");
}

/// The final recurrent state the full forward (on the tape) leaves for `ids` (B, L).
fn full_state(model: &MambaLM, ids: &[usize], batch: usize) -> Cache {
    let mut cache = Cache::new(model, batch);
    let mut tape = Tape::inference(&model.params);
    let h = model.embeddings.forward(&mut tape, ids, &[batch, ids.len() / batch]);
    model.backbone.forward(&mut tape, h, &SeqLayout::default(), Some(&mut cache));
    cache
}

fn assert_states_close(what: &str, got: &Cache, want: &Cache, tol: f32) {
    for (i, (g, w)) in got.layers.iter().zip(&want.layers).enumerate() {
        assert_close(&format!("{what}: layer {i} conv state"), &g.conv, &w.conv, tol);
        assert_close(&format!("{what}: layer {i} SSM state"), &g.ssm, &w.ssm, tol);
    }
}

/// A prompt several chunks long (the last one partial) is prefilled chunk by chunk with the
/// states carried: the last position's logits and every layer's final conv and SSM state equal
/// the full forward's, for every chunk length and architecture; steps then continue exactly; and
/// prefilling the prompt in two calls (the second continuing from the first's cache) is the same.
#[test]
fn chunked_prefill_carries_the_state_and_equals_the_full_forward() {
    for (name, model) in models() {
        let (batch, l, extra) = (2, 23, 4);
        let ids: Vec<usize> = (0..batch * (l + extra)).map(|i| (i * 7 + i / 5 + 3) % V).collect();
        let total = l + extra;
        let full = full_logits(&model, &ids, batch);
        let row = |b: usize, t: usize| &full[(b * total + t) * V..(b * total + t + 1) * V];
        let prompt: Vec<usize> = (0..batch).flat_map(|b| ids[b * total..b * total + l].to_vec()).collect();
        let want_state = full_state(&model, &prompt, batch);
        for chunk in [1, 3, 5, 8, 23, 64] {
            let what = format!("{name}, chunks of {chunk}");
            let mut dec = Decoder::new(&model, batch).with_prefill_chunk(chunk);
            let mut cache = Cache::new(&model, batch);
            let mut logits = vec![0.0f32; batch * V];
            dec.prefill(&prompt, &mut cache, &mut logits);
            for b in 0..batch {
                assert_close(
                    &format!("{what}: prefill row {b}"),
                    &logits[b * V..(b + 1) * V],
                    row(b, l - 1),
                    1e-4,
                );
            }
            assert_states_close(&what, &cache, &want_state, 1e-5);
            for t in l..total {
                let col: Vec<usize> = (0..batch).map(|b| ids[b * total + t]).collect();
                dec.step(&col, &mut cache, &mut logits);
                for b in 0..batch {
                    assert_close(
                        &format!("{what}: step {t} row {b}"),
                        &logits[b * V..(b + 1) * V],
                        row(b, t),
                        1e-4,
                    );
                }
            }
        }
        // Two prefill calls, the second continuing from the first's state.
        let split = 9;
        let mut dec = Decoder::new(&model, batch).with_prefill_chunk(4);
        let mut cache = Cache::new(&model, batch);
        let mut logits = vec![0.0f32; batch * V];
        let part = |r: std::ops::Range<usize>| -> Vec<usize> {
            (0..batch).flat_map(|b| prompt[b * l + r.start..b * l + r.end].to_vec()).collect()
        };
        dec.prefill(&part(0..split), &mut cache, &mut logits);
        dec.prefill(&part(split..l), &mut cache, &mut logits);
        for b in 0..batch {
            assert_close(
                &format!("{name}: prefill in two calls, row {b}"),
                &logits[b * V..(b + 1) * V],
                row(b, l - 1),
                1e-4,
            );
        }
        assert_states_close(&format!("{name}: prefill in two calls"), &cache, &want_state, 1e-5);
    }
}

/// `Decoder::score` sums the next-token losses the full forward's `forward_loss` averages, for
/// any chunk length, and scoring a sequence in two windows with the state carried gives the
/// whole sequence's score.
#[test]
fn chunked_scoring_equals_the_full_forward_loss() {
    for (name, model) in models() {
        let n = 30;
        let seq: Vec<usize> = (0..n).map(|i| (i * 11 + 5) % V).collect();
        let mut tape = Tape::inference(&model.params);
        let (_, loss) = model.forward_loss(&mut tape, &seq, 1, n);
        let want = data(tape.value(loss))[0] as f64 * (n - 1) as f64;
        for chunk in [1, 4, 7, 64] {
            let mut dec = Decoder::new(&model, 1).with_prefill_chunk(chunk);
            let mut cache = Cache::new(&model, 1);
            let got = dec.score(&seq[..n - 1], &seq[1..], &mut cache);
            assert!(
                (got - want).abs() <= 1e-4 * want.abs(),
                "{name}, chunks of {chunk}: score {got} vs {want}"
            );
            // Two windows with the state carried across.
            cache.reset();
            let cut = 13;
            let got = dec.score(&seq[..cut], &seq[1..=cut], &mut cache)
                + dec.score(&seq[cut..n - 1], &seq[cut + 1..], &mut cache);
            assert!(
                (got - want).abs() <= 1e-4 * want.abs(),
                "{name}, chunks of {chunk}, two windows: {got} vs {want}"
            );
        }
    }
}

/// Prompts of different lengths generated as one batch — one of them finishing early, one with
/// no budget, one stopped by the stop token — give each prompt exactly the tokens it gets alone,
/// greedy and sampled; finished sequences leave the batch.
#[test]
fn batched_generation_equals_one_prompt_at_a_time() {
    use mamba_nn::model::Request;
    for (name, model) in models() {
        let prompts: [&[usize]; 4] =
            [&[3, 17, 5, 29, 11, 2, 8], &[9], &[4, 4, 21], &[30, 1, 12, 7, 7, 19, 25, 33, 2, 6, 14]];
        let budgets = [12, 4, 0, 9];
        let requests: Vec<Request> = prompts.iter().zip(budgets).map(|(p, n)| Request::new(p, n)).collect();
        let cfg = SamplingConfig { temperature: 0.9, top_k: 0, top_p: 1.0 };
        for sampler in [Sampler::greedy(), Sampler::new(cfg, 42).unwrap()] {
            let alone: Vec<Vec<usize>> = requests
                .iter()
                .map(|r| model.generate(r.prompt, r.max_new_tokens, sampler.clone()).unwrap().collect())
                .collect();
            let mut g = model.generate_batch(&requests, sampler.clone(), None).unwrap();
            assert_eq!(g.active(), 3, "{name}: the request with no budget is finished at once");
            let mut active = vec![];
            while g.step().is_some() {
                active.push(g.active());
            }
            assert_eq!(g.tokens(), &alone[..], "{name}: batched vs alone ({:?})", sampler.config());
            // Rows leave as their budgets run out: 3 rows until request 1 (4 tokens) ends, …
            assert_eq!(active[3], 2, "{name}: {active:?}");
            assert_eq!(active[8], 1, "{name}: {active:?}");
            assert_eq!(*active.last().unwrap(), 0, "{name}: {active:?}");
            // A stop token ends a sequence when it is produced (and is kept as its last token).
            let stop = alone[0][5];
            let out = model.generate_batch(&requests, sampler.clone(), Some(stop)).unwrap().run();
            for (got, want) in out.tokens.iter().zip(&alone) {
                let end = want.iter().position(|&t| t == stop).map_or(want.len(), |i| i + 1);
                assert_eq!(got, &want[..end], "{name}: stop token {stop}");
            }
        }
    }
}
