//! Model configuration (ViT backbone + DINO head) and the flat parameter layout.
//!
//! Every backend keeps the parameters in ONE flat f32 buffer; this file fixes what each slice of
//! it means, under names and shapes that follow timm / DINO (`backbone.*` and `head.*`, as in
//! DINO's `MultiCropWrapper`), in the order of PyTorch's `named_parameters()`. A checkpoint is
//! therefore the same thing on every backend and maps 1:1 onto a PyTorch state dict.
use crate::Real;
use core::fmt::Write;

/// `b` divides `a` (and is not 0).
const fn divisible(a: usize, b: usize) -> bool {
    b != 0 && a / b * b == a
}

/// Vision Transformer backbone (DINO's `VisionTransformer`, no classifier).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct VitConfig {
    /// Side of the base (global) crop in pixels; the position embedding is stored for it.
    pub img_size: usize,
    pub patch: usize,
    pub in_chans: usize,
    pub dim: usize,
    pub depth: usize,
    pub heads: usize,
    pub mlp_ratio: usize,
    pub qkv_bias: bool,
    pub ln_eps: f64,
    /// Largest drop-path rate (the last block's); rates grow linearly from 0 over depth.
    pub drop_path: f32,
    /// Convolutional stem (an option outside DINO's ViT; a change of method recorded in
    /// docs/quality.md, "Sixth round"):
    /// 0 = DINO's patch embedding. `n > 0`: `log2(P)` stages of `n` 3 x 3 convolutions each
    /// (padding 1; the first of a stage has stride 2, the others stride 1), each followed by
    /// GELU, stage `s` with `D / 2^(S-1-s)` channels; the patch embedding is then a 1 x 1
    /// convolution (`D -> D`) on the stem's `(H/P) x (W/P)` map, so the token grid is unchanged.
    pub stem_convs: usize,
}

/// One 3 x 3 convolution of the stem (see [`VitConfig::stem_convs`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StemLayer {
    pub c_in: usize,
    pub c_out: usize,
    /// 2 for the first convolution of a stage, else 1.
    pub stride: usize,
}

/// What fixes the stem's shapes (a part of [`VitConfig`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StemShape {
    pub in_chans: usize,
    pub dim: usize,
    pub patch: usize,
    /// Convolutions per stage (0: no stem).
    pub convs: usize,
}

impl StemShape {
    /// Stride-2 stages: `log2(P)` with a stem, else 0.
    pub const fn stages(&self) -> usize {
        if self.convs > 0 && self.patch > 0 {
            self.patch.trailing_zeros() as usize
        } else {
            0
        }
    }
    pub const fn len(&self) -> usize {
        self.stages() * self.convs
    }
    pub const fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Channels of stage `s`: `D / 2^(S-1-s)`.
    pub const fn channels(&self, s: usize) -> usize {
        self.dim >> (self.stages() - 1 - s)
    }
    /// Convolution `i` (`i < len()`).
    pub const fn layer(&self, i: usize) -> StemLayer {
        let n = self.convs;
        let (s, j) = (i / n, i % n);
        let c_in = if i == 0 {
            self.in_chans
        } else {
            self.channels((i - 1) / n)
        };
        StemLayer {
            c_in,
            c_out: self.channels(s),
            stride: if j == 0 { 2 } else { 1 },
        }
    }
    /// Parameters of convolutions `0..i` (weights and biases): where convolution `i` starts,
    /// counted from the stem's first tensor.
    pub const fn params_before(&self, i: usize) -> usize {
        let mut n = 0;
        let mut k = 0;
        while k < i {
            let l = self.layer(k);
            n += l.c_out * l.col_len() + l.c_out;
            k += 1;
        }
        n
    }
}

impl StemLayer {
    /// Inputs of one output pixel, `C_in 3 3` (a row of the im2col matrix).
    pub const fn col_len(&self) -> usize {
        self.c_in * 9
    }
}

impl VitConfig {
    /// Patches per side of the base grid.
    pub const fn grid(&self) -> usize {
        self.img_size / self.patch
    }
    /// Patches of a crop of side `img` pixels (its grid squared).
    pub const fn num_patches_for(&self, img: usize) -> usize {
        (img / self.patch) * (img / self.patch)
    }
    /// Tokens of the base grid, `[CLS]` included: the rows of `pos_embed`.
    pub const fn num_tokens(&self) -> usize {
        self.grid() * self.grid() + 1
    }
    pub const fn head_dim(&self) -> usize {
        self.dim / self.heads
    }
    pub const fn mlp_hidden(&self) -> usize {
        self.dim * self.mlp_ratio
    }
    /// Inputs of one patch, `C P P`; with a stem, the 1 x 1 convolution's `D`.
    pub const fn patch_len(&self) -> usize {
        self.embed_in_chans() * self.embed_patch() * self.embed_patch()
    }
    /// Channels the patch embedding reads: the image's, or the stem's last stage (`D`).
    pub const fn embed_in_chans(&self) -> usize {
        if self.stem_convs > 0 {
            self.dim
        } else {
            self.in_chans
        }
    }
    /// Kernel of the patch embedding: `P`, or 1 after a stem (which does all the downsampling).
    pub const fn embed_patch(&self) -> usize {
        if self.stem_convs > 0 {
            1
        } else {
            self.patch
        }
    }
    /// Stride-2 stages of the stem: `log2(P)` with a stem, else 0.
    pub const fn stem_stages(&self) -> usize {
        self.stem().stages()
    }
    /// Convolutions of the stem (0 without one).
    pub const fn stem_len(&self) -> usize {
        self.stem().len()
    }
    /// Stem convolution `i` (`i < stem_len()`).
    pub const fn stem_layer(&self, i: usize) -> StemLayer {
        self.stem().layer(i)
    }
    /// The numbers that fix the stem's shapes.
    pub const fn stem(&self) -> StemShape {
        StemShape {
            in_chans: self.in_chans,
            dim: self.dim,
            patch: self.patch,
            convs: self.stem_convs,
        }
    }
    /// Whether a crop of side `img` can be embedded (a whole number of patches, at least one).
    pub const fn accepts(&self, img: usize) -> bool {
        img >= self.patch && divisible(img, self.patch)
    }
    /// Keep probability of block `i`'s two drop-path branches (`1 - rate_i`, rates linear in
    /// depth as [`crate::ops::drop_path_rates`]).
    pub fn keep_prob(&self, i: usize) -> f64 {
        if self.depth > 1 {
            1.0 - self.drop_path as f64 * i as f64 / (self.depth - 1) as f64
        } else {
            1.0
        }
    }
}

/// DINO head: MLP `in -> hidden -> ... -> bottleneck` (GELU between, `n_layers` linears),
/// then `y = z / ||z||` and the weight-normalised prototype layer `v [K, p]`, `g [K]`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HeadConfig {
    pub hidden: usize,
    /// p: the dimension of the sphere the prototypes live on.
    pub bottleneck: usize,
    pub n_layers: usize,
    /// K: the number of prototypes.
    pub out_dim: usize,
    /// Fix `g = 1` (DINO's stable setting). Without it `g` is learned (needed for vMF).
    pub norm_last_layer: bool,
}

impl HeadConfig {
    /// `(d_in, d_out)` of MLP linear `l` given the backbone width.
    pub const fn layer_dims(&self, in_dim: usize, l: usize) -> (usize, usize) {
        let d_in = if l == 0 { in_dim } else { self.hidden };
        let d_out = if l + 1 == self.n_layers {
            self.bottleneck
        } else {
            self.hidden
        };
        (d_in, d_out)
    }
}

/// Parameters only masked image modelling (iBOT) needs. Both off for DINO, which keeps a DINO
/// model's layout, initialisation and checkpoints exactly as they were.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct IbotParts {
    /// `backbone.masked_embed [1, D]`: the learned token that replaces masked patch embeddings.
    pub mask_token: bool,
    /// `head.last_layer2.{weight_g, weight_v}`: patch tokens get their own prototype layer (same
    /// K and p); without it they share `head.last_layer` with `[CLS]` (iBOT's `shared_head`).
    pub separate_patch_head: bool,
}

impl IbotParts {
    /// DINO: neither part.
    pub const NONE: Self = Self {
        mask_token: false,
        separate_patch_head: false,
    };
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ModelConfig {
    pub vit: VitConfig,
    pub head: HeadConfig,
    pub ibot: IbotParts,
}

impl ModelConfig {
    /// Tiny model for gradient checks: 12 px images, patch 4 (a 3 x 3 grid, T = 10 tokens;
    /// 8 px local crops give 2 x 2, T = 5), dim 8, depth 2, 2 heads, head 16/8, K = 12.
    pub const fn tiny_test() -> Self {
        Self {
            vit: VitConfig {
                img_size: 12,
                patch: 4,
                in_chans: 3,
                dim: 8,
                depth: 2,
                heads: 2,
                mlp_ratio: 4,
                qkv_bias: true,
                ln_eps: 1e-6,
                drop_path: 0.1,
                stem_convs: 0,
            },
            head: HeadConfig {
                hidden: 16,
                bottleneck: 8,
                n_layers: 3,
                out_dim: 12,
                norm_last_layer: false,
            },
            ibot: IbotParts::NONE,
        }
    }

    /// The project default for 32 px images: patch 4 (8 x 8 grid), dim 96, depth 4, 3 heads;
    /// head 512 / 128, K = 4096.
    pub const fn small32() -> Self {
        Self {
            vit: VitConfig {
                img_size: 32,
                patch: 4,
                in_chans: 3,
                dim: 96,
                depth: 4,
                heads: 3,
                mlp_ratio: 4,
                qkv_bias: true,
                ln_eps: 1e-6,
                drop_path: 0.1,
                stem_convs: 0,
            },
            head: HeadConfig {
                hidden: 512,
                bottleneck: 128,
                n_layers: 3,
                out_dim: 4096,
                norm_last_layer: true,
            },
            ibot: IbotParts::NONE,
        }
    }

    /// ViT-S/16 with the paper's head (2048 / 256, K = 65536).
    pub const fn vit_s16() -> Self {
        Self {
            vit: VitConfig {
                img_size: 224,
                patch: 16,
                in_chans: 3,
                dim: 384,
                depth: 12,
                heads: 6,
                mlp_ratio: 4,
                qkv_bias: true,
                ln_eps: 1e-6,
                drop_path: 0.1,
                stem_convs: 0,
            },
            head: HeadConfig {
                hidden: 2048,
                bottleneck: 256,
                n_layers: 3,
                out_dim: 65536,
                norm_last_layer: true,
            },
            ibot: IbotParts::NONE,
        }
    }

    /// ViT-B/16 (768, 12 blocks, 12 heads) with the paper's head.
    pub const fn vit_b16() -> Self {
        let mut c = Self::vit_s16();
        c.vit.dim = 768;
        c.vit.heads = 12;
        c
    }

    /// Same model with `norm_last_layer` set (`false` for DINO-vMF's learned `g`).
    pub const fn with_norm_last_layer(mut self, on: bool) -> Self {
        self.head.norm_last_layer = on;
        self
    }

    /// Same model with a convolutional stem of `convs` convolutions per stage (0: none).
    pub const fn with_stem(mut self, convs: usize) -> Self {
        self.vit.stem_convs = convs;
        self
    }

    /// Same model with the iBOT parts `ibot`.
    pub const fn with_ibot(mut self, ibot: IbotParts) -> Self {
        self.ibot = ibot;
        self
    }

    /// Whether the numbers describe a model the ops can run.
    pub const fn is_valid(&self) -> bool {
        let v = &self.vit;
        v.patch > 0
            && v.img_size >= v.patch
            && divisible(v.img_size, v.patch)
            && v.in_chans > 0
            && v.heads > 0
            && v.dim > 0
            && divisible(v.dim, v.heads)
            && v.mlp_ratio > 0
            && self.head.n_layers > 0
            && self.head.bottleneck > 0
            && self.head.out_dim > 0
            && (self.head.n_layers == 1 || self.head.hidden > 0)
            && (v.stem_convs == 0
                || (v.stem_convs <= MAX_STEM_CONVS
                    && v.patch >= 2
                    && v.patch.is_power_of_two()
                    && divisible(v.dim, 1 << (v.stem_stages() - 1))))
    }
}

/// Most convolutions per stem stage.
pub const MAX_STEM_CONVS: usize = 4;

/// Capacity of a parameter name (`backbone.blocks.NN.attn.proj.weight` is 35).
pub const NAME_CAP: usize = 48;
pub type ParamName = heapless::String<NAME_CAP>;

/// What a tensor is, which fixes its initialisation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ParamKind {
    ClsToken,
    PosEmbed,
    /// Conv2d weight of the patch embedding, `[D, C, P, P]`.
    PatchWeight,
    PatchBias,
    /// Conv2d weight of a stem convolution, `[C_out, C_in, 3, 3]`.
    StemWeight,
    StemBias,
    /// `nn.Linear` weight `[out, in]` (backbone blocks and head MLP).
    LinearWeight,
    LinearBias,
    NormWeight,
    NormBias,
    /// `head.last_layer.weight_g`, `[K, 1]`.
    LastLayerG,
    /// `head.last_layer.weight_v`, `[K, p]`.
    LastLayerV,
    /// `backbone.masked_embed`, `[1, D]` (iBOT's learned mask token).
    MaskToken,
}

/// One named tensor of the flat buffer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ParamSpec {
    pub name: ParamName,
    pub kind: ParamKind,
    /// First element in the flat buffer.
    pub offset: usize,
    /// PyTorch shape; `shape[ndim..]` are 1.
    pub shape: [usize; 4],
    pub ndim: usize,
    pub numel: usize,
    /// Gets weight decay. DINO's rule (`get_params_groups`): everything except names ending in
    /// `.bias` and tensors with one dimension. On PyTorch's shapes that exempts biases and
    /// LayerNorm parameters but decays `cls_token [1, 1, D]` and `pos_embed [1, T, D]`.
    /// `weight_g [K, 1]` (learned only without `norm_last_layer`, i.e. for vMF) holds one norm
    /// per prototype and is treated as 1-d: no decay (method.md, Training recipe).
    pub decay: bool,
    /// Part of `head.last_layer` (DINO freezes it during the first epoch).
    pub last_layer: bool,
    /// Receives gradients at all (`weight_g` under `norm_last_layer` does not).
    pub trainable: bool,
}

impl ParamSpec {
    pub fn range(&self) -> core::ops::Range<usize> {
        self.offset..self.offset + self.numel
    }
    pub fn shape(&self) -> &[usize] {
        &self.shape[..self.ndim]
    }
}

/// Calls `f` for every tensor of the model, in layout order (PyTorch's `named_parameters()`
/// order: `cls_token`, `pos_embed`, `patch_embed`, blocks, `norm`, head MLP, `last_layer`
/// `weight_g` then `weight_v`). Offsets are consecutive from 0.
pub fn for_each_param(cfg: &ModelConfig, mut f: impl FnMut(&ParamSpec)) {
    let v = &cfg.vit;
    let h = &cfg.head;
    let d = v.dim;
    let mut offset = 0usize;
    let mut emit = |name: core::fmt::Arguments, kind: ParamKind, shape: &[usize]| {
        let mut s = ParamName::new();
        // Names are bounded by construction (NAME_CAP holds depth up to 10^9).
        let _ = s.write_fmt(name);
        let mut sh = [1usize; 4];
        sh[..shape.len()].copy_from_slice(shape);
        let numel = shape.iter().product();
        let last_layer = matches!(kind, ParamKind::LastLayerG | ParamKind::LastLayerV);
        let spec = ParamSpec {
            // weight_g is one norm per prototype: a 1-d parameter in the spec's sense even though
            // PyTorch stores it [K, 1]. Decaying it would pull every kappa towards 0.
            // The mask token is one vector (PyTorch stores it [1, D]): 1-d in the spec's sense,
            // so no decay either.
            decay: !s.ends_with(".bias")
                && shape.len() > 1
                && kind != ParamKind::LastLayerG
                && kind != ParamKind::MaskToken,
            trainable: !(kind == ParamKind::LastLayerG && h.norm_last_layer),
            name: s,
            kind,
            offset,
            shape: sh,
            ndim: shape.len(),
            numel,
            last_layer,
        };
        offset += numel;
        f(&spec);
    };
    use ParamKind::*;
    emit(format_args!("backbone.cls_token"), ClsToken, &[1, 1, d]);
    emit(
        format_args!("backbone.pos_embed"),
        PosEmbed,
        &[1, v.num_tokens(), d],
    );
    for i in 0..v.stem_len() {
        let l = v.stem_layer(i);
        emit(
            format_args!("backbone.patch_embed.stem.{i}.weight"),
            StemWeight,
            &[l.c_out, l.c_in, 3, 3],
        );
        emit(
            format_args!("backbone.patch_embed.stem.{i}.bias"),
            StemBias,
            &[l.c_out],
        );
    }
    emit(
        format_args!("backbone.patch_embed.proj.weight"),
        PatchWeight,
        &[d, v.embed_in_chans(), v.embed_patch(), v.embed_patch()],
    );
    emit(
        format_args!("backbone.patch_embed.proj.bias"),
        PatchBias,
        &[d],
    );
    let m = v.mlp_hidden();
    for i in 0..v.depth {
        emit(
            format_args!("backbone.blocks.{i}.norm1.weight"),
            NormWeight,
            &[d],
        );
        emit(
            format_args!("backbone.blocks.{i}.norm1.bias"),
            NormBias,
            &[d],
        );
        emit(
            format_args!("backbone.blocks.{i}.attn.qkv.weight"),
            LinearWeight,
            &[3 * d, d],
        );
        if v.qkv_bias {
            emit(
                format_args!("backbone.blocks.{i}.attn.qkv.bias"),
                LinearBias,
                &[3 * d],
            );
        }
        emit(
            format_args!("backbone.blocks.{i}.attn.proj.weight"),
            LinearWeight,
            &[d, d],
        );
        emit(
            format_args!("backbone.blocks.{i}.attn.proj.bias"),
            LinearBias,
            &[d],
        );
        emit(
            format_args!("backbone.blocks.{i}.norm2.weight"),
            NormWeight,
            &[d],
        );
        emit(
            format_args!("backbone.blocks.{i}.norm2.bias"),
            NormBias,
            &[d],
        );
        emit(
            format_args!("backbone.blocks.{i}.mlp.fc1.weight"),
            LinearWeight,
            &[m, d],
        );
        emit(
            format_args!("backbone.blocks.{i}.mlp.fc1.bias"),
            LinearBias,
            &[m],
        );
        emit(
            format_args!("backbone.blocks.{i}.mlp.fc2.weight"),
            LinearWeight,
            &[d, m],
        );
        emit(
            format_args!("backbone.blocks.{i}.mlp.fc2.bias"),
            LinearBias,
            &[d],
        );
    }
    emit(format_args!("backbone.norm.weight"), NormWeight, &[d]);
    emit(format_args!("backbone.norm.bias"), NormBias, &[d]);
    if cfg.ibot.mask_token {
        // iBOT's VisionTransformer registers it last, after `norm`.
        emit(format_args!("backbone.masked_embed"), MaskToken, &[1, d]);
    }
    for l in 0..h.n_layers {
        // nn.Sequential(Linear, GELU, Linear, GELU, Linear): the linears sit at 0, 2, 4, ...
        let (di, dout) = h.layer_dims(d, l);
        let idx = 2 * l;
        emit(
            format_args!("head.mlp.{idx}.weight"),
            LinearWeight,
            &[dout, di],
        );
        emit(format_args!("head.mlp.{idx}.bias"), LinearBias, &[dout]);
    }
    emit(
        format_args!("head.last_layer.weight_g"),
        LastLayerG,
        &[h.out_dim, 1],
    );
    emit(
        format_args!("head.last_layer.weight_v"),
        LastLayerV,
        &[h.out_dim, h.bottleneck],
    );
    if cfg.ibot.separate_patch_head {
        emit(
            format_args!("head.last_layer2.weight_g"),
            LastLayerG,
            &[h.out_dim, 1],
        );
        emit(
            format_args!("head.last_layer2.weight_v"),
            LastLayerV,
            &[h.out_dim, h.bottleneck],
        );
    }
}

/// Total number of scalars in the flat buffer.
pub fn num_params(cfg: &ModelConfig) -> usize {
    let mut n = 0;
    for_each_param(cfg, |p| n = p.offset + p.numel);
    n
}

/// Number of tensors in the table.
pub fn num_tensors(cfg: &ModelConfig) -> usize {
    let mut n = 0;
    for_each_param(cfg, |_| n += 1);
    n
}

/// The spec of the tensor called `name`, if any.
pub fn find_param(cfg: &ModelConfig, name: &str) -> Option<ParamSpec> {
    let mut out = None;
    for_each_param(cfg, |p| {
        if out.is_none() && p.name.as_str() == name {
            out = Some(p.clone());
        }
    });
    out
}

/// Offsets of one transformer block's tensors (`qkv_b` is `None` without `qkv_bias`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlockOffsets {
    pub norm1_w: usize,
    pub norm1_b: usize,
    pub qkv_w: usize,
    pub qkv_b: Option<usize>,
    pub proj_w: usize,
    pub proj_b: usize,
    pub norm2_w: usize,
    pub norm2_b: usize,
    pub fc1_w: usize,
    pub fc1_b: usize,
    pub fc2_w: usize,
    pub fc2_b: usize,
}

/// Offsets and dims of one head MLP linear.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HeadLayerOffsets {
    pub w: usize,
    pub b: usize,
    pub d_in: usize,
    pub d_out: usize,
}

/// Where everything lives, by arithmetic (the same order as [`for_each_param`]; a test checks
/// that the two agree). What backends use on a hot path instead of name look-ups.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Layout {
    pub cls: usize,
    pub pos: usize,
    /// First stem tensor (`== patch_w` without a stem).
    stem: usize,
    stem_shape: StemShape,
    pub patch_w: usize,
    pub patch_b: usize,
    blocks: usize,
    block_len: usize,
    qkv_bias: bool,
    dim: usize,
    mlp: usize,
    pub norm_w: usize,
    pub norm_b: usize,
    head: usize,
    head_cfg: HeadConfig,
    pub last_g: usize,
    pub last_v: usize,
    /// `backbone.masked_embed` (iBOT), if the model has one.
    pub mask_token: Option<usize>,
    /// The prototype layer of patch tokens: `head.last_layer2` with a separate patch head,
    /// otherwise the same offsets as `last_g` / `last_v` (shared head).
    pub patch_g: usize,
    pub patch_v: usize,
    /// Start of `head.*` (everything before is the backbone).
    pub head_start: usize,
    pub total: usize,
}

impl Layout {
    pub const fn new(cfg: &ModelConfig) -> Self {
        let v = &cfg.vit;
        let d = v.dim;
        let m = v.mlp_hidden();
        let cls = 0;
        let pos = cls + d;
        let stem = pos + v.num_tokens() * d;
        let patch_w = stem + v.stem().params_before(v.stem_len());
        let patch_b = patch_w + d * v.patch_len();
        let blocks = patch_b + d;
        let block_len = 4 * d
            + 3 * d * d
            + if v.qkv_bias { 3 * d } else { 0 }
            + d * d
            + d
            + m * d
            + m
            + d * m
            + d;
        let norm_w = blocks + v.depth * block_len;
        let norm_b = norm_w + d;
        let mask_token = if cfg.ibot.mask_token {
            Some(norm_b + d)
        } else {
            None
        };
        let head = norm_b + d + if cfg.ibot.mask_token { d } else { 0 };
        let mut last_g = head;
        let mut l = 0;
        while l < cfg.head.n_layers {
            let (di, dout) = cfg.head.layer_dims(d, l);
            last_g += di * dout + dout;
            l += 1;
        }
        let last_v = last_g + cfg.head.out_dim;
        let after_v = last_v + cfg.head.out_dim * cfg.head.bottleneck;
        let (patch_g, patch_v, total) = if cfg.ibot.separate_patch_head {
            let g2 = after_v;
            let v2 = g2 + cfg.head.out_dim;
            (g2, v2, v2 + cfg.head.out_dim * cfg.head.bottleneck)
        } else {
            (last_g, last_v, after_v)
        };
        Self {
            cls,
            pos,
            stem,
            stem_shape: v.stem(),
            patch_w,
            patch_b,
            blocks,
            block_len,
            qkv_bias: v.qkv_bias,
            dim: d,
            mlp: m,
            norm_w,
            norm_b,
            head,
            head_cfg: cfg.head,
            last_g,
            last_v,
            mask_token,
            patch_g,
            patch_v,
            head_start: head,
            total,
        }
    }

    /// Offsets of stem convolution `i`'s weight `[C_out, C_in 9]` and bias `[C_out]`.
    pub const fn stem_layer(&self, i: usize) -> (usize, usize) {
        let w = self.stem + self.stem_shape.params_before(i);
        let l = self.stem_shape.layer(i);
        (w, w + l.c_out * l.col_len())
    }

    pub const fn block(&self, i: usize) -> BlockOffsets {
        let d = self.dim;
        let m = self.mlp;
        let norm1_w = self.blocks + i * self.block_len;
        let norm1_b = norm1_w + d;
        let qkv_w = norm1_b + d;
        let after_qkv_w = qkv_w + 3 * d * d;
        let (qkv_b, proj_w) = if self.qkv_bias {
            (Some(after_qkv_w), after_qkv_w + 3 * d)
        } else {
            (None, after_qkv_w)
        };
        let proj_b = proj_w + d * d;
        let norm2_w = proj_b + d;
        let norm2_b = norm2_w + d;
        let fc1_w = norm2_b + d;
        let fc1_b = fc1_w + m * d;
        let fc2_w = fc1_b + m;
        let fc2_b = fc2_w + d * m;
        BlockOffsets {
            norm1_w,
            norm1_b,
            qkv_w,
            qkv_b,
            proj_w,
            proj_b,
            norm2_w,
            norm2_b,
            fc1_w,
            fc1_b,
            fc2_w,
            fc2_b,
        }
    }

    pub const fn head_layer(&self, l: usize) -> HeadLayerOffsets {
        let mut w = self.head;
        let mut k = 0;
        while k < l {
            let (di, dout) = self.head_cfg.layer_dims(self.dim, k);
            w += di * dout + dout;
            k += 1;
        }
        let (d_in, d_out) = self.head_cfg.layer_dims(self.dim, l);
        HeadLayerOffsets {
            w,
            b: w + d_in * d_out,
            d_in,
            d_out,
        }
    }
}

/// Truncated normal as DINO's `trunc_normal_(t, std = .02)` (timm's, `a = -2, b = 2`): the
/// bounds are ABSOLUTE values, i.e. +-100 std at std 0.02, so the truncation essentially never
/// binds; it is kept exact by resampling.
fn trunc_normal(std: f64, normal: &mut impl FnMut() -> f64) -> f64 {
    loop {
        let x = std * normal();
        if (-2.0..=2.0).contains(&x) {
            return x;
        }
    }
}

/// Uniform on (-bound, bound) from a standard normal through its CDF (`Φ(z)` is U(0, 1)), so
/// that one normal source serves every initialiser.
fn uniform_sym(bound: f64, normal: &mut impl FnMut() -> f64) -> f64 {
    let u = 0.5 * (1.0 + libm::erf(normal() * core::f64::consts::FRAC_1_SQRT_2));
    bound * (2.0 * u - 1.0)
}

/// Initialise the flat buffer as DINO does (checked against DINO's `vision_transformer.py`):
/// - `cls_token`, `pos_embed`, every `nn.Linear` weight (blocks and head MLP):
///   trunc-normal std 0.02; linear biases 0; LayerNorm weight 1, bias 0;
/// - `patch_embed.proj` (a Conv2d, which DINO's `_init_weights` does not touch): PyTorch's
///   default, weight and bias U(-1/sqrt(fan_in), 1/sqrt(fan_in)), fan_in = C P P;
/// - stem convolutions (an option without a DINO counterpart, and without batch norm): He's
///   uniform init for the GELU that follows, U(-sqrt(6 / fan_in), sqrt(6 / fan_in)), fan_in =
///   C_in 3 3, which keeps the activations' scale through the stem; biases 0;
/// - `masked_embed` (iBOT): zeros;
/// - `last_layer` (built AFTER `apply(_init_weights)` in `DINOHead`): `weight_v` has PyTorch's
///   default Linear init U(-1/sqrt(p), 1/sqrt(p)); `weight_g` = 1.
///
/// `normal` draws standard normals; draws happen in layout order, element by element.
pub fn init_params(cfg: &ModelConfig, params: &mut [f32], normal: &mut impl FnMut() -> f64) {
    debug_assert!(params.len() >= num_params(cfg));
    for_each_param(cfg, |p| {
        let dst = &mut params[p.range()];
        match p.kind {
            ParamKind::ClsToken | ParamKind::PosEmbed | ParamKind::LinearWeight => {
                for x in dst {
                    *x = trunc_normal(0.02, normal) as f32;
                }
            }
            ParamKind::PatchWeight | ParamKind::PatchBias => {
                let bound = 1.0 / libm::sqrt(cfg.vit.patch_len() as f64);
                for x in dst {
                    *x = uniform_sym(bound, normal) as f32;
                }
            }
            ParamKind::StemWeight => {
                let bound = libm::sqrt(6.0 / (p.numel / p.shape[0]) as f64);
                for x in dst {
                    *x = uniform_sym(bound, normal) as f32;
                }
            }
            ParamKind::LastLayerV => {
                let bound = 1.0 / libm::sqrt(cfg.head.bottleneck as f64);
                for x in dst {
                    *x = uniform_sym(bound, normal) as f32;
                }
            }
            // iBOT initialises `masked_embed` to zeros (no draws, so the other tensors get the
            // same values as without it).
            ParamKind::LinearBias
            | ParamKind::NormBias
            | ParamKind::MaskToken
            | ParamKind::StemBias => dst.fill(0.0),
            ParamKind::NormWeight | ParamKind::LastLayerG => dst.fill(1.0),
        }
    });
}

/// Convert a parameter buffer between float types (e.g. f32 weights into an f64 reference).
pub fn convert_params<A: Real, B: Real>(dst: &mut [B], src: &[A]) {
    for (d, &s) in dst.iter_mut().zip(src) {
        *d = B::from_f64(s.to_f64());
    }
}
