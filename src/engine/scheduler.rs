//! Continuous batching policy: which sequences run in the next step, how many of their tokens,
//! and in what row order. Pure (no model, no channels, no clock), so every rule is unit-tested.
//!
//! Each step:
//! 1. Fair-share preemption: when a tenant with an admissible sequence holds fewer running
//!    sequences than its share (`max_running / active tenants`) and there is no seat or no KV for
//!    it, the youngest sequence of the tenant holding the most seats (above its share) is preempted.
//! 2. Running sequences, oldest first, each get `min(uncomputed, budget)` tokens: one for a decode,
//!    a chunk for a prefill (chunked prefill). Prefill chunks leave enough budget for the decodes
//!    behind them. When the KV pool cannot hold a sequence's new tokens, the youngest running
//!    sequence is preempted (its blocks freed; it re-enters the queue and is later re-prefilled
//!    with its prompt and the tokens it already generated, so its output continues seamlessly).
//! 3. Waiting sequences are admitted while seats, budget and KV blocks last. The tenant is chosen
//!    by the lowest virtual token counter (tokens served so far, lifted to the least active
//!    tenant's counter when a tenant becomes active, so idle time earns no credit); within a tenant,
//!    first come first served among sequences whose adapter is resident (the others wait without
//!    blocking anyone).
//! 4. The scheduled sequences are ordered by adapter slot so rows sharing an adapter are
//!    contiguous, and the [`StepMeta`] (rows, positions, KV slots, block tables, SGMV segments,
//!    logit rows) is filled in place, reusing its buffers from step to step.

use std::collections::{HashMap, VecDeque};

use uuid::Uuid;

use crate::engine::backend::{SeqMeta, StepMeta};
use crate::engine::kv::{BlockAllocator, BlockTable, blocks_for};
use crate::engine::lora::cache::AdapterKey;

/// Engine-wide id of a sequence (one per request).
pub type SeqId = u64;

/// Limits of the scheduler.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SchedulerConfig {
    /// Sequences that may hold KV at once (seats in the running set).
    pub max_running: usize,
    /// Tokens (rows) per step: decode rows plus prefill chunk rows.
    pub max_step_tokens: usize,
    /// Blocks in the KV pool.
    pub num_kv_blocks: usize,
}

/// Errors of the scheduler's bookkeeping calls.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SchedulerError {
    #[error("sequence {0} is not known to the scheduler")]
    UnknownSequence(SeqId),
    #[error("sequence {0} is already known to the scheduler")]
    DuplicateSequence(SeqId),
    #[error("a sequence needs at least one prompt token")]
    EmptyPrompt,
    #[error("sequence of {tokens} tokens can never fit the KV pool of {capacity} tokens")]
    TooLong { tokens: usize, capacity: usize },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    Waiting,
    Running,
}

/// Scheduler-side state of one sequence.
#[derive(Debug)]
struct Seq {
    tenant: Uuid,
    adapter: Option<AdapterKey>,
    /// Prompt followed by every generated token.
    tokens: Vec<u32>,
    /// Tokens whose KV is in the cache. Always `< tokens.len()` between steps.
    computed: usize,
    blocks: BlockTable,
    /// Submission order; FCFS within a tenant.
    arrival: u64,
    phase: Phase,
}

#[derive(Debug, Default)]
struct Tenant {
    /// Waiting sequences, ordered by arrival.
    queue: VecDeque<SeqId>,
    running: usize,
    /// Virtual token counter: tokens served to this tenant, lifted on activation.
    vtc: u64,
}

impl Tenant {
    fn is_active(&self) -> bool {
        self.running > 0 || !self.queue.is_empty()
    }
}

/// One sequence in a step's batch, in batch order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ScheduledSeq {
    pub id: SeqId,
    /// Rows (tokens) this sequence contributes.
    pub num_tokens: usize,
    /// Whether its last row's logits are sampled this step (its whole context is now computed).
    pub samples: bool,
    /// Adapter slot, `None` for the base model.
    pub slot: Option<u32>,
}

/// What a step decided, besides the [`StepMeta`]. Reused from step to step.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct StepPlan {
    /// Scheduled sequences in batch (row) order. The k-th sequence with `samples` owns the k-th
    /// logits row.
    pub seqs: Vec<ScheduledSeq>,
    /// Sequences that entered the running set this step (their adapter must stay resident).
    pub admitted: Vec<SeqId>,
    /// Sequences moved from running back to waiting this step (their KV was freed).
    pub preempted: Vec<SeqId>,
}

impl StepPlan {
    fn clear(&mut self) {
        self.seqs.clear();
        self.admitted.clear();
        self.preempted.clear();
    }

    /// Rows in the step.
    pub fn rows(&self) -> usize {
        self.seqs.iter().map(|s| s.num_tokens).sum()
    }
}

/// A sequence leaving the scheduler.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Removed {
    pub adapter: Option<AdapterKey>,
    /// Whether it held a seat (and so an adapter pin) when removed.
    pub was_running: bool,
}

/// The continuous-batching scheduler.
#[derive(Debug)]
pub struct Scheduler {
    config: SchedulerConfig,
    kv: BlockAllocator,
    seqs: HashMap<SeqId, Seq>,
    tenants: HashMap<Uuid, Tenant>,
    /// Running sequences in admission order (youngest last).
    running: Vec<SeqId>,
    next_arrival: u64,
    /// Scratch: (slot, id, tokens, samples) of this step before ordering.
    picked: Vec<ScheduledSeq>,
    /// When false, waiting sequences with an adapter are not admitted (see
    /// [`Scheduler::set_admit_adapters`]).
    admit_adapters: bool,
}

impl Scheduler {
    /// An empty scheduler over a KV pool of `config.num_kv_blocks` blocks.
    pub fn new(config: SchedulerConfig) -> Self {
        Self {
            config,
            kv: BlockAllocator::new(config.num_kv_blocks),
            seqs: HashMap::new(),
            tenants: HashMap::new(),
            running: Vec::new(),
            next_arrival: 0,
            picked: Vec::new(),
            admit_adapters: true,
        }
    }

    /// The limits this scheduler was built with.
    pub fn config(&self) -> SchedulerConfig {
        self.config
    }

    /// Sequences holding a seat.
    pub fn num_running(&self) -> usize {
        self.running.len()
    }

    /// Sequences waiting for a seat (new or preempted).
    pub fn num_waiting(&self) -> usize {
        self.seqs.len() - self.running.len()
    }

    /// KV blocks owned by sequences.
    pub fn kv_blocks_used(&self) -> usize {
        self.kv.used()
    }

    /// KV blocks in the pool.
    pub fn kv_blocks_total(&self) -> usize {
        self.kv.total()
    }

    /// Whether any sequence is known (running or waiting).
    pub fn is_idle(&self) -> bool {
        self.seqs.is_empty()
    }

    /// Whether `id` is known.
    pub fn contains(&self, id: SeqId) -> bool {
        self.seqs.contains_key(&id)
    }

    /// Tokens of `id` (prompt followed by generated).
    pub fn tokens(&self, id: SeqId) -> Option<&[u32]> {
        self.seqs.get(&id).map(|s| s.tokens.as_slice())
    }

    /// Tokens a sequence of `len` tokens can never exceed: the whole pool.
    pub fn capacity_tokens(&self) -> usize {
        self.kv.total() * crate::engine::backend::BLOCK_SIZE
    }

    /// Stop (or resume) admitting sequences that use an adapter. The runtime stops them while
    /// an adapter has waited too long for a device slot that running sequences keep pinned: the
    /// pinned adapters then drain and free a slot, so hot adapters cannot starve cold ones.
    /// Base-model sequences and running sequences are unaffected.
    pub fn set_admit_adapters(&mut self, admit: bool) {
        self.admit_adapters = admit;
    }

    /// Queue a new sequence. `max_len` is the most tokens it may reach (prompt + max new tokens);
    /// a sequence that could never fit the KV pool is refused here rather than thrashing later.
    pub fn add(
        &mut self,
        id: SeqId,
        tenant: Uuid,
        adapter: Option<AdapterKey>,
        prompt: Vec<u32>,
        max_len: usize,
    ) -> Result<(), SchedulerError> {
        if prompt.is_empty() {
            return Err(SchedulerError::EmptyPrompt);
        }
        if self.seqs.contains_key(&id) {
            return Err(SchedulerError::DuplicateSequence(id));
        }
        let max_len = max_len.max(prompt.len());
        if max_len > self.capacity_tokens() {
            return Err(SchedulerError::TooLong {
                tokens: max_len,
                capacity: self.capacity_tokens(),
            });
        }
        let arrival = self.next_arrival;
        self.next_arrival += 1;
        self.activate_tenant(tenant);
        let t = self.tenants.entry(tenant).or_default();
        t.queue.push_back(id);
        self.seqs.insert(
            id,
            Seq {
                tenant,
                adapter,
                tokens: prompt,
                computed: 0,
                blocks: BlockTable::new(),
                arrival,
                phase: Phase::Waiting,
            },
        );
        Ok(())
    }

    /// Append a sampled token to a sequence; it is fed to the model in its next step.
    pub fn append_token(&mut self, id: SeqId, token: u32) -> Result<(), SchedulerError> {
        let seq = self
            .seqs
            .get_mut(&id)
            .ok_or(SchedulerError::UnknownSequence(id))?;
        seq.tokens.push(token);
        Ok(())
    }

    /// Forget a sequence (finished, cancelled or failed) and free its KV blocks.
    pub fn remove(&mut self, id: SeqId) -> Option<Removed> {
        let mut seq = self.seqs.remove(&id)?;
        self.kv.release(&mut seq.blocks);
        let was_running = seq.phase == Phase::Running;
        if let Some(t) = self.tenants.get_mut(&seq.tenant) {
            if was_running {
                t.running -= 1;
            } else if let Some(pos) = t.queue.iter().position(|&q| q == id) {
                t.queue.remove(pos);
            }
        }
        if was_running && let Some(pos) = self.running.iter().position(|&r| r == id) {
            self.running.remove(pos);
        }
        self.drop_idle_tenant(seq.tenant);
        Some(Removed {
            adapter: seq.adapter,
            was_running,
        })
    }

    /// Distinct adapters that waiting sequences need, oldest need first (for the adapter loader).
    pub fn waiting_adapters(&self, out: &mut Vec<AdapterKey>) {
        out.clear();
        let mut needs: Vec<(u64, AdapterKey)> = self
            .seqs
            .values()
            .filter(|s| s.phase == Phase::Waiting)
            .filter_map(|s| s.adapter.map(|a| (s.arrival, a)))
            .collect();
        needs.sort_unstable_by_key(|&(arrival, _)| arrival);
        for (_, key) in needs {
            if !out.contains(&key) {
                out.push(key);
            }
        }
    }

    /// Waiting sequences that need `key` (to fail them when it cannot be loaded).
    pub fn waiting_for(&self, key: AdapterKey) -> Vec<SeqId> {
        self.seqs
            .iter()
            .filter(|(_, s)| s.phase == Phase::Waiting && s.adapter == Some(key))
            .map(|(&id, _)| id)
            .collect()
    }

    /// Plan the next step and fill `meta` for it. `slot_of` says where a resident adapter lives
    /// (`None` = not resident: its sequences keep waiting). Returns whether anything was scheduled.
    pub fn schedule(
        &mut self,
        slot_of: impl Fn(&AdapterKey) -> Option<u32>,
        meta: &mut StepMeta,
        plan: &mut StepPlan,
    ) -> bool {
        plan.clear();
        self.picked.clear();
        self.fair_share_preemption(&slot_of, plan);
        let mut budget = self.config.max_step_tokens;

        // Running sequences, oldest first.
        let mut i = 0;
        while i < self.running.len() && budget > 0 {
            let id = self.running[i];
            let Some(seq) = self.seqs.get(&id) else {
                i += 1;
                continue;
            };
            let uncomputed = seq.tokens.len() - seq.computed;
            // Leave one row for each younger decode behind this one.
            let younger_decodes = self.running[i + 1..]
                .iter()
                .filter(|r| {
                    self.seqs
                        .get(r)
                        .is_some_and(|s| s.tokens.len() - s.computed == 1)
                })
                .count();
            let room = if uncomputed > 1 {
                budget.saturating_sub(younger_decodes).max(1)
            } else {
                budget
            };
            let n = uncomputed.min(room);
            // A running sequence's adapter is pinned, so it is resident; if it were not, running
            // it on the base weights would be wrong, so it sits this step out.
            let slot = match &seq.adapter {
                None => None,
                Some(key) => match slot_of(key) {
                    Some(slot) => Some(slot),
                    None => {
                        i += 1;
                        continue;
                    }
                },
            };
            // Make room in the KV pool by preempting the youngest running sequences.
            let mut preempted_self = false;
            while !self.can_reserve(id, n) {
                let victim = *self.running.last().unwrap_or(&id);
                self.preempt(victim, plan);
                if victim == id {
                    preempted_self = true;
                    break;
                }
            }
            if preempted_self {
                break;
            }
            self.take(id, n, slot);
            budget -= n;
            i += 1;
        }

        // Admit waiting sequences while seats, budget and KV last.
        while budget > 0 && self.running.len() < self.config.max_running {
            let Some((id, slot)) = self.next_admissible(&slot_of) else {
                break;
            };
            let Some(seq) = self.seqs.get(&id) else {
                break;
            };
            let uncomputed = seq.tokens.len() - seq.computed;
            // Admit only if the whole remaining prompt fits now, so a chunked prefill is not
            // preempted half way by its own later chunks.
            if seq.blocks.blocks_needed(uncomputed) > self.kv.free() {
                break;
            }
            let n = uncomputed.min(budget);
            self.admit(id, plan);
            self.take(id, n, slot);
            budget -= n;
        }

        self.build_meta(meta, plan);
        !plan.seqs.is_empty()
    }

    fn can_reserve(&self, id: SeqId, n: usize) -> bool {
        self.seqs
            .get(&id)
            .is_some_and(|s| self.kv.can_reserve(&s.blocks, n))
    }

    /// Reserve KV for `n` tokens of `id`, charge its tenant and record it for this step.
    fn take(&mut self, id: SeqId, n: usize, slot: Option<u32>) {
        let Some(seq) = self.seqs.get_mut(&id) else {
            return;
        };
        if self.kv.reserve(&mut seq.blocks, n).is_err() {
            // Callers check `can_reserve` first; an error here means nothing is scheduled for
            // this sequence this step, which is safe.
            return;
        }
        if let Some(t) = self.tenants.get_mut(&seq.tenant) {
            t.vtc += n as u64;
        }
        let samples = seq.computed + n == seq.tokens.len();
        self.picked.push(ScheduledSeq {
            id,
            num_tokens: n,
            samples,
            slot,
        });
    }

    fn admit(&mut self, id: SeqId, plan: &mut StepPlan) {
        let Some(seq) = self.seqs.get_mut(&id) else {
            return;
        };
        seq.phase = Phase::Running;
        if let Some(t) = self.tenants.get_mut(&seq.tenant) {
            if let Some(pos) = t.queue.iter().position(|&q| q == id) {
                t.queue.remove(pos);
            }
            t.running += 1;
        }
        self.running.push(id);
        plan.admitted.push(id);
    }

    /// Move a running sequence back to its tenant's queue (in arrival order) and free its KV.
    /// Its tokens are kept: the re-prefill recomputes prompt and generated tokens alike.
    fn preempt(&mut self, id: SeqId, plan: &mut StepPlan) {
        let Some(seq) = self.seqs.get_mut(&id) else {
            return;
        };
        self.kv.release(&mut seq.blocks);
        seq.computed = 0;
        seq.phase = Phase::Waiting;
        let (tenant, arrival) = (seq.tenant, seq.arrival);
        if let Some(pos) = self.running.iter().position(|&r| r == id) {
            self.running.remove(pos);
        }
        let seqs = &self.seqs;
        if let Some(t) = self.tenants.get_mut(&tenant) {
            t.running -= 1;
            let at = t
                .queue
                .iter()
                .position(|q| seqs.get(q).is_some_and(|s| s.arrival > arrival))
                .unwrap_or(t.queue.len());
            t.queue.insert(at, id);
        }
        // A sequence admitted and preempted in the same step never held a pin.
        if let Some(pos) = plan.admitted.iter().position(|&a| a == id) {
            plan.admitted.remove(pos);
        } else {
            plan.preempted.push(id);
        }
        tracing::debug!(seq = id, "preempted: KV blocks freed, will re-prefill");
    }

    /// First sequence of `tenant`'s queue whose adapter is resident, with its slot.
    fn head_of(
        &self,
        tenant: &Tenant,
        slot_of: &impl Fn(&AdapterKey) -> Option<u32>,
    ) -> Option<(SeqId, Option<u32>)> {
        tenant.queue.iter().find_map(|&id| {
            let seq = self.seqs.get(&id)?;
            match &seq.adapter {
                None => Some((id, None)),
                Some(_) if !self.admit_adapters => None,
                Some(key) => slot_of(key).map(|slot| (id, Some(slot))),
            }
        })
    }

    /// The admissible sequence of the tenant with the lowest virtual token counter (ties: the
    /// earliest arrival).
    fn next_admissible(
        &self,
        slot_of: &impl Fn(&AdapterKey) -> Option<u32>,
    ) -> Option<(SeqId, Option<u32>)> {
        let mut best: Option<(u64, u64, SeqId, Option<u32>)> = None;
        for t in self.tenants.values() {
            let Some((id, slot)) = self.head_of(t, slot_of) else {
                continue;
            };
            let arrival = self.seqs.get(&id).map_or(u64::MAX, |s| s.arrival);
            let key = (t.vtc, arrival);
            if best.is_none_or(|(v, a, _, _)| key < (v, a)) {
                best = Some((t.vtc, arrival, id, slot));
            }
        }
        best.map(|(_, _, id, slot)| (id, slot))
    }

    /// Give seats back to tenants below their fair share when the running set (or the KV pool)
    /// is monopolised: preempt the youngest sequence of the tenant holding the most seats, as
    /// long as it holds more than its share.
    fn fair_share_preemption(
        &mut self,
        slot_of: &impl Fn(&AdapterKey) -> Option<u32>,
        plan: &mut StepPlan,
    ) {
        let active = self.tenants.values().filter(|t| t.is_active()).count();
        if active < 2 {
            return;
        }
        let share = (self.config.max_running / active).max(1);
        let mut starved: Vec<(u64, Uuid, SeqId)> = self
            .tenants
            .iter()
            .filter(|(_, t)| t.running < share)
            .filter_map(|(&tid, t)| {
                let (id, _) = self.head_of(t, slot_of)?;
                Some((self.seqs.get(&id)?.arrival, tid, id))
            })
            .collect();
        starved.sort_unstable();
        for (_, _, id) in starved {
            while let Some(seq) = self.seqs.get(&id) {
                let needed = blocks_for(seq.tokens.len());
                let seat = self.running.len() < self.config.max_running;
                if seat && needed <= self.kv.free() {
                    break;
                }
                let Some(victim) = self.over_share_victim(share) else {
                    return;
                };
                self.preempt(victim, plan);
            }
            // Hand the freed seat to this tenant by giving it the lowest counter.
            let min_vtc = self.tenants.values().map(|t| t.vtc).min().unwrap_or(0);
            if let Some(tenant) = self.seqs.get(&id).map(|s| s.tenant)
                && let Some(t) = self.tenants.get_mut(&tenant)
            {
                t.vtc = t.vtc.min(min_vtc);
            }
        }
    }

    /// Youngest running sequence of the tenant with the most seats, if that is above `share`.
    fn over_share_victim(&self, share: usize) -> Option<SeqId> {
        let (&tenant, t) = self.tenants.iter().max_by_key(|(_, t)| t.running)?;
        if t.running <= share {
            return None;
        }
        self.running
            .iter()
            .rev()
            .find(|r| self.seqs.get(r).is_some_and(|s| s.tenant == tenant))
            .copied()
    }

    /// A tenant becoming active starts at the least active tenant's counter: it gets its fair
    /// share from now on, but no credit for the time it was idle.
    fn activate_tenant(&mut self, tenant: Uuid) {
        if self.tenants.get(&tenant).is_some_and(Tenant::is_active) {
            return;
        }
        let floor = self
            .tenants
            .values()
            .filter(|t| t.is_active())
            .map(|t| t.vtc)
            .min();
        let t = self.tenants.entry(tenant).or_default();
        if let Some(floor) = floor {
            t.vtc = t.vtc.max(floor);
        }
    }

    fn drop_idle_tenant(&mut self, tenant: Uuid) {
        if self.tenants.get(&tenant).is_some_and(|t| !t.is_active()) {
            self.tenants.remove(&tenant);
        }
    }

    /// Order this step's sequences by adapter slot and write rows, positions, KV slots, block
    /// tables, segments and logit rows into `meta`.
    fn build_meta(&mut self, meta: &mut StepMeta, plan: &mut StepPlan) {
        meta.token_ids.clear();
        meta.positions.clear();
        meta.slot_mapping.clear();
        meta.seqs.clear();
        meta.block_tables.clear();
        meta.segments.starts.clear();
        meta.segments.ends.clear();
        meta.segments.slots.clear();
        meta.logit_rows.clear();

        // Stable: within a slot, older running sequences stay first.
        self.picked.sort_by_key(|s| s.slot);
        for picked in &self.picked {
            let Some(seq) = self.seqs.get_mut(&picked.id) else {
                continue;
            };
            let row_start = meta.token_ids.len() as u32;
            let start = seq.computed;
            let end = start + picked.num_tokens;
            for pos in start..end {
                // Reserved in `take`, so every position has a slot.
                let Ok(slot) = seq.blocks.slot(pos) else {
                    continue;
                };
                meta.token_ids.push(seq.tokens[pos]);
                meta.positions.push(pos as u32);
                meta.slot_mapping.push(slot);
            }
            let num_blocks = blocks_for(end);
            let block_table_start = meta.block_tables.len() as u32;
            meta.block_tables
                .extend_from_slice(&seq.blocks.blocks()[..num_blocks]);
            meta.seqs.push(SeqMeta {
                row_start,
                num_rows: picked.num_tokens as u32,
                context_len: end as u32,
                block_table_start,
                num_blocks: num_blocks as u32,
            });
            let row_end = meta.token_ids.len() as u32;
            if let Some(slot) = picked.slot {
                let segs = &mut meta.segments;
                if segs.slots.last() == Some(&slot) && segs.ends.last() == Some(&row_start) {
                    if let Some(e) = segs.ends.last_mut() {
                        *e = row_end;
                    }
                } else {
                    segs.starts.push(row_start);
                    segs.ends.push(row_end);
                    segs.slots.push(slot);
                }
            }
            if picked.samples {
                meta.logit_rows.push(row_end - 1);
            }
            seq.computed = end;
        }
        plan.seqs.extend_from_slice(&self.picked);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::backend::BLOCK_SIZE;
    use crate::engine::lora::segments::SegmentTable;

    fn cfg(max_running: usize, max_step_tokens: usize, num_kv_blocks: usize) -> SchedulerConfig {
        SchedulerConfig {
            max_running,
            max_step_tokens,
            num_kv_blocks,
        }
    }

    fn key(n: u128) -> AdapterKey {
        AdapterKey {
            id: Uuid::from_u128(n),
            version: 1,
        }
    }

    fn all_resident(k: &AdapterKey) -> Option<u32> {
        Some(k.id.as_u128() as u32)
    }

    fn none_resident(_: &AdapterKey) -> Option<u32> {
        None
    }

    /// Run one step and feed `next` as each sampling sequence's new token.
    fn step(
        s: &mut Scheduler,
        slot_of: impl Fn(&AdapterKey) -> Option<u32>,
        next: u32,
    ) -> (StepMeta, StepPlan) {
        let mut meta = StepMeta::default();
        let mut plan = StepPlan::default();
        s.schedule(slot_of, &mut meta, &mut plan);
        for seq in plan.seqs.iter().filter(|q| q.samples) {
            s.append_token(seq.id, next).unwrap();
        }
        (meta, plan)
    }

    #[test]
    fn a_prompt_is_prefilled_in_chunks_within_the_token_budget_then_decoded() {
        let mut s = Scheduler::new(cfg(4, 8, 16));
        let t = Uuid::from_u128(1);
        s.add(1, t, None, (0..20).collect(), 40).unwrap();
        let (m, p) = step(&mut s, all_resident, 100);
        assert_eq!(m.token_ids, (0..8).collect::<Vec<_>>());
        assert_eq!(m.positions, (0..8).collect::<Vec<_>>());
        assert!(m.logit_rows.is_empty(), "a partial prefill samples nothing");
        assert!(!p.seqs[0].samples);
        let (m, _) = step(&mut s, all_resident, 100);
        assert_eq!(m.positions, (8..16).collect::<Vec<_>>());
        let (m, p) = step(&mut s, all_resident, 100);
        assert_eq!(m.positions, (16..20).collect::<Vec<_>>());
        assert_eq!(m.logit_rows, vec![3]);
        assert!(p.seqs[0].samples);
        let (m, _) = step(&mut s, all_resident, 101);
        assert_eq!(m.token_ids, vec![100], "the sampled token is fed next");
        assert_eq!(m.positions, vec![20]);
        assert_eq!(m.seqs[0].context_len, 21);
        assert_eq!(m.seqs[0].num_blocks, 2);
    }

    #[test]
    fn decodes_keep_their_rows_when_a_long_prefill_arrives() {
        let mut s = Scheduler::new(cfg(8, 8, 64));
        let t = Uuid::from_u128(1);
        for id in 0..3 {
            s.add(id, t, None, vec![1, 2], 100).unwrap();
        }
        step(&mut s, all_resident, 5); // all three prefilled and sampled
        s.add(9, t, None, (0..50).collect(), 100).unwrap();
        let (m, p) = step(&mut s, all_resident, 5);
        assert_eq!(m.rows(), 8);
        let decodes = p.seqs.iter().filter(|q| q.num_tokens == 1).count();
        assert_eq!(decodes, 3);
        assert_eq!(p.seqs.iter().find(|q| q.id == 9).unwrap().num_tokens, 5);
    }

    #[test]
    fn the_running_set_never_exceeds_max_running() {
        let mut s = Scheduler::new(cfg(3, 64, 64));
        let t = Uuid::from_u128(1);
        for id in 0..10 {
            s.add(id, t, None, vec![1, 2, 3], 10).unwrap();
        }
        for _ in 0..5 {
            let (_, p) = step(&mut s, all_resident, 7);
            assert!(p.seqs.len() <= 3);
            assert!(s.num_running() <= 3);
        }
        assert_eq!(s.num_waiting(), 7);
    }

    #[test]
    fn rows_are_grouped_by_adapter_slot_into_segments() {
        let mut s = Scheduler::new(cfg(8, 64, 64));
        let t = Uuid::from_u128(1);
        s.add(1, t, Some(key(5)), vec![1, 2], 10).unwrap();
        s.add(2, t, None, vec![3], 10).unwrap();
        s.add(3, t, Some(key(2)), vec![4, 5, 6], 10).unwrap();
        s.add(4, t, Some(key(5)), vec![7], 10).unwrap();
        let (m, p) = step(&mut s, all_resident, 0);
        let slots: Vec<_> = p.seqs.iter().map(|q| q.slot).collect();
        assert_eq!(slots, vec![None, Some(2), Some(5), Some(5)]);
        assert_eq!(m.token_ids, vec![3, 4, 5, 6, 1, 2, 7]);
        let from_rows = SegmentTable::from_row_slots(&[
            None,
            Some(2),
            Some(2),
            Some(2),
            Some(5),
            Some(5),
            Some(5),
        ]);
        assert_eq!(m.segments, from_rows);
        assert_eq!(m.logit_rows, vec![0, 3, 5, 6]);
    }

    #[test]
    fn sequences_whose_adapter_is_not_resident_wait_without_blocking_others() {
        let mut s = Scheduler::new(cfg(8, 64, 64));
        let t = Uuid::from_u128(1);
        s.add(1, t, Some(key(1)), vec![1], 10).unwrap();
        s.add(2, t, Some(key(2)), vec![2], 10).unwrap();
        s.add(3, t, None, vec![3], 10).unwrap();
        let only_2 = |k: &AdapterKey| (k.id.as_u128() == 2).then_some(0);
        let (_, p) = step(&mut s, only_2, 0);
        let ids: Vec<_> = p.seqs.iter().map(|q| q.id).collect();
        assert_eq!(ids, vec![3, 2]);
        let mut needs = Vec::new();
        s.waiting_adapters(&mut needs);
        assert_eq!(needs, vec![key(1)]);
        assert_eq!(s.waiting_for(key(1)), vec![1]);
        let (_, p) = step(&mut s, none_resident, 0);
        assert_eq!(
            p.seqs.len(),
            1,
            "a running sequence whose adapter vanished sits out"
        );
        assert_eq!(p.seqs[0].id, 3);
    }

    #[test]
    fn when_kv_runs_out_the_youngest_is_preempted_and_later_recomputes_its_generated_tokens() {
        // 2 blocks = 32 tokens. Two sequences of 15 prompt tokens each fill a block apiece; when
        // both need a second block, the younger is preempted.
        let mut s = Scheduler::new(cfg(4, 64, 2));
        let t = Uuid::from_u128(1);
        s.add(1, t, None, (0..15).collect(), 32).unwrap();
        s.add(2, t, None, (100..115).collect(), 32).unwrap();
        step(&mut s, all_resident, 50); // both prefilled, each sampled token 50
        let (m, p) = step(&mut s, all_resident, 51); // position 15: still block 0/1
        assert_eq!(p.seqs.len(), 2);
        assert_eq!(m.positions, vec![15, 15]);
        let (m, p) = step(&mut s, all_resident, 52); // position 16: seq 1 takes the last block
        assert_eq!(p.preempted, vec![2]);
        assert_eq!(p.seqs.len(), 1);
        assert_eq!(m.positions, vec![16]);
        assert_eq!(s.kv_blocks_used(), 2);
        s.remove(1).unwrap();
        assert_eq!(s.kv_blocks_used(), 0);
        let (m, p) = step(&mut s, all_resident, 53);
        assert_eq!(p.admitted, vec![2]);
        let mut expect: Vec<u32> = (100..115).collect();
        expect.extend([50, 51]);
        assert_eq!(
            m.token_ids, expect,
            "prompt and generated tokens, once each"
        );
        assert_eq!(m.positions, (0..17).collect::<Vec<_>>());
        assert_eq!(m.logit_rows, vec![16]);
        assert_eq!(s.tokens(2).unwrap().len(), 18);
    }

    #[test]
    fn a_flooding_tenant_does_not_starve_a_single_request_of_another_tenant() {
        let mut s = Scheduler::new(cfg(8, 256, 1024));
        let a = Uuid::from_u128(0xa);
        let b = Uuid::from_u128(0xb);
        for id in 0..50 {
            s.add(id, a, None, vec![1; 10], 200).unwrap();
        }
        for _ in 0..3 {
            step(&mut s, all_resident, 3);
        }
        assert_eq!(s.num_running(), 8);
        s.add(1000, b, None, vec![2; 10], 200).unwrap();
        let (_, p) = step(&mut s, all_resident, 3);
        assert!(
            p.admitted.contains(&1000),
            "tenant b's request is admitted in the very next step"
        );
        assert_eq!(
            p.preempted.len(),
            1,
            "one of tenant a's seats was given back"
        );
        // And tenant a keeps the rest of the running set.
        assert_eq!(s.num_running(), 8);
    }

    #[test]
    fn two_tenants_with_deep_queues_share_admissions_evenly() {
        let mut s = Scheduler::new(cfg(64, 4, 1024));
        let a = Uuid::from_u128(0xa);
        let b = Uuid::from_u128(0xb);
        for id in 0..40 {
            s.add(id, a, None, vec![1; 2], 4).unwrap();
        }
        for id in 100..110 {
            s.add(id, b, None, vec![1; 2], 4).unwrap();
        }
        let (_, p) = step(&mut s, all_resident, 0);
        let admitted_b = p.admitted.iter().filter(|&&id| id >= 100).count();
        assert_eq!(p.admitted.len(), 2);
        assert_eq!(
            admitted_b, 1,
            "budget of two prefills is split one per tenant"
        );
    }

    #[test]
    fn removing_a_running_sequence_frees_its_blocks_and_seat() {
        let mut s = Scheduler::new(cfg(1, 64, 8));
        let t = Uuid::from_u128(1);
        s.add(1, t, Some(key(3)), vec![1; 40], 60).unwrap();
        s.add(2, t, None, vec![1; 3], 60).unwrap();
        let (_, p) = step(&mut s, all_resident, 0);
        assert_eq!(p.admitted, vec![1]);
        assert_eq!(s.kv_blocks_used(), 3);
        let removed = s.remove(1).unwrap();
        assert_eq!(
            removed,
            Removed {
                adapter: Some(key(3)),
                was_running: true
            }
        );
        assert_eq!(s.kv_blocks_used(), 0);
        let (_, p) = step(&mut s, all_resident, 0);
        assert_eq!(p.admitted, vec![2]);
        assert!(s.remove(1).is_none());
    }

    #[test]
    fn block_tables_and_slots_describe_each_sequences_own_blocks() {
        let mut s = Scheduler::new(cfg(4, 64, 8));
        let t = Uuid::from_u128(1);
        s.add(1, t, None, vec![1; 20], 30).unwrap();
        s.add(2, t, None, vec![2; 3], 30).unwrap();
        let (m, _) = step(&mut s, all_resident, 0);
        assert_eq!(m.seqs.len(), 2);
        for sm in &m.seqs {
            let table = &m.block_tables[sm.block_table_start as usize..][..sm.num_blocks as usize];
            for r in 0..sm.num_rows {
                let row = (sm.row_start + r) as usize;
                let pos = m.positions[row] as usize;
                let slot = m.slot_mapping[row] as usize;
                assert_eq!(slot / BLOCK_SIZE, table[pos / BLOCK_SIZE] as usize);
                assert_eq!(slot % BLOCK_SIZE, pos % BLOCK_SIZE);
            }
        }
        let mut blocks: Vec<u32> = m.block_tables.clone();
        blocks.sort_unstable();
        blocks.dedup();
        assert_eq!(blocks.len(), m.block_tables.len(), "no block is shared");
    }

    #[test]
    fn holding_adapter_admissions_lets_base_sequences_in_and_keeps_running_ones_going() {
        let mut s = Scheduler::new(cfg(8, 64, 64));
        let t = Uuid::from_u128(1);
        s.add(1, t, Some(key(1)), vec![1], 10).unwrap();
        step(&mut s, all_resident, 0);
        s.add(2, t, Some(key(1)), vec![2], 10).unwrap();
        s.add(3, t, None, vec![3], 10).unwrap();
        s.set_admit_adapters(false);
        let (_, p) = step(&mut s, all_resident, 0);
        let ids: Vec<_> = p.seqs.iter().map(|q| q.id).collect();
        assert_eq!(
            ids,
            vec![3, 1],
            "running 1 continues, base 3 admitted, 2 held"
        );
        s.set_admit_adapters(true);
        let (_, p) = step(&mut s, all_resident, 0);
        assert_eq!(p.admitted, vec![2]);
    }

    #[test]
    fn sequences_that_can_never_fit_are_refused_at_submission() {
        let mut s = Scheduler::new(cfg(4, 64, 2));
        let t = Uuid::from_u128(1);
        assert_eq!(
            s.add(1, t, None, vec![1; 10], 33),
            Err(SchedulerError::TooLong {
                tokens: 33,
                capacity: 32
            })
        );
        assert_eq!(
            s.add(1, t, None, vec![], 3),
            Err(SchedulerError::EmptyPrompt)
        );
        s.add(1, t, None, vec![1], 3).unwrap();
        assert_eq!(
            s.add(1, t, None, vec![1], 3),
            Err(SchedulerError::DuplicateSequence(1))
        );
    }
}
