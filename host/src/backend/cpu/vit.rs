//! The ViT backbone on one group of same-size crops (all global crops, or all local crops):
//! every linear is one GEMM over all tokens of the group, the row ops are parallel over rows,
//! attention is parallel over images.
//!
//! Only `[CLS]` features leave the backbone (the head and `embed` read nothing else), so the
//! last block computes keys and values for every token but attention, projection and MLP for
//! the `[CLS]` query only, and the final LayerNorm runs on `[CLS]` rows: about a fifth of the
//! work of a depth-4 model, with the same result.
use rayon::prelude::*;

use dinovmf_core::model::BlockOffsets;
use dinovmf_core::ops::{patchify, pos_embed_for_grid_backward, pos_embed_for_grid_forward};

use super::attention;
use super::conv_stem::{self, StemBufs, StemScratch};
use super::gemm::{linear_matmul, Op};
use super::rows::{self, n_chunks, NormOut};

pub use crate::backend::shapes::Cx;

/// Saved activations of one block over a group.
pub struct BlockBufs {
    pub ln1: Vec<f32>,
    pub ln1_mean: Vec<f32>,
    pub ln1_rstd: Vec<f32>,
    pub qkv: Vec<f32>,
    pub att: Vec<f32>,
    pub attn_out: Vec<f32>,
    pub x_mid: Vec<f32>,
    pub ln2: Vec<f32>,
    pub ln2_mean: Vec<f32>,
    pub ln2_rstd: Vec<f32>,
    /// GELU output and derivative of `fc1` (the pre-activation itself is not needed).
    pub gelu: Vec<f32>,
    pub dgelu: Vec<f32>,
}

impl BlockBufs {
    fn new(cx: &Cx, n: usize, t: usize) -> Self {
        let rows = n * t;
        let (d, mh) = (cx.d, cx.mh);
        Self {
            ln1: vec![0.0; rows * d],
            ln1_mean: vec![0.0; rows],
            ln1_rstd: vec![0.0; rows],
            qkv: vec![0.0; rows * 3 * d],
            att: vec![0.0; n * cx.heads * t * t],
            attn_out: vec![0.0; rows * d],
            x_mid: vec![0.0; rows * d],
            ln2: vec![0.0; rows * d],
            ln2_mean: vec![0.0; rows],
            ln2_rstd: vec![0.0; rows],
            gelu: vec![0.0; rows * mh],
            dgelu: vec![0.0; rows * mh],
        }
    }
}

/// Buffers of one crop group, for up to `cap` images of side `size`.
pub struct Group {
    pub size: usize,
    pub grid: usize,
    pub np: usize,
    pub t: usize,
    /// Keeps every block's activations (training) or reuses one set (inference).
    pub saved: bool,
    /// The convolutional stem's maps (empty without a stem).
    pub stem: StemBufs,
    /// Patch rows `[n, N, C P P]` (with a stem: its last map `[n, N, D]`).
    pub patches: Vec<f32>,
    pub pos: Vec<f32>,
    pub stream: Vec<Vec<f32>>,
    pub blocks: Vec<BlockBufs>,
    /// Branch outputs before the residual (and the patch tokens).
    pub tmp: Vec<f32>,
    /// `fc1` pre-activations.
    pub hid: Vec<f32>,
    /// The last block's input `[CLS]` rows `[n, d]` (its residual), the final LayerNorm output
    /// and statistics.
    pub cls_in: Vec<f32>,
    pub cls: Vec<f32>,
    pub cls_mean: Vec<f32>,
    pub cls_rstd: Vec<f32>,
    /// Final LayerNorm of every token `[n, t, d]` and its statistics (iBOT: the head reads
    /// patch tokens too); empty until [`Group::enable_all_tokens`].
    pub norm_all: Vec<f32>,
    pub norm_mean: Vec<f32>,
    pub norm_rstd: Vec<f32>,
}

impl Group {
    pub fn new(cx: &Cx, cap: usize, size: usize, saved: bool) -> Self {
        let v = &cx.cfg.vit;
        let grid = size / v.patch;
        let np = grid * grid;
        let t = np + 1;
        let d = cx.d;
        let nb = if saved { v.depth } else { 1 };
        let ns = if saved { v.depth + 1 } else { 2 };
        Self {
            size,
            grid,
            np,
            t,
            saved,
            stem: StemBufs::new(cx, cap, size, saved),
            patches: vec![0.0; cap * np * cx.kp],
            pos: vec![0.0; t * d],
            stream: (0..ns).map(|_| vec![0.0; cap * t * d]).collect(),
            blocks: (0..nb).map(|_| BlockBufs::new(cx, cap, t)).collect(),
            tmp: vec![0.0; cap * t * d],
            hid: vec![0.0; cap * t * cx.mh],
            cls_in: vec![0.0; cap * d],
            cls: vec![0.0; cap * d],
            cls_mean: vec![0.0; cap],
            cls_rstd: vec![0.0; cap],
            norm_all: Vec::new(),
            norm_mean: Vec::new(),
            norm_rstd: Vec::new(),
        }
    }

    /// Images the group has room for.
    pub fn cap(&self, d: usize) -> usize {
        self.stream[0].len() / (self.t * d).max(1)
    }

    /// Makes room for the final LayerNorm of every token (see [`forward_ext`]).
    pub fn enable_all_tokens(&mut self, d: usize) {
        let rows = self.cap(d) * self.t;
        self.norm_all = vec![0.0; rows * d];
        self.norm_mean = vec![0.0; rows];
        self.norm_rstd = vec![0.0; rows];
    }
}

/// iBOT's additions to a forward: the 0/1 mask of the patch tokens `[n, np]` and the mask
/// token `[d]` that replaces masked patch embeddings.
#[derive(Clone, Copy)]
pub struct PatchMask<'a> {
    pub mask: &'a [f32],
    pub token: &'a [f32],
}

/// Scratch of the backward pass, sized for the largest group.
pub struct BackScratch {
    pub dx: Vec<f32>,
    pub dtmp: Vec<f32>,
    pub dbranch: Vec<f32>,
    pub dln: Vec<f32>,
    pub dattn: Vec<f32>,
    pub dhid: Vec<f32>,
    pub dqkv: Vec<f32>,
    pub dp: Vec<f32>,
    pub dpos: Vec<f32>,
    pub partials: Vec<f32>,
    pub stem: StemScratch,
}

impl BackScratch {
    /// For groups of `(images, crop side)` in `sized`.
    pub fn new(cx: &Cx, sized: &[(usize, usize)]) -> Self {
        let (d, mh) = (cx.d, cx.mh);
        let groups: Vec<(usize, usize)> = sized
            .iter()
            .map(|&(n, side)| (n, cx.cfg.vit.num_patches_for(side) + 1))
            .collect();
        let rows = groups.iter().map(|&(n, t)| n * t).max().unwrap_or(0);
        let nt2 = groups.iter().map(|&(n, t)| n * t * t).max().unwrap_or(0);
        let td = groups.iter().map(|&(_, t)| t * d).max().unwrap_or(0);
        let part_rows = n_chunks(rows) * (3 * d).max(mh).max(2 * d);
        let part_img = groups
            .iter()
            .map(|&(n, t)| n_chunks(n) * t * d)
            .max()
            .unwrap_or(0);
        Self {
            dx: vec![0.0; rows * d],
            dtmp: vec![0.0; rows * d],
            dbranch: vec![0.0; rows * d],
            dln: vec![0.0; rows * d],
            dattn: vec![0.0; rows * d],
            dhid: vec![0.0; rows * mh],
            dqkv: vec![0.0; rows * 3 * d],
            dp: vec![0.0; nt2],
            dpos: vec![0.0; td],
            partials: vec![0.0; part_rows.max(part_img).max(n_chunks(rows) * 2 * d)],
            stem: StemScratch::new(cx, sized),
        }
    }
}

/// Drop-path scales of block `i`'s two branches within `[depth][2][n]`.
fn branch_scales(scales: Option<&[f32]>, i: usize, n: usize) -> (Option<&[f32]>, Option<&[f32]>) {
    match scales {
        Some(s) => (
            Some(&s[2 * i * n..(2 * i + 1) * n]),
            Some(&s[(2 * i + 1) * n..(2 * i + 2) * n]),
        ),
        None => (None, None),
    }
}

/// Forward of `n <= cap` images `[n, C, size, size]`; leaves the final-LayerNorm `[CLS]`
/// features in `g.cls`. `scales` are drop-path factors `mask / keep` as `[depth][2][n]`.
/// `save` keeps every block's activations for [`backward`] (the group must have been built
/// with `saved`); otherwise one set of block buffers is reused (teacher, `embed`).
pub fn forward(
    cx: &Cx,
    p: &[f32],
    g: &mut Group,
    images: &[f32],
    n: usize,
    scales: Option<&[f32]>,
    save: bool,
) {
    forward_ext(cx, p, g, images, n, scales, save, None, false);
}

/// [`forward`] with iBOT's options: `mask` substitutes the mask token for masked patch
/// embeddings (before `[CLS]` and the position embedding are added, as core's
/// `mask_tokens_forward`); `all_tokens` runs the last block on every token and the final
/// LayerNorm into `g.norm_all` (the group must have [`Group::enable_all_tokens`]); `g.cls`
/// gets the `[CLS]` rows either way.
#[allow(clippy::too_many_arguments)]
pub fn forward_ext(
    cx: &Cx,
    p: &[f32],
    g: &mut Group,
    images: &[f32],
    n: usize,
    scales: Option<&[f32]>,
    save: bool,
    mask: Option<PatchMask<'_>>,
    all_tokens: bool,
) {
    let save = save && g.saved;
    let v = &cx.cfg.vit;
    let lay = &cx.lay;
    let (d, kp, t, np) = (cx.d, cx.kp, g.t, g.np);
    let (size, c) = (g.size, v.in_chans);
    let img_len = c * size * size;

    // Patch tokens, position embedding on this grid, tokens.
    if v.stem_len() > 0 {
        conv_stem::forward(cx, p, &mut g.stem, images, n, &mut g.patches);
    } else {
        g.patches[..n * np * kp]
            .par_chunks_mut(np * kp)
            .zip(images[..n * img_len].par_chunks(img_len))
            .for_each(|(pt, im)| patchify(pt, im, 1, c, size, size, v.patch));
    }
    linear_matmul(
        cx.prec,
        n * np,
        d,
        kp,
        &g.patches,
        Op::N,
        &p[lay.patch_w..lay.patch_w + d * kp],
        Op::T,
        &mut g.tmp,
        false,
    );
    let g0 = v.grid();
    pos_embed_for_grid_forward(
        &mut g.pos,
        &p[lay.pos..lay.pos + v.num_tokens() * d],
        g0,
        g0,
        g.grid,
        g.grid,
        d,
    );
    {
        let cls = &p[lay.cls..lay.cls + d];
        let pb = &p[lay.patch_b..lay.patch_b + d];
        let pos = &g.pos;
        g.stream[0][..n * t * d]
            .par_chunks_mut(t * d)
            .zip(g.tmp[..n * np * d].par_chunks(np * d))
            .enumerate()
            .for_each(|(b, (x, pt))| {
                for k in 0..d {
                    x[k] = cls[k] + pos[k];
                }
                for (j, ((xr, pr), posr)) in x[d..]
                    .chunks_exact_mut(d)
                    .zip(pt.chunks_exact(d))
                    .zip(pos[d..].chunks_exact(d))
                    .enumerate()
                {
                    match mask {
                        // The token replaces the whole patch embedding, bias included.
                        Some(m) if m.mask[b * np + j] != 0.0 => {
                            for k in 0..d {
                                xr[k] = m.token[k] + posr[k];
                            }
                        }
                        _ => {
                            for k in 0..d {
                                xr[k] = pr[k] + pb[k] + posr[k];
                            }
                        }
                    }
                }
            });
    }

    // LayerNorm 1 of the first block; every later LayerNorm (the next block's LayerNorm 1, the
    // final one) runs inside the residual that makes its input (see `Next`).
    {
        let o = lay.block(0);
        let bb = &mut g.blocks[0];
        rows::layernorm_fwd(
            &mut bb.ln1,
            &mut bb.ln1_mean,
            &mut bb.ln1_rstd,
            &g.stream[0][..n * t * d],
            &p[o.norm1_w..o.norm1_w + d],
            &p[o.norm1_b..o.norm1_b + d],
            n * t,
            d,
            cx.eps,
        );
    }
    for i in 0..v.depth {
        let (si, so) = if save {
            (i, i + 1)
        } else {
            (i % 2, (i + 1) % 2)
        };
        let last = i + 1 == v.depth;
        let (sa, sm) = branch_scales(scales, i, n);
        let (x, xout) = two(&mut g.stream, si, so);
        let (bb, next) = if last {
            let (gamma, beta) = (
                &p[lay.norm_w..lay.norm_w + d],
                &p[lay.norm_b..lay.norm_b + d],
            );
            let (y, mean, rstd) = if all_tokens {
                (&mut g.norm_all, &mut g.norm_mean, &mut g.norm_rstd)
            } else {
                (&mut g.cls, &mut g.cls_mean, &mut g.cls_rstd)
            };
            let norm = NormOut {
                y,
                mean,
                rstd,
                gamma,
                beta,
                eps: cx.eps,
            };
            (&mut g.blocks[if save { i } else { 0 }], Next::Norm(norm))
        } else {
            let o = lay.block(i + 1);
            let (gamma, beta) = (&p[o.norm1_w..o.norm1_w + d], &p[o.norm1_b..o.norm1_b + d]);
            if save {
                let (done, rest) = g.blocks.split_at_mut(i + 1);
                let nb = &mut rest[0];
                let norm = NormOut {
                    y: &mut nb.ln1,
                    mean: &mut nb.ln1_mean,
                    rstd: &mut nb.ln1_rstd,
                    gamma,
                    beta,
                    eps: cx.eps,
                };
                (&mut done[i], Next::Norm(norm))
            } else {
                (&mut g.blocks[0], Next::OwnLn1 { gamma, beta })
            }
        };
        block_forward(
            cx,
            p,
            &lay.block(i),
            bb,
            x,
            xout,
            &mut g.tmp,
            &mut g.hid,
            &mut g.cls_in,
            n,
            t,
            sa,
            sm,
            save,
            !all_tokens && last,
            next,
        );
    }

    if all_tokens {
        // The final LayerNorm of every token is in `g.norm_all`; `g.cls` gets its [CLS] rows.
        let na = &g.norm_all;
        g.cls[..n * d]
            .par_chunks_mut(d)
            .enumerate()
            .for_each(|(b, o)| o.copy_from_slice(&na[b * t * d..b * t * d + d]));
    }
}

/// The LayerNorm that reads a block's output, which the block's last residual computes in the
/// same pass ([`rows::residual_drop_layernorm`]).
enum Next<'a> {
    /// Into these buffers: the next block's LayerNorm 1 when every block keeps its
    /// activations, or the final LayerNorm after the last block.
    Norm(NormOut<'a>),
    /// The next block's LayerNorm 1 (these parameters) into this block's own `ln1` buffers,
    /// which the next block reuses (nothing saved: teacher, `embed`).
    OwnLn1 { gamma: &'a [f32], beta: &'a [f32] },
}

/// `(&v[a], &mut v[b])` for `a != b`.
fn two(v: &mut [Vec<f32>], a: usize, b: usize) -> (&[f32], &mut [f32]) {
    if a < b {
        let (lo, hi) = v.split_at_mut(b);
        (&lo[a], &mut hi[0])
    } else {
        let (lo, hi) = v.split_at_mut(a);
        (&hi[0], &mut lo[b])
    }
}

/// One block, whose LayerNorm 1 of `x` is already in `bb.ln1` (the previous block's last
/// residual, or the first LayerNorm, made it); its output residual also makes `next`. With
/// `cls_only` (the last block) only the `[CLS]` rows of its output are made: LayerNorm 1 and
/// `qkv` run on every token (keys and values), attention for query 0 only, and projection,
/// LayerNorm 2 and MLP on `n` rows; `xout` then holds `[n, d]` and `xc` the block input's
/// `[CLS]` rows (the residual).
#[allow(clippy::too_many_arguments)]
fn block_forward(
    cx: &Cx,
    p: &[f32],
    o: &BlockOffsets,
    bb: &mut BlockBufs,
    x: &[f32],
    xout: &mut [f32],
    tmp: &mut [f32],
    hid: &mut [f32],
    xc: &mut [f32],
    n: usize,
    t: usize,
    sa: Option<&[f32]>,
    sm: Option<&[f32]>,
    save: bool,
    cls_only: bool,
    next: Next<'_>,
) {
    let (d, mh) = (cx.d, cx.mh);
    let rows = n * t;
    let w = |off: usize, len: usize| &p[off..off + len];
    let acc = match o.qkv_b {
        Some(b) => {
            rows::fill_rows(&mut bb.qkv, w(b, 3 * d), rows);
            true
        }
        None => false,
    };
    linear_matmul(
        cx.prec,
        rows,
        3 * d,
        d,
        &bb.ln1,
        Op::N,
        w(o.qkv_w, 3 * d * d),
        Op::T,
        &mut bb.qkv,
        acc,
    );
    // From here on the rows are all tokens, or the [CLS] tokens only.
    let (r, per) = if cls_only {
        attention::forward_cls(&mut bb.attn_out, &mut bb.att, &bb.qkv, n, t, d, cx.heads);
        xc[..n * d]
            .par_chunks_mut(d)
            .enumerate()
            .for_each(|(b, o)| o.copy_from_slice(&x[b * t * d..b * t * d + d]));
        (n, d)
    } else {
        attention::forward(&mut bb.attn_out, &mut bb.att, &bb.qkv, n, t, d, cx.heads);
        (rows, t * d)
    };
    let xres: &[f32] = if cls_only { xc } else { x };
    linear_matmul(
        cx.prec,
        r,
        d,
        d,
        &bb.attn_out,
        Op::N,
        w(o.proj_w, d * d),
        Op::T,
        tmp,
        false,
    );
    let ln2 = NormOut {
        y: &mut bb.ln2,
        mean: &mut bb.ln2_mean,
        rstd: &mut bb.ln2_rstd,
        gamma: w(o.norm2_w, d),
        beta: w(o.norm2_b, d),
        eps: cx.eps,
    };
    rows::residual_drop_layernorm(&mut bb.x_mid, ln2, xres, tmp, w(o.proj_b, d), sa, n, per);
    linear_matmul(
        cx.prec,
        r,
        mh,
        d,
        &bb.ln2,
        Op::N,
        w(o.fc1_w, mh * d),
        Op::T,
        hid,
        false,
    );
    let dg = if save { Some(&mut bb.dgelu[..]) } else { None };
    rows::bias_gelu(hid, &mut bb.gelu, dg, w(o.fc1_b, mh), r);
    linear_matmul(
        cx.prec,
        r,
        d,
        mh,
        &bb.gelu,
        Op::N,
        w(o.fc2_w, d * mh),
        Op::T,
        tmp,
        false,
    );
    let norm = match next {
        Next::Norm(norm) => norm,
        Next::OwnLn1 { gamma, beta } => NormOut {
            y: &mut bb.ln1,
            mean: &mut bb.ln1_mean,
            rstd: &mut bb.ln1_rstd,
            gamma,
            beta,
            eps: cx.eps,
        },
    };
    rows::residual_drop_layernorm(xout, norm, &bb.x_mid, tmp, w(o.fc2_b, d), sm, n, per);
}

/// Backward of [`forward`] (which must have run with `g.saved`) from `dcls[n, d]`, the
/// gradient at the final-LayerNorm `[CLS]` output: every backbone gradient ACCUMULATES into
/// the flat `grads`.
#[allow(clippy::too_many_arguments)]
pub fn backward(
    cx: &Cx,
    p: &[f32],
    grads: &mut [f32],
    g: &Group,
    dcls: &[f32],
    n: usize,
    scales: Option<&[f32]>,
    bs: &mut BackScratch,
) {
    backward_ext(cx, p, grads, g, dcls, n, scales, bs, None, false);
}

/// Backward of [`forward_ext`]: with `all_tokens`, `dy` is the gradient at every token's
/// final-LayerNorm output `[n, t, d]` (else at the `[CLS]` rows `[n, d]`); with a mask, the
/// masked rows' gradient goes to the mask token (at `mask_token` in the flat layout) instead
/// of the patch embedding.
#[allow(clippy::too_many_arguments)]
pub fn backward_ext(
    cx: &Cx,
    p: &[f32],
    grads: &mut [f32],
    g: &Group,
    dy: &[f32],
    n: usize,
    scales: Option<&[f32]>,
    bs: &mut BackScratch,
    mask: Option<(&[f32], usize)>,
    all_tokens: bool,
) {
    debug_assert!(g.saved);
    let v = &cx.cfg.vit;
    let lay = &cx.lay;
    let (d, mh, kp, t, np) = (cx.d, cx.mh, cx.kp, g.t, g.np);
    let rows = n * t;
    let w = |off: usize, len: usize| &p[off..off + len];
    let dcls = dy;

    if all_tokens {
        bs.dx[..rows * d].fill(0.0);
        let (gw, gb) = grads[lay.norm_w..lay.norm_w + 2 * d].split_at_mut(d);
        rows::layernorm_bwd_add(
            &mut bs.dx,
            gw,
            gb,
            dy,
            &g.stream[v.depth],
            &g.norm_mean,
            &g.norm_rstd,
            w(lay.norm_w, d),
            &mut bs.partials,
            rows,
            d,
        );
    } else {
        // Final LayerNorm: its input is the last block's `[CLS]` output, `stream[depth]` `[n, d]`.
        bs.dx[..n * d].fill(0.0);
        let (gw, gb) = grads[lay.norm_w..lay.norm_w + 2 * d].split_at_mut(d);
        rows::layernorm_bwd_add(
            &mut bs.dx,
            gw,
            gb,
            dcls,
            &g.stream[v.depth],
            &g.cls_mean,
            &g.cls_rstd,
            w(lay.norm_w, d),
            &mut bs.partials,
            n,
            d,
        );
    }

    for i in (0..v.depth).rev() {
        let o = lay.block(i);
        let bb = &g.blocks[i];
        let x_in = &g.stream[i];
        let (sa, sm) = branch_scales(scales, i, n);
        // The last block works on the `[CLS]` rows until the attention (see `block_forward`).
        let cls_only = !all_tokens && i + 1 == v.depth;
        let (r, per) = if cls_only { (n, d) } else { (rows, t * d) };

        // MLP branch.
        rows::scale_images(&mut bs.dbranch, &bs.dx, sm, n, per);
        rows::colsum_add(
            &mut grads[o.fc2_b..o.fc2_b + d],
            &bs.dbranch,
            r,
            d,
            &mut bs.partials,
        );
        linear_matmul(
            cx.prec,
            d,
            mh,
            r,
            &bs.dbranch,
            Op::T,
            &bb.gelu,
            Op::N,
            &mut grads[o.fc2_w..o.fc2_w + d * mh],
            true,
        );
        linear_matmul(
            cx.prec,
            r,
            mh,
            d,
            &bs.dbranch,
            Op::N,
            w(o.fc2_w, d * mh),
            Op::N,
            &mut bs.dhid,
            false,
        );
        rows::mul_inplace(&mut bs.dhid, &bb.dgelu, r * mh);
        rows::colsum_add(
            &mut grads[o.fc1_b..o.fc1_b + mh],
            &bs.dhid,
            r,
            mh,
            &mut bs.partials,
        );
        linear_matmul(
            cx.prec,
            mh,
            d,
            r,
            &bs.dhid,
            Op::T,
            &bb.ln2,
            Op::N,
            &mut grads[o.fc1_w..o.fc1_w + mh * d],
            true,
        );
        linear_matmul(
            cx.prec,
            r,
            d,
            mh,
            &bs.dhid,
            Op::N,
            w(o.fc1_w, mh * d),
            Op::N,
            &mut bs.dln,
            false,
        );
        {
            let (gw, gb) = grads[o.norm2_w..o.norm2_w + 2 * d].split_at_mut(d);
            rows::layernorm_bwd_add(
                &mut bs.dx,
                gw,
                gb,
                &bs.dln,
                &bb.x_mid,
                &bb.ln2_mean,
                &bb.ln2_rstd,
                w(o.norm2_w, d),
                &mut bs.partials,
                r,
                d,
            );
        }

        // Attention branch.
        rows::scale_images(&mut bs.dbranch, &bs.dx, sa, n, per);
        rows::colsum_add(
            &mut grads[o.proj_b..o.proj_b + d],
            &bs.dbranch,
            r,
            d,
            &mut bs.partials,
        );
        linear_matmul(
            cx.prec,
            d,
            d,
            r,
            &bs.dbranch,
            Op::T,
            &bb.attn_out,
            Op::N,
            &mut grads[o.proj_w..o.proj_w + d * d],
            true,
        );
        linear_matmul(
            cx.prec,
            r,
            d,
            d,
            &bs.dbranch,
            Op::N,
            w(o.proj_w, d * d),
            Op::N,
            &mut bs.dattn,
            false,
        );
        if cls_only {
            attention::backward_cls(
                &mut bs.dqkv,
                &mut bs.dp,
                &bs.dattn,
                &bb.qkv,
                &bb.att,
                n,
                t,
                d,
                cx.heads,
            );
            // The stream gradient becomes full-size: `[CLS]` rows from the residual, 0 elsewhere.
            bs.dtmp[..n * d].copy_from_slice(&bs.dx[..n * d]);
            let dxc = &bs.dtmp;
            bs.dx[..rows * d]
                .par_chunks_mut(t * d)
                .enumerate()
                .for_each(|(b, x)| {
                    x[..d].copy_from_slice(&dxc[b * d..(b + 1) * d]);
                    x[d..].fill(0.0);
                });
        } else {
            attention::backward(
                &mut bs.dqkv,
                &mut bs.dp,
                &bs.dattn,
                &bb.qkv,
                &bb.att,
                n,
                t,
                d,
                cx.heads,
            );
        }
        if let Some(qb) = o.qkv_b {
            rows::colsum_add(
                &mut grads[qb..qb + 3 * d],
                &bs.dqkv,
                rows,
                3 * d,
                &mut bs.partials,
            );
        }
        linear_matmul(
            cx.prec,
            3 * d,
            d,
            rows,
            &bs.dqkv,
            Op::T,
            &bb.ln1,
            Op::N,
            &mut grads[o.qkv_w..o.qkv_w + 3 * d * d],
            true,
        );
        linear_matmul(
            cx.prec,
            rows,
            d,
            3 * d,
            &bs.dqkv,
            Op::N,
            w(o.qkv_w, 3 * d * d),
            Op::N,
            &mut bs.dln,
            false,
        );
        {
            let (gw, gb) = grads[o.norm1_w..o.norm1_w + 2 * d].split_at_mut(d);
            rows::layernorm_bwd_add(
                &mut bs.dx,
                gw,
                gb,
                &bs.dln,
                x_in,
                &bb.ln1_mean,
                &bb.ln1_rstd,
                w(o.norm1_w, d),
                &mut bs.partials,
                rows,
                d,
            );
        }
    }

    // Tokens: [CLS] and the position embedding (summed over images), the patch embedding.
    let dpos = &mut bs.dpos[..t * d];
    dpos.fill(0.0);
    rows::colsum_add(dpos, &bs.dx, n, t * d, &mut bs.partials);
    for k in 0..d {
        grads[lay.cls + k] += dpos[k];
    }
    let g0 = v.grid();
    pos_embed_for_grid_backward(
        &mut grads[lay.pos..lay.pos + v.num_tokens() * d],
        dpos,
        g0,
        g0,
        g.grid,
        g.grid,
        d,
    );
    let dx = &bs.dx;
    bs.dtmp[..n * np * d]
        .par_chunks_mut(np * d)
        .enumerate()
        .for_each(|(b, o)| o.copy_from_slice(&dx[b * t * d + d..(b + 1) * t * d]));
    if let Some((m, tok)) = mask {
        // In row order, so the sum is deterministic.
        let dtok = &mut grads[tok..tok + d];
        for (row, &mi) in bs.dtmp[..n * np * d].chunks_exact_mut(d).zip(&m[..n * np]) {
            if mi != 0.0 {
                for (a, x) in dtok.iter_mut().zip(row.iter_mut()) {
                    *a += *x;
                    *x = 0.0;
                }
            }
        }
    }
    rows::colsum_add(
        &mut grads[lay.patch_b..lay.patch_b + d],
        &bs.dtmp,
        n * np,
        d,
        &mut bs.partials,
    );
    linear_matmul(
        cx.prec,
        d,
        kp,
        n * np,
        &bs.dtmp,
        Op::T,
        &g.patches,
        Op::N,
        &mut grads[lay.patch_w..lay.patch_w + d * kp],
        true,
    );
    if v.stem_len() > 0 {
        // The patch rows' gradient `dtmp w` (w = [d, kp]) into the stem's scratch, then down it.
        linear_matmul(
            cx.prec,
            n * np,
            kp,
            d,
            &bs.dtmp,
            Op::N,
            &p[lay.patch_w..lay.patch_w + d * kp],
            Op::N,
            &mut bs.stem.dact,
            false,
        );
        conv_stem::backward(cx, p, grads, &g.stem, n, &mut bs.stem);
    }
}
