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
use crate::block::{
    ldmatrix_index, mma_a_index, mma_b_index, mma_c_index, Block, CpAsync, Dims, MmaIn, Op, Shared,
    Shfl, BFLY,
};
use crate::elem::{f16_bits_to_f32, Bf16};
use alloc::collections::VecDeque;
use alloc::vec;
use alloc::vec::Vec;
use core::cell::{Cell, RefCell};

const NONE: u32 = u32::MAX;
const MANY: u32 = u32::MAX - 1;

#[derive(Clone, Copy)]
struct Word {
    /// The bits (f32 words and packed 16-bit pairs alike).
    v: u32,
    written: bool,
    /// A `cp.async` into this word has been issued and not yet waited for.
    in_flight: bool,
    w_phase: u32,
    w_thread: u32,
    r_phase: u32,
    r_thread: u32,
}

/// One `cp.async` in flight: the source bytes (read at issue) and where they go.
struct AsyncCopy {
    dst: usize,
    words: [u32; 4],
    n: usize,
}

/// One thread's `cp.async` state: copies not yet committed, and committed groups, oldest first.
#[derive(Default)]
struct AsyncQueue {
    open: Vec<AsyncCopy>,
    groups: VecDeque<Vec<AsyncCopy>>,
}

/// Checked shared memory.
pub struct SimSmem {
    words: RefCell<Vec<Word>>,
    thread: Cell<u32>,
    phase: Cell<u32>,
    /// Per thread.
    copies: RefCell<Vec<AsyncQueue>>,
}

impl SimSmem {
    fn check_idle(&self, e: &Word, i: usize, what: &str) {
        assert!(
            !e.in_flight,
            "smem {what} of word {i} by thread {} while a cp.async into it is in flight \
             (missing cp_async_wait?)",
            self.thread.get()
        );
    }
    /// Every copy issued was waited for (checked at block end).
    fn assert_no_copies_in_flight(&self) {
        for (t, q) in self.copies.borrow().iter().enumerate() {
            let n = q.open.len() + q.groups.iter().map(|g| g.len()).sum::<usize>();
            assert!(
                n == 0,
                "thread {t} ends its block with {n} cp.async copies never waited for"
            );
        }
    }
}

impl Shared for SimSmem {
    fn ld(&self, i: usize) -> f32 {
        f32::from_bits(self.ld_bits(i))
    }
    fn st(&self, i: usize, v: f32) {
        self.st_bits(i, v.to_bits())
    }
    fn ld_bits(&self, i: usize) -> u32 {
        let mut w = self.words.borrow_mut();
        let n = w.len();
        let (t, ph) = (self.thread.get(), self.phase.get());
        let e = w
            .get_mut(i)
            .unwrap_or_else(|| panic!("smem read out of bounds: {i} >= {n} words"));
        self.check_idle(e, i, "read");
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
    fn st_bits(&self, i: usize, v: u32) {
        let mut w = self.words.borrow_mut();
        let n = w.len();
        let (t, ph) = (self.thread.get(), self.phase.get());
        let e = w
            .get_mut(i)
            .unwrap_or_else(|| panic!("smem write out of bounds: {i} >= {n} words"));
        self.check_idle(e, i, "write");
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
    fn cp_async<T: Copy>(&self, dst: usize, src: &[T], op: CpAsync) {
        let bytes = op.bytes();
        let t = self.thread.get();
        assert!(
            core::mem::size_of_val(src) >= bytes,
            "cp.async of {bytes} bytes from a source of {} bytes (thread {t})",
            core::mem::size_of_val(src)
        );
        let addr = src.as_ptr() as usize;
        assert!(
            addr.is_multiple_of(bytes),
            "cp.async source address {addr:#x} is not {bytes}-byte aligned (thread {t})"
        );
        let n = bytes / 4;
        assert!(
            dst.is_multiple_of(n),
            "cp.async destination word {dst} is not {bytes}-byte aligned (thread {t})"
        );
        let mut words = [0u32; 4];
        // SAFETY: `src` holds at least `bytes` bytes (checked above); read as unaligned words.
        for (j, w) in words.iter_mut().enumerate().take(n) {
            *w = unsafe { core::ptr::read_unaligned((addr as *const u32).add(j)) };
        }
        {
            let mut w = self.words.borrow_mut();
            let len = w.len();
            for i in dst..dst + n {
                let e = w.get_mut(i).unwrap_or_else(|| {
                    panic!("cp.async destination out of bounds: {i} >= {len} words")
                });
                self.check_idle(e, i, "cp.async");
                e.in_flight = true;
            }
        }
        self.copies.borrow_mut()[t as usize]
            .open
            .push(AsyncCopy { dst, words, n });
    }
    fn cp_async_commit(&self) {
        let mut q = self.copies.borrow_mut();
        let q = &mut q[self.thread.get() as usize];
        let g = core::mem::take(&mut q.open);
        q.groups.push_back(g);
    }
    fn cp_async_wait<const N: u32>(&self) {
        loop {
            let g = {
                let mut q = self.copies.borrow_mut();
                let q = &mut q[self.thread.get() as usize];
                if q.groups.len() <= N as usize {
                    return;
                }
                q.groups.pop_front().unwrap_or_default()
            };
            // The copy lands now: a write by this thread in this phase.
            for c in g {
                for j in 0..c.n {
                    self.words.borrow_mut()[c.dst + j].in_flight = false;
                    self.st_bits(c.dst + j, c.words[j]);
                }
            }
        }
    }
}

/// The two 16-bit halves of a register, low first.
fn halves(w: u32) -> [u16; 2] {
    [w as u16, (w >> 16) as u16]
}

fn half_to_f64(h: u16, ty: MmaIn) -> f64 {
    match ty {
        MmaIn::Bf16 => Bf16(h).to_f32() as f64,
        MmaIn::F16 => f16_bits_to_f32(h) as f64,
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
    fn shfl<L: Copy, V: Fn(&L) -> u32, A: Fn(u32, &L) -> u32, O: Fn(&mut L, u32)>(
        &mut self,
        l: &mut Vec<L>,
        mode: Shfl,
        val: V,
        arg: A,
        out: O,
    ) {
        assert!(
            l.len().is_multiple_of(32),
            "block size must be a multiple of 32"
        );
        for (w, warp) in l.chunks_mut(32).enumerate() {
            let v: [u32; 32] = core::array::from_fn(|i| val(&warp[i]));
            let src: [u32; 32] = core::array::from_fn(|i| {
                let lane = i as i64;
                let a = arg((32 * w + i) as u32, &warp[i]) as i64;
                let j = match mode {
                    Shfl::Idx => a & 31,
                    Shfl::Up => lane - a,
                    Shfl::Down => lane + a,
                    Shfl::Xor => lane ^ (a & 31),
                };
                if (0..32).contains(&j) {
                    j as u32
                } else {
                    i as u32
                }
            });
            for (i, st) in warp.iter_mut().enumerate() {
                out(st, v[src[i] as usize]);
            }
        }
    }
    fn mma_m16n8k16<L: Copy, FA: Fn(&L) -> [u32; 4], FB: Fn(&L) -> [u32; 2]>(
        &mut self,
        l: &mut Vec<L>,
        ty: MmaIn,
        a: FA,
        b: FB,
        acc: impl Fn(&mut L) -> &mut [f32; 4],
    ) {
        assert!(
            l.len().is_multiple_of(32),
            "block size must be a multiple of 32"
        );
        for warp in l.chunks_mut(32) {
            let mut am = [[0.0f64; 16]; 16];
            let mut bm = [[0.0f64; 8]; 16];
            let mut cm = [[0.0f32; 8]; 16];
            for (lane, st) in warp.iter_mut().enumerate() {
                let lane = lane as u32;
                let (ar, br) = (a(st), b(st));
                for e in 0..8 {
                    let (r, c) = mma_a_index(lane, e);
                    am[r][c] = half_to_f64(halves(ar[e / 2])[e % 2], ty);
                }
                for e in 0..4 {
                    let (k, n) = mma_b_index(lane, e);
                    bm[k][n] = half_to_f64(halves(br[e / 2])[e % 2], ty);
                }
                let cr = *acc(st);
                for (e, &v) in cr.iter().enumerate() {
                    let (r, c) = mma_c_index(lane, e);
                    cm[r][c] = v;
                }
            }
            // Products of two 16-bit floats are exact in f64; the sum over k (in order, then
            // C) is rounded to f32 once. Tensor cores round differently (truncation inside the
            // adder tree), so GPU results may differ from these by a few f32 ulps.
            for (lane, st) in warp.iter_mut().enumerate() {
                let d = acc(st);
                for (e, de) in d.iter_mut().enumerate() {
                    let (r, c) = mma_c_index(lane as u32, e);
                    let mut s = 0.0f64;
                    for k in 0..16 {
                        s += am[r][k] * bm[k][c];
                    }
                    *de = (s + cm[r][c] as f64) as f32;
                }
            }
        }
    }
    #[allow(clippy::needless_range_loop)]
    fn ldmatrix<L: Copy, const N: usize, A: Fn(u32, &L) -> usize>(
        &mut self,
        l: &mut Vec<L>,
        trans: bool,
        row_addr: A,
        out: impl Fn(&mut L) -> &mut [u32; N],
    ) {
        assert!(N == 1 || N == 2 || N == 4, "ldmatrix of {N} matrices");
        assert!(
            l.len().is_multiple_of(32),
            "block size must be a multiple of 32"
        );
        for (w, warp) in l.chunks_mut(32).enumerate() {
            // m[i][r][c]: matrix i as stored, read through the lanes that address its rows.
            let mut m = [[[0u16; 8]; 8]; 4];
            for i in 0..N {
                for r in 0..8 {
                    let lane = 8 * i + r;
                    let t = (32 * w + lane) as u32;
                    let addr = row_addr(t, &warp[lane]);
                    assert!(
                        addr.is_multiple_of(4),
                        "ldmatrix row address (word {addr}) of lane {lane} is not 16-byte aligned"
                    );
                    self.smem.thread.set(t);
                    for j in 0..4 {
                        let [lo, hi] = halves(self.smem.ld_bits(addr + j));
                        m[i][r][2 * j] = lo;
                        m[i][r][2 * j + 1] = hi;
                    }
                }
            }
            for (lane, st) in warp.iter_mut().enumerate() {
                let o = out(st);
                for (i, reg) in o.iter_mut().enumerate() {
                    let (r0, c0) = ldmatrix_index(lane as u32, 0, trans);
                    let (r1, c1) = ldmatrix_index(lane as u32, 1, trans);
                    *reg = m[i][r0][c0] as u32 | (m[i][r1][c1] as u32) << 16;
                }
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
            v: f32::NAN.to_bits(),
            written: false,
            in_flight: false,
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
                copies: RefCell::new((0..block).map(|_| AsyncQueue::default()).collect()),
            },
            perm: Vec::new(),
            mix: mix.as_mut().map(|m| Mix(m.next())),
        };
        body(&mut sim);
        sim.smem.assert_no_copies_in_flight();
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
