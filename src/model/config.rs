//! `config.json` → one normalised description of a decoder, whatever the architecture.
//!
//! Hugging Face configs differ in key names per architecture (`n_embd` vs `hidden_size`) and
//! in how RoPE is described: older checkpoints use top-level `rope_theta` + `rope_scaling`,
//! transformers 5 writes `rope_parameters`. Both are read here so the model code sees one form.
use crate::error::{Error, Result};
use serde_json::{Map, Value};
use std::path::{Path, PathBuf};

pub const SUPPORTED_MODEL_TYPES: &[&str] = &[
    "llama", "mistral", "qwen2", "qwen3", "gemma2", "phi3", "gpt_neox", "gpt2",
];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    Llama,
    Mistral,
    Qwen2,
    Qwen3,
    Gemma2,
    Phi3,
    GptNeox,
    Gpt2,
}

impl Family {
    pub fn model_type(self) -> &'static str {
        match self {
            Family::Llama => "llama",
            Family::Mistral => "mistral",
            Family::Qwen2 => "qwen2",
            Family::Qwen3 => "qwen3",
            Family::Gemma2 => "gemma2",
            Family::Phi3 => "phi3",
            Family::GptNeox => "gpt_neox",
            Family::Gpt2 => "gpt2",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Activation {
    Silu,
    /// exact (erf) GELU, transformers' "gelu"
    Gelu,
    /// tanh approximation: "gelu_new", "gelu_pytorch_tanh", "gelu_fast"
    GeluTanh,
    Relu,
}

impl Activation {
    fn parse(name: &str, path: &Path) -> Result<Self> {
        Ok(match name {
            "silu" | "swish" => Activation::Silu,
            "gelu" => Activation::Gelu,
            "gelu_new" | "gelu_pytorch_tanh" | "gelu_fast" => Activation::GeluTanh,
            "relu" => Activation::Relu,
            other => {
                return Err(Error::config(
                    path,
                    format!("unsupported activation '{other}' (supported: silu, gelu, gelu_new, gelu_pytorch_tanh, gelu_fast, relu)"),
                ))
            }
        })
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum RopeScaling {
    None,
    /// positions divided by `factor`
    Linear {
        factor: f64,
    },
    /// NTK-aware scaling applied when the sequence exceeds `original_max`
    Dynamic {
        factor: f64,
        original_max: usize,
    },
    /// Llama 3.x frequency-dependent scaling
    Llama3 {
        factor: f64,
        low_freq_factor: f64,
        high_freq_factor: f64,
        original_max: usize,
    },
}

#[derive(Debug, Clone)]
pub struct RopeConfig {
    pub theta: f64,
    /// number of leading dimensions of each head that are rotated
    pub rotary_dim: usize,
    pub scaling: RopeScaling,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NormKind {
    /// x·rsqrt(mean x²+ε)·w
    Rms,
    /// Gemma: x·rsqrt(mean x²+ε)·(1+w)
    RmsPlusOne,
    LayerNorm,
}

#[derive(Debug, Clone)]
pub struct ArchConfig {
    pub family: Family,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub norm: NormKind,
    pub norm_eps: f64,
    pub activation: Activation,
    /// None for learned absolute positions (GPT-2)
    pub rope: Option<RopeConfig>,
    pub max_position_embeddings: usize,
    pub tie_word_embeddings: bool,
    pub attention_bias: bool,
    pub o_bias: bool,
    pub mlp_bias: bool,
    /// per layer: Some(w) when the layer attends only to the last w positions
    pub sliding_window: Vec<Option<usize>>,
    pub attn_softcap: Option<f64>,
    pub final_softcap: Option<f64>,
    /// multiplier applied to q·kᵀ
    pub attn_scale: f64,
    pub embed_scale: Option<f64>,
    pub parallel_residual: bool,
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
    pub pad_token_id: Option<u32>,
    pub torch_dtype: Option<String>,
}

struct Keys<'a> {
    map: &'a Map<String, Value>,
    path: &'a Path,
}

impl<'a> Keys<'a> {
    fn get(&self, key: &str) -> Option<&'a Value> {
        self.map.get(key).filter(|v| !v.is_null())
    }
    fn usize_opt(&self, key: &str) -> Result<Option<usize>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v.as_u64().map(|n| Some(n as usize)).ok_or_else(|| {
                Error::config(
                    self.path,
                    format!("'{key}' must be a non-negative integer, got {v}"),
                )
            }),
        }
    }
    fn usize_req(&self, keys: &[&str]) -> Result<usize> {
        for k in keys {
            if let Some(v) = self.usize_opt(k)? {
                return Ok(v);
            }
        }
        Err(Error::config(
            self.path,
            format!("missing required key '{}'", keys.join("' or '")),
        ))
    }
    fn f64_opt(&self, key: &str) -> Result<Option<f64>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v.as_f64().map(Some).ok_or_else(|| {
                Error::config(self.path, format!("'{key}' must be a number, got {v}"))
            }),
        }
    }
    fn bool_opt(&self, key: &str) -> Result<Option<bool>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v.as_bool().map(Some).ok_or_else(|| {
                Error::config(self.path, format!("'{key}' must be true or false, got {v}"))
            }),
        }
    }
    fn str_opt(&self, key: &str) -> Result<Option<&'a str>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v.as_str().map(Some).ok_or_else(|| {
                Error::config(self.path, format!("'{key}' must be a string, got {v}"))
            }),
        }
    }
    fn token_ids(&self, key: &str) -> Result<Vec<u32>> {
        match self.get(key) {
            None => Ok(vec![]),
            Some(Value::Number(n)) => Ok(n.as_u64().map(|x| vec![x as u32]).unwrap_or_default()),
            Some(Value::Array(items)) => Ok(items
                .iter()
                .filter_map(|x| x.as_u64())
                .map(|x| x as u32)
                .collect()),
            Some(v) => Err(Error::config(
                self.path,
                format!("'{key}' must be a token id or a list of ids, got {v}"),
            )),
        }
    }
}

impl ArchConfig {
    /// Read and normalise `config.json`.
    pub fn from_file(path: &Path) -> Result<Self> {
        let value: Value = crate::error::read_json(path)?;
        Self::from_value(&value, path)
    }

    pub fn from_value(value: &Value, path: &Path) -> Result<Self> {
        let map = value
            .as_object()
            .ok_or_else(|| Error::config(path, "config.json must be a JSON object"))?;
        let k = Keys { map, path };
        let model_type = k
            .str_opt("model_type")?
            .ok_or_else(|| Error::config(path, "missing required key 'model_type'"))?;
        let family = match model_type {
            "llama" => Family::Llama,
            "mistral" => Family::Mistral,
            "qwen2" => Family::Qwen2,
            "qwen3" => Family::Qwen3,
            "gemma2" => Family::Gemma2,
            "phi3" => Family::Phi3,
            "gpt_neox" => Family::GptNeox,
            "gpt2" => Family::Gpt2,
            other => {
                return Err(Error::UnknownArchitecture {
                    path: path.to_path_buf(),
                    model_type: other.to_string(),
                })
            }
        };
        let is_gpt2 = family == Family::Gpt2;
        let hidden_size = k.usize_req(&["hidden_size", "n_embd"])?;
        let num_layers = k.usize_req(&["num_hidden_layers", "n_layer"])?;
        let num_heads = k.usize_req(&["num_attention_heads", "n_head"])?;
        let vocab_size = k.usize_req(&["vocab_size"])?;
        if hidden_size == 0 || num_layers == 0 || num_heads == 0 || vocab_size == 0 {
            return Err(Error::config(
                path,
                "hidden_size, num_hidden_layers, num_attention_heads and vocab_size must be > 0",
            ));
        }
        let num_kv_heads = k.usize_opt("num_key_value_heads")?.unwrap_or(num_heads);
        if num_kv_heads == 0 || num_heads % num_kv_heads != 0 {
            return Err(Error::config(
                path,
                format!("num_attention_heads ({num_heads}) must be a multiple of num_key_value_heads ({num_kv_heads})"),
            ));
        }
        let head_dim = match k.usize_opt("head_dim")? {
            Some(d) => d,
            None => {
                if hidden_size % num_heads != 0 {
                    return Err(Error::config(path, format!("hidden_size ({hidden_size}) is not divisible by num_attention_heads ({num_heads}) and no head_dim is given")));
                }
                hidden_size / num_heads
            }
        };
        let intermediate_size = if is_gpt2 {
            k.usize_opt("n_inner")?.unwrap_or(4 * hidden_size)
        } else {
            k.usize_req(&["intermediate_size"])?
        };
        let activation_name = k
            .str_opt("hidden_activation")?
            .or(k.str_opt("hidden_act")?)
            .or(k.str_opt("activation_function")?)
            .unwrap_or(match family {
                Family::Gemma2 => "gelu_pytorch_tanh",
                Family::Gpt2 => "gelu_new",
                Family::GptNeox => "gelu",
                _ => "silu",
            });
        let activation = Activation::parse(activation_name, path)?;
        let (norm, norm_eps) = match family {
            Family::Gpt2 => (
                NormKind::LayerNorm,
                k.f64_opt("layer_norm_epsilon")?.unwrap_or(1e-5),
            ),
            Family::GptNeox => (
                NormKind::LayerNorm,
                k.f64_opt("layer_norm_eps")?.unwrap_or(1e-5),
            ),
            Family::Gemma2 => (
                NormKind::RmsPlusOne,
                k.f64_opt("rms_norm_eps")?.unwrap_or(1e-6),
            ),
            _ => (NormKind::Rms, k.f64_opt("rms_norm_eps")?.unwrap_or(1e-6)),
        };
        let max_position_embeddings = k
            .usize_opt("max_position_embeddings")?
            .or(k.usize_opt("n_positions")?)
            .unwrap_or(2048);

        let rope = if is_gpt2 {
            None
        } else {
            Some(parse_rope(&k, family, head_dim, max_position_embeddings)?)
        };

        let attention_bias = match family {
            Family::Qwen2 => true,
            Family::Gpt2 => true,
            Family::GptNeox => k.bool_opt("attention_bias")?.unwrap_or(true),
            _ => k.bool_opt("attention_bias")?.unwrap_or(false),
        };
        // Qwen2 puts a bias on q/k/v but not on o_proj.
        let o_bias = match family {
            Family::Qwen2 => false,
            _ => attention_bias,
        };
        let mlp_bias = match family {
            Family::Gpt2 | Family::GptNeox => true,
            _ => k.bool_opt("mlp_bias")?.unwrap_or(false),
        };

        let sliding_window = parse_sliding_window(&k, family, num_layers)?;

        let (attn_softcap, final_softcap) = if family == Family::Gemma2 {
            (
                k.f64_opt("attn_logit_softcapping")?,
                k.f64_opt("final_logit_softcapping")?,
            )
        } else {
            (None, None)
        };
        let attn_scale = match family {
            Family::Gemma2 => {
                let s = k
                    .f64_opt("query_pre_attn_scalar")?
                    .unwrap_or(head_dim as f64);
                s.powf(-0.5)
            }
            Family::Gpt2 => {
                if k.bool_opt("scale_attn_by_inverse_layer_idx")?
                    .unwrap_or(false)
                {
                    return Err(Error::config(
                        path,
                        "scale_attn_by_inverse_layer_idx = true is not supported",
                    ));
                }
                if k.bool_opt("scale_attn_weights")?.unwrap_or(true) {
                    (head_dim as f64).powf(-0.5)
                } else {
                    1.0
                }
            }
            _ => (head_dim as f64).powf(-0.5),
        };
        let embed_scale = (family == Family::Gemma2).then(|| (hidden_size as f64).sqrt());
        let parallel_residual =
            family == Family::GptNeox && k.bool_opt("use_parallel_residual")?.unwrap_or(true);
        let tie_word_embeddings = k
            .bool_opt("tie_word_embeddings")?
            .unwrap_or(matches!(family, Family::Gemma2 | Family::Gpt2));
        let pad_token_id = k.usize_opt("pad_token_id").ok().flatten().map(|x| x as u32);
        let bos_token_id = k.usize_opt("bos_token_id").ok().flatten().map(|x| x as u32);
        let torch_dtype = k
            .str_opt("torch_dtype")?
            .or(k.str_opt("dtype")?)
            .map(str::to_string);

        Ok(ArchConfig {
            family,
            vocab_size,
            hidden_size,
            intermediate_size,
            num_layers,
            num_heads,
            num_kv_heads,
            head_dim,
            norm,
            norm_eps,
            activation,
            rope,
            max_position_embeddings,
            tie_word_embeddings,
            attention_bias,
            o_bias,
            mlp_bias,
            sliding_window,
            attn_softcap,
            final_softcap,
            attn_scale,
            embed_scale,
            parallel_residual,
            bos_token_id,
            eos_token_ids: k.token_ids("eos_token_id")?,
            pad_token_id,
            torch_dtype,
        })
    }

    pub fn kv_dim(&self) -> usize {
        self.num_kv_heads * self.head_dim
    }
    pub fn q_dim(&self) -> usize {
        self.num_heads * self.head_dim
    }
}

fn parse_rope(k: &Keys, family: Family, head_dim: usize, max_pos: usize) -> Result<RopeConfig> {
    let path = k.path;
    // transformers 5 nests everything in `rope_parameters`; older configs use top-level keys.
    let params = k.get("rope_parameters").and_then(Value::as_object);
    let scaling = k.get("rope_scaling").and_then(Value::as_object);
    let nested = |key: &str| -> Option<&Value> {
        params
            .and_then(|p| p.get(key))
            .or_else(|| scaling.and_then(|s| s.get(key)))
            .filter(|v| !v.is_null())
    };
    let nested_f64 = |key: &str| -> Result<Option<f64>> {
        match nested(key) {
            None => Ok(None),
            Some(v) => v.as_f64().map(Some).ok_or_else(|| {
                Error::config(path, format!("rope '{key}' must be a number, got {v}"))
            }),
        }
    };
    let theta = match nested_f64("rope_theta")? {
        Some(t) => t,
        None => k
            .f64_opt("rope_theta")?
            .or(k.f64_opt("rotary_emb_base")?)
            .unwrap_or(10000.0),
    };
    let partial = match nested_f64("partial_rotary_factor")? {
        Some(p) => p,
        None => k
            .f64_opt("partial_rotary_factor")?
            .or(if family == Family::GptNeox {
                k.f64_opt("rotary_pct")?
            } else {
                None
            })
            .unwrap_or(1.0),
    };
    if !(partial > 0.0 && partial <= 1.0) {
        return Err(Error::config(
            path,
            format!("partial_rotary_factor must be in (0, 1], got {partial}"),
        ));
    }
    let rotary_dim = (head_dim as f64 * partial) as usize;
    if rotary_dim == 0 || !rotary_dim.is_multiple_of(2) {
        return Err(Error::config(path, format!("rotary dimension {rotary_dim} (head_dim {head_dim} × {partial}) must be even and > 0")));
    }
    let rope_type = nested("rope_type")
        .or_else(|| nested("type"))
        .and_then(Value::as_str)
        .unwrap_or("default");
    let factor = || -> Result<f64> {
        nested_f64("factor")?
            .ok_or_else(|| Error::config(path, format!("rope_type '{rope_type}' needs a 'factor'")))
    };
    let original_max = || -> Result<usize> {
        match nested("original_max_position_embeddings").and_then(Value::as_u64) {
            Some(v) => Ok(v as usize),
            None => Ok(k
                .usize_opt("original_max_position_embeddings")?
                .unwrap_or(max_pos)),
        }
    };
    let scaling = match rope_type {
        "default" => RopeScaling::None,
        "linear" => RopeScaling::Linear { factor: factor()? },
        "dynamic" => RopeScaling::Dynamic {
            factor: factor()?,
            original_max: original_max()?,
        },
        "llama3" => RopeScaling::Llama3 {
            factor: factor()?,
            low_freq_factor: nested_f64("low_freq_factor")?.unwrap_or(1.0),
            high_freq_factor: nested_f64("high_freq_factor")?.unwrap_or(4.0),
            original_max: match nested("original_max_position_embeddings").and_then(Value::as_u64) {
                Some(v) => v as usize,
                None => {
                    return Err(Error::config(
                        path,
                        "rope_type 'llama3' needs 'original_max_position_embeddings'",
                    ))
                }
            },
        },
        other => {
            return Err(Error::config(
                path,
                format!(
                    "unsupported rope_type '{other}' (supported: default, linear, dynamic, llama3)"
                ),
            ))
        }
    };
    Ok(RopeConfig {
        theta,
        rotary_dim,
        scaling,
    })
}

fn parse_sliding_window(k: &Keys, family: Family, num_layers: usize) -> Result<Vec<Option<usize>>> {
    let window = k.usize_opt("sliding_window")?;
    let layer_types: Option<Vec<String>> = match k.get("layer_types") {
        None => None,
        Some(v) => Some(
            serde_json::from_value(v.clone())
                .map_err(|_| Error::config(k.path, "'layer_types' must be a list of strings"))?,
        ),
    };
    if let Some(types) = &layer_types {
        if types.len() != num_layers {
            return Err(Error::config(
                k.path,
                format!(
                    "'layer_types' has {} entries but num_hidden_layers is {num_layers}",
                    types.len()
                ),
            ));
        }
        return types
            .iter()
            .map(|t| match t.as_str() {
                "full_attention" => Ok(None),
                "sliding_attention" => match window {
                    Some(w) => Ok(Some(w)),
                    None => Err(Error::config(
                        k.path,
                        "layer_types names 'sliding_attention' but sliding_window is not set",
                    )),
                },
                other => Err(Error::config(
                    k.path,
                    format!("unsupported layer type '{other}'"),
                )),
            })
            .collect();
    }
    Ok(match family {
        Family::Mistral | Family::Phi3 => vec![window; num_layers],
        // Gemma 2 alternates: even layers slide, odd layers see everything.
        Family::Gemma2 => (0..num_layers)
            .map(|i| if i % 2 == 0 { window } else { None })
            .collect(),
        Family::Qwen2 | Family::Qwen3 => {
            let use_sw = k.bool_opt("use_sliding_window")?.unwrap_or(false);
            let max_window_layers = k.usize_opt("max_window_layers")?.unwrap_or(num_layers);
            (0..num_layers)
                .map(|i| {
                    if use_sw && i >= max_window_layers {
                        window
                    } else {
                        None
                    }
                })
                .collect()
        }
        _ => vec![None; num_layers],
    })
}

/// The canonical path of a model's config file.
pub fn config_path(dir: &Path) -> PathBuf {
    dir.join("config.json")
}
