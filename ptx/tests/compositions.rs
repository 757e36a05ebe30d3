//! The compositions the trainer builds from the GEMM and row kernels (linear layer, attention)
//! on the simulator, against dinovmf-core. Each kernel on its own is checked by the host's
//! case table (`host/src/backend/cuda/verify.rs`: `cargo test -p dinovmf --features gpu-sim`
//! and `dinovmf verify-kernels`).
mod common;
use common::*;
use dinovmf_core::ops;
use dinovmf_ptx::kernels::gemm::{gemm, GemmShape};
use dinovmf_ptx::kernels::{reduce, rows};
use dinovmf_ptx::sim::Sim;
use dinovmf_ptx::Elem;

fn run<E: Elem, EC: Elem, const TA: bool, const TB: bool>(
    name: &str,
    c: &mut [EC],
    a: &[E],
    b: &[E],
    bias: Option<&[f32]>,
    s: &GemmShape,
    batches: usize,
) {
    launch(name, s.grid(batches), |blk: &mut Sim| {
        gemm::<_, E, EC, TA, TB>(blk, c, a, b, bias, s)
    });
}

#[test]
fn linear_forward_backward_via_gemm_match_core_rtol_1e5() {
    let mut r = rng(22);
    for (n, d_in, d_out) in [(5, 7, 9), (70, 48, 130), (1, 65, 3)] {
        let x = rand_vec(&mut r, n * d_in, -1.0, 1.0);
        let w = rand_vec(&mut r, d_out * d_in, -1.0, 1.0);
        let bias = rand_vec(&mut r, d_out, -1.0, 1.0);
        // y = x w^T + b: "nt".
        let mut y = poison(n * d_out);
        let s = GemmShape::plain(n, d_out, d_in, false, true);
        run::<f32, f32, false, true>("gemm_nt_f32", &mut y, &x, &w, Some(&bias), &s, 1);
        let mut wy = vec![0f32; n * d_out];
        ops::linear_forward(&mut wy, &x, &w, Some(&bias), n, d_in, d_out);
        assert_close("linear fwd (rtol 1e-5, atol 1e-5)", &y, &wy, 1e-5, 1e-5);

        let dy = rand_vec(&mut r, n * d_out, -1.0, 1.0);
        // dx = dy w: "nn" [n, d_out] x [d_out, d_in].
        let mut dx = poison(n * d_in);
        let s = GemmShape::plain(n, d_in, d_out, false, false);
        run::<f32, f32, false, false>("gemm_nn_f32", &mut dx, &dy, &w, None, &s, 1);
        // dw += dy^T x: "tn" [d_out, n] x [n, d_in], beta 1.
        let mut dw = rand_vec(&mut r, d_out * d_in, -1.0, 1.0);
        let mut s = GemmShape::plain(d_out, d_in, n, true, false);
        s.beta = 1.0;
        let mut wdw = dw.clone();
        run::<f32, f32, true, false>("gemm_tn_f32", &mut dw, &dy, &x, None, &s, 1);
        // dbias += column sums of dy.
        let mut db = rand_vec(&mut r, d_out, -1.0, 1.0);
        let mut wdb = db.clone();
        launch("column_sum_f32", grid1("column_sum_f32", d_out), |b| {
            reduce::column_sum(b, &mut db, &dy, n, d_out, true)
        });
        let mut wdx = vec![0f32; n * d_in];
        ops::linear_backward(
            Some(&mut wdx),
            &mut wdw,
            Some(&mut wdb),
            &dy,
            &x,
            &w,
            n,
            d_in,
            d_out,
        );
        assert_close(
            "linear bwd dx (rtol 1e-5, atol 1e-5)",
            &dx,
            &wdx,
            1e-5,
            1e-5,
        );
        assert_close(
            "linear bwd dw (rtol 1e-5, atol 1e-5)",
            &dw,
            &wdw,
            1e-5,
            1e-5,
        );
        assert_close("linear bwd dbias (exact order)", &db, &wdb, 0.0, 0.0);
    }
}

/// Attention = strided batched GEMMs over (batch, head) + the masked softmax rows, forward and
/// backward, against `core::ops::attention_{forward,backward}`.
#[test]
fn attention_via_batched_gemm_and_softmax_matches_core_rtol_1e4() {
    let mut r = rng(23);
    for (batch, t, d, heads) in [(1, 1, 4, 1), (2, 5, 12, 3), (2, 17, 32, 2), (1, 70, 24, 4)] {
        let hd = d / heads;
        let row = 3 * d;
        let bh = batch * heads;
        let scale = 1.0 / (hd as f32).sqrt();
        let qkv = rand_vec(&mut r, batch * t * row, -1.0, 1.0);
        let mut mask = vec![0f32; batch * t];
        if t > 2 {
            mask[1] = f32::NEG_INFINITY;
            if batch > 1 {
                mask[t + 2] = -0.7;
            }
        }
        // S = Q K^T per (b, h): A = q (lda 3D), B^T = k (ldb 3D).
        let sq = |m, n, k| GemmShape {
            m,
            n,
            k,
            lda: 0,
            ldb: 0,
            ldc: 0,
            inner: heads,
            sa: [0, 0],
            sb: [0, 0],
            sc: [0, 0],
            alpha: 1.0,
            beta: 0.0,
        };
        let mut s = sq(t, t, hd);
        (s.lda, s.ldb, s.ldc) = (row, row, t);
        (s.sa, s.sb, s.sc) = ([t * row, hd], [t * row, hd], [heads * t * t, t * t]);
        let mut att = poison(bh * t * t);
        run::<f32, f32, false, true>("gemm_nt_f32", &mut att, &qkv, &qkv[d..], None, &s, bh);
        launch("softmax_rows", grid_rows("softmax_rows", bh * t), |b| {
            rows::softmax_rows(b, &mut att, Some(&mask), bh * t, t, heads * t, scale)
        });
        // O = P V: A = P (lda T), B = v (ldb 3D), C = out (ldc D, head columns).
        let mut s = sq(t, hd, t);
        (s.lda, s.ldb, s.ldc) = (t, row, d);
        (s.sa, s.sb, s.sc) = ([heads * t * t, t * t], [t * row, hd], [t * d, hd]);
        let mut out = poison(batch * t * d);
        run::<f32, f32, false, false>("gemm_nn_f32", &mut out, &att, &qkv[2 * d..], None, &s, bh);

        let (mut wout, mut watt) = (vec![0f64; batch * t * d], vec![0f64; bh * t * t]);
        let q64 = to_f64(&qkv);
        let m64 = to_f64(&mask);
        ops::attention_forward(&mut wout, &mut watt, &q64, Some(&m64), batch, t, d, heads);
        assert_close(
            "attention P (rtol 1e-5, atol 1e-6)",
            &att,
            &watt,
            1e-5,
            1e-6,
        );
        assert_close(
            "attention out (rtol 1e-4, atol 1e-5)",
            &out,
            &wout,
            1e-4,
            1e-5,
        );

        // Backward.
        let dout = rand_vec(&mut r, batch * t * d, -1.0, 1.0);
        let mut dqkv = poison(batch * t * row);
        // dP = dO V^T: "nt".
        let mut s = sq(t, t, hd);
        (s.lda, s.ldb, s.ldc) = (d, row, t);
        (s.sa, s.sb, s.sc) = ([t * d, hd], [t * row, hd], [heads * t * t, t * t]);
        let mut dp = poison(bh * t * t);
        run::<f32, f32, false, true>("gemm_nt_f32", &mut dp, &dout, &qkv[2 * d..], None, &s, bh);
        // dV = P^T dO: "tn" into the v columns.
        let mut s = sq(t, hd, t);
        (s.lda, s.ldb, s.ldc) = (t, d, row);
        (s.sa, s.sb, s.sc) = ([heads * t * t, t * t], [t * d, hd], [t * row, hd]);
        run::<f32, f32, true, false>("gemm_tn_f32", &mut dqkv[2 * d..], &att, &dout, None, &s, bh);
        // dS = scale P (dP - <dP, P>).
        launch(
            "softmax_backward_rows",
            grid_rows("softmax_backward_rows", bh * t),
            |b| rows::softmax_backward_rows(b, &mut dp, &att, bh * t, t, scale),
        );
        // dQ = dS K: "nn"; dK = dS^T Q: "tn".
        let mut s = sq(t, hd, t);
        (s.lda, s.ldb, s.ldc) = (t, row, row);
        (s.sa, s.sb, s.sc) = ([heads * t * t, t * t], [t * row, hd], [t * row, hd]);
        run::<f32, f32, false, false>("gemm_nn_f32", &mut dqkv, &dp, &qkv[d..], None, &s, bh);
        run::<f32, f32, true, false>("gemm_tn_f32", &mut dqkv[d..], &dp, &qkv, None, &s, bh);

        let mut wd = vec![0f64; batch * t * row];
        ops::attention_backward(&mut wd, &to_f64(&dout), &q64, &watt, batch, t, d, heads);
        assert_close(
            "attention dqkv (rtol 1e-4, atol 2e-5)",
            &dqkv,
            &wd,
            1e-4,
            2e-5,
        );
    }
}
