//! What goes into the engine and what comes out: the checked request ([`ValidRequest`]), the
//! events of its stream ([`StreamEvent`]), and the text side of generation — incremental
//! detokenisation and stop strings, whose possible beginnings are held back until they are
//! either completed (and cut) or ruled out.

use std::sync::Arc;

use uuid::Uuid;

use crate::engine::lora::cache::AdapterKey;
pub use crate::engine::sampling::SamplingParams;

/// A request the service has checked: tenant resolved, prompt tokenized, adapter resolved to an
/// immutable version.
#[derive(Clone, Debug)]
pub struct ValidRequest {
    /// The tenant, for fairness and tracing.
    pub tenant: Uuid,
    /// The service's id of this request, for tracing (its bits also seed requests that gave no
    /// seed).
    pub request_id: Uuid,
    /// `None` = the base model.
    pub adapter: Option<AdapterKey>,
    /// Prompt token ids (at least one).
    pub prompt: Vec<u32>,
    /// Sampling and stop conditions: temperature, top-k, top-p, seed, `max_tokens`, stop token
    /// ids (not part of the text), stop strings (the text ends right before the first one) and
    /// logprobs.
    pub sampling: SamplingParams,
}

/// Why a generation ended (also its name on the wire: the API's streams and responses).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    /// `max_tokens` or the model's context was reached.
    Length,
    /// An end-of-sequence token, a stop id or a stop string.
    Stop,
    /// The client cancelled it, left, or could not keep up.
    Cancelled,
}

impl FinishReason {
    /// The wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Length => "length",
            FinishReason::Stop => "stop",
            FinishReason::Cancelled => "cancelled",
        }
    }
}

/// Token counts of a request (also its usage on the wire).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Usage {
    pub prompt_tokens: u32,
    pub completion_tokens: u32,
}

impl Usage {
    /// Prompt plus completion.
    pub fn total(&self) -> u64 {
        u64::from(self.prompt_tokens) + u64::from(self.completion_tokens)
    }
}

/// Why a request failed inside the engine; each maps to one API error code.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorCode {
    /// The adapter is not in the adapter store.
    AdapterNotFound,
    /// The adapter's files are not a valid adapter for this model.
    InvalidAdapter,
    /// The request cannot be served as asked (too long for the KV pool, empty prompt).
    InvalidRequest,
    /// The engine is saturated, or the client reads its stream too slowly.
    Overloaded,
    /// A device or engine failure.
    Internal,
}

impl ErrorCode {
    /// The code of the API's error body.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::AdapterNotFound => "adapter_not_found",
            ErrorCode::InvalidAdapter => "invalid_adapter",
            ErrorCode::InvalidRequest => "invalid_request",
            ErrorCode::Overloaded => "overloaded",
            ErrorCode::Internal => "internal",
        }
    }
}

/// One event of a request's stream. A stream is some `Token`s followed by exactly one `Done` or
/// `Error`.
#[derive(Clone, Debug, PartialEq)]
pub enum StreamEvent {
    Token {
        /// 0-based index among generated tokens.
        index: u32,
        token_id: u32,
        /// Text released by this token (may be empty while a multi-byte character or a
        /// possible stop string is held back). All texts concatenate to the completion.
        text: String,
        /// Natural-log probability of the token before temperature / top-k / top-p, if asked.
        logprob: Option<f32>,
        /// The most likely alternatives `(token_id, logprob)`, best first, when asked for
        /// (`SamplingParams::logprobs`); empty otherwise.
        top_logprobs: Vec<(u32, f32)>,
    },
    Done {
        finish_reason: FinishReason,
        usage: Usage,
    },
    Error {
        code: ErrorCode,
        message: String,
    },
}

/// Incremental detokeniser of one request: token ids in, text pieces out, never splitting a
/// UTF-8 character.
pub trait TextDecoder: Send {
    /// Feed one token; returns the text it completes, if any.
    fn push(&mut self, token: u32) -> Result<Option<String>, String>;

    /// Release whatever is still held back; called once when the generation ends.
    fn finish(&mut self) -> Result<Option<String>, String> {
        Ok(None)
    }
}

/// Makes a [`TextDecoder`] per request (the model's tokenizer).
pub trait Detokenizer: Send + Sync {
    fn decoder(&self) -> Box<dyn TextDecoder>;
}

/// The shared detokeniser handed to the engine.
pub type SharedDetokenizer = Arc<dyn Detokenizer>;

/// A detokeniser for engines without a tokenizer (benches over bare weights): every text piece
/// is empty, so stop strings never match and only token ids are streamed.
pub struct NoText;

struct NoTextDecoder;

impl TextDecoder for NoTextDecoder {
    fn push(&mut self, _token: u32) -> Result<Option<String>, String> {
        Ok(None)
    }
}

impl Detokenizer for NoText {
    fn decoder(&self) -> Box<dyn TextDecoder> {
        Box::new(NoTextDecoder)
    }
}

/// The text of one generation with its stop strings: collects decoded pieces and says how much
/// may be released. A suffix that could still grow into a stop string is held back.
#[derive(Debug, Default)]
pub struct StopText {
    stops: Vec<String>,
    text: String,
    released: usize,
}

impl StopText {
    /// Tracker for `stops` (empty strings are ignored: they would match everywhere).
    pub fn new(stops: &[String]) -> Self {
        Self {
            stops: stops.iter().filter(|s| !s.is_empty()).cloned().collect(),
            text: String::new(),
            released: 0,
        }
    }

    /// Add a decoded piece. Returns the newly releasable text and whether a stop string was hit
    /// (then the text ends right before it, and nothing after it is ever released).
    pub fn push(&mut self, piece: &str) -> (String, bool) {
        let search_from = self.released;
        self.text.push_str(piece);
        // Earliest stop match that ends in the unreleased part.
        let hit = self
            .stops
            .iter()
            .filter_map(|s| {
                let from = floor_char_boundary(&self.text, search_from.saturating_sub(s.len()));
                self.text[from..].find(s.as_str()).map(|p| from + p)
            })
            .min();
        if let Some(at) = hit {
            let out = self.text[self.released.min(at)..at].to_string();
            self.released = self.released.max(at);
            self.text.truncate(self.released);
            return (out, true);
        }
        let hold = self
            .stops
            .iter()
            .map(|s| longest_suffix_prefix(&self.text[self.released..], s))
            .max()
            .unwrap_or(0);
        let end = self.text.len() - hold;
        let out = self.text[self.released..end].to_string();
        self.released = end;
        (out, false)
    }

    /// Release everything held back (the generation ended without completing a stop string).
    pub fn flush(&mut self) -> String {
        let out = self.text[self.released..].to_string();
        self.released = self.text.len();
        out
    }
}

/// Length in bytes of the longest suffix of `text` that is a proper prefix of `stop`, on char
/// boundaries of both.
fn longest_suffix_prefix(text: &str, stop: &str) -> usize {
    let max = text.len().min(stop.len().saturating_sub(1));
    (1..=max)
        .rev()
        .find(|&n| {
            let start = text.len() - n;
            text.is_char_boundary(start) && stop.is_char_boundary(n) && stop[..n] == text[start..]
        })
        .unwrap_or(0)
}

fn floor_char_boundary(s: &str, mut i: usize) -> usize {
    while i > 0 && !s.is_char_boundary(i) {
        i -= 1;
    }
    i
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stops(s: &[&str]) -> StopText {
        StopText::new(&s.iter().map(|s| s.to_string()).collect::<Vec<_>>())
    }

    #[test]
    fn text_without_stop_strings_is_released_as_it_comes() {
        let mut t = stops(&[]);
        assert_eq!(t.push("Hello"), ("Hello".into(), false));
        assert_eq!(t.push(" world"), (" world".into(), false));
        assert_eq!(t.flush(), "");
    }

    #[test]
    fn a_possible_stop_string_beginning_is_held_back_until_ruled_out() {
        let mut t = stops(&["\n\n"]);
        assert_eq!(t.push("one\n"), ("one".into(), false));
        assert_eq!(t.push("two"), ("\ntwo".into(), false));
    }

    #[test]
    fn a_stop_string_split_across_pieces_ends_the_text_right_before_it() {
        let mut t = stops(&["END"]);
        assert_eq!(t.push("abc E"), ("abc ".into(), false));
        assert_eq!(t.push("N"), ("".into(), false));
        assert_eq!(t.push("Dxyz"), ("".into(), true));
        assert_eq!(t.flush(), "");
    }

    #[test]
    fn the_earliest_of_several_stop_strings_wins() {
        let mut t = stops(&["world", "lo w"]);
        assert_eq!(t.push("hello world"), ("hel".into(), true));
    }

    #[test]
    fn held_back_text_is_released_when_the_generation_ends_otherwise() {
        let mut t = stops(&["STOP"]);
        assert_eq!(t.push("go ST"), ("go ".into(), false));
        assert_eq!(t.flush(), "ST");
    }

    #[test]
    fn multibyte_stop_strings_and_text_are_cut_on_character_boundaries() {
        let mut t = stops(&["é!"]);
        assert_eq!(t.push("caf"), ("caf".into(), false));
        assert_eq!(t.push("é"), ("".into(), false));
        assert_eq!(t.push("s"), ("és".into(), false));
        assert_eq!(t.push("日本é!"), ("日本".into(), true));
    }

    #[test]
    fn error_codes_use_the_api_names() {
        assert_eq!(ErrorCode::AdapterNotFound.as_str(), "adapter_not_found");
        assert_eq!(ErrorCode::InvalidAdapter.as_str(), "invalid_adapter");
        assert_eq!(FinishReason::Cancelled.as_str(), "cancelled");
    }
}
