//! The CUDA backend's update (the CPU backend's optimiser calls): per-tensor gradient norms
//! and clipping, AdamW over the trainable runs, the teacher EMA.
use anyhow::Result;

use dinovmf_core::optim::AdamW;
use dinovmf_ptx::kernels::reduce::RedOp;

use super::{GpuBackend, M_GRAD_SQ};
use crate::backend::cuda::device::Device;
use crate::backend::cuda::launch::optim::{adamw, ema, AdamwBufs};
use crate::backend::cuda::launch::reduce::{clip_coef, scale_segments};
use crate::backend::StepHyper;

/// A contiguous range of parameters updated with one AdamW launch.
#[derive(Clone, Copy, Debug)]
pub(super) struct Run {
    pub(super) start: usize,
    pub(super) end: usize,
    pub(super) decay: bool,
    pub(super) last_layer: bool,
}

impl<D: Device> GpuBackend<D> {
    /// Per-tensor norms (and their squared sum into the metrics), clipping when `clip > 0`.
    pub(super) fn clip_norms(&mut self, clip: f32) -> Result<()> {
        let gpu = &mut self.gpu;
        let s = self.clip_segs;
        let parts = s.parts();
        gpu.reduce_segments(self.clip_part, self.grads, &s, RedOp::SumSq)?;
        gpu.reduce_final(
            self.metrics.sub(M_GRAD_SQ, 1),
            self.clip_part,
            parts * s.n,
            1,
            RedOp::Sum,
            1.0,
        )?;
        if clip > 0.0 {
            let (coef, norm) = (self.clip_coef, self.clip_norm);
            clip_coef(gpu, coef, norm, self.clip_part, (parts, s.n), clip as f64)?;
            scale_segments(gpu, self.grads, &s, coef)?;
        }
        Ok(())
    }

    /// AdamW over the trainable runs (the last layer skipped while frozen), then the EMA.
    pub(super) fn adamw_ema(&mut self, hp: &StepHyper) -> Result<()> {
        let step = self.adam_step + 1;
        let adam = AdamW::default();
        let (lr, wd) = (hp.lr as f64, hp.weight_decay as f64);
        let gpu = &mut self.gpu;
        for r in &self.runs {
            if r.last_layer && hp.freeze_last_layer {
                continue;
            }
            let len = r.end - r.start;
            let bufs = AdamwBufs {
                param: self.student.sub(r.start, len),
                grad: self.grads.sub(r.start, len),
                m: self.adam_m.sub(r.start, len),
                v: self.adam_v.sub(r.start, len),
            };
            let wd_run = if r.decay { wd } else { 0.0 };
            adamw(gpu, bufs, len, &adam, (lr, wd_run, step))?;
        }
        let momentum = hp.teacher_momentum as f64;
        ema(gpu, self.teacher, self.student, self.n_params, momentum)
    }
}
