//! Typed calls of the kernels of `dinovmf.ptx`, one method per use: argument order and launch
//! configuration come from the manifest through [`Gpu::launch`]; buffers carry their lengths,
//! which become the kernels' slice lengths (so the device-side bounds checks see the real
//! extents).
use anyhow::Result;
use dinovmf_core::centering::Centering;

use super::device::{u32_of as u, Arg, Buf, Device, Gpu};
use super::launch::head::{
    gemm_logits_f32, lse_combine, teacher_stat, teacher_targets as teacher_targets_launch,
    TeacherIn,
};
use super::launch::sinkhorn::{
    sinkhorn_column_max, sinkhorn_column_scale, sinkhorn_column_sums, sinkhorn_columns,
    sinkhorn_logits, sinkhorn_rows,
};
use super::ranks::{BatchScope, RankShard};
use dinovmf_ptx::kernels::reduce::RedOp;

/// One (batched) GEMM: `C = alpha op(A) op(B) (+ bias) (+ beta C)` (see the kernel's docs for
/// the layouts). `outer * inner` batches; batch `z` is `(z / inner, z % inner)`.
#[derive(Clone, Copy, Debug)]
pub struct Gemm {
    pub ta: bool,
    pub tb: bool,
    pub m: usize,
    pub n: usize,
    pub k: usize,
    pub lda: usize,
    pub ldb: usize,
    pub ldc: usize,
    pub outer: usize,
    pub inner: usize,
    pub sa: [usize; 2],
    pub sb: [usize; 2],
    pub sc: [usize; 2],
    pub alpha: f32,
    pub beta: f32,
}

impl Gemm {
    /// A single GEMM with packed leading dimensions.
    pub fn plain(ta: bool, tb: bool, m: usize, n: usize, k: usize) -> Gemm {
        Gemm {
            ta,
            tb,
            m,
            n,
            k,
            lda: if ta { m } else { k },
            ldb: if tb { k } else { n },
            ldc: n,
            outer: 1,
            inner: 1,
            sa: [0, 0],
            sb: [0, 0],
            sc: [0, 0],
            alpha: 1.0,
            beta: 0.0,
        }
    }
    /// The argument list every `gemm_*` kernel takes (the manifest's order), for operands of
    /// any element type; `lens` are the element counts of (a, b, c).
    pub fn args(
        &self,
        c: Arg,
        a: Arg,
        b: Arg,
        bias: Arg,
        lens: (usize, usize, usize),
    ) -> [Arg; 22] {
        [
            c,
            a,
            b,
            bias,
            u(lens.0),
            u(lens.1),
            u(lens.2),
            u(self.m),
            u(self.n),
            u(self.k),
            u(self.lda),
            u(self.ldb),
            u(self.ldc),
            u(self.inner),
            u(self.sa[0]),
            u(self.sa[1]),
            u(self.sb[0]),
            u(self.sb[1]),
            u(self.sc[0]),
            u(self.sc[1]),
            self.alpha.into(),
            self.beta.into(),
        ]
    }

    pub fn beta(mut self, beta: f32) -> Gemm {
        self.beta = beta;
        self
    }
    pub fn alpha(mut self, alpha: f32) -> Gemm {
        self.alpha = alpha;
        self
    }
}

/// What the backend's matrix products ([`Gpu::gemm`]) multiply in. The prototype layer's
/// logits (`gemm_logits_f32`), softmax, loss and the master weights stay f32 either way.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum MatmulPrecision {
    /// f32 operands on the FMA units (`gemm_*_f32`): the reference.
    #[default]
    F32,
    /// bf16 copies of both operands (`to_bf16`, rounded to nearest even) on tensor cores
    /// (`gemm_tc_*_bf16`), f32 accumulate and f32 output.
    Bf16,
}

impl<D: Device> Gpu<D> {
    /// `c = gemm(a, b) + bias`, f32 `c`, in [`Gpu::precision`].
    pub fn gemm(
        &mut self,
        g: &Gemm,
        c: Buf<f32>,
        a: Buf<f32>,
        b: Buf<f32>,
        bias: Option<Buf<f32>>,
    ) -> Result<()> {
        if self.precision == MatmulPrecision::Bf16 {
            return self.gemm_bf16(g, c, a, b, bias);
        }
        let name = match (g.ta, g.tb) {
            (false, false) => "gemm_nn_f32",
            (false, true) => "gemm_nt_f32",
            (true, false) => "gemm_tn_f32",
            (true, true) => anyhow::bail!("no gemm_tt kernel"),
        };
        let args = g.args(
            c.into(),
            a.into(),
            b.into(),
            bias.map_or(Arg::Null, Arg::from),
            (a.len, b.len, c.len),
        );
        self.launch_with(name, &args, &[("outer", g.outer as u64)])
    }

    /// [`Gpu::gemm`] on tensor cores: both operands copied to bf16 first.
    fn gemm_bf16(
        &mut self,
        g: &Gemm,
        c: Buf<f32>,
        a: Buf<f32>,
        b: Buf<f32>,
        bias: Option<Buf<f32>>,
    ) -> Result<()> {
        let name = match (g.ta, g.tb) {
            (false, false) => "gemm_tc_nn_bf16",
            (false, true) => "gemm_tc_nt_bf16",
            (true, false) => "gemm_tc_tn_bf16",
            (true, true) => anyhow::bail!("no gemm_tc_tt kernel"),
        };
        let a16 = self.bf16_copy(0, a)?;
        let b16 = self.bf16_copy(1, b)?;
        let args = g.args(
            c.into(),
            a16.into(),
            b16.into(),
            bias.map_or(Arg::Null, Arg::from),
            (a16.len, b16.len, c.len),
        );
        self.launch_with(name, &args, &[("outer", g.outer as u64)])
    }

    /// `x` rounded to bf16 into scratch `slot` (0 or 1), which grows to the largest operand
    /// seen (device memory is never freed, so a growth keeps the smaller one too).
    pub fn bf16_copy(&mut self, slot: usize, x: Buf<f32>) -> Result<Buf<u16>> {
        let buf = match self.bf16_scratch[slot] {
            Some(s) if s.len >= x.len => s,
            _ => {
                let s = self.alloc::<u16>(x.len)?;
                self.bf16_scratch[slot] = Some(s);
                s
            }
        };
        let out = buf.sub(0, x.len);
        self.launch("to_bf16", &[out.into(), x.into(), u(x.len)])?;
        Ok(out)
    }

    /// `y[rows, out] = x[rows, in] w[out, in]^T + b`.
    #[allow(clippy::too_many_arguments)]
    pub fn linear(
        &mut self,
        y: Buf<f32>,
        x: Buf<f32>,
        w: Buf<f32>,
        b: Option<Buf<f32>>,
        rows: usize,
        d_in: usize,
        d_out: usize,
    ) -> Result<()> {
        self.gemm(&Gemm::plain(false, true, rows, d_out, d_in), y, x, w, b)
    }

    /// `c[m, n] (beta)= a[m, k] b[k, n]`.
    pub fn matmul_nn(
        &mut self,
        c: Buf<f32>,
        a: Buf<f32>,
        b: Buf<f32>,
        m: usize,
        n: usize,
        k: usize,
    ) -> Result<()> {
        self.gemm(&Gemm::plain(false, false, m, n, k), c, a, b, None)
    }

    /// `c[m, n] += a[k, m]^T b[k, n]` (weight gradients).
    pub fn matmul_tn_acc(
        &mut self,
        c: Buf<f32>,
        a: Buf<f32>,
        b: Buf<f32>,
        m: usize,
        n: usize,
        k: usize,
    ) -> Result<()> {
        self.gemm(&Gemm::plain(true, false, m, n, k).beta(1.0), c, a, b, None)
    }

    /// `dst[r * dst_stride .. + cols] = src[r * src_stride .. + cols]` for `rows` rows: a strided
    /// copy as a batched 1 x cols x 1 GEMM with A = `one` (a buffer holding 1.0), exact.
    #[allow(clippy::too_many_arguments)]
    pub fn copy_rows(
        &mut self,
        dst: Buf<f32>,
        dst_stride: usize,
        src: Buf<f32>,
        src_stride: usize,
        rows: usize,
        cols: usize,
        one: Buf<f32>,
    ) -> Result<()> {
        let g = Gemm {
            outer: rows,
            sb: [src_stride, 0],
            sc: [dst_stride, 0],
            ..Gemm::plain(false, false, 1, cols, 1)
        };
        self.gemm(&g, dst, one, src, None)
    }

    pub fn fill(&mut self, x: Buf<f32>, value: f32) -> Result<()> {
        self.launch("fill", &[x.into(), value.into(), u(x.len)])
    }

    /// `y[..n] += alpha x[..n]`.
    pub fn axpy(&mut self, y: Buf<f32>, x: Buf<f32>, alpha: f32, n: usize) -> Result<()> {
        self.launch("axpy", &[y.into(), x.into(), alpha.into(), u(n)])
    }

    pub fn residual(&mut self, y: Buf<f32>, x: Buf<f32>, f: Buf<f32>, n: usize) -> Result<()> {
        self.launch("residual_forward", &[y.into(), x.into(), f.into(), u(n)])
    }

    pub fn gelu_forward(&mut self, y: Buf<f32>, x: Buf<f32>, n: usize) -> Result<()> {
        self.launch("gelu_forward", &[y.into(), x.into(), u(n)])
    }

    /// `dx = dy gelu'(x)`.
    pub fn gelu_backward(
        &mut self,
        dx: Buf<f32>,
        x: Buf<f32>,
        dy: Buf<f32>,
        n: usize,
    ) -> Result<()> {
        self.launch("gelu_backward", &[dx.into(), x.into(), dy.into(), u(n)])
    }

    /// `y[b] = x[b] mask[b] / keep` for `batch` samples of `per` values.
    pub fn drop_path(
        &mut self,
        y: Buf<f32>,
        x: Buf<f32>,
        mask: Buf<f32>,
        keep: f32,
        batch: usize,
        per: usize,
    ) -> Result<()> {
        self.launch(
            "drop_path",
            &[
                y.into(),
                x.into(),
                mask.into(),
                keep.into(),
                u(batch),
                u(per),
            ],
        )
    }

    #[allow(clippy::too_many_arguments)]
    pub fn layernorm_forward(
        &mut self,
        y: Buf<f32>,
        mean: Buf<f32>,
        rstd: Buf<f32>,
        x: Buf<f32>,
        gamma: Buf<f32>,
        beta: Buf<f32>,
        n: usize,
        d: usize,
        eps: f32,
    ) -> Result<()> {
        self.launch(
            "layernorm_forward",
            &[
                y.into(),
                mean.into(),
                rstd.into(),
                x.into(),
                gamma.into(),
                beta.into(),
                u(n),
                u(d),
                eps.into(),
            ],
        )
    }

    /// LayerNorm backward: `dx` overwritten, `dgamma`, `dbeta` accumulated.
    #[allow(clippy::too_many_arguments)]
    pub fn layernorm_backward(
        &mut self,
        dx: Buf<f32>,
        dgamma: Buf<f32>,
        dbeta: Buf<f32>,
        dy: Buf<f32>,
        x: Buf<f32>,
        mean: Buf<f32>,
        rstd: Buf<f32>,
        gamma: Buf<f32>,
        n: usize,
        d: usize,
    ) -> Result<()> {
        self.launch(
            "layernorm_backward_dx",
            &[
                dx.into(),
                dy.into(),
                x.into(),
                mean.into(),
                rstd.into(),
                gamma.into(),
                u(n),
                u(d),
            ],
        )?;
        self.launch(
            "layernorm_backward_params",
            &[
                dgamma.into(),
                dbeta.into(),
                dy.into(),
                x.into(),
                mean.into(),
                rstd.into(),
                u(n),
                u(d),
            ],
        )
    }

    /// Row softmax in place of `scale s` (no mask).
    pub fn softmax_rows(&mut self, s: Buf<f32>, rows: usize, t: usize, scale: f32) -> Result<()> {
        self.softmax_rows_masked(s, None, rows, t, 1, scale)
    }

    /// Row softmax in place of `scale s + mask`, where `rows_per_mask` consecutive rows share
    /// one `t`-wide row of the additive key mask (`-inf` masks a key out).
    pub fn softmax_rows_masked(
        &mut self,
        s: Buf<f32>,
        mask: Option<Buf<f32>>,
        rows: usize,
        t: usize,
        rows_per_mask: usize,
        scale: f32,
    ) -> Result<()> {
        self.launch(
            "softmax_rows",
            &[
                s.into(),
                mask.map_or(Arg::Null, Arg::from),
                u(rows),
                u(t),
                u(rows_per_mask),
                scale.into(),
            ],
        )
    }

    pub fn softmax_backward_rows(
        &mut self,
        dp: Buf<f32>,
        p: Buf<f32>,
        rows: usize,
        t: usize,
        scale: f32,
    ) -> Result<()> {
        self.launch(
            "softmax_backward_rows",
            &[dp.into(), p.into(), u(rows), u(t), scale.into()],
        )
    }

    /// Teacher targets of the unit rows `y[n, p]`: raw dots `y mu^T`, then `p_t` (centered with
    /// `center` by `centering`) with its log-sum-exp, and the batch statistic `stat[k]` the center
    /// update reads. The [CLS] and the iBOT patch teachers share it. With Sinkhorn-Knopp the
    /// targets are the balanced batch ([`Self::sinkhorn_targets`]; over every rank's rows when
    /// `scope` is a shard), `stat` their mean over the rows here, and `lse_raw` is not written.
    #[allow(clippy::too_many_arguments)]
    pub fn teacher_targets(
        &mut self,
        [p_t, lse_raw, dots, stat]: [Buf<f32>; 4],
        y: Buf<f32>,
        mu: Buf<f32>,
        scale: Buf<f32>,
        bias: Buf<f32>,
        center: Buf<f32>,
        tau_t: f32,
        centering: Centering,
        (n, k, p): (usize, usize, usize),
        scope: &mut BatchScope<'_>,
    ) -> Result<()> {
        self.gemm(&Gemm::plain(false, true, n, k, p), dots, y, mu, None)?;
        if let Centering::Sinkhorn { iters } = centering {
            self.sinkhorn_targets(p_t, dots, scale, bias, iters, (n, k), scope)?;
            // `dots` is free once the logits are in `p_t`: its first row takes the column sums.
            let sums = dots.sub(0, k);
            self.column_sum(sums, p_t, n, k, false)?;
            self.fill(stat, 0.0)?;
            return self.axpy(stat, sums, 1.0 / n.max(1) as f32, k);
        }
        let t = TeacherIn {
            dots,
            scale,
            bias,
            tau_t,
            centering,
            n,
            k,
        };
        teacher_targets_launch(self, p_t, lse_raw, center, &t)?;
        teacher_stat(self, stat, lse_raw, &t)
    }

    /// Sinkhorn-Knopp targets `p_t[n, k]` of the logits `scale dots + bias` (`dots[n, k]`):
    /// `iters` rounds of a column and a row launch, the last row launch writing the softmax.
    /// With `scope` a shard, the `n` rows are this rank's part of the batch: each column round
    /// is [`Self::sinkhorn_columns_over_ranks`] and the rows total `1 / (the whole batch's rows)`.
    #[allow(clippy::too_many_arguments)]
    pub fn sinkhorn_targets(
        &mut self,
        p_t: Buf<f32>,
        dots: Buf<f32>,
        scale: Buf<f32>,
        bias: Buf<f32>,
        iters: u32,
        (n, k): (usize, usize),
        scope: &mut BatchScope<'_>,
    ) -> Result<()> {
        sinkhorn_logits(self, p_t, dots, scale, bias, n, k)?;
        let rounds = iters.max(1);
        let batch_rows = scope.batch_rows(n);
        for r in 0..rounds {
            match scope {
                BatchScope::Whole => sinkhorn_columns(self, p_t, n, k)?,
                BatchScope::Shard(s) => self.sinkhorn_columns_over_ranks(p_t, s, n, k)?,
            }
            sinkhorn_rows(self, p_t, n, batch_rows, k, r + 1 == rounds)?;
        }
        Ok(())
    }

    /// One Sinkhorn column round on this rank's rows `q[n, k]` of a batch split over ranks:
    /// the local column maxima, their maximum over ranks, the local sums of `exp(q - max)`,
    /// their sum over ranks, then the scaling (core's `sinkhorn_columns_over_ranks`). The
    /// collectives run on the device's stream, between the launches.
    pub fn sinkhorn_columns_over_ranks(
        &mut self,
        q: Buf<f32>,
        s: &mut RankShard<'_>,
        n: usize,
        k: usize,
    ) -> Result<()> {
        let (col_max, col_sum) = (s.col_max.sub(0, k), s.col_sum.sub(0, k));
        let stream = self.dev.stream();
        sinkhorn_column_max(self, col_max, q, n, k)?;
        // SAFETY: `col_max` and `col_sum` are `k` f32 of this device's memory, owned by the
        // caller's backend for longer than the step.
        unsafe { s.coll.max_f32(col_max.addr, col_max.addr, k, stream)? };
        sinkhorn_column_sums(self, col_sum, q, col_max, n, k)?;
        // SAFETY: as above.
        unsafe { s.coll.sum_f32(col_sum.addr, col_sum.addr, k, stream)? };
        sinkhorn_column_scale(self, q, col_max, col_sum, n, k)
    }

    /// Logits `dots[n, k]` of the unit rows `y[n, p]` against the prototypes `mu[k, p]`
    /// (`y . mu_k * scale_k + bias_k`), and each row's log-sum-exp assembled from the per-tile
    /// partials `lse_part[n, ceil(k / 64)]`: the cross-entropy kernels read both.
    #[allow(clippy::too_many_arguments)]
    pub fn logits_with_lse(
        &mut self,
        dots: Buf<f32>,
        lse_part: Buf<f32>,
        lse: Buf<f32>,
        y: Buf<f32>,
        mu: Buf<f32>,
        scale: Buf<f32>,
        bias: Buf<f32>,
        n: usize,
        k: usize,
        p: usize,
    ) -> Result<()> {
        gemm_logits_f32(self, dots, lse_part, y, mu, scale, bias, (n, k, p))?;
        lse_combine(self, lse, lse_part, n, k.div_ceil(64))
    }

    pub fn l2norm_forward(
        &mut self,
        y: Buf<f32>,
        norm: Buf<f32>,
        x: Buf<f32>,
        n: usize,
        d: usize,
        eps: f32,
    ) -> Result<()> {
        self.launch(
            "l2norm_forward",
            &[y.into(), norm.into(), x.into(), u(n), u(d), eps.into()],
        )
    }

    #[allow(clippy::too_many_arguments)]
    pub fn l2norm_backward(
        &mut self,
        dx: Buf<f32>,
        dy: Buf<f32>,
        y: Buf<f32>,
        norm: Buf<f32>,
        n: usize,
        d: usize,
        eps: f32,
    ) -> Result<()> {
        self.launch(
            "l2norm_backward",
            &[
                dx.into(),
                dy.into(),
                y.into(),
                norm.into(),
                u(n),
                u(d),
                eps.into(),
            ],
        )
    }

    /// `out[c] (+)= Σ_r x[r, c]`.
    pub fn column_sum(
        &mut self,
        out: Buf<f32>,
        x: Buf<f32>,
        rows: usize,
        cols: usize,
        accumulate: bool,
    ) -> Result<()> {
        self.launch(
            "column_sum_f32",
            &[
                out.into(),
                x.into(),
                u(rows),
                u(cols),
                u(accumulate as usize),
            ],
        )
    }

    /// `out[0] = scale Σ part[..parts]` ([`RedOp::Sum`]) or the max ([`RedOp::MaxAbs`]).
    pub fn reduce_final(
        &mut self,
        out: Buf<f32>,
        part: Buf<f32>,
        parts: usize,
        nseg: usize,
        op: RedOp,
        scale: f32,
    ) -> Result<()> {
        self.launch(
            "reduce_final",
            &[
                out.into(),
                part.into(),
                u(parts),
                u(nseg),
                op.code().into(),
                scale.into(),
            ],
        )
    }

    /// Stage 1 of a per-segment reduction of `x`; `part` holds `nseg * parts` values.
    pub fn reduce_segments(
        &mut self,
        part: Buf<f32>,
        x: Buf<f32>,
        segs: &Segments,
        op: RedOp,
    ) -> Result<()> {
        self.launch_with(
            "reduce_segments_f32",
            &[
                part.into(),
                x.into(),
                u(x.len),
                segs.off.into(),
                segs.len.into(),
                op.code().into(),
            ],
            &[
                ("nseg", segs.n as u64),
                ("max seg_len", segs.max_len as u64),
            ],
        )
    }
}

/// Segments of a flat buffer (per-tensor reductions), resident on the device.
#[derive(Clone, Copy, Debug)]
pub struct Segments {
    pub off: Buf<u64>,
    pub len: Buf<u64>,
    pub n: usize,
    pub max_len: usize,
}

impl Segments {
    pub fn new<D: Device>(gpu: &mut Gpu<D>, segs: &[(usize, usize)]) -> Result<Self> {
        let off: Vec<u64> = segs.iter().map(|s| s.0 as u64).collect();
        let len: Vec<u64> = segs.iter().map(|s| s.1 as u64).collect();
        Ok(Self {
            off: gpu.alloc_from(&off)?,
            len: gpu.alloc_from(&len)?,
            n: segs.len(),
            max_len: segs.iter().map(|s| s.1).max().unwrap_or(0),
        })
    }
    /// Stage-1 blocks per segment.
    pub fn parts(&self) -> usize {
        self.max_len.div_ceil(dinovmf_ptx::kernels::reduce::CHUNK)
    }
}
