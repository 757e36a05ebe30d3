//! Matrix products of the CPU backend, all through one function so the GEMM crate is one choice.
//!
//! `gemm` (by the faer authors) is used because it dispatches to AVX-512/AVX2+FMA kernels at run
//! time and parallelises with rayon; on the 2-core Zen 4 dev machine it beats `matrixmultiply`
//! on the skinny shapes of a small ViT (see `benches/` and the project notes).

use std::cell::Cell;
use std::sync::atomic::{AtomicUsize, Ordering};

thread_local! {
    /// Calls into the `gemm` crate open on this thread (see [`inside_gemm_crate`]).
    static GEMM_CALLS_HERE: Cell<u32> = const { Cell::new(0) };
}
/// Multi-threaded calls into the `gemm` crate in flight, in the whole process.
static PARALLEL_GEMM_CALLS: AtomicUsize = AtomicUsize::new(0);

/// Whether an allocation made now on this thread is the `gemm` crate's: true while this thread
/// is inside a call to `gemm::gemm`, or while any multi-threaded call is in flight (its tasks
/// run on other rayon threads, which do not know they work for it).
///
/// `gemm` 0.19 allocates its packing buffers on every call and has no entry point that takes
/// the caller's memory, so a warm training step still allocates there; everything else the
/// step needs is allocated once, up front. This is how a counting allocator (the test
/// `tests/step_allocations.rs`, the bench `step_allocations`) tells the two apart. Exact when
/// the step runs on a one-thread pool; with more threads and one step at a time, everything
/// that runs while a parallel product is in flight belongs to that product too, since the
/// step waits for it.
pub fn inside_gemm_crate() -> bool {
    PARALLEL_GEMM_CALLS.load(Ordering::Relaxed) > 0
        || GEMM_CALLS_HERE.try_with(|c| c.get() > 0).unwrap_or(false)
}

/// Marks one call into the `gemm` crate for [`inside_gemm_crate`], from creation to drop.
struct GemmCall {
    parallel: bool,
}

impl GemmCall {
    fn enter(par: gemm::Parallelism) -> Self {
        let parallel = !matches!(par, gemm::Parallelism::None);
        if parallel {
            PARALLEL_GEMM_CALLS.fetch_add(1, Ordering::Relaxed);
        }
        GEMM_CALLS_HERE.with(|c| c.set(c.get() + 1));
        Self { parallel }
    }
}

impl Drop for GemmCall {
    fn drop(&mut self) {
        GEMM_CALLS_HERE.with(|c| c.set(c.get() - 1));
        if self.parallel {
            PARALLEL_GEMM_CALLS.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

/// How an operand is stored: `N` = as given (row-major rows x cols), `T` = transposed view.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    N,
    T,
}

/// `c[m x n] = beta_c * c + a[m x k] * b[k x n]`, every matrix row-major (`Op::T` reads the
/// transpose of a row-major buffer: `a` then is stored `k x m`).
/// `accumulate = false` overwrites `c` (its old contents are never read, NaN included).
#[allow(clippy::too_many_arguments)]
pub fn matmul(
    m: usize,
    n: usize,
    k: usize,
    a: &[f32],
    op_a: Op,
    b: &[f32],
    op_b: Op,
    c: &mut [f32],
    accumulate: bool,
) {
    assert!(a.len() >= m * k, "matmul: a has {} < {}x{}", a.len(), m, k);
    assert!(b.len() >= k * n, "matmul: b has {} < {}x{}", b.len(), k, n);
    assert!(c.len() >= m * n, "matmul: c has {} < {}x{}", c.len(), m, n);
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            c[..m * n].fill(0.0);
        }
        return;
    }
    // Strides in elements: (column stride, row stride) of the logical matrix.
    let (a_cs, a_rs) = match op_a {
        Op::N => (1isize, k as isize),
        Op::T => (m as isize, 1isize),
    };
    let (b_cs, b_rs) = match op_b {
        Op::N => (1isize, n as isize),
        Op::T => (k as isize, 1isize),
    };
    let flops = m * n * k;
    let par = if flops >= 1 << 16 {
        gemm::Parallelism::Rayon(rayon::current_num_threads())
    } else {
        gemm::Parallelism::None
    };
    let _call = GemmCall::enter(par);
    // SAFETY: the asserts above bound every index the strides reach; c does not alias a or b
    // (distinct borrows).
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            c.as_mut_ptr(),
            1,
            n as isize,
            accumulate,
            a.as_ptr(),
            a_cs,
            a_rs,
            b.as_ptr(),
            b_cs,
            b_rs,
            1.0,
            1.0,
            false,
            false,
            false,
            par,
        );
    }
}

/// A linear layer's product in the run's precision: [`matmul`] for f32; for bf16 the
/// forward and input-gradient products (`op_a` = N) through [`super::gemm_bf16::matmul_bf16`],
/// the weight gradients (`op_a` = T, a sum over every token of the batch) as f32 products.
#[allow(clippy::too_many_arguments)]
pub fn linear_matmul(
    prec: crate::backend::Precision,
    m: usize,
    n: usize,
    k: usize,
    a: &[f32],
    op_a: Op,
    b: &[f32],
    op_b: Op,
    c: &mut [f32],
    accumulate: bool,
) {
    match (prec, op_a) {
        (crate::backend::Precision::Bf16, Op::N) => {
            super::gemm_bf16::matmul_bf16(m, n, k, a, op_a, b, op_b, c, accumulate)
        }
        _ => matmul(m, n, k, a, op_a, b, op_b, c, accumulate),
    }
}

/// A strided matrix view for [`matmul_strided`]: element `(i, j)` is at `offset + i rs + j cs`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct View {
    pub offset: usize,
    pub rs: usize,
    pub cs: usize,
}

impl View {
    /// A row-major block starting at `offset` whose rows are `rs` apart.
    pub const fn rows(offset: usize, rs: usize) -> Self {
        Self { offset, rs, cs: 1 }
    }
    /// The transpose of a row-major block: logical `(i, j)` reads stored `(j, i)`.
    pub const fn t(offset: usize, rs: usize) -> Self {
        Self {
            offset,
            rs: 1,
            cs: rs,
        }
    }
    fn fits(&self, rows: usize, cols: usize, len: usize) -> bool {
        rows == 0 || cols == 0 || self.offset + (rows - 1) * self.rs + (cols - 1) * self.cs < len
    }
}

/// `c = (accumulate ? c : 0) + scale * a[m x k] b[k x n]` on strided views, single-threaded
/// when `parallel` is false (the attention calls it from inside a rayon loop over images).
/// gemm splits its parallel work over output tiles only and runs k in a fixed order, so the
/// result does not depend on scheduling.
#[allow(clippy::too_many_arguments)]
pub fn matmul_strided(
    m: usize,
    n: usize,
    k: usize,
    a: &[f32],
    va: View,
    b: &[f32],
    vb: View,
    c: &mut [f32],
    vc: View,
    scale: f32,
    accumulate: bool,
    parallel: bool,
) {
    assert!(va.fits(m, k, a.len()), "matmul_strided: a out of bounds");
    assert!(vb.fits(k, n, b.len()), "matmul_strided: b out of bounds");
    assert!(vc.fits(m, n, c.len()), "matmul_strided: c out of bounds");
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            for i in 0..m {
                for j in 0..n {
                    c[vc.offset + i * vc.rs + j * vc.cs] = 0.0;
                }
            }
        }
        return;
    }
    let par = if parallel && m * n * k >= 1 << 16 {
        gemm::Parallelism::Rayon(rayon::current_num_threads())
    } else {
        gemm::Parallelism::None
    };
    let _call = GemmCall::enter(par);
    // SAFETY: `fits` bounds every index the views reach; `c` is a distinct mutable borrow.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            c.as_mut_ptr().add(vc.offset),
            vc.cs as isize,
            vc.rs as isize,
            accumulate,
            a.as_ptr().add(va.offset),
            va.cs as isize,
            va.rs as isize,
            b.as_ptr().add(vb.offset),
            vb.cs as isize,
            vb.rs as isize,
            1.0,
            scale,
            false,
            false,
            false,
            par,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn naive(m: usize, n: usize, k: usize, a: &[f32], ta: Op, b: &[f32], tb: Op) -> Vec<f64> {
        let mut c = vec![0.0f64; m * n];
        for i in 0..m {
            for j in 0..n {
                let mut s = 0.0f64;
                for l in 0..k {
                    let av = match ta {
                        Op::N => a[i * k + l],
                        Op::T => a[l * m + i],
                    };
                    let bv = match tb {
                        Op::N => b[l * n + j],
                        Op::T => b[j * k + l],
                    };
                    s += av as f64 * bv as f64;
                }
                c[i * n + j] = s;
            }
        }
        c
    }

    #[test]
    fn matmul_matches_f64_naive_all_transposes_rel_1e5() {
        let mut seed = 12345u64;
        let mut rnd = || {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((seed >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        };
        for &(m, n, k) in &[
            (1, 1, 1),
            (7, 5, 3),
            (33, 17, 65),
            (130, 96, 288),
            (65, 65, 32),
        ] {
            for ta in [Op::N, Op::T] {
                for tb in [Op::N, Op::T] {
                    let a: Vec<f32> = (0..m * k).map(|_| rnd()).collect();
                    let b: Vec<f32> = (0..k * n).map(|_| rnd()).collect();
                    let c0: Vec<f32> = (0..m * n).map(|_| rnd()).collect();
                    let want = naive(m, n, k, &a, ta, &b, tb);
                    // overwrite: poison first so unwritten elements show
                    let mut c = vec![f32::NAN; m * n];
                    matmul(m, n, k, &a, ta, &b, tb, &mut c, false);
                    for (x, w) in c.iter().zip(&want) {
                        assert!(
                            (*x as f64 - w).abs() <= 1e-5 * (k as f64).sqrt().max(1.0) * 4.0,
                            "{m}x{n}x{k} {ta:?}{tb:?}: {x} vs {w}"
                        );
                    }
                    let mut c = c0.clone();
                    matmul(m, n, k, &a, ta, &b, tb, &mut c, true);
                    for ((x, w), c0) in c.iter().zip(&want).zip(&c0) {
                        assert!(
                            (*x as f64 - (w + *c0 as f64)).abs()
                                <= 1e-5 * (k as f64).sqrt().max(1.0) * 4.0
                        );
                    }
                }
            }
        }
    }
}
