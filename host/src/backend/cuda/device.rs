//! What the CUDA backend needs of a device, and the checked launcher every kernel call goes
//! through.
//!
//! [`Device`] has two implementations: the driver (`driver.rs`, feature `cuda`) and the host
//! simulator of `dinovmf-ptx` (`sim.rs`), which runs the very kernel bodies of `dinovmf.ptx` on
//! the CPU. The whole backend (every launch, buffer and offset of a training step) is therefore
//! tested on any machine; only the driver calls themselves need a GPU.
//!
//! [`Gpu::launch`] takes a kernel name and its arguments, checks them against
//! `dinovmf_ptx::manifest` (count, and each one's type, pointer element types included), and
//! takes block size, shared memory and grid from the manifest (the grid by evaluating its
//! formula on the arguments, `grid.rs`).
use std::marker::PhantomData;

use anyhow::{anyhow, bail, ensure, Result};
use dinovmf_ptx::manifest::{self, KernelInfo};

use super::grid::{eval_grid, eval_size};

/// CUDA's limits on a grid: `gridDim.x` up to 2^31 - 1, `gridDim.y` and `gridDim.z` up to
/// 65535 (compute capability 3.0 and newer).
pub const GRID_LIMITS: [u64; 3] = [(1 << 31) - 1, 65535, 65535];

/// A device: memory (addresses as `u64`), copies, launches. Memory is owned by the device and
/// released when it is dropped.
pub trait Device: Send {
    fn name(&self) -> String;
    /// What loading the kernels reported (JIT log, registers and local memory per kernel),
    /// where the device has such a report.
    fn load_report(&self) -> Option<String> {
        None
    }
    /// Makes the device current for the calling thread (CUDA contexts are per thread).
    fn bind(&mut self) -> Result<()>;
    /// `bytes` of device memory, every byte 0xFF (f32 NaN), so that reading what no kernel
    /// wrote shows up.
    fn alloc(&mut self, bytes: usize) -> Result<u64>;
    fn upload(&mut self, dst: u64, src: &[u8]) -> Result<()>;
    /// Waits for every launch before it, then copies.
    fn download(&mut self, src: u64, dst: &mut [u8]) -> Result<()>;
    /// Device-to-device copy, ordered with the launches.
    fn copy(&mut self, dst: u64, src: u64, bytes: usize) -> Result<()>;
    /// Raises kernel `k`'s `CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES` to `bytes`, which
    /// a launch requesting more than 48 KB of dynamic shared memory needs
    /// ([`manifest::DEFAULT_MAX_DYNAMIC_SMEM`]).
    fn set_max_dynamic_smem(&mut self, k: &'static KernelInfo, bytes: u32) -> Result<()>;
    /// Launches `k` with one 64-bit word per parameter (`u32`/`f32` in the low bits) and
    /// `k.dynamic_smem_bytes()` of dynamic shared memory.
    fn launch(&mut self, k: &'static KernelInfo, grid: [u32; 3], args: &[u64]) -> Result<()>;
    fn sync(&mut self) -> Result<()>;
    /// The stream the launches run on, for collectives that must be ordered with them (0: the
    /// legacy default stream; the simulator's launches are synchronous).
    fn stream(&self) -> u64 {
        0
    }
}

/// Element types of device buffers, with the manifest's name for pointers to them.
pub trait Elem: Copy + Default + Send + 'static {
    const NAME: &'static str;
}
impl Elem for f32 {
    const NAME: &'static str = "f32";
}
impl Elem for u64 {
    const NAME: &'static str = "u64";
}
/// bf16 operands travel as their bits.
impl Elem for u16 {
    const NAME: &'static str = "u16";
}

fn as_bytes<T: Elem>(x: &[T]) -> &[u8] {
    // SAFETY: f32, u64 and u16 have no padding and every byte pattern is valid.
    unsafe { std::slice::from_raw_parts(x.as_ptr() as *const u8, std::mem::size_of_val(x)) }
}

fn as_bytes_mut<T: Elem>(x: &mut [T]) -> &mut [u8] {
    // SAFETY: as `as_bytes`; any bytes written are a valid `T`.
    unsafe { std::slice::from_raw_parts_mut(x.as_mut_ptr() as *mut u8, std::mem::size_of_val(x)) }
}

/// A typed view of device memory: `len` elements at `addr`.
#[derive(Debug)]
pub struct Buf<T> {
    pub addr: u64,
    pub len: usize,
    _t: PhantomData<T>,
}

impl<T> Clone for Buf<T> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<T> Copy for Buf<T> {}

impl<T: Elem> Buf<T> {
    /// Elements `off .. off + len` of this buffer.
    pub fn sub(self, off: usize, len: usize) -> Buf<T> {
        assert!(
            off + len <= self.len,
            "sub-buffer {off}+{len} of a buffer of {}",
            self.len
        );
        Buf {
            addr: self.addr + (off * std::mem::size_of::<T>()) as u64,
            len,
            _t: PhantomData,
        }
    }
    /// From element `off` to the end.
    pub fn from(self, off: usize) -> Buf<T> {
        self.sub(off, self.len - off)
    }
    /// As a kernel argument.
    pub fn arg(self) -> Arg {
        Arg::Ptr {
            addr: self.addr,
            elem: T::NAME,
            len: self.len,
        }
    }
}

/// One kernel argument.
#[derive(Clone, Copy, Debug)]
pub enum Arg {
    Ptr {
        addr: u64,
        elem: &'static str,
        /// Elements in the buffer (checked against the kernel's extent for it).
        len: usize,
    },
    /// A size that does not fit the kernel's `u32` parameter: the launch refuses it.
    TooBig(u64),
    /// A null pointer ("none" for optional buffers).
    Null,
    U32(u32),
    U64(u64),
    F32(f32),
    F64(f64),
}

impl From<u32> for Arg {
    fn from(x: u32) -> Arg {
        Arg::U32(x)
    }
}
impl From<f32> for Arg {
    fn from(x: f32) -> Arg {
        Arg::F32(x)
    }
}
impl From<f64> for Arg {
    fn from(x: f64) -> Arg {
        Arg::F64(x)
    }
}
impl<T: Elem> From<Buf<T>> for Arg {
    fn from(b: Buf<T>) -> Arg {
        b.arg()
    }
}

/// `x` as a `u32` kernel size; one of 2^32 or more becomes [`Arg::TooBig`], which the launch
/// refuses with an error naming the kernel, the parameter and the value (never a panic).
pub fn u32_of(x: usize) -> Arg {
    match u32::try_from(x) {
        Ok(v) => Arg::U32(v),
        Err(_) => Arg::TooBig(x as u64),
    }
}

impl Arg {
    /// The word the launch passes, after checking the argument against the parameter's type.
    pub fn word(self, kernel: &str, pname: &str, ty: &str) -> Result<u64> {
        let bad = || anyhow!("{kernel}: parameter {pname} is {ty}, got {self:?}");
        Ok(match (self, ty) {
            (Arg::U32(x), "u32") => x as u64,
            (Arg::U64(x), "u64") => x,
            (Arg::F32(x), "f32") => x.to_bits() as u64,
            (Arg::F64(x), "f64") => x.to_bits(),
            (Arg::Null, t) if t.starts_with('*') => 0,
            (Arg::TooBig(x), "u32") => bail!(
                "{kernel}: size parameter {pname} = {x} does not fit the kernel's u32 (must be \
                 below 2^32 = 4294967296)"
            ),
            (Arg::Ptr { addr, elem, .. }, t) if t.starts_with('*') => {
                let pointee = t.rsplit(' ').next().unwrap_or("");
                if pointee != elem {
                    return Err(bad());
                }
                addr
            }
            _ => return Err(bad()),
        })
    }
}

/// Launch and copy statistics (for reports and tests).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    pub launches: u64,
    pub uploads: u64,
    pub downloads: u64,
    pub bytes_up: u64,
    pub bytes_down: u64,
}

/// A device with typed buffers and manifest-checked launches.
pub struct Gpu<D: Device> {
    pub dev: D,
    pub counters: Counters,
    /// Bytes allocated so far.
    pub allocated: usize,
    /// Kernels whose dynamic shared memory limit has been raised (once, before their first
    /// launch).
    dynamic_smem_set: Vec<&'static str>,
    /// What [`Gpu::gemm`](super::ops) multiplies in (f32 unless set).
    pub precision: super::ops::MatmulPrecision,
    /// bf16 copies of the two operands of the bf16 matrix products (grown as needed).
    pub(super) bf16_scratch: [Option<Buf<u16>>; 2],
}

impl<D: Device> Gpu<D> {
    pub fn new(dev: D) -> Self {
        Self {
            dev,
            counters: Counters::default(),
            allocated: 0,
            dynamic_smem_set: Vec::new(),
            precision: super::ops::MatmulPrecision::F32,
            bf16_scratch: [None, None],
        }
    }

    pub fn alloc<T: Elem>(&mut self, len: usize) -> Result<Buf<T>> {
        let bytes = len.max(1) * std::mem::size_of::<T>();
        let addr = self.dev.alloc(bytes)?;
        self.allocated += bytes;
        Ok(Buf {
            addr,
            len,
            _t: PhantomData,
        })
    }

    /// A new buffer holding `data`.
    pub fn alloc_from<T: Elem>(&mut self, data: &[T]) -> Result<Buf<T>> {
        let b = self.alloc(data.len())?;
        self.upload(b, data)?;
        Ok(b)
    }

    pub fn upload<T: Elem>(&mut self, dst: Buf<T>, src: &[T]) -> Result<()> {
        ensure!(
            src.len() == dst.len,
            "upload of {} elements into a buffer of {}",
            src.len(),
            dst.len
        );
        if src.is_empty() {
            return Ok(());
        }
        self.counters.uploads += 1;
        self.counters.bytes_up += std::mem::size_of_val(src) as u64;
        self.dev.upload(dst.addr, as_bytes(src))
    }

    pub fn download<T: Elem>(&mut self, src: Buf<T>, dst: &mut [T]) -> Result<()> {
        ensure!(
            dst.len() == src.len,
            "download of a buffer of {} elements into {}",
            src.len,
            dst.len()
        );
        if dst.is_empty() {
            return Ok(());
        }
        self.counters.downloads += 1;
        self.counters.bytes_down += std::mem::size_of_val(dst) as u64;
        self.dev.download(src.addr, as_bytes_mut(dst))
    }

    pub fn to_vec<T: Elem>(&mut self, src: Buf<T>) -> Result<Vec<T>> {
        let mut v = vec![T::default(); src.len];
        self.download(src, &mut v)?;
        Ok(v)
    }

    pub fn copy<T: Elem>(&mut self, dst: Buf<T>, src: Buf<T>) -> Result<()> {
        ensure!(
            src.len == dst.len,
            "copy of {} elements into {}",
            src.len,
            dst.len
        );
        if src.len == 0 {
            return Ok(());
        }
        self.dev
            .copy(dst.addr, src.addr, src.len * std::mem::size_of::<T>())
    }

    /// Launches kernel `name` (see the module doc); `extra` names values its grid formula uses
    /// that are not parameters (`outer`, `max seg_len`). A grid with a zero dimension launches
    /// nothing (there is no work).
    pub fn launch_with(&mut self, name: &str, args: &[Arg], extra: &[(&str, u64)]) -> Result<()> {
        let k =
            manifest::kernel(name).ok_or_else(|| anyhow!("no kernel '{name}' in the manifest"))?;
        if args.len() != k.params.len() {
            bail!(
                "{name}: {} arguments for {} parameters",
                args.len(),
                k.params.len()
            );
        }
        let mut words = Vec::with_capacity(args.len());
        for (a, p) in args.iter().zip(k.params) {
            words.push(a.word(name, p.name, p.ty)?);
        }
        let grid = grid_of(k, &words, extra)?;
        if grid.contains(&0) {
            return Ok(());
        }
        check_launch(k, args, &words, grid)?;
        let dynamic = k.dynamic_smem_bytes();
        if dynamic > manifest::DEFAULT_MAX_DYNAMIC_SMEM && !self.dynamic_smem_set.contains(&k.name)
        {
            self.dev.set_max_dynamic_smem(k, dynamic)?;
            self.dynamic_smem_set.push(k.name);
        }
        self.counters.launches += 1;
        self.dev.launch(k, grid, &words)
    }

    pub fn launch(&mut self, name: &str, args: &[Arg]) -> Result<()> {
        self.launch_with(name, args, &[])
    }
}

/// `n=25216, d=384`: the size parameters of a launch, for error messages.
fn sizes_of(k: &KernelInfo, words: &[u64]) -> String {
    k.params
        .iter()
        .zip(words)
        .filter(|(p, _)| p.ty == "u32" || p.ty == "u64")
        .map(|(p, w)| format!("{}={w}", p.name))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The checks before a launch of `k` on `grid`: each grid dimension within CUDA's limits
/// ([`GRID_LIMITS`]), and each pointer's extent (the manifest's `extents`, evaluated exactly
/// on the size parameters, so a product past 2^32 is neither wrapped nor missed) within the
/// buffer passed for it. Errors name the kernel, the dimension or parameter, and the sizes.
pub fn check_launch(k: &KernelInfo, args: &[Arg], words: &[u64], grid: [u32; 3]) -> Result<()> {
    for (d, (&g, &lim)) in grid.iter().zip(&GRID_LIMITS).enumerate() {
        if u64::from(g) > lim {
            bail!(
                "{}: grid {:?} ('{}') exceeds CUDA's limit of {lim} blocks along {} (sizes: {})",
                k.name,
                grid,
                k.grid,
                ["x", "y", "z"][d],
                sizes_of(k, words)
            );
        }
    }
    let var = |n: &str| -> Option<u64> {
        match n {
            "grid_x" => return Some(grid[0] as u64),
            "grid_y" => return Some(grid[1] as u64),
            "grid_z" => return Some(grid[2] as u64),
            _ => {}
        }
        let i = k.params.iter().position(|p| p.name == n)?;
        let ty = k.params[i].ty;
        (ty == "u32" || ty == "u64").then(|| words[i])
    };
    for item in k
        .extents
        .split(';')
        .map(str::trim)
        .filter(|s| !s.is_empty())
    {
        let (pname, expr) = item
            .split_once(':')
            .ok_or_else(|| anyhow!("{}: manifest extent '{item}' is not 'name: length'", k.name))?;
        let pname = pname.trim();
        let i = k
            .params
            .iter()
            .position(|p| p.name == pname)
            .ok_or_else(|| anyhow!("{}: manifest extent names no parameter '{pname}'", k.name))?;
        let Arg::Ptr { len, .. } = args[i] else {
            continue;
        };
        let need = eval_size(expr, &var).map_err(|e| anyhow!("{}: {pname}: {e}", k.name))?;
        if need > len as u128 {
            bail!(
                "{}: parameter {pname} needs {} = {need} elements, the buffer passed holds {len} \
                 (sizes: {})",
                k.name,
                expr.trim(),
                sizes_of(k, words)
            );
        }
    }
    Ok(())
}

/// The grid of one launch of `k` from its parameter words.
pub fn grid_of(k: &KernelInfo, words: &[u64], extra: &[(&str, u64)]) -> Result<[u32; 3]> {
    let var = |n: &str| -> Option<u64> {
        if let Some(i) = k.params.iter().position(|p| p.name == n) {
            let ty = k.params[i].ty;
            return (ty == "u32" || ty == "u64").then(|| words[i]);
        }
        extra.iter().find(|e| e.0 == n).map(|e| e.1)
    };
    eval_grid(k.grid, &var).map_err(|e| anyhow!("{}: {e} (sizes: {})", k.name, sizes_of(k, words)))
}
