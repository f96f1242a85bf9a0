//! Explicit unilateral gradient surgery (the EUPMU paper's baseline, "UNGrad"): per step,
//! g_f = ∇L_f and g_r = ∇L_r from two backward passes, then
//!
//!   d = g_f + λ*·g_r,   λ* = max(0, (−⟨g_r, g_f⟩ − ε) / (‖g_r‖² + 1e-8))
//!
//! over the LoRA parameters, which satisfies ⟨g_r, d⟩ ≥ −ε (to first order the retain loss rises
//! by at most lr·ε). Only g_f is modified. The forget and retain batches are separate graphs, so
//! the two backwards together cost about one combined backward.
use super::{
    forget_term, grads_of, logits, mean_nll, reference_seq_nll, scalar, Ctx, ForgetLoss, Logs,
    LossOutput, Method,
};
use crate::error::{Error, Result};
use crate::model::Decoder;
use crate::recipe::method_params;
use crate::tokenizer::EncodedExample;
use crate::train::batch::PairedBatch;
use candle_core::{DType, Tensor};
use serde::Deserialize;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Params {
    // forget_loss, beta, delta, layer, steering_coeff, steering_seed: ForgetLoss::from_method_table
    /// ε ≥ 0: allowed first-order retain increase per unit step
    #[serde(default)]
    tolerance: f64,
}

pub struct Surgery {
    forget: ForgetLoss,
    tolerance: f64,
    reference: Vec<f64>,
}

impl Surgery {
    pub fn from_params(params: &toml::Table) -> Result<Self> {
        let (forget, rest) = ForgetLoss::from_method_table("surgery", params)?;
        let p: Params = method_params("surgery", &rest)?;
        if p.tolerance < 0.0 {
            return Err(Error::InvalidArgument(
                "method 'surgery': tolerance must be ≥ 0".into(),
            ));
        }
        Ok(Surgery {
            forget,
            tolerance: p.tolerance,
            reference: vec![],
        })
    }
}

fn dot(a: &[Tensor], b: &[Tensor]) -> Result<f64> {
    let mut s = 0.0;
    for (x, y) in a.iter().zip(b) {
        s += (x * y)?
            .sum_all()?
            .to_dtype(DType::F64)?
            .to_scalar::<f64>()?;
    }
    Ok(s)
}

/// The surgery coefficient λ* for gradients g_f, g_r and tolerance ε.
pub fn surgery_lambda(g_f: &[Tensor], g_r: &[Tensor], tolerance: f64) -> Result<(f64, f64)> {
    let gr_gf = dot(g_r, g_f)?;
    let gr_gr = dot(g_r, g_r)?;
    Ok((((-gr_gf - tolerance) / (gr_gr + 1e-8)).max(0.0), gr_gf))
}

impl Method for Surgery {
    fn name(&self) -> &'static str {
        "surgery"
    }

    fn prepare(&mut self, model: &Decoder, forget: &[EncodedExample], pad_id: u32) -> Result<()> {
        self.forget.check("surgery", model)?;
        if self.forget.needs_reference() {
            self.reference = reference_seq_nll(model, forget, pad_id)?;
        }
        Ok(())
    }

    /// The combined objective L_f + L_r, for reporting; training uses `gradients`.
    fn loss(&mut self, ctx: &Ctx, batch: &PairedBatch) -> Result<LossOutput> {
        let lf = forget_term(self.forget, ctx, &batch.forget, &self.reference)?;
        let retain = batch.retain()?;
        let lr = mean_nll(&logits(ctx, retain)?, retain)?;
        let logs = vec![
            ("forget_loss".into(), scalar(&lf)?),
            ("retain_loss".into(), scalar(&lr)?),
        ];
        Ok(LossOutput {
            loss: (lf + lr)?,
            logs,
        })
    }

    fn gradients(&mut self, ctx: &Ctx, batch: &PairedBatch) -> Result<(Vec<Tensor>, Logs)> {
        let lf = forget_term(self.forget, ctx, &batch.forget, &self.reference)?;
        let retain = batch.retain()?;
        let lr = mean_nll(&logits(ctx, retain)?, retain)?;
        let (lf_v, lr_v) = (scalar(&lf)?, scalar(&lr)?);
        let mut logs = vec![
            ("loss".into(), lf_v),
            ("forget_loss".into(), lf_v),
            ("retain_loss".into(), lr_v),
        ];
        if !lf_v.is_finite() || !lr_v.is_finite() {
            return Ok((vec![], logs));
        }
        let g_f = grads_of(&lf, ctx.vars)?;
        let g_r = grads_of(&lr, ctx.vars)?;
        let (lambda, gr_gf) = surgery_lambda(&g_f, &g_r, self.tolerance)?;
        logs.push(("lambda".into(), lambda));
        logs.push(("grad_dot".into(), gr_gf));
        let d = g_f
            .iter()
            .zip(&g_r)
            .map(|(f, r)| Ok((f + (r * lambda)?)?))
            .collect::<Result<Vec<_>>>()?;
        Ok((d, logs))
    }
}
