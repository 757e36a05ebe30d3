//! The training step on a [`Device`]: [`GpuBackend`] keeps parameters, teacher, AdamW moments,
//! gradients, center and every activation resident; a step uploads the batch (and the
//! drop-path masks, a few floats drawn on the host exactly as the CPU backend draws them),
//! launches the whole step, and downloads one small metrics buffer: the step's only sync.
//!
//! The order of the phases is `backend/step.rs`'s; this backend's passes (`passes.rs`) run them
//! as launches: the fused loss chain of `ptx/src/kernels/head.rs` (`cuda/loss.rs`, a free
//! function over this backend's buffers; iBOT's patch loss in `ibot.rs`), head and backbone backward, gradient reduction, per-tensor clipping, AdamW
//! (decay groups, frozen last layer) and teacher EMA (`optim.rs`), center update.
//!
//! Collapse signals stay on the device too: `row_entropy` (mean row entropy of `P_t` and the
//! entropy of its batch mean), a column sum (the batch mean), a max reduction (its largest
//! mass). Data parallelism runs through a device-side collective (NCCL, `step/ranks.rs`,
//! [`GpuBackend::with_device_ranks`]); a host [`Collective`] of more than one rank is refused.
use anyhow::{ensure, Result};

use dinovmf_core::centering::center_init;
use dinovmf_core::loss::{LossConfig, LossDims};
use dinovmf_core::model::{for_each_param, num_params, ModelConfig};

use super::device::{Buf, Device, Gpu};
use super::head::{self, HeadBufs};
use super::loss::LossBufs;
use super::ops::Segments;
use super::vit::{self, BackScratch, Cx, Group};
use crate::backend::step::{self, check_state, StepMasks, PHASES};
use crate::backend::{Backend, Collective, Net, StepHyper, StepMetrics, StepShapes, TrainState};
use crate::data::Batch;

mod ibot;
mod optim;
mod passes;
mod ranks;

use optim::Run;

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

/// The CUDA backend's training step on any [`Device`] (the driver, or the host simulator).
pub struct GpuBackend<D: Device> {
    gpu: Gpu<D>,
    cx: Cx,
    loss_cfg: LossConfig,
    shapes: StepShapes,
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
    /// KoLeo on the student's [CLS] features (`--koleo`; 0 = off): weight and host scratch.
    koleo: KoleoHost,
    /// Phase timing (`Backend::time_phases`): the clock of the current phase and the seconds
    /// per phase so far; `None` when off (then no phase waits for the device).
    phase_timer: Option<(std::time::Instant, [f64; PHASES.len()])>,
    /// Data parallelism: this rank's device collective and reduce buffers (`None`: one rank).
    ranks: Option<ranks::RankBufs>,
}

/// KoLeo on features runs on the host through core's `koleo_forward_backward`: the 2B [CLS]
/// rows (B x d floats per view) go down after the head backward and their gradient comes back
/// up. It is a few KB per step and keeps core as the one formula.
#[derive(Default)]
struct KoleoHost {
    weight: f32,
    x: Vec<f32>,
    dx: Vec<f32>,
    scratch: Vec<f32>,
}

impl<D: Device> GpuBackend<D> {
    /// The same backend with its matrix products in `p` (f32 by default; see
    /// [`MatmulPrecision`](super::ops::MatmulPrecision)).
    pub fn with_precision(mut self, p: super::ops::MatmulPrecision) -> Self {
        self.gpu.precision = p;
        self
    }

    pub fn new(
        dev: D,
        model: ModelConfig,
        loss: LossConfig,
        shapes: StepShapes,
        reducer: Box<dyn Collective>,
    ) -> Result<Self> {
        shapes.validate(&model, &loss)?;
        ensure!(
            model.vit.stem_convs == 0,
            "the CUDA backend has no convolutional stem yet (--stem-convs {}, the small presets' default): pass --stem-convs 0 for DINO's patch embedding on the GPU, or train on the CPU (--device cpu)",
            model.vit.stem_convs
        );
        ensure!(
            reducer.world_size() == 1,
            "data-parallel training ({} ranks) on the CUDA backend reduces on the device: \
             give it a device collective (NCCL, `with_device_ranks`), not a host one",
            reducer.world_size()
        );
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
        let hw = head::head_width(&cx);
        let mut center0 = vec![0.0f32; k];
        center_init(&mut center0, loss.centering);
        let center = gpu.alloc_from(&center0)?;
        let one = gpu.alloc_from(&[1.0f32])?;
        let dims = LossDims {
            n_crops: 2 + shapes.n_local,
            batch: b,
            k,
            p,
        };
        let lb = LossBufs::new(&mut gpu, dims)?;
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
            koleo: KoleoHost::default(),
            phase_timer: None,
            ranks: None,
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

impl<D: Device> GpuBackend<D> {
    /// Adds KoLeo's gradient (per global view) to the head input gradient `dx_s` rows 0..2B.
    pub(super) fn add_koleo(&mut self) -> Result<()> {
        let w = self.koleo.weight;
        if w == 0.0 {
            return Ok(());
        }
        if self.ranks.is_some() {
            return self.add_koleo_over_ranks(w);
        }
        let (b, d) = (self.shapes.batch, self.cx.d);
        let n = 2 * b * d;
        let k = &mut self.koleo;
        self.gpu.download(self.x_s.sub(0, n), &mut k.x)?;
        self.gpu.download(self.dx_s.sub(0, n), &mut k.dx)?;
        for v in 0..2 {
            let r = v * b * d..(v + 1) * b * d;
            dinovmf_core::koleo::koleo_forward_backward(
                &k.x[r.clone()],
                b,
                d,
                &mut k.scratch,
                Some((&mut k.dx[r], w)),
            );
        }
        self.gpu.upload(self.dx_s.sub(0, n), &k.dx)
    }
}

impl<D: Device> Backend for GpuBackend<D> {
    fn name(&self) -> String {
        self.gpu.dev.name()
    }

    fn time_phases(&mut self) -> bool {
        self.phase_timer = Some((std::time::Instant::now(), [0.0; PHASES.len()]));
        true
    }

    fn phase_times(&self) -> Option<Vec<(&'static str, f64)>> {
        let (_, secs) = self.phase_timer.as_ref()?;
        Some(PHASES.iter().copied().zip(secs.iter().copied()).collect())
    }

    fn device_bytes(&self) -> Option<usize> {
        Some(self.gpu.allocated)
    }

    fn set_koleo(&mut self, weight: f32) -> Result<()> {
        ensure!(
            weight.is_finite() && weight >= 0.0,
            "--koleo must be a finite weight >= 0, got {weight}"
        );

        let (b, d) = (self.shapes.batch, self.cx.d);
        self.koleo = KoleoHost {
            weight,
            x: vec![0.0; 2 * b * d],
            dx: vec![0.0; 2 * b * d],
            scratch: vec![0.0; dinovmf_core::koleo::koleo_scratch_len(b, d)],
        };
        Ok(())
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

    fn traffic(&self) -> Option<(u64, f64)> {
        self.ranks.as_ref().map(|r| r.coll.traffic())
    }
}
