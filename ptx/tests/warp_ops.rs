//! The warp-level primitives of the simulator (shuffles, `mma.m16n8k16`, `ldmatrix`,
//! `cp.async`) against the PTX ISA's definitions, restated here independently of the
//! simulator's own index functions. Values are chosen so that any misplaced element shows:
//! every element of a matrix is distinct and exactly representable, and products sum exactly.
mod common;

use dinovmf_ptx::block::{Block, CpAsync, MmaIn, Shared, Shfl};
use dinovmf_ptx::elem::{f16_bits_to_f32, Bf16};
use dinovmf_ptx::sim;
use half::f16;
use rand::Rng;

fn enc(x: f32, ty: MmaIn) -> u16 {
    match ty {
        MmaIn::Bf16 => {
            let b = Bf16::from_f32(x);
            assert_eq!(b.to_f32(), x, "{x} is not exact in bf16");
            b.0
        }
        MmaIn::F16 => {
            let h = f16::from_f32(x);
            assert_eq!(h.to_f32(), x, "{x} is not exact in f16");
            h.to_bits()
        }
    }
}

fn dec(h: u16, ty: MmaIn) -> f32 {
    match ty {
        MmaIn::Bf16 => Bf16(h).to_f32(),
        MmaIn::F16 => f16_bits_to_f32(h),
    }
}

fn pack(lo: u16, hi: u16) -> u32 {
    lo as u32 | (hi as u32) << 16
}

#[test]
fn f16_decoding_matches_half_for_every_bit_pattern() {
    for h in 0..=u16::MAX {
        let (got, want) = (f16_bits_to_f32(h), f16::from_bits(h).to_f32());
        assert!(
            got.to_bits() == want.to_bits() || (got.is_nan() && want.is_nan()),
            "{h:#06x}: {got} vs {want}"
        );
    }
}

#[test]
fn bf16_rounds_to_nearest_even() {
    let mut r = common::rng(1);
    for _ in 0..100_000 {
        let x: f32 = f32::from_bits(r.gen::<u32>() & 0xbfff_ffff); // finite, mixed exponents
        let got = Bf16::from_f32(x).to_f32() as f64;
        // The two bf16 neighbours of x and the tie rule.
        let lo = f32::from_bits(x.to_bits() & 0xffff_0000) as f64;
        let hi = f32::from_bits((x.to_bits() & 0xffff_0000) + 0x1_0000) as f64;
        let x64 = x as f64;
        let want = if (x64 - lo).abs() < (hi - x64).abs() {
            lo
        } else if (x64 - lo).abs() > (hi - x64).abs() {
            hi
        } else if (x.to_bits() >> 16) & 1 == 0 {
            lo
        } else {
            hi
        };
        assert_eq!(got, want, "{x:e}");
    }
    assert!(Bf16::from_f32(f32::NAN).to_f32().is_nan());
}

#[test]
fn shuffles_match_their_definition() {
    for mode in [Shfl::Idx, Shfl::Up, Shfl::Down, Shfl::Xor] {
        for arg in [0u32, 1, 3, 7, 16, 31] {
            sim::launch([1, 1, 1], 64, 0, |b| {
                let mut l = b.local((0u32, 0u32));
                b.each(&mut l, |t, s, _| s.0 = 1000 + 37 * t);
                // Idx: a lane-dependent source; the others: the same offset everywhere.
                b.shfl(
                    &mut l,
                    mode,
                    |s| s.0,
                    |t, _| match mode {
                        Shfl::Idx => (t * 5 + arg) % 64, // high bits beyond lane 31 ignored
                        _ => arg,
                    },
                    |s, v| s.1 = v,
                );
                b.each(&mut l, |t, s, _| {
                    let (warp, lane) = (t / 32, (t % 32) as i64);
                    let src = match mode {
                        Shfl::Idx => (((t * 5 + arg) % 64) % 32) as i64,
                        Shfl::Up => lane - arg as i64,
                        Shfl::Down => lane + arg as i64,
                        Shfl::Xor => lane ^ arg as i64,
                    };
                    let src = if (0..32).contains(&src) { src } else { lane };
                    let want = 1000 + 37 * (warp * 32 + src as u32);
                    assert_eq!(s.1, want, "{mode:?} arg {arg} thread {t}");
                });
            });
        }
    }
}

/// The A (16 x 16), B (16 x 8, `[k][n]`) and C (16 x 8) registers of every lane, built from
/// the PTX ISA's fragment tables.
#[derive(Clone, Copy)]
struct Frag {
    a: [u32; 4],
    b: [u32; 2],
    c: [f32; 4],
}

fn lane_frag(lane: usize, a: &[[u16; 16]; 16], b: &[[u16; 8]; 16], c: &[[f32; 8]; 16]) -> Frag {
    let (g, q) = (lane / 4, lane % 4);
    Frag {
        // a0,a1: (g, 2q..); a2,a3: (g+8, 2q..); a4,a5: (g, 2q+8..); a6,a7: (g+8, 2q+8..).
        a: [
            pack(a[g][2 * q], a[g][2 * q + 1]),
            pack(a[g + 8][2 * q], a[g + 8][2 * q + 1]),
            pack(a[g][2 * q + 8], a[g][2 * q + 9]),
            pack(a[g + 8][2 * q + 8], a[g + 8][2 * q + 9]),
        ],
        // b0,b1: k = 2q.., n = g; b2,b3: k = 2q+8.., n = g.
        b: [
            pack(b[2 * q][g], b[2 * q + 1][g]),
            pack(b[2 * q + 8][g], b[2 * q + 9][g]),
        ],
        // c0,c1: (g, 2q..); c2,c3: (g+8, 2q..).
        c: [
            c[g][2 * q],
            c[g][2 * q + 1],
            c[g + 8][2 * q],
            c[g + 8][2 * q + 1],
        ],
    }
}

fn check_mma(ty: MmaIn, a: [[u16; 16]; 16], b: [[u16; 8]; 16], c: [[f32; 8]; 16], exact: bool) {
    sim::launch([1, 1, 1], 64, 0, |blk| {
        let mut l = blk.local(Frag {
            a: [0; 4],
            b: [0; 2],
            c: [0.0; 4],
        });
        blk.each(&mut l, |t, f, _| {
            *f = lane_frag(t as usize % 32, &a, &b, &c)
        });
        blk.mma_m16n8k16(&mut l, ty, |f| f.a, |f| f.b, |f| &mut f.c);
        blk.each(&mut l, |t, f, _| {
            let (g, q) = ((t % 32) as usize / 4, (t % 32) as usize % 4);
            let at = [
                (g, 2 * q),
                (g, 2 * q + 1),
                (g + 8, 2 * q),
                (g + 8, 2 * q + 1),
            ];
            for (e, &(r, col)) in at.iter().enumerate() {
                let mut want = c[r][col] as f64;
                for k in 0..16 {
                    want += dec(a[r][k], ty) as f64 * dec(b[k][col], ty) as f64;
                }
                let got = f.c[e] as f64;
                if exact {
                    assert_eq!(got, want, "{ty:?} D[{r}][{col}] (thread {t}, c{e})");
                } else {
                    // One f32 rounding of the f64 sum.
                    assert!(
                        (got - want).abs() <= want.abs() * 2f64.powi(-24),
                        "{ty:?} D[{r}][{col}]: {got} vs {want}"
                    );
                }
            }
        });
    });
}

#[test]
fn mma_m16n8k16_layouts_are_the_isa_ones() {
    for ty in [MmaIn::Bf16, MmaIn::F16] {
        // Distinct exact entries; all sums exact in f32 (below 2^24).
        let a: [[u16; 16]; 16] =
            core::array::from_fn(|i| core::array::from_fn(|k| enc((i * 16 + k) as f32, ty)));
        let b: [[u16; 8]; 16] = core::array::from_fn(|k| {
            core::array::from_fn(|n| enc(((k * 8 + n) as f32 + 1.0) / 64.0, ty))
        });
        let c: [[f32; 8]; 16] = core::array::from_fn(|i| {
            core::array::from_fn(|n| (i * 8 + n) as f32 * 0.5 + 1.0 / 128.0)
        });
        check_mma(ty, a, b, c, true);
        // One-hot A: D[r][n] = B[k][n] + C[r][n] picks out exactly one B element per row, so a
        // misplaced A or B element cannot cancel out.
        for (r, k) in [(0, 0), (5, 11), (9, 3), (15, 15), (8, 8)] {
            let mut a1 = [[enc(0.0, ty); 16]; 16];
            a1[r][k] = enc(1.0, ty);
            check_mma(ty, a1, b, c, true);
        }
    }
}

#[test]
fn mma_m16n8k16_random_values_round_once() {
    let mut r = common::rng(7);
    for ty in [MmaIn::Bf16, MmaIn::F16] {
        let mut v = || {
            let x: f32 = r.gen_range(-2.0..2.0);
            match ty {
                MmaIn::Bf16 => Bf16::from_f32(x).0,
                MmaIn::F16 => f16::from_f32(x).to_bits(),
            }
        };
        let a: [[u16; 16]; 16] = core::array::from_fn(|_| core::array::from_fn(|_| v()));
        let b: [[u16; 8]; 16] = core::array::from_fn(|_| core::array::from_fn(|_| v()));
        let c: [[f32; 8]; 16] =
            core::array::from_fn(|i| core::array::from_fn(|n| (i as f32 - n as f32) * 0.37));
        check_mma(ty, a, b, c, false);
    }
}

/// Smem holding 4 distinct 8 x 8 matrices of 16-bit values, rows at scattered aligned places:
/// row `r` of matrix `i` at word `row_word(i, r)`, value `i * 256 + r * 16 + c + 1`.
fn row_word(i: usize, r: usize) -> usize {
    ((i * 8 + (r * 5 + i) % 8) * 2 + 1) * 4 // stride 8 words, odd 4-word slots
}

fn ldm_value(i: usize, r: usize, c: usize) -> u16 {
    (i * 256 + r * 16 + c + 1) as u16
}

fn check_ldmatrix<const N: usize>(trans: bool) {
    sim::launch([1, 1, 1], 64, 512, |b| {
        b.each0(|t, sm| {
            if t < 32 {
                let (i, r) = (t as usize / 8, t as usize % 8);
                for j in 0..4 {
                    let v = pack(ldm_value(i, r, 2 * j), ldm_value(i, r, 2 * j + 1));
                    sm.st_bits(row_word(i, r) + j, v);
                }
            }
        });
        b.sync();
        let mut l = b.local([0u32; N]);
        // Lanes beyond the first 8 N give an address the instruction ignores.
        b.ldmatrix(
            &mut l,
            trans,
            |t, _| {
                let lane = t as usize % 32;
                if lane < 8 * N {
                    row_word(lane / 8, lane % 8)
                } else {
                    0
                }
            },
            |s| s,
        );
        b.each(&mut l, |t, s, _| {
            let lane = t as usize % 32;
            for (i, &reg) in s.iter().enumerate() {
                // Non-trans: row lane/4, cols 2(lane%4), +1. Trans: rows 2(lane%4), +1 of col lane/4.
                let (lo, hi) = if trans {
                    (
                        ldm_value(i, 2 * (lane % 4), lane / 4),
                        ldm_value(i, 2 * (lane % 4) + 1, lane / 4),
                    )
                } else {
                    (
                        ldm_value(i, lane / 4, 2 * (lane % 4)),
                        ldm_value(i, lane / 4, 2 * (lane % 4) + 1),
                    )
                };
                assert_eq!(
                    reg,
                    pack(lo, hi),
                    "x{N} trans {trans}: thread {t} matrix {i}"
                );
            }
        });
    });
}

#[test]
fn ldmatrix_layouts_are_the_isa_ones() {
    for trans in [false, true] {
        check_ldmatrix::<1>(trans);
        check_ldmatrix::<2>(trans);
        check_ldmatrix::<4>(trans);
    }
}

#[test]
#[should_panic(expected = "smem race")]
fn ldmatrix_without_a_barrier_after_the_stores_is_a_race() {
    sim::launch([1, 1, 1], 32, 512, |b| {
        b.each0(|t, sm| {
            let (i, r) = (t as usize / 8, t as usize % 8);
            for j in 0..4 {
                sm.st_bits(row_word(i, r) + j, 1);
            }
        });
        let mut l = b.local([0u32; 4]);
        b.ldmatrix(
            &mut l,
            false,
            |t, _| row_word(t as usize / 8, (t as usize + 1) % 8),
            |s| s,
        );
    });
}

/// Each of 64 threads copies 4, 8 and 16 bytes of `src` (distinct words) in two groups; after
/// `wait_group 1` the first group has landed, after `wait_group 0` both; a barrier later every
/// thread reads another thread's words.
#[test]
fn cp_async_groups_land_in_order_and_are_visible_after_a_barrier() {
    #[repr(align(16))]
    struct Src([u32; 64 * 8]);
    let src = Src(core::array::from_fn(|i| 0xA000_0000 + i as u32 * 3));
    let src = &src.0;
    sim::launch([1, 1, 1], 64, 64 * 8, |b| {
        b.each0(|t, sm| {
            let o = t as usize * 8;
            sm.cp_async(o, &src[o..], CpAsync::Ca4);
            sm.cp_async(o + 2, &src[o + 2..], CpAsync::Ca8);
            sm.cp_async_commit();
            let op = if t % 2 == 0 {
                CpAsync::Ca16
            } else {
                CpAsync::Cg16
            };
            sm.cp_async(o + 4, &src[o + 4..], op);
            sm.cp_async_commit();
            sm.cp_async_wait::<1>();
            assert_eq!(sm.ld_bits(o), src[o]);
            assert_eq!(sm.ld_bits(o + 3), src[o + 3]);
            sm.cp_async_wait::<0>();
            assert_eq!(sm.ld_bits(o + 7), src[o + 7]);
            sm.st_bits(o + 1, 7); // word 1 was never copied
        });
        b.sync();
        b.each0(|t, sm| {
            let o = ((t as usize + 1) % 64) * 8;
            for j in 0..8 {
                let want = if j == 1 { 7 } else { src[o + j] };
                assert_eq!(sm.ld_bits(o + j), want, "thread {t} word {j}");
            }
        });
    });
}

#[test]
#[should_panic(expected = "in flight")]
fn reading_a_cp_async_destination_before_waiting_is_caught() {
    #[repr(align(16))]
    struct Src([u32; 4]);
    let src = Src([1, 2, 3, 4]);
    sim::launch([1, 1, 1], 32, 128, |b| {
        b.each0(|t, sm| {
            if t == 0 {
                sm.cp_async(0, &src.0, CpAsync::Cg16);
                sm.cp_async_commit();
                sm.cp_async_wait::<1>(); // the group may still be in flight
                let _ = sm.ld_bits(2);
            }
        });
    });
}

#[test]
#[should_panic(expected = "never waited for")]
fn a_cp_async_never_waited_for_is_caught() {
    #[repr(align(16))]
    struct Src([u32; 4]);
    let src = Src([1, 2, 3, 4]);
    sim::launch([1, 1, 1], 32, 128, |b| {
        b.each0(|t, sm| {
            if t == 3 {
                sm.cp_async(4, &src.0, CpAsync::Ca16);
            }
        });
    });
}

#[test]
#[should_panic(expected = "not 16-byte aligned")]
fn a_misaligned_cp_async_source_is_caught() {
    #[repr(align(16))]
    struct Src([u32; 8]);
    let src = Src([0; 8]);
    sim::launch([1, 1, 1], 32, 128, |b| {
        b.each0(|t, sm| {
            if t == 0 {
                sm.cp_async(0, &src.0[1..], CpAsync::Ca16);
            }
        });
    });
}
