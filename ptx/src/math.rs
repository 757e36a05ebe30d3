//! The f32 functions kernels use, always dinovmf-core's (`Real`, i.e. the `libm` crate), never
//! `std`'s: on the host `std`'s inherent `f32::exp` would otherwise win method resolution and the
//! simulator would not compute what the GPU computes.
use dinovmf_core::Real;

#[inline(always)]
pub fn exp(x: f32) -> f32 {
    <f32 as Real>::exp(x)
}
#[inline(always)]
pub fn ln(x: f32) -> f32 {
    <f32 as Real>::ln(x)
}
#[inline(always)]
pub fn sqrt(x: f32) -> f32 {
    <f32 as Real>::sqrt(x)
}
#[inline(always)]
pub fn erf(x: f32) -> f32 {
    <f32 as Real>::erf(x)
}

/// `a b + c` with one rounding: `fma.rn.f32` on the GPU, `libm::fmaf` (also correctly rounded,
/// so bit-identical) in the simulator. The GEMM's inner product uses it (Rust never contracts
/// `a * b + c` on its own, which would leave the GPU at half its FMA rate).
#[inline(always)]
pub fn fma(a: f32, b: f32, c: f32) -> f32 {
    #[cfg(target_arch = "nvptx64")]
    {
        let d: f32;
        // SAFETY: a pure register operation.
        unsafe {
            core::arch::asm!("fma.rn.f32 {d}, {a}, {b}, {c};", d = out(reg32) d,
                a = in(reg32) a, b = in(reg32) b, c = in(reg32) c,
                options(pure, nomem, nostack));
        }
        d
    }
    #[cfg(not(target_arch = "nvptx64"))]
    {
        libm::fmaf(a, b, c)
    }
}
