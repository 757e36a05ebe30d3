//! Training data: sources (a built-in procedural dataset, an image folder, CIFAR binaries), DINO
//! multi-crop augmentation, and a deterministic parallel batch loader.
//!
//! Determinism is the organising rule: every random choice is drawn from a ChaCha8 stream whose seed
//! is derived from explicit integers ([`derive_seed`]), never from thread identity or timing, so a
//! batch is a pure function of (seed, epoch, batch index) and a resumed run sees the same pixels.
pub mod augment;
pub mod cifar;
pub mod error;
pub mod folder;
pub mod loader;
pub mod synthetic;

use std::path::Path;

pub use augment::{eval_transform, CropConfig, IMAGENET_MEAN, IMAGENET_STD};
pub use cifar::Cifar;
pub use error::DataError;
pub use folder::{ImageFolder, OnError};
pub use loader::{eval_batches, Batch, EpochIter, EvalBatches, Loader};
pub use synthetic::{Synthetic, SyntheticConfig};

/// An 8-bit RGB image, pixels interleaved row-major (`rgb.len() == 3 * width * height`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Image {
    pub width: usize,
    pub height: usize,
    pub rgb: Vec<u8>,
}

impl Image {
    /// A black image.
    pub fn new(width: usize, height: usize) -> Self {
        Image {
            width,
            height,
            rgb: vec![0; 3 * width * height],
        }
    }

    /// The (r, g, b) triple at column `x`, row `y`.
    pub fn pixel(&self, x: usize, y: usize) -> [u8; 3] {
        let o = 3 * (y * self.width + x);
        [self.rgb[o], self.rgb[o + 1], self.rgb[o + 2]]
    }

    /// Writes the image as PNG or JPEG (chosen by the extension); for inspecting data and for tests.
    pub fn save(&self, path: &Path) -> Result<(), DataError> {
        let bad = |message: String| DataError::Write {
            path: path.to_path_buf(),
            message,
        };
        if self.rgb.len() != 3 * self.width * self.height {
            return Err(bad(format!(
                "buffer of {} bytes for a {}x{} RGB image",
                self.rgb.len(),
                self.width,
                self.height
            )));
        }
        let (w, h) = (
            u32::try_from(self.width).map_err(|e| bad(e.to_string()))?,
            u32::try_from(self.height).map_err(|e| bad(e.to_string()))?,
        );
        image::save_buffer(path, &self.rgb, w, h, image::ExtendedColorType::Rgb8)
            .map_err(|e| bad(e.to_string()))
    }
}

/// Which half of a dataset.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Split {
    Train,
    Test,
}

/// A labelled image collection. `Send + Sync` because workers share it across threads; `load` must be
/// a pure function of `i` (the loader's determinism rests on it).
pub trait Dataset: Send + Sync {
    fn len(&self) -> usize;
    fn num_classes(&self) -> usize;
    fn class_name(&self, c: usize) -> String;
    fn label(&self, i: usize) -> usize;
    fn load(&self, i: usize) -> Result<Image, DataError>;
    fn describe(&self) -> String;
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// SplitMix64 finaliser: a bijection on u64 with full avalanche.
fn splitmix64(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Derives a stream seed from a tuple of integers (order matters). Used for every RNG in this module
/// so that, e.g., sample 17 of epoch 3 gets the same augmentation whichever thread draws it.
pub fn derive_seed(parts: &[u64]) -> u64 {
    let mut h = 0x6A09_E667_F3BC_C908_u64 ^ parts.len() as u64;
    for &p in parts {
        h = splitmix64(h ^ splitmix64(p));
    }
    h
}
