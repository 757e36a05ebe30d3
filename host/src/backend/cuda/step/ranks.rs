//! The CUDA backend as one rank of a data-parallel run: its reduce phase on device buffers
//! through a [`DeviceCollective`] (NCCL), as the CPU backend's `reduce()` does on the host.
//!
//! With more than one rank the `[CLS]` chain leaves the center where it is
//! ([`CenterUpdate::Deferred`]); the reduce phase then takes the mean over ranks of the
//! gradients and of the batch statistics (the center's statistic `[K]`, the batch-mean teacher
//! distribution `[K]`, the loss and the mean row entropy; equal shards, so the mean of the shard
//! means is the global batch mean), and computes the entropy of the mean, its largest mass and
//! the next center from the global values, as one process would. Clipping, AdamW and the EMA
//! then run identically on every rank.
//!
//! KoLeo on features (`--koleo`): per global view, every rank all-gathers the view's student
//! `[CLS]` rows over NCCL (rank order = the whole batch's row order), computes the whole
//! batch's KoLeo gradient on the host (core's one formula, as on one rank) and keeps its own
//! rows, weighted by the rank count (the reduce phase's mean divides it again), as the CPU
//! backend does.
use anyhow::{ensure, Result};

use dinovmf_core::centering::Centering;
use dinovmf_ptx::kernels::reduce::RedOp;

use super::{GpuBackend, M_LOSS, M_MAX_MASS, M_MEAN_ENT, M_ROW_ENT};
use crate::backend::cuda::device::{Buf, Device};
use crate::backend::cuda::launch::head::{center_update, row_entropy};
use crate::backend::cuda::loss::CenterUpdate;
use crate::backend::cuda::ranks::DeviceCollective;

/// A rank's collective and the device buffers of its reduce phase.
pub(super) struct RankBufs {
    pub coll: Box<dyn DeviceCollective>,
    /// The sum over ranks of the gradients (then scaled into `grads`).
    grad_sum: Buf<f32>,
    /// `[stat K | mean_p K | loss | row entropy]`, summed in place.
    stats: Buf<f32>,
    /// KoLeo: every rank's global-view `[CLS]` rows `[ranks][2][b][d]`, and host scratch.
    koleo_rows: Buf<f32>,
    koleo_x: Vec<f32>,
    koleo_view: Vec<f32>,
    koleo_dx: Vec<f32>,
    koleo_scratch: Vec<f32>,
}

impl<D: Device> GpuBackend<D> {
    /// This backend as rank `coll.rank()` of `coll.world_size()`: its shapes are the rank's
    /// shard of the batch. One rank changes nothing. Sinkhorn centering and iBOT over ranks are
    /// refused with an error (their statistics over the batch are not reduced on the device
    /// yet).
    pub fn with_device_ranks(mut self, coll: Box<dyn DeviceCollective>) -> Result<Self> {
        let world = coll.world_size();
        if world == 1 {
            return Ok(self);
        }
        ensure!(
            !matches!(self.loss_cfg.centering, Centering::Sinkhorn { .. }),
            "--centering sinkhorn over {world} CUDA ranks is not implemented (its column sums \
             are not reduced over NCCL yet): use the CPU backend under MPI, or one GPU"
        );
        ensure!(
            self.ibot.is_none(),
            "iBOT over {world} CUDA ranks is not implemented (its patch statistics are not \
             reduced over NCCL yet): use the CPU backend under MPI, or one GPU"
        );
        let k = self.center.len;
        let grad_sum = self.gpu.alloc(self.n_params)?;
        let stats = self.gpu.alloc(2 * k + 2)?;
        let koleo_rows = self.gpu.alloc(world * 2 * self.shapes.batch * self.cx.d)?;
        self.ranks = Some(RankBufs {
            coll,
            grad_sum,
            stats,
            koleo_rows,
            koleo_x: Vec::new(),
            koleo_view: Vec::new(),
            koleo_dx: Vec::new(),
            koleo_scratch: Vec::new(),
        });
        Ok(self)
    }

    /// `(rank, ranks)` of this backend.
    pub(super) fn rank_shard(&self) -> (usize, usize) {
        match &self.ranks {
            Some(r) => (r.coll.rank(), r.coll.world_size()),
            None => (0, 1),
        }
    }

    /// Where the `[CLS]` chain moves the center.
    pub(super) fn center_update_mode(&self) -> CenterUpdate {
        match self.ranks {
            Some(_) => CenterUpdate::Deferred,
            None => CenterUpdate::InChain,
        }
    }

    /// The reduce phase over ranks (nothing on one rank); see the module doc.
    pub(super) fn reduce_over_ranks(&mut self) -> Result<()> {
        let Some(r) = self.ranks.as_mut() else {
            return Ok(());
        };
        let gpu = &mut self.gpu;
        let stream = gpu.dev.stream();
        let inv = 1.0 / r.coll.world_size() as f32;
        let (n, k) = (self.n_params, self.center.len);
        let lb = &self.lb;

        // SAFETY: device buffers of this backend's device, alive as long as the backend; the
        // lengths are theirs.
        unsafe {
            r.coll
                .sum_f32(self.grads.addr, r.grad_sum.addr, n, stream)?;
        }
        gpu.fill(self.grads, 0.0)?;
        gpu.axpy(self.grads, r.grad_sum, inv, n)?;

        let slot = |i: usize| self.metrics.sub(i, 1);
        gpu.copy(r.stats.sub(0, k), lb.stat)?;
        gpu.copy(r.stats.sub(k, k), lb.mean_p)?;
        gpu.copy(r.stats.sub(2 * k, 1), slot(M_LOSS))?;
        gpu.copy(r.stats.sub(2 * k + 1, 1), slot(M_ROW_ENT))?;
        // SAFETY: as above.
        unsafe {
            r.coll
                .sum_f32(r.stats.addr, r.stats.addr, 2 * k + 2, stream)?;
        }
        let mean_into = |gpu: &mut crate::backend::cuda::device::Gpu<D>, dst: Buf<f32>, off| {
            gpu.fill(dst, 0.0)?;
            gpu.axpy(dst, r.stats.sub(off, dst.len), inv, dst.len)
        };
        mean_into(gpu, lb.stat, 0)?;
        mean_into(gpu, lb.mean_p, k)?;
        mean_into(gpu, slot(M_LOSS), 2 * k)?;
        mean_into(gpu, slot(M_ROW_ENT), 2 * k + 1)?;

        // The signals of the global batch mean, and the next center from the global statistic.
        row_entropy(gpu, slot(M_MEAN_ENT), lb.mean_p, 1, k)?;
        gpu.reduce_segments(lb.max_part, lb.mean_p, &lb.whole_k, RedOp::MaxAbs)?;
        gpu.reduce_final(
            slot(M_MAX_MASS),
            lb.max_part,
            lb.whole_k.parts(),
            1,
            RedOp::MaxAbs,
            1.0,
        )?;
        center_update(
            gpu,
            self.center,
            lb.stat,
            self.loss_cfg.center_momentum as f32,
            k,
        )
    }
}

impl<D: Device> GpuBackend<D> {
    /// KoLeo's gradient over the whole batch's views, this rank's rows of it added to `dx_s`
    /// (`weight` > 0, more than one rank); see the module doc.
    pub(super) fn add_koleo_over_ranks(&mut self, weight: f32) -> Result<()> {
        let Some(r) = self.ranks.as_mut() else {
            return Ok(());
        };
        let (b, d) = (self.shapes.batch, self.cx.d);
        let (rank, world) = (r.coll.rank(), r.coll.world_size());
        let n = 2 * b * d;
        let stream = self.gpu.dev.stream();
        // SAFETY: `x_s` holds at least 2B rows of d, `koleo_rows` world times that; both are
        // this backend's device buffers.
        unsafe {
            r.coll
                .all_gather_f32(self.x_s.addr, r.koleo_rows.addr, n, stream)?;
        }
        r.koleo_x.resize(world * n, 0.0);
        self.gpu.download(r.koleo_rows, &mut r.koleo_x)?;
        let k = &mut self.koleo;
        self.gpu.download(self.dx_s.sub(0, n), &mut k.dx)?;
        let rows = world * b;
        r.koleo_scratch
            .resize(dinovmf_core::koleo::koleo_scratch_len(rows, d), 0.0);
        for v in 0..2 {
            // The whole batch's view v, rank after rank; this rank's gradient rows in place.
            r.koleo_view.clear();
            for q in 0..world {
                let at = q * n + v * b * d;
                r.koleo_view.extend_from_slice(&r.koleo_x[at..at + b * d]);
            }
            r.koleo_dx.clear();
            r.koleo_dx.resize(rows * d, 0.0);
            let mine = rank * b * d..(rank + 1) * b * d;
            let local = v * b * d..(v + 1) * b * d;
            r.koleo_dx[mine.clone()].copy_from_slice(&k.dx[local.clone()]);
            dinovmf_core::koleo::koleo_forward_backward(
                &r.koleo_view,
                rows,
                d,
                &mut r.koleo_scratch,
                Some((&mut r.koleo_dx, weight * world as f32)),
            );
            k.dx[local].copy_from_slice(&r.koleo_dx[mine]);
        }
        self.gpu.upload(self.dx_s.sub(0, n), &k.dx)
    }
}
