//! The initial state and the checkpoint form of the training state.
use std::path::Path;

use anyhow::{anyhow, bail, Context, Result};
use dinovmf_core::model::{for_each_param, num_params};

use super::config::{Method, TrainConfig};
use crate::backend::TrainState;
use crate::checkpoint::{self, CheckpointData, Tensor};
use crate::config::{centering, model_config};

/// Fresh parameters (teacher = student), zero optimiser moments, the initial center.
pub fn init_state(cfg: &TrainConfig) -> TrainState {
    TrainState::initial(&model_config(cfg), centering(cfg), cfg.seed ^ 0x1417_5eed)
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
