//! Data parallelism inside one process (`Parallel::Shards`, the reference an MPI run matches):
//! sharded loading is the slice of the whole batch, a shard's drop-path masks are the slice of
//! the whole batch's, 2 shards of half a batch train as 1 rank of the whole batch up to the
//! order of the sums, runs are reproducible and resume bit-exactly. The statistics over the
//! batch (Sinkhorn-Knopp's column sums, KoLeo's nearest neighbours, iBOT's patch masks and patch
//! center) are over the whole batch too: 2 shards match 1 rank within the same tolerance.
use std::path::{Path, PathBuf};
use std::sync::Arc;

use dinovmf::backend::step::{draw_drop_masks, StepMasks};
use dinovmf::backend::TrainState;
use dinovmf::config::{crop_config, model_config, step_shapes};
use dinovmf::data::{Loader, OnError};
use dinovmf::train::{
    self, open_data, state, CenteringKind, LossKind, Method, Parallel, RunOptions, TrainConfig,
};

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("dinovmf-dp-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

fn tiny(loss: LossKind) -> TrainConfig {
    let mut c = TrainConfig::preset("tiny", loss).unwrap();
    c.batch_size = 8;
    c.epochs = 2;
    c
}

fn opts(dir: &Path, parallel: Parallel, max_steps: u64) -> RunOptions {
    RunOptions {
        out_dir: dir.to_path_buf(),
        progress: false,
        eval: false,
        figures: false,
        diag_every: Some(0),
        max_steps: Some(max_steps),
        parallel,
        ..Default::default()
    }
}

fn final_state(dir: &Path) -> TrainState {
    state::load_checkpoint(&train::checkpoint_in(dir))
        .unwrap()
        .0
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

/// Largest |a - b| over the vector, relative to its largest |a| (at least 1e-3).
fn rel_diff(a: &[f32], b: &[f32]) -> f64 {
    let scale = a.iter().fold(1e-3f64, |m, &x| m.max(x.abs() as f64));
    let d = a
        .iter()
        .zip(b)
        .fold(0.0f64, |m, (&x, &y)| m.max((x as f64 - y as f64).abs()));
    d / scale
}

#[test]
fn a_sharded_loader_builds_the_slice_of_the_whole_batch() {
    let cfg = tiny(LossKind::Dino);
    let data = open_data(&cfg.data, cfg.model.img_size, OnError::Stop).unwrap();
    let whole = Loader::new(
        Arc::clone(&data.train),
        crop_config(&cfg),
        8,
        cfg.seed,
        0,
        1,
    );
    for ranks in [2, 4] {
        for rank in 0..ranks {
            let part = Loader::new(
                Arc::clone(&data.train),
                crop_config(&cfg),
                8,
                cfg.seed,
                0,
                1,
            )
            .sharded(rank, ranks)
            .unwrap();
            assert_eq!(part.batches_per_epoch(), whole.batches_per_epoch());
            for (epoch, i) in [(0, 0), (1, 3)] {
                let want = whole.batch(epoch, i).unwrap().shard(rank, ranks).unwrap();
                let got = part.batch(epoch, i).unwrap();
                assert_eq!(got.batch_size, 8 / ranks);
                assert_eq!(got, want, "rank {rank} of {ranks}, epoch {epoch} batch {i}");
            }
        }
    }
    let e = whole.batch(0, 0).unwrap().shard(0, 3).unwrap_err();
    assert!(e.to_string().contains("3 equal shards"), "{e}");
    let e = Loader::new(data.train, crop_config(&cfg), 8, 0, 0, 1)
        .sharded(0, 3)
        .err()
        .unwrap();
    assert!(e.to_string().contains("3 equal shards"), "{e}");
}

#[test]
fn a_shards_drop_path_masks_are_its_rows_of_the_whole_batchs() {
    let mut cfg = tiny(LossKind::Dino);
    cfg.model.drop_path = 0.5;
    let model = model_config(&cfg);
    let whole = step_shapes(&cfg);
    let (b, ranks) = (whole.batch, 2);
    let depth = model.vit.depth;
    let (n_g, n_l) = (2 * b, whole.n_local * b);
    let mut g = vec![0.0; depth * 2 * n_g];
    let mut l = vec![0.0; depth * 2 * n_l];
    draw_drop_masks(&model, 99, n_g, n_l, &mut g, &mut l);
    assert!(g.contains(&0.0) && g.contains(&1.0));
    let mut part_shapes = whole;
    part_shapes.batch = b / ranks;
    let h = b / ranks;
    for rank in 0..ranks {
        let mut m = StepMasks::new(&model, &part_shapes, false);
        m.draw_shard(&model, &part_shapes, None, 99, (rank, ranks));
        for (mine, all, crops) in [(&m.drop_global, &g, 2), (&m.drop_local, &l, whole.n_local)] {
            let mut want = Vec::new();
            for seg in all.chunks_exact(b) {
                want.extend_from_slice(&seg[rank * h..(rank + 1) * h]);
            }
            assert_eq!(want.len(), depth * 2 * crops * h);
            assert_eq!(mine, &want, "rank {rank}");
        }
    }
}

#[test]
fn two_shards_of_half_the_batch_train_as_one_rank_of_the_whole_batch() {
    for loss in [LossKind::Dino, LossKind::Vmf] {
        let cfg = tiny(loss);
        let (one, two, again) = (
            tmp(&format!("one-{loss:?}")),
            tmp(&format!("two-{loss:?}")),
            tmp(&format!("again-{loss:?}")),
        );
        let s1 = train::train(&cfg, &opts(&one, Parallel::Single, 6)).unwrap();
        let s2 = train::train(&cfg, &opts(&two, Parallel::Shards(2), 6)).unwrap();
        let s2b = train::train(&cfg, &opts(&again, Parallel::Shards(2), 6)).unwrap();
        // Reproducible to the bit (the shard threads race, the rank-ordered sums do not).
        assert_eq!(bits(&s2.losses), bits(&s2b.losses));
        let (st1, st2) = (final_state(&one), final_state(&two));
        assert_eq!(st2, final_state(&again));
        // The per-image work is the same (same crops, same drop-path masks); only the order of
        // the sums over the batch differs (one GEMM over 8 rows vs two over 4, added): f32
        // rounding, a few ulps per step, through AdamW's normalised update.
        for (a, b) in s1.losses.iter().zip(&s2.losses) {
            assert!(
                (a - b).abs() <= 1e-5 * a.abs().max(1.0),
                "{loss:?}: {a} vs {b}"
            );
        }
        for (name, a, b) in [
            ("student", &st1.student, &st2.student),
            ("teacher", &st1.teacher, &st2.teacher),
            ("center", &st1.center, &st2.center),
        ] {
            let d = rel_diff(a, b);
            eprintln!("{loss:?} {name}: 1 rank vs 2 shards, relative difference {d:e}");
            assert!(d <= 1e-4, "{loss:?} {name}: relative difference {d:e}");
        }
        assert_eq!(st1.adam_step, st2.adam_step);
        // Not bit-identical with this many sums: the comparison above is not vacuous.
        assert_ne!(bits(&st1.student), bits(&st2.student), "{loss:?}");
        for d in [one, two, again] {
            let _ = std::fs::remove_dir_all(d);
        }
    }
}

/// 1 rank of the whole batch against 2 shards of half of it, `steps` steps: losses within 1e-5
/// relative, student / teacher / centers within 1e-4 of their largest value, and not
/// bit-identical (so the bounds are not vacuous). Returns the 1-rank losses.
fn one_rank_vs_two_shards(what: &str, cfg: &TrainConfig, steps: u64) -> Vec<f32> {
    let (one, two) = (tmp(&format!("one-{what}")), tmp(&format!("two-{what}")));
    let s1 = train::train(cfg, &opts(&one, Parallel::Single, steps)).unwrap();
    let s2 = train::train(cfg, &opts(&two, Parallel::Shards(2), steps)).unwrap();
    assert_eq!(s1.losses.len(), steps as usize, "{what}");
    for (a, b) in s1.losses.iter().zip(&s2.losses) {
        assert!(
            (a - b).abs() <= 1e-5 * a.abs().max(1.0),
            "{what}: {a} vs {b}"
        );
    }
    let (st1, st2) = (final_state(&one), final_state(&two));
    let mut tensors = vec![
        ("student", &st1.student, &st2.student),
        ("teacher", &st1.teacher, &st2.teacher),
        ("center", &st1.center, &st2.center),
    ];
    if !st1.patch_center.is_empty() {
        tensors.push(("patch center", &st1.patch_center, &st2.patch_center));
    }
    for (name, a, b) in tensors {
        let d = rel_diff(a, b);
        eprintln!("{what} {name}: 1 rank vs 2 shards, relative difference {d:e}");
        assert!(d <= 1e-4, "{what} {name}: relative difference {d:e}");
    }
    assert_ne!(bits(&st1.student), bits(&st2.student), "{what}");
    for d in [one, two] {
        let _ = std::fs::remove_dir_all(d);
    }
    s1.losses
}

#[test]
fn sinkhorn_over_two_shards_balances_the_whole_batch() {
    let mut cfg = tiny(LossKind::Dino);
    cfg.centering = CenteringKind::Sinkhorn;
    one_rank_vs_two_shards("sinkhorn", &cfg, 5);
}

#[test]
fn koleo_over_two_shards_finds_neighbours_in_the_whole_batch() {
    let mut cfg = tiny(LossKind::Vmf);
    let plain = one_rank_vs_two_shards("no-koleo", &cfg, 4);
    cfg.koleo = 0.5;
    let with = one_rank_vs_two_shards("koleo", &cfg, 4);
    // KoLeo is on: it changes the training (from step 2, after its first gradient).
    assert_ne!(bits(&plain), bits(&with));
}

#[test]
fn ibot_over_two_shards_masks_and_centers_the_whole_batch() {
    let mut cfg = TrainConfig::preset_for("tiny", Method::Ibot, LossKind::Vmf).unwrap();
    cfg.batch_size = 8;
    cfg.epochs = 2;
    one_rank_vs_two_shards("ibot", &cfg, 4);
    cfg.centering = CenteringKind::Sinkhorn;
    one_rank_vs_two_shards("ibot-sinkhorn", &cfg, 4);
}

#[test]
fn a_shards_patch_masks_are_its_rows_of_the_whole_batchs() {
    let cfg = TrainConfig::preset_for("tiny", Method::Ibot, LossKind::Vmf).unwrap();
    let model = model_config(&cfg);
    let ib = dinovmf::config::ibot_config(&cfg);
    let mut whole = step_shapes(&cfg);
    whole.batch = 8;
    let mut all = StepMasks::new(&model, &whole, true);
    all.draw(&model, &whole, Some(&ib), 7);
    assert!(all.patch.contains(&0.0) && all.patch.contains(&1.0));
    let (ranks, h) = (2, whole.batch / 2);
    let np = all.patch.len() / (2 * whole.batch);
    let mut part_shapes = whole;
    part_shapes.batch = h;
    for rank in 0..ranks {
        let mut m = StepMasks::new(&model, &part_shapes, true);
        m.draw_shard(&model, &part_shapes, Some(&ib), 7, (rank, ranks));
        let (mut patch, mut counts) = (Vec::new(), Vec::new());
        for v in 0..2 {
            let img = v * whole.batch + rank * h;
            patch.extend_from_slice(&all.patch[img * np..(img + h) * np]);
            counts.extend_from_slice(&all.counts[img..img + h]);
        }
        assert_eq!(m.patch, patch, "rank {rank}");
        assert_eq!(m.counts, counts, "rank {rank}");
    }
}

#[test]
fn a_sharded_run_resumes_bit_exactly() {
    let cfg = tiny(LossKind::Vmf);
    let (whole, part) = (tmp("resume-whole"), tmp("resume-part"));
    let full = train::train(&cfg, &opts(&whole, Parallel::Shards(2), 6)).unwrap();
    train::train(&cfg, &opts(&part, Parallel::Shards(2), 3)).unwrap();
    let mut o = opts(&part, Parallel::Shards(2), 6);
    o.resume = Some(train::checkpoint_in(&part));
    let rest = train::train(&cfg, &o).unwrap();
    assert_eq!(bits(&rest.losses), bits(&full.losses[3..]));
    assert_eq!(final_state(&part), final_state(&whole));
    for d in [whole, part] {
        let _ = std::fs::remove_dir_all(d);
    }
}

#[test]
fn shards_that_do_not_divide_the_batch_are_a_clear_error() {
    let cfg = tiny(LossKind::Dino);
    let dir = tmp("bad-shards");
    let e = train::train(&cfg, &opts(&dir, Parallel::Shards(3), 2)).unwrap_err();
    assert!(format!("{e:#}").contains("3 equal shards"), "{e:#}");
    let _ = std::fs::remove_dir_all(dir);
}
