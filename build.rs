//! Compiles kernels/*.cu to PTX when the `cuda` feature is on; CPU builds never look for nvcc.
//!
//! The PTX targets compute capability 8.0 (Ampere) unless QLS_CUDA_ARCH says otherwise: the
//! driver compiles it just in time for any newer card (RTX 3090/4090, A6000, H100), and bf16
//! needs 8.0. nvcc is taken from NVCC, else from PATH (see README: nvcc from PyPI works).

use std::path::PathBuf;
use std::process::Command;

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=kernels");
    println!("cargo:rerun-if-env-changed=NVCC");
    println!("cargo:rerun-if-env-changed=QLS_CUDA_ARCH");
    if std::env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    let out_dir = PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    let nvcc = std::env::var("NVCC").unwrap_or_else(|_| "nvcc".into());
    let arch = std::env::var("QLS_CUDA_ARCH").unwrap_or_else(|_| "compute_80".into());
    // one PTX module per source file; src/cuda.rs includes it by name
    let kernels = ["qls"];
    for name in kernels {
        let source = format!("kernels/{name}.cu");
        let ptx = out_dir.join(format!("{name}.ptx"));
        let status = Command::new(&nvcc)
            .args(["--ptx", "-O3", "-std=c++17", &format!("-arch={arch}"), "-o"])
            .arg(&ptx)
            .arg(&source)
            .status()
            .unwrap_or_else(|e| {
                panic!("the cuda feature compiles {source} with nvcc, which could not be started ({e}); install the CUDA toolkit or set NVCC (README: Building with CUDA)")
            });
        assert!(status.success(), "nvcc failed on {source} ({status})");
    }
}
