//! `--device cpu|cuda[:N]` and the dtype the base weights use there.
use crate::error::{Error, Result};
use candle_core::{DType, Device};

/// Parse a device name. CUDA needs a binary built with `--features cuda`
/// (`scripts/build-cuda.sh`).
pub fn parse_device(name: &str) -> Result<Device> {
    let name = name.trim();
    if name == "cpu" {
        return Ok(Device::Cpu);
    }
    let ordinal = match name.strip_prefix("cuda") {
        Some("") => 0,
        Some(rest) => rest
            .strip_prefix(':')
            .and_then(|n| n.parse::<usize>().ok())
            .ok_or_else(|| {
                Error::InvalidArgument(format!("device '{name}': use cpu, cuda or cuda:N"))
            })?,
        None => {
            return Err(Error::InvalidArgument(format!(
                "device '{name}': use cpu, cuda or cuda:N"
            )))
        }
    };
    if !candle_core::utils::cuda_is_available() {
        return Err(Error::InvalidArgument(format!(
            "device '{name}': this binary was built without CUDA support (build it with scripts/build-cuda.sh)"
        )));
    }
    let device = Device::new_cuda(ordinal).map_err(|e| {
        // candle's driver errors carry a backtrace in their message: keep the first line
        let first = e.to_string();
        let reason = first.lines().next().unwrap_or_default().trim().to_string();
        Error::InvalidArgument(format!(
            "device '{name}': cannot open CUDA device {ordinal} ({reason}); check that an NVIDIA driver is installed and the GPU is visible (nvidia-smi, CUDA_VISIBLE_DEVICES)"
        ))
    })?;
    #[cfg(feature = "cuda")]
    if let Device::Cuda(cuda) = &device {
        gpu_pool::keep_freed_memory(cuda).map_err(|e| {
            Error::InvalidArgument(format!("device '{name}': its memory pool: {e}"))
        })?;
    }
    Ok(device)
}

/// The peak of the memory this process's tensors held on `device` since the last
/// [`reset_peak_gpu_memory`] (or the start), in MiB, like `torch.cuda.max_memory_allocated`;
/// `None` on the CPU.
pub fn peak_gpu_memory_mb(device: &Device) -> Result<Option<f64>> {
    match device {
        #[cfg(feature = "cuda")]
        Device::Cuda(cuda) => Ok(Some(gpu_pool::used_high(cuda)? as f64 / (1 << 20) as f64)),
        _ => Ok(None),
    }
}

/// Starts a new peak of [`peak_gpu_memory_mb`] (nothing on the CPU).
pub fn reset_peak_gpu_memory(device: &Device) -> Result<()> {
    match device {
        #[cfg(feature = "cuda")]
        Device::Cuda(cuda) => gpu_pool::reset_used_high(cuda),
        _ => Ok(()),
    }
}

/// The CUDA driver's default memory pool, which candle allocates from (cudarc's
/// `cuMemAllocAsync`).
#[cfg(feature = "cuda")]
mod gpu_pool {
    use crate::error::{Error, Result};
    use candle_core::cuda_backend::cudarc::driver::sys;
    use candle_core::CudaDevice;
    use std::ffi::c_void;

    fn driver(what: &str, r: sys::CUresult) -> Result<()> {
        r.result()
            .map_err(|e| Error::InvalidArgument(format!("{what}: {e}")))
    }

    fn default_pool(dev: &CudaDevice) -> Result<sys::CUmemoryPool> {
        let stream = dev.cuda_stream();
        let ctx = stream.context();
        ctx.bind_to_thread()
            .map_err(|e| Error::InvalidArgument(format!("binding the CUDA context: {e}")))?;
        let mut pool: sys::CUmemoryPool = std::ptr::null_mut();
        // SAFETY: an out-pointer to a pool handle, and the context's own device
        let r = unsafe { sys::cuDeviceGetDefaultMemPool(&mut pool, ctx.cu_device()) };
        driver("cuDeviceGetDefaultMemPool", r)?;
        Ok(pool)
    }

    fn set(pool: sys::CUmemoryPool, attr: sys::CUmemPool_attribute, mut value: u64) -> Result<()> {
        // SAFETY: both attributes used here take a cuuint64_t
        let r = unsafe {
            sys::cuMemPoolSetAttribute(pool, attr, &mut value as *mut u64 as *mut c_void)
        };
        driver("cuMemPoolSetAttribute", r)
    }

    /// Keeps freed memory in the pool. By default the pool hands every unused byte back to the
    /// system at each synchronisation — each read of a loss or a gradient norm, several a
    /// step — so the next step maps its activations afresh, at milliseconds per GiB. PyTorch's
    /// caching allocator keeps them; with this, so does candle.
    pub fn keep_freed_memory(dev: &CudaDevice) -> Result<()> {
        let pool = default_pool(dev)?;
        set(
            pool,
            sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD,
            u64::MAX,
        )
    }

    /// The pool's high-water mark of memory in use (allocated to tensors), in bytes.
    pub fn used_high(dev: &CudaDevice) -> Result<u64> {
        let pool = default_pool(dev)?;
        let mut value = 0u64;
        // SAFETY: CU_MEMPOOL_ATTR_USED_MEM_HIGH is a cuuint64_t
        let r = unsafe {
            sys::cuMemPoolGetAttribute(
                pool,
                sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_HIGH,
                &mut value as *mut u64 as *mut c_void,
            )
        };
        driver("cuMemPoolGetAttribute", r)?;
        Ok(value)
    }

    /// Resets the high-water mark to the memory in use now (the driver takes only 0).
    pub fn reset_used_high(dev: &CudaDevice) -> Result<()> {
        let pool = default_pool(dev)?;
        set(
            pool,
            sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_HIGH,
            0,
        )
    }
}

/// The process-wide choice of `--base-dtype`, when the user made one.
static BASE_DTYPE: std::sync::OnceLock<DType> = std::sync::OnceLock::new();

/// Compute with the base weights in `dtype` on every device, for the rest of the process (the
/// command line's `--base-dtype`). Set once, before any model is loaded.
pub fn set_base_dtype(dtype: DType) -> Result<()> {
    if !matches!(dtype, DType::F32 | DType::BF16 | DType::F16) {
        return Err(Error::InvalidArgument(format!(
            "base dtype {dtype:?}: use f32, bf16 or f16"
        )));
    }
    BASE_DTYPE.set(dtype).map_err(|already| {
        Error::InvalidArgument(format!(
            "the base dtype is already {already:?} for this process"
        ))
    })
}

/// Base weights in bf16 on GPUs (LoRA weights, gradients, optimizer state and losses stay f32);
/// f32 on CPU, where bf16 matmuls are slower; or what [`set_base_dtype`] chose. Full-parameter
/// training keeps f32 whatever this says.
pub fn base_dtype(device: &Device) -> DType {
    if let Some(&chosen) = BASE_DTYPE.get() {
        return chosen;
    }
    if device.is_cuda() {
        DType::BF16
    } else {
        DType::F32
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_names_and_rejects_others() {
        assert!(parse_device("cpu").unwrap().is_cpu());
        for bad in ["gpu", "cuda:x", "cuda1", ""] {
            assert!(parse_device(bad).is_err(), "{bad}");
        }
        if !candle_core::utils::cuda_is_available() {
            let e = parse_device("cuda:0").unwrap_err().to_string();
            assert!(e.contains("without CUDA"), "{e}");
        }
        assert_eq!(base_dtype(&Device::Cpu), DType::F32);
    }

    #[test]
    fn no_gpu_memory_figure_on_the_cpu() {
        reset_peak_gpu_memory(&Device::Cpu).unwrap();
        assert_eq!(peak_gpu_memory_mb(&Device::Cpu).unwrap(), None);
    }
}
