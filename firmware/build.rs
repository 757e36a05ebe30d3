//! Puts memory.x on the linker's path and sizes the scratch buffers from the model file's header
//! at build time, so the RAM the firmware needs is fixed (and checked by the linker).
use std::env;
use std::fs;
use std::path::PathBuf;

use dinovmf_core::quant::infer::scratch_len;
use dinovmf_core::quant::Model;

fn main() {
    let out = PathBuf::from(env::var_os("OUT_DIR").unwrap());
    let manifest = PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").unwrap());
    fs::copy(manifest.join("memory.x"), out.join("memory.x")).unwrap();
    println!("cargo:rustc-link-search={}", out.display());
    println!("cargo:rerun-if-changed=memory.x");
    println!("cargo:rerun-if-env-changed=DINOVMF_FW_MODEL");
    println!("cargo:rerun-if-env-changed=DINOVMF_FW_IMAGE");
    let model = env::var("DINOVMF_FW_MODEL")
        .expect("set DINOVMF_FW_MODEL to an exported model file (scripts/firmware.sh does)");
    let image = env::var("DINOVMF_FW_IMAGE")
        .expect("set DINOVMF_FW_IMAGE to the RGB u8 input (scripts/firmware.sh does)");
    println!("cargo:rerun-if-changed={model}");
    println!("cargo:rerun-if-changed={image}");
    let bytes = fs::read(&model).unwrap_or_else(|e| panic!("reading model {model}: {e}"));
    let m = Model::parse(&bytes).unwrap_or_else(|e| panic!("model {model}: {e}"));
    let s = scratch_len(m.config());
    let size = m.config().vit.img_size;
    let img = fs::metadata(&image).unwrap_or_else(|e| panic!("image {image}: {e}"));
    assert_eq!(
        img.len() as usize,
        size * size * 3,
        "image {image} must be RGB u8 at the model's {size} px"
    );
    fs::write(
        out.join("sizes.rs"),
        format!(
            "const SCRATCH_FLOATS: usize = {};\nconst SCRATCH_BYTES: usize = {};\n\
             static MODEL: &[u8] = include_bytes!({model:?});\n\
             static IMAGE: &[u8] = include_bytes!({image:?});\n",
            s.floats, s.bytes
        ),
    )
    .unwrap();
}
