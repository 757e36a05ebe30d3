//! The optional KoLeo-proto regulariser (`--koleo-proto LAMBDA`) on the student's prototypes:
//! `lambda * -(1/K) sum_k ln min_{j != k} ||mu_k - mu_j||`, its gradient added to the last
//! layer's `v` once the loss gradient there is complete (before reduction and clipping, so it
//! is clipped with the rest). The nearest neighbours come from one GEMM per row block; the
//! loss and gradient from `dinovmf_core::prototypes::koleo_proto`.
use dinovmf_core::logits::weight_norm_forward;
use dinovmf_core::prototypes::{koleo_proto, KoleoGrad};

use super::CpuBackend;
use crate::eval::prototypes::nearest_prototypes;

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
