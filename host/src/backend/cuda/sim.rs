//! A [`Device`] on the host: memory is host memory, a launch runs the kernel's body from
//! `dinovmf-ptx` under its block simulator (every block, every thread; shared-memory races and
//! reads of unwritten shared memory panic there). Slow, but exactly the code the GPU runs, so
//! the CUDA backend's orchestration is checked without a GPU.
use anyhow::{bail, ensure, Result};
use dinovmf_ptx::manifest::KernelInfo;

use super::device::Device;

/// Host memory posing as device memory.
#[derive(Default)]
pub struct SimDevice {
    /// Each allocation as 64-bit words (8-byte aligned), never moved once made.
    allocs: Vec<Vec<u64>>,
}

impl SimDevice {
    pub fn new() -> Self {
        Self::default()
    }

    /// The allocation holding `[addr, addr + bytes)`, as a byte pointer, or an error.
    fn span(&mut self, addr: u64, bytes: usize) -> Result<*mut u8> {
        for a in &mut self.allocs {
            let base = a.as_mut_ptr() as u64;
            let len = (a.len() * 8) as u64;
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
        let words = bytes.div_ceil(8).max(1);
        let v = vec![u64::MAX; words];
        let addr = v.as_ptr() as u64;
        self.allocs.push(v);
        Ok(addr)
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
    fn launch(&mut self, k: &'static KernelInfo, grid: [u32; 3], args: &[u64]) -> Result<()> {
        for (w, p) in args.iter().zip(k.params) {
            if p.ty.starts_with('*') && *w != 0 {
                self.span(*w, 1)?;
            }
        }
        // SAFETY: every pointer argument lies inside an allocation of this device (checked
        // above); extents are the backend's responsibility, as on the GPU.
        let ok = unsafe { dinovmf_ptx::sim::launch_entry(k.name, grid, args) };
        ensure!(ok, "{}: no host entry point", k.name);
        Ok(())
    }
    fn sync(&mut self) -> Result<()> {
        Ok(())
    }
}
