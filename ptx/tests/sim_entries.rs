//! The host entry points (`sim::launch_entry`): parameters packed as 64-bit words reach the
//! kernel body exactly as typed arguments do, for every parameter type the manifest uses.
mod common;
use common::*;
use dinovmf_ptx::kernels::gemm::{gemm, GemmShape};
use dinovmf_ptx::kernels::optim;
use dinovmf_ptx::sim::launch_entry;

fn ptr<T>(v: &mut [T]) -> u64 {
    v.as_mut_ptr() as usize as u64
}

#[test]
fn gemm_by_name_equals_the_typed_body() {
    let (m, n, k) = (70, 33, 19);
    let mut r = rng(7);
    let a = rand_vec(&mut r, m * k, -1.0, 1.0);
    let bm = rand_vec(&mut r, n * k, -1.0, 1.0);
    let bias = rand_vec(&mut r, n, -1.0, 1.0);
    let mut s = GemmShape::plain(m, n, k, false, true);
    s.alpha = 0.75;
    let mut want = poison(m * n);
    launch("gemm_nt_f32", s.grid(1), |b| {
        gemm::<_, f32, f32, false, true>(b, &mut want, &a, &bm, Some(&bias), &s)
    });
    let mut got = poison(m * n);
    let (mut a2, mut b2, mut bias2) = (a.clone(), bm.clone(), bias.clone());
    let w = |x: usize| x as u64;
    let args = [
        ptr(&mut got),
        ptr(&mut a2),
        ptr(&mut b2),
        ptr(&mut bias2),
        w(m * k),
        w(n * k),
        w(m * n),
        w(m),
        w(n),
        w(k),
        w(k),
        w(k),
        w(n),
        1,
        0,
        0,
        0,
        0,
        0,
        0,
        0.75f32.to_bits() as u64,
        0,
    ];
    assert!(unsafe { launch_entry("gemm_nt_f32", s.grid(1), &args) });
    assert_eq!(got, want, "bit-identical to the typed launch");
}

#[test]
fn f64_and_u64_parameters_arrive_intact() {
    let n = 300;
    let mut r = rng(8);
    let p0 = rand_vec(&mut r, n, -1.0, 1.0);
    let g = rand_vec(&mut r, n, -1.0, 1.0);
    let m0 = rand_vec(&mut r, n, -0.1, 0.1);
    let v0 = rand_vec(&mut r, n, 0.01, 0.1);
    let hp = dinovmf_core::optim::AdamW {
        beta1: 0.8,
        beta2: 0.95,
        eps: 1e-7,
    };
    let (mut pw, mut mw, mut vw) = (p0.clone(), m0.clone(), v0.clone());
    launch("adamw", grid1("adamw", n), |b| {
        optim::adamw(b, &mut pw, &g, &mut mw, &mut vw, n, &hp, 3e-3, 0.04, 7)
    });
    let (mut pg, mut mg, mut vg, mut g2) = (p0, m0, v0, g.clone());
    let args = [
        ptr(&mut pg),
        ptr(&mut g2),
        ptr(&mut mg),
        ptr(&mut vg),
        n as u64,
        3e-3f64.to_bits(),
        0.04f64.to_bits(),
        0.8f64.to_bits(),
        0.95f64.to_bits(),
        1e-7f64.to_bits(),
        7,
    ];
    assert!(unsafe { launch_entry("adamw", grid1("adamw", n), &args) });
    assert_eq!((pg, mg, vg), (pw, mw, vw));
}

#[test]
fn unknown_names_and_wrong_arities_run_nothing() {
    let mut x = vec![1.0f32; 4];
    let args = [ptr(&mut x), 2.0f32.to_bits() as u64];
    assert!(!unsafe { launch_entry("no_such_kernel", [1, 1, 1], &args) });
    assert!(!unsafe { launch_entry("fill", [1, 1, 1], &args) });
    assert_eq!(x, vec![1.0; 4]);
    let args = [ptr(&mut x), 2.0f32.to_bits() as u64, 3];
    assert!(unsafe { launch_entry("fill", [1, 1, 1], &args) });
    assert_eq!(x, vec![2.0, 2.0, 2.0, 1.0]);
}
