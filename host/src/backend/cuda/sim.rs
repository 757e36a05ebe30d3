//! A [`Device`] on the host: memory is host memory, a launch runs the kernel's body from
//! `dinovmf-ptx` under its block simulator (every block, every thread; shared-memory races and
//! reads of unwritten shared memory panic there). Slow, but exactly the code the GPU runs, so
//! the CUDA backend's orchestration is checked without a GPU.
//!
//! [`SimDevice::with_options`] runs launches under other [`SimOptions`]: only the corner blocks
//! (production-sized grids in bounded time), or blocks and threads in a seeded shuffled order.
//! Allocations of [`LAZY_BYTES`] or more are zeroed lazily by the OS instead of poisoned, so that
//! a production-sized buffer of which a corner launch touches a few pages costs only those
//! pages; tests poison the parts they read back themselves.
use std::alloc::{alloc_zeroed, dealloc, Layout};

use anyhow::{bail, ensure, Result};
use dinovmf_ptx::manifest::{KernelInfo, DEFAULT_MAX_DYNAMIC_SMEM};
pub use dinovmf_ptx::sim::SimOptions;

use super::device::Device;

/// Allocations from this size on are lazily zeroed, not poisoned (see the module doc).
pub const LAZY_BYTES: usize = 256 << 20;

/// One allocation, never moved once made: `base` is 256-byte aligned like cuMemAlloc's (kernels
/// pick aligned fast paths, e.g. cp.async) and holds `len` bytes inside the block `ptr` /
/// `layout` allocated with 8-byte alignment. An 8-byte aligned `alloc_zeroed` is calloc, whose
/// big blocks are untouched zero pages until written; a 256-byte aligned one is memset by the
/// allocator, which made a 14.7 GB resident set of the ViT-S/16 corner checks.
struct Alloc {
    ptr: *mut u8,
    layout: Layout,
    base: *mut u8,
    len: usize,
}

/// The most dynamic shared memory a block may have on sm_90 (227 KB; sm_80: 163 KB).
const MAX_DYNAMIC_SMEM: u32 = 227 << 10;

/// cuMemAlloc's alignment.
const DEVICE_ALIGN: usize = 256;

impl Drop for Alloc {
    fn drop(&mut self) {
        // SAFETY: `ptr` came from `alloc_zeroed` with this layout and is freed once.
        unsafe { dealloc(self.ptr, self.layout) }
    }
}

/// Host memory posing as device memory.
#[derive(Default)]
pub struct SimDevice {
    allocs: Vec<Alloc>,
    options: SimOptions,
    /// Each kernel's raised dynamic shared memory limit (`cuFuncSetAttribute`).
    max_dynamic_smem: Vec<(&'static str, u32)>,
}

// SAFETY: the allocations are plain host memory owned by this device alone.
unsafe impl Send for SimDevice {}

impl SimDevice {
    /// Every block of every launch, in the fixed order.
    pub fn new() -> Self {
        Self::default()
    }

    /// Launches run as `options` say (corner blocks only, shuffled order).
    pub fn with_options(options: SimOptions) -> Self {
        Self {
            allocs: Vec::new(),
            options,
            max_dynamic_smem: Vec::new(),
        }
    }

    /// The allocation holding `[addr, addr + bytes)`, as a byte pointer, or an error.
    fn span(&mut self, addr: u64, bytes: usize) -> Result<*mut u8> {
        for a in &self.allocs {
            let base = a.base as u64;
            let len = a.len as u64;
            if addr >= base && addr + bytes as u64 <= base + len {
                return Ok(addr as usize as *mut u8);
            }
        }
        bail!("simulated device: {bytes} bytes at {addr:#x} are not inside one allocation")
    }
}

impl Device for SimDevice {
    fn name(&self) -> String {
        "host simulator of dinovmf.ptx".into()
    }
    fn bind(&mut self) -> Result<()> {
        Ok(())
    }
    fn alloc(&mut self, bytes: usize) -> Result<u64> {
        let size = bytes.div_ceil(8).max(1) * 8;
        let layout = Layout::from_size_align(size + DEVICE_ALIGN, 8)
            .map_err(|e| anyhow::anyhow!("simulated device: {bytes} bytes: {e}"))?;
        // SAFETY: a non-zero size; a null result is an error.
        let ptr = unsafe { alloc_zeroed(layout) };
        ensure!(
            !ptr.is_null(),
            "simulated device: out of host memory for {bytes} bytes"
        );
        let base = ptr.wrapping_add(ptr.align_offset(DEVICE_ALIGN));
        if size < LAZY_BYTES {
            // SAFETY: `base` holds `size` writable bytes (at most DEVICE_ALIGN - 8 past `ptr`).
            unsafe { std::ptr::write_bytes(base, 0xFF, size) };
        }
        self.allocs.push(Alloc {
            ptr,
            layout,
            base,
            len: size,
        });
        Ok(base as u64)
    }
    fn upload(&mut self, dst: u64, src: &[u8]) -> Result<()> {
        let p = self.span(dst, src.len())?;
        // SAFETY: `span` checked that the destination lies inside one live allocation.
        unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), p, src.len()) };
        Ok(())
    }
    fn download(&mut self, src: u64, dst: &mut [u8]) -> Result<()> {
        let p = self.span(src, dst.len())?;
        // SAFETY: as `upload`.
        unsafe { std::ptr::copy_nonoverlapping(p, dst.as_mut_ptr(), dst.len()) };
        Ok(())
    }
    fn copy(&mut self, dst: u64, src: u64, bytes: usize) -> Result<()> {
        let s = self.span(src, bytes)?;
        let d = self.span(dst, bytes)?;
        // SAFETY: both ranges are inside live allocations; `copy` allows overlap.
        unsafe { std::ptr::copy(s, d, bytes) };
        Ok(())
    }
    fn set_max_dynamic_smem(&mut self, k: &'static KernelInfo, bytes: u32) -> Result<()> {
        ensure!(
            bytes <= MAX_DYNAMIC_SMEM,
            "cuFuncSetAttribute({}, MAX_DYNAMIC_SHARED_SIZE_BYTES, {bytes}): above the {} \
             bytes an sm_90 block may have (CUDA_ERROR_INVALID_VALUE)",
            k.name,
            MAX_DYNAMIC_SMEM
        );
        self.max_dynamic_smem.retain(|(n, _)| *n != k.name);
        self.max_dynamic_smem.push((k.name, bytes));
        Ok(())
    }
    fn launch(&mut self, k: &'static KernelInfo, grid: [u32; 3], args: &[u64]) -> Result<()> {
        // As the driver: dynamic shared memory above the default 48 KB needs the function's
        // limit raised first.
        let want = k.dynamic_smem_bytes();
        let limit = self
            .max_dynamic_smem
            .iter()
            .find(|(n, _)| *n == k.name)
            .map_or(DEFAULT_MAX_DYNAMIC_SMEM, |&(_, b)| b);
        ensure!(
            want <= limit,
            "cuLaunchKernel({}): {want} bytes of dynamic shared memory requested, the function \
             allows {limit} (CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES not raised: \
             CUDA_ERROR_INVALID_VALUE)",
            k.name
        );
        for (w, p) in args.iter().zip(k.params) {
            if p.ty.starts_with('*') && *w != 0 {
                self.span(*w, 1)?;
            }
        }
        // SAFETY: every pointer argument lies inside an allocation of this device (checked
        // above); extents are the backend's responsibility, as on the GPU.
        let ok = unsafe { dinovmf_ptx::sim::launch_entry_with(k.name, grid, args, &self.options) };
        ensure!(ok, "{}: no host entry point", k.name);
        Ok(())
    }
    fn sync(&mut self) -> Result<()> {
        Ok(())
    }
}
