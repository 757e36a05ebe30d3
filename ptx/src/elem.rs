//! Storage types: f32, and f16 kept as its bits (`H16`). Compute is always f32.

/// A stored element: widened to f32 on load, rounded (to nearest even) on store.
pub trait Elem: Copy + 'static {
    fn ld(self) -> f32;
    fn st(x: f32) -> Self;
}

impl Elem for f32 {
    #[inline(always)]
    fn ld(self) -> f32 {
        self
    }
    #[inline(always)]
    fn st(x: f32) -> f32 {
        x
    }
}

/// IEEE binary16 bits. On the GPU the conversions are single `cvt` instructions; on the host
/// they go through `half`, which rounds the same way (round to nearest, ties to even).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[repr(transparent)]
pub struct H16(pub u16);

impl Elem for H16 {
    #[inline(always)]
    fn ld(self) -> f32 {
        f16_to_f32(self.0)
    }
    #[inline(always)]
    fn st(x: f32) -> H16 {
        H16(f32_to_f16(x))
    }
}

#[cfg(target_arch = "nvptx64")]
#[inline(always)]
fn f16_to_f32(h: u16) -> f32 {
    let f: f32;
    // SAFETY: a pure register conversion.
    unsafe {
        core::arch::asm!("cvt.f32.f16 {f}, {h};", f = out(reg32) f, h = in(reg16) h,
            options(pure, nomem, nostack));
    }
    f
}

#[cfg(target_arch = "nvptx64")]
#[inline(always)]
fn f32_to_f16(f: f32) -> u16 {
    let h: u16;
    // SAFETY: a pure register conversion.
    unsafe {
        core::arch::asm!("cvt.rn.f16.f32 {h}, {f};", h = out(reg16) h, f = in(reg32) f,
            options(pure, nomem, nostack));
    }
    h
}

#[cfg(not(target_arch = "nvptx64"))]
#[inline(always)]
fn f16_to_f32(h: u16) -> f32 {
    half::f16::from_bits(h).to_f32()
}

#[cfg(not(target_arch = "nvptx64"))]
#[inline(always)]
fn f32_to_f16(f: f32) -> u16 {
    half::f16::from_f32(f).to_bits()
}
