//! A global allocator that counts live heap bytes and their peak: on the CPU every tensor is a
//! heap allocation, so this is the "peak of live tensor bytes" the estimator is checked against.
//!
//! Install it in a binary, test or bench with
//! `#[global_allocator] static ALLOC: qlora_studio::memory::CountingAllocator = qlora_studio::memory::CountingAllocator::new();`
//! and read it through the free functions below (they read zero where it is not installed).

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

static CURRENT: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);
static INSTALLED: AtomicBool = AtomicBool::new(false);

/// `System` with a count of live bytes and their high-water mark.
pub struct CountingAllocator;

impl CountingAllocator {
    pub const fn new() -> Self {
        Self
    }
}

impl Default for CountingAllocator {
    fn default() -> Self {
        Self::new()
    }
}

fn added(bytes: usize) {
    let now = CURRENT.fetch_add(bytes, Ordering::Relaxed) + bytes;
    PEAK.fetch_max(now, Ordering::Relaxed);
}

fn removed(bytes: usize) {
    CURRENT.fetch_sub(bytes, Ordering::Relaxed);
}

// SAFETY: every call is forwarded unchanged to `System`; only counters are updated around it.
unsafe impl GlobalAlloc for CountingAllocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            INSTALLED.store(true, Ordering::Relaxed);
            added(layout.size());
        }
        p
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { System.alloc_zeroed(layout) };
        if !p.is_null() {
            INSTALLED.store(true, Ordering::Relaxed);
            added(layout.size());
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) };
        removed(layout.size());
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            removed(layout.size());
            added(new_size);
        }
        p
    }
}

/// Have glibc's malloc keep freed memory for the next allocation instead of handing it back to
/// the kernel. By default a block over its (adaptive) mmap threshold is mapped fresh on every
/// allocation and unmapped when freed, and the heap's top is trimmed: a training step then pays
/// a page fault and the kernel's zeroing for every page of every large tensor, each step (a
/// tenth of a CPU step at sequence 1024). With blocks up to glibc's largest threshold (32 MiB)
/// kept in the heap, the step reuses the same memory; the peak RSS is the same, since the peak
/// of live tensors is what sets it. For processes that end when their work does (not the
/// long-lived window); a no-op off glibc.
pub fn keep_freed_memory_for_reuse() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets allocator parameters; called before the training threads start.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
        libc::mallopt(libc::M_TOP_PAD, 64 << 20);
    }
}

/// Whether a `CountingAllocator` is the global allocator of this process (it has counted an
/// allocation).
pub fn counting_installed() -> bool {
    INSTALLED.load(Ordering::Relaxed)
}

/// Live heap bytes now (0 without the counting allocator).
pub fn live_bytes() -> usize {
    CURRENT.load(Ordering::Relaxed)
}

/// The most live heap bytes since the start or the last `reset_peak`.
pub fn peak_bytes() -> usize {
    PEAK.load(Ordering::Relaxed)
}

/// Start a new peak from the bytes live now; returns the peak it ends.
pub fn reset_peak() -> usize {
    PEAK.swap(CURRENT.load(Ordering::Relaxed), Ordering::Relaxed)
}
