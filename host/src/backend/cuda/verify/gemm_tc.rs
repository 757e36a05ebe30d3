//! The tensor-core GEMMs `gemm_tc_{nn,nt,tn}_bf16`: bf16 operands (random f32 rounded to
//! bf16, passed as their `u16` bits), f32 `C`, against f64 on the same bf16 values at the
//! f32 GEMM's shapes (ragged, odd leading dimensions). Only the f32 accumulation differs from
//! the reference (tensor cores add with their own rounding), with the f32 GEMM's tolerance (`tolerance::dot`).
use anyhow::Result;
use dinovmf_ptx::elem::Bf16;

use super::gemm::{layouts, ref_gemm, SHAPES};
use super::tolerance;
use super::V;
use crate::backend::cuda::device::{Arg, Device};
use crate::backend::cuda::ops::Gemm;

fn to_bf16(x: &[f32]) -> (Vec<u16>, Vec<f64>) {
    x.iter()
        .map(|&v| {
            let b = Bf16::from_f32(v);
            (b.0, b.to_f32() as f64)
        })
        .unzip()
}

pub(super) fn small<D: Device>(v: &mut V<'_, D>) {
    v.case("gemm tensor cores bf16", gemm_tc);
}

fn gemm_tc<D: Device>(v: &mut V<'_, D>) -> Result<()> {
    for (ta, tb, tag) in layouts() {
        let name = format!("gemm_tc_{tag}_bf16");
        for (m, n, k) in SHAPES {
            let g = Gemm::plain(ta, tb, m, n, k).alpha(0.75);
            let (a, a64) = to_bf16(&v.rv(m * k, -1.0, 1.0));
            let (b, b64) = to_bf16(&v.rv(k * n, -1.0, 1.0));
            let bias = v.rv(n, -1.0, 1.0);
            let want = ref_gemm(&a64, &b64, &g, (0, 0));
            let (da, db, dbias) = (v.up(&a)?, v.up(&b)?, v.up(&bias)?);
            // beta 0 with bias into a poisoned C.
            let c = v.out(m * n)?;
            let args = g.args(
                c.into(),
                da.into(),
                db.into(),
                dbias.into(),
                (da.len, db.len, c.len),
            );
            v.gpu.launch_with(&name, &args, &[("outer", 1)])?;
            let got = v.get(c)?;
            let w: Vec<f64> = (0..m * n).map(|i| want[i] + bias[i % n] as f64).collect();
            v.check(
                &name,
                format!("{m}x{n}x{k} beta 0 +bias"),
                &got,
                &w,
                tolerance::dot(k),
            );
            // beta 1 accumulates.
            let c0 = v.rv(m * n, -1.0, 1.0);
            let c = v.up(&c0)?;
            let g1 = g.beta(1.0);
            let args = g1.args(
                c.into(),
                da.into(),
                db.into(),
                Arg::Null,
                (da.len, db.len, c.len),
            );
            v.gpu.launch_with(&name, &args, &[("outer", 1)])?;
            let got = v.get(c)?;
            let w: Vec<f64> = (0..m * n).map(|i| want[i] + c0[i] as f64).collect();
            v.check(
                &name,
                format!("{m}x{n}x{k} beta 1"),
                &got,
                &w,
                tolerance::dot(k),
            );
        }
    }
    Ok(())
}
