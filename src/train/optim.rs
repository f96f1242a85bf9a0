//! AdamW over the LoRA variables, the learning-rate schedule and global-norm clipping.
//!
//! Our own AdamW rather than `candle_nn::AdamW`: candle's defaults to weight decay 0.01 and
//! silently skips variables without a gradient (hiding a cut graph); here every variable must
//! have a gradient, the decay is explicit, and the moments can be checkpointed exactly.
//!
//! A step is torch.optim.AdamW's single-tensor step, op for op in f32 (its `lerp_` and
//! `addcmul_` as the fused multiply-adds of torch's kernels), in two in-place kernels per
//! variable: one updates both moments, one the parameter. The CUDA build runs the same
//! arithmetic with every rounding explicit (src/cuda/adamw.cu), so both devices take the same
//! step bit for bit. Composed from tensor ops a step was about fifteen kernels and as many
//! temporaries per variable: for Llama-3.2-1B's 224 LoRA matrices some 3,400 launches a step,
//! now 448. Against torch on the CPU the step is exact but where torch's CPU sqrt (MKL's, within
//! an ulp) is not correctly rounded; see scripts/fixtures/adamw.py and the tests below.
use crate::error::{Error, Result};
use crate::model::launch::Launch;
pub use crate::model::ops::all_finite;
use crate::model::ops::{f32_input, sum_over};
use crate::recipe::Schedule;
use candle_core::{CpuStorage, DType, InplaceOp2, Layout, Tensor, Var};

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWConfig {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

pub struct AdamW {
    pub cfg: AdamWConfig,
    pub step: usize,
    /// Per variable, exp_avg and exp_avg_sq stacked: f32 [2, numel] on the variable's device.
    moments: Vec<Tensor>,
    /// Per variable, its shape (the moments' views take it).
    shapes: Vec<candle_core::Shape>,
}

impl AdamW {
    /// Zero moments for `vars`, which must be f32 (the LoRA weights always are).
    pub fn new(cfg: AdamWConfig, vars: &[Var]) -> Result<Self> {
        let mut moments = Vec::with_capacity(vars.len());
        let mut shapes = Vec::with_capacity(vars.len());
        for (i, var) in vars.iter().enumerate() {
            if var.dtype() != DType::F32 {
                return Err(Error::InvalidArgument(format!(
                    "optimizer: variable {i} is {:?}; AdamW trains f32 variables",
                    var.dtype()
                )));
            }
            moments.push(Tensor::zeros(
                (2, var.elem_count()),
                DType::F32,
                var.device(),
            )?);
            shapes.push(var.shape().clone());
        }
        Ok(AdamW {
            cfg,
            step: 0,
            moments,
            shapes,
        })
    }

    /// Variable `i`'s first moment (torch's `exp_avg`), in the variable's shape.
    pub fn exp_avg(&self, i: usize) -> Result<Tensor> {
        Ok(self.moments[i].get(0)?.reshape(&self.shapes[i])?)
    }

    /// Variable `i`'s second moment (torch's `exp_avg_sq`), in the variable's shape.
    pub fn exp_avg_sq(&self, i: usize) -> Result<Tensor> {
        Ok(self.moments[i].get(1)?.reshape(&self.shapes[i])?)
    }

    /// Restores variable `i`'s moments (from a checkpoint); each must have the variable's
    /// shape. The error says which does not, for the caller to name the file.
    pub fn set_moments(&mut self, i: usize, exp_avg: &Tensor, exp_avg_sq: &Tensor) -> Result<()> {
        let shape = &self.shapes[i];
        for (what, t) in [("exp_avg", exp_avg), ("exp_avg_sq", exp_avg_sq)] {
            if t.shape() != shape {
                return Err(Error::InvalidArgument(format!(
                    "{what} is {:?}, its variable {:?}",
                    t.dims(),
                    shape.dims()
                )));
            }
            if !all_finite(std::slice::from_ref(t))? {
                return Err(Error::InvalidArgument(format!(
                    "{what} holds NaN or infinite values"
                )));
            }
        }
        let device = self.moments[i].device().clone();
        self.moments[i] = Tensor::stack(
            &[
                exp_avg.flatten_all()?.to_dtype(DType::F32)?,
                exp_avg_sq.flatten_all()?.to_dtype(DType::F32)?,
            ],
            0,
        )?
        .to_device(&device)?;
        Ok(())
    }

    /// One update with learning rate `lr` (the schedule's value for this step), as
    /// `torch.optim.AdamW`: θ ← θ·(1 − lr·wd); θ ← θ − lr·m̂/(√v̂ + ε).
    pub fn step(&mut self, vars: &[Var], grads: &[Tensor], lr: f64) -> Result<()> {
        self.step_scaled(vars, grads, 1.0, lr)
    }

    /// [`AdamW::step`] with the gradients taken times `grad_scale`, the coefficient of
    /// [`clip_scale`]: the clipping costs no pass of its own.
    pub fn step_scaled(
        &mut self,
        vars: &[Var],
        grads: &[Tensor],
        grad_scale: f64,
        lr: f64,
    ) -> Result<()> {
        if grads.len() != vars.len() || vars.len() != self.moments.len() {
            return Err(Error::InvalidArgument(format!(
                "optimizer: {} gradients for {} variables, moments for {}",
                grads.len(),
                vars.len(),
                self.moments.len()
            )));
        }
        for (i, (var, g)) in vars.iter().zip(grads).enumerate() {
            if var.shape() != &self.shapes[i] || g.shape() != &self.shapes[i] {
                return Err(Error::InvalidArgument(format!(
                    "optimizer: variable {i} is {:?} with a gradient {:?}, its moments {:?}",
                    var.dims(),
                    g.dims(),
                    self.shapes[i].dims()
                )));
            }
            if g.dtype() != DType::F32 {
                return Err(Error::InvalidArgument(format!(
                    "optimizer: the gradient of variable {i} is {:?}, not f32",
                    g.dtype()
                )));
            }
        }
        self.step += 1;
        let k = StepScalars::new(&self.cfg, self.step, lr, grad_scale);
        for ((var, g), moments) in vars.iter().zip(grads).zip(&self.moments) {
            moments.inplace_op2(&g.contiguous()?, &MomentsUpdate(k))?;
            var.as_tensor().inplace_op2(moments, &ParamUpdate(k))?;
        }
        Ok(())
    }
}

/// The scalars of one step as torch derives them: in f64 from the hyper-parameters, each then
/// taken as an f32 by its kernel (torch's `Scalar` arguments of f32 tensor ops).
#[derive(Clone, Copy, Debug, PartialEq)]
struct StepScalars {
    grad_scale: f32,
    /// 1 − β1, `exp_avg.lerp_`'s weight
    lerp_weight: f32,
    beta2: f32,
    /// 1 − β2, `addcmul_`'s value
    sq_weight: f32,
    /// 1 − lr·wd (1 without decay, where torch skips the product: ×1 is exact)
    decay: f32,
    /// √(1 − β2ᵗ)
    bc2_sqrt: f32,
    eps: f32,
    /// −lr / (1 − β1ᵗ)
    neg_step: f32,
}

impl StepScalars {
    fn new(cfg: &AdamWConfig, step: usize, lr: f64, grad_scale: f64) -> Self {
        // Python's float power, as torch's `beta1 ** step` with step a float
        let t = step as f64;
        StepScalars {
            grad_scale: grad_scale as f32,
            lerp_weight: (1.0 - cfg.beta1) as f32,
            beta2: cfg.beta2 as f32,
            sq_weight: (1.0 - cfg.beta2) as f32,
            decay: (1.0 - lr * cfg.weight_decay) as f32,
            bc2_sqrt: (1.0 - cfg.beta2.powf(t)).powf(0.5) as f32,
            eps: cfg.eps as f32,
            neg_step: (-(lr / (1.0 - cfg.beta1.powf(t)))) as f32,
        }
    }

    /// Both moments of one element, from its gradient (adamw.cu's `adamw_moments_f32`).
    fn moments(&self, grad: f32, m: &mut f32, v: &mut f32) {
        let g = grad * self.grad_scale;
        let diff = g - *m;
        // at::native::lerp: its vectorised form is one fma, from the nearer end
        *m = if self.lerp_weight.abs() < 0.5 {
            self.lerp_weight.mul_add(diff, *m)
        } else {
            (self.lerp_weight - 1.0).mul_add(diff, g)
        };
        *v = (self.sq_weight * g).mul_add(g, *v * self.beta2);
    }

    /// One parameter element from its updated moments (adamw.cu's `adamw_param_f32`).
    fn param(&self, p: f32, m: f32, v: f32) -> f32 {
        let denom = v.sqrt() / self.bc2_sqrt + self.eps;
        p * self.decay + (self.neg_step * m) / denom
    }

    /// The launches of adamw.cu for a variable of `n` elements: the moment kernel's, then the
    /// parameter kernel's.
    fn plans(&self, n: usize) -> candle_core::Result<(Launch, Launch)> {
        let moments = crate::model::launch::adamw_moments(
            n,
            self.grad_scale,
            self.lerp_weight,
            self.beta2,
            self.sq_weight,
        )?;
        let param = crate::model::launch::adamw_param(
            n,
            self.decay,
            self.bc2_sqrt,
            self.eps,
            self.neg_step,
        )?;
        Ok((moments, param))
    }
}

/// The two launches of src/cuda/adamw.cu (`adamw_moments_f32`, then `adamw_param_f32`) that
/// step `step` (1-based) of [`AdamW::step_scaled`] makes for a variable of `n` elements: the
/// CUDA build's, and tests/cuda_kernels_emulated.rs's.
pub fn kernel_plans(
    cfg: &AdamWConfig,
    step: usize,
    lr: f64,
    grad_scale: f64,
    n: usize,
) -> Result<(Launch, Launch)> {
    Ok(StepScalars::new(cfg, step, lr, grad_scale).plans(n)?)
}

/// A contiguous f32 storage's elements, to update in place (`what` names it in the error).
fn f32_elems_mut<'a>(
    s: &'a mut CpuStorage,
    l: &Layout,
    what: &str,
) -> candle_core::Result<&'a mut [f32]> {
    match (s, l.contiguous_offsets()) {
        (CpuStorage::F32(v), Some((a, b))) => Ok(&mut v[a..b]),
        _ => candle_core::bail!("{what}: contiguous f32 expected"),
    }
}

/// In place on a variable's moments [2, n], with its gradient [n].
struct MomentsUpdate(StepScalars);

impl InplaceOp2 for MomentsUpdate {
    fn name(&self) -> &'static str {
        "adamw-moments"
    }

    fn cpu_fwd(
        &self,
        moments: &mut CpuStorage,
        moments_l: &Layout,
        grad: &CpuStorage,
        grad_l: &Layout,
    ) -> candle_core::Result<()> {
        let grad = f32_input(grad, grad_l, "adamw gradient")?;
        let moments = f32_elems_mut(moments, moments_l, "adamw moments")?;
        let (m, v) = moments.split_at_mut(grad.len());
        for ((g, m), v) in grad.iter().zip(m).zip(v) {
            self.0.moments(*g, m, v);
        }
        Ok(())
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        moments: &mut candle_core::CudaStorage,
        moments_l: &Layout,
        grad: &candle_core::CudaStorage,
        grad_l: &Layout,
    ) -> candle_core::Result<()> {
        let (plan, _) = self.0.plans(grad_l.shape().elem_count())?;
        crate::model::cuda_kernels::adamw::in_place(
            "adamw_moments_f32",
            moments,
            moments_l,
            grad,
            grad_l,
            &plan,
        )
    }
}

/// In place on a variable [n], with its updated moments [2, n].
struct ParamUpdate(StepScalars);

impl InplaceOp2 for ParamUpdate {
    fn name(&self) -> &'static str {
        "adamw-param"
    }

    fn cpu_fwd(
        &self,
        param: &mut CpuStorage,
        param_l: &Layout,
        moments: &CpuStorage,
        moments_l: &Layout,
    ) -> candle_core::Result<()> {
        let moments = f32_input(moments, moments_l, "adamw moments")?;
        let param = f32_elems_mut(param, param_l, "adamw variable")?;
        let (m, v) = moments.split_at(param.len());
        for ((p, m), v) in param.iter_mut().zip(m).zip(v) {
            *p = self.0.param(*p, *m, *v);
        }
        Ok(())
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        param: &mut candle_core::CudaStorage,
        param_l: &Layout,
        moments: &candle_core::CudaStorage,
        moments_l: &Layout,
    ) -> candle_core::Result<()> {
        let (_, plan) = self.0.plans(param_l.shape().elem_count())?;
        crate::model::cuda_kernels::adamw::in_place(
            "adamw_param_f32",
            param,
            param_l,
            moments,
            moments_l,
            &plan,
        )
    }
}

/// Learning rate at optimizer step `step` (0-based) of `total`: linear warm-up from 0 over
/// `warmup` steps, then constant, linear decay to 0, or cosine decay to 0 (transformers'
/// `get_*_schedule_with_warmup`).
pub fn lr_at(schedule: Schedule, base: f64, step: usize, warmup: usize, total: usize) -> f64 {
    if step < warmup {
        return base * step as f64 / warmup.max(1) as f64;
    }
    let decay_steps = total.saturating_sub(warmup).max(1) as f64;
    let progress = ((step - warmup) as f64 / decay_steps).min(1.0);
    match schedule {
        Schedule::Constant => base,
        Schedule::Linear => base * (1.0 - progress).max(0.0),
        Schedule::Cosine => base * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos()),
    }
}

/// Global L2 norm of a set of gradients: each one's sum of squares in its f32, added in f64 on
/// the device, and a single read back (one synchronisation a step on a GPU, not one per
/// variable).
pub fn global_norm(grads: &[Tensor]) -> Result<f64> {
    Ok(sum_over(grads, |g| g.sqr()?.sum_all())?.sqrt())
}

/// The gradients' global norm and the factor that clips it to `max_norm` (torch's
/// clip_grad_norm_, with its 1e-6 in the denominator; 1 when the norm is within it or
/// `max_norm` is 0), for [`AdamW::step_scaled`].
pub fn clip_scale(grads: &[Tensor], max_norm: f64) -> Result<(f64, f64)> {
    let norm = global_norm(grads)?;
    let coef = max_norm / (norm + 1e-6);
    let scale = if max_norm > 0.0 && coef < 1.0 {
        coef
    } else {
        1.0
    };
    Ok((norm, scale))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;
    use std::collections::HashMap;

    const LRS: [f64; 4] = [1e-3, 5e-4, 2e-3, 1e-4];
    /// scripts/fixtures/adamw.py's configurations: (key, β1, β2, eps, weight decay)
    const CONFIGS: [(&str, f64, f64, f64, f64); 3] = [
        ("a", 0.9, 0.999, 1e-8, 0.01),
        ("b", 0.9, 0.999, 1e-8, 0.0),
        ("c", 0.3, 0.95, 1e-6, 0.1),
    ];

    fn reference() -> HashMap<String, Tensor> {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/fixtures/hf/adamw/reference.safetensors"
        );
        candle_core::safetensors::load(path, &Device::Cpu).unwrap()
    }

    fn elems(t: &Tensor) -> Vec<f32> {
        t.flatten_all().unwrap().to_vec1::<f32>().unwrap()
    }

    /// How many elements differ in their bits, and the largest difference in ulps.
    fn bit_diff(ours: &[f32], want: &[f32]) -> (usize, i64) {
        assert_eq!(ours.len(), want.len());
        let differ = ours
            .iter()
            .zip(want)
            .filter(|(a, b)| a.to_bits() != b.to_bits())
            .count();
        let worst = ours
            .iter()
            .zip(want)
            .map(|(a, b)| (a.to_bits() as i64 - b.to_bits() as i64).abs())
            .max()
            .unwrap_or(0);
        (differ, worst)
    }

    fn optimizer(r: &HashMap<String, Tensor>, config: (&str, f64, f64, f64, f64)) -> (Var, AdamW) {
        let (key, beta1, beta2, eps, weight_decay) = config;
        let p = Var::from_tensor(&r[&format!("{key}.p0")].copy().unwrap()).unwrap();
        let cfg = AdamWConfig {
            lr: LRS[0],
            beta1,
            beta2,
            eps,
            weight_decay,
        };
        let opt = AdamW::new(cfg, std::slice::from_ref(&p)).unwrap();
        (p, opt)
    }

    /// Four steps of torch.optim.AdamW on the CPU (scripts/fixtures/adamw.py), with weight
    /// decay, without, and with 1 − β1 ≥ 0.5: both moments equal torch's bit for bit after
    /// every step, and the parameter equals torch's own op sequence with a correctly rounded
    /// sqrt bit for bit, and torch's AdamW itself within its sqrt's ulp.
    #[test]
    fn adamw_equals_torch_bit_for_bit() {
        let r = reference();
        for config in CONFIGS {
            let key = config.0;
            let (p, mut opt) = optimizer(&r, config);
            for (s, lr) in (1..).zip(LRS) {
                let g = r[&format!("{key}.g{s}")].clone();
                opt.step(std::slice::from_ref(&p), &[g], lr).unwrap();
                let at = |what: &str| elems(&r[&format!("{key}.{what}{s}")]);
                let m = elems(&opt.exp_avg(0).unwrap());
                let v = elems(&opt.exp_avg_sq(0).unwrap());
                let ours = elems(p.as_tensor());
                assert_eq!(bit_diff(&m, &at("m")), (0, 0), "{key} step {s}: exp_avg");
                assert_eq!(bit_diff(&v, &at("v")), (0, 0), "{key} step {s}: exp_avg_sq");
                assert_eq!(bit_diff(&ours, &at("q")), (0, 0), "{key} step {s}: param");
                // torch's CPU sqrt is off by an ulp in about one element of six; through the
                // division that moves a few parameters by an ulp (|p| < 0.25 here: 1.5e-8)
                let torch = at("p");
                let (differ, _) = bit_diff(&ours, &torch);
                let worst = ours
                    .iter()
                    .zip(&torch)
                    .map(|(a, b)| (a - b).abs())
                    .fold(0f32, f32::max);
                assert!(
                    differ <= ours.len() / 20 && worst <= 1.5e-8,
                    "{key} step {s}: {differ} differ from torch, by up to {worst:e}"
                );
            }
        }
    }

    /// Clipping folded into the step equals scaling the gradients first, bit for bit; and
    /// clip_scale is torch's clip_grad_norm_ coefficient.
    #[test]
    fn a_scaled_step_equals_clipping_the_gradients_first() {
        let r = reference();
        let g = r["a.g1"].clone();
        let (p1, mut opt1) = optimizer(&r, CONFIGS[0]);
        let (p2, mut opt2) = optimizer(&r, CONFIGS[0]);
        let (norm, scale) = clip_scale(std::slice::from_ref(&g), 1.0).unwrap();
        let want_norm = elems(&g)
            .iter()
            .map(|x| (*x as f64).powi(2))
            .sum::<f64>()
            .sqrt();
        assert!(
            (norm - want_norm).abs() < 1e-5 * want_norm,
            "{norm} vs {want_norm}"
        );
        assert!((scale - 1.0 / (want_norm + 1e-6)).abs() < 1e-6 * scale);
        opt1.step_scaled(
            std::slice::from_ref(&p1),
            std::slice::from_ref(&g),
            scale,
            1e-3,
        )
        .unwrap();
        let clipped = (&g * scale).unwrap();
        opt2.step(std::slice::from_ref(&p2), &[clipped], 1e-3)
            .unwrap();
        assert_eq!(
            bit_diff(&elems(p1.as_tensor()), &elems(p2.as_tensor())),
            (0, 0)
        );
        assert_eq!(
            bit_diff(&elems(&opt1.moments[0]), &elems(&opt2.moments[0])),
            (0, 0)
        );
        // within the bound, or no bound: no scaling
        assert_eq!(clip_scale(std::slice::from_ref(&g), 1e9).unwrap().1, 1.0);
        assert_eq!(clip_scale(std::slice::from_ref(&g), 0.0).unwrap().1, 1.0);
        let dev = Device::Cpu;
        let g = [
            Tensor::new(&[3.0f32], &dev).unwrap(),
            Tensor::new(&[4.0f32], &dev).unwrap(),
        ];
        assert_eq!(global_norm(&g).unwrap(), 5.0);
        assert_eq!(global_norm(&[]).unwrap(), 0.0);
    }

    #[test]
    fn bad_variables_gradients_and_moments_are_errors() {
        let dev = Device::Cpu;
        let cfg = AdamWConfig {
            lr: 1e-3,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
        };
        let f64_var = Var::from_tensor(&Tensor::zeros(3, DType::F64, &dev).unwrap()).unwrap();
        let err = AdamW::new(cfg, &[f64_var]).err().unwrap().to_string();
        assert!(err.contains("variable 0 is F64"), "{err}");
        let p = Var::from_tensor(&Tensor::zeros((2, 3), DType::F32, &dev).unwrap()).unwrap();
        let mut opt = AdamW::new(cfg, std::slice::from_ref(&p)).unwrap();
        let vars = std::slice::from_ref(&p);
        let g = Tensor::zeros((3, 2), DType::F32, &dev).unwrap();
        let err = opt.step(vars, &[g], 1e-3).unwrap_err().to_string();
        assert!(err.contains("gradient [3, 2]"), "{err}");
        let err = opt.step(vars, &[], 1e-3).unwrap_err().to_string();
        assert!(err.contains("0 gradients for 1 variables"), "{err}");
        let g = Tensor::zeros((2, 3), DType::F64, &dev).unwrap();
        assert!(opt.step(vars, &[g], 1e-3).is_err());
        assert_eq!(opt.step, 0, "a refused step does not count");
        let m = Tensor::ones((2, 3), DType::F32, &dev).unwrap();
        let err = opt
            .set_moments(0, &m, &m.flatten_all().unwrap())
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("exp_avg_sq is [6], its variable [2, 3]"),
            "{err}"
        );
        let nan = Tensor::new(&[[1f32, f32::NAN, 0.0], [0.0, 0.0, 0.0]], &dev).unwrap();
        let err = opt.set_moments(0, &nan, &m).unwrap_err().to_string();
        assert!(err.contains("exp_avg holds NaN"), "{err}");
        let inf = Tensor::new(&[[1f32, f32::INFINITY, 0.0], [0.0, 0.0, 0.0]], &dev).unwrap();
        assert!(opt.set_moments(0, &m, &inf).is_err());
        assert!(all_finite(std::slice::from_ref(&m)).unwrap());
        assert!(!all_finite(&[m.clone(), nan]).unwrap());
        opt.set_moments(0, &m, &(&m * 2.0).unwrap()).unwrap();
        assert_eq!(elems(&opt.exp_avg_sq(0).unwrap()), vec![2.0; 6]);
        assert_eq!(opt.exp_avg(0).unwrap().dims(), &[2, 3]);
    }

    #[test]
    fn schedules() {
        assert_eq!(lr_at(Schedule::Linear, 1.0, 0, 2, 10), 0.0);
        assert_eq!(lr_at(Schedule::Linear, 1.0, 1, 2, 10), 0.5);
        assert_eq!(lr_at(Schedule::Linear, 1.0, 2, 2, 10), 1.0);
        assert!((lr_at(Schedule::Linear, 1.0, 6, 2, 10) - 0.5).abs() < 1e-12);
        assert!((lr_at(Schedule::Cosine, 1.0, 6, 2, 10) - 0.5).abs() < 1e-12);
        assert_eq!(lr_at(Schedule::Constant, 2.0, 9, 2, 10), 2.0);
    }
}
