//! The CPU backend's [`Passes`]: each phase of `backend/step.rs` with this backend's ops.
use std::time::Instant;

use anyhow::{bail, Context, Result};

use dinovmf_core::centering::center_update;
use dinovmf_core::collapse::collapse_stats_of_mean;
use dinovmf_core::koleo::koleo_forward_backward;
use dinovmf_core::mim_loss::IbotConfig;
use dinovmf_core::model::ModelConfig;

use super::ibot::gather_tokens;
use super::mim::{self, MimInputs};
use super::vit::{self, PatchMask};
use super::{head, loss, masks_to_scales, rows, CpuBackend};
use crate::backend::step::{Backward, Crops, Forward, Head, Passes, Phase, StepMasks};
use crate::backend::{Net, StepHyper, StepMetrics, StepShapes};
use crate::data::Batch;

impl Passes for CpuBackend {
    fn model(&self) -> &ModelConfig {
        &self.cx.cfg
    }

    fn shapes(&self) -> &StepShapes {
        &self.shapes
    }

    fn ibot(&self) -> Option<&IbotConfig> {
        self.ibot.as_ref().map(|ib| &ib.cfg)
    }

    fn masks_mut(&mut self) -> &mut StepMasks {
        &mut self.masks
    }

    fn upload(&mut self, batch: &Batch) -> Result<()> {
        let cfg = self.cx.cfg;
        let b = self.shapes.batch;
        let (n_g, n_l) = (2 * b, self.shapes.n_local * b);
        self.img_g.copy_from_slice(&batch.global);
        self.img_l.copy_from_slice(&batch.local);
        self.mask_g.copy_from_slice(&self.masks.drop_global);
        self.mask_l.copy_from_slice(&self.masks.drop_local);
        masks_to_scales(&cfg, &mut self.mask_g, n_g);
        masks_to_scales(&cfg, &mut self.mask_l, n_l);
        if let Some(ib) = self.ibot.as_mut() {
            let mask = &self.masks.patch;
            ib.masked_rows.clear();
            ib.masked_rows
                .extend((0..mask.len()).filter(|&r| mask[r] != 0.0));
        }
        self.clock = Instant::now();
        Ok(())
    }

    fn forward(&mut self, crops: Crops, opts: Forward) -> Result<()> {
        let cx = self.cx;
        let params = match opts.net {
            Net::Student => &self.student,
            Net::Teacher => &self.teacher,
        };
        let patch_mask = match opts.patch_mask {
            false => None,
            true => {
                let tok = cx.lay.mask_token.context("mask token missing")?;
                Some(PatchMask {
                    mask: &self.masks.patch,
                    token: &self.student[tok..tok + cx.d],
                })
            }
        };
        let b = self.shapes.batch;
        let (group, images, n, scales) = match crops {
            Crops::Global => (&mut self.glob, &self.img_g, 2 * b, &self.mask_g),
            Crops::Local => match self.loc.as_mut() {
                Some(loc) => (loc, &self.img_l, self.shapes.n_local * b, &self.mask_l),
                None => bail!("no local crops in this backend's shapes"),
            },
        };
        let scales = opts.drop_path.then_some(&scales[..]);
        vit::forward_ext(
            &cx,
            params,
            group,
            images,
            n,
            scales,
            opts.save,
            patch_mask,
            opts.all_tokens,
        );
        Ok(())
    }

    fn head(&mut self, opts: Head) -> Result<()> {
        let cx = self.cx;
        let d = cx.d;
        let b = self.shapes.batch;
        let (n_g, n_l) = (2 * b, self.shapes.n_local * b);
        let rows_s = n_g + n_l;
        let (t, np) = (self.glob.t, self.glob.np);
        match opts.net {
            Net::Teacher => {
                let rows = if opts.patches {
                    gather_tokens(&mut self.x_t, &self.glob.norm_all, n_g, t, d);
                    n_g * t
                } else {
                    self.x_t[..n_g * d].copy_from_slice(&self.glob.cls[..n_g * d]);
                    n_g
                };
                head::forward(&cx, &self.teacher, &mut self.head_t, &self.x_t, rows, false);
            }
            Net::Student => {
                self.x_s[..n_g * d].copy_from_slice(&self.glob.cls[..n_g * d]);
                if let Some(loc) = self.loc.as_ref() {
                    self.x_s[n_g * d..rows_s * d].copy_from_slice(&loc.cls[..n_l * d]);
                }
                let mut rows = rows_s;
                if opts.patches {
                    let ib = self.ibot.as_ref().context("iBOT buffers missing")?;
                    let na = &self.glob.norm_all;
                    let m = ib.masked_rows.len();
                    for (o, &r) in self.x_s[rows_s * d..(rows_s + m) * d]
                        .chunks_exact_mut(d)
                        .zip(&ib.masked_rows)
                    {
                        let (img, j) = (r / np, r % np);
                        let src = (img * t + 1 + j) * d;
                        o.copy_from_slice(&na[src..src + d]);
                    }
                    rows += m;
                }
                head::forward(&cx, &self.student, &mut self.head_s, &self.x_s, rows, true);
            }
        }
        Ok(())
    }

    fn zero_grads(&mut self) -> Result<()> {
        rows::zero(&mut self.grads);
        Ok(())
    }

    fn cls_loss(&mut self, teacher_temp: f32) -> Result<()> {
        let mut lcfg = self.loss_cfg;
        lcfg.teacher_temp = teacher_temp as f64;
        let lay = self.cx.lay;
        let (k, p) = (self.cx.cfg.head.out_dim, self.cx.cfg.head.bottleneck);
        let rep = {
            let (lo, hi) = self.grads.split_at_mut(lay.last_v);
            loss::forward_backward(
                &lcfg,
                &mut self.lossb,
                self.reducer.as_mut(),
                self.head_s.z(),
                self.head_t.z(),
                &self.student[lay.last_v..lay.last_v + k * p],
                &self.student[lay.last_g..lay.last_g + k],
                &self.teacher[lay.last_v..lay.last_v + k * p],
                &self.teacher[lay.last_g..lay.last_g + k],
                &self.center,
                &mut self.next_center,
                &mut hi[..k * p],
                &mut lo[lay.last_g..lay.last_g + k],
            )?
        };
        let c = rep.collapse;
        self.report = StepMetrics {
            loss: rep.loss,
            teacher_entropy: c.mean_row_entropy,
            mean_entropy: c.entropy_of_mean,
            max_mass: c.max_mean_mass,
            kl: c.mean_kl,
            grad_norm: 0.0,
            cls_loss: rep.loss,
            mim_loss: 0.0,
            patch_teacher_entropy: 0.0,
        };
        Ok(())
    }

    fn patch_loss(&mut self, patch_teacher_temp: f32) -> Result<()> {
        let ib = self.ibot.as_mut().context("iBOT buffers missing")?;
        let mut pcfg = self.loss_cfg;
        pcfg.teacher_temp = patch_teacher_temp as f64;
        pcfg.center_momentum = ib.cfg.patch_center_momentum;
        let lay = self.cx.lay;
        let (k, p) = (self.cx.cfg.head.out_dim, self.cx.cfg.head.bottleneck);
        let b = self.shapes.batch;
        let n_g = 2 * b;
        let rows_s = n_g + self.shapes.n_local * b;
        let (t, np) = (self.glob.t, self.glob.np);
        let m = ib.masked_rows.len();
        let hs_rows = rows_s + m;
        let weight = ib.cfg.mim_weight as f32;
        let mrep = {
            let (lo, hi) = self.grads.split_at_mut(lay.patch_v);
            let zt = self.head_t.z();
            let zs = self.head_s.z();
            mim::forward_backward(
                &pcfg,
                &mut ib.mimb,
                self.reducer.as_mut(),
                &MimInputs {
                    z_t: &zt[n_g * p..n_g * t * p],
                    z_s: &zs[rows_s * p..hs_rows * p],
                    masked_rows: &ib.masked_rows,
                    counts: &self.masks.counts,
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
            )?
        };
        ib.dz[..rows_s * p].copy_from_slice(&self.lossb.dz[..rows_s * p]);
        ib.dz[rows_s * p..hs_rows * p].copy_from_slice(&ib.mimb.dz[..m * p]);
        let r = &mut self.report;
        r.loss = r.cls_loss + weight * mrep.loss;
        r.mim_loss = mrep.loss;
        r.patch_teacher_entropy = mrep.teacher_entropy;
        Ok(())
    }

    fn head_backward(&mut self) -> Result<()> {
        let cx = self.cx;
        let b = self.shapes.batch;
        let rows_s = (2 + self.shapes.n_local) * b;
        let (dz, rows) = match self.ibot.as_ref() {
            Some(ib) => (&ib.dz, rows_s + ib.masked_rows.len()),
            None => (&self.lossb.dz, rows_s),
        };
        head::backward(
            &cx,
            &self.student,
            &mut self.grads,
            &self.head_s,
            &self.x_s,
            dz,
            &mut self.dx_s,
            rows,
            &mut self.hs0,
            &mut self.hs1,
            &mut self.partials,
        );
        if self.koleo > 0.0 {
            // KoLeo per global view on the student's [CLS] backbone features (the head's
            // input rows 0..2B), its gradient added to theirs.
            let (b, d) = (self.shapes.batch, cx.d);
            let (rank, world) = (self.reducer.rank(), self.reducer.world_size());
            for v in 0..2 {
                let r = v * b * d..(v + 1) * b * d;
                if world == 1 {
                    koleo_forward_backward(
                        &self.x_s[r.clone()],
                        b,
                        d,
                        &mut self.koleo_scratch,
                        Some((&mut self.dx_s[r], self.koleo)),
                    );
                    continue;
                }
                // Over ranks: the view's rows of every rank (rank order = the whole batch's
                // row order), then the whole batch's KoLeo on every rank, of which each keeps
                // its own rows' gradient. Row i's gradient has terms from the rows whose
                // nearest neighbour is i, wherever they live; computing every row here gives
                // them all without a second reduction (the same bits on every rank). The
                // reduce phase takes the mean of the ranks' gradients, dividing by `world`
                // what is already the whole batch's gradient here: hence the weight `world`.
                let n = world * b;
                let (rows, grad) = self.koleo_gathered.split_at_mut(n * d);
                self.reducer.all_gather_f32(&self.x_s[r.clone()], rows)?;
                grad.fill(0.0);
                koleo_forward_backward(
                    rows,
                    n,
                    d,
                    &mut self.koleo_scratch,
                    Some((&mut grad[..], self.koleo * world as f32)),
                );
                let mine = &grad[rank * b * d..(rank + 1) * b * d];
                for (o, &g) in self.dx_s[r].iter_mut().zip(mine) {
                    *o += g;
                }
            }
        }
        Ok(())
    }

    fn backward(&mut self, crops: Crops, opts: Backward) -> Result<()> {
        let cx = self.cx;
        let d = cx.d;
        let b = self.shapes.batch;
        let (n_g, n_l) = (2 * b, self.shapes.n_local * b);
        let rows_s = n_g + n_l;
        match crops {
            Crops::Global if opts.all_tokens => {
                // The global crops' token gradients: [CLS] rows and masked patch rows, 0
                // elsewhere.
                let ib = self.ibot.as_mut().context("iBOT buffers missing")?;
                let (t, np) = (self.glob.t, self.glob.np);
                ib.dnorm.fill(0.0);
                for img in 0..n_g {
                    ib.dnorm[img * t * d..img * t * d + d]
                        .copy_from_slice(&self.dx_s[img * d..(img + 1) * d]);
                }
                for (i, &r) in ib.masked_rows.iter().enumerate() {
                    let (img, j) = (r / np, r % np);
                    let dst = (img * t + 1 + j) * d;
                    let src = (rows_s + i) * d;
                    ib.dnorm[dst..dst + d].copy_from_slice(&self.dx_s[src..src + d]);
                }
                let mask = match opts.patch_mask {
                    true => Some((
                        &self.masks.patch[..],
                        cx.lay.mask_token.context("mask token missing")?,
                    )),
                    false => None,
                };
                vit::backward_ext(
                    &cx,
                    &self.student,
                    &mut self.grads,
                    &self.glob,
                    &ib.dnorm,
                    n_g,
                    Some(&self.mask_g),
                    &mut self.back,
                    mask,
                    true,
                );
            }
            Crops::Global => vit::backward(
                &cx,
                &self.student,
                &mut self.grads,
                &self.glob,
                &self.dx_s[..n_g * d],
                n_g,
                Some(&self.mask_g),
                &mut self.back,
            ),
            Crops::Local => {
                let loc = self.loc.as_ref().context("no local crops")?;
                vit::backward(
                    &cx,
                    &self.student,
                    &mut self.grads,
                    loc,
                    &self.dx_s[n_g * d..rows_s * d],
                    n_l,
                    Some(&self.mask_l),
                    &mut self.back,
                );
            }
        }
        Ok(())
    }

    fn regularisers(&mut self) -> Result<()> {
        if self.koleo_proto > 0.0 {
            self.koleo_loss = Some(self.add_koleo_proto(self.koleo_proto));
        }
        self.clock = Instant::now();
        Ok(())
    }

    fn shard(&self) -> (usize, usize) {
        (self.reducer.rank(), self.reducer.world_size())
    }

    /// One rank: nothing. Several: the mean over ranks of the gradients, then of the batch
    /// statistics (the center's, the mean teacher distribution, the loss and the mean row
    /// entropy; iBOT: the patch center's statistic, the patch loss and its teacher entropy;
    /// equal shards, so the mean of the shard means is the global batch mean), from which the
    /// next centers and the collapse signals are computed again as one process would.
    fn reduce(&mut self) -> Result<()> {
        if self.reducer.world_size() == 1 {
            return Ok(());
        }
        self.reducer.mean_f32(&mut self.grads)?;
        let k = self.center.len();
        let lb = &self.lossb;
        let stats = &mut self.reduce_stats;
        stats.clear();
        stats.extend_from_slice(&lb.stat[..k]);
        stats.extend_from_slice(&lb.mean_p[..k]);
        stats.extend_from_slice(&[self.report.cls_loss, self.report.teacher_entropy]);
        if let Some(ib) = self.ibot.as_ref() {
            stats.extend_from_slice(&ib.mimb.stat[..k]);
            stats.extend_from_slice(&[self.report.mim_loss, self.report.patch_teacher_entropy]);
        }
        self.reducer.mean_f32(stats)?;
        let (stat, rest) = stats.split_at(k);
        let (mean_p, rest) = rest.split_at(k);
        let (scalars, patch) = rest.split_at(2);
        if let Some(ib) = self.ibot.as_mut() {
            let (patch_stat, patch_scalars) = patch.split_at(k);
            ib.next_center.copy_from_slice(&ib.center);
            center_update(
                &mut ib.next_center,
                patch_stat,
                ib.cfg.patch_center_momentum as f32,
            );
            let r = &mut self.report;
            (r.mim_loss, r.patch_teacher_entropy) = (patch_scalars[0], patch_scalars[1]);
        }
        self.next_center.copy_from_slice(&self.center);
        center_update(
            &mut self.next_center,
            stat,
            self.loss_cfg.center_momentum as f32,
        );
        let (loss, row_entropy) = (scalars[0], scalars[1]);
        let c = collapse_stats_of_mean(mean_p, row_entropy, loss - row_entropy);
        let r = &mut self.report;
        (r.loss, r.cls_loss, r.teacher_entropy) = (loss, loss, c.mean_row_entropy);
        (r.kl, r.mean_entropy, r.max_mass) = (c.mean_kl, c.entropy_of_mean, c.max_mean_mass);
        if let Some(ib) = self.ibot.as_ref() {
            // As the patch loss pass adds them.
            r.loss = r.cls_loss + ib.cfg.mim_weight as f32 * r.mim_loss;
        }
        Ok(())
    }

    fn clip(&mut self, clip: f32) -> Result<()> {
        self.grad_norm = self.clip_norms(clip);
        Ok(())
    }

    fn update(&mut self, hp: &StepHyper) -> Result<()> {
        self.adamw_ema(hp);
        std::mem::swap(&mut self.center, &mut self.next_center);
        if let Some(ib) = self.ibot.as_mut() {
            std::mem::swap(&mut ib.center, &mut ib.next_center);
        }
        self.adam_step += 1;
        Ok(())
    }

    fn metrics(&mut self) -> Result<StepMetrics> {
        Ok(StepMetrics {
            grad_norm: self.grad_norm as f32,
            ..self.report
        })
    }

    fn tick(&mut self, phase: Phase) {
        let now = Instant::now();
        self.phase[phase as usize] += (now - self.clock).as_secs_f64();
        self.clock = now;
    }
}
