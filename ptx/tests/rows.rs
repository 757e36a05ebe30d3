//! Row kernels (one warp per row) on the simulator against dinovmf-core in f64.
mod common;
use common::*;
use dinovmf_core::ops;
use dinovmf_ptx::kernels::rows;

/// (rows, columns): fewer rows than a block, rows not a multiple of 4, columns below, at and
/// above a warp and not a multiple of 32.
const SHAPES: [(usize, usize); 5] = [(1, 7), (3, 32), (5, 33), (13, 100), (9, 384)];

#[test]
fn layernorm_forward_backward_match_core_f64_rtol_2e5() {
    let mut r = rng(10);
    for (n, d) in SHAPES {
        let x = rand_vec(&mut r, n * d, -2.0, 3.0);
        let gamma = rand_vec(&mut r, d, 0.5, 1.5);
        let beta = rand_vec(&mut r, d, -0.5, 0.5);
        let eps = 1e-6f32;
        let (mut y, mut mean, mut rstd) = (poison(n * d), poison(n), poison(n));
        launch(
            "layernorm_forward",
            grid_rows("layernorm_forward", n),
            |b| {
                rows::layernorm_forward(
                    b, &mut y, &mut mean, &mut rstd, &x, &gamma, &beta, n, d, eps,
                )
            },
        );
        let (mut wy, mut wm, mut wr) = (vec![0f64; n * d], vec![0f64; n], vec![0f64; n]);
        let (x64, g64) = (to_f64(&x), to_f64(&gamma));
        ops::layernorm_forward(
            &mut wy,
            &mut wm,
            &mut wr,
            &x64,
            &g64,
            &to_f64(&beta),
            n,
            d,
            eps as f64,
        );
        assert_close("ln fwd y (rtol 2e-5)", &y, &wy, 2e-5, 2e-6);
        assert_close("ln fwd mean (rtol 2e-5)", &mean, &wm, 2e-5, 2e-6);
        assert_close("ln fwd rstd (rtol 2e-5)", &rstd, &wr, 2e-5, 2e-6);

        let dy = rand_vec(&mut r, n * d, -1.0, 1.0);
        let mut dx = poison(n * d);
        launch(
            "layernorm_backward_dx",
            grid_rows("layernorm_backward_dx", n),
            |b| rows::layernorm_backward_dx(b, &mut dx, &dy, &x, &mean, &rstd, &gamma, n, d),
        );
        let mut dgamma = rand_vec(&mut r, d, -1.0, 1.0);
        let mut dbeta = rand_vec(&mut r, d, -1.0, 1.0);
        let (mut wdg, mut wdb) = (to_f64(&dgamma), to_f64(&dbeta));
        launch(
            "layernorm_backward_params",
            grid1("layernorm_backward_params", d),
            |b| {
                rows::layernorm_backward_params(
                    b,
                    &mut dgamma,
                    &mut dbeta,
                    &dy,
                    &x,
                    &mean,
                    &rstd,
                    n,
                    d,
                )
            },
        );
        let mut wdx = vec![0f64; n * d];
        ops::layernorm_backward(
            &mut wdx,
            &mut wdg,
            &mut wdb,
            &to_f64(&dy),
            &x64,
            &wm,
            &wr,
            &g64,
            n,
            d,
        );
        assert_close("ln bwd dx (rtol 1e-4, atol 2e-5)", &dx, &wdx, 1e-4, 2e-5);
        assert_close("ln bwd dgamma (rtol 1e-4)", &dgamma, &wdg, 1e-4, 2e-5);
        assert_close("ln bwd dbeta (rtol 1e-5)", &dbeta, &wdb, 1e-5, 2e-6);
    }
}

#[test]
fn softmax_rows_with_mask_and_backward_match_core_f64_rtol_1e5() {
    let mut r = rng(11);
    for (heads, t) in [(1, 1), (2, 5), (3, 33), (2, 70)] {
        let batch = 2;
        let n_rows = batch * heads * t;
        let scale = 0.37f32;
        let s0 = rand_vec(&mut r, n_rows * t, -3.0, 3.0);
        // Key mask: hide some keys; batch 1 hides every key (its rows must become zeros).
        let mut mask = rand_vec(&mut r, batch * t, -0.5, 0.5);
        for j in 0..t {
            if j % 3 == 1 {
                mask[j] = f32::NEG_INFINITY;
            }
            mask[t + j] = f32::NEG_INFINITY;
        }
        let mut s = s0.clone();
        launch("softmax_rows", grid_rows("softmax_rows", n_rows), |b| {
            rows::softmax_rows(b, &mut s, Some(&mask), n_rows, t, heads * t, scale)
        });
        let mut want = vec![0f64; n_rows * t];
        for row in 0..n_rows {
            let bi = row / (heads * t);
            let w = &mut want[row * t..(row + 1) * t];
            for j in 0..t {
                w[j] = s0[row * t + j] as f64 * scale as f64 + mask[bi * t + j] as f64;
            }
            ops::softmax_in_place(w);
        }
        assert_close("softmax masked (rtol 1e-5)", &s, &want, 1e-5, 1e-7);

        // Backward, unscaled (core's softmax_backward) and with the attention scale.
        let p = s.clone();
        let dp0 = rand_vec(&mut r, n_rows * t, -1.0, 1.0);
        for sc in [1.0f32, 0.25] {
            let mut dp = dp0.clone();
            launch(
                "softmax_backward_rows",
                grid_rows("softmax_backward_rows", n_rows),
                |b| rows::softmax_backward_rows(b, &mut dp, &p, n_rows, t, sc),
            );
            let mut wdx = vec![0f64; n_rows * t];
            ops::softmax_backward(&mut wdx, &to_f64(&p), &to_f64(&dp0), n_rows, t);
            let wdx: Vec<f64> = wdx.iter().map(|v| v * sc as f64).collect();
            assert_close("softmax bwd (rtol 1e-5, atol 1e-6)", &dp, &wdx, 1e-5, 1e-6);
        }
    }
}

#[test]
fn softmax_rows_without_mask_match_core() {
    let mut r = rng(12);
    let (n_rows, t) = (7, 45);
    let s0 = rand_vec(&mut r, n_rows * t, -5.0, 5.0);
    let mut s = s0.clone();
    launch("softmax_rows", grid_rows("softmax_rows", n_rows), |b| {
        rows::softmax_rows(b, &mut s, None, n_rows, t, 1, 1.0)
    });
    let mut want = vec![0f64; n_rows * t];
    ops::softmax_forward(&mut want, &to_f64(&s0), n_rows, t);
    assert_close("softmax plain (rtol 1e-5)", &s, &want, 1e-5, 1e-7);
}

#[test]
fn l2norm_forward_backward_match_core_f64_rtol_1e5() {
    let mut r = rng(13);
    for (n, d) in SHAPES {
        let mut x = rand_vec(&mut r, n * d, -1.0, 1.0);
        // One row below eps: the clamped branch.
        if n > 2 {
            for v in &mut x[2 * d..3 * d] {
                *v *= 1e-7;
            }
        }
        let eps = 1e-6f32;
        let (mut y, mut norm) = (poison(n * d), poison(n));
        launch("l2norm_forward", grid_rows("l2norm_forward", n), |b| {
            rows::l2norm_forward(b, &mut y, &mut norm, &x, n, d, eps)
        });
        let (mut wy, mut wn) = (vec![0f64; n * d], vec![0f64; n]);
        ops::l2norm_forward(&mut wy, &mut wn, &to_f64(&x), n, d, eps as f64);
        assert_close("l2norm fwd y (rtol 1e-5)", &y, &wy, 1e-5, 1e-7);
        assert_close("l2norm fwd norm (rtol 1e-5)", &norm, &wn, 1e-5, 1e-12);

        let dy = rand_vec(&mut r, n * d, -1.0, 1.0);
        let mut dx = poison(n * d);
        launch("l2norm_backward", grid_rows("l2norm_backward", n), |b| {
            rows::l2norm_backward(b, &mut dx, &dy, &y, &norm, n, d, eps)
        });
        let mut wdx = vec![0f64; n * d];
        ops::l2norm_backward(&mut wdx, &to_f64(&dy), &wy, &wn, n, d, eps as f64);
        assert_close("l2norm bwd (rtol 1e-4, atol 1e-5)", &dx, &wdx, 1e-4, 1e-5);
    }
}
