//! Conversions between the run configuration and core's types, the initial state, and the
//! checkpoint form of the training state.
use std::path::Path;

use anyhow::{anyhow, bail, Context, Result};
use dinovmf_core::centering::Centering;
use dinovmf_core::loss::LossConfig;
use dinovmf_core::masking::MaskConfig;
use dinovmf_core::mim_loss::IbotConfig;
use dinovmf_core::model::{
    for_each_param, num_params, HeadConfig, IbotParts, ModelConfig, VitConfig,
};

use super::config::{CenteringKind, LossKind, Method, TrainConfig};
use crate::backend::cpu::CpuBackend;
use crate::backend::{Backend, SingleProcess, StepShapes, TrainState};
use crate::checkpoint::{self, CheckpointData, Tensor};

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
    l.centering = centering(cfg.centering);
    l.norm_last_layer = cfg.norm_last_layer;
    l.student_temp = cfg.student_temp;
    l.teacher_temp = cfg.warmup_teacher_temp;
    l.center_momentum = cfg.center_momentum;
    l
}

fn centering(c: CenteringKind) -> Centering {
    match c {
        CenteringKind::Logit => Centering::Logit,
        CenteringKind::Probability => Centering::Probability,
    }
}

/// The batch shapes of a run, as its crop settings make them.
pub fn step_shapes(cfg: &TrainConfig) -> StepShapes {
    let crops = super::crop_config(cfg);
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

/// The CPU backend for a run.
pub fn cpu_backend(cfg: &TrainConfig) -> Result<Box<dyn Backend>> {
    let be = CpuBackend::new(
        model_config(cfg),
        loss_config(cfg),
        step_shapes(cfg),
        Box::new(SingleProcess),
    )?;
    Ok(Box::new(match cfg.method {
        Method::Dino => be,
        Method::Ibot => be.with_ibot(ibot_config(cfg))?,
    }))
}

/// Fresh parameters (teacher = student), zero optimiser moments, the initial center.
pub fn init_state(cfg: &TrainConfig) -> TrainState {
    TrainState::initial(
        &model_config(cfg),
        centering(cfg.centering),
        cfg.seed ^ 0x1417_5eed,
    )
}

const GROUPS: [&str; 4] = ["student", "teacher", "optim.m", "optim.v"];

/// Writes the state atomically with the config, the step and the initial k-NN scores.
pub fn save_checkpoint(
    path: &Path,
    cfg: &TrainConfig,
    st: &TrainState,
    step: u64,
    knn_init: Option<&[(usize, f64)]>,
) -> Result<()> {
    save_checkpoint_meta(path, cfg, st, step, knn_init, &[])
}

/// [`save_checkpoint`] with extra metadata entries (e.g. the data's class list).
pub fn save_checkpoint_meta(
    path: &Path,
    cfg: &TrainConfig,
    st: &TrainState,
    step: u64,
    knn_init: Option<&[(usize, f64)]>,
    extra: &[(&str, String)],
) -> Result<()> {
    let mc = model_config(cfg);
    let mut tensors = Vec::new();
    for (group, buf) in GROUPS
        .iter()
        .zip([&st.student, &st.teacher, &st.adam_m, &st.adam_v])
    {
        for_each_param(&mc, |p| {
            tensors.push(Tensor {
                name: format!("{group}.{}", p.name),
                shape: p.shape().to_vec(),
                data: buf[p.range()].to_vec(),
            })
        });
    }
    tensors.push(Tensor {
        name: "center".into(),
        shape: vec![st.center.len()],
        data: st.center.clone(),
    });
    if !st.patch_center.is_empty() {
        tensors.push(Tensor {
            name: "patch_center".into(),
            shape: vec![st.patch_center.len()],
            data: st.patch_center.clone(),
        });
    }
    let mut ck = CheckpointData {
        tensors,
        ..Default::default()
    };
    ck.metadata
        .insert("config".into(), serde_json::to_string(cfg)?);
    ck.metadata.insert("step".into(), step.to_string());
    for (k, v) in extra {
        ck.metadata.insert(k.to_string(), v.clone());
    }
    ck.metadata
        .insert("adam_step".into(), st.adam_step.to_string());
    if let Some(k) = knn_init {
        ck.metadata
            .insert("knn_init".into(), serde_json::to_string(k)?);
    }
    checkpoint::save(path, &ck)
}

/// Reads a checkpoint: (state, step, config, initial k-NN scores).
#[allow(clippy::type_complexity)]
pub fn load_checkpoint(
    path: &Path,
) -> Result<(TrainState, u64, TrainConfig, Option<Vec<(usize, f64)>>)> {
    load_checkpoint_with(path, checkpoint::LoadOptions::verified())
}

/// [`load_checkpoint`] with the reader's options (checksum verification).
#[allow(clippy::type_complexity)]
pub fn load_checkpoint_with(
    path: &Path,
    opts: checkpoint::LoadOptions,
) -> Result<(TrainState, u64, TrainConfig, Option<Vec<(usize, f64)>>)> {
    let mut ck = checkpoint::load_with(path, opts)?;
    let cfg: TrainConfig = serde_json::from_str(ck.meta("config")?)
        .with_context(|| format!("checkpoint {}: unreadable config", path.display()))?;
    super::validate::validate_config(&cfg).with_context(|| {
        format!(
            "checkpoint {}: the configuration stored in it is invalid",
            path.display()
        )
    })?;
    let step: u64 = ck.meta("step")?.parse().context("checkpoint step")?;
    let adam_step: u64 = ck
        .meta("adam_step")?
        .parse()
        .context("checkpoint adam_step")?;
    let knn = match ck.metadata.get("knn_init") {
        Some(s) => Some(serde_json::from_str(s)?),
        None => None,
    };
    let mc = model_config(&cfg);
    let n = num_params(&mc);
    let mut bufs: Vec<Vec<f32>> = (0..4).map(|_| vec![0.0f32; n]).collect();
    for (group, buf) in GROUPS.iter().zip(bufs.iter_mut()) {
        let mut err = None;
        for_each_param(&mc, |p| {
            if err.is_some() {
                return;
            }
            let name = format!("{group}.{}", p.name);
            match ck.take(&name) {
                Ok(t) if t.data.len() == p.numel && t.shape == p.shape() => {
                    buf[p.range()].copy_from_slice(&t.data)
                }
                Ok(t) => {
                    err = Some(anyhow!(
                        "tensor '{name}' has shape {:?} ({} values), the model needs {:?}",
                        t.shape,
                        t.data.len(),
                        p.shape()
                    ))
                }
                Err(e) => err = Some(e),
            }
        });
        if let Some(e) = err {
            return Err(e.context(format!("checkpoint {}", path.display())));
        }
    }
    let center = ck.take("center")?.data;
    if center.len() != cfg.model.prototypes {
        bail!(
            "checkpoint {}: center has {} entries for K = {}",
            path.display(),
            center.len(),
            cfg.model.prototypes
        );
    }
    let patch_center = if cfg.method == Method::Ibot {
        let pc = ck
            .take("patch_center")
            .with_context(|| format!("checkpoint {} (an iBOT run)", path.display()))?
            .data;
        if pc.len() != cfg.model.prototypes {
            bail!(
                "checkpoint {}: patch_center has {} entries for K = {}",
                path.display(),
                pc.len(),
                cfg.model.prototypes
            );
        }
        pc
    } else {
        Vec::new()
    };
    let mut it = bufs.into_iter();
    let (student, teacher, adam_m, adam_v) = (
        it.next().unwrap(),
        it.next().unwrap(),
        it.next().unwrap(),
        it.next().unwrap(),
    );
    Ok((
        TrainState {
            student,
            teacher,
            adam_m,
            adam_v,
            center,
            patch_center,
            adam_step,
        },
        step,
        cfg,
        knn,
    ))
}
