//! The verification report: one row per kernel and size, the comparison that fills it, and the
//! printed table.
use super::tolerance::Tol;

/// One line of the report.
#[derive(Clone, Debug)]
pub struct Row {
    pub kernel: String,
    pub size: String,
    pub max_abs: f64,
    /// `max |err| / max(|want|, atol)`.
    pub max_rel: f64,
    pub rtol: f64,
    pub atol: f64,
    pub ok: bool,
    /// Why it failed, when it did not just miss the tolerance.
    pub note: String,
}

/// `|got - want| <= atol + rtol |want|` everywhere, no NaN, equal lengths.
pub fn compare(kernel: &str, size: &str, got: &[f32], want: &[f64], tol: Tol) -> Row {
    let Tol { rtol, atol } = tol;
    let mut row = Row {
        kernel: kernel.to_string(),
        size: size.to_string(),
        max_abs: 0.0,
        max_rel: 0.0,
        rtol,
        atol,
        ok: got.len() == want.len(),
        note: String::new(),
    };
    if !row.ok {
        row.note = format!("{} values, expected {}", got.len(), want.len());
    }
    let mut nan = 0;
    for (&g, &w) in got.iter().zip(want) {
        let g = g as f64;
        if g.is_nan() != w.is_nan() {
            nan += 1;
            row.ok = false;
            continue;
        }
        if g == w || (g.is_nan() && w.is_nan()) {
            continue;
        }
        let err = (g - w).abs();
        row.max_abs = row.max_abs.max(err);
        row.max_rel = row
            .max_rel
            .max(err / w.abs().max(atol).max(f64::MIN_POSITIVE));
        if err.is_nan() || err > atol + rtol * w.abs() {
            row.ok = false;
        }
    }
    if nan > 0 {
        row.note = format!("{nan} NaN (unwritten or invalid) values");
    }
    row
}

/// The table (one row per kernel and size).
pub fn print_rows(rows: &[Row], out: &mut dyn std::io::Write) -> std::io::Result<()> {
    writeln!(
        out,
        "{:<26} {:<22} {:>11} {:>11} {:>18} {:>4}",
        "kernel", "size", "max abs err", "max rel err", "tolerance", "ok"
    )?;
    for r in rows {
        writeln!(
            out,
            "{:<26} {:<22} {:>11.3e} {:>11.3e} {:>18} {:>4}{}",
            r.kernel,
            r.size,
            r.max_abs,
            r.max_rel,
            format!("rtol {:.0e} atol {:.0e}", r.rtol, r.atol),
            if r.ok { "ok" } else { "FAIL" },
            if r.note.is_empty() {
                String::new()
            } else {
                format!("  ({})", r.note)
            }
        )?;
    }
    Ok(())
}
