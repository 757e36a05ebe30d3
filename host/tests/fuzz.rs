//! Property tests of everything that reads outside data (issue 14): the checkpoint reader, the
//! model-file parser, the image folder and CIFAR readers, and the config validation. Each must
//! answer every input with a value or an error, never a panic, abort or hang.
//!
//! `cargo test` runs a bounded number of cases per target (32); longer runs set PROPTEST_CASES,
//! e.g. `PROPTEST_CASES=20000 cargo test --release -p dinovmf --test fuzz`.
use std::path::Path;

use dinovmf::backend::TrainState;
use dinovmf::checkpoint;
use dinovmf::data::{Cifar, Dataset, ImageFolder, OnError, Split};
use dinovmf::quant::Teacher;
use dinovmf::train::{state, validate, LossKind, Method, TrainConfig};
use dinovmf_core::quant::format::{Dtype, Model, HEADER_LEN};
use proptest::prelude::*;

fn cases(default: u32) -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default)
}

fn config() -> ProptestConfig {
    ProptestConfig {
        cases: cases(32),
        // Shrinking replays many cases; a failure is reported with its input either way.
        max_shrink_iters: 64,
        ..ProptestConfig::default()
    }
}

// The root suite's shared test helpers (host/tests is another crate's test folder).
#[path = "../../tests/common/mod.rs"]
mod common;

fn tiny() -> TrainConfig {
    common::tiny_config(Method::Dino, LossKind::Vmf)
}

fn checkpoint_bytes() -> &'static [u8] {
    static BYTES: std::sync::OnceLock<Vec<u8>> = std::sync::OnceLock::new();
    BYTES.get_or_init(|| {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("c.safetensors");
        let cfg = tiny();
        state::save_checkpoint(&p, &cfg, &state::init_state(&cfg), 7, Some(&[(1, 0.5)])).unwrap();
        std::fs::read(&p).unwrap()
    })
}

fn model_bytes(dtype: Dtype) -> Vec<u8> {
    let cfg = tiny();
    let st: TrainState = state::init_state(&cfg);
    Teacher::from_state(cfg, st, 0).write(dtype, None).unwrap()
}

fn model_i8() -> &'static [u8] {
    static BYTES: std::sync::OnceLock<Vec<u8>> = std::sync::OnceLock::new();
    BYTES.get_or_init(|| model_bytes(Dtype::I8))
}

/// Edits of a seed file: byte overwrites, then a cut and an appended tail.
fn mutate(seed: &[u8], edits: &[(usize, u8)], cut: Option<usize>, tail: &[u8]) -> Vec<u8> {
    let mut b = seed.to_vec();
    for &(i, v) in edits {
        if !b.is_empty() {
            let n = b.len();
            b[i % n] = v;
        }
    }
    if let Some(c) = cut {
        b.truncate(c % (seed.len() + 1));
    }
    b.extend_from_slice(tail);
    b
}

fn edits() -> impl Strategy<Value = Vec<(usize, u8)>> {
    prop::collection::vec((any::<usize>(), any::<u8>()), 0..8)
}

/// Edits aimed at the start of the file (headers), where parsers branch the most.
fn head_edits(len: usize) -> impl Strategy<Value = Vec<(usize, u8)>> {
    prop::collection::vec((0..len, any::<u8>()), 1..6)
}

fn load_checkpoint_bytes(dir: &Path, bytes: &[u8]) {
    let p = dir.join("f.safetensors");
    std::fs::write(&p, bytes).unwrap();
    let _ = checkpoint::load(&p);
    let _ = checkpoint::read_metadata(&p);
    if let Ok((st, _, cfg, _)) = state::load_checkpoint(&p) {
        // Whatever loads is consistent with its own config.
        let n = dinovmf_core::model::num_params(&dinovmf::config::model_config(&cfg));
        assert_eq!(st.student.len(), n);
        assert_eq!(st.center.len(), cfg.model.prototypes);
    }
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn checkpoint_reader_never_panics(
        e in edits(),
        h in head_edits(600),
        cut in prop::option::of(any::<usize>()),
        tail in prop::collection::vec(any::<u8>(), 0..16),
    ) {
        let d = tempfile::tempdir().unwrap();
        let seed = checkpoint_bytes();
        load_checkpoint_bytes(d.path(), &mutate(seed, &e, cut, &tail));
        load_checkpoint_bytes(d.path(), &mutate(seed, &h, None, &[]));
    }

    #[test]
    fn checkpoint_reader_on_random_bytes(b in prop::collection::vec(any::<u8>(), 0..512)) {
        let d = tempfile::tempdir().unwrap();
        load_checkpoint_bytes(d.path(), &b);
        // A plausible header length in front of garbage.
        let mut c = (b.len() as u64).to_le_bytes().to_vec();
        c.extend_from_slice(&b);
        load_checkpoint_bytes(d.path(), &c);
    }

    #[test]
    fn model_parser_never_panics_and_refuses_any_header_edit(
        e in edits(),
        h in head_edits(HEADER_LEN),
        cut in prop::option::of(any::<usize>()),
        tail in prop::collection::vec(any::<u8>(), 0..8),
    ) {
        let seed = model_i8();
        let _ = Model::parse(&mutate(seed, &e, cut, &tail));
        let edited = mutate(seed, &h, None, &[]);
        if edited != seed {
            prop_assert!(Model::parse(&edited).is_err(), "edits {h:?} accepted");
        }
    }

    #[test]
    fn model_parser_on_random_bytes(b in prop::collection::vec(any::<u8>(), 0..400)) {
        let _ = Model::parse(&b);
        // Past the magic and version checks: the size fields are garbage.
        let mut c = model_i8()[..12].to_vec();
        c.extend_from_slice(&b);
        let _ = Model::parse(&c);
    }

    #[test]
    fn image_folder_never_panics(
        files in prop::collection::vec(
            (0usize..3, prop::collection::vec(any::<u8>(), 0..200), any::<bool>()),
            1..6,
        ),
        e in edits(),
        cut in prop::option::of(any::<usize>()),
    ) {
        let d = tempfile::tempdir().unwrap();
        let mut png = Vec::new();
        image::RgbImage::from_fn(9, 7, |x, y| image::Rgb([(x * 30) as u8, (y * 30) as u8, 7]))
            .write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)
            .unwrap();
        for (i, (class, bytes, mutated_png)) in files.iter().enumerate() {
            let dir = d.path().join(format!("c{class}"));
            std::fs::create_dir_all(&dir).unwrap();
            let body = if *mutated_png { mutate(&png, &e, cut, bytes) } else { bytes.clone() };
            let ext = ["png", "jpg", "jpeg"][i % 3];
            std::fs::write(dir.join(format!("{i}.{ext}")), body).unwrap();
        }
        for policy in [OnError::Skip, OnError::Stop] {
            if let Ok(f) = ImageFolder::open(d.path(), policy) {
                for i in 0..f.len() {
                    if let Ok(img) = f.load(i) {
                        prop_assert_eq!(img.rgb.len(), 3 * img.width * img.height);
                    } else {
                        prop_assert_eq!(policy, OnError::Stop);
                    }
                }
            }
        }
    }

    #[test]
    fn cifar_reader_never_panics(
        hundred in any::<bool>(),
        records in 0usize..3,
        extra in 0usize..5,
        label in any::<u8>(),
        fill in prop::collection::vec(any::<u8>(), 1..64),
    ) {
        let d = tempfile::tempdir().unwrap();
        let (names, label_bytes) = if hundred {
            (vec!["train.bin", "test.bin"], 2)
        } else {
            (vec!["data_batch_1.bin", "test_batch.bin"], 1)
        };
        let record = label_bytes + 3072;
        let mut bytes: Vec<u8> = (0..records * record + extra)
            .map(|i| fill[i % fill.len()])
            .collect();
        for r in 0..records {
            bytes[r * record + label_bytes - 1] = label;
        }
        for n in names {
            std::fs::write(d.path().join(n), &bytes).unwrap();
        }
        for split in [Split::Train, Split::Test] {
            if let Ok(c) = Cifar::open(d.path(), split) {
                for i in 0..c.len() {
                    let img = c.load(i).unwrap();
                    prop_assert_eq!(img.rgb.len(), 3 * 32 * 32);
                    prop_assert!(c.label(i) < c.num_classes());
                }
            }
        }
    }

    #[test]
    fn config_validation_never_panics_and_what_passes_can_be_built(
        sizes in prop::collection::vec(
            prop_oneof![Just(0usize), 1usize..9, Just(16), Just(32), Just(1 << 16), Just(usize::MAX)],
            9,
        ),
        reals in prop::collection::vec(
            prop_oneof![
                Just(f64::NAN), Just(f64::INFINITY), Just(-1.0), Just(0.0), Just(1.0),
                Just(2.0), 0.0f64..1.0, Just(1e300)
            ],
            14,
        ),
        counts in prop::collection::vec(prop_oneof![Just(0u64), 1u64..4, Just(u64::MAX)], 4),
        ibot in any::<bool>(),
    ) {
        let mut c = common::tiny_config(if ibot { Method::Ibot } else { Method::Dino }, LossKind::Vmf);
        let m = &mut c.model;
        [m.img_size, m.patch, m.dim, m.depth, m.heads, m.mlp_ratio, m.head_hidden, m.bottleneck, m.prototypes] =
            [sizes[0], sizes[1], sizes[2], sizes[3], sizes[4], sizes[5], sizes[6], sizes[7], sizes[8]];
        m.drop_path = reals[0] as f32;
        c.lr = reals[1];
        c.min_lr = reals[2];
        c.momentum_teacher = reals[3];
        c.teacher_temp = reals[4];
        c.warmup_teacher_temp = reals[5];
        c.student_temp = reals[6];
        c.center_momentum = reals[7];
        c.clip_grad = reals[8];
        c.weight_decay = reals[9];
        c.color_aug = reals[10] as f32;
        c.global_scale = (reals[11] as f32, 1.0);
        c.ibot.mask_prob = reals[12];
        c.ibot.mim_weight = reals[13];
        c.epochs = counts[0];
        c.warmup_epochs = counts[1];
        c.batch_size = counts[2].min(1 << 20) as usize;
        c.n_local = counts[3].min(1000) as usize;
        if validate::validate_config(&c).is_ok() {
            prop_assert!(dinovmf::config::model_config(&c).is_valid());
            prop_assert!(validate::training_bytes(&c) <= validate::MAX_ALLOC_BYTES);
            prop_assert!(dinovmf::config::crop_config(&c).validate().is_ok());
        }
    }
}
