//! safetensors checkpoint I/O: read any file's tensors by name with shape and dtype checks, load
//! them into a [`ParamStore`], and write parameters atomically.
//!
//! Every error names the file and, where there is one, the tensor with the expected and found
//! shape or dtype. Data is decoded with `from_le_bytes` (safetensors does not promise aligned
//! data); f32, f64, f16 and bf16 tensors load as f32.

use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::path::{Path, PathBuf};

use safetensors::{Dtype, SafeTensors, tensor::TensorView};

use ssm_kernel::qweight::{Q8_BLOCK, QMatrix, QStorage, WeightFormat};

use crate::params::ParamStore;
use crate::tensor::{Tensor, data, from_vec};

/// A checkpoint that cannot be read or does not fit the model.
#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    /// The file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// Not a safetensors file (truncated, corrupt, or another format).
    #[error("{path} is not a valid safetensors file (truncated or corrupt?): {reason}")]
    Format {
        /// The file.
        path: PathBuf,
        /// The parser's explanation.
        reason: String,
    },
    /// A tensor the model needs is not in the file.
    #[error("{path}: tensor `{tensor}` is missing{hint}")]
    Missing {
        /// The file.
        path: PathBuf,
        /// The tensor's name.
        tensor: String,
        /// Extra context (e.g. the names tried).
        hint: String,
    },
    /// A tensor has the wrong shape.
    #[error("{path}: tensor `{tensor}` has shape {found:?}, expected {expected:?}")]
    Shape {
        /// The file.
        path: PathBuf,
        /// The tensor's name.
        tensor: String,
        /// The shape the model needs.
        expected: Vec<usize>,
        /// The shape in the file.
        found: Vec<usize>,
    },
    /// A tensor has a dtype this crate cannot read as requested.
    #[error("{path}: tensor `{tensor}` has dtype {found}, expected {expected}")]
    Dtype {
        /// The file.
        path: PathBuf,
        /// The tensor's name.
        tensor: String,
        /// What was expected.
        expected: &'static str,
        /// What was found.
        found: String,
    },
}

/// The tensors of a safetensors checkpoint — one file, or the shards of a sharded one — indexed
/// by name and decoded on request.
///
/// [`TensorFile::open`] memory-maps the file: a tensor's bytes are read from the page cache when
/// it is decoded, and the pages are released right after, so loading a model holds one copy of
/// its weights in memory, not two. [`TensorFile::read`] reads the file into memory instead.
#[derive(Debug)]
pub struct TensorFile {
    /// The file, or the shard index (`model.safetensors.index.json`).
    path: PathBuf,
    shards: Vec<Shard>,
    /// name → (shard, dtype, shape, byte range within the shard)
    index: BTreeMap<String, (usize, Entry)>,
}

/// One safetensors file.
#[derive(Debug)]
struct Shard {
    path: PathBuf,
    bytes: Bytes,
}

/// A file's bytes: read into memory or mapped.
#[derive(Debug)]
enum Bytes {
    Owned(Vec<u8>),
    Mapped(memmap2::Mmap),
}

impl Bytes {
    fn as_slice(&self) -> &[u8] {
        match self {
            Bytes::Owned(v) => v,
            Bytes::Mapped(m) => m,
        }
    }

    /// Lets the kernel drop the mapped pages of `range`, and of [`FAULT_AROUND`] bytes on either
    /// side (they are read again from the file if touched again); a no-op for bytes in memory.
    ///
    /// The margin matters when a tensor is decoded a block at a time: Linux maps the pages
    /// around a faulting one that are still in the page cache (64 KiB by default, and the
    /// whole of a large folio, up to 2 MiB, on kernels that cache files in large folios, as
    /// ext4 does from Linux 6.16), so the first read of each block maps the previous block's
    /// last pages again. Released without the margin, loading the 130m shape into q8 kept
    /// 24 MB of such pages mapped until the end (peak RSS 1.20× the packed weights instead of
    /// 1.07×); with a 64 KiB margin on Linux 6.18, 37 MB (1.25×).
    fn release(&self, range: &std::ops::Range<usize>) {
        #[cfg(unix)]
        if let Bytes::Mapped(m) = self
            && !range.is_empty()
        {
            let start = range.start.saturating_sub(FAULT_AROUND);
            let end = range.end.saturating_add(FAULT_AROUND).min(m.len());
            // SAFETY: the mapping is read-only and file-backed, so MADV_DONTNEED only drops clean
            // pages that are faulted in again from the file on the next access; no data the
            // program wrote is discarded and no reference sees changed contents.
            let _ =
                unsafe { m.unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, start, end - start) };
        }
        #[cfg(not(unix))]
        let _ = range;
    }
}

/// Bytes released beyond each side of a range by `Bytes::release`: the most Linux maps around
/// a faulting page (its fault-around window, or a large folio of up to 2 MiB). Pages released
/// but not yet decoded are faulted back from the page cache when their block comes.
const FAULT_AROUND: usize = 2 << 20;

/// Largest safetensors header accepted (100 MB, the `safetensors` crate's own limit).
pub const MAX_HEADER_BYTES: u64 = 100_000_000;

/// One tensor's entry in a header: dtype, shape and byte range within the file.
type Entry = (Dtype, Vec<usize>, std::ops::Range<usize>);

impl TensorFile {
    /// Memory-maps and indexes `path` (see [`TensorFile::from_bytes`] for the checks). The file
    /// must not be truncated while the `TensorFile` lives (the checkpoints this workspace
    /// writes are replaced by a rename, never rewritten in place).
    pub fn open(path: impl AsRef<Path>) -> Result<Self, CheckpointError> {
        let path = path.as_ref().to_path_buf();
        let shard = Shard::map(&path)?;
        Self::single(shard)
    }

    /// Reads `path` into memory and indexes it (see [`TensorFile::from_bytes`] for the checks).
    pub fn read(path: impl AsRef<Path>) -> Result<Self, CheckpointError> {
        let path = path.as_ref().to_path_buf();
        let bytes =
            std::fs::read(&path).map_err(|source| CheckpointError::Io { path: path.clone(), source })?;
        Self::from_bytes(path, bytes)
    }

    /// Opens a sharded checkpoint from its index, Hugging Face's `model.safetensors.index.json`:
    /// `{"weight_map": {"tensor name": "shard file name", …}}`, the shards in the index's
    /// directory. Every shard is mapped and checked as [`TensorFile::open`] does; a tensor must
    /// be in the shard the index names and in no other.
    ///
    /// # Errors
    /// [`CheckpointError::Io`] for an unreadable index or shard, [`CheckpointError::Format`] for
    /// an invalid index (not JSON, no `weight_map`, a shard name that is not a plain file name),
    /// an invalid shard, or a tensor found in two shards; [`CheckpointError::Missing`] when a
    /// shard lacks a tensor the index puts there.
    pub fn open_sharded(index: impl AsRef<Path>) -> Result<Self, CheckpointError> {
        let path = index.as_ref().to_path_buf();
        let format = |reason: String| CheckpointError::Format { path: path.clone(), reason };
        let text = std::fs::read_to_string(&path)
            .map_err(|source| CheckpointError::Io { path: path.clone(), source })?;
        let json: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| format(format!("the shard index is not JSON: {e}")))?;
        let Some(map) = json.get("weight_map").and_then(|m| m.as_object()) else {
            return Err(format("the shard index has no `weight_map` object".into()));
        };
        let dir = path.parent().unwrap_or(Path::new("."));
        let mut names: Vec<&str> = Vec::new();
        for (tensor, file) in map {
            let Some(file) = file.as_str() else {
                return Err(format(format!("`weight_map` entry `{tensor}` is not a file name")));
            };
            let plain = Path::new(file).file_name().is_some_and(|f| f == std::ffi::OsStr::new(file));
            if !plain || file == ".." {
                return Err(format(format!(
                    "`weight_map` entry `{tensor}` names `{file}`, not a file in the index's directory"
                )));
            }
            if !names.contains(&file) {
                names.push(file);
            }
        }
        if names.is_empty() {
            return Err(format("the shard index's `weight_map` is empty".into()));
        }
        let shards = names.iter().map(|f| Shard::map(&dir.join(f))).collect::<Result<Vec<_>, _>>()?;
        let mut index = BTreeMap::new();
        for (i, shard) in shards.iter().enumerate() {
            let own = Self::index(shard.bytes.as_slice())
                .map_err(|reason| CheckpointError::Format { path: shard.path.clone(), reason })?;
            for (name, entry) in own {
                if let Some((j, _)) = index.get(&name) {
                    let other: &Shard = &shards[*j];
                    return Err(CheckpointError::Format {
                        path: shard.path.clone(),
                        reason: format!("tensor `{name}` is also in {}", other.path.display()),
                    });
                }
                index.insert(name, (i, entry));
            }
        }
        for (tensor, file) in map {
            let i = names.iter().position(|n| Some(*n) == file.as_str()).expect("listed above");
            if index.get(tensor).is_none_or(|(j, _)| *j != i) {
                return Err(CheckpointError::Missing {
                    path: shards[i].path.clone(),
                    tensor: tensor.clone(),
                    hint: format!(" (the shard index {} puts it there)", path.display()),
                });
            }
        }
        Ok(Self { path, shards, index })
    }

    fn single(shard: Shard) -> Result<Self, CheckpointError> {
        let index = Self::index(shard.bytes.as_slice())
            .map_err(|reason| CheckpointError::Format { path: shard.path.clone(), reason })?;
        let index = index.into_iter().map(|(n, e)| (n, (0, e))).collect();
        Ok(Self { path: shard.path.clone(), shards: vec![shard], index })
    }

    /// Indexes the safetensors file `bytes`; `path` names it in errors.
    ///
    /// Never panics and allocates nothing sized by the header's numbers: the 8-byte header length
    /// is checked against the file and [`MAX_HEADER_BYTES`] before the header is read; every
    /// tensor's dtype, shape and offsets are checked (shape product and byte size with checked
    /// arithmetic, the byte range inside the data and of exactly the size the dtype and shape
    /// give, ranges neither overlapping nor leaving gaps) before the `safetensors` crate parses
    /// the file again as a cross-check.
    ///
    /// # Errors
    /// [`CheckpointError::Format`] naming the file and, where there is one, the tensor.
    pub fn from_bytes(path: impl Into<PathBuf>, bytes: Vec<u8>) -> Result<Self, CheckpointError> {
        Self::single(Shard { path: path.into(), bytes: Bytes::Owned(bytes) })
    }

    /// The index of `bytes`, or why it is not a safetensors file.
    fn index(bytes: &[u8]) -> Result<BTreeMap<String, Entry>, String> {
        let Some((len_bytes, rest)) = bytes.split_first_chunk::<8>() else {
            return Err(format!("the file is {} bytes, shorter than the 8-byte header length", bytes.len()));
        };
        let n = u64::from_le_bytes(*len_bytes);
        if n > rest.len() as u64 {
            return Err(format!("the header length {n} exceeds the {} bytes after it", rest.len()));
        }
        if n > MAX_HEADER_BYTES {
            return Err(format!("the header length {n} exceeds the limit {MAX_HEADER_BYTES}"));
        }
        let (header, data) = rest.split_at(n as usize);
        let header = std::str::from_utf8(header).map_err(|e| format!("the header is not UTF-8: {e}"))?;
        let entries: BTreeMap<String, serde_json::Value> =
            serde_json::from_str(header).map_err(|e| format!("the header is not a JSON object: {e}"))?;
        let base = 8 + n as usize;
        let mut index = BTreeMap::new();
        for (name, v) in entries {
            if name == "__metadata__" {
                if !v.is_object() || v.as_object().is_some_and(|m| m.values().any(|x| !x.is_string())) {
                    return Err("`__metadata__` is not an object of strings".into());
                }
                continue;
            }
            let info: safetensors::tensor::TensorInfo = serde_json::from_value(v)
                .map_err(|e| format!("tensor `{name}`: invalid entry (dtype, shape, data_offsets): {e}"))?;
            let (s, e) = info.data_offsets;
            if s > e || e > data.len() {
                return Err(format!(
                    "tensor `{name}`: data_offsets [{s}, {e}] are outside the {} data bytes",
                    data.len()
                ));
            }
            let elements = info.shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d));
            let bits = elements.and_then(|x| x.checked_mul(info.dtype.bitsize()));
            let Some(bits) = bits else {
                return Err(format!("tensor `{name}`: shape {:?} has too many elements", info.shape));
            };
            if bits % 8 != 0 || bits / 8 != e - s {
                return Err(format!(
                    "tensor `{name}`: shape {:?} of {:?} needs {} bits but data_offsets [{s}, {e}] hold {} bytes",
                    info.shape,
                    info.dtype,
                    bits,
                    e - s
                ));
            }
            index.insert(name, (info.dtype, info.shape, base + s..base + e));
        }
        // The ranges must tile the data exactly: no overlap, no gap, nothing after the last.
        let mut ranges: Vec<(&str, std::ops::Range<usize>)> =
            index.iter().map(|(n, (_, _, r))| (n.as_str(), r.start - base..r.end - base)).collect();
        ranges.sort_by_key(|(_, r)| (r.start, r.end));
        let mut at = 0;
        let mut prev = "";
        for (name, r) in &ranges {
            if r.start < at {
                return Err(format!("tensors `{prev}` and `{name}` overlap (bytes {}..{at})", r.start));
            }
            if r.start > at {
                return Err(format!(
                    "bytes {at}..{} of the data belong to no tensor (before `{name}`)",
                    r.start
                ));
            }
            at = r.end;
            prev = name;
        }
        if at != data.len() {
            return Err(format!("the tensors cover {at} bytes but the data has {}", data.len()));
        }
        // Cross-check with the reference parser (it must agree after the checks above).
        SafeTensors::deserialize(bytes).map_err(|e| e.to_string())?;
        Ok(index)
    }

    /// The file's path (the shard index's for a sharded checkpoint).
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Number of files (1 unless sharded).
    pub fn num_shards(&self) -> usize {
        self.shards.len()
    }

    /// Whether the files are memory-mapped ([`TensorFile::open`]) rather than read.
    pub fn is_mapped(&self) -> bool {
        self.shards.iter().all(|s| matches!(s.bytes, Bytes::Mapped(_)))
    }

    /// Tensor names, sorted.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.index.keys().map(String::as_str)
    }

    /// Whether the file holds `name`.
    pub fn contains(&self, name: &str) -> bool {
        self.index.contains_key(name)
    }

    /// The dtype `name` is stored in.
    pub fn dtype(&self, name: &str) -> Option<Dtype> {
        self.index.get(name).map(|(_, (d, _, _))| *d)
    }

    /// The shape of `name`.
    pub fn shape(&self, name: &str) -> Option<&[usize]> {
        self.index.get(name).map(|(_, (_, s, _))| s.as_slice())
    }

    /// The shard holding `name` and its entry.
    fn entry(&self, name: &str) -> Result<(&Shard, &Entry), CheckpointError> {
        match self.index.get(name) {
            Some((i, e)) => Ok((&self.shards[*i], e)),
            None => Err(CheckpointError::Missing {
                path: self.path.clone(),
                tensor: name.to_string(),
                hint: String::new(),
            }),
        }
    }

    /// Tensor `name` as f32 (from f32, f64, f16 or bf16), any shape. A mapped file's pages of
    /// the tensor are released once it is decoded.
    pub fn f32(&self, name: &str) -> Result<Tensor, CheckpointError> {
        let (shard, (dtype, shape, range)) = self.entry(name)?;
        let raw = &shard.bytes.as_slice()[range.clone()];
        let Some(values) = decode(*dtype, raw) else {
            return Err(CheckpointError::Dtype {
                path: shard.path.clone(),
                tensor: name.into(),
                expected: "a float type (F32, F64, F16, BF16)",
                found: format!("{dtype:?}"),
            });
        };
        shard.bytes.release(range);
        Ok(from_vec(shape, values))
    }

    /// Tensor `name` as f32, checked to have `expected` shape.
    pub fn f32_shaped(&self, name: &str, expected: &[usize]) -> Result<Tensor, CheckpointError> {
        let (shard, (_, shape, _)) = self.entry(name)?;
        if shape != expected {
            return Err(CheckpointError::Shape {
                path: shard.path.clone(),
                tensor: name.into(),
                expected: expected.to_vec(),
                found: shape.clone(),
            });
        }
        self.f32(name)
    }

    /// The first of `name` and `aliases` that the file holds.
    pub fn find<'s>(&self, name: &'s str, aliases: &'s [String]) -> Option<&'s str> {
        std::iter::once(name).chain(aliases.iter().map(String::as_str)).find(|c| self.contains(c))
    }

    /// Tensor `name` — or, when the file lacks it, the first of `aliases` it holds — as f32 in
    /// `shape`. A difference in singleton dimensions only is accepted (conv weights (C, 1, K)
    /// stored as (C, K)).
    ///
    /// # Errors
    /// [`CheckpointError::Missing`] (naming the aliases tried), [`CheckpointError::Shape`] or
    /// [`CheckpointError::Dtype`].
    pub fn f32_as(&self, name: &str, aliases: &[String], shape: &[usize]) -> Result<Tensor, CheckpointError> {
        let found = self.resolve(name, aliases, shape)?;
        let t = self.f32(found)?;
        Ok(from_vec(shape, t.into_raw_vec_and_offset().0))
    }

    /// The name under which the file holds `name` (or an alias), checked to have `shape` up to
    /// singleton dimensions.
    fn resolve<'s>(
        &'s self,
        name: &str,
        aliases: &'s [String],
        shape: &[usize],
    ) -> Result<&'s str, CheckpointError> {
        let Some(found) = self.find_owned(name, aliases) else {
            let hint = if aliases.is_empty() {
                String::new()
            } else {
                let alts: Vec<String> = aliases.iter().map(|c| format!("`{c}`")).collect();
                format!(" (also looked for {})", alts.join(", "))
            };
            return Err(CheckpointError::Missing { path: self.path.clone(), tensor: name.into(), hint });
        };
        let (shard, (_, fshape, _)) = self.entry(found)?;
        let squeeze = |s: &[usize]| s.iter().copied().filter(|&d| d != 1).collect::<Vec<_>>();
        if fshape != shape && squeeze(fshape) != squeeze(shape) {
            return Err(CheckpointError::Shape {
                path: shard.path.clone(),
                tensor: found.into(),
                expected: shape.to_vec(),
                found: fshape.to_vec(),
            });
        }
        Ok(found)
    }

    /// [`TensorFile::find`] returning the file's own copy of the name.
    fn find_owned(&self, name: &str, aliases: &[String]) -> Option<&str> {
        std::iter::once(name)
            .chain(aliases.iter().map(String::as_str))
            .find_map(|c| self.index.get_key_value(c).map(|(k, _)| k.as_str()))
    }

    /// Matrix `name` (or an alias) of `shape` (n, …) packed into `format`, decoded and packed a
    /// block of rows at a time, so no f32 copy of the whole matrix is ever made (a mapped file's
    /// pages are released block by block). `Ok(None)` if it holds a non-finite value: such a
    /// matrix is not packed (load it with [`TensorFile::f32_as`]; the model loader reports it).
    ///
    /// # Errors
    /// As [`TensorFile::f32_as`].
    pub fn packed_as(
        &self,
        name: &str,
        aliases: &[String],
        shape: &[usize],
        format: WeightFormat,
    ) -> Result<Option<QMatrix>, CheckpointError> {
        let found = self.resolve(name, aliases, shape)?;
        let n = shape.first().copied().unwrap_or(1);
        let k: usize = shape.iter().skip(1).product();
        // About 1 MB of f32 per block.
        let block = ((1 << 18) / k.max(1)).clamp(1, n.max(1));
        // The storage is allocated once at its final size (in huge pages) and filled block by
        // block.
        let nb = k.div_ceil(Q8_BLOCK);
        let mut storage = match format {
            WeightFormat::F32 => QStorage::F32(huge_page_vec(n * k)),
            WeightFormat::Bf16 => QStorage::Bf16(huge_page_vec(n * k)),
            WeightFormat::F16 => QStorage::F16(huge_page_vec(n * k)),
            WeightFormat::Q8 => QStorage::Q8 { q: huge_page_vec(n * k), scales: Vec::with_capacity(n * nb) },
        };
        for r0 in (0..n).step_by(block) {
            let rows = block.min(n - r0);
            let vals = self.f32_rows(found, r0..r0 + rows)?;
            if vals.iter().any(|v| !v.is_finite()) {
                return Ok(None);
            }
            match (&mut storage, QMatrix::quantize(&vals, rows, k, format).into_storage()) {
                (QStorage::F32(a), QStorage::F32(b)) => a.extend(b),
                (QStorage::Bf16(a), QStorage::Bf16(b)) | (QStorage::F16(a), QStorage::F16(b)) => a.extend(b),
                (QStorage::Q8 { q: a, scales: s }, QStorage::Q8 { q: b, scales: t }) => {
                    a.extend(b);
                    s.extend(t);
                }
                _ => unreachable!("every block is packed in one format"),
            }
        }
        Ok(Some(QMatrix::from_storage(storage, n, k)))
    }

    /// Rows `rows` of tensor `name` (its first dimension) as f32; a mapped file's pages of those
    /// rows are released once decoded.
    pub fn f32_rows(&self, name: &str, rows: std::ops::Range<usize>) -> Result<Vec<f32>, CheckpointError> {
        let (shard, (dtype, shape, range)) = self.entry(name)?;
        let n = shape.first().copied().unwrap_or(1);
        let row: usize = shape.iter().skip(1).product();
        assert!(rows.start <= rows.end && rows.end <= n, "f32_rows: rows {rows:?} of `{name}` with {n} rows");
        let width = dtype.bitsize() / 8;
        let sub = range.start + rows.start * row * width..range.start + rows.end * row * width;
        let values =
            decode(*dtype, &shard.bytes.as_slice()[sub.clone()]).ok_or_else(|| CheckpointError::Dtype {
                path: shard.path.clone(),
                tensor: name.into(),
                expected: "a float type (F32, F64, F16, BF16)",
                found: format!("{dtype:?}"),
            })?;
        shard.bytes.release(&sub);
        Ok(values)
    }

    /// Tensor `name` as i64 values (from I64 or I32) with its shape.
    pub fn i64(&self, name: &str) -> Result<(Vec<usize>, Vec<i64>), CheckpointError> {
        let (shard, (dtype, shape, range)) = self.entry(name)?;
        let raw = &shard.bytes.as_slice()[range.clone()];
        let values = match dtype {
            Dtype::I64 => raw.chunks_exact(8).map(|b| i64::from_le_bytes(b.try_into().unwrap())).collect(),
            Dtype::I32 => {
                raw.chunks_exact(4).map(|b| i32::from_le_bytes(b.try_into().unwrap()) as i64).collect()
            }
            other => {
                return Err(CheckpointError::Dtype {
                    path: shard.path.clone(),
                    tensor: name.into(),
                    expected: "an integer type (I64, I32)",
                    found: format!("{other:?}"),
                });
            }
        };
        Ok((shape.clone(), values))
    }
}

impl Shard {
    /// Maps `path` read-only (files too short to hold a header are read instead, so they get
    /// the same "not a safetensors file" error).
    fn map(path: &Path) -> Result<Self, CheckpointError> {
        let io = |source| CheckpointError::Io { path: path.into(), source };
        let file = std::fs::File::open(path).map_err(io)?;
        let len = file.metadata().map_err(io)?.len();
        let bytes = if len < 8 {
            Bytes::Owned(std::fs::read(path).map_err(io)?)
        } else {
            // SAFETY: the map is read-only; its contents change only if another process rewrites
            // the file in place while it is loaded, which the checkpoints written here never do
            // (they are replaced by a rename).
            Bytes::Mapped(unsafe { memmap2::Mmap::map(&file) }.map_err(io)?)
        };
        Ok(Self { path: path.into(), bytes })
    }
}

/// An empty vector with room for `len` values, whose not-yet-touched allocation Linux is asked
/// to back with 2 MiB transparent huge pages where whole aligned 2 MiB spans of it allow (a
/// no-op elsewhere and when the system has them off; pages take effect as they are first
/// written, so the caller fills it afterwards).
///
/// Decode streams every packed weight once per token, and with 4 KiB pages each page of a
/// matrix is a TLB miss and a stop for the hardware prefetchers. On this project's benchmark
/// machine (`transparent_hugepage/enabled = madvise`, the common default), packing the 130m
/// shape with huge pages decoded 1.10× faster in q8 and bf16 (A/B over three alternating runs).
fn huge_page_vec<T>(len: usize) -> Vec<T> {
    let v = Vec::with_capacity(len);
    #[cfg(target_os = "linux")]
    {
        const HUGE: usize = 2 << 20;
        let start = v.as_ptr() as usize;
        let end = start + v.capacity() * std::mem::size_of::<T>();
        let (a, b) = (start.next_multiple_of(HUGE), end / HUGE * HUGE);
        if b > a {
            // SAFETY: [a, b) lies inside `v`'s allocation, which this process owns; the advice
            // changes only how its pages are backed, never their contents. An error (the
            // kernel without THP) leaves the pages as they were, which is fine.
            let _ = unsafe { libc::madvise(a as *mut libc::c_void, b - a, libc::MADV_HUGEPAGE) };
        }
    }
    v
}

/// Little-endian `raw` values of a float `dtype` as f32 (`None` for other dtypes).
fn decode(dtype: Dtype, raw: &[u8]) -> Option<Vec<f32>> {
    Some(match dtype {
        Dtype::F32 => raw.chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().unwrap())).collect(),
        Dtype::F64 => raw.chunks_exact(8).map(|b| f64::from_le_bytes(b.try_into().unwrap()) as f32).collect(),
        Dtype::BF16 => raw
            .chunks_exact(2)
            .map(|b| f32::from_bits((u16::from_le_bytes([b[0], b[1]]) as u32) << 16))
            .collect(),
        Dtype::F16 => raw.chunks_exact(2).map(|b| f16_to_f32(u16::from_le_bytes([b[0], b[1]]))).collect(),
        _ => return None,
    })
}

/// IEEE half to f32.
fn f16_to_f32(h: u16) -> f32 {
    let sign = ((h >> 15) as u32) << 31;
    let exp = ((h >> 10) & 0x1f) as u32;
    let mant = (h & 0x3ff) as u32;
    let bits = match (exp, mant) {
        (0, 0) => sign,
        (0, m) => {
            // Subnormal: renormalise.
            let shift = m.leading_zeros() - 21;
            sign | ((127 - 15 - shift + 1) << 23) | (((m << shift) & 0x3ff) << 13)
        }
        (0x1f, m) => sign | 0x7f80_0000 | (m << 13),
        (e, m) => sign | ((e + 127 - 15) << 23) | (m << 13),
    };
    f32::from_bits(bits)
}

/// Loads every parameter of `store` from `file`, by name. `aliases(name)` lists other names the
/// same tensor may have in a file (e.g. `backbone.embedding.weight` for
/// `backbone.embeddings.weight`). Returns the file's tensors that were not used.
pub fn load_params(
    store: &mut ParamStore,
    file: &TensorFile,
    aliases: impl Fn(&str) -> Vec<String>,
) -> Result<Vec<String>, CheckpointError> {
    let mut used = HashMap::new();
    let ids: Vec<_> = store.iter().map(|(id, p)| (id, p.name.clone(), p.value.shape().to_vec())).collect();
    for (id, name, shape) in ids {
        let alts = aliases(&name);
        let found = file.find(&name, &alts).unwrap_or(&name).to_string();
        *store.value_mut(id) = file.f32_as(&name, &alts, &shape)?;
        used.insert(found, ());
    }
    Ok(file.names().filter(|n| !used.contains_key(*n)).map(String::from).collect())
}

/// Writes `tensors` (name, f32 tensor) to `path` as safetensors, atomically: the data goes to a
/// temporary file in the same directory, is flushed to disk, and is renamed over `path`, so a
/// crash never leaves a half-written checkpoint.
pub fn write_tensors<'a>(
    path: impl AsRef<Path>,
    tensors: impl IntoIterator<Item = (String, &'a Tensor)>,
    metadata: Option<HashMap<String, String>>,
) -> Result<(), CheckpointError> {
    let path = path.as_ref();
    let owned: Vec<(String, Vec<u8>, Vec<usize>)> = tensors
        .into_iter()
        .map(|(n, t)| (n, data(t).iter().flat_map(|v| v.to_le_bytes()).collect(), t.shape().to_vec()))
        .collect();
    let views: Vec<(String, TensorView)> = owned
        .iter()
        .map(|(n, b, s)| {
            (n.clone(), TensorView::new(Dtype::F32, s.clone(), b).expect("sizes match by construction"))
        })
        .collect();
    let bytes = safetensors::serialize(views, metadata)
        .map_err(|e| CheckpointError::Format { path: path.into(), reason: e.to_string() })?;
    write_atomic(path, &bytes)
}

/// Writes `bytes` to `path` through a temporary file and a rename.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), CheckpointError> {
    let io = |source| CheckpointError::Io { path: path.into(), source };
    let dir = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let tmp = dir.join(format!(".{name}.tmp-{}", std::process::id()));
    let written = std::fs::File::create(&tmp)
        .and_then(|mut f| f.write_all(bytes).and_then(|()| f.sync_all()))
        .and_then(|()| std::fs::rename(&tmp, path));
    if written.is_err() {
        // A full disk or a failed write leaves no temporary behind.
        let _ = std::fs::remove_file(&tmp);
    }
    written.map_err(io)
}

/// Saves every parameter of `store` for which `keep(name)` holds.
pub fn save_params(
    store: &ParamStore,
    path: impl AsRef<Path>,
    keep: impl Fn(&str) -> bool,
) -> Result<(), CheckpointError> {
    let mut meta = HashMap::new();
    meta.insert("format".to_string(), "pt".to_string());
    write_tensors(
        path,
        store.iter().filter(|(_, p)| keep(&p.name)).map(|(_, p)| (p.name.clone(), &p.value)),
        Some(meta),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tensor::zeros;

    fn tmpdir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("mamba-nn-ckpt-{tag}-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    fn store() -> ParamStore {
        let mut s = ParamStore::new();
        s.add("backbone.embeddings.weight", from_vec(&[3, 2], vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0]), true);
        s.add(
            "backbone.layers.0.mixer.conv1d.weight",
            from_vec(&[2, 1, 2], vec![0.5, -0.5, 0.25, -0.25]),
            true,
        );
        s
    }

    #[test]
    fn round_trip_and_aliases() {
        let d = tmpdir("rt");
        let p = d.join("model.safetensors");
        let src = store();
        save_params(&src, &p, |_| true).unwrap();
        let mut dst = store();
        for (id, _) in dst.iter().map(|(i, p)| (i, p.name.clone())).collect::<Vec<_>>() {
            *dst.value_mut(id) = zeros(src.value(id).shape());
        }
        let unused = load_params(&mut dst, &TensorFile::open(&p).unwrap(), |_| vec![]).unwrap();
        assert!(unused.is_empty());
        for (id, p) in src.iter() {
            assert_eq!(dst.value(id), &p.value, "{}", p.name);
        }
        // The original naming of the embedding loads through an alias; conv (C, K) fits (C, 1, K).
        let e = from_vec(&[3, 2], vec![9.0; 6]);
        let c = from_vec(&[2, 2], vec![7.0; 4]);
        let p2 = d.join("orig.safetensors");
        write_tensors(
            &p2,
            [
                ("backbone.embedding.weight".to_string(), &e),
                ("backbone.layers.0.mixer.conv1d.weight".to_string(), &c),
            ],
            None,
        )
        .unwrap();
        let alias = |n: &str| {
            if n == "backbone.embeddings.weight" { vec!["backbone.embedding.weight".into()] } else { vec![] }
        };
        load_params(&mut dst, &TensorFile::open(&p2).unwrap(), alias).unwrap();
        assert_eq!(dst.value(dst.id("backbone.embeddings.weight").unwrap()), &e);
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn errors_name_file_tensor_and_shapes() {
        let d = tmpdir("err");
        let p = d.join("model.safetensors");
        let wrong = from_vec(&[4, 2], vec![0.0; 8]);
        write_tensors(&p, [("backbone.embeddings.weight".to_string(), &wrong)], None).unwrap();
        let mut s = store();
        let e = load_params(&mut s, &TensorFile::open(&p).unwrap(), |_| vec![]).unwrap_err().to_string();
        assert_eq!(
            e,
            format!("{}: tensor `backbone.embeddings.weight` has shape [4, 2], expected [3, 2]", p.display())
        );

        let ok = from_vec(&[3, 2], vec![0.0; 6]);
        write_tensors(&p, [("backbone.embeddings.weight".to_string(), &ok)], None).unwrap();
        let e = load_params(&mut s, &TensorFile::open(&p).unwrap(), |_| vec!["x.alias".into()])
            .unwrap_err()
            .to_string();
        assert_eq!(
            e,
            format!(
                "{}: tensor `backbone.layers.0.mixer.conv1d.weight` is missing (also looked for `x.alias`)",
                p.display()
            )
        );

        // Truncate the file: reported as not a valid safetensors file, naming it.
        let bytes = std::fs::read(&p).unwrap();
        std::fs::write(&p, &bytes[..bytes.len() - 5]).unwrap();
        let e = TensorFile::open(&p).unwrap_err().to_string();
        assert!(
            e.starts_with(&format!(
                "{} is not a valid safetensors file (truncated or corrupt?)",
                p.display()
            )),
            "{e}"
        );
        let e = TensorFile::open(d.join("absent.safetensors")).unwrap_err().to_string();
        assert!(e.contains("absent.safetensors"), "{e}");
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn half_precision_and_integer_tensors_decode() {
        assert_eq!(f16_to_f32(0x3c00), 1.0);
        assert_eq!(f16_to_f32(0xc000), -2.0);
        assert_eq!(f16_to_f32(0x0001), 2f32.powi(-24));
        assert_eq!(f16_to_f32(0x7bff), 65504.0);
        let d = tmpdir("dt");
        let p = d.join("ids.safetensors");
        let ids: Vec<u8> = [3i64, -100, 7].iter().flat_map(|v| v.to_le_bytes()).collect();
        let bf: Vec<u8> =
            [1.5f32, -0.25].iter().flat_map(|v| ((v.to_bits() >> 16) as u16).to_le_bytes()).collect();
        let views = vec![
            ("ids".to_string(), TensorView::new(Dtype::I64, vec![1, 3], &ids).unwrap()),
            ("bf".to_string(), TensorView::new(Dtype::BF16, vec![2], &bf).unwrap()),
        ];
        std::fs::write(&p, safetensors::serialize(views, None).unwrap()).unwrap();
        let f = TensorFile::open(&p).unwrap();
        assert_eq!(f.i64("ids").unwrap(), (vec![1, 3], vec![3, -100, 7]));
        assert_eq!(data(&f.f32("bf").unwrap()), &[1.5, -0.25]);
        let e = f.f32("ids").unwrap_err().to_string();
        assert_eq!(
            e,
            format!(
                "{}: tensor `ids` has dtype I64, expected a float type (F32, F64, F16, BF16)",
                p.display()
            )
        );
        std::fs::remove_dir_all(&d).unwrap();
    }
}
