//! Storage types of the kernels: f32, and bf16 for the tensor-core GEMM.
//! Compute is always f32.

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

/// A bfloat16 stored as its bits (the upper half of an f32): the storage type of the
/// tensor-core GEMM's operands.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
#[repr(transparent)]
pub struct Bf16(pub u16);

impl Bf16 {
    /// Round to nearest even (NaN stays a quiet NaN).
    #[inline(always)]
    pub fn from_f32(x: f32) -> Bf16 {
        let b = x.to_bits();
        if x.is_nan() {
            return Bf16(((b >> 16) | 0x40) as u16);
        }
        let round = 0x7fff + ((b >> 16) & 1);
        Bf16((b.wrapping_add(round) >> 16) as u16)
    }
    /// Exact.
    #[inline(always)]
    pub fn to_f32(self) -> f32 {
        f32::from_bits((self.0 as u32) << 16)
    }
}

impl Elem for Bf16 {
    #[inline(always)]
    fn ld(self) -> f32 {
        self.to_f32()
    }
    #[inline(always)]
    fn st(x: f32) -> Bf16 {
        Bf16::from_f32(x)
    }
}

/// IEEE binary16 bits to f32 (exact; subnormals, infinities and NaN included).
pub fn f16_bits_to_f32(h: u16) -> f32 {
    let sign = ((h as u32) & 0x8000) << 16;
    let exp = ((h >> 10) & 0x1f) as u32;
    let man = (h & 0x3ff) as u32;
    let mag = match exp {
        0 => (man as f32) * (1.0 / 16_777_216.0), // man 2^-24, exact
        31 => f32::from_bits(0x7f80_0000 | (man << 13)),
        _ => f32::from_bits(((exp + 112) << 23) | (man << 13)),
    };
    f32::from_bits(mag.to_bits() | sign)
}
