//! The default run length: when `--epochs` is not given, the small32 preset trains for as many
//! epochs as fit a budget of about [`BUDGET_SECONDS`] on a quiet 2-core machine, from the
//! number of training images and a cost model of the network. It is a pure function of the
//! options and the data (never a wall-clock stop), so a run and its resume agree.
//!
//! The cost model. One step of batch B costs
//!   `B * (3 F_student + F_teacher) / R`
//! where `F_student` is the forward FLOPs of the student on every crop of one image (2 global +
//! N local), the backward pass counted as twice the forward (hence 3), `F_teacher` the teacher's
//! forward on the 2 global crops, and `R` the machine's throughput. Per crop of T tokens (class
//! token included) a ViT of width D, depth L and MLP ratio r does, per block,
//! `2 T (4 + 2 r) D^2` FLOPs for the projections and the MLP and `4 T^2 D` for the attention, plus the patch embedding `2 T_p (3 P^2) D` and the head MLP and prototype layer
//! `2 (D H + H H + H p + p K)` on the [CLS] token.
//!
//! `R` is calibrated on one measurement: small32 with patch 4 (D 96, depth 4, 2 x 32 px + 4 x
//! 16 px crops, K 1024, batch 64) trained at [`REFERENCE_IMAGES_PER_SEC`] images/s on the 2-core development
//! machine with the default per-epoch k-NN and diagnostics (README.md, "What the main command
//! gives"). The evaluations scale with the data rather than with the steps; the calibration
//! folds in their share at the built-in set's size, so other sizes are estimates.
use anyhow::Result;

use crate::config::crop_config;

use super::TrainConfig;

/// The wall-clock budget the default length aims at, seconds.
pub const BUDGET_SECONDS: f64 = 600.0;
/// small32's measured throughput on the quiet 2-core machine (per-epoch evaluations on).
pub const REFERENCE_IMAGES_PER_SEC: f64 = 118.0;
/// Bounds of the chosen number of epochs.
pub const MIN_EPOCHS: u64 = 1;
pub const MAX_EPOCHS: u64 = 400;

/// Presets whose default length follows the data (the others keep their fixed epochs: the
/// 224 px backbones follow the paper's schedule; `tiny` is for smoke tests).
pub fn sized_by_data(preset: &str) -> bool {
    preset == "small32"
}

/// What the default length picked, and why (for the banner).
#[derive(Clone, Debug, PartialEq)]
pub struct RunLength {
    pub epochs: u64,
    pub warmup_epochs: u64,
    pub steps_per_epoch: u64,
    pub seconds_per_step: f64,
    pub train_images: usize,
}

impl RunLength {
    pub fn steps(&self) -> u64 {
        self.epochs * self.steps_per_epoch
    }

    /// One line for the banner.
    pub fn describe(&self) -> String {
        format!(
            "run length: {} epochs x {} steps = {} steps, chosen for about {:.0} minutes on a \
             quiet 2-core CPU ({} training images, an estimated {:.2} s per step; LR warm-up {} \
             epoch(s)). --epochs N or --max-steps N override.",
            self.epochs,
            self.steps_per_epoch,
            self.steps(),
            BUDGET_SECONDS / 60.0,
            self.train_images,
            self.seconds_per_step,
            self.warmup_epochs
        )
    }
}

/// Forward FLOPs of the backbone on one crop of `size` px, plus the head on its [CLS] token.
fn crop_flops(cfg: &TrainConfig, size: usize) -> f64 {
    let m = &cfg.model;
    let patches = (size / m.patch.max(1)).pow(2) as f64;
    let t = patches + 1.0;
    let d = m.dim as f64;
    let r = m.mlp_ratio as f64;
    let block = 2.0 * t * (4.0 + 2.0 * r) * d * d + 4.0 * t * t * d;
    let embed = crate::flops::embed_flops(cfg, size);
    let (h, p, k) = (
        m.head_hidden as f64,
        m.bottleneck as f64,
        m.prototypes as f64,
    );
    let head = 2.0 * (d * h + h * h + h * p + p * k);
    m.depth as f64 * block + embed + head
}

/// FLOPs of one training step per image: the student forward and backward on every crop, the
/// teacher forward on the global crops.
pub fn step_flops_per_image(cfg: &TrainConfig) -> f64 {
    let c = crop_config(cfg);
    let g = crop_flops(cfg, c.global_size);
    let l = crop_flops(cfg, c.local_size);
    let student = c.n_global as f64 * g + c.n_local as f64 * l;
    let teacher = c.n_global as f64 * g;
    3.0 * student + teacher
}

/// The reference configuration the throughput was measured on: small32 as it was then, with
/// patch 4 (64 tokens). The preset now uses patch 8; the FLOP model carries the rate over
/// (it predicts 0.15 s per step for patch 8; measured on the same machine: 0.16 s).
fn reference() -> Result<TrainConfig> {
    let mut r = TrainConfig::preset("small32", super::LossKind::Vmf)?;
    r.model.patch = 4;
    // Measured before the preset had its convolutional stem (the FLOP model counts the stem).
    r.model.stem_convs = 0;
    Ok(r)
}

/// Estimated seconds per step of `cfg` on the quiet 2-core machine.
pub fn seconds_per_step(cfg: &TrainConfig) -> Result<f64> {
    let r = reference()?;
    let flops_per_sec = step_flops_per_image(&r) * REFERENCE_IMAGES_PER_SEC;
    Ok(cfg.batch_size as f64 * step_flops_per_image(cfg) / flops_per_sec)
}

/// The default length of `cfg` on `train_images` training images: the epochs whose steps fit
/// [`BUDGET_SECONDS`] (at least [`MIN_EPOCHS`], at most [`MAX_EPOCHS`]), and an LR warm-up that
/// keeps the preset's fraction of the run (small32: 1 of 6 epochs).
pub fn data_sized(cfg: &TrainConfig, train_images: usize) -> Result<RunLength> {
    let spe = (train_images / cfg.batch_size.max(1)) as u64;
    anyhow::ensure!(
        spe > 0,
        "the training set has {train_images} images, fewer than one batch of {}: lower \
         --batch-size",
        cfg.batch_size
    );
    let sps = seconds_per_step(cfg)?;
    let steps = BUDGET_SECONDS / sps;
    let epochs = ((steps / spe as f64).round() as u64).clamp(MIN_EPOCHS, MAX_EPOCHS);
    let preset = TrainConfig::preset(&cfg.preset, cfg.loss)?;
    let fraction = preset.warmup_epochs as f64 / preset.epochs.max(1) as f64;
    let warmup_epochs = ((epochs as f64 * fraction).round() as u64).clamp(1, epochs);
    Ok(RunLength {
        epochs,
        warmup_epochs,
        steps_per_epoch: spe,
        seconds_per_step: sps,
        train_images,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_reference_fits_the_budget_and_sizes_follow_the_data() {
        let cfg = reference().unwrap();
        // The reference step: 64 images at the measured rate.
        let sps = seconds_per_step(&cfg).unwrap();
        assert!(
            (sps - 64.0 / REFERENCE_IMAGES_PER_SEC).abs() < 1e-12,
            "{sps}"
        );
        let small = data_sized(&cfg, 1400).unwrap();
        let big = data_sized(&cfg, 5000).unwrap();
        for r in [&small, &big] {
            let secs = r.steps() as f64 * r.seconds_per_step;
            // Whole epochs: within half an epoch of the budget.
            let half_epoch = 0.5 * r.steps_per_epoch as f64 * r.seconds_per_step;
            assert!((secs - BUDGET_SECONDS).abs() <= half_epoch + 1e-9, "{r:?}");
        }
        // Fewer images: more epochs of fewer steps, about the same number of steps.
        assert!(small.epochs > big.epochs);
        assert_eq!(big.steps_per_epoch, 78);
        assert!((small.steps() as f64 / big.steps() as f64 - 1.0).abs() < 0.1);
        // The warm-up keeps small32's 1 of 6 epochs.
        assert_eq!(big.warmup_epochs, (big.epochs as f64 / 6.0).round() as u64);
    }

    #[test]
    fn bigger_models_get_fewer_steps_and_bounds_hold() {
        let cfg = reference().unwrap();
        let mut wide = cfg.clone();
        wide.model.dim = 192;
        wide.model.heads = 6;
        assert!(seconds_per_step(&wide).unwrap() > 2.0 * seconds_per_step(&cfg).unwrap());
        assert!(data_sized(&wide, 5000).unwrap().epochs < data_sized(&cfg, 5000).unwrap().epochs);
        // A handful of images: capped; far too many: at least one epoch.
        assert_eq!(data_sized(&cfg, 64).unwrap().epochs, MAX_EPOCHS);
        assert_eq!(data_sized(&cfg, 10_000_000).unwrap().epochs, MIN_EPOCHS);
        let e = data_sized(&cfg, 10).unwrap_err().to_string();
        assert!(e.contains("fewer than one batch"), "{e}");
    }
}
