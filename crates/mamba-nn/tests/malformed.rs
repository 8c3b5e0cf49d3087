//! Malformed inputs: `config.json`, safetensors files and model directories that are truncated,
//! corrupt, inconsistent or hostile fail with an error naming the file — never a panic, never an
//! allocation sized by a number the file states. Deterministic cases first, then property tests
//! over arbitrary bytes and mutations of valid files (raise the case counts with
//! `PROPTEST_CASES`).

use std::path::{Path, PathBuf};

use mamba_nn::checkpoint::TensorFile;
use mamba_nn::config::MambaConfig;
use mamba_nn::model::{LoadOptions, MambaLM, ModelError};
use mamba_nn::tensor::from_vec;
use proptest::prelude::*;
use safetensors::{Dtype, tensor::TensorView};
use serde_json::{Value, json};

fn tmpdir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("mamba-nn-malformed-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// A small valid safetensors file: two f32 tensors and one i64.
fn valid_file() -> Vec<u8> {
    let a: Vec<u8> = [1.0f32, 2.0, 3.0, 4.0, 5.0, 6.0].iter().flat_map(|v| v.to_le_bytes()).collect();
    let b: Vec<u8> = [0.5f32, -0.5].iter().flat_map(|v| v.to_le_bytes()).collect();
    let c: Vec<u8> = [7i64].iter().flat_map(|v| v.to_le_bytes()).collect();
    let views = vec![
        ("a".to_string(), TensorView::new(Dtype::F32, vec![2, 3], &a).unwrap()),
        ("b".to_string(), TensorView::new(Dtype::F32, vec![2], &b).unwrap()),
        ("c".to_string(), TensorView::new(Dtype::I64, vec![1], &c).unwrap()),
    ];
    safetensors::serialize(views, None).unwrap()
}

/// A file with `header` as its JSON header and `data` after it.
fn with_header(header: &str, data: &[u8]) -> Vec<u8> {
    let mut out = (header.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(header.as_bytes());
    out.extend_from_slice(data);
    out
}

/// Parses `bytes`; on success reads every tensor (which must not panic either).
fn parse(bytes: Vec<u8>) -> Result<(), String> {
    let f = TensorFile::from_bytes("fuzz.safetensors", bytes).map_err(|e| e.to_string())?;
    let names: Vec<String> = f.names().map(String::from).collect();
    for n in names {
        let _ = f.f32(&n);
        let _ = f.i64(&n);
    }
    Ok(())
}

fn parse_err(bytes: Vec<u8>) -> String {
    let e = parse(bytes).expect_err("malformed file accepted");
    assert!(e.starts_with("fuzz.safetensors is not a valid safetensors file"), "{e}");
    e
}

#[test]
fn malformed_safetensors_are_errors_naming_the_file_and_the_fault() {
    assert!(parse(valid_file()).is_ok());
    assert!(parse_err(vec![]).contains("shorter than the 8-byte header length"));
    assert!(parse_err(vec![1, 2, 3]).contains("the file is 3 bytes"));
    // Header lengths beyond the file, absurd, and 2^63.
    for n in [100u64, 1 << 40, 1 << 63, u64::MAX] {
        let mut b = n.to_le_bytes().to_vec();
        b.extend_from_slice(b"{}");
        assert!(parse_err(b).contains(&format!("the header length {n} exceeds the 2 bytes after it")));
    }
    let v = valid_file();
    for cut in [8, 9, v.len() / 2, v.len() - 1] {
        parse_err(v[..cut].to_vec());
    }
    assert!(parse_err(with_header("not json", b"")).contains("the header is not a JSON object"));
    assert!(parse_err(with_header("[1, 2]", b"")).contains("the header is not a JSON object"));
    let deep = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
    assert!(parse_err(with_header(&deep, b"")).contains("the header is not a JSON object"));
    let e =
        parse_err(with_header(r#"{"t": {"dtype": "F32", "shape": [2], "data_offsets": [0, 16]}}"#, &[0; 8]));
    assert!(e.contains("tensor `t`: data_offsets [0, 16] are outside the 8 data bytes"), "{e}");
    let e =
        parse_err(with_header(r#"{"t": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}"#, &[0; 8]));
    assert!(
        e.contains("tensor `t`: shape [3] of F32 needs 96 bits but data_offsets [0, 8] hold 8 bytes"),
        "{e}"
    );
    let huge = r#"{"t": {"dtype": "F32", "shape": [4294967296, 4294967296, 16], "data_offsets": [0, 0]}}"#;
    assert!(
        parse_err(with_header(huge, b""))
            .contains("tensor `t`: shape [4294967296, 4294967296, 16] has too many elements")
    );
    let e = parse_err(with_header(
        r#"{"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
            "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}"#,
        &[0; 12],
    ));
    assert!(e.contains("tensors `a` and `b` overlap"), "{e}");
    let e =
        parse_err(with_header(r#"{"t": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}"#, &[0; 8]));
    assert!(e.contains("bytes 0..4 of the data belong to no tensor"), "{e}");
    let e =
        parse_err(with_header(r#"{"t": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}"#, &[0; 8]));
    assert!(e.contains("the tensors cover 4 bytes but the data has 8"), "{e}");
    let e =
        parse_err(with_header(r#"{"t": {"dtype": "Q9", "shape": [1], "data_offsets": [0, 4]}}"#, &[0; 4]));
    assert!(e.contains("tensor `t`: invalid entry"), "{e}");
    let e =
        parse_err(with_header(r#"{"t": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}"#, &[0; 4]));
    assert!(e.contains("tensor `t`: invalid entry"), "{e}");
    let e = parse_err(with_header(r#"{"__metadata__": {"k": 1}}"#, b""));
    assert!(e.contains("`__metadata__`"), "{e}");
    // Offsets near usize::MAX: rejected before any sum can overflow.
    let e = parse_err(with_header(
        r#"{"t": {"dtype": "F4", "shape": [4611686018427387900], "data_offsets": [0, 2305843009213693950]}}"#,
        b"",
    ));
    assert!(e.contains("outside the 0 data bytes"), "{e}");
    // An empty header and no data is a valid (empty) file.
    assert!(parse(with_header("{}", b"")).is_ok());
}

/// A tiny Mamba-1 model directory.
fn model_dir(tag: &str) -> (PathBuf, MambaLM) {
    let d = tmpdir(tag);
    let m = MambaLM::new(MambaConfig::mamba1(20, 8, 2), 1).unwrap();
    m.save_pretrained(&d).unwrap();
    (d, m)
}

fn set_config(dir: &Path, key: &str, v: Value) {
    let p = dir.join("config.json");
    let mut c: Value = serde_json::from_slice(&std::fs::read(&p).unwrap()).unwrap();
    c[key] = v;
    std::fs::write(&p, serde_json::to_vec(&c).unwrap()).unwrap();
}

#[test]
fn config_and_weights_must_agree_before_anything_is_allocated() {
    let (d, _) = model_dir("agree");
    let cfg = d.join("config.json");
    let st = d.join("model.safetensors");
    assert!(MambaLM::from_pretrained(&d).is_ok());

    // Fewer layers in the config than in the file: no longer dropped quietly.
    set_config(&d, "num_hidden_layers", json!(1));
    let e = MambaLM::from_pretrained(&d).unwrap_err();
    assert!(matches!(e, ModelError::LayerCount { config_layers: 1, file_layers: 2, .. }));
    assert_eq!(
        e.to_string(),
        format!(
            "{} says num_hidden_layers = 1, but {} holds 2 layer(s) (tensors `backbone.layers.{{i}}.*`)",
            cfg.display(),
            st.display()
        )
    );
    set_config(&d, "num_hidden_layers", json!(3));
    assert!(matches!(
        MambaLM::from_pretrained(&d).unwrap_err(),
        ModelError::LayerCount { config_layers: 3, file_layers: 2, .. }
    ));
    set_config(&d, "num_hidden_layers", json!(2));

    // Absurd sizes fail at validation; large but valid ones at the first shape check — both
    // immediately, without allocating from the config.
    let t = std::time::Instant::now();
    set_config(&d, "hidden_size", json!(1_000_000_000u64));
    let e = MambaLM::from_pretrained(&d).unwrap_err().to_string();
    assert!(
        e.contains(&format!("config {}: `hidden_size` = 1000000000: must be at most", cfg.display())),
        "{e}"
    );
    set_config(&d, "hidden_size", json!(8192));
    set_config(&d, "vocab_size", json!(300_000));
    set_config(&d, "time_step_rank", json!(512));
    let e = MambaLM::from_pretrained(&d).unwrap_err().to_string();
    assert_eq!(
        e,
        format!(
            "{}: tensor `backbone.embeddings.weight` has shape [20, 8], expected [300000, 8192]",
            st.display()
        )
    );
    assert!(t.elapsed().as_secs_f64() < 1.0, "took {:?}", t.elapsed());
    std::fs::remove_dir_all(&d).unwrap();
}

#[test]
fn non_finite_weights_are_refused_unless_allowed() {
    let (d, m) = model_dir("nan");
    let st = d.join("model.safetensors");
    let mut params = m.params.clone();
    let id = params.id("backbone.layers.1.mixer.x_proj.weight").unwrap();
    let shape = params.value(id).shape().to_vec();
    let mut v = params.value(id).iter().copied().collect::<Vec<_>>();
    v[0] = f32::NAN;
    v[3] = f32::INFINITY;
    v[5] = f32::NEG_INFINITY;
    *params.value_mut(id) = from_vec(&shape, v);
    let id2 = params.id("backbone.norm_f.weight").unwrap();
    params.value_mut(id2)[[0]] = f32::NAN;
    mamba_nn::checkpoint::save_params(&params, &st, |_| true).unwrap();

    let e = MambaLM::from_pretrained(&d).unwrap_err();
    assert!(matches!(&e, ModelError::NonFinite { count: 3, others: 1, .. }), "{e:?}");
    assert_eq!(
        e.to_string(),
        format!(
            "{}: tensor `backbone.layers.1.mixer.x_proj.weight` has 3 non-finite value(s) (NaN or ±inf); \
             1 other tensor(s) have some too",
            st.display()
        )
    );
    let m2 =
        MambaLM::from_pretrained_with(&d, LoadOptions { allow_non_finite: true, ..LoadOptions::default() })
            .unwrap();
    let w = m2.params.value(m2.params.id("backbone.layers.1.mixer.x_proj.weight").unwrap());
    assert!(w.iter().next().unwrap().is_nan());
    std::fs::remove_dir_all(&d).unwrap();
}

/// One random edit of a valid file.
#[derive(Clone, Debug)]
enum Mutation {
    Flip {
        at: usize,
        bit: u8,
    },
    Truncate {
        at: usize,
    },
    Splice {
        at: usize,
        garbage: Vec<u8>,
    },
    Overwrite {
        at: usize,
        garbage: Vec<u8>,
    },
    /// Replaces the `k`-th run of digits in the header by `value`.
    Number {
        k: usize,
        value: u64,
    },
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        (any::<usize>(), 0u8..8).prop_map(|(at, bit)| Mutation::Flip { at, bit }),
        any::<usize>().prop_map(|at| Mutation::Truncate { at }),
        (any::<usize>(), proptest::collection::vec(any::<u8>(), 1..16))
            .prop_map(|(at, garbage)| Mutation::Splice { at, garbage }),
        (any::<usize>(), proptest::collection::vec(any::<u8>(), 1..16))
            .prop_map(|(at, garbage)| Mutation::Overwrite { at, garbage }),
        (0usize..32, prop_oneof![0u64..64, any::<u64>(), Just(u64::MAX), Just(1 << 63)])
            .prop_map(|(k, value)| Mutation::Number { k, value }),
    ]
}

/// Applies `m` to `bytes`; `header_end` is where a safetensors header ends (for `Number`).
fn apply(mut bytes: Vec<u8>, m: &Mutation, header_end: usize) -> Vec<u8> {
    let n = bytes.len().max(1);
    match m {
        Mutation::Flip { at, bit } => {
            if !bytes.is_empty() {
                bytes[at % n] ^= 1 << bit;
            }
        }
        Mutation::Truncate { at } => bytes.truncate(at % n),
        Mutation::Splice { at, garbage } => {
            let at = at % (bytes.len() + 1);
            bytes.splice(at..at, garbage.iter().copied());
        }
        Mutation::Overwrite { at, garbage } => {
            for (i, g) in garbage.iter().enumerate() {
                if let Some(b) = bytes.get_mut((at + i) % n) {
                    *b = *g;
                }
            }
        }
        Mutation::Number { k, value } => {
            let end = header_end.min(bytes.len());
            let text = &bytes[..end];
            let mut runs = vec![];
            let mut i = 8.min(end);
            while i < end {
                if text[i].is_ascii_digit() {
                    let s = i;
                    while i < end && text[i].is_ascii_digit() {
                        i += 1;
                    }
                    runs.push(s..i);
                } else {
                    i += 1;
                }
            }
            if !runs.is_empty() {
                let r = runs[k % runs.len()].clone();
                bytes.splice(r, value.to_string().into_bytes());
            }
        }
    }
    bytes
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    /// Arbitrary bytes, and arbitrary bytes behind a plausible header length, never panic.
    #[test]
    fn safetensors_reader_never_panics_on_arbitrary_bytes(
        bytes in proptest::collection::vec(any::<u8>(), 0..256),
        len in 0u64..300,
    ) {
        if let Err(e) = parse(bytes.clone()) {
            prop_assert!(e.starts_with("fuzz.safetensors is not a valid safetensors file"), "{}", e);
        }
        let mut b = len.to_le_bytes().to_vec();
        b.extend_from_slice(&bytes);
        if let Err(e) = parse(b) {
            prop_assert!(e.starts_with("fuzz.safetensors"), "{}", e);
        }
    }

    /// One to three mutations of a valid file (bit flips, truncations, spliced garbage, changed
    /// numbers in the header) are parsed or refused, never a panic.
    #[test]
    fn safetensors_reader_never_panics_on_mutated_files(ms in proptest::collection::vec(mutation(), 1..4)) {
        let v = valid_file();
        let header_end = 8 + u64::from_le_bytes(v[..8].try_into().unwrap()) as usize;
        let b = ms.iter().fold(v, |b, m| apply(b, m, header_end));
        if let Err(e) = parse(b) {
            prop_assert!(e.starts_with("fuzz.safetensors is not a valid safetensors file"), "{}", e);
        }
    }

    /// Mutated `config.json` texts (including changed numbers) are read or refused naming the
    /// file — never a panic.
    #[test]
    fn config_parser_never_panics_on_mutated_json(
        ms in proptest::collection::vec(mutation(), 1..4),
        mamba2 in any::<bool>(),
    ) {
        let c = if mamba2 { MambaConfig::mamba2(300, 64, 2) } else { MambaConfig::mamba1(300, 64, 2) };
        let text = serde_json::to_vec(&c.to_hf_json()).unwrap();
        let n = text.len();
        let b = ms.iter().fold(text, |b, m| apply(b, m, n));
        let path = Path::new("fuzz/config.json");
        if let Ok(v) = serde_json::from_slice::<Value>(&b) {
            match MambaConfig::from_json(&v, path) {
                Ok(c) => {
                    prop_assert!(c.validate().is_ok());
                    prop_assert!(c.num_params().is_some_and(|p| p <= mamba_nn::config::MAX_PARAMS));
                }
                Err(e) => prop_assert!(e.to_string().contains("fuzz/config.json"), "{}", e),
            }
        }
    }

    /// Arbitrary JSON values of the config's keys never panic.
    #[test]
    fn config_parser_never_panics_on_arbitrary_values(
        values in proptest::collection::vec(prop_oneof![
            any::<u64>().prop_map(Value::from),
            any::<i64>().prop_map(Value::from),
            any::<f64>().prop_map(Value::from),
            Just(Value::Null),
            Just(json!("auto")),
            Just(json!([])),
            (0u64..5000).prop_map(Value::from),
        ], 12),
    ) {
        let keys = ["vocab_size", "hidden_size", "num_hidden_layers", "state_size", "expand",
            "conv_kernel", "time_step_rank", "head_dim", "n_groups", "num_heads", "chunk_size",
            "layer_norm_epsilon"];
        let mut c = serde_json::Map::new();
        for (k, v) in keys.iter().zip(values) {
            c.insert(k.to_string(), v);
        }
        for mt in ["mamba", "mamba2", "mamba-lti"] {
            c.insert("model_type".into(), json!(mt));
            if let Err(e) = MambaConfig::from_json(&Value::Object(c.clone()), Path::new("fuzz/config.json")) {
                prop_assert!(e.to_string().contains("fuzz/config.json"), "{}", e);
            }
        }
    }
}
