//! `dinovmf import` and `dinovmf export --format timm` through the command line parser: a DINO
//! teacher dict in, a checkpoint that the other commands read, the same tensors back out; bad
//! files are errors that name the key and write nothing.
use dinovmf::cli::run_args as run;
use dinovmf::interop::synthetic_weights::tensor;
use dinovmf::interop::{read_state_dict, write_state_dict, StateDict};
use dinovmf::train::{state, LossKind, TrainConfig};
use dinovmf_core::model::for_each_param;

/// The tiny preset's model as DINO's full checkpoint holds the teacher: `backbone.*` + `head.*`.
fn dino_teacher() -> StateDict {
    let cfg = TrainConfig::preset("tiny", LossKind::Vmf).unwrap();
    let mut sd = StateDict::default();
    for_each_param(&dinovmf::config::model_config(&cfg), |p| {
        sd.insert(
            &p.name,
            p.shape(),
            tensor(&format!("dino.{}", p.name), p.shape()),
        );
    });
    sd
}

#[test]
fn import_then_export_gives_back_the_same_state_dicts() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("teacher.safetensors");
    let sd = dino_teacher();
    write_state_dict(&src, &sd).unwrap();
    let run_dir = dir.path().join("run");
    let s = |p: &std::path::Path| p.to_str().unwrap().to_string();
    run([
        "dinovmf",
        "import",
        &s(&src),
        "--preset",
        "tiny",
        "-o",
        &s(&run_dir),
    ])
    .unwrap();
    let ckpt = run_dir.join("checkpoint.safetensors");
    let (st, step, cfg, _) = state::load_checkpoint(&ckpt).unwrap();
    assert_eq!(step, 0);
    assert_eq!(cfg, TrainConfig::preset("tiny", LossKind::Vmf).unwrap());
    assert_eq!(
        st.student, st.teacher,
        "fine-tuning starts with student = teacher"
    );
    let bb = dir.path().join("out.safetensors");
    run([
        "dinovmf",
        "export",
        &s(&ckpt),
        "--format",
        "timm",
        "-o",
        &s(&bb),
    ])
    .unwrap();
    let back = read_state_dict(&bb).unwrap();
    let head = read_state_dict(&dir.path().join("out-head.safetensors")).unwrap();
    assert_eq!(back.metadata["img_size"], "16");
    assert_eq!(back.tensors.len() + head.tensors.len(), sd.tensors.len());
    for (k, t) in &sd.tensors {
        let got = match k.strip_prefix("backbone.") {
            Some(b) => &back.tensors[b],
            None => &head.tensors[k.strip_prefix("head.").unwrap()],
        };
        assert_eq!((&got.shape, &got.data), (&t.shape, &t.data), "{k}");
    }
    // The two files in again (bare backbone + --head) give the same checkpoint weights.
    let again = dir.path().join("again");
    run([
        "dinovmf",
        "import",
        &s(&bb),
        "--head",
        &s(&dir.path().join("out-head.safetensors")),
        "--preset",
        "tiny",
        "-o",
        &s(&again),
    ])
    .unwrap();
    let (st2, ..) = state::load_checkpoint(&again.join("checkpoint.safetensors")).unwrap();
    assert_eq!(st2.teacher, st.teacher);
    // An import never replaces a run's checkpoint.
    let before = std::fs::read(&ckpt).unwrap();
    let e = run([
        "dinovmf",
        "import",
        &s(&bb),
        "--preset",
        "tiny",
        "-o",
        &s(&run_dir),
    ])
    .unwrap_err();
    assert!(format!("{e:#}").contains("exists"), "{e:#}");
    assert_eq!(std::fs::read(&ckpt).unwrap(), before);
}

#[test]
fn a_bad_state_dict_is_an_error_naming_the_key_and_writes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let s = |p: &std::path::Path| p.to_str().unwrap().to_string();
    type Edit = Box<dyn Fn(&mut StateDict)>;
    let cases: Vec<(&str, Edit, &str)> = vec![
        (
            "shape",
            Box::new(|sd| {
                sd.tensors.get_mut("backbone.pos_embed").unwrap().shape = vec![1, 16, 17]
            }),
            "tensor 'backbone.pos_embed' has shape [1, 16, 17], the model needs [1, 17, 16]",
        ),
        (
            "missing",
            Box::new(|sd| {
                sd.tensors.remove("backbone.blocks.1.norm2.bias");
            }),
            "missing key 'backbone.blocks.1.norm2.bias'",
        ),
        (
            "layout",
            Box::new(|sd| {
                let t = sd.tensors.remove("backbone.cls_token").unwrap();
                sd.tensors.insert("backbone.class_embedding".into(), t);
            }),
            "unknown layout",
        ),
    ];
    for (name, edit, want) in cases {
        let mut sd = dino_teacher();
        edit(&mut sd);
        let src = dir.path().join(format!("{name}.safetensors"));
        write_state_dict(&src, &sd).unwrap();
        let out = dir.path().join(name);
        let e = run([
            "dinovmf",
            "import",
            &s(&src),
            "--preset",
            "tiny",
            "-o",
            &s(&out),
        ])
        .unwrap_err();
        let e = format!("{e:#}");
        assert!(e.contains(want), "{name}: {e}");
        assert!(!out.join("checkpoint.safetensors").exists(), "{name}");
    }
}
