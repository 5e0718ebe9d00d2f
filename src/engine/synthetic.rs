//! Synthetic LoRA adapters for a base model's shapes, written as real PEFT files
//! (`adapter_config.json` + `adapter_model.safetensors`) so that benches and tests exercise the
//! same validation and loading path as uploaded adapters.

use safetensors::Dtype;
use safetensors::tensor::TensorView;

use crate::engine::backend::random_uniform;
use crate::engine::bench::BenchRng;
use crate::engine::lora::cache::AdapterFiles;
use crate::engine::lora::peft::{LoraWeights, PeftError, module_key};
use crate::engine::model::config::{LlamaConfig, Projection};

/// Why a synthetic adapter could not be written.
#[derive(Debug, thiserror::Error)]
pub enum SyntheticError {
    #[error("rank must be at least 1")]
    ZeroRank,
    #[error("safetensors serialisation failed: {0}")]
    Serialize(String),
    #[error("the adapter does not validate: {0}")]
    Invalid(#[from] PeftError),
}

/// A random rank-`rank` adapter on all seven projections of every layer: `A` uniform with
/// variance `1/in`, `B` uniform with standard deviation `b_std`, alpha = 2·rank, so the delta is large enough to change a model's tokens
/// when `b_std` is around 0.1-1 (tests) and realistic when small (benches).
pub fn random_adapter(
    config: &LlamaConfig,
    rank: usize,
    b_std: f32,
    seed: u64,
) -> Result<AdapterFiles, SyntheticError> {
    if rank == 0 {
        return Err(SyntheticError::ZeroRank);
    }
    // Stream `i` of [`random_uniform`] fills the i-th tensor (fast: adapters of 7B shapes have
    // tens of millions of values).
    let mut stream = BenchRng::new(seed).next_u64() as u32;
    let mut uniform = |len: usize, std: f32| -> Vec<f32> {
        let scale = std * 3f32.sqrt();
        stream = stream.wrapping_add(1);
        (0..len)
            .map(|i| random_uniform(stream, i) * scale)
            .collect()
    };
    let mut tensors: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::new();
    for layer in 0..config.num_hidden_layers {
        for p in Projection::ALL {
            let (h_in, h_out) = config.projection_dims(p);
            let key = format!("base_model.model.{}", module_key(layer, p));
            let a_std = 1.0 / (h_in as f32).sqrt();
            let a = uniform(rank * h_in, a_std);
            let b = uniform(h_out * rank, b_std);
            tensors.push((
                format!("{key}.lora_A.weight"),
                vec![rank, h_in],
                bytemuck::cast_slice(&a).to_vec(),
            ));
            tensors.push((
                format!("{key}.lora_B.weight"),
                vec![h_out, rank],
                bytemuck::cast_slice(&b).to_vec(),
            ));
        }
    }
    let views = tensors
        .iter()
        .map(|(name, shape, data)| {
            TensorView::new(Dtype::F32, shape.clone(), data)
                .map(|v| (name.clone(), v))
                .map_err(|e| SyntheticError::Serialize(e.to_string()))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let weights = safetensors::serialize(views, None)
        .map_err(|e| SyntheticError::Serialize(e.to_string()))?;
    let targets: Vec<&str> = Projection::ALL.iter().map(|p| p.module_name()).collect();
    let config = serde_json::json!({
        "peft_type": "LORA",
        "r": rank,
        "lora_alpha": 2 * rank,
        "target_modules": targets,
        "bias": "none",
        "use_rslora": false,
    });
    Ok(AdapterFiles {
        config: config.to_string().into_bytes().into(),
        weights: weights.into(),
    })
}

/// Random adapters of `(rank, B's standard deviation)` on every projection of `config`'s model
/// (see [`random_adapter`]), parsed and validated as a tenant's upload would be; adapter `i`
/// from seed `seed + i`.
pub fn random_lora_weights(
    config: &LlamaConfig,
    specs: &[(usize, f32)],
    seed: u64,
) -> Result<Vec<LoraWeights>, SyntheticError> {
    specs
        .iter()
        .enumerate()
        .map(|(i, &(rank, b_std))| {
            let files = random_adapter(config, rank, b_std, seed.wrapping_add(i as u64))?;
            Ok(LoraWeights::from_bytes(
                &files.config,
                &files.weights,
                config,
            )?)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The tiny Llama of the golden fixtures.
    fn tiny() -> LlamaConfig {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
        LlamaConfig::from_file(&dir.join("tests/fixtures/golden/untied/config.json")).unwrap()
    }

    #[test]
    fn random_adapters_validate_with_their_ranks_and_repeat_per_seed() {
        let c = tiny();
        let a = random_lora_weights(&c, &[(4, 0.1), (8, 0.2)], 5).unwrap();
        assert_eq!(a.iter().map(|w| w.max_rank()).collect::<Vec<_>>(), [4, 8]);
        let bytes = |seed| random_adapter(&c, 4, 0.1, seed).unwrap().weights;
        assert_eq!(bytes(5), bytes(5));
        assert_ne!(bytes(5), bytes(6));
        assert!(matches!(
            random_lora_weights(&c, &[(0, 0.1)], 5),
            Err(SyntheticError::ZeroRank)
        ));
    }
}
