//! The Cortex-M4F firmware under QEMU (mps2-an386) against the host on the same model and image:
//! exports a trained tiny model to int8, writes a held-out image's model input, runs
//! `scripts/firmware.sh run` (which installs QEMU and the cross compiler on first use; a cold
//! run takes a few minutes, later ones seconds) and compares the semihosting output with core's
//! inference on the host, bit for bit: the firmware runs the same f32 / i32 operations in the same
//! order, and both sides are IEEE single precision without fused multiply-adds.
use std::path::Path;
use std::process::Command;

use dinovmf::quant::{image::to_model_input, ScratchBuf, Teacher};
use dinovmf::train::{self, LossKind, RunOptions, TrainConfig};
use dinovmf_core::quant::format::{Dtype, Model};
use dinovmf_core::quant::infer::{forward, top_n, NoObserver};

fn hash_f32s(v: &[f32]) -> u32 {
    let mut h: u32 = 0x811c_9dc5;
    for x in v {
        for b in x.to_le_bytes() {
            h ^= b as u32;
            h = h.wrapping_mul(0x0100_0193);
        }
    }
    h
}

#[test]
fn firmware_under_qemu_assigns_like_the_host() {
    let dir = std::env::temp_dir().join(format!("dinovmf-firmware-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let mut cfg = TrainConfig::preset("tiny", LossKind::Vmf).unwrap();
    cfg.epochs = 4;
    let opts = RunOptions {
        out_dir: dir.clone(),
        progress: false,
        eval: false,
        workers: 1,
        ..Default::default()
    };
    let run = train::train(&cfg, &opts).unwrap();
    let t = Teacher::load(&run.checkpoint).unwrap();
    let size = t.model.vit.img_size;
    let data = train::open_data(&t.cfg.data, size, dinovmf::data::OnError::Skip).unwrap();
    let imgs = dinovmf::quant::sample_images(data.train.as_ref(), 32, size).unwrap();
    let amax = dinovmf::quant::calibrate(&t, &imgs).unwrap();
    let bytes = t.write(Dtype::I8, Some(&amax)).unwrap();
    let model_path = dir.join("model.bin");
    std::fs::write(&model_path, &bytes).unwrap();
    let test = data.test.as_ref().unwrap();
    let input = to_model_input(&test.load(3).unwrap(), size);
    let image_path = dir.join("input.rgb");
    std::fs::write(&image_path, &input).unwrap();

    // Host: core's inference on the same bytes.
    let model = Model::parse(&bytes).unwrap();
    let mut sb = ScratchBuf::new(model.config());
    let f = forward(&model, &input, sb.scratch(), &mut NoObserver).unwrap();
    let top = top_n::<5>(f.probs);
    let want_hash = hash_f32s(f.feature);

    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let out = Command::new(root.join("scripts/firmware.sh"))
        .arg("run")
        .arg(&model_path)
        .arg(&image_path)
        .output()
        .expect("running scripts/firmware.sh");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "firmware.sh failed ({}):\n{stdout}\n{}",
        out.status,
        &stderr[stderr.len().saturating_sub(4000)..]
    );
    eprintln!("{stdout}");
    assert!(stdout.lines().any(|l| l == "done"), "{stdout}");
    let mut got = Vec::new();
    let mut hash = None;
    for l in stdout.lines() {
        let w: Vec<&str> = l.split_whitespace().collect();
        match w.as_slice() {
            ["top", _, "prototype", k, "prob", bits, _] => got.push((
                k.parse::<u32>().unwrap(),
                u32::from_str_radix(bits, 16).unwrap(),
            )),
            ["feature_hash", h] => hash = Some(u32::from_str_radix(h, 16).unwrap()),
            _ => {}
        }
    }
    let want: Vec<(u32, u32)> = top
        .iter()
        .map(|a| (a.prototype, a.prob.to_bits()))
        .collect();
    assert_eq!(got, want, "firmware top-5 (prototype, prob bits) vs host");
    assert_eq!(hash, Some(want_hash), "feature bits differ");
    std::fs::remove_dir_all(&dir).ok();
}
