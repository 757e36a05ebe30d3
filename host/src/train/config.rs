//! The run's configuration: presets with small-data defaults, every field a CLI option, the
//! whole struct saved (JSON) in each checkpoint so a run can be resumed and audited.
use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};

/// DINO or DINO-vMF logits (`--loss`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LossKind {
    Dino,
    Vmf,
}

/// Teacher centering (`--centering`); the default follows the loss (DINO: logit, vMF: probability).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum CenteringKind {
    Logit,
    Probability,
}

/// The network's shape.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ModelSpec {
    pub img_size: usize,
    pub patch: usize,
    pub dim: usize,
    pub depth: usize,
    pub heads: usize,
    pub mlp_ratio: usize,
    pub head_hidden: usize,
    pub bottleneck: usize,
    pub prototypes: usize,
    pub drop_path: f32,
}

/// Where the images come from.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum DataSpec {
    /// The procedurally generated dataset that ships in the binary.
    Builtin {
        seed: u64,
        train_per_class: usize,
        test_per_class: usize,
    },
    /// `root/<class>/<image>`; held-out split from `test_root` when given.
    Folder {
        root: String,
        test_root: Option<String>,
    },
    /// CIFAR-10/100 binary files in a folder.
    Cifar { root: String },
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TrainConfig {
    pub preset: String,
    pub model: ModelSpec,
    pub loss: LossKind,
    pub centering: CenteringKind,
    pub norm_last_layer: bool,
    pub epochs: u64,
    pub batch_size: usize,
    /// Base learning rate for batch 256 (scaled linearly with the batch).
    pub lr: f64,
    pub min_lr: f64,
    pub warmup_epochs: u64,
    pub weight_decay: f64,
    pub weight_decay_end: f64,
    pub momentum_teacher: f64,
    pub teacher_temp: f64,
    pub warmup_teacher_temp: f64,
    pub warmup_teacher_temp_epochs: u64,
    pub student_temp: f64,
    pub center_momentum: f64,
    pub clip_grad: f64,
    pub freeze_last_layer_epochs: u64,
    pub n_local: usize,
    pub global_scale: (f32, f32),
    pub local_scale: (f32, f32),
    /// Scales the probabilities of colour jitter (DINO: 0.8) and grayscale (DINO: 0.2);
    /// 1 is DINO's recipe, 0 turns both off.
    #[serde(default = "one")]
    pub color_aug: f32,
    pub seed: u64,
    pub data: DataSpec,
    /// Weight of the KoLeo-proto regulariser on the student's prototypes (0 = off).
    #[serde(default)]
    pub koleo_proto: f64,
}

fn one() -> f32 {
    1.0
}

/// Names of the shipped presets, for help texts.
pub const PRESETS: &[&str] = &["small32", "tiny", "vit-s16", "vit-b16"];

impl TrainConfig {
    /// A preset with the loss's own defaults (centering, `norm_last_layer`).
    pub fn preset(name: &str, loss: LossKind) -> Result<Self> {
        let builtin = DataSpec::Builtin {
            seed: 0,
            train_per_class: 500,
            test_per_class: 100,
        };
        let (vmf_center, vmf_norm) = match loss {
            LossKind::Dino => (CenteringKind::Logit, true),
            LossKind::Vmf => (CenteringKind::Probability, false),
        };
        let small = |model: ModelSpec, epochs: u64| TrainConfig {
            preset: name.to_string(),
            model,
            loss,
            centering: vmf_center,
            norm_last_layer: vmf_norm,
            epochs,
            batch_size: 64,
            // A short run needs the network to move: at base 2e-3 (5e-4 at batch 64) the teacher
            // ended within 2% (L2) of its initialisation after 234 steps (measured), so its
            // features could not improve. 4e-3 * 64/256 = 1e-3 peak.
            lr: 4e-3,
            min_lr: 1e-5,
            warmup_epochs: 1,
            weight_decay: 0.04,
            weight_decay_end: 0.1,
            momentum_teacher: 0.99,
            // Sharper than DINO's 0.04 -> 0.07: with few steps the teacher's per-image
            // differences are small, and at 0.04 centering flattens them to ln K (measured:
            // k-NN +15 points over init at 0.02 vs +8 at 0.04, DINO, 3 epochs).
            teacher_temp: 0.02,
            warmup_teacher_temp: 0.02,
            warmup_teacher_temp_epochs: 0,
            student_temp: 0.1,
            center_momentum: 0.9,
            clip_grad: 3.0,
            freeze_last_layer_epochs: 1,
            n_local: 4,
            global_scale: (0.4, 1.0),
            local_scale: (0.05, 0.4),
            color_aug: 1.0,
            seed: 0,
            data: builtin.clone(),
            koleo_proto: 0.0,
        };
        // The paper's ImageNet recipe, for the 224 px backbones.
        let big = |model: ModelSpec| TrainConfig {
            lr: 5e-4,
            min_lr: 1e-6,
            warmup_epochs: 10,
            weight_decay_end: 0.4,
            momentum_teacher: 0.996,
            teacher_temp: 0.07,
            warmup_teacher_temp: 0.04,
            warmup_teacher_temp_epochs: 30,
            n_local: 8,
            ..small(model, 100)
        };
        Ok(match name {
            "small32" => small(
                ModelSpec {
                    img_size: 32,
                    patch: 4,
                    dim: 96,
                    depth: 4,
                    heads: 3,
                    mlp_ratio: 4,
                    head_hidden: 512,
                    bottleneck: 128,
                    prototypes: 1024,
                    drop_path: 0.1,
                },
                6,
            ),
            // For tests and smoke runs: seconds, not minutes.
            "tiny" => {
                let mut c = small(
                    ModelSpec {
                        img_size: 16,
                        patch: 4,
                        dim: 16,
                        depth: 2,
                        heads: 2,
                        mlp_ratio: 2,
                        head_hidden: 32,
                        bottleneck: 16,
                        prototypes: 64,
                        drop_path: 0.0,
                    },
                    1,
                );
                c.batch_size = 8;
                c.n_local = 2;
                c.data = DataSpec::Builtin {
                    seed: 0,
                    train_per_class: 8,
                    test_per_class: 4,
                };
                c
            }
            "vit-s16" => big(ModelSpec {
                img_size: 224,
                patch: 16,
                dim: 384,
                depth: 12,
                heads: 6,
                mlp_ratio: 4,
                head_hidden: 2048,
                bottleneck: 256,
                prototypes: 65536,
                drop_path: 0.1,
            }),
            "vit-b16" => big(ModelSpec {
                img_size: 224,
                patch: 16,
                dim: 768,
                depth: 12,
                heads: 12,
                mlp_ratio: 4,
                head_hidden: 2048,
                bottleneck: 256,
                prototypes: 65536,
                drop_path: 0.1,
            }),
            other => bail!(
                "unknown preset '{other}' (choose one of: {})",
                PRESETS.join(", ")
            ),
        })
    }

    /// Rejects settings that cannot run, with a message that says which and why.
    pub fn validate(&self) -> Result<()> {
        let m = &self.model;
        if m.patch == 0 || !m.img_size.is_multiple_of(m.patch) {
            bail!(
                "image size {} is not a multiple of the patch size {}",
                m.img_size,
                m.patch
            );
        }
        if m.heads == 0 || !m.dim.is_multiple_of(m.heads) {
            bail!("dim {} is not divisible by {} heads", m.dim, m.heads);
        }
        if m.prototypes < 2 {
            bail!("need at least 2 prototypes (got {})", m.prototypes);
        }
        if self.batch_size == 0 || self.epochs == 0 {
            bail!("batch size and epochs must be positive");
        }
        let local = crate::data::CropConfig::for_image_size(m.img_size, self.n_local).local_size;
        if !local.is_multiple_of(m.patch) {
            bail!(
                "local crop size {local} is not a multiple of the patch size {}",
                m.patch
            );
        }
        for (what, t) in [
            ("teacher", self.teacher_temp),
            ("student", self.student_temp),
        ] {
            if !(t > 0.0 && t.is_finite()) {
                bail!("{what} temperature must be positive (got {t})");
            }
        }
        if !(self.koleo_proto >= 0.0 && self.koleo_proto.is_finite()) {
            bail!(
                "the KoLeo-proto weight must be finite and >= 0 (got {})",
                self.koleo_proto
            );
        }
        if !(0.0..1.0).contains(&self.center_momentum) {
            bail!(
                "center momentum must be in [0, 1) (got {})",
                self.center_momentum
            );
        }
        Ok(())
    }
}
