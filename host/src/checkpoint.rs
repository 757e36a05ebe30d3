//! Checkpoints: safetensors files holding every named tensor of the run plus JSON metadata,
//! written atomically (temp file + fsync + rename) so a crash never leaves a half-written file
//! where the last good one was.
use std::collections::HashMap;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use safetensors::tensor::{Dtype, TensorView};
use safetensors::SafeTensors;

/// Tag written into every checkpoint; bump when the layout of the file changes.
pub const FORMAT: &str = "dinovmf-checkpoint-v1";

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
    let buf = safetensors::tensor::serialize(views, &Some(meta))
        .map_err(|e| anyhow!("serialising checkpoint: {e:?}"))?;
    write_atomic(path, &buf)
}

/// Writes `bytes` to `path` through a temporary file and a rename.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
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

/// Reads a checkpoint, with errors that say what is wrong with the file.
pub fn load(path: &Path) -> Result<CheckpointData> {
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
    match metadata.get("format") {
        Some(f) if f == FORMAT => {}
        Some(f) => bail!(
            "checkpoint {} has format '{f}', this build reads '{FORMAT}'",
            path.display()
        ),
        None => bail!(
            "{} is a safetensors file but not a dinovmf checkpoint (no 'format' tag)",
            path.display()
        ),
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
