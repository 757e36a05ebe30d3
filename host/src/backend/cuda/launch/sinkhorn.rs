//! Launchers of `ptx/src/kernels/sinkhorn.rs`.
use anyhow::Result;

use crate::backend::cuda::device::{u32_of as u, Buf, Device, Gpu};

/// `q[n, k] = scale dots + bias`, the logits the rounds balance.
pub fn sinkhorn_logits<D: Device>(
    gpu: &mut Gpu<D>,
    q: Buf<f32>,
    dots: Buf<f32>,
    scale: Buf<f32>,
    bias: Buf<f32>,
    n: usize,
    k: usize,
) -> Result<()> {
    gpu.launch(
        "sinkhorn_logits",
        &[q.into(), dots.into(), scale.into(), bias.into(), u(n), u(k)],
    )
}

/// One column normalisation of the log-domain `q[n, k]`.
pub fn sinkhorn_columns<D: Device>(
    gpu: &mut Gpu<D>,
    q: Buf<f32>,
    n: usize,
    k: usize,
) -> Result<()> {
    gpu.launch("sinkhorn_columns", &[q.into(), u(n), u(k)])
}

/// One row normalisation; the `last` one writes the probabilities.
pub fn sinkhorn_rows<D: Device>(
    gpu: &mut Gpu<D>,
    q: Buf<f32>,
    n: usize,
    k: usize,
    last: bool,
) -> Result<()> {
    gpu.launch(
        "sinkhorn_rows",
        &[q.into(), u(n), u(k), u32::from(last).into()],
    )
}
