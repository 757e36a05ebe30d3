//! The label-free signals on real (tiny) runs: they move the right way on a run that learns
//! against one forced to collapse, and a forced collapse is detected and reported once.
use std::path::{Path, PathBuf};

use dinovmf::train::periodic::read_evals;
use dinovmf::train::{self, LossKind, RunOptions, TrainConfig};

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("dinovmf-signals-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

/// The tiny preset on its small generated set (80 images, 10 steps an epoch), 4 epochs, with
/// the diagnostics every 10 steps.
fn tiny() -> TrainConfig {
    let mut c = TrainConfig::preset("tiny", LossKind::Vmf).unwrap();
    c.epochs = 4;
    c
}

fn opts(dir: &Path) -> RunOptions {
    RunOptions {
        out_dir: dir.to_path_buf(),
        progress: false,
        eval: false,
        workers: 2,
        diag_every: Some(10),
        figures: false,
        ..Default::default()
    }
}

/// Per step: (teacher entropy, entropy of the batch mean, kl_to_mean).
fn step_signals(dir: &Path) -> Vec<(f64, f64, f64)> {
    std::fs::read_to_string(dir.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            let f = |k: &str| v[k].as_f64().unwrap();
            (f("teacher_entropy"), f("mean_entropy"), f("kl_to_mean"))
        })
        .collect()
}

fn mean(x: impl Iterator<Item = f64>) -> f64 {
    let v: Vec<f64> = x.collect();
    v.iter().sum::<f64>() / v.len() as f64
}

#[test]
fn signals_separate_a_learning_run_from_a_forced_collapse() {
    // The running (probability) center this test's bounds were written for: under the
    // preset's Sinkhorn teacher the batch mean is balanced to ln K by construction, so the
    // entropy bound below would say nothing about the signals.
    let mut running = tiny();
    running.centering = dinovmf::train::CenteringKind::Probability;
    running.koleo = 0.0;
    let learn_dir = tmp("learn");
    let learn = train::train(&running, &opts(&learn_dir)).unwrap();
    let mut hot = tiny();
    // A teacher temperature of 100 makes every target uniform: nothing depends on the input.
    hot.teacher_temp = 100.0;
    hot.warmup_teacher_temp = 100.0;
    let hot_dir = tmp("hot");
    let collapsed = train::train(&hot, &opts(&hot_dir)).unwrap();

    let (sl, sc) = (step_signals(&learn_dir), step_signals(&hot_dir));
    let tail = |s: &[(f64, f64, f64)], f: fn(&(f64, f64, f64)) -> f64| {
        mean(s[s.len() - 10..].iter().map(f))
    };
    let ln_k = (hot.model.prototypes as f64).ln();
    // The learning teacher depends on its input: its rows sit well away from their batch mean
    // and its per-image entropy well below ln K ...
    let kl_learn = tail(&sl, |x| x.2);
    let kl_hot = tail(&sc, |x| x.2);
    assert!(kl_learn > 0.05, "learning run: KL to the mean {kl_learn}");
    assert!(tail(&sl, |x| x.0) < 0.9 * ln_k, "{sl:?}");
    // ... the forced one does not: KL to the mean 0, entropy ln K.
    assert!(kl_hot.abs() < 1e-3, "hot teacher: KL to the mean {kl_hot}");
    assert!(kl_learn > 100.0 * kl_hot.abs());
    assert!((tail(&sc, |x| x.0) - ln_k).abs() < 1e-3 * ln_k, "{sc:?}");
    // kl_to_mean is the logged difference of the two entropies.
    for x in sl.iter().chain(&sc) {
        assert!((x.2 - (x.1 - x.0)).abs() < 1e-5);
    }
    // The diagnostics carry the same signal on held-out images, with RankMe and NMI.
    let last_diag = |d: &Path| {
        read_evals(d)
            .unwrap()
            .into_iter()
            .rev()
            .find_map(|l| l.diag)
            .unwrap()
    };
    let (dl, dc) = (last_diag(&learn_dir), last_diag(&hot_dir));
    assert!(
        dl.kl_to_mean() > 10.0 * dc.kl_to_mean().abs(),
        "{dl:?} {dc:?}"
    );
    for d in [&dl, &dc] {
        assert!(d.rankme >= 1.0 && d.rankme <= 16.0, "{d:?}");
        let a = d.agreement.expect("the tiny set is labelled");
        assert!((0.0..=1.0).contains(&a.nmi) && (0.1..=1.0).contains(&a.purity));
    }
    // The learning run raised no alarm; the collapsed one was reported once per kind, saying
    // what to try.
    assert!(learn.warnings.is_empty(), "{:?}", learn.warnings);
    let w = &collapsed.warnings;
    assert!(w.iter().any(|m| m.contains("close to uniform")), "{w:?}");
    assert!(w.iter().any(|m| m.contains("ignores its input")), "{w:?}");
    assert!(w.iter().all(|m| m.contains("Try:")), "{w:?}");
    assert!(w.len() <= 3, "one warning per kind: {w:?}");
    let saved: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(hot_dir.join("summary.json")).unwrap())
            .unwrap();
    assert_eq!(saved["warnings"].as_array().unwrap().len(), w.len());
    std::fs::remove_dir_all(&learn_dir).ok();
    std::fs::remove_dir_all(&hot_dir).ok();
}

/// A folder of two classes whose images are all the same picture: every feature is the same
/// vector, so RankMe is 1 and the teacher's argmax one prototype.
fn constant_folder(root: &Path) {
    let img = dinovmf::data::Image {
        width: 16,
        height: 16,
        rgb: (0..16 * 16 * 3).map(|i| (i * 37 % 251) as u8).collect(),
    };
    for class in ["a", "b"] {
        let d = root.join(class);
        std::fs::create_dir_all(&d).unwrap();
        for i in 0..16 {
            img.save(&d.join(format!("{i}.png"))).unwrap();
        }
    }
}

#[test]
fn a_constant_input_collapse_is_detected_by_rankme() {
    let root = tmp("constant-data");
    constant_folder(&root.join("train"));
    constant_folder(&root.join("test"));
    let mut cfg = tiny();
    cfg.data = train::DataSpec::Folder {
        root: root.join("train").display().to_string(),
        test_root: Some(root.join("test").display().to_string()),
    };
    let dir = tmp("constant-run");
    let mut o = opts(&dir);
    o.diag_every = Some(4);
    let s = train::train(&cfg, &o).unwrap();
    let diag = read_evals(&dir)
        .unwrap()
        .into_iter()
        .rev()
        .find_map(|l| l.diag)
        .unwrap();
    assert!((diag.rankme - 1.0).abs() < 1e-3, "{diag:?}");
    assert_eq!(diag.used, 1);
    let a = diag.agreement.unwrap();
    assert_eq!(a.nmi, 0.0);
    assert_eq!(a.purity, 0.5);
    let rank: Vec<&String> = s.warnings.iter().filter(|w| w.contains("RankMe")).collect();
    assert_eq!(rank.len(), 1, "{:?}", s.warnings);
    assert!(rank[0].contains("dimensional collapse") && rank[0].contains("Try:"));
    std::fs::remove_dir_all(&root).ok();
    std::fs::remove_dir_all(&dir).ok();
}
