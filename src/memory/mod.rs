//! Memory: the peak-memory estimator of a run (docs/memory-model.md), checked against our own
//! trainer by the validation grid, and live readings (process RSS, counted heap, GPUs).

pub mod alloc;
pub mod cli;
pub mod estimate;
pub mod fit;
pub mod grid;
pub mod live;
pub mod presets;

pub use alloc::{
    counting_installed, keep_freed_memory_for_reuse, live_bytes, peak_bytes, reset_peak, CountingAllocator,
};
pub use estimate::{estimate, estimate_per_gpu, DeviceKind, Estimate, EstimateInput, Method, Term, Zero};
pub use live::{
    detect_gpus, process_memory, record_startup_rss, reset_rss_peak, startup_rss, total_memory, GpuInfo, MemoryMonitor,
    MemoryReading, ProcessMemory,
};
