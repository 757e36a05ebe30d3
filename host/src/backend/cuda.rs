//! The CUDA backend's entry point. Built without the `cuda` feature, it says so clearly.
use anyhow::{bail, Result};

use super::Backend;

/// Opens the CUDA backend, or explains why it cannot.
pub fn open() -> Result<Box<dyn Backend>> {
    bail!(
        "this dinovmf was built without CUDA support: rebuild with `cargo build --release --features cuda` \
         (needs the NVIDIA driver's libcuda at run time), or use `--device cpu`"
    )
}
