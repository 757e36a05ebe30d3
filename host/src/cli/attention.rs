//! `dinovmf attention CHECKPOINT IMAGE`: the last block's [CLS] self-attention per head,
//! overlaid on the image (the maps DINO users look at).
use std::path::PathBuf;

use anyhow::{bail, ensure, Context, Result};
use clap::Args;

use crate::backend::Net;
use crate::data::{eval_transform, folder::decode_file, Image, IMAGENET_MEAN, IMAGENET_STD};
use crate::plot::{attention_figure, Rgb};

#[derive(Args, Debug, Clone)]
pub struct AttentionArgs {
    /// A checkpoint written by `dinovmf train`.
    pub checkpoint: PathBuf,
    /// An image file (PNG or JPEG), or `heldout:N` for the N-th image of the checkpoint's
    /// held-out split (the built-in dataset needs no file).
    pub image: String,
    /// Where the PNG goes (default: `attention.png` next to the checkpoint).
    #[arg(long, short = 'o')]
    pub out: Option<PathBuf>,
    /// Side the image is resized to before the forward (a multiple of the patch size; the
    /// position embedding is interpolated). Default: the model's training size.
    #[arg(long)]
    pub size: Option<usize>,
    /// Side of each panel in the figure, pixels.
    #[arg(long, default_value_t = 192)]
    pub panel: u32,
    /// Read the student instead of the teacher.
    #[arg(long)]
    pub student: bool,
}

/// Attention maps `[heads][grid * grid]` (the [CLS] query's probabilities over the patches) of
/// one eval-transformed image `[3, size, size]`, and the probability the [CLS] query puts on
/// itself per head.
pub fn attention_maps(
    backend: &mut dyn crate::backend::Backend,
    net: Net,
    img: &[f32],
    size: usize,
    heads: usize,
) -> Result<(Vec<Vec<f32>>, Vec<f32>)> {
    let att = backend.cls_attention(net, img, 1, size)?;
    let t = att.len() / heads.max(1);
    ensure!(t >= 2 && att.len() == heads * t, "attention shape");
    Ok((
        (0..heads)
            .map(|h| att[h * t + 1..(h + 1) * t].to_vec())
            .collect(),
        (0..heads).map(|h| att[h * t]).collect(),
    ))
}

/// Largest panel side of the figure, pixels.
pub const MAX_PANEL: u32 = 4096;

/// Checks `--size` and `--panel` against the model before anything is allocated: the forward
/// keeps one block's attention scores `[heads, T, T]` and token activations, the figure is
/// `heads + 1` panels of `panel x panel` RGB pixels.
pub fn check_sizes(size: usize, panel: u32, m: &crate::train::ModelSpec) -> Result<()> {
    ensure!(
        size > 0 && size.is_multiple_of(m.patch),
        "--size {size} is not a positive multiple of the patch size {}",
        m.patch
    );
    let grid = (size / m.patch) as u64;
    let t = grid * grid + 1;
    let scores = (m.heads as u64)
        .saturating_mul(t)
        .saturating_mul(t)
        .saturating_add(t.saturating_mul(m.dim as u64 * (4 + m.mlp_ratio as u64)))
        .saturating_mul(4);
    crate::train::validate::check_alloc(
        &format!("--size {size} ({t} tokens): the attention forward"),
        scores,
    )?;
    ensure!(
        (16..=MAX_PANEL).contains(&panel),
        "--panel must be in 16..={MAX_PANEL} pixels, got {panel}"
    );
    Ok(())
}

pub fn run(a: &AttentionArgs) -> Result<()> {
    let need_test = a.image.starts_with("heldout:");
    let mut l = super::eval::load(&a.checkpoint, "run", need_test)?;
    let m = &l.cfg.model;
    let size = a.size.unwrap_or(m.img_size);
    check_sizes(size, a.panel, m)?;
    let image: Image = if let Some(i) = a.image.strip_prefix("heldout:") {
        let i: usize = i
            .parse()
            .with_context(|| format!("`{}`: expected heldout:N with N a number", a.image))?;
        let test = l
            .data
            .test
            .clone()
            .context("the checkpoint's data has no held-out split")?;
        if i >= test.len() {
            bail!("heldout:{i}: the held-out split has {} images", test.len());
        }
        test.load(i)?
    } else {
        decode_file(std::path::Path::new(&a.image))
            .with_context(|| format!("reading the image {}", a.image))?
    };
    let x = eval_transform(&image, size);
    let heads = m.heads;
    let net = if a.student {
        Net::Student
    } else {
        Net::Teacher
    };
    let (maps, self_att) = attention_maps(l.backend.as_mut(), net, &x, size, heads)?;
    // The image as the network saw it, back in [0, 1].
    let data = (0..size * size)
        .map(|i| {
            let mut c = [0.0f64; 3];
            for (ch, v) in c.iter_mut().enumerate() {
                let z = x[ch * size * size + i] as f64;
                *v = (z * IMAGENET_STD[ch] as f64 + IMAGENET_MEAN[ch] as f64).clamp(0.0, 1.0);
            }
            c
        })
        .collect();
    let out = a.out.clone().unwrap_or_else(|| {
        a.checkpoint
            .parent()
            .unwrap_or(std::path::Path::new("."))
            .join("attention.png")
    });
    attention_figure(
        &out,
        &Rgb { side: size, data },
        &maps,
        size / m.patch,
        a.panel,
    )?;
    println!(
        "wrote {} ({} heads, {} x {} patches); [CLS] attention to itself per head: {}",
        out.display(),
        heads,
        size / m.patch,
        size / m.patch,
        self_att
            .iter()
            .map(|v| format!("{v:.3}"))
            .collect::<Vec<_>>()
            .join(" ")
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn model() -> crate::train::ModelSpec {
        crate::train::TrainConfig::preset("tiny", crate::train::LossKind::Vmf)
            .unwrap()
            .model
    }

    #[test]
    fn huge_size_and_panel_are_errors_before_allocating() {
        let m = model();
        check_sizes(16, 192, &m).unwrap();
        let e = format!("{:#}", check_sizes(5000, 192, &m).unwrap_err());
        assert!(e.contains("--size 5000") && e.contains("bytes"), "{e}");
        let e = format!("{:#}", check_sizes(16, 100_000, &m).unwrap_err());
        assert!(e.contains("--panel") && e.contains("4096"), "{e}");
        assert!(check_sizes(15, 192, &m).is_err());
    }
}
