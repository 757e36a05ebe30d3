//! The kernel entry points of `dinovmf.ptx`: names, parameters (in order, with their Rust types:
//! pointers are `u64` device addresses in PTX, a null pointer means "none"
//! where a parameter is optional) and launch configurations. The host's CUDA backend launches
//! from this table; `tests/manifest.rs` checks it against the committed `.ptx`.
//!
//! All blocks are one-dimensional (`blockDim = (block, 1, 1)`). Shared memory is static (launch
//! with 0 dynamic bytes; `smem_bytes` is what the kernel declares) except for the kinds that
//! [`SmemKind::is_dynamic`] names: those launch with [`KernelInfo::dynamic_smem_bytes`] dynamic
//! bytes, and above 48 KB the function's `CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES` must
//! have been raised to that size first (the host does it before the first launch; the
//! simulated device refuses a launch without it, as the driver does). Each size parameter
//! is a `u32`; the buffer lengths the entry points derive from them (`n * d`, `t_rows * k`, ...)
//! are computed in `usize` ([`us`](crate::raw::us)), so a buffer may hold more than 2^32
//! elements. `extents` lists those lengths per pointer parameter; the host checks each one
//! against the buffer it passes, and the grid against the launch limits, before launching.
use crate::kernels::gemm::GEMM_BLOCK;
#[allow(unused_imports)]
use crate::kernels::{
    attention_tc, attention_tc_backward, elementwise, gemm, gemm_tc, head, ibot, optim, reduce,
    rows, sinkhorn, tokens,
};
use crate::kernels::{EW_BLOCK, ROW_BLOCK, SMEM_GEMM_WORDS, SMEM_SMALL_WORDS, WIDE_BLOCK};
#[allow(unused_imports)]
use dinovmf_core::{centering::Centering, logits::LogitKind, vmf::BesselApprox};

/// Which static shared array a kernel uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SmemKind {
    None,
    /// `dinovmf_smem_small`: block reductions.
    Small,
    /// `dinovmf_smem_gemm`: GEMM tiles.
    Gemm,
    /// `dinovmf_smem_tc`: the tensor-core GEMM's two staged bf16 slices.
    Tc,
    /// `dinovmf_smem_att`: the fused attention forward's Q, K and V tiles.
    Att,
    /// Dynamic (`dinovmf_smem_dyn`, 56 KB): the fused attention backward's own and
    /// double-buffered streamed tiles.
    AttBwd,
}

impl SmemKind {
    /// Sized at launch (dynamic shared memory) rather than declared in the PTX.
    pub const fn is_dynamic(self) -> bool {
        matches!(self, SmemKind::AttBwd)
    }
}

/// Dynamic shared memory a launch gets without raising the function's
/// `CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES` (48 KB on every architecture).
pub const DEFAULT_MAX_DYNAMIC_SMEM: u32 = 48 << 10;

/// Static shared memory of a kind, in bytes.
pub const fn smem_bytes(k: SmemKind) -> u32 {
    match k {
        SmemKind::None => 0,
        SmemKind::Small => (SMEM_SMALL_WORDS * 4) as u32,
        SmemKind::Gemm => (SMEM_GEMM_WORDS * 4) as u32,
        SmemKind::Tc => (gemm_tc::SMEM_TC_WORDS * 4) as u32,
        SmemKind::Att => (attention_tc::SMEM_ATT_WORDS * 4) as u32,
        SmemKind::AttBwd => (attention_tc_backward::SMEM_ATT_BWD_WORDS * 4) as u32,
    }
}

/// One kernel parameter.
#[derive(Clone, Copy, Debug)]
pub struct Param {
    pub name: &'static str,
    /// The Rust type of the entry point's parameter (`*mut f32`, `u32`, `f64`, ...).
    pub ty: &'static str,
}

/// One kernel entry point.
#[derive(Clone, Copy, Debug)]
pub struct KernelInfo {
    pub name: &'static str,
    pub params: &'static [Param],
    /// Threads per block.
    pub block: u32,
    /// The shared memory the kernel uses (static, or dynamic: [`SmemKind::is_dynamic`]).
    pub smem: SmemKind,
    /// The grid, in terms of the parameters.
    pub grid: &'static str,
    /// `pointer: length; ...`: the number of elements the entry point takes behind each
    /// pointer parameter, in the grid formulas' grammar over the size parameters (`grid_x`,
    /// `grid_y` name the launch's grid). The host checks every one against the buffer passed.
    pub extents: &'static str,
    pub doc: &'static str,
}

impl KernelInfo {
    /// Shared memory the kernel uses, static or dynamic.
    pub const fn smem_bytes(&self) -> u32 {
        smem_bytes(self.smem)
    }
    /// Dynamic shared memory a launch must request (0 for static kinds).
    pub const fn dynamic_smem_bytes(&self) -> u32 {
        if self.smem.is_dynamic() {
            smem_bytes(self.smem)
        } else {
            0
        }
    }
}

/// Every kernel of `dinovmf.ptx`, in groups.
pub const KERNELS: &[&[KernelInfo]] = &[GEMM_KERNELS, OTHER_KERNELS, TC_KERNELS, ATT_KERNELS];

/// All kernels.
pub fn all() -> impl Iterator<Item = &'static KernelInfo> {
    KERNELS.iter().flat_map(|g| g.iter())
}

/// Looks a kernel up by name.
pub fn kernel(name: &str) -> Option<&'static KernelInfo> {
    all().find(|k| k.name == name)
}

macro_rules! kernels {
    ($group:ident, $module:ident, $sim:ident; $(
        $(#[doc = $doc:literal])*
        $name:ident [$block:expr, $smem:ident, $grid:literal, $extents:literal]
        ($($p:ident : $t:ty),* $(,)?) |$bk:ident| $body:block
    )*) => {
        /// One group of kernels of `dinovmf.ptx` (see [`KERNELS`]).
        pub const $group: &[KernelInfo] = &[$(KernelInfo {
            name: stringify!($name),
            params: &[$(Param { name: stringify!($p), ty: stringify!($t) }),*],
            block: $block,
            smem: SmemKind::$smem,
            grid: $grid,
            extents: $extents,
            doc: concat!($($doc, "\n"),*),
        }),*];

        #[cfg(target_arch = "nvptx64")]
        mod $module {
            #![allow(clippy::too_many_arguments)]
            use super::*;
            #[allow(unused_imports)]
            use crate::block::Block;
            use crate::gpu::*;
            $(
                $(#[doc = $doc])*
                #[no_mangle]
                pub unsafe extern "ptx-kernel" fn $name($($p: $t),*) {
                    let $bk = &mut Gpu::new(SmemKind::$smem);
                    $body
                }
            )*
        }

        /// The same entry points on the host: the parameters arrive as 64-bit words
        /// ([`FromArg`](crate::raw::FromArg)) and the body runs under the simulator.
        #[cfg(not(target_arch = "nvptx64"))]
        mod $sim {
            #![allow(clippy::too_many_arguments, unused_unsafe)]
            use super::*;
            #[allow(unused_imports)]
            use crate::block::Block;
            use crate::raw::*;
            $(
                unsafe fn $name(grid: [u32; 3], args: &[u64], opts: &crate::sim::SimOptions) {
                    let mut words = args.iter().copied();
                    $(let $p: $t = FromArg::from_arg(words.next().unwrap_or(0));)*
                    crate::sim::launch_with(grid, $block, smem_bytes(SmemKind::$smem) as usize / 4, opts, |$bk| $body);
                }
            )*
            pub(super) fn entry(name: &str) -> Option<crate::sim::Entry> {
                match name {
                    $(stringify!($name) => Some($name as crate::sim::Entry),)*
                    _ => None,
                }
            }
        }
    };
}

/// The host version of entry point `name` (see [`crate::sim::launch_entry`]).
#[cfg(not(target_arch = "nvptx64"))]
pub(crate) fn sim_entry(name: &str) -> Option<crate::sim::Entry> {
    gemm_sim::entry(name)
        .or_else(|| other_sim::entry(name))
        .or_else(|| tc_sim::entry(name))
        .or_else(|| att_sim::entry(name))
}

/// Shared body of the GEMM entry points (device and host).
#[allow(clippy::too_many_arguments)]
#[inline(always)]
unsafe fn gemm_entry<E: crate::Elem, EC: crate::Elem, const TA: bool, const TB: bool>(
    b: &mut impl crate::Block,
    c: *mut EC,
    a: *const E,
    bm: *const E,
    bias: *const f32,
    lens: [u32; 3],
    dims: [u32; 7],
    strides: [u32; 6],
    alpha: f32,
    beta: f32,
) {
    use crate::raw::{opt, sl, sl_mut, us};
    let s = gemm::GemmShape {
        m: dims[0] as usize,
        n: dims[1] as usize,
        k: dims[2] as usize,
        lda: dims[3] as usize,
        ldb: dims[4] as usize,
        ldc: dims[5] as usize,
        inner: dims[6] as usize,
        sa: [strides[0] as usize, strides[1] as usize],
        sb: [strides[2] as usize, strides[3] as usize],
        sc: [strides[4] as usize, strides[5] as usize],
        alpha,
        beta,
    };
    gemm::gemm::<_, E, EC, TA, TB>(
        b,
        sl_mut(c, us(lens[2])),
        sl(a, us(lens[0])),
        sl(bm, us(lens[1])),
        opt(bias, s.n),
        &s,
    );
}

/// Declares one GEMM entry point per (storage, output, transposes).
macro_rules! gemm_kernels {
    ($($(#[doc = $doc:literal])* $name:ident: $e:ty, $ec:ty, $ta:literal, $tb:literal;)*) => {
        kernels! { GEMM_KERNELS, gemm_entries, gemm_sim; $(
            $(#[doc = $doc])*
            $name [GEMM_BLOCK, Gemm, "(ceil(n/64), ceil(m/64), batches = outer * inner)", "a: a_len; b: b_len; c: c_len; bias: n"]
            (c: *mut $ec, a: *const $e, b: *const $e, bias: *const f32,
             a_len: u32, b_len: u32, c_len: u32,
             m: u32, n: u32, k: u32, lda: u32, ldb: u32, ldc: u32, inner: u32,
             sa_outer: u32, sa_inner: u32, sb_outer: u32, sb_inner: u32,
             sc_outer: u32, sc_inner: u32, alpha: f32, beta: f32)
            |blk| {
                gemm_entry::<$e, $ec, $ta, $tb>(blk, c, a, b, bias, [a_len, b_len, c_len],
                    [m, n, k, lda, ldb, ldc, inner],
                    [sa_outer, sa_inner, sb_outer, sb_inner, sc_outer, sc_inner], alpha, beta)
            }
        )* }
    };
}

gemm_kernels! {
    /// `C = alpha A B + bias + beta C`, f32 ("nn": `dx = dy w`, `P V`, `dS K`).
    gemm_nn_f32: f32, f32, false, false;
    /// `C = alpha A B^T + bias + beta C`, f32 ("nt": linear forward `x w^T`, `Q K^T`, `dO V^T`).
    gemm_nt_f32: f32, f32, false, true;
    /// `C = alpha A^T B + bias + beta C`, f32 ("tn": weight gradients `dy^T x` with beta 1, `P^T dO`).
    gemm_tn_f32: f32, f32, true, false;
}

kernels! { OTHER_KERNELS, other_entries, other_sim;
    /// `y = gelu(x)` (exact, erf form).
    gelu_forward [EW_BLOCK, None, "ceil(n/256)", "y: n; x: n"] (y: *mut f32, x: *const f32, n: u32) |b| {
        elementwise::gelu_forward(b, sl_mut(y, us(n)), sl(x, us(n)), n as usize)
    }
    /// `dx = dy gelu'(x)`.
    gelu_backward [EW_BLOCK, None, "ceil(n/256)", "dx: n; x: n; dy: n"] (dx: *mut f32, x: *const f32, dy: *const f32, n: u32) |b| {
        elementwise::gelu_backward(b, sl_mut(dx, us(n)), sl(x, us(n)), sl(dy, us(n)), n as usize)
    }
    /// `y = x + f`.
    residual_forward [EW_BLOCK, None, "ceil(n/256)", "y: n; x: n; f: n"] (y: *mut f32, x: *const f32, f: *const f32, n: u32) |b| {
        elementwise::residual_forward(b, sl_mut(y, us(n)), sl(x, us(n)), sl(f, us(n)), n as usize)
    }
    /// `y += alpha x` (gradient accumulation).
    axpy [EW_BLOCK, None, "ceil(n/256)", "y: n; x: n"] (y: *mut f32, x: *const f32, alpha: f32, n: u32) |b| {
        elementwise::axpy(b, sl_mut(y, us(n)), sl(x, us(n)), alpha, n as usize)
    }
    /// `x = value`.
    fill [EW_BLOCK, None, "ceil(n/256)", "x: n"] (x: *mut f32, value: f32, n: u32) |b| {
        elementwise::fill(b, sl_mut(x, us(n)), value, n as usize)
    }
    /// `out = bf16(x)` as `u16` bits (round to nearest even): bf16 operand copies.
    to_bf16 [EW_BLOCK, None, "ceil(n/256)", "out: n; x: n"] (out: *mut u16, x: *const f32, n: u32) |b| {
        elementwise::to_bf16(b, sl_mut(out as *mut crate::elem::Bf16, us(n)), sl(x, us(n)), n as usize)
    }
    /// Drop path, forward (`y = x mask[b] / keep_prob`) and backward (the same on `dy`).
    drop_path [EW_BLOCK, None, "ceil(batch*per_sample/256)", "y: batch*per_sample; x: batch*per_sample; mask: batch"] (y: *mut f32, x: *const f32, mask: *const f32, keep_prob: f32, batch: u32, per_sample: u32) |b| {
        let n = us(batch) * us(per_sample);
        elementwise::drop_path(b, sl_mut(y, n), sl(x, n), sl(mask, us(batch)), keep_prob, batch as usize, per_sample as usize)
    }
    /// Images `[B, C, H, W]` to patch rows `[B, N, C P P]`.
    patchify [EW_BLOCK, None, "ceil(batch*c*height*width/256)", "patches: batch*c*height*width; img: batch*c*height*width"] (patches: *mut f32, img: *const f32, batch: u32, c: u32, height: u32, width: u32, p: u32) |b| {
        let n = us(batch) * us(c) * us(height) * us(width);
        tokens::patchify(b, sl_mut(patches, n), sl(img, n), batch as usize, c as usize, height as usize, width as usize, p as usize)
    }
    /// Tokens `[B, 1 + N, D]` from patch tokens, `[CLS]` and a position embedding on this grid.
    tokens_forward [EW_BLOCK, None, "ceil(batch*(n+1)*d/256)", "x: batch*(n+1)*d; patch: batch*n*d; cls: d; pos: (n+1)*d"] (x: *mut f32, patch: *const f32, cls: *const f32, pos: *const f32, batch: u32, n: u32, d: u32) |b| {
        tokens::tokens_forward(b, sl_mut(x, us(batch) * (us(n) + 1) * us(d)), sl(patch, us(batch) * us(n) * us(d)), sl(cls, us(d)), sl(pos, (us(n) + 1) * us(d)), batch as usize, n as usize, d as usize)
    }
    /// `dpatch[b, i] = dx[b, 1 + i]`.
    tokens_backward_patch [EW_BLOCK, None, "ceil(batch*n*d/256)", "dpatch: batch*n*d; dx: batch*(n+1)*d"] (dpatch: *mut f32, dx: *const f32, batch: u32, n: u32, d: u32) |b| {
        tokens::tokens_backward_patch(b, sl_mut(dpatch, us(batch) * us(n) * us(d)), sl(dx, us(batch) * (us(n) + 1) * us(d)), batch as usize, n as usize, d as usize)
    }
    /// `dpos += Σ_b dx[b]`, `dcls += Σ_b dx[b, 0]`.
    tokens_backward_params [EW_BLOCK, None, "ceil((n+1)*d/256)", "dcls: d; dpos: (n+1)*d; dx: batch*(n+1)*d"] (dcls: *mut f32, dpos: *mut f32, dx: *const f32, batch: u32, n: u32, d: u32) |b| {
        tokens::tokens_backward_params(b, sl_mut(dcls, us(d)), sl_mut(dpos, (us(n) + 1) * us(d)), sl(dx, us(batch) * (us(n) + 1) * us(d)), batch as usize, n as usize, d as usize)
    }
    /// Bilinear resize of a `[sh, sw, d]` position grid to `[gh, gw, d]`.
    pos_resize_forward [EW_BLOCK, None, "ceil(gh*gw*d/256)", "dst: gh*gw*d; src: sh*sw*d"] (dst: *mut f32, src: *const f32, sh: u32, sw: u32, gh: u32, gw: u32, d: u32) |b| {
        tokens::pos_resize_forward(b, sl_mut(dst, us(gh) * us(gw) * us(d)), sl(src, us(sh) * us(sw) * us(d)), sh as usize, sw as usize, gh as usize, gw as usize, d as usize)
    }
    /// `dsrc += R^T ddst` (accumulates).
    pos_resize_backward [EW_BLOCK, None, "ceil(sh*sw*d/256)", "dsrc: sh*sw*d; ddst: gh*gw*d"] (dsrc: *mut f32, ddst: *const f32, sh: u32, sw: u32, gh: u32, gw: u32, d: u32) |b| {
        tokens::pos_resize_backward(b, sl_mut(dsrc, us(sh) * us(sw) * us(d)), sl(ddst, us(gh) * us(gw) * us(d)), sh as usize, sw as usize, gh as usize, gw as usize, d as usize)
    }
    /// LayerNorm forward, one warp per row.
    layernorm_forward [ROW_BLOCK, None, "ceil(n/4)", "y: n*d; mean: n; rstd: n; x: n*d; gamma: d; beta: d"] (y: *mut f32, mean: *mut f32, rstd: *mut f32, x: *const f32, gamma: *const f32, beta: *const f32, n: u32, d: u32, eps: f32) |b| {
        rows::layernorm_forward(b, sl_mut(y, us(n) * us(d)), sl_mut(mean, us(n)), sl_mut(rstd, us(n)), sl(x, us(n) * us(d)), sl(gamma, us(d)), sl(beta, us(d)), n as usize, d as usize, eps)
    }
    /// LayerNorm backward to the input (overwrites `dx`), one warp per row.
    layernorm_backward_dx [ROW_BLOCK, None, "ceil(n/4)", "dx: n*d; dy: n*d; x: n*d; mean: n; rstd: n; gamma: d"] (dx: *mut f32, dy: *const f32, x: *const f32, mean: *const f32, rstd: *const f32, gamma: *const f32, n: u32, d: u32) |b| {
        rows::layernorm_backward_dx(b, sl_mut(dx, us(n) * us(d)), sl(dy, us(n) * us(d)), sl(x, us(n) * us(d)), sl(mean, us(n)), sl(rstd, us(n)), sl(gamma, us(d)), n as usize, d as usize)
    }
    /// `dgamma += Σ dy xh`, `dbeta += Σ dy`, one thread per column.
    layernorm_backward_params [EW_BLOCK, None, "ceil(d/256)", "dgamma: d; dbeta: d; dy: n*d; x: n*d; mean: n; rstd: n"] (dgamma: *mut f32, dbeta: *mut f32, dy: *const f32, x: *const f32, mean: *const f32, rstd: *const f32, n: u32, d: u32) |b| {
        rows::layernorm_backward_params(b, sl_mut(dgamma, us(d)), sl_mut(dbeta, us(d)), sl(dy, us(n) * us(d)), sl(x, us(n) * us(d)), sl(mean, us(n)), sl(rstd, us(n)), n as usize, d as usize)
    }
    /// Row softmax in place of `scale s + mask[row / rows_per_mask]` (mask optional).
    softmax_rows [ROW_BLOCK, None, "ceil(n_rows/4)", "s: n_rows*t; mask: ceil(n_rows/rows_per_mask)*t"] (s: *mut f32, mask: *const f32, n_rows: u32, t: u32, rows_per_mask: u32, scale: f32) |b| {
        let rpm = rows_per_mask.max(1);
        rows::softmax_rows(b, sl_mut(s, us(n_rows) * us(t)), opt(mask, us(n_rows).div_ceil(us(rpm)) * us(t)), n_rows as usize, t as usize, rpm as usize, scale)
    }
    /// Softmax backward in place: `dp <- scale p (dp - <dp, p>)`.
    softmax_backward_rows [ROW_BLOCK, None, "ceil(n_rows/4)", "dp: n_rows*t; p: n_rows*t"] (dp: *mut f32, p: *const f32, n_rows: u32, t: u32, scale: f32) |b| {
        rows::softmax_backward_rows(b, sl_mut(dp, us(n_rows) * us(t)), sl(p, us(n_rows) * us(t)), n_rows as usize, t as usize, scale)
    }
    /// `y = x / max(||x||, eps)` per row, `norm[r] = ||x_r||`.
    l2norm_forward [ROW_BLOCK, None, "ceil(n/4)", "y: n*d; norm: n; x: n*d"] (y: *mut f32, norm: *mut f32, x: *const f32, n: u32, d: u32, eps: f32) |b| {
        rows::l2norm_forward(b, sl_mut(y, us(n) * us(d)), sl_mut(norm, us(n)), sl(x, us(n) * us(d)), n as usize, d as usize, eps)
    }
    /// Backward of `l2norm_forward` (overwrites `dx`).
    l2norm_backward [ROW_BLOCK, None, "ceil(n/4)", "dx: n*d; dy: n*d; y: n*d; norm: n"] (dx: *mut f32, dy: *const f32, y: *const f32, norm: *const f32, n: u32, d: u32, eps: f32) |b| {
        rows::l2norm_backward(b, sl_mut(dx, us(n) * us(d)), sl(dy, us(n) * us(d)), sl(y, us(n) * us(d)), sl(norm, us(n)), n as usize, d as usize, eps)
    }
    /// Per-prototype `scale`, `bias` (`D_p(kappa)` for vMF), `d bias / d r`; `kind` 0 DINO / 1 vMF,
    /// `approx` 0 uniform / 1 large-nu.
    branch_terms [EW_BLOCK, None, "ceil(k/256)", "scale: k; bias: k; dbias_dr: k; r: k"] (scale: *mut f32, bias: *mut f32, dbias_dr: *mut f32, r: *const f32, k: u32, tau: f32, p: u32, kind: u32, approx: u32) |b| {
        head::branch_terms(b, sl_mut(scale, us(k)), sl_mut(bias, us(k)), sl_mut(dbias_dr, us(k)), sl(r, us(k)), k as usize, tau, p as usize, LogitKind::from_code(kind), BesselApprox::from_code(approx))
    }
    /// Student logits GEMM `dots = y mu^T` (`[m, n]`) with per-64-column-tile LSE states of
    /// `scale dots + bias` in `lse_part[m, ceil(n/64), 2]`.
    gemm_logits_f32 [GEMM_BLOCK, Gemm, "(ceil(n/64), ceil(m/64), 1)", "dots: m*n; lse_part: m*ceil(n/64)*2; y: m*k; mu: n*k; scale: n; bias: n"] (dots: *mut f32, lse_part: *mut f32, y: *const f32, mu: *const f32, scale: *const f32, bias: *const f32, m: u32, n: u32, k: u32) |b| {
        gemm::gemm_logits(b, sl_mut(dots, us(m) * us(n)), sl_mut(lse_part, us(m) * us(n).div_ceil(64) * 2), sl(y, us(m) * us(k)), sl(mu, us(n) * us(k)), sl(scale, us(n)), sl(bias, us(n)), m as usize, n as usize, k as usize)
    }
    /// Row log-sum-exps from `lse_part` (`ntiles = ceil(n/64)` of the logits GEMM).
    lse_combine [WIDE_BLOCK, Small, "m", "lse: m; lse_part: m*ntiles*2"] (lse: *mut f32, lse_part: *const f32, m: u32, ntiles: u32) |b| {
        head::lse_combine(b, sl_mut(lse, us(m)), sl(lse_part, us(m) * us(ntiles) * 2), m as usize, ntiles as usize)
    }
    /// Teacher targets `p_t[nt, k]` with the previous center (`centering` 0 logit / 1 probability)
    /// and `lse_raw[nt]`.
    teacher_targets [WIDE_BLOCK, Small, "nt", "p_t: nt*k; lse_raw: nt; dots: nt*k; scale: k; bias: k; center: k"] (p_t: *mut f32, lse_raw: *mut f32, dots: *const f32, scale: *const f32, bias: *const f32, center: *const f32, tau_t: f32, centering: u32, nt: u32, k: u32) |b| {
        head::teacher_targets(b, sl_mut(p_t, us(nt) * us(k)), sl_mut(lse_raw, us(nt)), sl(dots, us(nt) * us(k)), sl(scale, us(k)), sl(bias, us(k)), sl(center, us(k)), tau_t, Centering::from_code(centering), nt as usize, k as usize)
    }
    /// Center-update statistic `stat[k]` (batch mean of `tau_t l` or of `softmax(l)`).
    teacher_stat [EW_BLOCK, None, "ceil(k/256)", "stat: k; dots: nt*k; scale: k; bias: k; lse_raw: nt"] (stat: *mut f32, dots: *const f32, scale: *const f32, bias: *const f32, lse_raw: *const f32, tau_t: f32, centering: u32, nt: u32, k: u32) |b| {
        head::teacher_stat(b, sl_mut(stat, us(k)), sl(dots, us(nt) * us(k)), sl(scale, us(k)), sl(bias, us(k)), sl(lse_raw, us(nt)), tau_t, Centering::from_code(centering), nt as usize, k as usize)
    }
    /// Fused multi-crop cross-entropy + gradient: `dots[n_crops*batch, k]` is read once and
    /// overwritten with `dL/d dots`; `dr += dL/dr` (optional); `loss_part[ceil(k/256)]`.
    xent_columns [EW_BLOCK, Small, "ceil(k/256)", "dots: n_crops*batch*k; dr: k; loss_part: ceil(k/256); lse: n_crops*batch; p_t: 2*batch*k; scale: k; bias: k; dbias_dr: k"] (dots: *mut f32, dr: *mut f32, loss_part: *mut f32, lse: *const f32, p_t: *const f32, scale: *const f32, bias: *const f32, dbias_dr: *const f32, tau: f32, n_crops: u32, batch: u32, k: u32) |b| {
        let ns = us(n_crops) * us(batch);
        head::xent_columns(b, sl_mut(dots, ns * us(k)), opt_mut(dr, us(k)), sl_mut(loss_part, us(k).div_ceil(us(EW_BLOCK))), sl(lse, ns), sl(p_t, 2 * us(batch) * us(k)), sl(scale, us(k)), sl(bias, us(k)), sl(dbias_dr, us(k)), tau, n_crops as usize, batch as usize, k as usize)
    }
    /// `ent[r] = -Σ_j p[r, j] ln p[r, j]` (the teacher's collapse signals).
    row_entropy [WIDE_BLOCK, Small, "rows", "ent: rows; p: rows*k"] (ent: *mut f32, p: *const f32, rows: u32, k: u32) |b| {
        head::row_entropy(b, sl_mut(ent, us(rows)), sl(p, us(rows) * us(k)), rows as usize, k as usize)
    }
    /// Sinkhorn-Knopp: the teacher logits `q[n, k] = scale dots + bias`.
    sinkhorn_logits [EW_BLOCK, None, "ceil(n*k/256)", "q: n*k; dots: n*k; scale: k; bias: k"] (q: *mut f32, dots: *const f32, scale: *const f32, bias: *const f32, n: u32, k: u32) |b| {
        sinkhorn::sinkhorn_logits(b, sl_mut(q, us(n) * us(k)), sl(dots, us(n) * us(k)), sl(scale, us(k)), sl(bias, us(k)), n as usize, k as usize)
    }
    /// Sinkhorn-Knopp column round on `ln Q[n, k]` (columns to total 1/k), one thread per column.
    sinkhorn_columns [EW_BLOCK, None, "ceil(k/256)", "q: n*k"] (q: *mut f32, n: u32, k: u32) |b| {
        sinkhorn::sinkhorn_columns(b, sl_mut(q, us(n) * us(k)), n as usize, k as usize)
    }
    /// Sinkhorn-Knopp over ranks, a column round's first piece: `col_max[k]`, the maxima of the
    /// `n` rows here.
    sinkhorn_column_max [EW_BLOCK, None, "ceil(k/256)", "col_max: k; q: n*k"] (col_max: *mut f32, q: *const f32, n: u32, k: u32) |b| {
        sinkhorn::sinkhorn_column_max(b, sl_mut(col_max, us(k)), sl(q, us(n) * us(k)), n as usize, k as usize)
    }
    /// Its second piece: `col_sum[k]`, the rows' `exp(q - col_max)` summed per column.
    sinkhorn_column_sums [EW_BLOCK, None, "ceil(k/256)", "col_sum: k; q: n*k; col_max: k"] (col_sum: *mut f32, q: *const f32, col_max: *const f32, n: u32, k: u32) |b| {
        sinkhorn::sinkhorn_column_sums(b, sl_mut(col_sum, us(k)), sl(q, us(n) * us(k)), sl(col_max, us(k)), n as usize, k as usize)
    }
    /// Its last piece: `q -= col_max + ln col_sum + ln k` per column, one thread per element.
    sinkhorn_column_scale [EW_BLOCK, None, "ceil(n*k/256)", "q: n*k; col_max: k; col_sum: k"] (q: *mut f32, col_max: *const f32, col_sum: *const f32, n: u32, k: u32) |b| {
        sinkhorn::sinkhorn_column_scale(b, sl_mut(q, us(n) * us(k)), sl(col_max, us(k)), sl(col_sum, us(k)), n as usize, k as usize)
    }
    /// Sinkhorn-Knopp row round on the `n` rows here of a batch of `batch_rows` (rows to total
    /// 1/batch_rows; `last != 0`: the rows' softmax, the targets).
    sinkhorn_rows [WIDE_BLOCK, Small, "n", "q: n*k"] (q: *mut f32, n: u32, batch_rows: u32, k: u32, last: u32) |b| {
        sinkhorn::sinkhorn_rows(b, sl_mut(q, us(n) * us(k)), n as usize, batch_rows as usize, k as usize, last != 0)
    }
    /// `c <- m c + (1 - m) stat`.
    center_update [EW_BLOCK, None, "ceil(k/256)", "center: k; stat: k"] (center: *mut f32, stat: *const f32, momentum: f32, k: u32) |b| {
        head::center_update(b, sl_mut(center, us(k)), sl(stat, us(k)), momentum, k as usize)
    }
    /// iBOT mask-token substitution in place on patch embeddings `x[n, d]` (0/1 `mask[n]`).
    mask_tokens_forward [EW_BLOCK, None, "ceil(n*d/256)", "x: n*d; mask: n; token: d"] (x: *mut f32, mask: *const f32, token: *const f32, n: u32, d: u32) |b| {
        ibot::mask_tokens_forward(b, sl_mut(x, us(n) * us(d)), sl(mask, us(n)), sl(token, us(d)), n as usize, d as usize)
    }
    /// Its backward: `dtoken += Σ_i m_i dx_i`, `dx_i *= 1 - m_i`; one thread per column.
    mask_tokens_backward [EW_BLOCK, None, "ceil(d/256)", "dx: n*d; dtoken: d; mask: n"] (dx: *mut f32, dtoken: *mut f32, mask: *const f32, n: u32, d: u32) |b| {
        ibot::mask_tokens_backward(b, sl_mut(dx, us(n) * us(d)), sl_mut(dtoken, us(d)), sl(mask, us(n)), n as usize, d as usize)
    }
    /// `out[i] = src[idx[i]]` (rows of `d`), zeros where `idx[i] >= src_rows`.
    gather_rows [EW_BLOCK, None, "ceil(n*d/256)", "out: n*d; src: src_rows*d; idx: n"] (out: *mut f32, src: *const f32, idx: *const u64, n: u32, d: u32, src_rows: u32) |b| {
        ibot::gather_rows(b, sl_mut(out, us(n) * us(d)), sl(src, us(src_rows) * us(d)), sl(idx, us(n)), n as usize, d as usize, src_rows as usize)
    }
    /// iBOT patch loss: weighted cross-entropy + gradient over `m` gathered student rows
    /// (targets `p_t[tgt[i]]`, weights `w[i]`); `dots` overwritten with `dL/d dots`, `dr +=`
    /// (optional), `loss_part[ceil(k/256)]`.
    xent_masked [EW_BLOCK, Small, "ceil(k/256)", "dots: m*k; dr: k; loss_part: ceil(k/256); lse: m; p_t: t_rows*k; tgt: m; w: m; scale: k; bias: k; dbias_dr: k"] (dots: *mut f32, dr: *mut f32, loss_part: *mut f32, lse: *const f32, p_t: *const f32, tgt: *const u64, w: *const f32, scale: *const f32, bias: *const f32, dbias_dr: *const f32, tau: f32, grad_scale: f32, m: u32, k: u32, t_rows: u32) |b| {
        ibot::xent_masked(b, sl_mut(dots, us(m) * us(k)), opt_mut(dr, us(k)), sl_mut(loss_part, us(k).div_ceil(us(EW_BLOCK))), sl(lse, us(m)), sl(p_t, us(t_rows) * us(k)), sl(tgt, us(m)), sl(w, us(m)), sl(scale, us(k)), sl(bias, us(k)), sl(dbias_dr, us(k)), tau, grad_scale, m as usize, k as usize)
    }
    /// AdamW step over one parameter group (`core::optim::adamw_step`).
    adamw [EW_BLOCK, None, "ceil(n/256)", "p: n; g: n; m: n; v: n"] (p: *mut f32, g: *const f32, m: *mut f32, v: *mut f32, n: u32, lr: f64, weight_decay: f64, beta1: f64, beta2: f64, eps: f64, step: u64) |b| {
        let hp = dinovmf_core::optim::AdamW { beta1, beta2, eps };
        optim::adamw(b, sl_mut(p, us(n)), sl(g, us(n)), sl_mut(m, us(n)), sl_mut(v, us(n)), n as usize, &hp, lr, weight_decay, step)
    }
    /// Teacher EMA `t = m t + (1 - m) s`.
    ema [EW_BLOCK, None, "ceil(n/256)", "teacher: n; student: n"] (teacher: *mut f32, student: *const f32, n: u32, momentum: f64) |b| {
        optim::ema(b, sl_mut(teacher, us(n)), sl(student, us(n)), n as usize, momentum)
    }
    /// Stage 1 of a per-segment reduction (`op` 0 sum / 1 sum of squares / 2 max-abs) of f32 `x`
    /// (`x_len` elements); `part[nseg, parts]`.
    reduce_segments_f32 [WIDE_BLOCK, Small, "(parts = ceil(max seg_len / 4096), nseg)", "part: grid_x*grid_y; x: x_len; seg_off: grid_y; seg_len: grid_y"] (part: *mut f32, x: *const f32, x_len: u32, seg_off: *const u64, seg_len: *const u64, op: u32) |b| {
        let (parts, nseg) = (b.dims().gdim[0], b.dims().gdim[1]);
        reduce::reduce_segments(b, sl_mut(part, us(parts) * us(nseg)), sl(x, us(x_len)), sl(seg_off, us(nseg)), sl(seg_len, us(nseg)), reduce::RedOp::from_code(op))
    }
    /// Stage 2: `out[s] = scale Σ part[s]` (f64 in order) or the max.
    reduce_final [EW_BLOCK, None, "ceil(nseg/256)", "out: nseg; part: parts*nseg"] (out: *mut f32, part: *const f32, parts: u32, nseg: u32, op: u32, scale: f32) |b| {
        reduce::reduce_final(b, sl_mut(out, us(nseg)), sl(part, us(parts) * us(nseg)), parts as usize, nseg as usize, reduce::RedOp::from_code(op), scale)
    }
    /// Per-tensor clip coefficients and norms from stage-1 sums of squares.
    clip_coef [EW_BLOCK, None, "ceil(nseg/256)", "coef: nseg; norm: nseg; part: parts*nseg"] (coef: *mut f32, norm: *mut f32, part: *const f32, parts: u32, nseg: u32, clip: f64) |b| {
        reduce::clip_coef(b, sl_mut(coef, us(nseg)), sl_mut(norm, us(nseg)), sl(part, us(parts) * us(nseg)), parts as usize, nseg as usize, clip)
    }
    /// `x[segment s] *= coef[s]`.
    scale_segments [EW_BLOCK, None, "(ceil(max seg_len / 256), nseg)", "x: x_len; seg_off: grid_y; seg_len: grid_y; coef: grid_y"] (x: *mut f32, x_len: u32, seg_off: *const u64, seg_len: *const u64, coef: *const f32) |b| {
        let nseg = b.dims().gdim[1];
        reduce::scale_segments(b, sl_mut(x, us(x_len)), sl(seg_off, us(nseg)), sl(seg_len, us(nseg)), sl(coef, us(nseg)))
    }
    /// `out[c] (+)= Σ_r x[r, c]` (bias gradients), f32 `x`.
    column_sum_f32 [EW_BLOCK, None, "ceil(cols/256)", "out: cols; x: rows*cols"] (out: *mut f32, x: *const f32, rows: u32, cols: u32, accumulate: u32) |b| {
        reduce::column_sum(b, sl_mut(out, us(cols)), sl(x, us(rows) * us(cols)), rows as usize, cols as usize, accumulate != 0)
    }
}

/// Shared body of the tensor-core GEMM entry points (device and host): bf16 operands passed as
/// their `u16` bits.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
unsafe fn gemm_tc_entry<const TA: bool, const TB: bool>(
    b: &mut impl crate::Block,
    c: *mut f32,
    a: *const u16,
    bm: *const u16,
    bias: *const f32,
    lens: [u32; 3],
    dims: [u32; 7],
    strides: [u32; 6],
    alpha: f32,
    beta: f32,
) {
    use crate::elem::Bf16;
    use crate::raw::{opt, sl, sl_mut, us};
    let s = gemm::GemmShape {
        m: dims[0] as usize,
        n: dims[1] as usize,
        k: dims[2] as usize,
        lda: dims[3] as usize,
        ldb: dims[4] as usize,
        ldc: dims[5] as usize,
        inner: dims[6] as usize,
        sa: [strides[0] as usize, strides[1] as usize],
        sb: [strides[2] as usize, strides[3] as usize],
        sc: [strides[4] as usize, strides[5] as usize],
        alpha,
        beta,
    };
    gemm_tc::gemm_tc::<_, f32, TA, TB>(
        b,
        sl_mut(c, us(lens[2])),
        sl(a as *const Bf16, us(lens[0])),
        sl(bm as *const Bf16, us(lens[1])),
        opt(bias, s.n),
        &s,
    );
}

/// Declares one tensor-core GEMM entry point per transposes.
macro_rules! gemm_tc_kernels {
    ($($(#[doc = $doc:literal])* $name:ident: $ta:literal, $tb:literal;)*) => {
        kernels! { TC_KERNELS, tc_entries, tc_sim; $(
            $(#[doc = $doc])*
            $name [gemm_tc::TC_BLOCK, Tc, "(ceil(n/64), ceil(m/64), batches = outer * inner)", "a: a_len; b: b_len; c: c_len; bias: n"]
            (c: *mut f32, a: *const u16, b: *const u16, bias: *const f32,
             a_len: u32, b_len: u32, c_len: u32,
             m: u32, n: u32, k: u32, lda: u32, ldb: u32, ldc: u32, inner: u32,
             sa_outer: u32, sa_inner: u32, sb_outer: u32, sb_inner: u32,
             sc_outer: u32, sc_inner: u32, alpha: f32, beta: f32)
            |blk| {
                gemm_tc_entry::<$ta, $tb>(blk, c, a, b, bias, [a_len, b_len, c_len],
                    [m, n, k, lda, ldb, ldc, inner],
                    [sa_outer, sa_inner, sb_outer, sb_inner, sc_outer, sc_inner], alpha, beta)
            }
        )* }
    };
}

gemm_tc_kernels! {
    /// Tensor cores: `C = alpha A B + bias + beta C`, bf16 `A`, `B` (as `u16` bits), f32 `C` ("nn").
    gemm_tc_nn_bf16: false, false;
    /// Tensor cores, "nt" (`x w^T`, `Q K^T`).
    gemm_tc_nt_bf16: false, true;
    /// Tensor cores, "tn" (`dy^T x` with beta 1, `P^T dO`).
    gemm_tc_tn_bf16: true, false;
}

kernels! { ATT_KERNELS, att_entries, att_sim;
    /// Fused attention forward on tensor cores: `out[b, t, d] = softmax(q k^T / sqrt(hd)) v`
    /// per head from bf16 `qkv[b, t, 3 d]` (as `u16` bits), and each row's log-sum-exp
    /// `lse[b, heads, t]` of the scaled scores for the backward. Head size a multiple of 16,
    /// at most 64.
    attention_tc_forward_bf16 [attention_tc::ATT_BLOCK, Att, "(ceil(t/64), b*heads)", "out: b*t*d; lse: b*heads*t; qkv: b*t*3*d"] (out: *mut f32, lse: *mut f32, qkv: *const u16, b: u32, t: u32, d: u32, heads: u32) |blk| {
        let (n, nh) = (us(b) * us(t), us(b) * us(heads) * us(t));
        attention_tc::attention_tc_forward(blk, sl_mut(out, n * us(d)), sl_mut(lse, nh), sl(qkv as *const crate::elem::Bf16, n * 3 * us(d)), b as usize, t as usize, d as usize, heads as usize)
    }
    /// Backward 1/3: `delta[b, heads, t] = Σ_c bf16(dout) out` over each head's columns.
    attention_tc_delta [EW_BLOCK, None, "ceil(b*heads*t/256)", "delta: b*heads*t; out: b*t*d; dout: b*t*d"] (delta: *mut f32, out: *const f32, dout: *const f32, b: u32, t: u32, d: u32, heads: u32) |blk| {
        let n = us(b) * us(t) * us(d);
        attention_tc_backward::attention_tc_delta(blk, sl_mut(delta, us(b) * us(heads) * us(t)), sl(out, n), sl(dout, n), b as usize, t as usize, d as usize, heads as usize)
    }
    /// Backward 2/3: the `k` and `v` columns of `dqkv[b, t, 3 d]` (written, not added), one
    /// block per 64 keys of a head; scores rebuilt from `qkv` and `lse`.
    attention_tc_backward_kv_bf16 [attention_tc::ATT_BLOCK, AttBwd, "(ceil(t/64), b*heads)", "dqkv: b*t*3*d; qkv: b*t*3*d; dout: b*t*d; lse: b*heads*t; delta: b*heads*t"] (dqkv: *mut f32, qkv: *const u16, dout: *const f32, lse: *const f32, delta: *const f32, b: u32, t: u32, d: u32, heads: u32) |blk| {
        let (n, nh) = (us(b) * us(t), us(b) * us(heads) * us(t));
        attention_tc_backward::attention_tc_backward_kv(blk, sl_mut(dqkv, n * 3 * us(d)), sl(qkv as *const crate::elem::Bf16, n * 3 * us(d)), sl(dout, n * us(d)), sl(lse, nh), sl(delta, nh), b as usize, t as usize, d as usize, heads as usize)
    }
    /// Backward 3/3: the `q` columns of `dqkv`, one block per 64 queries of a head.
    attention_tc_backward_q_bf16 [attention_tc::ATT_BLOCK, AttBwd, "(ceil(t/64), b*heads)", "dqkv: b*t*3*d; qkv: b*t*3*d; dout: b*t*d; lse: b*heads*t; delta: b*heads*t"] (dqkv: *mut f32, qkv: *const u16, dout: *const f32, lse: *const f32, delta: *const f32, b: u32, t: u32, d: u32, heads: u32) |blk| {
        let (n, nh) = (us(b) * us(t), us(b) * us(heads) * us(t));
        attention_tc_backward::attention_tc_backward_q(blk, sl_mut(dqkv, n * 3 * us(d)), sl(qkv as *const crate::elem::Bf16, n * 3 * us(d)), sl(dout, n * us(d)), sl(lse, nh), sl(delta, nh), b as usize, t as usize, d as usize, heads as usize)
    }
}
