//! Prototype diagnostics of a state (method.md, Evaluation): utilisation over a data pass, the
//! kappa distribution, unique prototypes, the teacher and student entropies, and the
//! KoLeo-proto value. The mathematics is in `dinovmf_core::prototypes`; this file runs the head
//! on [CLS] features and finds nearest prototypes with GEMMs.
//!
//! The assignment of an image is the argmax of the teacher's prototype logits (DINO: w_k . y /
//! tau, vMF: kappa_k mu_k . y + D_p(kappa_k)), without the running center: the clustering the
//! network itself represents, not the training-time target. The argmax of the centered target
//! (what the student is trained towards) is reported beside it: a teacher whose raw argmax falls
//! on a few prototypes while the centered targets spread is held apart by its center, which the
//! raw count alone would hide.
use anyhow::{ensure, Result};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use dinovmf_core::centering::teacher_targets_row;
use dinovmf_core::collapse::entropy;
use dinovmf_core::logits::{branch_terms_forward, weight_norm_forward};
use dinovmf_core::loss::LossConfig;
use dinovmf_core::model::{Layout, ModelConfig};
use dinovmf_core::ops::{gelu_forward, l2norm_row_inplace, softmax_in_place};
use dinovmf_core::prototypes::{
    argmax, kappas, koleo_proto, quartiles, unique_prototypes, utilisation, UNIQUE_EPS,
};

use crate::backend::cpu::gemm::{matmul, Op};
use crate::backend::cpu::koleo::nearest_prototypes;

use super::signals::{cluster_agreement, rankme, teacher_spread, ClusterAgreement};

/// Everything the diagnostics report.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ProtoDiag {
    /// K.
    pub prototypes: usize,
    /// Images in the data pass.
    pub images: u64,
    /// Prototypes that won the teacher argmax of at least one image.
    pub used: usize,
    /// Entropy (nats) of the marginal argmax assignment; ln K is uniform use.
    pub assign_entropy: f64,
    /// Prototypes that won the argmax of the centered teacher target (the training target).
    #[serde(default)]
    pub used_centered: usize,
    /// Entropy (nats) of the marginal argmax assignment of the centered target.
    #[serde(default)]
    pub assign_entropy_centered: f64,
    /// The teacher temperature kappa = |g| / tau is reported at.
    pub kappa_tau: f64,
    /// min, q1, median, q3, max of kappa.
    pub kappa: [f64; 5],
    /// Distinct prototype directions (angular threshold `unique_eps` radians).
    pub unique: usize,
    pub unique_eps: f64,
    /// Mean row entropy of the teacher's softmax at `kappa_tau` (no center) over the pass.
    pub teacher_entropy: f64,
    /// Mean row entropy of the student's softmax at its temperature over the pass.
    pub student_entropy: f64,
    /// KoLeo-proto of the teacher prototypes.
    pub koleo: f64,
    /// RankMe of the teacher's [CLS] features (not normalised) over the pass.
    #[serde(default)]
    pub rankme: f64,
    /// Entropy of the mean of the teacher's softmax rows (no center) over the pass; minus
    /// `teacher_entropy` it is the mean KL of a row to the mean (0: an input-independent teacher).
    #[serde(default)]
    pub teacher_mean_entropy: f64,
    /// NMI / purity of the teacher's argmax prototype against the labels (when labelled).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agreement: Option<ClusterAgreement>,
}

impl ProtoDiag {
    /// `teacher_mean_entropy - teacher_entropy`: the mean KL of the teacher's rows to their mean.
    pub fn kl_to_mean(&self) -> f64 {
        self.teacher_mean_entropy - self.teacher_entropy
    }
}

/// The head MLP up to the bottleneck: `z[n, p]` from `cls[n, d]`.
pub fn head_z(model: &ModelConfig, params: &[f32], cls: &[f32], n: usize) -> Vec<f32> {
    let lay = Layout::new(model);
    let nl = model.head.n_layers;
    let mut x = cls[..n * model.vit.dim].to_vec();
    for l in 0..nl {
        let hl = lay.head_layer(l);
        let mut y = vec![0.0f32; n * hl.d_out];
        let b = &params[hl.b..hl.b + hl.d_out];
        for r in y.chunks_exact_mut(hl.d_out) {
            r.copy_from_slice(b);
        }
        matmul(
            n,
            hl.d_out,
            hl.d_in,
            &x,
            Op::N,
            &params[hl.w..hl.w + hl.d_out * hl.d_in],
            Op::T,
            &mut y,
            true,
        );
        if l + 1 < nl {
            let mut a = vec![0.0f32; y.len()];
            gelu_forward(&mut a, &y);
            y = a;
        }
        x = y;
    }
    x
}

/// The unit prototype directions `mu[k, p]`, `||v_k||`, and the gains (`None` with
/// `norm_last_layer`).
pub fn prototype_directions(
    model: &ModelConfig,
    params: &[f32],
    norm_last_layer: bool,
) -> (Vec<f32>, Vec<f32>, Option<Vec<f32>>) {
    let lay = Layout::new(model);
    let (k, p) = (model.head.out_dim, model.head.bottleneck);
    let mut mu = vec![0.0f32; k * p];
    let mut r = vec![0.0f32; k];
    let mut vn = vec![0.0f32; k];
    let g = (!norm_last_layer).then(|| params[lay.last_g..lay.last_g + k].to_vec());
    weight_norm_forward(
        &mut mu,
        &mut r,
        &mut vn,
        &params[lay.last_v..lay.last_v + k * p],
        g.as_deref(),
        k,
        p,
    );
    (mu, vn, g)
}

/// Prototype logits `[n, k]` of the bottleneck outputs `z[n, p]` at temperature `tau`.
pub fn logits(
    model: &ModelConfig,
    loss: &LossConfig,
    params: &[f32],
    z: &[f32],
    n: usize,
    tau: f64,
) -> Vec<f32> {
    let (k, p) = (model.head.out_dim, model.head.bottleneck);
    let (mu, _, g) = prototype_directions(model, params, loss.norm_last_layer);
    let r = g.unwrap_or_else(|| vec![1.0; k]);
    let (mut scale, mut bias, mut db) = (vec![0.0f32; k], vec![0.0f32; k], vec![0.0f32; k]);
    branch_terms_forward(
        &mut scale,
        &mut bias,
        &mut db,
        &r,
        tau as f32,
        p,
        loss.kind,
        loss.approx,
    );
    let mut y = z[..n * p].to_vec();
    y.par_chunks_mut(p).for_each(|r| {
        l2norm_row_inplace(r, dinovmf_core::logits::NORMALIZE_EPS as f32);
    });
    let mut l = vec![0.0f32; n * k];
    matmul(n, k, p, &y, Op::N, &mu, Op::T, &mut l, false);
    l.par_chunks_mut(k).for_each(|row| {
        for ((x, s), b) in row.iter_mut().zip(&scale).zip(&bias) {
            *x = *x * s + b;
        }
    });
    l
}

/// Argmax prototype and softmax entropy of every logit row (`l` is left holding the softmax).
fn assign_and_entropy(l: &mut [f32], k: usize) -> (Vec<u32>, f64) {
    let rows: Vec<(u32, f64)> = l
        .par_chunks_mut(k)
        .map(|row| {
            let a = argmax(row) as u32;
            softmax_in_place(row);
            (a, entropy(row) as f64)
        })
        .collect();
    let n = rows.len().max(1) as f64;
    let h = rows.iter().map(|r| r.1).sum::<f64>() / n;
    (rows.into_iter().map(|r| r.0).collect(), h)
}

/// The diagnostics of the weight-only quantities (kappa, unique, KoLeo) plus a data pass given
/// as [CLS] features of the same images through the teacher (`cls_t`) and student (`cls_s`),
/// and, given the images' `labels`, the NMI / purity of the teacher's assignment.
#[allow(clippy::too_many_arguments)]
pub fn diagnose(
    model: &ModelConfig,
    loss: &LossConfig,
    teacher: &[f32],
    student: &[f32],
    cls_t: &[f32],
    cls_s: &[f32],
    n: usize,
    teacher_temp: f64,
    center: &[f32],
    labels: Option<&[u32]>,
) -> Result<ProtoDiag> {
    let (k, p) = (model.head.out_dim, model.head.bottleneck);
    ensure!(k >= 2, "prototype diagnostics need at least 2 prototypes");
    ensure!(n > 0, "prototype diagnostics need at least one image");
    let d = model.vit.dim;
    ensure!(
        cls_t.len() == n * d && cls_s.len() == n * d,
        "features hold {} / {} values, expected {n} x {d}",
        cls_t.len(),
        cls_s.len()
    );
    let (mu, _, g) = prototype_directions(model, teacher, loss.norm_last_layer);
    let mut kap = vec![0.0f64; k];
    let g64: Option<Vec<f64>> = g.as_ref().map(|g| g.iter().map(|&x| x as f64).collect());
    kappas(g64.as_deref(), teacher_temp, &mut kap);
    let kappa = quartiles(&mut kap).unwrap_or([f64::NAN; 5]);
    let unique = unique_prototypes(&mu, k, p, UNIQUE_EPS);
    let nn = nearest_prototypes(&mu, k, p);
    let koleo = koleo_proto::<f32>(&mu, &nn, k, p, None) as f64;

    let zt = head_z(model, teacher, cls_t, n);
    let mut lt = logits(model, loss, teacher, &zt, n, teacher_temp);
    ensure!(
        center.len() == k,
        "the center holds {} values, expected K = {k}",
        center.len()
    );
    let centered: Vec<u32> = lt
        .par_chunks(k)
        .map(|row| {
            let (mut p_t, mut stat) = (vec![0.0f32; k], vec![0.0f32; k]);
            teacher_targets_row(
                &mut p_t,
                &mut stat,
                row,
                center,
                teacher_temp as f32,
                loss.centering,
                0.0,
            );
            argmax(&p_t) as u32
        })
        .collect();
    let (assign, teacher_entropy) = assign_and_entropy(&mut lt, k);
    let spread = teacher_spread(&lt, n, k);
    let rankme = rankme(cls_t, n, d)?;
    let agreement = match labels {
        Some(y) => Some(cluster_agreement(&assign, &y[..n.min(y.len())])?),
        None => None,
    };
    let zs = head_z(model, student, cls_s, n);
    let mut ls = logits(model, loss, student, &zs, n, loss.student_temp);
    let (_, student_entropy) = assign_and_entropy(&mut ls, k);
    let mut counts = vec![0u64; k];
    for a in assign {
        counts[a as usize] += 1;
    }
    let u = utilisation(&counts);
    counts.fill(0);
    for a in centered {
        counts[a as usize] += 1;
    }
    let uc = utilisation(&counts);
    Ok(ProtoDiag {
        prototypes: k,
        images: u.total,
        used: u.used,
        assign_entropy: u.entropy,
        used_centered: uc.used,
        assign_entropy_centered: uc.entropy,
        kappa_tau: teacher_temp,
        kappa,
        unique,
        unique_eps: UNIQUE_EPS,
        teacher_entropy,
        student_entropy,
        koleo,
        rankme,
        teacher_mean_entropy: spread.mean_entropy,
        agreement,
    })
}

/// kappa_k = |g_k| / tau of every prototype of `params` (all 1 / tau with `norm_last_layer`).
pub fn kappa_values(model: &ModelConfig, params: &[f32], tau: f64) -> Vec<f64> {
    let lay = Layout::new(model);
    let k = model.head.out_dim;
    let g: Option<Vec<f64>> = (!model.head.norm_last_layer).then(|| {
        params[lay.last_g..lay.last_g + k]
            .iter()
            .map(|&x| x as f64)
            .collect()
    });
    let mut out = vec![0.0f64; k];
    kappas(g.as_deref(), tau, &mut out);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use dinovmf_core::prototypes::nearest_neighbours;

    #[test]
    fn gemm_nearest_matches_core_reference() {
        let (k, p) = (300, 7);
        let mut v: Vec<f32> = (0..k * p)
            .map(|i| ((i * 7919 % 1013) as f32 / 1013.0 - 0.5) * (1.0 + (i % 5) as f32))
            .collect();
        for r in v.chunks_mut(p) {
            l2norm_row_inplace(r, 1e-12);
        }
        let mut want = vec![0; k];
        nearest_neighbours(&v, k, p, &mut want);
        assert_eq!(nearest_prototypes(&v, k, p), want);
    }
}
