//! The training step on a [`Device`]: [`GpuBackend`] keeps parameters, teacher, AdamW moments,
//! gradients, center and every activation resident; a step uploads the batch (and the
//! drop-path masks, a few floats drawn on the host exactly as the CPU backend draws them),
//! launches the whole step, and downloads one small metrics buffer: the step's only sync.
//!
//! The order of the phases is `backend/step.rs`'s; this backend's passes (`passes.rs`) run them
//! as launches: the fused loss chain of `ptx/src/kernels/head.rs`, head and backbone backward,
//! gradient reduction, per-tensor clipping, AdamW (decay groups, frozen last layer), teacher
//! EMA, center update.
//!
//! Collapse signals stay on the device too: `row_entropy` (mean row entropy of `P_t` and the
//! entropy of its batch mean), a column sum (the batch mean), a max reduction (its largest
//! mass). A multi-process [`GradReducer`] gets the gradients on the host (download, reduce,
//! upload); the single-process one costs nothing.
use anyhow::{ensure, Result};

use dinovmf_core::centering::center_init;
use dinovmf_core::logits::NORMALIZE_EPS;
use dinovmf_core::loss::{n_pairs, LossConfig};
use dinovmf_core::model::{for_each_param, num_params, ModelConfig};
use dinovmf_core::optim::AdamW;

use super::device::{u32_of as u, Arg, Buf, Device, Gpu};
use super::vit::{self, BackScratch, Cx, Group, HeadBufs};
use super::ops::{Gemm, Segments};
use crate::backend::step::{self, check_state, StepMasks};
use crate::backend::{Backend, GradReducer, Net, StepHyper, StepMetrics, StepShapes, TrainState};
use crate::data::Batch;
use dinovmf_ptx::kernels::reduce::RedOp;

mod ibot;
mod passes;

/// Images per forward in [`Backend::embed`].
const EMBED_CHUNK: usize = 64;

/// Slots of the metrics buffer.
const M_LOSS: usize = 0;
const M_GRAD_SQ: usize = 1;
const M_ROW_ENT: usize = 2;
const M_MEAN_ENT: usize = 3;
const M_MAX_MASS: usize = 4;
/// iBOT: L_mim (unweighted) and the mean entropy of the teacher's patch targets.
const M_MIM: usize = 5;
const M_PATCH_ENT: usize = 6;
const M_LEN: usize = 8;

/// A contiguous range of parameters updated with one AdamW launch.
#[derive(Clone, Copy, Debug)]
struct Run {
    start: usize,
    end: usize,
    decay: bool,
    last_layer: bool,
}

/// Buffers of the loss chain.
struct LossBufs {
    mu_s: Buf<f32>,
    mu_t: Buf<f32>,
    vn_s: Buf<f32>,
    vn_t: Buf<f32>,
    r: Buf<f32>,
    scale_s: Buf<f32>,
    bias_s: Buf<f32>,
    dbias_s: Buf<f32>,
    scale_t: Buf<f32>,
    bias_t: Buf<f32>,
    dbias_t: Buf<f32>,
    y_s: Buf<f32>,
    zn_s: Buf<f32>,
    y_t: Buf<f32>,
    zn_t: Buf<f32>,
    dots_t: Buf<f32>,
    p_t: Buf<f32>,
    lse_raw: Buf<f32>,
    stat: Buf<f32>,
    dots_s: Buf<f32>,
    lse_part: Buf<f32>,
    lse: Buf<f32>,
    loss_part: Buf<f32>,
    dy: Buf<f32>,
    dmu: Buf<f32>,
    dz: Buf<f32>,
    mean_raw: Buf<f32>,
    mean_p: Buf<f32>,
    ent: Buf<f32>,
    max_part: Buf<f32>,
    whole_k: Segments,
}

impl LossBufs {
    fn new<D: Device>(
        gpu: &mut Gpu<D>,
        n_crops: usize,
        batch: usize,
        k: usize,
        p: usize,
    ) -> Result<Self> {
        let (ns, nt) = (n_crops * batch, 2 * batch);
        let whole_k = Segments::new(gpu, &[(0, k)])?;
        Ok(Self {
            mu_s: gpu.alloc(k * p)?,
            mu_t: gpu.alloc(k * p)?,
            vn_s: gpu.alloc(k)?,
            vn_t: gpu.alloc(k)?,
            r: gpu.alloc(k)?,
            scale_s: gpu.alloc(k)?,
            bias_s: gpu.alloc(k)?,
            dbias_s: gpu.alloc(k)?,
            scale_t: gpu.alloc(k)?,
            bias_t: gpu.alloc(k)?,
            dbias_t: gpu.alloc(k)?,
            y_s: gpu.alloc(ns * p)?,
            zn_s: gpu.alloc(ns)?,
            y_t: gpu.alloc(nt * p)?,
            zn_t: gpu.alloc(nt)?,
            dots_t: gpu.alloc(nt * k)?,
            p_t: gpu.alloc(nt * k)?,
            lse_raw: gpu.alloc(nt)?,
            stat: gpu.alloc(k)?,
            dots_s: gpu.alloc(ns * k)?,
            lse_part: gpu.alloc(ns * k.div_ceil(64) * 2)?,
            lse: gpu.alloc(ns)?,
            loss_part: gpu.alloc(k.div_ceil(256))?,
            dy: gpu.alloc(ns * p)?,
            dmu: gpu.alloc(k * p)?,
            dz: gpu.alloc(ns * p)?,
            mean_raw: gpu.alloc(k)?,
            mean_p: gpu.alloc(k)?,
            ent: gpu.alloc(nt)?,
            max_part: gpu.alloc(whole_k.parts())?,
            whole_k,
        })
    }
}

/// The CUDA backend's training step on any [`Device`] (the driver, or the host simulator).
pub struct GpuBackend<D: Device> {
    gpu: Gpu<D>,
    cx: Cx,
    loss_cfg: LossConfig,
    shapes: StepShapes,
    reducer: Box<dyn GradReducer>,
    n_params: usize,
    runs: Vec<Run>,
    clip_segs: Segments,
    student: Buf<f32>,
    teacher: Buf<f32>,
    adam_m: Buf<f32>,
    adam_v: Buf<f32>,
    grads: Buf<f32>,
    center: Buf<f32>,
    adam_step: u64,
    glob: Group,
    loc: Option<Group>,
    back: BackScratch,
    head_s: HeadBufs,
    head_t: HeadBufs,
    x_s: Buf<f32>,
    x_t: Buf<f32>,
    dx_s: Buf<f32>,
    hs0: Buf<f32>,
    hs1: Buf<f32>,
    lb: LossBufs,
    clip_part: Buf<f32>,
    clip_coef: Buf<f32>,
    clip_norm: Buf<f32>,
    metrics: Buf<f32>,
    /// The step's masks as drawn on the host, and the drop-path masks on the device.
    masks: StepMasks,
    mask_g: Buf<f32>,
    mask_l: Buf<f32>,
    one: Buf<f32>,
    embed_group: Option<Group>,
    /// iBOT's buffers and patch center (see [`GpuBackend::with_ibot`]); `None` for DINO.
    ibot: Option<ibot::IbotGpu>,
}

impl<D: Device> GpuBackend<D> {
    pub fn new(
        dev: D,
        model: ModelConfig,
        loss: LossConfig,
        shapes: StepShapes,
        reducer: Box<dyn GradReducer>,
    ) -> Result<Self> {
        shapes.validate(&model, &loss)?;
        let mut gpu = Gpu::new(dev);
        gpu.dev.bind()?;
        let cx = Cx::new(&model);
        let n = num_params(&model);
        ensure!(
            n < u32::MAX as usize,
            "{n} parameters: the kernels index with 32 bits"
        );
        let (b, d, k, p) = (
            shapes.batch,
            cx.d,
            model.head.out_dim,
            model.head.bottleneck,
        );

        // AdamW runs: consecutive trainable tensors with the same decay / last-layer flags.
        let mut runs: Vec<Run> = Vec::new();
        let mut segs = Vec::new();
        for_each_param(&model, |s| {
            if !s.trainable {
                return;
            }
            segs.push((s.offset, s.numel));
            let r = Run {
                start: s.offset,
                end: s.offset + s.numel,
                decay: s.decay,
                last_layer: s.last_layer,
            };
            match runs.last_mut() {
                Some(l)
                    if l.end == r.start && l.decay == r.decay && l.last_layer == r.last_layer =>
                {
                    l.end = r.end
                }
                _ => runs.push(r),
            }
        });
        let clip_segs = Segments::new(&mut gpu, &segs)?;

        let n_g = 2 * b;
        let n_l = shapes.n_local * b;
        let rows_s = n_g + n_l;
        let glob = Group::new(&mut gpu, &cx, n_g, shapes.global_size, true)?;
        let loc = if shapes.n_local > 0 {
            Some(Group::new(&mut gpu, &cx, n_l, shapes.local_size, true)?)
        } else {
            None
        };
        let mut groups = vec![(n_g, glob.t)];
        if let Some(l) = &loc {
            groups.push((n_l, l.t));
        }
        let back = BackScratch::new(&mut gpu, &cx, &groups)?;
        let hw = vit::head_width(&cx);
        let mut center0 = vec![0.0f32; k];
        center_init(&mut center0, loss.centering);
        let center = gpu.alloc_from(&center0)?;
        let one = gpu.alloc_from(&[1.0f32])?;
        let lb = LossBufs::new(&mut gpu, 2 + shapes.n_local, b, k, p)?;
        let zeros = vec![0.0f32; n];
        let student = gpu.alloc_from(&zeros)?;
        let teacher = gpu.alloc_from(&zeros)?;
        let adam_m = gpu.alloc_from(&zeros)?;
        let adam_v = gpu.alloc_from(&zeros)?;
        let grads = gpu.alloc(n)?;
        let depth = model.vit.depth;
        Ok(Self {
            loss_cfg: loss,
            shapes,
            reducer,
            n_params: n,
            runs,
            clip_part: gpu.alloc(clip_segs.n * clip_segs.parts())?,
            clip_coef: gpu.alloc(clip_segs.n)?,
            clip_norm: gpu.alloc(clip_segs.n)?,
            clip_segs,
            student,
            teacher,
            adam_m,
            adam_v,
            grads,
            center,
            adam_step: 0,
            head_s: HeadBufs::new(&mut gpu, &cx, rows_s)?,
            head_t: HeadBufs::new(&mut gpu, &cx, n_g)?,
            x_s: gpu.alloc(rows_s * d)?,
            x_t: gpu.alloc(n_g * d)?,
            dx_s: gpu.alloc(rows_s * d)?,
            hs0: gpu.alloc(rows_s * hw)?,
            hs1: gpu.alloc(rows_s * hw)?,
            lb,
            metrics: gpu.alloc(M_LEN)?,
            mask_g: gpu.alloc(depth * 2 * n_g)?,
            mask_l: gpu.alloc(depth * 2 * n_l)?,
            masks: StepMasks::new(&model, &shapes, false),
            one,
            embed_group: None,
            ibot: None,
            glob,
            loc,
            back,
            cx,
            gpu,
        })
    }

    pub fn model(&self) -> &ModelConfig {
        &self.cx.cfg
    }

    /// Launch / copy counts and bytes allocated so far.
    pub fn counters(&self) -> (super::device::Counters, usize) {
        (self.gpu.counters, self.gpu.allocated)
    }

    /// `scale`, `bias`, `dbias/dr` and prototype directions of one network's last layer.
    #[allow(clippy::too_many_arguments)]
    fn branch(
        &mut self,
        params: Buf<f32>,
        mu: Buf<f32>,
        vn: Buf<f32>,
        terms: [Buf<f32>; 3],
        tau: f32,
    ) -> Result<()> {
        let lay = self.cx.lay;
        self.branch_at(params, lay.last_v, lay.last_g, mu, vn, terms, tau)
    }

    /// [`Self::branch`] of the prototype layer at offsets `v_off` (`[K, p]`), `g_off` (`[K]`).
    #[allow(clippy::too_many_arguments)]
    fn branch_at(
        &mut self,
        params: Buf<f32>,
        v_off: usize,
        g_off: usize,
        mu: Buf<f32>,
        vn: Buf<f32>,
        terms: [Buf<f32>; 3],
        tau: f32,
    ) -> Result<()> {
        let (k, p) = (self.cx.cfg.head.out_dim, self.cx.cfg.head.bottleneck);
        let eps = NORMALIZE_EPS as f32;
        let cfg = self.loss_cfg;
        let gpu = &mut self.gpu;
        gpu.l2norm_forward(mu, vn, params.sub(v_off, k * p), k, p, eps)?;
        let r = self.lb.r;
        if cfg.norm_last_layer {
            gpu.fill(r, 1.0)?;
        } else {
            gpu.copy(r, params.sub(g_off, k))?;
        }
        gpu.launch(
            "branch_terms",
            &[
                terms[0].into(),
                terms[1].into(),
                terms[2].into(),
                r.into(),
                u(k),
                tau.into(),
                u(p),
                cfg.kind.code().into(),
                cfg.approx.code().into(),
            ],
        )
    }

    /// The `[CLS]` loss chain: teacher targets, center statistic and collapse signals, student
    /// loss and `dL/dz_s` (in `lb.dz`), prototype gradients into `grads`, center update.
    fn cls_loss_chain(&mut self, tau_t: f32) -> Result<()> {
        let cfg = self.loss_cfg;
        let lay = self.cx.lay;
        let (k, p) = (self.cx.cfg.head.out_dim, self.cx.cfg.head.bottleneck);
        let batch = self.shapes.batch;
        let n_crops = 2 + self.shapes.n_local;
        let (nt, ns) = (2 * batch, n_crops * batch);
        let tau_s = cfg.student_temp as f32;
        let eps = NORMALIZE_EPS as f32;
        let lb = &self.lb;
        let (mu_t, vn_t, terms_t) = (lb.mu_t, lb.vn_t, [lb.scale_t, lb.bias_t, lb.dbias_t]);
        let (mu_s, vn_s, terms_s) = (lb.mu_s, lb.vn_s, [lb.scale_s, lb.bias_s, lb.dbias_s]);

        // Teacher: targets with the previous center, the batch statistic, collapse signals.
        let teacher = self.teacher;
        self.branch(teacher, mu_t, vn_t, terms_t, tau_t)?;
        let student = self.student;
        self.branch(student, mu_s, vn_s, terms_s, tau_s)?;
        let lb = &self.lb;
        let gpu = &mut self.gpu;
        let cent = cfg.centering.code();
        gpu.l2norm_forward(lb.y_t, lb.zn_t, self.head_t.z(), nt, p, eps)?;
        gpu.teacher_targets(
            [lb.p_t, lb.lse_raw, lb.dots_t, lb.stat],
            lb.y_t,
            mu_t,
            lb.scale_t,
            lb.bias_t,
            self.center,
            tau_t,
            cent,
            nt,
            k,
            p,
        )?;
        let m = self.metrics;
        gpu.launch("row_entropy", &[lb.ent.into(), lb.p_t.into(), u(nt), u(k)])?;
        gpu.reduce_final(
            m.sub(M_ROW_ENT, 1),
            lb.ent,
            nt,
            1,
            RedOp::Sum,
            1.0 / nt as f32,
        )?;
        gpu.column_sum(lb.mean_raw, lb.p_t, nt, k, false)?;
        gpu.fill(lb.mean_p, 0.0)?;
        gpu.axpy(lb.mean_p, lb.mean_raw, 1.0 / nt as f32, k)?;
        gpu.launch(
            "row_entropy",
            &[m.sub(M_MEAN_ENT, 1).into(), lb.mean_p.into(), u(1), u(k)],
        )?;
        gpu.reduce_segments(lb.max_part, lb.mean_p, &lb.whole_k, RedOp::MaxAbs)?;
        gpu.reduce_final(
            m.sub(M_MAX_MASS, 1),
            lb.max_part,
            lb.whole_k.parts(),
            1,
            RedOp::MaxAbs,
            1.0,
        )?;

        // Student: logits with per-tile LSE, fused cross-entropy + gradient, backward GEMMs.
        gpu.l2norm_forward(lb.y_s, lb.zn_s, self.head_s.z(), ns, p, eps)?;
        gpu.logits_with_lse(
            lb.dots_s,
            lb.lse_part,
            lb.lse,
            lb.y_s,
            mu_s,
            lb.scale_s,
            lb.bias_s,
            ns,
            k,
            p,
        )?;
        let dr = if cfg.norm_last_layer {
            Arg::Null
        } else {
            self.grads.sub(lay.last_g, k).into()
        };
        gpu.launch(
            "xent_columns",
            &[
                lb.dots_s.into(),
                dr,
                lb.loss_part.into(),
                lb.lse.into(),
                lb.p_t.into(),
                lb.scale_s.into(),
                lb.bias_s.into(),
                lb.dbias_s.into(),
                tau_s.into(),
                u(n_crops),
                u(batch),
                u(k),
            ],
        )?;
        let gs = 1.0 / (batch * n_pairs(n_crops)).max(1) as f32;
        gpu.reduce_final(
            m.sub(M_LOSS, 1),
            lb.loss_part,
            k.div_ceil(256),
            1,
            RedOp::Sum,
            gs,
        )?;
        // dots_s now holds dL/d(dots).
        gpu.matmul_nn(lb.dy, lb.dots_s, mu_s, ns, p, k)?;
        gpu.gemm(
            &Gemm::plain(true, false, k, p, ns),
            lb.dmu,
            lb.dots_s,
            lb.y_s,
            None,
        )?;
        gpu.l2norm_backward(lb.dz, lb.dy, lb.y_s, lb.zn_s, ns, p, eps)?;
        gpu.l2norm_backward(
            self.grads.sub(lay.last_v, k * p),
            lb.dmu,
            mu_s,
            vn_s,
            k,
            p,
            eps,
        )?;

        // The center moves after the targets used the old one.
        gpu.launch(
            "center_update",
            &[
                self.center.into(),
                lb.stat.into(),
                (cfg.center_momentum as f32).into(),
                u(k),
            ],
        )
    }

    /// Per-tensor norms (and their squared sum into the metrics), clipping when `clip > 0`.
    fn clip_norms(&mut self, clip: f32) -> Result<()> {
        let gpu = &mut self.gpu;
        let s = self.clip_segs;
        let parts = s.parts();
        gpu.reduce_segments(self.clip_part, self.grads, &s, RedOp::SumSq)?;
        gpu.reduce_final(
            self.metrics.sub(M_GRAD_SQ, 1),
            self.clip_part,
            parts * s.n,
            1,
            RedOp::Sum,
            1.0,
        )?;
        if clip > 0.0 {
            gpu.launch(
                "clip_coef",
                &[
                    self.clip_coef.into(),
                    self.clip_norm.into(),
                    self.clip_part.into(),
                    u(parts),
                    u(s.n),
                    (clip as f64).into(),
                ],
            )?;
            gpu.launch_with(
                "scale_segments",
                &[
                    self.grads.into(),
                    u(self.n_params),
                    s.off.into(),
                    s.len.into(),
                    self.clip_coef.into(),
                ],
                &[("nseg", s.n as u64), ("max seg_len", s.max_len as u64)],
            )?;
        }
        Ok(())
    }

    /// AdamW over the trainable runs (the last layer skipped while frozen), then the EMA.
    fn adamw_ema(&mut self, hp: &StepHyper) -> Result<()> {
        let step = self.adam_step + 1;
        let adam = AdamW::default();
        let (lr, wd) = (hp.lr as f64, hp.weight_decay as f64);
        let gpu = &mut self.gpu;
        for r in &self.runs {
            if r.last_layer && hp.freeze_last_layer {
                continue;
            }
            let len = r.end - r.start;
            gpu.launch(
                "adamw",
                &[
                    self.student.sub(r.start, len).into(),
                    self.grads.sub(r.start, len).into(),
                    self.adam_m.sub(r.start, len).into(),
                    self.adam_v.sub(r.start, len).into(),
                    u(len),
                    lr.into(),
                    (if r.decay { wd } else { 0.0 }).into(),
                    adam.beta1.into(),
                    adam.beta2.into(),
                    adam.eps.into(),
                    Arg::U64(step),
                ],
            )?;
        }
        gpu.launch(
            "ema",
            &[
                self.teacher.into(),
                self.student.into(),
                u(self.n_params),
                (hp.teacher_momentum as f64).into(),
            ],
        )
    }

    /// The gradients of the last step (reduced and clipped after a full step).
    pub fn grads(&mut self) -> Result<Vec<f32>> {
        self.gpu.dev.bind()?;
        self.gpu.to_vec(self.grads)
    }

    fn embed_features(
        &mut self,
        net: Net,
        images: &[f32],
        n: usize,
        size: usize,
    ) -> Result<Vec<f32>> {
        let v = self.cx.cfg.vit;
        ensure!(
            v.accepts(size),
            "image size {size} is not a positive multiple of the patch size {}",
            v.patch
        );
        let img_len = v.in_chans * size * size;
        ensure!(
            images.len() == n * img_len,
            "images hold {} values, expected {n} x {img_len}",
            images.len()
        );
        let d = self.cx.d;
        let mut out = vec![0.0f32; n * d];
        if n == 0 {
            return Ok(out);
        }
        let cx = self.cx;
        if !matches!(&self.embed_group, Some(g) if g.size == size) {
            // Buffers of an older size stay allocated until the backend is dropped; runs use
            // one evaluation size.
            self.embed_group = Some(Group::new(&mut self.gpu, &cx, EMBED_CHUNK, size, false)?);
        }
        let params = match net {
            Net::Student => self.student,
            Net::Teacher => self.teacher,
        };
        let Some(g) = self.embed_group.as_ref() else {
            anyhow::bail!("embed buffers missing");
        };
        for (imgs, o) in images
            .chunks(EMBED_CHUNK * img_len)
            .zip(out.chunks_mut(EMBED_CHUNK * d))
        {
            let m = imgs.len() / img_len;
            self.gpu.upload(g.img.sub(0, imgs.len()), imgs)?;
            vit::vit_forward(&mut self.gpu, &cx, params, g, m, None, false, self.one)?;
            self.gpu.download(g.cls.sub(0, m * d), o)?;
        }
        Ok(out)
    }
}

impl<D: Device> Backend for GpuBackend<D> {
    fn name(&self) -> String {
        self.gpu.dev.name()
    }

    fn set_state(&mut self, s: &TrainState) -> Result<()> {
        check_state(s, self.n_params, self.center.len, self.ibot.is_some())?;
        self.gpu.dev.bind()?;
        self.gpu.upload(self.student, &s.student)?;
        self.gpu.upload(self.teacher, &s.teacher)?;
        self.gpu.upload(self.adam_m, &s.adam_m)?;
        self.gpu.upload(self.adam_v, &s.adam_v)?;
        self.gpu.upload(self.center, &s.center)?;
        if let Some(ib) = &self.ibot {
            self.gpu.upload(ib.center, &s.patch_center)?;
        }
        self.adam_step = s.adam_step;
        Ok(())
    }

    fn state(&mut self) -> Result<TrainState> {
        self.gpu.dev.bind()?;
        Ok(TrainState {
            student: self.gpu.to_vec(self.student)?,
            teacher: self.gpu.to_vec(self.teacher)?,
            adam_m: self.gpu.to_vec(self.adam_m)?,
            adam_v: self.gpu.to_vec(self.adam_v)?,
            center: self.gpu.to_vec(self.center)?,
            patch_center: match &self.ibot {
                Some(ib) => self.gpu.to_vec(ib.center)?,
                None => Vec::new(),
            },
            adam_step: self.adam_step,
        })
    }

    fn train_step(&mut self, batch: &Batch, hp: &StepHyper) -> Result<StepMetrics> {
        self.gpu.dev.bind()?;
        step::train_step(self, batch, hp)
    }

    fn embed(&mut self, net: Net, images: &[f32], n: usize, size: usize) -> Result<Vec<f32>> {
        self.gpu.dev.bind()?;
        self.embed_features(net, images, n, size)
    }
}
