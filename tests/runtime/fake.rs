//! A fake executor whose next token is a hash of the whole context it reads back through the
//! paged KV cache (block tables and slot mapping) and of the adapter of its SGMV segment. Any
//! scheduling, paging, preemption or segment mistake changes the tokens, and a reference
//! function gives what each request yields alone.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use punica::engine::backend::{BLOCK_SIZE, BackendError, Pick, RowSampling, StepMeta, StepPath};
use punica::engine::lora::cache::{AdapterFiles, AdapterKey, HostAdapter, Validator};
use punica::engine::request::{Detokenizer, TextDecoder};
use punica::engine::sampling::pick_row;
use punica::engine::{Executor, ExecutorError, StepOutput};

pub const VOCAB: usize = 64;

/// An adapter of the fake model: a seed mixed into the hash.
pub struct FakeAdapter {
    pub seed: u64,
    pub bytes: usize,
}

impl HostAdapter for FakeAdapter {
    fn host_bytes(&self) -> usize {
        self.bytes
    }
}

/// The files of a valid fake adapter.
pub fn adapter_files(seed: u64) -> AdapterFiles {
    AdapterFiles {
        config: format!("seed={seed}").into_bytes().into(),
        weights: vec![0; 1000].into(),
    }
}

/// Parses `seed=N`; anything else is invalid.
pub fn validator() -> Validator<FakeAdapter> {
    Arc::new(|_key: &AdapterKey, files: AdapterFiles| {
        let text = String::from_utf8(files.config.to_vec())
            .map_err(|_| "config is not UTF-8".to_string())?;
        let seed = text
            .strip_prefix("seed=")
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| format!("adapter_config.json is not a fake config: {text:?}"))?;
        Ok(FakeAdapter {
            seed,
            bytes: files.weights.len(),
        })
    })
}

/// What the test can observe of the executor.
#[derive(Default)]
pub struct Probe {
    pub steps: AtomicUsize,
    /// (step, token ids) of every forward.
    pub batches: Mutex<Vec<(usize, Vec<u32>)>>,
    pub max_rows: AtomicUsize,
    /// Steps that used an adapter slot the executor had not said ready (an error of the
    /// runtime).
    pub early_uses: AtomicUsize,
    /// Steps that used an adapter whose copy was still running, and waited for it.
    pub copy_waits: AtomicUsize,
    /// (slot, the step launched next) of every install.
    pub installs: Mutex<Vec<(u32, usize)>>,
    /// Installs made while a step was in flight (launched, not finished).
    pub installs_in_flight: AtomicUsize,
}

pub struct FakeModel {
    kv: Vec<u32>,
    slots: Vec<Option<u64>>,
    logits: Vec<f32>,
    picks: Vec<Pick>,
    delay: Duration,
    probe: Arc<Probe>,
    /// How long an install's copy to the "device" takes: a step that uses the adapter earlier
    /// waits for the rest of it, like the Llama executor's (it is ready at once).
    upload: Duration,
    /// Queries of [`Executor::adapter_ready`] an install answers "not yet" first (an executor
    /// that cannot wait for a copy).
    upload_polls: usize,
    installed: Vec<Option<Instant>>,
    polls: Vec<AtomicUsize>,
    /// A launched step's `want_logits` and when its "device" work ends, until it is finished.
    launched: Option<(bool, Instant)>,
}

impl FakeModel {
    pub fn new(kv_blocks: usize, slots: usize, delay: Duration, probe: Arc<Probe>) -> Self {
        Self {
            kv: vec![u32::MAX; kv_blocks * BLOCK_SIZE],
            slots: vec![None; slots],
            logits: Vec::new(),
            picks: Vec::new(),
            delay,
            probe,
            upload: Duration::ZERO,
            upload_polls: 0,
            installed: vec![None; slots],
            polls: (0..slots).map(|_| AtomicUsize::new(0)).collect(),
            launched: None,
        }
    }

    /// Installs whose copy takes `upload` to complete: a step that uses the slot earlier waits.
    pub fn with_upload(mut self, upload: Duration) -> Self {
        self.upload = upload;
        self
    }

    /// Installs that answer the first `polls` readiness queries with "not yet", however fast.
    pub fn with_upload_polls(mut self, polls: usize) -> Self {
        self.upload_polls = polls;
        self
    }

    /// Whether `slot` was installed and said ready, without counting a query.
    fn ready(&self, slot: u32) -> bool {
        let i = slot as usize;
        self.installed.get(i).copied().flatten().is_some()
            && self.polls[i].load(Ordering::SeqCst) >= self.upload_polls
    }

    /// How much of `slot`'s copy is left.
    fn copy_left(&self, slot: u32) -> Duration {
        self.installed
            .get(slot as usize)
            .copied()
            .flatten()
            .map_or(Duration::ZERO, |at| {
                self.upload.saturating_sub(at.elapsed())
            })
    }
}

/// The next token after `context` under adapter `seed` (0 = base model).
pub fn next_token(seed: u64, context: &[u32]) -> u32 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325 ^ seed.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    for &t in context {
        h ^= u64::from(t);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    ((h >> 17) % VOCAB as u64) as u32
}

/// The tokens a request yields alone (greedy, no stops).
pub fn reference(seed: u64, prompt: &[u32], max_tokens: usize) -> Vec<u32> {
    let mut ctx = prompt.to_vec();
    let mut out = Vec::new();
    for _ in 0..max_tokens {
        let t = next_token(seed, &ctx);
        out.push(t);
        ctx.push(t);
    }
    out
}

impl Executor for FakeModel {
    type Adapter = FakeAdapter;

    fn vocab_size(&self) -> usize {
        VOCAB
    }

    fn kv_blocks(&self) -> usize {
        self.kv.len() / BLOCK_SIZE
    }

    fn adapter_slots(&self) -> usize {
        self.slots.len()
    }

    fn install_adapter(&mut self, slot: u32, adapter: &FakeAdapter) -> Result<(), String> {
        let s = self
            .slots
            .get_mut(slot as usize)
            .ok_or_else(|| format!("no slot {slot}"))?;
        *s = Some(adapter.seed);
        self.installed[slot as usize] = Some(Instant::now());
        if let Ok(mut i) = self.probe.installs.lock() {
            i.push((slot, self.probe.steps.load(Ordering::SeqCst)));
        }
        self.polls[slot as usize].store(0, Ordering::SeqCst);
        if self.launched.is_some() {
            self.probe.installs_in_flight.fetch_add(1, Ordering::SeqCst);
        }
        Ok(())
    }

    fn adapter_ready(&self, slot: u32) -> bool {
        let ready = self.ready(slot);
        if let Some(p) = self.polls.get(slot as usize) {
            p.fetch_add(1, Ordering::SeqCst);
        }
        ready
    }

    fn launch(
        &mut self,
        meta: &StepMeta,
        sampling: &[RowSampling],
        want_logits: bool,
    ) -> Result<(), ExecutorError> {
        if self.launched.is_some() {
            return Err("a step is already in flight".to_string().into());
        }
        let step = self.probe.steps.fetch_add(1, Ordering::SeqCst);
        self.probe.max_rows.fetch_max(meta.rows(), Ordering::SeqCst);
        if let Ok(mut b) = self.probe.batches.lock() {
            b.push((step, meta.token_ids.clone()));
        }
        if let Some((_, _, slot)) = meta.segments.iter().find(|&(_, _, slot)| !self.ready(slot)) {
            self.probe.early_uses.fetch_add(1, Ordering::SeqCst);
            return Err(format!("slot {slot} used before it was ready").into());
        }
        let copy_left = meta
            .segments
            .iter()
            .map(|(_, _, slot)| self.copy_left(slot))
            .max()
            .unwrap_or_default();
        if !copy_left.is_zero() {
            // The step ends once the adapter's rows, which wait for the copy, are done.
            self.probe.copy_waits.fetch_add(1, Ordering::SeqCst);
        }
        // The step's "device" work: it runs on after the launch, `finish` waits for it.
        let ends = Instant::now() + copy_left + self.delay;
        for (row, &slot) in meta.slot_mapping.iter().enumerate() {
            let cell = self
                .kv
                .get_mut(slot as usize)
                .ok_or_else(|| BackendError::Shape(format!("KV slot {slot} out of range")))?;
            *cell = meta.token_ids[row];
        }
        self.logits.clear();
        for &lr in &meta.logit_rows {
            let seq = meta
                .seqs
                .iter()
                .find(|s| lr >= s.row_start && lr < s.row_start + s.num_rows)
                .ok_or_else(|| BackendError::Shape(format!("logit row {lr} in no sequence")))?;
            let seed = match meta
                .segments
                .iter()
                .find(|&(s, e, _)| (s..e).contains(&(lr as usize)))
            {
                Some((_, _, slot)) => self.slots[slot as usize]
                    .ok_or_else(|| BackendError::Shape(format!("slot {slot} is empty")))?,
                None => 0,
            };
            let ctx_len = meta.positions[lr as usize] as usize + 1;
            let table =
                &meta.block_tables[seq.block_table_start as usize..][..seq.num_blocks as usize];
            let context: Vec<u32> = (0..ctx_len)
                .map(|p| self.kv[table[p / BLOCK_SIZE] as usize * BLOCK_SIZE + p % BLOCK_SIZE])
                .collect();
            let next = next_token(seed, &context);
            self.logits
                .extend((0..VOCAB).map(|v| if v as u32 == next { 5.0 } else { 0.0 }));
        }
        self.picks = self
            .logits
            .chunks_exact(VOCAB)
            .zip(sampling)
            .map(|(row, rs)| pick_row(row, rs))
            .collect();
        self.launched = Some((want_logits, ends));
        Ok(())
    }

    fn step_done(&self) -> bool {
        self.launched.is_none_or(|(_, ends)| Instant::now() >= ends)
    }

    fn finish(&mut self) -> Result<StepOutput<'_>, ExecutorError> {
        let (want_logits, ends) = self
            .launched
            .take()
            .ok_or_else(|| "no step in flight".to_string())?;
        std::thread::sleep(ends.saturating_duration_since(Instant::now()));
        Ok(StepOutput {
            picks: &self.picks,
            logits: want_logits.then_some(self.logits.as_slice()),
            path: StepPath::Issued,
        })
    }
}

/// Token `t` decodes to one letter, `a` + t % 26.
pub struct Letters;

struct LetterDecoder;

impl TextDecoder for LetterDecoder {
    fn push(&mut self, token: u32) -> Result<Option<String>, String> {
        Ok(Some(char::from(b'a' + (token % 26) as u8).to_string()))
    }
}

impl Detokenizer for Letters {
    fn decoder(&self) -> Box<dyn TextDecoder> {
        Box::new(LetterDecoder)
    }
}

/// The text of `tokens` under [`Letters`].
pub fn letters(tokens: &[u32]) -> String {
    tokens
        .iter()
        .map(|&t| char::from(b'a' + (t % 26) as u8))
        .collect()
}
