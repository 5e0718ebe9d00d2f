//! Turning one row of logits into a token, per request: greedy at temperature 0, otherwise
//! temperature -> top-k -> top-p -> a draw from the request's own seeded RNG (so a request with a
//! seed reproduces its tokens whatever else shares its batches). Also the stop conditions: stop
//! token ids, `max_tokens`, and stop strings matched over the detokenized text the caller keeps.
//! Pure functions and small structs, no device code.

use rand::rngs::Xoshiro256PlusPlus;
use rand::{RngExt, SeedableRng};

use crate::engine::backend::{Pick, RowSampling};

/// The largest f32 below 1.
const LARGEST_BELOW_ONE: f32 = 1.0 - f32::EPSILON / 2.0;

/// Largest number of alternatives `logprobs` may ask for.
pub const MAX_LOGPROBS: usize = 20;

/// Why sampling parameters are refused.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum SamplingError {
    #[error("temperature {0} must be a finite number >= 0")]
    Temperature(f32),
    #[error("top_p {0} must be in (0, 1]")]
    TopP(f32),
    #[error("max_tokens must be at least 1")]
    MaxTokens,
    #[error("logprobs {got} exceeds the limit of {max}")]
    Logprobs { got: usize, max: usize },
    #[error("stop strings must not be empty")]
    EmptyStop,
}

/// How one request samples and when it stops.
#[derive(Clone, Debug, PartialEq)]
pub struct SamplingParams {
    /// 0 means greedy.
    pub temperature: f32,
    /// Keep only the `k` most likely tokens; `None` or 0 keeps all.
    pub top_k: Option<usize>,
    /// Keep the smallest set of most likely tokens whose probability reaches `top_p`.
    pub top_p: f32,
    /// Seed of the request's RNG; without one the engine picks a random seed.
    pub seed: Option<u64>,
    /// Most tokens to generate.
    pub max_tokens: usize,
    /// Token ids that end generation (the id itself is not part of the text).
    pub stop_token_ids: Vec<u32>,
    /// Strings that end generation; the text is cut before the first occurrence.
    pub stop: Vec<String>,
    /// Also report the log-probabilities of this many most likely alternatives.
    pub logprobs: Option<usize>,
}

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams {
            temperature: 1.0,
            top_k: None,
            top_p: 1.0,
            seed: None,
            max_tokens: 16,
            stop_token_ids: Vec::new(),
            stop: Vec::new(),
            logprobs: None,
        }
    }
}

impl SamplingParams {
    /// Check the ranges.
    pub fn validate(&self) -> Result<(), SamplingError> {
        if !self.temperature.is_finite() || self.temperature < 0.0 {
            return Err(SamplingError::Temperature(self.temperature));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(SamplingError::TopP(self.top_p));
        }
        if self.max_tokens == 0 {
            return Err(SamplingError::MaxTokens);
        }
        if let Some(n) = self.logprobs
            && n > MAX_LOGPROBS
        {
            return Err(SamplingError::Logprobs {
                got: n,
                max: MAX_LOGPROBS,
            });
        }
        if self.stop.iter().any(String::is_empty) {
            return Err(SamplingError::EmptyStop);
        }
        Ok(())
    }
}

/// One sampled token.
#[derive(Clone, Debug, PartialEq)]
pub struct Sampled {
    pub token: u32,
    /// Log-probability of `token` under the model's unmodified distribution (log-softmax of the
    /// raw logits, before temperature, top-k and top-p).
    pub logprob: f32,
    /// The most likely alternatives `(token, logprob)`, best first, when `logprobs` was asked.
    pub top_logprobs: Vec<(u32, f32)>,
}

/// A request's sampler: its parameters and its own RNG.
#[derive(Clone, Debug)]
pub struct Sampler {
    params: SamplingParams,
    rng: Xoshiro256PlusPlus,
}

impl Sampler {
    /// A sampler seeded with `params.seed`, or `fallback_seed` when the request gave none.
    pub fn new(params: SamplingParams, fallback_seed: u64) -> Self {
        let seed = params.seed.unwrap_or(fallback_seed);
        Sampler {
            params,
            rng: Xoshiro256PlusPlus::seed_from_u64(seed),
        }
    }

    /// The parameters.
    pub fn params(&self) -> &SamplingParams {
        &self.params
    }

    /// What the device needs to pick this request's next token: its parameters and, when it
    /// samples, the next uniform draw of its RNG.
    pub fn row_sampling(&mut self) -> RowSampling {
        let p = &self.params;
        if p.temperature == 0.0 {
            return RowSampling::GREEDY;
        }
        let u: f64 = self.rng.random();
        RowSampling {
            temperature: p.temperature,
            top_k: p.top_k.map_or(0, |k| k.min(u32::MAX as usize) as u32),
            top_p: p.top_p,
            // Rounding to f32 could make the draw 1.0, outside [0, 1).
            u: (u as f32).min(LARGEST_BELOW_ONE),
        }
    }

    /// Turn a device pick into the sampled token, with the `logprobs` alternatives taken from
    /// the row's logits when the request asked for them (the caller then provides `logits`).
    pub fn finish(&self, pick: Pick, logits: Option<&[f32]>) -> Sampled {
        let top_logprobs = match (self.params.logprobs, logits) {
            (Some(n), Some(row)) if n > 0 => top_n(&log_softmax(row), n),
            _ => Vec::new(),
        };
        Sampled {
            token: pick.token,
            logprob: pick.logprob,
            top_logprobs,
        }
    }

    /// Whether [`Self::finish`] needs the row's logits.
    pub fn wants_logits(&self) -> bool {
        self.params.logprobs.is_some_and(|n| n > 0)
    }

    /// Pick the next token from one row of logits (`[vocab]`) on the host, as the runtime does
    /// through a backend's `sample` (the tests' shorthand).
    #[cfg(test)]
    pub fn sample(&mut self, logits: &[f32]) -> Sampled {
        let rs = self.row_sampling();
        self.finish(pick_row(logits, &rs), Some(logits))
    }
}

/// Pick a token from one row of logits as `rs` says: the host twin of the backends' `sample`.
///
/// The procedure, which every backend follows exactly (the CUDA kernel `sample_f32` in f32, this
/// one in f64, so they can differ only where a sum lands on a boundary within rounding):
///
/// 1. NaN logits count as minus infinity: never picked, probability 0. `-0.0` equals `0.0`.
/// 2. Greedy when `temperature` is not `> 0`, or when the largest logit is not finite (all
///    minus infinity/NaN, or a plus infinity): the first largest logit (token 0 if all are NaN).
/// 3. Otherwise `z_i = logit_i / temperature`. Top-k (only when `0 < top_k < vocab`): keep every
///    token with `z_i >=` the `top_k`-th largest `z` (ties at the boundary are all kept; compared
///    on the raw logits, which order the same way, so no rounding can change the set).
/// 4. Weights `w_i = exp(z_i - max z)` over the kept set (0 for minus-infinity logits); the
///    probabilities `p_i` are the weights normalised over that set.
/// 5. Top-p (only when `0 < top_p < 1`): let `θ` be the smallest probability in the shortest
///    descending-probability prefix whose cumulative sum reaches `top_p`; keep every kept token
///    with `p_i >= θ` (all ties of `θ`). As the probability is monotone in the logit, this is the
///    largest logit value `λ` whose kept tokens with `logit >= λ` carry at least `top_p` of the
///    kept mass, keeping `logit >= λ`; when rounding leaves no such prefix, nothing is cut.
/// 6. Draw: `target = u * (sum of kept p_i)`; walk the kept tokens in ascending token-id order
///    accumulating `p_i` and return the first whose cumulative sum exceeds `target`; if none does
///    (`u` rounded up to 1), the last kept token with `p_i > 0`.
///
/// The returned logprob is always `log_softmax(raw logits)[token]` (ignoring temperature, top-k
/// and top-p), minus infinity when the largest logit is not finite.
pub fn pick_row(logits: &[f32], rs: &RowSampling) -> Pick {
    let token = pick(logits, rs);
    Pick {
        token,
        logprob: logprob_of(logits, token as usize),
    }
}

/// `log_softmax(logits)[token]`, in f64; NaN logits count as minus infinity.
pub fn logprob_of(logits: &[f32], token: usize) -> f32 {
    let max = logits
        .iter()
        .copied()
        .filter(|v| !v.is_nan())
        .fold(f32::NEG_INFINITY, f32::max) as f64;
    let Some(&v) = logits.get(token) else {
        return f32::NEG_INFINITY;
    };
    if !max.is_finite() || v.is_nan() {
        return f32::NEG_INFINITY;
    }
    let sum: f64 = logits
        .iter()
        .filter(|v| !v.is_nan())
        .map(|&v| ((v as f64) - max).exp())
        .sum();
    ((v as f64) - max - sum.ln()) as f32
}

/// Index of the largest logit (the first on ties); NaNs never win.
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best: Option<usize> = None;
    for (i, &v) in logits.iter().enumerate() {
        if !v.is_nan() && best.is_none_or(|b| v > logits[b]) {
            best = Some(i);
        }
    }
    best.unwrap_or(0) as u32
}

/// Log-softmax in f64 (returned as f32).
pub fn log_softmax(logits: &[f32]) -> Vec<f32> {
    let max = logits
        .iter()
        .copied()
        .filter(|v| !v.is_nan())
        .fold(f32::NEG_INFINITY, f32::max) as f64;
    if !max.is_finite() {
        return vec![f32::NEG_INFINITY; logits.len()];
    }
    let lse = max
        + logits
            .iter()
            .map(|&v| ((v as f64) - max).exp())
            .filter(|e| !e.is_nan())
            .sum::<f64>()
            .ln();
    logits
        .iter()
        .map(|&v| {
            if v.is_nan() {
                f32::NEG_INFINITY
            } else {
                ((v as f64) - lse) as f32
            }
        })
        .collect()
}

fn top_n(log_probs: &[f32], n: usize) -> Vec<(u32, f32)> {
    let mut idx: Vec<u32> = (0..log_probs.len() as u32).collect();
    let n = n.min(idx.len());
    if n == 0 {
        return Vec::new();
    }
    let by_prob = |a: &u32, b: &u32| {
        log_probs[*b as usize]
            .total_cmp(&log_probs[*a as usize])
            .then(a.cmp(b))
    };
    idx.select_nth_unstable_by(n - 1, by_prob);
    idx.truncate(n);
    idx.sort_by(by_prob);
    idx.into_iter()
        .map(|i| (i, log_probs[i as usize]))
        .collect()
}

/// A logit as the procedure compares it: NaN counts as minus infinity (`-0.0 == 0.0` already
/// holds for float comparison).
fn rank_value(v: f32) -> f32 {
    if v.is_nan() { f32::NEG_INFINITY } else { v }
}

/// Steps 2 to 6 of [`pick_row`]'s procedure.
fn pick(logits: &[f32], rs: &RowSampling) -> u32 {
    let max = logits
        .iter()
        .copied()
        .map(rank_value)
        .fold(f32::NEG_INFINITY, f32::max);
    // `partial_cmp` so a NaN temperature is greedy too.
    let tempered = rs.temperature.partial_cmp(&0.0) == Some(std::cmp::Ordering::Greater);
    if !tempered || !max.is_finite() {
        return argmax(logits);
    }
    // Everything kept has `rank_value(logit) >= threshold`.
    let mut threshold = f32::NEG_INFINITY;
    let k = rs.top_k as usize;
    if k > 0 && k < logits.len() {
        let mut values: Vec<f32> = logits.iter().copied().map(rank_value).collect();
        values.select_nth_unstable_by(k - 1, |a, b| b.total_cmp(a));
        threshold = values[k - 1];
    }
    let t = rs.temperature as f64;
    let weight = |v: f32, threshold: f32| -> f64 {
        let v = rank_value(v);
        if v == f32::NEG_INFINITY || v < threshold {
            0.0
        } else {
            ((v as f64 - max as f64) / t).exp()
        }
    };
    if rs.top_p > 0.0 && rs.top_p < 1.0 {
        let mut kept: Vec<(f32, f64)> = logits
            .iter()
            .filter(|&&v| rank_value(v) >= threshold)
            .map(|&v| (rank_value(v), weight(v, threshold)))
            .collect();
        let total: f64 = kept.iter().map(|e| e.1).sum();
        let target = rs.top_p as f64 * total;
        kept.sort_by(|a, b| b.0.total_cmp(&a.0));
        let mut cum = 0.0;
        // Equal logits have equal probabilities: add each value's whole group before testing.
        for group in kept.chunk_by(|a, b| a.0 == b.0) {
            cum += group.iter().map(|e| e.1).sum::<f64>();
            if cum >= target {
                threshold = group[0].0;
                break;
            }
        }
    }
    let total: f64 = logits.iter().map(|&v| weight(v, threshold)).sum();
    let target = rs.u as f64 * total;
    let mut cum = 0.0;
    let mut last_positive = 0u32;
    for (i, &v) in logits.iter().enumerate() {
        let w = weight(v, threshold);
        if w > 0.0 {
            cum += w;
            if cum > target {
                return i as u32;
            }
            last_positive = i as u32;
        }
    }
    last_positive
}

/// Why a sequence finished.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FinishReason {
    /// A stop token id (the id) was sampled.
    StopToken(u32),
    /// A stop string (its index in `SamplingParams::stop`) appeared in the text.
    StopString(usize),
    /// `max_tokens` were generated.
    Length,
}

/// Result of scanning the generated text for stop strings.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StopScan {
    /// No stop string yet; the first `safe_len` bytes can be sent to the client, the rest might
    /// be the start of a stop string and is held back.
    Continue { safe_len: usize },
    /// Stop string number `index` starts at byte `text_len`: the final text is `text[..text_len]`.
    Stopped { index: usize, text_len: usize },
}

/// Scan the whole generated `text` for the earliest occurrence of any of `stops`.
pub fn scan_stop_strings(text: &str, stops: &[String]) -> StopScan {
    let earliest = stops
        .iter()
        .enumerate()
        .filter(|(_, s)| !s.is_empty())
        .filter_map(|(i, s)| text.find(s.as_str()).map(|at| (at, i)))
        .min();
    if let Some((text_len, index)) = earliest {
        return StopScan::Stopped { index, text_len };
    }
    // Hold back the longest suffix of the text that is a proper prefix of some stop string.
    let mut held = 0;
    for s in stops {
        for (cut, _) in s.char_indices().skip(1) {
            if cut > held && text.ends_with(&s[..cut]) {
                held = cut;
            }
        }
    }
    StopScan::Continue {
        safe_len: text.len() - held,
    }
}

/// Check the token-level stop conditions after `token` was appended, making `generated` tokens
/// so far. Stop strings are separate ([`scan_stop_strings`]): they need the text.
pub fn check_stop_token(
    params: &SamplingParams,
    token: u32,
    generated: usize,
) -> Option<FinishReason> {
    if params.stop_token_ids.contains(&token) {
        return Some(FinishReason::StopToken(token));
    }
    if generated >= params.max_tokens {
        return Some(FinishReason::Length);
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(temperature: f32) -> SamplingParams {
        SamplingParams {
            temperature,
            ..Default::default()
        }
    }

    #[test]
    fn temperature_zero_is_greedy_with_the_logprob_of_the_raw_distribution() {
        let mut s = Sampler::new(params(0.0), 1);
        let out = s.sample(&[1.0, 3.0, 3.0, 0.5]);
        assert_eq!(out.token, 1);
        let lse = (1f64.exp() + 2.0 * 3f64.exp() + 0.5f64.exp()).ln();
        assert!((out.logprob as f64 - (3.0 - lse)).abs() < 1e-6);
    }

    #[test]
    fn the_logprob_ignores_temperature_and_top_k() {
        let logits = [2.0, 1.0, 0.0];
        let mut s = Sampler::new(
            SamplingParams {
                temperature: 0.1,
                top_k: Some(1),
                ..Default::default()
            },
            3,
        );
        let out = s.sample(&logits);
        assert_eq!(out.token, 0);
        assert!((out.logprob - log_softmax(&logits)[0]).abs() < 1e-7);
        assert!(out.logprob < -0.3);
    }

    #[test]
    fn the_same_seed_gives_the_same_tokens_and_another_seed_differs() {
        let logits: Vec<f32> = (0..50).map(|i| (i % 7) as f32 * 0.3).collect();
        let run = |seed| {
            let mut s = Sampler::new(
                SamplingParams {
                    seed: Some(seed),
                    ..params(1.0)
                },
                0,
            );
            (0..40).map(|_| s.sample(&logits).token).collect::<Vec<_>>()
        };
        assert_eq!(run(7), run(7));
        assert_ne!(run(7), run(8));
    }

    fn row(temperature: f32, top_k: u32, top_p: f32, u: f32) -> RowSampling {
        RowSampling {
            temperature,
            top_k,
            top_p,
            u,
        }
    }

    fn token(logits: &[f32], rs: RowSampling) -> u32 {
        pick_row(logits, &rs).token
    }

    #[test]
    fn top_k_and_top_p_restrict_the_candidates() {
        let logits = [5.0, 4.9, 0.0, -1.0, 4.8];
        for u in [0.0, 0.3, 0.6, 0.999] {
            assert!([0, 1].contains(&token(&logits, row(1.0, 2, 1.0, u))));
        }
        // p(0) ~ 0.35, p(1) ~ 0.32, p(4) ~ 0.29: top_p 0.5 keeps exactly the first two.
        assert_eq!(token(&logits, row(1.0, 0, 0.5, 0.0)), 0);
        assert_eq!(token(&logits, row(1.0, 0, 0.5, 0.99)), 1);
        // Without restrictions the draw walks every token in id order, so u near 1 is the last.
        assert_eq!(token(&logits, row(1.0, 0, 1.0, 0.9999)), 4);
    }

    #[test]
    fn the_draw_walks_the_kept_tokens_in_token_id_order() {
        // p = (0.25, 0.75): [0, 0.25) picks token 0, [0.25, 1) token 1.
        let logits = [0.0f32, 3.0f32.ln()];
        assert_eq!(token(&logits, row(1.0, 0, 1.0, 0.0)), 0);
        assert_eq!(token(&logits, row(1.0, 0, 1.0, 0.2)), 0);
        assert_eq!(token(&logits, row(1.0, 0, 1.0, 0.3)), 1);
        assert_eq!(token(&logits, row(1.0, 0, 1.0, 0.999)), 1);
        // Reversed, the most likely token comes first and takes [0, 0.75).
        let reversed = [3.0f32.ln(), 0.0];
        assert_eq!(token(&reversed, row(1.0, 0, 1.0, 0.7)), 0);
        assert_eq!(token(&reversed, row(1.0, 0, 1.0, 0.8)), 1);
    }

    #[test]
    fn top_k_keeps_every_token_tied_with_the_kth_largest() {
        // The 2nd largest is 2.0, held by tokens 2 and 3: both are kept, tokens 0 and 4 never.
        let logits = [1.0, 3.0, 2.0, 2.0, 0.0];
        let picked: Vec<u32> = (0..100)
            .map(|i| token(&logits, row(1.0, 2, 1.0, i as f32 / 100.0)))
            .collect();
        for t in [1, 2, 3] {
            assert!(picked.contains(&t), "token {t} never drawn: {picked:?}");
        }
        assert!(!picked.contains(&0) && !picked.contains(&4));
        // -0.0 and 0.0 are the same logit.
        let zeros = [-0.0, 0.0, -1.0];
        assert_eq!(token(&zeros, row(1.0, 1, 1.0, 0.99)), 1);
        assert_eq!(token(&zeros, row(1.0, 1, 1.0, 0.0)), 0);
    }

    #[test]
    fn top_k_compares_raw_logits_whatever_the_temperature() {
        // A tiny temperature makes every weight but the largest underflow; the kept set is still
        // the two largest logits, and the draw can only pick the largest.
        let logits = [1.0, 1.0 + 1e-6, 0.5];
        for u in [0.0, 0.5, 0.999] {
            assert_eq!(token(&logits, row(1e-30, 2, 1.0, u)), 1);
        }
        // A huge temperature flattens the kept pair to equal odds.
        assert_eq!(token(&[10.0, 0.0, 9.0], row(1e30, 2, 1.0, 0.4)), 0);
        assert_eq!(token(&[10.0, 0.0, 9.0], row(1e30, 2, 1.0, 0.6)), 2);
    }

    #[test]
    fn top_p_keeps_every_token_tied_with_the_smallest_probability_of_the_prefix() {
        // p ~ (0.534, 0.197, 0.197, 0.072): the shortest prefix reaching 0.6 ends at a 0.197,
        // so both 0.197 tokens are kept and token 3 is not.
        let logits = [2.0, 1.0, 1.0, 0.0];
        let picked: Vec<u32> = (0..100)
            .map(|i| token(&logits, row(1.0, 0, 0.6, i as f32 / 100.0)))
            .collect();
        assert!(picked.contains(&1) && picked.contains(&2));
        assert!(!picked.contains(&3));
        assert_eq!(token(&logits, row(1.0, 0, 0.6, 0.999)), 2);
        // A prefix that reaches top_p exactly stops there: 0.534 alone for top_p 0.5.
        assert_eq!(token(&logits, row(1.0, 0, 0.5, 0.999)), 0);
    }

    #[test]
    fn top_p_applies_to_the_probabilities_renormalised_after_top_k() {
        // After top-k 2 the pair has p ~ (0.731, 0.269): top_p 0.7 keeps token 0 alone,
        // although over all four tokens its probability is only ~0.61.
        let logits = [2.0, 1.0, 0.5, 0.5];
        assert_eq!(token(&logits, row(1.0, 2, 0.7, 0.999)), 0);
        assert_eq!(token(&logits, row(1.0, 0, 0.7, 0.999)), 1);
    }

    #[test]
    fn nan_logits_are_never_picked_and_count_as_minus_infinity() {
        let logits = [f32::NAN, 1.0, f32::NAN, 0.5];
        for u in [0.0, 0.5, 0.999] {
            let t = token(&logits, row(1.0, 0, 1.0, u));
            assert!(t == 1 || t == 3, "{t}");
        }
        assert_eq!(token(&logits, row(0.0, 0, 1.0, 0.0)), 1);
        // A temperature that is not > 0 (NaN included) is greedy.
        assert_eq!(token(&logits, row(f32::NAN, 0, 1.0, 0.999)), 1);
        assert_eq!(token(&logits, row(-1.0, 0, 1.0, 0.999)), 1);
        // Top-k counts NaN as the smallest value: k = 3 keeps tokens 1, 3 and the NaNs at zero
        // probability, so u near 1 lands on token 3.
        assert_eq!(token(&logits, row(1.0, 3, 1.0, 0.999)), 3);
        let p = pick_row(&logits, &row(1.0, 0, 1.0, 0.0));
        assert!((p.logprob - log_softmax(&logits)[p.token as usize]).abs() < 1e-7);
        // Nothing finite: greedy, token 0 when all are NaN, the first -inf otherwise.
        assert_eq!(token(&[f32::NAN; 3], row(1.0, 0, 1.0, 0.5)), 0);
        let p = pick_row(
            &[f32::NAN, f32::NEG_INFINITY, f32::NEG_INFINITY],
            &row(1.0, 0, 1.0, 0.5),
        );
        assert_eq!(p.token, 1);
        assert_eq!(p.logprob, f32::NEG_INFINITY);
    }

    #[test]
    fn a_draw_at_one_picks_the_last_kept_token_with_nonzero_probability() {
        let logits = [0.0, 0.0, f32::NEG_INFINITY];
        assert_eq!(token(&logits, row(1.0, 0, 1.0, 1.0)), 1);
        assert_eq!(token(&logits, row(1.0, 0, 1.0, f32::NAN)), 1);
    }

    #[test]
    fn the_sampler_never_hands_out_a_draw_of_one() {
        assert_eq!(f32::from_bits(LARGEST_BELOW_ONE.to_bits() + 1), 1.0);
        // Why the clamp exists: an f64 draw just below 1 rounds up in f32.
        assert_eq!((1.0 - 1e-9f64) as f32, 1.0);
        let mut s = Sampler::new(params(1.0), 5);
        for _ in 0..1000 {
            let rs = s.row_sampling();
            assert!((0.0..1.0).contains(&rs.u), "{}", rs.u);
        }
    }

    #[test]
    fn sampling_follows_the_tempered_distribution() {
        let logits = [0.0f32, (3.0f32).ln()];
        let mut s = Sampler::new(params(1.0), 42);
        let ones = (0..4000).filter(|_| s.sample(&logits).token == 1).count();
        assert!((2850..3150).contains(&ones), "{ones}");
    }

    #[test]
    fn logprobs_reports_the_best_alternatives_in_order() {
        let mut s = Sampler::new(
            SamplingParams {
                logprobs: Some(2),
                ..params(0.0)
            },
            0,
        );
        let out = s.sample(&[0.0, 2.0, 1.0, 2.0]);
        let ids: Vec<u32> = out.top_logprobs.iter().map(|t| t.0).collect();
        assert_eq!(ids, vec![1, 3]);
    }

    #[test]
    fn stop_strings_cut_the_text_and_hold_back_possible_prefixes() {
        let stops = vec!["\n\n".to_string(), "END".to_string()];
        assert_eq!(
            scan_stop_strings("Paris.\n\nThe", &stops),
            StopScan::Stopped {
                index: 0,
                text_len: 6
            }
        );
        assert_eq!(
            scan_stop_strings("Paris. EN", &stops),
            StopScan::Continue { safe_len: 7 }
        );
        assert_eq!(
            scan_stop_strings("Paris.\n", &stops),
            StopScan::Continue { safe_len: 6 }
        );
        assert_eq!(
            scan_stop_strings("Paris", &stops),
            StopScan::Continue { safe_len: 5 }
        );
        let unicode = vec!["é!".to_string()];
        assert_eq!(
            scan_stop_strings("café", &unicode),
            StopScan::Continue { safe_len: 3 }
        );
    }

    #[test]
    fn stop_tokens_and_max_tokens_finish_a_sequence() {
        let p = SamplingParams {
            max_tokens: 3,
            stop_token_ids: vec![2],
            ..Default::default()
        };
        assert_eq!(check_stop_token(&p, 2, 1), Some(FinishReason::StopToken(2)));
        assert_eq!(check_stop_token(&p, 5, 2), None);
        assert_eq!(check_stop_token(&p, 5, 3), Some(FinishReason::Length));
    }

    #[test]
    fn out_of_range_parameters_are_rejected() {
        assert_eq!(
            params(-1.0).validate(),
            Err(SamplingError::Temperature(-1.0))
        );
        let p = SamplingParams {
            top_p: 0.0,
            ..Default::default()
        };
        assert_eq!(p.validate(), Err(SamplingError::TopP(0.0)));
        let p = SamplingParams {
            logprobs: Some(50),
            ..Default::default()
        };
        assert_eq!(
            p.validate(),
            Err(SamplingError::Logprobs { got: 50, max: 20 })
        );
        assert!(SamplingParams::default().validate().is_ok());
    }
}
