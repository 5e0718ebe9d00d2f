//! A tiny Llama model folder and PEFT adapters for it, generated from a seed: config.json,
//! model.safetensors (f32, random), a byte-level BPE tokenizer.json with ChatML special tokens,
//! and tokenizer_config.json with a ChatML chat template. Big enough to exercise every path of
//! the service, small enough that the CPU engine answers in milliseconds.
//!
//! The special tokens' embedding rows are zero, and the embedding is tied to the output, so
//! their logits are exactly 0 while ordinary tokens' are not: greedy decoding never emits EOS,
//! and every greedy generation runs to `max_tokens` (quota tests count on exact lengths).

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use safetensors::Dtype;
use safetensors::tensor::TensorView;
use serde_json::json;

pub const HIDDEN: usize = 64;
pub const INTERMEDIATE: usize = 128;
pub const LAYERS: usize = 2;
pub const HEADS: usize = 4;
pub const KV_HEADS: usize = 2;
pub const HEAD_DIM: usize = HIDDEN / HEADS;
pub const SPECIAL: [&str; 3] = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"];
pub const VOCAB: usize = 256 + SPECIAL.len();
pub const CONTEXT: usize = 512;

/// Deterministic pseudo-random numbers (SplitMix64).
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed)
    }

    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [-scale, scale).
    pub fn uniform(&mut self, scale: f32) -> f32 {
        let unit = (self.next_u64() >> 40) as f32 / (1u64 << 24) as f32;
        (unit * 2.0 - 1.0) * scale
    }

    pub fn tensor(&mut self, len: usize, scale: f32) -> Vec<f32> {
        (0..len).map(|_| self.uniform(scale)).collect()
    }
}

fn f32_bytes(values: &[f32]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_le_bytes()).collect()
}

/// Writes named f32 tensors as a safetensors file.
pub fn write_safetensors(path: &Path, tensors: &[(String, Vec<usize>, Vec<f32>)]) {
    let bytes: Vec<(String, Vec<usize>, Vec<u8>)> = tensors
        .iter()
        .map(|(name, shape, values)| (name.clone(), shape.clone(), f32_bytes(values)))
        .collect();
    let views: Vec<(String, TensorView<'_>)> = bytes
        .iter()
        .map(|(name, shape, data)| {
            (
                name.clone(),
                TensorView::new(Dtype::F32, shape.clone(), data).expect("valid tensor view"),
            )
        })
        .collect();
    safetensors::serialize_to_file(views, None, path).expect("write safetensors");
}

/// GPT-2's byte -> printable character map.
fn bytes_to_unicode() -> Vec<char> {
    let mut printable: Vec<u32> = ('!' as u32..='~' as u32)
        .chain('¡' as u32..='¬' as u32)
        .chain('®' as u32..='ÿ' as u32)
        .collect();
    let mut map = vec!['\0'; 256];
    for &b in &printable {
        map[b as usize] = char::from_u32(b).expect("printable");
    }
    let mut extra = 0;
    for b in 0..256u32 {
        if !printable.contains(&b) {
            map[b as usize] = char::from_u32(256 + extra).expect("mapped");
            extra += 1;
        }
    }
    printable.clear();
    map
}

fn tokenizer_json() -> serde_json::Value {
    let mut vocab = BTreeMap::new();
    for (id, token) in SPECIAL.iter().enumerate() {
        vocab.insert(token.to_string(), id);
    }
    for (byte, ch) in bytes_to_unicode().into_iter().enumerate() {
        vocab.insert(ch.to_string(), SPECIAL.len() + byte);
    }
    let added: Vec<serde_json::Value> = SPECIAL
        .iter()
        .enumerate()
        .map(|(id, token)| {
            json!({"id": id, "content": token, "single_word": false, "lstrip": false,
                   "rstrip": false, "normalized": false, "special": true})
        })
        .collect();
    json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true},
        "post_processor": null,
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {
            "type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
            "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false,
            "ignore_merges": false, "vocab": vocab, "merges": []
        }
    })
}

const CHAT_TEMPLATE: &str = "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

/// Writes the tiny model into `dir` (created) and returns it.
pub fn write_tiny_model(dir: &Path) -> PathBuf {
    std::fs::create_dir_all(dir).expect("create model dir");
    let config = json!({
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": HIDDEN,
        "intermediate_size": INTERMEDIATE,
        "num_hidden_layers": LAYERS,
        "num_attention_heads": HEADS,
        "num_key_value_heads": KV_HEADS,
        "head_dim": HEAD_DIM,
        "vocab_size": VOCAB,
        "max_position_embeddings": CONTEXT,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "tie_word_embeddings": true,
        "torch_dtype": "float32",
        "hidden_act": "silu",
        "bos_token_id": 1,
        "eos_token_id": 2
    });
    std::fs::write(dir.join("config.json"), config.to_string()).expect("write config.json");
    std::fs::write(dir.join("tokenizer.json"), tokenizer_json().to_string())
        .expect("write tokenizer.json");
    let tokenizer_config = json!({
        "chat_template": CHAT_TEMPLATE,
        "bos_token": "<|im_start|>",
        "eos_token": "<|im_end|>",
        "pad_token": "<|im_end|>",
        "unk_token": "<|endoftext|>",
        "add_bos_token": false,
        "add_eos_token": false,
        "model_max_length": CONTEXT
    });
    std::fs::write(
        dir.join("tokenizer_config.json"),
        tokenizer_config.to_string(),
    )
    .expect("write tokenizer_config.json");

    let mut rng = Rng::new(42);
    let mut tensors = Vec::new();
    let mut embed = rng.tensor(VOCAB * HIDDEN, 0.5);
    // Special tokens never win a greedy pick (see the module docs).
    for value in &mut embed[..SPECIAL.len() * HIDDEN] {
        *value = 0.0;
    }
    tensors.push((
        "model.embed_tokens.weight".into(),
        vec![VOCAB, HIDDEN],
        embed,
    ));
    let kv = KV_HEADS * HEAD_DIM;
    for layer in 0..LAYERS {
        let p = |name: &str| format!("model.layers.{layer}.{name}");
        tensors.push((p("input_layernorm.weight"), vec![HIDDEN], vec![1.0; HIDDEN]));
        tensors.push((
            p("post_attention_layernorm.weight"),
            vec![HIDDEN],
            vec![1.0; HIDDEN],
        ));
        for (name, rows, cols) in [
            ("self_attn.q_proj.weight", HIDDEN, HIDDEN),
            ("self_attn.k_proj.weight", kv, HIDDEN),
            ("self_attn.v_proj.weight", kv, HIDDEN),
            ("self_attn.o_proj.weight", HIDDEN, HIDDEN),
            ("mlp.gate_proj.weight", INTERMEDIATE, HIDDEN),
            ("mlp.up_proj.weight", INTERMEDIATE, HIDDEN),
            ("mlp.down_proj.weight", HIDDEN, INTERMEDIATE),
        ] {
            tensors.push((p(name), vec![rows, cols], rng.tensor(rows * cols, 0.2)));
        }
    }
    tensors.push(("model.norm.weight".into(), vec![HIDDEN], vec![1.0; HIDDEN]));
    write_safetensors(&dir.join("model.safetensors"), &tensors);
    dir.to_owned()
}

/// The two files of a PEFT LoRA adapter, in memory.
pub struct AdapterFiles {
    pub config: Vec<u8>,
    pub weights: Vec<u8>,
}

/// A valid rank-`rank` adapter on q_proj and v_proj of every layer; `seed` varies the weights.
pub fn adapter(rank: usize, seed: u64) -> AdapterFiles {
    adapter_with(rank, rank, seed, &["q_proj", "v_proj"])
}

/// An adapter whose config says `config_rank` while its tensors have `tensor_rank`.
pub fn adapter_with(
    config_rank: usize,
    tensor_rank: usize,
    seed: u64,
    targets: &[&str],
) -> AdapterFiles {
    let config = json!({
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": "tiny",
        "r": config_rank,
        "lora_alpha": 2 * config_rank,
        "lora_dropout": 0.0,
        "target_modules": targets,
        "bias": "none",
        "fan_in_fan_out": false,
        "modules_to_save": null
    });
    let mut rng = Rng::new(seed);
    let kv = KV_HEADS * HEAD_DIM;
    let mut tensors = Vec::new();
    for layer in 0..LAYERS {
        for target in targets {
            let out = match *target {
                "k_proj" | "v_proj" => kv,
                "gate_proj" | "up_proj" => INTERMEDIATE,
                _ => HIDDEN,
            };
            let parent = match *target {
                "gate_proj" | "up_proj" | "down_proj" => "mlp",
                _ => "self_attn",
            };
            let prefix = format!("base_model.model.model.layers.{layer}.{parent}.{target}");
            tensors.push((
                format!("{prefix}.lora_A.weight"),
                vec![tensor_rank, HIDDEN],
                rng.tensor(tensor_rank * HIDDEN, 0.5),
            ));
            tensors.push((
                format!("{prefix}.lora_B.weight"),
                vec![out, tensor_rank],
                rng.tensor(out * tensor_rank, 0.5),
            ));
        }
    }
    let dir = std::env::temp_dir().join(format!("punica-adapter-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&dir).expect("adapter temp dir");
    let path = dir.join("adapter_model.safetensors");
    write_safetensors(&path, &tensors);
    let weights = std::fs::read(&path).expect("read adapter weights");
    std::fs::remove_dir_all(&dir).expect("remove adapter temp dir");
    AdapterFiles {
        config: serde_json::to_vec(&config).expect("adapter config json"),
        weights,
    }
}
