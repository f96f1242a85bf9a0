//! GradAscent: L = −NLL(x_f). No retain term.
use super::{logits, mean_nll, Ctx, LossOutput, Method};
use crate::error::Result;
use crate::recipe::method_params;
use crate::train::batch::PairedBatch;
use serde::Deserialize;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Params {}

pub struct GradAscent;

impl GradAscent {
    pub fn from_params(params: &toml::Table) -> Result<Self> {
        let _: Params = method_params("gradascent", params)?;
        Ok(GradAscent)
    }
}

impl Method for GradAscent {
    fn name(&self) -> &'static str {
        "gradascent"
    }
    fn needs_retain(&self) -> bool {
        false
    }
    fn loss(&mut self, ctx: &Ctx, batch: &PairedBatch) -> Result<LossOutput> {
        let nll = mean_nll(&logits(ctx, &batch.forget)?, &batch.forget)?;
        let forget_nll = super::scalar(&nll)?;
        Ok(LossOutput {
            loss: nll.neg()?,
            logs: vec![("forget_nll".into(), forget_nll)],
        })
    }
}
