//! LoRA adapters on whole models, for every architecture: a fresh adapter (B = 0) leaves the
//! logits exactly as they were; a trained one equals its merge `W + scale·B·A` on the tape and
//! in the decoder; its gradients are the full model's weight gradients projected through the
//! chain rule (`dB = s·dW·Aᵀ`, `dA = s·Bᵀ·dW`), the frozen base gets none; and the PEFT
//! directory round-trips, with malformed adapters refused by name.

use mamba_nn::config::{Arch, MambaConfig};
use mamba_nn::model::{Cache, Decoder, LoraConfig, MambaLM, ModelError};
use mamba_nn::params::{Grads, ParamId};
use mamba_nn::tape::Tape;
use mamba_nn::tensor::{data, data_mut};

const V: usize = 40;

fn models() -> Vec<(&'static str, MambaLM, Vec<&'static str>)> {
    let m1 = MambaConfig::mamba1(V, 24, 2);
    let mut m2 = MambaConfig::mamba2(V, 32, 2);
    (m2.d_state, m2.headdim, m2.ngroups, m2.chunk_size) = (8, 16, 2, 4);
    let lti = MambaConfig { arch: Arch::Lti, ..MambaConfig::mamba1(V, 24, 2) };
    [
        ("mamba1", m1, 1, vec!["in_proj", "x_proj", "dt_proj", "out_proj", "embeddings"]),
        ("mamba2", m2, 2, vec!["in_proj", "out_proj", "embeddings"]),
        ("lti", lti, 3, vec!["in_proj", "out_proj", "embeddings"]),
    ]
    .into_iter()
    .map(|(name, cfg, seed, t)| (name, MambaLM::new(cfg, seed).unwrap(), t))
    .collect()
}

fn lora(targets: &[&str]) -> LoraConfig {
    LoraConfig {
        rank: 3,
        alpha: 6.0,
        targets: targets.iter().map(|t| t.to_string()).collect(),
        rslora: false,
    }
}

fn ids(batch: usize, len: usize) -> Vec<usize> {
    (0..batch * len).map(|i| (i * 7 + 3) % V).collect()
}

fn logits(model: &MambaLM, ids: &[usize], batch: usize) -> Vec<f32> {
    let mut tape = Tape::inference(&model.params);
    let l = model.forward(&mut tape, ids, batch, ids.len() / batch);
    data(tape.value(l)).to_vec()
}

/// Logits of the last position after prefilling `ids` (one sequence) through the decoder.
fn decoder_last(model: &MambaLM, ids: &[usize]) -> Vec<f32> {
    let mut dec = Decoder::new(model, 1);
    let mut cache = Cache::new(model, 1);
    let mut out = vec![0.0; V];
    dec.prefill(ids, &mut cache, &mut out);
    out
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

/// Gives every adapter's zero factor (B of a projection, A of the embedding) deterministic
/// values, as training would.
fn perturb_b(model: &mut MambaLM) {
    let ad = &model.lora.as_ref().unwrap().modules;
    let zeros: Vec<ParamId> = ad.iter().map(|m| if m.embedding { m.lora.a } else { m.lora.b }).collect();
    for (j, b) in zeros.into_iter().enumerate() {
        for (i, v) in data_mut(model.params.value_mut(b)).iter_mut().enumerate() {
            *v = (((i * 31 + j * 17) % 23) as f32 / 23.0 - 0.5) * 0.3;
        }
    }
}

#[test]
fn a_fresh_adapter_leaves_the_logits_exactly_unchanged() {
    for (name, base, targets) in models() {
        let mut m = base.clone();
        let n = m.add_lora(&lora(&targets), 9).unwrap();
        assert_eq!(n, (targets.len() - 1) * 2 + 1, "{name}: one per projection per layer, one embedding");
        let x = ids(2, 9);
        assert_eq!(logits(&m, &x, 2), logits(&base, &x, 2), "{name}: tape forward");
        assert_eq!(decoder_last(&m, &x[..9]), decoder_last(&base, &x[..9]), "{name}: decoder");
        // Everything of the base is frozen; only the adapters train.
        let trainable: Vec<String> = m.params.trainable().map(|(_, p)| p.name.clone()).collect();
        assert_eq!(trainable.len(), 2 * n, "{name}");
        assert!(trainable.iter().all(|t| t.contains(".lora_")), "{name}: {trainable:?}");
    }
}

#[test]
fn a_trained_adapter_equals_its_merge_on_the_tape_and_in_the_decoder() {
    for (name, base, targets) in models() {
        let mut m = base.clone();
        m.add_lora(&lora(&targets), 9).unwrap();
        perturb_b(&mut m);
        let x = ids(2, 9);
        let adapted = logits(&m, &x, 2);
        assert!(max_diff(&adapted, &logits(&base, &x, 2)) > 1e-3, "{name}: the adapter changes the output");
        let dec = decoder_last(&m, &x[..9]);
        assert!(max_diff(&dec, &adapted[8 * V..9 * V]) < 1e-4, "{name}: decoder vs tape");
        let mut merged = m.clone();
        merged.merge_lora().unwrap();
        // The adapters are gone; the tied head became its own matrix (see below).
        assert!(merged.lora.is_none() && merged.params.len() == base.params.len() + 1, "{name}");
        assert!(merged.params.trainable().count() == merged.params.len(), "{name}: unfrozen after merge");
        let d = max_diff(&logits(&merged, &x, 2), &adapted);
        assert!(d < 1e-4, "{name}: merged vs adapted logits differ by {d:e}");
        // The merged weight is W + scale·B·A, computed here in f64.
        let ad = m.lora.as_ref().unwrap();
        let (module, l) = (&ad.modules[0].name, &ad.modules[0].lora);
        let w_id = m.params.id(&format!("{module}.weight")).unwrap();
        let (w0, a, b) =
            (data(base.params.value(w_id)), data(m.params.value(l.a)), data(m.params.value(l.b)));
        let k = a.len() / l.rank;
        let w1 = data(merged.params.value(w_id));
        for (idx, &got) in w1.iter().enumerate() {
            let (o, j) = (idx / k, idx % k);
            let ba: f64 = (0..l.rank).map(|q| b[o * l.rank + q] as f64 * a[q * k + j] as f64).sum();
            let want = w0[idx] as f64 + l.scale as f64 * ba;
            assert!((got as f64 - want).abs() < 1e-6, "{name}: {module} merged[{idx}] {got} vs {want}");
        }
        // The embedding adapter changed the lookup only: merged, the tied head keeps the base
        // matrix (untied), and the embedding matrix moved.
        let emb = base.embeddings.weight;
        assert!(!merged.config.tie_embeddings && merged.lm_head.weight != emb, "{name}: head untied");
        assert_eq!(data(merged.params.value(merged.lm_head.weight)), data(base.params.value(emb)), "{name}");
        assert_ne!(data(merged.params.value(emb)), data(base.params.value(emb)), "{name}: embedding merged");
    }
}

/// The loss gradient of parameter `id` of `model` for a fixed batch.
fn grads_of(model: &MambaLM) -> Grads {
    let x = ids(2, 10);
    let mut tape = Tape::new(&model.params);
    let (_, loss) = model.forward_loss(&mut tape, &x, 2, 10);
    let mut g = Grads::new(&model.params);
    tape.backward(loss, &mut g);
    g
}

#[test]
fn adapter_gradients_are_the_weight_gradients_through_the_chain_rule() {
    for (name, base, targets) in models() {
        let mut m = base.clone();
        m.add_lora(&lora(&targets), 9).unwrap();
        perturb_b(&mut m);
        let g = grads_of(&m);
        // The full model at the merged weights: dW there is dL/dW_eff of the adapted model.
        let mut merged = m.clone();
        merged.merge_lora().unwrap();
        let gm = grads_of(&merged);
        for am in &m.lora.as_ref().unwrap().modules {
            let (module, l, w_id) = (&am.name, &am.lora, am.weight);
            assert_eq!(g.get(w_id).len(), 0, "{name}: frozen {module}.weight has a gradient buffer");
            let (a, b, dw) = (data(m.params.value(l.a)), data(m.params.value(l.b)), data(gm.get(w_id)));
            let (r, s) = (l.rank, l.scale as f64);
            let n = b.len() / r;
            let dot = |len: usize, f: &dyn Fn(usize) -> f64| s * (0..len).map(f).sum::<f64>();
            let (want_a, want_b): (Vec<f64>, Vec<f64>) = if am.embedding {
                // W_eff (V, d) = W + s·Aᵀ (V, r)·Bᵀ: d(Aᵀ) = s·dW·B, dB (d, r) = s·dWᵀ·Aᵀ.
                let v = a.len() / r;
                let da =
                    (0..v * r).map(|i| dot(n, &|j| dw[(i / r) * n + j] as f64 * b[j * r + i % r] as f64));
                let db = (0..n * r).map(|i| dot(v, &|t| dw[t * n + i / r] as f64 * a[t * r + i % r] as f64));
                (da.collect(), db.collect())
            } else {
                // dB (n, r) = s·dW (n, k)·Aᵀ; dA (r, k) = s·Bᵀ·dW.
                let k = a.len() / r;
                let db =
                    (0..n * r).map(|i| dot(k, &|j| dw[(i / r) * k + j] as f64 * a[(i % r) * k + j] as f64));
                let da = (0..r * k).map(|i| dot(n, &|o| b[o * r + i / k] as f64 * dw[o * k + i % k] as f64));
                (da.collect(), db.collect())
            };
            for (what, got, want) in [("B", data(g.get(l.b)), &want_b), ("A", data(g.get(l.a)), &want_a)] {
                let scale = want.iter().fold(1e-3f64, |m, v| m.max(v.abs()));
                let d = got.iter().zip(want.iter()).map(|(g, w)| (*g as f64 - w).abs()).fold(0.0, f64::max);
                assert!(d <= 2e-4 * scale, "{name}: d{what} of {module}: max diff {d:e} vs scale {scale:e}");
            }
        }
    }
}

fn tmp(tag: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("mamba-lora-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

#[test]
fn the_peft_directory_round_trips() {
    for (name, base, targets) in models() {
        let mut m = base.clone();
        m.add_lora(&lora(&targets), 9).unwrap();
        perturb_b(&mut m);
        let dir = tmp(name);
        m.save_adapter(&dir, "some/base").unwrap();
        let cfg: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("adapter_config.json")).unwrap()).unwrap();
        assert_eq!(cfg["peft_type"], "LORA");
        assert_eq!(cfg["r"], 3);
        assert_eq!(cfg["lora_alpha"], 6.0);
        assert_eq!(cfg["base_model_name_or_path"], "some/base");
        let file = mamba_nn::checkpoint::TensorFile::open(dir.join("adapter_model.safetensors")).unwrap();
        let a0 = format!("base_model.model.backbone.layers.0.mixer.{}.lora_A.weight", targets[0]);
        assert!(file.contains(&a0), "{name}: PEFT key {a0}");
        let mut loaded = base.clone();
        let n = loaded.load_adapter(&dir).unwrap();
        assert_eq!(n, (targets.len() - 1) * 2 + 1, "{name}");
        let e0 = "base_model.model.backbone.embeddings.lora_embedding_A";
        assert_eq!(file.shape(e0).unwrap(), [3, V], "{name}: PEFT's (r, vocab) embedding A");
        let x = ids(1, 7);
        assert_eq!(logits(&loaded, &x, 1), logits(&m, &x, 1), "{name}: loaded adapter");
        // Loading the adapter directory as a model says what it is and how to use it.
        let e = MambaLM::from_pretrained(&dir).unwrap_err();
        assert!(matches!(&e, ModelError::IsAdapter { base, .. } if base == "some/base"), "{e}");
        assert!(e.to_string().contains("--model some/base --adapter"), "{e}");
        // A plain save refuses an unmerged adapter rather than dropping it.
        assert!(matches!(m.save_pretrained(tmp("refuse")), Err(ModelError::AdaptersAttached)));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

#[test]
fn bad_adapters_are_refused_naming_the_file_and_field() {
    let (_, base, _) = models().remove(0);
    let mut m = base.clone();
    let e = m.add_lora(&lora(&["conv1d"]), 0).unwrap_err().to_string();
    assert!(e.contains("`conv1d`") && e.contains("in_proj, x_proj, dt_proj, out_proj"), "{e}");
    let e = m.add_lora(&LoraConfig { rank: 0, ..lora(&["in_proj"]) }, 0).unwrap_err().to_string();
    assert!(e.contains("rank"), "{e}");
    assert!(m.lora.is_none() && m.params.trainable().count() == base.params.len(), "nothing half-attached");

    let mut trained = base.clone();
    trained.add_lora(&lora(&["in_proj"]), 1).unwrap();
    let dir = tmp("bad");
    trained.save_adapter(&dir, "b").unwrap();
    let cfg_path = dir.join("adapter_config.json");
    let good = std::fs::read_to_string(&cfg_path).unwrap();
    let cases = [
        (r#""peft_type": "LORA""#, r#""peft_type": "IA3""#, "only LoRA"),
        (r#""use_dora": false"#, r#""use_dora": true"#, "DoRA"),
        (r#""bias": "none""#, r#""bias": "all""#, "biases"),
        (r#""alpha_pattern": {}"#, r#""alpha_pattern": {"in_proj": 4}"#, "alpha_pattern"),
    ];
    for (from, to, want) in cases {
        assert!(good.contains(from), "{from} in {good}");
        std::fs::write(&cfg_path, good.replace(from, to)).unwrap();
        let e = base.clone().load_adapter(&dir).unwrap_err().to_string();
        assert!(e.contains("adapter_config.json") && e.contains(want), "{want}: {e}");
    }
    std::fs::write(&cfg_path, &good).unwrap();
    // A model of another width: the adapter's A has the wrong shape.
    let other = MambaLM::new(MambaConfig::mamba1(V, 32, 2), 1).unwrap();
    let e = other.clone().load_adapter(&dir).unwrap_err().to_string();
    assert!(
        e.contains("adapter_model.safetensors") && e.contains("lora_A.weight") && e.contains("shape"),
        "{e}"
    );
    // A model with fewer layers: the tensor names a layer it does not have.
    let shallow = MambaLM::new(MambaConfig::mamba1(V, 24, 1), 1).unwrap();
    let e = shallow.clone().load_adapter(&dir).unwrap_err().to_string();
    assert!(e.contains("backbone.layers.1.mixer.in_proj") && e.contains("not an adaptable module"), "{e}");
    std::fs::remove_dir_all(&dir).unwrap();
}
