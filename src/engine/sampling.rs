//! Turning one row of logits into a token, per request: greedy at temperature 0, otherwise
//! temperature -> top-k -> top-p -> a draw from the request's own seeded RNG (so a request with a
//! seed reproduces its tokens whatever else shares its batches). Also the stop conditions: stop
//! token ids, `max_tokens`, and stop strings matched over the detokenized text the caller keeps.
//! Pure functions and small structs, no device code.

use rand::rngs::Xoshiro256PlusPlus;
use rand::{RngExt, SeedableRng};

use crate::engine::backend::{Pick, RowSampling};

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
            u: u as f32,
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

    /// Pick the next token from one row of logits (`[vocab]`) on the host.
    pub fn sample(&mut self, logits: &[f32]) -> Sampled {
        let rs = self.row_sampling();
        self.finish(pick_row(logits, &rs), Some(logits))
    }
}

/// Pick a token from one row of logits as `rs` says: the host twin of the backends' `sample`.
pub fn pick_row(logits: &[f32], rs: &RowSampling) -> Pick {
    let token = if rs.temperature == 0.0 {
        argmax(logits)
    } else {
        pick(logits, rs, rs.u as f64)
    };
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

/// Temperature, then top-k, then top-p, then the token where the cumulative probability passes
/// `u` (uniform in `[0, 1)`).
fn pick(logits: &[f32], p: &RowSampling, u: f64) -> u32 {
    let t = p.temperature as f64;
    let mut cand: Vec<(u32, f64)> = logits
        .iter()
        .enumerate()
        .filter(|(_, v)| !v.is_nan())
        .map(|(i, &v)| (i as u32, v as f64 / t))
        .collect();
    if cand.is_empty() {
        return 0;
    }
    let desc = |a: &(u32, f64), b: &(u32, f64)| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0));
    if let Some(k) = Some(p.top_k as usize).filter(|&k| k > 0 && k < cand.len()) {
        cand.select_nth_unstable_by(k - 1, desc);
        cand.truncate(k);
    }
    cand.sort_by(desc);
    let max = cand[0].1;
    let mut probs: Vec<f64> = cand.iter().map(|&(_, v)| (v - max).exp()).collect();
    let total: f64 = probs.iter().sum();
    for q in probs.iter_mut() {
        *q /= total;
    }
    if p.top_p < 1.0 {
        let mut cum = 0.0;
        let mut keep = probs.len();
        for (i, &q) in probs.iter().enumerate() {
            cum += q;
            if cum >= p.top_p as f64 {
                keep = i + 1;
                break;
            }
        }
        probs.truncate(keep);
        cand.truncate(keep);
    }
    let total: f64 = probs.iter().sum();
    let target = u * total;
    let mut cum = 0.0;
    for (i, &q) in probs.iter().enumerate() {
        cum += q;
        if target < cum {
            return cand[i].0;
        }
    }
    cand[cand.len() - 1].0
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

    #[test]
    fn top_k_and_top_p_restrict_the_candidates() {
        let logits = [5.0, 4.9, 0.0, -1.0, 4.8];
        let row = |top_k: u32, top_p: f32| RowSampling {
            temperature: 1.0,
            top_k,
            top_p,
            u: 0.0,
        };
        let top_k = row(2, 1.0);
        for u in [0.0, 0.3, 0.6, 0.999] {
            assert!([0, 1].contains(&pick(&logits, &top_k, u)));
        }
        // p(0) ~ 0.36, p(1) ~ 0.33: top_p 0.5 keeps exactly those two.
        let top_p = row(0, 0.5);
        assert_eq!(pick(&logits, &top_p, 0.0), 0);
        assert_eq!(pick(&logits, &top_p, 0.99), 1);
        // Without restrictions the least likely tail is reachable.
        assert_eq!(pick(&logits, &row(0, 1.0), 0.9999), 3);
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
