//! NCCL for the CUDA backend's ranks (feature `nccl`): the few calls the step needs, from a
//! `libnccl.so.2` opened at run time (no link-time dependency: a binary built with the feature
//! starts on machines without NCCL and says what it searched when a run needs it).
//!
//! Where the library is looked for, in order ([`NcclSearch::from_env`]):
//! 1. `DINOVMF_NCCL_LIB`: the library file, or a folder holding `libnccl.so.2`;
//! 2. `libnccl.so.2` through the dynamic loader (`LD_LIBRARY_PATH`, the system's cache);
//! 3. the NVIDIA wheel of a Python environment (`pip install nvidia-nccl-cu12`, which PyTorch
//!    installs): `python3 -c 'import nvidia.nccl'`, then `<package>/lib/libnccl.so.2`.
//!
//! The rendezvous: rank 0 creates the unique id and every rank receives it through the run's
//! host collective (MPI under `mpirun`, threads in tests), then `ncclCommInitRank`.
use std::ffi::{c_char, c_int, c_void, CStr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{anyhow, bail, ensure, Context, Result};

use super::ranks::DeviceCollective;
use crate::backend::Collective;

/// Environment variable naming the NCCL library (a file, or a folder holding `libnccl.so.2`).
pub const LIB_ENV: &str = "DINOVMF_NCCL_LIB";
/// The library's soname.
pub const SONAME: &str = "libnccl.so.2";

/// `ncclUniqueId`: 128 opaque bytes, passed by value.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct UniqueId {
    pub internal: [u8; 128],
}

type Comm = *mut c_void;
/// `ncclFloat32`, `ncclSum` and `ncclMax` of nccl.h.
const FLOAT32: c_int = 7;
const SUM: c_int = 0;
const MAX: c_int = 2;

type GetUniqueIdFn = unsafe extern "C" fn(*mut UniqueId) -> c_int;
type CommInitRankFn = unsafe extern "C" fn(*mut Comm, c_int, UniqueId, c_int) -> c_int;
type AllReduceFn = unsafe extern "C" fn(
    *const c_void,
    *mut c_void,
    usize,
    c_int,
    c_int,
    Comm,
    *mut c_void,
) -> c_int;
type AllGatherFn =
    unsafe extern "C" fn(*const c_void, *mut c_void, usize, c_int, Comm, *mut c_void) -> c_int;
type CommDestroyFn = unsafe extern "C" fn(Comm) -> c_int;
type GetErrorStringFn = unsafe extern "C" fn(c_int) -> *const c_char;
type GetVersionFn = unsafe extern "C" fn(*mut c_int) -> c_int;

/// Where to look for the library (see the module doc).
#[derive(Clone, Debug, Default)]
pub struct NcclSearch {
    /// `DINOVMF_NCCL_LIB`'s value.
    pub explicit: Option<PathBuf>,
    /// Ask the dynamic loader for `libnccl.so.2`.
    pub loader: bool,
    /// A Python interpreter whose `nvidia.nccl` package may hold the library.
    pub python: Option<String>,
}

impl NcclSearch {
    /// The search a run does: `DINOVMF_NCCL_LIB`, the dynamic loader, `python3`'s wheel.
    pub fn from_env() -> Self {
        Self {
            explicit: std::env::var_os(LIB_ENV).map(PathBuf::from),
            loader: true,
            python: Some("python3".into()),
        }
    }

    /// Only the given file or folder.
    pub fn only(path: &Path) -> Self {
        Self {
            explicit: Some(path.to_path_buf()),
            loader: false,
            python: None,
        }
    }
}

/// The folder of the `nvidia.nccl` package of `python`'s environment, if it has one.
fn python_wheel_lib(python: &str) -> std::result::Result<PathBuf, String> {
    let out = std::process::Command::new(python)
        .args(["-c", "import nvidia.nccl as m; print(list(m.__path__)[0])"])
        .output()
        .map_err(|e| format!("`{python}` did not run ({e})"))?;
    if !out.status.success() {
        return Err(format!(
            "`{python} -c 'import nvidia.nccl'` failed (no wheel)"
        ));
    }
    let dir = String::from_utf8_lossy(&out.stdout).trim().to_string();
    Ok(Path::new(&dir).join("lib").join(SONAME))
}

/// An opened NCCL library and the entry points the step uses.
pub struct NcclLibrary {
    /// Where it was opened from.
    pub path: String,
    /// `ncclGetVersion` (0 for the CI stand-in).
    pub version: i32,
    get_unique_id: GetUniqueIdFn,
    comm_init_rank: CommInitRankFn,
    all_reduce: AllReduceFn,
    all_gather: AllGatherFn,
    comm_destroy: CommDestroyFn,
    get_error_string: GetErrorStringFn,
    // Keeps the code above mapped; dropped last.
    _lib: libloading::Library,
}

impl NcclLibrary {
    /// Opens the first library `search` finds, or says everything it tried.
    pub fn open(search: &NcclSearch) -> Result<Arc<Self>> {
        let mut tried = Vec::new();
        let mut candidates: Vec<PathBuf> = Vec::new();
        if let Some(p) = &search.explicit {
            candidates.push(if p.is_dir() {
                p.join(SONAME)
            } else {
                p.clone()
            });
        } else {
            tried.push(format!("{LIB_ENV} (unset)"));
        }
        if search.loader {
            candidates.push(PathBuf::from(SONAME));
        }
        for c in candidates {
            // SAFETY: loading NCCL runs its (trusted) initialisers only.
            match unsafe { libloading::Library::new(&c) } {
                Ok(lib) => return Self::bind(lib, c.display().to_string()),
                Err(e) => tried.push(format!("{} ({e})", c.display())),
            }
        }
        if let Some(py) = &search.python {
            match python_wheel_lib(py) {
                Ok(p) => match unsafe { libloading::Library::new(&p) } {
                    Ok(lib) => return Self::bind(lib, p.display().to_string()),
                    Err(e) => tried.push(format!("{} ({e})", p.display())),
                },
                Err(why) => tried.push(why),
            }
        }
        bail!(
            "NCCL ({SONAME}) was not found; tried: {}. Install the NVIDIA wheel (`pip install \
             nvidia-nccl-cu12`, which PyTorch brings) or set {LIB_ENV} to the library or its \
             folder",
            tried.join("; ")
        )
    }

    fn bind(lib: libloading::Library, path: String) -> Result<Arc<Self>> {
        // SAFETY: the symbols have the types of nccl.h (NCCL 2.x ABI).
        unsafe {
            fn missing(path: &str, name: &str, e: libloading::Error) -> anyhow::Error {
                anyhow!("{path} is not a usable NCCL: {name} missing ({e})")
            }
            macro_rules! sym {
                ($name:literal, $ty:ty) => {
                    *lib.get::<$ty>(concat!($name, "\0").as_bytes())
                        .map_err(|e| missing(&path, $name, e))?
                };
            }
            let get_version: GetVersionFn = sym!("ncclGetVersion", GetVersionFn);
            let me = Self {
                version: 0,
                get_unique_id: sym!("ncclGetUniqueId", GetUniqueIdFn),
                comm_init_rank: sym!("ncclCommInitRank", CommInitRankFn),
                all_reduce: sym!("ncclAllReduce", AllReduceFn),
                all_gather: sym!("ncclAllGather", AllGatherFn),
                comm_destroy: sym!("ncclCommDestroy", CommDestroyFn),
                get_error_string: sym!("ncclGetErrorString", GetErrorStringFn),
                path,
                _lib: lib,
            };
            let mut v = 0;
            me.check(get_version(&mut v), "ncclGetVersion")?;
            Ok(Arc::new(Self { version: v, ..me }))
        }
    }

    /// `Ok` for `ncclSuccess`, else an error with NCCL's own words.
    fn check(&self, r: c_int, what: &str) -> Result<()> {
        if r == 0 {
            return Ok(());
        }
        // SAFETY: ncclGetErrorString returns a static string (or null).
        let s = unsafe { (self.get_error_string)(r) };
        let msg = if s.is_null() {
            "unknown".into()
        } else {
            // SAFETY: a NUL-terminated static string.
            unsafe { CStr::from_ptr(s) }.to_string_lossy().into_owned()
        };
        bail!("{what} failed: NCCL error {r} ({msg}) [{}]", self.path)
    }
}

/// One rank's NCCL communicator (the device current when it is created is its device).
pub struct NcclComm {
    lib: Arc<NcclLibrary>,
    comm: Comm,
    rank: usize,
    world: usize,
    bytes_sent: u64,
    seconds: f64,
}

// SAFETY: a communicator is used by one thread at a time (the backend that owns it); NCCL
// allows that from any thread with the device's context current.
unsafe impl Send for NcclComm {}

impl NcclComm {
    /// Joins the communicator of all ranks of `host`: rank 0 creates the unique id, `host`
    /// hands it to every rank (an all-gather of its bytes), each rank calls
    /// `ncclCommInitRank`. Every rank must call this at the same point.
    pub fn init(lib: Arc<NcclLibrary>, host: &mut dyn Collective) -> Result<Self> {
        let (rank, world) = (host.rank(), host.world_size());
        let mut id = UniqueId { internal: [0; 128] };
        if rank == 0 {
            // SAFETY: a valid out-pointer.
            lib.check(unsafe { (lib.get_unique_id)(&mut id) }, "ncclGetUniqueId")?;
        }
        // The id's bytes travel as 32 f32 bit patterns (copied, never computed with).
        let words: Vec<f32> = id
            .internal
            .chunks_exact(4)
            .map(|w| f32::from_bits(u32::from_le_bytes([w[0], w[1], w[2], w[3]])))
            .collect();
        let mut all = vec![0.0f32; world * words.len()];
        host.all_gather_f32(&words, &mut all)
            .context("sharing the NCCL unique id over the host collective")?;
        for (b, w) in id.internal.chunks_exact_mut(4).zip(&all[..words.len()]) {
            b.copy_from_slice(&w.to_bits().to_le_bytes());
        }
        let mut comm: Comm = std::ptr::null_mut();
        ensure!(
            world <= c_int::MAX as usize,
            "{world} ranks: too many for NCCL"
        );
        // SAFETY: a valid out-pointer; the id is rank 0's on every rank.
        lib.check(
            unsafe { (lib.comm_init_rank)(&mut comm, world as c_int, id, rank as c_int) },
            "ncclCommInitRank",
        )?;
        Ok(Self {
            lib,
            comm,
            rank,
            world,
            bytes_sent: 0,
            seconds: 0.0,
        })
    }
}

impl Drop for NcclComm {
    fn drop(&mut self) {
        if !self.comm.is_null() {
            // SAFETY: our communicator, destroyed once; an error here has no one to go to.
            let _ = unsafe { (self.lib.comm_destroy)(self.comm) };
        }
    }
}

impl NcclComm {
    /// `ncclAllReduce` of `n` f32 with `op` (`SUM` or `MAX`).
    ///
    /// # Safety
    /// As [`DeviceCollective::sum_f32`].
    unsafe fn all_reduce(
        &mut self,
        send: u64,
        recv: u64,
        n: usize,
        op: c_int,
        stream: u64,
    ) -> Result<()> {
        let t = Instant::now();
        // SAFETY: the caller's contract (device buffers of n f32 on this rank's device).
        let r = unsafe {
            (self.lib.all_reduce)(
                send as usize as *const c_void,
                recv as usize as *mut c_void,
                n,
                FLOAT32,
                op,
                self.comm,
                stream as usize as *mut c_void,
            )
        };
        self.lib.check(r, "ncclAllReduce")?;
        // A ring all-reduce: each rank sends 2 (N - 1) / N of the buffer.
        let w = self.world as u64;
        self.bytes_sent += 2 * (w - 1) * 4 * n as u64 / w;
        self.seconds += t.elapsed().as_secs_f64();
        Ok(())
    }
}

impl DeviceCollective for NcclComm {
    fn rank(&self) -> usize {
        self.rank
    }
    fn world_size(&self) -> usize {
        self.world
    }
    unsafe fn sum_f32(&mut self, send: u64, recv: u64, n: usize, stream: u64) -> Result<()> {
        // SAFETY: the caller's contract.
        unsafe { self.all_reduce(send, recv, n, SUM, stream) }
    }
    unsafe fn max_f32(&mut self, send: u64, recv: u64, n: usize, stream: u64) -> Result<()> {
        // SAFETY: the caller's contract.
        unsafe { self.all_reduce(send, recv, n, MAX, stream) }
    }
    unsafe fn all_gather_f32(&mut self, send: u64, recv: u64, n: usize, stream: u64) -> Result<()> {
        let t = Instant::now();
        // SAFETY: the caller's contract.
        let r = unsafe {
            (self.lib.all_gather)(
                send as usize as *const c_void,
                recv as usize as *mut c_void,
                n,
                FLOAT32,
                self.comm,
                stream as usize as *mut c_void,
            )
        };
        self.lib.check(r, "ncclAllGather")?;
        self.bytes_sent += (self.world as u64 - 1) * 4 * n as u64;
        self.seconds += t.elapsed().as_secs_f64();
        Ok(())
    }
    fn traffic(&self) -> (u64, f64) {
        (self.bytes_sent, self.seconds)
    }
}
