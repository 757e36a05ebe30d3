//! Host simulator of a kernel launch: every block of the grid, every thread of a block.
//!
//! A phase ([`Block::each`]) runs for thread 0, 1, ... in turn; barriers advance a phase
//! counter. Shared memory is poisoned (NaN) at block start and every access is checked: a read
//! of a word never written in this block, a read of a word another thread wrote in the same
//! phase, or a write to a word another thread read or wrote in the same phase (all of which
//! would be races or garbage on the GPU) panic with the offending index.
//!
//! [`SimOptions`] choose which blocks run (all, or only the corner blocks: first and last
//! along each grid dimension, where partial tiles are) and in which order blocks and the
//! threads of each phase run (fixed, or shuffled from a seed: a kernel whose result depends on
//! the order of blocks or of threads gives different results under different seeds).
use crate::block::{Block, Dims, Op, Shared, BFLY};
use alloc::vec;
use alloc::vec::Vec;
use core::cell::{Cell, RefCell};

const NONE: u32 = u32::MAX;
const MANY: u32 = u32::MAX - 1;

#[derive(Clone, Copy)]
struct Word {
    v: f32,
    written: bool,
    w_phase: u32,
    w_thread: u32,
    r_phase: u32,
    r_thread: u32,
}

/// Checked shared memory.
pub struct SimSmem {
    words: RefCell<Vec<Word>>,
    thread: Cell<u32>,
    phase: Cell<u32>,
}

impl Shared for SimSmem {
    fn ld(&self, i: usize) -> f32 {
        let mut w = self.words.borrow_mut();
        let n = w.len();
        let (t, ph) = (self.thread.get(), self.phase.get());
        let e = w
            .get_mut(i)
            .unwrap_or_else(|| panic!("smem read out of bounds: {i} >= {n} words"));
        assert!(e.written, "smem read of unwritten word {i} by thread {t}");
        assert!(
            !(e.w_phase == ph && e.w_thread != t),
            "smem race: thread {t} reads word {i} written by thread {} in the same phase",
            e.w_thread
        );
        if e.r_phase == ph {
            if e.r_thread != t {
                e.r_thread = MANY;
            }
        } else {
            e.r_phase = ph;
            e.r_thread = t;
        }
        e.v
    }
    fn st(&self, i: usize, v: f32) {
        let mut w = self.words.borrow_mut();
        let n = w.len();
        let (t, ph) = (self.thread.get(), self.phase.get());
        let e = w
            .get_mut(i)
            .unwrap_or_else(|| panic!("smem write out of bounds: {i} >= {n} words"));
        assert!(
            !(e.w_phase == ph && e.w_thread != t),
            "smem race: threads {} and {t} write word {i} in the same phase",
            e.w_thread
        );
        assert!(
            !(e.r_phase == ph && e.r_thread != t),
            "smem race: thread {t} writes word {i} read by another thread in the same phase"
        );
        e.v = v;
        e.written = true;
        e.w_phase = ph;
        e.w_thread = t;
    }
}

/// Which blocks of a grid a simulated launch runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Blocks {
    /// Every block.
    All,
    /// Only the blocks whose index along each dimension is the first or the last (at most 8):
    /// the first tiles and the partial last tiles of production-sized grids, in bounded time.
    Corners,
}

/// The order in which blocks, and the threads of each phase, run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Order {
    /// Blocks in x, then y, then z order; threads 0, 1, ... in each phase.
    Fixed,
    /// A permutation of the blocks and, per block, of the threads of each phase, drawn from
    /// the seed (the same seed gives the same order).
    Shuffled { seed: u64 },
}

/// How a simulated launch runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SimOptions {
    pub blocks: Blocks,
    pub order: Order,
}

impl SimOptions {
    /// Every block, in the fixed order (the default).
    pub const fn exhaustive() -> Self {
        SimOptions {
            blocks: Blocks::All,
            order: Order::Fixed,
        }
    }
    /// Only the corner blocks, in the fixed order.
    pub const fn corners() -> Self {
        SimOptions {
            blocks: Blocks::Corners,
            order: Order::Fixed,
        }
    }
    /// Every block, blocks and threads in an order drawn from `seed`.
    pub const fn shuffled(seed: u64) -> Self {
        SimOptions {
            blocks: Blocks::All,
            order: Order::Shuffled { seed },
        }
    }
}

impl Default for SimOptions {
    fn default() -> Self {
        Self::exhaustive()
    }
}

/// splitmix64: a small, well-mixed generator for the shuffles (no dependency in this crate).
struct Mix(u64);

impl Mix {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Fisher-Yates.
    fn shuffle<T>(&mut self, v: &mut [T]) {
        for i in (1..v.len()).rev() {
            let j = (self.next() % (i as u64 + 1)) as usize;
            v.swap(i, j);
        }
    }
}

/// The blocks a launch runs, in the order it runs them.
pub fn block_list(grid: [u32; 3], opts: &SimOptions) -> Vec<[u32; 3]> {
    let axis = |g: u32| -> Vec<u32> {
        match opts.blocks {
            Blocks::All => (0..g).collect(),
            Blocks::Corners if g > 1 => vec![0, g - 1],
            Blocks::Corners => vec![0],
        }
    };
    let (xs, ys, zs) = (axis(grid[0]), axis(grid[1]), axis(grid[2]));
    let mut out = Vec::with_capacity(xs.len() * ys.len() * zs.len());
    for &z in &zs {
        for &y in &ys {
            for &x in &xs {
                out.push([x, y, z]);
            }
        }
    }
    if let Order::Shuffled { seed } = opts.order {
        Mix(seed).shuffle(&mut out);
    }
    out
}

/// One simulated block.
pub struct Sim {
    dims: Dims,
    smem: SimSmem,
    /// The thread order of each phase; empty for 0, 1, ...
    perm: Vec<u32>,
    /// Draws a new thread order per phase (shuffled launches).
    mix: Option<Mix>,
}

impl Block for Sim {
    type Local<L: Copy> = Vec<L>;
    type Smem = SimSmem;

    fn dims(&self) -> Dims {
        self.dims
    }
    fn local<L: Copy>(&mut self, init: L) -> Vec<L> {
        vec![init; self.dims.bdim as usize]
    }
    fn each<L: Copy, F: FnMut(u32, &mut L, &SimSmem)>(&mut self, l: &mut Vec<L>, mut f: F) {
        if let Some(mix) = &mut self.mix {
            if self.perm.len() != l.len() {
                self.perm = (0..l.len() as u32).collect();
            }
            mix.shuffle(&mut self.perm);
            for &t in &self.perm {
                self.smem.thread.set(t);
                f(t, &mut l[t as usize], &self.smem);
            }
            return;
        }
        for (t, st) in l.iter_mut().enumerate() {
            self.smem.thread.set(t as u32);
            f(t as u32, st, &self.smem);
        }
    }
    fn sync(&mut self) {
        self.smem.phase.set(self.smem.phase.get() + 1);
    }
    fn warp_reduce<L: Copy, G: Fn(&mut L) -> &mut f32>(
        &mut self,
        l: &mut Vec<L>,
        op: Op,
        field: G,
    ) {
        assert!(
            l.len().is_multiple_of(32),
            "block size must be a multiple of 32"
        );
        for warp in l.chunks_mut(32) {
            let mut v: [f32; 32] = core::array::from_fn(|i| *field(&mut warp[i]));
            for m in BFLY {
                let prev = v;
                for (i, x) in v.iter_mut().enumerate() {
                    *x = op.apply(prev[i], prev[i ^ m as usize]);
                }
            }
            for (i, st) in warp.iter_mut().enumerate() {
                *field(st) = v[i];
            }
        }
    }
}

/// Runs `body` for every block of a `grid` of blocks of `block` threads with `smem_words` f32
/// words of shared memory (the size the GPU kernel declares, see `manifest.rs`).
pub fn launch(grid: [u32; 3], block: u32, smem_words: usize, body: impl FnMut(&mut Sim)) {
    launch_with(grid, block, smem_words, &SimOptions::exhaustive(), body)
}

/// [`launch`] running the blocks and in the order `opts` say.
pub fn launch_with(
    grid: [u32; 3],
    block: u32,
    smem_words: usize,
    opts: &SimOptions,
    mut body: impl FnMut(&mut Sim),
) {
    assert!(
        block > 0 && block <= 1024 && block.is_multiple_of(32),
        "bad block size {block}"
    );
    assert!(grid.iter().all(|&g| g > 0), "empty grid {grid:?}");
    let mut mix = match opts.order {
        Order::Fixed => None,
        Order::Shuffled { seed } => Some(Mix(seed ^ 0x5DEE_CE66_D1CE_4E5B)),
    };
    for bid in block_list(grid, opts) {
        let blank = Word {
            v: f32::NAN,
            written: false,
            w_phase: NONE,
            w_thread: NONE,
            r_phase: NONE,
            r_thread: NONE,
        };
        let mut sim = Sim {
            dims: Dims {
                bid,
                gdim: grid,
                bdim: block,
            },
            smem: SimSmem {
                words: RefCell::new(vec![blank; smem_words]),
                thread: Cell::new(0),
                phase: Cell::new(0),
            },
            perm: Vec::new(),
            mix: mix.as_mut().map(|m| Mix(m.next())),
        };
        body(&mut sim);
    }
}

/// A kernel entry point on the host: grid, then one 64-bit word per parameter.
pub type Entry = unsafe fn([u32; 3], &[u64], &SimOptions);

/// Runs entry point `name` of `dinovmf.ptx` on the host, the way the driver would launch it:
/// `args` holds one word per parameter of the manifest, pointers being host addresses. Returns
/// `false` (running nothing) for an unknown name or a wrong number of arguments.
///
/// # Safety
/// Every pointer must be valid for the extents the kernel derives from the other parameters,
/// and no two buffers the kernel writes or reads may overlap where one of them is written.
pub unsafe fn launch_entry(name: &str, grid: [u32; 3], args: &[u64]) -> bool {
    launch_entry_with(name, grid, args, &SimOptions::exhaustive())
}

/// [`launch_entry`] with the blocks and order of `opts`.
///
/// # Safety
/// As [`launch_entry`].
pub unsafe fn launch_entry_with(
    name: &str,
    grid: [u32; 3],
    args: &[u64],
    opts: &SimOptions,
) -> bool {
    let (Some(k), Some(f)) = (
        crate::manifest::kernel(name),
        crate::manifest::sim_entry(name),
    ) else {
        return false;
    };
    if k.params.len() != args.len() {
        return false;
    }
    f(grid, args, opts);
    true
}
