//! With the `cuda` feature, compiles src/cuda/*.cu to PTX (nvcc from $NVCC or PATH, for
//! compute capability $CUDA_COMPUTE_CAP, default 90); src/model/ops.rs embeds it. Without the
//! feature this does nothing: CI builds and tests the CPU path only.
use std::path::PathBuf;
use std::process::Command;

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=src/cuda");
    println!("cargo:rerun-if-env-changed=NVCC");
    println!("cargo:rerun-if-env-changed=CUDA_COMPUTE_CAP");
    if std::env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    let out_dir = PathBuf::from(std::env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    let nvcc = std::env::var("NVCC").unwrap_or_else(|_| "nvcc".into());
    let cap = std::env::var("CUDA_COMPUTE_CAP").unwrap_or_else(|_| "90".into());
    for name in [
        "adamw",
        "attention",
        "nll",
        "rms_norm",
        "rope",
        "softcap",
        "swiglu",
    ] {
        let src = format!("src/cuda/{name}.cu");
        let ptx = out_dir.join(format!("{name}.ptx"));
        // PTX for the virtual architecture: the driver compiles it for the GPU at load time
        let status = Command::new(&nvcc)
            .args(["--ptx", "-O3", &format!("-arch=compute_{cap}"), "-o"])
            .arg(&ptx)
            .arg(&src)
            .status()
            .unwrap_or_else(|e| {
                panic!("running {nvcc} for {src}: {e} (set NVCC, or use scripts/build-cuda.sh)")
            });
        if !status.success() {
            panic!("{nvcc} failed on {src} ({status})");
        }
    }
}
