//! What a client asks a generation for, independent of the transport (WebSocket or OpenAI
//! routes), and its validation into [`CheckedParams`]: ranges are checked here once, so the
//! engine only ever sees sane values.

use serde::{Deserialize, Deserializer, Serialize};

use crate::api::error::ApiError;

/// Most stop strings one request may carry.
pub const MAX_STOP_SEQUENCES: usize = 16;
/// Longest stop string, in bytes.
pub const MAX_STOP_LEN: usize = 256;
/// Highest accepted temperature.
pub const MAX_TEMPERATURE: f32 = 2.0;

/// One chat turn. `content` may be a string or OpenAI's list of `{"type": "text"}` parts.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ChatMessage {
    pub role: String,
    #[serde(deserialize_with = "content_text")]
    pub content: String,
}

/// Accepts `"text"`, `null` (empty) or `[{"type": "text", "text": "..."}, ...]` (concatenated).
fn content_text<'de, D: Deserializer<'de>>(deserializer: D) -> Result<String, D::Error> {
    #[derive(Deserialize)]
    struct Part {
        #[serde(rename = "type")]
        kind: String,
        #[serde(default)]
        text: Option<String>,
    }
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Content {
        Text(String),
        Parts(Vec<Part>),
    }
    match Option::<Content>::deserialize(deserializer)? {
        None => Ok(String::new()),
        Some(Content::Text(text)) => Ok(text),
        Some(Content::Parts(parts)) => {
            let mut text = String::new();
            for part in parts {
                if part.kind != "text" {
                    return Err(serde::de::Error::custom(format!(
                        "content part type '{}' is not supported (only 'text')",
                        part.kind
                    )));
                }
                text.push_str(part.text.as_deref().unwrap_or(""));
            }
            Ok(text)
        }
    }
}

/// `stop` as OpenAI allows it: one string or a list.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(untagged)]
pub enum StopSequences {
    One(String),
    Many(Vec<String>),
}

impl StopSequences {
    /// The stop strings as a list.
    pub fn into_vec(self) -> Vec<String> {
        match self {
            StopSequences::One(stop) => vec![stop],
            StopSequences::Many(stops) => stops,
        }
    }
}

/// The prompt: raw text, chat turns rendered through the model's chat template, or token ids
/// (OpenAI's completions API allows them).
#[derive(Clone, Debug, PartialEq)]
pub enum PromptInput {
    Text(String),
    Chat(Vec<ChatMessage>),
    Tokens(Vec<u32>),
}

/// A generation request as the client wrote it (unchecked).
#[derive(Clone, Debug, PartialEq)]
pub struct GenerationParams {
    /// Adapter name in the caller's tenant; `None` is the base model.
    pub adapter: Option<String>,
    pub input: PromptInput,
    pub max_tokens: Option<u32>,
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    pub top_k: Option<u32>,
    pub seed: Option<u64>,
    pub stop: Vec<String>,
    pub logprobs: bool,
}

/// Sampling settings after validation.
#[derive(Clone, Debug, PartialEq)]
pub struct CheckedSampling {
    /// 0 is greedy.
    pub temperature: f32,
    /// In (0, 1].
    pub top_p: f32,
    /// 0 disables top-k.
    pub top_k: u32,
    pub seed: Option<u64>,
    pub stop: Vec<String>,
    pub logprobs: bool,
}

/// A generation request whose every field is in range. `max_tokens` is still a request: it is
/// clamped to the model's context once the prompt length is known.
#[derive(Clone, Debug, PartialEq)]
pub struct CheckedParams {
    pub adapter: Option<String>,
    pub input: PromptInput,
    pub max_tokens: Option<u32>,
    pub sampling: CheckedSampling,
}

const CHAT_ROLES: [&str; 3] = ["system", "user", "assistant"];

impl GenerationParams {
    /// Checks every field's range; the message of the error names the field and the bound.
    pub fn check(self) -> Result<CheckedParams, ApiError> {
        let invalid = |message: String| Err(ApiError::InvalidRequest(message));
        if let Some(0) = self.max_tokens {
            return invalid("`max_tokens` must be at least 1".into());
        }
        let temperature = self.temperature.unwrap_or(1.0);
        if !temperature.is_finite() || !(0.0..=MAX_TEMPERATURE).contains(&temperature) {
            return invalid(format!(
                "`temperature` must be between 0 and {MAX_TEMPERATURE}, got {temperature}"
            ));
        }
        let top_p = self.top_p.unwrap_or(1.0);
        if !top_p.is_finite() || top_p <= 0.0 || top_p > 1.0 {
            return invalid(format!("`top_p` must be in (0, 1], got {top_p}"));
        }
        if self.stop.len() > MAX_STOP_SEQUENCES {
            return invalid(format!(
                "at most {MAX_STOP_SEQUENCES} stop strings, got {}",
                self.stop.len()
            ));
        }
        if let Some(stop) = self
            .stop
            .iter()
            .find(|s| s.is_empty() || s.len() > MAX_STOP_LEN)
        {
            return invalid(format!(
                "stop strings must be 1 to {MAX_STOP_LEN} bytes, got {} bytes",
                stop.len()
            ));
        }
        match &self.input {
            PromptInput::Text(text) if text.is_empty() => {
                return invalid("`prompt` must not be empty".into());
            }
            PromptInput::Chat(messages) if messages.is_empty() => {
                return invalid("`messages` must not be empty".into());
            }
            PromptInput::Chat(messages) => {
                if let Some(message) = messages
                    .iter()
                    .find(|m| !CHAT_ROLES.contains(&m.role.as_str()))
                {
                    return invalid(format!(
                        "message role '{}' is not one of system, user, assistant",
                        message.role
                    ));
                }
            }
            PromptInput::Tokens(tokens) if tokens.is_empty() => {
                return invalid("`prompt` must not be empty".into());
            }
            PromptInput::Text(_) | PromptInput::Tokens(_) => {}
        }
        Ok(CheckedParams {
            adapter: self.adapter,
            input: self.input,
            max_tokens: self.max_tokens,
            sampling: CheckedSampling {
                temperature,
                top_p,
                top_k: self.top_k.unwrap_or(0),
                seed: self.seed,
                stop: self.stop,
                logprobs: self.logprobs,
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params() -> GenerationParams {
        GenerationParams {
            adapter: None,
            input: PromptInput::Text("hello".into()),
            max_tokens: Some(8),
            temperature: None,
            top_p: None,
            top_k: None,
            seed: None,
            stop: vec![],
            logprobs: false,
        }
    }

    fn rejected(p: GenerationParams) -> String {
        match p.check() {
            Err(ApiError::InvalidRequest(message)) => message,
            other => panic!("expected invalid_request, got {other:?}"),
        }
    }

    #[test]
    fn defaults_are_plain_sampling_over_the_whole_distribution() {
        let checked = params().check().unwrap();
        assert_eq!(checked.sampling.temperature, 1.0);
        assert_eq!(checked.sampling.top_p, 1.0);
        assert_eq!(checked.sampling.top_k, 0);
    }

    #[test]
    fn out_of_range_sampling_values_are_refused_with_the_field_named() {
        assert!(
            rejected(GenerationParams {
                temperature: Some(-0.5),
                ..params()
            })
            .contains("temperature")
        );
        assert!(
            rejected(GenerationParams {
                temperature: Some(f32::NAN),
                ..params()
            })
            .contains("temperature")
        );
        assert!(
            rejected(GenerationParams {
                top_p: Some(0.0),
                ..params()
            })
            .contains("top_p")
        );
        assert!(
            rejected(GenerationParams {
                max_tokens: Some(0),
                ..params()
            })
            .contains("max_tokens")
        );
        assert!(
            rejected(GenerationParams {
                stop: vec![String::new()],
                ..params()
            })
            .contains("stop")
        );
        assert!(
            rejected(GenerationParams {
                stop: vec!["x".into(); MAX_STOP_SEQUENCES + 1],
                ..params()
            })
            .contains("stop")
        );
    }

    #[test]
    fn chat_roles_other_than_system_user_assistant_are_refused() {
        let message = rejected(GenerationParams {
            input: PromptInput::Chat(vec![ChatMessage {
                role: "tool".into(),
                content: "x".into(),
            }]),
            ..params()
        });
        assert!(message.contains("tool"), "{message}");
    }

    #[test]
    fn chat_content_may_be_a_list_of_text_parts() {
        let message: ChatMessage = serde_json::from_str(
            r#"{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}"#,
        )
        .unwrap();
        assert_eq!(message.content, "ab");
        let image = serde_json::from_str::<ChatMessage>(
            r#"{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}"#,
        );
        assert!(image.is_err());
    }

    #[test]
    fn stop_may_be_one_string_or_a_list() {
        let one: StopSequences = serde_json::from_str(r#""\n""#).unwrap();
        assert_eq!(one.into_vec(), vec!["\n".to_owned()]);
        let many: StopSequences = serde_json::from_str(r#"["a", "b"]"#).unwrap();
        assert_eq!(many.into_vec().len(), 2);
    }
}
