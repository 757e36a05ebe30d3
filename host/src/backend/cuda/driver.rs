//! The CUDA driver as a [`Device`] (feature `cuda`): one context (device 0's primary context),
//! `dinovmf.ptx` (embedded in the binary) JIT-compiled by the driver with its error and info
//! logs, one stream.
//!
//! Every driver call goes through this file's own declarations (`ffi`), which return the raw
//! `CUresult` as an `i32`: a code newer than any binding is then still reported by number and
//! name (`errors.rs`), where cust would fold it into `UnknownError` (and a Rust enum from the
//! bindings would not even be allowed to hold it). cust 0.3.2 remains the crate whose build
//! script links `libcuda`.
//!
//! Loading: `cuModuleLoadDataEx` with `CU_JIT_INFO_LOG_BUFFER`, `CU_JIT_ERROR_LOG_BUFFER`,
//! `CU_JIT_LOG_VERBOSE` and `CU_JIT_WALL_TIME`; a failed JIT returns its error log in the error;
//! the info log, the JIT time and each kernel's registers, local memory (spills and stack) and
//! static shared memory (`cuFuncGetAttribute`) are kept for [`Device::load_report`], which
//! `verify-kernels` prints.
//!
//! Ordering: the stream is created with default flags, so it synchronises with the legacy
//! default stream that the synchronous `cuMemcpyHtoD`/`cuMemcpyDtoH` use: an upload is
//! complete before later launches read it, and a download waits for every earlier launch.
use std::collections::HashMap;
use std::ffi::{c_void, CStr, CString};
use std::os::raw::{c_char, c_int, c_uint};

use anyhow::{anyhow, bail, Result};
use dinovmf_ptx::manifest::{self, KernelInfo};

use super::device::Device;
use super::errors::describe;

/// The kernels, built by `scripts/build-ptx.sh` and committed.
pub const PTX: &str = include_str!("../../../../ptx/dinovmf.ptx");

#[allow(non_camel_case_types)]
mod ffi {
    use super::*;
    pub type CUresult = c_int;
    pub type CUdevice = c_int;
    pub type CUdeviceptr = u64;
    pub type CUcontext = *mut c_void;
    pub type CUmodule = *mut c_void;
    pub type CUfunction = *mut c_void;
    pub type CUstream = *mut c_void;

    /// `CUjit_option` values (cuda.h).
    pub const CU_JIT_WALL_TIME: c_int = 2;
    pub const CU_JIT_INFO_LOG_BUFFER: c_int = 3;
    pub const CU_JIT_INFO_LOG_BUFFER_SIZE_BYTES: c_int = 4;
    pub const CU_JIT_ERROR_LOG_BUFFER: c_int = 5;
    pub const CU_JIT_ERROR_LOG_BUFFER_SIZE_BYTES: c_int = 6;
    pub const CU_JIT_LOG_VERBOSE: c_int = 12;
    /// `CUfunction_attribute` values.
    pub const CU_FUNC_ATTRIBUTE_SHARED_SIZE_BYTES: c_int = 1;
    pub const CU_FUNC_ATTRIBUTE_LOCAL_SIZE_BYTES: c_int = 3;
    pub const CU_FUNC_ATTRIBUTE_NUM_REGS: c_int = 4;
    pub const CU_FUNC_ATTRIBUTE_BINARY_VERSION: c_int = 6;
    pub const CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES: c_int = 8;
    /// `CUdevice_attribute` values.
    pub const CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT: c_int = 16;
    pub const CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR: c_int = 75;
    pub const CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR: c_int = 76;

    #[link(name = "cuda")]
    extern "C" {
        pub fn cuInit(flags: c_uint) -> CUresult;
        pub fn cuDriverGetVersion(v: *mut c_int) -> CUresult;
        pub fn cuDeviceGetCount(n: *mut c_int) -> CUresult;
        pub fn cuDeviceGet(d: *mut CUdevice, ordinal: c_int) -> CUresult;
        pub fn cuDeviceGetName(name: *mut c_char, len: c_int, d: CUdevice) -> CUresult;
        pub fn cuDeviceTotalMem_v2(bytes: *mut usize, d: CUdevice) -> CUresult;
        pub fn cuDeviceGetAttribute(v: *mut c_int, attr: c_int, d: CUdevice) -> CUresult;
        pub fn cuDevicePrimaryCtxRetain(ctx: *mut CUcontext, d: CUdevice) -> CUresult;
        pub fn cuDevicePrimaryCtxRelease_v2(d: CUdevice) -> CUresult;
        pub fn cuCtxSetCurrent(ctx: CUcontext) -> CUresult;
        pub fn cuModuleLoadDataEx(
            m: *mut CUmodule,
            image: *const c_void,
            n: c_uint,
            options: *mut c_int,
            values: *mut *mut c_void,
        ) -> CUresult;
        pub fn cuModuleGetFunction(
            f: *mut CUfunction,
            m: CUmodule,
            name: *const c_char,
        ) -> CUresult;
        pub fn cuModuleUnload(m: CUmodule) -> CUresult;
        pub fn cuFuncGetAttribute(v: *mut c_int, attr: c_int, f: CUfunction) -> CUresult;
        pub fn cuFuncSetAttribute(f: CUfunction, attr: c_int, v: c_int) -> CUresult;
        pub fn cuStreamCreate(s: *mut CUstream, flags: c_uint) -> CUresult;
        pub fn cuStreamSynchronize(s: CUstream) -> CUresult;
        pub fn cuStreamDestroy_v2(s: CUstream) -> CUresult;
        pub fn cuMemAlloc_v2(p: *mut CUdeviceptr, bytes: usize) -> CUresult;
        pub fn cuMemFree_v2(p: CUdeviceptr) -> CUresult;
        pub fn cuMemsetD8_v2(p: CUdeviceptr, v: u8, n: usize) -> CUresult;
        pub fn cuMemcpyHtoD_v2(dst: CUdeviceptr, src: *const c_void, n: usize) -> CUresult;
        pub fn cuMemcpyDtoH_v2(dst: *mut c_void, src: CUdeviceptr, n: usize) -> CUresult;
        pub fn cuMemcpyDtoDAsync_v2(
            dst: CUdeviceptr,
            src: CUdeviceptr,
            n: usize,
            s: CUstream,
        ) -> CUresult;
        #[allow(clippy::too_many_arguments)]
        pub fn cuLaunchKernel(
            f: CUfunction,
            gx: c_uint,
            gy: c_uint,
            gz: c_uint,
            bx: c_uint,
            by: c_uint,
            bz: c_uint,
            shared: c_uint,
            s: CUstream,
            params: *mut *mut c_void,
            extra: *mut *mut c_void,
        ) -> CUresult;
        pub fn cuGetErrorName(e: CUresult, name: *mut *const c_char) -> CUresult;
    }
}

/// A `CUresult` to an error naming the call, the code and its name.
fn check(r: ffi::CUresult, what: &str) -> Result<()> {
    if r == 0 {
        return Ok(());
    }
    let mut name: *const c_char = std::ptr::null();
    // SAFETY: cuGetErrorName writes a pointer to a static string or fails.
    let got = unsafe { ffi::cuGetErrorName(r, &mut name) };
    let driver_name = (got == 0 && !name.is_null()).then(|| {
        // SAFETY: the driver returned a NUL-terminated static string.
        unsafe { CStr::from_ptr(name) }
            .to_string_lossy()
            .into_owned()
    });
    bail!("{}", describe(what, r, driver_name.as_deref()))
}

/// What the driver made of one kernel.
#[derive(Clone, Debug)]
pub struct KernelAttrs {
    pub name: &'static str,
    pub registers: i32,
    /// Local memory per thread: register spills and stack.
    pub local_bytes: i32,
    pub shared_bytes: i32,
    /// SASS version the JIT compiled for (`90` for sm_90).
    pub binary_version: i32,
}

/// `text` of a NUL-padded log buffer.
fn log_text(buf: &[u8]) -> String {
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    String::from_utf8_lossy(&buf[..end]).trim().to_string()
}

pub struct CudaDevice {
    name: String,
    dev: ffi::CUdevice,
    ctx: ffi::CUcontext,
    module: ffi::CUmodule,
    stream: ffi::CUstream,
    allocs: Vec<ffi::CUdeviceptr>,
    funcs: HashMap<&'static str, ffi::CUfunction>,
    attrs: Vec<KernelAttrs>,
    jit_info: String,
    jit_ms: f32,
}

// SAFETY: the raw handles are plain driver handles; every entry point that uses them first
// makes the context current on the calling thread (`bind`), which is all the driver needs.
unsafe impl Send for CudaDevice {}

const LOG_BYTES: usize = 1 << 16;

impl CudaDevice {
    /// Initialises the driver, device 0, and loads the kernels; a machine without a usable
    /// GPU or driver gets an error saying so.
    pub fn open() -> Result<Self> {
        Self::open_ordinal(0)
    }

    /// As [`CudaDevice::open`] on device `ordinal` (a data-parallel rank's local rank).
    pub fn open_ordinal(ordinal: usize) -> Result<Self> {
        // SAFETY: plain driver calls with valid out-pointers, in order.
        unsafe {
            check(ffi::cuInit(0), "cuInit").map_err(|e| {
                anyhow!(
                    "no usable CUDA device: {e}; is the NVIDIA driver installed and a GPU \
                     visible? (use `--device cpu` otherwise)"
                )
            })?;
            let mut n = 0;
            check(ffi::cuDeviceGetCount(&mut n), "cuDeviceGetCount")?;
            if n == 0 {
                bail!("no CUDA device found (use `--device cpu`)");
            }
            if ordinal >= n as usize {
                bail!(
                    "CUDA device {ordinal} asked for (the rank's local rank) but this machine \
                     shows {n}: run at most {n} ranks per machine"
                );
            }
            let mut dev = 0;
            check(ffi::cuDeviceGet(&mut dev, ordinal as c_int), "cuDeviceGet")?;
            let mut raw = [0 as c_char; 256];
            check(
                ffi::cuDeviceGetName(raw.as_mut_ptr(), raw.len() as c_int, dev),
                "cuDeviceGetName",
            )?;
            let gpu = CStr::from_ptr(raw.as_ptr()).to_string_lossy().into_owned();
            let mut mem = 0usize;
            check(ffi::cuDeviceTotalMem_v2(&mut mem, dev), "cuDeviceTotalMem")?;
            let attr = |a: c_int, what: &str| -> Result<i32> {
                let mut v = 0;
                check(ffi::cuDeviceGetAttribute(&mut v, a, dev), what)?;
                Ok(v)
            };
            let major = attr(
                ffi::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR,
                "cuDeviceGetAttribute(compute capability)",
            )?;
            let minor = attr(
                ffi::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR,
                "cuDeviceGetAttribute(compute capability)",
            )?;
            let sms = attr(
                ffi::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT,
                "cuDeviceGetAttribute(multiprocessors)",
            )?;
            let mut version = 0;
            check(ffi::cuDriverGetVersion(&mut version), "cuDriverGetVersion")?;
            let mut ctx = std::ptr::null_mut();
            check(
                ffi::cuDevicePrimaryCtxRetain(&mut ctx, dev),
                "cuDevicePrimaryCtxRetain",
            )?;
            let mut me = Self {
                name: format!(
                    "cuda: {gpu} (sm_{major}{minor}, {sms} SMs, {:.1} GiB, driver API {}.{})",
                    mem as f64 / (1u64 << 30) as f64,
                    version / 1000,
                    version % 1000 / 10
                ),
                dev,
                ctx,
                module: std::ptr::null_mut(),
                stream: std::ptr::null_mut(),
                allocs: Vec::new(),
                funcs: HashMap::new(),
                attrs: Vec::new(),
                jit_info: String::new(),
                jit_ms: 0.0,
            };
            check(ffi::cuCtxSetCurrent(ctx), "cuCtxSetCurrent")?;
            me.load_module()?;
            check(ffi::cuStreamCreate(&mut me.stream, 0), "cuStreamCreate")?;
            Ok(me)
        }
    }

    /// `cuModuleLoadDataEx` of [`PTX`] with the JIT logs, then every kernel of the manifest
    /// and its attributes.
    fn load_module(&mut self) -> Result<()> {
        let image = CString::new(PTX).map_err(|_| anyhow!("dinovmf.ptx holds a NUL byte"))?;
        let mut info = vec![0u8; LOG_BYTES];
        let mut error = vec![0u8; LOG_BYTES];
        let mut opts = [
            ffi::CU_JIT_INFO_LOG_BUFFER,
            ffi::CU_JIT_INFO_LOG_BUFFER_SIZE_BYTES,
            ffi::CU_JIT_ERROR_LOG_BUFFER,
            ffi::CU_JIT_ERROR_LOG_BUFFER_SIZE_BYTES,
            ffi::CU_JIT_LOG_VERBOSE,
            ffi::CU_JIT_WALL_TIME,
        ];
        // Option values are passed as pointer-sized words: buffers as pointers, sizes and
        // flags as integers; the wall time (f32 milliseconds) comes back in its word.
        let mut vals: [*mut c_void; 6] = [
            info.as_mut_ptr() as *mut c_void,
            std::ptr::without_provenance_mut(LOG_BYTES),
            error.as_mut_ptr() as *mut c_void,
            std::ptr::without_provenance_mut(LOG_BYTES),
            std::ptr::without_provenance_mut(1),
            std::ptr::null_mut(),
        ];
        // SAFETY: the buffers outlive the call; the option and value arrays have equal length.
        let r = unsafe {
            ffi::cuModuleLoadDataEx(
                &mut self.module,
                image.as_ptr() as *const c_void,
                opts.len() as c_uint,
                opts.as_mut_ptr(),
                vals.as_mut_ptr(),
            )
        };
        self.jit_info = log_text(&info);
        self.jit_ms = f32::from_bits(vals[5] as usize as u32);
        if let Err(e) = check(
            r,
            "loading dinovmf.ptx (cuModuleLoadDataEx, JIT to this GPU)",
        ) {
            let log = log_text(&error);
            bail!(
                "{e}\nJIT error log:\n{}\nJIT info log:\n{}",
                if log.is_empty() { "(empty)" } else { &log },
                if self.jit_info.is_empty() {
                    "(empty)"
                } else {
                    &self.jit_info
                }
            );
        }
        for k in manifest::all() {
            let cname = CString::new(k.name).expect("kernel names have no NUL");
            let mut f = std::ptr::null_mut();
            // SAFETY: a loaded module and a NUL-terminated name.
            check(
                unsafe { ffi::cuModuleGetFunction(&mut f, self.module, cname.as_ptr()) },
                &format!("cuModuleGetFunction({})", k.name),
            )?;
            let get = |a: c_int| -> Result<i32> {
                let mut v = 0;
                // SAFETY: a valid function handle.
                check(
                    unsafe { ffi::cuFuncGetAttribute(&mut v, a, f) },
                    &format!("cuFuncGetAttribute({})", k.name),
                )?;
                Ok(v)
            };
            self.attrs.push(KernelAttrs {
                name: k.name,
                registers: get(ffi::CU_FUNC_ATTRIBUTE_NUM_REGS)?,
                local_bytes: get(ffi::CU_FUNC_ATTRIBUTE_LOCAL_SIZE_BYTES)?,
                shared_bytes: get(ffi::CU_FUNC_ATTRIBUTE_SHARED_SIZE_BYTES)?,
                binary_version: get(ffi::CU_FUNC_ATTRIBUTE_BINARY_VERSION)?,
            });
            self.funcs.insert(k.name, f);
        }
        Ok(())
    }

    /// Each kernel's registers, local memory and shared memory as the driver compiled it.
    pub fn kernel_attrs(&self) -> &[KernelAttrs] {
        &self.attrs
    }
}

/// The load report `verify-kernels` prints: JIT time and info log, one line per kernel.
pub fn format_load_report(jit_ms: f32, jit_info: &str, attrs: &[KernelAttrs]) -> String {
    let mut s = format!(
        "module: dinovmf.ptx JIT-compiled in {jit_ms:.0} ms\nJIT info log:\n{}\n",
        if jit_info.is_empty() {
            "(empty)"
        } else {
            jit_info
        }
    );
    s += &format!(
        "{:<26} {:>5} {:>12} {:>12} {:>5}\n",
        "kernel", "regs", "local bytes", "shared bytes", "sass"
    );
    for a in attrs {
        s += &format!(
            "{:<26} {:>5} {:>12} {:>12} {:>5}{}\n",
            a.name,
            a.registers,
            a.local_bytes,
            a.shared_bytes,
            format!("sm_{}", a.binary_version),
            if a.local_bytes > 0 {
                "  (local memory: spills or stack)"
            } else {
                ""
            }
        );
    }
    let spilling = attrs.iter().filter(|a| a.local_bytes > 0).count();
    s += &format!(
        "{} kernels, max {} registers, {spilling} with local memory\n",
        attrs.len(),
        attrs.iter().map(|a| a.registers).max().unwrap_or(0)
    );
    s
}

impl Drop for CudaDevice {
    fn drop(&mut self) {
        // Best effort: errors here cannot be reported and must not panic.
        // SAFETY: handles made by `open`, each released once, in the context they belong to.
        unsafe {
            ffi::cuCtxSetCurrent(self.ctx);
            if !self.stream.is_null() {
                ffi::cuStreamSynchronize(self.stream);
            }
            for &p in &self.allocs {
                ffi::cuMemFree_v2(p);
            }
            if !self.stream.is_null() {
                ffi::cuStreamDestroy_v2(self.stream);
            }
            if !self.module.is_null() {
                ffi::cuModuleUnload(self.module);
            }
            ffi::cuDevicePrimaryCtxRelease_v2(self.dev);
        }
    }
}

impl Device for CudaDevice {
    fn name(&self) -> String {
        self.name.clone()
    }
    fn load_report(&self) -> Option<String> {
        Some(format_load_report(self.jit_ms, &self.jit_info, &self.attrs))
    }
    fn bind(&mut self) -> Result<()> {
        // SAFETY: the context retained in `open`.
        check(unsafe { ffi::cuCtxSetCurrent(self.ctx) }, "cuCtxSetCurrent")
    }
    fn alloc(&mut self, bytes: usize) -> Result<u64> {
        let mut p: ffi::CUdeviceptr = 0;
        // SAFETY: plain driver calls on a current context.
        unsafe {
            check(ffi::cuMemAlloc_v2(&mut p, bytes), "cuMemAlloc")
                .map_err(|e| anyhow!("{e} ({bytes} bytes)"))?;
            self.allocs.push(p);
            check(ffi::cuMemsetD8_v2(p, 0xFF, bytes), "cuMemsetD8")?;
        }
        Ok(p)
    }
    fn upload(&mut self, dst: u64, src: &[u8]) -> Result<()> {
        // SAFETY: `src` is a live host slice; `dst` a device range the caller owns.
        unsafe {
            check(
                ffi::cuMemcpyHtoD_v2(dst, src.as_ptr() as *const c_void, src.len()),
                "cuMemcpyHtoD",
            )
        }
    }
    fn download(&mut self, src: u64, dst: &mut [u8]) -> Result<()> {
        // SAFETY: our stream; then as `upload`.
        unsafe {
            check(
                ffi::cuStreamSynchronize(self.stream),
                "a kernel (reported at the next cuStreamSynchronize)",
            )?;
            check(
                ffi::cuMemcpyDtoH_v2(dst.as_mut_ptr() as *mut c_void, src, dst.len()),
                "cuMemcpyDtoH",
            )
        }
    }
    fn copy(&mut self, dst: u64, src: u64, bytes: usize) -> Result<()> {
        // SAFETY: device ranges owned by the caller, ordered on our stream.
        unsafe {
            check(
                ffi::cuMemcpyDtoDAsync_v2(dst, src, bytes, self.stream),
                "cuMemcpyDtoDAsync",
            )
        }
    }
    fn set_max_dynamic_smem(&mut self, k: &'static KernelInfo, bytes: u32) -> Result<()> {
        let f = *self
            .funcs
            .get(k.name)
            .ok_or_else(|| anyhow!("kernel {} not loaded", k.name))?;
        // SAFETY: a valid function handle of the loaded module.
        check(
            unsafe {
                ffi::cuFuncSetAttribute(
                    f,
                    ffi::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                    bytes as c_int,
                )
            },
            &format!(
                "cuFuncSetAttribute({}, MAX_DYNAMIC_SHARED_SIZE_BYTES, {bytes})",
                k.name
            ),
        )
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
        // `ptx/tests/manifest.rs` checks against the PTX; dynamic shared memory as the
        // manifest says (its limit raised by `Gpu::launch_with` first where above 48 KB).
        unsafe {
            check(
                ffi::cuLaunchKernel(
                    f,
                    grid[0],
                    grid[1],
                    grid[2],
                    k.block,
                    1,
                    1,
                    k.dynamic_smem_bytes(),
                    self.stream,
                    ptrs.as_mut_ptr(),
                    std::ptr::null_mut(),
                ),
                &format!("cuLaunchKernel({}, grid {grid:?})", k.name),
            )
        }
    }
    fn stream(&self) -> u64 {
        self.stream as u64
    }
    fn sync(&mut self) -> Result<()> {
        // SAFETY: our stream.
        check(
            unsafe { ffi::cuStreamSynchronize(self.stream) },
            "cuStreamSynchronize (a kernel failed)",
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn load_report_lists_registers_and_flags_local_memory() {
        let attrs = [
            KernelAttrs {
                name: "gemm_nt_f32",
                registers: 96,
                local_bytes: 0,
                shared_bytes: 8704,
                binary_version: 90,
            },
            KernelAttrs {
                name: "xent_masked",
                registers: 56,
                local_bytes: 8,
                shared_bytes: 1024,
                binary_version: 90,
            },
        ];
        let r = format_load_report(812.0, "ptxas info : Used 96 registers", &attrs);
        assert!(r.contains("JIT-compiled in 812 ms"), "{r}");
        assert!(r.contains("Used 96 registers"));
        assert!(r
            .lines()
            .any(|l| l.starts_with("gemm_nt_f32") && l.contains(" 96 ")));
        let x = r.lines().find(|l| l.starts_with("xent_masked")).unwrap();
        assert!(x.contains("spills or stack"), "{x}");
        assert!(
            r.contains("2 kernels, max 96 registers, 1 with local memory"),
            "{r}"
        );
    }

    #[test]
    fn log_buffers_end_at_the_first_nul() {
        assert_eq!(log_text(b"ptxas info\n\0\0junk"), "ptxas info");
        assert_eq!(log_text(&[0u8; 8]), "");
    }
}
