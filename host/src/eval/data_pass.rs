//! The images and features the diagnostics and the probe read.
use std::sync::Arc;

use anyhow::Result;

use dinovmf_core::loss::LossConfig;
use dinovmf_core::model::ModelConfig;

use crate::backend::{Backend, Net};
use crate::data::{self, Dataset};

use super::prototypes::{diagnose, ProtoDiag};

/// The images a diagnostics pass reads, with their labels.
#[derive(Clone, Debug, Default)]
pub struct ImageSample {
    /// Eval-transformed images `[n, 3, size, size]`.
    pub images: Vec<f32>,
    pub labels: Vec<u32>,
    pub n: usize,
    /// The dataset has at least two classes, so NMI / purity against the labels mean something.
    pub labelled: bool,
}

impl ImageSample {
    /// The labels when they can score an assignment (two classes or more).
    pub fn labels(&self) -> Option<&[u32]> {
        self.labelled.then_some(&self.labels[..])
    }
}

/// The first `max` images of `ds` (eval transform) with their labels.
pub fn first_images(ds: &Arc<dyn Dataset>, size: usize, max: usize) -> Result<ImageSample> {
    let mut imgs = Vec::new();
    let mut labs = Vec::new();
    let mut n = 0;
    for b in data::eval_batches(ds.clone(), size, 256) {
        let (im, labels) = b?;
        let take = labels.len().min(max - n);
        imgs.extend_from_slice(&im[..take * 3 * size * size]);
        labs.extend_from_slice(&labels[..take]);
        n += take;
        if n >= max {
            break;
        }
    }
    Ok(ImageSample {
        images: imgs,
        labels: labs,
        n,
        labelled: ds.num_classes() >= 2,
    })
}

/// Prototype diagnostics of the backend's current state (a `model` trained with `loss`) on
/// `sample` (images at the model's image size; with labels, NMI / purity too), kappa at
/// `teacher_temp`. Works on every backend: it reads features through `embed` and the weights
/// through `state`.
pub fn diagnose_backend(
    backend: &mut dyn Backend,
    model: &ModelConfig,
    loss: &LossConfig,
    sample: &ImageSample,
    teacher_temp: f64,
) -> Result<ProtoDiag> {
    let size = model.vit.img_size;
    let n = sample.n;
    let cls_t = backend.embed(Net::Teacher, &sample.images, n, size)?;
    let cls_s = backend.embed(Net::Student, &sample.images, n, size)?;
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
        sample.labels(),
    )
}
