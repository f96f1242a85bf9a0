//! One differentiable decoder for every supported architecture.
//!
//! The families differ in a handful of places (how q/k/v are stored, the MLP, the norms, the
//! residual layout, positions); `ArchConfig` describes them and this file follows it. Weights keep
//! their Hugging Face names so adapters and merges line up with transformers and PEFT.
use crate::error::{Error, Result};
use crate::model::attention;
use crate::model::config::{ArchConfig, Family, NormKind, RopeScaling};
use crate::model::linear::Linear;
pub use crate::model::linear::{ForwardOptions, LoraWeights};
use crate::model::ops;
use crate::model::weights::WeightStore;
use candle_core::{DType, Device, Tensor, Var, D};
use std::path::{Path, PathBuf};

#[derive(Clone)]
pub struct Norm {
    pub weight: Tensor,
    pub bias: Option<Tensor>,
    pub kind: NormKind,
    pub eps: f64,
}

impl Norm {
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(match self.kind {
            NormKind::Rms => ops::rms_norm_fused(x, &self.weight, self.eps, false)?,
            NormKind::RmsPlusOne => ops::rms_norm_fused(x, &self.weight, self.eps, true)?,
            NormKind::LayerNorm => {
                let b = self
                    .bias
                    .as_ref()
                    .ok_or_else(|| Error::InvalidArgument("layer norm without bias".into()))?;
                ops::layer_norm(x, &self.weight, b, self.eps)?
            }
        })
    }
}

/// How the q/k/v projections are stored.
#[derive(Clone)]
pub enum QkvProj {
    Separate {
        q: Linear,
        k: Linear,
        v: Linear,
    },
    /// rows [q; k; v] (Phi-3 `qkv_proj`, GPT-2 `c_attn`)
    Concatenated(Linear),
    /// per head [q_h; k_h; v_h] (GPT-NeoX `query_key_value`)
    PerHeadInterleaved(Linear),
}

#[derive(Clone)]
pub struct Attention {
    pub qkv: QkvProj,
    pub o: Linear,
    pub q_norm: Option<Norm>,
    pub k_norm: Option<Norm>,
    pub window: Option<usize>,
}

#[derive(Clone)]
pub enum Mlp {
    Gated {
        gate: Linear,
        up: Linear,
        down: Linear,
    },
    /// Phi-3 `gate_up_proj`: rows [gate; up]
    FusedGated {
        gate_up: Linear,
        down: Linear,
    },
    Plain {
        fc: Linear,
        proj: Linear,
    },
}

#[derive(Clone)]
pub struct Layer {
    pub input_norm: Norm,
    pub attn: Attention,
    /// Llama: post_attention_layernorm (pre-MLP); Gemma 2: pre_feedforward_layernorm
    pub mlp_norm: Norm,
    /// Gemma 2 sandwich norms applied to the attention and MLP outputs
    pub post_attn_norm: Option<Norm>,
    pub post_mlp_norm: Option<Norm>,
    pub mlp: Mlp,
}

/// A batch as the model sees it. `attention_mask` 1 = token, 0 = padding; `position_ids`
/// default to 0..T for every row (what transformers uses for right padding).
pub struct ModelInput<'a> {
    pub input_ids: &'a Tensor,
    pub attention_mask: Option<&'a Tensor>,
    pub position_ids: Option<&'a Tensor>,
}

impl<'a> ModelInput<'a> {
    pub fn new(input_ids: &'a Tensor, attention_mask: Option<&'a Tensor>) -> Self {
        ModelInput {
            input_ids,
            attention_mask,
            position_ids: None,
        }
    }
}

/// Keys and values of earlier positions, per layer ([B, kv_heads, T_past, D], after RoPE), so
/// generation feeds only the new token each step.
#[derive(Clone, Default)]
pub struct KvCache {
    layers: Vec<Option<(Tensor, Tensor)>>,
    /// positions already in the cache
    pub len: usize,
}

impl KvCache {
    pub fn new(num_layers: usize) -> Self {
        KvCache {
            layers: vec![None; num_layers],
            len: 0,
        }
    }
}

#[derive(Clone)]
pub struct Decoder {
    pub cfg: ArchConfig,
    pub dir: PathBuf,
    pub embed: Tensor,
    /// module path of the token embedding as in transformers (`model.embed_tokens`, …): the
    /// name an embedding adapter is stored under
    pub embed_name: String,
    /// PEFT's embedding LoRA: `a` = lora_embedding_A [r, vocab], `b` = lora_embedding_B
    /// [hidden, r]; the rows of `scale · (B·A)ᵀ` are added to the looked-up embeddings. Only
    /// loaded adapters carry one (a simulated-oracle shadow: the embedding changes as much as
    /// any layer); training attaches none.
    pub embed_lora: Option<LoraWeights>,
    pub pos_embed: Option<Tensor>,
    pub layers: Vec<Layer>,
    pub final_norm: Norm,
    pub lm_head: Linear,
    pub dtype: DType,
    pub device: Device,
}

enum Source<'a> {
    Store(&'a WeightStore),
    /// only check names and shapes against the file headers; tensors are empty placeholders
    CheckOnly(&'a WeightStore),
    /// seeded random init (training from scratch): matrices N(0, std²), norm weights 1 (0 for
    /// Gemma's 1+w), biases 0
    Random(std::cell::RefCell<crate::rng::Rng>, f64),
    /// the same shapes and constants, matrices drawn on the device by candle's generator: fast
    /// (a 1B model in seconds, not a minute of host sampling) but not reproducible across
    /// devices; for timing only
    DeviceRandom(f64),
}

struct Loader<'a> {
    source: Source<'a>,
    cfg: &'a ArchConfig,
    dtype: DType,
    device: &'a Device,
    /// full-parameter training: every tensor becomes a `Var`, recorded under its checkpoint name
    trainable: Option<std::cell::RefCell<Vec<(String, Var)>>>,
}

impl Loader<'_> {
    fn tensor(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        let t = self.read(name, shape)?;
        match &self.trainable {
            None => Ok(t),
            Some(vars) => {
                let var = Var::from_tensor(&t)?;
                let tensor = var.as_tensor().clone();
                vars.borrow_mut().push((name.to_string(), var));
                Ok(tensor)
            }
        }
    }

    /// A random model's vectors: biases 0, norm weights 1 (0 for Gemma's 1 + w).
    fn vector_init(&self, name: &str) -> f32 {
        if name.ends_with(".bias") || self.cfg.norm == NormKind::RmsPlusOne {
            0.0
        } else {
            1.0
        }
    }

    fn read(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        let store = match &self.source {
            Source::Store(s) => s,
            Source::Random(rng, std) => {
                let n: usize = shape.iter().product();
                let data: Vec<f32> = if shape.len() >= 2 {
                    let mut r = rng.borrow_mut();
                    (0..n).map(|_| (r.normal() * std) as f32).collect()
                } else {
                    vec![self.vector_init(name); n]
                };
                return Ok(Tensor::from_vec(data, shape, self.device)?.to_dtype(self.dtype)?);
            }
            Source::DeviceRandom(std) => {
                let t = if shape.len() >= 2 {
                    Tensor::randn(0f32, *std as f32, shape, self.device)?
                } else {
                    Tensor::full(self.vector_init(name), shape, self.device)?
                };
                return Ok(t.to_dtype(self.dtype)?);
            }
            Source::CheckOnly(store) => {
                let (_, got, _, path) = store.raw(name)?;
                if got != shape {
                    return Err(Error::WeightShape {
                        name: name.to_string(),
                        path: path.to_path_buf(),
                        expected: shape.to_vec(),
                        got,
                    });
                }
                // A [0, 0] placeholder keeps rank-2 operations (the Conv1D transpose) valid.
                return Ok(Tensor::zeros((0, 0), self.dtype, self.device)?);
            }
        };
        store.tensor(name, shape, self.dtype, self.device)
    }
    fn linear(&self, module: &str, out: usize, inp: usize, bias: bool) -> Result<Linear> {
        Ok(Linear {
            name: module.to_string(),
            weight: self.tensor(&format!("{module}.weight"), &[out, inp])?,
            bias: if bias {
                Some(self.tensor(&format!("{module}.bias"), &[out])?)
            } else {
                None
            },
            lora: None,
            conv1d: false,
        })
    }
    /// GPT-2 Conv1D: stored [in, out]; kept as [out, in] in memory.
    fn conv1d(&self, file_prefix: &str, module: &str, out: usize, inp: usize) -> Result<Linear> {
        if self.trainable.is_some() {
            // the transposed copy kept in memory would not follow the optimizer's updates
            return Err(Error::InvalidArgument(
                "full-parameter training of GPT-2 (Conv1D weights) is not supported; add a [lora] section to train an adapter instead".into(),
            ));
        }
        let w = self.tensor(&format!("{file_prefix}{module}.weight"), &[inp, out])?;
        Ok(Linear {
            name: format!("transformer.{module}"),
            weight: w.t()?.contiguous()?,
            bias: Some(self.tensor(&format!("{file_prefix}{module}.bias"), &[out])?),
            lora: None,
            conv1d: true,
        })
    }
    fn norm(&self, module: &str, dim: usize) -> Result<Norm> {
        let kind = self.cfg.norm;
        Ok(Norm {
            weight: self.tensor(&format!("{module}.weight"), &[dim])?,
            bias: if kind == NormKind::LayerNorm {
                Some(self.tensor(&format!("{module}.bias"), &[dim])?)
            } else {
                None
            },
            kind,
            eps: self.cfg.norm_eps,
        })
    }
}

impl Decoder {
    /// Load a checkpoint directory (config.json + safetensors). Weights are converted to
    /// `dtype` (f32 on CPU).
    pub fn load(dir: &Path, dtype: DType, device: &Device) -> Result<Self> {
        let cfg_path = dir.join("config.json");
        if !cfg_path.exists() {
            return Err(Error::config(
                &cfg_path,
                "missing: a model directory needs config.json",
            ));
        }
        let cfg = ArchConfig::from_file(&cfg_path)?;
        let store = WeightStore::open_dir(dir)?;
        Self::from_store(cfg, &store, dir, dtype, device)
    }

    /// Check that a checkpoint has every weight its config asks for, with the right shapes,
    /// reading only the file headers (merging uses this without loading the model).
    pub fn validate_store(cfg: &ArchConfig, store: &WeightStore) -> Result<()> {
        Self::build(
            cfg.clone(),
            Source::CheckOnly(store),
            Path::new(""),
            DType::F32,
            &Device::Cpu,
            false,
        )
        .map(|_| ())
    }

    pub fn from_store(
        cfg: ArchConfig,
        store: &WeightStore,
        dir: &Path,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        Ok(Self::build(cfg, Source::Store(store), dir, dtype, device, false)?.0)
    }

    /// A model with random weights for a config: N(0, std²) matrices drawn on the device
    /// (candle's generator, seeded by `Device::set_seed` where the device has one), norm weights
    /// 1, biases 0. For benchmarks: fast for large shapes, not reproducible across devices
    /// (seeded training from scratch is [`Decoder::trainable`]).
    pub fn random_on_device(
        cfg: ArchConfig,
        std: f64,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        Ok(Self::build(
            cfg,
            Source::DeviceRandom(std),
            Path::new(""),
            dtype,
            device,
            false,
        )?
        .0)
    }

    /// Full-parameter training: load a checkpoint (`from = Some(dir)`) or draw seeded random
    /// weights (`seed`, `std`), with every base tensor a `Var` of `dtype`. Returns the trainable
    /// tensors under their checkpoint names, in build order (a tied head shares the embedding's
    /// `Var`).
    pub fn trainable(
        cfg: ArchConfig,
        from: Option<&Path>,
        (seed, std): (u64, f64),
        dtype: DType,
        device: &Device,
    ) -> Result<(Self, Vec<(String, Var)>)> {
        match from {
            Some(dir) => {
                let store = WeightStore::open_dir(dir)?;
                Self::build(cfg, Source::Store(&store), dir, dtype, device, true)
            }
            None => {
                let rng = std::cell::RefCell::new(crate::rng::Rng::new(seed));
                let src = Source::Random(rng, std);
                Self::build(cfg, src, Path::new(""), dtype, device, true)
            }
        }
    }

    fn build(
        cfg: ArchConfig,
        source: Source,
        dir: &Path,
        dtype: DType,
        device: &Device,
        trainable: bool,
    ) -> Result<(Self, Vec<(String, Var)>)> {
        let l = Loader {
            source,
            cfg: &cfg,
            dtype,
            device,
            trainable: trainable.then(|| std::cell::RefCell::new(Vec::new())),
        };
        let contains = |name: &str| match &l.source {
            Source::Store(s) | Source::CheckOnly(s) => s.contains(name),
            Source::Random(..) | Source::DeviceRandom(_) => true,
        };
        let (h, v, inter) = (cfg.hidden_size, cfg.vocab_size, cfg.intermediate_size);
        let (qd, kvd) = (cfg.q_dim(), cfg.kv_dim());
        let mut layers = Vec::with_capacity(cfg.num_layers);
        let (embed, pos_embed, final_norm, lm_head);
        match cfg.family {
            Family::Gpt2 => {
                // The original OpenAI checkpoints store names without the `transformer.` prefix.
                let p = if contains("transformer.wte.weight") {
                    "transformer."
                } else {
                    ""
                };
                embed = l.tensor(&format!("{p}wte.weight"), &[v, h])?;
                pos_embed =
                    Some(l.tensor(&format!("{p}wpe.weight"), &[cfg.max_position_embeddings, h])?);
                for i in 0..cfg.num_layers {
                    let m = format!("h.{i}");
                    layers.push(Layer {
                        input_norm: l.norm(&format!("{p}{m}.ln_1"), h)?,
                        attn: Attention {
                            qkv: QkvProj::Concatenated(l.conv1d(
                                p,
                                &format!("{m}.attn.c_attn"),
                                3 * h,
                                h,
                            )?),
                            o: l.conv1d(p, &format!("{m}.attn.c_proj"), h, h)?,
                            q_norm: None,
                            k_norm: None,
                            window: None,
                        },
                        mlp_norm: l.norm(&format!("{p}{m}.ln_2"), h)?,
                        post_attn_norm: None,
                        post_mlp_norm: None,
                        mlp: Mlp::Plain {
                            fc: l.conv1d(p, &format!("{m}.mlp.c_fc"), inter, h)?,
                            proj: l.conv1d(p, &format!("{m}.mlp.c_proj"), h, inter)?,
                        },
                    });
                }
                final_norm = l.norm(&format!("{p}ln_f"), h)?;
                lm_head = tied_head(&embed);
            }
            Family::GptNeox => {
                embed = l.tensor("gpt_neox.embed_in.weight", &[v, h])?;
                pos_embed = None;
                for i in 0..cfg.num_layers {
                    let m = format!("gpt_neox.layers.{i}");
                    layers.push(Layer {
                        input_norm: l.norm(&format!("{m}.input_layernorm"), h)?,
                        attn: Attention {
                            qkv: QkvProj::PerHeadInterleaved(l.linear(
                                &format!("{m}.attention.query_key_value"),
                                3 * qd,
                                h,
                                cfg.attention_bias,
                            )?),
                            o: l.linear(
                                &format!("{m}.attention.dense"),
                                h,
                                qd,
                                cfg.attention_bias,
                            )?,
                            q_norm: None,
                            k_norm: None,
                            window: None,
                        },
                        mlp_norm: l.norm(&format!("{m}.post_attention_layernorm"), h)?,
                        post_attn_norm: None,
                        post_mlp_norm: None,
                        mlp: Mlp::Plain {
                            fc: l.linear(&format!("{m}.mlp.dense_h_to_4h"), inter, h, true)?,
                            proj: l.linear(&format!("{m}.mlp.dense_4h_to_h"), h, inter, true)?,
                        },
                    });
                }
                final_norm = l.norm("gpt_neox.final_layer_norm", h)?;
                lm_head = if cfg.tie_word_embeddings {
                    tied_head(&embed)
                } else {
                    l.linear("embed_out", v, h, false)?
                };
            }
            _ => {
                embed = l.tensor("model.embed_tokens.weight", &[v, h])?;
                pos_embed = None;
                for i in 0..cfg.num_layers {
                    let m = format!("model.layers.{i}");
                    let a = format!("{m}.self_attn");
                    let qkv = if cfg.family == Family::Phi3 {
                        QkvProj::Concatenated(l.linear(
                            &format!("{a}.qkv_proj"),
                            qd + 2 * kvd,
                            h,
                            cfg.attention_bias,
                        )?)
                    } else {
                        QkvProj::Separate {
                            q: l.linear(&format!("{a}.q_proj"), qd, h, cfg.attention_bias)?,
                            k: l.linear(&format!("{a}.k_proj"), kvd, h, cfg.attention_bias)?,
                            v: l.linear(&format!("{a}.v_proj"), kvd, h, cfg.attention_bias)?,
                        }
                    };
                    let (q_norm, k_norm) = if cfg.family == Family::Qwen3 {
                        (
                            Some(l.norm(&format!("{a}.q_norm"), cfg.head_dim)?),
                            Some(l.norm(&format!("{a}.k_norm"), cfg.head_dim)?),
                        )
                    } else {
                        (None, None)
                    };
                    let mp = format!("{m}.mlp");
                    let mlp = if cfg.family == Family::Phi3 {
                        Mlp::FusedGated {
                            gate_up: l.linear(
                                &format!("{mp}.gate_up_proj"),
                                2 * inter,
                                h,
                                cfg.mlp_bias,
                            )?,
                            down: l.linear(&format!("{mp}.down_proj"), h, inter, cfg.mlp_bias)?,
                        }
                    } else {
                        Mlp::Gated {
                            gate: l.linear(&format!("{mp}.gate_proj"), inter, h, cfg.mlp_bias)?,
                            up: l.linear(&format!("{mp}.up_proj"), inter, h, cfg.mlp_bias)?,
                            down: l.linear(&format!("{mp}.down_proj"), h, inter, cfg.mlp_bias)?,
                        }
                    };
                    let gemma = cfg.family == Family::Gemma2;
                    layers.push(Layer {
                        input_norm: l.norm(&format!("{m}.input_layernorm"), h)?,
                        attn: Attention {
                            qkv,
                            o: l.linear(&format!("{a}.o_proj"), h, qd, cfg.o_bias)?,
                            q_norm,
                            k_norm,
                            window: cfg.sliding_window[i],
                        },
                        mlp_norm: if gemma {
                            l.norm(&format!("{m}.pre_feedforward_layernorm"), h)?
                        } else {
                            l.norm(&format!("{m}.post_attention_layernorm"), h)?
                        },
                        post_attn_norm: if gemma {
                            Some(l.norm(&format!("{m}.post_attention_layernorm"), h)?)
                        } else {
                            None
                        },
                        post_mlp_norm: if gemma {
                            Some(l.norm(&format!("{m}.post_feedforward_layernorm"), h)?)
                        } else {
                            None
                        },
                        mlp,
                    });
                }
                final_norm = l.norm("model.norm", h)?;
                lm_head = if cfg.tie_word_embeddings {
                    tied_head(&embed)
                } else {
                    l.linear("lm_head", v, h, false)?
                };
            }
        }
        if let Source::Store(store) | Source::CheckOnly(store) = &l.source {
            warn_unread(store, &cfg);
        }
        let vars = l.trainable.map(|v| v.into_inner()).unwrap_or_default();
        let embed_name = match cfg.family {
            Family::Gpt2 => "transformer.wte",
            Family::GptNeox => "gpt_neox.embed_in",
            _ => "model.embed_tokens",
        }
        .to_string();
        Ok((
            Decoder {
                cfg,
                dir: dir.to_path_buf(),
                embed,
                embed_name,
                embed_lora: None,
                pos_embed,
                layers,
                final_norm,
                lm_head,
                dtype,
                device: device.clone(),
            },
            vars,
        ))
    }

    /// Logits [B, T, V] for every position.
    pub fn forward(&self, input: &ModelInput, opts: &ForwardOptions) -> Result<Tensor> {
        let hidden = self.run_layers(input, opts, None)?;
        self.logits(&hidden, opts)
    }

    /// Final norm, LM head and (Gemma 2) final soft-capping of the last hidden state.
    fn logits(&self, hidden: &Tensor, opts: &ForwardOptions) -> Result<Tensor> {
        let normed = self.final_norm.forward(hidden)?;
        let mut logits = self.lm_head.forward(&normed, opts)?;
        if let Some(cap) = self.cfg.final_softcap {
            logits = ops::softcap(&logits, cap)?;
        }
        Ok(logits)
    }

    /// Logits [B, t_new, V] for new tokens given a cache of the earlier ones. `attention_mask`
    /// covers the cached and the new positions ([B, cache.len + t_new]); `position_ids` are the
    /// new tokens' positions. Evaluation only: LoRA weights are used as constants.
    pub fn forward_cached(&self, input: &ModelInput, cache: &mut KvCache) -> Result<Tensor> {
        if cache.layers.len() != self.layers.len() {
            *cache = KvCache::new(self.layers.len());
        }
        let opts = ForwardOptions::eval();
        let t_new = input.input_ids.dim(1)?;
        let hidden = self.run_layers_cached(input, &opts, None, Some(&mut *cache))?;
        cache.len += t_new;
        self.logits(&hidden, &opts)
    }

    /// The hidden state [B, T, H] after decoder layer `layer` (0-based; transformers'
    /// `hidden_states[layer + 1]`). Layers above it are not computed.
    pub fn hidden_after_layer(
        &self,
        input: &ModelInput,
        layer: usize,
        opts: &ForwardOptions,
    ) -> Result<Tensor> {
        if layer >= self.layers.len() {
            return Err(Error::InvalidArgument(format!(
                "layer {layer} does not exist: the model has {} layers (0..{})",
                self.layers.len(),
                self.layers.len() - 1
            )));
        }
        self.run_layers(input, opts, Some(layer))
    }

    fn run_layers(
        &self,
        input: &ModelInput,
        opts: &ForwardOptions,
        stop_after: Option<usize>,
    ) -> Result<Tensor> {
        self.run_layers_cached(input, opts, stop_after, None)
    }

    fn run_layers_cached(
        &self,
        input: &ModelInput,
        opts: &ForwardOptions,
        stop_after: Option<usize>,
        mut cache: Option<&mut KvCache>,
    ) -> Result<Tensor> {
        let past = cache.as_ref().map_or(0, |c| c.len);
        let (b, t) = input.input_ids.dims2()?;
        if t == 0 {
            return Err(Error::InvalidArgument("empty input sequence".into()));
        }
        let ids = input.input_ids.to_dtype(DType::U32)?;
        let max_id = ids.max_all()?.to_scalar::<u32>()? as usize;
        if max_id >= self.cfg.vocab_size {
            return Err(Error::InvalidArgument(format!(
                "token id {max_id} is outside the vocabulary (size {})",
                self.cfg.vocab_size
            )));
        }
        let positions: Vec<Vec<u32>> = match input.position_ids {
            Some(p) => p.to_dtype(DType::U32)?.to_vec2::<u32>()?,
            None => vec![(past as u32..(past + t) as u32).collect(); b],
        };
        let mask_rows: Vec<Vec<u32>> = match input.attention_mask {
            Some(m) => m.to_dtype(DType::U32)?.to_vec2::<u32>()?,
            None => vec![vec![1; past + t]; b],
        };
        if mask_rows.iter().any(|r| r.len() != past + t) || positions.iter().any(|p| p.len() != t) {
            return Err(Error::InvalidArgument(format!(
                "attention mask must cover {} positions ({past} cached + {t} new) and position ids {t}",
                past + t
            )));
        }
        let mut x = self.embed.index_select(&ids.flatten_all()?, 0)?.reshape((
            b,
            t,
            self.cfg.hidden_size,
        ))?;
        if let (true, Some(lora)) = (opts.lora, &self.embed_lora) {
            // inside the embedding module in PEFT, so before Gemma's √hidden multiplier
            let rows = embedding_lora_rows(lora, &ids, opts, x.dtype())?.reshape(x.shape())?;
            x = (x + rows)?;
        }
        if let Some(scale) = self.cfg.embed_scale {
            // transformers multiplies by a tensor of the hidden dtype
            let s = Tensor::new(scale as f32, &self.device)?
                .to_dtype(self.dtype)?
                .to_dtype(DType::F64)?;
            x = (x * s.to_scalar::<f64>()?)?;
        }
        if let Some(wpe) = &self.pos_embed {
            let maxp = positions.iter().flatten().copied().max().unwrap_or(0) as usize;
            if maxp >= self.cfg.max_position_embeddings {
                return Err(Error::InvalidArgument(format!(
                    "sequence position {maxp} exceeds the {} learned positions of the model {} (lower --max-length or data.max_length)",
                    self.cfg.max_position_embeddings,
                    self.dir.display()
                )));
            }
            let flat: Vec<u32> = positions.iter().flatten().copied().collect();
            let pidx = Tensor::from_vec(flat, b * t, &self.device)?;
            x = (x + wpe
                .index_select(&pidx, 0)?
                .reshape((b, t, self.cfg.hidden_size))?)?;
        }
        let rope = match &self.cfg.rope {
            Some(r) => Some(rope_tables(
                r,
                &positions,
                self.cfg.head_dim,
                &self.device,
                self.dtype,
            )?),
            None => None,
        };
        let mut masks: Vec<(Option<usize>, AttnMask)> = Vec::new();
        let zero_empty_rows = self.cfg.attn_softcap.is_none();
        for (i, layer) in self.layers.iter().enumerate() {
            let window = layer.attn.window;
            let mask = match masks.iter().find(|(w, _)| *w == window) {
                Some((_, m)) => m.clone(),
                None => {
                    let m = build_mask(
                        &mask_rows,
                        past,
                        window,
                        zero_empty_rows,
                        &self.device,
                        self.dtype,
                    )?;
                    masks.push((window, m.clone()));
                    m
                }
            };
            let slot = cache.as_mut().map(|c| &mut c.layers[i]);
            x = self.layer_forward(layer, &x, &mask, rope.as_ref(), opts, slot)?;
            if stop_after == Some(i) {
                break;
            }
        }
        Ok(x)
    }

    fn layer_forward(
        &self,
        layer: &Layer,
        x: &Tensor,
        mask: &AttnMask,
        rope: Option<&(Tensor, Tensor)>,
        opts: &ForwardOptions,
        cache: Option<&mut Option<(Tensor, Tensor)>>,
    ) -> Result<Tensor> {
        let h = layer.input_norm.forward(x)?;
        let mut attn = self.attention(&layer.attn, &h, mask, rope, opts, cache)?;
        if let Some(n) = &layer.post_attn_norm {
            attn = n.forward(&attn)?;
        }
        if self.cfg.parallel_residual {
            let m = self.mlp(&layer.mlp, &layer.mlp_norm.forward(x)?, opts)?;
            return Ok(((x + attn)? + m)?);
        }
        let x = (x + attn)?;
        let mut m = self.mlp(&layer.mlp, &layer.mlp_norm.forward(&x)?, opts)?;
        if let Some(n) = &layer.post_mlp_norm {
            m = n.forward(&m)?;
        }
        Ok((x + m)?)
    }

    fn attention(
        &self,
        attn: &Attention,
        x: &Tensor,
        mask: &AttnMask,
        rope: Option<&(Tensor, Tensor)>,
        opts: &ForwardOptions,
        cache: Option<&mut Option<(Tensor, Tensor)>>,
    ) -> Result<Tensor> {
        let cfg = &self.cfg;
        let (b, t, _) = x.dims3()?;
        let (nh, nkv, hd) = (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim);
        // each: [B, heads, T, D]
        let (q, k, v) = match &attn.qkv {
            QkvProj::Separate { q, k, v } => (
                q.forward(x, opts)?
                    .reshape((b, t, nh, hd))?
                    .transpose(1, 2)?,
                k.forward(x, opts)?
                    .reshape((b, t, nkv, hd))?
                    .transpose(1, 2)?,
                v.forward(x, opts)?
                    .reshape((b, t, nkv, hd))?
                    .transpose(1, 2)?,
            ),
            QkvProj::Concatenated(p) => {
                let y = p.forward(x, opts)?;
                let (qd, kvd) = (nh * hd, nkv * hd);
                (
                    y.narrow(D::Minus1, 0, qd)?
                        .reshape((b, t, nh, hd))?
                        .transpose(1, 2)?,
                    y.narrow(D::Minus1, qd, kvd)?
                        .reshape((b, t, nkv, hd))?
                        .transpose(1, 2)?,
                    y.narrow(D::Minus1, qd + kvd, kvd)?
                        .reshape((b, t, nkv, hd))?
                        .transpose(1, 2)?,
                )
            }
            QkvProj::PerHeadInterleaved(p) => {
                let y = p
                    .forward(x, opts)?
                    .reshape((b, t, nh, 3 * hd))?
                    .transpose(1, 2)?;
                (
                    y.narrow(D::Minus1, 0, hd)?,
                    y.narrow(D::Minus1, hd, hd)?,
                    y.narrow(D::Minus1, 2 * hd, hd)?,
                )
            }
        };
        let q = match &attn.q_norm {
            Some(n) => n.forward(&q)?,
            None => q,
        };
        let k = match &attn.k_norm {
            Some(n) => n.forward(&k)?,
            None => k,
        };
        let (q, k) = match rope {
            Some((cos, sin)) => (ops::rope(&q, cos, sin)?, ops::rope(&k, cos, sin)?),
            None => (q, k),
        };
        let (k, v) = match cache {
            Some(slot) => {
                let (k, v) = match slot.take() {
                    Some((pk, pv)) => (Tensor::cat(&[&pk, &k], 2)?, Tensor::cat(&[&pv, &v], 2)?),
                    None => (k.contiguous()?, v.contiguous()?),
                };
                *slot = Some((k.clone(), v.clone()));
                (k, v)
            }
            None => (k, v),
        };
        let t_kv = k.dim(2)?;
        let (k, v) = if nkv != nh {
            let rep = nh / nkv;
            let expand = |t_: &Tensor| -> Result<Tensor> {
                Ok(t_
                    .unsqueeze(2)?
                    .expand((b, nkv, rep, t_kv, hd))?
                    .reshape((b, nh, t_kv, hd))?)
            };
            (expand(&k)?, expand(&v)?)
        } else {
            (k, v)
        };
        let out = attention::attention(
            &q,
            &k,
            &v,
            cfg.attn_scale,
            cfg.attn_softcap,
            &mask.additive,
            mask.empty_rows.as_ref(),
        )?;
        let out = out.transpose(1, 2)?.reshape((b, t, nh * hd))?;
        attn.o.forward(&out, opts)
    }

    fn mlp(&self, mlp: &Mlp, x: &Tensor, opts: &ForwardOptions) -> Result<Tensor> {
        let act = self.cfg.activation;
        match mlp {
            Mlp::Gated { gate, up, down } => {
                let h = ops::gated_activation(&gate.forward(x, opts)?, &up.forward(x, opts)?, act)?;
                down.forward(&h, opts)
            }
            Mlp::FusedGated { gate_up, down } => {
                let y = gate_up.forward(x, opts)?;
                let h = ops::packed_gated_activation(&y, self.cfg.intermediate_size, act)?;
                down.forward(&h, opts)
            }
            Mlp::Plain { fc, proj } => {
                let h = ops::activation(&fc.forward(x, opts)?, act)?;
                proj.forward(&h, opts)
            }
        }
    }

    /// Every linear layer that LoRA can target, in model order (lm_head excluded).
    pub fn linears(&self) -> Vec<&Linear> {
        let mut out = Vec::new();
        for layer in &self.layers {
            match &layer.attn.qkv {
                QkvProj::Separate { q, k, v } => out.extend([q, k, v]),
                QkvProj::Concatenated(p) | QkvProj::PerHeadInterleaved(p) => out.push(p),
            }
            out.push(&layer.attn.o);
            match &layer.mlp {
                Mlp::Gated { gate, up, down } => out.extend([gate, up, down]),
                Mlp::FusedGated { gate_up, down } => out.extend([gate_up, down]),
                Mlp::Plain { fc, proj } => out.extend([fc, proj]),
            }
        }
        out
    }

    /// [`Decoder::linears`] and the output head: what a loaded adapter may carry.
    pub fn linears_with_head(&self) -> Vec<&Linear> {
        let mut out = self.linears();
        out.push(&self.lm_head);
        out
    }

    pub fn linears_mut(&mut self) -> Vec<&mut Linear> {
        layer_linears_mut(&mut self.layers)
    }

    /// [`Decoder::linears_mut`] and the output head: what a loaded adapter may carry.
    pub fn linears_with_head_mut(&mut self) -> Vec<&mut Linear> {
        let mut out = layer_linears_mut(&mut self.layers);
        out.push(&mut self.lm_head);
        out
    }

    /// Total number of base parameters (tied embeddings counted once).
    pub fn num_parameters(&self) -> usize {
        let norm = |n: &Norm| n.weight.elem_count() + n.bias.as_ref().map_or(0, |b| b.elem_count());
        let lin =
            |l: &Linear| l.weight.elem_count() + l.bias.as_ref().map_or(0, |b| b.elem_count());
        let mut n = self.embed.elem_count() + self.pos_embed.as_ref().map_or(0, |p| p.elem_count());
        n += norm(&self.final_norm);
        if !self.cfg.tie_word_embeddings {
            n += lin(&self.lm_head);
        }
        for layer in &self.layers {
            n += norm(&layer.input_norm) + norm(&layer.mlp_norm);
            n += layer.post_attn_norm.as_ref().map_or(0, norm)
                + layer.post_mlp_norm.as_ref().map_or(0, norm);
            n += layer.attn.q_norm.as_ref().map_or(0, norm)
                + layer.attn.k_norm.as_ref().map_or(0, norm);
        }
        n + self.linears().into_iter().map(lin).sum::<usize>()
    }
}

fn layer_linears_mut(layers: &mut [Layer]) -> Vec<&mut Linear> {
    let mut out = Vec::new();
    for layer in layers {
        match &mut layer.attn.qkv {
            QkvProj::Separate { q, k, v } => out.extend([q, k, v]),
            QkvProj::Concatenated(p) | QkvProj::PerHeadInterleaved(p) => out.push(p),
        }
        out.push(&mut layer.attn.o);
        match &mut layer.mlp {
            Mlp::Gated { gate, up, down } => out.extend([gate, up, down]),
            Mlp::FusedGated { gate_up, down } => out.extend([gate_up, down]),
            Mlp::Plain { fc, proj } => out.extend([fc, proj]),
        }
    }
    out
}

/// `scale · (B·A)ᵀ[ids]` = `scale · Aᵀ[ids] · Bᵀ`, [n, hidden], computed in f32 (f64 for f64
/// models) like a linear layer's LoRA branch.
fn embedding_lora_rows(
    lora: &LoraWeights,
    ids: &Tensor,
    opts: &ForwardOptions,
    out_dtype: DType,
) -> Result<Tensor> {
    let branch_dtype = if out_dtype == DType::F64 {
        DType::F64
    } else {
        DType::F32
    };
    let (a, b) = if opts.detach_lora {
        (lora.a.as_tensor().detach(), lora.b.as_tensor().detach())
    } else {
        (lora.a.as_tensor().clone(), lora.b.as_tensor().clone())
    };
    let (a, b) = (a.to_dtype(branch_dtype)?, b.to_dtype(branch_dtype)?);
    // the columns of A for these ids, [r, n] → [n, r], without copying A (vocab columns)
    let rows = a.index_select(&ids.flatten_all()?, 1)?.t()?.contiguous()?;
    let up = (rows * lora.scale)?.matmul(&b.t()?)?;
    Ok(up.to_dtype(out_dtype)?)
}

fn tied_head(embed: &Tensor) -> Linear {
    Linear {
        name: "lm_head".into(),
        weight: embed.clone(),
        bias: None,
        lora: None,
        conv1d: false,
    }
}

/// An additive attention mask and, when some query rows can see no key at all, a [B, 1, T, 1]
/// multiplier that zeroes those rows.
#[derive(Clone)]
struct AttnMask {
    additive: Tensor,
    empty_rows: Option<Tensor>,
}

/// Additive attention mask [B, 1, T, T]: 0 where query i may attend key j (j ≤ i, key not
/// padding, and i − j < window), −1e9 elsewhere (−∞ would turn fully masked rows into NaN);
/// −32768 in f16, where −1e9 is −∞ (and −65504 plus a negative score overflows to it).
///
/// A query that sees no key (right padding inside a sliding window) is padding itself; its
/// output differs between transformers' attention kernels: SDPA returns zeros, eager attention
/// (used by Gemma 2 for soft-capping) a uniform average. We follow the kernel transformers uses
/// for the architecture so that every position matches, padding included.
fn build_mask(
    rows: &[Vec<u32>],
    past: usize,
    window: Option<usize>,
    zero_empty_rows: bool,
    device: &Device,
    dtype: DType,
) -> Result<AttnMask> {
    let b = rows.len();
    // keys: cached + new positions; queries: the new positions only
    let t_kv = rows.first().map_or(0, |r| r.len());
    let t = t_kv.saturating_sub(past);
    let masked = if dtype == DType::F16 { -32768.0 } else { -1e9 };
    let mut data = vec![0f32; b * t * t_kv];
    let mut keep = vec![1f32; b * t];
    let mut any_empty = false;
    for (bi, row) in rows.iter().enumerate() {
        for qi in 0..t {
            let i = past + qi;
            let mut seen = false;
            for j in 0..t_kv {
                let allowed = j <= i && row[j] != 0 && window.is_none_or(|w| i - j < w);
                if allowed {
                    seen = true;
                } else {
                    data[(bi * t + qi) * t_kv + j] = masked;
                }
            }
            if !seen {
                keep[bi * t + qi] = 0.0;
                any_empty = true;
            }
        }
    }
    let additive = Tensor::from_vec(data, (b, 1, t, t_kv), device)?.to_dtype(dtype)?;
    let empty_rows = if any_empty && zero_empty_rows {
        Some(Tensor::from_vec(keep, (b, 1, t, 1), device)?.to_dtype(dtype)?)
    } else {
        None
    };
    Ok(AttnMask {
        additive,
        empty_rows,
    })
}

/// Inverse frequencies exactly as transformers computes them (f32).
pub fn inv_freq(rope: &crate::model::config::RopeConfig, seq_len: usize) -> Vec<f32> {
    let dim = rope.rotary_dim;
    let base_for = |base: f64| -> Vec<f32> {
        (0..dim)
            .step_by(2)
            .map(|i| 1.0f32 / (base as f32).powf(i as f32 / dim as f32))
            .collect()
    };
    match rope.scaling {
        RopeScaling::None => base_for(rope.theta),
        RopeScaling::Linear { factor } => base_for(rope.theta)
            .into_iter()
            .map(|f| f / factor as f32)
            .collect(),
        RopeScaling::Dynamic {
            factor,
            original_max,
        } => {
            if seq_len > original_max {
                let base = rope.theta
                    * ((factor * seq_len as f64 / original_max as f64) - (factor - 1.0))
                        .powf(dim as f64 / (dim as f64 - 2.0));
                base_for(base)
            } else {
                base_for(rope.theta)
            }
        }
        RopeScaling::Llama3 {
            factor,
            low_freq_factor,
            high_freq_factor,
            original_max,
        } => {
            let old = original_max as f64;
            let low_wavelen = old / low_freq_factor;
            let high_wavelen = old / high_freq_factor;
            base_for(rope.theta)
                .into_iter()
                .map(|f| {
                    let f64_ = f as f64;
                    let wavelen = 2.0 * std::f64::consts::PI / f64_;
                    if wavelen < high_wavelen {
                        f
                    } else if wavelen > low_wavelen {
                        (f64_ / factor) as f32
                    } else {
                        let smooth = (old / wavelen - low_freq_factor)
                            / (high_freq_factor - low_freq_factor);
                        ((1.0 - smooth) * f64_ / factor + smooth * f64_) as f32
                    }
                })
                .collect()
        }
    }
}

/// cos and sin tables [B, 1, T, rot/2] for the given positions.
fn rope_tables(
    rope: &crate::model::config::RopeConfig,
    positions: &[Vec<u32>],
    _head_dim: usize,
    device: &Device,
    dtype: DType,
) -> Result<(Tensor, Tensor)> {
    let b = positions.len();
    let t = positions.first().map_or(0, |p| p.len());
    let max_pos = positions.iter().flatten().copied().max().unwrap_or(0) as usize;
    let freqs = inv_freq(rope, max_pos + 1);
    let half = freqs.len();
    let mut cos = Vec::with_capacity(b * t * half);
    let mut sin = Vec::with_capacity(b * t * half);
    for row in positions {
        for &p in row {
            for &f in &freqs {
                let angle = p as f32 * f;
                cos.push(angle.cos());
                sin.push(angle.sin());
            }
        }
    }
    let cos = Tensor::from_vec(cos, (b, 1, t, half), device)?.to_dtype(dtype)?;
    let sin = Tensor::from_vec(sin, (b, 1, t, half), device)?.to_dtype(dtype)?;
    Ok((cos, sin))
}

/// Tensors of a checkpoint that the model its config.json describes never read: a config
/// that disagrees with its weights (fewer layers, say) would otherwise give a smaller model
/// without a word. transformers warns likewise ("Some weights … were not used"). Buffers that
/// are not weights, and a stored head the config ties to the embedding, are expected.
fn warn_unread(store: &WeightStore, cfg: &ArchConfig) {
    let expected = |n: &str| {
        n.ends_with("rotary_emb.inv_freq")
            || n.ends_with(".attn.bias")
            || n.ends_with(".attn.masked_bias")
            || n.ends_with(".attention.bias")
            || n.ends_with(".attention.masked_bias")
            || (cfg.tie_word_embeddings && (n == "lm_head.weight" || n == "embed_out.weight"))
    };
    let unread: Vec<String> = store
        .unread()
        .into_iter()
        .filter(|n| !expected(n))
        .collect();
    if let Some(first) = unread.first() {
        tracing::warn!(
            "{}: {} tensor(s) are not used by the model its config.json describes (first: {first}); do config.json and the weights belong together?",
            store.origin.display(),
            unread.len()
        );
    }
}

#[cfg(test)]
mod mask_tests {
    use super::*;

    #[test]
    fn the_attention_mask_is_finite_in_every_dtype_and_masks_fully_masked_rows_finitely() {
        // row 0: two left-padding positions (queries 0 and 1 see no key); row 1: no padding
        let rows = vec![vec![0u32, 0, 5, 6], vec![3, 4, 5, 6]];
        for dtype in [DType::F32, DType::BF16, DType::F16] {
            let mask = build_mask(&rows, 0, None, true, &Device::Cpu, dtype).unwrap();
            let values = mask
                .additive
                .to_dtype(DType::F32)
                .unwrap()
                .flatten_all()
                .unwrap();
            let values = values.to_vec1::<f32>().unwrap();
            assert!(
                values.iter().all(|v| v.is_finite()),
                "{dtype:?}: {values:?}"
            );
            // a padded query's scores plus the mask, softmaxed in f32 as attention does it,
            // give finite weights (NaN here would reach every later position through V)
            let scores = Tensor::new(&[[-20f32, 7.0, -3.0, 0.5]], &Device::Cpu)
                .unwrap()
                .to_dtype(dtype)
                .unwrap();
            let first_row = mask
                .additive
                .get(0)
                .unwrap()
                .get(0)
                .unwrap()
                .narrow(0, 0, 1)
                .unwrap();
            let probs = crate::model::ops::masked_softmax(&scores, 1.0, &first_row).unwrap();
            let probs = probs
                .to_dtype(DType::F32)
                .unwrap()
                .to_vec2::<f32>()
                .unwrap();
            assert!(
                probs[0].iter().all(|p| p.is_finite()),
                "{dtype:?}: {probs:?}"
            );
            // the two empty rows are flagged for zeroing
            let keep = mask.empty_rows.expect("empty rows").flatten_all().unwrap();
            let keep = keep.to_dtype(DType::F32).unwrap().to_vec1::<f32>().unwrap();
            assert_eq!(keep, vec![0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0]);
        }
    }
}
