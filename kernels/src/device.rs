//! [`Device`]: one CUDA GPU — its context, the stream every op runs on, and the embedded PTX
//! modules (loaded on first use). Opening a device never panics: without a driver (libcuda) or a
//! GPU it returns an error saying so (cudarc itself panics when libcuda is missing, so the
//! library is probed first and every driver call sits behind a `catch_unwind`).
use crate::ptx::{self, Arch};
use cudarc::driver::{CudaContext, CudaFunction, CudaModule, CudaStream};
use dsv3_core::{Error, Result};
use std::collections::HashMap;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::{Arc, Mutex};

/// An open CUDA device.
pub struct Device {
    pub ctx: Arc<CudaContext>,
    /// The stream every launcher enqueues on (ops on one device are ordered).
    pub stream: Arc<CudaStream>,
    pub arch: Arch,
    /// `"NVIDIA H100 80GB HBM3 (sm_90, 132 SMs)"`-style description.
    pub name: String,
    pub sms: usize,
    /// A second stream for work that can run beside the main one ([`Device::fork`]).
    side: Option<Arc<CudaStream>>,
    functions: Arc<Mutex<HashMap<(&'static str, &'static str), Loaded>>>,
    modules: Arc<Mutex<HashMap<&'static str, Arc<CudaModule>>>>,
    /// The profiling window, shared with the side-stream views (crate::profile).
    pub(crate) profile: Arc<crate::profile::Recorder>,
    /// Arrival counters for kernels that count finished blocks and re-arm the count themselves
    /// (the FP8 GEMM's in-kernel split-K reduction): one zeroed buffer per stream, grown on
    /// demand (`Device::counters`).
    counters: Arc<Mutex<HashMap<usize, cudarc::driver::CudaSlice<i32>>>>,
}

/// A loaded kernel and the dynamic shared memory it has been allowed so far (the attribute is
/// set once per size increase, not per launch).
#[derive(Clone)]
struct Loaded {
    f: CudaFunction,
    smem_allowed: u32,
}

/// Runs a driver call, turning a panic (a symbol missing from an old libcuda) into an error.
pub(crate) fn guard<T>(what: &str, f: impl FnOnce() -> T) -> Result<T> {
    catch_unwind(AssertUnwindSafe(f))
        .map_err(|_| Error::Unsupported(format!("CUDA: {what} panicked in the driver bindings")))
}

/// A driver error as the engine's error.
pub(crate) fn cuda_err(what: &str, e: impl std::fmt::Debug) -> Error {
    Error::Io(format!("CUDA: {what}: {e:?}"))
}

/// Whether the CUDA driver library (libcuda.so) can be loaded.
pub fn driver_present() -> bool {
    // SAFETY: only tries to dlopen the library by its usual names
    catch_unwind(|| unsafe { cudarc::driver::sys::is_culib_present() }).unwrap_or(false)
}

/// Number of CUDA devices, or an error saying why there are none usable.
pub fn device_count() -> Result<usize> {
    if !driver_present() {
        return Err(Error::Unsupported(
            "no CUDA driver: libcuda.so could not be loaded (an NVIDIA driver is needed to run on a GPU)".into(),
        ));
    }
    let n = guard("cuDeviceGetCount", CudaContext::device_count)?.map_err(|e| {
        Error::Unsupported(format!("CUDA driver present but unusable (cuInit/cuDeviceGetCount failed: {e:?})"))
    })?;
    Ok(n.max(0) as usize)
}

/// The default memory pool of `ctx`'s device (where cudarc's stream-ordered allocations come from).
fn default_pool(ctx: &CudaContext) -> Result<cudarc::driver::sys::CUmemoryPool> {
    // SAFETY: the device of a live context
    guard("cuDeviceGetDefaultMemPool", || unsafe {
        cudarc::driver::result::device::get_default_mem_pool(ctx.cu_device())
    })?
    .map_err(|e| cuda_err("the default memory pool", e))
}

/// The release threshold of `ctx`'s default pool: sets it to `set` if given, returns it.
fn pool_threshold(ctx: &CudaContext, set: Option<u64>) -> Result<u64> {
    use cudarc::driver::{result::mem_pool, sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD as ATTR};
    let pool = default_pool(ctx)?;
    let mut v = set.unwrap_or(0);
    // SAFETY: a valid pool; the release threshold's value type is cuuint64_t
    guard("cuMemPool{Set,Get}Attribute", || unsafe {
        let p = (&mut v as *mut u64).cast();
        match set {
            Some(_) => mem_pool::set_attribute(pool, ATTR, p),
            None => mem_pool::get_attribute(pool, ATTR, p),
        }
    })?
    .map_err(|e| cuda_err("the memory pool's release threshold", e))?;
    Ok(v)
}

/// Keeps the memory the stream-ordered allocator has reserved. The default pool's release
/// threshold is 0, which hands every unused byte back to the OS at each stream, event or context
/// synchronization: each training step (whose scalars' download synchronizes) and each generate
/// call would map its activations' memory anew. As PyTorch's caching allocator, the pool now keeps
/// what it has reserved (peak use stays reserved until the process ends).
fn keep_pool_memory(ctx: &CudaContext) -> Result<u64> {
    pool_threshold(ctx, Some(u64::MAX))
}

impl Device {
    /// Bytes the stream-ordered allocator's pool keeps reserved through synchronizations (its
    /// release threshold; `u64::MAX` once opened, where the driver has pools).
    pub fn pool_release_threshold(&self) -> Result<u64> {
        pool_threshold(&self.ctx, None)
    }

    /// Opens GPU `ordinal`. Errors (never panics) when there is no driver, no such GPU, or its
    /// compute capability is below 8.0.
    pub fn new(ordinal: usize) -> Result<Device> {
        let n = device_count()?;
        if n == 0 {
            return Err(Error::Unsupported("the CUDA driver reports no GPU".into()));
        }
        if ordinal >= n {
            return Err(Error::Input(format!("CUDA device {ordinal} does not exist ({n} found)")));
        }
        let ctx = guard("CudaContext::new", || CudaContext::new(ordinal))?.map_err(|e| cuda_err("context", e))?;
        let (major, minor) = ctx.compute_capability().map_err(|e| cuda_err("compute capability", e))?;
        let arch = Arch::for_capability(major, minor).ok_or_else(|| {
            Error::Unsupported(format!("GPU {ordinal} has compute capability {major}.{minor}; dsv3 needs 8.0 or newer"))
        })?;
        let sms = ctx
            .attribute(cudarc::driver::sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
            .map_err(|e| cuda_err("SM count", e))? as usize;
        let gpu = ctx.name().unwrap_or_else(|_| "unknown GPU".into());
        let name = format!("{gpu} (sm_{major}{minor}, {sms} SMs, PTX {arch:?})");
        // Every op runs on this one stream, and a buffer is only ever used on the stream it was
        // allocated on (the NCCL transport keeps its own buffers on its own stream), so cudarc's
        // cross-stream event tracking (two events per buffer, one record per use) is not needed.
        // SAFETY: set before any buffer of this context exists; see above for the invariant.
        unsafe { ctx.disable_event_tracking() };
        // best effort: a driver without memory pools allocates without them anyway
        let _ = keep_pool_memory(&ctx);
        // A created stream, not the legacy default one: decode steps are captured into CUDA
        // graphs, which the legacy stream cannot do.
        let stream = ctx.new_stream().map_err(|e| cuda_err("creating a stream", e))?;
        let side = Some(ctx.new_stream().map_err(|e| cuda_err("creating a stream", e))?);
        Ok(Device {
            ctx,
            stream,
            arch,
            name,
            sms,
            side,
            functions: Arc::new(Mutex::new(HashMap::new())),
            modules: Arc::new(Mutex::new(HashMap::new())),
            profile: Arc::new(crate::profile::Recorder::default()),
            counters: Arc::new(Mutex::new(HashMap::new())),
        })
    }

    /// Forks independent work onto the side stream: returns a view of this device whose
    /// launches go to the side stream, ordered after everything queued on the main stream so
    /// far. Bring it back with [`Device::join`] before the main stream uses what it wrote.
    /// Buffers the side work allocates are freed on the side stream; a buffer it writes for the
    /// main stream must be allocated on the main stream before the fork (so its free follows
    /// the main stream's last use). Works inside a CUDA graph capture (the fork and join become
    /// graph edges, the two branches run concurrently).
    pub fn fork(&self) -> Result<Device> {
        let side = self.side.clone().ok_or_else(|| Error::Input("fork: already a side-stream view".into()))?;
        let ev = self.stream.record_event(None).map_err(|e| cuda_err("recording a fork event", e))?;
        side.wait(&ev).map_err(|e| cuda_err("waiting for a fork event", e))?;
        Ok(Device {
            ctx: self.ctx.clone(),
            stream: side,
            arch: self.arch,
            name: self.name.clone(),
            sms: self.sms,
            side: None,
            functions: self.functions.clone(),
            modules: self.modules.clone(),
            profile: self.profile.clone(),
            counters: self.counters.clone(),
        })
    }

    /// The device address of at least `n` zeroed i32 counters for this view's stream, for a
    /// kernel that leaves every counter it uses at zero again when it ends (an arrival count the
    /// last arriving block resets). One buffer per stream, kept for the device's life and
    /// replaced by a larger zeroed one when `n` outgrows it (the old one's free is ordered after
    /// the launches already queued on the stream); two kernels on one stream never overlap, so
    /// they can share it. Not for use inside a CUDA graph capture that might allocate it.
    pub(crate) fn counters(&self, n: usize) -> Result<u64> {
        let key = self.stream.cu_stream() as usize;
        let mut map = self.counters.lock().map_err(|_| Error::Io("counter cache lock poisoned".into()))?;
        if map.get(&key).is_none_or(|b| b.len() < n) {
            let b = crate::tensor::zeros::<i32>(self, n.next_power_of_two().max(1024))?;
            map.insert(key, b);
        }
        crate::tensor::dptr(self, &map[&key], 0)
    }

    /// Orders the main stream after everything queued on `side` (from [`Device::fork`]).
    pub fn join(&self, side: &Device) -> Result<()> {
        let ev = side.stream.record_event(None).map_err(|e| cuda_err("recording a join event", e))?;
        self.stream.wait(&ev).map_err(|e| cuda_err("waiting for a join event", e))
    }

    /// Kernel `kernel` of PTX module `module` (loading the module on first use).
    pub fn function(&self, module: &'static str, kernel: &'static str) -> Result<CudaFunction> {
        self.function_with_smem(module, kernel, 0)
    }

    /// [`Device::function`] allowed `smem` bytes of dynamic shared memory: above the default 48
    /// KiB the function attribute is raised the first time a size needs it (the caller checks the
    /// device's opt-in maximum), not at every launch.
    pub fn function_with_smem(&self, module: &'static str, kernel: &'static str, smem: u32) -> Result<CudaFunction> {
        let mut fns = self.functions.lock().map_err(|_| Error::Io("CUDA: function cache poisoned".into()))?;
        let loaded = match fns.get_mut(&(module, kernel)) {
            Some(l) => l,
            None => {
                let f = self.load_function(module, kernel)?;
                fns.entry((module, kernel)).or_insert(Loaded { f, smem_allowed: crate::ops::DEFAULT_MAX_DYNAMIC_SMEM })
            }
        };
        if smem > loaded.smem_allowed {
            crate::ops::allow_dynamic_smem(&loaded.f, smem)
                .map_err(|e| cuda_err(&format!("allowing {smem} B of shared memory for {kernel}"), e))?;
            loaded.smem_allowed = smem;
        }
        Ok(loaded.f.clone())
    }

    fn load_function(&self, module: &'static str, kernel: &'static str) -> Result<CudaFunction> {
        let m = {
            let mut mods = self.modules.lock().map_err(|_| Error::Io("CUDA: module cache poisoned".into()))?;
            match mods.get(module) {
                Some(m) => m.clone(),
                None => {
                    let src = ptx::source(self.arch, module)
                        .ok_or_else(|| Error::Input(format!("no PTX module '{module}'")))?;
                    let m = self
                        .ctx
                        .load_module(cudarc::nvrtc::Ptx::from_src(src))
                        .map_err(|e| cuda_err(&format!("loading PTX module '{module}'"), e))?;
                    mods.insert(module, m.clone());
                    m
                }
            }
        };
        m.load_function(kernel).map_err(|e| cuda_err(&format!("kernel '{kernel}' in '{module}'"), e))
    }

    /// Waits for all work queued on the stream.
    pub fn sync(&self) -> Result<()> {
        self.stream.synchronize().map_err(|e| cuda_err("synchronize", e))
    }
}
