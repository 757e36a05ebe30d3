//! Reference ViT ops: every backward against central finite differences in f64, f32 forwards
//! against f64, layouts against direct formulas. Tolerances are in the assertion messages.
use dinovmf_core::logits;
use dinovmf_core::ops::*;
use dinovmf_core::optim::{adamw_step, clip_grad_tensor, ema_update, AdamW};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

fn rng(seed: u64) -> ChaCha8Rng {
    ChaCha8Rng::seed_from_u64(seed)
}

fn randn(r: &mut ChaCha8Rng) -> f64 {
    // Box-Muller; u1 in (0, 1].
    let u1: f64 = 1.0 - r.gen::<f64>();
    let u2: f64 = r.gen();
    (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
}

/// Random values that are exactly representable in f32, so f32 and f64 runs see equal inputs.
fn rvec(r: &mut ChaCha8Rng, n: usize, scale: f64) -> Vec<f64> {
    (0..n).map(|_| (scale * randn(r)) as f32 as f64).collect()
}

fn to32(x: &[f64]) -> Vec<f32> {
    x.iter().map(|&v| v as f32).collect()
}

fn dot(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

const H: f64 = 1e-5;
/// FD tolerance: max |analytic - numeric| over entries, relative to max |numeric| (f64,
/// central differences with h = 1e-5 give ~1e-10; 1e-7 leaves room and still catches any
/// wrong term).
const FD_TOL: f64 = 1e-7;

/// Central-difference gradient of `loss` at `x`, every entry.
fn numeric_grad(x: &[f64], loss: &dyn Fn(&[f64]) -> f64) -> Vec<f64> {
    let mut xp = x.to_vec();
    (0..x.len())
        .map(|i| {
            let x0 = xp[i];
            xp[i] = x0 + H;
            let lp = loss(&xp);
            xp[i] = x0 - H;
            let lm = loss(&xp);
            xp[i] = x0;
            (lp - lm) / (2.0 * H)
        })
        .collect()
}

fn assert_grad(what: &str, analytic: &[f64], x: &[f64], loss: &dyn Fn(&[f64]) -> f64) {
    let num = numeric_grad(x, loss);
    assert_eq!(analytic.len(), num.len(), "{what}: length");
    let scale = num.iter().fold(0.0f64, |m, v| m.max(v.abs())).max(1e-12);
    let err = analytic
        .iter()
        .zip(&num)
        .fold(0.0f64, |m, (a, n)| m.max((a - n).abs()));
    eprintln!("{what}: FD rel err {:.1e}", err / scale);
    assert!(
        err / scale < FD_TOL,
        "{what}: FD mismatch, max err {err:e} rel {:e} >= {FD_TOL:e}\nanalytic {analytic:?}\nnumeric {num:?}",
        err / scale
    );
}

/// Max |a - b| / max |b|.
fn rel_err(a: &[f32], b: &[f64]) -> f64 {
    let scale = b.iter().fold(0.0f64, |m, v| m.max(v.abs())).max(1e-30);
    a.iter()
        .zip(b)
        .fold(0.0f64, |m, (x, y)| m.max((*x as f64 - y).abs()))
        / scale
}

/// Gradient buffers start at random values so that "+=" is actually tested; the check
/// subtracts the prefill.
fn prefill(r: &mut ChaCha8Rng, n: usize) -> (Vec<f64>, Vec<f64>) {
    let p = rvec(r, n, 1.0);
    (p.clone(), p)
}

fn minus(a: &[f64], b: &[f64]) -> Vec<f64> {
    a.iter().zip(b).map(|(x, y)| x - y).collect()
}

// ------------------------------------------------------------------------------------------
// linear

#[test]
fn linear_backward_matches_fd_tol_1e7() {
    let mut r = rng(1);
    for &(n, di, dout, with_bias) in &[
        (3, 5, 7, true),
        (1, 1, 1, true),
        (4, 6, 2, false),
        (5, 3, 9, true),
    ] {
        let x = rvec(&mut r, n * di, 1.0);
        let w = rvec(&mut r, dout * di, 0.5);
        let b = rvec(&mut r, dout, 0.5);
        let ry = rvec(&mut r, n * dout, 1.0);
        let bias = with_bias.then_some(b.as_slice());
        let fwd = |x: &[f64], w: &[f64], b: Option<&[f64]>| {
            let mut y = vec![0.0; n * dout];
            linear_forward(&mut y, x, w, b, n, di, dout);
            dot(&y, &ry)
        };
        let mut dx = vec![f64::NAN; n * di]; // must be overwritten
        let (mut dw, dw0) = prefill(&mut r, dout * di);
        let (mut db, db0) = prefill(&mut r, dout);
        linear_backward(
            Some(&mut dx),
            &mut dw,
            with_bias.then_some(db.as_mut_slice()),
            &ry,
            &x,
            &w,
            n,
            di,
            dout,
        );
        let tag = format!("linear n{n} in{di} out{dout} bias{with_bias}");
        assert_grad(&format!("{tag} dx"), &dx, &x, &|x| fwd(x, &w, bias));
        assert_grad(&format!("{tag} dw"), &minus(&dw, &dw0), &w, &|w| {
            fwd(&x, w, bias)
        });
        if with_bias {
            assert_grad(&format!("{tag} db"), &minus(&db, &db0), &b, &|b| {
                fwd(&x, &w, Some(b))
            });
        } else {
            assert_eq!(db, db0, "{tag}: db must be untouched without bias");
        }
        // dx None leaves dw/db semantics unchanged.
        let mut dw2 = dw0.clone();
        linear_backward(None, &mut dw2, None, &ry, &x, &w, n, di, dout);
        assert_eq!(dw2, dw, "{tag}: dw independent of dx request");
    }
}

#[test]
fn linear_f32_matches_f64_tol_1e6() {
    let mut r = rng(2);
    let (n, di, dout) = (7, 33, 19);
    let x = rvec(&mut r, n * di, 1.0);
    let w = rvec(&mut r, dout * di, 0.2);
    let b = rvec(&mut r, dout, 0.2);
    let mut y = vec![0.0; n * dout];
    linear_forward(&mut y, &x, &w, Some(&b), n, di, dout);
    let mut y32 = vec![0.0f32; n * dout];
    linear_forward(&mut y32, &to32(&x), &to32(&w), Some(&to32(&b)), n, di, dout);
    let e = rel_err(&y32, &y);
    assert!(e < 1e-6, "linear f32 vs f64 rel err {e:e} >= 1e-6");
}

// ------------------------------------------------------------------------------------------
// layernorm

#[test]
fn layernorm_backward_matches_fd_tol_1e7() {
    let mut r = rng(3);
    for &(n, d) in &[(3, 5), (2, 7), (1, 16), (4, 3)] {
        let x: Vec<f64> = rvec(&mut r, n * d, 2.0).iter().map(|v| v + 0.7).collect();
        let g = rvec(&mut r, d, 1.0);
        let b = rvec(&mut r, d, 1.0);
        let ry = rvec(&mut r, n * d, 1.0);
        let eps = 1e-6;
        let fwd = |x: &[f64], g: &[f64], b: &[f64]| {
            let (mut y, mut m, mut s) = (vec![0.0; n * d], vec![0.0; n], vec![0.0; n]);
            layernorm_forward(&mut y, &mut m, &mut s, x, g, b, n, d, eps);
            dot(&y, &ry)
        };
        let (mut y, mut m, mut s) = (vec![0.0; n * d], vec![0.0; n], vec![0.0; n]);
        layernorm_forward(&mut y, &mut m, &mut s, &x, &g, &b, n, d, eps);
        let mut dx = vec![f64::NAN; n * d];
        let (mut dg, dg0) = prefill(&mut r, d);
        let (mut db, db0) = prefill(&mut r, d);
        layernorm_backward(&mut dx, &mut dg, &mut db, &ry, &x, &m, &s, &g, n, d);
        let tag = format!("layernorm n{n} d{d}");
        assert_grad(&format!("{tag} dx"), &dx, &x, &|x| fwd(x, &g, &b));
        assert_grad(&format!("{tag} dgamma"), &minus(&dg, &dg0), &g, &|g| {
            fwd(&x, g, &b)
        });
        assert_grad(&format!("{tag} dbeta"), &minus(&db, &db0), &b, &|b| {
            fwd(&x, &g, b)
        });
    }
}

#[test]
fn layernorm_f32_matches_f64_tol_2e6() {
    let mut r = rng(4);
    let (n, d) = (5, 96);
    let x: Vec<f64> = rvec(&mut r, n * d, 3.0)
        .iter()
        .map(|v| ((v + 10.0) as f32) as f64)
        .collect();
    let g = rvec(&mut r, d, 1.0);
    let b = rvec(&mut r, d, 1.0);
    let (mut y, mut m, mut s) = (vec![0.0; n * d], vec![0.0; n], vec![0.0; n]);
    layernorm_forward(&mut y, &mut m, &mut s, &x, &g, &b, n, d, 1e-6);
    let (mut y32, mut m32, mut s32) = (vec![0.0f32; n * d], vec![0.0f32; n], vec![0.0f32; n]);
    layernorm_forward(
        &mut y32,
        &mut m32,
        &mut s32,
        &to32(&x),
        &to32(&g),
        &to32(&b),
        n,
        d,
        1e-6,
    );
    let e = rel_err(&y32, &y);
    assert!(e < 2e-6, "layernorm f32 vs f64 rel err {e:e} >= 2e-6");
    // Statistics against a direct formula.
    for i in 0..n {
        let row = &x[i * d..(i + 1) * d];
        let mean = row.iter().sum::<f64>() / d as f64;
        let var = row.iter().map(|v| (v - mean) * (v - mean)).sum::<f64>() / d as f64;
        assert!((m[i] - mean).abs() < 1e-12 * mean.abs().max(1.0), "mean");
        assert!(
            (s[i] - 1.0 / (var + 1e-6).sqrt()).abs() < 1e-12 * s[i],
            "rstd"
        );
    }
}

// ------------------------------------------------------------------------------------------
// GELU

#[test]
fn gelu_backward_matches_fd_tol_1e7_and_f32_tol_1e6() {
    let mut r = rng(5);
    let x: Vec<f64> = (0..41)
        .map(|i| -5.0 + 0.25 * i as f64 + 0.01 * randn(&mut r))
        .collect();
    let ry = rvec(&mut r, x.len(), 1.0);
    let fwd = |x: &[f64]| {
        let mut y = vec![0.0; x.len()];
        gelu_forward(&mut y, x);
        dot(&y, &ry)
    };
    let mut dx = vec![f64::NAN; x.len()];
    gelu_backward(&mut dx, &x, &ry);
    assert_grad("gelu dx", &dx, &x, &fwd);
    // Known values of x Φ(x): Φ(1) = 0.841344746068543, Φ(-2) = 0.0227501319481792.
    let mut y = vec![0.0f64; 3];
    gelu_forward(&mut y, &[1.0, -2.0, 0.0]);
    assert!((y[0] - 0.841344746068543).abs() < 1e-14, "gelu(1)");
    assert!((y[1] + 2.0 * 0.0227501319481792).abs() < 1e-14, "gelu(-2)");
    assert_eq!(y[2], 0.0);
    let x32 = to32(&x);
    let (mut y64, mut y32) = (vec![0.0; x.len()], vec![0.0f32; x.len()]);
    gelu_forward(&mut y64, &x);
    gelu_forward(&mut y32, &x32);
    let e = rel_err(&y32, &y64);
    assert!(e < 1e-6, "gelu f32 vs f64 rel err {e:e} >= 1e-6");
}

// ------------------------------------------------------------------------------------------
// softmax

#[test]
fn softmax_backward_matches_fd_tol_1e7() {
    let mut r = rng(6);
    for &(n, d) in &[(3, 5), (2, 1), (4, 7), (1, 13)] {
        let x = rvec(&mut r, n * d, 3.0);
        let ry = rvec(&mut r, n * d, 1.0);
        let fwd = |x: &[f64]| {
            let mut y = vec![0.0; n * d];
            softmax_forward(&mut y, x, n, d);
            dot(&y, &ry)
        };
        let mut y = vec![0.0; n * d];
        softmax_forward(&mut y, &x, n, d);
        for i in 0..n {
            let s: f64 = y[i * d..(i + 1) * d].iter().sum();
            assert!((s - 1.0).abs() < 1e-14, "softmax rows sum to 1");
        }
        let mut dx = vec![f64::NAN; n * d];
        softmax_backward(&mut dx, &y, &ry, n, d);
        assert_grad(&format!("softmax n{n} d{d}"), &dx, &x, &fwd);
    }
}

#[test]
fn softmax_is_stable_and_masks() {
    // Large logits: the max-subtracted form must not overflow (f32 exp(100) is inf).
    let x = [100.0f32, 99.0, f32::NEG_INFINITY, 98.0];
    let mut y = [0.0f32; 4];
    softmax_forward(&mut y, &x, 1, 4);
    let e = [1.0f64, (-1.0f64).exp(), 0.0, (-2.0f64).exp()];
    let s: f64 = e.iter().sum();
    for i in 0..4 {
        assert!(
            (y[i] as f64 - e[i] / s).abs() < 1e-7,
            "stable softmax, tol 1e-7"
        );
    }
    let mut z = [1.0f32; 2];
    softmax_forward(&mut z, &[f32::NEG_INFINITY; 2], 1, 2);
    assert_eq!(z, [0.0, 0.0], "all-masked row gives zeros, not NaN");
}

// ------------------------------------------------------------------------------------------
// attention

/// Attention written directly from the definition (per head, explicit softmax), independent
/// of the op's loops.
fn attention_direct(
    qkv: &[f64],
    mask: Option<&[f64]>,
    b: usize,
    t: usize,
    d: usize,
    h: usize,
) -> Vec<f64> {
    let hd = d / h;
    let mut out = vec![0.0; b * t * d];
    let at = |bi: usize, ti: usize, which: usize, hh: usize, c: usize| {
        qkv[(bi * t + ti) * 3 * d + which * d + hh * hd + c]
    };
    for bi in 0..b {
        for hh in 0..h {
            for i in 0..t {
                let s: Vec<f64> = (0..t)
                    .map(|j| {
                        (0..hd)
                            .map(|c| at(bi, i, 0, hh, c) * at(bi, j, 1, hh, c))
                            .sum::<f64>()
                            / (hd as f64).sqrt()
                            + mask.map_or(0.0, |m| m[bi * t + j])
                    })
                    .collect();
                let mx = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let e: Vec<f64> = s.iter().map(|v| (v - mx).exp()).collect();
                let z: f64 = e.iter().sum();
                for c in 0..hd {
                    out[(bi * t + i) * d + hh * hd + c] =
                        (0..t).map(|j| e[j] / z * at(bi, j, 2, hh, c)).sum();
                }
            }
        }
    }
    out
}

#[test]
fn attention_matches_direct_formula_and_fd_tol_1e7() {
    let mut r = rng(7);
    for &(b, t, d, h, masked) in &[
        (2, 5, 6, 2, false),
        (1, 3, 4, 1, false),
        (2, 7, 9, 3, true),
        (1, 10, 8, 2, true),
    ] {
        let qkv = rvec(&mut r, b * t * 3 * d, 1.0);
        let mask: Option<Vec<f64>> = masked.then(|| {
            (0..b * t)
                .map(|i| match i % 3 {
                    0 => 0.0,
                    1 => f64::NEG_INFINITY,
                    _ => -1.5,
                })
                .collect()
        });
        let mk = mask.as_deref();
        let ry = rvec(&mut r, b * t * d, 1.0);
        let fwd = |qkv: &[f64]| {
            let mut out = vec![0.0; b * t * d];
            let mut att = vec![0.0; b * h * t * t];
            attention_forward(&mut out, &mut att, qkv, mk, b, t, d, h);
            dot(&out, &ry)
        };
        let mut out = vec![0.0; b * t * d];
        let mut att = vec![0.0; b * h * t * t];
        attention_forward(&mut out, &mut att, &qkv, mk, b, t, d, h);
        let direct = attention_direct(&qkv, mk, b, t, d, h);
        let err = out
            .iter()
            .zip(&direct)
            .fold(0.0f64, |m, (a, c)| m.max((a - c).abs()));
        let tag = format!("attention B{b} T{t} D{d} H{h} mask{masked}");
        assert!(err < 1e-13, "{tag}: vs direct formula err {err:e} >= 1e-13");
        if let Some(m) = mk {
            for bi in 0..b {
                for j in 0..t {
                    if m[bi * t + j] == f64::NEG_INFINITY {
                        for hh in 0..h {
                            for i in 0..t {
                                assert_eq!(
                                    att[((bi * h + hh) * t + i) * t + j],
                                    0.0,
                                    "{tag}: masked key has P = 0"
                                );
                            }
                        }
                    }
                }
            }
        }
        let mut dqkv = vec![f64::NAN; b * t * 3 * d];
        attention_backward(&mut dqkv, &ry, &qkv, &att, b, t, d, h);
        assert_grad(&format!("{tag} dqkv"), &dqkv, &qkv, &fwd);
    }
}

#[test]
fn attention_f32_matches_f64_tol_2e6() {
    let mut r = rng(8);
    let (b, t, d, h) = (2, 17, 24, 3);
    let qkv = rvec(&mut r, b * t * 3 * d, 1.5);
    let mut out = vec![0.0; b * t * d];
    let mut att = vec![0.0; b * h * t * t];
    attention_forward(&mut out, &mut att, &qkv, None, b, t, d, h);
    let mut out32 = vec![0.0f32; b * t * d];
    let mut att32 = vec![0.0f32; b * h * t * t];
    attention_forward(&mut out32, &mut att32, &to32(&qkv), None, b, t, d, h);
    let e = rel_err(&out32, &out);
    assert!(e < 2e-6, "attention f32 vs f64 rel err {e:e} >= 2e-6");
    let e = rel_err(&att32, &att);
    assert!(e < 2e-6, "attention probs f32 vs f64 rel err {e:e} >= 2e-6");
}

// ------------------------------------------------------------------------------------------
// patch embedding

#[test]
fn patch_embed_matches_conv2d_formula() {
    // out[b, n = oy gw + ox, o] = bias[o] + Σ_{c,i,j} W[o, c, i, j] img[b, c, oy P + i, ox P + j]
    let mut r = rng(9);
    let (b, c, hgt, wid, p, d) = (2, 3, 8, 12, 4, 5);
    let img = rvec(&mut r, b * c * hgt * wid, 1.0);
    let w = rvec(&mut r, d * c * p * p, 0.3);
    let bias = rvec(&mut r, d, 0.3);
    let (gh, gw) = (hgt / p, wid / p);
    let n = gh * gw;
    let mut y = vec![0.0; b * n * d];
    let mut patches = vec![0.0; b * n * c * p * p];
    patch_embed_forward(
        &mut y,
        &mut patches,
        &img,
        &w,
        Some(&bias),
        b,
        c,
        hgt,
        wid,
        p,
        d,
    );
    let mut err = 0.0f64;
    for bi in 0..b {
        for oy in 0..gh {
            for ox in 0..gw {
                for o in 0..d {
                    let mut s = bias[o];
                    for ci in 0..c {
                        for i in 0..p {
                            for j in 0..p {
                                s += w[((o * c + ci) * p + i) * p + j]
                                    * img[((bi * c + ci) * hgt + oy * p + i) * wid + ox * p + j];
                            }
                        }
                    }
                    err = err.max((y[(bi * n + oy * gw + ox) * d + o] - s).abs());
                }
            }
        }
    }
    assert!(
        err < 1e-13,
        "patch embed vs Conv2d formula err {err:e} >= 1e-13"
    );
}

/// A 3 x 3, padding 1 convolution as im2col + linear against the Conv2d formula on HWC maps,
/// stride 1 and 2, even and odd sides.
#[test]
fn conv3x3_im2col_matches_conv2d_formula() {
    let mut r = rng(19);
    for (side, stride) in [(6, 1), (6, 2), (5, 2), (4, 1)] {
        let (b, c, o) = (2, 3, 4);
        let so = conv3x3_out_side(side, stride);
        let chw = rvec(&mut r, b * c * side * side, 1.0);
        let mut x = vec![0.0; chw.len()];
        chw_to_hwc(&mut x, &chw, b, c, side * side);
        let w = rvec(&mut r, o * c * 9, 0.3);
        let bias = rvec(&mut r, o, 0.3);
        let mut cols = vec![f64::NAN; b * so * so * c * 9];
        im2col3x3(&mut cols, &x, b, c, side, stride);
        let mut y = vec![0.0; b * so * so * o];
        linear_forward(&mut y, &cols, &w, Some(&bias), b * so * so, c * 9, o);
        let mut err = 0.0f64;
        for bi in 0..b {
            for oy in 0..so {
                for ox in 0..so {
                    for oc in 0..o {
                        let mut s = bias[oc];
                        for ci in 0..c {
                            for ki in 0..3 {
                                for kj in 0..3 {
                                    let (iy, ix) = (
                                        (stride * oy + ki) as isize - 1,
                                        (stride * ox + kj) as isize - 1,
                                    );
                                    if iy < 0
                                        || ix < 0
                                        || iy >= side as isize
                                        || ix >= side as isize
                                    {
                                        continue;
                                    }
                                    let (iy, ix) = (iy as usize, ix as usize);
                                    s += w[((oc * c + ci) * 3 + ki) * 3 + kj]
                                        * chw[((bi * c + ci) * side + iy) * side + ix];
                                }
                            }
                        }
                        err = err.max((y[((bi * so + oy) * so + ox) * o + oc] - s).abs());
                    }
                }
            }
        }
        assert!(
            err < 1e-13,
            "side {side} stride {stride}: im2col conv vs Conv2d formula err {err:e} >= 1e-13"
        );
    }
}

/// col2im is im2col's adjoint: <im2col(x), y> = <x, col2im(y)> (f64, 1e-12 relative), and it
/// overwrites its output (poisoned first).
#[test]
fn col2im3x3_is_the_adjoint_of_im2col() {
    let mut r = rng(20);
    for (side, stride) in [(6, 1), (6, 2), (5, 2), (3, 1)] {
        let (b, c) = (2, 3);
        let so = conv3x3_out_side(side, stride);
        let x = rvec(&mut r, b * side * side * c, 1.0);
        let y = rvec(&mut r, b * so * so * c * 9, 1.0);
        let mut cols = vec![0.0; y.len()];
        im2col3x3(&mut cols, &x, b, c, side, stride);
        let mut dx = vec![f64::NAN; x.len()];
        col2im3x3(&mut dx, &y, b, c, side, stride);
        let (lhs, rhs) = (dot(&cols, &y), dot(&x, &dx));
        let scale = cols.iter().zip(&y).map(|(a, b)| (a * b).abs()).sum::<f64>();
        assert!(
            (lhs - rhs).abs() <= 1e-12 * scale,
            "side {side} stride {stride}: <im2col x, y> {lhs} vs <x, col2im y> {rhs}"
        );
    }
}

#[test]
fn patch_embed_backward_matches_fd_tol_1e7() {
    let mut r = rng(10);
    let (b, c, hgt, wid, p, d) = (2, 3, 8, 8, 4, 6);
    let img = rvec(&mut r, b * c * hgt * wid, 1.0);
    let w = rvec(&mut r, d * c * p * p, 0.3);
    let bias = rvec(&mut r, d, 0.3);
    let n = (hgt / p) * (wid / p);
    let k = c * p * p;
    let ry = rvec(&mut r, b * n * d, 1.0);
    let fwd = |w: &[f64], bias: &[f64]| {
        let mut y = vec![0.0; b * n * d];
        let mut patches = vec![0.0; b * n * k];
        patch_embed_forward(
            &mut y,
            &mut patches,
            &img,
            w,
            Some(bias),
            b,
            c,
            hgt,
            wid,
            p,
            d,
        );
        dot(&y, &ry)
    };
    let mut y = vec![0.0; b * n * d];
    let mut patches = vec![0.0; b * n * k];
    patch_embed_forward(
        &mut y,
        &mut patches,
        &img,
        &w,
        Some(&bias),
        b,
        c,
        hgt,
        wid,
        p,
        d,
    );
    let (mut dw, dw0) = prefill(&mut r, d * k);
    let (mut db, db0) = prefill(&mut r, d);
    patch_embed_backward(&mut dw, Some(&mut db), &ry, &patches, b * n, k, d);
    assert_grad("patch_embed dw", &minus(&dw, &dw0), &w, &|w| fwd(w, &bias));
    assert_grad("patch_embed db", &minus(&db, &db0), &bias, &|bb| {
        fwd(&w, bb)
    });
}

// ------------------------------------------------------------------------------------------
// tokens and position embedding

#[test]
fn pos_resize_same_grid_is_identity_and_known_values() {
    let mut r = rng(11);
    let d = 3;
    for &(sh, sw) in &[(3, 3), (2, 5), (8, 8)] {
        let src = rvec(&mut r, sh * sw * d, 1.0);
        let mut dst = vec![f64::NAN; sh * sw * d];
        pos_resize_forward(&mut dst, &src, sh, sw, sh, sw, d);
        assert_eq!(
            dst, src,
            "bilinear resize onto the same grid {sh}x{sw} is exactly the identity"
        );
    }
    // 2x downsample with align_corners = false averages each 2x2 block.
    let (sh, sw) = (4, 6);
    let src = rvec(&mut r, sh * sw * d, 1.0);
    let mut dst = vec![0.0; 2 * 3 * d];
    pos_resize_forward(&mut dst, &src, sh, sw, 2, 3, d);
    for y in 0..2 {
        for x in 0..3 {
            for k in 0..d {
                let at = |yy: usize, xx: usize| src[(yy * sw + xx) * d + k];
                let avg = 0.25
                    * (at(2 * y, 2 * x)
                        + at(2 * y, 2 * x + 1)
                        + at(2 * y + 1, 2 * x)
                        + at(2 * y + 1, 2 * x + 1));
                assert!(
                    (dst[(y * 3 + x) * d + k] - avg).abs() < 1e-15,
                    "2x downsample is the 2x2 mean"
                );
            }
        }
    }
    // 2 -> 4 upsample (as F.interpolate(size=4, mode='linear', align_corners=False)):
    // [a, b] -> [a, .75a + .25b, .25a + .75b, b], separably in 2-D.
    let src = [1.0, 3.0, 5.0, 11.0]; // 2x2 grid, d = 1
    let mut dst = vec![0.0; 16];
    pos_resize_forward(&mut dst, &src, 2, 2, 4, 4, 1);
    let line = |a: f64, b: f64| [a, 0.75 * a + 0.25 * b, 0.25 * a + 0.75 * b, b];
    let top = line(1.0, 3.0);
    let bot = line(5.0, 11.0);
    for y in 0..4 {
        for x in 0..4 {
            let want = line(top[x], bot[x])[y];
            assert!(
                (dst[y * 4 + x] - want).abs() < 1e-15,
                "upsample value at ({y},{x})"
            );
        }
    }
}

#[test]
fn tokens_and_pos_resize_backward_match_fd_tol_1e7() {
    let mut r = rng(12);
    let (b, d) = (2, 3);
    for &(sh, sw, gh, gw) in &[
        (3, 3, 2, 2),
        (3, 3, 4, 4),
        (3, 3, 3, 3),
        (2, 3, 3, 5),
        (4, 4, 3, 2),
    ] {
        let n = gh * gw;
        let t = n + 1;
        let patch = rvec(&mut r, b * n * d, 1.0);
        let cls = rvec(&mut r, d, 1.0);
        let pos = rvec(&mut r, (1 + sh * sw) * d, 1.0);
        let ry = rvec(&mut r, b * t * d, 1.0);
        let fwd = |patch: &[f64], cls: &[f64], pos: &[f64]| {
            let mut pg = vec![0.0; t * d];
            pos_embed_for_grid_forward(&mut pg, pos, sh, sw, gh, gw, d);
            let mut x = vec![0.0; b * t * d];
            tokens_forward(&mut x, patch, cls, &pg, b, n, d);
            dot(&x, &ry)
        };
        let mut dpatch = vec![f64::NAN; b * n * d];
        let (mut dcls, dcls0) = prefill(&mut r, d);
        let mut dpg = vec![0.0; t * d];
        tokens_backward(&mut dpatch, &mut dcls, &mut dpg, &ry, b, n, d);
        let (mut dpos, dpos0) = prefill(&mut r, (1 + sh * sw) * d);
        pos_embed_for_grid_backward(&mut dpos, &dpg, sh, sw, gh, gw, d);
        let tag = format!("tokens {sh}x{sw}->{gh}x{gw}");
        assert_grad(&format!("{tag} dpatch"), &dpatch, &patch, &|p| {
            fwd(p, &cls, &pos)
        });
        assert_grad(&format!("{tag} dcls"), &minus(&dcls, &dcls0), &cls, &|c| {
            fwd(&patch, c, &pos)
        });
        assert_grad(&format!("{tag} dpos"), &minus(&dpos, &dpos0), &pos, &|p| {
            fwd(&patch, &cls, p)
        });
    }
}

// ------------------------------------------------------------------------------------------
// residual, drop path

#[test]
fn residual_and_drop_path_backward_match_fd_tol_1e7() {
    let mut r = rng(13);
    let (b, per) = (4, 5);
    let x = rvec(&mut r, b * per, 1.0);
    let f = rvec(&mut r, b * per, 1.0);
    let mask = [1.0, 0.0, 1.0, 1.0];
    let keep = 0.7;
    let ry = rvec(&mut r, b * per, 1.0);
    let fwd = |x: &[f64], f: &[f64]| {
        let mut df = vec![0.0; b * per];
        drop_path_forward(&mut df, f, &mask, keep, b, per);
        let mut y = vec![0.0; b * per];
        residual_forward(&mut y, x, &df);
        dot(&y, &ry)
    };
    let mut dx = vec![f64::NAN; b * per];
    let mut dbranch = vec![f64::NAN; b * per];
    residual_backward(&mut dx, &mut dbranch, &ry);
    let mut df = vec![f64::NAN; b * per];
    drop_path_backward(&mut df, &dbranch, &mask, keep, b, per);
    assert_grad("residual dx", &dx, &x, &|x| fwd(x, &f));
    assert_grad("drop_path df", &df, &f, &|f| fwd(&x, f));
    assert!(
        df[per..2 * per].iter().all(|&v| v == 0.0),
        "dropped sample gets no gradient"
    );
    let mut y = vec![0.0; b * per];
    drop_path_forward(&mut y, &f, &mask, keep, b, per);
    assert!(
        (y[0] - f[0] / 0.7).abs() < 1e-15,
        "kept sample scaled by 1/keep_prob"
    );

    let mut rates = [0.0f32; 5];
    drop_path_rates(&mut rates, 0.1);
    let want = [0.0, 0.025, 0.05, 0.075, 0.1];
    for i in 0..5 {
        assert!((rates[i] - want[i]).abs() < 1e-8, "linspace(0, 0.1, 5)");
    }
    let mut m = [0.0f64; 3];
    drop_path_mask_from_uniform(&mut m, &[0.1, 0.9, 0.5], 0.6);
    assert_eq!(m, [1.0, 0.0, 1.0]);
}

// ------------------------------------------------------------------------------------------
// L2 normalisation and weight norm

#[test]
fn l2norm_backward_matches_fd_tol_1e7() {
    let mut r = rng(14);
    for &(n, d) in &[(3, 5), (1, 1), (4, 8)] {
        let x = rvec(&mut r, n * d, 1.0);
        let ry = rvec(&mut r, n * d, 1.0);
        let eps = L2NORM_EPS;
        let fwd = |x: &[f64]| {
            let (mut y, mut nr) = (vec![0.0; n * d], vec![0.0; n]);
            l2norm_forward(&mut y, &mut nr, x, n, d, eps);
            dot(&y, &ry)
        };
        let (mut y, mut nr) = (vec![0.0; n * d], vec![0.0; n]);
        l2norm_forward(&mut y, &mut nr, &x, n, d, eps);
        for i in 0..n {
            let s: f64 = y[i * d..(i + 1) * d].iter().map(|v| v * v).sum();
            assert!((s - 1.0).abs() < 1e-14, "unit rows");
        }
        let mut dx = vec![f64::NAN; n * d];
        l2norm_backward(&mut dx, &ry, &y, &nr, n, d, eps);
        assert_grad(&format!("l2norm n{n} d{d}"), &dx, &x, &fwd);
    }
    // Below eps the op is x / eps, linear.
    let x = [3e-14, -4e-14];
    let (mut y, mut nr) = ([0.0f64; 2], [0.0f64]);
    l2norm_forward(&mut y, &mut nr, &x, 1, 2, 1e-12);
    assert!(
        (y[0] - 0.03).abs() < 1e-15 && (y[1] + 0.04).abs() < 1e-15,
        "x / eps below eps"
    );
    let mut dx = [0.0; 2];
    l2norm_backward(&mut dx, &[1.0, 2.0], &y, &nr, 1, 2, 1e-12);
    assert_eq!(dx, [1e12, 2e12]);
    let mut y32 = [0.0f32; 2];
    let mut n32 = [0.0f32];
    l2norm_forward(&mut y32, &mut n32, &[3.0, 4.0], 1, 2, 1e-12);
    assert!(
        (y32[0] - 0.6).abs() < 1e-7 && (y32[1] - 0.8).abs() < 1e-7,
        "f32 within 1e-7"
    );
}

/// `w = r mu` through core's one weight norm (`logits::weight_norm_forward`), with its saved
/// `mu`, `r` and `||v||`.
fn weight_norm_w(v: &[f64], g: &[f64], k: usize, p: usize) -> [Vec<f64>; 4] {
    let (mut mu, mut rad, mut nv) = (vec![0.0; k * p], vec![0.0; k], vec![0.0; k]);
    logits::weight_norm_forward(&mut mu, &mut rad, &mut nv, v, Some(g), k, p);
    let w = (0..k * p).map(|i| rad[i / p] * mu[i]).collect();
    [w, mu, rad, nv]
}

#[test]
fn weight_norm_backward_matches_fd_tol_1e7() {
    let mut r = rng(15);
    for &(k, p) in &[(5, 4), (1, 7), (12, 8)] {
        let v = rvec(&mut r, k * p, 1.0);
        let g: Vec<f64> = rvec(&mut r, k, 1.0).iter().map(|x| x + 1.5).collect();
        let ry = rvec(&mut r, k * p, 1.0);
        let fwd = |v: &[f64], g: &[f64]| dot(&weight_norm_w(v, g, k, p)[0], &ry);
        let [w, mu, rad, nv] = weight_norm_w(&v, &g, k, p);
        for i in 0..k {
            let s: f64 = w[i * p..(i + 1) * p]
                .iter()
                .map(|x| x * x)
                .sum::<f64>()
                .sqrt();
            assert!((s - g[i].abs()).abs() < 1e-13, "||w_k|| = |g_k|");
        }
        // w = r mu: dmu = r dw, dr = <dw, mu>.
        let dmu: Vec<f64> = (0..k * p).map(|i| rad[i / p] * ry[i]).collect();
        let dr: Vec<f64> = (0..k)
            .map(|i| dot(&ry[i * p..(i + 1) * p], &mu[i * p..(i + 1) * p]))
            .collect();
        let (mut dv, mut dg) = (vec![0.0; k * p], vec![0.0; k]);
        logits::weight_norm_backward(&mut dv, Some(&mut dg), &dmu, &dr, &mu, &nv, k, p);
        assert_grad(&format!("weight_norm K{k} p{p} dv"), &dv, &v, &|v| {
            fwd(v, &g)
        });
        assert_grad(&format!("weight_norm K{k} p{p} dg"), &dg, &g, &|g| {
            fwd(&v, g)
        });
        // Fixed g: dv identical, nothing else written.
        let mut dv2 = vec![0.0; k * p];
        logits::weight_norm_backward(&mut dv2, None, &dmu, &dr, &mu, &nv, k, p);
        assert_eq!(dv2, dv, "dv does not depend on whether dg is requested");
    }
}

// ------------------------------------------------------------------------------------------
// optimiser

#[test]
fn adamw_matches_direct_formula_tol_1e12() {
    let mut r = rng(16);
    let n = 11;
    let hp = AdamW::default();
    let (lr, wd) = (3e-3, 0.04);
    let mut p = rvec(&mut r, n, 1.0);
    let (mut m, mut v) = (vec![0.0; n], vec![0.0; n]);
    let (mut pd, mut md, mut vd) = (p.clone(), vec![0.0; n], vec![0.0; n]);
    for t in 1..=6u64 {
        let g = rvec(&mut r, n, 0.5);
        adamw_step(&mut p, &g, &mut m, &mut v, &hp, lr, wd, t);
        for i in 0..n {
            md[i] = 0.9 * md[i] + 0.1 * g[i];
            vd[i] = 0.999 * vd[i] + 0.001 * g[i] * g[i];
            let mhat = md[i] / (1.0 - 0.9f64.powi(t as i32));
            let vhat = vd[i] / (1.0 - 0.999f64.powi(t as i32));
            pd[i] = pd[i] - lr * wd * pd[i] - lr * mhat / (vhat.sqrt() + 1e-8);
        }
        for i in 0..n {
            assert!(
                (p[i] - pd[i]).abs() < 1e-12,
                "adamw step {t} param {i}: {} vs {}",
                p[i],
                pd[i]
            );
            assert!(
                (m[i] - md[i]).abs() < 1e-15 && (v[i] - vd[i]).abs() < 1e-15,
                "moments"
            );
        }
    }
    // f32 follows f64 to f32 rounding.
    let mut p32 = [0.5f32, -0.25];
    let (mut m32, mut v32) = ([0.0f32; 2], [0.0f32; 2]);
    adamw_step(
        &mut p32,
        &[0.1, -0.3],
        &mut m32,
        &mut v32,
        &hp,
        1e-3,
        0.1,
        1,
    );
    // Step 1: mhat = g, vhat = g^2 => p = p (1 - lr wd) - lr g / (|g| + eps).
    let want = [
        0.5 * (1.0 - 1e-4) - 1e-3 * 0.1 / (0.1 + 1e-8),
        -0.25 * (1.0 - 1e-4) + 1e-3 * 0.3 / (0.3 + 1e-8),
    ];
    for i in 0..2 {
        assert!(
            (p32[i] as f64 - want[i]).abs() < 1e-7,
            "adamw f32 step 1 within 1e-7"
        );
    }
}

#[test]
fn ema_and_clip_match_direct_formulas() {
    let mut r = rng(17);
    let s = rvec(&mut r, 9, 1.0);
    let t0 = rvec(&mut r, 9, 1.0);
    let mut t = t0.clone();
    ema_update(&mut t, &s, 0.996);
    for i in 0..9 {
        assert!((t[i] - (0.996 * t0[i] + 0.004 * s[i])).abs() < 1e-15, "ema");
    }
    let g0 = rvec(&mut r, 9, 3.0);
    let norm: f64 = g0.iter().map(|v| v * v).sum::<f64>().sqrt();
    let mut g = g0.clone();
    let got = clip_grad_tensor(&mut g, 0.5 * norm);
    assert!(
        (got - norm).abs() < 1e-12 * norm,
        "returns the pre-clip norm"
    );
    let coef = 0.5 * norm / (norm + 1e-6);
    for i in 0..9 {
        assert!(
            (g[i] - g0[i] * coef).abs() < 1e-14,
            "clip scales by clip / (norm + 1e-6)"
        );
    }
    let mut g = g0.clone();
    clip_grad_tensor(&mut g, 2.0 * norm);
    assert_eq!(g, g0, "no change below the threshold");
}
