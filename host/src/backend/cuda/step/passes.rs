//! The CUDA backend's [`Passes`]: each phase of `backend/step.rs` as launches on the device.
use anyhow::{bail, Context, Result};

use dinovmf_core::loss::LossDims;
use dinovmf_core::mim_loss::IbotConfig;
use dinovmf_core::model::ModelConfig;

use super::{GpuBackend, M_GRAD_SQ, M_LEN, M_LOSS, M_MAX_MASS, M_MEAN_ENT, M_ROW_ENT};
use crate::backend::cuda::device::Device;
use crate::backend::cuda::head;
use crate::backend::cuda::launch::ibot::gather_rows;
use crate::backend::cuda::loss::{cls_loss_forward_backward_with, ClsLoss, ClsMetrics, Prototypes};
use crate::backend::cuda::ranks::BatchScope;
use crate::backend::cuda::vit::{self, Masks, PatchMask};
use crate::backend::step::{Backward, Crops, Forward, Head, Passes, Phase, StepMasks};
use crate::backend::{Net, StepHyper, StepMetrics, StepShapes};
use crate::data::Batch;

impl<D: Device> Passes for GpuBackend<D> {
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
        if let Some(mut ib) = self.ibot.take() {
            let res = self.upload_patch_masks(&mut ib);
            self.ibot = Some(ib);
            res?;
        }
        let gpu = &mut self.gpu;
        gpu.upload(self.glob.img, &batch.global)?;
        gpu.upload(self.mask_g, &self.masks.drop_global)?;
        if let Some(loc) = &self.loc {
            gpu.upload(loc.img, &batch.local)?;
            gpu.upload(self.mask_l, &self.masks.drop_local)?;
        }
        if let Some((clock, _)) = self.phase_timer.as_mut() {
            gpu.dev.sync()?;
            *clock = std::time::Instant::now();
        }
        Ok(())
    }

    fn forward(&mut self, crops: Crops, opts: Forward) -> Result<()> {
        let cx = self.cx;
        let params = match opts.net {
            Net::Student => self.student,
            Net::Teacher => self.teacher,
        };
        let patch_mask = match opts.patch_mask {
            false => None,
            true => {
                let tok = cx.lay.mask_token.context("mask token missing")?;
                let ib = self.ibot.as_ref().context("iBOT buffers missing")?;
                Some(PatchMask {
                    mask: ib.mask,
                    token: self.student.sub(tok, cx.d),
                })
            }
        };
        let b = self.shapes.batch;
        let (group, n, masks) = match crops {
            Crops::Global => (&self.glob, 2 * b, self.mask_g),
            Crops::Local => match &self.loc {
                Some(loc) => (loc, self.shapes.n_local * b, self.mask_l),
                None => bail!("no local crops in this backend's shapes"),
            },
        };
        let masks = opts.drop_path.then_some(Masks { buf: masks });
        vit::vit_forward_ext(
            &mut self.gpu,
            &cx,
            params,
            group,
            n,
            masks,
            opts.save,
            self.one,
            patch_mask,
            opts.all_tokens,
        )
    }

    fn head(&mut self, opts: Head) -> Result<()> {
        let cx = self.cx;
        let d = cx.d;
        let b = self.shapes.batch;
        let (n_g, n_l) = (2 * b, self.shapes.n_local * b);
        let rows_s = n_g + n_l;
        let t = self.glob.t;
        let gpu = &mut self.gpu;
        match opts.net {
            Net::Teacher => {
                let rows = if opts.patches {
                    let ib = self.ibot.as_ref().context("iBOT buffers missing")?;
                    let all = self.glob.all.context("all-token buffers missing")?;
                    gather_rows(gpu, self.x_t, all.norm, ib.idx_t, (n_g * t, d, n_g * t))?;
                    n_g * t
                } else {
                    gpu.copy(self.x_t, self.glob.cls.sub(0, n_g * d))?;
                    n_g
                };
                head::head_forward(gpu, &cx, self.teacher, &self.head_t, self.x_t, rows)
            }
            Net::Student => {
                gpu.copy(self.x_s.sub(0, n_g * d), self.glob.cls.sub(0, n_g * d))?;
                if let Some(loc) = &self.loc {
                    gpu.copy(self.x_s.sub(n_g * d, n_l * d), loc.cls.sub(0, n_l * d))?;
                }
                let mut rows = rows_s;
                if opts.patches {
                    let ib = self.ibot.as_ref().context("iBOT buffers missing")?;
                    let all = self.glob.all.context("all-token buffers missing")?;
                    let m = ib.masked;
                    if m > 0 {
                        let out = self.x_s.sub(rows_s * d, m * d);
                        gather_rows(gpu, out, all.norm, ib.idx, (m, d, n_g * t))?;
                    }
                    rows += m;
                }
                head::head_forward(gpu, &cx, self.student, &self.head_s, self.x_s, rows)
            }
        }
    }

    fn zero_grads(&mut self) -> Result<()> {
        self.gpu.fill(self.grads, 0.0)
    }

    fn cls_loss(&mut self, teacher_temp: f32) -> Result<()> {
        let lay = self.cx.lay;
        let (k, p) = (self.cx.cfg.head.out_dim, self.cx.cfg.head.bottleneck);
        let batch = self.shapes.batch;
        let n_crops = 2 + self.shapes.n_local;
        let slot = |i: usize| self.metrics.sub(i, 1);
        let io = ClsLoss {
            z_t: self.head_t.z(),
            z_s: self.head_s.z(),
            teacher: Prototypes::at(self.teacher, lay.last_v, lay.last_g, k, p),
            student: Prototypes::at(self.student, lay.last_v, lay.last_g, k, p),
            center: self.center,
            grad: Prototypes::at(self.grads, lay.last_v, lay.last_g, k, p),
            metrics: ClsMetrics {
                loss: slot(M_LOSS),
                teacher_entropy: slot(M_ROW_ENT),
                mean_entropy: slot(M_MEAN_ENT),
                max_mass: slot(M_MAX_MASS),
            },
        };
        let dims = LossDims {
            n_crops,
            batch,
            k,
            p,
        };
        let cfg = self.loss_cfg;
        let mut scope = match self.ranks.as_mut() {
            Some(r) => r.scope(),
            None => BatchScope::Whole,
        };
        cls_loss_forward_backward_with(
            &mut self.gpu,
            &cfg,
            dims,
            teacher_temp,
            &io,
            &self.lb,
            &mut scope,
        )
    }

    fn patch_loss(&mut self, patch_teacher_temp: f32) -> Result<()> {
        let ib = self.ibot.take().context("iBOT buffers missing")?;
        let res = self.patch_loss_chain(&ib, patch_teacher_temp);
        self.ibot = Some(ib);
        res
    }

    fn head_backward(&mut self) -> Result<()> {
        let cx = self.cx;
        let b = self.shapes.batch;
        let rows_s = (2 + self.shapes.n_local) * b;
        let rows = rows_s + self.ibot.as_ref().map_or(0, |ib| ib.masked);
        head::head_backward(
            &mut self.gpu,
            &cx,
            self.student,
            self.grads,
            &self.head_s,
            self.x_s,
            self.lb.dz,
            self.dx_s,
            rows,
            self.hs0,
            self.hs1,
        )?;
        self.add_koleo()
    }

    fn backward(&mut self, crops: Crops, opts: Backward) -> Result<()> {
        let cx = self.cx;
        let d = cx.d;
        let b = self.shapes.batch;
        let (n_g, n_l) = (2 * b, self.shapes.n_local * b);
        let rows_s = n_g + n_l;
        let gpu = &mut self.gpu;
        let (mg, ml) = (Masks { buf: self.mask_g }, Masks { buf: self.mask_l });
        match crops {
            Crops::Global if opts.all_tokens => {
                // The global crops' token gradients: `[CLS]` rows and masked patch rows, 0
                // elsewhere.
                let ib = self.ibot.as_ref().context("iBOT buffers missing")?;
                let t = self.glob.t;
                let hs_rows = rows_s + ib.masked;
                gather_rows(gpu, ib.dnorm, self.dx_s, ib.inv, (n_g * t, d, hs_rows))?;
                let mask = match opts.patch_mask {
                    true => Some((ib.mask, cx.lay.mask_token.context("mask token missing")?)),
                    false => None,
                };
                vit::vit_backward_ext(
                    gpu,
                    &cx,
                    self.student,
                    self.grads,
                    &self.glob,
                    ib.dnorm,
                    n_g,
                    Some(mg),
                    &self.back,
                    self.one,
                    mask,
                    true,
                )
            }
            Crops::Global => vit::vit_backward(
                gpu,
                &cx,
                self.student,
                self.grads,
                &self.glob,
                self.dx_s.sub(0, n_g * d),
                n_g,
                Some(mg),
                &self.back,
                self.one,
            ),
            Crops::Local => {
                let loc = self.loc.as_ref().context("no local crops")?;
                vit::vit_backward(
                    gpu,
                    &cx,
                    self.student,
                    self.grads,
                    loc,
                    self.dx_s.sub(n_g * d, n_l * d),
                    n_l,
                    Some(ml),
                    &self.back,
                    self.one,
                )
            }
        }
    }

    /// None on this backend (`set_koleo_proto` refuses a weight).
    fn regularisers(&mut self) -> Result<()> {
        Ok(())
    }

    fn shard(&self) -> (usize, usize) {
        self.rank_shard()
    }

    /// One rank: nothing. Several: the mean over ranks of the gradients and the batch
    /// statistics on the device, and the centers and signals from them (`step/ranks.rs`).
    fn reduce(&mut self) -> Result<()> {
        self.reduce_over_ranks()
    }

    fn clip(&mut self, clip: f32) -> Result<()> {
        self.clip_norms(clip)
    }

    fn update(&mut self, hp: &StepHyper) -> Result<()> {
        self.adamw_ema(hp)?;
        self.adam_step += 1;
        Ok(())
    }

    /// With phase timing on, waits for the device (results unchanged) and books the time since
    /// the last phase boundary to `phase`.
    fn tick(&mut self, phase: Phase) {
        if let Some((clock, secs)) = self.phase_timer.as_mut() {
            // A failed sync is reported by the step's next device call.
            let _ = self.gpu.dev.sync();
            let now = std::time::Instant::now();
            secs[phase as usize] += (now - *clock).as_secs_f64();
            *clock = now;
        }
    }

    /// Downloads the metrics buffer: the step's only sync (without phase timing).
    fn metrics(&mut self) -> Result<StepMetrics> {
        let mut m = [0.0f32; M_LEN];
        self.gpu.download(self.metrics, &mut m)?;
        let grad_norm = (m[M_GRAD_SQ] as f64).sqrt() as f32;
        if self.ibot.is_some() {
            return Ok(self.ibot_metrics(&m, grad_norm));
        }
        let loss = m[M_LOSS];
        Ok(StepMetrics {
            loss,
            teacher_entropy: m[M_ROW_ENT],
            mean_entropy: m[M_MEAN_ENT],
            max_mass: m[M_MAX_MASS],
            kl: loss - m[M_ROW_ENT],
            grad_norm,
            cls_loss: loss,
            mim_loss: 0.0,
            patch_teacher_entropy: 0.0,
        })
    }
}
