//! The state a verification run carries through its cases: the device, one random stream and
//! the rows so far, with the helpers every case uses (random inputs, uploads, poisoned
//! outputs, sampled read-backs, checks).
use anyhow::Result;
use rand_chacha::ChaCha8Rng;

use super::report::{compare, Row};
use super::sample::{nonzero_uniform, runs};
use super::tolerance::Tol;
use crate::backend::cuda::device::{Buf, Device, Elem, Gpu};

pub struct V<'a, D: Device> {
    pub gpu: &'a mut Gpu<D>,
    pub rng: ChaCha8Rng,
    pub rows: Vec<Row>,
}

impl<D: Device> V<'_, D> {
    /// `n` random values in `[lo, hi)`, never exactly zero.
    pub fn rv(&mut self, n: usize, lo: f32, hi: f32) -> Vec<f32> {
        nonzero_uniform(&mut self.rng, n, lo, hi)
    }
    pub fn up<T: Elem>(&mut self, x: &[T]) -> Result<Buf<T>> {
        self.gpu.alloc_from(x)
    }
    /// A poisoned (NaN) output buffer.
    pub fn out(&mut self, n: usize) -> Result<Buf<f32>> {
        self.gpu.alloc(n)
    }
    pub fn get<T: Elem>(&mut self, b: Buf<T>) -> Result<Vec<T>> {
        self.gpu.to_vec(b)
    }
    /// Entries `(r, c)` for `r` in `rows`, `c` in `cols` of a row-major buffer of width `width`,
    /// as runs of elements.
    pub fn cells(rows: &[usize], cols: &[usize], width: usize) -> Vec<(usize, usize)> {
        let mut out = Vec::new();
        for &r in rows {
            out.extend(runs(cols).into_iter().map(|(s, l)| (r * width + s, l)));
        }
        out
    }
    /// A buffer of `len` elements whose sampled `runs` are poisoned (NaN).
    pub fn out_at(&mut self, len: usize, runs: &[(usize, usize)]) -> Result<Buf<f32>> {
        let b = self.gpu.alloc::<f32>(len)?;
        for &(s, l) in runs {
            self.gpu.upload(b.sub(s, l), &vec![f32::NAN; l])?;
        }
        Ok(b)
    }
    /// The sampled `runs` of `b`, concatenated.
    pub fn get_at(&mut self, b: Buf<f32>, runs: &[(usize, usize)]) -> Result<Vec<f32>> {
        let mut out = Vec::new();
        for &(s, l) in runs {
            out.extend(self.gpu.to_vec(b.sub(s, l))?);
        }
        Ok(out)
    }
    /// One row: `got` against the f64 reference `want` within `tol`.
    pub fn check(&mut self, kernel: &str, size: String, got: &[f32], want: &[f64], tol: Tol) {
        self.rows.push(compare(kernel, &size, got, want, tol));
    }
    /// Runs one case; an error (a launch the host refused, a trapped kernel) becomes a failed
    /// row naming the case and the error, and the run goes on (a trapped kernel leaves a CUDA
    /// context unusable, so later cases then fail too, each saying why).
    pub fn case(&mut self, what: &str, f: impl FnOnce(&mut Self) -> Result<()>) {
        if let Err(e) = self.gpu.dev.bind().and_then(|_| f(self)) {
            self.rows.push(Row {
                kernel: what.to_string(),
                size: "-".into(),
                max_abs: f64::NAN,
                max_rel: f64::NAN,
                rtol: 0.0,
                atol: 0.0,
                ok: false,
                note: format!("{e:#}"),
            });
        }
    }
}
