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
