//! FLOPs of a training step counted from the model's shapes, and the peak rates of the GPUs the
//! project runs on, for `dinovmf bench speed` (MFU) and `benches/scaling.rs`.
use crate::config::step_shapes;
use crate::train::{Method, TrainConfig};

/// Multiply-add FLOPs (2 per product term) of the step's matrix products: patch embedding,
/// every block's qkv / proj / fc1 / fc2 and the two attention products, the head's three
/// layers and its prototype layer; the student's forward + backward (3x its forward) on every
/// crop, the teacher's forward on the global crops. iBOT adds the head on patch rows: all of
/// the teacher's global-crop patches, and the student's expected masked ones (mask probability
/// x mean ratio, `ibot_masked`). Element-wise work (GELU, softmax, LayerNorm, the optimiser)
/// is not counted. `local` is the local crops' size in pixels.
pub fn step_flops(cfg: &TrainConfig, local: usize, ibot_masked: f64) -> f64 {
    let m = &cfg.model;
    let d = m.dim as f64;
    let head = m.head_hidden as f64;
    let head_row = 2.0
        * (d * head
            + head * head
            + head * m.bottleneck as f64
            + m.bottleneck as f64 * m.prototypes as f64);
    let crop = |size: usize| {
        let patches = ((size / m.patch) * (size / m.patch)) as f64;
        let t = patches + 1.0;
        let embed = embed_flops(cfg, size);
        let mlp = m.mlp_ratio as f64;
        let blocks =
            m.depth as f64 * (t * 2.0 * (4.0 * d * d + 2.0 * mlp * d * d) + 2.0 * 2.0 * t * t * d);
        (embed + blocks + head_row, patches)
    };
    let (g, g_patches) = crop(m.img_size);
    let (l, _) = crop(local);
    let b = cfg.batch_size as f64;
    let student = b * (2.0 * g + cfg.n_local as f64 * l);
    let teacher = b * 2.0 * g;
    let mut flops = 3.0 * student + teacher;
    if cfg.method == Method::Ibot {
        flops += b * 2.0 * g_patches * head_row * (1.0 + 3.0 * ibot_masked);
    }
    flops
}

/// Multiply-add FLOPs of turning one crop of `size` px into patch tokens: the patch
/// embedding, and the convolutional stem's 3 x 3 convolutions before it when the model has one.
pub fn embed_flops(cfg: &TrainConfig, size: usize) -> f64 {
    let m = &cfg.model;
    let v = crate::config::model_config(cfg).vit;
    let patches = ((size / m.patch.max(1)) * (size / m.patch.max(1))) as f64;
    let mut flops = 2.0 * patches * v.patch_len() as f64 * m.dim as f64;
    let mut side = size;
    for i in 0..v.stem_len() {
        let l = v.stem_layer(i);
        side = dinovmf_core::ops::conv3x3_out_side(side, l.stride);
        flops += 2.0 * (side * side) as f64 * (l.col_len() * l.c_out) as f64;
    }
    flops
}

/// The expected fraction of a global crop's patches that iBOT masks (mask probability x mean
/// ratio).
pub fn ibot_masked_fraction(cfg: &TrainConfig) -> f64 {
    cfg.ibot.mask_prob * 0.5 * (cfg.ibot.mask_ratio.0 + cfg.ibot.mask_ratio.1)
}

/// [`step_flops`] of a run's own crop shapes, per image of the batch.
pub fn flops_per_image(cfg: &TrainConfig) -> f64 {
    let local = step_shapes(cfg).local_size;
    step_flops(cfg, local, ibot_masked_fraction(cfg)) / cfg.batch_size.max(1) as f64
}

/// What the matrix products run on: f32 FMA units, or bf16 tensor cores.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PeakKind {
    F32,
    Bf16,
}

/// Dense peak rates (TFLOP/s, no sparsity) from NVIDIA's data sheets, matched on the device
/// name the driver reports: `(name part, f32, bf16 tensor cores)`, most specific first.
pub const PEAKS: &[(&str, f64, f64)] = &[
    ("H200", 67.0, 989.0),
    ("H100 PCIe", 51.0, 756.0),
    ("H100", 67.0, 989.0),
    ("A100", 19.5, 312.0),
];

/// The peak of the GPU named `device` (as the driver reports it) for `kind`, and the table
/// entry matched; `None` for a device the table does not know (the simulator, other GPUs).
pub fn peak_tflops(device: &str, kind: PeakKind) -> Option<(&'static str, f64)> {
    PEAKS.iter().find(|p| device.contains(p.0)).map(|p| {
        (
            p.0,
            match kind {
                PeakKind::F32 => p.1,
                PeakKind::Bf16 => p.2,
            },
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::train::LossKind;

    /// The ViT-S/16 DINO multi-crop estimate of issue 17: 2 x 224 + 8 x 96 crops, K = 65536,
    /// about 114 GFLOP per image.
    #[test]
    fn vit_s16_multicrop_is_about_114_gflop_per_image() {
        let mut cfg = TrainConfig::preset("vit-s16", LossKind::Dino).unwrap();
        cfg.model.prototypes = 65536;
        cfg.n_local = 8;
        let f = step_flops(&cfg, 96, 0.0) / cfg.batch_size as f64;
        assert!((f / 1e9 - 114.0).abs() < 3.0, "{} GFLOP/image", f / 1e9);
    }

    #[test]
    fn peaks_match_the_driver_names() {
        let h200 = "cuda: NVIDIA H200 (sm_90, 132 SMs, 139.8 GiB, driver API 13.0)";
        assert_eq!(peak_tflops(h200, PeakKind::Bf16), Some(("H200", 989.0)));
        assert_eq!(
            peak_tflops("NVIDIA H100 PCIe", PeakKind::F32),
            Some(("H100 PCIe", 51.0))
        );
        assert_eq!(
            peak_tflops("NVIDIA H100 80GB HBM3", PeakKind::Bf16),
            Some(("H100", 989.0))
        );
        assert_eq!(
            peak_tflops("NVIDIA A100-SXM4-80GB", PeakKind::F32),
            Some(("A100", 19.5))
        );
        assert_eq!(
            peak_tflops("host simulator of dinovmf.ptx", PeakKind::F32),
            None
        );
    }
}
