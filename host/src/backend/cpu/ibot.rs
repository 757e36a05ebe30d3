//! iBOT's buffers and patch center on the CPU backend (the step's order is `backend/step.rs`'s,
//! its passes `passes.rs`).
//!
//! Row layouts of the head: the teacher's input is the `[CLS]` rows of the two global crops
//! (`2B`) followed by every patch row (`2B * np`, image-major); the student's is the `[CLS]`
//! rows of every crop (as DINO) followed by the masked patch rows only (`M`, in row order), as
//! only those enter the loss.
use anyhow::{ensure, Result};

use dinovmf_core::mim_loss::IbotConfig;

use super::head::{self, HeadBufs};
use super::mim::MimBufs;
use super::{rows, CpuBackend, StepMasks};

/// iBOT's buffers and state on the CPU backend.
pub struct IbotCpu {
    pub cfg: IbotConfig,
    /// The masked patch rows of `[2B, np]`, in row order.
    pub(super) masked_rows: Vec<usize>,
    /// `dL/dz` of the student head's rows: `[CLS]` rows, then the masked patch rows.
    pub(super) dz: Vec<f32>,
    /// The global crops' gradient at every token's final-LayerNorm output `[2B, t, d]`.
    pub(super) dnorm: Vec<f32>,
    pub(super) mimb: MimBufs,
    pub center: Vec<f32>,
    pub next_center: Vec<f32>,
}

impl CpuBackend {
    /// Turns this backend into an iBOT one (the model must have the mask token).
    pub fn with_ibot(mut self, cfg: IbotConfig) -> Result<Self> {
        let lay = self.cx.lay;
        ensure!(
            lay.mask_token.is_some(),
            "iBOT needs a model with a mask token (backbone.masked_embed)"
        );
        let (d, k, p) = (
            self.cx.d,
            self.cx.cfg.head.out_dim,
            self.cx.cfg.head.bottleneck,
        );
        let b = self.shapes.batch;
        let n_g = 2 * b;
        let (t, np) = (self.glob.t, self.glob.np);
        let rows_s = n_g + self.shapes.n_local * b;
        let cap_s = rows_s + n_g * np;
        self.glob.enable_all_tokens(d);
        self.head_s = HeadBufs::new(&self.cx, cap_s);
        self.head_t = HeadBufs::new(&self.cx, n_g * t);
        self.x_t = vec![0.0; n_g * t * d];
        self.x_s = vec![0.0; cap_s * d];
        self.dx_s = vec![0.0; cap_s * d];
        let hw = head::max_width(&self.cx);
        self.hs0 = vec![0.0; cap_s * hw];
        self.hs1 = vec![0.0; cap_s * hw];
        self.partials = vec![0.0; rows::n_chunks(cap_s.max(n_g * t)) * hw];
        self.masks = StepMasks::new(&self.cx.cfg, &self.shapes, true);
        let mut center = vec![0.0; k];
        dinovmf_core::centering::center_init(&mut center, self.loss_cfg.centering);
        self.ibot = Some(IbotCpu {
            cfg,
            masked_rows: Vec::with_capacity(n_g * np),
            dz: vec![0.0; cap_s * p],
            dnorm: vec![0.0; n_g * t * d],
            mimb: MimBufs::new(n_g * np, k, p),
            next_center: center.clone(),
            center,
        });
        Ok(self)
    }
}

/// Head input rows from every token's final-LayerNorm output `[n, t, d]`: the `[CLS]` rows
/// first, then every patch row (image-major).
pub(super) fn gather_tokens(out: &mut [f32], norm: &[f32], n: usize, t: usize, d: usize) {
    let np = t - 1;
    for img in 0..n {
        out[img * d..(img + 1) * d].copy_from_slice(&norm[img * t * d..img * t * d + d]);
        let dst = (n + img * np) * d;
        out[dst..dst + np * d].copy_from_slice(&norm[(img * t + 1) * d..(img + 1) * t * d]);
    }
}
