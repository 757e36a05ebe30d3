//! Linear layers on stored weights: symmetric per-output-channel int8 (`w ~ s_o q_o`,
//! `|q| <= 127`) with int8 activations and i32 accumulation, or f16 / f32 weights in f32.
//!
//! int8 arithmetic: with `x ~ s_x q_x` and `w_o ~ s_o q_o`, `y_o = s_x s_o Σ q_x q_o + b_o`.
//! Each product is at most 127^2 < 2^14, so an i32 accumulator is exact for inputs up to
//! 2^17 long (checked: [`MAX_INT8_INPUT`]).
use super::format::{Dtype, Linear};
use half::f16;

/// Largest quantized magnitude; symmetric, so -128 is never used and negation is exact.
pub const ACT_QMAX: i32 = 127;
/// Longest input row whose i32 dot product cannot overflow (`len * 127^2 < 2^31`).
pub const MAX_INT8_INPUT: usize = (i32::MAX / (127 * 127)) as usize;

/// Round half away from zero (no libm call; what `f32::round` does).
#[inline(always)]
fn round(x: f32) -> f32 {
    if x >= 0.0 {
        libm::floorf(x + 0.5)
    } else {
        -libm::floorf(-x + 0.5)
    }
}

/// Quantizes one weight row to `q` with scale `max|w| / 127` (1 for an all-zero row), which it
/// returns: `w_i ~ scale q_i`, error at most `scale / 2` per entry.
pub fn quantize_weights_row(q: &mut [i8], w: &[f32]) -> f32 {
    let amax = w.iter().fold(0.0f32, |m, &x| m.max(x.abs()));
    let scale = if amax > 0.0 && amax.is_finite() {
        amax / ACT_QMAX as f32
    } else {
        1.0
    };
    quantize_with_scale(q, w, scale);
    scale
}

/// `q_i = clamp(round(x_i / scale), -127, 127)`: values beyond the calibrated range saturate.
pub fn quantize_with_scale(q: &mut [i8], x: &[f32], scale: f32) {
    let inv = 1.0 / scale;
    let m = ACT_QMAX as f32;
    for (qi, &xi) in q.iter_mut().zip(x) {
        *qi = round(xi * inv).clamp(-m, m) as i8;
    }
}

/// The scale for an activation row: the calibrated one if set, else the row's own max / 127.
pub fn activation_scale(x: &[f32], calibrated: f32) -> f32 {
    if calibrated > 0.0 {
        return calibrated;
    }
    let amax = x.iter().fold(0.0f32, |m, &v| m.max(v.abs()));
    if amax > 0.0 && amax.is_finite() {
        amax / ACT_QMAX as f32
    } else {
        1.0
    }
}

/// `Σ a_i b_i` in i32 (the int8 inner loop; `b` holds i8 bit patterns). On Arm cores with the
/// DSP extension (Cortex-M4/M7) four products go through two dual 16-bit multiply-adds; the sum
/// is the same integer either way.
#[inline]
pub fn dot_i8(a: &[i8], b: &[u8]) -> i32 {
    #[cfg(all(target_arch = "arm", target_feature = "dsp"))]
    {
        dsp::dot_i8(a, b)
    }
    #[cfg(not(all(target_arch = "arm", target_feature = "dsp")))]
    {
        dot_i8_portable(a, b)
    }
}

/// The plain loop (every target; the reference the DSP path is checked against).
#[inline]
pub fn dot_i8_portable(a: &[i8], b: &[u8]) -> i32 {
    let mut acc = 0i32;
    for (&x, &w) in a.iter().zip(b) {
        acc += x as i32 * (w as i8) as i32;
    }
    acc
}

#[cfg(all(target_arch = "arm", target_feature = "dsp"))]
mod dsp {
    use core::arch::asm;

    /// Bytes 0 and 2 of `x`, sign-extended to two i16 halves.
    #[inline(always)]
    fn sxtb16(x: u32) -> u32 {
        let r;
        // SAFETY: a register-only DSP instruction.
        unsafe {
            asm!("sxtb16 {r}, {x}", r = lateout(reg) r, x = in(reg) x, options(pure, nomem, nostack))
        };
        r
    }

    /// Bytes 1 and 3 of `x`, sign-extended to two i16 halves.
    #[inline(always)]
    fn sxtb16_ror8(x: u32) -> u32 {
        let r;
        // SAFETY: as above.
        unsafe {
            asm!("sxtb16 {r}, {x}, ror #8", r = lateout(reg) r, x = in(reg) x, options(pure, nomem, nostack))
        };
        r
    }

    /// `acc + a.lo * b.lo + a.hi * b.hi` on i16 halves.
    #[inline(always)]
    fn smlad(a: u32, b: u32, acc: i32) -> i32 {
        let r;
        // SAFETY: as above.
        unsafe {
            asm!("smlad {r}, {a}, {b}, {c}", r = lateout(reg) r, a = in(reg) a, b = in(reg) b,
                 c = in(reg) acc, options(pure, nomem, nostack))
        };
        r
    }

    pub fn dot_i8(a: &[i8], b: &[u8]) -> i32 {
        let n = a.len().min(b.len());
        let (a, b) = (&a[..n], &b[..n]);
        let (ca, cb) = (a.chunks_exact(4), b.chunks_exact(4));
        let (ra, rb) = (ca.remainder(), cb.remainder());
        let mut acc = 0i32;
        for (x, y) in ca.zip(cb) {
            let xa = u32::from_le_bytes([x[0] as u8, x[1] as u8, x[2] as u8, x[3] as u8]);
            let yb = u32::from_le_bytes([y[0], y[1], y[2], y[3]]);
            acc = smlad(sxtb16(xa), sxtb16(yb), acc);
            acc = smlad(sxtb16_ror8(xa), sxtb16_ror8(yb), acc);
        }
        acc + super::dot_i8_portable(ra, rb)
    }
}

/// `y[o] = w_scale[o] (w[o] . x) + bias[o]` for one input row `x[inp]` into `y[out]`.
/// `q` (at least `inp` long) receives the quantized row for int8 weights.
pub fn linear_row(y: &mut [f32], x: &[f32], lin: &Linear<'_>, q: &mut [i8]) {
    let (out, inp) = (lin.out, lin.inp);
    debug_assert!(y.len() >= out && x.len() >= inp);
    match lin.dtype {
        Dtype::I8 => {
            let q = &mut q[..inp];
            let sx = activation_scale(&x[..inp], lin.act_scale);
            quantize_with_scale(q, &x[..inp], sx);
            for (o, yo) in y[..out].iter_mut().enumerate() {
                let acc = dot_i8(q, &lin.w[o * inp..(o + 1) * inp]);
                *yo = acc as f32 * (sx * lin.w_scale.get(o)) + lin.bias.get(o);
            }
        }
        Dtype::F16 => {
            for (o, yo) in y[..out].iter_mut().enumerate() {
                let w = &lin.w[2 * o * inp..2 * (o + 1) * inp];
                let mut acc = 0.0f32;
                for (c, &xi) in w.chunks_exact(2).zip(&x[..inp]) {
                    acc += f16::from_le_bytes([c[0], c[1]]).to_f32() * xi;
                }
                *yo = acc * lin.w_scale.get(o) + lin.bias.get(o);
            }
        }
        Dtype::F32 => {
            for (o, yo) in y[..out].iter_mut().enumerate() {
                let w = &lin.w[4 * o * inp..4 * (o + 1) * inp];
                let mut acc = 0.0f32;
                for (c, &xi) in w.chunks_exact(4).zip(&x[..inp]) {
                    acc += f32::from_le_bytes([c[0], c[1], c[2], c[3]]) * xi;
                }
                *yo = acc * lin.w_scale.get(o) + lin.bias.get(o);
            }
        }
    }
}

/// The weight `w[o, i]` as stored, dequantized (for tests and reports).
pub fn weight(lin: &Linear<'_>, o: usize, i: usize) -> f32 {
    let k = o * lin.inp + i;
    let s = lin.w_scale.get(o);
    match lin.dtype {
        Dtype::I8 => (lin.w[k] as i8) as f32 * s,
        Dtype::F16 => f16::from_le_bytes([lin.w[2 * k], lin.w[2 * k + 1]]).to_f32() * s,
        Dtype::F32 => {
            let b = &lin.w[4 * k..4 * k + 4];
            f32::from_le_bytes([b[0], b[1], b[2], b[3]]) * s
        }
    }
}
