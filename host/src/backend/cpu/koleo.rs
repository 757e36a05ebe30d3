//! The optional KoLeo-proto regulariser (`--koleo-proto LAMBDA`) on the student's prototypes:
//! `lambda * -(1/K) sum_k ln min_{j != k} ||mu_k - mu_j||`, its gradient added to the last
//! layer's `v` once the loss gradient there is complete (before reduction and clipping, so it
//! is clipped with the rest). The nearest neighbours come from one GEMM per row block; the
//! loss and gradient from `dinovmf_core::prototypes::koleo_proto`.
use dinovmf_core::logits::weight_norm_forward;
use dinovmf_core::prototypes::{koleo_proto, KoleoGrad};

use super::CpuBackend;
use rayon::prelude::*;

use super::gemm::{matmul, Op};

impl CpuBackend {
    /// Adds `weight * dKoLeo/dv` to the gradient buffer; returns the (unweighted) KoLeo value.
    pub(super) fn add_koleo_proto(&mut self, weight: f32) -> f32 {
        let cfg = self.cx.cfg;
        let lay = self.cx.lay;
        let (k, p) = (cfg.head.out_dim, cfg.head.bottleneck);
        let v = &self.student[lay.last_v..lay.last_v + k * p];
        let mut mu = vec![0.0f32; k * p];
        let mut r = vec![0.0f32; k];
        let mut vn = vec![0.0f32; k];
        weight_norm_forward(&mut mu, &mut r, &mut vn, v, None, k, p);
        let nn = nearest_prototypes(&mu, k, p);
        let mut dmu = vec![0.0f32; k * p];
        let dv = &mut self.grads[lay.last_v..lay.last_v + k * p];
        koleo_proto(
            &mu,
            &nn,
            k,
            p,
            Some(KoleoGrad {
                vnorm: &vn,
                dv,
                dmu: &mut dmu,
                weight,
            }),
        )
    }
}

/// Nearest other prototype of each unit row `mu[k, p]` (largest cosine), by GEMM in row blocks.
pub fn nearest_prototypes(mu: &[f32], k: usize, p: usize) -> Vec<usize> {
    const BLOCK: usize = 256;
    let mut nn = vec![0usize; k];
    let mut sims = vec![0.0f32; BLOCK * k];
    for (bi, (rows, out)) in mu.chunks(BLOCK * p).zip(nn.chunks_mut(BLOCK)).enumerate() {
        let m = rows.len() / p;
        matmul(m, k, p, rows, Op::N, mu, Op::T, &mut sims[..m * k], false);
        out.par_iter_mut()
            .zip(sims[..m * k].par_chunks(k))
            .enumerate()
            .for_each(|(r, (o, s))| {
                let me = bi * BLOCK + r;
                let mut best = usize::MAX;
                for (j, &v) in s.iter().enumerate() {
                    if j != me && (best == usize::MAX || v > s[best]) {
                        best = j;
                    }
                }
                *o = best;
            });
    }
    nn
}
