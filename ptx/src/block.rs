//! The thread-block abstraction every kernel body is written against.
use crate::math as m;

/// Block-uniform geometry: the same for every thread of a block.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Dims {
    /// `blockIdx.{x,y,z}`.
    pub bid: [u32; 3],
    /// `gridDim.{x,y,z}`.
    pub gdim: [u32; 3],
    /// `blockDim.x`; blocks are one-dimensional (threads are numbered `0..bdim`).
    pub bdim: u32,
}

impl Dims {
    /// Index of the first thread of this block in a 1-D launch over `blockIdx.x`.
    #[inline]
    pub fn base_x(&self) -> usize {
        self.bid[0] as usize * self.bdim as usize
    }
    /// Number of warps in the block (the block size is a multiple of 32 in every launch).
    #[inline]
    pub fn warps(&self) -> u32 {
        self.bdim / 32
    }
}

/// A warp reduction operator.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    Sum,
    Max,
}

impl Op {
    #[inline]
    pub fn apply(self, a: f32, b: f32) -> f32 {
        match self {
            Op::Sum => a + b,
            // `fmaxf` semantics (a NaN operand loses), as `max.f32` on the GPU.
            Op::Max => {
                if a >= b || b.is_nan() {
                    a
                } else {
                    b
                }
            }
        }
    }
    #[inline]
    pub fn identity(self) -> f32 {
        match self {
            Op::Sum => 0.0,
            Op::Max => f32::NEG_INFINITY,
        }
    }
}

/// Lane offsets of the butterfly warp reduction, in the order both implementations use (so the
/// simulated sums are bit-identical to the GPU's).
pub const BFLY: [u32; 5] = [16, 8, 4, 2, 1];

/// One thread block.
///
/// A body calls [`each`](Block::each) for code that every thread runs (with its thread index, its
/// private state `L` and the block's shared memory), and [`sync`](Block::sync) between phases that
/// communicate through shared memory. Code outside `each` is block-uniform: it sees only
/// [`dims`](Block::dims), never a thread index, so every barrier is reached by every thread.
pub trait Block {
    /// Per-thread private state (registers): one `L` on the GPU, one per thread in the simulator.
    type Local<L: Copy>;
    /// The block's shared memory (f32 words).
    type Smem: Shared;

    fn dims(&self) -> Dims;
    fn local<L: Copy>(&mut self, init: L) -> Self::Local<L>;
    /// Runs `f(thread, state, smem)` as one barrier-free phase.
    fn each<L: Copy, F: FnMut(u32, &mut L, &Self::Smem)>(&mut self, l: &mut Self::Local<L>, f: F);
    /// `__syncthreads()`.
    fn sync(&mut self);
    /// Butterfly all-reduce of one `f32` of each thread's state over its warp of 32 threads.
    fn warp_reduce<L: Copy, G: Fn(&mut L) -> &mut f32>(
        &mut self,
        l: &mut Self::Local<L>,
        op: Op,
        field: G,
    );

    /// Warp shuffle `shfl.sync.{idx,up,down,bfly}.b32` over whole warps (all 32 lanes take
    /// part): lane `l` receives `val` of lane `src(l)` where `src` is `arg`, `l - arg`,
    /// `l + arg` or `l ^ arg` for [`Shfl::Idx`], [`Up`](Shfl::Up), [`Down`](Shfl::Down),
    /// [`Xor`](Shfl::Xor) (`arg(thread, state)` per lane; `idx` uses its low 5 bits); a source
    /// outside the warp leaves the lane its own value, as the PTX instruction does.
    fn shfl<L: Copy, V: Fn(&L) -> u32, A: Fn(u32, &L) -> u32, O: Fn(&mut L, u32)>(
        &mut self,
        l: &mut Self::Local<L>,
        mode: Shfl,
        val: V,
        arg: A,
        out: O,
    );
    /// `mma.sync.aligned.m16n8k16.row.col.f32.{ty}.{ty}.f32`: per warp `D = A B + C` with `A`
    /// 16 x 16 (4 registers per lane), `B` 16 x 8 (2), `C` = `D` 16 x 8 f32 (4), in the PTX
    /// ISA's fragment layouts ([`mma_a_index`], [`mma_b_index`], [`mma_c_index`]); the
    /// accumulator `acc` is overwritten with `D`.
    fn mma_m16n8k16<L: Copy, FA: Fn(&L) -> [u32; 4], FB: Fn(&L) -> [u32; 2]>(
        &mut self,
        l: &mut Self::Local<L>,
        ty: MmaIn,
        a: FA,
        b: FB,
        acc: impl Fn(&mut L) -> &mut [f32; 4],
    );
    /// `ldmatrix.sync.aligned.m8n8.x{N}{.trans}.shared.b16`: `N` (1, 2 or 4) 8 x 8 matrices of
    /// 16-bit elements from shared memory; lane `8 i + r` (of the first `8 N` lanes) gives the
    /// word index of row `r` of matrix `i` (16-byte aligned: a multiple of 4), and every lane
    /// receives one register per matrix ([`ldmatrix_index`]).
    fn ldmatrix<L: Copy, const N: usize, A: Fn(u32, &L) -> usize>(
        &mut self,
        l: &mut Self::Local<L>,
        trans: bool,
        row_addr: A,
        out: impl Fn(&mut L) -> &mut [u32; N],
    );

    /// [`each`](Block::each) without private state.
    #[inline]
    fn each0<F: FnMut(u32, &Self::Smem)>(&mut self, mut f: F) {
        let mut u = self.local(());
        self.each(&mut u, |t, _, s| f(t, s));
    }
}

/// Shared memory as 32-bit words; reads and writes go through methods so that the simulator can
/// check every access.
pub trait Shared {
    fn ld(&self, i: usize) -> f32;
    fn st(&self, i: usize, v: f32);
    /// Word `i` as raw bits (two packed 16-bit elements, the lower address in the low half).
    fn ld_bits(&self, i: usize) -> u32;
    fn st_bits(&self, i: usize, v: u32);
    /// `cp.async.{ca,cg}.shared.global`: starts copying `op.bytes()` bytes from the start of
    /// `src` (aligned to that size) to the words from `dst` on (likewise aligned); the words
    /// are not to be touched until a [`cp_async_wait`](Shared::cp_async_wait) that covers the
    /// copy's group. Issued per thread.
    fn cp_async<T: Copy>(&self, dst: usize, src: &[T], op: CpAsync);
    /// `cp.async.commit_group`: the copies issued since the last commit become one group.
    fn cp_async_commit(&self);
    /// `cp.async.wait_group N`: waits until at most `N` of this thread's committed groups are
    /// still in flight (the oldest complete first). Other threads see the data after a barrier.
    fn cp_async_wait<const N: u32>(&self);
}

/// Warp shuffle modes (see [`Block::shfl`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Shfl {
    Idx,
    Up,
    Down,
    Xor,
}

/// Input element type of [`Block::mma_m16n8k16`] (always f32 accumulate).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MmaIn {
    F16,
    Bf16,
}

/// The variants of `cp.async` (`.cg` only exists for 16 bytes).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CpAsync {
    /// `.ca` (cache at all levels), 4 bytes.
    Ca4,
    Ca8,
    Ca16,
    /// `.cg` (cache in L2 only, bypassing L1), 16 bytes.
    Cg16,
}

impl CpAsync {
    pub const fn bytes(self) -> usize {
        match self {
            CpAsync::Ca4 => 4,
            CpAsync::Ca8 => 8,
            CpAsync::Ca16 | CpAsync::Cg16 => 16,
        }
    }
}

/// Fragment layouts of `mma.m16n8k16` (PTX ISA, "Matrix Fragments for mma.m16n8k16 with
/// floating point type"), with `group = lane / 4`, `tig = lane % 4`. Element `e` (0..8) of a
/// lane's A fragment (register `e / 2`, low half for even `e`) is `A[row][col]`:
pub const fn mma_a_index(lane: u32, e: usize) -> (usize, usize) {
    let (group, tig) = ((lane / 4) as usize, (lane % 4) as usize);
    let row = if e < 2 || (4 <= e && e < 6) {
        group
    } else {
        group + 8
    };
    let col = tig * 2 + (e & 1) + if e >= 4 { 8 } else { 0 };
    (row, col)
}

/// Element `e` (0..4) of a lane's B fragment is `B[k][n]` (`k` returned first).
pub const fn mma_b_index(lane: u32, e: usize) -> (usize, usize) {
    let (group, tig) = ((lane / 4) as usize, (lane % 4) as usize);
    (tig * 2 + (e & 1) + if e >= 2 { 8 } else { 0 }, group)
}

/// Element `e` (0..4) of a lane's C / D fragment is `C[row][col]`.
pub const fn mma_c_index(lane: u32, e: usize) -> (usize, usize) {
    let (group, tig) = ((lane / 4) as usize, (lane % 4) as usize);
    (group + if e >= 2 { 8 } else { 0 }, tig * 2 + (e & 1))
}

/// `ldmatrix` (PTX ISA, "Warp-level matrix load instruction: ldmatrix"): the two 16-bit
/// elements (low half first) that lane `lane` receives of each 8 x 8 matrix, as `(row, col)` of
/// that matrix as stored: row `lane / 4`, columns `2 (lane % 4) + {0, 1}`; with `.trans` the
/// transpose, rows `2 (lane % 4) + {0, 1}` of column `lane / 4`.
pub const fn ldmatrix_index(lane: u32, half: usize, trans: bool) -> (usize, usize) {
    let (a, b) = ((lane / 4) as usize, (lane % 4) as usize * 2 + half);
    if trans {
        (b, a)
    } else {
        (a, b)
    }
}

/// Block all-reduce: every thread's `field` becomes the reduction over the whole block.
/// Uses `smem[off .. off + warps]` and two barriers; the combination order is fixed (warp 0,
/// 1, ...), so results are deterministic.
pub fn block_reduce<B: Block, L: Copy, G: Fn(&mut L) -> &mut f32 + Copy>(
    b: &mut B,
    l: &mut B::Local<L>,
    op: Op,
    field: G,
    off: usize,
) {
    let warps = b.dims().warps() as usize;
    b.warp_reduce(l, op, field);
    if warps == 1 {
        return;
    }
    b.each(l, |t, s, sm| {
        if t % 32 == 0 {
            sm.st(off + t as usize / 32, *field(s));
        }
    });
    b.sync();
    b.each(l, |_, s, sm| {
        let mut acc = sm.ld(off);
        for w in 1..warps {
            acc = op.apply(acc, sm.ld(off + w));
        }
        *field(s) = acc;
    });
    b.sync();
}

/// Online log-sum-exp state `(max, sum exp(x - max))`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Lse {
    pub m: f32,
    pub s: f32,
}

impl Lse {
    pub const EMPTY: Lse = Lse {
        m: f32::NEG_INFINITY,
        s: 0.0,
    };
    /// Adds one value.
    #[inline]
    pub fn push(&mut self, x: f32) {
        if x > self.m {
            self.s = self.s * m::exp(self.m - x) + 1.0;
            self.m = x;
        } else if x > f32::NEG_INFINITY {
            self.s += m::exp(x - self.m);
        }
    }
    /// Merges another state.
    #[inline]
    pub fn merge(&mut self, o: Lse) {
        if o.m == f32::NEG_INFINITY {
            return;
        }
        if self.m == f32::NEG_INFINITY {
            *self = o;
            return;
        }
        if o.m > self.m {
            self.s = self.s * m::exp(self.m - o.m) + o.s;
            self.m = o.m;
        } else {
            self.s += o.s * m::exp(o.m - self.m);
        }
    }
    /// `max + ln(sum)`; `-inf` for an empty state.
    #[inline]
    pub fn value(self) -> f32 {
        if self.m == f32::NEG_INFINITY {
            f32::NEG_INFINITY
        } else {
            self.m + m::ln(self.s)
        }
    }
}

/// Block all-reduce of the online log-sum-exp state `field` of each thread: every thread ends
/// with the state of the whole block. Within a warp each lane's state is collapsed to its value
/// `v = m + ln s`, the warp agrees on `M = max v` and sums `exp(v - M)`; across warps the states
/// go through `smem[off .. off + 2 warps]` and are merged in warp order (deterministic).
pub fn block_reduce_lse<B: Block, L: Copy, G: Fn(&mut L) -> &mut Lse + Copy>(
    b: &mut B,
    l: &mut B::Local<L>,
    field: G,
    off: usize,
) {
    b.each(l, |_, st, _| {
        let e = field(st);
        let v = e.value();
        *e = Lse { m: v, s: v };
    });
    b.warp_reduce(l, Op::Max, move |st| &mut field(st).m);
    b.each(l, |_, st, _| {
        let e = field(st);
        e.s = if e.s == f32::NEG_INFINITY {
            0.0
        } else {
            m::exp(e.s - e.m)
        };
    });
    b.warp_reduce(l, Op::Sum, move |st| &mut field(st).s);
    let warps = b.dims().warps() as usize;
    if warps == 1 {
        return;
    }
    b.each(l, |t, st, sm| {
        if t % 32 == 0 {
            let e = *field(st);
            let w = t as usize / 32;
            sm.st(off + 2 * w, e.m);
            sm.st(off + 2 * w + 1, e.s);
        }
    });
    b.sync();
    b.each(l, |_, st, sm| {
        let mut acc = Lse::EMPTY;
        for w in 0..warps {
            acc.merge(Lse {
                m: sm.ld(off + 2 * w),
                s: sm.ld(off + 2 * w + 1),
            });
        }
        *field(st) = acc;
    });
    b.sync();
}
