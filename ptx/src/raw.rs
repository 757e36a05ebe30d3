//! Raw kernel parameters to slices, shared by the device entry points and the host ones.
//!
//! An entry point receives device addresses and sizes; these turn them into the slices the
//! bodies take. On the host the same entry points exist for the simulator
//! ([`crate::sim::launch_entry`]): a "device address" there is a host address, and each
//! parameter arrives as one 64-bit word ([`FromArg`]).

/// A `u32` size parameter as a `usize` length: entry points multiply sizes in `usize`
/// (64 bits on nvptx64 and the host), so that `t_rows * k` cannot wrap at 2^32.
#[inline(always)]
pub const fn us(x: u32) -> usize {
    x as usize
}

/// `&[T]` of `n` elements at `p` (empty when `n` is 0).
///
/// # Safety
/// `p` must point to `n` readable elements that nothing writes while the slice lives.
#[inline(always)]
pub unsafe fn sl<'a, T>(p: *const T, n: usize) -> &'a [T] {
    if n == 0 {
        &[]
    } else {
        core::slice::from_raw_parts(p, n)
    }
}

/// `&mut [T]` of `n` elements at `p`.
///
/// # Safety
/// `p` must point to `n` writable elements that nothing else accesses while the slice lives.
#[inline(always)]
pub unsafe fn sl_mut<'a, T>(p: *mut T, n: usize) -> &'a mut [T] {
    if n == 0 {
        &mut []
    } else {
        core::slice::from_raw_parts_mut(p, n)
    }
}

/// `None` for a null pointer.
///
/// # Safety
/// As [`sl`] when `p` is not null.
#[inline(always)]
pub unsafe fn opt<'a, T>(p: *const T, n: usize) -> Option<&'a [T]> {
    if p.is_null() {
        None
    } else {
        Some(sl(p, n))
    }
}

/// `None` for a null pointer.
///
/// # Safety
/// As [`sl_mut`] when `p` is not null.
#[inline(always)]
pub unsafe fn opt_mut<'a, T>(p: *mut T, n: usize) -> Option<&'a mut [T]> {
    if p.is_null() {
        None
    } else {
        Some(sl_mut(p, n))
    }
}

/// A kernel parameter decoded from the 64-bit word the host packs it into: `u32` and `f32` in
/// the low 32 bits (`f32` as its bits), `u64`, `f64` (bits) and pointers (addresses) whole.
pub trait FromArg {
    fn from_arg(w: u64) -> Self;
}

impl FromArg for u32 {
    #[inline(always)]
    fn from_arg(w: u64) -> u32 {
        w as u32
    }
}

impl FromArg for u64 {
    #[inline(always)]
    fn from_arg(w: u64) -> u64 {
        w
    }
}

impl FromArg for f32 {
    #[inline(always)]
    fn from_arg(w: u64) -> f32 {
        f32::from_bits(w as u32)
    }
}

impl FromArg for f64 {
    #[inline(always)]
    fn from_arg(w: u64) -> f64 {
        f64::from_bits(w)
    }
}

impl<T> FromArg for *const T {
    #[inline(always)]
    fn from_arg(w: u64) -> *const T {
        w as usize as *const T
    }
}

impl<T> FromArg for *mut T {
    #[inline(always)]
    fn from_arg(w: u64) -> *mut T {
        w as usize as *mut T
    }
}
