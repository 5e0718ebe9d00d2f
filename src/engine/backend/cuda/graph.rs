//! CUDA graphs for the forward pass: the ops of a step are recorded as a trace instead of being
//! issued one by one, and a trace the backend has seen before is replayed from a graph.
//!
//! Between [`Backend::begin_step`](crate::engine::backend::Backend::begin_step) and the step's
//! end (sampling, or any copy back to the host) the backend records every kernel launch, GEMM
//! and side-stream fork/join as an [`Op`], and takes the step's activations from a fixed arena
//! and its metadata from a fixed buffer at offsets that depend only on the row count, so steps
//! of the same row count and kernel variants give the same trace (the same kernels, grids and
//! arguments, pointers included) whoever is in the batch. At the step's end:
//!
//! - a trace equal to one in the cache is replayed with one `cuGraphLaunch`;
//! - a trace equal to the previous step's (for as many steps in a row as the recorder's
//!   patience asks, see [`WORTH_REPLAYS`]) is captured into a graph (the ops issued once under
//!   stream capture), cached, and launched;
//! - any other trace is issued op by op, as without graphs.
//!
//! A step may be cut into parts ([`Backend::checkpoint`](crate::engine::backend::Backend::checkpoint)):
//! each part is such a trace of its own, judged against the same part of the previous step,
//! and launched as soon as it is complete, so the device starts on the first layers while the
//! host still records the rest. A step counts as replayed when all its parts were, as issued
//! when any part was.
//!
//! A graph runs exactly the launches that issuing the trace would run, with the same
//! arguments: equality of the whole trace, not of a hash, decides a replay. So a replay is
//! correct whenever issuing the trace is, whatever changed in between (an adapter slot, a
//! reallocated buffer); only the device memory the arguments point to is read at run time
//! (token ids, positions, block tables, segments), which is what changes from step to step.
//! Decode steps are padded to a bucket of row counts (see
//! [`StepMeta::pad_decode`](crate::engine::backend::StepMeta::pad_decode)) and the SGMV
//! launches cover a rounded-up tile count, so a decode batch whose membership changes keeps
//! replaying the graph of its bucket (graphs kept in a small LRU cache); steps with prefill
//! chunks rarely repeat and are issued.

use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};

use cudarc::driver::CudaGraph;

use crate::engine::backend::{DType, StepPath};

/// Most graphs kept (a step of several parts has a graph per part); the least recently used
/// one is dropped beyond it.
pub const MAX_GRAPHS: usize = 64;

/// Replays a recorded graph must get before the batch moves on for its recording to have paid
/// off. Recording a 7B step took 3.6-8.1 ms of host time on the H200 (the GPU waits meanwhile),
/// and a replay saves about 0.25 ms against issuing the step. A graph replayed fewer times
/// doubles the number of repeats the next layout needs before it is recorded (up to
/// [`MAX_PATIENCE`]); one replayed that often sets it back to one. A steady batch records its
/// layout at its second step; a batch whose membership changes every few steps stops recording.
pub const WORTH_REPLAYS: u64 = 24;

/// Most repeats a layout may have to wait for before it is recorded.
pub const MAX_PATIENCE: u32 = 64;

/// Most parameters a kernel of the backend takes.
pub const MAX_ARGS: usize = 16;

/// A launch's arguments, each widened to 8 bytes (see `Arg::slot`), held inline: a step
/// records hundreds of launches and allocates nothing for them. Unused slots stay zero, so
/// equality and hashing of the whole array are those of the used part.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct ArgSlots {
    len: u8,
    slots: [u64; MAX_ARGS],
}

impl ArgSlots {
    /// `args`, or `None` beyond [`MAX_ARGS`].
    pub fn new(args: impl IntoIterator<Item = u64>) -> Option<Self> {
        let mut out = ArgSlots::default();
        for a in args {
            *out.slots.get_mut(out.len as usize)? = a;
            out.len += 1;
        }
        Some(out)
    }

    /// The used slots.
    pub fn as_slice(&self) -> &[u64] {
        &self.slots[..self.len as usize]
    }
}

/// One kernel launch of a trace.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct LaunchOp {
    /// The loaded kernel (`CUfunction`), which lives as long as the backend.
    pub func: usize,
    pub grid: (u32, u32, u32),
    pub block: u32,
    pub args: ArgSlots,
    /// Programmatic dependent launch.
    pub pdl: bool,
    /// On the side stream.
    pub side: bool,
    /// Dynamic shared memory in bytes.
    pub smem: u32,
}

/// One cuBLAS GEMM of a trace: row-major `out[rows, n] = x[rows, k] · w[n, k]ᵀ` (`+=` when
/// `accumulate`), x's rows `x_stride` apart, out's `out_stride` apart, w's `k`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct GemmOp {
    pub x: u64,
    pub w: u64,
    pub out: u64,
    pub rows: i32,
    pub k: i32,
    pub n: i32,
    pub x_stride: i32,
    pub out_stride: i32,
    pub accumulate: bool,
    pub dtype: DType,
    pub out_dtype: DType,
}

/// One stream operation of a step.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Op {
    Launch(LaunchOp),
    Gemm(GemmOp),
    /// The side stream waits for everything issued on the main stream so far.
    Fork,
    /// Mark the end of the side stream's work (what the next [`Op::Join`] waits for).
    EndSide,
    /// The main stream waits for the side stream's work up to the last [`Op::EndSide`].
    Join,
    /// The stream in use (the side stream when `side`) waits for an event recorded outside
    /// the step: an adapter's copy (see `Backend::wait_upload`). The event (a `CUevent`)
    /// belongs to the adapter's device memory, which outlives the step.
    WaitEvent {
        event: usize,
        side: bool,
    },
}

/// Whether a trace can be captured on its own: every side-stream launch comes after a fork in
/// the trace and the side stream is joined back by its end (stream capture follows the fork
/// into the side stream and must end joined; a side launch without a fork would run outside
/// the graph). Traces cut by a mid-step flush may not be; they are issued.
pub fn self_contained(ops: &[Op]) -> bool {
    let (mut forked, mut open) = (false, false);
    for op in ops {
        match op {
            Op::Fork => (forked, open) = (true, true),
            Op::EndSide => open = false,
            Op::Join if !forked => return false,
            Op::Launch(l) if l.side && !open => return false,
            _ => {}
        }
    }
    !open
        && ops
            .iter()
            .rev()
            .find(|op| matches!(op, Op::Fork | Op::Join))
            != Some(&Op::Fork)
}

/// Whether a trace may be captured into a graph and replayed: self-contained, and waiting on
/// no outside event (an event recorded outside a capture cannot be waited on inside it, and a
/// replay would not wait for the next copy anyway). Such traces are issued op by op.
pub fn capturable(ops: &[Op]) -> bool {
    self_contained(ops) && !ops.iter().any(|op| matches!(op, Op::WaitEvent { .. }))
}

/// The hash a trace is looked up by (equality of the whole trace decides).
pub fn trace_hash(ops: &[Op]) -> u64 {
    let mut h = DefaultHasher::new();
    ops.hash(&mut h);
    h.finish()
}

/// Counts of how steps ran, since the backend was created.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GraphStats {
    /// Steps replayed from a cached graph.
    pub replayed: u64,
    /// Steps captured into a new graph (then launched).
    pub recorded: u64,
    /// Steps issued op by op.
    pub issued: u64,
    /// Time spent capturing and instantiating graphs, in microseconds.
    pub record_us: u64,
}

struct Cached<G> {
    hash: u64,
    ops: Vec<Op>,
    graph: G,
    used: u64,
    id: u64,
}

/// The recorder's state (behind the backend's mutex); `G` is the graph (generic for tests).
pub struct Recorder<G = CudaGraph> {
    /// Graphs are used at all (`PUNICA_CUDA_GRAPHS=0` or a failed capture turns them off).
    pub enabled: bool,
    /// Ops are being recorded (between `begin_step` and the step's end).
    pub tracing: bool,
    /// The pending trace.
    pub ops: Vec<Op>,
    /// A fork is open in the pending trace (a join without one is dropped: `begin_step` joined
    /// the side stream already).
    pub forked: bool,
    /// Per part of a step (see the module's docs), what decides whether to record it.
    parts: Vec<PartState>,
    /// The part of the step being recorded.
    part: usize,
    /// How the step's parts so far ran (the least replayed of them).
    step_path: Option<StepPath>,
    cache: Vec<Cached<G>>,
    /// An emptied trace buffer kept for the next step's trace (its capacity is reused).
    spare: Vec<Op>,
    clock: u64,
    next_id: u64,
    pub stats: GraphStats,
    pub last_path: StepPath,
}

/// The recording state of one part of a step.
struct PartState {
    /// The previous step's trace of this part and its hash: a repeat is captured.
    prev: Option<(u64, Vec<Op>)>,
    /// Times in a row the previous trace came again.
    repeats: u32,
    /// Repeats a trace needs before it is recorded.
    patience: u32,
    /// The latest recorded graph's id and its replays so far, until the batch moves on.
    watch: Option<(u64, u64)>,
}

impl Default for PartState {
    fn default() -> Self {
        PartState {
            prev: None,
            repeats: 0,
            patience: 1,
            watch: None,
        }
    }
}

/// Order of step paths by how much of the step ran from graphs.
fn path_rank(p: StepPath) -> u8 {
    match p {
        StepPath::Issued => 0,
        StepPath::Recorded => 1,
        StepPath::Replayed => 2,
    }
}

/// What to do with a finished trace.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Plan {
    /// Launch the cached graph [`Recorder::graph`] of this index.
    Replay(usize),
    /// Capture the trace into a graph, then [`Recorder::insert`] it.
    Record,
    /// Issue the ops one by one.
    Issue,
}

impl<G> Recorder<G> {
    pub fn new(enabled: bool) -> Self {
        Recorder {
            enabled,
            tracing: false,
            ops: Vec::new(),
            forked: false,
            parts: Vec::new(),
            part: 0,
            step_path: None,
            cache: Vec::new(),
            spare: Vec::new(),
            clock: 0,
            next_id: 0,
            stats: GraphStats::default(),
            last_path: StepPath::Issued,
        }
    }

    /// Record `op` when tracing; otherwise hand it back to be issued now.
    pub fn record(&mut self, op: Op) -> Option<Op> {
        if !self.tracing {
            return Some(op);
        }
        match op {
            Op::Fork => self.forked = true,
            Op::Join if !self.forked => return None,
            _ => {}
        }
        self.ops.push(op);
        None
    }

    /// The state of the part being recorded.
    fn state(&mut self) -> &mut PartState {
        if self.parts.len() <= self.part {
            self.parts.resize_with(self.part + 1, PartState::default);
        }
        &mut self.parts[self.part]
    }

    /// Decide how to run `ops` (hash `hash`), the current part of the step: [`Self::insert`]
    /// or [`Self::remember`] it as the plan says, then [`Self::next_part`].
    pub fn plan(&mut self, hash: u64, ops: &[Op]) -> Plan {
        self.clock += 1;
        let usable = self.enabled && capturable(ops) && ops.iter().any(|o| !o.is_event());
        if usable && let Some(i) = self.find(hash, ops) {
            self.note(StepPath::Replayed);
            self.cache[i].used = self.clock;
            let id = self.cache[i].id;
            if let Some((watched, replays)) = &mut self.state().watch
                && *watched == id
            {
                *replays += 1;
            }
            return Plan::Replay(i);
        }
        let st = self.state();
        let repeat = st
            .prev
            .as_ref()
            .is_some_and(|(h, p)| *h == hash && p == ops);
        if repeat {
            st.repeats += 1;
        } else {
            // The batch moved on: judge the latest recording by its replays.
            st.repeats = 0;
            if let Some((_, replays)) = st.watch.take() {
                st.patience = if replays >= WORTH_REPLAYS {
                    1
                } else {
                    (st.patience * 2).min(MAX_PATIENCE)
                };
            }
        }
        if usable && repeat && st.repeats >= st.patience {
            return Plan::Record;
        }
        self.note_issued();
        Plan::Issue
    }

    /// Count a trace issued op by op.
    pub fn note_issued(&mut self) {
        self.note(StepPath::Issued);
    }

    /// Fold how a part ran into its step's path.
    fn note(&mut self, path: StepPath) {
        self.step_path = Some(match self.step_path {
            Some(p) if path_rank(p) < path_rank(path) => p,
            _ => path,
        });
    }

    /// The next part of the step starts.
    pub fn next_part(&mut self) {
        self.part += 1;
    }

    /// Start recording a step.
    pub fn begin(&mut self) {
        self.tracing = true;
        self.forked = false;
        self.part = 0;
        self.step_path = None;
        if self.ops.capacity() == 0 {
            self.ops = std::mem::take(&mut self.spare);
        }
    }

    /// The step ends: count it by how its parts ran (nothing when it ran none).
    pub fn end(&mut self) {
        self.tracing = false;
        let Some(path) = self.step_path.take() else {
            return;
        };
        match path {
            StepPath::Issued => self.stats.issued += 1,
            StepPath::Recorded => self.stats.recorded += 1,
            StepPath::Replayed => self.stats.replayed += 1,
        }
        self.last_path = path;
    }

    /// Remember an issued trace (a repeat of it next step is captured).
    pub fn remember(&mut self, hash: u64, ops: Vec<Op>) {
        if let Some((_, old)) = self.state().prev.replace((hash, ops)) {
            self.recycle(old);
        }
    }

    /// The pending trace, handed over to be run (the next step records into a recycled
    /// buffer, see [`Self::recycle`]).
    pub fn take_ops(&mut self) -> Vec<Op> {
        std::mem::take(&mut self.ops)
    }

    /// A trace that has been run and is not kept: its buffer serves a later trace.
    pub fn recycle(&mut self, mut ops: Vec<Op>) {
        ops.clear();
        if ops.capacity() > self.spare.capacity() {
            self.spare = ops;
        }
    }

    /// Cache a captured graph of `ops`, dropping the least recently used beyond
    /// [`MAX_GRAPHS`].
    pub fn insert(&mut self, hash: u64, ops: Vec<Op>, graph: G, record_us: u64) {
        self.stats.record_us += record_us;
        self.note(StepPath::Recorded);
        self.next_id += 1;
        let id = self.next_id;
        let st = self.state();
        let old = st.prev.take();
        st.repeats = 0;
        st.watch = Some((id, 0));
        if let Some((_, old)) = old {
            self.recycle(old);
        }
        if self.cache.len() >= MAX_GRAPHS
            && let Some(i) = (0..self.cache.len()).min_by_key(|&i| self.cache[i].used)
        {
            self.cache.swap_remove(i);
        }
        self.cache.push(Cached {
            hash,
            ops,
            graph,
            used: self.clock,
            id: self.next_id,
        });
    }

    /// Cached graph `i` (of [`Plan::Replay`]).
    pub fn graph(&self, i: usize) -> &G {
        &self.cache[i].graph
    }

    /// Drop every cached graph (their buffers are being replaced) and start afresh.
    pub fn clear(&mut self) {
        self.cache.clear();
        self.parts.clear();
    }

    /// Graphs cached.
    pub fn cached(&self) -> usize {
        self.cache.len()
    }

    fn find(&self, hash: u64, ops: &[Op]) -> Option<usize> {
        self.cache
            .iter()
            .position(|c| c.hash == hash && c.ops == ops)
    }
}

impl Op {
    fn is_event(&self) -> bool {
        matches!(
            self,
            Op::Fork | Op::EndSide | Op::Join | Op::WaitEvent { .. }
        )
    }
}

/// A bump allocator over one device allocation: a step's activations, at the same addresses
/// every step of the same layout. Reset at each step's start; grown (between steps) to the
/// largest step seen.
#[derive(Debug, Default)]
pub struct Arena {
    /// Base address and capacity of the current allocation (0 when none).
    pub base: u64,
    pub cap: usize,
    used: usize,
    /// The most any step asked for.
    pub high: usize,
}

/// Alignment of arena allocations (cuBLAS and the vector kernels want 16 bytes; 256 matches
/// the driver's own allocations).
pub const ARENA_ALIGN: usize = 256;

impl Arena {
    /// Start a step.
    pub fn reset(&mut self) {
        self.used = 0;
    }

    /// `bytes` from the arena, or `None` when it is full (the caller allocates elsewhere; the
    /// arena grows to fit before the next step).
    pub fn take(&mut self, bytes: usize) -> Option<u64> {
        let start = self.used;
        let end = start + bytes.max(1).next_multiple_of(ARENA_ALIGN);
        self.used = end;
        self.high = self.high.max(end);
        (end <= self.cap).then_some(self.base + start as u64)
    }

    /// The capacity to grow to before the next step, if the last steps needed more.
    pub fn wanted(&self) -> Option<usize> {
        (self.high > self.cap).then(|| self.high.next_multiple_of(1 << 20))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn launch(name: &str, side: bool, arg: u64) -> Op {
        Op::Launch(LaunchOp {
            // A different kernel per name.
            func: name.bytes().map(usize::from).sum(),
            grid: (1, 1, 1),
            block: 32,
            args: ArgSlots::new([arg]).unwrap_or_default(),
            pdl: true,
            side,
            smem: 0,
        })
    }

    #[test]
    fn a_trace_is_self_contained_only_with_its_side_work_forked_and_joined() {
        let ok = [
            launch("a", false, 0),
            Op::Fork,
            launch("shrink", true, 1),
            Op::EndSide,
            launch("gemm", false, 2),
            Op::Join,
            launch("expand", false, 3),
        ];
        assert!(self_contained(&ok));
        assert!(self_contained(&[launch("a", false, 0)]));
        // A side launch without a fork in the trace (cut by a mid-step flush).
        assert!(!self_contained(&[launch("shrink", true, 1), Op::EndSide]));
        // Forked but never joined back.
        assert!(!self_contained(&ok[..5]));
        // Still on the side stream at the end.
        assert!(!self_contained(&ok[..3]));
        // A join with no fork before it.
        assert!(!self_contained(&[Op::Join, launch("a", false, 0)]));
    }

    #[test]
    fn a_join_without_a_fork_is_dropped_and_nothing_is_recorded_outside_a_step() {
        let mut r = Recorder::<()>::new(true);
        assert_eq!(r.record(Op::Join), Some(Op::Join));
        r.tracing = true;
        assert_eq!(r.record(Op::Join), None);
        assert!(r.ops.is_empty());
        assert_eq!(r.record(Op::Fork), None);
        assert_eq!(r.record(Op::Join), None);
        assert_eq!(r.ops, vec![Op::Fork, Op::Join]);
    }

    #[test]
    fn a_trace_is_issued_first_recorded_when_it_repeats_then_replayed() {
        let mut r = Recorder::<()>::new(true);
        let t1 = vec![launch("a", false, 1), launch("b", false, 2)];
        let t2 = vec![launch("a", false, 1), launch("b", false, 3)];
        let (h1, h2) = (trace_hash(&t1), trace_hash(&t2));
        let mut step = |h, t: &Vec<Op>, keep: bool| {
            r.begin();
            let plan = r.plan(h, t);
            if keep {
                r.remember(h, t.clone());
            }
            r.next_part();
            r.end();
            plan
        };
        assert_eq!(step(h1, &t1, true), Plan::Issue);
        // A different trace is issued, and becomes the one to repeat.
        assert_eq!(step(h2, &t2, true), Plan::Issue);
        assert_eq!(step(h2, &t2, false), Plan::Record);
        // A hash match alone is not enough: the whole trace must be equal.
        assert_eq!(step(h2, &t1, false), Plan::Issue);
        // The step planned for recording was never recorded: it counts as nothing.
        assert_eq!(r.stats.issued, 3);
        assert_eq!(r.last_path, StepPath::Issued);
    }

    #[test]
    fn a_trace_that_waits_for_an_adapters_copy_is_always_issued() {
        let wait = Op::WaitEvent {
            event: 0x1234,
            side: true,
        };
        let waits = vec![
            launch("a", false, 0),
            Op::Fork,
            wait.clone(),
            launch("shrink", true, 1),
            Op::EndSide,
            Op::Join,
        ];
        assert!(self_contained(&waits));
        assert!(!capturable(&waits));
        let plain: Vec<Op> = waits.iter().filter(|op| **op != wait).cloned().collect();
        assert!(capturable(&plain));
        // However often it repeats, it is never recorded; the same step without the wait is.
        let mut r = Recorder::<()>::new(true);
        for _ in 0..4 {
            assert_eq!(r.plan(trace_hash(&waits), &waits), Plan::Issue);
            r.remember(trace_hash(&waits), waits.clone());
        }
        assert_eq!(r.plan(trace_hash(&plain), &plain), Plan::Issue);
        r.remember(trace_hash(&plain), plain.clone());
        assert_eq!(r.plan(trace_hash(&plain), &plain), Plan::Record);
    }

    #[test]
    fn graphs_off_or_an_open_fork_always_issue() {
        let t = vec![launch("a", false, 1)];
        let h = trace_hash(&t);
        let mut off = Recorder::<()>::new(false);
        off.remember(h, t.clone());
        assert_eq!(off.plan(h, &t), Plan::Issue);
        let open = vec![Op::Fork, launch("s", true, 1)];
        let mut r = Recorder::<()>::new(true);
        r.remember(trace_hash(&open), open.clone());
        assert_eq!(r.plan(trace_hash(&open), &open), Plan::Issue);
        // Events alone are not worth a graph.
        let events = vec![Op::Fork, Op::EndSide, Op::Join];
        r.remember(trace_hash(&events), events.clone());
        assert_eq!(r.plan(trace_hash(&events), &events), Plan::Issue);
    }

    /// Run `layouts` (one trace id per step) through a recorder, "recording" when asked; the
    /// path of each step.
    fn paths(r: &mut Recorder<()>, layouts: &[u64]) -> Vec<StepPath> {
        layouts
            .iter()
            .map(|&l| {
                r.begin();
                part(r, vec![launch("k", false, l)]);
                r.end();
                r.last_path
            })
            .collect()
    }

    /// Plan one part of a step and do what the plan says.
    fn part(r: &mut Recorder<()>, t: Vec<Op>) {
        let h = trace_hash(&t);
        match r.plan(h, &t) {
            Plan::Record => r.insert(h, t, (), 0),
            Plan::Issue => r.remember(h, t),
            Plan::Replay(_) => {}
        }
        r.next_part();
    }

    #[test]
    fn each_part_of_a_step_is_judged_against_the_same_part_of_the_previous_step() {
        use StepPath::{Issued as I, Recorded as R, Replayed as P};
        let mut r = Recorder::<()>::new(true);
        // Steps of two parts: the first the same every step, the second changing at step 3.
        let mut paths = Vec::new();
        for step in 0..6u64 {
            r.begin();
            part(&mut r, vec![launch("head", false, 1)]);
            part(&mut r, vec![launch("tail", false, u64::from(step >= 3))]);
            r.end();
            paths.push(r.last_path);
        }
        // Both parts recorded at the second step; at step 3 the tail is issued (so is the
        // step). Its graph got one replay only, so the new tail waits for two repeats (its
        // own patience) and is recorded at step 5, while the head kept replaying.
        assert_eq!(paths, vec![I, R, P, I, I, R]);
        assert_eq!(r.cached(), 3);
        assert_eq!(
            (r.stats.issued, r.stats.recorded, r.stats.replayed),
            (3, 2, 1)
        );
        assert_eq!((r.parts[0].patience, r.parts[1].patience), (1, 2));
    }

    #[test]
    fn a_steady_batch_records_at_its_second_step_and_replays_after() {
        use StepPath::{Issued as I, Recorded as R, Replayed as P};
        let mut r = Recorder::<()>::new(true);
        let steady = [1u64; 30];
        let mut want = vec![I, R];
        want.extend([P; 28]);
        assert_eq!(paths(&mut r, &steady), want);
        // It paid off: the next layout is recorded at its second step too, and the first one
        // is still cached.
        assert_eq!(paths(&mut r, &[2, 2, 2, 1]), vec![I, R, P, P]);
    }

    #[test]
    fn a_batch_that_keeps_changing_stops_paying_for_recordings() {
        // Every layout lasts three steps.
        let layouts: Vec<u64> = (0..60u64).map(|i| 100 + i / 3).collect();
        let mut r = Recorder::<()>::new(true);
        let p = paths(&mut r, &layouts);
        let recorded = p.iter().filter(|&&x| x == StepPath::Recorded).count();
        // The first layout is recorded (one replay: wasted), the next needs two repeats (one
        // more waste), then four: never again.
        assert_eq!(recorded, 2, "{p:?}");
        assert_eq!(r.parts[0].patience, 4);
        // A layout that then stays long enough is recorded after four repeats, and once it has
        // paid off the patience is back to one.
        let mut steady = vec![500u64; 5 + WORTH_REPLAYS as usize];
        steady.extend([600, 600]);
        let p = paths(&mut r, &steady);
        assert_eq!(p[4], StepPath::Recorded);
        assert_eq!(p[p.len() - 1], StepPath::Recorded);
        assert_eq!(r.parts[0].patience, 1);
    }

    #[test]
    fn a_steady_batch_records_its_traces_into_the_same_two_buffers() {
        let mut r = Recorder::<()>::new(true);
        let mut buffers = std::collections::HashSet::new();
        for step in 0..40u64 {
            r.begin();
            for i in 0..100 {
                r.record(launch("k", false, i));
            }
            // The first layout for three steps, then a new one each step (never replayed).
            let layout = if step < 3 { 0 } else { step };
            r.record(launch("last", false, layout));
            let ops = r.take_ops();
            buffers.insert(ops.as_ptr() as usize);
            let h = trace_hash(&ops);
            match r.plan(h, &ops) {
                Plan::Record => r.insert(h, ops, (), 0),
                Plan::Issue => r.remember(h, ops),
                Plan::Replay(_) => r.recycle(ops),
            }
            r.next_part();
            r.end();
        }
        // One buffer went into the cached graph; two others take turns (the issued trace
        // kept to compare the next one with, and the one being recorded).
        assert_eq!(buffers.len(), 3, "{} trace buffers", buffers.len());
    }

    #[test]
    fn arguments_are_held_inline_up_to_the_limit() {
        let a = ArgSlots::new([1u64, 2, 3]).unwrap();
        assert_eq!(a.as_slice(), &[1, 2, 3]);
        assert_ne!(a, ArgSlots::new([1u64, 2]).unwrap());
        assert!(ArgSlots::new(0..MAX_ARGS as u64).is_some());
        assert!(ArgSlots::new(0..=MAX_ARGS as u64).is_none());
    }

    #[test]
    fn the_arena_hands_out_aligned_stable_addresses_and_asks_to_grow_when_full() {
        let mut a = Arena {
            base: 0x1000,
            cap: 1024,
            ..Arena::default()
        };
        assert_eq!(a.take(10), Some(0x1000));
        assert_eq!(a.take(300), Some(0x1000 + 256));
        assert_eq!(a.wanted(), None);
        assert_eq!(a.take(600), None);
        assert_eq!(a.wanted(), Some(1 << 20));
        a.reset();
        // Same sizes, same addresses.
        assert_eq!(a.take(10), Some(0x1000));
        assert_eq!(a.take(300), Some(0x1000 + 256));
    }
}
