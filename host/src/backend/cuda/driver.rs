//! The CUDA driver as a [`Device`] (feature `cuda`): one context on device 0, `dinovmf.ptx`
//! (embedded in the binary) JIT-compiled by the driver, one stream.
//!
//! cust 0.3.2 opens the context, module and stream; memory, copies and launches call the
//! driver API directly (`cust::sys`), so that kernels are plain `CUfunction` handles looked up
//! once from the manifest's names. Errors are reported with the driver's error *name* and
//! number, never through cust's `Display` (which panics when `cuGetErrorString` fails).
//!
//! Ordering: the stream is created with default flags, so it synchronises with the legacy
//! default stream that the synchronous `cuMemcpyHtoD`/`cuMemcpyDtoH` use: an upload is
//! complete before later launches read it, and a download waits for every earlier launch.
use std::collections::HashMap;
use std::ffi::{c_void, CStr};

use anyhow::{anyhow, bail, Result};
use cust::context::{Context, CurrentContext};
use cust::module::Module;
use cust::stream::{Stream, StreamFlags};
use cust::sys as cu;
use dinovmf_ptx::manifest::{self, KernelInfo};

use super::device::Device;

/// The kernels, built by `scripts/build-ptx.sh` and committed.
pub const PTX: &str = include_str!("../../../../ptx/dinovmf.ptx");

/// `CUresult` to an error naming the call.
fn check(r: cu::CUresult, what: &str) -> Result<()> {
    if r == cu::CUresult::CUDA_SUCCESS {
        return Ok(());
    }
    let mut name: *const std::os::raw::c_char = std::ptr::null();
    // SAFETY: cuGetErrorName writes a pointer to a static string or fails.
    let got = unsafe { cu::cuGetErrorName(r, &mut name) };
    let name = if got == cu::CUresult::CUDA_SUCCESS && !name.is_null() {
        // SAFETY: the driver returned a NUL-terminated static string.
        unsafe { CStr::from_ptr(name) }
            .to_string_lossy()
            .into_owned()
    } else {
        format!("{r:?}")
    };
    bail!("{what} failed: {name} (CUDA error {})", r as u32)
}

/// A cust error to an error naming the call (Debug form: never calls into the driver).
fn cust_err(what: &'static str) -> impl Fn(cust::error::CudaError) -> anyhow::Error {
    move |e| anyhow!("{what} failed: {e:?} (CUDA error {})", e as u32)
}

pub struct CudaDevice {
    name: String,
    allocs: Vec<cu::CUdeviceptr>,
    funcs: HashMap<&'static str, cu::CUfunction>,
    stream: Stream,
    _module: Module,
    ctx: Context,
}

// SAFETY: the raw handles are plain driver handles; every entry point that uses them first
// makes the context current on the calling thread (`bind`), which is all the driver needs.
unsafe impl Send for CudaDevice {}

impl CudaDevice {
    /// Initialises the driver, device 0, and loads the kernels; a machine without a usable
    /// GPU or driver gets an error saying so.
    pub fn open() -> Result<Self> {
        cust::init(cust::CudaFlags::empty()).map_err(|e| {
            anyhow!(
                "no usable CUDA device: cuInit failed with {e:?} (CUDA error {}); is the NVIDIA \
                 driver installed and a GPU visible? (use `--device cpu` otherwise)",
                e as u32
            )
        })?;
        let n = cust::device::Device::num_devices().map_err(cust_err("cuDeviceGetCount"))?;
        if n == 0 {
            bail!("no CUDA device found (use `--device cpu`)");
        }
        let dev = cust::device::Device::get_device(0).map_err(cust_err("cuDeviceGet"))?;
        let name = dev.name().map_err(cust_err("cuDeviceGetName"))?;
        let mem = dev.total_memory().map_err(cust_err("cuDeviceTotalMem"))?;
        let ctx = Context::new(dev).map_err(cust_err("cuDevicePrimaryCtxRetain"))?;
        CurrentContext::set_current(&ctx).map_err(cust_err("cuCtxSetCurrent"))?;
        let module = Module::from_ptx(PTX, &[]).map_err(|e| {
            anyhow!(
                "loading dinovmf.ptx (JIT to this GPU) failed: {e:?} (CUDA error {}); the driver \
                 must support PTX ISA 7.0 / sm_80 or newer",
                e as u32
            )
        })?;
        let mut funcs = HashMap::new();
        for k in manifest::all() {
            let f = module
                .get_function(k.name)
                .map_err(|e| anyhow!("kernel {} missing from dinovmf.ptx: {e:?}", k.name))?;
            funcs.insert(k.name, f.to_raw());
        }
        let stream = Stream::new(StreamFlags::DEFAULT, None).map_err(cust_err("cuStreamCreate"))?;
        Ok(Self {
            name: format!("cuda: {name} ({:.1} GiB)", mem as f64 / (1u64 << 30) as f64),
            allocs: Vec::new(),
            funcs,
            stream,
            _module: module,
            ctx,
        })
    }
}

impl Drop for CudaDevice {
    fn drop(&mut self) {
        // Best effort: errors here cannot be reported and must not panic.
        let _ = CurrentContext::set_current(&self.ctx);
        let _ = self.stream.synchronize();
        for &p in &self.allocs {
            // SAFETY: each pointer came from cuMemAlloc in this context and is freed once.
            unsafe {
                cu::cuMemFree_v2(p);
            }
        }
    }
}

impl Device for CudaDevice {
    fn name(&self) -> String {
        self.name.clone()
    }
    fn bind(&mut self) -> Result<()> {
        CurrentContext::set_current(&self.ctx).map_err(cust_err("cuCtxSetCurrent"))
    }
    fn alloc(&mut self, bytes: usize) -> Result<u64> {
        let mut p: cu::CUdeviceptr = 0;
        // SAFETY: plain driver calls on a current context.
        unsafe {
            check(cu::cuMemAlloc_v2(&mut p, bytes), "cuMemAlloc")
                .map_err(|e| anyhow!("{e} ({bytes} bytes)"))?;
            self.allocs.push(p);
            check(cu::cuMemsetD8_v2(p, 0xFF, bytes), "cuMemsetD8")?;
        }
        Ok(p)
    }
    fn upload(&mut self, dst: u64, src: &[u8]) -> Result<()> {
        // SAFETY: `src` is a live host slice; `dst` a device range the caller owns.
        unsafe {
            check(
                cu::cuMemcpyHtoD_v2(dst, src.as_ptr() as *const c_void, src.len()),
                "cuMemcpyHtoD",
            )
        }
    }
    fn download(&mut self, src: u64, dst: &mut [u8]) -> Result<()> {
        self.stream.synchronize().map_err(|e| {
            anyhow!(
                "a kernel failed (reported at the next sync): {e:?} (CUDA error {})",
                e as u32
            )
        })?;
        // SAFETY: as `upload`.
        unsafe {
            check(
                cu::cuMemcpyDtoH_v2(dst.as_mut_ptr() as *mut c_void, src, dst.len()),
                "cuMemcpyDtoH",
            )
        }
    }
    fn copy(&mut self, dst: u64, src: u64, bytes: usize) -> Result<()> {
        // SAFETY: device ranges owned by the caller, ordered on our stream.
        unsafe {
            check(
                cu::cuMemcpyDtoDAsync_v2(dst, src, bytes, self.stream.as_inner()),
                "cuMemcpyDtoDAsync",
            )
        }
    }
    fn launch(&mut self, k: &'static KernelInfo, grid: [u32; 3], args: &[u64]) -> Result<()> {
        let f = *self
            .funcs
            .get(k.name)
            .ok_or_else(|| anyhow!("kernel {} not loaded", k.name))?;
        // Each parameter's value is read from its own word: 8 bytes for pointers, u64, f64;
        // the low 4 bytes (little-endian) for u32 and f32.
        let mut words = args.to_vec();
        let mut ptrs: Vec<*mut c_void> = words
            .iter_mut()
            .map(|w| w as *mut u64 as *mut c_void)
            .collect();
        // SAFETY: argument count and types were checked against the manifest, which
        // `ptx/tests/manifest.rs` checks against the PTX; shared memory is static (0 dynamic).
        unsafe {
            check(
                cu::cuLaunchKernel(
                    f,
                    grid[0],
                    grid[1],
                    grid[2],
                    k.block,
                    1,
                    1,
                    0,
                    self.stream.as_inner(),
                    ptrs.as_mut_ptr(),
                    std::ptr::null_mut(),
                ),
                k.name,
            )
        }
    }
    fn sync(&mut self) -> Result<()> {
        self.stream
            .synchronize()
            .map_err(|e| anyhow!("stream synchronize failed: {e:?} (CUDA error {})", e as u32))
    }
}
