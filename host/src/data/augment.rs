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
//! caller who wants more blur sets it.
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
        if self.std.iter().any(|&s| !(s > 0.0)) {
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

/// An RGB image in f32, interleaved HWC, values in [0, 1].
#[derive(Clone, Debug, PartialEq)]
pub struct FloatImage {
    pub width: usize,
    pub height: usize,
    pub data: Vec<f32>,
}

impl FloatImage {
    pub fn from_image(img: &Image) -> Self {
        FloatImage {
            width: img.width,
            height: img.height,
            data: img.rgb.iter().map(|&v| v as f32 / 255.0).collect(),
        }
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
        let lo = (center - fscale + 0.5).floor().max(0.0) as usize;
        let hi = ((center + fscale + 0.5).floor().max(0.0) as usize)
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
    // Horizontal pass over the rows the vertical pass needs.
    let mut tmp = vec![0.0f32; (row1 - row0) * out_w * 3];
    for r in row0..row1 {
        let src = &img.rgb[3 * r * img.width..3 * (r + 1) * img.width];
        let dst = &mut tmp[(r - row0) * out_w * 3..(r - row0 + 1) * out_w * 3];
        for o in 0..out_w {
            let ws = &tx.w[o * tx.stride..o * tx.stride + tx.len[o]];
            let (mut a, mut b, mut c) = (0.0, 0.0, 0.0);
            for (k, &w) in ws.iter().enumerate() {
                let p = 3 * (tx.start[o] + k);
                a += w * src[p] as f32;
                b += w * src[p + 1] as f32;
                c += w * src[p + 2] as f32;
            }
            dst[3 * o] = a;
            dst[3 * o + 1] = b;
            dst[3 * o + 2] = c;
        }
    }
    let row_len = out_w * 3;
    for o in 0..out_h {
        let dst = &mut out.data[o * row_len..(o + 1) * row_len];
        let ws = &ty.w[o * ty.stride..o * ty.stride + ty.len[o]];
        for (k, &w) in ws.iter().enumerate() {
            let r = ty.start[o] + k - row0;
            let src = &tmp[r * row_len..(r + 1) * row_len];
            for (d, &s) in dst.iter_mut().zip(src) {
                *d += w * s;
            }
        }
        dst.iter_mut()
            .for_each(|v| *v = (*v / 255.0).clamp(0.0, 1.0));
    }
    out
}

/// Mirrors left-right.
pub fn hflip(img: &mut FloatImage) {
    let w = img.width;
    for row in img.data.chunks_exact_mut(3 * w.max(1)) {
        for x in 0..w / 2 {
            for c in 0..3 {
                row.swap(3 * x + c, 3 * (w - 1 - x) + c);
            }
        }
    }
}

fn luma(p: &[f32]) -> f32 {
    LUMA[0] * p[0] + LUMA[1] * p[1] + LUMA[2] * p[2]
}

/// Multiplies by `factor` (torchvision `adjust_brightness`).
pub fn adjust_brightness(img: &mut FloatImage, factor: f32) {
    img.data
        .iter_mut()
        .for_each(|v| *v = (*v * factor).clamp(0.0, 1.0));
}

/// Blends with the mean luma of the whole image (torchvision `adjust_contrast`).
pub fn adjust_contrast(img: &mut FloatImage, factor: f32) {
    let n = img.data.len() / 3;
    if n == 0 {
        return;
    }
    let mean = img.data.chunks_exact(3).map(luma).sum::<f32>() / n as f32;
    let off = (1.0 - factor) * mean;
    img.data
        .iter_mut()
        .for_each(|v| *v = (factor * *v + off).clamp(0.0, 1.0));
}

/// Blends each pixel with its own luma (torchvision `adjust_saturation`).
pub fn adjust_saturation(img: &mut FloatImage, factor: f32) {
    for p in img.data.chunks_exact_mut(3) {
        let off = (1.0 - factor) * luma(p);
        for v in p.iter_mut() {
            *v = (factor * *v + off).clamp(0.0, 1.0);
        }
    }
}

/// Rotates hue by `shift` turns (torchvision `adjust_hue`: RGB -> HSV, h += shift mod 1, -> RGB).
pub fn adjust_hue(img: &mut FloatImage, shift: f32) {
    for p in img.data.chunks_exact_mut(3) {
        let (r, g, b) = (p[0], p[1], p[2]);
        let max = r.max(g).max(b);
        let min = r.min(g).min(b);
        let delta = max - min;
        if delta <= 0.0 {
            continue; // grey: hue has no effect
        }
        let s = delta / max;
        let h = if max == r {
            (g - b) / delta
        } else if max == g {
            2.0 + (b - r) / delta
        } else {
            4.0 + (r - g) / delta
        };
        let h = (h / 6.0 + shift).rem_euclid(1.0) * 6.0;
        let i = (h.floor() as i32).rem_euclid(6);
        let f = h - h.floor();
        let v = max;
        let (pp, q, t) = (v * (1.0 - s), v * (1.0 - s * f), v * (1.0 - s * (1.0 - f)));
        let rgb = match i {
            0 => [v, t, pp],
            1 => [q, v, pp],
            2 => [pp, v, t],
            3 => [pp, q, v],
            4 => [t, pp, v],
            _ => [v, pp, q],
        };
        p.copy_from_slice(&rgb);
    }
}

/// Replaces every channel by the luma (RandomGrayscale keeps 3 channels).
pub fn grayscale(img: &mut FloatImage) {
    for p in img.data.chunks_exact_mut(3) {
        let y = luma(p);
        p.fill(y);
    }
}

/// Inverts values at or above `threshold` (8-bit level), as PIL's `ImageOps.solarize`.
pub fn solarize(img: &mut FloatImage, threshold: u8) {
    let t = threshold as f32 / 255.0 - 0.5 / 255.0;
    img.data.iter_mut().for_each(|v| {
        if *v >= t {
            *v = 1.0 - *v;
        }
    });
}

/// Separable Gaussian blur with standard deviation `sigma` pixels, kernel radius ceil(3 sigma), edges
/// clamped.
pub fn gaussian_blur(img: &mut FloatImage, sigma: f32) {
    let r = (3.0 * sigma).ceil() as usize;
    if !(sigma > 0.0) || r == 0 || img.width == 0 || img.height == 0 {
        return;
    }
    let k: Vec<f32> = (0..=2 * r)
        .map(|i| {
            let d = i as f32 - r as f32;
            (-d * d / (2.0 * sigma * sigma)).exp()
        })
        .collect();
    let sum: f32 = k.iter().sum();
    let k: Vec<f32> = k.iter().map(|v| v / sum).collect();
    let (w, h) = (img.width, img.height);
    let mut tmp = vec![0.0f32; img.data.len()];
    let clampi = |i: isize, n: usize| i.clamp(0, n as isize - 1) as usize;
    for y in 0..h {
        for x in 0..w {
            let mut acc = [0.0f32; 3];
            for (i, &kv) in k.iter().enumerate() {
                let xs = clampi(x as isize + i as isize - r as isize, w);
                let p = 3 * (y * w + xs);
                for c in 0..3 {
                    acc[c] += kv * img.data[p + c];
                }
            }
            tmp[3 * (y * w + x)..3 * (y * w + x) + 3].copy_from_slice(&acc);
        }
    }
    for y in 0..h {
        for x in 0..w {
            let mut acc = [0.0f32; 3];
            for (i, &kv) in k.iter().enumerate() {
                let ys = clampi(y as isize + i as isize - r as isize, h);
                let p = 3 * (ys * w + x);
                for c in 0..3 {
                    acc[c] += kv * tmp[p + c];
                }
            }
            img.data[3 * (y * w + x)..3 * (y * w + x) + 3].copy_from_slice(&acc);
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

/// HWC [0, 1] -> CHW, `(v - mean) / std` per channel, into `out` (3 x H x W floats).
pub fn normalize_chw(img: &FloatImage, mean: [f32; 3], std: [f32; 3], out: &mut [f32]) {
    let n = img.width * img.height;
    let (r, rest) = out.split_at_mut(n);
    let (g, b) = rest.split_at_mut(n);
    let inv = [1.0 / std[0], 1.0 / std[1], 1.0 / std[2]];
    for (i, p) in img.data.chunks_exact(3).enumerate() {
        r[i] = (p[0] - mean[0]) * inv[0];
        g[i] = (p[1] - mean[1]) * inv[1];
        b[i] = (p[2] - mean[2]) * inv[2];
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
    for (k, out) in global.chunks_exact_mut(gl.max(1)).enumerate() {
        let mut rng = ChaCha8Rng::seed_from_u64(derive_seed(&[seed, k as u64]));
        augment_crop(img, cfg, CropKind::Global(k), &mut rng, out);
    }
    for (k, out) in local.chunks_exact_mut(ll.max(1)).enumerate() {
        let mut rng = ChaCha8Rng::seed_from_u64(derive_seed(&[seed, (cfg.n_global + k) as u64]));
        augment_crop(img, cfg, CropKind::Local, &mut rng, out);
    }
    (global, local)
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
