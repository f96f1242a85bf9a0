//! `unlearn klom`: KLoM of an ensemble of unlearned models against an ensemble of oracles
//! (models retrained without the forget set), arXiv 2410.23232 Def. 3, algorithms.md §5.
//!
//! For every item of every split, each model's margin φ_t = z_y − log Σ_{k≠y} exp z_k of the gold
//! answer token at each answer position t (teacher forcing); per position, the binned
//! KL(unlearned ‖ oracle) of the two ensembles' margins ([`crate::metrics::klom_sequence`]:
//! clip ±100, `bins` equal bins over both samples, ε = 1e-5); the item's value is the mean over
//! positions; a split reports the 95th percentile (and the mean) over its items. With few models
//! per side (≈ 5–20) the histograms' ε floor dominates; [`KlomKind::Gaussian`] replaces them by
//! a normal fit per side and the closed-form KL ([`crate::metrics::klom::gaussian_kl`]).
//! **Direction: KL(unlearned ‖ oracle)**, the code direction of the released implementations,
//! written into every result as `klom_direction`.
use crate::error::{Error, Result};
use crate::metrics::klom::{binned_kl, gaussian_kl, KlomParams, KLOM_DIRECTION};
use crate::metrics::{logit_margin, mean, percentile};
use crate::model::{Decoder, ForwardOptions, ModelInput};
use crate::score::collate;
use crate::tokenizer::EncodedExample;
use candle_core::{DType, Device};
use serde::Serialize;
use std::path::{Path, PathBuf};

/// KLoM of one split.
#[derive(Debug, Clone, Serialize)]
pub struct SplitKlom {
    pub split: String,
    pub items: usize,
    /// the reported value: this percentile of the per-item KLoM
    pub percentile: f64,
    pub klom_percentile: f64,
    pub klom_mean: f64,
    /// per item, in file order
    pub per_item: Vec<f64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct KlomReport {
    pub klom_direction: &'static str,
    /// "binned" (with `bins`) or "gaussian"
    pub kind: &'static str,
    pub bins: Option<usize>,
    pub oracles: Vec<PathBuf>,
    pub unlearned: Vec<PathBuf>,
    pub splits: Vec<SplitKlom>,
}

/// Margins of the gold answer token at every answer position of every example:
/// `out[item][t]`.
pub fn answer_margins(
    model: &Decoder,
    examples: &[EncodedExample],
    batch_size: usize,
    pad_id: u32,
) -> Result<Vec<Vec<f64>>> {
    let mut out = Vec::with_capacity(examples.len());
    let refs: Vec<&EncodedExample> = examples.iter().collect();
    for chunk in refs.chunks(batch_size.max(1)) {
        let batch = collate(chunk, pad_id, &model.device)?;
        let logits = model
            .forward(
                &ModelInput::new(&batch.input_ids, Some(&batch.attention_mask)),
                &ForwardOptions::base_model(),
            )?
            .to_dtype(DType::F32)?
            .to_vec3::<f32>()?;
        for (row, ex) in logits.iter().zip(chunk) {
            let mut margins = Vec::new();
            for j in 1..ex.len() {
                if ex.labels[j] >= 0 {
                    margins.push(logit_margin(&row[j - 1], ex.labels[j] as usize)?);
                }
            }
            out.push(margins);
        }
    }
    Ok(out)
}

/// How the two ensembles' margins at one position are compared.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum KlomKind {
    /// the paper's histograms ([`binned_kl`])
    Binned(KlomParams),
    /// a normal fit per side ([`gaussian_kl`]), for small ensembles
    Gaussian,
}

/// KLoM per item from `unlearned[m][item][t]` and `oracle[m][item][t]`.
pub fn klom_per_item(
    unlearned: &[Vec<Vec<f64>>],
    oracle: &[Vec<Vec<f64>>],
    kind: &KlomKind,
) -> Result<Vec<f64>> {
    let items = oracle.first().map_or(0, |o| o.len());
    if unlearned.is_empty() || oracle.is_empty() || items == 0 {
        return Err(Error::InvalidArgument(
            "KLoM needs at least one unlearned model, one oracle and one item".into(),
        ));
    }
    (0..items)
        .map(|i| {
            let t = oracle[0][i].len();
            if t == 0 {
                return Err(Error::InvalidArgument(format!(
                    "KLoM: item {} has no answer tokens",
                    i + 1
                )));
            }
            let per_position: Vec<f64> = (0..t)
                .map(|p| {
                    let u: Vec<f64> = unlearned.iter().map(|m| m[i][p]).collect();
                    let o: Vec<f64> = oracle.iter().map(|m| m[i][p]).collect();
                    match kind {
                        KlomKind::Binned(params) => binned_kl(&u, &o, params),
                        KlomKind::Gaussian => gaussian_kl(&u, &o),
                    }
                })
                .collect::<Result<_>>()?;
            mean(&per_position)
        })
        .collect()
}

/// Load every model in turn (one in memory at a time), compute its margins on every split, and
/// the KLoM table.
#[allow(clippy::too_many_arguments)]
pub fn klom_ensembles(
    oracles: &[PathBuf],
    unlearned: &[PathBuf],
    splits: &[(String, Vec<EncodedExample>)],
    kind: &KlomKind,
    pct: f64,
    device: &Device,
    pad_id: u32,
    mut on_model: impl FnMut(&Path),
) -> Result<KlomReport> {
    let margins_of = |dir: &PathBuf| -> Result<Vec<Vec<Vec<f64>>>> {
        let model = Decoder::load(dir, DType::F32, device)?;
        splits
            .iter()
            .map(|(_, ex)| answer_margins(&model, ex, 32, pad_id))
            .collect()
    };
    let mut o_margins = Vec::new();
    for d in oracles {
        o_margins.push(margins_of(d)?);
        on_model(d);
    }
    let mut u_margins = Vec::new();
    for d in unlearned {
        u_margins.push(margins_of(d)?);
        on_model(d);
    }
    let mut out = Vec::new();
    for (s, (name, _)) in splits.iter().enumerate() {
        let u: Vec<Vec<Vec<f64>>> = u_margins.iter().map(|m| m[s].clone()).collect();
        let o: Vec<Vec<Vec<f64>>> = o_margins.iter().map(|m| m[s].clone()).collect();
        let per_item = klom_per_item(&u, &o, kind)?;
        out.push(SplitKlom {
            split: name.clone(),
            items: per_item.len(),
            percentile: pct,
            klom_percentile: percentile(&per_item, pct)?,
            klom_mean: mean(&per_item)?,
            per_item,
        });
    }
    Ok(KlomReport {
        klom_direction: KLOM_DIRECTION,
        kind: match kind {
            KlomKind::Binned(_) => "binned",
            KlomKind::Gaussian => "gaussian",
        },
        bins: match kind {
            KlomKind::Binned(p) => Some(p.bins),
            KlomKind::Gaussian => None,
        },
        oracles: oracles.to_vec(),
        unlearned: unlearned.to_vec(),
        splits: out,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identical_ensembles_give_zero_and_shifted_ones_match_a_hand_computation() {
        let params = KlomKind::Binned(KlomParams::default());
        // 2 models × 1 item × 2 positions
        let a = vec![vec![vec![1.0, 5.0]], vec![vec![3.0, 7.0]]];
        let k = klom_per_item(&a, &a, &params).unwrap();
        assert_eq!(k, vec![0.0]);
        // shift the unlearned margins by +10 at position 0 only: the two samples {11, 13} and
        // {1, 3} share no bin (range [1, 13], 20 bins of 0.6), so each unlearned half-mass
        // meets the ε floor: Σ 0.5·ln(0.5 / 1e-5) = ln(5e4); position 1 stays 0.
        let b = vec![vec![vec![11.0, 5.0]], vec![vec![13.0, 7.0]]];
        let k = klom_per_item(&b, &a, &params).unwrap();
        let hand = (0.5f64 / 1e-5).ln() / 2.0;
        assert!((k[0] - hand).abs() < 1e-12, "{} vs {hand}", k[0]);
        // a half overlap: unlearned {3, 13}, oracle {1, 3} → bins: 3 is shared
        let c = vec![vec![vec![3.0, 5.0]], vec![vec![13.0, 7.0]]];
        let k = klom_per_item(&c, &a, &params).unwrap();
        // P = {bin(3): 0.5, bin(13): 0.5}, Q = {bin(1): 0.5, bin(3): 0.5}
        let hand = (0.5 * (0.5f64 / 0.5).ln() + 0.5 * (0.5f64 / 1e-5).ln()) / 2.0;
        assert!((k[0] - hand).abs() < 1e-12, "{} vs {hand}", k[0]);
        // the Gaussian proxy: identical → 0; per position, then the mean
        assert_eq!(
            klom_per_item(&a, &a, &KlomKind::Gaussian).unwrap(),
            vec![0.0]
        );
        let g = klom_per_item(&c, &a, &KlomKind::Gaussian).unwrap();
        let hand = gaussian_kl(&[3.0, 13.0], &[1.0, 3.0]).unwrap() / 2.0;
        assert!((g[0] - hand).abs() < 1e-12);
    }

    #[test]
    fn empty_inputs_are_errors() {
        let p = KlomKind::Gaussian;
        assert!(klom_per_item(&[], &[vec![vec![1.0]]], &p).is_err());
        assert!(klom_per_item(&[vec![vec![]]], &[vec![vec![]]], &p).is_err());
    }
}
