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

pub use crate::backend::Precision;

/// The self-distillation method (`--method`): DINO ([CLS] only) or iBOT ([CLS] plus masked
/// image modelling on patch tokens). Either runs with DINO or vMF logits (`--loss`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Method {
    #[default]
    Dino,
    Ibot,
}

/// iBOT's settings (ignored by DINO; saved with every run so that a DINO checkpoint written
/// before they existed still reads back as the same configuration).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct IbotSpec {
    /// Weight of L_mim in `L_cls + mim_weight * L_mim` (iBOT: 1).
    pub mim_weight: f64,
    /// Patch teacher temperature after warm-up, at step 0, and the warm-up length.
    pub patch_teacher_temp: f64,
    pub warmup_patch_teacher_temp: f64,
    pub warmup_patch_teacher_temp_epochs: u64,
    /// Momentum of the patch center (its own EMA, separate from the [CLS] one).
    pub patch_center_momentum: f64,
    /// Patch tokens get their own prototype layer (`head.last_layer2`) instead of sharing.
    pub separate_patch_head: bool,
    /// Probability that a student global crop is masked at all.
    pub mask_prob: f64,
    /// Range of the masked fraction of a masked crop (uniform).
    pub mask_ratio: (f64, f64),
    /// Range of a mask block's aspect ratio (log-uniform).
    pub mask_aspect: (f64, f64),
}

impl Default for IbotSpec {
    /// iBOT's published settings (ViT-S/16 recipe).
    fn default() -> Self {
        Self {
            mim_weight: 1.0,
            patch_teacher_temp: 0.07,
            warmup_patch_teacher_temp: 0.04,
            warmup_patch_teacher_temp_epochs: 30,
            patch_center_momentum: 0.9,
            separate_patch_head: false,
            mask_prob: 0.5,
            mask_ratio: (0.1, 0.5),
            mask_aspect: (0.3, 1.0 / 0.3),
        }
    }
}

impl IbotSpec {
    /// The small presets' settings (short runs on small data; see docs/ibot.md for the runs
    /// behind them): the patch teacher as sharp as the small presets' [CLS] teacher, no warm-up.
    pub fn small() -> Self {
        Self {
            patch_teacher_temp: 0.02,
            warmup_patch_teacher_temp: 0.02,
            warmup_patch_teacher_temp_epochs: 0,
            ..Self::default()
        }
    }
}

/// Teacher centering (`--centering`). Small presets: Sinkhorn-Knopp; the 224 px presets follow
/// the loss (DINO: logit, vMF: probability).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum CenteringKind {
    Logit,
    Probability,
    /// Sinkhorn-Knopp balancing of the batch's teacher logits (`--sinkhorn-iters` rounds).
    Sinkhorn,
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
    /// Convolutions per stage of the convolutional stem (0: DINO's patch embedding; absent in
    /// configs written before the stem existed). See core's `VitConfig::stem_convs`.
    #[serde(default)]
    pub stem_convs: usize,
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
    /// Absent in configs written before iBOT existed: those were DINO runs.
    #[serde(default)]
    pub method: Method,
    #[serde(default)]
    pub ibot: IbotSpec,
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
    /// Probability of a horizontal flip of each crop (DINO: 0.5). 0 for data whose mirror image
    /// is another class or no image at all (digits, text).
    #[serde(default = "half")]
    pub flip: f32,
    pub seed: u64,
    pub data: DataSpec,
    /// Weight of the KoLeo-proto regulariser on the student's prototypes (0 = off).
    #[serde(default)]
    pub koleo_proto: f64,
    /// Rounds of Sinkhorn-Knopp balancing with `centering = sinkhorn` (method.md: 3).
    #[serde(default = "sinkhorn_default_iters")]
    pub sinkhorn_iters: u32,
    /// Weight of KoLeo on the student's [CLS] backbone features (0 = off).
    #[serde(default)]
    pub koleo: f64,
    /// The linear layers' matrix products (`--precision`; f32 in runs saved before it).
    #[serde(default)]
    pub precision: crate::backend::Precision,
}

fn sinkhorn_default_iters() -> u32 {
    dinovmf_core::sinkhorn::SINKHORN_DEFAULT_ITERS
}

fn one() -> f32 {
    1.0
}

fn half() -> f32 {
    0.5
}

/// Names of the shipped presets, for help texts.
/// KoLeo weight of the small presets (DINOv2's 0.1; measured on MNIST-5k in docs/quality.md).
pub const SMALL_KOLEO: f64 = 0.1;

pub const PRESETS: &[&str] = &["small32", "tiny", "vit-s16", "vit-b16"];

impl TrainConfig {
    /// A DINO preset with the loss's own `norm_last_layer` (and, at 224 px, centering).
    pub fn preset(name: &str, loss: LossKind) -> Result<Self> {
        Self::preset_for(name, Method::Dino, loss)
    }

    /// A preset for a method and a loss. iBOT changes only what its recipe changes: global
    /// crops from 25% of the image up (method.md), and the patch loss's settings.
    pub fn preset_for(name: &str, method: Method, loss: LossKind) -> Result<Self> {
        let mut c = Self::dino_preset(name, loss)?;
        if method == Method::Ibot {
            c.method = method;
            c.global_scale = (0.25, 1.0);
            if name != "vit-s16" && name != "vit-b16" {
                c.ibot = IbotSpec::small();
            }
        }
        Ok(c)
    }

    fn dino_preset(name: &str, loss: LossKind) -> Result<Self> {
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
            method: Method::Dino,
            ibot: IbotSpec::default(),
            loss,
            // Small data sets collapse under both running centers (method.md, anti-collapse
            // tools): on MNIST-5k, which the recipe was not tuned on before, the running
            // centers ended within 6 points of the untrained network; Sinkhorn-Knopp with
            // KoLeo 0.1 learned (docs/quality.md).
            centering: CenteringKind::Sinkhorn,
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
            flip: 0.5,
            seed: 0,
            data: builtin.clone(),
            koleo_proto: 0.0,
            sinkhorn_iters: sinkhorn_default_iters(),
            koleo: SMALL_KOLEO,
            precision: crate::backend::Precision::F32,
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
            // The paper's ImageNet recipe keeps DINO's running centers and no KoLeo.
            centering: vmf_center,
            koleo: 0.0,
            precision: Precision::F32,
            ..small(model, 100)
        };
        Ok(match name {
            // Patch 8 (16 tokens): on a 2-core CPU it trains ~3.3x the images per second of
            // patch 4, and within the same ~10 minutes it learned more on MNIST-5k (measured:
            // k-NN 70.9 % after 3 epochs against 37.6 % with patch 4, same recipe).
            // A convolutional stem of one 3 x 3 convolution per stage (24 / 48 / 96 channels)
            // instead of the 8 x 8 patch embedding: MNIST-5k 94.8 % against 85.2 %, lines 75.5
            // against 70.0 (docs/quality.md, sixth round; a change of method recorded there).
            "small32" => small(
                ModelSpec {
                    img_size: 32,
                    patch: 8,
                    dim: 96,
                    depth: 4,
                    heads: 3,
                    mlp_ratio: 4,
                    head_hidden: 512,
                    bottleneck: 128,
                    prototypes: 1024,
                    drop_path: 0.1,
                    stem_convs: 1,
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
                        stem_convs: 0,
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
                stem_convs: 0,
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
                stem_convs: 0,
            }),
            other => bail!(
                "unknown preset '{other}' (choose one of: {})",
                PRESETS.join(", ")
            ),
        })
    }

    /// Rejects settings that cannot run, naming the option and its allowed range (see
    /// [`super::validate`]).
    pub fn validate(&self) -> Result<()> {
        super::validate::validate_config(self)
    }
}
