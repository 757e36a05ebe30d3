//! Shared helpers of the simulator tests: random inputs (never zeros), NaN-poisoned outputs,
//! launches with the manifest's block size and shared memory, and checked comparisons.
#![allow(dead_code)]
use dinovmf_ptx::manifest;
use dinovmf_ptx::sim::{self, Sim};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

pub fn rng(seed: u64) -> ChaCha8Rng {
    ChaCha8Rng::seed_from_u64(seed)
}

/// Uniform in `[lo, hi)`, nudged away from exact zero.
pub fn rand_vec(r: &mut ChaCha8Rng, n: usize, lo: f32, hi: f32) -> Vec<f32> {
    (0..n)
        .map(|_| {
            let x = r.gen_range(lo..hi);
            if x == 0.0 {
                0.125
            } else {
                x
            }
        })
        .collect()
}

/// An output buffer whose unwritten elements show up as NaN.
pub fn poison(n: usize) -> Vec<f32> {
    vec![f32::NAN; n]
}

/// Runs kernel `name`'s body over `grid` with the manifest's block size and shared memory.
pub fn launch(name: &str, grid: [u32; 3], body: impl FnMut(&mut Sim)) {
    let k = manifest::kernel(name).unwrap_or_else(|| panic!("kernel {name} not in the manifest"));
    sim::launch(grid, k.block, k.smem_bytes() as usize / 4, body);
}

/// 1-D grid covering `n` items with the kernel's block (`ceil(n / block)` blocks).
pub fn grid1(name: &str, n: usize) -> [u32; 3] {
    let k = manifest::kernel(name).unwrap();
    [n.div_ceil(k.block as usize).max(1) as u32, 1, 1]
}

/// Grid for the row-per-warp kernels.
pub fn grid_rows(name: &str, rows: usize) -> [u32; 3] {
    let k = manifest::kernel(name).unwrap();
    [rows.div_ceil(k.block as usize / 32).max(1) as u32, 1, 1]
}

/// `|got - want| <= atol + rtol |want|` everywhere, no NaN; the message names the check and the
/// tolerance. Returns the largest absolute error.
pub fn assert_close<W: Copy + Into<f64>>(
    what: &str,
    got: &[f32],
    want: &[W],
    rtol: f64,
    atol: f64,
) -> f64 {
    assert_eq!(got.len(), want.len(), "{what}: lengths differ");
    let mut worst = 0.0f64;
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        let (g, w) = (g as f64, w.into());
        assert!(!g.is_nan(), "{what}: element {i} is NaN (unwritten?)");
        let err = (g - w).abs();
        assert!(
            err <= atol + rtol * w.abs() || (g == w),
            "{what}: element {i}: got {g}, want {w} (|err| {err:e} > atol {atol:e} + rtol {rtol:e})"
        );
        worst = worst.max(err);
    }
    worst
}

pub fn to_f64(x: &[f32]) -> Vec<f64> {
    x.iter().map(|&v| v as f64).collect()
}
