//! Whole-model reference: ViT backbone + head MLP up to the bottleneck `z`, forward and backward,
//! generic over [`Real`] and built only from the ops in [`crate::ops`].
//!
//! This is what the fast backends are checked against (and what the whole-model finite-difference
//! test checks), so it keeps every intermediate in plain `Vec`s and does nothing clever. The
//! L2 normalisation of `z` and the prototype layer belong to the loss code.
use crate::model::{Layout, ModelConfig};
use crate::ops::*;
use crate::Real;
use alloc::vec;
use alloc::vec::Vec;

/// What was wrong with the arguments (nothing here panics on user input).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ShapeError {
    /// The configuration does not describe a runnable model (see [`ModelConfig::is_valid`]).
    Config,
    /// The crop side is not a positive multiple of the patch size.
    ImageSize,
    /// A slice is shorter than the shapes require.
    Length(&'static str),
}

/// Saved activations of one transformer block.
#[derive(Clone, Debug)]
pub struct BlockCache<T> {
    /// LayerNorm 1 output and statistics.
    pub ln1: Vec<T>,
    pub ln1_mean: Vec<T>,
    pub ln1_rstd: Vec<T>,
    /// `[B, T, 3D]`.
    pub qkv: Vec<T>,
    /// Attention probabilities `[B, H, T, T]`.
    pub att: Vec<T>,
    /// Attention output before `proj`, `[B, T, D]`.
    pub attn_out: Vec<T>,
    /// `proj` output (the attention branch before drop path).
    pub proj: Vec<T>,
    /// Residual stream after the attention branch.
    pub x_mid: Vec<T>,
    pub ln2: Vec<T>,
    pub ln2_mean: Vec<T>,
    pub ln2_rstd: Vec<T>,
    /// `fc1` output before GELU, `[B, T, 4D]`.
    pub fc1: Vec<T>,
    pub gelu: Vec<T>,
    /// `fc2` output (the MLP branch before drop path).
    pub fc2: Vec<T>,
}

/// Saved activations of one stem convolution.
#[derive(Clone, Debug)]
pub struct StemCache<T> {
    /// Input side of the convolution.
    pub side: usize,
    /// im2col of its input `[B, So So, C_in 9]`.
    pub cols: Vec<T>,
    /// Output before GELU `[B, So So, C_out]`.
    pub pre: Vec<T>,
}

/// Everything the backward needs, plus the features the evaluation reads.
#[derive(Clone, Debug)]
pub struct Activations<T> {
    pub batch: usize,
    pub img_size: usize,
    /// Patches per side of this crop.
    pub grid: usize,
    /// Tokens per image, `grid^2 + 1`.
    pub tokens: usize,
    /// Patchified images `[B, N, C P P]` (with a stem: its last map, `[B, N, D]`).
    pub patches: Vec<T>,
    /// The stem's convolutions, first to last (empty without a stem).
    pub stem: Vec<StemCache<T>>,
    /// Position embedding on this grid, `[T, D]`.
    pub pos: Vec<T>,
    /// Residual stream: `stream[0]` are the embedded tokens, `stream[i + 1]` block `i`'s output.
    pub stream: Vec<Vec<T>>,
    pub blocks: Vec<BlockCache<T>>,
    /// Final LayerNorm over all tokens, `[B, T, D]`, and its statistics.
    pub norm: Vec<T>,
    pub norm_mean: Vec<T>,
    pub norm_rstd: Vec<T>,
    /// The `[CLS]` feature (final LayerNorm, token 0), `[B, D]`: the head's input, and the
    /// feature k-NN evaluation uses.
    pub cls: Vec<T>,
    /// Head MLP: each linear's output `[B, d_out]` (before GELU), and the GELU outputs of all
    /// but the last.
    pub head_pre: Vec<Vec<T>>,
    pub head_act: Vec<Vec<T>>,
    /// Bottleneck output `z`, `[B, p]` (not normalised).
    pub z: Vec<T>,
    /// Drop-path masks used, `[depth, 2, B]` (attention branch, then MLP branch), if any.
    pub drop_masks: Option<Vec<T>>,
    /// The iBOT patch mask used, `[B, N]` of 0/1, if any.
    pub patch_mask: Option<Vec<T>>,
    /// The head ran on every token (iBOT): `head_*` and `z` have `B T` rows (image `b`, token
    /// `i` at row `b T + i`; `[CLS]` is token 0) instead of `B`.
    pub all_tokens: bool,
}

impl<T: Real> Activations<T> {
    /// The `[CLS]` feature `[B, D]`.
    pub fn cls_feature(&self) -> &[T] {
        &self.cls
    }

    /// The last block's `[CLS]`-query attention probabilities, `[B, H, T]` (the row of query 0
    /// in every head; the attention maps DINO visualises).
    pub fn last_cls_attention(&self, heads: usize) -> Vec<T> {
        let t = self.tokens;
        let mut out = Vec::with_capacity(self.batch * heads * t);
        if let Some(blk) = self.blocks.last() {
            for bh in 0..self.batch * heads {
                out.extend_from_slice(&blk.att[bh * t * t..bh * t * t + t]);
            }
        }
        out
    }
}

fn need(ok: bool, what: &'static str) -> Result<(), ShapeError> {
    if ok {
        Ok(())
    } else {
        Err(ShapeError::Length(what))
    }
}

fn check(cfg: &ModelConfig, params: usize, img_size: usize) -> Result<Layout, ShapeError> {
    if !cfg.is_valid() {
        return Err(ShapeError::Config);
    }
    if !cfg.vit.accepts(img_size) {
        return Err(ShapeError::ImageSize);
    }
    let lay = Layout::new(cfg);
    need(params >= lay.total, "params")?;
    Ok(lay)
}

/// Forward of backbone + head MLP for `b` images `[B, C, S, S]` (CHW) of side `img_size`.
///
/// `drop_masks`, when given, is `[depth, 2, B]` of 0/1 (attention branch, then MLP branch, per
/// block), applied with block `i`'s keep probability [`crate::model::VitConfig::keep_prob`]
/// (the student); `None` runs without drop path (teacher, evaluation).
pub fn forward<T: Real>(
    cfg: &ModelConfig,
    params: &[T],
    images: &[T],
    b: usize,
    img_size: usize,
    drop_masks: Option<&[T]>,
) -> Result<Activations<T>, ShapeError> {
    forward_ibot(cfg, params, images, b, img_size, drop_masks, None, false)
}

/// [`forward`] with iBOT's two additions: `patch_mask` (`[B, N]` of 0/1) replaces masked patch
/// embeddings by the model's mask token (`backbone.masked_embed`, which the model must have)
/// before `[CLS]` and the position embedding are added; `all_tokens` runs the head on every
/// token's final-LayerNorm output, not just `[CLS]`.
#[allow(clippy::too_many_arguments)]
pub fn forward_ibot<T: Real>(
    cfg: &ModelConfig,
    params: &[T],
    images: &[T],
    b: usize,
    img_size: usize,
    drop_masks: Option<&[T]>,
    patch_mask: Option<&[T]>,
    all_tokens: bool,
) -> Result<Activations<T>, ShapeError> {
    let lay = check(cfg, params.len(), img_size)?;
    let v = &cfg.vit;
    let (c, d, heads, mh) = (v.in_chans, v.dim, v.heads, v.mlp_hidden());
    let g = img_size / v.patch;
    let np = g * g;
    let t = np + 1;
    let n = b * t;
    let eps = T::from_f64(v.ln_eps);
    need(images.len() >= b * c * img_size * img_size, "images")?;
    if let Some(m) = drop_masks {
        need(m.len() >= v.depth * 2 * b, "drop_masks")?;
    }
    let pw = |off: usize, len: usize| &params[off..off + len];

    // Tokens.
    let mut patch_tok = vec![T::ZERO; b * np * d];
    let mut patches = vec![T::ZERO; b * np * v.patch_len()];
    let mut stem = Vec::new();
    if v.stem_len() == 0 {
        patch_embed_forward(
            &mut patch_tok,
            &mut patches,
            images,
            pw(lay.patch_w, d * v.patch_len()),
            Some(pw(lay.patch_b, d)),
            b,
            c,
            img_size,
            img_size,
            v.patch,
            d,
        );
    } else {
        // HWC maps from the image down to the token grid, then the 1 x 1 patch embedding.
        let mut x = vec![T::ZERO; b * c * img_size * img_size];
        chw_to_hwc(&mut x, images, b, c, img_size * img_size);
        let mut side = img_size;
        for i in 0..v.stem_len() {
            let l = v.stem_layer(i);
            let so = conv3x3_out_side(side, l.stride);
            let rows = b * so * so;
            let mut cols = vec![T::ZERO; rows * l.col_len()];
            im2col3x3(&mut cols, &x, b, l.c_in, side, l.stride);
            let (w_off, b_off) = lay.stem_layer(i);
            let mut pre = vec![T::ZERO; rows * l.c_out];
            linear_forward(
                &mut pre,
                &cols,
                pw(w_off, l.c_out * l.col_len()),
                Some(pw(b_off, l.c_out)),
                rows,
                l.col_len(),
                l.c_out,
            );
            x = vec![T::ZERO; rows * l.c_out];
            gelu_forward(&mut x, &pre);
            stem.push(StemCache { side, cols, pre });
            side = so;
        }
        patches = x;
        linear_forward(
            &mut patch_tok,
            &patches,
            pw(lay.patch_w, d * v.patch_len()),
            Some(pw(lay.patch_b, d)),
            b * np,
            v.patch_len(),
            d,
        );
    }
    if let Some(m) = patch_mask {
        need(m.len() >= b * np, "patch_mask")?;
        let tok = lay.mask_token.ok_or(ShapeError::Length("mask token"))?;
        mask_tokens_forward(&mut patch_tok, m, pw(tok, d), b * np, d);
    }
    let mut pos = vec![T::ZERO; t * d];
    let g0 = v.grid();
    pos_embed_for_grid_forward(&mut pos, pw(lay.pos, v.num_tokens() * d), g0, g0, g, g, d);
    let mut x0 = vec![T::ZERO; n * d];
    tokens_forward(&mut x0, &patch_tok, pw(lay.cls, d), &pos, b, np, d);

    // Blocks.
    let mut stream = Vec::with_capacity(v.depth + 1);
    stream.push(x0);
    let mut blocks = Vec::with_capacity(v.depth);
    for i in 0..v.depth {
        let o = lay.block(i);
        let keep = T::from_f64(v.keep_prob(i));
        let x = &stream[i];
        let mut bc = BlockCache {
            ln1: vec![T::ZERO; n * d],
            ln1_mean: vec![T::ZERO; n],
            ln1_rstd: vec![T::ZERO; n],
            qkv: vec![T::ZERO; n * 3 * d],
            att: vec![T::ZERO; b * heads * t * t],
            attn_out: vec![T::ZERO; n * d],
            proj: vec![T::ZERO; n * d],
            x_mid: vec![T::ZERO; n * d],
            ln2: vec![T::ZERO; n * d],
            ln2_mean: vec![T::ZERO; n],
            ln2_rstd: vec![T::ZERO; n],
            fc1: vec![T::ZERO; n * mh],
            gelu: vec![T::ZERO; n * mh],
            fc2: vec![T::ZERO; n * d],
        };
        layernorm_forward(
            &mut bc.ln1,
            &mut bc.ln1_mean,
            &mut bc.ln1_rstd,
            x,
            pw(o.norm1_w, d),
            pw(o.norm1_b, d),
            n,
            d,
            eps,
        );
        let qkv_b = o.qkv_b.map(|off| pw(off, 3 * d));
        linear_forward(
            &mut bc.qkv,
            &bc.ln1,
            pw(o.qkv_w, 3 * d * d),
            qkv_b,
            n,
            d,
            3 * d,
        );
        attention_forward(&mut bc.attn_out, &mut bc.att, &bc.qkv, None, b, t, d, heads);
        linear_forward(
            &mut bc.proj,
            &bc.attn_out,
            pw(o.proj_w, d * d),
            Some(pw(o.proj_b, d)),
            n,
            d,
            d,
        );
        let mut branch = vec![T::ZERO; n * d];
        match drop_masks {
            Some(m) => drop_path_forward(&mut branch, &bc.proj, &m[2 * i * b..], keep, b, t * d),
            None => branch.copy_from_slice(&bc.proj),
        }
        residual_forward(&mut bc.x_mid, x, &branch);
        layernorm_forward(
            &mut bc.ln2,
            &mut bc.ln2_mean,
            &mut bc.ln2_rstd,
            &bc.x_mid,
            pw(o.norm2_w, d),
            pw(o.norm2_b, d),
            n,
            d,
            eps,
        );
        linear_forward(
            &mut bc.fc1,
            &bc.ln2,
            pw(o.fc1_w, mh * d),
            Some(pw(o.fc1_b, mh)),
            n,
            d,
            mh,
        );
        gelu_forward(&mut bc.gelu, &bc.fc1);
        linear_forward(
            &mut bc.fc2,
            &bc.gelu,
            pw(o.fc2_w, d * mh),
            Some(pw(o.fc2_b, d)),
            n,
            mh,
            d,
        );
        match drop_masks {
            Some(m) => {
                drop_path_forward(&mut branch, &bc.fc2, &m[(2 * i + 1) * b..], keep, b, t * d)
            }
            None => branch.copy_from_slice(&bc.fc2),
        }
        let mut x_out = vec![T::ZERO; n * d];
        residual_forward(&mut x_out, &bc.x_mid, &branch);
        stream.push(x_out);
        blocks.push(bc);
    }

    // Final norm, [CLS] feature.
    let mut norm = vec![T::ZERO; n * d];
    let mut norm_mean = vec![T::ZERO; n];
    let mut norm_rstd = vec![T::ZERO; n];
    layernorm_forward(
        &mut norm,
        &mut norm_mean,
        &mut norm_rstd,
        &stream[v.depth],
        pw(lay.norm_w, d),
        pw(lay.norm_b, d),
        n,
        d,
        eps,
    );
    let mut cls = vec![T::ZERO; b * d];
    for bi in 0..b {
        cls[bi * d..(bi + 1) * d].copy_from_slice(&norm[bi * t * d..bi * t * d + d]);
    }

    // Head MLP.
    let nl = cfg.head.n_layers;
    let hr = if all_tokens { n } else { b };
    let mut head_pre: Vec<Vec<T>> = Vec::with_capacity(nl);
    let mut head_act: Vec<Vec<T>> = Vec::with_capacity(nl.saturating_sub(1));
    for l in 0..nl {
        let hl = lay.head_layer(l);
        let input: &[T] = match (l, all_tokens) {
            (0, true) => &norm,
            (0, false) => &cls,
            _ => &head_act[l - 1],
        };
        let mut y = vec![T::ZERO; hr * hl.d_out];
        linear_forward(
            &mut y,
            input,
            pw(hl.w, hl.d_out * hl.d_in),
            Some(pw(hl.b, hl.d_out)),
            hr,
            hl.d_in,
            hl.d_out,
        );
        if l + 1 < nl {
            let mut a = vec![T::ZERO; y.len()];
            gelu_forward(&mut a, &y);
            head_act.push(a);
        }
        head_pre.push(y);
    }
    let z = head_pre[nl - 1].clone();

    Ok(Activations {
        batch: b,
        img_size,
        grid: g,
        tokens: t,
        patches,
        stem,
        pos,
        stream,
        blocks,
        norm,
        norm_mean,
        norm_rstd,
        cls,
        head_pre,
        head_act,
        z,
        drop_masks: drop_masks.map(|m| m[..v.depth * 2 * b].to_vec()),
        patch_mask: patch_mask.map(|m| m[..b * np].to_vec()),
        all_tokens,
    })
}

/// Two disjoint mutable ranges of one buffer (`a` must end before `b` starts).
fn pair_mut<T>(buf: &mut [T], a: (usize, usize), b: (usize, usize)) -> (&mut [T], &mut [T]) {
    debug_assert!(a.0 + a.1 <= b.0);
    let (lo, hi) = buf.split_at_mut(b.0);
    (&mut lo[a.0..a.0 + a.1], &mut hi[..b.1])
}

/// Linear backward with the weight and bias gradients taken from the flat `grads`.
#[allow(clippy::too_many_arguments)]
fn linear_bw<T: Real>(
    grads: &mut [T],
    params: &[T],
    w: usize,
    bias: Option<usize>,
    dx: Option<&mut [T]>,
    dy: &[T],
    x: &[T],
    n: usize,
    d_in: usize,
    d_out: usize,
) {
    let wp = &params[w..w + d_out * d_in];
    match bias {
        Some(bo) => {
            let (dw, db) = pair_mut(grads, (w, d_out * d_in), (bo, d_out));
            linear_backward(dx, dw, Some(db), dy, x, wp, n, d_in, d_out);
        }
        None => {
            let dw = &mut grads[w..w + d_out * d_in];
            linear_backward(dx, dw, None, dy, x, wp, n, d_in, d_out);
        }
    }
}

/// LayerNorm backward with `dgamma`/`dbeta` from the flat `grads`; returns nothing, `dx`
/// overwritten.
#[allow(clippy::too_many_arguments)]
fn layernorm_bw<T: Real>(
    grads: &mut [T],
    params: &[T],
    w: usize,
    bias: usize,
    dx: &mut [T],
    dy: &[T],
    x: &[T],
    mean: &[T],
    rstd: &[T],
    n: usize,
    d: usize,
) {
    let (dg, db) = pair_mut(grads, (w, d), (bias, d));
    layernorm_backward(dx, dg, db, dy, x, mean, rstd, &params[w..w + d], n, d);
}

/// Backward from `dz` (`[B, p]`, or `[B T, p]` when the forward ran the head on every token:
/// the gradient of the loss with respect to the bottleneck output) to every backbone and
/// head-MLP parameter (and the mask token when the forward masked): `grads` (the flat layout)
/// ACCUMULATES. The prototype layer's entries are left alone (the loss code owns them).
pub fn backward<T: Real>(
    cfg: &ModelConfig,
    params: &[T],
    acts: &Activations<T>,
    dz: &[T],
    grads: &mut [T],
) -> Result<(), ShapeError> {
    backward_with_cls_grad(cfg, params, acts, dz, None, grads)
}

/// [`backward`] with `dcls_extra` (`[B, D]`, a loss on the `[CLS]` backbone features such as
/// KoLeo) added to the gradient the head sends down to `[CLS]`.
pub fn backward_with_cls_grad<T: Real>(
    cfg: &ModelConfig,
    params: &[T],
    acts: &Activations<T>,
    dz: &[T],
    dcls_extra: Option<&[T]>,
    grads: &mut [T],
) -> Result<(), ShapeError> {
    let lay = check(cfg, params.len(), acts.img_size)?;
    need(grads.len() >= lay.total, "grads")?;
    let v = &cfg.vit;
    let (d, heads, mh) = (v.dim, v.heads, v.mlp_hidden());
    let b = acts.batch;
    let t = acts.tokens;
    let np = t - 1;
    let n = b * t;
    let nl = cfg.head.n_layers;
    let hr = if acts.all_tokens { n } else { b };
    need(dz.len() >= hr * cfg.head.bottleneck, "dz")?;

    // Head MLP, down to d[CLS] (or every token's final-LayerNorm output).
    let mut dcur: Vec<T> = dz[..hr * cfg.head.bottleneck].to_vec();
    let mut dcls = vec![T::ZERO; hr * d];
    for l in (0..nl).rev() {
        let hl = lay.head_layer(l);
        let input: &[T] = match (l, acts.all_tokens) {
            (0, true) => &acts.norm,
            (0, false) => &acts.cls,
            _ => &acts.head_act[l - 1],
        };
        let mut dinput = vec![T::ZERO; hr * hl.d_in];
        linear_bw(
            grads,
            params,
            hl.w,
            Some(hl.b),
            Some(&mut dinput),
            &dcur,
            input,
            hr,
            hl.d_in,
            hl.d_out,
        );
        if l > 0 {
            let mut dpre = vec![T::ZERO; hr * hl.d_in];
            gelu_backward(&mut dpre, &acts.head_pre[l - 1], &dinput);
            dcur = dpre;
        } else {
            dcls = dinput;
        }
    }

    if let Some(extra) = dcls_extra {
        need(!acts.all_tokens && extra.len() >= b * d, "dcls_extra")?;
        for (g, &e) in dcls.iter_mut().zip(extra) {
            *g += e;
        }
    }

    // Final LayerNorm: only the [CLS] rows receive gradient (every row with the head on all
    // tokens).
    let mut dnorm = vec![T::ZERO; n * d];
    if acts.all_tokens {
        dnorm.copy_from_slice(&dcls);
    } else {
        for bi in 0..b {
            dnorm[bi * t * d..bi * t * d + d].copy_from_slice(&dcls[bi * d..(bi + 1) * d]);
        }
    }
    let mut dx = vec![T::ZERO; n * d];
    layernorm_bw(
        grads,
        params,
        lay.norm_w,
        lay.norm_b,
        &mut dx,
        &dnorm,
        &acts.stream[v.depth],
        &acts.norm_mean,
        &acts.norm_rstd,
        n,
        d,
    );

    // Blocks, last to first. `dx` is the gradient at the block's output on entry and at its
    // input on exit.
    let mut dbranch = vec![T::ZERO; n * d];
    let mut dtmp = vec![T::ZERO; n * d];
    let mut dln = vec![T::ZERO; n * d];
    let mut dattn = vec![T::ZERO; n * d];
    let mut dhid = vec![T::ZERO; n * mh];
    let mut dhid2 = vec![T::ZERO; n * mh];
    let mut dqkv = vec![T::ZERO; n * 3 * d];
    for i in (0..v.depth).rev() {
        let o = lay.block(i);
        let bc = &acts.blocks[i];
        let keep = T::from_f64(v.keep_prob(i));
        // MLP branch.
        match &acts.drop_masks {
            Some(m) => drop_path_backward(&mut dbranch, &dx, &m[(2 * i + 1) * b..], keep, b, t * d),
            None => dbranch.copy_from_slice(&dx),
        }
        linear_bw(
            grads,
            params,
            o.fc2_w,
            Some(o.fc2_b),
            Some(&mut dhid),
            &dbranch,
            &bc.gelu,
            n,
            mh,
            d,
        );
        gelu_backward(&mut dhid2, &bc.fc1, &dhid);
        linear_bw(
            grads,
            params,
            o.fc1_w,
            Some(o.fc1_b),
            Some(&mut dln),
            &dhid2,
            &bc.ln2,
            n,
            d,
            mh,
        );
        layernorm_bw(
            grads,
            params,
            o.norm2_w,
            o.norm2_b,
            &mut dtmp,
            &dln,
            &bc.x_mid,
            &bc.ln2_mean,
            &bc.ln2_rstd,
            n,
            d,
        );
        for (a, &g) in dx.iter_mut().zip(&dtmp) {
            *a += g; // dx is now d x_mid
        }
        // Attention branch.
        match &acts.drop_masks {
            Some(m) => drop_path_backward(&mut dbranch, &dx, &m[2 * i * b..], keep, b, t * d),
            None => dbranch.copy_from_slice(&dx),
        }
        linear_bw(
            grads,
            params,
            o.proj_w,
            Some(o.proj_b),
            Some(&mut dattn),
            &dbranch,
            &bc.attn_out,
            n,
            d,
            d,
        );
        attention_backward(&mut dqkv, &dattn, &bc.qkv, &bc.att, b, t, d, heads);
        linear_bw(
            grads,
            params,
            o.qkv_w,
            o.qkv_b,
            Some(&mut dln),
            &dqkv,
            &bc.ln1,
            n,
            d,
            3 * d,
        );
        layernorm_bw(
            grads,
            params,
            o.norm1_w,
            o.norm1_b,
            &mut dtmp,
            &dln,
            &acts.stream[i],
            &bc.ln1_mean,
            &bc.ln1_rstd,
            n,
            d,
        );
        for (a, &g) in dx.iter_mut().zip(&dtmp) {
            *a += g; // dx is now d x_in
        }
    }

    // Tokens: [CLS], position embedding (through the resize), patch embedding.
    let mut dpatch_tok = vec![T::ZERO; b * np * d];
    let mut dpos_grid = vec![T::ZERO; t * d];
    tokens_backward(
        &mut dpatch_tok,
        &mut grads[lay.cls..lay.cls + d],
        &mut dpos_grid,
        &dx,
        b,
        np,
        d,
    );
    let g0 = v.grid();
    pos_embed_for_grid_backward(
        &mut grads[lay.pos..lay.pos + v.num_tokens() * d],
        &dpos_grid,
        g0,
        g0,
        acts.grid,
        acts.grid,
        d,
    );
    if let Some(m) = &acts.patch_mask {
        let tok = lay.mask_token.ok_or(ShapeError::Length("mask token"))?;
        mask_tokens_backward(&mut dpatch_tok, &mut grads[tok..tok + d], m, b * np, d);
    }
    let k = v.patch_len();
    let (dw, db) = pair_mut(grads, (lay.patch_w, d * k), (lay.patch_b, d));
    if v.stem_len() == 0 {
        patch_embed_backward(dw, Some(db), &dpatch_tok, &acts.patches, b * np, k, d);
    } else {
        // The 1 x 1 embedding also passes its gradient down to the stem's last map, then each
        // convolution in reverse.
        let mut dmap = vec![T::ZERO; b * np * k];
        linear_backward(
            Some(&mut dmap),
            dw,
            Some(db),
            &dpatch_tok,
            &acts.patches,
            &params[lay.patch_w..lay.patch_w + d * k],
            b * np,
            k,
            d,
        );
        for i in (0..v.stem_len()).rev() {
            let l = v.stem_layer(i);
            let sc = &acts.stem[i];
            let rows = sc.pre.len() / l.c_out;
            let mut dpre = vec![T::ZERO; rows * l.c_out];
            gelu_backward(&mut dpre, &sc.pre, &dmap);
            let (w_off, b_off) = lay.stem_layer(i);
            let wlen = l.c_out * l.col_len();
            let mut dcols = vec![T::ZERO; if i > 0 { rows * l.col_len() } else { 0 }];
            let (dw, db) = pair_mut(grads, (w_off, wlen), (b_off, l.c_out));
            linear_backward(
                (i > 0).then_some(&mut dcols[..]),
                dw,
                Some(db),
                &dpre,
                &sc.cols,
                &params[w_off..w_off + wlen],
                rows,
                l.col_len(),
                l.c_out,
            );
            if i > 0 {
                dmap = vec![T::ZERO; b * sc.side * sc.side * l.c_in];
                col2im3x3(&mut dmap, &dcols, b, l.c_in, sc.side, l.stride);
            }
        }
    }
    Ok(())
}
