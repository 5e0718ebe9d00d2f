//! PEFT LoRA adapters: `adapter_config.json` + `adapter_model.safetensors` -> validated
//! [`LoraWeights`] for a given base model.
//!
//! What PEFT would compute is reproduced exactly: the targeted modules follow PEFT's matching
//! rules (`target_modules` as a list of name suffixes or a full-match regex, `layers_to_transform`),
//! per-module rank and alpha come from `rank_pattern` / `alpha_pattern`, and the scale
//! (`alpha / r`, or `alpha / sqrt(r)` with `use_rslora`) is folded into `B` once, here. Anything
//! PEFT would apply that the engine cannot (DoRA, `modules_to_save`, biases, embedding LoRA) is an
//! error naming it, never silently ignored.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::Path;

use bytes::Bytes;
use regex::Regex;
use safetensors::SafeTensors;
use serde::Deserialize;

use crate::engine::backend::{DType, HostTensor, par_map};
use crate::engine::model::config::{LlamaConfig, Projection};
use crate::engine::model::weights::dtype_of;

/// Largest safetensors header accepted for an adapter. A 70B-shaped adapter on all seven
/// projections has about 1,100 tensors, well under 1 MiB of header.
pub const MAX_HEADER_BYTES: u64 = 8 << 20;

/// Why an adapter is rejected.
#[derive(Debug, thiserror::Error)]
pub enum PeftError {
    #[error("cannot read {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("adapter_config.json is invalid: {0}")]
    Config(String),
    #[error("adapter safetensors file is truncated: {len} bytes, its header needs {needed}")]
    Truncated { len: u64, needed: u64 },
    #[error("adapter safetensors header is {len} bytes, more than the limit of {max}")]
    HeaderTooLarge { len: u64, max: u64 },
    #[error("adapter safetensors header is invalid: {0}")]
    Header(String),
    #[error("unsupported adapter: {0}")]
    Unsupported(String),
    #[error("target module {0:?} matches no q/k/v/o/gate/up/down projection of the base model")]
    UnknownTargetModule(String),
    #[error("invalid pattern {pattern:?}: {reason}")]
    Pattern { pattern: String, reason: String },
    #[error("tensor {0} does not name a LoRA matrix of a base-model projection")]
    UnknownTensor(String),
    #[error("tensor {name} is for layer {layer}, the base model has {layers} layers")]
    LayerOutOfRange {
        name: String,
        layer: usize,
        layers: usize,
    },
    #[error("tensor {0} is for a module that target_modules does not select")]
    Untargeted(String),
    #[error("adapter has no {0} for a targeted module")]
    MissingTensor(String),
    #[error("tensor {name} has dtype {dtype}; only F32, F16 and BF16 are supported")]
    Dtype { name: String, dtype: String },
    #[error("tensor {name} has shape {got:?}, expected {expected:?}")]
    Shape {
        name: String,
        expected: Vec<usize>,
        got: Vec<usize>,
    },
    #[error("tensor {name} has rank {got}, the adapter config gives r = {expected}")]
    Rank {
        name: String,
        expected: usize,
        got: usize,
    },
    #[error("tensor {name} holds a non-finite value ({value}) at index {index}")]
    NonFinite {
        name: String,
        index: usize,
        value: f32,
    },
    #[error("adapter has no LoRA tensors")]
    Empty,
}

type Result<T, E = PeftError> = std::result::Result<T, E>;

#[derive(Deserialize)]
#[serde(untagged)]
enum RawTargets {
    Regex(String),
    List(Vec<String>),
}

#[derive(Deserialize)]
#[serde(untagged)]
enum RawLayers {
    One(usize),
    List(Vec<usize>),
}

#[derive(Deserialize)]
struct RawAdapterConfig {
    peft_type: Option<String>,
    r: Option<usize>,
    lora_alpha: Option<f64>,
    target_modules: Option<RawTargets>,
    #[serde(default)]
    rank_pattern: Option<BTreeMap<String, usize>>,
    #[serde(default)]
    alpha_pattern: Option<BTreeMap<String, f64>>,
    #[serde(default)]
    use_rslora: bool,
    #[serde(default)]
    fan_in_fan_out: bool,
    bias: Option<String>,
    modules_to_save: Option<Vec<String>>,
    #[serde(default)]
    use_dora: bool,
    #[serde(default)]
    lora_bias: bool,
    layers_to_transform: Option<RawLayers>,
    layers_pattern: Option<serde_json::Value>,
    exclude_modules: Option<serde_json::Value>,
    base_model_name_or_path: Option<String>,
    /// Everything else; a few keys name features the engine cannot apply.
    #[serde(flatten)]
    rest: BTreeMap<String, serde_json::Value>,
}

/// Config keys of PEFT features that change what the adapter computes, beyond plain LoRA on
/// linear layers: rejected when set.
const UNSUPPORTED_KEYS: [&str; 4] = [
    "layer_replication",
    "target_parameters",
    "trainable_token_indices",
    "alora_invocation_tokens",
];

/// Which modules `target_modules` selects.
#[derive(Clone, Debug, PartialEq)]
pub enum TargetModules {
    /// Module names or key suffixes (`q_proj`, `self_attn.q_proj`, ...).
    Names(Vec<String>),
    /// A regex that must match the whole module key (`model.layers.0.self_attn.q_proj`).
    Regex(String),
    /// PEFT's `all-linear`: every projection (never `lm_head`).
    AllLinear,
}

/// A parsed, checked `adapter_config.json`.
#[derive(Clone, Debug, PartialEq)]
pub struct AdapterConfig {
    pub r: usize,
    pub lora_alpha: f64,
    pub target_modules: TargetModules,
    pub rank_pattern: BTreeMap<String, usize>,
    pub alpha_pattern: BTreeMap<String, f64>,
    pub use_rslora: bool,
    /// Only meaningful for GPT-2 style Conv1D layers; PEFT itself resets it for the `nn.Linear`
    /// projections of Llama models, and so do we.
    pub fan_in_fan_out: bool,
    pub layers_to_transform: Option<Vec<usize>>,
    pub base_model_name_or_path: Option<String>,
}

fn config_err(msg: impl Into<String>) -> PeftError {
    PeftError::Config(msg.into())
}

impl AdapterConfig {
    /// Parse and check `adapter_config.json`; features the engine cannot apply are rejected.
    pub fn from_json(bytes: &[u8]) -> Result<Self> {
        let raw: RawAdapterConfig =
            serde_json::from_slice(bytes).map_err(|e| config_err(e.to_string()))?;
        if let Some(t) = &raw.peft_type
            && t != "LORA"
        {
            return Err(PeftError::Unsupported(format!(
                "peft_type {t:?} (only LORA)"
            )));
        }
        if raw.use_dora {
            return Err(PeftError::Unsupported("DoRA (use_dora = true)".into()));
        }
        if let Some(m) = raw.modules_to_save.as_ref().filter(|m| !m.is_empty()) {
            return Err(PeftError::Unsupported(format!(
                "modules_to_save {m:?} (fully trained copies of base modules)"
            )));
        }
        match raw.bias.as_deref() {
            None | Some("none") => {}
            Some(b) => {
                return Err(PeftError::Unsupported(format!(
                    "bias = {b:?} (only \"none\")"
                )));
            }
        }
        if raw.lora_bias {
            return Err(PeftError::Unsupported("lora_bias = true".into()));
        }
        if raw.exclude_modules.as_ref().is_some_and(|v| !v.is_null()) {
            return Err(PeftError::Unsupported("exclude_modules".into()));
        }
        if raw.layers_pattern.as_ref().is_some_and(|v| !v.is_null()) {
            return Err(PeftError::Unsupported("layers_pattern".into()));
        }
        for key in UNSUPPORTED_KEYS {
            if let Some(v) = raw.rest.get(key).filter(|v| !v.is_null()) {
                return Err(PeftError::Unsupported(format!("{key} = {v}")));
            }
        }
        let r = raw.r.unwrap_or(8);
        if r == 0 {
            return Err(config_err("r must be at least 1"));
        }
        let rank_pattern = raw.rank_pattern.unwrap_or_default();
        if let Some((k, _)) = rank_pattern.iter().find(|&(_, &v)| v == 0) {
            return Err(config_err(format!("rank_pattern {k:?} gives rank 0")));
        }
        let lora_alpha = raw.lora_alpha.unwrap_or(8.0);
        let alpha_pattern = raw.alpha_pattern.unwrap_or_default();
        if !lora_alpha.is_finite() || alpha_pattern.values().any(|a| !a.is_finite()) {
            return Err(config_err("lora_alpha must be finite"));
        }
        let target_modules = match raw.target_modules {
            // PEFT's default for Llama models.
            None => TargetModules::Names(vec!["q_proj".into(), "v_proj".into()]),
            Some(RawTargets::Regex(s)) if s == "all-linear" => TargetModules::AllLinear,
            Some(RawTargets::Regex(s)) => TargetModules::Regex(s),
            Some(RawTargets::List(v)) if v.is_empty() => {
                return Err(config_err("target_modules is empty"));
            }
            Some(RawTargets::List(v)) => TargetModules::Names(v),
        };
        if raw.fan_in_fan_out {
            tracing::warn!(
                "adapter sets fan_in_fan_out for nn.Linear projections; ignored as PEFT does"
            );
        }
        Ok(AdapterConfig {
            r,
            lora_alpha,
            target_modules,
            rank_pattern,
            alpha_pattern,
            use_rslora: raw.use_rslora,
            fan_in_fan_out: raw.fan_in_fan_out,
            layers_to_transform: raw.layers_to_transform.map(|l| match l {
                RawLayers::One(i) => vec![i],
                RawLayers::List(v) => v,
            }),
            base_model_name_or_path: raw.base_model_name_or_path,
        })
    }

    /// Rank, alpha and scale of the module with this key, per `rank_pattern` / `alpha_pattern`.
    pub fn rank_alpha_scale(&self, key: &str) -> Result<(usize, f64, f32)> {
        let r = match pattern_value(&self.rank_pattern, key)? {
            Some(&r) => r,
            None => self.r,
        };
        let alpha = match pattern_value(&self.alpha_pattern, key)? {
            Some(&a) => a,
            None => self.lora_alpha,
        };
        let scale = if self.use_rslora {
            alpha / (r as f64).sqrt()
        } else {
            alpha / r as f64
        };
        Ok((r, alpha, scale as f32))
    }

    /// The (layer, projection) pairs this config targets in `base`.
    pub fn targets(&self, base: &LlamaConfig) -> Result<BTreeSet<(usize, Projection)>> {
        let keys: Vec<(String, usize, Projection)> = (0..base.num_hidden_layers)
            .flat_map(|l| {
                Projection::ALL
                    .into_iter()
                    .map(move |p| (module_key(l, p), l, p))
            })
            .collect();
        let embeddings = ["model.embed_tokens", "lm_head"];
        let mut out = BTreeSet::new();
        match &self.target_modules {
            TargetModules::AllLinear => {
                out.extend(keys.iter().map(|(_, l, p)| (*l, *p)));
            }
            TargetModules::Regex(pattern) => {
                let re = full_regex(pattern)?;
                if let Some(e) = embeddings.iter().find(|e| re.is_match(e)) {
                    return Err(PeftError::Unsupported(format!(
                        "LoRA on the embedding or output layer ({e})"
                    )));
                }
                out.extend(
                    keys.iter()
                        .filter(|(k, _, _)| re.is_match(k))
                        .map(|(_, l, p)| (*l, *p)),
                );
                if out.is_empty() {
                    return Err(PeftError::UnknownTargetModule(pattern.clone()));
                }
            }
            TargetModules::Names(names) => {
                let selects = |key: &str, t: &str| key == t || key.ends_with(&format!(".{t}"));
                for t in names {
                    if embeddings.iter().any(|e| selects(e, t)) {
                        return Err(PeftError::Unsupported(format!(
                            "LoRA on the embedding or output layer ({t})"
                        )));
                    }
                    let mut matched = false;
                    for (k, l, p) in &keys {
                        if !selects(k, t) {
                            continue;
                        }
                        matched = true;
                        // PEFT applies layers_to_transform to suffix matches only.
                        let layer_ok = k == t
                            || self
                                .layers_to_transform
                                .as_ref()
                                .is_none_or(|ls| ls.is_empty() || ls.contains(l));
                        if layer_ok {
                            out.insert((*l, *p));
                        }
                    }
                    if !matched {
                        return Err(PeftError::UnknownTargetModule(t.clone()));
                    }
                }
            }
        }
        Ok(out)
    }
}

/// PEFT's `get_pattern_key`: the first pattern `k` (in key order) with
/// `re.match(rf"(.*\.)?({k})$", key)`.
fn pattern_value<'a, V>(patterns: &'a BTreeMap<String, V>, key: &str) -> Result<Option<&'a V>> {
    for (pattern, value) in patterns {
        let re =
            Regex::new(&format!(r"^(?:.*\.)?(?:{pattern})$")).map_err(|e| PeftError::Pattern {
                pattern: pattern.clone(),
                reason: e.to_string(),
            })?;
        if re.is_match(key) {
            return Ok(Some(value));
        }
    }
    Ok(None)
}

fn full_regex(pattern: &str) -> Result<Regex> {
    Regex::new(&format!("^(?:{pattern})$")).map_err(|e| PeftError::Pattern {
        pattern: pattern.to_string(),
        reason: e.to_string(),
    })
}

/// The base-model module key of a projection, as PEFT names it.
pub fn module_key(layer: usize, p: Projection) -> String {
    format!("model.layers.{layer}.{}.{}", p.parent(), p.module_name())
}

/// One projection's LoRA pair: `a: [rank, in]`, `b: [out, rank]` with the scale folded in.
#[derive(Clone, Debug, PartialEq)]
pub struct LoraMatrices {
    pub rank: usize,
    pub a: LoraTensor,
    pub b: LoraTensor,
}

/// One validated matrix of an adapter as its file stores it: a view of the file's bytes (no
/// copy), its dtype, and the scale its values take once converted (lora_B's is the adapter's
/// alpha over rank). Staging converts it once, straight into the staging buffer.
#[derive(Clone, Debug, PartialEq)]
pub struct LoraTensor {
    bytes: Bytes,
    dtype: DType,
    scale: f32,
}

impl LoraTensor {
    /// The values as the backends stage them.
    pub fn host(&self) -> HostTensor<'_> {
        HostTensor::new(&self.bytes, self.dtype, self.scale)
    }

    /// Number of values.
    pub fn len(&self) -> usize {
        self.host().len()
    }

    /// Whether it holds no value.
    pub fn is_empty(&self) -> bool {
        self.host().is_empty()
    }

    /// The values in f32, scaled.
    pub fn to_f32(&self) -> Vec<f32> {
        self.host().to_f32()
    }
}

/// A tensor read from the adapter file: name, shape, values.
type FoundTensor = (String, Vec<usize>, LoraTensor);

/// A validated adapter for one base model: per layer, per [`Projection`] (index
/// [`Projection::index`]), the LoRA pair if targeted.
#[derive(Clone, Debug, PartialEq)]
pub struct LoraWeights {
    layers: Vec<[Option<LoraMatrices>; 7]>,
    config: AdapterConfig,
}

impl LoraWeights {
    /// Validate an adapter given its two files' contents (the weights are copied once; see
    /// [`Self::from_shared`]).
    pub fn from_bytes(config_json: &[u8], safetensors: &[u8], base: &LlamaConfig) -> Result<Self> {
        Self::from_shared(config_json, &Bytes::copy_from_slice(safetensors), base)
    }

    /// Validate an adapter whose weights file is shared bytes: its matrices stay views of them.
    pub fn from_shared(
        config_json: &[u8],
        safetensors: &Bytes,
        base: &LlamaConfig,
    ) -> Result<Self> {
        let config = AdapterConfig::from_json(config_json)?;
        let targets = config.targets(base)?;
        let tensors = parse_safetensors(safetensors)?;
        let mut named = Vec::new();
        for (name, view) in tensors.iter() {
            let (layer, proj, which) = classify(name, base.num_hidden_layers)?;
            if !targets.contains(&(layer, proj)) {
                return Err(PeftError::Untargeted(name.to_string()));
            }
            let dtype = dtype_of(view.dtype()).ok_or_else(|| PeftError::Dtype {
                name: name.to_string(),
                dtype: format!("{:?}", view.dtype()),
            })?;
            // lora_B carries the adapter's scale, applied when it is converted.
            let scale = if which == 1 {
                config.rank_alpha_scale(&module_key(layer, proj))?.2
            } else {
                1.0
            };
            named.push((name, (layer, proj, which), dtype, scale, view));
        }
        // The finiteness check reads every value: tensors on several threads, the first
        // failure in file order reported.
        let widened = par_map(
            named,
            |(_, _, _, _, view)| view.data().len(),
            |(name, at, dtype, scale, view)| {
                // safetensors checked that the data is the shape's whole values.
                let host = HostTensor::new(view.data(), dtype, scale);
                if let Some((index, value)) = host.first_non_finite() {
                    return Err(PeftError::NonFinite {
                        name: name.to_string(),
                        index,
                        value,
                    });
                }
                let values = LoraTensor {
                    bytes: safetensors.slice_ref(view.data()),
                    dtype,
                    scale,
                };
                Ok((name, at, view.shape().to_vec(), values))
            },
        );
        let mut found: HashMap<(usize, Projection), [Option<FoundTensor>; 2]> = HashMap::new();
        for w in widened {
            let (name, (layer, proj, which), shape, values) = w?;
            found.entry((layer, proj)).or_default()[which] =
                Some((name.to_string(), shape, values));
        }
        if found.is_empty() {
            return Err(PeftError::Empty);
        }
        let mut layers: Vec<[Option<LoraMatrices>; 7]> = (0..base.num_hidden_layers)
            .map(|_| Default::default())
            .collect();
        for &(layer, proj) in &targets {
            let key = module_key(layer, proj);
            let [a, b] = found.remove(&(layer, proj)).unwrap_or_default();
            let (a_name, a_shape, a) =
                a.ok_or_else(|| PeftError::MissingTensor(format!("{key}.lora_A.weight")))?;
            let (b_name, b_shape, b) =
                b.ok_or_else(|| PeftError::MissingTensor(format!("{key}.lora_B.weight")))?;
            let (r, _, _) = config.rank_alpha_scale(&key)?;
            let (h_in, h_out) = base.projection_dims(proj);
            if a_shape.len() == 2 && a_shape[1] == h_in && a_shape[0] != r {
                return Err(PeftError::Rank {
                    name: a_name,
                    expected: r,
                    got: a_shape[0],
                });
            }
            if a_shape != [r, h_in] {
                return Err(PeftError::Shape {
                    name: a_name,
                    expected: vec![r, h_in],
                    got: a_shape,
                });
            }
            if b_shape != [h_out, r] {
                return Err(PeftError::Shape {
                    name: b_name,
                    expected: vec![h_out, r],
                    got: b_shape,
                });
            }
            layers[layer][proj.index()] = Some(LoraMatrices { rank: r, a, b });
        }
        Ok(LoraWeights { layers, config })
    }

    /// Read and validate `adapter_config.json` and `adapter_model.safetensors` from a folder.
    pub fn from_dir(dir: &Path, base: &LlamaConfig) -> Result<Self> {
        let read = |name: &str| {
            let path = dir.join(name);
            std::fs::read(&path).map_err(|source| PeftError::Io {
                path: path.display().to_string(),
                source,
            })
        };
        Self::from_bytes(
            &read("adapter_config.json")?,
            &read("adapter_model.safetensors")?,
            base,
        )
    }

    /// Layers of the base model this adapter was validated against.
    pub fn num_layers(&self) -> usize {
        self.layers.len()
    }

    /// The pair for one (layer, projection), if targeted.
    pub fn get(&self, layer: usize, p: Projection) -> Option<&LoraMatrices> {
        self.layers.get(layer)?[p.index()].as_ref()
    }

    /// Largest rank over all modules.
    pub fn max_rank(&self) -> usize {
        self.layers
            .iter()
            .flatten()
            .flatten()
            .map(|m| m.rank)
            .max()
            .unwrap_or(0)
    }

    /// Total f32 values in all A and B matrices.
    pub fn num_params(&self) -> usize {
        self.layers
            .iter()
            .flatten()
            .flatten()
            .map(|m| m.a.len() + m.b.len())
            .sum()
    }

    /// The projections targeted in at least one layer.
    pub fn projections(&self) -> BTreeSet<Projection> {
        Projection::ALL
            .into_iter()
            .filter(|p| self.layers.iter().any(|l| l[p.index()].is_some()))
            .collect()
    }

    /// The parsed adapter config.
    pub fn config(&self) -> &AdapterConfig {
        &self.config
    }
}

/// Parse an adapter safetensors buffer, reporting truncation and oversized headers with numbers.
fn parse_safetensors(bytes: &[u8]) -> Result<SafeTensors<'_>> {
    let len = bytes.len() as u64;
    let Some(prefix) = bytes.get(..8) else {
        return Err(PeftError::Truncated { len, needed: 8 });
    };
    let mut n = [0u8; 8];
    n.copy_from_slice(prefix);
    let header_len = u64::from_le_bytes(n);
    if header_len > MAX_HEADER_BYTES {
        return Err(PeftError::HeaderTooLarge {
            len: header_len,
            max: MAX_HEADER_BYTES,
        });
    }
    let header_end = 8 + header_len;
    if header_end > len {
        return Err(PeftError::Truncated {
            len,
            needed: header_end,
        });
    }
    let header: serde_json::Value = serde_json::from_slice(&bytes[8..header_end as usize])
        .map_err(|e| PeftError::Header(e.to_string()))?;
    let data_end = header
        .as_object()
        .into_iter()
        .flatten()
        .filter_map(|(_, v)| v.get("data_offsets")?.get(1)?.as_u64())
        .max()
        .unwrap_or(0);
    let needed = header_end.saturating_add(data_end);
    if needed > len {
        return Err(PeftError::Truncated { len, needed });
    }
    SafeTensors::deserialize(bytes).map_err(|e| PeftError::Header(e.to_string()))
}

/// `base_model.model.<key>.lora_{A,B}[.<adapter>].weight` -> (layer, projection, 0 for A / 1 for B).
fn classify(name: &str, layers: usize) -> Result<(usize, Projection, usize)> {
    let unknown = || PeftError::UnknownTensor(name.to_string());
    let unsupported = |what: &str| Err(PeftError::Unsupported(format!("{what} ({name})")));
    if name.contains("lora_magnitude_vector") {
        return unsupported("DoRA magnitude vectors");
    }
    if name.contains("lora_embedding_") || name.contains("embed_tokens") || name.contains("lm_head")
    {
        return unsupported("LoRA on the embedding or output layer");
    }
    if name.ends_with(".bias") {
        return unsupported("LoRA biases");
    }
    let rest = name.strip_prefix("base_model.model.").ok_or_else(unknown)?;
    let rest = rest.strip_suffix(".weight").ok_or_else(unknown)?;
    let parts: Vec<&str> = rest.split('.').collect();
    // model . layers . <i> . <parent> . <proj> . lora_X [. adapter]
    if !(parts.len() == 6 || parts.len() == 7) || parts[0] != "model" || parts[1] != "layers" {
        return Err(unknown());
    }
    let layer: usize = parts[2].parse().map_err(|_| unknown())?;
    let proj = Projection::from_module_name(parts[4]).ok_or_else(unknown)?;
    if parts[3] != proj.parent() {
        return Err(unknown());
    }
    let which = match parts[5] {
        "lora_A" => 0,
        "lora_B" => 1,
        _ => return Err(unknown()),
    };
    if layer >= layers {
        return Err(PeftError::LayerOutOfRange {
            name: name.to_string(),
            layer,
            layers,
        });
    }
    Ok((layer, proj, which))
}

#[cfg(test)]
mod tests {
    use super::*;
    use safetensors::tensor::{Dtype, TensorView};

    fn base() -> LlamaConfig {
        LlamaConfig::from_json(
            r#"{"architectures": ["LlamaForCausalLM"], "hidden_size": 16,
                "intermediate_size": 24, "num_hidden_layers": 2, "num_attention_heads": 4,
                "num_key_value_heads": 2, "vocab_size": 32}"#,
        )
        .unwrap()
    }

    fn name(layer: usize, p: Projection, ab: &str) -> String {
        format!("base_model.model.{}.{ab}.weight", module_key(layer, p))
    }

    /// An adapter file with rank `r` on `projs` of every layer; values `fill` everywhere.
    fn adapter(projs: &[Projection], r: usize, fill: f32) -> Vec<u8> {
        let base = base();
        let mut tensors: Vec<(String, Vec<usize>, Vec<u8>)> = vec![];
        for l in 0..2 {
            for &p in projs {
                let (i, o) = base.projection_dims(p);
                for (ab, shape) in [("lora_A", vec![r, i]), ("lora_B", vec![o, r])] {
                    let n: usize = shape.iter().product();
                    let bytes = (0..n).flat_map(|_| fill.to_le_bytes()).collect();
                    tensors.push((name(l, p, ab), shape, bytes));
                }
            }
        }
        let views: Vec<(String, TensorView<'_>)> = tensors
            .iter()
            .map(|(n, s, b)| {
                (
                    n.clone(),
                    TensorView::new(Dtype::F32, s.clone(), b).unwrap(),
                )
            })
            .collect();
        safetensors::serialize(views, None).unwrap()
    }

    const QV: &str = r#"{"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"], "bias": "none"}"#;

    #[test]
    fn a_valid_adapter_folds_alpha_over_r_into_b_once() {
        let w = LoraWeights::from_bytes(
            QV.as_bytes(),
            &adapter(&[Projection::Q, Projection::V], 4, 0.5),
            &base(),
        )
        .unwrap();
        let q = w.get(1, Projection::Q).unwrap();
        assert_eq!((q.rank, q.a.to_f32()[0], q.b.to_f32()[0]), (4, 0.5, 1.0));
        assert!(w.get(0, Projection::K).is_none());
        assert_eq!(w.max_rank(), 4);
        assert_eq!(
            w.projections().into_iter().collect::<Vec<_>>(),
            vec![Projection::Q, Projection::V]
        );
    }

    #[test]
    fn rslora_and_rank_and_alpha_patterns_follow_peft() {
        let cfg = AdapterConfig::from_json(
            br#"{"r": 4, "lora_alpha": 8, "use_rslora": true, "target_modules": "all-linear",
                "rank_pattern": {"layers.1.self_attn.q_proj": 16}, "alpha_pattern": {"v_proj": 2}}"#,
        )
        .unwrap();
        let (r, a, s) = cfg
            .rank_alpha_scale("model.layers.1.self_attn.q_proj")
            .unwrap();
        assert_eq!((r, a, s), (16, 8.0, 2.0));
        let (r, a, s) = cfg
            .rank_alpha_scale("model.layers.0.self_attn.q_proj")
            .unwrap();
        assert_eq!((r, a, s), (4, 8.0, 4.0));
        let (r, a, s) = cfg
            .rank_alpha_scale("model.layers.0.self_attn.v_proj")
            .unwrap();
        assert_eq!((r, a, s), (4, 2.0, 1.0));
        assert_eq!(cfg.targets(&base()).unwrap().len(), 14);
    }

    #[test]
    fn regex_targets_and_layers_to_transform_select_modules_like_peft() {
        let cfg = AdapterConfig::from_json(
            br#"{"r": 2, "target_modules": "model\\.layers\\.1\\.(self_attn\\.(q|k)_proj|mlp\\.down_proj)"}"#,
        )
        .unwrap();
        let t: Vec<_> = cfg.targets(&base()).unwrap().into_iter().collect();
        assert_eq!(
            t,
            vec![
                (1, Projection::Q),
                (1, Projection::K),
                (1, Projection::Down)
            ]
        );
        let cfg = AdapterConfig::from_json(
            br#"{"r": 2, "target_modules": ["up_proj"], "layers_to_transform": [0]}"#,
        )
        .unwrap();
        assert_eq!(
            cfg.targets(&base())
                .unwrap()
                .into_iter()
                .collect::<Vec<_>>(),
            vec![(0, Projection::Up)]
        );
    }

    #[test]
    fn unsupported_features_are_rejected_by_name() {
        let cases = [
            (r#"{"r": 2, "use_dora": true}"#, "DoRA"),
            (
                r#"{"r": 2, "modules_to_save": ["lm_head"]}"#,
                "modules_to_save",
            ),
            (r#"{"r": 2, "bias": "all"}"#, "bias = \"all\""),
            (r#"{"r": 2, "peft_type": "IA3"}"#, "IA3"),
            (
                r#"{"r": 2, "layer_replication": [[0, 1]]}"#,
                "layer_replication",
            ),
        ];
        for (json, needle) in cases {
            let err = AdapterConfig::from_json(json.as_bytes()).unwrap_err();
            assert!(matches!(err, PeftError::Unsupported(_)), "{err}");
            assert!(err.to_string().contains(needle), "{err}");
        }
        let cfg =
            AdapterConfig::from_json(br#"{"r": 2, "target_modules": ["embed_tokens"]}"#).unwrap();
        let err = cfg.targets(&base()).unwrap_err();
        assert!(err.to_string().contains("embedding"), "{err}");
        let cfg = AdapterConfig::from_json(br#"{"r": 2, "target_modules": ["c_attn"]}"#).unwrap();
        assert!(
            matches!(cfg.targets(&base()), Err(PeftError::UnknownTargetModule(t)) if t == "c_attn")
        );
        assert!(matches!(
            AdapterConfig::from_json(b"{\"r\": "),
            Err(PeftError::Config(_))
        ));
    }

    #[test]
    fn a_rank_that_differs_from_the_config_is_reported_with_both_numbers() {
        let err = LoraWeights::from_bytes(
            QV.as_bytes(),
            &adapter(&[Projection::Q, Projection::V], 8, 0.5),
            &base(),
        )
        .unwrap_err();
        assert!(
            matches!(
                &err,
                PeftError::Rank {
                    expected: 4,
                    got: 8,
                    ..
                }
            ),
            "{err}"
        );
    }

    #[test]
    fn a_tensor_for_an_untargeted_module_or_a_missing_pair_is_rejected() {
        let err = LoraWeights::from_bytes(
            QV.as_bytes(),
            &adapter(&[Projection::Q, Projection::V, Projection::K], 4, 0.5),
            &base(),
        )
        .unwrap_err();
        assert!(matches!(err, PeftError::Untargeted(n) if n.contains("k_proj")));
        let err =
            LoraWeights::from_bytes(QV.as_bytes(), &adapter(&[Projection::Q], 4, 0.5), &base())
                .unwrap_err();
        assert!(matches!(err, PeftError::MissingTensor(n) if n.contains("v_proj")));
    }

    #[test]
    fn non_finite_values_truncated_files_and_huge_headers_are_rejected() {
        let err = LoraWeights::from_bytes(
            QV.as_bytes(),
            &adapter(&[Projection::Q, Projection::V], 4, f32::NAN),
            &base(),
        )
        .unwrap_err();
        assert!(
            matches!(err, PeftError::NonFinite { index: 0, .. }),
            "{err}"
        );

        let full = adapter(&[Projection::Q, Projection::V], 4, 0.5);
        let cut = &full[..full.len() - 10];
        let err = LoraWeights::from_bytes(QV.as_bytes(), cut, &base()).unwrap_err();
        assert!(
            matches!(err, PeftError::Truncated { len, needed } if len + 10 == needed),
            "{err}"
        );
        let err = LoraWeights::from_bytes(QV.as_bytes(), &full[..4], &base()).unwrap_err();
        assert!(
            matches!(err, PeftError::Truncated { len: 4, needed: 8 }),
            "{err}"
        );

        let mut huge = (1u64 << 40).to_le_bytes().to_vec();
        huge.extend_from_slice(b"{}");
        let err = LoraWeights::from_bytes(QV.as_bytes(), &huge, &base()).unwrap_err();
        assert!(
            matches!(err, PeftError::HeaderTooLarge { len, max: MAX_HEADER_BYTES } if len == 1 << 40),
            "{err}"
        );
        let mut garbage = 4u64.to_le_bytes().to_vec();
        garbage.extend_from_slice(b"{{{{");
        assert!(matches!(
            LoraWeights::from_bytes(QV.as_bytes(), &garbage, &base()),
            Err(PeftError::Header(_))
        ));
    }

    #[test]
    fn tensor_names_outside_the_model_are_unknown_or_out_of_range() {
        assert!(matches!(
            classify("model.layers.0.self_attn.q_proj.lora_A.weight", 2),
            Err(PeftError::UnknownTensor(_))
        ));
        assert!(matches!(
            classify(
                "base_model.model.model.layers.5.mlp.up_proj.lora_B.weight",
                2
            ),
            Err(PeftError::LayerOutOfRange {
                layer: 5,
                layers: 2,
                ..
            })
        ));
        assert!(matches!(
            classify(
                "base_model.model.model.layers.0.mlp.q_proj.lora_B.weight",
                2
            ),
            Err(PeftError::UnknownTensor(_))
        ));
        assert!(matches!(
            classify(
                "base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector",
                2
            ),
            Err(PeftError::Unsupported(_))
        ));
        assert_eq!(
            classify(
                "base_model.model.model.layers.1.mlp.down_proj.lora_B.default.weight",
                2
            )
            .unwrap(),
            (1, Projection::Down, 1)
        );
    }
}
