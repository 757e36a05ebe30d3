//! Per-step schedules against the DINO `cosine_scheduler` definition written out directly in f64.
use dinovmf_suite::core_math::schedule::{CosineSchedule, Recipe, WarmupConstant};
use std::f64::consts::PI;

/// The whole schedule as DINO defines it: `linspace(start, base, W)` then
/// `final + 0.5 (base - final) (1 + cos(pi * arange(N) / N))`.
fn dino_table(base: f64, fin: f64, total: usize, warmup: usize, start: f64) -> Vec<f64> {
    let mut v = Vec::with_capacity(total);
    for i in 0..warmup {
        v.push(if warmup == 1 {
            start
        } else {
            start + (base - start) * i as f64 / (warmup - 1) as f64
        });
    }
    let n = total - warmup;
    for i in 0..n {
        v.push(fin + 0.5 * (base - fin) * (1.0 + (PI * i as f64 / n as f64).cos()));
    }
    v
}

fn close(a: f64, b: f64, tol: f64) -> bool {
    (a - b).abs() <= tol * a.abs().max(b.abs()).max(1e-300)
}

#[test]
fn cosine_matches_dino_definition_rel_1e14() {
    for &(base, fin, total, warmup, start) in &[
        (2.0, 0.1, 50usize, 7usize, 0.5),
        (5e-4, 1e-6, 1000, 100, 0.0),
        (0.04, 0.4, 333, 0, 0.0),
        (0.996, 1.0, 17, 1, 0.3),
        (1.0, 0.0, 10, 10, 0.2),
    ] {
        let s = CosineSchedule {
            base,
            final_value: fin,
            total_steps: total as u64,
            warmup_steps: warmup as u64,
            start_warmup: start,
        };
        let t = dino_table(base, fin, total, warmup, start);
        for (i, &want) in t.iter().enumerate() {
            let got = s.value(i as u64);
            assert!(
                close(got, want, 1e-14),
                "({base}, {fin}, {total}, {warmup}) step {i}: {got} vs {want} (rel 1e-14)"
            );
        }
        // Past the end the last value holds.
        assert_eq!(s.value(total as u64), t[total - 1]);
        assert_eq!(s.value(10 * total as u64), t[total - 1]);
    }
}

#[test]
fn lr_endpoints_monotone_and_continuous_at_warmup() {
    let r = Recipe::new(100, 20, 512);
    let s = r.lr();
    let peak = 5e-4 * 512.0 / 256.0;
    let (w, total) = (200u64, 2000u64);
    assert_eq!((s.warmup_steps, s.total_steps), (w, total));
    assert_eq!(s.value(0), 0.0);
    assert!(
        close(s.value(w - 1), peak, 1e-15) && close(s.value(w), peak, 1e-15),
        "peak at both sides of the boundary"
    );
    let last = s.value(total - 1);
    let want_last = 1e-6
        + 0.5 * (peak - 1e-6) * (1.0 + (PI * (total - w - 1) as f64 / (total - w) as f64).cos());
    assert!(
        close(last, want_last, 1e-12) && last > 1e-6 && last < 1e-6 + 1e-8,
        "last step {last}"
    );
    // Strictly up through the warm-up, strictly down after it.
    for i in 1..w {
        assert!(s.value(i) > s.value(i - 1), "warm-up not increasing at {i}");
    }
    for i in w + 1..total {
        assert!(s.value(i) < s.value(i - 1), "cosine not decreasing at {i}");
    }
    // Continuity: no step moves further than the larger of the two slopes allows.
    let max_jump =
        (peak / (w - 1) as f64).max(0.5 * PI * (peak - 1e-6) / (total - w) as f64) * (1.0 + 1e-12);
    for i in 1..total {
        let d = (s.value(i) - s.value(i - 1)).abs();
        assert!(d <= max_jump, "jump {d} at {i} > {max_jump}");
    }
}

#[test]
fn weight_decay_momentum_and_teacher_temp() {
    let r = Recipe::new(100, 10, 256);
    let total = r.total_steps();
    let (wd, m, tt) = (r.weight_decay(), r.teacher_momentum(), r.teacher_temp());
    assert!(close(wd.value(0), 0.04, 1e-14) && close(m.value(0), 0.996, 1e-14));
    for i in 1..total {
        assert!(
            wd.value(i) > wd.value(i - 1) && wd.value(i) < 0.4,
            "wd at {i}"
        );
        assert!(
            m.value(i) > m.value(i - 1) && m.value(i) < 1.0,
            "momentum at {i}"
        );
    }
    assert!(close(
        wd.value(total - 1),
        0.4 - 0.5 * 0.36 * (1.0 + (PI * (total - 1) as f64 / total as f64).cos()),
        1e-14
    ));
    // Teacher temperature: linspace 0.04 -> 0.07 over 30 epochs of steps, then constant.
    let w = 300u64;
    assert_eq!(tt.warmup_steps, w);
    assert_eq!(tt.value(0), 0.04);
    assert!(
        close(tt.value(w - 1), 0.07, 1e-15) && tt.value(w) == 0.07 && tt.value(total - 1) == 0.07
    );
    for i in 1..w {
        let want = 0.04 + 0.03 * i as f64 / (w - 1) as f64;
        assert!(
            close(tt.value(i), want, 1e-15) && tt.value(i) > tt.value(i - 1),
            "teacher temp at {i}"
        );
    }
    let at = r.at(5);
    assert_eq!(
        (at.lr, at.weight_decay, at.teacher_momentum, at.teacher_temp),
        (r.lr().value(5), wd.value(5), m.value(5), tt.value(5))
    );
    assert!(
        r.at(9).freeze_last_layer && !r.at(10).freeze_last_layer,
        "last layer frozen during epoch 0 only"
    );
}

#[test]
fn degenerate_schedules_are_defined() {
    let none = CosineSchedule {
        base: 1.0,
        final_value: 0.0,
        total_steps: 0,
        warmup_steps: 5,
        start_warmup: 0.0,
    };
    assert_eq!(none.value(3), 1.0);
    let all_warm = CosineSchedule {
        base: 1.0,
        final_value: 0.0,
        total_steps: 4,
        warmup_steps: 9,
        start_warmup: 0.25,
    };
    assert_eq!(
        (all_warm.value(0), all_warm.value(3), all_warm.value(7)),
        (0.25, 0.25 + 0.75 * 3.0 / 3.0, 1.0)
    );
    let no_warm = WarmupConstant {
        start: 0.04,
        end: 0.07,
        warmup_steps: 0,
    };
    assert_eq!(no_warm.value(0), 0.07);
    let one = WarmupConstant {
        start: 0.04,
        end: 0.07,
        warmup_steps: 1,
    };
    assert_eq!((one.value(0), one.value(1)), (0.04, 0.07));
}
