//! Block-wise masks for masked image modelling (iBOT, following BEiT's block masking).
//!
//! A mask is a pure function of a seed: the same seed gives the same mask on every backend and
//! every run, so a training step stays a function of (state, batch, step seed). The generator
//! draws from its own small SplitMix64 stream (no_std, no allocation).
//!
//! The algorithm (BEiT, as iBOT uses it), for a `gh x gw` grid and a target of `target` patches:
//! repeatedly try (up to 10 times) a rectangle whose area is uniform in
//! `[min_area, target - masked]` (`min_area = (min(gh, gw) / 3)^2`, integer division as iBOT) and
//! whose aspect ratio `h / w` is log-uniform in `aspect`; `h = round(sqrt(area * a))`,
//! `w = round(sqrt(area / a))`; it must fit strictly inside the grid (`h < gh`, `w < gw`) and
//! may add at most the remaining count of new patches. Stop when the target is reached or ten
//! tries in a row add nothing. So the count never exceeds the target and may fall short of it.
//!
//! Per image (method.md, iBOT): with probability `prob` the image is masked with a ratio drawn
//! uniformly from `ratio`, otherwise not at all (ratio 0).

/// Where and how much to mask (iBOT: `prob` 0.5, `ratio` (0.1, 0.5), `aspect` (0.3, 1 / 0.3)).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct MaskConfig {
    /// Probability that an image is masked at all.
    pub prob: f64,
    /// Range of the masked fraction of a masked image (uniform).
    pub ratio: (f64, f64),
    /// Range of a block's aspect ratio `h / w` (log-uniform).
    pub aspect: (f64, f64),
}

impl Default for MaskConfig {
    fn default() -> Self {
        Self {
            prob: 0.5,
            ratio: (0.1, 0.5),
            aspect: (0.3, 1.0 / 0.3),
        }
    }
}

/// Attempts per block before the generator gives up (BEiT's 10).
const ATTEMPTS: usize = 10;

/// SplitMix64: tiny, well-mixed, and the same in every environment.
#[derive(Clone, Debug)]
pub struct SplitMix64(u64);

impl SplitMix64 {
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1) with 53 random bits.
    pub fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    /// Uniform in [lo, hi) (or (hi, lo] when hi < lo, as Python's `random.uniform`).
    pub fn uniform_in(&mut self, lo: f64, hi: f64) -> f64 {
        lo + (hi - lo) * self.uniform()
    }

    /// Uniform integer in `0..=n`.
    pub fn int_inclusive(&mut self, n: usize) -> usize {
        ((self.uniform() * (n as f64 + 1.0)) as usize).min(n)
    }
}

/// One placed rectangle (rows `top..top + h`, columns `left..left + w`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Block {
    pub top: usize,
    pub left: usize,
    pub h: usize,
    pub w: usize,
}

/// Writes a block mask of about `target` patches into `mask[gh * gw]` (row-major, `true` =
/// masked; overwritten) and returns how many are masked (`<= target`). `on_block` sees every
/// rectangle that added patches.
pub fn block_mask_with(
    mask: &mut [bool],
    gh: usize,
    gw: usize,
    target: usize,
    aspect: (f64, f64),
    rng: &mut SplitMix64,
    mut on_block: impl FnMut(Block),
) -> usize {
    let n = gh * gw;
    let mask = &mut mask[..n];
    mask.fill(false);
    let target = target.min(n);
    let min_area = ((gh.min(gw) / 3) * (gh.min(gw) / 3)) as f64;
    let (la, lb) = (libm::log(aspect.0), libm::log(aspect.1));
    let mut count = 0usize;
    while count < target {
        let remaining = target - count;
        let mut delta = 0;
        for _ in 0..ATTEMPTS {
            let area = rng.uniform_in(min_area, remaining as f64);
            let a = libm::exp(rng.uniform_in(la, lb));
            let h = libm::round(libm::sqrt(area * a)) as usize;
            let w = libm::round(libm::sqrt(area / a)) as usize;
            if h == 0 || w == 0 || h >= gh || w >= gw {
                continue;
            }
            let top = rng.int_inclusive(gh - h);
            let left = rng.int_inclusive(gw - w);
            let mut already = 0;
            for i in top..top + h {
                for j in left..left + w {
                    already += mask[i * gw + j] as usize;
                }
            }
            let new = h * w - already;
            if new > 0 && new <= remaining {
                for i in top..top + h {
                    for j in left..left + w {
                        mask[i * gw + j] = true;
                    }
                }
                delta = new;
                on_block(Block { top, left, h, w });
                break;
            }
        }
        if delta == 0 {
            break;
        }
        count += delta;
    }
    count
}

/// [`block_mask_with`] without the block callback.
pub fn block_mask(
    mask: &mut [bool],
    gh: usize,
    gw: usize,
    target: usize,
    aspect: (f64, f64),
    rng: &mut SplitMix64,
) -> usize {
    block_mask_with(mask, gh, gw, target, aspect, rng, |_| {})
}

/// The mask of one image from its own seed: masked with probability `cfg.prob`, then a ratio
/// uniform in `cfg.ratio`, target `round(ratio * gh * gw)`. Returns the masked count.
pub fn image_mask(mask: &mut [bool], gh: usize, gw: usize, cfg: &MaskConfig, seed: u64) -> usize {
    let mut rng = SplitMix64::new(seed);
    let n = gh * gw;
    if rng.uniform() >= cfg.prob {
        mask[..n].fill(false);
        return 0;
    }
    let ratio = rng.uniform_in(cfg.ratio.0, cfg.ratio.1);
    let target = libm::round(ratio * n as f64) as usize;
    block_mask(mask, gh, gw, target, cfg.aspect, &mut rng)
}

/// Seed of image `image` of global view `view` in a step seeded `step_seed` (SplitMix64
/// finaliser over the three, so neighbouring images get unrelated streams).
pub fn mask_seed(step_seed: u64, view: usize, image: usize) -> u64 {
    let mut r = SplitMix64::new(step_seed ^ 0x6d61_736b_0000_0000);
    let a = r.next_u64();
    let mut r = SplitMix64::new(a ^ (view as u64).wrapping_mul(0xA24B_AED4_963E_E407));
    let b = r.next_u64();
    SplitMix64::new(b ^ (image as u64).wrapping_mul(0x9FB2_1C65_1E98_DF25)).next_u64()
}

/// The masks of a step's student global crops, `[views][batch][gh * gw]` as 0/1 weights (what
/// the mask-token op takes), and the masked count of each image in `counts[views * batch]`.
/// `scratch[gh * gw]` holds one image's boolean mask.
#[allow(clippy::too_many_arguments)]
pub fn step_masks<T: crate::Real>(
    out: &mut [T],
    counts: &mut [usize],
    scratch: &mut [bool],
    views: usize,
    batch: usize,
    gh: usize,
    gw: usize,
    cfg: &MaskConfig,
    step_seed: u64,
) {
    let n = gh * gw;
    for v in 0..views {
        for b in 0..batch {
            let i = v * batch + b;
            counts[i] = image_mask(scratch, gh, gw, cfg, mask_seed(step_seed, v, b));
            for (o, &m) in out[i * n..(i + 1) * n].iter_mut().zip(scratch.iter()) {
                *o = if m { T::ONE } else { T::ZERO };
            }
        }
    }
}
