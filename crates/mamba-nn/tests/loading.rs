//! Loading a model directory every way a published checkpoint comes: one mapped file, one file
//! read into memory, a sharded checkpoint (`model.safetensors.index.json`), and 16-bit weights
//! (BF16, F16). Each gives the same parameters; a broken shard index is an error naming the file
//! and the tensor.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use mamba_nn::checkpoint::TensorFile;
use mamba_nn::config::MambaConfig;
use mamba_nn::model::{LoadOptions, MambaLM};
use mamba_nn::tensor::data;
use safetensors::{Dtype, tensor::TensorView};

fn tmpdir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("mamba-nn-loading-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn saved(tag: &str) -> (PathBuf, MambaLM) {
    let mut cfg = MambaConfig::mamba2(48, 32, 3);
    (cfg.d_state, cfg.headdim) = (8, 16);
    let model = MambaLM::new(cfg, 11).unwrap();
    let dir = tmpdir(tag);
    model.save_pretrained(&dir).unwrap();
    (dir, model)
}

/// Every parameter of `a` and `b`, bit for bit.
fn assert_same_params(what: &str, a: &MambaLM, b: &MambaLM) {
    assert_eq!(a.params.len(), b.params.len(), "{what}: parameter count");
    for ((_, p), (_, q)) in a.params.iter().zip(b.params.iter()) {
        assert_eq!(p.name, q.name, "{what}");
        let same = data(&p.value).iter().zip(data(&q.value)).all(|(x, y)| x.to_bits() == y.to_bits());
        assert!(same && p.value.shape() == q.value.shape(), "{what}: `{}` differs", p.name);
    }
}

/// Writes the tensors of `file` into shards `dir/model-0000{i}-of-0000{n}.safetensors` (tensor
/// `j` to shard `j % n`) and the index; removes `model.safetensors`. Returns the weight map.
fn shard(dir: &Path, n: usize) -> HashMap<String, String> {
    let file = TensorFile::open(dir.join("model.safetensors")).unwrap();
    let names: Vec<String> = file.names().map(String::from).collect();
    let tensors: Vec<_> = names.iter().map(|n| (n.clone(), file.f32(n).unwrap())).collect();
    drop(file);
    let mut map = HashMap::new();
    for i in 0..n {
        let shard = format!("model-{:05}-of-{n:05}.safetensors", i + 1);
        let mine = tensors.iter().enumerate().filter(|(j, _)| j % n == i).map(|(_, (name, t))| {
            map.insert(name.clone(), shard.clone());
            (name.clone(), t)
        });
        mamba_nn::checkpoint::write_tensors(dir.join(&shard), mine, None).unwrap();
    }
    std::fs::remove_file(dir.join("model.safetensors")).unwrap();
    write_index(dir, &map);
    map
}

fn write_index(dir: &Path, map: &HashMap<String, String>) {
    let index = serde_json::json!({ "metadata": { "total_size": 0 }, "weight_map": map });
    std::fs::write(dir.join("model.safetensors.index.json"), index.to_string()).unwrap();
}

#[test]
fn mapped_read_and_sharded_loads_are_identical() {
    let (dir, model) = saved("ways");
    let mapped = MambaLM::from_pretrained(&dir).unwrap();
    assert_same_params("mapped", &mapped, &model);
    let read =
        MambaLM::from_pretrained_with(&dir, LoadOptions { mmap: false, ..LoadOptions::default() }).unwrap();
    assert_same_params("read", &read, &model);
    assert!(TensorFile::open(dir.join("model.safetensors")).unwrap().is_mapped());
    assert!(!TensorFile::read(dir.join("model.safetensors")).unwrap().is_mapped());
    shard(&dir, 3);
    let sharded = MambaLM::from_pretrained(&dir).unwrap();
    assert_same_params("sharded", &sharded, &model);
    assert_eq!(TensorFile::open_sharded(dir.join("model.safetensors.index.json")).unwrap().num_shards(), 3);
}

#[test]
fn broken_shard_indexes_are_errors_naming_the_file_and_tensor() {
    let (dir, _) = saved("broken");
    let map = shard(&dir, 2);
    let load = || MambaLM::from_pretrained(&dir).unwrap_err().to_string();
    let (name, file) = map.iter().next().map(|(a, b)| (a.clone(), b.clone())).unwrap();
    let other = if file.contains("00001-of") {
        "model-00002-of-00002.safetensors"
    } else {
        "model-00001-of-00002.safetensors"
    };

    // The index puts a tensor in the wrong shard.
    let mut wrong = map.clone();
    wrong.insert(name.clone(), other.to_string());
    write_index(&dir, &wrong);
    let e = load();
    assert!(e.contains(other) && e.contains(&name) && e.contains("missing"), "{e}");

    // A shard name that leaves the directory.
    let mut escape = map.clone();
    escape.insert(name.clone(), "../elsewhere.safetensors".into());
    write_index(&dir, &escape);
    let e = load();
    assert!(
        e.contains("../elsewhere.safetensors") && e.contains("not a file in the index's directory"),
        "{e}"
    );

    // A shard that is not there.
    let mut absent = map.clone();
    absent.insert(name.clone(), "model-00009-of-00009.safetensors".into());
    write_index(&dir, &absent);
    let e = load();
    assert!(e.contains("model-00009-of-00009.safetensors"), "{e}");

    // Not JSON, and JSON without a weight map.
    std::fs::write(dir.join("model.safetensors.index.json"), "{ nope").unwrap();
    assert!(load().contains("not JSON"), "{}", load());
    std::fs::write(dir.join("model.safetensors.index.json"), "{}").unwrap();
    assert!(load().contains("no `weight_map`"), "{}", load());

    // A tensor in two shards.
    write_index(&dir, &map);
    let first = dir.join(&file);
    let f = TensorFile::open(&first).unwrap();
    let mut names: Vec<String> = f.names().map(String::from).collect();
    let dup = TensorFile::open(dir.join(other)).unwrap().names().next().unwrap().to_string();
    names.push(dup.clone());
    let src = [TensorFile::open(&first).unwrap(), TensorFile::open(dir.join(other)).unwrap()];
    let tensors: Vec<_> = names
        .iter()
        .map(|n| {
            (n.clone(), if src[0].contains(n) { src[0].f32(n).unwrap() } else { src[1].f32(n).unwrap() })
        })
        .collect();
    drop((f, src));
    mamba_nn::checkpoint::write_tensors(&first, tensors.iter().map(|(n, t)| (n.clone(), t)), None).unwrap();
    let e = load();
    assert!(e.contains(&dup) && e.contains("is also in"), "{e}");
}

/// bf16 / f16 values of `v` with round-to-nearest-even, as little-endian bytes.
fn half_bytes(v: &[f32], dtype: Dtype) -> Vec<u8> {
    v.iter()
        .flat_map(|&x| {
            let bits = match dtype {
                Dtype::BF16 => {
                    let b = x.to_bits();
                    ((b + 0x7fff + ((b >> 16) & 1)) >> 16) as u16
                }
                _ => f32_to_f16(x),
            };
            bits.to_le_bytes()
        })
        .collect()
}

/// IEEE half of a normal-range f32, round-to-nearest-even (the weights here are far from the
/// subnormal and overflow ranges).
fn f32_to_f16(x: f32) -> u16 {
    let b = x.to_bits();
    let sign = ((b >> 16) & 0x8000) as u16;
    let e = ((b >> 23) & 0xff) as i32 - 127 + 15;
    if x == 0.0 || e <= 0 {
        return sign;
    }
    assert!(e < 31, "{x} overflows f16");
    let m = b & 0x7f_ffff;
    let mut h = ((e as u32) << 10) | (m >> 13);
    let rest = m & 0x1fff;
    if rest > 0x1000 || (rest == 0x1000 && h & 1 == 1) {
        h += 1;
    }
    sign | h as u16
}

fn half_to_f32(bits: u16, dtype: Dtype) -> f32 {
    match dtype {
        Dtype::BF16 => f32::from_bits((bits as u32) << 16),
        _ => {
            let (s, e, m) = ((bits >> 15) as u32, ((bits >> 10) & 0x1f) as u32, (bits & 0x3ff) as u32);
            if e == 0 && m == 0 {
                return f32::from_bits(s << 31);
            }
            f32::from_bits((s << 31) | ((e + 127 - 15) << 23) | (m << 13))
        }
    }
}

/// A checkpoint published in BF16 or F16 loads as the f32 values those halves hold.
#[test]
fn sixteen_bit_checkpoints_load_as_their_values() {
    for dtype in [Dtype::BF16, Dtype::F16] {
        let (dir, model) = saved(&format!("{dtype:?}"));
        let owned: Vec<(String, Vec<u8>, Vec<usize>)> = model
            .params
            .iter()
            .map(|(_, p)| (p.name.clone(), half_bytes(data(&p.value), dtype), p.value.shape().to_vec()))
            .collect();
        let views: Vec<(String, TensorView)> = owned
            .iter()
            .map(|(n, b, s)| (n.clone(), TensorView::new(dtype, s.clone(), b).unwrap()))
            .collect();
        std::fs::write(dir.join("model.safetensors"), safetensors::serialize(views, None).unwrap()).unwrap();
        let loaded = MambaLM::from_pretrained(&dir).unwrap();
        for ((_, p), (_, q)) in model.params.iter().zip(loaded.params.iter()) {
            let bytes = half_bytes(data(&p.value), dtype);
            let want: Vec<f32> =
                bytes.chunks_exact(2).map(|b| half_to_f32(u16::from_le_bytes([b[0], b[1]]), dtype)).collect();
            assert_eq!(data(&q.value), &want[..], "{dtype:?}: `{}`", p.name);
            // Half a unit in the last place; below f16's normal range (2^-14) this writer flushes
            // to zero.
            let (rel, floor) =
                if dtype == Dtype::BF16 { (1.0 / 256.0, 0.0) } else { (1.0 / 2048.0, 1.0 / 16384.0) };
            for (a, b) in data(&p.value).iter().zip(data(&q.value)) {
                assert!((a - b).abs() <= rel * a.abs() + floor, "{dtype:?}: `{}`: {a} vs {b}", p.name);
            }
        }
    }
}

/// Loading straight into a reduced precision (packed block by block from the file) gives exactly
/// the matrices that packing the f32 model gives, for every format — here with an embedding of
/// more rows than one block (40,000 × 32; a block is 8,192 rows).
#[test]
fn loading_packed_equals_packing_after_loading() {
    use mamba_nn::model::WeightFormat;
    use mamba_nn::params::Weight;
    let model = MambaLM::new(MambaConfig::mamba1(40_000, 32, 1), 5).unwrap();
    let dir = tmpdir("packed");
    model.save_pretrained(&dir).unwrap();
    for format in [WeightFormat::Bf16, WeightFormat::F16, WeightFormat::Q8] {
        let loaded = MambaLM::from_pretrained_with(
            &dir,
            LoadOptions { dtype: Some(format), ..LoadOptions::default() },
        )
        .unwrap();
        let mut packed = MambaLM::from_pretrained(&dir).unwrap();
        let n = packed.pack_weights(format);
        assert!(n >= 5, "{format}: {n} matrices packed");
        for ((id, p), (id2, _)) in loaded.params.iter().zip(packed.params.iter()) {
            match (loaded.params.weight(id), packed.params.weight(id2)) {
                (Weight::Packed(a), Weight::Packed(b)) => assert!(a == b, "{format}: `{}` differs", p.name),
                (Weight::F32(a), Weight::F32(b)) => assert_eq!(a, b, "{format}: `{}`", p.name),
                _ => panic!("{format}: `{}` packed in one model only", p.name),
            }
        }
        assert!(loaded.weight_bytes_per_token() < model.weight_bytes_per_token() * 2 / 3, "{format}");
    }
}
