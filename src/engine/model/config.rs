//! A Hugging Face `config.json` for the Llama family (Llama 2/3, Mistral without sliding window,
//! SmolLM), parsed into [`LlamaConfig`]; anything the forward pass would silently get wrong is
//! rejected with a [`ConfigError`] that names it. Also owns [`Projection`], the names of the
//! seven linear layers LoRA can target, and their shapes.

use std::path::Path;

use serde::Deserialize;

/// Why a config cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("config.json is not valid JSON for a model config: {0}")]
    Json(#[from] serde_json::Error),
    #[error("unsupported architecture {0:?}: only LlamaForCausalLM and MistralForCausalLM")]
    Architecture(String),
    #[error("unsupported feature: {0}")]
    Unsupported(String),
    #[error("inconsistent config: {0}")]
    Invalid(String),
}

/// Llama 3 style RoPE frequency scaling (`rope_type: "llama3"`).
#[derive(Clone, Debug, PartialEq)]
pub struct Llama3RopeScaling {
    pub factor: f64,
    pub low_freq_factor: f64,
    pub high_freq_factor: f64,
    pub original_max_position_embeddings: f64,
}

/// The model shape and numerics the forward pass needs.
#[derive(Clone, Debug, PartialEq)]
pub struct LlamaConfig {
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub vocab_size: usize,
    pub rms_norm_eps: f32,
    pub rope_theta: f64,
    pub rope_scaling: Option<Llama3RopeScaling>,
    pub tie_word_embeddings: bool,
    pub max_position_embeddings: usize,
    pub bos_token_id: Option<u32>,
    /// End-of-sequence ids (config.json may give one id or a list).
    pub eos_token_ids: Vec<u32>,
}

/// The linear layers of a decoder layer, by their Hugging Face module names.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Projection {
    Q,
    K,
    V,
    O,
    Gate,
    Up,
    Down,
}

impl Projection {
    /// All seven, in layer order.
    pub const ALL: [Projection; 7] = [
        Projection::Q,
        Projection::K,
        Projection::V,
        Projection::O,
        Projection::Gate,
        Projection::Up,
        Projection::Down,
    ];

    /// The module name (`q_proj`, ..., `down_proj`).
    pub fn module_name(self) -> &'static str {
        match self {
            Projection::Q => "q_proj",
            Projection::K => "k_proj",
            Projection::V => "v_proj",
            Projection::O => "o_proj",
            Projection::Gate => "gate_proj",
            Projection::Up => "up_proj",
            Projection::Down => "down_proj",
        }
    }

    /// The parent module (`self_attn` or `mlp`).
    pub fn parent(self) -> &'static str {
        match self {
            Projection::Q | Projection::K | Projection::V | Projection::O => "self_attn",
            _ => "mlp",
        }
    }

    /// Parse a module name.
    pub fn from_module_name(name: &str) -> Option<Projection> {
        Projection::ALL
            .into_iter()
            .find(|p| p.module_name() == name)
    }

    /// Index in [`Projection::ALL`].
    pub fn index(self) -> usize {
        self as usize
    }
}

/// Projections of a decoder layer that read the same input, whose adapters are applied
/// together: one SGMV shrink with the parts' A matrices stacked, one expand over the parts'
/// output columns (adjacent in the fused base output).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LoraGroup {
    Qkv,
    O,
    GateUp,
    Down,
}

/// The output widths of a LoRA group's parts, in order, held inline (a step asks for them
/// twice per group and layer).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GroupOuts {
    len: usize,
    outs: [usize; 3],
}

impl std::ops::Deref for GroupOuts {
    type Target = [usize];
    fn deref(&self) -> &[usize] {
        &self.outs[..self.len]
    }
}

impl LoraGroup {
    /// All four, in layer order.
    pub const ALL: [LoraGroup; 4] = [
        LoraGroup::Qkv,
        LoraGroup::O,
        LoraGroup::GateUp,
        LoraGroup::Down,
    ];

    /// Its projections, in the order of their output columns.
    pub fn parts(self) -> &'static [Projection] {
        match self {
            LoraGroup::Qkv => &[Projection::Q, Projection::K, Projection::V],
            LoraGroup::O => &[Projection::O],
            LoraGroup::GateUp => &[Projection::Gate, Projection::Up],
            LoraGroup::Down => &[Projection::Down],
        }
    }

    /// Index in [`LoraGroup::ALL`].
    pub fn index(self) -> usize {
        self as usize
    }
}

#[derive(Deserialize)]
#[serde(untagged)]
enum OneOrMany {
    One(u32),
    Many(Vec<u32>),
}

#[derive(Deserialize)]
struct RawRope {
    #[serde(alias = "type")]
    rope_type: Option<String>,
    rope_theta: Option<f64>,
    factor: Option<f64>,
    low_freq_factor: Option<f64>,
    high_freq_factor: Option<f64>,
    original_max_position_embeddings: Option<f64>,
}

#[derive(Deserialize)]
struct RawConfig {
    architectures: Option<Vec<String>>,
    model_type: Option<String>,
    hidden_size: usize,
    intermediate_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    num_key_value_heads: Option<usize>,
    head_dim: Option<usize>,
    vocab_size: usize,
    rms_norm_eps: Option<f64>,
    rope_theta: Option<f64>,
    rope_scaling: Option<RawRope>,
    /// transformers 5 moves `rope_theta` and the scaling into this one object.
    rope_parameters: Option<RawRope>,
    tie_word_embeddings: Option<bool>,
    max_position_embeddings: Option<usize>,
    hidden_act: Option<String>,
    attention_bias: Option<bool>,
    mlp_bias: Option<bool>,
    sliding_window: Option<serde_json::Value>,
    partial_rotary_factor: Option<f64>,
    bos_token_id: Option<OneOrMany>,
    eos_token_id: Option<OneOrMany>,
}

impl LlamaConfig {
    /// Parse `config.json` text.
    pub fn from_json(text: &str) -> Result<Self, ConfigError> {
        let raw: RawConfig = serde_json::from_str(text)?;
        let arch = raw
            .architectures
            .as_ref()
            .and_then(|a| a.first().cloned())
            .or_else(|| raw.model_type.clone())
            .unwrap_or_default();
        if !matches!(
            arch.as_str(),
            "LlamaForCausalLM" | "MistralForCausalLM" | "llama" | "mistral"
        ) {
            return Err(ConfigError::Architecture(arch));
        }
        let unsupported = |what: String| Err(ConfigError::Unsupported(what));
        if let Some(act) = raw.hidden_act.as_deref()
            && act != "silu"
        {
            return unsupported(format!("hidden_act {act:?} (only silu)"));
        }
        if raw.attention_bias == Some(true) || raw.mlp_bias == Some(true) {
            return unsupported("biases on attention or MLP projections".into());
        }
        if let Some(w) = &raw.sliding_window
            && !w.is_null()
        {
            return unsupported(format!("sliding-window attention (sliding_window = {w})"));
        }
        if let Some(f) = raw.partial_rotary_factor
            && f != 1.0
        {
            return unsupported(format!("partial_rotary_factor {f}"));
        }
        let rope = raw.rope_parameters.as_ref().or(raw.rope_scaling.as_ref());
        let rope_theta = raw
            .rope_parameters
            .as_ref()
            .and_then(|r| r.rope_theta)
            .or(raw.rope_theta)
            .unwrap_or(10000.0);
        let rope_scaling = match rope {
            None => None,
            Some(r) => match r.rope_type.as_deref().unwrap_or("default") {
                "default" => None,
                "llama3" => {
                    let get = |v: Option<f64>, name: &str| {
                        v.ok_or_else(|| {
                            ConfigError::Invalid(format!("llama3 rope scaling without {name}"))
                        })
                    };
                    Some(Llama3RopeScaling {
                        factor: get(r.factor, "factor")?,
                        low_freq_factor: get(r.low_freq_factor, "low_freq_factor")?,
                        high_freq_factor: get(r.high_freq_factor, "high_freq_factor")?,
                        original_max_position_embeddings: get(
                            r.original_max_position_embeddings,
                            "original_max_position_embeddings",
                        )?,
                    })
                }
                other => return unsupported(format!("rope scaling type {other:?}")),
            },
        };
        let heads = raw.num_attention_heads;
        let kv_heads = raw.num_key_value_heads.unwrap_or(heads);
        if heads == 0 || kv_heads == 0 || !heads.is_multiple_of(kv_heads) {
            return Err(ConfigError::Invalid(format!(
                "{heads} attention heads cannot be grouped over {kv_heads} key/value heads"
            )));
        }
        let head_dim = match raw.head_dim {
            Some(d) => d,
            None if raw.hidden_size.is_multiple_of(heads) => raw.hidden_size / heads,
            None => {
                return Err(ConfigError::Invalid(format!(
                    "hidden_size {} is not a multiple of {heads} heads",
                    raw.hidden_size
                )));
            }
        };
        if head_dim == 0 || !head_dim.is_multiple_of(2) {
            return Err(ConfigError::Invalid(format!(
                "head_dim {head_dim} must be even"
            )));
        }
        if raw.hidden_size == 0
            || raw.intermediate_size == 0
            || raw.num_hidden_layers == 0
            || raw.vocab_size == 0
        {
            return Err(ConfigError::Invalid(
                "hidden_size, intermediate_size, num_hidden_layers and vocab_size must be positive"
                    .into(),
            ));
        }
        let ids = |v: Option<OneOrMany>| match v {
            None => vec![],
            Some(OneOrMany::One(i)) => vec![i],
            Some(OneOrMany::Many(v)) => v,
        };
        Ok(LlamaConfig {
            hidden_size: raw.hidden_size,
            intermediate_size: raw.intermediate_size,
            num_hidden_layers: raw.num_hidden_layers,
            num_attention_heads: heads,
            num_key_value_heads: kv_heads,
            head_dim,
            vocab_size: raw.vocab_size,
            rms_norm_eps: raw.rms_norm_eps.unwrap_or(1e-6) as f32,
            rope_theta,
            rope_scaling,
            tie_word_embeddings: raw.tie_word_embeddings.unwrap_or(false),
            max_position_embeddings: raw.max_position_embeddings.unwrap_or(2048),
            bos_token_id: ids(raw.bos_token_id).first().copied(),
            eos_token_ids: ids(raw.eos_token_id),
        })
    }

    /// Read and parse a `config.json` file.
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Io {
            path: path.display().to_string(),
            source,
        })?;
        Self::from_json(&text)
    }

    /// The shapes of a named synthetic model: `llama-7b` and `llama-13b` are Llama-2's (vocab
    /// 32000, MHA, 4096 positions), as used by ANCHORS.md and the Punica paper.
    pub fn synthetic(name: &str) -> Option<Self> {
        let (hidden, inter, layers, heads) = match name {
            "llama-7b" => (4096, 11008, 32, 32),
            "llama-13b" => (5120, 13824, 40, 40),
            _ => return None,
        };
        Some(LlamaConfig {
            hidden_size: hidden,
            intermediate_size: inter,
            num_hidden_layers: layers,
            num_attention_heads: heads,
            num_key_value_heads: heads,
            head_dim: hidden / heads,
            vocab_size: 32000,
            rms_norm_eps: 1e-5,
            rope_theta: 10000.0,
            rope_scaling: None,
            tie_word_embeddings: false,
            max_position_embeddings: 4096,
            bos_token_id: Some(1),
            eos_token_ids: vec![2],
        })
    }

    /// Width of the query projection output (`heads * head_dim`).
    pub fn q_dim(&self) -> usize {
        self.num_attention_heads * self.head_dim
    }

    /// Width of the key (and value) projection output.
    pub fn kv_dim(&self) -> usize {
        self.num_key_value_heads * self.head_dim
    }

    /// `(in, out of each part)` of a LoRA group.
    pub fn group_dims(&self, g: LoraGroup) -> (usize, GroupOuts) {
        let parts = g.parts();
        let h_in = self.projection_dims(parts[0]).0;
        let mut outs = GroupOuts {
            len: parts.len(),
            outs: [0; 3],
        };
        for (o, &p) in outs.outs.iter_mut().zip(parts) {
            *o = self.projection_dims(p).1;
        }
        (h_in, outs)
    }

    /// `(in_features, out_features)` of a projection.
    pub fn projection_dims(&self, p: Projection) -> (usize, usize) {
        let (h, i) = (self.hidden_size, self.intermediate_size);
        match p {
            Projection::Q => (h, self.q_dim()),
            Projection::K | Projection::V => (h, self.kv_dim()),
            Projection::O => (self.q_dim(), h),
            Projection::Gate | Projection::Up => (h, i),
            Projection::Down => (i, h),
        }
    }

    /// RoPE inverse frequencies `[head_dim / 2]`, with the llama3 scaling applied. Computed in f32
    /// like Hugging Face, so positions rotate by bit-identical angles.
    pub fn inv_freq(&self) -> Vec<f32> {
        let dim = self.head_dim;
        let base = self.rope_theta as f32;
        let plain = (0..dim / 2).map(|i| 1.0 / base.powf((2 * i) as f32 / dim as f32));
        let Some(s) = &self.rope_scaling else {
            return plain.collect();
        };
        let low_wavelen = s.original_max_position_embeddings / s.low_freq_factor;
        let high_wavelen = s.original_max_position_embeddings / s.high_freq_factor;
        plain
            .map(|f| {
                let f = f as f64;
                let wavelen = 2.0 * std::f64::consts::PI / f;
                let scaled = if wavelen > low_wavelen {
                    f / s.factor
                } else {
                    f
                };
                let medium = wavelen >= high_wavelen && wavelen <= low_wavelen;
                if medium {
                    let smooth = (s.original_max_position_embeddings / wavelen - s.low_freq_factor)
                        / (s.high_freq_factor - s.low_freq_factor);
                    ((1.0 - smooth) * scaled / s.factor + smooth * scaled) as f32
                } else {
                    scaled as f32
                }
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SMOLLM: &str = r#"{
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30,
        "num_attention_heads": 9, "num_key_value_heads": 3, "vocab_size": 49152,
        "rms_norm_eps": 1e-5, "rope_theta": 100000.0, "tie_word_embeddings": true,
        "max_position_embeddings": 8192, "hidden_act": "silu", "bos_token_id": 1,
        "eos_token_id": 2, "rope_scaling": null, "torch_dtype": "bfloat16"
    }"#;

    #[test]
    fn a_smollm_config_parses_with_grouped_query_attention_and_tied_embeddings() {
        let c = LlamaConfig::from_json(SMOLLM).unwrap();
        assert_eq!((c.head_dim, c.q_dim(), c.kv_dim()), (64, 576, 192));
        assert!(c.tie_word_embeddings);
        assert_eq!(c.eos_token_ids, vec![2]);
        assert_eq!(c.projection_dims(Projection::Down), (1536, 576));
        assert_eq!(c.projection_dims(Projection::K), (576, 192));
        let f = c.inv_freq();
        assert_eq!(f.len(), 32);
        assert_eq!(f[0], 1.0);
        assert!((f[31] - 1.0 / 100000f32.powf(62.0 / 64.0)).abs() < 1e-12);
    }

    #[test]
    fn transformers_5_rope_parameters_are_read() {
        let text = SMOLLM.replace(
            r#""rope_scaling": null"#,
            r#""rope_parameters": {"rope_type": "default", "rope_theta": 5000.0}"#,
        );
        assert_eq!(LlamaConfig::from_json(&text).unwrap().rope_theta, 5000.0);
    }

    #[test]
    fn llama3_rope_scaling_divides_low_frequencies_and_keeps_high_ones() {
        let text = SMOLLM.replace(
            r#""rope_scaling": null"#,
            r#""rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}"#,
        );
        let c = LlamaConfig::from_json(&text).unwrap();
        let plain = LlamaConfig::from_json(SMOLLM).unwrap().inv_freq();
        let scaled = c.inv_freq();
        assert_eq!(scaled[0], plain[0]);
        assert!((scaled[31] - plain[31] / 8.0).abs() < 1e-12);
    }

    #[test]
    fn other_architectures_and_features_are_rejected_by_name() {
        let gpt = SMOLLM.replace("LlamaForCausalLM", "GPT2LMHeadModel");
        assert!(matches!(
            LlamaConfig::from_json(&gpt),
            Err(ConfigError::Architecture(a)) if a == "GPT2LMHeadModel"
        ));
        let sliding = SMOLLM.replace(r#""rope_scaling": null"#, r#""sliding_window": 4096"#);
        let err = LlamaConfig::from_json(&sliding).unwrap_err();
        assert!(err.to_string().contains("sliding_window = 4096"), "{err}");
        let yarn = SMOLLM.replace(
            r#""rope_scaling": null"#,
            r#""rope_scaling": {"type": "yarn", "factor": 4.0}"#,
        );
        let err = LlamaConfig::from_json(&yarn).unwrap_err();
        assert!(err.to_string().contains("\"yarn\""), "{err}");
        let gqa = SMOLLM.replace(r#""num_key_value_heads": 3"#, r#""num_key_value_heads": 4"#);
        let err = LlamaConfig::from_json(&gqa).unwrap_err();
        assert!(err.to_string().contains("9 attention heads"), "{err}");
        assert!(matches!(
            LlamaConfig::from_json("{"),
            Err(ConfigError::Json(_))
        ));
    }
}
