//! Weights in and out of the PyTorch world: timm / official DINO / iBOT state dicts.
//!
//! Our parameter names already follow DINO's `MultiCropWrapper` (`backbone.*` = the
//! `VisionTransformer`, `head.*` = the `DINOHead`) with PyTorch's shapes, so the maps here are
//! prefixes; the work is in checking that a foreign state dict is exactly the model we expect and
//! saying which key is not.
//! - [`state_dict`]: reading any-float safetensors files into named f32 tensors and writing them.
//! - [`dino`]: the key maps (export to the timm / DINO layout, import from it).
//! - [`synthetic_weights`]: the name-keyed weight generator the PyTorch fixture shares with Rust.
pub mod dino;
pub mod state_dict;
pub mod synthetic_weights;

pub use dino::{export_timm, import_state_dict, Imported, TimmExport, TimmExportOptions};
pub use state_dict::{read_state_dict, write_state_dict, StateDict};
