//! The `[CLS]` loss chain as the backend runs it (`cuda/loss.rs`, the same function) against
//! `core::loss::multicrop_loss_forward_backward` in f64: loss, `dL/dz_s`, `dL/dv_s`, `dL/dg_s`,
//! the collapse signals and the moved center, for DINO and DINO-vMF, both Bessel
//! approximations, every centering, fixed and learned radii, sizes below and above the 64-wide
//! logits tile and the 256-wide column block.
use anyhow::Result;

use dinovmf_core::centering::Centering;
use dinovmf_core::logits::VmfReal;
use dinovmf_core::loss::{
    multicrop_loss_forward_backward, scratch_len, LossConfig, LossDims, LossGrads, LossInputs,
    Stored,
};
use dinovmf_core::vmf::BesselApprox;

use super::sample::f64s;
use super::tolerance;
use super::V;
use crate::backend::cuda::device::Device;
use crate::backend::cuda::loss::{
    cls_loss_forward_backward, ClsLoss, ClsMetrics, LossBufs, Prototypes,
};

const DIMS: [LossDims; 3] = [
    LossDims {
        n_crops: 2,
        batch: 1,
        k: 7,
        p: 5,
    },
    LossDims {
        n_crops: 4,
        batch: 3,
        k: 200,
        p: 24,
    },
    LossDims {
        n_crops: 3,
        batch: 5,
        k: 600,
        p: 40,
    },
];

/// The configurations and sizes checked.
fn cases() -> Vec<(LossConfig, LossDims)> {
    let mut out = Vec::new();
    for d in DIMS {
        out.push((LossConfig::dino(), d));
    }
    for (i, d) in DIMS.into_iter().enumerate() {
        let mut cfg = LossConfig::vmf();
        cfg.approx = if i == 1 {
            BesselApprox::LargeNu
        } else {
            BesselApprox::Uniform
        };
        out.push((cfg, d));
    }
    let vmf_logit = LossConfig {
        centering: Centering::Logit,
        ..LossConfig::vmf()
    };
    out.push((vmf_logit, DIMS[1]));
    let dino_learned = LossConfig {
        norm_last_layer: false,
        centering: Centering::Probability,
        ..LossConfig::dino()
    };
    out.push((dino_learned, DIMS[2]));
    let vmf_sinkhorn = LossConfig {
        centering: Centering::Sinkhorn { iters: 3 },
        ..LossConfig::vmf()
    };
    out.push((vmf_sinkhorn, DIMS[1]));
    out
}

pub(super) fn small<D: Device>(v: &mut V<'_, D>) {
    v.case("cls loss chain", cls_loss_chain);
}

fn cls_loss_chain<D: Device>(v: &mut V<'_, D>) -> Result<()> {
    for (cfg, dims) in cases() {
        one(v, &cfg, dims)?;
    }
    Ok(())
}

fn one<D: Device>(v: &mut V<'_, D>, cfg: &LossConfig, dims: LossDims) -> Result<()> {
    let LossDims {
        n_crops,
        batch,
        k,
        p,
    } = dims;
    let (ns, nt) = (n_crops * batch, 2 * batch);
    let z_s = v.rv(ns * p, -1.0, 1.0);
    let z_t = v.rv(nt * p, -1.0, 1.0);
    let v_s = v.rv(k * p, -1.0, 1.0);
    let v_t = v.rv(k * p, -1.0, 1.0);
    let g_s = v.rv(k, 0.3, 1.5);
    let g_t = v.rv(k, 0.3, 1.5);
    let center0 = match cfg.centering {
        Centering::Logit => v.rv(k, -0.2, 0.2),
        Centering::Probability | Centering::Sinkhorn { .. } => {
            v.rv(k, 0.2 / k as f32, 2.0 / k as f32)
        }
    };
    // dL/dg is added to what the gradient buffer holds (the step zeroes it first).
    let dg0 = v.rv(k, -1e-3, 1e-3);

    let lb = LossBufs::new(v.gpu, dims)?;
    let io = ClsLoss {
        z_t: v.up(&z_t)?,
        z_s: v.up(&z_s)?,
        teacher: Prototypes {
            v: v.up(&v_t)?,
            g: v.up(&g_t)?,
        },
        student: Prototypes {
            v: v.up(&v_s)?,
            g: v.up(&g_s)?,
        },
        center: v.up(&center0)?,
        grad: Prototypes {
            v: v.out(k * p)?,
            g: v.up(&dg0)?,
        },
        metrics: ClsMetrics {
            loss: v.out(1)?,
            teacher_entropy: v.out(1)?,
            mean_entropy: v.out(1)?,
            max_mass: v.out(1)?,
        },
    };
    let tau_t = cfg.teacher_temp as f32;
    cls_loss_forward_backward(v.gpu, cfg, dims, tau_t, &io, &lb)?;

    // Core in f64 computes the exact Bessel terms and ignores `approx`; its f32 path applies the
    // approximation the kernels use. The uniform one agrees with the exact terms within these
    // tolerances, the large-order one (about 1e-3 off at p = 24) only with itself: LargeNu
    // cases take core's f32 path as the reference.
    let inputs = [&z_s, &z_t, &v_s, &g_s, &v_t, &g_t, &center0];
    let want = match cfg.approx {
        BesselApprox::LargeNu => reference::<f32>(cfg, dims, inputs)?,
        BesselApprox::Uniform => reference::<f64>(cfg, dims, inputs)?,
    };
    let Reference {
        metrics: wanted,
        dz,
        dv,
        dg,
        center,
    } = want;

    let name = "cls_loss_chain";
    let reference = match cfg.approx {
        BesselApprox::LargeNu => "core f32",
        BesselApprox::Uniform => "core f64",
    };
    let tag = format!(
        "{:?} {:?} {:?} norm_last={} crops{n_crops} B{batch} k{k} p{p} vs {reference}",
        cfg.kind, cfg.approx, cfg.centering, cfg.norm_last_layer
    );
    let m = io.metrics;
    let got = [
        v.get(m.loss)?[0],
        v.get(m.teacher_entropy)?[0],
        v.get(m.mean_entropy)?[0],
        v.get(m.max_mass)?[0],
    ];
    v.check(
        name,
        format!("{tag} loss, entropies, max mass"),
        &got,
        &wanted,
        tolerance::LOSS_SCALARS,
    );
    // Gradients: relative to the largest entry (rows mix many terms of both signs).
    let got = v.get(lb.dz.sub(0, ns * p))?;
    v.check(
        name,
        format!("{tag} dz_s"),
        &got,
        &dz,
        tolerance::of_largest(1e-4, 1e-4, &dz),
    );
    let got = v.get(io.grad.v)?;
    v.check(
        name,
        format!("{tag} dv_s"),
        &got,
        &dv,
        tolerance::of_largest(1e-4, 1e-4, &dv),
    );
    let got = v.get(io.grad.g)?;
    let want_g: Vec<f64> = if cfg.norm_last_layer {
        // Fixed radii: the buffer is left as it was.
        f64s(&dg0)
    } else {
        dg.iter().zip(&dg0).map(|(&a, &b)| a + b as f64).collect()
    };
    v.check(
        name,
        format!("{tag} dg_s (added)"),
        &got,
        &want_g,
        tolerance::of_largest(1e-4, 1e-4, &dg),
    );
    // The center: relative, with a floor at 1e-6 of its largest entry (logit centers are sums
    // of both signs, some entries land near zero).
    let got = v.get(io.center)?;
    v.check(
        name,
        format!("{tag} center"),
        &got,
        &center,
        tolerance::of_largest(1e-5, 1e-6, &center),
    );
    Ok(())
}

/// What core's loss returns for one case, widened to f64.
struct Reference {
    /// The loss, the mean teacher row entropy, the entropy of the mean row, its largest mass.
    metrics: [f64; 4],
    dz: Vec<f64>,
    dv: Vec<f64>,
    dg: Vec<f64>,
    center: Vec<f64>,
}

/// Core's `[CLS]` loss on `[z_s, z_t, v_s, g_s, v_t, g_t, center]` computed in `T`.
fn reference<T: VmfReal + Stored<T>>(
    cfg: &LossConfig,
    dims: LossDims,
    [z_s, z_t, v_s, g_s, v_t, g_t, center0]: [&Vec<f32>; 7],
) -> Result<Reference> {
    let wide = |x: &[f32]| -> Vec<T> { x.iter().map(|&a| T::from_f64(a as f64)).collect() };
    let back = |x: &[T]| -> Vec<f64> { x.iter().map(|a| a.to_f64()).collect() };
    let LossDims {
        n_crops,
        batch,
        k,
        p,
    } = dims;
    let zero = T::from_f64(0.0);
    let (mut dz, mut dv, mut dg) = (
        vec![zero; n_crops * batch * p],
        vec![zero; k * p],
        vec![zero; k],
    );
    let mut center = wide(center0);
    let mut scratch = vec![zero; scratch_len(dims)];
    let (z_s, z_t, v_s, g_s, v_t, g_t) = (
        wide(z_s),
        wide(z_t),
        wide(v_s),
        wide(g_s),
        wide(v_t),
        wide(g_t),
    );
    let out = multicrop_loss_forward_backward(
        cfg,
        dims,
        LossInputs {
            z_s: &z_s,
            z_t: &z_t,
            v_s: &v_s,
            g_s: &g_s,
            v_t: &v_t,
            g_t: &g_t,
        },
        LossGrads {
            dz_s: &mut dz,
            dv_s: &mut dv,
            dg_s: &mut dg,
        },
        &mut center,
        &mut scratch,
    )
    .map_err(|e| anyhow::anyhow!("core's loss refused the case: {e:?}"))?;
    let c = out.collapse;
    Ok(Reference {
        metrics: [
            out.loss,
            c.mean_row_entropy,
            c.entropy_of_mean,
            c.max_mean_mass,
        ]
        .map(|x| x.to_f64()),
        dz: back(&dz),
        dv: back(&dv),
        dg: back(&dg),
        center: back(&center),
    })
}
