//! The real demo model (MODEL.md): SmolLM2-135M-Instruct imported from its GGUF by
//! scripts/fetch-demo-model.sh, run on the f32 CPU backend.

use std::sync::Arc;

use punica::engine::backend::cpu::CpuBackend;
use punica::engine::model::llama::{KvCache, Llama, LoraState};

use crate::demo_model::demo_model_dir;

#[test]
fn smollm2_continues_the_capital_of_france_with_paris_on_the_f32_cpu_path() {
    let backend = Arc::new(CpuBackend::new());
    let model = Llama::load(backend.clone(), demo_model_dir()).unwrap();
    let config = model.config();
    assert_eq!(
        (
            config.num_hidden_layers,
            config.num_key_value_heads,
            config.vocab_size
        ),
        (30, 3, 49152)
    );
    assert!(config.tie_word_embeddings);
    let lora = LoraState::new(config, 0);
    let mut kv = KvCache::new(backend.as_ref(), config, 1).unwrap();
    let prompt = vec![504, 3575, 282, 4649, 314];
    let out = model
        .generate_greedy(&mut kv, &lora, &[(prompt, None)], 5)
        .unwrap();
    assert_eq!(out[0], vec![7042, 30, 198, 198, 504]);
}
