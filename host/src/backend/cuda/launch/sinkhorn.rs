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

/// A split column round's first piece: `col_max[k]` = the column maxima of the `n` rows here.
pub fn sinkhorn_column_max<D: Device>(
    gpu: &mut Gpu<D>,
    col_max: Buf<f32>,
    q: Buf<f32>,
    n: usize,
    k: usize,
) -> Result<()> {
    gpu.launch(
        "sinkhorn_column_max",
        &[col_max.into(), q.into(), u(n), u(k)],
    )
}

/// Its second piece: `col_sum[k]` = the `n` rows' `exp(q - col_max)` summed per column.
pub fn sinkhorn_column_sums<D: Device>(
    gpu: &mut Gpu<D>,
    col_sum: Buf<f32>,
    q: Buf<f32>,
    col_max: Buf<f32>,
    n: usize,
    k: usize,
) -> Result<()> {
    gpu.launch(
        "sinkhorn_column_sums",
        &[col_sum.into(), q.into(), col_max.into(), u(n), u(k)],
    )
}

/// Its last piece: `q[n, k] -= col_max + ln col_sum + ln k` per column.
pub fn sinkhorn_column_scale<D: Device>(
    gpu: &mut Gpu<D>,
    q: Buf<f32>,
    col_max: Buf<f32>,
    col_sum: Buf<f32>,
    n: usize,
    k: usize,
) -> Result<()> {
    gpu.launch(
        "sinkhorn_column_scale",
        &[q.into(), col_max.into(), col_sum.into(), u(n), u(k)],
    )
}

/// One row normalisation of the `n` rows here of a batch of `batch_rows` rows (`n` on one
/// rank); the `last` one writes the probabilities.
pub fn sinkhorn_rows<D: Device>(
    gpu: &mut Gpu<D>,
    q: Buf<f32>,
    n: usize,
    batch_rows: usize,
    k: usize,
    last: bool,
) -> Result<()> {
    gpu.launch(
        "sinkhorn_rows",
        &[q.into(), u(n), u(batch_rows), u(k), u32::from(last).into()],
    )
}
