//! The images and features the diagnostics and the probe read.
use std::sync::Arc;

use anyhow::Result;

use crate::backend::{Backend, Net};
use crate::data::{self, Dataset};
use crate::train::{state, TrainConfig};

use super::prototypes::{diagnose, ProtoDiag};

/// The first `max` images of `ds` (eval transform, `[n, 3, size, size]`) and their count.
pub fn first_images(ds: &Arc<dyn Dataset>, size: usize, max: usize) -> Result<(Vec<f32>, usize)> {
    let mut imgs = Vec::new();
    let mut n = 0;
    for b in data::eval_batches(ds.clone(), size, 256) {
        let (im, labels) = b?;
        let take = labels.len().min(max - n);
        imgs.extend_from_slice(&im[..take * 3 * size * size]);
        n += take;
        if n >= max {
            break;
        }
    }
    Ok((imgs, n))
}

/// Prototype diagnostics of the backend's current state on `images` (`[n, 3, size, size]`),
/// kappa at `teacher_temp`. Works on every backend: it reads features through `embed` and the
/// weights through `state`.
pub fn diagnose_backend(
    backend: &mut dyn Backend,
    cfg: &TrainConfig,
    images: &[f32],
    n: usize,
    teacher_temp: f64,
) -> Result<ProtoDiag> {
    let size = cfg.model.img_size;
    let cls_t = backend.embed(Net::Teacher, images, n, size)?;
    let cls_s = backend.embed(Net::Student, images, n, size)?;
    let st = backend.state()?;
    diagnose(
        &state::model_config(cfg),
        &state::loss_config(cfg),
        &st.teacher,
        &st.student,
        &cls_t,
        &cls_s,
        n,
        teacher_temp,
        &st.center,
    )
}
