//! Sinkhorn-Knopp's kernels on a device against core's `sinkhorn` (in f64): the logits into a
//! poisoned buffer, one column round and one row round (plain and final) each on its own random
//! `ln Q`, and the host's whole chain (`Gpu::sinkhorn_targets`, 3 rounds) on random logits at a
//! teacher temperature's scale.
use anyhow::Result;

use dinovmf_core::sinkhorn::{
    sinkhorn_columns_inplace, sinkhorn_final_rows_inplace, sinkhorn_rows_inplace,
    sinkhorn_targets_inplace,
};

use super::sample::f64s;
use super::tolerance;
use super::V;
use crate::backend::cuda::device::Device;
use crate::backend::cuda::launch::sinkhorn::{sinkhorn_columns, sinkhorn_logits, sinkhorn_rows};

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
        v.gpu.sinkhorn_targets(p_t, dd, ds, db, 3, n, k)?;
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

        // A row round, then the final one, each on its own random ln Q.
        for last in [false, true] {
            let lq = v.rv(n * k, -20.0, 0.0);
            let dq = v.up(&lq)?;
            sinkhorn_rows(v.gpu, dq, n, k, last)?;
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
    }
    Ok(())
}
