//! Optimiser, reduction and clipping kernels on the simulator against dinovmf-core.
mod common;
use common::*;
use dinovmf_core::optim::{self, AdamW};
use dinovmf_ptx::kernels::reduce::{self, RedOp, CHUNK};
use dinovmf_ptx::kernels::{head, optim as kopt};
use dinovmf_ptx::Elem;

#[test]
fn adamw_and_ema_are_bitwise_core() {
    let mut r = rng(30);
    for n in [1, 300, 1025] {
        let p0 = rand_vec(&mut r, n, -1.0, 1.0);
        let g = rand_vec(&mut r, n, -1.0, 1.0);
        let m0 = rand_vec(&mut r, n, -0.1, 0.1);
        let v0 = rand_vec(&mut r, n, 0.001, 0.01);
        let hp = AdamW::default();
        for (step, wd) in [(1u64, 0.04), (17, 0.0), (5000, 0.4)] {
            let (mut p, mut m, mut v) = (p0.clone(), m0.clone(), v0.clone());
            launch("adamw", grid1("adamw", n), |b| {
                kopt::adamw(b, &mut p, &g, &mut m, &mut v, n, &hp, 5e-4, wd, step)
            });
            let (mut wp, mut wm, mut wv) = (p0.clone(), m0.clone(), v0.clone());
            optim::adamw_step(&mut wp, &g, &mut wm, &mut wv, &hp, 5e-4, wd, step);
            assert_close("adamw p (exact)", &p, &wp, 0.0, 0.0);
            assert_close("adamw m (exact)", &m, &wm, 0.0, 0.0);
            assert_close("adamw v (exact)", &v, &wv, 0.0, 0.0);
        }
        let mut t = p0.clone();
        launch("ema", grid1("ema", n), |b| {
            kopt::ema(b, &mut t, &g, n, 0.996)
        });
        let mut wt = p0.clone();
        optim::ema_update(&mut wt, &g, 0.996);
        assert_close("ema (exact)", &t, &wt, 0.0, 0.0);
    }
}

#[test]
fn center_update_is_bitwise_core() {
    let mut r = rng(31);
    let k = 777;
    let c0 = rand_vec(&mut r, k, 0.0, 0.01);
    let stat = rand_vec(&mut r, k, 0.0, 0.01);
    let mut c = c0.clone();
    launch("center_update", grid1("center_update", k), |b| {
        head::center_update(b, &mut c, &stat, 0.9, k)
    });
    let mut wc = c0;
    dinovmf_core::centering::center_update(&mut wc, &stat, 0.9f32);
    assert_close("center_update (exact)", &c, &wc, 0.0, 0.0);
}

/// Segments: empty-ish, shorter than a block, ragged, longer than one chunk.
fn segments() -> (Vec<u64>, Vec<u64>) {
    let lens = [1u64, 300, 4096, 9001, 33];
    let mut off = Vec::new();
    let mut o = 0;
    for &l in &lens {
        off.push(o);
        o += l + 3; // gaps between tensors must not be read
    }
    (off, lens.to_vec())
}

fn run_reduce<E: Elem>(name: &str, x: &[E], op: RedOp, off: &[u64], len: &[u64]) -> Vec<f32> {
    let nseg = off.len();
    let parts = (*len.iter().max().unwrap() as usize).div_ceil(CHUNK);
    let mut part = poison(parts * nseg);
    launch(name, [parts as u32, nseg as u32, 1], |b| {
        reduce::reduce_segments(b, &mut part, x, off, len, op)
    });
    let mut out = poison(nseg);
    launch("reduce_final", grid1("reduce_final", nseg), |b| {
        reduce::reduce_final(b, &mut out, &part, parts, nseg, op, 1.0)
    });
    out
}

#[test]
fn segment_reductions_match_f64_rtol_1e5() {
    let mut r = rng(32);
    let (off, len) = segments();
    let total = (off.last().unwrap() + len.last().unwrap()) as usize;
    let x = rand_vec(&mut r, total, -1.0, 1.0);
    let vals = to_f64(&x);
    for op in [RedOp::Sum, RedOp::SumSq, RedOp::MaxAbs] {
        let got = run_reduce("reduce_segments_f32", &x, op, &off, &len);
        let want: Vec<f64> = off
            .iter()
            .zip(&len)
            .map(|(&o, &l)| {
                let s = &vals[o as usize..(o + l) as usize];
                match op {
                    RedOp::Sum => s.iter().sum(),
                    RedOp::SumSq => s.iter().map(|v| v * v).sum(),
                    RedOp::MaxAbs => s.iter().fold(0.0, |a: f64, v| a.max(v.abs())),
                }
            })
            .collect();
        let atol = if op == RedOp::Sum { 1e-4 } else { 0.0 };
        assert_close(&format!("reduce {op:?} (rtol 1e-5)"), &got, &want, 1e-5, atol);
    }
}

#[test]
fn per_tensor_clipping_matches_core_clip_grad_tensor_rtol_1e6() {
    let mut r = rng(33);
    let (off, len) = segments();
    let total = (off.last().unwrap() + len.last().unwrap()) as usize;
    let g0 = rand_vec(&mut r, total, -0.2, 0.2);
    let nseg = off.len();
    let parts = (*len.iter().max().unwrap() as usize).div_ceil(CHUNK);
    let clip = 3.0;
    let mut part = poison(parts * nseg);
    launch("reduce_segments_f32", [parts as u32, nseg as u32, 1], |b| {
        reduce::reduce_segments(b, &mut part, &g0, &off, &len, RedOp::SumSq)
    });
    let (mut coef, mut norm) = (poison(nseg), poison(nseg));
    launch("clip_coef", grid1("clip_coef", nseg), |b| {
        reduce::clip_coef(b, &mut coef, &mut norm, &part, parts, nseg, clip)
    });
    let mut g = g0.clone();
    let max_len = *len.iter().max().unwrap() as usize;
    launch(
        "scale_segments",
        [max_len.div_ceil(256) as u32, nseg as u32, 1],
        |b| reduce::scale_segments(b, &mut g, &off, &len, &coef),
    );
    let mut wg = g0.clone();
    let mut wnorm = vec![0f64; nseg];
    for s in 0..nseg {
        let rg = off[s] as usize..(off[s] + len[s]) as usize;
        wnorm[s] = optim::clip_grad_tensor(&mut wg[rg], clip);
    }
    assert!(
        coef.iter().any(|&c| c < 1.0) && coef.contains(&1.0),
        "test must clip some tensors and not others"
    );
    assert_close("clip norms (rtol 1e-6)", &norm, &wnorm, 1e-6, 0.0);
    assert_close(
        "clipped grads (rtol 1e-6), gaps untouched",
        &g,
        &wg,
        1e-6,
        0.0,
    );
}
