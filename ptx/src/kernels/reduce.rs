//! Reductions: per-segment (per-tensor) sums, sums of squares and max-abs in two deterministic
//! stages, column sums (bias gradients), and the gradient-clipping coefficient and scaling.
//!
//! Stage 1 ([`reduce_segments`]): grid `(parts, nseg)`, block [`WIDE_BLOCK`](super::WIDE_BLOCK);
//! block `(x, s)` reduces elements `x*CHUNK .. (x+1)*CHUNK` of segment `s` into
//! `part[s parts + x]` (0 / identity where the segment is shorter). Stage 2 ([`reduce_final`],
//! [`clip_coef`]): one thread per segment adds its parts in order in f64.
use super::for_each_elem;
use crate::block::{block_reduce, Block, Op};
use crate::elem::Elem;

/// Elements per stage-1 block (256 threads x 16).
pub const CHUNK: usize = 4096;

/// What a reduction computes, by launch code.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RedOp {
    /// 0: `Σ x`.
    Sum,
    /// 1: `Σ x^2` (gradient norms).
    SumSq,
    /// 2: `max |x|` (0 for an empty segment).
    MaxAbs,
}

impl RedOp {
    /// The code a kernel receives for this reduction (decoded by [`RedOp::from_code`]).
    pub const fn code(self) -> u32 {
        match self {
            RedOp::Sum => 0,
            RedOp::SumSq => 1,
            RedOp::MaxAbs => 2,
        }
    }

    pub fn from_code(c: u32) -> RedOp {
        match c {
            1 => RedOp::SumSq,
            2 => RedOp::MaxAbs,
            _ => RedOp::Sum,
        }
    }
    #[inline(always)]
    fn op(self) -> Op {
        if self == RedOp::MaxAbs {
            Op::Max
        } else {
            Op::Sum
        }
    }
    #[inline(always)]
    fn map(self, x: f32) -> f32 {
        match self {
            RedOp::Sum => x,
            RedOp::SumSq => x * x,
            RedOp::MaxAbs => x.abs(),
        }
    }
}

#[derive(Clone, Copy, Default)]
struct Acc {
    v: f32,
}

/// Stage 1 over segments `[seg_off[s], seg_off[s] + seg_len[s])` of `x` (any `Elem` storage,
/// f32 accumulation).
pub fn reduce_segments<B: Block, E: Elem>(
    b: &mut B,
    part: &mut [f32],
    x: &[E],
    seg_off: &[u64],
    seg_len: &[u64],
    op: RedOp,
) {
    let dm = b.dims();
    let (bx, seg, parts) = (dm.bid[0] as usize, dm.bid[1] as usize, dm.gdim[0] as usize);
    let bdim = dm.bdim as usize;
    let (off, len) = (seg_off[seg] as usize, seg_len[seg] as usize);
    let start = bx * CHUNK;
    let end = (start + CHUNK).min(len);
    let mut l = b.local(Acc { v: 0.0 });
    b.each(&mut l, |t, st, _| {
        let mut i = start + t as usize;
        while i < end {
            let y = op.map(x[off + i].ld());
            st.v = if op == RedOp::MaxAbs {
                Op::Max.apply(st.v, y)
            } else {
                st.v + y
            };
            i += bdim;
        }
    });
    block_reduce(b, &mut l, op.op(), |st| &mut st.v, 0);
    b.each(&mut l, |t, st, _| {
        if t == 0 {
            part[seg * parts + bx] = st.v;
        }
    });
}

/// Stage 2: `out[s] = scale * Σ_x part[s parts + x]` (f64, in order), or the max for
/// [`RedOp::MaxAbs`]; one thread per segment.
pub fn reduce_final<B: Block>(
    b: &mut B,
    out: &mut [f32],
    part: &[f32],
    parts: usize,
    nseg: usize,
    op: RedOp,
    scale: f32,
) {
    for_each_elem(b, nseg, |s| {
        let ps = &part[s * parts..(s + 1) * parts];
        out[s] = if op == RedOp::MaxAbs {
            ps.iter().fold(0.0f32, |a, &x| Op::Max.apply(a, x))
        } else {
            let mut acc = 0.0f64;
            for &x in ps {
                acc += x as f64;
            }
            (acc * scale as f64) as f32
        };
    });
}

/// DINO's per-tensor clipping from stage-1 sums of squares: `norm[s] = sqrt(Σ part)`,
/// `coef[s] = clip / (norm + 1e-6)` when that is below 1, else 1 (`core::optim::clip_grad_tensor`).
pub fn clip_coef<B: Block>(
    b: &mut B,
    coef: &mut [f32],
    norm: &mut [f32],
    part: &[f32],
    parts: usize,
    nseg: usize,
    clip: f64,
) {
    for_each_elem(b, nseg, |s| {
        let mut acc = 0.0f64;
        for &x in &part[s * parts..(s + 1) * parts] {
            acc += x as f64;
        }
        let nr = libm::sqrt(acc);
        let c = clip / (nr + 1e-6);
        norm[s] = nr as f32;
        coef[s] = if c < 1.0 { c as f32 } else { 1.0 };
    });
}

/// `x[seg_off[s] + i] *= coef[s]` for `i < seg_len[s]`; grid `(ceil(max_len / 256), nseg)`.
pub fn scale_segments<B: Block>(
    b: &mut B,
    x: &mut [f32],
    seg_off: &[u64],
    seg_len: &[u64],
    coef: &[f32],
) {
    let seg = b.dims().bid[1] as usize;
    let (off, len) = (seg_off[seg] as usize, seg_len[seg] as usize);
    let c = coef[seg];
    for_each_elem(b, len, |i| {
        if c != 1.0 {
            x[off + i] *= c
        }
    });
}

/// `out[c] (+)= Σ_r x[r, c]` over `rows` rows of `cols` (bias gradients; `accumulate` 0 to
/// overwrite); one thread per column, rows in order (the reference's order).
pub fn column_sum<B: Block, E: Elem>(
    b: &mut B,
    out: &mut [f32],
    x: &[E],
    rows: usize,
    cols: usize,
    accumulate: bool,
) {
    for_each_elem(b, cols, |c| {
        let mut acc = if accumulate { out[c] } else { 0.0 };
        for r in 0..rows {
            acc += x[r * cols + c].ld();
        }
        out[c] = acc;
    });
}
