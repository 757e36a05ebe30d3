//! A PyTorch state dict as safetensors: named tensors of any float dtype, read into f32.
use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use anyhow::{anyhow, bail, Context, Result};
use safetensors::tensor::{Dtype, TensorView};
use safetensors::SafeTensors;

use crate::checkpoint::{write_atomic, Tensor};

/// Named tensors (sorted by name; the map's key is the name written) and the file's string
/// metadata.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct StateDict {
    pub tensors: BTreeMap<String, Tensor>,
    pub metadata: HashMap<String, String>,
}

impl StateDict {
    pub fn insert(&mut self, name: &str, shape: &[usize], data: Vec<f32>) {
        self.tensors.insert(
            name.to_string(),
            Tensor {
                name: name.to_string(),
                shape: shape.to_vec(),
                data,
            },
        );
    }
}

fn decode(name: &str, view: &TensorView<'_>) -> Result<Vec<f32>> {
    let b = view.data();
    Ok(match view.dtype() {
        Dtype::F32 => b
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
        Dtype::F64 => b
            .chunks_exact(8)
            .map(|c| f64::from_le_bytes(c.try_into().unwrap_or([0; 8])) as f32)
            .collect(),
        Dtype::F16 => b
            .chunks_exact(2)
            .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        Dtype::BF16 => b
            .chunks_exact(2)
            .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        other => bail!("tensor '{name}' is {other:?}; weights must be F32, F16, BF16 or F64"),
    })
}

/// Reads every tensor of a safetensors file (F32 / F16 / BF16 / F64, converted to f32).
pub fn read_state_dict(path: &Path) -> Result<StateDict> {
    let buf = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let (_, header) = SafeTensors::read_metadata(&buf).map_err(|e| {
        anyhow!(
            "{} is truncated or not a safetensors file ({} bytes): {e:?} (convert a .pth first, see \
             README: Start from published DINO weights)",
            path.display(),
            buf.len()
        )
    })?;
    let st = SafeTensors::deserialize(&buf)
        .map_err(|e| anyhow!("{} is truncated or corrupt: {e:?}", path.display()))?;
    let mut out = StateDict {
        metadata: header.metadata().clone().unwrap_or_default(),
        ..Default::default()
    };
    for (name, view) in st.tensors() {
        let data = decode(&name, &view).with_context(|| path.display().to_string())?;
        out.insert(&name, view.shape(), data);
    }
    Ok(out)
}

/// Writes `sd` as an F32 safetensors file, atomically (temp file + rename).
pub fn write_state_dict(path: &Path, sd: &StateDict) -> Result<()> {
    let bytes: Vec<(String, Vec<usize>, Vec<u8>)> = sd
        .tensors
        .iter()
        .map(|(name, t)| {
            let mut b = Vec::with_capacity(4 * t.data.len());
            for x in &t.data {
                b.extend_from_slice(&x.to_le_bytes());
            }
            (name.clone(), t.shape.clone(), b)
        })
        .collect();
    let views: Vec<(String, TensorView<'_>)> = bytes
        .iter()
        .map(|(n, s, b)| {
            TensorView::new(Dtype::F32, s.clone(), b)
                .map(|v| (n.clone(), v))
                .map_err(|e| anyhow!("tensor '{n}': {e:?}"))
        })
        .collect::<Result<_>>()?;
    let meta = if sd.metadata.is_empty() {
        None
    } else {
        Some(sd.metadata.clone())
    };
    let buf = safetensors::tensor::serialize(views, &meta)
        .map_err(|e| anyhow!("serialising {}: {e:?}", path.display()))?;
    write_atomic(path, &buf)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn f16_bf16_f64_tensors_read_as_f32() {
        let dir = std::env::temp_dir().join(format!("dinovmf-sd-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("mixed.safetensors");
        let xs = [0.5f32, -1.25, 3.0];
        let f16: Vec<u8> = xs
            .iter()
            .flat_map(|x| half::f16::from_f32(*x).to_le_bytes())
            .collect();
        let bf16: Vec<u8> = xs
            .iter()
            .flat_map(|x| half::bf16::from_f32(*x).to_le_bytes())
            .collect();
        let f64b: Vec<u8> = xs.iter().flat_map(|x| (*x as f64).to_le_bytes()).collect();
        let i32b: Vec<u8> = [1i32, 2, 3].iter().flat_map(|x| x.to_le_bytes()).collect();
        let views = vec![
            ("a", TensorView::new(Dtype::F16, vec![3], &f16).unwrap()),
            ("b", TensorView::new(Dtype::BF16, vec![3], &bf16).unwrap()),
            ("c", TensorView::new(Dtype::F64, vec![1, 3], &f64b).unwrap()),
        ];
        std::fs::write(&path, safetensors::tensor::serialize(views, &None).unwrap()).unwrap();
        let sd = read_state_dict(&path).unwrap();
        for n in ["a", "b", "c"] {
            assert_eq!(sd.tensors[n].data, xs, "{n}");
        }
        assert_eq!(sd.tensors["c"].shape, [1, 3]);
        let bad = dir.join("int.safetensors");
        let views = vec![(
            "steps",
            TensorView::new(Dtype::I32, vec![3], &i32b).unwrap(),
        )];
        std::fs::write(&bad, safetensors::tensor::serialize(views, &None).unwrap()).unwrap();
        let e = format!("{:#}", read_state_dict(&bad).unwrap_err());
        assert!(e.contains("'steps'") && e.contains("I32"), "{e}");
        std::fs::write(&bad, b"not a safetensors file").unwrap();
        let e = format!("{:#}", read_state_dict(&bad).unwrap_err());
        assert!(e.contains("not a safetensors file"), "{e}");
        std::fs::remove_dir_all(&dir).ok();
    }
}
