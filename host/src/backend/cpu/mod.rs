//! The CPU backend: all cores through rayon, matrix products through one GEMM driver.
//!
//! One training step is a pure function of (state, batch, hyper-parameters): drop-path masks come
//! from a ChaCha8 stream seeded by `StepHyper::seed`, every GEMM splits its parallel work over
//! output tiles only (fixed summation order along k), and every reduction over rows runs over a
//! fixed partition (see `rows`). Results are bit-identical run to run, whatever the scheduling.
//!
//! Every activation and scratch buffer of the step is allocated once, in [`CpuBackend::new`]
//! (the GEMMs' packing memory: allocated once and reused, in `gemm_f32` and `gemm_bf16`), so a warm
//! one-rank step allocates nothing (`tests/step_allocations.rs` asserts it). With several ranks
//! the collective (and Sinkhorn-Knopp's gather of the column maxima, `reduce::SinkhornOver`)
//! still allocate.
use std::time::Instant;

use anyhow::{bail, ensure, Result};
use rayon::prelude::*;

use dinovmf_core::loss::LossConfig;
use dinovmf_core::model::{for_each_param, num_params, ModelConfig};
use dinovmf_core::optim::{adamw_step, ema_update, l2_norm, AdamW};

use super::step::{self, check_state, StepMasks, PHASES};
use super::{
    Backend, BackendConfig, Collective, Net, SingleProcess, StepHyper, StepMetrics, StepShapes,
    TrainState,
};
use crate::data::Batch;

mod attention;
mod conv_stem;
pub mod fastmath;
pub mod gemm;
pub mod gemm_bf16;
pub mod gemm_f32;
mod head;
mod ibot;
pub mod koleo;
pub mod loss;
mod loss_rows;
mod mim;
mod passes;
mod probe;
mod rows;
mod shards;
mod sinkhorn;
mod vit;

pub use shards::ShardedCpu;

use head::HeadBufs;
use loss::LossBufs;
use vit::{BackScratch, Cx, Group};

/// One parameter tensor of the flat layout, as the optimiser needs it.
#[derive(Clone, Copy, Debug)]
struct Tensor {
    start: usize,
    end: usize,
    decay: bool,
    last_layer: bool,
    trainable: bool,
}

/// Images per forward in [`Backend::embed`] (bounds its buffers).
const EMBED_CHUNK: usize = 64;
/// Elements per parallel task of the optimiser passes.
const OPT_CHUNK: usize = 1 << 14;

pub struct CpuBackend {
    cx: Cx,
    loss_cfg: LossConfig,
    shapes: StepShapes,
    reducer: Box<dyn Collective>,
    tensors: Vec<Tensor>,
    norms: Vec<f64>,
    student: Vec<f32>,
    teacher: Vec<f32>,
    adam_m: Vec<f32>,
    adam_v: Vec<f32>,
    center: Vec<f32>,
    next_center: Vec<f32>,
    adam_step: u64,
    grads: Vec<f32>,
    /// The batch's crops, copied in by the upload pass.
    img_g: Vec<f32>,
    img_l: Vec<f32>,
    glob: Group,
    loc: Option<Group>,
    back: BackScratch,
    head_s: HeadBufs,
    head_t: HeadBufs,
    /// Head inputs: the student's `[CLS]` rows of every crop (iBOT: then the masked patch
    /// rows), the teacher's `[CLS]` rows of the global crops (iBOT: then every patch row).
    x_s: Vec<f32>,
    x_t: Vec<f32>,
    /// The head backward's gradient at `x_s`.
    dx_s: Vec<f32>,
    hs0: Vec<f32>,
    hs1: Vec<f32>,
    partials: Vec<f32>,
    lossb: LossBufs,
    /// The step's masks as drawn, and its drop-path factors `mask / keep`.
    masks: StepMasks,
    mask_g: Vec<f32>,
    mask_l: Vec<f32>,
    /// What the last step's losses and clipping reported.
    /// The metrics of the last step so far (`grad_norm` is set by [`step::train_step`]'s
    /// reduce phase; [`Self::compute_gradients`] stops before it and reports 0).
    report: StepMetrics,
    grad_norm: f64,
    embed_group: Option<Group>,
    phase: [f64; PHASES.len()],
    clock: Instant,
    /// KoLeo-proto weight (0 = off) and the last step's value.
    koleo_proto: f32,
    koleo_loss: Option<f32>,
    /// KoLeo-on-features weight (0 = off) and its scratch.
    koleo: f32,
    koleo_scratch: Vec<f32>,
    /// With several ranks: one view's feature rows of the whole batch, then their KoLeo
    /// gradient (`2 [ranks B, d]`).
    koleo_gathered: Vec<f32>,
    /// iBOT's buffers and patch center (see [`CpuBackend::with_ibot`]); `None` for DINO.
    ibot: Option<ibot::IbotCpu>,
    /// With several ranks: the batch statistics the reduce phase averages over them (the
    /// center's, the mean teacher distribution, two scalars; iBOT: the patch center's and two
    /// more), `3 K + 4` values at most, allocated once.
    reduce_stats: Vec<f32>,
}

/// Masks to the factors `mask / keep` the forward multiplies by (as core's drop path, in f32).
fn masks_to_scales(model: &ModelConfig, masks: &mut [f32], n: usize) {
    for i in 0..model.vit.depth {
        let keep = model.vit.keep_prob(i) as f32;
        for m in masks[2 * i * n..(2 * i + 2) * n].iter_mut() {
            if keep > 0.0 {
                *m /= keep;
            }
        }
    }
}

impl CpuBackend {
    pub fn new(
        model: ModelConfig,
        loss: LossConfig,
        shapes: StepShapes,
        reducer: Box<dyn Collective>,
    ) -> Result<Self> {
        shapes.validate(&model, &loss)?;
        let cx = Cx::new(&model);
        let b = shapes.batch;
        let (d, k, p) = (cx.d, model.head.out_dim, model.head.bottleneck);
        let n = num_params(&model);
        let mut tensors = Vec::new();
        for_each_param(&model, |s| {
            tensors.push(Tensor {
                start: s.offset,
                end: s.offset + s.numel,
                decay: s.decay,
                last_layer: s.last_layer,
                trainable: s.trainable,
            })
        });
        let n_g = 2 * b;
        let n_l = shapes.n_local * b;
        let rows_s = n_g + n_l;
        let (c, gs, ls) = (model.vit.in_chans, shapes.global_size, shapes.local_size);
        let glob = Group::new(&cx, n_g, shapes.global_size, true);
        let loc = (shapes.n_local > 0).then(|| Group::new(&cx, n_l, shapes.local_size, true));
        let mut groups = vec![(n_g, glob.size)];
        if let Some(l) = &loc {
            groups.push((n_l, l.size));
        }
        let back = BackScratch::new(&cx, &groups);
        let hw = head::max_width(&cx);
        let mut center = vec![0.0; k];
        dinovmf_core::centering::center_init(&mut center, loss.centering);
        Ok(Self {
            loss_cfg: loss,
            shapes,
            reducer,
            norms: vec![0.0; tensors.len()],
            tensors,
            student: vec![0.0; n],
            teacher: vec![0.0; n],
            adam_m: vec![0.0; n],
            adam_v: vec![0.0; n],
            next_center: center.clone(),
            center,
            adam_step: 0,
            grads: vec![0.0; n],
            img_g: vec![0.0; n_g * c * gs * gs],
            img_l: vec![0.0; n_l * c * ls * ls],
            glob,
            loc,
            back,
            head_s: HeadBufs::new(&cx, rows_s),
            head_t: HeadBufs::new(&cx, n_g),
            x_s: vec![0.0; rows_s * d],
            x_t: vec![0.0; n_g * d],
            dx_s: vec![0.0; rows_s * d],
            hs0: vec![0.0; rows_s * hw],
            hs1: vec![0.0; rows_s * hw],
            partials: vec![0.0; rows::n_chunks(rows_s) * hw],
            lossb: LossBufs::new(2 + shapes.n_local, b, k, p),
            masks: StepMasks::new(&model, &shapes, false),
            mask_g: vec![0.0; model.vit.depth * 2 * n_g],
            mask_l: vec![0.0; model.vit.depth * 2 * n_l],
            report: StepMetrics::default(),
            grad_norm: 0.0,
            embed_group: None,
            phase: [0.0; PHASES.len()],
            clock: Instant::now(),
            koleo_proto: 0.0,
            koleo_loss: None,
            koleo: 0.0,
            koleo_scratch: Vec::new(),
            koleo_gathered: Vec::new(),
            ibot: None,
            reduce_stats: Vec::with_capacity(3 * k + 4),
            cx,
        })
    }

    /// The backend of `cfg` (iBOT's when it has iBOT settings), single process.
    pub fn open(cfg: &BackendConfig) -> Result<Self> {
        Self::open_rank(cfg, Box::new(SingleProcess))
    }

    /// The backend of one rank of a data-parallel run over `collective`: `cfg` describes the
    /// whole batch, this backend runs `cfg.shapes.batch / ranks` of it.
    pub fn open_rank(cfg: &BackendConfig, collective: Box<dyn Collective>) -> Result<Self> {
        let ranks = collective.world_size();
        let mut shapes = cfg.shapes;
        ensure!(
            shapes.batch.is_multiple_of(ranks) && shapes.batch >= ranks,
            "a batch of {} cannot be split over {ranks} ranks: use a --batch-size that is a \
             multiple of {ranks}",
            shapes.batch
        );
        shapes.batch /= ranks;
        let mut be = Self::new(cfg.model, cfg.loss, shapes, collective)?;
        be.cx.prec = cfg.precision;
        match cfg.ibot {
            Some(ib) => be.with_ibot(ib),
            None => Ok(be),
        }
    }

    pub fn model(&self) -> &ModelConfig {
        &self.cx.cfg
    }

    /// Seconds spent in each of [`PHASES`] since the last [`Self::reset_phase_seconds`].
    pub fn phase_seconds(&self) -> [(&'static str, f64); PHASES.len()] {
        let mut out = [("", 0.0); PHASES.len()];
        for (o, (n, s)) in out.iter_mut().zip(PHASES.iter().zip(self.phase)) {
            *o = (n, s);
        }
        out
    }

    pub fn reset_phase_seconds(&mut self) {
        self.phase = [0.0; PHASES.len()];
    }

    /// Everything of a step up to the raw (unreduced, unclipped) gradients (see
    /// [`step::gradients`]). Leaves the state unchanged; the gradients are in [`Self::grads`],
    /// the features in [`Self::student_z`] / [`Self::teacher_z`], the center the step would
    /// move to in [`Self::next_center`]. The metrics are a full step's, with `grad_norm` 0 (no
    /// reduction has run).
    pub fn compute_gradients(&mut self, batch: &Batch, hp: &StepHyper) -> Result<StepMetrics> {
        step::gradients(self, batch, hp)?;
        Ok(self.report)
    }

    /// The flat gradient buffer of the last [`Self::compute_gradients`] (after a full step:
    /// reduced and clipped).
    pub fn grads(&self) -> &[f32] {
        &self.grads
    }

    /// Student bottleneck outputs `z[(2 + n_local) B, p]`, crop-major, of the last step.
    pub fn student_z(&self) -> &[f32] {
        self.head_s.z()
    }

    /// Teacher bottleneck outputs `z[2B, p]` of the last step (iBOT: then every patch row).
    pub fn teacher_z(&self) -> &[f32] {
        self.head_t.z()
    }

    /// The center the last computed step moves to.
    pub fn next_center(&self) -> &[f32] {
        &self.next_center
    }

    /// The patch center the last computed iBOT step moves to (empty for DINO).
    pub fn next_patch_center(&self) -> &[f32] {
        self.ibot.as_ref().map_or(&[][..], |ib| &ib.next_center[..])
    }

    /// Per-tensor clipping (DINO semantics, over trainable tensors); returns the global norm
    /// before clipping. `clip <= 0` only measures.
    fn clip_norms(&mut self, clip: f32) -> f64 {
        let grads = &self.grads;
        self.norms
            .par_iter_mut()
            .zip(self.tensors.par_iter())
            .for_each(|(n, t)| {
                *n = if t.trainable {
                    l2_norm(&grads[t.start..t.end])
                } else {
                    0.0
                }
            });
        let mut sq = 0.0f64;
        for (n, t) in self.norms.iter().zip(&self.tensors) {
            if t.trainable {
                sq += n * n;
            }
        }
        if clip > 0.0 {
            let clip = clip as f64;
            for (&n, t) in self.norms.iter().zip(&self.tensors) {
                let coef = clip / (n + 1e-6);
                if t.trainable && coef < 1.0 {
                    let c = coef as f32;
                    self.grads[t.start..t.end]
                        .par_chunks_mut(OPT_CHUNK)
                        .for_each(|g| g.iter_mut().for_each(|x| *x *= c));
                }
            }
        }
        sq.sqrt()
    }

    /// AdamW over every trainable tensor (decay only where the layout says so; the last layer
    /// skipped entirely while frozen), then the teacher EMA over every parameter.
    fn adamw_ema(&mut self, hp: &StepHyper) {
        let step = self.adam_step + 1;
        let adam = AdamW::default();
        let (lr, wd) = (hp.lr as f64, hp.weight_decay as f64);
        let tensors = &self.tensors;
        let freeze = hp.freeze_last_layer;
        self.student
            .par_chunks_mut(OPT_CHUNK)
            .zip(self.grads.par_chunks(OPT_CHUNK))
            .zip(self.adam_m.par_chunks_mut(OPT_CHUNK))
            .zip(self.adam_v.par_chunks_mut(OPT_CHUNK))
            .enumerate()
            .for_each(|(c, (((p, g), m), v))| {
                let a = c * OPT_CHUNK;
                let b = a + p.len();
                let first = tensors.partition_point(|t| t.end <= a);
                for t in tensors[first..].iter().take_while(|t| t.start < b) {
                    if !t.trainable || (t.last_layer && freeze) {
                        continue;
                    }
                    let (s, e) = (t.start.max(a) - a, t.end.min(b) - a);
                    let w = if t.decay { wd } else { 0.0 };
                    adamw_step(
                        &mut p[s..e],
                        &g[s..e],
                        &mut m[s..e],
                        &mut v[s..e],
                        &adam,
                        lr,
                        w,
                        step,
                    );
                }
            });
        let mom = hp.teacher_momentum as f64;
        self.teacher
            .par_chunks_mut(OPT_CHUNK)
            .zip(self.student.par_chunks(OPT_CHUNK))
            .for_each(|(t, s)| ema_update(t, s, mom));
    }

    fn embed_features(
        &mut self,
        net: Net,
        images: &[f32],
        n: usize,
        size: usize,
    ) -> Result<Vec<f32>> {
        let v = &self.cx.cfg.vit;
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
        let reuse = matches!(&self.embed_group, Some(g) if g.size == size);
        if !reuse {
            self.embed_group = Some(Group::new(&cx, EMBED_CHUNK, size, false));
        }
        let params = match net {
            Net::Student => &self.student,
            Net::Teacher => &self.teacher,
        };
        let Some(g) = self.embed_group.as_mut() else {
            bail!("embed buffers missing");
        };
        for (imgs, o) in images
            .chunks(EMBED_CHUNK * img_len)
            .zip(out.chunks_mut(EMBED_CHUNK * d))
        {
            let m = imgs.len() / img_len;
            vit::forward(&cx, params, g, imgs, m, None, false);
            o.copy_from_slice(&g.cls[..m * d]);
        }
        Ok(out)
    }
}

impl Backend for CpuBackend {
    fn name(&self) -> String {
        format!("cpu ({} threads)", rayon::current_num_threads())
    }

    fn time_phases(&mut self) -> bool {
        self.reset_phase_seconds();
        true
    }

    fn phase_times(&self) -> Option<Vec<(&'static str, f64)>> {
        Some(self.phase_seconds().to_vec())
    }

    fn set_state(&mut self, s: &TrainState) -> Result<()> {
        check_state(
            s,
            self.student.len(),
            self.center.len(),
            self.ibot.is_some(),
        )?;
        self.student.copy_from_slice(&s.student);
        self.teacher.copy_from_slice(&s.teacher);
        self.adam_m.copy_from_slice(&s.adam_m);
        self.adam_v.copy_from_slice(&s.adam_v);
        self.center.copy_from_slice(&s.center);
        if let Some(ib) = self.ibot.as_mut() {
            ib.center.copy_from_slice(&s.patch_center);
        }
        self.adam_step = s.adam_step;
        Ok(())
    }

    fn state(&mut self) -> Result<TrainState> {
        Ok(TrainState {
            student: self.student.clone(),
            teacher: self.teacher.clone(),
            adam_m: self.adam_m.clone(),
            adam_v: self.adam_v.clone(),
            center: self.center.clone(),
            patch_center: self
                .ibot
                .as_ref()
                .map_or_else(Vec::new, |ib| ib.center.clone()),
            adam_step: self.adam_step,
        })
    }

    fn train_step(&mut self, batch: &Batch, hp: &StepHyper) -> Result<StepMetrics> {
        // One rank: the whole step runs on one worker of the current rayon pool (at once when
        // called from one), so its parallel loops start from that worker's own queue. Called
        // from outside the pool (`dinovmf train`'s main thread), each loop would otherwise be
        // handed in through the pool's injector queue, which allocates a block per 63 jobs; now
        // only the step itself is, once per step. Not with several ranks: their collectives
        // block until every rank arrives, and a worker waiting inside one rank's step may pick
        // up another rank's step from the queue and run it beneath, which then never returns.
        if self.reducer.world_size() == 1 {
            rayon::scope(|_| step::train_step(self, batch, hp))
        } else {
            step::train_step(self, batch, hp)
        }
    }

    fn embed(&mut self, net: Net, images: &[f32], n: usize, size: usize) -> Result<Vec<f32>> {
        self.embed_features(net, images, n, size)
    }

    fn embed_blocks(
        &mut self,
        net: Net,
        images: &[f32],
        n: usize,
        size: usize,
        blocks: usize,
    ) -> Result<Vec<f32>> {
        self.block_features(net, images, n, size, blocks)
    }

    fn cls_attention(
        &mut self,
        net: Net,
        images: &[f32],
        n: usize,
        size: usize,
    ) -> Result<Vec<f32>> {
        CpuBackend::cls_attention(self, net, images, n, size)
    }

    fn set_koleo_proto(&mut self, weight: f32) -> Result<()> {
        ensure!(
            weight.is_finite() && weight >= 0.0,
            "--koleo-proto must be a finite weight >= 0, got {weight}"
        );
        self.koleo_proto = weight;
        self.koleo_loss = None;
        Ok(())
    }

    fn koleo_proto_loss(&self) -> Option<f32> {
        self.koleo_loss
    }

    fn set_koleo(&mut self, weight: f32) -> Result<()> {
        ensure!(
            weight.is_finite() && weight >= 0.0,
            "--koleo must be a finite weight >= 0, got {weight}"
        );
        self.koleo = weight;
        let world = self.reducer.world_size();
        // Nearest neighbours are over the whole batch: `world` ranks' rows.
        let (n, d) = (world * self.shapes.batch, self.cx.d);
        self.koleo_scratch = vec![0.0; dinovmf_core::koleo::koleo_scratch_len(n, d)];
        self.koleo_gathered = match world {
            1 => Vec::new(),
            _ => vec![0.0; 2 * n * d],
        };
        Ok(())
    }

    fn traffic(&self) -> Option<(u64, f64)> {
        (self.reducer.world_size() > 1).then(|| self.reducer.traffic())
    }
}
