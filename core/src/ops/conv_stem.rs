//! The convolutional stem's 3 x 3 convolutions (padding 1, stride 1 or 2), written as
//! im2col + linear like the patch embedding, on pixel-major (`[B, H W, C]`, "HWC") maps.
//!
//! A row of the im2col matrix holds one output pixel's inputs in the order `[c][ki][kj]`, the
//! order of a Conv2d weight `[C_out, C_in, 3, 3]` flattened, so a PyTorch
//! `nn.Conv2d(C_in, C_out, 3, stride, padding=1)` weight maps 1:1 onto the linear weight
//! `[C_out, C_in 9]` used here. Output pixels are row-major over the `(S / stride)^2` grid.
//! The stem's last map is `[B, N, D]` with `N` the token grid: exactly the 1 x 1 patch
//! embedding's input rows.
use crate::Real;

/// `dst[b, p, c] = src[b, c, p]` for images `[B, C, HW]` (CHW) into HWC `[B, HW, C]`.
pub fn chw_to_hwc<T: Copy>(dst: &mut [T], src: &[T], b: usize, c: usize, hw: usize) {
    debug_assert!(dst.len() >= b * c * hw && src.len() >= b * c * hw);
    for bi in 0..b {
        let s = &src[bi * c * hw..(bi + 1) * c * hw];
        let d = &mut dst[bi * c * hw..(bi + 1) * c * hw];
        for ci in 0..c {
            for p in 0..hw {
                d[p * c + ci] = s[ci * hw + p];
            }
        }
    }
}

/// Side of a 3 x 3, padding 1 convolution's output on a `side` input.
pub const fn conv3x3_out_side(side: usize, stride: usize) -> usize {
    (side + 2 - 3) / stride + 1
}

/// `cols[b, oy So + ox, (c 3 + ki) 3 + kj] = x[b, (iy S + ix), c]` with `iy = stride oy + ki - 1`,
/// `ix = stride ox + kj - 1`, and 0 where `(iy, ix)` falls outside the `S x S` map (padding 1).
/// `x` is HWC `[B, S S, C]`; `cols` (`[B, So So, C 9]`) is overwritten.
pub fn im2col3x3<T: Real>(cols: &mut [T], x: &[T], b: usize, c: usize, side: usize, stride: usize) {
    let so = conv3x3_out_side(side, stride);
    let k = c * 9;
    debug_assert!(cols.len() >= b * so * so * k && x.len() >= b * side * side * c);
    for bi in 0..b {
        for oy in 0..so {
            for ox in 0..so {
                let row = &mut cols[((bi * so + oy) * so + ox) * k..][..k];
                for ki in 0..3 {
                    let iy = (stride * oy + ki) as isize - 1;
                    for kj in 0..3 {
                        let ix = (stride * ox + kj) as isize - 1;
                        let inside =
                            iy >= 0 && ix >= 0 && (iy as usize) < side && (ix as usize) < side;
                        let src =
                            ((bi * side + iy.max(0) as usize) * side + ix.max(0) as usize) * c;
                        for ci in 0..c {
                            row[(ci * 3 + ki) * 3 + kj] =
                                if inside { x[src + ci] } else { T::ZERO };
                        }
                    }
                }
            }
        }
    }
}

/// Adjoint of [`im2col3x3`]: `dx[b, (iy S + ix), c] += dcols[...]` over every output pixel
/// whose window holds `(iy, ix)` (padding positions are dropped). `dx` is OVERWRITTEN (it is
/// an activation gradient); entries are summed in row order.
pub fn col2im3x3<T: Real>(
    dx: &mut [T],
    dcols: &[T],
    b: usize,
    c: usize,
    side: usize,
    stride: usize,
) {
    let so = conv3x3_out_side(side, stride);
    let k = c * 9;
    debug_assert!(dcols.len() >= b * so * so * k && dx.len() >= b * side * side * c);
    dx[..b * side * side * c].fill(T::ZERO);
    for bi in 0..b {
        for oy in 0..so {
            for ox in 0..so {
                let row = &dcols[((bi * so + oy) * so + ox) * k..][..k];
                for ki in 0..3 {
                    let iy = (stride * oy + ki) as isize - 1;
                    for kj in 0..3 {
                        let ix = (stride * ox + kj) as isize - 1;
                        if iy < 0 || ix < 0 || iy as usize >= side || ix as usize >= side {
                            continue;
                        }
                        let dst = ((bi * side + iy as usize) * side + ix as usize) * c;
                        for ci in 0..c {
                            dx[dst + ci] += row[(ci * 3 + ki) * 3 + kj];
                        }
                    }
                }
            }
        }
    }
}
