//! The iBOT step on the CPU: masked student global crops, the head on `[CLS]` and on patch
//! tokens, L_cls + mim_weight * L_mim, and the backward through both.
//!
//! Row layouts of the head: the teacher's input is the `[CLS]` rows of the two global crops
//! (`2B`) followed by every patch row (`2B * np`, image-major); the student's is the `[CLS]`
//! rows of every crop (as DINO) followed by the masked patch rows only (`M`, in row order), as
//! only those enter the loss.
use std::time::Instant;

use anyhow::{ensure, Context, Result};

use dinovmf_core::masking::step_masks;
use dinovmf_core::mim_loss::IbotConfig;

use super::head::{self, HeadBufs};
use super::mim::{self, MimBufs, MimInputs};
use super::vit::{self, PatchMask};
use super::{draw_drop_masks, masks_to_scales, rows, CpuBackend, GradReport};
use crate::backend::StepHyper;
use crate::data::Batch;

/// iBOT's buffers and state on the CPU backend.
pub struct IbotCpu {
    pub cfg: IbotConfig,
    /// 0/1 mask of the student's global patches `[2B, np]`, masked count per image.
    mask: Vec<f32>,
    counts: Vec<usize>,
    scratch: Vec<bool>,
    masked_rows: Vec<usize>,
    head_t: HeadBufs,
    x_t: Vec<f32>,
    x_s: Vec<f32>,
    dx_s: Vec<f32>,
    dz: Vec<f32>,
    dnorm: Vec<f32>,
    mimb: MimBufs,
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
        let hw = head::max_width(&self.cx);
        self.hs0 = vec![0.0; cap_s * hw];
        self.hs1 = vec![0.0; cap_s * hw];
        self.partials = vec![0.0; rows::n_chunks(cap_s.max(n_g * t)) * hw];
        let mut center = vec![0.0; k];
        dinovmf_core::centering::center_init(&mut center, self.loss_cfg.centering);
        self.ibot = Some(IbotCpu {
            cfg,
            mask: vec![0.0; n_g * np],
            counts: vec![0; n_g],
            scratch: vec![false; np],
            masked_rows: Vec::with_capacity(n_g * np),
            head_t: HeadBufs::new(&self.cx, n_g * t),
            x_t: vec![0.0; n_g * t * d],
            x_s: vec![0.0; cap_s * d],
            dx_s: vec![0.0; cap_s * d],
            dz: vec![0.0; cap_s * p],
            dnorm: vec![0.0; n_g * t * d],
            mimb: MimBufs::new(n_g * np, k, p),
            next_center: center.clone(),
            center,
        });
        Ok(self)
    }

    /// The iBOT step's gradients (see [`CpuBackend::compute_gradients`]).
    pub(super) fn compute_gradients_ibot(
        &mut self,
        batch: &Batch,
        hp: &StepHyper,
    ) -> Result<GradReport> {
        ensure!(
            hp.patch_teacher_temp.is_finite() && hp.patch_teacher_temp > 0.0,
            "patch teacher temperature must be positive, got {}",
            hp.patch_teacher_temp
        );
        let mut ib = self.ibot.take().context("iBOT buffers missing")?;
        let res = self.ibot_step(&mut ib, batch, hp);
        self.ibot = Some(ib);
        res
    }

    fn ibot_step(&mut self, ib: &mut IbotCpu, batch: &Batch, hp: &StepHyper) -> Result<GradReport> {
        let mut lcfg = self.loss_cfg;
        lcfg.teacher_temp = hp.teacher_temp as f64;
        let mut pcfg = self.loss_cfg;
        pcfg.teacher_temp = hp.patch_teacher_temp as f64;
        pcfg.center_momentum = ib.cfg.patch_center_momentum;
        let cx = self.cx;
        let cfg = cx.cfg;
        let lay = cx.lay;
        let b = self.shapes.batch;
        let n_g = 2 * b;
        let n_l = self.shapes.n_local * b;
        let rows_s = n_g + n_l;
        let (d, k, p) = (cx.d, cfg.head.out_dim, cfg.head.bottleneck);
        let (t, np, grid) = (self.glob.t, self.glob.np, self.glob.grid);
        let tok = lay.mask_token.context("mask token missing")?;
        draw_drop_masks(&cfg, hp.seed, n_g, n_l, &mut self.mask_g, &mut self.mask_l);
        masks_to_scales(&cfg, &mut self.mask_g, n_g);
        masks_to_scales(&cfg, &mut self.mask_l, n_l);
        step_masks(
            &mut ib.mask,
            &mut ib.counts,
            &mut ib.scratch,
            2,
            b,
            grid,
            grid,
            &ib.cfg.mask,
            hp.seed,
        );
        ib.masked_rows.clear();
        ib.masked_rows
            .extend((0..n_g * np).filter(|&r| ib.mask[r] != 0.0));
        let m = ib.masked_rows.len();
        let mut tm = Instant::now();

        // Teacher: unmasked global crops, every token through the head.
        vit::forward_ext(
            &cx,
            &self.teacher,
            &mut self.glob,
            &batch.global,
            n_g,
            None,
            false,
            None,
            true,
        );
        gather_tokens(&mut ib.x_t, &self.glob.norm_all, n_g, t, d);
        head::forward(&cx, &self.teacher, &mut ib.head_t, &ib.x_t, n_g * t, false);
        self.tick(0, &mut tm);

        // Student: masked global crops (every token kept), local crops as DINO.
        vit::forward_ext(
            &cx,
            &self.student,
            &mut self.glob,
            &batch.global,
            n_g,
            Some(&self.mask_g),
            true,
            Some(PatchMask {
                mask: &ib.mask,
                token: &self.student[tok..tok + d],
            }),
            true,
        );
        ib.x_s[..n_g * d].copy_from_slice(&self.glob.cls[..n_g * d]);
        if let Some(loc) = self.loc.as_mut() {
            vit::forward(
                &cx,
                &self.student,
                loc,
                &batch.local,
                n_l,
                Some(&self.mask_l),
                true,
            );
            ib.x_s[n_g * d..rows_s * d].copy_from_slice(&loc.cls[..n_l * d]);
        }
        {
            let na = &self.glob.norm_all;
            for (o, &r) in ib.x_s[rows_s * d..(rows_s + m) * d]
                .chunks_exact_mut(d)
                .zip(&ib.masked_rows)
            {
                let (img, j) = (r / np, r % np);
                let src = (img * t + 1 + j) * d;
                o.copy_from_slice(&na[src..src + d]);
            }
        }
        let hs_rows = rows_s + m;
        head::forward(&cx, &self.student, &mut self.head_s, &ib.x_s, hs_rows, true);
        self.tick(1, &mut tm);

        // Losses: [CLS] as DINO (writes the prototype gradients), then the patch loss (adds).
        rows::zero(&mut self.grads);
        let rep = {
            let (lo, hi) = self.grads.split_at_mut(lay.last_v);
            super::loss::forward_backward(
                &lcfg,
                &mut self.lossb,
                self.head_s.z(),
                ib.head_t.z(),
                &self.student[lay.last_v..lay.last_v + k * p],
                &self.student[lay.last_g..lay.last_g + k],
                &self.teacher[lay.last_v..lay.last_v + k * p],
                &self.teacher[lay.last_g..lay.last_g + k],
                &self.center,
                &mut self.next_center,
                &mut hi[..k * p],
                &mut lo[lay.last_g..lay.last_g + k],
            )
        };
        let weight = ib.cfg.mim_weight as f32;
        let mrep = {
            let (lo, hi) = self.grads.split_at_mut(lay.patch_v);
            let zt = ib.head_t.z();
            let zs = self.head_s.z();
            mim::forward_backward(
                &pcfg,
                &mut ib.mimb,
                &MimInputs {
                    z_t: &zt[n_g * p..n_g * t * p],
                    z_s: &zs[rows_s * p..hs_rows * p],
                    masked_rows: &ib.masked_rows,
                    counts: &ib.counts,
                    n: np,
                    views: 2,
                    batch: b,
                    v_s: &self.student[lay.patch_v..lay.patch_v + k * p],
                    g_s: &self.student[lay.patch_g..lay.patch_g + k],
                    v_t: &self.teacher[lay.patch_v..lay.patch_v + k * p],
                    g_t: &self.teacher[lay.patch_g..lay.patch_g + k],
                },
                weight,
                &ib.center,
                &mut ib.next_center,
                &mut hi[..k * p],
                &mut lo[lay.patch_g..lay.patch_g + k],
            )
        };
        ib.dz[..rows_s * p].copy_from_slice(&self.lossb.dz[..rows_s * p]);
        ib.dz[rows_s * p..hs_rows * p].copy_from_slice(&ib.mimb.dz[..m * p]);
        self.tick(2, &mut tm);

        head::backward(
            &cx,
            &self.student,
            &mut self.grads,
            &self.head_s,
            &ib.x_s,
            &ib.dz,
            &mut ib.dx_s,
            hs_rows,
            &mut self.hs0,
            &mut self.hs1,
            &mut self.partials,
        );
        self.tick(3, &mut tm);

        // The global crops' token gradients: [CLS] rows and masked patch rows, 0 elsewhere.
        ib.dnorm.fill(0.0);
        for img in 0..n_g {
            ib.dnorm[img * t * d..img * t * d + d]
                .copy_from_slice(&ib.dx_s[img * d..(img + 1) * d]);
        }
        for (i, &r) in ib.masked_rows.iter().enumerate() {
            let (img, j) = (r / np, r % np);
            let dst = (img * t + 1 + j) * d;
            let src = (rows_s + i) * d;
            ib.dnorm[dst..dst + d].copy_from_slice(&ib.dx_s[src..src + d]);
        }
        vit::backward_ext(
            &cx,
            &self.student,
            &mut self.grads,
            &self.glob,
            &ib.dnorm,
            n_g,
            Some(&self.mask_g),
            &mut self.back,
            Some((&ib.mask, tok)),
            true,
        );
        if let Some(loc) = self.loc.as_ref() {
            vit::backward(
                &cx,
                &self.student,
                &mut self.grads,
                loc,
                &ib.dx_s[n_g * d..rows_s * d],
                n_l,
                Some(&self.mask_l),
                &mut self.back,
            );
        }
        self.tick(4, &mut tm);

        let c = rep.collapse;
        Ok(GradReport {
            loss: rep.loss + weight * mrep.loss,
            teacher_entropy: c.mean_row_entropy,
            mean_entropy: c.entropy_of_mean,
            max_mass: c.max_mean_mass,
            kl: c.mean_kl,
            cls_loss: rep.loss,
            mim_loss: mrep.loss,
            patch_teacher_entropy: mrep.teacher_entropy,
        })
    }
}

/// Head input rows from every token's final-LayerNorm output `[n, t, d]`: the `[CLS]` rows
/// first, then every patch row (image-major).
fn gather_tokens(out: &mut [f32], norm: &[f32], n: usize, t: usize, d: usize) {
    let np = t - 1;
    for img in 0..n {
        out[img * d..(img + 1) * d].copy_from_slice(&norm[img * t * d..img * t * d + d]);
        let dst = (n + img * np) * d;
        out[dst..dst + np * d].copy_from_slice(&norm[(img * t + 1) * d..(img + 1) * t * d]);
    }
}
