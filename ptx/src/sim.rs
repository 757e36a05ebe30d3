//! Host simulator of a kernel launch: every block of the grid, every thread of a block.
//!
//! A phase ([`Block::each`]) runs for thread 0, 1, ... in turn; barriers advance a phase
//! counter. Shared memory is poisoned (NaN) at block start and every access is checked: a read
//! of a word never written in this block, a read of a word another thread wrote in the same
//! phase, or a write to a word another thread read or wrote in the same phase (all of which
//! would be races or garbage on the GPU) panic with the offending index.
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

/// One simulated block.
pub struct Sim {
    dims: Dims,
    smem: SimSmem,
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
pub fn launch(grid: [u32; 3], block: u32, smem_words: usize, mut body: impl FnMut(&mut Sim)) {
    assert!(
        block > 0 && block <= 1024 && block.is_multiple_of(32),
        "bad block size {block}"
    );
    assert!(grid.iter().all(|&g| g > 0), "empty grid {grid:?}");
    for z in 0..grid[2] {
        for y in 0..grid[1] {
            for x in 0..grid[0] {
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
                        bid: [x, y, z],
                        gdim: grid,
                        bdim: block,
                    },
                    smem: SimSmem {
                        words: RefCell::new(vec![blank; smem_words]),
                        thread: Cell::new(0),
                        phase: Cell::new(0),
                    },
                };
                body(&mut sim);
            }
        }
    }
}

/// A kernel entry point on the host: grid, then one 64-bit word per parameter.
pub type Entry = unsafe fn([u32; 3], &[u64]);

/// Runs entry point `name` of `dinovmf.ptx` on the host, the way the driver would launch it:
/// `args` holds one word per parameter of the manifest, pointers being host addresses. Returns
/// `false` (running nothing) for an unknown name or a wrong number of arguments.
///
/// # Safety
/// Every pointer must be valid for the extents the kernel derives from the other parameters,
/// and no two buffers the kernel writes or reads may overlap where one of them is written.
pub unsafe fn launch_entry(name: &str, grid: [u32; 3], args: &[u64]) -> bool {
    let (Some(k), Some(f)) = (
        crate::manifest::kernel(name),
        crate::manifest::sim_entry(name),
    ) else {
        return false;
    };
    if k.params.len() != args.len() {
        return false;
    }
    f(grid, args);
    true
}
