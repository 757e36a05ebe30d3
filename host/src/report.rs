//! A run folder's figures and its one-page report, rebuilt from what the run saved
//! (`metrics.jsonl`, `evals.jsonl`, `summary.json`, the checkpoint), so they work on any run
//! folder, finished or not.
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde_json::Value;

use crate::config::model_config;
use crate::eval::linear::ProbeScore;
use crate::eval::prototypes::{kappa_values, ProtoDiag};
use crate::plot::{kappa_histogram, line_panels, Panel, Series};
use crate::train::periodic::{read_evals, EvalLine};
use crate::train::{checkpoint_in, state};

/// One step of `metrics.jsonl`, the fields the figures read.
#[derive(Clone, Debug, Default)]
pub struct StepRecord {
    pub step: f64,
    pub loss: f64,
    pub lr: f64,
    pub teacher_temp: f64,
    pub koleo_proto: Option<f64>,
    /// The teacher's mean per-image entropy and the entropy of its batch mean (NaN in runs
    /// written before they were logged).
    pub teacher_entropy: f64,
    pub mean_entropy: f64,
}

/// Reads `metrics.jsonl` of a run folder; a clear error when there is none.
pub fn read_metrics(dir: &Path) -> Result<Vec<StepRecord>> {
    let p = dir.join("metrics.jsonl");
    if !dir.is_dir() {
        bail!(
            "{} is not a directory (expected a run folder)",
            dir.display()
        );
    }
    if !p.exists() {
        bail!(
            "{} has no metrics.jsonl: not a run folder written by `dinovmf train` (or the run \
             has not taken a step yet)",
            dir.display()
        );
    }
    let text = std::fs::read_to_string(&p).with_context(|| format!("reading {}", p.display()))?;
    let mut out = Vec::new();
    for (i, l) in text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
    {
        let v: Value =
            serde_json::from_str(l).with_context(|| format!("{} line {}", p.display(), i + 1))?;
        let f = |k: &str| v.get(k).and_then(Value::as_f64);
        out.push(StepRecord {
            step: f("step").with_context(|| format!("{} line {}: no step", p.display(), i + 1))?,
            loss: f("loss").unwrap_or(f64::NAN),
            lr: f("lr").unwrap_or(f64::NAN),
            teacher_temp: f("teacher_temp").unwrap_or(f64::NAN),
            koleo_proto: f("koleo_proto"),
            teacher_entropy: f("teacher_entropy").unwrap_or(f64::NAN),
            mean_entropy: f("mean_entropy").unwrap_or(f64::NAN),
        });
    }
    if out.is_empty() {
        bail!("{} is empty: the run has not taken a step yet", p.display());
    }
    Ok(out)
}

/// A moving average over `w` points (the raw per-step loss is noisy).
fn smooth(pts: &[(f64, f64)], w: usize) -> Vec<(f64, f64)> {
    let w = w.max(1);
    let mut out = Vec::with_capacity(pts.len());
    let mut sum = 0.0;
    for i in 0..pts.len() {
        sum += pts[i].1;
        if i >= w {
            sum -= pts[i - w].1;
        }
        out.push((pts[i].0, sum / (i + 1).min(w) as f64));
    }
    out
}

fn knn_series(evals: &[EvalLine], k: usize) -> Series {
    Series {
        name: format!("k = {k}"),
        points: evals
            .iter()
            .filter_map(|e| {
                let a = e.knn.as_ref()?.iter().find(|x| x.0 == k)?.1;
                Some((e.step as f64, 100.0 * a))
            })
            .collect(),
    }
}

fn diag_series(evals: &[EvalLine], name: &str, f: impl Fn(&ProtoDiag) -> f64) -> Series {
    Series {
        name: name.to_string(),
        points: evals
            .iter()
            .filter_map(|e| e.diag.as_ref().map(|d| (e.step as f64, f(d))))
            .collect(),
    }
}

/// The figure files of a run folder.
pub const FIGURES: [&str; 5] = [
    "loss_knn.png",
    "schedules.png",
    "utilisation.png",
    "kappa_hist.png",
    "signals.png",
];

/// Draws the run's figures into its folder; returns the files written. The kappa histogram
/// needs the checkpoint and is skipped without one.
pub fn write_figures(dir: &Path) -> Result<Vec<String>> {
    let m = read_metrics(dir)?;
    let evals = read_evals(dir)?;
    let mut written = Vec::new();
    let step = |f: &dyn Fn(&StepRecord) -> f64| -> Vec<(f64, f64)> {
        m.iter().map(|r| (r.step, f(r))).collect()
    };
    let loss = step(&|r| r.loss);
    let w = (m.len() / 50).max(1);
    let mut loss_series = vec![
        Series {
            name: "loss".into(),
            points: loss.clone(),
        },
        Series {
            name: format!("mean of {w}"),
            points: smooth(&loss, w),
        },
    ];
    if m.iter().any(|r| r.koleo_proto.is_some()) {
        loss_series.push(Series {
            name: "KoLeo-proto".into(),
            points: m
                .iter()
                .filter_map(|r| r.koleo_proto.map(|k| (r.step, k)))
                .collect(),
        });
    }
    let knn: Vec<Series> = [10, 20, 200]
        .iter()
        .map(|&k| knn_series(&evals, k))
        .filter(|s| !s.points.is_empty())
        .collect();
    let p = dir.join(FIGURES[0]);
    line_panels(
        &p,
        &[
            Panel {
                title: "training loss".into(),
                x_label: "step".into(),
                y_label: "loss".into(),
                series: loss_series,
                markers: false,
            },
            Panel {
                title: "k-NN top-1, held-out split".into(),
                x_label: "step".into(),
                y_label: "accuracy (%)".into(),
                series: knn,
                markers: true,
            },
        ],
    )?;
    written.push(FIGURES[0].to_string());

    let p = dir.join(FIGURES[1]);
    line_panels(
        &p,
        &[
            Panel {
                title: "learning rate".into(),
                x_label: "step".into(),
                y_label: "lr".into(),
                series: vec![Series {
                    name: String::new(),
                    points: step(&|r| r.lr),
                }],
                markers: false,
            },
            Panel {
                title: "teacher temperature".into(),
                x_label: "step".into(),
                y_label: "tau".into(),
                series: vec![Series {
                    name: String::new(),
                    points: step(&|r| r.teacher_temp),
                }],
                markers: false,
            },
        ],
    )?;
    written.push(FIGURES[1].to_string());

    if evals.iter().any(|e| e.diag.is_some()) {
        let p = dir.join(FIGURES[2]);
        let ln_k = evals
            .iter()
            .find_map(|e| e.diag.as_ref())
            .map_or(f64::NAN, |d| (d.prototypes as f64).ln());
        line_panels(
            &p,
            &[
                Panel {
                    title: "prototypes in use".into(),
                    x_label: "step".into(),
                    y_label: "prototypes".into(),
                    series: vec![
                        diag_series(&evals, "win an argmax", |d| d.used as f64),
                        diag_series(&evals, "win a centered argmax", |d| d.used_centered as f64),
                        diag_series(&evals, "unique (0.025 rad)", |d| d.unique as f64),
                    ],
                    markers: true,
                },
                Panel {
                    title: format!("entropies (ln K = {ln_k:.2})"),
                    x_label: "step".into(),
                    y_label: "nats".into(),
                    series: vec![
                        diag_series(&evals, "assignment marginal", |d| d.assign_entropy),
                        diag_series(&evals, "teacher per image", |d| d.teacher_entropy),
                        diag_series(&evals, "student per image", |d| d.student_entropy),
                    ],
                    markers: true,
                },
            ],
        )?;
        written.push(FIGURES[2].to_string());
    }

    // The label-free signals: per step the teacher's entropies, per diagnostics pass RankMe
    // (and NMI when the data has labels).
    let h = step(&|r| r.teacher_entropy);
    if h.iter().any(|p| p.1.is_finite()) {
        let hm = step(&|r| r.mean_entropy);
        let kl: Vec<(f64, f64)> = h.iter().zip(&hm).map(|(a, b)| (a.0, b.1 - a.1)).collect();
        let mut quality = vec![diag_series(&evals, "RankMe", |d| d.rankme)];
        let nmi = Series {
            name: "NMI x 100".into(),
            points: evals
                .iter()
                .filter_map(|e| {
                    let d = e.diag.as_ref()?;
                    Some((e.step as f64, 100.0 * d.agreement?.nmi))
                })
                .collect(),
        };
        if !nmi.points.is_empty() {
            quality.push(nmi);
        }
        let p = dir.join(FIGURES[4]);
        line_panels(
            &p,
            &[
                Panel {
                    title: "teacher: per-image entropy vs entropy of the batch mean".into(),
                    x_label: "step".into(),
                    y_label: "nats".into(),
                    series: vec![
                        Series {
                            name: "per image".into(),
                            points: smooth(&h, w),
                        },
                        Series {
                            name: "batch mean".into(),
                            points: smooth(&hm, w),
                        },
                        Series {
                            name: "KL to the mean".into(),
                            points: smooth(&kl, w),
                        },
                    ],
                    markers: false,
                },
                Panel {
                    title: "RankMe of the teacher's features".into(),
                    x_label: "step".into(),
                    y_label: "effective rank".into(),
                    series: quality,
                    markers: true,
                },
            ],
        )?;
        written.push(FIGURES[4].to_string());
    }

    let ck = checkpoint_in(dir);
    if ck.exists() {
        let (st, _, cfg, _) = state::load_checkpoint(&ck)?;
        let model = model_config(&cfg);
        let tau = m.last().map_or(cfg.teacher_temp, |r| r.teacher_temp);
        let k = kappa_values(&model, &st.teacher, tau);
        kappa_histogram(&dir.join(FIGURES[3]), &k, tau)?;
        written.push(FIGURES[3].to_string());
    }
    Ok(written)
}

/// What the report prints besides the figures.
#[derive(Default)]
pub struct Extras {
    pub probe: Option<ProbeScore>,
    pub diag: Option<ProtoDiag>,
}

fn pct(x: f64) -> String {
    format!("{:.1} %", 100.0 * x)
}

/// Writes `report.md` into the run folder (figures regenerated first); returns its path.
pub fn write_report(dir: &Path, extras: &Extras) -> Result<PathBuf> {
    let figs = write_figures(dir)?;
    let m = read_metrics(dir)?;
    let evals = read_evals(dir)?;
    let summary: Option<Value> = std::fs::read_to_string(dir.join("summary.json"))
        .ok()
        .and_then(|s| serde_json::from_str(&s).ok());
    let config: Option<Value> = std::fs::read_to_string(dir.join("config.json"))
        .ok()
        .and_then(|s| serde_json::from_str(&s).ok());
    let mut r = String::new();
    let _ = writeln!(r, "# Run report: `{}`\n", dir.display());
    if let Some(c) = &config {
        let g = |k: &str| c.get(k).map_or("?".to_string(), |v| v.to_string());
        let _ = writeln!(
            r,
            "Preset {}, loss {}, {} epochs, batch {}, seed {}.\n",
            g("preset"),
            g("loss"),
            g("epochs"),
            g("batch_size"),
            g("seed")
        );
    }
    let last = m.last().cloned().unwrap_or_default();
    let n = m.len();
    let tail = &m[n.saturating_sub(20)..];
    let mean_tail = tail.iter().map(|r| r.loss).sum::<f64>() / tail.len().max(1) as f64;
    let _ = writeln!(r, "## Final numbers\n");
    let _ = writeln!(r, "| quantity | value |\n| --- | --- |");
    let _ = writeln!(r, "| steps logged | {n} (last step {}) |", last.step);
    let _ = writeln!(
        r,
        "| loss (mean of the last {}) | {mean_tail:.4} |",
        tail.len()
    );
    if let Some(k) = last.koleo_proto {
        let _ = writeln!(r, "| KoLeo-proto (last step) | {k:.4} |");
    }
    let knn_of = |v: &Value, key: &str| -> Vec<(usize, f64)> {
        v.get(key)
            .and_then(|x| serde_json::from_value(x.clone()).ok())
            .unwrap_or_default()
    };
    if let Some(s) = &summary {
        let fin = knn_of(s, "knn_final");
        let init = knn_of(s, "knn_init");
        let px = knn_of(s, "knn_pixels");
        for (i, (k, a)) in fin.iter().enumerate() {
            let extra = match (init.get(i), px.get(i)) {
                (Some(a0), Some(p)) => format!(" (at init {}, raw pixels {})", pct(a0.1), pct(p.1)),
                _ => String::new(),
            };
            let _ = writeln!(r, "| k-NN top-1, k = {k} | {}{extra} |", pct(*a));
        }
        if let Some(ips) = s.get("images_per_sec").and_then(Value::as_f64) {
            let _ = writeln!(r, "| training images/s | {ips:.0} |");
        }
    } else if let Some(k) = evals.iter().rev().find_map(|e| e.knn.clone()) {
        for (k, a) in k {
            let _ = writeln!(r, "| k-NN top-1, k = {k} (last evaluation) | {} |", pct(a));
        }
    }
    if let Some(p) = &extras.probe {
        let _ = writeln!(
            r,
            "| linear probe top-1 / top-5 | {} / {} ({} features, ridge lambda {:e} x n) |",
            pct(p.top1),
            pct(p.top5),
            p.features,
            p.lambda
        );
    }
    let diag = extras
        .diag
        .clone()
        .or_else(|| evals.iter().rev().find_map(|e| e.diag.clone()));
    if let Some(d) = &diag {
        let q = d.kappa;
        let _ = writeln!(
            r,
            "| prototypes winning an argmax | {} of {} over {} held-out images |",
            d.used, d.prototypes, d.images
        );
        let _ = writeln!(
            r,
            "| prototypes winning an argmax of the centered target | {} of {} |",
            d.used_centered, d.prototypes
        );
        let _ = writeln!(
            r,
            "| assignment entropy | {:.3} nats (ln K = {:.3}) |",
            d.assign_entropy,
            (d.prototypes as f64).ln()
        );
        let _ = writeln!(
            r,
            "| unique prototypes (> {} rad apart) | {} of {} |",
            d.unique_eps, d.unique, d.prototypes
        );
        let _ = writeln!(
            r,
            "| kappa = \\|g\\| / tau (tau = {}) min / q1 / median / q3 / max | {:.2} / {:.2} / {:.2} / {:.2} / {:.2} |",
            d.kappa_tau, q[0], q[1], q[2], q[3], q[4]
        );
        let _ = writeln!(
            r,
            "| teacher / student entropy per image | {:.3} / {:.3} nats |",
            d.teacher_entropy, d.student_entropy
        );
        let _ = writeln!(
            r,
            "| KoLeo-proto of the teacher prototypes | {:.4} |",
            d.koleo
        );
        let _ = writeln!(
            r,
            "| RankMe of the teacher's [CLS] features | {:.1} (1 = collapsed) |",
            d.rankme
        );
        let _ = writeln!(
            r,
            "| teacher entropy per image / of the mean (KL to the mean) | {:.3} / {:.3} ({:.3}) nats |",
            d.teacher_entropy,
            d.teacher_mean_entropy,
            d.kl_to_mean()
        );
        if let Some(a) = &d.agreement {
            let _ = writeln!(
                r,
                "| teacher argmax prototype vs labels: NMI / purity | {:.3} / {} |",
                a.nmi,
                pct(a.purity)
            );
        }
    }
    if let Some(ws) = summary
        .as_ref()
        .and_then(|s| s.get("warnings"))
        .and_then(Value::as_array)
        .filter(|w| !w.is_empty())
    {
        let _ = writeln!(r, "\n## Warnings\n");
        for w in ws.iter().filter_map(Value::as_str) {
            let _ = writeln!(r, "- {w}");
        }
    }
    let _ = writeln!(r, "\n## Figures\n");
    let captions = [
        "Training loss (raw and smoothed) and k-NN top-1 on the held-out split over training.",
        "Learning-rate and teacher-temperature schedules.",
        "Prototype utilisation: prototypes that win the teacher argmax on held-out images, unique prototypes, and entropies.",
        "Distribution of kappa = |g| / tau over the teacher's prototypes at the end.",
        "Label-free signals: the teacher's per-image entropy against the entropy of its batch mean (equal = the teacher ignores its input), and RankMe of its features (near 1 = collapse), with NMI against the labels where there are any.",
    ];
    for (f, c) in crate::report::FIGURES.iter().zip(captions) {
        if figs.iter().any(|x| x == f) {
            let _ = writeln!(r, "![{f}]({f})\n\n{c}\n");
        }
    }
    let out = dir.join("report.md");
    crate::checkpoint::write_atomic(&out, r.as_bytes())?;
    Ok(out)
}
