//! The simulator's launch options: only the corner blocks, and blocks and threads in a seeded
//! shuffled order. A kernel whose result depends on the order of its blocks (legal on the
//! simulator's fixed order, wrong on a GPU) must give a different result under some shuffle;
//! the real kernels must not.
mod common;
use common::*;
use dinovmf_ptx::block::Block;
use dinovmf_ptx::kernels::{elementwise, rows};
use dinovmf_ptx::sim::{self, block_list, Blocks, Order, SimOptions};

#[test]
fn corner_blocks_are_the_first_and_last_along_each_dimension() {
    let b = block_list([394, 7, 1], &SimOptions::corners());
    assert_eq!(b, vec![[0, 0, 0], [393, 0, 0], [0, 6, 0], [393, 6, 0]]);
    assert_eq!(
        block_list([1, 1, 1], &SimOptions::corners()),
        vec![[0, 0, 0]]
    );
    assert_eq!(block_list([3, 2, 2], &SimOptions::corners()).len(), 8);
    assert_eq!(block_list([5, 3, 2], &SimOptions::exhaustive()).len(), 30);
}

#[test]
fn a_shuffle_is_a_seeded_permutation_of_every_block() {
    let grid = [13, 4, 3];
    let fixed = block_list(grid, &SimOptions::exhaustive());
    let a = block_list(grid, &SimOptions::shuffled(7));
    let b = block_list(grid, &SimOptions::shuffled(7));
    let c = block_list(grid, &SimOptions::shuffled(8));
    assert_eq!(a, b, "the same seed gives the same order");
    assert_ne!(a, fixed, "a shuffle of 156 blocks is not the identity");
    assert_ne!(a, c, "another seed, another order");
    let mut sorted = a.clone();
    sorted.sort_by_key(|x| (x[2], x[1], x[0]));
    assert_eq!(sorted, fixed, "every block exactly once");
    let corners = SimOptions {
        blocks: Blocks::Corners,
        order: Order::Shuffled { seed: 3 },
    };
    let mut cs = block_list(grid, &corners);
    cs.sort_by_key(|x| (x[2], x[1], x[0]));
    assert_eq!(cs, block_list(grid, &SimOptions::corners()));
}

/// A toy "prefix sum" that is wrong on a GPU: block `i` reads the running total block `i - 1`
/// left in global memory, which only works if blocks run in order.
fn chained_prefix(opts: &SimOptions, n_blocks: u32) -> Vec<f32> {
    let mut out = vec![0f32; n_blocks as usize];
    let p = out.as_mut_ptr() as usize;
    sim::launch_with([n_blocks, 1, 1], 32, 0, opts, |b| {
        let i = b.dims().bid[0] as usize;
        b.each0(|t, _| {
            if t == 0 {
                // SAFETY: `i < n_blocks`; blocks run one at a time in the simulator.
                unsafe {
                    let o = p as *mut f32;
                    let prev = if i == 0 { 0.0 } else { *o.add(i - 1) };
                    *o.add(i) = prev + 1.0;
                }
            }
        });
    });
    out
}

/// Another order dependence, between threads of one phase: thread `t` reads what thread
/// `t - 1` wrote to global memory in the same phase.
fn chained_threads(opts: &SimOptions) -> Vec<f32> {
    let mut out = vec![0f32; 64];
    let p = out.as_mut_ptr() as usize;
    sim::launch_with([1, 1, 1], 64, 0, opts, |b| {
        b.each0(|t, _| {
            let t = t as usize;
            // SAFETY: `t < 64`; threads run one at a time in the simulator.
            unsafe {
                let o = p as *mut f32;
                let prev = if t == 0 { 0.0 } else { *o.add(t - 1) };
                *o.add(t) = prev + 1.0;
            }
        });
    });
    out
}

#[test]
fn a_block_order_dependent_kernel_is_caught_by_a_shuffle() {
    let want: Vec<f32> = (1..=40).map(|i| i as f32).collect();
    // The fixed order hides the bug ...
    assert_eq!(chained_prefix(&SimOptions::exhaustive(), 40), want);
    // ... every one of a few shuffles shows it.
    for seed in 0..4 {
        assert_ne!(
            chained_prefix(&SimOptions::shuffled(seed), 40),
            want,
            "seed {seed} ran the blocks in order"
        );
    }
}

#[test]
fn a_thread_order_dependent_phase_is_caught_by_a_shuffle() {
    let want: Vec<f32> = (1..=64).map(|i| i as f32).collect();
    assert_eq!(chained_threads(&SimOptions::exhaustive()), want);
    for seed in 0..4 {
        assert_ne!(chained_threads(&SimOptions::shuffled(seed)), want);
    }
}

#[test]
fn real_kernels_do_not_depend_on_block_or_thread_order() {
    let mut r = rng(11);
    let (n, d) = (37usize, 70usize);
    let x = rand_vec(&mut r, n * d, -2.0, 2.0);
    let gamma = rand_vec(&mut r, d, 0.5, 1.5);
    let beta = rand_vec(&mut r, d, -0.5, 0.5);
    let k = dinovmf_ptx::manifest::kernel("layernorm_forward").unwrap();
    let grid = grid_rows("layernorm_forward", n);
    let run = |opts: &SimOptions| {
        let (mut y, mut mean, mut rstd) = (poison(n * d), poison(n), poison(n));
        sim::launch_with(grid, k.block, 0, opts, |b| {
            rows::layernorm_forward(
                b, &mut y, &mut mean, &mut rstd, &x, &gamma, &beta, n, d, 1e-6,
            )
        });
        (y, mean, rstd)
    };
    let fixed = run(&SimOptions::exhaustive());
    assert!(fixed.0.iter().all(|v| v.is_finite()));
    for seed in 0..3 {
        let s = run(&SimOptions::shuffled(seed));
        // Bit-identical: the same arithmetic in every order.
        assert_eq!(
            s.0.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
            fixed.0.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
        );
        assert_eq!(s.1, fixed.1);
        assert_eq!(s.2, fixed.2);
    }
    let xs = rand_vec(&mut r, 1000, -3.0, 3.0);
    let gelu = |opts: &SimOptions| {
        let mut y = poison(1000);
        sim::launch_with(grid1("gelu_forward", 1000), 256, 0, opts, |b| {
            elementwise::gelu_forward(b, &mut y, &xs, 1000)
        });
        y
    };
    let g0 = gelu(&SimOptions::exhaustive());
    assert_eq!(gelu(&SimOptions::shuffled(5)), g0);
}

#[test]
fn corner_launches_write_only_the_corner_blocks() {
    let n = 256 * 10 + 17;
    let x = vec![1.0f32; n];
    let mut y = poison(n);
    sim::launch_with(
        grid1("gelu_forward", n),
        256,
        0,
        &SimOptions::corners(),
        |b| elementwise::gelu_forward(b, &mut y, &x, n),
    );
    let written: Vec<bool> = y.iter().map(|v| !v.is_nan()).collect();
    assert!(written[..256].iter().all(|&w| w), "first block");
    assert!(
        written[256 * 10..].iter().all(|&w| w),
        "last (partial) block"
    );
    assert!(
        written[256..256 * 10].iter().all(|&w| !w),
        "middle blocks skipped"
    );
}
