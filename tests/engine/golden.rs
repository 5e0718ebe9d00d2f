//! The CPU backend against Hugging Face transformers + PEFT: tiny random Llamas and PEFT adapters
//! built by scripts/golden/make_fixtures.py, with their reference logits (float64) and greedy
//! tokens in tests/fixtures/golden/manifest.json.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use punica::engine::backend::cpu::CpuBackend;
use punica::engine::backend::{BLOCK_SIZE, SeqStep, StepMeta, decode_bucket};
use punica::engine::lora::peft::LoraWeights;
use punica::engine::model::llama::{KvCache, Llama, LoraState, argmax};
use serde::Deserialize;

#[derive(Deserialize)]
struct Manifest {
    new_tokens: usize,
    models: Vec<ModelEntry>,
}

#[derive(Deserialize)]
struct ModelEntry {
    name: String,
    dir: String,
    adapters: Vec<AdapterEntry>,
    requests: Vec<Request>,
}

#[derive(Deserialize)]
struct AdapterEntry {
    name: String,
    dir: String,
}

#[derive(Deserialize)]
struct Request {
    adapter: Option<String>,
    prompt: Vec<u32>,
    greedy: Vec<u32>,
    logits: Vec<Vec<f32>>,
}

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/golden")
}

fn manifest() -> Manifest {
    let text = std::fs::read_to_string(fixtures().join("manifest.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

struct Loaded {
    model: Llama<CpuBackend>,
    lora: LoraState<CpuBackend>,
    slots: HashMap<String, u32>,
}

/// The entry's model and adapters; with `arena: Some(rank)`, a LoRA arena of `rank` per
/// projection and slot, every adapter that fits placed there (its steps then take their
/// shrinks from the base GEMMs).
fn load(entry: &ModelEntry, arena: Option<usize>) -> Loaded {
    let backend = Arc::new(CpuBackend::new());
    let mut model = Llama::load(backend.clone(), &fixtures().join(&entry.dir)).unwrap();
    // One spare slot in front, so adapter slots are not simply 0..n.
    let n_slots = entry.adapters.len() + 1;
    let mut lora = LoraState::new(model.config(), n_slots);
    if let Some(rank) = arena {
        model
            .reserve_lora_arena(Llama::<CpuBackend>::arena_rows_for(n_slots, rank))
            .unwrap();
        lora.set_arena(model.arena_rows());
    }
    let mut slots = HashMap::new();
    for (i, a) in entry.adapters.iter().enumerate() {
        let weights = LoraWeights::from_dir(&fixtures().join(&a.dir), model.config()).unwrap();
        lora.load(backend.as_ref(), i + 1, &weights).unwrap();
        if arena.is_some() {
            model.place_in_arena(&mut lora, i + 1).unwrap();
        }
        slots.insert(a.name.clone(), (i + 1) as u32);
    }
    Loaded { model, lora, slots }
}

/// No arena; an arena with room for every adapter; one too small for some of them.
const ARENAS: [Option<usize>; 3] = [None, Some(64), Some(1)];

/// Largest absolute difference over the largest reference magnitude.
fn relative_error(got: &[f32], want: &[f32]) -> f64 {
    assert_eq!(got.len(), want.len());
    let diff = got
        .iter()
        .zip(want)
        .map(|(a, b)| (*a as f64 - *b as f64).abs())
        .fold(0.0, f64::max);
    let scale = want.iter().map(|b| (*b as f64).abs()).fold(0.0, f64::max);
    diff / scale
}

#[test]
fn one_mixed_batch_of_all_adapters_and_the_base_model_matches_hugging_face_logits() {
    let manifest = manifest();
    for (entry, arena) in manifest.models.iter().flat_map(|e| ARENAS.map(|a| (e, a))) {
        let m = load(entry, arena);
        let n_adapters = entry.adapters.len();
        let placed = (1..=n_adapters).filter(|&i| m.lora.in_arena(i)).count();
        match arena {
            None => assert_eq!(placed, 0, "{}", entry.name),
            Some(64) => assert_eq!(placed, n_adapters, "{}", entry.name),
            // Some adapters left out: the steps that use them run their shrinks as kernels.
            Some(_) => assert!(placed < n_adapters, "{}", entry.name),
        }
        let n = entry.requests.len();
        let slot = |r: &Request| r.adapter.as_ref().map(|a| m.slots[a]);
        // Teacher forcing: feed Hugging Face's greedy tokens, compare every predicting row.
        let full: Vec<Vec<u32>> = entry
            .requests
            .iter()
            .map(|r| [&r.prompt[..], &r.greedy[..manifest.new_tokens - 1]].concat())
            .collect();
        let blocks = (full.iter().map(Vec::len).max().unwrap() + 1).div_ceil(BLOCK_SIZE);
        let tables: Vec<Vec<u32>> = (0..n)
            .map(|i| ((i * blocks) as u32..((i + 1) * blocks) as u32).collect())
            .collect();
        let mut kv =
            KvCache::new(m.model.backend().as_ref(), m.model.config(), n * blocks).unwrap();
        let chunk = |i: usize| [usize::MAX, 3, 4, 7][i % 4];
        let delay = |i: usize| i % 3;
        // Requests in slot order, base model last, so each adapter forms one segment.
        let mut order: Vec<usize> = (0..n).collect();
        order.sort_by_key(|&i| slot(&entry.requests[i]).map_or(u32::MAX, |s| s));
        let mut pos = vec![0usize; n];
        let mut checked = 0;
        let mut mixed_steps = 0;
        let mut step = 0;
        while (0..n).any(|i| pos[i] < full[i].len()) {
            let mut feeds = Vec::new();
            for &i in &order {
                if step < delay(i) || pos[i] >= full[i].len() {
                    continue;
                }
                let prompt_len = entry.requests[i].prompt.len();
                let take = if pos[i] < prompt_len {
                    chunk(i).min(prompt_len - pos[i])
                } else {
                    1
                };
                feeds.push((i, pos[i], take));
            }
            let seqs: Vec<SeqStep<'_>> = feeds
                .iter()
                .map(|&(i, p, take)| SeqStep {
                    tokens: &full[i][p..p + take],
                    cached: p,
                    block_table: &tables[i],
                    adapter_slot: slot(&entry.requests[i]),
                    sample: p + take >= entry.requests[i].prompt.len(),
                })
                .collect();
            let meta = StepMeta::build(&seqs).unwrap();
            let prefill_rows = feeds
                .iter()
                .any(|&(i, p, _)| p < entry.requests[i].prompt.len());
            let decode_rows = feeds
                .iter()
                .any(|&(i, p, _)| p >= entry.requests[i].prompt.len());
            if prefill_rows && decode_rows && meta.segments.len() >= 2 {
                mixed_steps += 1;
            }
            let logits = m.model.forward(&meta, &mut kv, &m.lora).unwrap();
            let vocab = m.model.config().vocab_size;
            let mut rows = logits.chunks(vocab);
            for &(i, p, take) in &feeds {
                let r = &entry.requests[i];
                if p + take < r.prompt.len() {
                    continue;
                }
                let j = p + take - r.prompt.len();
                let got = rows.next().unwrap();
                let err = relative_error(got, &r.logits[j]);
                assert!(
                    err < 1e-4,
                    "{} request {i} ({:?}) row {j}: relative error {err:e}",
                    entry.name,
                    r.adapter
                );
                assert_eq!(
                    argmax(got),
                    r.greedy[j],
                    "{} request {i} row {j}",
                    entry.name
                );
                checked += 1;
            }
            for &(i, p, take) in &feeds {
                pos[i] = p + take;
            }
            step += 1;
        }
        assert_eq!(checked, n * manifest.new_tokens, "{}", entry.name);
        assert!(
            mixed_steps > 0,
            "{}: no step mixed prefill, decode and adapters",
            entry.name
        );
    }
}

#[test]
fn a_batched_greedy_run_gives_the_same_tokens_as_each_request_alone_and_as_hugging_face() {
    let manifest = manifest();
    for (entry, arena) in manifest.models.iter().flat_map(|e| ARENAS.map(|a| (e, a))) {
        let m = load(entry, arena);
        let requests: Vec<(Vec<u32>, Option<u32>)> = entry
            .requests
            .iter()
            .map(|r| (r.prompt.clone(), r.adapter.as_ref().map(|a| m.slots[a])))
            .collect();
        let backend = m.model.backend().clone();
        let mut kv = KvCache::new(backend.as_ref(), m.model.config(), requests.len() * 4).unwrap();
        let batched = m
            .model
            .generate_greedy(&mut kv, &m.lora, &requests, manifest.new_tokens)
            .unwrap();
        for (i, req) in requests.iter().enumerate() {
            let mut kv = KvCache::new(backend.as_ref(), m.model.config(), 4).unwrap();
            let alone = m
                .model
                .generate_greedy(
                    &mut kv,
                    &m.lora,
                    std::slice::from_ref(req),
                    manifest.new_tokens,
                )
                .unwrap();
            assert_eq!(alone[0], batched[i], "{} request {i}", entry.name);
            assert_eq!(
                batched[i], entry.requests[i].greedy,
                "{} request {i}",
                entry.name
            );
        }
    }
}

#[test]
fn decode_steps_padded_to_their_bucket_keep_hugging_face_logits_for_the_real_rows() {
    let manifest = manifest();
    for (entry, arena) in manifest.models.iter().flat_map(|e| ARENAS.map(|a| (e, a))) {
        let m = load(entry, arena);
        let n = entry.requests.len();
        let vocab = m.model.config().vocab_size;
        let slot = |r: &Request| r.adapter.as_ref().map(|a| m.slots[a]);
        let blocks = (entry.requests.iter().map(|r| r.prompt.len()).max().unwrap()
            + manifest.new_tokens)
            .div_ceil(BLOCK_SIZE);
        let tables: Vec<Vec<u32>> = (0..n)
            .map(|i| ((i * blocks) as u32..((i + 1) * blocks) as u32).collect())
            .collect();
        let mut kv =
            KvCache::new(m.model.backend().as_ref(), m.model.config(), n * blocks).unwrap();
        // A bucket with room for padding, whatever the number of requests.
        let bucket = decode_bucket(n + 1).unwrap();
        for j in 0..manifest.new_tokens {
            let inputs: Vec<Vec<u32>> = entry
                .requests
                .iter()
                .map(|r| match j {
                    0 => r.prompt.clone(),
                    _ => vec![r.greedy[j - 1]],
                })
                .collect();
            let seqs: Vec<SeqStep<'_>> = (0..n)
                .map(|i| SeqStep {
                    tokens: &inputs[i],
                    cached: if j == 0 {
                        0
                    } else {
                        entry.requests[i].prompt.len() + j - 1
                    },
                    block_table: &tables[i],
                    adapter_slot: slot(&entry.requests[i]),
                    sample: true,
                })
                .collect();
            let meta = StepMeta::build(&seqs).unwrap();
            let mut step = StepMeta::default();
            if j == 0 {
                step = meta;
            } else {
                assert!(meta.pad_decode(bucket, kv.pad_block(), &mut step));
            }
            let logits = m.model.forward(&step, &mut kv, &m.lora).unwrap();
            assert_eq!(logits.len(), step.logit_rows.len() * vocab);
            if j > 0 {
                assert_eq!(step.rows(), bucket);
                assert!(logits[n * vocab..].iter().all(|x| x.is_finite()));
            }
            for (i, r) in entry.requests.iter().enumerate() {
                let got = &logits[i * vocab..(i + 1) * vocab];
                let err = relative_error(got, &r.logits[j]);
                assert!(
                    err < 1e-4,
                    "{} request {i} step {j}: relative error {err:e}",
                    entry.name
                );
            }
        }
    }
}
