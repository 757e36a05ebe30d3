//! Elementwise and token kernels on the simulator against dinovmf-core.
mod common;
use common::*;
use dinovmf_core::ops;
use dinovmf_ptx::kernels::{elementwise as ew, tokens};

const SIZES: [usize; 4] = [1, 255, 256, 1000];

#[test]
fn gelu_forward_backward_match_core_rtol_1e6() {
    let mut r = rng(1);
    for n in SIZES {
        let x = rand_vec(&mut r, n, -4.0, 4.0);
        let dy = rand_vec(&mut r, n, -1.0, 1.0);
        let (mut y, mut dx) = (poison(n), poison(n));
        launch("gelu_forward", grid1("gelu_forward", n), |b| {
            ew::gelu_forward(b, &mut y, &x, n)
        });
        launch("gelu_backward", grid1("gelu_backward", n), |b| {
            ew::gelu_backward(b, &mut dx, &x, &dy, n)
        });
        let (mut wy, mut wdx) = (vec![0f64; n], vec![0f64; n]);
        ops::gelu_forward(&mut wy, &to_f64(&x));
        ops::gelu_backward(&mut wdx, &to_f64(&x), &to_f64(&dy));
        assert_close("gelu fwd (rtol 1e-6)", &y, &wy, 1e-6, 1e-7);
        assert_close("gelu bwd (rtol 1e-6)", &dx, &wdx, 1e-6, 1e-7);
    }
}

#[test]
fn residual_axpy_fill_drop_path_exact() {
    let mut r = rng(2);
    for n in SIZES {
        let x = rand_vec(&mut r, n, -2.0, 2.0);
        let f = rand_vec(&mut r, n, -2.0, 2.0);
        let mut y = poison(n);
        launch("residual_forward", grid1("residual_forward", n), |b| {
            ew::residual_forward(b, &mut y, &x, &f, n)
        });
        let mut want = vec![0f32; n];
        ops::residual_forward(&mut want, &x, &f);
        assert_close("residual (exact)", &y, &want, 0.0, 0.0);

        let mut acc = f.clone();
        launch("axpy", grid1("axpy", n), |b| {
            ew::axpy(b, &mut acc, &x, 0.5, n)
        });
        let want: Vec<f32> = f.iter().zip(&x).map(|(a, b)| a + 0.5 * b).collect();
        assert_close("axpy (exact)", &acc, &want, 0.0, 0.0);

        let mut z = poison(n);
        launch("fill", grid1("fill", n), |b| ew::fill(b, &mut z, 0.25, n));
        assert_close("fill (exact)", &z, &vec![0.25f32; n], 0.0, 0.0);
    }
    for (batch, per) in [(1, 7), (3, 100), (5, 256)] {
        let x = rand_vec(&mut r, batch * per, -2.0, 2.0);
        let mask: Vec<f32> = (0..batch).map(|i| (i % 2) as f32).collect();
        let mut y = poison(batch * per);
        launch("drop_path", grid1("drop_path", batch * per), |b| {
            ew::drop_path(b, &mut y, &x, &mask, 0.8, batch, per)
        });
        let mut want = vec![0f32; batch * per];
        ops::drop_path_forward(&mut want, &x, &mask, 0.8, batch, per);
        assert_close("drop_path (exact)", &y, &want, 0.0, 0.0);
    }
}

#[test]
fn patchify_and_tokens_match_core_exactly() {
    let mut r = rng(3);
    for (batch, c, h, w, p, d) in [
        (1, 1, 4, 4, 2, 5),
        (2, 3, 8, 12, 4, 33),
        (3, 3, 6, 6, 3, 40),
    ] {
        let img = rand_vec(&mut r, batch * c * h * w, -1.0, 1.0);
        let n = (h / p) * (w / p);
        let k = c * p * p;
        let mut patches = poison(batch * n * k);
        launch("patchify", grid1("patchify", batch * n * k), |b| {
            tokens::patchify(b, &mut patches, &img, batch, c, h, w, p)
        });
        let mut want = vec![0f32; batch * n * k];
        ops::patchify(&mut want, &img, batch, c, h, w, p);
        assert_close("patchify (exact)", &patches, &want, 0.0, 0.0);

        let patch = rand_vec(&mut r, batch * n * d, -1.0, 1.0);
        let cls = rand_vec(&mut r, d, -1.0, 1.0);
        let pos = rand_vec(&mut r, (n + 1) * d, -1.0, 1.0);
        let t = n + 1;
        let mut x = poison(batch * t * d);
        launch(
            "tokens_forward",
            grid1("tokens_forward", batch * t * d),
            |b| tokens::tokens_forward(b, &mut x, &patch, &cls, &pos, batch, n, d),
        );
        let mut want = vec![0f32; batch * t * d];
        ops::tokens_forward(&mut want, &patch, &cls, &pos, batch, n, d);
        assert_close("tokens fwd (exact)", &x, &want, 0.0, 0.0);

        let dx = rand_vec(&mut r, batch * t * d, -1.0, 1.0);
        let mut dpatch = poison(batch * n * d);
        let mut dcls = rand_vec(&mut r, d, -1.0, 1.0);
        let mut dpos = rand_vec(&mut r, t * d, -1.0, 1.0);
        let (mut wpatch, mut wcls, mut wpos) =
            (vec![0f32; batch * n * d], dcls.clone(), dpos.clone());
        launch(
            "tokens_backward_patch",
            grid1("tokens_backward_patch", batch * n * d),
            |b| tokens::tokens_backward_patch(b, &mut dpatch, &dx, batch, n, d),
        );
        launch(
            "tokens_backward_params",
            grid1("tokens_backward_params", t * d),
            |b| tokens::tokens_backward_params(b, &mut dcls, &mut dpos, &dx, batch, n, d),
        );
        ops::tokens_backward(&mut wpatch, &mut wcls, &mut wpos, &dx, batch, n, d);
        assert_close("tokens bwd dpatch (exact)", &dpatch, &wpatch, 0.0, 0.0);
        assert_close("tokens bwd dcls (rtol 1e-6)", &dcls, &wcls, 1e-6, 1e-6);
        assert_close("tokens bwd dpos (rtol 1e-6)", &dpos, &wpos, 1e-6, 1e-6);
    }
}

#[test]
fn pos_resize_forward_backward_match_core_rtol_1e6() {
    let mut r = rng(4);
    for (sh, sw, gh, gw, d) in [
        (4, 4, 2, 2, 3),
        (2, 2, 4, 4, 5),
        (7, 5, 3, 6, 40),
        (3, 3, 3, 3, 2),
    ] {
        let src = rand_vec(&mut r, sh * sw * d, -1.0, 1.0);
        let mut dst = poison(gh * gw * d);
        launch(
            "pos_resize_forward",
            grid1("pos_resize_forward", gh * gw * d),
            |b| tokens::pos_resize_forward(b, &mut dst, &src, sh, sw, gh, gw, d),
        );
        let mut want = vec![0f32; gh * gw * d];
        ops::pos_resize_forward(&mut want, &src, sh, sw, gh, gw, d);
        assert_close("pos_resize fwd (rtol 1e-6)", &dst, &want, 1e-6, 1e-6);

        let g = rand_vec(&mut r, gh * gw * d, -1.0, 1.0);
        let mut dsrc = rand_vec(&mut r, sh * sw * d, -1.0, 1.0);
        let mut want = dsrc.clone();
        launch(
            "pos_resize_backward",
            grid1("pos_resize_backward", sh * sw * d),
            |b| tokens::pos_resize_backward(b, &mut dsrc, &g, sh, sw, gh, gw, d),
        );
        ops::pos_resize_backward(&mut want, &g, sh, sw, gh, gw, d);
        assert_close("pos_resize bwd (rtol 1e-5)", &dsrc, &want, 1e-5, 1e-6);
    }
}
