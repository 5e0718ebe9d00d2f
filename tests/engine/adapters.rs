//! Real PEFT adapter files (the golden fixtures), damaged in each way the validator must name,
//! and adapter slots changing between steps.

use std::path::PathBuf;
use std::sync::Arc;

use punica::engine::backend::cpu::CpuBackend;
use punica::engine::backend::{SeqStep, StepMeta};
use punica::engine::lora::peft::{LoraWeights, PeftError};
use punica::engine::model::config::LlamaConfig;
use punica::engine::model::llama::{KvCache, Llama, LoraState, ModelError};

fn golden(path: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/golden")
        .join(path)
}

fn base(model: &str) -> LlamaConfig {
    LlamaConfig::from_file(&golden(model).join("config.json")).unwrap()
}

fn files(adapter: &str) -> (Vec<u8>, Vec<u8>) {
    let dir = golden(adapter);
    (
        std::fs::read(dir.join("adapter_config.json")).unwrap(),
        std::fs::read(dir.join("adapter_model.safetensors")).unwrap(),
    )
}

#[test]
fn a_real_adapter_whose_config_rank_differs_from_its_tensors_is_rejected_with_both_ranks() {
    let (config, tensors) = files("untied/adapters/qv_r8");
    let mut json: serde_json::Value = serde_json::from_slice(&config).unwrap();
    json["r"] = 4.into();
    let err = LoraWeights::from_bytes(json.to_string().as_bytes(), &tensors, &base("untied"))
        .unwrap_err();
    assert!(
        matches!(
            err,
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
fn a_truncated_real_adapter_file_reports_its_length_and_the_length_its_header_needs() {
    let (config, tensors) = files("untied/adapters/all_r4_rslora");
    let cut = &tensors[..tensors.len() / 2];
    let err = LoraWeights::from_bytes(&config, cut, &base("untied")).unwrap_err();
    assert!(
        matches!(err, PeftError::Truncated { len, needed } if len as usize == cut.len() && needed as usize == tensors.len()),
        "{err}"
    );
}

#[test]
fn a_nan_inside_a_real_adapter_is_found_with_its_tensor_and_index() {
    let (config, mut tensors) = files("untied/adapters/qv_r8");
    // The last four bytes are the last f32 value of the last tensor in the data section.
    let at = tensors.len() - 4;
    tensors[at..].copy_from_slice(&f32::NAN.to_le_bytes());
    let err = LoraWeights::from_bytes(&config, &tensors, &base("untied")).unwrap_err();
    assert!(
        matches!(err, PeftError::NonFinite { ref name, .. } if name.contains("lora_")),
        "{err}"
    );
}

#[test]
fn an_adapter_trained_for_another_base_model_is_rejected() {
    // Trained on the untied model (2 KV heads: k_proj gives 32 features); the tied model has one
    // KV head of 16.
    let (config, tensors) = files("untied/adapters/all_r4_rslora");
    let err = LoraWeights::from_bytes(&config, &tensors, &base("tied")).unwrap_err();
    assert!(
        matches!(err, PeftError::Shape { ref name, ref expected, ref got } if name.contains("k_proj.lora_B") && expected == &[16, 4] && got == &[32, 4]),
        "{err}"
    );
}

#[test]
fn removing_an_adapter_frees_its_slot_and_a_step_that_still_uses_it_is_refused() {
    let backend = Arc::new(CpuBackend::new());
    let model = Llama::load(backend.clone(), &golden("untied")).unwrap();
    let weights = LoraWeights::from_dir(&golden("untied/adapters/qv_r8"), model.config()).unwrap();
    let mut lora = LoraState::new(model.config(), 2);
    assert!(lora.load(backend.as_ref(), 1, &weights).unwrap().is_none());
    // q and v at rank 8 share one q|k|v group: its shrink is 16 wide.
    assert_eq!(lora.max_rank(), 16);
    let prompt = [5u32, 6, 7];
    let table = [0u32];
    let meta = StepMeta::build(&[SeqStep {
        tokens: &prompt,
        cached: 0,
        block_table: &table,
        adapter_slot: Some(1),
        sample: true,
    }])
    .unwrap();
    let mut kv = KvCache::new(backend.as_ref(), model.config(), 1).unwrap();
    let with_adapter = model.forward(&meta, &mut kv, &lora).unwrap();
    assert!(lora.remove(backend.as_ref(), 1).unwrap().is_some());
    assert!(!lora.is_occupied(1));
    assert_eq!(lora.max_rank(), 0);
    let err = model.forward(&meta, &mut kv, &lora).unwrap_err();
    assert!(matches!(err, ModelError::EmptySlot { slot: 1 }), "{err}");
    let err = lora.load(backend.as_ref(), 2, &weights).unwrap_err();
    assert!(
        matches!(err, ModelError::SlotOutOfRange { slot: 2, slots: 2 }),
        "{err}"
    );
    // Installed again in another slot, it computes the same logits.
    lora.load(backend.as_ref(), 0, &weights).unwrap();
    let meta = StepMeta::build(&[SeqStep {
        tokens: &prompt,
        cached: 0,
        block_table: &table,
        adapter_slot: Some(0),
        sample: true,
    }])
    .unwrap();
    assert_eq!(model.forward(&meta, &mut kv, &lora).unwrap(), with_adapter);
}
