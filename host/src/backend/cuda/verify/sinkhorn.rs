//! Sinkhorn-Knopp's kernels on a device against core's `sinkhorn` (in f64): the logits into a
//! poisoned buffer, one column round and one row round (plain and final, and one of a larger
//! batch than the rows here) each on its own random `ln Q`, the three pieces of a column round
//! over ranks (column maxima, column sums, scaling), and the host's whole chain
//! (`Gpu::sinkhorn_targets`, 3 rounds) on random logits at a teacher temperature's scale, with
//! the fused column rounds and with the split ones (over one rank: the collectives are the
//! identity).
use anyhow::{ensure, Result};

use dinovmf_core::sinkhorn::{
    sinkhorn_column_max as column_max_ref, sinkhorn_column_scale as column_scale_ref,
    sinkhorn_column_sums as column_sums_ref, sinkhorn_columns_inplace, sinkhorn_final_rows_inplace,
    sinkhorn_rows_inplace, sinkhorn_rows_of_batch, sinkhorn_targets_inplace,
};

use super::sample::f64s;
use super::tolerance;
use super::V;
use crate::backend::cuda::device::Device;
use crate::backend::cuda::launch::sinkhorn::{
    sinkhorn_column_max, sinkhorn_column_scale, sinkhorn_column_sums, sinkhorn_columns,
    sinkhorn_logits, sinkhorn_rows,
};
use crate::backend::cuda::ranks::{BatchScope, DeviceCollective, RankShard};

/// A run of one rank: every collective is the identity (in place only).
struct SoleRank;

impl DeviceCollective for SoleRank {
    fn rank(&self) -> usize {
        0
    }
    fn world_size(&self) -> usize {
        1
    }
    unsafe fn sum_f32(&mut self, send: u64, recv: u64, _: usize, _: u64) -> Result<()> {
        ensure!(send == recv, "the one-rank stand-in reduces in place only");
        Ok(())
    }
    unsafe fn max_f32(&mut self, send: u64, recv: u64, _: usize, _: u64) -> Result<()> {
        ensure!(send == recv, "the one-rank stand-in reduces in place only");
        Ok(())
    }
    unsafe fn all_gather_f32(&mut self, send: u64, recv: u64, _: usize, _: u64) -> Result<()> {
        ensure!(send == recv, "the one-rank stand-in gathers in place only");
        Ok(())
    }
    fn traffic(&self) -> (u64, f64) {
        (0, 0.0)
    }
}

pub(super) fn small<D: Device>(v: &mut V<'_, D>) {
    v.case("sinkhorn", sinkhorn);
}

fn sinkhorn<D: Device>(v: &mut V<'_, D>) -> Result<()> {
    for (n, k) in [(2, 1), (4, 255), (6, 300), (3, 1030), (128, 64)] {
        let size = format!("n{n} k{k}");
        // Logits: scale up to 1 / 0.02, as the teacher's.
        let dots = v.rv(n * k, -1.0, 1.0);
        let scale = v.rv(k, 1.0, 50.0);
        let bias = v.rv(k, -1.0, 1.0);
        let (dd, ds, db) = (v.up(&dots)?, v.up(&scale)?, v.up(&bias)?);
        let q = v.out(n * k)?;
        sinkhorn_logits(v.gpu, q, dd, ds, db, n, k)?;
        let got = v.get(q)?;
        let logits: Vec<f64> = (0..n * k)
            .map(|i| scale[i % k] as f64 * dots[i] as f64 + bias[i % k] as f64)
            .collect();
        v.check(
            "sinkhorn_logits",
            size.clone(),
            &got,
            &logits,
            tolerance::SINKHORN_LOGITS,
        );

        // The whole chain on those logits, against core's f64 procedure.
        let p_t = v.out(n * k)?;
        v.gpu
            .sinkhorn_targets(p_t, dd, ds, db, 3, (n, k), &mut BatchScope::Whole)?;
        let got = v.get(p_t)?;
        let mut want = logits.clone();
        let (mut cm, mut cs) = (vec![0.0f64; k], vec![0.0f64; k]);
        sinkhorn_targets_inplace(&mut want, &mut cm, &mut cs, n, k, 3);
        v.check(
            "sinkhorn_targets (3 rounds)",
            size.clone(),
            &got,
            &want,
            tolerance::sinkhorn_targets(3),
        );
        // The same chain with its column rounds in three pieces, as over ranks.
        let p_t = v.out(n * k)?;
        let mut split = BatchScope::Shard(RankShard {
            coll: &mut SoleRank,
            col_max: v.out(k)?,
            col_sum: v.out(k)?,
        });
        v.gpu
            .sinkhorn_targets(p_t, dd, ds, db, 3, (n, k), &mut split)?;
        let got = v.get(p_t)?;
        v.check(
            "sinkhorn_targets (3 split rounds)",
            size.clone(),
            &got,
            &want,
            tolerance::sinkhorn_targets(3),
        );

        // A split column round's pieces on a random ln Q: the maxima, the sums under them,
        // the scaling by both.
        let lq = v.rv(n * k, -20.0, 0.0);
        let dq = v.up(&lq)?;
        let col_max = v.out(k)?;
        sinkhorn_column_max(v.gpu, col_max, dq, n, k)?;
        let got_max = v.get(col_max)?;
        let want_q = f64s(&lq);
        column_max_ref(&want_q, &mut cm, n, k);
        v.check(
            "sinkhorn_column_max",
            size.clone(),
            &got_max,
            &cm,
            tolerance::EXACT,
        );
        let col_sum = v.out(k)?;
        sinkhorn_column_sums(v.gpu, col_sum, dq, col_max, n, k)?;
        let got_sum = v.get(col_sum)?;
        column_sums_ref(&want_q, &f64s(&got_max), &mut cs, n, k);
        v.check(
            "sinkhorn_column_sums",
            size.clone(),
            &got_sum,
            &cs,
            tolerance::column_sum(n),
        );
        sinkhorn_column_scale(v.gpu, dq, col_max, col_sum, n, k)?;
        let got = v.get(dq)?;
        let mut want = want_q.clone();
        let (mut m64, s64) = (f64s(&got_max), f64s(&got_sum));
        column_scale_ref(&mut want, &mut m64, &s64, n, k);
        v.check(
            "sinkhorn_column_scale",
            size.clone(),
            &got,
            &want,
            tolerance::SINKHORN_COLUMNS,
        );

        // One column round on a random ln Q.
        let lq = v.rv(n * k, -20.0, 0.0);
        let dq = v.up(&lq)?;
        sinkhorn_columns(v.gpu, dq, n, k)?;
        let got = v.get(dq)?;
        let mut want = f64s(&lq);
        sinkhorn_columns_inplace(&mut want, &mut cm, &mut cs, n, k);
        v.check(
            "sinkhorn_columns",
            size.clone(),
            &got,
            &want,
            tolerance::SINKHORN_COLUMNS,
        );

        // A row round, then the final one, each on its own random ln Q; then a row round of
        // these rows as a third of a larger batch (over ranks).
        for last in [false, true] {
            let lq = v.rv(n * k, -20.0, 0.0);
            let dq = v.up(&lq)?;
            sinkhorn_rows(v.gpu, dq, n, n, k, last)?;
            let got = v.get(dq)?;
            let mut want = f64s(&lq);
            if last {
                sinkhorn_final_rows_inplace(&mut want, n, k);
            } else {
                sinkhorn_rows_inplace(&mut want, n, k);
            }
            let what = format!("{size} last={last}");
            v.check("sinkhorn_rows", what, &got, &want, tolerance::SINKHORN_ROWS);
        }
        let lq = v.rv(n * k, -20.0, 0.0);
        let dq = v.up(&lq)?;
        sinkhorn_rows(v.gpu, dq, n, 3 * n, k, false)?;
        let got = v.get(dq)?;
        let mut want = f64s(&lq);
        sinkhorn_rows_of_batch(&mut want, n, 3 * n, k);
        let what = format!("{size} of {} rows", 3 * n);
        v.check("sinkhorn_rows", what, &got, &want, tolerance::SINKHORN_ROWS);
    }
    Ok(())
}
