//! Batched greedy generation with a KV cache: prompts are left-padded, position ids count
//! only real tokens (transformers' `cumsum(mask) − 1`), each row stops at EOS.
use crate::error::{Error, Result};
use crate::model::decoder::KvCache;
use crate::model::{Decoder, ForwardOptions, ModelInput};
use candle_core::{DType, Tensor, D};

#[derive(Debug, Clone)]
pub struct GenerationConfig {
    pub max_new_tokens: usize,
    /// generation of a row stops at any of these
    pub eos_token_ids: Vec<u32>,
    pub pad_token_id: u32,
}

impl GenerationConfig {
    pub fn new(eos_token_ids: Vec<u32>, pad_token_id: u32) -> Self {
        GenerationConfig {
            max_new_tokens: 200,
            eos_token_ids,
            pad_token_id,
        }
    }
}

struct Padded {
    ids: Vec<Vec<u32>>,
    mask: Vec<Vec<u32>>,
}

fn left_pad(prompts: &[Vec<u32>], pad: u32) -> Result<Padded> {
    let t = prompts.iter().map(Vec::len).max().unwrap_or(0);
    if prompts.is_empty() || prompts.iter().any(Vec::is_empty) {
        return Err(Error::InvalidArgument(
            "generation needs non-empty prompts".into(),
        ));
    }
    let mut ids = Vec::new();
    let mut mask = Vec::new();
    for p in prompts {
        let n = t - p.len();
        ids.push(
            std::iter::repeat_n(pad, n)
                .chain(p.iter().copied())
                .collect(),
        );
        mask.push(
            std::iter::repeat_n(0, n)
                .chain(std::iter::repeat_n(1, p.len()))
                .collect(),
        );
    }
    Ok(Padded { ids, mask })
}

/// transformers: position_ids = cumsum(mask) − 1, with padding positions set to 1.
fn positions(mask: &[u32]) -> Vec<u32> {
    let mut c = 0u32;
    mask.iter()
        .map(|&m| {
            c += m;
            if m == 0 {
                1
            } else {
                c - 1
            }
        })
        .collect()
}

fn tensor2(rows: &[Vec<u32>], model: &Decoder) -> Result<Tensor> {
    let b = rows.len();
    let t = rows.first().map_or(0, Vec::len);
    let flat: Vec<u32> = rows.iter().flatten().copied().collect();
    Ok(Tensor::from_vec(flat, (b, t), &model.device)?)
}

fn argmax_last(logits: &Tensor) -> Result<Vec<u32>> {
    let t = logits.dim(1)?;
    Ok(logits
        .narrow(1, t - 1, 1)?
        .squeeze(1)?
        .to_dtype(DType::F32)?
        .argmax(D::Minus1)?
        .to_vec1::<u32>()?)
}

/// Greedy continuation of each prompt (token ids without the prompt, EOS excluded).
pub fn greedy(
    model: &Decoder,
    prompts: &[Vec<u32>],
    cfg: &GenerationConfig,
) -> Result<Vec<Vec<u32>>> {
    let padded = left_pad(prompts, cfg.pad_token_id)?;
    let b = prompts.len();
    let mut mask = padded.mask.clone();
    let pos: Vec<Vec<u32>> = mask.iter().map(|m| positions(m)).collect();
    let mut cache = KvCache::new(model.layers.len());
    let ids = tensor2(&padded.ids, model)?;
    let m = tensor2(&mask, model)?;
    let p = tensor2(&pos, model)?;
    let logits = model.forward_cached(
        &ModelInput {
            input_ids: &ids,
            attention_mask: Some(&m),
            position_ids: Some(&p),
        },
        &mut cache,
    )?;
    let mut next = argmax_last(&logits)?;
    let mut out: Vec<Vec<u32>> = vec![vec![]; b];
    let mut done = vec![false; b];
    let mut last_pos: Vec<u32> = pos.iter().map(|p| p.last().copied().unwrap_or(0)).collect();
    for _ in 0..cfg.max_new_tokens {
        if accept(&next, &mut out, &mut done, cfg) {
            break;
        }
        // finished rows keep feeding the pad token (their output is no longer read)
        let step_ids: Vec<Vec<u32>> = (0..b)
            .map(|r| vec![if done[r] { cfg.pad_token_id } else { next[r] }])
            .collect();
        for (r, m) in mask.iter_mut().enumerate() {
            m.push(1);
            last_pos[r] += 1;
        }
        let ids = tensor2(&step_ids, model)?;
        let m = tensor2(&mask, model)?;
        let p = tensor2(
            &last_pos.iter().map(|&x| vec![x]).collect::<Vec<_>>(),
            model,
        )?;
        let logits = model.forward_cached(
            &ModelInput {
                input_ids: &ids,
                attention_mask: Some(&m),
                position_ids: Some(&p),
            },
            &mut cache,
        )?;
        next = argmax_last(&logits)?;
    }
    Ok(out)
}

/// Append each unfinished row's next token (an EOS finishes the row instead); true when every
/// row is finished or full.
fn accept(next: &[u32], out: &mut [Vec<u32>], done: &mut [bool], cfg: &GenerationConfig) -> bool {
    for ((&token, row), finished) in next.iter().zip(out.iter_mut()).zip(done.iter_mut()) {
        if !*finished {
            if cfg.eos_token_ids.contains(&token) {
                *finished = true;
            } else {
                row.push(token);
            }
        }
    }
    out.iter()
        .zip(done.iter())
        .all(|(o, &d)| d || o.len() >= cfg.max_new_tokens)
}

/// The same greedy decoding without a cache: the whole sequence is recomputed each step.
/// Slow; it exists to check the cached path.
pub fn greedy_uncached(
    model: &Decoder,
    prompts: &[Vec<u32>],
    cfg: &GenerationConfig,
) -> Result<Vec<Vec<u32>>> {
    let padded = left_pad(prompts, cfg.pad_token_id)?;
    let b = prompts.len();
    let (mut ids, mut mask) = (padded.ids, padded.mask);
    let mut out: Vec<Vec<u32>> = vec![vec![]; b];
    let mut done = vec![false; b];
    for _ in 0..cfg.max_new_tokens {
        let pos: Vec<Vec<u32>> = mask.iter().map(|m| positions(m)).collect();
        let (it, mt, pt) = (
            tensor2(&ids, model)?,
            tensor2(&mask, model)?,
            tensor2(&pos, model)?,
        );
        let logits = model.forward(
            &ModelInput {
                input_ids: &it,
                attention_mask: Some(&mt),
                position_ids: Some(&pt),
            },
            &ForwardOptions::eval(),
        )?;
        let next = argmax_last(&logits)?;
        if accept(&next, &mut out, &mut done, cfg) {
            break;
        }
        for r in 0..b {
            ids[r].push(if done[r] { cfg.pad_token_id } else { next[r] });
            mask[r].push(1);
        }
    }
    Ok(out)
}
