//! Memory readings of the running process (and, later, the estimator of a run's peak).

/// The process's resident set now and its peak, in bytes (Linux: VmRSS / VmHWM).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
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

/// Start measuring the peak resident set afresh (Linux: writing 5 to clear_refs resets VmHWM).
pub fn reset_peak() {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

/// The machine's physical memory in bytes (`None` where /proc is not available).
pub fn total_memory() -> Option<u64> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = info.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kb: u64 = line["MemTotal:".len()..].trim().trim_end_matches("kB").trim().parse().ok()?;
    Some(kb * 1024)
}

#[cfg(test)]
mod tests {
    #[test]
    fn reads_this_process() {
        let m = super::process_memory().expect("Linux has /proc/self/status");
        assert!(m.rss > 0 && m.peak_rss >= m.rss);
    }
}
