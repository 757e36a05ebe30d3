//! Checkpoints: safetensors files holding every named tensor of the run plus JSON metadata,
//! written atomically (temp file + fsync + rename) so a crash never leaves a half-written file
//! where the last good one was. Since format v2 the metadata carries a CRC-32 of every tensor
//! (name, shape, data), verified on load: a flipped bit or a tensor written under another
//! shape is an error, not a silently different network.
use std::collections::HashMap;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use safetensors::tensor::{Dtype, TensorView};
use safetensors::SafeTensors;

/// Tag written into every checkpoint; bump when the layout of the file changes.
pub const FORMAT: &str = "dinovmf-checkpoint-v2";
/// The format before tensor checksums (still read, with a warning).
pub const FORMAT_V1: &str = "dinovmf-checkpoint-v1";
/// Metadata key of the tensor checksum.
pub const CHECKSUM_KEY: &str = "tensor_crc32";

/// How [`load_with`] reads a checkpoint.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LoadOptions {
    /// Verify the tensor checksum (a CRC-32 pass over the data, see `benches` / the docs for its
    /// cost).
    pub verify_checksum: bool,
}

impl LoadOptions {
    /// Verify the checksum (the default).
    pub const fn verified() -> Self {
        Self {
            verify_checksum: true,
        }
    }

    /// Skip the checksum (for huge files when the pass is too slow).
    pub const fn unverified() -> Self {
        Self {
            verify_checksum: false,
        }
    }
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self::verified()
    }
}

/// CRC-32 of tensors in name order: each contributes its name, a 0 byte, its rank and shape (u64
/// little-endian) and its data bytes.
fn tensor_checksum<'a>(mut items: Vec<(&'a str, &'a [usize], &'a [u8])>) -> u32 {
    items.sort_by(|a, b| a.0.cmp(b.0));
    let mut h = crc32fast::Hasher::new();
    for (name, shape, data) in items {
        h.update(name.as_bytes());
        h.update(&[0]);
        h.update(&(shape.len() as u64).to_le_bytes());
        for &d in shape {
            h.update(&(d as u64).to_le_bytes());
        }
        h.update(data);
    }
    h.finalize()
}

/// One named f32 tensor.
#[derive(Clone, Debug, PartialEq)]
pub struct Tensor {
    pub name: String,
    pub shape: Vec<usize>,
    pub data: Vec<f32>,
}

/// What a checkpoint file holds: tensors and string metadata.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct CheckpointData {
    pub tensors: Vec<Tensor>,
    pub metadata: HashMap<String, String>,
}

impl CheckpointData {
    pub fn get(&self, name: &str) -> Option<&Tensor> {
        self.tensors.iter().find(|t| t.name == name)
    }

    pub fn take(&mut self, name: &str) -> Result<Tensor> {
        let i = self
            .tensors
            .iter()
            .position(|t| t.name == name)
            .ok_or_else(|| anyhow!("checkpoint has no tensor named '{name}'"))?;
        Ok(self.tensors.swap_remove(i))
    }

    pub fn meta(&self, key: &str) -> Result<&str> {
        self.metadata
            .get(key)
            .map(|s| s.as_str())
            .ok_or_else(|| anyhow!("checkpoint metadata has no '{key}' entry"))
    }
}

fn to_le_bytes(data: &[f32]) -> Vec<u8> {
    let mut out = Vec::with_capacity(data.len() * 4);
    for x in data {
        out.extend_from_slice(&x.to_le_bytes());
    }
    out
}

/// Writes `ckpt` to `path` atomically: the data goes to a temporary file in the same folder,
/// is flushed to disk, then renamed over `path`.
pub fn save(path: &Path, ckpt: &CheckpointData) -> Result<()> {
    for t in &ckpt.tensors {
        let n: usize = t.shape.iter().product();
        if n != t.data.len() {
            bail!(
                "tensor '{}' has shape {:?} but {} values",
                t.name,
                t.shape,
                t.data.len()
            );
        }
    }
    let bytes: Vec<Vec<u8>> = ckpt.tensors.iter().map(|t| to_le_bytes(&t.data)).collect();
    let views: Vec<(String, TensorView<'_>)> = ckpt
        .tensors
        .iter()
        .zip(&bytes)
        .map(|(t, b)| {
            TensorView::new(Dtype::F32, t.shape.clone(), b)
                .map(|v| (t.name.clone(), v))
                .map_err(|e| anyhow!("tensor '{}': {e:?}", t.name))
        })
        .collect::<Result<_>>()?;
    let mut meta = ckpt.metadata.clone();
    meta.insert("format".into(), FORMAT.into());
    let sum = tensor_checksum(
        ckpt.tensors
            .iter()
            .zip(&bytes)
            .map(|(t, b)| (t.name.as_str(), t.shape.as_slice(), b.as_slice()))
            .collect(),
    );
    meta.insert(CHECKSUM_KEY.into(), format!("{sum:08x}"));
    let buf = safetensors::tensor::serialize(views, &Some(meta))
        .map_err(|e| anyhow!("serialising checkpoint: {e:?}"))?;
    write_atomic(path, &buf)
}

/// Writes `bytes` to `path` through a temporary file and a rename. A symlink is written through
/// (its target replaced); a path naming a device, FIFO or directory is refused
/// ([`crate::output::resolve_output`]).
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let path = &crate::output::resolve_output(path)?;
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    fs::create_dir_all(dir).with_context(|| format!("creating folder {}", dir.display()))?;
    let tmp: PathBuf = dir.join(format!(
        ".{}.tmp.{}",
        path.file_name()
            .and_then(|s| s.to_str())
            .unwrap_or("checkpoint"),
        std::process::id()
    ));
    debug_assert!(is_temp_name(&tmp));
    let res = (|| -> Result<()> {
        let mut f =
            fs::File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
        f.write_all(bytes)
            .with_context(|| format!("writing {}", tmp.display()))?;
        f.sync_all()
            .with_context(|| format!("flushing {}", tmp.display()))?;
        fs::rename(&tmp, path)
            .with_context(|| format!("renaming {} to {}", tmp.display(), path.display()))?;
        Ok(())
    })();
    if res.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    res
}

/// Whether `path` names a temporary file of [`write_atomic`] (`.NAME.tmp.PID`): one left behind
/// by a killed save is removed at the next start of a run in that folder.
pub fn is_temp_name(path: &Path) -> bool {
    let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
        return false;
    };
    let Some(rest) = name.strip_prefix('.') else {
        return false;
    };
    match rest.rsplit_once(".tmp.") {
        Some((stem, pid)) => {
            !stem.is_empty() && !pid.is_empty() && pid.bytes().all(|b| b.is_ascii_digit())
        }
        None => false,
    }
}

/// Most bytes of a safetensors header this reader accepts (the format's own limit).
const MAX_HEADER: u64 = 100_000_000;

/// The metadata of a checkpoint, reading only its header.
pub fn read_metadata(path: &Path) -> Result<HashMap<String, String>> {
    use std::io::Read;
    let mut f =
        fs::File::open(path).with_context(|| format!("reading checkpoint {}", path.display()))?;
    let mut n = [0u8; 8];
    f.read_exact(&mut n)
        .with_context(|| format!("checkpoint {} is truncated", path.display()))?;
    let n = u64::from_le_bytes(n);
    if n > MAX_HEADER {
        bail!(
            "checkpoint {}: header of {n} bytes is over the {MAX_HEADER}-byte limit (corrupt file)",
            path.display()
        );
    }
    let mut h = vec![0u8; n as usize];
    f.read_exact(&mut h)
        .with_context(|| format!("checkpoint {} is truncated", path.display()))?;
    let v: serde_json::Value = serde_json::from_slice(&h)
        .with_context(|| format!("checkpoint {}: unreadable header", path.display()))?;
    let mut out = HashMap::new();
    if let Some(m) = v.get("__metadata__").and_then(|m| m.as_object()) {
        for (k, x) in m {
            if let Some(s) = x.as_str() {
                out.insert(k.clone(), s.to_string());
            }
        }
    }
    Ok(out)
}

/// Reads a checkpoint and verifies its checksum, with errors that say what is wrong with the
/// file.
pub fn load(path: &Path) -> Result<CheckpointData> {
    load_with(path, LoadOptions::verified())
}

/// Reads a checkpoint as `opts` say.
pub fn load_with(path: &Path, opts: LoadOptions) -> Result<CheckpointData> {
    let buf = fs::read(path).with_context(|| format!("reading checkpoint {}", path.display()))?;
    let (_, header) = SafeTensors::read_metadata(&buf).map_err(|e| {
        anyhow!(
            "checkpoint {} is truncated or not a safetensors file ({} bytes): {e:?}",
            path.display(),
            buf.len()
        )
    })?;
    let st = SafeTensors::deserialize(&buf).map_err(|e| {
        anyhow!(
            "checkpoint {} is truncated or corrupt ({} bytes): {e:?}",
            path.display(),
            buf.len()
        )
    })?;
    let metadata = header.metadata().clone().unwrap_or_default();
    let stored_sum = match metadata.get("format") {
        Some(f) if f == FORMAT => match metadata.get(CHECKSUM_KEY) {
            Some(s) => Some(u32::from_str_radix(s, 16).map_err(|_| {
                anyhow!(
                    "checkpoint {}: its checksum entry '{s}' is not a hex number",
                    path.display()
                )
            })?),
            None => bail!(
                "checkpoint {} has no tensor checksum ('{CHECKSUM_KEY}'): the metadata is corrupt",
                path.display()
            ),
        },
        Some(f) if f == FORMAT_V1 => {
            eprintln!(
                "warning: checkpoint {} predates tensor checksums (format v1): not verified",
                path.display()
            );
            None
        }
        Some(f) => bail!(
            "checkpoint {} has format '{f}', this build reads '{FORMAT}'",
            path.display()
        ),
        None => bail!(
            "{} is a safetensors file but not a dinovmf checkpoint (no 'format' tag)",
            path.display()
        ),
    };
    if opts.verify_checksum {
        if let Some(stored) = stored_sum {
            let views = st.tensors();
            let computed = tensor_checksum(
                views
                    .iter()
                    .map(|(n, v)| (n.as_str(), v.shape(), v.data()))
                    .collect(),
            );
            if computed != stored {
                bail!(
                    "checkpoint {} is corrupt: its tensors' checksum is {computed:08x}, the file says \
                     {stored:08x} (a changed byte, or a tensor stored under another shape)",
                    path.display()
                );
            }
        }
    }
    let mut tensors = Vec::new();
    for (name, view) in st.tensors() {
        if view.dtype() != Dtype::F32 {
            bail!(
                "checkpoint {}: tensor '{name}' is {:?}, expected F32",
                path.display(),
                view.dtype()
            );
        }
        let data = view
            .data()
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        tensors.push(Tensor {
            name,
            shape: view.shape().to_vec(),
            data,
        });
    }
    tensors.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(CheckpointData { tensors, metadata })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> CheckpointData {
        let mut metadata = HashMap::new();
        metadata.insert("step".into(), "12".into());
        CheckpointData {
            tensors: vec![
                Tensor {
                    name: "a".into(),
                    shape: vec![2, 3],
                    data: vec![1.0, -2.0, 3.5, f32::MIN_POSITIVE, 0.0, 7.0],
                },
                Tensor {
                    name: "b".into(),
                    shape: vec![1],
                    data: vec![42.0],
                },
            ],
            metadata,
        }
    }

    #[test]
    fn round_trip_is_bit_exact() {
        let dir = std::env::temp_dir().join(format!("dinovmf-ckpt-{}", std::process::id()));
        let path = dir.join("c.safetensors");
        let c = sample();
        save(&path, &c).unwrap();
        let back = load(&path).unwrap();
        assert_eq!(back.tensors, c.tensors);
        assert_eq!(back.meta("step").unwrap(), "12");
        assert_eq!(back.meta("format").unwrap(), FORMAT);
        fs::remove_dir_all(&dir).ok();
    }

    /// Random bit flips in the tensor data and a tensor stored under another shape of the same
    /// size are errors; skipping the check loads them.
    #[test]
    fn checksum_catches_flipped_bits_and_reshaped_tensors() {
        use rand::{Rng, SeedableRng};
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.safetensors");
        save(&path, &sample()).unwrap();
        let full = fs::read(&path).unwrap();
        let header = 8 + u64::from_le_bytes(full[..8].try_into().unwrap()) as usize;
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
        let bad = dir.path().join("bad.safetensors");
        for _ in 0..50 {
            let mut b = full.clone();
            let i = rng.gen_range(header..b.len());
            b[i] ^= 1 << rng.gen_range(0..8);
            fs::write(&bad, &b).unwrap();
            let e = format!("{:#}", load(&bad).unwrap_err());
            assert!(e.contains("checksum"), "{e}");
            assert!(load_with(&bad, LoadOptions::unverified()).is_ok());
        }
        // The same values under the transposed shape: rewrite the header's [2,3] as [3,2].
        let text = String::from_utf8_lossy(&full[8..header]).into_owned();
        let swapped = text.replacen("[2,3]", "[3,2]", 1);
        assert_ne!(swapped, text);
        let mut b = full[..8].to_vec();
        b.extend_from_slice(swapped.as_bytes());
        b.extend_from_slice(&full[header..]);
        fs::write(&bad, &b).unwrap();
        let e = format!("{:#}", load(&bad).unwrap_err());
        assert!(e.contains("checksum"), "{e}");
    }

    #[test]
    fn temp_names_are_recognised() {
        assert!(is_temp_name(Path::new("d/.checkpoint.safetensors.tmp.123")));
        assert!(!is_temp_name(Path::new("d/checkpoint.safetensors")));
        assert!(!is_temp_name(Path::new("d/.checkpoint.tmp.x1")));
        assert!(!is_temp_name(Path::new("d/.lock")));
    }

    #[test]
    fn truncated_file_is_a_clear_error_and_rewrite_keeps_old_on_failure() {
        let dir = std::env::temp_dir().join(format!("dinovmf-ckpt-trunc-{}", std::process::id()));
        let path = dir.join("c.safetensors");
        save(&path, &sample()).unwrap();
        let full = fs::read(&path).unwrap();
        let cut = dir.join("cut.safetensors");
        fs::write(&cut, &full[..full.len() - 5]).unwrap();
        let e = format!("{:#}", load(&cut).unwrap_err());
        assert!(
            e.contains("truncated") && e.contains("cut.safetensors"),
            "{e}"
        );
        // A save that fails validation must not touch the existing file.
        let mut bad = sample();
        bad.tensors[0].data.pop();
        assert!(save(&path, &bad).is_err());
        assert_eq!(fs::read(&path).unwrap(), full);
        fs::remove_dir_all(&dir).ok();
    }
}
