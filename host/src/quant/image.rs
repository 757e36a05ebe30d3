//! The model input of `dinovmf assign` and of core's quantized inference: RGB u8, interleaved,
//! `S x S` (the model's image size). Host and firmware feed core the same bytes.
use std::path::Path;

use anyhow::{Context, Result};

use crate::data::augment::{resample, CropBox};
use crate::data::{folder::decode_file, Image};

/// The whole image resized to `size x size` with the evaluation transform's triangle filter
/// (the k-NN evaluation's resize), rounded to 8 bits per channel.
pub fn to_model_input(img: &Image, size: usize) -> Vec<u8> {
    if img.width == size && img.height == size {
        return img.rgb.clone();
    }
    let full = CropBox {
        left: 0,
        top: 0,
        width: img.width,
        height: img.height,
    };
    let f = resample(img, full, size, size);
    let n = size * size;
    let mut out = vec![0u8; 3 * n];
    for i in 0..n {
        for c in 0..3 {
            out[3 * i + c] = (f.data[c * n + i] * 255.0).round().clamp(0.0, 255.0) as u8;
        }
    }
    out
}

/// Decodes an image file (PNG or JPEG) and resizes it to the model's input.
pub fn load_model_input(path: &Path, size: usize) -> Result<Vec<u8>> {
    let img = decode_file(path).with_context(|| format!("reading image {}", path.display()))?;
    Ok(to_model_input(&img, size))
}

/// The normalised CHW floats core computes from the same bytes (`(v / 255 - mean) / std`, in
/// the same operation order), for the f32 backends.
pub fn normalized_chw(rgb: &[u8], size: usize, mean: [f32; 3], std: [f32; 3], out: &mut [f32]) {
    let n = size * size;
    let inv255 = 1.0f32 / 255.0;
    for c in 0..3 {
        let inv = 1.0 / std[c];
        for i in 0..n {
            out[c * n + i] = (rgb[3 * i + c] as f32 * inv255 - mean[c]) * inv;
        }
    }
}
