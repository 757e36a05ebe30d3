//! `dinovmf bench quality` on a tiny config: every selected set trains, evaluates and lands in
//! the table; held-out sets are refused without `--heldout`; a missing MNIST is skipped.
use dinovmf::quality::{run_suite, SuiteOptions};
use dinovmf::train::LossKind;

#[test]
fn the_suite_runs_on_a_tiny_config_and_writes_its_table() {
    let root = std::env::temp_dir().join(format!("dinovmf-quality-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    let o = SuiteOptions {
        sets: ["builtin", "mnist", "textures", "lines"]
            .map(String::from)
            .to_vec(),
        preset: "tiny".into(),
        loss: LossKind::Vmf,
        epochs: Some(1),
        max_steps: Some(3),
        scale: 0.03,
        mnist: root.join("no-mnist-here"),
        cache: root.join("data"),
        out: root.join("runs"),
        progress: false,
        workers: 2,
        ..SuiteOptions::defaults()
    };
    let rows = run_suite(&o).unwrap();
    let names: Vec<&str> = rows.iter().map(|r| r.set.as_str()).collect();
    assert_eq!(names, ["builtin", "textures", "lines"], "mnist is skipped");
    for r in &rows {
        assert_eq!(r.steps, 3, "{r:?}");
        for acc in [r.knn20_trained, r.knn20_init, r.knn20_pixels, r.linear_top1] {
            assert!((0.0..=1.0).contains(&acc), "{r:?}");
        }
        assert!(
            r.rankme >= 1.0 && r.prototypes_used >= 1 && !r.heldout,
            "{r:?}"
        );
        assert!(r.nmi.is_some_and(|n| (0.0..=1.0).contains(&n)), "{r:?}");
    }
    // textures: 6 classes x round(250 x 0.03) = 8 images each.
    assert_eq!(rows[1].train_images, 48);
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(o.out.join("quality.json")).unwrap())
            .unwrap();
    assert_eq!(json.as_array().unwrap().len(), 3);
    let md = std::fs::read_to_string(o.out.join("quality.md")).unwrap();
    assert!(md.contains("| textures |") && md.contains("RankMe"), "{md}");
    // A second suite reuses the written sets; a held-out one needs --heldout.
    let e = run_suite(&SuiteOptions {
        sets: vec!["glyphs".into()],
        ..o.clone()
    })
    .unwrap_err()
    .to_string();
    assert!(e.contains("held out") && e.contains("--heldout"), "{e}");
    let e = run_suite(&SuiteOptions {
        sets: vec!["nope".into()],
        ..o.clone()
    })
    .unwrap_err()
    .to_string();
    assert!(e.contains("unknown set 'nope'"), "{e}");
    assert!(rows.iter().all(|r| r.options.is_empty()), "the defaults");
    assert!(!md.contains("options"), "{md}");
    // Recipe overrides reach every set's run and are named in the table and the rows.
    let recipe =
        dinovmf::cli::recipe::RecipeArgs::from_args(&["--n-local", "3", "--flip", "0"]).unwrap();
    let over = SuiteOptions {
        sets: vec!["textures".into()],
        recipe,
        out: root.join("runs-over"),
        ..o.clone()
    };
    let rows = run_suite(&over).unwrap();
    assert_eq!(rows[0].options, ["--n-local 3", "--flip 0"]);
    let cfg: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(over.out.join("textures/config.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(
        (cfg["n_local"].as_u64(), cfg["flip"].as_f64()),
        (Some(3), Some(0.0))
    );
    let md = std::fs::read_to_string(over.out.join("quality.md")).unwrap();
    assert!(md.contains("options --n-local 3 --flip 0"), "{md}");
    std::fs::remove_dir_all(&root).ok();
}

#[test]
fn heldout_runs_the_named_heldout_sets_or_all_of_them() {
    use dinovmf::quality::sets_to_run;
    let with = |sets: &[&str], heldout: bool| SuiteOptions {
        sets: sets.iter().map(|s| s.to_string()).collect(),
        heldout,
        ..SuiteOptions::defaults()
    };
    // Naming held-out sets runs just those.
    assert_eq!(
        sets_to_run(&with(&["holdout-a"], true)).unwrap(),
        vec!["holdout-a".to_string()]
    );
    // Tuning sets only: --heldout appends every held-out set once, after them.
    let all = sets_to_run(&with(&["textures"], true)).unwrap();
    assert_eq!(all[0], "textures");
    for h in ["counts", "glyphs", "holdout-a", "holdout-b"] {
        assert_eq!(all.iter().filter(|n| *n == h).count(), 1, "{all:?}");
    }
    // Without --heldout a held-out set is refused and none is added.
    assert!(sets_to_run(&with(&["holdout-b"], false)).is_err());
    assert_eq!(
        sets_to_run(&with(&["textures"], false)).unwrap(),
        vec!["textures".to_string()]
    );
}
