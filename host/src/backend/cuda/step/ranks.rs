//! The CUDA backend as one rank of a data-parallel run: its reduce phase on device buffers
//! through a [`DeviceCollective`] (NCCL), as the CPU backend's `reduce()` does on the host.
//!
//! With more than one rank the loss chains run on a [`BatchScope::Shard`]: the `[CLS]` center
//! and iBOT's patch center stay where they are, and Sinkhorn-Knopp (`--centering sinkhorn`, for
//! the `[CLS]` and the patch teacher) takes each round's column maxima and sums over every
//! rank's rows (a max and a sum all-reduce of `K` floats per round, between the launches) and
//! scales the rows by the whole batch's row count. The reduce phase then takes the mean over
//! ranks of the gradients and of the batch statistics (the center's statistic `[K]`, the
//! batch-mean teacher distribution `[K]`, the loss and the mean row entropy; with iBOT also the
//! patch center's statistic `[K]`, the patch loss and the patch teachers' mean entropy; equal
//! shards, so the mean of the shard means is the global batch mean), and computes the entropy
//! of the mean, its largest mass and the next centers from the global values, as one process
//! would. Clipping, AdamW and the EMA then run identically on every rank.
//!
//! iBOT's masks are drawn for the whole batch and each rank takes its images' rows
//! (`StepMasks::draw_shard`); the patch loss weighs each masked row by `1 / (2 b count)` with
//! the local batch `b` and the image's own masked count, so the mean over ranks is the whole
//! batch's loss and gradient.
//!
//! KoLeo on features (`--koleo`): per global view, every rank all-gathers the view's student
//! `[CLS]` rows over NCCL (rank order = the whole batch's row order), computes the whole
//! batch's KoLeo gradient on the host (core's one formula, as on one rank) and keeps its own
//! rows, weighted by the rank count (the reduce phase's mean divides it again), as the CPU
//! backend does.
use anyhow::Result;

use dinovmf_ptx::kernels::reduce::RedOp;

use super::{GpuBackend, M_LOSS, M_MAX_MASS, M_MEAN_ENT, M_MIM, M_PATCH_ENT, M_ROW_ENT};
use crate::backend::cuda::device::{Buf, Device, Gpu};
use crate::backend::cuda::launch::head::{center_update, row_entropy};
use crate::backend::cuda::ranks::{BatchScope, DeviceCollective, RankShard};

/// A rank's collective and the device buffers of its reduce phase.
pub(super) struct RankBufs {
    pub coll: Box<dyn DeviceCollective>,
    /// The sum over ranks of the gradients (then scaled into `grads`).
    grad_sum: Buf<f32>,
    /// `[stat K | mean_p K | loss | row entropy]`, with iBOT then `[patch stat K | L_mim |
    /// patch entropy]`, summed in place.
    stats: Buf<f32>,
    /// Sinkhorn-Knopp's column maxima and sums over ranks `[K]` each.
    col_max: Buf<f32>,
    col_sum: Buf<f32>,
    /// KoLeo: every rank's global-view `[CLS]` rows `[ranks][2][b][d]`, and host scratch.
    koleo_rows: Buf<f32>,
    koleo_x: Vec<f32>,
    koleo_view: Vec<f32>,
    koleo_dx: Vec<f32>,
    koleo_scratch: Vec<f32>,
}

impl RankBufs {
    /// The loss chains' view of this rank: a shard of the batch, with Sinkhorn's scratch.
    pub(super) fn scope(&mut self) -> BatchScope<'_> {
        BatchScope::Shard(RankShard {
            coll: self.coll.as_mut(),
            col_max: self.col_max,
            col_sum: self.col_sum,
        })
    }
}

impl<D: Device> GpuBackend<D> {
    /// This backend as rank `coll.rank()` of `coll.world_size()`: its shapes are the rank's
    /// shard of the batch. One rank changes nothing. Any centering and iBOT (before or after
    /// [`GpuBackend::with_ibot`]) run over ranks; see the module doc.
    pub fn with_device_ranks(mut self, coll: Box<dyn DeviceCollective>) -> Result<Self> {
        let world = coll.world_size();
        if world == 1 {
            return Ok(self);
        }
        let k = self.center.len;
        let grad_sum = self.gpu.alloc(self.n_params)?;
        let stats = self.gpu.alloc(3 * k + 4)?;
        let (col_max, col_sum) = (self.gpu.alloc(k)?, self.gpu.alloc(k)?);
        let koleo_rows = self.gpu.alloc(world * 2 * self.shapes.batch * self.cx.d)?;
        self.ranks = Some(RankBufs {
            coll,
            grad_sum,
            stats,
            col_max,
            col_sum,
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
        let patch = self.ibot.as_ref().map(|ib| ib.center_and_stat());
        // `(statistic, its offset in stats)`, packed in the order of the module doc.
        let cls = [
            (lb.stat, 0),
            (lb.mean_p, k),
            (slot(M_LOSS), 2 * k),
            (slot(M_ROW_ENT), 2 * k + 1),
        ];
        let mim = patch.map(|(_, patch_stat)| {
            [
                (patch_stat, 2 * k + 2),
                (slot(M_MIM), 3 * k + 2),
                (slot(M_PATCH_ENT), 3 * k + 3),
            ]
        });
        // No allocation in the step: the parts are two fixed arrays, the second optional.
        let parts = || cls.iter().chain(mim.iter().flatten());
        let len = parts().map(|&(b, at)| at + b.len).max().unwrap_or(0);
        for &(src, at) in parts() {
            gpu.copy(r.stats.sub(at, src.len), src)?;
        }
        // SAFETY: as above.
        unsafe {
            r.coll.sum_f32(r.stats.addr, r.stats.addr, len, stream)?;
        }
        let mean_into = |gpu: &mut Gpu<D>, dst: Buf<f32>, off| {
            gpu.fill(dst, 0.0)?;
            gpu.axpy(dst, r.stats.sub(off, dst.len), inv, dst.len)
        };
        for &(dst, at) in parts() {
            mean_into(gpu, dst, at)?;
        }
        if let (Some((patch_center, patch_stat)), Some(ib)) = (patch, self.ibot.as_ref()) {
            let momentum = ib.cfg.patch_center_momentum as f32;
            center_update(gpu, patch_center, patch_stat, momentum, k)?;
        }

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
