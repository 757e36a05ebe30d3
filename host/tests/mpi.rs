//! `mpirun -np 2 dinovmf train` (feature `mpi`, Open MPI from scripts/mpi-deps.sh): 2 ranks
//! with half the batch each give the same losses and final weights, bit for bit, as one
//! process running the same 2 ranks as threads (`--shards 2`); against 1 rank with the whole
//! batch they differ only by the order of the sums (tests/data_parallel.rs bounds that); a
//! resumed MPI run is bit-exact; only rank 0 writes; errors end every rank. The same holds with
//! statistics over the whole batch: Sinkhorn-Knopp, KoLeo on features, iBOT.
#![cfg(feature = "mpi")]
use std::path::{Path, PathBuf};
use std::process::Command;

use dinovmf::train::{checkpoint_in, state};

const BIN: &str = env!("CARGO_BIN_EXE_dinovmf");

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("dinovmf-mpi-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

/// A tiny run's arguments: 6 steps of 8 images (DINO-vMF, drop path on, 2 local crops).
fn args(out: &Path, max_steps: u64) -> Vec<String> {
    let mut a: Vec<String> = [
        "train",
        "--preset",
        "tiny",
        "--batch-size",
        "8",
        "--epochs",
        "2",
        "--drop-path",
        "0.2",
        "--no-eval",
        "--no-figures",
        "--diag-every",
        "0",
        "-q",
        "-o",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    a.push(out.to_string_lossy().into_owned());
    a.extend(["--max-steps".to_string(), max_steps.to_string()]);
    a
}

fn output(mut c: Command) -> (bool, String) {
    let out = c.output().expect("the command starts");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// `mpirun -np <ranks> dinovmf <args>`, one compute thread per rank.
fn mpirun(ranks: usize, args: &[String]) -> (bool, String) {
    // Each launch gets its own session directory: two mpiruns started at once by parallel
    // tests race to create the same /tmp/ompi.<host>.<uid> and one fails ("File exists").
    static LAUNCH: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = LAUNCH.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let tmp = std::env::temp_dir().join(format!("dinovmf-mpi-{}-{n}", std::process::id()));
    std::fs::create_dir_all(&tmp).expect("a session directory for mpirun");
    let mut c = Command::new("mpirun");
    c.env("TMPDIR", &tmp);
    c.args(["--oversubscribe", "-np", &ranks.to_string()])
        .args(["-x", "RAYON_NUM_THREADS=1"])
        .arg(BIN)
        .args(args)
        .env("OMPI_ALLOW_RUN_AS_ROOT", "1")
        .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
        .env("OMPI_MCA_rmaps_base_oversubscribe", "1");
    output(c)
}

fn single(args: &[String], extra: &[&str]) -> (bool, String) {
    let mut c = Command::new(BIN);
    c.args(args).args(extra).env("RAYON_NUM_THREADS", "2");
    output(c)
}

fn mpirun_available() -> bool {
    Command::new("mpirun")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
}

/// The losses of metrics.jsonl, as bits.
fn losses(dir: &Path) -> Vec<u32> {
    std::fs::read_to_string(dir.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            (v["loss"].as_f64().unwrap() as f32).to_bits()
        })
        .collect()
}

/// Every tensor of the final checkpoint (student, teacher, moments, center, step).
fn state_of(dir: &Path) -> dinovmf::backend::TrainState {
    state::load_checkpoint(&checkpoint_in(dir)).unwrap().0
}

#[test]
fn two_mpi_ranks_match_two_in_process_shards_bit_for_bit_and_resume_exactly() {
    assert!(
        mpirun_available(),
        "mpirun not found: scripts/mpi-deps.sh installs Open MPI"
    );
    let (mpi, shards, part) = (tmp("ranks"), tmp("shards"), tmp("part"));
    let (ok, text) = mpirun(2, &args(&mpi, 6));
    assert!(ok, "{text}");
    assert!(text.contains("2 ranks (MPI)"), "banner: {text}");
    let (ok, text) = single(&args(&shards, 6), &["--shards", "2"]);
    assert!(ok, "{text}");
    let want = losses(&shards);
    assert_eq!(want.len(), 6);
    assert_eq!(losses(&mpi), want);
    let (a, b) = (state_of(&mpi), state_of(&shards));
    assert_eq!(a.adam_step, 6);
    assert_eq!(a, b, "final states differ");

    // Resume under MPI: 3 steps, then 3 more from the checkpoint, as one 6-step run.
    let (ok, text) = mpirun(2, &args(&part, 3));
    assert!(ok, "{text}");
    let mut resume = args(&part, 6);
    resume.extend([
        "--resume".into(),
        checkpoint_in(&part).to_string_lossy().into(),
    ]);
    let (ok, text) = mpirun(2, &resume);
    assert!(ok, "{text}");
    assert_eq!(losses(&part), want);
    assert_eq!(state_of(&part), b, "resumed state differs");

    // Per-step traffic is logged: 2 ranks send each gradient value once per direction.
    let line = std::fs::read_to_string(mpi.join("metrics.jsonl")).unwrap();
    let first: serde_json::Value = serde_json::from_str(line.lines().next().unwrap()).unwrap();
    let n = a.student.len() as u64;
    let bytes = first["reduce_bytes"].as_u64().unwrap();
    assert!(
        bytes >= 4 * n && bytes < 4 * n + 4096,
        "{bytes} bytes for {n} params"
    );
    for d in [mpi, shards, part] {
        let _ = std::fs::remove_dir_all(d);
    }
}

#[test]
fn batch_statistics_over_mpi_ranks_match_in_process_shards_bit_for_bit() {
    assert!(mpirun_available(), "mpirun not found");
    for (what, extra) in [
        (
            "sinkhorn-koleo",
            &["--centering", "sinkhorn", "--koleo", "0.5"][..],
        ),
        (
            "ibot-sinkhorn",
            &["--method", "ibot", "--centering", "sinkhorn"][..],
        ),
        ("ibot", &["--method", "ibot"][..]),
    ] {
        let (mpi, shards) = (
            tmp(&format!("{what}-ranks")),
            tmp(&format!("{what}-shards")),
        );
        let mut a = args(&mpi, 4);
        a.extend(extra.iter().map(|s| s.to_string()));
        let (ok, text) = mpirun(2, &a);
        assert!(ok, "{what}: {text}");
        let mut a = args(&shards, 4);
        a.extend(extra.iter().map(|s| s.to_string()));
        let (ok, text) = single(&a, &["--shards", "2"]);
        assert!(ok, "{what}: {text}");
        let want = losses(&shards);
        assert_eq!(want.len(), 4, "{what}");
        assert_eq!(losses(&mpi), want, "{what}: losses differ");
        assert_eq!(
            state_of(&mpi),
            state_of(&shards),
            "{what}: final states differ"
        );
        for d in [mpi, shards] {
            let _ = std::fs::remove_dir_all(d);
        }
    }
}

#[test]
fn mpi_errors_are_clear_and_end_every_rank() {
    assert!(mpirun_available(), "mpirun not found");
    let dir = tmp("bad");
    let mut a = args(&dir, 2);
    let at = a.iter().position(|x| x == "--batch-size").unwrap();
    a[at + 1] = "9".into();
    let (ok, text) = mpirun(2, &a);
    assert!(!ok);
    assert!(
        text.contains("cannot be split into 2 equal shards"),
        "{text}"
    );
    assert!(!text.contains("panicked"), "{text}");
    let (ok, text) = mpirun(
        2,
        &[args(&dir, 2), vec!["--shards".into(), "2".into()]].concat(),
    );
    assert!(!ok);
    assert!(text.contains("use one or the other"), "{text}");
    let _ = std::fs::remove_dir_all(dir);
}
