//! Storage types of the kernels: f32 today (a later mixed-precision path adds its type here).
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
