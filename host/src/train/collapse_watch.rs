//! Collapse detection while training: the per-step teacher statistics and the periodic
//! diagnostics are checked for the signatures of collapse (method.md, "Label-free quality
//! signals" and "Evaluation"), and each kind is reported once, with what to try.
//!
//! The signatures:
//! - **uniform**: the teacher's per-image entropy near ln K;
//! - **input-independent**: the teacher's per-image entropy equal to the entropy of its batch
//!   mean (their difference, the mean KL of a row to the mean, near 0), whatever its level;
//! - **one prototype**: one prototype holds most of the batch's teacher mass;
//! - **rank**: RankMe of the teacher's features near 1 (every image maps to one direction).
//!
//! A signature must hold for [`PERSIST`] consecutive steps (one odd batch is no collapse), and
//! the first steps of a run (its first epoch, at most [`MAX_GRACE_STEPS`], or the LR warm-up
//! when it is longer) may sit near the uniform solution, as every run starts there.
use crate::backend::StepMetrics;
use crate::eval::prototypes::ProtoDiag;

/// Consecutive steps a per-step signature must hold before it is reported.
pub const PERSIST: u32 = 5;
/// At most this many first steps are exempt (the first epoch when it is shorter).
pub const MAX_GRACE_STEPS: u64 = 100;
/// The teacher's mean KL to its batch mean (nats) below which it counts as input-independent.
/// Healthy small runs sit at 0.3-1 nats (docs/small-data-defaults.md: 0.44 for the shipped
/// recipe); the input-independent runs of issue 13 were at 0.00-0.02.
pub const KL_TO_MEAN_MIN: f32 = 0.02;
/// RankMe below which the teacher's features count as collapsed to one direction.
pub const RANKME_MIN: f64 = 1.5;

/// What to try, by the options that fight collapse.
const TRY_UNIFORM: &str = "Try: a sharper teacher (lower --teacher-temp), a balanced teacher \
    (--centering sinkhorn), spreading the features (--koleo 0.1), or fewer --prototypes.";
const TRY_CONSTANT: &str = "Try: a balanced teacher (--centering sinkhorn), spreading the \
    features (--koleo 0.1), a sharper teacher (lower --teacher-temp), or the other centering \
    (--centering logit / probability).";
const TRY_SINGLE: &str = "Try: a balanced teacher (--centering sinkhorn), a faster center \
    (lower --center-momentum), or a softer teacher (higher --teacher-temp).";

/// Which signature a warning is about.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CollapseKind {
    Uniform,
    InputIndependent,
    OnePrototype,
    Rank,
}

impl CollapseKind {
    /// A few words for messages.
    pub fn name(self) -> &'static str {
        match self {
            CollapseKind::Uniform => "a uniform teacher",
            CollapseKind::InputIndependent => "a teacher that ignores its input",
            CollapseKind::OnePrototype => "one prototype",
            CollapseKind::Rank => "features of rank about 1",
        }
    }
}

/// Watches a run; [`CollapseWatch::step`] and [`CollapseWatch::diag`] return a warning the first
/// time a signature is established.
#[derive(Clone, Debug)]
pub struct CollapseWatch {
    ln_k: f32,
    grace: u64,
    run: [u32; 3],
    warned: Vec<CollapseKind>,
}

impl CollapseWatch {
    /// For K prototypes and `steps_per_epoch` steps per epoch.
    pub fn new(prototypes: usize, steps_per_epoch: u64) -> Self {
        Self {
            ln_k: (prototypes.max(1) as f32).ln(),
            grace: steps_per_epoch.min(MAX_GRACE_STEPS),
            run: [0; 3],
            warned: Vec::new(),
        }
    }

    /// Extends the exempt first steps to `steps` (the LR warm-up: while the learning rate
    /// ramps up the network barely moves, and a balanced teacher (Sinkhorn) starts near the
    /// uniform solution on every data set measured, MNIST-5k included, then leaves it).
    pub fn with_grace(mut self, steps: u64) -> Self {
        self.grace = self.grace.max(steps);
        self
    }

    /// The kinds warned about so far, in order.
    pub fn warned(&self) -> &[CollapseKind] {
        &self.warned
    }

    fn first(&mut self, kind: CollapseKind) -> bool {
        if self.warned.contains(&kind) {
            return false;
        }
        self.warned.push(kind);
        true
    }

    /// Checks step `step`'s teacher statistics.
    pub fn step(&mut self, step: u64, m: &StepMetrics) -> Option<String> {
        let kl_to_mean = m.mean_entropy - m.teacher_entropy;
        // The teacher's own entropy, not the loss: a cross-entropy above ln K only says that
        // the student disagrees with a sharp teacher (common under Sinkhorn while it learns).
        let signs = [
            m.teacher_entropy > 0.98 * self.ln_k,
            kl_to_mean < KL_TO_MEAN_MIN,
            m.max_mass > 0.5,
        ];
        for (r, s) in self.run.iter_mut().zip(signs) {
            *r = if s { *r + 1 } else { 0 };
        }
        if step < self.grace {
            return None;
        }
        if self.run[0] >= PERSIST && self.first(CollapseKind::Uniform) {
            return Some(format!(
                "warning: step {step}: loss {:.3} / teacher entropy {:.3} near ln K = {:.3}: the \
                 teacher is close to uniform (collapse to the uniform solution: sharpening loses \
                 to centering). {TRY_UNIFORM}",
                m.cls_loss, m.teacher_entropy, self.ln_k
            ));
        }
        if self.run[1] >= PERSIST && self.first(CollapseKind::InputIndependent) {
            return Some(format!(
                "warning: step {step}: the teacher's per-image entropy {:.3} equals the entropy \
                 of its batch mean {:.3} (KL to the mean {:.3} nats): the teacher ignores its \
                 input, so the features stop learning. {TRY_CONSTANT}",
                m.teacher_entropy, m.mean_entropy, kl_to_mean
            ));
        }
        if self.run[2] >= PERSIST && self.first(CollapseKind::OnePrototype) {
            return Some(format!(
                "warning: step {step}: one prototype holds {:.0}% of the batch's teacher mass (a \
                 sign of collapse to one prototype: centering loses to sharpening). {TRY_SINGLE}",
                100.0 * m.max_mass
            ));
        }
        None
    }

    /// Checks a diagnostics pass taken after `step` steps.
    pub fn diag(&mut self, step: u64, d: &ProtoDiag) -> Option<String> {
        if step < self.grace {
            return None;
        }
        if d.rankme < RANKME_MIN && self.first(CollapseKind::Rank) {
            return Some(format!(
                "warning: step {step}: RankMe of the teacher's features is {:.2} over {} images: \
                 they span about one direction (dimensional collapse). {TRY_CONSTANT}",
                d.rankme, d.images
            ));
        }
        if d.images >= 16 && d.used == 1 && self.first(CollapseKind::OnePrototype) {
            return Some(format!(
                "warning: step {step}: the teacher sends all {} diagnostic images to one \
                 prototype. {TRY_SINGLE}",
                d.images
            ));
        }
        None
    }
}

/// The anti-collapse options a run already uses, so that advice does not suggest them again.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AntiCollapseInUse {
    /// `--centering sinkhorn`.
    pub sinkhorn: bool,
    /// `--koleo` above 0.
    pub koleo: bool,
}

/// The end-of-run verdict when the trained features score below the network at initialisation
/// (k-NN at `k` on the held-out split). What it advises depends on whether the watch saw a
/// collapse during the run (`collapsed`) and on what the run already uses (`in_use`).
pub fn below_init_warning(
    k: usize,
    trained: f64,
    init: f64,
    collapsed: &[CollapseKind],
    in_use: AntiCollapseInUse,
) -> Option<String> {
    (trained < init).then(|| {
        let advice = if collapsed.is_empty() {
            "No collapse was detected during the run (the teacher's outputs depend on the \
             image), so the network learned features that these labels do not follow. Check \
             a linear probe (`dinovmf eval linear`) before trusting the k-NN number; more \
             steps (--epochs) may help. On the quality suite's cluttered sets the recipe's \
             settings changed little (docs/quality.md)."
                .to_string()
        } else {
            let mut tries = Vec::new();
            if !in_use.sinkhorn {
                tries.push("a balanced teacher (--centering sinkhorn)");
            }
            if !in_use.koleo {
                tries.push("spreading the features (--koleo 0.1)");
            } else {
                tries.push("a stronger --koleo");
            }
            tries.push("a sharper teacher (lower --teacher-temp)");
            if in_use.sinkhorn {
                tries.push("fewer --prototypes");
            }
            let kinds: Vec<_> = collapsed.iter().map(|c| c.name()).collect();
            format!(
                "The teacher collapsed during the run ({}). Try: {}.",
                kinds.join(", "),
                tries.join(", ")
            )
        };
        format!(
            "warning: the trained features are WORSE than the untrained network: k-NN (k = {k}) \
             {:.1}% trained against {:.1}% at initialisation. Training did not learn on this \
             data with these options. {advice}",
            100.0 * trained,
            100.0 * init
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn metrics(h: f32, hm: f32, max: f32, loss: f32) -> StepMetrics {
        StepMetrics {
            loss,
            cls_loss: loss,
            teacher_entropy: h,
            mean_entropy: hm,
            max_mass: max,
            ..Default::default()
        }
    }

    #[test]
    fn warns_once_after_the_signature_persists() {
        let mut w = CollapseWatch::new(64, 10);
        let constant = metrics(2.0, 2.005, 0.2, 3.0);
        // Inside the grace steps: nothing, even though the counter runs.
        for s in 0..10 {
            assert_eq!(w.step(s, &constant), None);
        }
        let msg = w.step(10, &constant).expect("input-independent teacher");
        assert!(msg.contains("ignores its input") && msg.contains("--centering sinkhorn"));
        for s in 11..40 {
            assert_eq!(w.step(s, &constant), None, "warned twice");
        }
        assert_eq!(w.warned(), [CollapseKind::InputIndependent]);
    }

    #[test]
    fn a_healthy_or_brief_signature_is_not_reported() {
        let mut w = CollapseWatch::new(64, 2);
        let healthy = metrics(1.0, 3.0, 0.1, 2.0);
        let odd = metrics(2.0, 2.0, 0.2, 3.0);
        for s in 0..50 {
            // An input-independent batch every 4th step never persists for 5.
            let m = if s % 4 == 0 { &odd } else { &healthy };
            assert_eq!(w.step(s, m), None);
        }
    }

    #[test]
    fn a_loss_above_ln_k_with_a_sharp_teacher_is_not_uniform() {
        let ln_k = 64f32.ln();
        let mut w = CollapseWatch::new(64, 0);
        let disagreeing = metrics(0.9 * ln_k, ln_k, 1.0 / 64.0, 1.3 * ln_k);
        assert!((0..20).all(|s| w.step(s, &disagreeing).is_none()));
    }

    #[test]
    fn uniform_and_one_prototype_and_rank() {
        let ln_k = 64f32.ln();
        let mut w = CollapseWatch::new(64, 0);
        let uniform = metrics(ln_k, ln_k, 1.0 / 64.0, ln_k);
        let mut got = Vec::new();
        for s in 0..10 {
            got.extend(w.step(s, &uniform));
        }
        assert_eq!(got.len(), 2, "{got:?}"); // uniform, then input-independent
        assert!(got[0].contains("close to uniform"));
        let mut w = CollapseWatch::new(64, 0);
        let one = metrics(0.01, 0.3, 0.9, 0.5);
        let got: Vec<String> = (0..10).filter_map(|s| w.step(s, &one)).collect();
        assert_eq!(got.len(), 1);
        assert!(got[0].contains("one prototype holds 90%"));
        let d = ProtoDiag {
            rankme: 1.1,
            images: 100,
            used: 1,
            ..Default::default()
        };
        let msg = w.diag(3, &d).expect("rank collapse");
        assert!(msg.contains("RankMe") && msg.contains("1.10"));
        // One prototype was reported already; the rank warning is not repeated.
        assert_eq!(w.diag(4, &d), None);
    }

    #[test]
    fn below_init_is_said_plainly() {
        let none = AntiCollapseInUse::default();
        assert_eq!(below_init_warning(20, 0.5, 0.4, &[], none), None);
        let m = below_init_warning(20, 0.464, 0.528, &[CollapseKind::Uniform], none).unwrap();
        assert!(
            m.contains("WORSE") && m.contains("46.4%") && m.contains("52.8%"),
            "{m}"
        );
        assert!(
            m.contains("--centering sinkhorn") && m.contains("--koleo 0.1"),
            "{m}"
        );
    }

    #[test]
    fn below_init_advice_follows_the_run() {
        let both = AntiCollapseInUse {
            sinkhorn: true,
            koleo: true,
        };
        // A collapsed run that already balances and spreads is not told to do so again.
        let m = below_init_warning(20, 0.2, 0.3, &[CollapseKind::OnePrototype], both).unwrap();
        assert!(m.contains("one prototype"), "{m}");
        assert!(
            !m.contains("--centering sinkhorn") && !m.contains("--koleo 0.1"),
            "{m}"
        );
        assert!(m.contains("fewer --prototypes"), "{m}");
        // No collapse seen: the advice says so and points at the linear probe instead.
        let m = below_init_warning(20, 0.197, 0.217, &[], both).unwrap();
        assert!(
            m.contains("No collapse was detected") && m.contains("eval linear"),
            "{m}"
        );
        assert!(!m.contains("Try:"), "{m}");
    }
}
