//! Launchers of `ptx/src/kernels/optim.rs`: AdamW and the teacher EMA.
use anyhow::Result;

use dinovmf_core::optim::AdamW;

use crate::backend::cuda::device::{u32_of as u, Arg, Buf, Device, Gpu};

/// The four tensors of one AdamW run, all of `n` elements.
#[derive(Clone, Copy, Debug)]
pub struct AdamwBufs {
    pub param: Buf<f32>,
    pub grad: Buf<f32>,
    pub m: Buf<f32>,
    pub v: Buf<f32>,
}

/// One AdamW step `step` (1-based) with learning rate `lr` and weight decay `wd`.
pub fn adamw<D: Device>(
    gpu: &mut Gpu<D>,
    b: AdamwBufs,
    n: usize,
    hp: &AdamW,
    (lr, wd, step): (f64, f64, u64),
) -> Result<()> {
    gpu.launch(
        "adamw",
        &[
            b.param.into(),
            b.grad.into(),
            b.m.into(),
            b.v.into(),
            u(n),
            lr.into(),
            wd.into(),
            hp.beta1.into(),
            hp.beta2.into(),
            hp.eps.into(),
            Arg::U64(step),
        ],
    )
}

/// `teacher = momentum teacher + (1 - momentum) student` over `n` elements.
pub fn ema<D: Device>(
    gpu: &mut Gpu<D>,
    teacher: Buf<f32>,
    student: Buf<f32>,
    n: usize,
    momentum: f64,
) -> Result<()> {
    gpu.launch(
        "ema",
        &[teacher.into(), student.into(), u(n), momentum.into()],
    )
}
