//! Live memory readings: the process's resident set, the counted heap, and the GPUs.

use serde::Serialize;

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

/// The GPUs of this machine, by `nvidia-smi` (which ships with the driver, so it is there
/// wherever CUDA can run); an empty list where there is no NVIDIA GPU or no driver.
pub fn detect_gpus() -> Vec<GpuInfo> {
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
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct MemoryReading {
    /// Resident set of the process (CPU runs; also the host side of GPU runs).
    pub rss: u64,
    pub peak_rss: u64,
    /// Live heap bytes and their peak since the run started, where the counting allocator
    /// is installed (the binary installs it).
    pub heap_live: Option<u64>,
    pub heap_peak: Option<u64>,
    /// On CUDA: the device's used and free memory, and the most used seen since the run
    /// started (sampled at each reading).
    pub device_used: Option<u64>,
    pub device_free: Option<u64>,
    pub device_peak: Option<u64>,
}

/// Takes `MemoryReading`s over a run, keeping the device's peak between readings.
#[derive(Debug, Default)]
pub struct MemoryMonitor {
    /// The GPU index to read, `None` for a CPU run.
    pub gpu: Option<usize>,
    device_peak: u64,
}

impl MemoryMonitor {
    /// Starts a run: the heap peak restarts from what is live now.
    pub fn start(gpu: Option<usize>) -> Self {
        alloc::reset_peak();
        Self { gpu, device_peak: 0 }
    }

    pub fn read(&mut self) -> MemoryReading {
        let process = process_memory();
        let counting = alloc::counting_installed();
        let mut reading = MemoryReading {
            rss: process.map_or(0, |p| p.rss),
            peak_rss: process.map_or(0, |p| p.peak_rss),
            heap_live: counting.then(|| alloc::live_bytes() as u64),
            heap_peak: counting.then(|| alloc::peak_bytes() as u64),
            ..Default::default()
        };
        if let Some(index) = self.gpu {
            if let Some(g) = detect_gpus().into_iter().find(|g| g.index == index) {
                let used = g.total.saturating_sub(g.free);
                self.device_peak = self.device_peak.max(used);
                reading.device_used = Some(used);
                reading.device_free = Some(g.free);
                reading.device_peak = Some(self.device_peak);
            }
        }
        reading
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
