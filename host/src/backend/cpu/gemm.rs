//! Matrix products of the CPU backend, all through one function so the GEMM is one choice.
//!
//! The f32 products run on our driver [`super::gemm_f32`] around the microkernels of the
//! `gemm-f32` crate (by the faer authors: AVX-512/AVX2+FMA chosen at run time), which packs on
//! the stack or into buffers allocated once and kept, so that a warm training step allocates nothing
//! (the `gemm` crate itself allocates its packing buffers on every call). The `gemm` crate stays
//! as the reference the tests and `benches/gemm.rs` compare against ([`matmul_gemm_crate`]).

use super::gemm_f32::{self, Mat};

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
    // SAFETY: the asserts above bound every index the views reach; c does not alias a or b
    // (distinct borrows). (Empty products and k = 0 are the driver's to handle.)
    unsafe {
        gemm_f32::gemm(
            super::fastmath::simd_level(),
            m,
            n,
            k,
            row_major(c.as_mut_ptr(), n),
            accumulate,
            op_mat(a.as_ptr(), op_a, m, k),
            op_mat(b.as_ptr(), op_b, k, n),
            1.0,
            true,
        );
    }
}

/// A row-major destination whose rows are `cols` apart.
fn row_major(ptr: *mut f32, cols: usize) -> Mat<*mut f32> {
    Mat {
        ptr,
        rs: cols,
        cs: 1,
    }
}

/// The logical `rows x cols` matrix of a row-major buffer read as `op`.
fn op_mat(ptr: *const f32, op: Op, rows: usize, cols: usize) -> Mat<*const f32> {
    match op {
        Op::N => Mat {
            ptr,
            rs: cols,
            cs: 1,
        },
        Op::T => Mat {
            ptr,
            rs: 1,
            cs: rows,
        },
    }
}

/// [`matmul`] through the `gemm` crate ([`gemm_f32::gemm_crate`], which allocates on every
/// call): the reference that the tests and `benches/gemm.rs` compare our driver with.
#[doc(hidden)]
#[allow(clippy::too_many_arguments)]
pub fn matmul_gemm_crate(
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
    assert!(a.len() >= m * k && b.len() >= k * n && c.len() >= m * n);
    if m == 0 || n == 0 {
        return;
    }
    // SAFETY: the assert bounds every index the views reach; c is a distinct borrow.
    unsafe {
        gemm_f32::gemm_crate(
            m,
            n,
            k,
            row_major(c.as_mut_ptr(), n),
            accumulate,
            op_mat(a.as_ptr(), op_a, m, k),
            op_mat(b.as_ptr(), op_b, k, n),
            1.0,
            true,
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
/// The driver splits its parallel work over output tiles only and runs k in a fixed order, so
/// the result does not depend on scheduling.
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
        // (`fits` allows any offset for an empty view: no pointer is formed from it.)
        return;
    }
    // SAFETY: `fits` bounds every index the views reach; `c` is a distinct mutable borrow.
    // (k = 0 is the driver's to handle.)
    unsafe {
        gemm_f32::gemm(
            super::fastmath::simd_level(),
            m,
            n,
            k,
            Mat {
                ptr: c.as_mut_ptr().add(vc.offset),
                rs: vc.rs,
                cs: vc.cs,
            },
            accumulate,
            Mat {
                ptr: a.as_ptr().add(va.offset),
                rs: va.rs,
                cs: va.cs,
            },
            Mat {
                ptr: b.as_ptr().add(vb.offset),
                rs: vb.rs,
                cs: vb.cs,
            },
            scale,
            parallel,
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
