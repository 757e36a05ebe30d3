//! Evaluations during training: k-NN on the held-out split every few epochs and prototype
//! diagnostics every few steps, appended to `evals.jsonl` next to `metrics.jsonl` (kept
//! separate so that `metrics.jsonl` stays one record per step), and the run's figures at the
//! end.
use std::fs::{File, OpenOptions};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

use crate::backend::Backend;
use crate::config::{loss_config, model_config};
use crate::eval::data_pass::{diagnose_backend, first_images, ImageSample};
use crate::eval::prototypes::ProtoDiag;

use super::{knn_eval, pairs, Datasets, TrainConfig};

/// Images of the held-out split (the first N) the diagnostics' utilisation pass reads.
pub const DIAG_IMAGES: usize = 1024;

/// One line of `evals.jsonl`.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct EvalLine {
    pub step: u64,
    pub epoch: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub knn: Option<Vec<(usize, f64)>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub diag: Option<ProtoDiag>,
}

/// The evaluation file of a run folder.
pub fn evals_in(dir: &Path) -> PathBuf {
    dir.join("evals.jsonl")
}

/// Reads `evals.jsonl` (missing file: no lines).
pub fn read_evals(dir: &Path) -> Result<Vec<EvalLine>> {
    let p = evals_in(dir);
    if !p.exists() {
        return Ok(Vec::new());
    }
    let text = std::fs::read_to_string(&p).with_context(|| format!("reading {}", p.display()))?;
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .enumerate()
        .map(|(i, l)| {
            serde_json::from_str(l).with_context(|| format!("{} line {}", p.display(), i + 1))
        })
        .collect()
}

pub struct Periodic {
    out: BufWriter<File>,
    knn_every_steps: u64,
    diag_every: u64,
    diag_images: Option<ImageSample>,
    /// Short text for the progress bar.
    pub status: String,
}

impl Periodic {
    /// `knn_every` in epochs and `diag_every` in steps (0 = off for both).
    pub fn new(
        dir: &Path,
        resume: bool,
        data: &Datasets,
        size: usize,
        steps_per_epoch: u64,
        knn_every: u64,
        diag_every: u64,
    ) -> Result<Self> {
        let p = evals_in(dir);
        let f = if resume {
            OpenOptions::new().create(true).append(true).open(&p)
        } else {
            File::create(&p)
        }
        .with_context(|| format!("opening {}", p.display()))?;
        let diag_images = if diag_every > 0 {
            let ds = data.test.clone().unwrap_or_else(|| data.train.clone());
            Some(first_images(&ds, size, DIAG_IMAGES)?)
        } else {
            None
        };
        Ok(Self {
            out: BufWriter::new(f),
            knn_every_steps: knn_every * steps_per_epoch,
            diag_every,
            diag_images,
            status: String::new(),
        })
    }

    pub fn write(&mut self, line: &EvalLine) -> Result<()> {
        serde_json::to_writer(&mut self.out, line)?;
        self.out.write_all(b"\n")?;
        self.out.flush()?;
        Ok(())
    }

    /// Runs what is due after `step` steps (`end`: the last step, whose k-NN the trainer's final
    /// evaluation does); `teacher_temp` is the schedule's current value. Returns the
    /// diagnostics when they ran.
    #[allow(clippy::too_many_arguments)]
    pub fn after_step(
        &mut self,
        backend: &mut dyn Backend,
        cfg: &TrainConfig,
        data: &Datasets,
        step: u64,
        epoch: u64,
        end: u64,
        teacher_temp: f64,
    ) -> Result<Option<ProtoDiag>> {
        let mut line = EvalLine {
            step,
            epoch,
            ..Default::default()
        };
        if self.knn_every_steps > 0
            && step.is_multiple_of(self.knn_every_steps)
            && step < end
            && data.test.is_some()
        {
            let s = knn_eval(backend, data, cfg.model.img_size)?;
            line.knn = Some(pairs(&s));
        }
        if self.diag_every > 0 && (step.is_multiple_of(self.diag_every) || step == end) {
            line.diag = Some(self.diagnose(backend, cfg, teacher_temp)?);
        }
        if line.knn.is_some() || line.diag.is_some() {
            self.update_status(&line);
            self.write(&line)?;
        }
        Ok(line.diag)
    }

    pub fn diagnose(
        &mut self,
        backend: &mut dyn Backend,
        cfg: &TrainConfig,
        teacher_temp: f64,
    ) -> Result<ProtoDiag> {
        let Some(sample) = &self.diag_images else {
            anyhow::bail!("diagnostics are off");
        };
        diagnose_backend(
            backend,
            &model_config(cfg),
            &loss_config(cfg),
            sample,
            teacher_temp,
        )
    }

    pub fn update_status(&mut self, line: &EvalLine) {
        let mut parts = Vec::new();
        if let Some(k) = line.knn.as_ref().and_then(|k| k.iter().find(|x| x.0 == 20)) {
            parts.push(format!("kNN20 {:.1}%", 100.0 * k.1));
        }
        if let Some(d) = &line.diag {
            parts.push(format!(
                "used {}/{} ({} centered) uniq {} RankMe {:.1}",
                d.used, d.prototypes, d.used_centered, d.unique, d.rankme
            ));
            if let Some(a) = &d.agreement {
                parts.push(format!("NMI {:.2}", a.nmi));
            }
        }
        if !parts.is_empty() {
            self.status = parts.join(" ");
        }
    }
}
