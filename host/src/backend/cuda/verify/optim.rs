//! The optimiser's kernels against core's per-element functions: AdamW (with and without
//! weight decay, early and late steps) and the teacher's EMA, exact.
use anyhow::Result;

use dinovmf_core::optim::{adamw_step, ema_update, AdamW};

use super::sample::f64s;
use super::tolerance::EXACT;
use super::V;
use crate::backend::cuda::device::Device;
use crate::backend::cuda::launch::optim::{adamw, ema, AdamwBufs};

pub(super) fn small<D: Device>(v: &mut V<'_, D>) {
    v.case("optimiser", optimiser);
}

fn optimiser<D: Device>(v: &mut V<'_, D>) -> Result<()> {
    let hp = AdamW::default();
    for n in [1, 300, 1025] {
        for (step, wd) in [(1u64, 0.04), (17, 0.0), (5000, 0.4)] {
            let p = v.rv(n, -1.0, 1.0);
            let g = v.rv(n, -1.0, 1.0);
            let m = v.rv(n, -0.1, 0.1);
            let vv = v.rv(n, 0.001, 0.1);
            let (dp, dg, dm, dv) = (v.up(&p)?, v.up(&g)?, v.up(&m)?, v.up(&vv)?);
            let bufs = AdamwBufs {
                param: dp,
                grad: dg,
                m: dm,
                v: dv,
            };
            adamw(v.gpu, bufs, n, &hp, (5e-4, wd, step))?;
            let (mut wp, mut wm, mut wv) = (p.clone(), m.clone(), vv.clone());
            adamw_step(&mut wp, &g, &mut wm, &mut wv, &hp, 5e-4, wd, step);
            let mut got = v.get(dp)?;
            got.extend(v.get(dm)?);
            got.extend(v.get(dv)?);
            let mut want = f64s(&wp);
            want.extend(f64s(&wm));
            want.extend(f64s(&wv));
            v.check(
                "adamw",
                format!("n {n} step {step} wd {wd}"),
                &got,
                &want,
                EXACT,
            );
        }
        let t = v.rv(n, -1.0, 1.0);
        let s = v.rv(n, -1.0, 1.0);
        let (dt, ds) = (v.up(&t)?, v.up(&s)?);
        ema(v.gpu, dt, ds, n, 0.996)?;
        let got = v.get(dt)?;
        let mut w = t.clone();
        ema_update(&mut w, &s, 0.996);
        v.check("ema", format!("n {n}"), &got, &f64s(&w), EXACT);
    }
    Ok(())
}
