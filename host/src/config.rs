//! The trainer's configuration turned into core's configurations (model, loss, iBOT) and the
//! backend's (step shapes): one module the trainer, the evaluations and the CLI import, so the
//! backends never see the trainer's types.
use dinovmf_core::centering::Centering;
use dinovmf_core::loss::LossConfig;
use dinovmf_core::masking::MaskConfig;
use dinovmf_core::mim_loss::IbotConfig;
use dinovmf_core::model::{HeadConfig, IbotParts, ModelConfig, VitConfig};

use crate::backend::{BackendConfig, StepShapes};
use crate::data::CropConfig;
use crate::train::{CenteringKind, LossKind, Method, TrainConfig};

/// Core's model configuration for a run.
pub fn model_config(cfg: &TrainConfig) -> ModelConfig {
    let m = &cfg.model;
    ModelConfig {
        vit: VitConfig {
            img_size: m.img_size,
            patch: m.patch,
            in_chans: 3,
            dim: m.dim,
            depth: m.depth,
            heads: m.heads,
            mlp_ratio: m.mlp_ratio,
            qkv_bias: true,
            ln_eps: 1e-6,
            drop_path: m.drop_path,
            stem_convs: m.stem_convs,
        },
        head: HeadConfig {
            hidden: m.head_hidden,
            bottleneck: m.bottleneck,
            n_layers: 3,
            out_dim: m.prototypes,
            norm_last_layer: cfg.norm_last_layer,
        },
        ibot: ibot_parts(cfg),
    }
}

/// The model parts the run's method needs (none for DINO).
pub fn ibot_parts(cfg: &TrainConfig) -> IbotParts {
    match cfg.method {
        Method::Dino => IbotParts::NONE,
        Method::Ibot => IbotParts {
            mask_token: true,
            separate_patch_head: cfg.ibot.separate_patch_head,
        },
    }
}

/// Core's loss configuration for a run (the teacher temperature is set per step).
pub fn loss_config(cfg: &TrainConfig) -> LossConfig {
    let mut l = match cfg.loss {
        LossKind::Dino => LossConfig::dino(),
        LossKind::Vmf => LossConfig::vmf(),
    };
    l.centering = centering(cfg);
    l.norm_last_layer = cfg.norm_last_layer;
    l.student_temp = cfg.student_temp;
    l.teacher_temp = cfg.warmup_teacher_temp;
    l.center_momentum = cfg.center_momentum;
    l
}

/// Core's centering for a run (Sinkhorn with the run's number of rounds).
pub fn centering(cfg: &TrainConfig) -> Centering {
    match cfg.centering {
        CenteringKind::Logit => Centering::Logit,
        CenteringKind::Probability => Centering::Probability,
        CenteringKind::Sinkhorn => Centering::Sinkhorn {
            iters: cfg.sinkhorn_iters,
        },
    }
}

/// The batch shapes of a run, as its crop settings make them.
pub fn step_shapes(cfg: &TrainConfig) -> StepShapes {
    let crops = crop_config(cfg);
    StepShapes {
        batch: cfg.batch_size,
        n_global: 2,
        n_local: cfg.n_local,
        global_size: crops.global_size,
        local_size: crops.local_size,
    }
}

/// Core's iBOT settings for a run (used only with `--method ibot`).
pub fn ibot_config(cfg: &TrainConfig) -> IbotConfig {
    let ib = &cfg.ibot;
    IbotConfig {
        mask: MaskConfig {
            prob: ib.mask_prob,
            ratio: ib.mask_ratio,
            aspect: ib.mask_aspect,
        },
        mim_weight: ib.mim_weight,
        patch_center_momentum: ib.patch_center_momentum,
    }
}

/// Everything a backend is built from, for a run.
pub fn backend_config(cfg: &TrainConfig) -> BackendConfig {
    BackendConfig {
        model: model_config(cfg),
        loss: loss_config(cfg),
        shapes: step_shapes(cfg),
        ibot: (cfg.method == Method::Ibot).then(|| ibot_config(cfg)),
        precision: cfg.precision,
    }
}

/// The augmentation pipeline of a run.
pub fn crop_config(cfg: &TrainConfig) -> CropConfig {
    let mut c = CropConfig::for_image_size(cfg.model.img_size, cfg.n_local);
    c.global_scale = cfg.global_scale;
    c.local_scale = cfg.local_scale;
    c.jitter.p *= cfg.color_aug;
    c.grayscale_p *= cfg.color_aug;
    c.flip_p = cfg.flip;
    c
}
