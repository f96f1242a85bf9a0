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
    Device::new_cuda(ordinal).map_err(|e| {
        // candle's driver errors carry a backtrace in their message: keep the first line
        let first = e.to_string();
        let reason = first.lines().next().unwrap_or_default().trim().to_string();
        Error::InvalidArgument(format!(
            "device '{name}': cannot open CUDA device {ordinal} ({reason}); check that an NVIDIA driver is installed and the GPU is visible (nvidia-smi, CUDA_VISIBLE_DEVICES)"
        ))
    })
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
}
