//! The Llama forward pass, written once over [`Backend`], with per-row LoRA.
//!
//! - [`Llama`] holds the base weights, one struct per layer named after the Hugging Face modules
//!   (q/k/v and gate/up are stored fused, row-stacked in that order).
//! - [`KvCache`] holds every layer's paged K and V buffers; the block allocator that hands out
//!   block ids lives in `engine::kv`, this side only reads block tables from [`StepMeta`].
//! - [`LoraState`] holds the adapters resident on the device, one per slot, and the per
//!   (layer, [`LoraGroup`]) slot tables the SGMV ops read. The adapter cache calls
//!   [`DeviceAdapter::upload`] (may run off the engine thread), then [`LoraState::install`] /
//!   [`LoraState::remove`] between steps. A step's [`StepMeta::segments`] name those slots.
//! - The LoRA arena: rows reserved after each group's base weight ([`Llama::reserve_lora_arena`])
//!   that hold resident adapters' A matrices ([`Llama::place_in_arena`]). A decode step whose
//!   adapters are all there runs each group's base GEMM over those rows too, so its output's
//!   extra columns are the LoRA shrink; only the expand is left to do (see [`LoraState`]).
//!
//! One step: `let logits = model.forward(&meta, &mut kv, &lora)?` returns
//! `[meta.logit_rows.len(), vocab]` f32 logits, row-major.

use std::path::Path;
use std::sync::Arc;

use crate::engine::backend::{
    AttnShape, BLOCK_SIZE, Backend, BackendError, DType, HostTensor, LoraGroupSlot, LoraPart,
    MAX_GROUP_PARTS, RowSampling, SeqStep, StepMeta,
};
use crate::engine::lora::peft::LoraWeights;
use crate::engine::lora::segments::SegmentTable;
use crate::engine::model::config::{ConfigError, LlamaConfig, LoraGroup};
use crate::engine::model::weights::{ModelWeights, WeightsError};

/// Why a model cannot be loaded or run.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Weights(#[from] WeightsError),
    #[error(transparent)]
    Backend(#[from] BackendError),
    #[error("adapter slot {slot} is outside the {slots} slots")]
    SlotOutOfRange { slot: usize, slots: usize },
    #[error("a step uses adapter slot {slot}, which holds no adapter")]
    EmptySlot { slot: usize },
    #[error("adapter has {adapter} layers, the model has {model}")]
    AdapterLayers { adapter: usize, model: usize },
    #[error("KV cache has {cache} layers, the model has {model}")]
    KvLayers { cache: usize, model: usize },
}

type Result<T, E = ModelError> = std::result::Result<T, E>;

/// `self_attn`: fused `[q; k; v]` projection `[q_dim + 2 kv_dim, hidden]` and `o_proj`.
pub struct LlamaAttention<B: Backend> {
    pub qkv_proj: B::Buf,
    pub o_proj: B::Buf,
}

/// `mlp`: fused `[gate; up]` projection `[2 intermediate, hidden]` and `down_proj`.
pub struct LlamaMlp<B: Backend> {
    pub gate_up_proj: B::Buf,
    pub down_proj: B::Buf,
}

/// One decoder layer (`model.layers.{i}`).
pub struct LlamaDecoderLayer<B: Backend> {
    pub input_layernorm: B::Buf,
    pub self_attn: LlamaAttention<B>,
    pub post_attention_layernorm: B::Buf,
    pub mlp: LlamaMlp<B>,
}

/// A Llama-family causal LM on a backend.
pub struct Llama<B: Backend> {
    backend: Arc<B>,
    config: LlamaConfig,
    pub embed_tokens: B::Buf,
    pub layers: Vec<LlamaDecoderLayer<B>>,
    pub norm: B::Buf,
    /// `None` when the output projection is tied to `embed_tokens`.
    pub lm_head: Option<B::Buf>,
    inv_freq: B::Buf,
    /// A decode step padded to its bucket, rebuilt in place each step (no allocation once it
    /// has held the largest batch).
    padded: std::sync::Mutex<StepMeta>,
    /// Rows of the LoRA arena after each group's base weight ([`Self::reserve_lora_arena`]).
    arena_rows: [usize; 4],
}

/// Layers after which a step's ops issued so far start on the device ([`Backend::checkpoint`]):
/// the first layer goes as soon as it is issued, so the device runs it while the host issues
/// the next ones, and each later part is issued before the device gets to it.
const STEP_PARTS_AFTER: [usize; 3] = [0, 2, 8];

/// Steps of at most this many rows use the LoRA arena (decode batches): the base GEMM's extra
/// columns cost `rows` times the arena rows it covers in FLOPs, nothing at decode sizes, while a
/// prefill's LoRA is cheaper as a shrink.
pub const ARENA_MAX_ROWS: usize = 128;

impl<B: Backend> Llama<B> {
    /// Load `config.json` and the safetensors checkpoint of a Hugging Face model folder.
    pub fn load(backend: Arc<B>, dir: &Path) -> Result<Self> {
        let config = LlamaConfig::from_file(&dir.join("config.json"))?;
        let weights = ModelWeights::open_dir(dir)?;
        Self::from_weights(backend, config, &weights)
    }

    /// Upload the tensors of an opened checkpoint, checking every shape against `config`.
    pub fn from_weights(backend: Arc<B>, config: LlamaConfig, w: &ModelWeights) -> Result<Self> {
        let c = &config;
        let (h, i, v) = (c.hidden_size, c.intermediate_size, c.vocab_size);
        let b = backend.as_ref();
        let embed_tokens = w.load(b, "model.embed_tokens.weight", &[v, h])?;
        let mut layers = Vec::with_capacity(c.num_hidden_layers);
        for l in 0..c.num_hidden_layers {
            let p = |s: &str| format!("model.layers.{l}.{s}.weight");
            let (q, k, vv) = (
                p("self_attn.q_proj"),
                p("self_attn.k_proj"),
                p("self_attn.v_proj"),
            );
            let (gate, up) = (p("mlp.gate_proj"), p("mlp.up_proj"));
            layers.push(LlamaDecoderLayer {
                input_layernorm: w.load(b, &p("input_layernorm"), &[h])?,
                self_attn: LlamaAttention {
                    qkv_proj: w.load_stacked(
                        b,
                        &[
                            (&q, [c.q_dim(), h]),
                            (&k, [c.kv_dim(), h]),
                            (&vv, [c.kv_dim(), h]),
                        ],
                    )?,
                    o_proj: w.load(b, &p("self_attn.o_proj"), &[h, c.q_dim()])?,
                },
                post_attention_layernorm: w.load(b, &p("post_attention_layernorm"), &[h])?,
                mlp: LlamaMlp {
                    gate_up_proj: w.load_stacked(b, &[(&gate, [i, h]), (&up, [i, h])])?,
                    down_proj: w.load(b, &p("mlp.down_proj"), &[h, i])?,
                },
            });
        }
        let norm = w.load(b, "model.norm.weight", &[h])?;
        let lm_head = if c.tie_word_embeddings {
            None
        } else {
            Some(w.load(b, "lm_head.weight", &[v, h])?)
        };
        let inv_freq = b.upload(DType::F32, &c.inv_freq())?;
        tracing::info!(
            layers = c.num_hidden_layers,
            hidden = h,
            vocab = v,
            "model loaded"
        );
        Ok(Llama {
            backend,
            config,
            embed_tokens,
            layers,
            norm,
            lm_head,
            inv_freq,
            padded: Default::default(),
            arena_rows: [0; 4],
        })
    }

    /// A model of `config`'s shapes with random weights generated on the backend (for benches):
    /// linear weights uniform with variance `1 / in_features`, embeddings with variance 1/3,
    /// norm weights 1. Stream `seed + i` fills the `i`-th tensor.
    pub fn random(backend: Arc<B>, config: LlamaConfig, seed: u32) -> Result<Self> {
        let c = &config;
        let (h, i, v) = (c.hidden_size, c.intermediate_size, c.vocab_size);
        let b = backend.as_ref();
        let dt = b.dtype();
        let mut stream = seed;
        let mut random = |len: usize, fan_in: usize| -> Result<B::Buf> {
            let mut buf = b.alloc(dt, len)?;
            // Uniform in [-s, s) has variance s² / 3.
            b.fill_random(&mut buf, stream, (3.0 / fan_in as f32).sqrt())?;
            stream = stream.wrapping_add(1);
            Ok(buf)
        };
        let embed_tokens = random(v * h, 1)?;
        let mut layers = Vec::with_capacity(c.num_hidden_layers);
        for _ in 0..c.num_hidden_layers {
            layers.push(LlamaDecoderLayer {
                input_layernorm: b.upload(dt, &vec![1.0; h])?,
                self_attn: LlamaAttention {
                    qkv_proj: random((c.q_dim() + 2 * c.kv_dim()) * h, h)?,
                    o_proj: random(h * c.q_dim(), c.q_dim())?,
                },
                post_attention_layernorm: b.upload(dt, &vec![1.0; h])?,
                mlp: LlamaMlp {
                    gate_up_proj: random(2 * i * h, h)?,
                    down_proj: random(h * i, i)?,
                },
            });
        }
        let norm = b.upload(dt, &vec![1.0; h])?;
        let lm_head = if c.tie_word_embeddings {
            None
        } else {
            Some(random(v * h, h)?)
        };
        let inv_freq = b.upload(DType::F32, &c.inv_freq())?;
        Ok(Llama {
            backend,
            config,
            embed_tokens,
            layers,
            norm,
            lm_head,
            inv_freq,
            padded: Default::default(),
            arena_rows: [0; 4],
        })
    }

    /// Arena rows for `slots` adapters of rank `rank` on every projection (see
    /// [`Self::reserve_lora_arena`]): per group, `slots * rank` times its number of parts.
    pub fn arena_rows_for(slots: usize, rank: usize) -> [usize; 4] {
        LoraGroup::ALL.map(|g| slots * rank * g.parts().len())
    }

    /// Reserve `rows[g]` rows after the base weight of each layer's LoRA group `g` (each weight
    /// is copied into a larger buffer once). Adapters placed there ([`Self::place_in_arena`])
    /// have their shrink computed by the base GEMM; what the rows hold before is never read
    /// into a row's result.
    pub fn reserve_lora_arena(&mut self, rows: [usize; 4]) -> Result<()> {
        let b = Arc::clone(&self.backend);
        let dt = b.dtype();
        for l in 0..self.layers.len() {
            for g in LoraGroup::ALL {
                let (k, outs) = self.config.group_dims(g);
                let n: usize = outs.iter().sum();
                let w = self.group_weight_mut(l, g);
                let mut wider = b.alloc(dt, (n + rows[g.index()]) * k)?;
                b.copy_into(&mut wider, 0, w)?;
                *w = wider;
            }
        }
        b.synchronize()?;
        self.arena_rows = rows;
        tracing::info!(rows = ?rows, "LoRA arena reserved after the base weights");
        Ok(())
    }

    /// The arena rows reserved per group (zeros when none).
    pub fn arena_rows(&self) -> [usize; 4] {
        self.arena_rows
    }

    /// Copy the A matrices of the adapter in `slot` into the arena, if its upload has completed
    /// and the arena has room, so the steps that use it run its shrink in the base GEMMs.
    /// Returns whether the adapter is in the arena. Call between steps.
    pub fn place_in_arena(&mut self, lora: &mut LoraState<B>, slot: usize) -> Result<bool> {
        let b = Arc::clone(&self.backend);
        let Some(Some(adapter)) = lora.slots.get(slot) else {
            return Ok(false);
        };
        if lora.arena_at.get(slot).is_some_and(Option::is_some) {
            return Ok(true);
        }
        if !adapter.uploaded(b.as_ref()) || lora.arena.iter().all(|a| a.cap == 0) {
            return Ok(false);
        }
        let Some(at) = lora.arena_alloc(slot, adapter.group_ranks) else {
            return Ok(false);
        };
        let Some(Some(adapter)) = lora.slots.get(slot) else {
            return Ok(false);
        };
        for (l, layer) in adapter.layers.iter().enumerate() {
            for g in LoraGroup::ALL {
                let (Some(group), Some((row, _))) = (&layer[g.index()], at[g.index()]) else {
                    continue;
                };
                let (k, outs) = self.config.group_dims(g);
                let n: usize = outs.iter().sum();
                b.copy_into(self.group_weight_mut(l, g), (n + row) * k, &group.a)?;
            }
        }
        lora.arena_at[slot] = Some(at);
        lora.rebuild(b.as_ref())?;
        Ok(true)
    }

    fn group_weight_mut(&mut self, layer: usize, g: LoraGroup) -> &mut B::Buf {
        let l = &mut self.layers[layer];
        match g {
            LoraGroup::Qkv => &mut l.self_attn.qkv_proj,
            LoraGroup::O => &mut l.self_attn.o_proj,
            LoraGroup::GateUp => &mut l.mlp.gate_up_proj,
            LoraGroup::Down => &mut l.mlp.down_proj,
        }
    }

    /// The model's config.
    pub fn config(&self) -> &LlamaConfig {
        &self.config
    }

    /// The backend the weights live on.
    pub fn backend(&self) -> &Arc<B> {
        &self.backend
    }

    /// Run one step: embed `meta.token_ids`, write their K/V at `meta.slot_mapping`, attend over
    /// each sequence's cache, apply each row's adapter (per `meta.segments`), and return the
    /// logits of `meta.logit_rows`: `[logit_rows.len(), vocab]`, row-major.
    pub fn forward(
        &self,
        meta: &StepMeta,
        kv: &mut KvCache<B>,
        lora: &LoraState<B>,
    ) -> Result<Vec<f32>> {
        match self.forward_device(meta, kv, lora)? {
            Some(logits) => {
                let mut out = self.backend.download(&logits)?;
                out.truncate(meta.logit_rows.len() * self.config.vocab_size);
                Ok(out)
            }
            None => Ok(Vec::new()),
        }
    }

    /// [`Self::forward`], leaving the logits on the device (`None` when no row wants logits).
    /// The buffer may hold more rows than `meta.logit_rows`: a decode step the backend pads to
    /// its bucket ([`Backend::decode_bucket`]) computes the padding rows' logits after the
    /// real ones.
    pub fn forward_device(
        &self,
        meta: &StepMeta,
        kv: &mut KvCache<B>,
        lora: &LoraState<B>,
    ) -> Result<Option<B::Buf>> {
        let c = &self.config;
        let b = self.backend.as_ref();
        if kv.k.len() != c.num_hidden_layers {
            return Err(ModelError::KvLayers {
                cache: kv.k.len(),
                model: c.num_hidden_layers,
            });
        }
        for (_, _, slot) in meta.segments.iter() {
            match lora.slots.get(slot as usize) {
                None => {
                    return Err(ModelError::SlotOutOfRange {
                        slot: slot as usize,
                        slots: lora.slots.len(),
                    });
                }
                Some(None) => {
                    return Err(ModelError::EmptySlot {
                        slot: slot as usize,
                    });
                }
                // An adapter whose copy is still in flight is waited for layer by layer, by
                // its LoRA work only (see `Lora::shrink`).
                Some(Some(_)) => {}
            }
        }
        // Only the engine's thread steps a model: the lock is never contended.
        let mut scratch = self
            .padded
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let padded = b
            .decode_bucket(meta.rows())
            .is_some_and(|bucket| meta.pad_decode(bucket, kv.pad_block(), &mut scratch));
        let meta = if padded { &*scratch } else { meta };
        b.begin_step()?;
        let out = b
            .upload_meta(meta)
            .map_err(ModelError::from)
            .and_then(|m| self.issue_step(meta, &m, kv, lora));
        // Whatever happened, the step ends here: its ops are issued (or replayed) now.
        let ended = b.end_step();
        let out = out?;
        ended?;
        Ok(out)
    }

    /// The ops of one step (see [`Self::forward_device`]) over its uploaded metadata `m`,
    /// between the backend's `begin_step` and `end_step`.
    fn issue_step(
        &self,
        meta: &StepMeta,
        m: &B::Meta,
        kv: &mut KvCache<B>,
        lora: &LoraState<B>,
    ) -> Result<Option<B::Buf>> {
        let (c, b) = (&self.config, self.backend.as_ref());
        let use_lora = !meta.segments.is_empty();
        let rows = meta.rows();
        let (h, inter) = (c.hidden_size, c.intermediate_size);
        let (q_dim, kv_dim) = (c.q_dim(), c.kv_dim());
        let qkv_dim = q_dim + 2 * kv_dim;
        let dt = b.dtype();
        let shape = AttnShape {
            n_heads: c.num_attention_heads,
            n_kv_heads: c.num_key_value_heads,
            head_dim: c.head_dim,
        };
        let scale = 1.0 / (c.head_dim as f32).sqrt();
        let max_rank = lora.max_rank.max(1);
        // With every adapter of the step in the arena, each group's GEMM also covers the arena
        // rows up to `ext[g]`: its output rows are that much wider, the extra columns being
        // the LoRA intermediate.
        let arena = if use_lora { lora.arena_ext(meta) } else { None };
        let ext = arena.unwrap_or([0; 4]);
        let (qkv_w, o_w, gu_w, down_w) =
            (qkv_dim + ext[0], h + ext[1], 2 * inter + ext[2], h + ext[3]);

        let mut residual = b.alloc(dt, rows * h)?;
        let mut normed = b.alloc(dt, rows * h)?;
        let mut qkv = b.alloc(dt, rows * qkv_w)?;
        let mut attn = b.alloc(dt, rows * q_dim)?;
        let mut proj = b.alloc(dt, rows * o_w.max(down_w))?;
        let mut gate_up = b.alloc(dt, rows * gu_w)?;
        let mut act = b.alloc(dt, rows * inter)?;
        // The LoRA intermediate of a group: written by the group's shrink on the side queue,
        // read by its expand on the main queue. One buffer serves every group: a shrink is
        // issued after the previous group's expand, and the side queue starts behind it.
        let shrinks = use_lora && arena.is_none();
        let mut v = b.alloc(DType::F32, if shrinks { rows * max_rank } else { 0 })?;
        // An arena step's adapters are all copied already (see `Llama::place_in_arena`).
        let copying = (shrinks
            && meta
                .segments
                .iter()
                .any(|(_, _, slot)| !lora.slot_ready(b, slot as usize)))
        .then_some(&meta.segments);
        let lora = Lora {
            b,
            state: lora,
            meta: m,
            config: c,
            max_rank,
            on: use_lora,
            arena: arena.is_some(),
            copying,
        };
        b.embedding(&self.embed_tokens, m, h, &mut residual)?;
        for (l, layer) in self.layers.iter().enumerate() {
            if l == 0 {
                b.rms_norm(
                    &residual,
                    &layer.input_layernorm,
                    c.rms_norm_eps,
                    rows,
                    h,
                    &mut normed,
                )?;
            }
            let pending = lora.shrink(l, LoraGroup::Qkv, &normed, &mut v)?;
            b.matmul(&normed, &layer.self_attn.qkv_proj, rows, h, qkv_w, &mut qkv)?;
            let (k_cache, v_cache) = (&mut kv.k[l], &mut kv.v[l]);
            let rope = (&self.inv_freq, shape, (&mut *k_cache, &mut *v_cache));
            lora.expand_rope_write_kv(pending, l, &v, (&mut qkv, qkv_w), rope)?;
            b.attention(&qkv, qkv_w, 0, k_cache, v_cache, m, shape, scale, &mut attn)?;
            let pending = lora.shrink(l, LoraGroup::O, &attn, &mut v)?;
            b.matmul(&attn, &layer.self_attn.o_proj, rows, q_dim, o_w, &mut proj)?;
            lora.expand(pending, l, LoraGroup::O, &v, &mut proj, o_w)?;
            b.add_rms_norm(
                &mut residual,
                &proj,
                o_w,
                &layer.post_attention_layernorm,
                c.rms_norm_eps,
                rows,
                h,
                &mut normed,
            )?;
            let pending = lora.shrink(l, LoraGroup::GateUp, &normed, &mut v)?;
            b.matmul(
                &normed,
                &layer.mlp.gate_up_proj,
                rows,
                h,
                gu_w,
                &mut gate_up,
            )?;
            lora.expand_silu_mul(
                pending,
                l,
                &v,
                (&mut gate_up, gu_w),
                (rows, inter),
                &mut act,
            )?;
            let pending = lora.shrink(l, LoraGroup::Down, &act, &mut v)?;
            b.matmul(&act, &layer.mlp.down_proj, rows, inter, down_w, &mut proj)?;
            lora.expand(pending, l, LoraGroup::Down, &v, &mut proj, down_w)?;
            let next_norm = match self.layers.get(l + 1) {
                Some(next) => &next.input_layernorm,
                None => &self.norm,
            };
            b.add_rms_norm(
                &mut residual,
                &proj,
                down_w,
                next_norm,
                c.rms_norm_eps,
                rows,
                h,
                &mut normed,
            )?;
            if STEP_PARTS_AFTER.contains(&l) && l + 1 < self.layers.len() {
                b.checkpoint()?;
            }
        }
        let n_logits = meta.logit_rows.len();
        if n_logits == 0 {
            return Ok(None);
        }
        let mut last = b.alloc(dt, n_logits * h)?;
        b.gather_rows(&normed, m, h, &mut last)?;
        let head = self.lm_head.as_ref().unwrap_or(&self.embed_tokens);
        let mut logits = b.alloc(DType::F32, n_logits * c.vocab_size)?;
        b.matmul(&last, head, n_logits, h, c.vocab_size, &mut logits)?;
        Ok(Some(logits))
    }

    /// Greedy generation for a few sequences at once, without a scheduler: sequence `i` gets
    /// its own contiguous blocks, all prompts are prefilled in one step, then every sequence
    /// decodes one token per step until it has `max_new` tokens. Each request is
    /// `(prompt, adapter slot)`. Used by tests and benchmarks; the engine has its own loop.
    pub fn generate_greedy(
        &self,
        kv: &mut KvCache<B>,
        lora: &LoraState<B>,
        requests: &[(Vec<u32>, Option<u32>)],
        max_new: usize,
    ) -> Result<Vec<Vec<u32>>> {
        let blocks_per_seq = requests
            .iter()
            .map(|(p, _)| (p.len() + max_new).div_ceil(BLOCK_SIZE))
            .max()
            .unwrap_or(0);
        if blocks_per_seq * requests.len() > kv.num_blocks() {
            return Err(BackendError::Shape(format!(
                "{} sequences need {} KV blocks each, the cache has {}",
                requests.len(),
                blocks_per_seq,
                kv.num_blocks()
            ))
            .into());
        }
        let tables: Vec<Vec<u32>> = (0..requests.len())
            .map(|i| ((i * blocks_per_seq) as u32..((i + 1) * blocks_per_seq) as u32).collect())
            .collect();
        let mut out: Vec<Vec<u32>> = vec![Vec::new(); requests.len()];
        let mut cached = vec![0usize; requests.len()];
        for step in 0..max_new {
            let inputs: Vec<Vec<u32>> = (0..requests.len())
                .map(|i| {
                    if step == 0 {
                        requests[i].0.clone()
                    } else {
                        out[i].last().copied().into_iter().collect()
                    }
                })
                .collect();
            let meta = batch_step_meta(requests, &inputs, &cached, &tables)?;
            let Some(logits) = self.forward_device(&meta, kv, lora)? else {
                continue;
            };
            let greedy = vec![RowSampling::GREEDY; requests.len()];
            let mut picks = Vec::with_capacity(greedy.len());
            self.backend
                .sample(&logits, self.config.vocab_size, &greedy, &mut picks)?;
            for (i, pick) in picks.iter().enumerate() {
                cached[i] += inputs[i].len();
                out[i].push(pick.token);
            }
        }
        Ok(out)
    }
}

/// The metadata of one step of a fixed batch (as [`Llama::generate_greedy`] runs it): sequence
/// `i` feeds `inputs[i]` after `cached[i]` cached tokens, in the KV blocks `tables[i]`, with
/// the adapter slot of `requests[i]`, and every sequence samples.
pub fn batch_step_meta(
    requests: &[(Vec<u32>, Option<u32>)],
    inputs: &[Vec<u32>],
    cached: &[usize],
    tables: &[Vec<u32>],
) -> Result<StepMeta, BackendError> {
    let seqs: Vec<SeqStep<'_>> = (0..requests.len())
        .map(|i| SeqStep {
            tokens: &inputs[i],
            cached: cached[i],
            block_table: &tables[i],
            adapter_slot: requests[i].1,
            sample: true,
        })
        .collect();
    StepMeta::build(&seqs)
}

/// One step's LoRA application: a group's shrink (its projections read the same input) is
/// issued on the backend's side queue before the base GEMM, its expand after it.
struct Lora<'a, B: Backend> {
    b: &'a B,
    state: &'a LoraState<B>,
    meta: &'a B::Meta,
    config: &'a LlamaConfig,
    max_rank: usize,
    on: bool,
    /// The base GEMMs compute the shrinks (the step's adapters are all in the arena).
    arena: bool,
    /// The step's segments, when one of its adapters is still being copied to the device.
    copying: Option<&'a SegmentTable>,
}

impl<B: Backend> Lora<'_, B> {
    /// Shrink `x` into `v` for `group` on the side queue, when any resident adapter targets
    /// it. Returns whether it was issued (then [`Self::expand`] joins the side queue). Nothing
    /// to do when the base GEMM computes it.
    fn shrink(&self, layer: usize, group: LoraGroup, x: &B::Buf, v: &mut B::Buf) -> Result<bool> {
        if self.arena {
            return Ok(false);
        }
        let Some(table) = self.table(layer, group) else {
            return Ok(false);
        };
        let (h_in, _) = self.config.group_dims(group);
        self.b.begin_side()?;
        // The side queue waits for the copy of each adapter's part of this layer (its A and
        // Bs of every group, see `StagedAdapter::layer_tensors`) that is still in flight; the
        // expand joins the side queue, so it waits too, while the base GEMM does not.
        let waited = self.wait_for_copies(layer, group);
        let issued = waited.and_then(|()| {
            self.b
                .sgmv_shrink(x, table, self.meta, h_in, self.max_rank, v)
        });
        self.b.end_side()?;
        issued.map(|()| true).map_err(Into::into)
    }

    /// After the base GEMM wrote `y` (the group's outputs side by side from column 0):
    /// `y += v · Bᵀ` per part, if [`Self::shrink`] issued the group's shrink; in an arena
    /// step, from the intermediate in `y`'s own extra columns.
    fn expand(
        &self,
        pending: bool,
        layer: usize,
        group: LoraGroup,
        v: &B::Buf,
        y: &mut B::Buf,
        y_stride: usize,
    ) -> Result<()> {
        let Some(table) = self.expand_table(pending, layer, group) else {
            return Ok(());
        };
        let (_, outs) = self.config.group_dims(group);
        let (alias, vs) = self.expand_input(y, y_stride)?;
        let v = alias.as_ref().unwrap_or(v);
        self.b
            .sgmv_expand(v, table, self.meta, vs, &outs, y_stride, 0, y)?;
        Ok(())
    }

    /// What an expand reads after the base GEMM wrote `y`: in an arena step the intermediate
    /// in `y`'s own extra columns (an alias of `y`, returned), else the `v` of
    /// [`Self::shrink`] on the side queue, which it joins. With that intermediate's row stride.
    fn expand_input(&self, y: &B::Buf, y_stride: usize) -> Result<(Option<B::Buf>, usize)> {
        if self.arena {
            return Ok((Some(self.b.alias(y)), y_stride));
        }
        self.b.join_side()?;
        Ok((None, self.max_rank))
    }

    /// The q|k|v group's expand (see [`Self::expand`]), RoPE and the KV-cache write, in one
    /// kernel where the backend fuses them.
    fn expand_rope_write_kv(
        &self,
        pending: bool,
        layer: usize,
        v: &B::Buf,
        (qkv, qkv_w): (&mut B::Buf, usize),
        (inv_freq, shape, caches): (&B::Buf, AttnShape, (&mut B::Buf, &mut B::Buf)),
    ) -> Result<()> {
        let (b, m) = (self.b, self.meta);
        let Some(table) = self.expand_table(pending, layer, LoraGroup::Qkv) else {
            let (k, v) = caches;
            return b
                .rope_write_kv(qkv, qkv_w, inv_freq, m, shape, k, v)
                .map_err(Into::into);
        };
        let (alias, vs) = self.expand_input(qkv, qkv_w)?;
        let v = alias.as_ref().unwrap_or(v);
        b.expand_rope_write_kv(v, table, m, vs, qkv, qkv_w, inv_freq, shape, caches)?;
        Ok(())
    }

    /// The gate|up group's expand (see [`Self::expand`]) and SiLU-mul: `act[rows, inter]`
    /// from `gate_up`'s rows of `gu_w`, in one kernel where the backend fuses them.
    fn expand_silu_mul(
        &self,
        pending: bool,
        layer: usize,
        v: &B::Buf,
        (gate_up, gu_w): (&mut B::Buf, usize),
        (rows, inter): (usize, usize),
        act: &mut B::Buf,
    ) -> Result<()> {
        let b = self.b;
        let Some(table) = self.expand_table(pending, layer, LoraGroup::GateUp) else {
            return b
                .silu_mul(gate_up, gu_w, rows, inter, act)
                .map_err(Into::into);
        };
        let (alias, vs) = self.expand_input(gate_up, gu_w)?;
        let v = alias.as_ref().unwrap_or(v);
        b.expand_silu_mul(v, table, self.meta, vs, gate_up, gu_w, rows, inter, act)?;
        Ok(())
    }

    /// The table an expand applies: the arena's in an arena step, else the group's when
    /// [`Self::shrink`] issued its shrink.
    fn expand_table(&self, pending: bool, layer: usize, group: LoraGroup) -> Option<&B::LoraTable> {
        match (self.arena, pending) {
            (true, _) => self.state.arena_tables[layer][group.index()].as_ref(),
            (false, true) => self.table(layer, group),
            (false, false) => None,
        }
    }

    /// See [`Self::shrink`]. The adapters already copied, and the layers of one being copied
    /// that are there already, add nothing to the step.
    fn wait_for_copies(&self, layer: usize, group: LoraGroup) -> Result<(), BackendError> {
        let Some(segments) = self.copying else {
            return Ok(());
        };
        for (_, _, slot) in segments.iter() {
            let Some(Some(adapter)) = self.state.slots.get(slot as usize) else {
                continue;
            };
            if adapter.copied.load(std::sync::atomic::Ordering::Relaxed) {
                continue;
            }
            let group = adapter
                .layers
                .get(layer)
                .and_then(|l| l[group.index()].as_ref());
            if let Some(group) = group {
                self.b.wait_upload(&group.a)?;
            }
        }
        Ok(())
    }

    fn table(&self, layer: usize, group: LoraGroup) -> Option<&B::LoraTable> {
        if !self.on {
            return None;
        }
        self.state.tables[layer][group.index()].as_ref()
    }
}

/// Index of the largest value (the first one on ties, like `torch.argmax`).
pub fn argmax(values: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &v) in values.iter().enumerate() {
        if v > values[best] {
            best = i;
        }
    }
    best as u32
}

/// Every layer's paged K and V: `[num_blocks, BLOCK_SIZE, n_kv_heads, head_dim]` each.
pub struct KvCache<B: Backend> {
    pub k: Vec<B::Buf>,
    pub v: Vec<B::Buf>,
    num_blocks: usize,
}

impl<B: Backend> KvCache<B> {
    /// Allocate `num_blocks` blocks per layer in the backend's dtype, plus one more that no
    /// sequence gets: where the padding rows of a decode step write (see
    /// [`StepMeta::pad_decode`]).
    pub fn new(backend: &B, config: &LlamaConfig, num_blocks: usize) -> Result<Self> {
        let len = (num_blocks + 1) * BLOCK_SIZE * config.kv_dim();
        let mut k = Vec::with_capacity(config.num_hidden_layers);
        let mut v = Vec::with_capacity(config.num_hidden_layers);
        for _ in 0..config.num_hidden_layers {
            k.push(backend.alloc(backend.dtype(), len)?);
            v.push(backend.alloc(backend.dtype(), len)?);
        }
        Ok(KvCache { k, v, num_blocks })
    }

    /// Blocks per layer for sequences (block ids `0..num_blocks`).
    pub fn num_blocks(&self) -> usize {
        self.num_blocks
    }

    /// The block padding rows use (the one after the sequences' blocks).
    pub fn pad_block(&self) -> u32 {
        self.num_blocks as u32
    }

    /// Bytes one block takes over all layers (K and V) in `dtype`: for sizing the pool.
    pub fn bytes_per_block(config: &LlamaConfig, dtype: DType) -> usize {
        2 * config.num_hidden_layers * BLOCK_SIZE * config.kv_dim() * dtype.size()
    }
}

/// One adapter's matrices on the device, per layer and [`LoraGroup`].
pub struct DeviceAdapter<B: Backend> {
    layers: Vec<[Option<DeviceLoraGroup<B>>; 4]>,
    /// Per [`LoraGroup`], its largest total rank over the layers (0: no layer has it).
    group_ranks: [usize; 4],
    /// Its upload was seen complete (it stays so): later checks ask the device nothing.
    copied: std::sync::atomic::AtomicBool,
}

/// One adapter's LoRA group on the device: the parts' A stacked, and each part's B and rank.
struct DeviceLoraGroup<B: Backend> {
    a: B::Buf,
    parts: [Option<(B::Buf, usize)>; MAX_GROUP_PARTS],
}

impl<B: Backend> std::fmt::Debug for DeviceAdapter<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeviceAdapter")
            .field("layers", &self.layers.len())
            .field("group_ranks", &self.group_ranks)
            .finish()
    }
}

/// The ranks of one staged group's parts (0: the adapter lacks that part).
type PartRanks = [usize; MAX_GROUP_PARTS];

/// A validated adapter staged in host memory for one copy to the device (the host tier's
/// entry): its groups' ranks and their matrices packed in the backend's dtype.
pub struct StagedAdapter<B: Backend> {
    /// `(layer, group, part ranks)` of each group the adapter has, in staging order: the
    /// stacked A, then the B of each part present.
    groups: Vec<(usize, LoraGroup, PartRanks)>,
    num_layers: usize,
    /// Per [`LoraGroup`], its largest total rank over the layers.
    group_ranks: [usize; 4],
    /// Staged tensors per layer, in order (staging is layer-major): each layer is copied to
    /// the device on its own, so a step can start on the first layers before the last ones are
    /// there.
    layer_tensors: Vec<usize>,
    bytes: usize,
    staged: Arc<B::Staged>,
}

impl<B: Backend> StagedAdapter<B> {
    /// Convert and pack `weights` for `backend` (runs on the adapter loader threads).
    pub fn stage(backend: &B, weights: &LoraWeights) -> Result<Self, BackendError> {
        let mut groups = Vec::new();
        // Per group: the stacked A (its parts' A as pieces), then Bs.
        let mut tensors: Vec<Vec<HostTensor<'_>>> = Vec::new();
        let mut group_ranks = [0usize; 4];
        let mut layer_tensors = vec![0; weights.num_layers()];
        for (l, count) in layer_tensors.iter_mut().enumerate() {
            for g in LoraGroup::ALL {
                let mods: Vec<_> = g.parts().iter().map(|&p| weights.get(l, p)).collect();
                let present: Vec<_> = mods.iter().flatten().collect();
                if present.is_empty() {
                    continue;
                }
                let ranks: PartRanks = std::array::from_fn(|j| {
                    mods.get(j).and_then(|m| m.as_ref()).map_or(0, |m| m.rank)
                });
                let total = &mut group_ranks[g.index()];
                *total = (*total).max(ranks.iter().sum());
                groups.push((l, g, ranks));
                tensors.push(present.iter().map(|m| m.a.host()).collect());
                tensors.extend(present.iter().map(|m| vec![m.b.host()]));
                *count += 1 + present.len();
            }
        }
        let tensors: Vec<&[HostTensor<'_>]> = tensors.iter().map(Vec::as_slice).collect();
        let dtype = backend.dtype();
        let bytes = tensors
            .iter()
            .flat_map(|t| t.iter())
            .map(|p| p.len() * dtype.size())
            .sum();
        Ok(StagedAdapter {
            groups,
            num_layers: weights.num_layers(),
            group_ranks,
            layer_tensors,
            bytes,
            staged: Arc::new(backend.stage(dtype, &tensors)?),
        })
    }

    /// Bytes of its matrices.
    pub fn bytes(&self) -> usize {
        self.bytes
    }
}

impl<B: Backend> DeviceAdapter<B> {
    /// Copy a validated adapter to the device (in the backend's dtype).
    pub fn upload(backend: &B, weights: &LoraWeights) -> Result<Self, BackendError> {
        Self::from_staged(backend, &StagedAdapter::stage(backend, weights)?)
    }

    /// Copy a staged adapter to the device, one transfer per layer.
    pub fn from_staged(backend: &B, staged: &StagedAdapter<B>) -> Result<Self, BackendError> {
        let short = || BackendError::Shape("staged adapter has fewer tensors than groups".into());
        let mut bufs = backend
            .upload_staged(&staged.staged, &staged.layer_tensors)?
            .into_iter();
        let mut layers: Vec<[Option<DeviceLoraGroup<B>>; 4]> =
            (0..staged.num_layers).map(|_| Default::default()).collect();
        for &(l, g, ranks) in &staged.groups {
            let a = bufs.next().ok_or_else(short)?;
            let mut parts: [Option<(B::Buf, usize)>; MAX_GROUP_PARTS] = Default::default();
            for (part, &rank) in parts.iter_mut().zip(&ranks) {
                if rank > 0 {
                    *part = Some((bufs.next().ok_or_else(short)?, rank));
                }
            }
            let layer = layers.get_mut(l).ok_or_else(|| {
                BackendError::Shape(format!("staged group of layer {l} out of range"))
            })?;
            layer[g.index()] = Some(DeviceLoraGroup { a, parts });
        }
        Ok(DeviceAdapter {
            layers,
            group_ranks: staged.group_ranks,
            copied: std::sync::atomic::AtomicBool::new(false),
        })
    }

    /// Largest rank of a group (its parts' ranks summed): the width of its shrink's output.
    pub fn max_rank(&self) -> usize {
        self.group_ranks.into_iter().max().unwrap_or(0)
    }

    /// A buffer of its last layer: its layers are copied in order (see
    /// [`Backend::upload_staged`]), so the copy of that one completes last.
    fn last_buf(&self) -> Option<&B::Buf> {
        self.layers
            .iter()
            .rev()
            .flatten()
            .flatten()
            .next()
            .map(|g| &g.a)
    }

    /// Whether its upload to the device has completed. Asked for the adapters of every step:
    /// once the device said yes, the answer is kept.
    pub fn uploaded(&self, backend: &B) -> bool {
        use std::sync::atomic::Ordering::Relaxed;
        if self.copied.load(Relaxed) {
            return true;
        }
        let done = self.last_buf().is_none_or(|b| backend.upload_done(b));
        self.copied.store(done, Relaxed);
        done
    }
}

/// The adapters resident on the device, by slot, and the SGMV tables built from them.
///
/// Adapters placed in the model's LoRA arena ([`Llama::place_in_arena`]) also get a second set
/// of tables, whose slots' intermediates start at the columns the base GEMM writes them to:
/// after the group's outputs, at the adapter's first arena row.
pub struct LoraState<B: Backend> {
    num_layers: usize,
    slots: Vec<Option<DeviceAdapter<B>>>,
    /// Per layer, per [`LoraGroup`]: `None` when no resident adapter targets it.
    tables: Vec<[Option<B::LoraTable>; 4]>,
    max_rank: usize,
    /// Output columns of each group's base GEMM (where its arena columns start).
    group_out: [usize; 4],
    /// Per group, the arena rows and which adapter holds which.
    arena: [ArenaRows; 4],
    /// Per slot: where the adapter placed in the arena is.
    arena_at: Vec<Option<ArenaPlace>>,
    /// Per layer, per group: the tables of the arena-resident adapters.
    arena_tables: Vec<[Option<B::LoraTable>; 4]>,
}

/// Make `table` the slot table of `entries`: rebuilt where it is when there was one (the
/// CUDA backend keeps its address, so graphs recorded over it stay valid), `None` when no slot
/// has the group.
fn update_table<B: Backend>(
    backend: &B,
    table: &mut Option<B::LoraTable>,
    entries: &[Option<LoraGroupSlot<'_, B>>],
) -> Result<()> {
    if !entries.iter().any(Option::is_some) {
        *table = None;
        return Ok(());
    }
    match table {
        Some(t) => backend.update_lora_table(t, entries)?,
        None => *table = Some(backend.lora_table(entries)?),
    }
    Ok(())
}

/// Per group: `(first arena row, rows)` of an adapter's stacked A (`None`: it lacks the group).
type ArenaPlace = [Option<(usize, usize)>; 4];

/// One group's arena: `cap` rows, `taken` as `(first row, rows, slot)` sorted by first row.
#[derive(Debug, Default)]
struct ArenaRows {
    cap: usize,
    taken: Vec<(usize, usize, usize)>,
}

impl ArenaRows {
    /// The first gap of `rows` rows (first fit).
    fn find(&self, rows: usize) -> Option<usize> {
        let mut at = 0;
        for &(start, len, _) in &self.taken {
            if start - at >= rows {
                return Some(at);
            }
            at = start + len;
        }
        (self.cap - at >= rows).then_some(at)
    }

    fn take(&mut self, at: usize, rows: usize, slot: usize) {
        let i = self.taken.partition_point(|t| t.0 < at);
        self.taken.insert(i, (at, rows, slot));
    }

    fn free(&mut self, slot: usize) {
        self.taken.retain(|t| t.2 != slot);
    }
}

impl<B: Backend> LoraState<B> {
    /// `num_slots` empty slots for a model with `config`'s layers.
    pub fn new(config: &LlamaConfig, num_slots: usize) -> Self {
        LoraState {
            num_layers: config.num_hidden_layers,
            slots: (0..num_slots).map(|_| None).collect(),
            tables: (0..config.num_hidden_layers)
                .map(|_| Default::default())
                .collect(),
            max_rank: 0,
            group_out: LoraGroup::ALL.map(|g| config.group_dims(g).1.iter().sum()),
            arena: Default::default(),
            arena_at: (0..num_slots).map(|_| None).collect(),
            arena_tables: (0..config.num_hidden_layers)
                .map(|_| Default::default())
                .collect(),
        }
    }

    /// Use a model's LoRA arena of `rows` per group ([`Llama::arena_rows`]); empty slots only.
    pub fn set_arena(&mut self, rows: [usize; 4]) {
        for (a, &cap) in self.arena.iter_mut().zip(&rows) {
            *a = ArenaRows {
                cap,
                taken: Vec::new(),
            };
        }
        self.arena_at.iter_mut().for_each(|a| *a = None);
    }

    /// Whether the adapter in `slot` is in the arena.
    pub fn in_arena(&self, slot: usize) -> bool {
        self.arena_at.get(slot).is_some_and(Option::is_some)
    }

    /// Rows for an adapter of `ranks` (per group; 0: it lacks the group) in every group's
    /// arena, or `None` (nothing taken) when one has no room.
    fn arena_alloc(&mut self, slot: usize, ranks: [usize; 4]) -> Option<ArenaPlace> {
        let mut at = [None; 4];
        for (g, &r) in ranks.iter().enumerate() {
            if r > 0 {
                at[g] = Some((self.arena[g].find(r)?, r));
            }
        }
        for (g, a) in at.iter().enumerate() {
            if let Some((row, r)) = a {
                self.arena[g].take(*row, *r, slot);
            }
        }
        Some(at)
    }

    fn arena_free(&mut self, slot: usize) {
        if let Some(a) = self.arena_at.get_mut(slot)
            && a.take().is_some()
        {
            self.arena.iter_mut().for_each(|g| g.free(slot));
        }
    }

    /// For a step that can take its shrinks from the base GEMMs (at most [`ARENA_MAX_ROWS`]
    /// rows, every adapter in the arena): per group, the arena rows the GEMM covers, rounded
    /// up to a multiple of 8 within the arena. That is every placed adapter's rows, not only
    /// the step's, so that every slot of the arena tables has its columns in the output (the
    /// backends check the tables against the output's width).
    fn arena_ext(&self, meta: &StepMeta) -> Option<[usize; 4]> {
        if meta.rows() > ARENA_MAX_ROWS || meta.segments.is_empty() {
            return None;
        }
        for (_, _, slot) in meta.segments.iter() {
            self.arena_at.get(slot as usize)?.as_ref()?;
        }
        Some(self.arena.each_ref().map(|a| {
            let end = a.taken.last().map_or(0, |&(row, rows, _)| row + rows);
            end.next_multiple_of(8).min(a.cap)
        }))
    }

    /// Number of slots.
    pub fn num_slots(&self) -> usize {
        self.slots.len()
    }

    /// Whether `slot` holds an adapter.
    pub fn is_occupied(&self, slot: usize) -> bool {
        matches!(self.slots.get(slot), Some(Some(_)))
    }

    /// Largest total rank of a group over the resident adapters (0 when none): the width of
    /// the LoRA intermediate of a step.
    pub fn max_rank(&self) -> usize {
        self.max_rank
    }

    /// Put `adapter` into `slot` and rebuild the tables; returns the adapter it replaces. Call
    /// between steps.
    pub fn install(
        &mut self,
        backend: &B,
        slot: usize,
        adapter: DeviceAdapter<B>,
    ) -> Result<Option<DeviceAdapter<B>>> {
        if adapter.layers.len() != self.num_layers {
            return Err(ModelError::AdapterLayers {
                adapter: adapter.layers.len(),
                model: self.num_layers,
            });
        }
        let slots = self.slots.len();
        let entry = self
            .slots
            .get_mut(slot)
            .ok_or(ModelError::SlotOutOfRange { slot, slots })?;
        let old = entry.replace(adapter);
        self.arena_free(slot);
        self.rebuild(backend)?;
        Ok(old)
    }

    /// Copy a staged adapter to the device and install it into `slot`.
    pub fn load_staged(
        &mut self,
        backend: &B,
        slot: usize,
        staged: &StagedAdapter<B>,
    ) -> Result<Option<DeviceAdapter<B>>> {
        let adapter = DeviceAdapter::from_staged(backend, staged)?;
        self.install(backend, slot, adapter)
    }

    /// Upload `weights` and install them into `slot` (both steps of [`Self::install`]).
    pub fn load(
        &mut self,
        backend: &B,
        slot: usize,
        weights: &LoraWeights,
    ) -> Result<Option<DeviceAdapter<B>>> {
        let adapter = DeviceAdapter::upload(backend, weights)?;
        self.install(backend, slot, adapter)
    }

    /// Whether `slot` holds an adapter whose upload has completed (a step that uses it does
    /// not wait for the copy).
    pub fn slot_ready(&self, backend: &B, slot: usize) -> bool {
        self.slots
            .get(slot)
            .and_then(|s| s.as_ref())
            .is_some_and(|a| a.uploaded(backend))
    }

    /// Empty `slot` and rebuild the tables; returns its adapter. Call between steps.
    pub fn remove(&mut self, backend: &B, slot: usize) -> Result<Option<DeviceAdapter<B>>> {
        let slots = self.slots.len();
        let old = self
            .slots
            .get_mut(slot)
            .ok_or(ModelError::SlotOutOfRange { slot, slots })?
            .take();
        self.arena_free(slot);
        self.rebuild(backend)?;
        Ok(old)
    }

    fn rebuild(&mut self, backend: &B) -> Result<()> {
        self.max_rank = self
            .slots
            .iter()
            .flatten()
            .map(DeviceAdapter::max_rank)
            .max()
            .unwrap_or(0);
        for l in 0..self.num_layers {
            for g in LoraGroup::ALL {
                // `arena`: only the adapters in the arena, their intermediates where the base
                // GEMM writes them.
                let entries = |arena: bool| -> Vec<Option<LoraGroupSlot<'_, B>>> {
                    self.slots
                        .iter()
                        .zip(&self.arena_at)
                        .map(|(s, at)| {
                            let group = s.as_ref()?.layers[l][g.index()].as_ref()?;
                            let voff = if arena {
                                self.group_out[g.index()] + at.as_ref()?[g.index()]?.0
                            } else {
                                0
                            };
                            Some(LoraGroupSlot {
                                a: &group.a,
                                parts: std::array::from_fn(|j| {
                                    let (b, rank) = group.parts[j].as_ref()?;
                                    Some(LoraPart { b, rank: *rank })
                                }),
                                voff,
                            })
                        })
                        .collect()
                };
                update_table(backend, &mut self.tables[l][g.index()], &entries(false))?;
                update_table(
                    backend,
                    &mut self.arena_tables[l][g.index()],
                    &entries(true),
                )?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::backend::cpu::CpuBackend;

    #[test]
    fn a_staged_adapter_is_copied_layer_by_layer_in_staging_order() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
        let config =
            LlamaConfig::from_file(&dir.join("tests/fixtures/golden/untied/config.json")).unwrap();
        let weights =
            crate::engine::synthetic::random_lora_weights(&config, &[(4, 0.1)], 3).unwrap();
        let backend = CpuBackend::new();
        let staged = StagedAdapter::stage(&backend, &weights[0]).unwrap();
        // Every projection targeted: per layer, four stacked As and the seven Bs.
        assert_eq!(staged.layer_tensors, vec![11; config.num_hidden_layers]);
        assert_eq!(
            staged.layer_tensors.iter().sum::<usize>(),
            staged.staged.len()
        );
        assert!(
            staged
                .groups
                .windows(2)
                .all(|w| (w[0].0, w[0].1.index()) < (w[1].0, w[1].1.index())),
            "layer-major: each layer's tensors are one run"
        );
    }

    #[test]
    fn arena_rows_are_taken_first_fit_and_freed_by_slot() {
        let mut a = ArenaRows {
            cap: 64,
            taken: Vec::new(),
        };
        assert_eq!(a.find(16), Some(0));
        a.take(0, 16, 3);
        assert_eq!(a.find(32), Some(16));
        a.take(16, 32, 5);
        a.take(48, 16, 1);
        assert_eq!(a.find(1), None);
        a.free(5);
        // The hole left by slot 5, first fit.
        assert_eq!(a.find(8), Some(16));
        assert_eq!(a.find(32), Some(16));
        assert_eq!(a.find(33), None);
        a.free(3);
        assert_eq!(a.find(48), Some(0));
        assert_eq!(a.taken, vec![(48, 16, 1)]);
    }

    #[test]
    fn a_step_uses_the_arena_only_when_all_its_adapters_are_there_and_it_is_small() {
        let config = LlamaConfig::synthetic("llama-7b").unwrap();
        let mut lora = LoraState::<CpuBackend>::new(&config, 4);
        lora.set_arena([48, 16, 32, 16]);
        // An adapter with rank 8 on every part, one with rank 4 on the attention only, one
        // that does not fit q|k|v.
        let a = lora.arena_alloc(0, [24, 8, 16, 8]).unwrap();
        assert_eq!(
            a,
            [Some((0, 24)), Some((0, 8)), Some((0, 16)), Some((0, 8))]
        );
        lora.arena_at[0] = Some(a);
        let b = lora.arena_alloc(2, [12, 4, 0, 0]).unwrap();
        assert_eq!(b, [Some((24, 12)), Some((8, 4)), None, None]);
        lora.arena_at[2] = Some(b);
        assert_eq!(lora.arena_alloc(1, [16, 0, 0, 0]), None);
        // Nothing was taken for the adapter that did not fit.
        assert_eq!(lora.arena[1].taken.len(), 2);

        let step = |rows: &[Option<u32>]| StepMeta {
            segments: SegmentTable::from_row_slots(rows),
            ..StepMeta::one_sequence(rows.len())
        };
        // Covered up to the last placed adapter's rows, rounded to 8 within the arena.
        assert_eq!(
            lora.arena_ext(&step(&[Some(0), Some(2), None])),
            Some([40, 16, 16, 8])
        );
        // Every placed adapter's rows, whichever the step uses.
        assert_eq!(lora.arena_ext(&step(&[Some(2)])), Some([40, 16, 16, 8]));
        // A slot outside the arena, no adapter at all, or a prefill-sized step: the shrinks.
        assert_eq!(lora.arena_ext(&step(&[Some(0), Some(1)])), None);
        assert_eq!(lora.arena_ext(&step(&[None, None])), None);
        assert_eq!(
            lora.arena_ext(&step(&vec![Some(0); ARENA_MAX_ROWS + 1])),
            None
        );
        lora.arena_free(2);
        assert!(!lora.in_arena(2) && lora.in_arena(0));
        assert_eq!(lora.arena[0].find(24), Some(24));
    }
}
