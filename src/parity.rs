//! `unlearn parity`: does this device compute what the CPU and PyTorch compute? Logits, loss and
//! the LoRA gradients of a checkpoint + PEFT adapter on a reference batch, on the chosen device
//! and dtype, compared with the same computation on the CPU in f32 and, where the reference file
//! holds them, with transformers + PEFT's own values (`reference.safetensors` of the test
//! fixtures: `input_ids`, `attention_mask`, `labels`, `logits`, `loss`, `grad.<peft name>`).
//!
//! Differences are relative L2 errors, ‖x − y‖ / ‖y‖ per tensor, so one tolerance serves logits
//! and gradients of any scale. bf16 base weights round every matmul input to 8 bits of
//! mantissa (≈ 4e-3 relative), which compounds through the layers: on the llama-lora fixture
//! PyTorch + PEFT itself, base weights in bf16, is 1.3e-2 off its own f32 logits and up to
//! 2.4e-2 off its f32 LoRA gradients, so [`tolerance`] is 5e-2 there (about twice that) and
//! 1e-4 in f32.
//!
//! It also takes two AdamW steps from the CPU's weights and gradients on both devices: the
//! optimizer's kernels are exact (src/cuda/adamw.cu), so the weights after them must agree bit
//! for bit, in any base dtype.
use crate::error::{Error, Result};
use crate::lora::{load_adapter, lora_vars};
use crate::model::ops::causal_lm_loss;
use crate::model::weights::WeightStore;
use crate::model::{Decoder, ForwardOptions, ModelInput};
use crate::train::optim::{AdamW, AdamWConfig};
use candle_core::{DType, Device, Tensor, Var};
use serde::Serialize;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

pub struct ParityRequest {
    pub model: PathBuf,
    pub adapter: PathBuf,
    pub reference: PathBuf,
    pub device: Device,
    /// the base weights' dtype on `device` (LoRA weights and gradients stay f32)
    pub dtype: DType,
}

/// One tensor compared: relative L2 error against the CPU f32 run and against the reference.
#[derive(Debug, Clone, Serialize)]
pub struct TensorParity {
    pub name: String,
    pub vs_cpu: f64,
    /// None when the reference file does not hold this tensor
    pub vs_reference: Option<f64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct ParityReport {
    pub device: String,
    pub dtype: String,
    pub tolerance: f64,
    /// logits, loss, then one entry per LoRA gradient in model order
    pub tensors: Vec<TensorParity>,
    /// the largest difference of all (either comparison)
    pub worst: f64,
    pub worst_name: String,
    /// elements of the LoRA weights whose bits differ between the CPU and this device after
    /// two AdamW steps from the same gradients (0: the same optimizer step bit for bit)
    pub optimizer_step_mismatches: usize,
    pub pass: bool,
}

/// The tolerance on relative L2 error for base weights of `dtype`.
pub fn tolerance(dtype: DType) -> f64 {
    match dtype {
        DType::F32 | DType::F64 => 1e-4,
        _ => 5e-2,
    }
}

/// Logits, loss and LoRA gradients (PEFT names) of one run, copied to the CPU in f32, and the
/// LoRA weights they are the gradients of.
struct Run {
    logits: Tensor,
    loss: Tensor,
    grads: Vec<(String, Tensor)>,
    weights: Vec<Tensor>,
}

fn compute(req: &ParityRequest, device: &Device, dtype: DType, batch: &Batch) -> Result<Run> {
    let mut model = Decoder::load(&req.model, dtype, device)?;
    load_adapter(&mut model, &req.adapter)?;
    let ids = batch.input_ids.to_device(device)?;
    let mask = batch.attention_mask.to_device(device)?;
    let labels = batch.labels.to_device(device)?;
    let logits = model
        .forward(
            &ModelInput::new(&ids, Some(&mask)),
            &ForwardOptions::default(),
        )?
        .to_dtype(DType::F32)?;
    let loss = causal_lm_loss(&logits, &labels)?;
    let grads = loss.backward()?;
    let to_cpu =
        |t: &Tensor| -> Result<Tensor> { Ok(t.to_device(&Device::Cpu)?.to_dtype(DType::F32)?) };
    let mut named = Vec::new();
    let mut weights = Vec::new();
    for (name, var) in lora_vars(&model) {
        weights.push(to_cpu(var.as_tensor())?);
        let g = grads.get(var.as_tensor()).ok_or_else(|| {
            Error::InvalidArgument(format!(
                "parity: no gradient reached {name} (the adapter in {} is not on the loss path)",
                req.adapter.display()
            ))
        })?;
        named.push((name, to_cpu(g)?));
    }
    Ok(Run {
        logits: to_cpu(&logits)?,
        loss: to_cpu(&loss)?,
        grads: named,
        weights,
    })
}

/// Elements of the LoRA weights whose bits differ between the CPU and `device` after two
/// AdamW steps (weight decay, a clipped gradient) from the same weights and gradients: 0 when
/// the device's optimizer kernels (src/cuda/adamw.cu) take the CPU's step bit for bit.
fn optimizer_step_mismatches(
    weights: &[Tensor],
    grads: &[Tensor],
    device: &Device,
) -> Result<usize> {
    let cfg = AdamWConfig {
        lr: 1e-3,
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-8,
        weight_decay: 0.01,
    };
    let mut after = Vec::new();
    for dev in [&Device::Cpu, device] {
        let vars = weights
            .iter()
            .map(|w| Ok(Var::from_tensor(&w.to_device(dev)?.copy()?)?))
            .collect::<Result<Vec<_>>>()?;
        let grads = grads
            .iter()
            .map(|g| g.to_device(dev))
            .collect::<candle_core::Result<Vec<_>>>()?;
        let mut opt = AdamW::new(cfg, &vars)?;
        opt.step_scaled(&vars, &grads, 1.0, 1e-3)?;
        opt.step_scaled(&vars, &grads, 0.37, 5e-4)?;
        let mut bits = Vec::new();
        for v in &vars {
            let values = v.as_tensor().to_device(&Device::Cpu)?.flatten_all()?;
            bits.extend(values.to_vec1::<f32>()?.into_iter().map(f32::to_bits));
        }
        after.push(bits);
    }
    Ok(after[0]
        .iter()
        .zip(&after[1])
        .filter(|(a, b)| a != b)
        .count())
}

struct Batch {
    input_ids: Tensor,
    attention_mask: Tensor,
    labels: Tensor,
    /// every other tensor of the file: expected values
    expected: HashMap<String, Tensor>,
}

fn read_reference(path: &Path) -> Result<Batch> {
    let store = WeightStore::open_files(&[path.to_path_buf()], path.to_path_buf())?;
    let mut all: HashMap<String, Tensor> = HashMap::new();
    for name in store.names() {
        let t = store.tensor_raw(&name)?;
        all.insert(name, t);
    }
    let mut take = |key: &str| {
        all.remove(key).ok_or_else(|| Error::Config {
            path: path.to_path_buf(),
            msg: format!("reference batch has no '{key}' tensor (needs input_ids, attention_mask and labels)"),
        })
    };
    let input_ids = take("input_ids")?.to_dtype(DType::U32)?;
    let attention_mask = take("attention_mask")?.to_dtype(DType::U32)?;
    let labels = take("labels")?.to_dtype(DType::I64)?;
    if input_ids.rank() != 2
        || input_ids.dims() != labels.dims()
        || input_ids.dims() != attention_mask.dims()
    {
        return Err(Error::Config {
            path: path.to_path_buf(),
            msg: format!(
                "input_ids {:?}, attention_mask {:?} and labels {:?} must be [batch, seq] alike",
                input_ids.dims(),
                attention_mask.dims(),
                labels.dims()
            ),
        });
    }
    // the loss shifts by one: a label counts from the second position on
    let seq = labels.dims()[1];
    let counted = if seq < 2 {
        0
    } else {
        labels
            .narrow(1, 1, seq - 1)?
            .flatten_all()?
            .to_vec1::<i64>()?
            .into_iter()
            .filter(|&l| l != -100)
            .count()
    };
    if counted == 0 {
        return Err(Error::Config {
            path: path.to_path_buf(),
            msg: "'labels' is -100 at every position a next-token loss takes: there is no loss or gradient to compare".into(),
        });
    }
    Ok(Batch {
        input_ids,
        attention_mask,
        labels,
        expected: all,
    })
}

/// ‖x − y‖ / ‖y‖ (‖x‖ when y is all zeros, so that zero against zero is 0).
pub fn relative_l2(x: &Tensor, y: &Tensor) -> Result<f64> {
    if x.dims() != y.dims() {
        return Err(Error::InvalidArgument(format!(
            "parity: shapes differ, {:?} against {:?}",
            x.dims(),
            y.dims()
        )));
    }
    let x = x.to_dtype(DType::F64)?;
    let y = y.to_dtype(DType::F64)?;
    let diff = (&x - &y)?.sqr()?.sum_all()?.to_scalar::<f64>()?.sqrt();
    let norm = y.sqr()?.sum_all()?.to_scalar::<f64>()?.sqrt();
    Ok(if norm > 0.0 { diff / norm } else { diff })
}

/// Run the batch of `req.reference` on the CPU in f32 and on `req.device` in `req.dtype`.
pub fn check(req: &ParityRequest) -> Result<ParityReport> {
    let batch = read_reference(&req.reference)?;
    let cpu = compute(req, &Device::Cpu, DType::F32, &batch)?;
    let dev = compute(req, &req.device, req.dtype, &batch)?;
    let mut tensors = Vec::new();
    let mut matched = std::collections::HashSet::new();
    let mut compare = |name: &str, ours: &Tensor, cpu: &Tensor, key: &str| -> Result<()> {
        let vs_reference = match batch.expected.get(key) {
            Some(r) => {
                matched.insert(key.to_string());
                if r.elem_count() != ours.elem_count() {
                    return Err(Error::Config {
                        path: req.reference.clone(),
                        msg: format!(
                            "'{key}' has shape {:?}, the computed {name} {:?}",
                            r.dims(),
                            ours.dims()
                        ),
                    });
                }
                let r = r.to_dtype(DType::F32)?.reshape(ours.dims())?;
                Some(relative_l2(ours, &r)?)
            }
            None => None,
        };
        tensors.push(TensorParity {
            name: name.to_string(),
            vs_cpu: relative_l2(ours, cpu)?,
            vs_reference,
        });
        Ok(())
    };
    compare("logits", &dev.logits, &cpu.logits, "logits")?;
    compare("loss", &dev.loss, &cpu.loss, "loss")?;
    for ((name, g), (_, g_cpu)) in dev.grads.iter().zip(&cpu.grads) {
        compare(
            name,
            g,
            g_cpu,
            &format!("grad.{}", peft_parameter_name(name)),
        )?;
    }
    // a reference gradient no LoRA weight of the adapter matched: the adapter is not the one
    // the reference was computed with
    let mut unmatched: Vec<&String> = batch
        .expected
        .keys()
        .filter(|k| k.starts_with("grad.") && !matched.contains(*k))
        .collect();
    if !unmatched.is_empty() {
        unmatched.sort();
        return Err(Error::Config {
            path: req.reference.clone(),
            msg: format!(
                "{} reference gradient(s) match no LoRA weight of the adapter {} (first: {})",
                unmatched.len(),
                req.adapter.display(),
                unmatched[0]
            ),
        });
    }
    let (worst, worst_name) = tensors
        .iter()
        .flat_map(|t| {
            [
                (t.vs_cpu, &t.name),
                (t.vs_reference.unwrap_or(0.0), &t.name),
            ]
        })
        .fold((0.0f64, String::new()), |(w, n), (v, name)| {
            if v > w || v.is_nan() {
                (v, name.clone())
            } else {
                (w, n)
            }
        });
    let tolerance = tolerance(req.dtype);
    let cpu_grads: Vec<Tensor> = cpu.grads.iter().map(|(_, g)| g.clone()).collect();
    let optimizer_step_mismatches =
        optimizer_step_mismatches(&cpu.weights, &cpu_grads, &req.device)?;
    Ok(ParityReport {
        device: device_label(&req.device),
        dtype: format!("{:?}", req.dtype).to_lowercase(),
        tolerance,
        tensors,
        pass: worst <= tolerance && optimizer_step_mismatches == 0,
        optimizer_step_mismatches,
        worst,
        worst_name,
    })
}

/// PEFT's name of a LoRA parameter as the model holds it: the adapter name `default` goes
/// before `.weight` (`…lora_A.default.weight`) or at the end (`…lora_embedding_A.default`).
fn peft_parameter_name(name: &str) -> String {
    match name.strip_suffix(".weight") {
        Some(stem) => format!("{stem}.default.weight"),
        None => format!("{name}.default"),
    }
}

fn device_label(d: &Device) -> String {
    match d {
        Device::Cpu => "cpu".into(),
        Device::Cuda(_) => "cuda".into(),
        Device::Metal(_) => "metal".into(),
    }
}
