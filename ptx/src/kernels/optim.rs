//! Optimiser kernels: AdamW and the teacher EMA, one thread per element, each calling
//! `dinovmf-core`'s per-slice function on its own element (the very same arithmetic as the CPU).
//! Gradient clipping is in `reduce.rs` (per-tensor sums of squares, coefficients, scaling).
use super::for_each_elem;
use crate::block::Block;
use dinovmf_core::optim::{self, AdamW};

/// One AdamW step (`core::optim::adamw_step`) over `n` elements of one parameter group with a
/// common learning rate, weight decay and 1-based step.
#[allow(clippy::too_many_arguments)]
pub fn adamw<B: Block>(
    b: &mut B,
    p: &mut [f32],
    g: &[f32],
    m: &mut [f32],
    v: &mut [f32],
    n: usize,
    hp: &AdamW,
    lr: f64,
    weight_decay: f64,
    step: u64,
) {
    for_each_elem(b, n, |i| {
        optim::adamw_step(
            &mut p[i..i + 1],
            &g[i..i + 1],
            &mut m[i..i + 1],
            &mut v[i..i + 1],
            hp,
            lr,
            weight_decay,
            step,
        )
    });
}

/// Teacher EMA `t = m t + (1 - m) s` (`core::optim::ema_update`).
pub fn ema<B: Block>(b: &mut B, teacher: &mut [f32], student: &[f32], n: usize, momentum: f64) {
    for_each_elem(b, n, |i| {
        optim::ema_update(&mut teacher[i..i + 1], &student[i..i + 1], momentum)
    });
}
