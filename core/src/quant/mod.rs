//! Quantized inference for edge devices: a compact model file read in place from a `&[u8]`, and
//! the forward pass of the teacher (ViT backbone + head + prototype layer) over a caller-provided
//! scratch buffer, with no allocation.
//!
//! - [`format`]: the versioned file layout, its parser (bounds, lengths, alignment of every
//!   section, checksum) and typed errors; with the `alloc` feature, the [`format::Writer`] that
//!   produces it (the layout is defined once, here, for both sides).
//! - [`qlinear`]: per-channel symmetric int8 weight quantization and the matrix-vector products
//!   (int8 x int8 -> i32 accumulation, or f16 / f32 weights in f32).
//! - [`infer`]: [`infer::embed`] (image -> L2-normalised `[CLS]` feature) and [`infer::assign`]
//!   (image -> top prototypes with their posterior probabilities).
//!
//! The input image is RGB, 8 bits per channel, interleaved, `img_size x img_size` (the model's
//! size; callers resize first). Normalisation (mean / std per channel) is stored in the file.
pub mod format;
pub mod infer;
pub mod qlinear;

pub use format::{Dtype, FormatError, Header, Model};
pub use infer::{assign, embed, forward, Assignment, InferError, Scratch, ScratchLen};
