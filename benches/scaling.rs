//! One point of the CPU cost sweep behind `docs/performance.md` (`scripts/perf_sweep.py` runs
//! many, one process each, so each point's peak memory is its own): a training step of the
//! `small32` model with one thing changed, on a synthetic batch (no data loading), timed after a
//! warm-up step. Prints one JSON line: images/s, the step's matrix-product FLOPs (counted from
//! the shapes, `dinovmf::flops::step_flops`), the achieved GFLOP/s and the process's peak resident memory.
//!
//! `cargo bench --bench scaling -- method=dino loss=dino batch=64 k=4096 img=32 steps=3`
//! (threads: RAYON_NUM_THREADS). Without arguments it runs the default point.
use std::time::Instant;

use dinovmf::backend::cpu::CpuBackend;
use dinovmf::backend::random_batch;
use dinovmf::backend::{Backend, StepHyper, TrainState};
use dinovmf::config::backend_config;
use dinovmf::flops::{ibot_masked_fraction, step_flops};
use dinovmf::train::{LossKind, Method, TrainConfig};

/// The swept settings of one point.
struct Point {
    method: Method,
    loss: LossKind,
    batch: usize,
    k: usize,
    img: usize,
    n_local: usize,
    steps: usize,
}

fn parse(args: &[String]) -> Result<Point, String> {
    let mut p = Point {
        method: Method::Dino,
        loss: LossKind::Dino,
        batch: 64,
        k: 4096,
        img: 32,
        n_local: 4,
        steps: 3,
    };
    for a in args {
        // cargo bench passes `--bench`; criterion-style flags are not ours.
        if a.starts_with("--") {
            continue;
        }
        let (key, v) = a
            .split_once('=')
            .ok_or_else(|| format!("`{a}` is not key=value"))?;
        let num = || {
            v.parse::<usize>()
                .map_err(|_| format!("{key}={v}: not a count"))
        };
        match key {
            "method" => {
                p.method = match v {
                    "dino" => Method::Dino,
                    "ibot" => Method::Ibot,
                    _ => return Err(format!("method={v}: dino or ibot")),
                }
            }
            "loss" => {
                p.loss = match v {
                    "dino" => LossKind::Dino,
                    "vmf" => LossKind::Vmf,
                    _ => return Err(format!("loss={v}: dino or vmf")),
                }
            }
            "batch" => p.batch = num()?,
            "k" => p.k = num()?,
            "img" => p.img = num()?,
            "n_local" => p.n_local = num()?,
            "steps" => p.steps = num()?.max(1),
            _ => return Err(format!("unknown setting `{key}`")),
        }
    }
    Ok(p)
}

/// Peak resident memory of this process (Linux `VmHWM`), in MiB.
fn peak_mib() -> Option<f64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = s.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let p = match parse(&args) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("scaling: {e}");
            std::process::exit(2);
        }
    };
    let mut cfg = TrainConfig::preset_for("small32", p.method, p.loss).expect("small32 preset");
    cfg.batch_size = p.batch;
    cfg.model.prototypes = p.k;
    cfg.model.img_size = p.img;
    cfg.n_local = p.n_local;
    let bc = backend_config(&cfg);
    let mut be = match CpuBackend::open(&bc) {
        Ok(b) => b,
        Err(e) => {
            eprintln!("scaling: {e:#}");
            std::process::exit(1);
        }
    };
    be.set_state(&TrainState::initial(&bc.model, bc.loss.centering, 0))
        .expect("initial state");
    let s = bc.shapes;
    let c = bc.model.vit.in_chans;
    let l = s.local_size;
    let batch = random_batch(&s, c, 0);
    let mut hp = StepHyper {
        lr: 1e-3,
        weight_decay: 0.04,
        teacher_momentum: 0.996,
        teacher_temp: 0.04,
        freeze_last_layer: false,
        clip_grad: 3.0,
        seed: 1,
        patch_teacher_temp: 0.04,
    };
    be.train_step(&batch, &hp).expect("warm-up step");
    let t = Instant::now();
    for i in 0..p.steps {
        hp.seed = 2 + i as u64;
        be.train_step(&batch, &hp).expect("step");
    }
    let per = t.elapsed().as_secs_f64() / p.steps as f64;
    let masked = ibot_masked_fraction(&cfg);
    let flops = step_flops(&cfg, l, masked);
    println!(
        "{{\"method\":\"{:?}\",\"loss\":\"{:?}\",\"batch\":{},\"k\":{},\"img\":{},\"local\":{},\"n_local\":{},\"threads\":{},\"steps\":{},\"step_s\":{:.5},\"images_per_s\":{:.2},\"gflop_per_step\":{:.3},\"gflop_per_s\":{:.2},\"peak_mib\":{:.1}}}",
        p.method,
        p.loss,
        p.batch,
        p.k,
        p.img,
        l,
        p.n_local,
        rayon::current_num_threads(),
        p.steps,
        per,
        p.batch as f64 / per,
        flops / 1e9,
        flops / per / 1e9,
        peak_mib().unwrap_or(f64::NAN)
    );
}
