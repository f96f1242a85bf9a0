//! Reading safetensors checkpoints: one file or a sharded set behind
//! `model.safetensors.index.json`. Files are memory-mapped and validated up front, so a
//! truncated or corrupt file is reported with its name before any computation starts.
use crate::error::{Error, Result};
use candle_core::{DType, Device, Tensor};
use safetensors::tensor::{Dtype, TensorInfo};
use safetensors::SafeTensors;
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

pub struct SafetensorsFile {
    pub path: PathBuf,
    mmap: memmap2::Mmap,
    header_len: usize,
    tensors: HashMap<String, TensorInfo>,
    pub metadata: Option<HashMap<String, String>>,
}

impl SafetensorsFile {
    pub fn open(path: &Path) -> Result<Self> {
        let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
        // SAFETY: the file is opened read-only; a concurrent writer could change the bytes under
        // us, which is the usual caveat of every safetensors loader (transformers' included).
        let mmap = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
        let (header_len, metadata) =
            SafeTensors::read_metadata(&mmap).map_err(|e| Error::Safetensors {
                path: path.to_path_buf(),
                msg: describe_safetensors_error(&e),
            })?;
        let tensors = metadata
            .tensors()
            .into_iter()
            .map(|(k, v)| (k, v.clone()))
            .collect();
        Ok(SafetensorsFile {
            path: path.to_path_buf(),
            header_len,
            tensors,
            metadata: metadata.metadata().clone(),
            mmap,
        })
    }

    pub fn names(&self) -> impl Iterator<Item = &String> {
        self.tensors.keys()
    }

    pub fn info(&self, name: &str) -> Option<&TensorInfo> {
        self.tensors.get(name)
    }

    pub fn bytes(&self, name: &str) -> Option<&[u8]> {
        let info = self.tensors.get(name)?;
        let start = 8 + self.header_len + info.data_offsets.0;
        let end = 8 + self.header_len + info.data_offsets.1;
        self.mmap.get(start..end)
    }
}

fn describe_safetensors_error(e: &safetensors::SafeTensorError) -> String {
    use safetensors::SafeTensorError as E;
    match e {
        E::MetadataIncompleteBuffer => {
            "the file is shorter or longer than its header says (truncated or corrupt download?)"
                .into()
        }
        E::HeaderTooSmall | E::InvalidHeaderLength => "the header is missing or truncated".into(),
        E::HeaderTooLarge => {
            "the header length is implausible (not a safetensors file, or corrupt)".into()
        }
        other => other.to_string(),
    }
}

/// All tensors of a checkpoint, looked up by their Hugging Face names.
pub struct WeightStore {
    files: Vec<SafetensorsFile>,
    by_name: HashMap<String, usize>,
    /// what to name in "missing weight" errors: the index file or the single safetensors file
    pub origin: PathBuf,
    /// the names read so far, for [`WeightStore::unread`]
    read: std::cell::RefCell<std::collections::HashSet<String>>,
}

impl WeightStore {
    /// Open `model.safetensors`, or the shards listed in `model.safetensors.index.json`.
    pub fn open_dir(dir: &Path) -> Result<Self> {
        let index = dir.join("model.safetensors.index.json");
        let single = dir.join("model.safetensors");
        if index.exists() {
            Self::open_index(&index)
        } else if single.exists() {
            Self::open_files(std::slice::from_ref(&single), single.clone())
        } else {
            Err(Error::config(
                dir,
                "no model.safetensors or model.safetensors.index.json found (only safetensors checkpoints are supported)",
            ))
        }
    }

    pub fn open_index(index: &Path) -> Result<Self> {
        #[derive(serde::Deserialize)]
        struct Index {
            weight_map: BTreeMap<String, String>,
        }
        let parsed: Index = crate::error::read_json(index)?;
        let dir = index.parent().unwrap_or(Path::new("."));
        let mut shard_names: Vec<&String> = parsed.weight_map.values().collect();
        shard_names.sort();
        shard_names.dedup();
        let mut paths = Vec::new();
        for shard in shard_names {
            let p = dir.join(shard);
            if !p.exists() {
                return Err(Error::config(
                    index,
                    format!("names the shard '{shard}', which does not exist"),
                ));
            }
            paths.push(p);
        }
        let store = Self::open_files(&paths, index.to_path_buf())?;
        for (name, shard) in &parsed.weight_map {
            match store.by_name.get(name) {
                Some(&i)
                    if store.files[i]
                        .path
                        .file_name()
                        .map(|f| f.to_string_lossy() == *shard)
                        == Some(true) => {}
                _ => {
                    return Err(Error::config(
                        index,
                        format!("maps '{name}' to '{shard}', but that shard does not contain it"),
                    ))
                }
            }
        }
        Ok(store)
    }

    pub fn open_files(paths: &[PathBuf], origin: PathBuf) -> Result<Self> {
        let mut files = Vec::new();
        let mut by_name = HashMap::new();
        for (i, p) in paths.iter().enumerate() {
            let f = SafetensorsFile::open(p)?;
            for name in f.names() {
                by_name.insert(name.clone(), i);
            }
            files.push(f);
        }
        Ok(WeightStore {
            files,
            by_name,
            origin,
            read: Default::default(),
        })
    }

    pub fn contains(&self, name: &str) -> bool {
        self.by_name.contains_key(name)
    }

    pub fn names(&self) -> Vec<String> {
        let mut v: Vec<String> = self.by_name.keys().cloned().collect();
        v.sort();
        v
    }

    pub fn files(&self) -> &[SafetensorsFile] {
        &self.files
    }

    /// The stored tensors nobody has read, sorted: after a model is built from the store, what
    /// its config did not ask for.
    pub fn unread(&self) -> Vec<String> {
        let read = self.read.borrow();
        let mut v: Vec<String> = self
            .by_name
            .keys()
            .filter(|n| !read.contains(*n))
            .cloned()
            .collect();
        v.sort();
        v
    }

    /// dtype, shape and bytes of a stored tensor
    pub fn raw(&self, name: &str) -> Result<(Dtype, Vec<usize>, &[u8], &Path)> {
        self.read.borrow_mut().insert(name.to_string());
        let i = *self.by_name.get(name).ok_or_else(|| Error::MissingWeight {
            name: name.to_string(),
            path: self.origin.clone(),
        })?;
        let f = &self.files[i];
        let info = f.info(name).ok_or_else(|| Error::MissingWeight {
            name: name.to_string(),
            path: f.path.clone(),
        })?;
        let bytes = f.bytes(name).ok_or_else(|| Error::Safetensors {
            path: f.path.clone(),
            msg: format!("data of '{name}' lies outside the file"),
        })?;
        Ok((info.dtype, info.shape.clone(), bytes, &f.path))
    }

    /// The stored dtype of the first floating-point tensor (the checkpoint's dtype).
    pub fn float_dtype(&self) -> Option<Dtype> {
        self.files
            .iter()
            .flat_map(|f| f.tensors.values())
            .map(|i| i.dtype)
            .find(|d| matches!(d, Dtype::F32 | Dtype::F16 | Dtype::BF16 | Dtype::F64))
    }

    /// Load `name`, check its shape and that every value is finite (a NaN weight would show
    /// only as a NaN score or loss, naming neither the weight nor the file), convert to `dtype`
    /// on `device`.
    pub fn tensor(
        &self,
        name: &str,
        shape: &[usize],
        dtype: DType,
        device: &Device,
    ) -> Result<Tensor> {
        let (st_dtype, got, bytes, path) = self.raw(name)?;
        if got != shape {
            return Err(Error::WeightShape {
                name: name.to_string(),
                path: path.to_path_buf(),
                expected: shape.to_vec(),
                got,
            });
        }
        check_finite(name, st_dtype, bytes, path)?;
        bytes_to_tensor(st_dtype, &got, bytes, path, name)?
            .to_dtype(dtype)?
            .to_device(device)
            .map_err(Error::from)
    }

    /// An error naming `name`, its file and the element when a value of `name` is NaN or ±∞.
    pub fn ensure_finite(&self, name: &str) -> Result<()> {
        let (dtype, _, bytes, path) = self.raw(name)?;
        check_finite(name, dtype, bytes, path)
    }

    /// Load `name` in its stored dtype and shape (for file-level work such as merging).
    pub fn tensor_raw(&self, name: &str) -> Result<Tensor> {
        let (st_dtype, shape, bytes, path) = self.raw(name)?;
        bytes_to_tensor(st_dtype, &shape, bytes, path, name)
    }
}

/// [`Error::NonFiniteWeight`] for the first NaN or ±∞ in the stored bytes of `name`.
fn check_finite(name: &str, dtype: Dtype, bytes: &[u8], path: &Path) -> Result<()> {
    match first_non_finite(dtype, bytes) {
        Some(index) => Err(Error::NonFiniteWeight {
            name: name.to_string(),
            path: path.to_path_buf(),
            index,
        }),
        None => Ok(()),
    }
}

/// The index of the first NaN or ±∞ element of little-endian float bytes (every exponent bit
/// set), `None` when all are finite or the dtype is not a float. Scanned in blocks whose test
/// the compiler vectorizes (a pass over an 8B checkpoint's 16 GB must not cost more than its
/// decoding), then the one flagged block element by element.
pub fn first_non_finite(dtype: Dtype, bytes: &[u8]) -> Option<usize> {
    fn scan<const N: usize>(bytes: &[u8], bad: impl Fn(&[u8]) -> bool) -> Option<usize> {
        const BLOCK: usize = 4096;
        bytes
            .chunks(BLOCK * N)
            .enumerate()
            .find(|(_, block)| block.chunks_exact(N).fold(false, |any, c| any | bad(c)))
            .and_then(|(i, block)| {
                let at = block.chunks_exact(N).position(&bad)?;
                Some(i * BLOCK + at)
            })
    }
    match dtype {
        Dtype::F32 => scan::<4>(bytes, |c| {
            u32::from_le_bytes([c[0], c[1], c[2], c[3]]) & 0x7f80_0000 == 0x7f80_0000
        }),
        Dtype::F64 => scan::<8>(bytes, |c| {
            (u32::from_le_bytes([c[4], c[5], c[6], c[7]]) & 0x7ff0_0000) == 0x7ff0_0000
        }),
        Dtype::BF16 => scan::<2>(bytes, |c| {
            u16::from_le_bytes([c[0], c[1]]) & 0x7f80 == 0x7f80
        }),
        Dtype::F16 => scan::<2>(bytes, |c| {
            u16::from_le_bytes([c[0], c[1]]) & 0x7c00 == 0x7c00
        }),
        _ => None,
    }
}

/// Decode little-endian safetensors bytes into a CPU tensor (copying: mmap data need not be
/// aligned for the element type).
pub fn bytes_to_tensor(
    dtype: Dtype,
    shape: &[usize],
    bytes: &[u8],
    path: &Path,
    name: &str,
) -> Result<Tensor> {
    let dev = &Device::Cpu;
    let t = match dtype {
        Dtype::F32 => Tensor::from_vec(
            bytes
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect::<Vec<_>>(),
            shape,
            dev,
        )?,
        Dtype::F64 => Tensor::from_vec(
            bytes
                .chunks_exact(8)
                .map(|c| f64::from_le_bytes(c.try_into().unwrap_or([0; 8])))
                .collect::<Vec<_>>(),
            shape,
            dev,
        )?,
        Dtype::BF16 => Tensor::from_vec(
            bytes
                .chunks_exact(2)
                .map(|c| half::bf16::from_le_bytes([c[0], c[1]]))
                .collect::<Vec<_>>(),
            shape,
            dev,
        )?,
        Dtype::F16 => Tensor::from_vec(
            bytes
                .chunks_exact(2)
                .map(|c| half::f16::from_le_bytes([c[0], c[1]]))
                .collect::<Vec<_>>(),
            shape,
            dev,
        )?,
        Dtype::I64 => Tensor::from_vec(
            bytes
                .chunks_exact(8)
                .map(|c| i64::from_le_bytes(c.try_into().unwrap_or([0; 8])))
                .collect::<Vec<_>>(),
            shape,
            dev,
        )?,
        Dtype::U8 | Dtype::BOOL => Tensor::from_vec(bytes.to_vec(), shape, dev)?,
        other => {
            return Err(Error::Safetensors {
                path: path.to_path_buf(),
                msg: format!("tensor '{name}' has unsupported dtype {other:?}"),
            })
        }
    };
    Ok(t)
}

/// candle dtype → safetensors dtype
pub fn to_st_dtype(d: DType) -> Dtype {
    match d {
        DType::F32 => Dtype::F32,
        DType::F16 => Dtype::F16,
        DType::BF16 => Dtype::BF16,
        DType::F64 => Dtype::F64,
        DType::I64 => Dtype::I64,
        DType::U32 => Dtype::U32,
        DType::U8 => Dtype::U8,
        _ => Dtype::F32,
    }
}

/// A tensor ready for `safetensors::serialize_to_file` (little-endian bytes).
pub struct OwnedView {
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    pub data: Vec<u8>,
}

impl OwnedView {
    pub fn from_tensor(t: &Tensor) -> Result<Self> {
        let t = t.to_device(&Device::Cpu)?.contiguous()?;
        let shape = t.dims().to_vec();
        let flat = t.flatten_all()?;
        let data: Vec<u8> = match t.dtype() {
            DType::F32 => flat
                .to_vec1::<f32>()?
                .iter()
                .flat_map(|x| x.to_le_bytes())
                .collect(),
            DType::F16 => flat
                .to_vec1::<half::f16>()?
                .iter()
                .flat_map(|x| x.to_le_bytes())
                .collect(),
            DType::BF16 => flat
                .to_vec1::<half::bf16>()?
                .iter()
                .flat_map(|x| x.to_le_bytes())
                .collect(),
            DType::F64 => flat
                .to_vec1::<f64>()?
                .iter()
                .flat_map(|x| x.to_le_bytes())
                .collect(),
            DType::I64 => flat
                .to_vec1::<i64>()?
                .iter()
                .flat_map(|x| x.to_le_bytes())
                .collect(),
            DType::U32 => flat
                .to_vec1::<u32>()?
                .iter()
                .flat_map(|x| x.to_le_bytes())
                .collect(),
            DType::U8 => flat.to_vec1::<u8>()?,
            other => {
                return Err(Error::InvalidArgument(format!(
                    "cannot serialise dtype {other:?}"
                )));
            }
        };
        Ok(OwnedView {
            dtype: to_st_dtype(t.dtype()),
            shape,
            data,
        })
    }
}

impl safetensors::View for &OwnedView {
    fn dtype(&self) -> Dtype {
        self.dtype
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> std::borrow::Cow<'_, [u8]> {
        std::borrow::Cow::Borrowed(&self.data)
    }
    fn data_len(&self) -> usize {
        self.data.len()
    }
}

/// Write tensors as a safetensors file with `{"format":"pt"}` metadata (some transformers
/// versions reject files without it), atomically: a temporary name, then rename.
pub fn write_safetensors(path: &Path, tensors: &[(String, OwnedView)]) -> Result<()> {
    let tmp = tmp_path(path);
    let meta: HashMap<String, String> = [("format".to_string(), "pt".to_string())].into();
    safetensors::serialize_to_file(
        tensors.iter().map(|(n, v)| (n.as_str(), v)),
        Some(meta),
        &tmp,
    )
    .map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        Error::Safetensors {
            path: path.to_path_buf(),
            msg: format!("cannot write it: {e}"),
        }
    })?;
    // safetensors creates the file owner-only (0600); a checkpoint is meant to be shared like
    // the config and tokenizer files next to it
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o644))
            .map_err(|e| Error::io(&tmp, e))?;
    }
    std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e))
}

/// Write bytes to `path` through a temporary file in the same directory.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = tmp_path(path);
    // the error names the file asked for (its directory missing, say), not our temporary name
    std::fs::write(&tmp, bytes).map_err(|e| Error::io(path, e))?;
    std::fs::rename(&tmp, path).map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        Error::io(path, e)
    })
}

/// Remove a directory (and everything in it) if it exists, e.g. a stale staging directory.
pub fn remove_dir_if_exists(dir: &Path) -> Result<()> {
    if dir.exists() {
        std::fs::remove_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    }
    Ok(())
}

/// Move a fully written staging directory to `dest`, replacing an older `dest`: readers see
/// the old or the new directory, never a half-written one.
pub fn replace_dir(staging: &Path, dest: &Path) -> Result<()> {
    remove_dir_if_exists(dest)?;
    if let Some(parent) = dest.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).map_err(|e| Error::io(parent, e))?;
    }
    std::fs::rename(staging, dest).map_err(|e| Error::io(dest, e))
}

pub fn tmp_path(path: &Path) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().to_string())
        .unwrap_or_default();
    path.with_file_name(format!(".{name}.tmp-{}", std::process::id()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn le_bytes<T: Copy, const N: usize>(values: &[T], to: fn(T) -> [u8; N]) -> Vec<u8> {
        values.iter().flat_map(|&v| to(v)).collect()
    }

    /// NaN, +∞ and −∞ are found at their index in every float dtype, in the first block and
    /// past it; the largest finite values and subnormals are not flagged, nor integer data.
    #[test]
    fn first_non_finite_finds_nan_and_infinity_at_their_index() {
        let n = 10_000;
        for bad_at in [0, 1, 4095, 4096, 9_999] {
            for bad in [f64::NAN, f64::INFINITY, f64::NEG_INFINITY] {
                let values = |bad: f64| -> Vec<f64> {
                    (0..n)
                        .map(|i| match i {
                            i if i == bad_at => bad,
                            i if i % 3 == 0 => -1e-40 * i as f64,
                            _ => 1e30 * i as f64,
                        })
                        .collect()
                };
                let finite: Vec<f64> = values(1.0);
                let poisoned: Vec<f64> = values(bad);
                let f32s = |v: &[f64]| v.iter().map(|&x| x as f32).collect::<Vec<_>>();
                let bf16s = |v: &[f64]| {
                    v.iter()
                        .map(|&x| half::bf16::from_f64(x))
                        .collect::<Vec<_>>()
                };
                // f16 tops out at 65504: the large finite values are clamped there
                let f16s = |v: &[f64]| {
                    v.iter()
                        .map(|&x| {
                            half::f16::from_f64(if x.is_finite() {
                                x.clamp(-65504.0, 65504.0)
                            } else {
                                x
                            })
                        })
                        .collect::<Vec<_>>()
                };
                let cases = [
                    (
                        Dtype::F64,
                        le_bytes(&finite, f64::to_le_bytes),
                        le_bytes(&poisoned, f64::to_le_bytes),
                    ),
                    (
                        Dtype::F32,
                        le_bytes(&f32s(&finite), f32::to_le_bytes),
                        le_bytes(&f32s(&poisoned), f32::to_le_bytes),
                    ),
                    (
                        Dtype::BF16,
                        le_bytes(&bf16s(&finite), half::bf16::to_le_bytes),
                        le_bytes(&bf16s(&poisoned), half::bf16::to_le_bytes),
                    ),
                    (
                        Dtype::F16,
                        le_bytes(&f16s(&finite), half::f16::to_le_bytes),
                        le_bytes(&f16s(&poisoned), half::f16::to_le_bytes),
                    ),
                ];
                for (dtype, ok, poisoned) in cases {
                    assert_eq!(first_non_finite(dtype, &ok), None, "{dtype:?}");
                    assert_eq!(
                        first_non_finite(dtype, &poisoned),
                        Some(bad_at),
                        "{dtype:?}, {bad} at {bad_at}"
                    );
                }
            }
        }
        // the largest finite values are finite
        assert_eq!(first_non_finite(Dtype::F32, &f32::MAX.to_le_bytes()), None);
        assert_eq!(
            first_non_finite(Dtype::BF16, &half::bf16::MAX.to_le_bytes()),
            None
        );
        assert_eq!(
            first_non_finite(Dtype::F16, &half::f16::MIN.to_le_bytes()),
            None
        );
        assert_eq!(first_non_finite(Dtype::F64, &f64::MAX.to_le_bytes()), None);
        // integer data with every bit set is not a float
        assert_eq!(first_non_finite(Dtype::I64, &[0xff; 16]), None);
        assert_eq!(first_non_finite(Dtype::U8, &[0xff; 16]), None);
    }
}
