//! DINO multi-crop augmentation (spec: "Training recipe", multi-crop bullet), on f32 pixels in [0, 1].
//!
//! Per crop, in torchvision's DINO order: RandomResizedCrop (bilinear, straight to the output size) ->
//! horizontal flip -> colour jitter (random op order) -> grayscale -> Gaussian blur -> solarize (global
//! crop 2 only) -> normalise to CHW. Pixels stay f32 between ops (torchvision on PIL rounds to u8
//! after each op; the difference is below one grey level).
//!
//! Blur for small images: DINO draws sigma in U(0.1, 2.0) pixels of a 224 px global crop.
//! [`CropConfig::for_image_size`] scales that range by `image_size / 224` (so a 32 px run draws sigma
//! in U(0.014, 0.29) px): the blur then removes the same fraction of the image's detail as in DINO.
//! Blurring a 32 px crop by 2 px would erase most of its content. The range is a plain field, so a
//! caller who wants more blur sets it. Sigmas below 0.2 px are skipped (the kernel's outer taps would
//! weigh under 4e-6), which at 32 px is most draws.
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::{derive_seed, DataError, Image};

pub const IMAGENET_MEAN: [f32; 3] = [0.485, 0.456, 0.406];
pub const IMAGENET_STD: [f32; 3] = [0.229, 0.224, 0.225];

/// ITU-R 601 luma weights, as torchvision's `rgb_to_grayscale`.
const LUMA: [f32; 3] = [0.299, 0.587, 0.114];

/// torchvision `ColorJitter` strengths, applied with probability `p`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ColorJitter {
    pub brightness: f32,
    pub contrast: f32,
    pub saturation: f32,
    pub hue: f32,
    pub p: f32,
}

/// The multi-crop recipe. Global crop 0 and 1 differ in blur and solarize probabilities; extra global
/// crops (n_global > 2) use crop 1's.
#[derive(Clone, Debug, PartialEq)]
pub struct CropConfig {
    pub n_global: usize,
    pub global_size: usize,
    pub local_size: usize,
    pub n_local: usize,
    /// RandomResizedCrop area fractions.
    pub global_scale: (f32, f32),
    pub local_scale: (f32, f32),
    /// RandomResizedCrop aspect ratio range (w / h), sampled log-uniformly.
    pub ratio: (f32, f32),
    pub flip_p: f32,
    pub jitter: ColorJitter,
    pub grayscale_p: f32,
    /// Gaussian blur sigma range in output pixels (see the module note on small images).
    pub blur_sigma: (f32, f32),
    pub blur_p_global: [f32; 2],
    pub blur_p_local: f32,
    pub solarize_p_global: [f32; 2],
    /// Pixels at or above this 8-bit level are inverted.
    pub solarize_threshold: u8,
    pub mean: [f32; 3],
    pub std: [f32; 3],
}

impl Default for CropConfig {
    /// DINO's ImageNet recipe: 2 x 224 px global crops, 8 x 96 px local crops.
    fn default() -> Self {
        CropConfig::for_image_size(224, 8)
    }
}

impl CropConfig {
    /// The DINO recipe scaled to images of side `img`: global crops keep the image size, local crops are
    /// `img * 96 / 224` rounded up to a multiple of 8 (16 from 128 px up) so common patch sizes divide
    /// them (32 -> 16, 64 -> 32, 96 -> 48, 224 -> 96); blur sigma scales by `img / 224`.
    pub fn for_image_size(img: usize, n_local: usize) -> Self {
        let img = img.max(1);
        let step = if img >= 128 { 16 } else { 8 };
        let local = (img * 96).div_ceil(224).div_ceil(step) * step;
        let s = img as f32 / 224.0;
        CropConfig {
            n_global: 2,
            global_size: img,
            local_size: local.min(img),
            n_local,
            global_scale: (0.4, 1.0),
            local_scale: (0.05, 0.4),
            ratio: (3.0 / 4.0, 4.0 / 3.0),
            flip_p: 0.5,
            jitter: ColorJitter {
                brightness: 0.4,
                contrast: 0.4,
                saturation: 0.2,
                hue: 0.1,
                p: 0.8,
            },
            grayscale_p: 0.2,
            blur_sigma: (0.1 * s, 2.0 * s),
            blur_p_global: [1.0, 0.1],
            blur_p_local: 0.5,
            solarize_p_global: [0.0, 0.2],
            solarize_threshold: 128,
            mean: IMAGENET_MEAN,
            std: IMAGENET_STD,
        }
    }

    /// iBOT's variant: global crops from scale (0.25, 1).
    pub fn ibot(img: usize, n_local: usize) -> Self {
        CropConfig {
            global_scale: (0.25, 1.0),
            ..CropConfig::for_image_size(img, n_local)
        }
    }

    /// Floats in one global crop (3 x G x G).
    pub fn global_len(&self) -> usize {
        3 * self.global_size * self.global_size
    }

    /// Floats in one local crop (3 x L x L).
    pub fn local_len(&self) -> usize {
        3 * self.local_size * self.local_size
    }

    /// Rejects settings that would make the crops meaningless.
    pub fn validate(&self) -> Result<(), DataError> {
        let bad = |m: String| Err(DataError::Config(m));
        if self.n_global == 0 || self.global_size == 0 {
            return bad("need at least one global crop of positive size".into());
        }
        if self.n_local > 0 && self.local_size == 0 {
            return bad("local crops need a positive size".into());
        }
        for (name, (lo, hi)) in [
            ("global_scale", self.global_scale),
            ("local_scale", self.local_scale),
        ] {
            if !(lo > 0.0 && lo <= hi && hi <= 1.0) {
                return bad(format!(
                    "{name} = ({lo}, {hi}) must satisfy 0 < lo <= hi <= 1"
                ));
            }
        }
        let (r0, r1) = self.ratio;
        if !(r0 > 0.0 && r0 <= r1 && r1.is_finite()) {
            return bad(format!("ratio = ({r0}, {r1}) must satisfy 0 < lo <= hi"));
        }
        let (s0, s1) = self.blur_sigma;
        if !(s0 >= 0.0 && s0 <= s1 && s1.is_finite()) {
            return bad(format!(
                "blur_sigma = ({s0}, {s1}) must satisfy 0 <= lo <= hi"
            ));
        }
        let j = &self.jitter;
        if !(j.brightness >= 0.0
            && j.contrast >= 0.0
            && j.saturation >= 0.0
            && (0.0..=0.5).contains(&j.hue))
        {
            return bad(format!(
                "colour jitter {j:?}: strengths must be >= 0, hue <= 0.5"
            ));
        }
        if self.std.iter().any(|&s| s.is_nan() || s <= 0.0) {
            return bad(format!("std {:?} must be positive", self.std));
        }
        Ok(())
    }
}

/// Which crop of the multi-crop set.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CropKind {
    /// Global crop number k (0-based).
    Global(usize),
    Local,
}

/// An RGB image in f32, planar CHW (plane c at `c * width * height`), values in [0, 1]. Planar so
/// that every op below is a straight loop over contiguous floats, which the compiler vectorises.
#[derive(Clone, Debug, PartialEq)]
pub struct FloatImage {
    pub width: usize,
    pub height: usize,
    pub data: Vec<f32>,
}

impl FloatImage {
    pub fn from_image(img: &Image) -> Self {
        let n = img.width * img.height;
        let mut data = vec![0.0; 3 * n];
        for (i, p) in img.rgb.chunks_exact(3).take(n).enumerate() {
            for c in 0..3 {
                data[c * n + i] = p[c] as f32 / 255.0;
            }
        }
        FloatImage {
            width: img.width,
            height: img.height,
            data,
        }
    }

    /// The R, G and B planes.
    pub fn planes_mut(&mut self) -> (&mut [f32], &mut [f32], &mut [f32]) {
        let n = self.width * self.height;
        let (r, rest) = self.data.split_at_mut(n);
        let (g, b) = rest.split_at_mut(n);
        (r, g, &mut b[..n])
    }
}

/// A pixel rectangle of the source image.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CropBox {
    pub left: usize,
    pub top: usize,
    pub width: usize,
    pub height: usize,
}

fn uniform(rng: &mut ChaCha8Rng, lo: f32, hi: f32) -> f32 {
    lo + (hi - lo) * rng.gen::<f32>()
}

/// torchvision's `RandomResizedCrop.get_params`: up to 10 tries of (area fraction U(scale),
/// log-uniform aspect ratio) that fit; otherwise the largest centred box with the ratio clamped.
pub fn random_resized_crop_box(
    width: usize,
    height: usize,
    scale: (f32, f32),
    ratio: (f32, f32),
    rng: &mut ChaCha8Rng,
) -> CropBox {
    let area = (width * height) as f32;
    let (lr0, lr1) = (ratio.0.ln(), ratio.1.ln());
    for _ in 0..10 {
        let target = area * uniform(rng, scale.0, scale.1);
        let aspect = uniform(rng, lr0, lr1).exp();
        let w = (target * aspect).sqrt().round() as usize;
        let h = (target / aspect).sqrt().round() as usize;
        if 0 < w && w <= width && 0 < h && h <= height {
            let top = rng.gen_range(0..=height - h);
            let left = rng.gen_range(0..=width - w);
            return CropBox {
                left,
                top,
                width: w,
                height: h,
            };
        }
    }
    let in_ratio = width as f32 / height.max(1) as f32;
    let (w, h) = if in_ratio < ratio.0 {
        (
            width,
            ((width as f32 / ratio.0).round() as usize).min(height),
        )
    } else if in_ratio > ratio.1 {
        (
            ((height as f32 * ratio.1).round() as usize).min(width),
            height,
        )
    } else {
        (width, height)
    };
    CropBox {
        left: (width - w) / 2,
        top: (height - h) / 2,
        width: w,
        height: h,
    }
}

/// Separable filter taps: for output sample o, weights over input indices start[o]..start[o]+len[o].
struct Taps {
    start: Vec<usize>,
    len: Vec<usize>,
    stride: usize,
    w: Vec<f32>,
}

/// Triangle ("bilinear") filter taps mapping `box0 .. box0 + box_len` of an axis of `in_size` samples
/// onto `out` samples. When shrinking, the triangle widens by the shrink factor (PIL's antialiased
/// bilinear), so downscaled crops do not alias; when enlarging it is plain bilinear interpolation
/// with edge clamping.
fn taps(in_size: usize, box0: f32, box_len: f32, out: usize) -> Taps {
    let scale = box_len / out as f32;
    let fscale = scale.max(1.0);
    let stride = (2.0 * fscale).ceil() as usize + 2;
    let mut t = Taps {
        start: Vec::with_capacity(out),
        len: Vec::with_capacity(out),
        stride,
        w: vec![0.0; out * stride],
    };
    for o in 0..out {
        let center = box0 + (o as f32 + 0.5) * scale;
        // Truncation is floor here: the values are clamped to be non-negative first.
        let lo = (center - fscale + 0.5).max(0.0) as usize;
        let hi = ((center + fscale + 0.5).max(0.0) as usize)
            .min(in_size)
            .min(lo + stride);
        let lo = lo.min(hi.saturating_sub(1));
        let ws = &mut t.w[o * stride..(o + 1) * stride];
        let mut sum = 0.0;
        for (k, x) in (lo..hi).enumerate() {
            let v = (1.0 - ((x as f32 + 0.5 - center) / fscale).abs()).max(0.0);
            ws[k] = v;
            sum += v;
        }
        if sum > 0.0 {
            ws.iter_mut().for_each(|v| *v /= sum);
        } else {
            ws[0] = 1.0; // unreachable for sane boxes; nearest sample as a safe answer
        }
        t.start.push(lo);
        t.len.push(hi - lo);
    }
    t
}

/// Resamples box `bx` of `img` to `out_w x out_h` with the triangle filter (see [`taps`]).
pub fn resample(img: &Image, bx: CropBox, out_w: usize, out_h: usize) -> FloatImage {
    let mut out = FloatImage {
        width: out_w,
        height: out_h,
        data: vec![0.0; 3 * out_w * out_h],
    };
    if img.width == 0
        || img.height == 0
        || out_w == 0
        || out_h == 0
        || img.rgb.len() < 3 * img.width * img.height
    {
        return out;
    }
    let bw = bx.width.clamp(1, img.width) as f32;
    let bh = bx.height.clamp(1, img.height) as f32;
    let tx = taps(img.width, bx.left.min(img.width - 1) as f32, bw, out_w);
    let ty = taps(img.height, bx.top.min(img.height - 1) as f32, bh, out_h);
    let row0 = ty.start[0];
    let row1 = (0..out_h)
        .map(|o| ty.start[o] + ty.len[o])
        .max()
        .unwrap_or(row0);
    let rows = row1 - row0;
    // Horizontal pass over the rows the vertical pass needs, into planes tmp[c][row][x].
    let mut tmp = vec![0.0f32; 3 * rows * out_w];
    for r in row0..row1 {
        let src = &img.rgb[3 * r * img.width..3 * (r + 1) * img.width];
        for o in 0..out_w {
            let ws = &tx.w[o * tx.stride..o * tx.stride + tx.len[o]];
            let px = &src[3 * tx.start[o]..3 * (tx.start[o] + tx.len[o])];
            let (mut a, mut b, mut c) = (0.0, 0.0, 0.0);
            for (&w, p) in ws.iter().zip(px.chunks_exact(3)) {
                a += w * p[0] as f32;
                b += w * p[1] as f32;
                c += w * p[2] as f32;
            }
            let at = (r - row0) * out_w + o;
            tmp[at] = a;
            tmp[rows * out_w + at] = b;
            tmp[2 * rows * out_w + at] = c;
        }
    }
    for c in 0..3 {
        let plane = &tmp[c * rows * out_w..(c + 1) * rows * out_w];
        for o in 0..out_h {
            let dst = &mut out.data[(c * out_h + o) * out_w..(c * out_h + o + 1) * out_w];
            let ws = &ty.w[o * ty.stride..o * ty.stride + ty.len[o]];
            for (k, &w) in ws.iter().enumerate() {
                let r = ty.start[o] + k - row0;
                for (d, &v) in dst.iter_mut().zip(&plane[r * out_w..(r + 1) * out_w]) {
                    *d += w * v;
                }
            }
            dst.iter_mut()
                .for_each(|v| *v = (*v * (1.0 / 255.0)).clamp(0.0, 1.0));
        }
    }
    out
}

/// Mirrors left-right.
pub fn hflip(img: &mut FloatImage) {
    let w = img.width.max(1);
    img.data.chunks_exact_mut(w).for_each(|row| row.reverse());
}

/// Multiplies by `factor` (torchvision `adjust_brightness`).
pub fn adjust_brightness(img: &mut FloatImage, factor: f32) {
    img.data
        .iter_mut()
        .for_each(|v| *v = (*v * factor).clamp(0.0, 1.0));
}

/// Blends with the mean luma of the whole image (torchvision `adjust_contrast`).
pub fn adjust_contrast(img: &mut FloatImage, factor: f32) {
    let n = img.width * img.height;
    if n == 0 {
        return;
    }
    let (r, g, b) = img.planes_mut();
    let sum = |p: &[f32]| p.iter().sum::<f32>();
    let mean = (LUMA[0] * sum(r) + LUMA[1] * sum(g) + LUMA[2] * sum(b)) / n as f32;
    let off = (1.0 - factor) * mean;
    img.data
        .iter_mut()
        .for_each(|v| *v = (factor * *v + off).clamp(0.0, 1.0));
}

/// Blends each pixel with its own luma (torchvision `adjust_saturation`).
pub fn adjust_saturation(img: &mut FloatImage, factor: f32) {
    let (r, g, b) = img.planes_mut();
    let keep = 1.0 - factor;
    for ((r, g), b) in r.iter_mut().zip(g.iter_mut()).zip(b.iter_mut()) {
        let off = keep * (LUMA[0] * *r + LUMA[1] * *g + LUMA[2] * *b);
        *r = (factor * *r + off).clamp(0.0, 1.0);
        *g = (factor * *g + off).clamp(0.0, 1.0);
        *b = (factor * *b + off).clamp(0.0, 1.0);
    }
}

/// Rotates hue by `shift` turns (torchvision `adjust_hue`: RGB -> HSV, h += shift mod 1, -> RGB).
/// Written on (max, min, delta) directly (HSV's v = max and v (1 - s) = min) with selects instead of
/// branches, so the loop has no data-dependent jumps.
pub fn adjust_hue(img: &mut FloatImage, shift: f32) {
    let turn = 6.0 * (shift - shift.round()); // in [-3, 3]
    let (rp, gp, bp) = img.planes_mut();
    for ((rv, gv), bv) in rp.iter_mut().zip(gp.iter_mut()).zip(bp.iter_mut()) {
        let (r, g, b) = (*rv, *gv, *bv);
        let max = r.max(g).max(b);
        let min = r.min(g).min(b);
        let delta = max - min;
        // Grey pixels (delta 0) come out unchanged: every channel is max - 0.
        let inv = if delta > 0.0 { 1.0 / delta } else { 0.0 };
        // Hue in sextants, in [-1, 5).
        let h = if max == r {
            (g - b) * inv
        } else if max == g {
            2.0 + (b - r) * inv
        } else {
            4.0 + (r - g) * inv
        };
        let mut h = h + turn; // in [-4, 8)
        h += if h < 0.0 { 6.0 } else { 0.0 };
        h -= if h >= 6.0 { 6.0 } else { 0.0 };
        // HSV -> RGB: channel_n = max - delta * clamp(min(k, 4 - k), 0, 1), k = (n + h) mod 6,
        // n = 5, 3, 1 for r, g, b.
        let chan = |n: f32| {
            let k = n + h;
            let k = k - if k >= 6.0 { 6.0 } else { 0.0 };
            max - delta * k.min(4.0 - k).clamp(0.0, 1.0)
        };
        *rv = chan(5.0);
        *gv = chan(3.0);
        *bv = chan(1.0);
    }
}

/// Replaces every channel by the luma (RandomGrayscale keeps 3 channels).
pub fn grayscale(img: &mut FloatImage) {
    let (r, g, b) = img.planes_mut();
    for ((r, g), b) in r.iter_mut().zip(g.iter_mut()).zip(b.iter_mut()) {
        let y = LUMA[0] * *r + LUMA[1] * *g + LUMA[2] * *b;
        (*r, *g, *b) = (y, y, y);
    }
}

/// Inverts values at or above `threshold` (8-bit level), as PIL's `ImageOps.solarize`.
pub fn solarize(img: &mut FloatImage, threshold: u8) {
    let t = threshold as f32 / 255.0 - 0.5 / 255.0;
    img.data
        .iter_mut()
        .for_each(|v| *v = if *v >= t { 1.0 - *v } else { *v });
}

/// Below this sigma the outer taps of the kernel weigh under 4e-6: the blur is skipped.
const MIN_SIGMA: f32 = 0.2;

/// Separable Gaussian blur with standard deviation `sigma` pixels, kernel radius ceil(3 sigma), edges
/// clamped. Sigmas below 0.2 (outer tap weight < 4e-6) leave the image as it is.
pub fn gaussian_blur(img: &mut FloatImage, sigma: f32) {
    let (w, h) = (img.width, img.height);
    if sigma.is_nan() || sigma < MIN_SIGMA || w == 0 || h == 0 {
        return;
    }
    let r = (3.0 * sigma).ceil() as usize;
    let k: Vec<f32> = (0..=2 * r)
        .map(|i| {
            let d = i as f32 - r as f32;
            (-d * d / (2.0 * sigma * sigma)).exp()
        })
        .collect();
    let sum: f32 = k.iter().sum();
    let k: Vec<f32> = k.iter().map(|v| v / sum).collect();
    let clamp = |i: usize, n: usize| i.saturating_sub(r).min(n - 1);
    let mut padded = vec![0.0f32; w + 2 * r];
    let mut plane_tmp = vec![0.0f32; w * h];
    for plane in img.data.chunks_exact_mut(w * h) {
        // Rows: pad with clamped edge samples, then convolve.
        for (row, out) in plane.chunks_exact(w).zip(plane_tmp.chunks_exact_mut(w)) {
            for (i, p) in padded.iter_mut().enumerate() {
                *p = row[clamp(i, w)];
            }
            out.fill(0.0);
            for (t, &kv) in k.iter().enumerate() {
                for (o, &v) in out.iter_mut().zip(&padded[t..t + w]) {
                    *o += kv * v;
                }
            }
        }
        // Columns, a whole row at a time.
        for (y, out) in plane.chunks_exact_mut(w).enumerate() {
            out.fill(0.0);
            for (t, &kv) in k.iter().enumerate() {
                let ys = clamp(y + t, h);
                for (o, &v) in out.iter_mut().zip(&plane_tmp[ys * w..(ys + 1) * w]) {
                    *o += kv * v;
                }
            }
        }
    }
}

/// torchvision `ColorJitter` with probability `p`: factors brightness/contrast/saturation from
/// U(1 - s, 1 + s) (floored at 0), hue shift from U(-h, h), the four ops in a random order.
pub fn color_jitter(img: &mut FloatImage, cj: &ColorJitter, rng: &mut ChaCha8Rng) {
    if rng.gen::<f32>() >= cj.p {
        return;
    }
    let mut order = [0usize, 1, 2, 3];
    for i in (1..4).rev() {
        order.swap(i, rng.gen_range(0..=i));
    }
    let factor = |rng: &mut ChaCha8Rng, s: f32| uniform(rng, (1.0 - s).max(0.0), 1.0 + s);
    let b = factor(rng, cj.brightness);
    let c = factor(rng, cj.contrast);
    let s = factor(rng, cj.saturation);
    let h = uniform(rng, -cj.hue, cj.hue);
    for op in order {
        match op {
            0 if cj.brightness > 0.0 => adjust_brightness(img, b),
            1 if cj.contrast > 0.0 => adjust_contrast(img, c),
            2 if cj.saturation > 0.0 => adjust_saturation(img, s),
            3 if cj.hue > 0.0 => adjust_hue(img, h),
            _ => {}
        }
    }
}

/// `(v - mean) / std` per channel, into `out` (3 x H x W floats, CHW like the image).
pub fn normalize_chw(img: &FloatImage, mean: [f32; 3], std: [f32; 3], out: &mut [f32]) {
    let n = img.width * img.height;
    for c in 0..3 {
        let inv = 1.0 / std[c];
        for (o, &v) in out[c * n..(c + 1) * n]
            .iter_mut()
            .zip(&img.data[c * n..(c + 1) * n])
        {
            *o = (v - mean[c]) * inv;
        }
    }
}

/// One augmented crop of `img`, written normalised CHW into `out` (3 x S x S, S the kind's size).
pub fn augment_crop(
    img: &Image,
    cfg: &CropConfig,
    kind: CropKind,
    rng: &mut ChaCha8Rng,
    out: &mut [f32],
) {
    let (size, scale) = match kind {
        CropKind::Global(_) => (cfg.global_size, cfg.global_scale),
        CropKind::Local => (cfg.local_size, cfg.local_scale),
    };
    let bx = random_resized_crop_box(img.width, img.height, scale, cfg.ratio, rng);
    let mut f = resample(img, bx, size, size);
    if rng.gen::<f32>() < cfg.flip_p {
        hflip(&mut f);
    }
    color_jitter(&mut f, &cfg.jitter, rng);
    if rng.gen::<f32>() < cfg.grayscale_p {
        grayscale(&mut f);
    }
    let (blur_p, solarize_p) = match kind {
        CropKind::Global(k) => {
            let k = k.min(1);
            (cfg.blur_p_global[k], cfg.solarize_p_global[k])
        }
        CropKind::Local => (cfg.blur_p_local, 0.0),
    };
    if rng.gen::<f32>() < blur_p {
        let sigma = uniform(rng, cfg.blur_sigma.0, cfg.blur_sigma.1);
        gaussian_blur(&mut f, sigma);
    }
    if rng.gen::<f32>() < solarize_p {
        solarize(&mut f, cfg.solarize_threshold);
    }
    normalize_chw(&f, cfg.mean, cfg.std, out);
}

/// The full crop set of one sample: `global` is [n_global][3][G][G], `local` [n_local][3][L][L].
/// Crop c draws from its own stream seeded by (seed, c), so changing `n_local` leaves the global
/// crops unchanged.
pub fn multi_crop(img: &Image, cfg: &CropConfig, seed: u64) -> (Vec<f32>, Vec<f32>) {
    let (gl, ll) = (cfg.global_len(), cfg.local_len());
    let mut global = vec![0.0; cfg.n_global * gl];
    let mut local = vec![0.0; cfg.n_local * ll];
    let mut outs: Vec<&mut [f32]> = Vec::with_capacity(cfg.n_global + cfg.n_local);
    if gl > 0 {
        outs.extend(global.chunks_exact_mut(gl));
    }
    if ll > 0 {
        outs.extend(local.chunks_exact_mut(ll));
    }
    multi_crop_into(img, cfg, seed, &mut outs);
    (global, local)
}

/// [`multi_crop`] writing into caller-provided crops: `outs` holds the global crops then the local
/// ones (the loader passes slices of its batch buffers, avoiding a copy).
pub fn multi_crop_into(img: &Image, cfg: &CropConfig, seed: u64, outs: &mut [&mut [f32]]) {
    for (k, out) in outs.iter_mut().enumerate() {
        let kind = if k < cfg.n_global {
            CropKind::Global(k)
        } else {
            CropKind::Local
        };
        let mut rng = ChaCha8Rng::seed_from_u64(derive_seed(&[seed, k as u64]));
        augment_crop(img, cfg, kind, &mut rng, out);
    }
}

/// Evaluation transform: the whole image resized to `size x size` (triangle filter), normalised with
/// the ImageNet mean/std, CHW.
pub fn eval_transform(img: &Image, size: usize) -> Vec<f32> {
    let full = CropBox {
        left: 0,
        top: 0,
        width: img.width,
        height: img.height,
    };
    let f = resample(img, full, size, size);
    let mut out = vec![0.0; 3 * size * size];
    normalize_chw(&f, IMAGENET_MEAN, IMAGENET_STD, &mut out);
    out
}
