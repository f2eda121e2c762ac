//! Live memory readings: the process's resident set, the counted heap, and the GPUs.

use serde::{Deserialize, Serialize};

use super::alloc;

/// The process's resident set now and its peak, in bytes (Linux: VmRSS / VmHWM).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct ProcessMemory {
    pub rss: u64,
    pub peak_rss: u64,
}

/// `None` where /proc is not available.
pub fn process_memory() -> Option<ProcessMemory> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let field = |name: &str| -> Option<u64> {
        let line = status.lines().find(|l| l.starts_with(name))?;
        let kb: u64 = line[name.len()..].trim().trim_end_matches("kB").trim().parse().ok()?;
        Some(kb * 1024)
    };
    Some(ProcessMemory { rss: field("VmRSS:")?, peak_rss: field("VmHWM:")? })
}

static STARTUP_RSS: std::sync::OnceLock<u64> = std::sync::OnceLock::new();

/// Note the resident set now, as the program starts (binary and libraries, nothing loaded):
/// what a training process of this binary holds before its tokenizer and data.
pub fn record_startup_rss() {
    if let Some(m) = process_memory() {
        let _ = STARTUP_RSS.set(m.rss);
    }
}

/// The resident set `record_startup_rss` noted, if it was called.
pub fn startup_rss() -> Option<u64> {
    STARTUP_RSS.get().copied()
}

/// What one GPU reports: its name and memory in bytes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct GpuInfo {
    pub index: usize,
    pub name: String,
    pub total: u64,
    pub free: u64,
    /// "9.0" for Hopper; `None` from drivers whose nvidia-smi cannot report it.
    pub compute_capability: Option<String>,
}

/// Start measuring the peak resident set afresh (Linux: writing 5 to clear_refs resets VmHWM).
pub fn reset_rss_peak() {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

/// The machine's physical memory in bytes (`None` where /proc is not available).
pub fn total_memory() -> Option<u64> {
    meminfo("MemTotal:")
}

/// The memory the machine can give without swapping (Linux: MemAvailable).
pub fn available_memory() -> Option<u64> {
    meminfo("MemAvailable:")
}

/// A field of /proc/meminfo, in bytes.
fn meminfo(field: &str) -> Option<u64> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = info.lines().find(|l| l.starts_with(field))?;
    let kb: u64 = line[field.len()..].trim().trim_end_matches("kB").trim().parse().ok()?;
    Some(kb * 1024)
}

/// The GPUs of this machine, in CUDA's device order (the order `cuda:N` means, after
/// CUDA_VISIBLE_DEVICES): from the driver itself in a build with the `cuda` feature; else from
/// `nvidia-smi`, which only serves to tell the user that this build cannot use them. An empty
/// list where there is no NVIDIA GPU or no driver. Called once for the window's header and the
/// device list, never per step.
pub fn detect_gpus() -> Vec<GpuInfo> {
    #[cfg(feature = "cuda")]
    {
        cuda_probe::gpus()
    }
    #[cfg(not(feature = "cuda"))]
    {
        gpus_from_nvidia_smi()
    }
}

#[cfg(not(feature = "cuda"))]
fn gpus_from_nvidia_smi() -> Vec<GpuInfo> {
    // compute_cap needs a driver of 2022 or later; older ones refuse the whole query
    for fields in ["index,name,memory.total,memory.free,compute_cap", "index,name,memory.total,memory.free"] {
        let out = std::process::Command::new("nvidia-smi")
            .args([&format!("--query-gpu={fields}"), "--format=csv,noheader,nounits"])
            .output();
        match out {
            Ok(o) if o.status.success() => return parse_nvidia_smi(&String::from_utf8_lossy(&o.stdout)),
            Ok(_) => continue,
            Err(_) => return Vec::new(),
        }
    }
    Vec::new()
}

/// Parse `nvidia-smi --query-gpu=index,name,memory.total,memory.free[,compute_cap]
/// --format=csv,noheader,nounits` (memory in MiB); lines that do not parse are skipped.
pub fn parse_nvidia_smi(text: &str) -> Vec<GpuInfo> {
    const MIB: u64 = 1024 * 1024;
    text.lines()
        .filter_map(|line| {
            let f: Vec<&str> = line.split(',').map(str::trim).collect();
            let (index, name, total, free, cap) = match f.as_slice() {
                [index, name, total, free] => (index, name, total, free, None),
                [index, name, total, free, cap] => (index, name, total, free, Some(cap.to_string())),
                _ => return None,
            };
            Some(GpuInfo {
                index: index.parse().ok()?,
                name: name.to_string(),
                total: total.parse::<u64>().ok()? * MIB,
                free: free.parse::<u64>().ok()? * MIB,
                compute_capability: cap.filter(|c| c.contains('.')),
            })
        })
        .collect()
}

/// The memory figures a training step event carries.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemoryReading {
    /// Resident set of the process (CPU runs; also the host side of GPU runs).
    pub rss: u64,
    pub peak_rss: u64,
    /// Live heap bytes and their peak since the run started, where the counting allocator
    /// is installed (the binary installs it).
    pub heap_live: Option<u64>,
    pub heap_peak: Option<u64>,
    /// On CUDA: the device's used and free memory now (cuMemGetInfo: every process, the CUDA
    /// context and the pool's cached blocks included).
    pub device_used: Option<u64>,
    pub device_free: Option<u64>,
    /// On CUDA: the most our tensors held at once since the previous reading or
    /// `begin_step` (the high-water mark of the stream-ordered pool candle allocates from) and
    /// the most over the run. What the estimate predicts, less the context.
    pub pool_peak: Option<u64>,
    pub device_peak: Option<u64>,
    /// The most the run held at once within this step (from `begin_step` to this reading), the
    /// figure the estimate predicts: on CUDA the pool's high-water mark; on the CPU the counted
    /// heap's, less what the app held before the run (its window, fonts and caches).
    pub step_peak: Option<u64>,
}

/// Takes `MemoryReading`s over a run: `begin_step` as a step starts, `read` as it ends, so each
/// reading's peak is that of its step alone (not of the evaluation or checkpoint between).
#[derive(Debug, Default)]
pub struct MemoryMonitor {
    /// Live heap bytes that are not the run's (taken before it loaded anything).
    heap_baseline: usize,
    /// The heap's high-water mark over the readings so far.
    heap_peak: u64,
    #[cfg(feature = "cuda")]
    gpu: Option<cuda_probe::PoolProbe>,
    #[cfg(feature = "cuda")]
    device_peak: u64,
}

impl MemoryMonitor {
    /// Starts a run on `device`: the heap peak (and on CUDA the pool's) restarts from now.
    pub fn start(device: &candle_core::Device) -> Self {
        alloc::reset_peak();
        let _ = device;
        Self {
            heap_baseline: 0,
            heap_peak: 0,
            #[cfg(feature = "cuda")]
            gpu: cuda_probe::PoolProbe::new(device),
            #[cfg(feature = "cuda")]
            device_peak: 0,
        }
    }

    /// The live heap bytes the process held before the run (`live_bytes()` taken then): the
    /// step peak on the CPU counts from there, as the estimate does.
    pub fn with_heap_baseline(mut self, bytes: usize) -> Self {
        self.heap_baseline = bytes;
        self
    }

    /// A step starts: its peak counts from what is live now.
    pub fn begin_step(&mut self) {
        self.heap_peak = self.heap_peak.max(alloc::reset_peak() as u64);
        #[cfg(feature = "cuda")]
        if let Some(gpu) = &self.gpu {
            if let Some(before) = gpu.take_peak() {
                self.device_peak = self.device_peak.max(before);
            }
        }
    }

    pub fn read(&mut self) -> MemoryReading {
        let process = process_memory();
        let counting = alloc::counting_installed();
        let heap_step = alloc::peak_bytes();
        self.heap_peak = self.heap_peak.max(heap_step as u64);
        #[allow(unused_mut)]
        let mut reading = MemoryReading {
            rss: process.map_or(0, |p| p.rss),
            peak_rss: process.map_or(0, |p| p.peak_rss),
            heap_live: counting.then(|| alloc::live_bytes() as u64),
            heap_peak: counting.then_some(self.heap_peak),
            step_peak: counting.then(|| heap_step.saturating_sub(self.heap_baseline) as u64),
            ..Default::default()
        };
        #[cfg(feature = "cuda")]
        if let Some(gpu) = &self.gpu {
            if let Some((free, total)) = gpu.mem_info() {
                reading.device_used = Some(total.saturating_sub(free) as u64);
                reading.device_free = Some(free as u64);
            }
            if let Some(peak) = gpu.take_peak() {
                self.device_peak = self.device_peak.max(peak);
                reading.pool_peak = Some(peak);
                reading.device_peak = Some(self.device_peak);
                // the tensors live in the pool, not on the heap
                reading.step_peak = Some(peak);
            }
        }
        reading
    }
}

/// GPU readings through the CUDA driver (cudarc, as candle re-exports it): no process spawned.
#[cfg(feature = "cuda")]
mod cuda_probe {
    use std::sync::Arc;

    use candle_core::cuda_backend::cudarc::driver::{result, sys, CudaContext};

    use super::GpuInfo;

    /// Every device the driver sees, with its free memory read in its primary context (retained
    /// for the reading and released, so a CPU run leaves the GPUs as they were).
    pub fn gpus() -> Vec<GpuInfo> {
        if result::init().is_err() {
            return Vec::new();
        }
        let count = result::device::get_count().unwrap_or(0).max(0) as usize;
        (0..count).filter_map(|index| gpu(index).ok()).collect()
    }

    fn gpu(index: usize) -> Result<GpuInfo, result::DriverError> {
        let dev = result::device::get(index as i32)?;
        let name = result::device::get_name(dev)?;
        // SAFETY: `dev` came from device::get; the attribute values are plain ints.
        let (total, major, minor) = unsafe {
            (
                result::device::total_mem(dev)?,
                result::device::get_attribute(
                    dev,
                    sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR,
                )?,
                result::device::get_attribute(
                    dev,
                    sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR,
                )?,
            )
        };
        let free = CudaContext::new(index).ok().and_then(|ctx| ctx.mem_get_info().ok()).map_or(0, |(free, _)| free);
        Ok(GpuInfo {
            index,
            name,
            total: total as u64,
            free: free as u64,
            compute_capability: Some(format!("{major}.{minor}")),
        })
    }

    /// The device memory figures of a run on one GPU.
    #[derive(Debug)]
    pub struct PoolProbe {
        ctx: Arc<CudaContext>,
        pool: sys::CUmemoryPool,
    }

    // SAFETY: a CUmemoryPool handle may be used from any thread of the process.
    unsafe impl Send for PoolProbe {}

    impl PoolProbe {
        pub fn new(device: &candle_core::Device) -> Option<Self> {
            let candle_core::Device::Cuda(dev) = device else { return None };
            let ctx = dev.cuda_stream().context().clone();
            // candle allocates with cuMemAllocAsync, from the device's current pool
            // SAFETY: cu_device is the context's own device.
            let pool = unsafe { result::device::get_mem_pool(ctx.cu_device()) }.ok()?;
            let probe = Self { ctx, pool };
            probe.take_peak();
            Some(probe)
        }

        /// (free, total) device memory now.
        pub fn mem_info(&self) -> Option<(usize, usize)> {
            self.ctx.mem_get_info().ok()
        }

        /// The pool's high-water mark of used bytes since the last call, and a restart from
        /// what is in use now.
        pub fn take_peak(&self) -> Option<u64> {
            let attr = sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_HIGH;
            let mut high: u64 = 0;
            let mut zero: u64 = 0;
            // SAFETY: the pool handle is valid while the context lives; USED_MEM_HIGH is a
            // cuuint64_t, and setting it takes 0 (reset to the current use).
            unsafe {
                result::mem_pool::get_attribute(self.pool, attr, &mut high as *mut u64 as *mut _).ok()?;
                result::mem_pool::set_attribute(self.pool, attr, &mut zero as *mut u64 as *mut _).ok()?;
            }
            Some(high)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_this_process() {
        let m = process_memory().expect("Linux has /proc/self/status");
        assert!(m.rss > 0 && m.peak_rss >= m.rss);
    }

    #[test]
    fn parses_nvidia_smi_lines() {
        let gpus =
            parse_nvidia_smi("0, NVIDIA H100 80GB HBM3, 81559, 80000\n1, NVIDIA RTX 4090, 24564, 100\nbad line\n");
        assert_eq!(gpus.len(), 2);
        assert_eq!(gpus[0].name, "NVIDIA H100 80GB HBM3");
        assert_eq!(gpus[0].total, 81559 * 1024 * 1024);
        assert_eq!(gpus[1].free, 100 * 1024 * 1024);
        assert_eq!(gpus[1].index, 1);
        assert_eq!(gpus[0].compute_capability, None);
        let with_cap = parse_nvidia_smi("0, NVIDIA H200, 143771, 143000, 9.0\n1, Tesla T4, 15360, 15000, [N/A]\n");
        assert_eq!(with_cap[0].compute_capability.as_deref(), Some("9.0"));
        assert_eq!(with_cap[1].compute_capability, None);
    }
}
