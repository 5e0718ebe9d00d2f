//! Whole-model parity (`punica selftest --device cuda --model DIR`): the same model on the CUDA
//! backend (bf16) and the CPU backend (f32, the oracle) must pick the same greedy tokens for 32
//! decode steps, on several prompts, with and without adapters, all in one batch (so the SGMV
//! segments and paged attention over several sequences are exercised together).
//!
//! Load the model in bf16 (`punica model import-gguf --dtype bf16`) so both backends start from
//! the same weights; the remaining differences are bf16 activations on the GPU. The CPU
//! generates freely; the GPU is teacher-forced with the CPU's tokens, so every one of its steps
//! sees the same prefix as the CPU's and each step is compared on its own (a rounding flip at
//! one step does not turn the rest of the sequence into a different text). A step where the
//! picks differ is reported with the CPU's top-two logit gap there: a near-tie (gap below
//! [`near_tie`]) is a rounding difference; any other is a bug. The check passes when no step
//! has a real mismatch, near-tie flips are at most [`MAX_FLIP_SHARE`] of the steps, and the
//! adapters changed at least one sequence (so LoRA was exercised).

use std::path::Path;
use std::sync::Arc;

use crate::engine::backend::cpu::CpuBackend;
use crate::engine::backend::{BLOCK_SIZE, Backend, BackendError, Result};
use crate::engine::lora::peft::LoraWeights;
use crate::engine::model::llama::{KvCache, Llama, LoraState, batch_step_meta};
use crate::engine::model::tokenizer::Tokenizer;
use crate::engine::synthetic::random_lora_weights;

use super::{CudaBackend, CudaOptions};

/// Greedy steps compared per sequence.
pub const STEPS: usize = 32;

/// A top-two logit gap below this share of the top logit's magnitude (or below
/// [`NEAR_TIE_ABS`]) makes a divergence a near-tie: bf16 keeps 8 significant bits (0.4%), and
/// the activations of every layer are rounded to it.
pub const NEAR_TIE_REL: f32 = 0.01;

/// The absolute floor of a near-tie, in logits.
pub const NEAR_TIE_ABS: f32 = 0.05;

/// The largest top-two gap that is a near-tie when the top logit is `top`.
pub fn near_tie(top: f32) -> f32 {
    (NEAR_TIE_REL * top.abs()).max(NEAR_TIE_ABS)
}

/// Largest share of all compared steps whose picks may differ at a near-tie.
pub const MAX_FLIP_SHARE: f64 = 0.05;

const PROMPTS: [&str; 4] = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a small village,",
    "List three primary colors:",
];

fn err(what: &str, e: impl std::fmt::Display) -> BackendError {
    BackendError::Shape(format!("{what}: {e}"))
}

/// One step's greedy pick: the first largest logit, its value and its gap to the second.
#[derive(Clone, Copy, Debug, PartialEq)]
struct StepPick {
    token: u32,
    top: f32,
    gap: f32,
}

impl StepPick {
    fn of(logits: &[f32]) -> StepPick {
        let (mut best, mut second) = (0usize, None::<usize>);
        for (i, &v) in logits.iter().enumerate().skip(1) {
            if v > logits[best] {
                second = Some(best);
                best = i;
            } else if second.is_none_or(|s| v > logits[s]) {
                second = Some(i);
            }
        }
        let top = logits.get(best).copied().unwrap_or(0.0);
        StepPick {
            token: best as u32,
            top,
            gap: second.map_or(f32::INFINITY, |s| top - logits[s]),
        }
    }
}

/// One backend's run: load, install the adapters (with `arena`, in a LoRA arena as the CUDA
/// executor has one, so decode steps take their shrinks from the base GEMMs), then [`STEPS`]
/// steps of the whole batch; after the prompt, each sequence's input is its own last pick, or
/// with `forced` the token `forced[i]` has at that step (teacher forcing).
fn run_steps<B: Backend>(
    backend: Arc<B>,
    dir: &Path,
    adapters: &[LoraWeights],
    requests: &[(Vec<u32>, Option<u32>)],
    forced: Option<&[Vec<StepPick>]>,
    arena: bool,
) -> Result<Vec<Vec<StepPick>>> {
    let mut model = Llama::load(backend, dir).map_err(|e| err("loading the model", e))?;
    let b = Arc::clone(model.backend());
    let vocab = model.config().vocab_size;
    let longest = requests.iter().map(|(p, _)| p.len()).max().unwrap_or(0);
    let per_seq = (longest + STEPS).div_ceil(BLOCK_SIZE);
    let mut kv = KvCache::new(b.as_ref(), model.config(), requests.len() * per_seq)
        .map_err(|e| err("KV", e))?;
    let mut lora = LoraState::new(model.config(), adapters.len());
    if arena {
        let rank = adapters
            .iter()
            .map(LoraWeights::max_rank)
            .max()
            .unwrap_or(0);
        model
            .reserve_lora_arena(Llama::<B>::arena_rows_for(adapters.len(), rank))
            .map_err(|e| err("reserving the LoRA arena", e))?;
        lora.set_arena(model.arena_rows());
    }
    for (slot, w) in adapters.iter().enumerate() {
        lora.load(b.as_ref(), slot, w)
            .map_err(|e| err("installing an adapter", e))?;
        if arena
            && !model
                .place_in_arena(&mut lora, slot)
                .map_err(|e| err("arena", e))?
        {
            return Err(err("arena", "an adapter found no room"));
        }
    }
    let tables: Vec<Vec<u32>> = (0..requests.len())
        .map(|i| ((i * per_seq) as u32..((i + 1) * per_seq) as u32).collect())
        .collect();
    let mut picks: Vec<Vec<StepPick>> = vec![Vec::new(); requests.len()];
    let mut cached = vec![0usize; requests.len()];
    for step in 0..STEPS {
        let inputs: Vec<Vec<u32>> = (0..requests.len())
            .map(|i| match step {
                0 => requests[i].0.clone(),
                _ => {
                    let prev = forced.map_or(&picks[i], |f| &f[i]);
                    vec![prev[step - 1].token]
                }
            })
            .collect();
        let meta = batch_step_meta(requests, &inputs, &cached, &tables)?;
        let logits = model
            .forward(&meta, &mut kv, &lora)
            .map_err(|e| err("forward", e))?;
        for (i, row) in logits.chunks(vocab).take(requests.len()).enumerate() {
            picks[i].push(StepPick::of(row));
            cached[i] += inputs[i].len();
        }
    }
    Ok(picks)
}

/// Run the parity check on the model in `dir`; prints a report and returns whether it passed.
pub fn run(dir: &Path, seed: u64) -> Result<bool> {
    let tokenizer = Tokenizer::from_dir(dir).map_err(|e| err("tokenizer", e))?;
    let cuda = Arc::new(CudaBackend::new(CudaOptions::default())?);
    let config = crate::engine::model::config::LlamaConfig::from_file(&dir.join("config.json"))
        .map_err(|e| err("config", e))?;
    // Two adapters strong enough to change the tokens, rank 8 and 16 on every projection.
    let adapters = random_lora_weights(&config, &[(8, 0.05), (16, 0.03)], seed)
        .map_err(|e| err("adapter", e))?;
    let mut requests = Vec::new();
    for text in PROMPTS {
        let ids = tokenizer
            .encode(text, true)
            .map_err(|e| err("tokenizing", e))?;
        for slot in [None, Some(0), Some(1)] {
            requests.push((ids.clone(), slot));
        }
    }
    let cpu = Arc::new(CpuBackend::new());
    let on_cpu = run_steps(cpu, dir, &adapters, &requests, None, false)?;
    let on_gpu = run_steps(cuda, dir, &adapters, &requests, Some(&on_cpu), true)?;

    println!(
        "\n## Whole-model parity: {} on CUDA (bf16, adapters in the LoRA arena, teacher-forced with the CPU's tokens) vs CPU (f32), {} sequences in one batch, {STEPS} greedy steps\n",
        dir.display(),
        requests.len()
    );
    println!("| prompt | adapter | same pick | steps that differ (CPU top-2 gap / top logit) |");
    println!("|---|---|---|---|");
    let (mut ok, mut flips, mut steps) = (true, 0usize, 0usize);
    let mut adapter_changed = false;
    let tokens = |picks: &[StepPick]| picks.iter().map(|p| p.token).collect::<Vec<_>>();
    for (i, ((_, slot), (g, c))) in requests.iter().zip(on_gpu.iter().zip(&on_cpu)).enumerate() {
        let text = PROMPTS[i / 3];
        let adapter = slot.map_or("none".to_string(), |s| format!("slot {s}"));
        if slot.is_some() && tokens(&on_cpu[i - i % 3]) != tokens(c) {
            adapter_changed = true;
        }
        let mut same = 0usize;
        let mut notes = Vec::new();
        for (step, (gp, cp)) in g.iter().zip(c).enumerate() {
            steps += 1;
            if gp.token == cp.token {
                same += 1;
                continue;
            }
            let kind = if cp.gap < near_tie(cp.top) {
                flips += 1;
                "near-tie"
            } else {
                ok = false;
                "MISMATCH"
            };
            notes.push(format!(
                "step {step}: GPU {} vs CPU {} ({:.4} / {:.2}, {kind})",
                gp.token, cp.token, cp.gap, cp.top
            ));
        }
        let notes = if notes.is_empty() {
            "-".to_string()
        } else {
            notes.join("; ")
        };
        println!("| {text:?} | {adapter} | {same} / {STEPS} | {notes} |");
    }
    let share = flips as f64 / steps.max(1) as f64;
    println!(
        "\n{flips} of {steps} steps differ, all at near-ties (CPU top-2 gap < max({NEAR_TIE_ABS}, {NEAR_TIE_REL} x |top logit|)) when the check passes; at most {:.0}% may",
        MAX_FLIP_SHARE * 100.0
    );
    if share > MAX_FLIP_SHARE {
        ok = false;
    }
    if !adapter_changed {
        println!("\nthe adapters changed no sequence's tokens: the check did not exercise LoRA");
        ok = false;
    }
    println!("\nwhole-model parity: {}", if ok { "pass" } else { "FAIL" });
    Ok(ok)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_near_tie_scales_with_the_top_logit_above_an_absolute_floor() {
        assert_eq!(near_tie(0.0), NEAR_TIE_ABS);
        assert_eq!(near_tie(2.0), NEAR_TIE_ABS);
        assert!((near_tie(15.0) - 0.15).abs() < 1e-6);
        assert!((near_tie(-20.0) - 0.2).abs() < 1e-6);
    }

    #[test]
    fn a_step_pick_is_the_first_largest_logit_and_its_gap_to_the_runner_up() {
        let p = StepPick::of(&[1.0, 3.0, 2.5, 3.0]);
        assert_eq!(p.token, 1);
        assert_eq!((p.top, p.gap), (3.0, 0.0));
        let p = StepPick::of(&[4.0, 1.0, 2.0]);
        assert_eq!((p.token, p.top, p.gap), (0, 4.0, 2.0));
        assert_eq!(StepPick::of(&[7.0]).gap, f32::INFINITY);
    }
}
