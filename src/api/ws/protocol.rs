//! The wire format of `/v1/stream` (API.md "WebSocket token streaming"): what clients send and
//! what the server answers, as serde types. Parsing is two-step so that a malformed `generate`
//! still gets an `error` event carrying its `id`.

use serde::{Deserialize, Serialize};

use crate::api::error::ErrorCode;
use crate::api::generate::{
    ChatMessage, FinishReason, GenerationParams, PromptInput, StopSequences, Usage,
};

/// The longest `id` a client may choose; ids are echoed on every event and kept in a map.
pub const MAX_ID_LEN: usize = 128;

/// One client -> server message.
#[derive(Debug, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ClientMessage {
    /// First-message authentication for clients that cannot set headers (browsers).
    Auth { api_key: String },
    /// Start a generation.
    Generate(GenerateMessage),
    /// Stop a running generation; it ends with `done` and `finish_reason: "cancelled"`.
    Cancel { id: String },
}

/// `{"type": "generate", ...}`: everything a generation can be asked for.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GenerateMessage {
    pub id: String,
    /// Adapter name in the caller's tenant; `null` or absent is the base model.
    #[serde(default)]
    pub adapter: Option<String>,
    #[serde(default)]
    pub prompt: Option<String>,
    #[serde(default)]
    pub messages: Option<Vec<ChatMessage>>,
    #[serde(default)]
    pub max_tokens: Option<u32>,
    #[serde(default)]
    pub temperature: Option<f32>,
    #[serde(default)]
    pub top_p: Option<f32>,
    #[serde(default)]
    pub top_k: Option<u32>,
    #[serde(default)]
    pub seed: Option<u64>,
    #[serde(default)]
    pub stop: Option<StopSequences>,
    #[serde(default)]
    pub logprobs: Option<bool>,
}

/// Why a client message could not be understood, with the `id` when one could be read.
#[derive(Debug, PartialEq)]
pub struct ParseError {
    pub id: Option<String>,
    pub message: String,
}

/// Parses one text frame. On failure the error names the `id` if the frame had a usable one.
pub fn parse_client_message(text: &str) -> Result<ClientMessage, ParseError> {
    let value: serde_json::Value = serde_json::from_str(text).map_err(|e| ParseError {
        id: None,
        message: format!("the message is not JSON: {e}"),
    })?;
    let id = value
        .get("id")
        .and_then(serde_json::Value::as_str)
        .filter(|id| valid_id(id))
        .map(str::to_owned);
    let message = serde_json::from_value::<ClientMessage>(value).map_err(|e| ParseError {
        id: id.clone(),
        message: format!("invalid message: {e}"),
    })?;
    let message_id = match &message {
        ClientMessage::Generate(generate) => Some(generate.id.as_str()),
        ClientMessage::Cancel { id } => Some(id.as_str()),
        ClientMessage::Auth { .. } => None,
    };
    if let Some(message_id) = message_id
        && !valid_id(message_id)
    {
        return Err(ParseError {
            id: None,
            message: format!("`id` must be 1 to {MAX_ID_LEN} bytes"),
        });
    }
    Ok(message)
}

fn valid_id(id: &str) -> bool {
    !id.is_empty() && id.len() <= MAX_ID_LEN
}

impl GenerateMessage {
    /// Splits the message into its id and the transport-independent generation parameters.
    /// Exactly one of `prompt` and `messages` must be given.
    pub fn into_params(self) -> Result<(String, GenerationParams), (String, String)> {
        let input = match (self.prompt, self.messages) {
            (Some(prompt), None) => PromptInput::Text(prompt),
            (None, Some(messages)) => PromptInput::Chat(messages),
            (Some(_), Some(_)) => {
                return Err((
                    self.id,
                    "give either `prompt` or `messages`, not both".into(),
                ));
            }
            (None, None) => return Err((self.id, "`prompt` or `messages` is required".into())),
        };
        let params = GenerationParams {
            adapter: self.adapter,
            input,
            max_tokens: self.max_tokens,
            temperature: self.temperature,
            top_p: self.top_p,
            top_k: self.top_k,
            seed: self.seed,
            stop: self.stop.map(StopSequences::into_vec).unwrap_or_default(),
            logprobs: self.logprobs.unwrap_or(false),
        };
        Ok((self.id, params))
    }
}

/// One server -> client event. Per `id`: any number of `token`, then exactly one `done` or
/// `error`. Connection-level errors (bad auth, unparsable frames) carry no `id`.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ServerEvent {
    Token {
        id: String,
        index: u32,
        token_id: u32,
        text: String,
        #[serde(skip_serializing_if = "Option::is_none")]
        logprob: Option<f32>,
    },
    Done {
        id: String,
        finish_reason: FinishReason,
        usage: Usage,
    },
    Error {
        #[serde(skip_serializing_if = "Option::is_none")]
        id: Option<String>,
        code: ErrorCode,
        message: String,
        /// For `rate_limited` / `quota_exceeded`: seconds until a retry may succeed.
        #[serde(skip_serializing_if = "Option::is_none")]
        retry_after: Option<u64>,
    },
}

impl ServerEvent {
    /// The generation this event belongs to, if any.
    pub fn id(&self) -> Option<&str> {
        match self {
            ServerEvent::Token { id, .. } | ServerEvent::Done { id, .. } => Some(id),
            ServerEvent::Error { id, .. } => id.as_deref(),
        }
    }

    /// Whether this is the last event of its generation.
    pub fn is_terminal(&self) -> bool {
        !matches!(self, ServerEvent::Token { .. })
    }

    /// Serialises the event as one text frame.
    pub fn to_json(&self) -> String {
        // Serialising these plain structs (strings, numbers, an enum) cannot fail; a failure
        // would still produce a well-formed error frame rather than a panic.
        serde_json::to_string(self).unwrap_or_else(|e| {
            format!(r#"{{"type":"error","code":"internal","message":"serialisation failed: {e}"}}"#)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_full_generate_message_parses_with_every_field() {
        let text = r#"{"type": "generate", "id": "r1", "adapter": "legal-v2", "prompt": "text",
            "max_tokens": 64, "temperature": 0.0, "top_p": 1.0, "top_k": 0, "seed": 7,
            "stop": ["\n\n"], "logprobs": false}"#;
        let ClientMessage::Generate(message) = parse_client_message(text).unwrap() else {
            panic!("expected generate");
        };
        let (id, params) = message.into_params().unwrap();
        assert_eq!(id, "r1");
        assert_eq!(params.adapter.as_deref(), Some("legal-v2"));
        assert!(matches!(params.input, PromptInput::Text(ref p) if p == "text"));
        assert_eq!(params.max_tokens, Some(64));
        assert_eq!(params.temperature, Some(0.0));
        assert_eq!(params.top_p, Some(1.0));
        assert_eq!(params.top_k, Some(0));
        assert_eq!(params.seed, Some(7));
        assert_eq!(params.stop, vec!["\n\n".to_owned()]);
        assert!(!params.logprobs);
    }

    #[test]
    fn a_chat_generate_message_with_null_adapter_is_the_base_model() {
        let text = r#"{"type": "generate", "id": "r2", "adapter": null,
            "messages": [{"role": "user", "content": "hi"}], "max_tokens": 32}"#;
        let ClientMessage::Generate(message) = parse_client_message(text).unwrap() else {
            panic!("expected generate");
        };
        let (_, params) = message.into_params().unwrap();
        assert_eq!(params.adapter, None);
        let PromptInput::Chat(messages) = params.input else {
            panic!("expected chat");
        };
        assert_eq!(messages[0].role, "user");
        assert_eq!(messages[0].content, "hi");
    }

    #[test]
    fn cancel_and_auth_messages_parse() {
        assert!(matches!(
            parse_client_message(r#"{"type": "cancel", "id": "r1"}"#),
            Ok(ClientMessage::Cancel { id }) if id == "r1"
        ));
        assert!(matches!(
            parse_client_message(r#"{"type": "auth", "api_key": "pk_x"}"#),
            Ok(ClientMessage::Auth { api_key }) if api_key == "pk_x"
        ));
    }

    #[test]
    fn a_misspelt_field_is_an_error_that_names_the_id() {
        let error = parse_client_message(
            r#"{"type": "generate", "id": "r9", "prompt": "x", "max_token": 3}"#,
        )
        .unwrap_err();
        assert_eq!(error.id.as_deref(), Some("r9"));
        assert!(error.message.contains("max_token"), "{}", error.message);
    }

    #[test]
    fn garbage_and_unknown_types_are_errors_without_id() {
        assert_eq!(parse_client_message("not json").unwrap_err().id, None);
        let error = parse_client_message(r#"{"type": "shutdown"}"#).unwrap_err();
        assert!(error.message.contains("shutdown"), "{}", error.message);
    }

    #[test]
    fn an_empty_or_overlong_id_is_refused() {
        assert!(parse_client_message(r#"{"type": "cancel", "id": ""}"#).is_err());
        let long = "x".repeat(MAX_ID_LEN + 1);
        let text = json!({"type": "cancel", "id": long}).to_string();
        assert!(parse_client_message(&text).is_err());
    }

    #[test]
    fn prompt_and_messages_are_mutually_exclusive() {
        let text = r#"{"type": "generate", "id": "r1", "prompt": "a",
            "messages": [{"role": "user", "content": "b"}]}"#;
        let ClientMessage::Generate(message) = parse_client_message(text).unwrap() else {
            panic!("expected generate");
        };
        assert_eq!(message.into_params().unwrap_err().0, "r1");
    }

    #[test]
    fn server_events_serialise_exactly_as_the_contract_shows() {
        let token = ServerEvent::Token {
            id: "r1".into(),
            index: 0,
            token_id: 7042,
            text: " Paris".into(),
            logprob: Some(-0.11),
        };
        let value: serde_json::Value = serde_json::from_str(&token.to_json()).unwrap();
        assert_eq!(value["type"], "token");
        assert_eq!(value["id"], "r1");
        assert_eq!(value["index"], 0);
        assert_eq!(value["token_id"], 7042);
        assert_eq!(value["text"], " Paris");
        assert!((value["logprob"].as_f64().unwrap() + 0.11).abs() < 1e-6);

        let plain = ServerEvent::Token {
            id: "r1".into(),
            index: 1,
            token_id: 30,
            text: ".".into(),
            logprob: None,
        };
        assert!(!plain.to_json().contains("logprob"));

        let done = ServerEvent::Done {
            id: "r1".into(),
            finish_reason: FinishReason::Length,
            usage: Usage {
                prompt_tokens: 5,
                completion_tokens: 16,
            },
        };
        assert_eq!(
            serde_json::from_str::<serde_json::Value>(&done.to_json()).unwrap(),
            json!({"type": "done", "id": "r1", "finish_reason": "length",
                   "usage": {"prompt_tokens": 5, "completion_tokens": 16}})
        );

        let error = ServerEvent::Error {
            id: Some("r1".into()),
            code: ErrorCode::AdapterNotFound,
            message: "adapter 'x' does not exist".into(),
            retry_after: None,
        };
        assert_eq!(
            serde_json::from_str::<serde_json::Value>(&error.to_json()).unwrap(),
            json!({"type": "error", "id": "r1", "code": "adapter_not_found",
                   "message": "adapter 'x' does not exist"})
        );
    }
}
