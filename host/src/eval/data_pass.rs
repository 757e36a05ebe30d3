//! The images and features the diagnostics and the probe read.
use std::sync::Arc;

use anyhow::Result;

use dinovmf_core::loss::LossConfig;
use dinovmf_core::model::ModelConfig;

use crate::backend::{Backend, Net};
use crate::data::{self, Dataset};

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

/// Prototype diagnostics of the backend's current state (a `model` trained with `loss`) on
/// `images` (`[n, 3, size, size]`, `size` = the model's image size), kappa at `teacher_temp`. Works on every backend: it reads features through `embed` and the
/// weights through `state`.
pub fn diagnose_backend(
    backend: &mut dyn Backend,
    model: &ModelConfig,
    loss: &LossConfig,
    images: &[f32],
    n: usize,
    teacher_temp: f64,
) -> Result<ProtoDiag> {
    let size = model.vit.img_size;
    let cls_t = backend.embed(Net::Teacher, images, n, size)?;
    let cls_s = backend.embed(Net::Student, images, n, size)?;
    let st = backend.state()?;
    diagnose(
        model,
        loss,
        &st.teacher,
        &st.student,
        &cls_t,
        &cls_s,
        n,
        teacher_temp,
        &st.center,
    )
}
