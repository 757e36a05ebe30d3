//! The ViT backbone on the device: the same passes as the CPU backend (`backend/cpu/vit.rs`),
//! written as kernel launches (attention in `attention.rs`, the head's MLP in `head.rs`).
//!
//! Layouts: tokens `[n, t, d]` (row = image-major token), `qkv[n, t, 3d]` with head `h` at
//! columns `h hd ..` of each of q | k | v, attention probabilities `[n, heads, t, t]`. Every
//! linear is one GEMM over all rows; attention is batched GEMMs over `n * heads`.
//! Only the final-LayerNorm `[CLS]` rows are computed and differentiated (nothing else of the
//! last LayerNorm is read).
use anyhow::Result;

use dinovmf_core::model::BlockOffsets;

use super::attention::{attention_backward, attention_forward};
use super::device::{Buf, Device, Gpu};
use super::launch::ibot::{mask_tokens_backward, mask_tokens_forward};
use super::launch::tokens::{
    patchify, pos_resize_backward, pos_resize_forward, tokens_backward_params,
    tokens_backward_patch, tokens_forward, ImageDims, ResizeDims,
};

pub use crate::backend::shapes::Cx;

/// Saved activations of one block over a group.
#[derive(Clone, Copy)]
pub struct BlockBufs {
    ln1: Buf<f32>,
    ln1_mean: Buf<f32>,
    ln1_rstd: Buf<f32>,
    qkv: Buf<f32>,
    att: Buf<f32>,
    attn_out: Buf<f32>,
    x_mid: Buf<f32>,
    ln2: Buf<f32>,
    ln2_mean: Buf<f32>,
    ln2_rstd: Buf<f32>,
    fc1: Buf<f32>,
    gelu: Buf<f32>,
}

impl BlockBufs {
    fn new<D: Device>(gpu: &mut Gpu<D>, cx: &Cx, n: usize, t: usize) -> Result<Self> {
        let rows = n * t;
        let (d, mh) = (cx.d, cx.mh);
        Ok(Self {
            ln1: gpu.alloc(rows * d)?,
            ln1_mean: gpu.alloc(rows)?,
            ln1_rstd: gpu.alloc(rows)?,
            qkv: gpu.alloc(rows * 3 * d)?,
            att: gpu.alloc(n * cx.heads * t * t)?,
            attn_out: gpu.alloc(rows * d)?,
            x_mid: gpu.alloc(rows * d)?,
            ln2: gpu.alloc(rows * d)?,
            ln2_mean: gpu.alloc(rows)?,
            ln2_rstd: gpu.alloc(rows)?,
            fc1: gpu.alloc(rows * mh)?,
            gelu: gpu.alloc(rows * mh)?,
        })
    }
}

/// Device buffers of one crop group (up to `cap` images of side `size`).
pub struct Group {
    pub cap: usize,
    pub size: usize,
    pub grid: usize,
    pub np: usize,
    pub t: usize,
    pub saved: bool,
    /// Input images `[cap, C, size, size]` (uploaded per step).
    pub img: Buf<f32>,
    patches: Buf<f32>,
    pos: Buf<f32>,
    stream: Vec<Buf<f32>>,
    blocks: Vec<BlockBufs>,
    tmp: Buf<f32>,
    tmp2: Buf<f32>,
    cls_in: Buf<f32>,
    /// Final-LayerNorm `[CLS]` features `[cap, d]`.
    pub cls: Buf<f32>,
    cls_mean: Buf<f32>,
    cls_rstd: Buf<f32>,
    /// Final LayerNorm of every token (iBOT), after [`Group::enable_all_tokens`].
    pub all: Option<AllTokens>,
}

/// Every token's final-LayerNorm output `norm[cap, t, d]` and its statistics.
#[derive(Clone, Copy)]
pub struct AllTokens {
    pub norm: Buf<f32>,
    mean: Buf<f32>,
    rstd: Buf<f32>,
}

/// iBOT's mask-token substitution of one forward: 0/1 `mask[n, np]` and the token `[d]`.
#[derive(Clone, Copy)]
pub struct PatchMask {
    pub mask: Buf<f32>,
    pub token: Buf<f32>,
}

impl Group {
    /// Keeps the final LayerNorm of every token (iBOT's head runs on patch tokens).
    pub fn enable_all_tokens<D: Device>(&mut self, gpu: &mut Gpu<D>, cx: &Cx) -> Result<()> {
        let rows = self.cap * self.t;
        self.all = Some(AllTokens {
            norm: gpu.alloc(rows * cx.d)?,
            mean: gpu.alloc(rows)?,
            rstd: gpu.alloc(rows)?,
        });
        Ok(())
    }

    pub fn new<D: Device>(
        gpu: &mut Gpu<D>,
        cx: &Cx,
        cap: usize,
        size: usize,
        saved: bool,
    ) -> Result<Self> {
        let v = &cx.cfg.vit;
        let grid = size / v.patch;
        let np = grid * grid;
        let t = np + 1;
        let d = cx.d;
        let nb = if saved { v.depth } else { 1 };
        let ns = if saved { v.depth + 1 } else { 2 };
        let mut stream = Vec::new();
        for _ in 0..ns {
            stream.push(gpu.alloc(cap * t * d)?);
        }
        let mut blocks = Vec::new();
        for _ in 0..nb {
            blocks.push(BlockBufs::new(gpu, cx, cap, t)?);
        }
        Ok(Self {
            cap,
            size,
            grid,
            np,
            t,
            saved,
            img: gpu.alloc(cap * v.in_chans * size * size)?,
            patches: gpu.alloc(cap * np * cx.kp)?,
            pos: gpu.alloc(t * d)?,
            stream,
            blocks,
            tmp: gpu.alloc(cap * t * d)?,
            tmp2: gpu.alloc(cap * t * d)?,
            cls_in: gpu.alloc(cap * d)?,
            cls: gpu.alloc(cap * d)?,
            cls_mean: gpu.alloc(cap)?,
            cls_rstd: gpu.alloc(cap)?,
            all: None,
        })
    }
}

/// Scratch of the backward pass, sized for the largest group.
pub struct BackScratch {
    dx: Buf<f32>,
    dtmp: Buf<f32>,
    dbranch: Buf<f32>,
    dln: Buf<f32>,
    dattn: Buf<f32>,
    dhid0: Buf<f32>,
    dhid: Buf<f32>,
    dqkv: Buf<f32>,
    dp: Buf<f32>,
    dpos: Buf<f32>,
    dpatch: Buf<f32>,
}

impl BackScratch {
    /// For groups of `(images, tokens)`.
    pub fn new<D: Device>(gpu: &mut Gpu<D>, cx: &Cx, groups: &[(usize, usize)]) -> Result<Self> {
        let (d, mh) = (cx.d, cx.mh);
        let rows = groups.iter().map(|&(n, t)| n * t).max().unwrap_or(0);
        let att = groups
            .iter()
            .map(|&(n, t)| n * cx.heads * t * t)
            .max()
            .unwrap_or(0);
        let td = groups.iter().map(|&(_, t)| t * d).max().unwrap_or(0);
        Ok(Self {
            dx: gpu.alloc(rows * d)?,
            dtmp: gpu.alloc(rows * d)?,
            dbranch: gpu.alloc(rows * d)?,
            dln: gpu.alloc(rows * d)?,
            dattn: gpu.alloc(rows * d)?,
            dhid0: gpu.alloc(rows * mh)?,
            dhid: gpu.alloc(rows * mh)?,
            dqkv: gpu.alloc(rows * 3 * d)?,
            dp: gpu.alloc(att)?,
            dpos: gpu.alloc(td)?,
            dpatch: gpu.alloc(rows * d)?,
        })
    }
}

/// Drop-path masks (0/1, `[depth][2][n]` as `cpu::draw_drop_masks` draws them) of one group.
#[derive(Clone, Copy)]
pub struct Masks {
    pub buf: Buf<f32>,
}

impl Masks {
    /// Block `i`'s (attention, MLP) masks and keep probability, or `None` when nothing drops.
    fn block(&self, cx: &Cx, i: usize, n: usize) -> Option<(Buf<f32>, Buf<f32>, f32)> {
        let keep = cx.cfg.vit.keep_prob(i);
        (keep < 1.0).then(|| {
            (
                self.buf.sub(2 * i * n, n),
                self.buf.sub((2 * i + 1) * n, n),
                keep as f32,
            )
        })
    }
}

/// The square `g0 x g0` grid of trained position embeddings resized to `grid x grid`.
fn resize(g0: usize, grid: usize, d: usize) -> ResizeDims {
    ResizeDims {
        src_h: g0,
        src_w: g0,
        dst_h: grid,
        dst_w: grid,
        d,
    }
}

/// `y = x + drop(f)` over `n` samples of `per` values (`scratch` holds the dropped branch).
#[allow(clippy::too_many_arguments)]
fn residual_drop<D: Device>(
    gpu: &mut Gpu<D>,
    y: Buf<f32>,
    x: Buf<f32>,
    f: Buf<f32>,
    mask: Option<(Buf<f32>, f32)>,
    scratch: Buf<f32>,
    n: usize,
    per: usize,
) -> Result<()> {
    match mask {
        Some((m, keep)) => {
            gpu.drop_path(scratch, f, m, keep, n, per)?;
            gpu.residual(y, x, scratch, n * per)
        }
        None => gpu.residual(y, x, f, n * per),
    }
}

/// Forward of `n <= cap` images already in `g.img`; leaves the final-LayerNorm `[CLS]`
/// features in `g.cls`. `save` keeps every block's activations (the group must be `saved`).
#[allow(clippy::too_many_arguments)]
pub fn vit_forward<D: Device>(
    gpu: &mut Gpu<D>,
    cx: &Cx,
    p: Buf<f32>,
    g: &Group,
    n: usize,
    masks: Option<Masks>,
    save: bool,
    one: Buf<f32>,
) -> Result<()> {
    vit_forward_ext(gpu, cx, p, g, n, masks, save, one, None, false)
}

/// [`vit_forward`] with iBOT's options: `patch_mask` replaces masked patch embeddings (bias
/// included) by the mask token before `[CLS]` and the position embedding are added;
/// `all_tokens` runs the final LayerNorm on every token into `g.all` (the group must have
/// [`Group::enable_all_tokens`]), `g.cls` still getting the `[CLS]` rows.
#[allow(clippy::too_many_arguments)]
pub fn vit_forward_ext<D: Device>(
    gpu: &mut Gpu<D>,
    cx: &Cx,
    p: Buf<f32>,
    g: &Group,
    n: usize,
    masks: Option<Masks>,
    save: bool,
    one: Buf<f32>,
    patch_mask: Option<PatchMask>,
    all_tokens: bool,
) -> Result<()> {
    let save = save && g.saved;
    let v = &cx.cfg.vit;
    let lay = &cx.lay;
    let (d, kp, t, np) = (cx.d, cx.kp, g.t, g.np);
    let size = g.size;
    let img = ImageDims {
        n,
        chans: v.in_chans,
        h: size,
        w: size,
        patch: v.patch,
    };
    patchify(gpu, g.patches, g.img, img)?;
    gpu.linear(
        g.tmp,
        g.patches,
        p.sub(lay.patch_w, d * kp),
        Some(p.sub(lay.patch_b, d)),
        n * np,
        kp,
        d,
    )?;
    if let Some(pm) = patch_mask {
        mask_tokens_forward(gpu, g.tmp, pm.mask, pm.token, n * np, d)?;
    }
    let g0 = v.grid();
    if g0 == g.grid {
        gpu.copy(g.pos, p.sub(lay.pos, t * d))?;
    } else {
        gpu.copy(g.pos.sub(0, d), p.sub(lay.pos, d))?;
        let src = p.sub(lay.pos + d, g0 * g0 * d);
        pos_resize_forward(gpu, g.pos.from(d), src, resize(g0, g.grid, d))?;
    }
    let cls = p.sub(lay.cls, d);
    tokens_forward(gpu, g.stream[0], g.tmp, cls, g.pos, (n, np, d))?;
    for i in 0..v.depth {
        let (bi, si, so) = if save {
            (i, i, i + 1)
        } else {
            (0, i % 2, (i + 1) % 2)
        };
        let m = masks.and_then(|m| m.block(cx, i, n));
        block_forward(
            gpu,
            cx,
            p,
            &lay.block(i),
            &g.blocks[bi],
            g,
            g.stream[si],
            g.stream[so],
            n,
            m,
        )?;
    }
    let last = if save { v.depth } else { v.depth % 2 };
    if all_tokens {
        let a = g
            .all
            .ok_or_else(|| anyhow::anyhow!("group has no all-token buffers"))?;
        gpu.layernorm_forward(
            a.norm,
            a.mean,
            a.rstd,
            g.stream[last].sub(0, n * t * d),
            p.sub(lay.norm_w, d),
            p.sub(lay.norm_b, d),
            n * t,
            d,
            cx.eps,
        )?;
        return gpu.copy_rows(g.cls, d, a.norm, t * d, n, d, one);
    }
    gpu.copy_rows(g.cls_in, d, g.stream[last], t * d, n, d, one)?;
    gpu.layernorm_forward(
        g.cls,
        g.cls_mean,
        g.cls_rstd,
        g.cls_in,
        p.sub(lay.norm_w, d),
        p.sub(lay.norm_b, d),
        n,
        d,
        cx.eps,
    )
}

#[allow(clippy::too_many_arguments)]
fn block_forward<D: Device>(
    gpu: &mut Gpu<D>,
    cx: &Cx,
    p: Buf<f32>,
    o: &BlockOffsets,
    bb: &BlockBufs,
    g: &Group,
    x: Buf<f32>,
    xout: Buf<f32>,
    n: usize,
    masks: Option<(Buf<f32>, Buf<f32>, f32)>,
) -> Result<()> {
    let (d, mh, t) = (cx.d, cx.mh, g.t);
    let rows = n * t;
    let w = |off: usize, len: usize| p.sub(off, len);
    gpu.layernorm_forward(
        bb.ln1,
        bb.ln1_mean,
        bb.ln1_rstd,
        x,
        w(o.norm1_w, d),
        w(o.norm1_b, d),
        rows,
        d,
        cx.eps,
    )?;
    gpu.linear(
        bb.qkv,
        bb.ln1,
        w(o.qkv_w, 3 * d * d),
        o.qkv_b.map(|b| w(b, 3 * d)),
        rows,
        d,
        3 * d,
    )?;
    attention_forward(gpu, cx, bb.attn_out, bb.att, bb.qkv, n, t)?;
    gpu.linear(
        g.tmp,
        bb.attn_out,
        w(o.proj_w, d * d),
        Some(w(o.proj_b, d)),
        rows,
        d,
        d,
    )?;
    let (ma, mm) = match masks {
        Some((a, m, keep)) => (Some((a, keep)), Some((m, keep))),
        None => (None, None),
    };
    residual_drop(gpu, bb.x_mid, x, g.tmp, ma, g.tmp2, n, t * d)?;
    gpu.layernorm_forward(
        bb.ln2,
        bb.ln2_mean,
        bb.ln2_rstd,
        bb.x_mid,
        w(o.norm2_w, d),
        w(o.norm2_b, d),
        rows,
        d,
        cx.eps,
    )?;
    gpu.linear(
        bb.fc1,
        bb.ln2,
        w(o.fc1_w, mh * d),
        Some(w(o.fc1_b, mh)),
        rows,
        d,
        mh,
    )?;
    gpu.gelu_forward(bb.gelu, bb.fc1, rows * mh)?;
    gpu.linear(
        g.tmp,
        bb.gelu,
        w(o.fc2_w, d * mh),
        Some(w(o.fc2_b, d)),
        rows,
        mh,
        d,
    )?;
    residual_drop(gpu, xout, bb.x_mid, g.tmp, mm, g.tmp2, n, t * d)
}

/// Backward of [`vit_forward`] (run with `save`) from `dcls[n, d]`, the gradient at the
/// final-LayerNorm `[CLS]` output: every backbone gradient ACCUMULATES into `grads`.
#[allow(clippy::too_many_arguments)]
pub fn vit_backward<D: Device>(
    gpu: &mut Gpu<D>,
    cx: &Cx,
    p: Buf<f32>,
    grads: Buf<f32>,
    g: &Group,
    dcls: Buf<f32>,
    n: usize,
    masks: Option<Masks>,
    bs: &BackScratch,
    one: Buf<f32>,
) -> Result<()> {
    vit_backward_ext(gpu, cx, p, grads, g, dcls, n, masks, bs, one, None, false)
}

/// Backward of [`vit_forward_ext`]: with `all_tokens`, `dy[n, t, d]` is the gradient at every
/// token's final-LayerNorm output (else `[n, d]` at `[CLS]`); `patch_mask` gives the forward's
/// mask and the mask token's offset in `grads` (its gradient accumulates there, and masked
/// rows send nothing to the patch embedding).
#[allow(clippy::too_many_arguments)]
pub fn vit_backward_ext<D: Device>(
    gpu: &mut Gpu<D>,
    cx: &Cx,
    p: Buf<f32>,
    grads: Buf<f32>,
    g: &Group,
    dy: Buf<f32>,
    n: usize,
    masks: Option<Masks>,
    bs: &BackScratch,
    one: Buf<f32>,
    patch_mask: Option<(Buf<f32>, usize)>,
    all_tokens: bool,
) -> Result<()> {
    let dcls = dy;
    let v = &cx.cfg.vit;
    let lay = &cx.lay;
    let (d, mh, kp, t, np) = (cx.d, cx.mh, cx.kp, g.t, g.np);
    let rows = n * t;
    let w = |off: usize, len: usize| p.sub(off, len);
    let gr = |off: usize, len: usize| grads.sub(off, len);
    let dx = bs.dx.sub(0, rows * d);

    if all_tokens {
        // Final LayerNorm of every token; its input is the last block's saved output.
        let a = g
            .all
            .ok_or_else(|| anyhow::anyhow!("group has no all-token buffers"))?;
        gpu.layernorm_backward(
            dx,
            gr(lay.norm_w, d),
            gr(lay.norm_b, d),
            dy.sub(0, rows * d),
            g.stream[v.depth].sub(0, rows * d),
            a.mean,
            a.rstd,
            w(lay.norm_w, d),
            rows,
            d,
        )?;
    } else {
        // Final LayerNorm ([CLS] rows), scattered into the stream gradient.
        let dxc = bs.dln.sub(0, n * d);
        gpu.layernorm_backward(
            dxc,
            gr(lay.norm_w, d),
            gr(lay.norm_b, d),
            dcls,
            g.cls_in.sub(0, n * d),
            g.cls_mean,
            g.cls_rstd,
            w(lay.norm_w, d),
            n,
            d,
        )?;
        gpu.fill(dx, 0.0)?;
        gpu.copy_rows(dx, t * d, dxc, d, n, d, one)?;
    }

    for i in (0..v.depth).rev() {
        let o = lay.block(i);
        let bb = &g.blocks[i];
        let x_in = g.stream[i];
        let m = masks.and_then(|m| m.block(cx, i, n));

        // MLP branch.
        let dbr = match m {
            Some((_, mm, keep)) => {
                gpu.drop_path(bs.dbranch, dx, mm, keep, n, t * d)?;
                bs.dbranch.sub(0, rows * d)
            }
            None => dx,
        };
        gpu.column_sum(gr(o.fc2_b, d), dbr, rows, d, true)?;
        gpu.matmul_tn_acc(gr(o.fc2_w, d * mh), dbr, bb.gelu, d, mh, rows)?;
        gpu.matmul_nn(bs.dhid0, dbr, w(o.fc2_w, d * mh), rows, mh, d)?;
        gpu.gelu_backward(bs.dhid, bb.fc1, bs.dhid0, rows * mh)?;
        gpu.column_sum(gr(o.fc1_b, mh), bs.dhid, rows, mh, true)?;
        gpu.matmul_tn_acc(gr(o.fc1_w, mh * d), bs.dhid, bb.ln2, mh, d, rows)?;
        gpu.matmul_nn(bs.dln, bs.dhid, w(o.fc1_w, mh * d), rows, d, mh)?;
        gpu.layernorm_backward(
            bs.dtmp,
            gr(o.norm2_w, d),
            gr(o.norm2_b, d),
            bs.dln,
            bb.x_mid,
            bb.ln2_mean,
            bb.ln2_rstd,
            w(o.norm2_w, d),
            rows,
            d,
        )?;
        gpu.axpy(dx, bs.dtmp, 1.0, rows * d)?;

        // Attention branch.
        let dbr = match m {
            Some((ma, _, keep)) => {
                gpu.drop_path(bs.dbranch, dx, ma, keep, n, t * d)?;
                bs.dbranch.sub(0, rows * d)
            }
            None => dx,
        };
        gpu.column_sum(gr(o.proj_b, d), dbr, rows, d, true)?;
        gpu.matmul_tn_acc(gr(o.proj_w, d * d), dbr, bb.attn_out, d, d, rows)?;
        gpu.matmul_nn(bs.dattn, dbr, w(o.proj_w, d * d), rows, d, d)?;
        attention_backward(
            gpu,
            cx,
            bs.dqkv,
            bs.dp,
            bs.dattn,
            bb.qkv,
            bb.att,
            bb.attn_out,
            n,
            t,
        )?;
        if let Some(qb) = o.qkv_b {
            gpu.column_sum(gr(qb, 3 * d), bs.dqkv, rows, 3 * d, true)?;
        }
        gpu.matmul_tn_acc(gr(o.qkv_w, 3 * d * d), bs.dqkv, bb.ln1, 3 * d, d, rows)?;
        gpu.matmul_nn(bs.dln, bs.dqkv, w(o.qkv_w, 3 * d * d), rows, d, 3 * d)?;
        gpu.layernorm_backward(
            bs.dtmp,
            gr(o.norm1_w, d),
            gr(o.norm1_b, d),
            bs.dln,
            x_in,
            bb.ln1_mean,
            bb.ln1_rstd,
            w(o.norm1_w, d),
            rows,
            d,
        )?;
        gpu.axpy(dx, bs.dtmp, 1.0, rows * d)?;
    }

    // Tokens: [CLS] and the position embedding (summed over images), the patch embedding.
    let dpos = bs.dpos.sub(0, t * d);
    gpu.fill(dpos, 0.0)?;
    tokens_backward_params(gpu, gr(lay.cls, d), dpos, dx, (n, np, d))?;
    let g0 = v.grid();
    if g0 == g.grid {
        gpu.axpy(gr(lay.pos, t * d), dpos, 1.0, t * d)?;
    } else {
        gpu.axpy(gr(lay.pos, d), dpos, 1.0, d)?;
        let dsrc = gr(lay.pos + d, g0 * g0 * d);
        pos_resize_backward(gpu, dsrc, dpos.from(d), resize(g0, g.grid, d))?;
    }
    let dpatch = bs.dpatch.sub(0, n * np * d);
    tokens_backward_patch(gpu, dpatch, dx, (n, np, d))?;
    if let Some((mask, tok)) = patch_mask {
        mask_tokens_backward(gpu, dpatch, gr(tok, d), mask, n * np, d)?;
    }
    gpu.column_sum(gr(lay.patch_b, d), dpatch, n * np, d, true)?;
    gpu.matmul_tn_acc(
        gr(lay.patch_w, d * kp),
        dpatch,
        g.patches.sub(0, n * np * kp),
        d,
        kp,
        n * np,
    )
}
