//! AdamW over the LoRA variables, the learning-rate schedule and global-norm clipping.
//!
//! Our own AdamW rather than `candle_nn::AdamW`: candle's defaults to weight decay 0.01 and
//! silently skips variables without a gradient (hiding a cut graph); here every variable must
//! have a gradient, the decay is explicit, and the moments can be checkpointed exactly.
use crate::error::{Error, Result};
use crate::recipe::Schedule;
use candle_core::{Tensor, Var};

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
    pub m: Vec<Tensor>,
    pub v: Vec<Tensor>,
}

impl AdamW {
    pub fn new(cfg: AdamWConfig, vars: &[Var]) -> Result<Self> {
        let m = vars
            .iter()
            .map(|v| v.as_tensor().zeros_like())
            .collect::<candle_core::Result<Vec<_>>>()?;
        let v = m.clone();
        Ok(AdamW { cfg, step: 0, m, v })
    }

    /// One update with learning rate `lr` (the schedule's value for this step), as
    /// `torch.optim.AdamW`: θ ← θ·(1 − lr·wd); θ ← θ − lr·m̂/(√v̂ + ε).
    pub fn step(&mut self, vars: &[Var], grads: &[Tensor], lr: f64) -> Result<()> {
        if grads.len() != vars.len() {
            return Err(Error::InvalidArgument(format!(
                "optimizer: {} gradients for {} variables",
                grads.len(),
                vars.len()
            )));
        }
        self.step += 1;
        let c = self.cfg;
        let bc1 = 1.0 - c.beta1.powi(self.step as i32);
        let bc2 = 1.0 - c.beta2.powi(self.step as i32);
        for (i, (var, g)) in vars.iter().zip(grads).enumerate() {
            let m = ((&self.m[i] * c.beta1)? + (g * (1.0 - c.beta1))?)?;
            let v = ((&self.v[i] * c.beta2)? + (g.sqr()? * (1.0 - c.beta2))?)?;
            let theta = var.as_tensor();
            let decayed = if c.weight_decay > 0.0 {
                (theta * (1.0 - lr * c.weight_decay))?
            } else {
                theta.clone()
            };
            let denom = ((&v / bc2)?.sqrt()? + c.eps)?;
            let update = ((&m / bc1)? / denom)?;
            var.set(&(decayed - (update * lr)?)?)?;
            self.m[i] = m;
            self.v[i] = v;
        }
        Ok(())
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

/// Global L2 norm of a set of gradients.
pub fn global_norm(grads: &[Tensor]) -> Result<f64> {
    let mut sq = 0f64;
    for g in grads {
        sq += g
            .sqr()?
            .sum_all()?
            .to_dtype(candle_core::DType::F64)?
            .to_scalar::<f64>()?;
    }
    Ok(sq.sqrt())
}

/// Scale gradients so their global norm is at most `max_norm` (torch's clip_grad_norm_,
/// with its 1e-6 in the denominator). Returns the norm before clipping.
pub fn clip_global_norm(grads: &mut [Tensor], max_norm: f64) -> Result<f64> {
    let norm = global_norm(grads)?;
    if max_norm > 0.0 {
        let coef = max_norm / (norm + 1e-6);
        if coef < 1.0 {
            for g in grads.iter_mut() {
                *g = (&*g * coef)?;
            }
        }
    }
    Ok(norm)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn adamw_matches_torch_on_two_steps() {
        // torch.optim.AdamW([p], lr=0.1, betas=(0.9,0.999), eps=1e-8, weight_decay=0.1),
        // p = [1.0, -2.0], grads [0.5, 0.25] then [-1.0, 0.5]; hand-derived:
        // step 1: p·0.99 − 0.1·sign(g) (m̂/√v̂ = ±1) → [0.89, -2.08]
        // step 2: m = [-0.055, 0.0725]·… computed below in f64.
        let dev = Device::Cpu;
        let p = Var::from_tensor(&Tensor::new(&[1.0f64, -2.0], &dev).unwrap()).unwrap();
        let cfg = AdamWConfig {
            lr: 0.1,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.1,
        };
        let mut opt = AdamW::new(cfg, std::slice::from_ref(&p)).unwrap();
        opt.step(
            std::slice::from_ref(&p),
            &[Tensor::new(&[0.5f64, 0.25], &dev).unwrap()],
            0.1,
        )
        .unwrap();
        let after1 = p.as_tensor().to_vec1::<f64>().unwrap();
        assert!(
            (after1[0] - 0.89).abs() < 1e-6 && (after1[1] + 2.08).abs() < 1e-6,
            "{after1:?}"
        );
        opt.step(
            std::slice::from_ref(&p),
            &[Tensor::new(&[-1.0f64, 0.5], &dev).unwrap()],
            0.1,
        )
        .unwrap();
        let after2 = p.as_tensor().to_vec1::<f64>().unwrap();
        // independent f64 evaluation of the torch formula
        let expect = |p1: f64, g1: f64, g2: f64| {
            let (m1, v1) = (0.1 * g1, 0.001 * g1 * g1);
            let (m2, v2) = (0.9 * m1 + 0.1 * g2, 0.999 * v1 + 0.001 * g2 * g2);
            let (mh, vh) = (m2 / (1.0 - 0.81), v2 / (1.0 - 0.999f64.powi(2)));
            p1 * 0.99 - 0.1 * mh / (vh.sqrt() + 1e-8)
        };
        assert!(
            (after2[0] - expect(after1[0], 0.5, -1.0)).abs() < 1e-12,
            "{after2:?}"
        );
        assert!((after2[1] - expect(after1[1], 0.25, 0.5)).abs() < 1e-12);
    }

    #[test]
    fn schedules_and_clipping() {
        assert_eq!(lr_at(Schedule::Linear, 1.0, 0, 2, 10), 0.0);
        assert_eq!(lr_at(Schedule::Linear, 1.0, 1, 2, 10), 0.5);
        assert_eq!(lr_at(Schedule::Linear, 1.0, 2, 2, 10), 1.0);
        assert!((lr_at(Schedule::Linear, 1.0, 6, 2, 10) - 0.5).abs() < 1e-12);
        assert!((lr_at(Schedule::Cosine, 1.0, 6, 2, 10) - 0.5).abs() < 1e-12);
        assert_eq!(lr_at(Schedule::Constant, 2.0, 9, 2, 10), 2.0);
        let dev = Device::Cpu;
        let mut g = vec![
            Tensor::new(&[3.0f32], &dev).unwrap(),
            Tensor::new(&[4.0f32], &dev).unwrap(),
        ];
        let n = clip_global_norm(&mut g, 1.0).unwrap();
        assert!((n - 5.0).abs() < 1e-9);
        let after = global_norm(&g).unwrap();
        assert!((after - 1.0).abs() < 1e-5, "{after}");
    }
}
