//! The teacher's forward pass on a parsed model file, over a caller-provided scratch buffer.
//!
//! Matches [`crate::reference_model::forward`] (no drop path) followed by the prototype layer:
//! patch embedding, `[CLS]` + position embedding, pre-norm blocks (LayerNorm, multi-head
//! attention, LayerNorm, GELU MLP), the final LayerNorm (only the `[CLS]` row is needed), the
//! head MLP, `y = z / ||z||` and `logit_k = scale_k (mu_k . y) + bias_k`.
//!
//! Where the precision goes: the linear layers (all weights, >99% of the multiply-adds) run in
//! the file's dtype (int8 x int8 -> i32 for int8 files). LayerNorm, attention scores and
//! softmax, GELU, the residual stream and the L2 normalisations stay in f32 and are core's own
//! ops ([`crate::ops`]): they are cheap and are where int8 would cost accuracy.
//!
//! The posterior: `probs = softmax(logits)` with the temperature and the vMF normaliser folded
//! into the prototype layer at export (see `dinovmf export`). It is NOT centered: the center is
//! a training-time statistic of the batch stream that keeps the teacher from collapsing, not a
//! parameter of the model, so the assignment of one image is the uniform-prior vMF mixture
//! posterior `p(k | y)` (for DINO logits, the teacher's softmax without its center).
use super::format::{FormatError, Model};
use super::qlinear::{linear_row, MAX_INT8_INPUT};
use crate::model::ModelConfig;
use crate::ops::L2NORM_EPS;
use crate::ops::{dot, gelu_forward, l2norm_row_inplace, layernorm_forward, softmax_in_place};
use core::fmt;

/// Scratch sizes for a model: `floats` f32 values and `bytes` i8 values.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ScratchLen {
    pub floats: usize,
    pub bytes: usize,
}

const fn max(a: usize, b: usize) -> usize {
    if a > b {
        a
    } else {
        b
    }
}

/// Offsets of the scratch regions (all in f32 units).
#[derive(Clone, Copy)]
struct Plan {
    t: usize,
    a: usize,
    big: usize,
    att: usize,
    ra: usize,
    rb: usize,
    rc: usize,
    rd: usize,
    gamma: usize,
    beta: usize,
    feat: usize,
    stats: usize,
    floats: usize,
    bytes: usize,
    head_w: usize,
}

const fn plan(cfg: &ModelConfig) -> Plan {
    let v = &cfg.vit;
    let h = &cfg.head;
    let (d, mh, cpp) = (v.dim, v.mlp_hidden(), v.patch_len());
    let t = v.num_tokens();
    let head_w = max(h.hidden, h.bottleneck);
    // `big` holds qkv during the blocks, then the head buffers, logits and probabilities.
    let big_len = max(3 * t * d, 2 * head_w + 2 * h.out_dim);
    let a = t * d;
    let big = a + t * d;
    let att = big + big_len;
    let ra = att + t;
    let rb = ra + max(d, cpp);
    let rc = rb + mh;
    let rd = rc + mh;
    let gamma = rd + d;
    let beta = gamma + d;
    let feat = beta + d;
    let stats = feat + d;
    let floats = stats + 2 * t;
    let bytes = max(max(cpp, d), max(mh, max(h.hidden, h.bottleneck)));
    Plan {
        t,
        a,
        big,
        att,
        ra,
        rb,
        rc,
        rd,
        gamma,
        beta,
        feat,
        stats,
        floats,
        bytes,
        head_w,
    }
}

/// Scratch a model of this configuration needs (usable in `const` context, e.g. to size a
/// `static` buffer in firmware).
pub const fn scratch_len(cfg: &ModelConfig) -> ScratchLen {
    let p = plan(cfg);
    ScratchLen {
        floats: p.floats,
        bytes: p.bytes,
    }
}

/// The caller's working memory: f32 activations and the int8 row buffer.
pub struct Scratch<'a> {
    pub floats: &'a mut [f32],
    pub bytes: &'a mut [i8],
}

/// Why inference could not run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum InferError {
    /// The image is not `img_size * img_size * 3` bytes.
    ImageLen {
        expected: usize,
        got: usize,
    },
    /// The scratch buffers are smaller than [`scratch_len`] says.
    Scratch {
        need: ScratchLen,
        got: ScratchLen,
    },
    /// An output slice is too short.
    Output {
        expected: usize,
        got: usize,
    },
    /// An int8 layer is too wide for exact i32 accumulation.
    TooWide {
        inp: usize,
    },
    Format(FormatError),
}

impl fmt::Display for InferError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            InferError::ImageLen { expected, got } => write!(
                f,
                "image has {got} bytes, the model takes {expected} (RGB u8 at its size)"
            ),
            InferError::Scratch { need, got } => write!(
                f,
                "scratch of {} floats + {} bytes, the model needs {} + {}",
                got.floats, got.bytes, need.floats, need.bytes
            ),
            InferError::Output { expected, got } => {
                write!(f, "output of {got} values, need {expected}")
            }
            InferError::TooWide { inp } => {
                write!(f, "int8 layer with {inp} inputs could overflow i32")
            }
            InferError::Format(e) => e.fmt(f),
        }
    }
}

#[cfg(feature = "std")]
impl std::error::Error for InferError {}

impl From<FormatError> for InferError {
    fn from(e: FormatError) -> Self {
        InferError::Format(e)
    }
}

/// Sees the input row of every linear layer (index as [`Model::num_linears`] counts them):
/// calibration records the activation ranges through it.
pub trait Observer {
    fn linear_input(&mut self, layer: usize, x: &[f32]);
}

/// Observes nothing.
pub struct NoObserver;

impl Observer for NoObserver {
    #[inline(always)]
    fn linear_input(&mut self, _: usize, _: &[f32]) {}
}

/// What one forward pass leaves in the scratch.
pub struct Forward<'s> {
    /// L2-normalised `[CLS]` feature `[D]` (what k-NN evaluation uses).
    pub feature: &'s [f32],
    /// Prototype logits `[K]`.
    pub logits: &'s [f32],
    /// Posterior over prototypes `[K]`.
    pub probs: &'s [f32],
}

/// One prototype of an assignment.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Assignment {
    pub prototype: u32,
    pub prob: f32,
}

fn copy_f32s(dst: &mut [f32], src: super::format::F32s<'_>) {
    for (d, s) in dst.iter_mut().zip(src.iter()) {
        *d = s;
    }
}

/// Runs the model on one image (RGB u8, `S x S x 3`, interleaved, `S = img_size`).
pub fn forward<'s, O: Observer>(
    m: &Model<'_>,
    image: &[u8],
    scratch: Scratch<'s>,
    obs: &mut O,
) -> Result<Forward<'s>, InferError> {
    let cfg = m.config();
    let v = &cfg.vit;
    let p = plan(cfg);
    let need = scratch_len(cfg);
    let got = ScratchLen {
        floats: scratch.floats.len(),
        bytes: scratch.bytes.len(),
    };
    if got.floats < need.floats || got.bytes < need.bytes {
        return Err(InferError::Scratch { need, got });
    }
    let s = v.img_size;
    if image.len() != s * s * 3 {
        return Err(InferError::ImageLen {
            expected: s * s * 3,
            got: image.len(),
        });
    }
    if m.header.dtype == super::format::Dtype::I8 && need.bytes > MAX_INT8_INPUT {
        return Err(InferError::TooWide { inp: need.bytes });
    }
    let (d, heads, pt) = (v.dim, v.heads, v.patch);
    let (t, g, cpp) = (p.t, v.grid(), v.patch_len());
    let hd = d / heads;
    let eps = v.ln_eps as f32;
    let q = scratch.bytes;
    let (f_all, _) = scratch.floats.split_at_mut(p.floats);
    let (x, rest) = f_all.split_at_mut(p.a);
    let (a, rest) = rest.split_at_mut(p.big - p.a);
    let (big, rest) = rest.split_at_mut(p.att - p.big);
    let (att, rest) = rest.split_at_mut(p.ra - p.att);
    let (ra, rest) = rest.split_at_mut(p.rb - p.ra);
    let (rb, rest) = rest.split_at_mut(p.rc - p.rb);
    let (rc, rest) = rest.split_at_mut(p.rd - p.rc);
    let (rd, rest) = rest.split_at_mut(p.gamma - p.rd);
    let (gamma, rest) = rest.split_at_mut(p.beta - p.gamma);
    let (beta, rest) = rest.split_at_mut(p.feat - p.beta);
    let (feat, stats) = rest.split_at_mut(p.stats - p.feat);
    let (mean, rstd) = stats.split_at_mut(p.t);

    // Tokens: [CLS] + pos[0], then each patch's linear + pos.
    let inv255 = 1.0f32 / 255.0;
    let hdr = &m.header;
    let inv_std = [1.0 / hdr.std[0], 1.0 / hdr.std[1], 1.0 / hdr.std[2]];
    copy_f32s(&mut x[..d], m.cls_pos());
    let patch = m.patch();
    let pos = m.pos();
    for py in 0..g {
        for px in 0..g {
            let row = &mut ra[..cpp];
            for c in 0..3 {
                for i in 0..pt {
                    for j in 0..pt {
                        let pix = image[((py * pt + i) * s + px * pt + j) * 3 + c];
                        row[(c * pt + i) * pt + j] =
                            (pix as f32 * inv255 - hdr.mean[c]) * inv_std[c];
                    }
                }
            }
            obs.linear_input(0, row);
            let tok = 1 + py * g + px;
            let xr = &mut x[tok * d..(tok + 1) * d];
            linear_row(xr, row, &patch, q);
            let po = (tok - 1) * d;
            for (k, xv) in xr.iter_mut().enumerate() {
                *xv += pos.get(po + k);
            }
        }
    }

    let scale = 1.0 / libm::sqrtf(hd as f32);
    for bi in 0..v.depth {
        let blk = m.block(bi);
        let li = 1 + 4 * bi;
        // LayerNorm 1 of every token into `a`, then qkv of every token into `big`.
        copy_f32s(gamma, blk.norm1_w);
        copy_f32s(beta, blk.norm1_b);
        layernorm_forward(a, mean, rstd, x, gamma, beta, t, d, eps);
        let qkv = &mut big[..3 * t * d];
        for tok in 0..t {
            let ar = &a[tok * d..(tok + 1) * d];
            obs.linear_input(li, ar);
            linear_row(&mut qkv[tok * 3 * d..(tok + 1) * 3 * d], ar, &blk.qkv, q);
        }
        // Attention, one query row at a time, into `a` (LayerNorm 1 is no longer needed).
        let row = 3 * d;
        for i in 0..t {
            for h in 0..heads {
                let qv = &qkv[i * row + h * hd..][..hd];
                for (j, aj) in att.iter_mut().enumerate() {
                    let kv = &qkv[j * row + d + h * hd..][..hd];
                    *aj = dot(qv, kv) * scale;
                }
                softmax_in_place(att);
                let o = &mut a[i * d + h * hd..][..hd];
                o.fill(0.0);
                for (j, &pj) in att.iter().enumerate() {
                    let vv = &qkv[j * row + 2 * d + h * hd..][..hd];
                    for c in 0..hd {
                        o[c] += pj * vv[c];
                    }
                }
            }
        }
        // proj + residual, then the MLP branch, one token at a time.
        copy_f32s(gamma, blk.norm2_w);
        copy_f32s(beta, blk.norm2_b);
        for tok in 0..t {
            let ar = &a[tok * d..(tok + 1) * d];
            obs.linear_input(li + 1, ar);
            linear_row(rd, ar, &blk.proj, q);
            let xr = &mut x[tok * d..(tok + 1) * d];
            for (xv, &r) in xr.iter_mut().zip(rd.iter()) {
                *xv += r;
            }
            let ln = &mut ra[..d];
            layernorm_forward(ln, mean, rstd, xr, gamma, beta, 1, d, eps);
            obs.linear_input(li + 2, ln);
            linear_row(rb, ln, &blk.fc1, q);
            gelu_forward(rc, rb);
            obs.linear_input(li + 3, rc);
            linear_row(rd, rc, &blk.fc2, q);
            for (xv, &r) in xr.iter_mut().zip(rd.iter()) {
                *xv += r;
            }
        }
    }

    // Final LayerNorm of the [CLS] row.
    let (nw, nb) = m.norm();
    copy_f32s(gamma, nw);
    copy_f32s(beta, nb);
    layernorm_forward(feat, mean, rstd, &x[..d], gamma, beta, 1, d, eps);

    // Head MLP: ping-pong between two buffers at the start of `big`.
    let hw = p.head_w;
    let kk = cfg.head.out_dim;
    let (h0, rest) = big.split_at_mut(hw);
    let (h1, rest) = rest.split_at_mut(hw);
    let (logits, rest) = rest.split_at_mut(kk);
    let probs = &mut rest[..kk];
    let nl = cfg.head.n_layers;
    let hbase = 1 + 4 * v.depth;
    let mut zlen = 0;
    for l in 0..nl {
        let lin = m.head_layer(l);
        if l == 0 {
            obs.linear_input(hbase, feat);
            linear_row(h0, feat, &lin, q);
        } else {
            obs.linear_input(hbase + l, &h1[..lin.inp]);
            linear_row(h0, &h1[..lin.inp], &lin, q);
        }
        if l + 1 < nl {
            gelu_forward(&mut h1[..lin.out], &h0[..lin.out]);
        }
        zlen = lin.out;
    }
    let y = &mut h0[..zlen];
    l2norm_row_inplace(y, L2NORM_EPS as f32);
    obs.linear_input(hbase + nl, y);
    linear_row(logits, y, &m.prototypes(), q);
    probs.copy_from_slice(logits);
    softmax_in_place(probs);
    l2norm_row_inplace(feat, L2NORM_EPS as f32);
    Ok(Forward {
        feature: feat,
        logits,
        probs,
    })
}

/// The L2-normalised `[CLS]` feature of `image` into `out` (`[D]`).
pub fn embed(
    m: &Model<'_>,
    image: &[u8],
    scratch: Scratch<'_>,
    out: &mut [f32],
) -> Result<(), InferError> {
    let d = m.config().vit.dim;
    if out.len() < d {
        return Err(InferError::Output {
            expected: d,
            got: out.len(),
        });
    }
    let f = forward(m, image, scratch, &mut NoObserver)?;
    out[..d].copy_from_slice(f.feature);
    Ok(())
}

/// The `N` most probable prototypes of `image`, most probable first (ties: lower index first).
pub fn assign<const N: usize>(
    m: &Model<'_>,
    image: &[u8],
    scratch: Scratch<'_>,
) -> Result<heapless::Vec<Assignment, N>, InferError> {
    let f = forward(m, image, scratch, &mut NoObserver)?;
    Ok(top_n(f.probs))
}

/// The `N` largest entries of `probs` with their indices, descending (ties: lower index first).
pub fn top_n<const N: usize>(probs: &[f32]) -> heapless::Vec<Assignment, N> {
    let mut out: heapless::Vec<Assignment, N> = heapless::Vec::new();
    for (k, &pk) in probs.iter().enumerate() {
        let a = Assignment {
            prototype: k as u32,
            prob: pk,
        };
        // Position among the kept ones (strictly greater moves ahead: earlier index wins ties).
        let pos = out.iter().position(|b| pk > b.prob).unwrap_or(out.len());
        if pos >= N {
            continue;
        }
        if out.is_full() {
            out.pop();
        }
        let _ = out.insert(pos, a);
    }
    out
}
