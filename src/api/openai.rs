//! OpenAI-compatible routes: `POST /v1/completions`, `POST /v1/chat/completions` (JSON, or
//! Server-Sent Events ending in `data: [DONE]` with `stream: true`) and `GET /v1/models`.
//!
//! `model` is an adapter name of the caller's tenant or the base model's id. Fields that would
//! change the output and that this server cannot honour (n > 1, penalties, logit bias, tools,
//! echo) are refused with `invalid_request` rather than silently ignored; fields that only label
//! a request (`user`, `metadata`) are accepted and ignored.
//!
//! Admission (quota, adapter, prompt) happens before the response starts, so those failures keep
//! their HTTP status. A failure after the first byte of a stream is sent as one
//! `data: {"error": {...}}` event, which the official clients raise as an error.

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use actix_web::http::header;
use actix_web::{HttpResponse, web};
use bytes::Bytes;
use futures_util::Stream;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

use crate::api::auth::TenantContext;
use crate::api::error::{ApiError, ErrorBody, ErrorCode, ErrorDetail, error_response};
use crate::api::generate::{
    self, ChatMessage, EventSink, FinishReason, GenEvent, GenerationParams, PromptInput,
    StopSequences, Undeliverable, Usage,
};
use crate::api::state::ServiceState;

/// Events buffered between a generation and its HTTP response.
const SSE_QUEUE: usize = 64;
/// How long an event may wait for a client that does not read its stream.
const SSE_SLOW_CONSUMER_GRACE: Duration = Duration::from_secs(10);
/// OpenAI's default for `/v1/completions` when `max_tokens` is absent.
const DEFAULT_COMPLETION_MAX_TOKENS: u32 = 16;

/// `stream_options` of both endpoints.
#[derive(Clone, Debug, Default, Deserialize)]
pub struct StreamOptions {
    #[serde(default)]
    pub include_usage: bool,
}

/// `prompt` of `/v1/completions`: a string, a one-element list of strings, or token ids.
#[derive(Clone, Debug, Deserialize)]
#[serde(untagged)]
pub enum CompletionPrompt {
    Text(String),
    Texts(Vec<String>),
    Tokens(Vec<u32>),
    TokenLists(Vec<Vec<u32>>),
}

/// `POST /v1/completions` body.
#[derive(Clone, Debug, Deserialize)]
pub struct CompletionRequest {
    pub model: String,
    pub prompt: CompletionPrompt,
    #[serde(default)]
    pub max_tokens: Option<u32>,
    #[serde(default)]
    pub temperature: Option<f32>,
    #[serde(default)]
    pub top_p: Option<f32>,
    /// Not OpenAI's; common in open servers (vLLM, TGI).
    #[serde(default)]
    pub top_k: Option<u32>,
    #[serde(default)]
    pub seed: Option<u64>,
    #[serde(default)]
    pub stop: Option<StopSequences>,
    #[serde(default)]
    pub stream: bool,
    #[serde(default)]
    pub stream_options: Option<StreamOptions>,
    /// Only 0 is supported: the chosen tokens' log-probabilities.
    #[serde(default)]
    pub logprobs: Option<u32>,
    #[serde(default)]
    pub n: Option<u32>,
    #[serde(default)]
    pub best_of: Option<u32>,
    #[serde(default)]
    pub echo: Option<bool>,
    #[serde(default)]
    pub suffix: Option<String>,
    #[serde(default)]
    pub presence_penalty: Option<f32>,
    #[serde(default)]
    pub frequency_penalty: Option<f32>,
    #[serde(default)]
    pub logit_bias: Option<HashMap<String, f32>>,
    #[serde(default)]
    pub user: Option<String>,
}

/// `POST /v1/chat/completions` body.
#[derive(Clone, Debug, Deserialize)]
pub struct ChatCompletionRequest {
    pub model: String,
    pub messages: Vec<ChatMessage>,
    #[serde(default)]
    pub max_tokens: Option<u32>,
    #[serde(default)]
    pub max_completion_tokens: Option<u32>,
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
    pub stream: bool,
    #[serde(default)]
    pub stream_options: Option<StreamOptions>,
    #[serde(default)]
    pub logprobs: Option<bool>,
    #[serde(default)]
    pub top_logprobs: Option<u32>,
    #[serde(default)]
    pub n: Option<u32>,
    #[serde(default)]
    pub presence_penalty: Option<f32>,
    #[serde(default)]
    pub frequency_penalty: Option<f32>,
    #[serde(default)]
    pub logit_bias: Option<HashMap<String, f32>>,
    #[serde(default)]
    pub tools: Option<Vec<serde_json::Value>>,
    #[serde(default)]
    pub response_format: Option<serde_json::Value>,
    #[serde(default)]
    pub user: Option<String>,
}

fn refuse(message: impl Into<String>) -> ApiError {
    ApiError::InvalidRequest(message.into())
}

/// Refuses the knobs every endpoint shares and that we cannot honour.
fn check_common(
    n: Option<u32>,
    presence_penalty: Option<f32>,
    frequency_penalty: Option<f32>,
    logit_bias: &Option<HashMap<String, f32>>,
) -> Result<(), ApiError> {
    if n.is_some_and(|n| n != 1) {
        return Err(refuse("only `n: 1` is supported"));
    }
    if presence_penalty.is_some_and(|p| p != 0.0) || frequency_penalty.is_some_and(|p| p != 0.0) {
        return Err(refuse(
            "`presence_penalty` and `frequency_penalty` are not supported",
        ));
    }
    if logit_bias.as_ref().is_some_and(|bias| !bias.is_empty()) {
        return Err(refuse("`logit_bias` is not supported"));
    }
    Ok(())
}

/// The adapter a `model` names: `None` for the base model.
fn adapter_of(model: &str, state: &ServiceState) -> Option<String> {
    (model != state.model_id()).then(|| model.to_owned())
}

impl CompletionRequest {
    fn into_params(self, state: &ServiceState) -> Result<GenerationParams, ApiError> {
        check_common(
            self.n,
            self.presence_penalty,
            self.frequency_penalty,
            &self.logit_bias,
        )?;
        if self.best_of.is_some_and(|b| b != 1) {
            return Err(refuse("only `best_of: 1` is supported"));
        }
        if self.echo == Some(true) {
            return Err(refuse("`echo` is not supported"));
        }
        if self.suffix.as_ref().is_some_and(|s| !s.is_empty()) {
            return Err(refuse("`suffix` is not supported"));
        }
        if self.logprobs.is_some_and(|n| n > 0) {
            return Err(refuse(
                "only `logprobs: 0` (the chosen tokens' log-probabilities) is supported",
            ));
        }
        let input = match self.prompt {
            CompletionPrompt::Text(text) => PromptInput::Text(text),
            CompletionPrompt::Tokens(tokens) => PromptInput::Tokens(tokens),
            CompletionPrompt::Texts(mut texts) if texts.len() == 1 => {
                PromptInput::Text(texts.remove(0))
            }
            CompletionPrompt::TokenLists(mut lists) if lists.len() == 1 => {
                PromptInput::Tokens(lists.remove(0))
            }
            CompletionPrompt::Texts(_) | CompletionPrompt::TokenLists(_) => {
                return Err(refuse("exactly one prompt per request is supported"));
            }
        };
        Ok(GenerationParams {
            adapter: adapter_of(&self.model, state),
            input,
            max_tokens: Some(self.max_tokens.unwrap_or(DEFAULT_COMPLETION_MAX_TOKENS)),
            temperature: self.temperature,
            top_p: self.top_p,
            top_k: self.top_k,
            seed: self.seed,
            stop: self.stop.map(StopSequences::into_vec).unwrap_or_default(),
            logprobs: self.logprobs.is_some(),
        })
    }
}

impl ChatCompletionRequest {
    fn into_params(self, state: &ServiceState) -> Result<GenerationParams, ApiError> {
        check_common(
            self.n,
            self.presence_penalty,
            self.frequency_penalty,
            &self.logit_bias,
        )?;
        if self.top_logprobs.is_some_and(|n| n > 0) {
            return Err(refuse(
                "`top_logprobs` is not supported; `logprobs: true` gives the chosen tokens'",
            ));
        }
        if self.tools.as_ref().is_some_and(|tools| !tools.is_empty()) {
            return Err(refuse("`tools` are not supported"));
        }
        if let Some(format) = &self.response_format
            && format.get("type").and_then(|t| t.as_str()) != Some("text")
        {
            return Err(refuse(
                "only `response_format: {\"type\": \"text\"}` is supported",
            ));
        }
        Ok(GenerationParams {
            adapter: adapter_of(&self.model, state),
            input: PromptInput::Chat(self.messages),
            max_tokens: self.max_completion_tokens.or(self.max_tokens),
            temperature: self.temperature,
            top_p: self.top_p,
            top_k: self.top_k,
            seed: self.seed,
            stop: self.stop.map(StopSequences::into_vec).unwrap_or_default(),
            logprobs: self.logprobs.unwrap_or(false),
        })
    }
}

/// `usage` of every response.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct OpenAiUsage {
    pub prompt_tokens: u32,
    pub completion_tokens: u32,
    pub total_tokens: u32,
}

impl From<Usage> for OpenAiUsage {
    fn from(usage: Usage) -> Self {
        OpenAiUsage {
            prompt_tokens: usage.prompt_tokens,
            completion_tokens: usage.completion_tokens,
            total_tokens: usage.prompt_tokens.saturating_add(usage.completion_tokens),
        }
    }
}

/// OpenAI's spelling of why a choice ended (it has no `cancelled`: a cancelled HTTP request
/// has no reader left, so the value only appears in a stream cut short by the server).
fn openai_finish_reason(reason: FinishReason) -> &'static str {
    match reason {
        FinishReason::Length => "length",
        FinishReason::Stop => "stop",
        FinishReason::Cancelled => "cancelled",
    }
}

/// One generated token as the response builders see it.
#[derive(Clone, Debug)]
struct Piece {
    text: String,
    logprob: Option<f32>,
}

/// Which endpoint a response is for: the two differ only in how choices are shaped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Endpoint {
    Completions,
    Chat,
}

/// Shapes responses and stream chunks of one request.
struct Shaper {
    endpoint: Endpoint,
    id: String,
    created: i64,
    model: String,
    logprobs: bool,
    include_usage: bool,
}

impl Shaper {
    fn new(endpoint: Endpoint, model: String, logprobs: bool, include_usage: bool) -> Self {
        let prefix = match endpoint {
            Endpoint::Completions => "cmpl",
            Endpoint::Chat => "chatcmpl",
        };
        Shaper {
            endpoint,
            id: format!("{prefix}-{}", uuid::Uuid::new_v4().simple()),
            created: time::OffsetDateTime::now_utc().unix_timestamp(),
            model,
            logprobs,
            include_usage,
        }
    }

    fn object(&self, chunk: bool) -> &'static str {
        match (self.endpoint, chunk) {
            (Endpoint::Completions, _) => "text_completion",
            (Endpoint::Chat, false) => "chat.completion",
            (Endpoint::Chat, true) => "chat.completion.chunk",
        }
    }

    /// `logprobs` of a choice for these pieces, `null` unless asked for.
    fn logprobs_json(&self, pieces: &[Piece], text_offset: usize) -> serde_json::Value {
        if !self.logprobs {
            return serde_json::Value::Null;
        }
        match self.endpoint {
            Endpoint::Completions => {
                let mut offset = text_offset;
                let mut offsets = Vec::with_capacity(pieces.len());
                for piece in pieces {
                    offsets.push(offset);
                    offset += piece.text.len();
                }
                serde_json::json!({
                    "tokens": pieces.iter().map(|p| p.text.as_str()).collect::<Vec<_>>(),
                    "token_logprobs": pieces.iter().map(|p| p.logprob).collect::<Vec<_>>(),
                    "top_logprobs": serde_json::Value::Null,
                    "text_offset": offsets,
                })
            }
            Endpoint::Chat => serde_json::json!({
                "content": pieces.iter().map(|p| serde_json::json!({
                    "token": p.text,
                    "logprob": p.logprob,
                    "bytes": p.text.as_bytes(),
                    "top_logprobs": [],
                })).collect::<Vec<_>>(),
            }),
        }
    }

    /// The whole (non-streamed) response.
    fn response(&self, pieces: &[Piece], finish: FinishReason, usage: Usage) -> serde_json::Value {
        let text: String = pieces.iter().map(|p| p.text.as_str()).collect();
        let choice = match self.endpoint {
            Endpoint::Completions => serde_json::json!({
                "index": 0,
                "text": text,
                "logprobs": self.logprobs_json(pieces, 0),
                "finish_reason": openai_finish_reason(finish),
            }),
            Endpoint::Chat => serde_json::json!({
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "logprobs": self.logprobs_json(pieces, 0),
                "finish_reason": openai_finish_reason(finish),
            }),
        };
        serde_json::json!({
            "id": self.id,
            "object": self.object(false),
            "created": self.created,
            "model": self.model,
            "choices": [choice],
            "usage": OpenAiUsage::from(usage),
        })
    }

    /// One stream chunk; `piece` None with `finish` Some is the closing chunk.
    fn chunk(
        &self,
        piece: Option<&Piece>,
        first: bool,
        text_offset: usize,
        finish: Option<(FinishReason, Usage)>,
    ) -> serde_json::Value {
        let pieces: Vec<Piece> = piece.cloned().into_iter().collect();
        let text = piece.map(|p| p.text.as_str()).unwrap_or("");
        let finish_reason = finish.map(|(reason, _)| openai_finish_reason(reason));
        let logprobs = if piece.is_some() {
            self.logprobs_json(&pieces, text_offset)
        } else {
            serde_json::Value::Null
        };
        let choice = match self.endpoint {
            Endpoint::Completions => serde_json::json!({
                "index": 0,
                "text": text,
                "logprobs": logprobs,
                "finish_reason": finish_reason,
            }),
            Endpoint::Chat => {
                let mut delta = serde_json::Map::new();
                if first {
                    delta.insert("role".into(), "assistant".into());
                }
                if piece.is_some() || first {
                    delta.insert("content".into(), text.into());
                }
                serde_json::json!({
                    "index": 0,
                    "delta": delta,
                    "logprobs": logprobs,
                    "finish_reason": finish_reason,
                })
            }
        };
        let mut chunk = serde_json::json!({
            "id": self.id,
            "object": self.object(true),
            "created": self.created,
            "model": self.model,
            "choices": [choice],
        });
        // `usage` is always filled on the closing chunk; with `include_usage` the other chunks
        // carry `usage: null` and a usage-only chunk follows, as OpenAI does.
        if let Some((_, usage)) = finish {
            chunk["usage"] = serde_json::json!(OpenAiUsage::from(usage));
        } else if self.include_usage {
            chunk["usage"] = serde_json::Value::Null;
        }
        chunk
    }

    fn usage_chunk(&self, usage: Usage) -> serde_json::Value {
        serde_json::json!({
            "id": self.id,
            "object": self.object(true),
            "created": self.created,
            "model": self.model,
            "choices": [],
            "usage": OpenAiUsage::from(usage),
        })
    }
}

/// Hands a generation's events to the HTTP response through a bounded queue.
struct ChannelSink {
    tx: mpsc::Sender<GenEvent>,
}

impl EventSink for ChannelSink {
    async fn deliver(&mut self, event: GenEvent) -> Result<(), Undeliverable> {
        match self.tx.send_timeout(event, SSE_SLOW_CONSUMER_GRACE).await {
            Ok(()) => Ok(()),
            Err(mpsc::error::SendTimeoutError::Timeout(_)) => Err(Undeliverable::TooSlow {
                waited: SSE_SLOW_CONSUMER_GRACE,
            }),
            Err(mpsc::error::SendTimeoutError::Closed(_)) => Err(Undeliverable::Gone),
        }
    }

    async fn finish(&mut self, event: GenEvent) {
        // A closed queue means the response was dropped: the client left.
        let _ = self.tx.send(event).await;
    }
}

/// `POST /v1/completions`.
pub async fn completions(
    tenant: TenantContext,
    state: web::Data<ServiceState>,
    body: web::Json<CompletionRequest>,
) -> Result<HttpResponse, ApiError> {
    let request = body.into_inner();
    let shaper = Shaper::new(
        Endpoint::Completions,
        request.model.clone(),
        request.logprobs.is_some(),
        request
            .stream_options
            .as_ref()
            .is_some_and(|o| o.include_usage),
    );
    let stream = request.stream;
    let params = request.into_params(&state)?;
    respond(state.into_inner(), tenant, shaper, params, stream).await
}

/// `POST /v1/chat/completions`.
pub async fn chat_completions(
    tenant: TenantContext,
    state: web::Data<ServiceState>,
    body: web::Json<ChatCompletionRequest>,
) -> Result<HttpResponse, ApiError> {
    let request = body.into_inner();
    let shaper = Shaper::new(
        Endpoint::Chat,
        request.model.clone(),
        request.logprobs.unwrap_or(false),
        request
            .stream_options
            .as_ref()
            .is_some_and(|o| o.include_usage),
    );
    let stream = request.stream;
    let params = request.into_params(&state)?;
    respond(state.into_inner(), tenant, shaper, params, stream).await
}

async fn respond(
    state: Arc<ServiceState>,
    tenant: TenantContext,
    shaper: Shaper,
    params: GenerationParams,
    stream: bool,
) -> Result<HttpResponse, ApiError> {
    let request_id = shaper.id.clone();
    let running = generate::admit(&state, &tenant, &request_id, params).await?;
    let (tx, mut rx) = mpsc::channel(SSE_QUEUE);
    tokio::spawn(running.drive(ChannelSink { tx }, std::future::pending()));
    if stream {
        return Ok(HttpResponse::Ok()
            .content_type("text/event-stream")
            .insert_header((header::CACHE_CONTROL, "no-cache"))
            .insert_header(("X-Accel-Buffering", "no"))
            .streaming(sse_body(shaper, rx)));
    }
    let mut pieces = Vec::new();
    while let Some(event) = rx.recv().await {
        match event {
            GenEvent::Token { text, logprob, .. } => pieces.push(Piece { text, logprob }),
            GenEvent::Done {
                finish_reason,
                usage,
            } => {
                return Ok(HttpResponse::Ok().json(shaper.response(&pieces, finish_reason, usage)));
            }
            GenEvent::Failed {
                code,
                message,
                retry_after,
            } => return Ok(error_response(code, message, retry_after)),
        }
    }
    Err(ApiError::internal(anyhow::anyhow!(
        "generation ended without a final event"
    )))
}

fn sse_data(value: &impl Serialize) -> Bytes {
    let json = serde_json::to_string(value).unwrap_or_else(|e| {
        format!(r#"{{"error":{{"code":"internal","message":"serialisation failed: {e}"}}}}"#)
    });
    Bytes::from(format!("data: {json}\n\n"))
}

/// The SSE body: one `data:` line per token, the closing chunk, optionally a usage chunk, then
/// `data: [DONE]`. Dropping it (the client left) closes the queue, which cancels the generation.
fn sse_body(
    shaper: Shaper,
    rx: mpsc::Receiver<GenEvent>,
) -> impl Stream<Item = Result<Bytes, Infallible>> {
    struct State {
        shaper: Shaper,
        rx: mpsc::Receiver<GenEvent>,
        first: bool,
        text_offset: usize,
        finished: bool,
    }
    let state = State {
        shaper,
        rx,
        first: true,
        text_offset: 0,
        finished: false,
    };
    futures_util::stream::unfold(state, |mut state| async move {
        if state.finished {
            return None;
        }
        let bytes = match state.rx.recv().await {
            Some(GenEvent::Token { text, logprob, .. }) => {
                let piece = Piece { text, logprob };
                let chunk = state
                    .shaper
                    .chunk(Some(&piece), state.first, state.text_offset, None);
                state.first = false;
                state.text_offset += piece.text.len();
                sse_data(&chunk)
            }
            Some(GenEvent::Done {
                finish_reason,
                usage,
            }) => {
                state.finished = true;
                let mut out = Vec::new();
                if state.first && state.shaper.endpoint == Endpoint::Chat {
                    out.extend_from_slice(&sse_data(&state.shaper.chunk(None, true, 0, None)));
                }
                let closing = state.shaper.chunk(
                    None,
                    false,
                    state.text_offset,
                    Some((finish_reason, usage)),
                );
                out.extend_from_slice(&sse_data(&closing));
                if state.shaper.include_usage {
                    out.extend_from_slice(&sse_data(&state.shaper.usage_chunk(usage)));
                }
                out.extend_from_slice(b"data: [DONE]\n\n");
                Bytes::from(out)
            }
            Some(GenEvent::Failed { code, message, .. }) => {
                state.finished = true;
                let body = ErrorBody {
                    error: ErrorDetail { code, message },
                };
                let mut out = sse_data(&body).to_vec();
                out.extend_from_slice(b"data: [DONE]\n\n");
                Bytes::from(out)
            }
            None => {
                state.finished = true;
                let body = ErrorBody {
                    error: ErrorDetail {
                        code: ErrorCode::Internal,
                        message: "internal error".into(),
                    },
                };
                sse_data(&body)
            }
        };
        Some((Ok(bytes), state))
    })
}

/// One entry of `GET /v1/models`.
#[derive(Debug, Serialize)]
pub struct ModelEntry {
    pub id: String,
    pub object: &'static str,
    pub created: i64,
    pub owned_by: String,
}

/// `GET /v1/models`: the base model, then the caller's adapters.
pub async fn models(
    tenant: TenantContext,
    state: web::Data<ServiceState>,
) -> Result<HttpResponse, ApiError> {
    let mut data = vec![ModelEntry {
        id: state.model_id().to_owned(),
        object: "model",
        created: state.started_at().unix_timestamp(),
        owned_by: "punica".into(),
    }];
    for adapter in state.store.list_adapters(tenant.tenant_id).await? {
        data.push(ModelEntry {
            id: adapter.name.as_str().to_owned(),
            object: "model",
            created: adapter.created_at.unix_timestamp(),
            owned_by: tenant.tenant_name.clone(),
        });
    }
    Ok(HttpResponse::Ok().json(serde_json::json!({"object": "list", "data": data})))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn piece(text: &str, logprob: Option<f32>) -> Piece {
        Piece {
            text: text.into(),
            logprob,
        }
    }

    #[test]
    fn chat_stream_chunks_start_with_the_role_and_end_with_usage() {
        let shaper = Shaper::new(Endpoint::Chat, "m".into(), false, false);
        let first = shaper.chunk(Some(&piece("Hi", None)), true, 0, None);
        assert_eq!(first["object"], "chat.completion.chunk");
        assert_eq!(first["choices"][0]["delta"]["role"], "assistant");
        assert_eq!(first["choices"][0]["delta"]["content"], "Hi");
        assert!(first["choices"][0]["finish_reason"].is_null());
        assert!(first.get("usage").is_none());
        let usage = Usage {
            prompt_tokens: 3,
            completion_tokens: 1,
        };
        let last = shaper.chunk(None, false, 2, Some((FinishReason::Length, usage)));
        assert_eq!(last["choices"][0]["finish_reason"], "length");
        assert_eq!(last["choices"][0]["delta"], serde_json::json!({}));
        assert_eq!(last["usage"]["total_tokens"], 4);
    }

    #[test]
    fn completion_logprobs_carry_offsets_into_the_whole_text() {
        let shaper = Shaper::new(Endpoint::Completions, "m".into(), true, false);
        let pieces = [piece("ab", Some(-0.5)), piece("c", Some(-1.0))];
        let response = shaper.response(&pieces, FinishReason::Stop, Usage::default());
        let logprobs = &response["choices"][0]["logprobs"];
        assert_eq!(response["choices"][0]["text"], "abc");
        assert_eq!(logprobs["text_offset"], serde_json::json!([0, 2]));
        assert_eq!(logprobs["token_logprobs"], serde_json::json!([-0.5, -1.0]));
    }

    #[test]
    fn unsupported_knobs_are_refused_not_ignored() {
        assert!(check_common(Some(2), None, None, &None).is_err());
        assert!(check_common(None, Some(0.5), None, &None).is_err());
        assert!(check_common(None, None, None, &Some(HashMap::from([("1".into(), 1.0)]))).is_err());
        assert!(check_common(Some(1), Some(0.0), Some(0.0), &Some(HashMap::new())).is_ok());
    }

    #[test]
    fn a_prompt_may_be_text_a_single_list_or_token_ids() {
        for (json, tokens) in [
            (r#""hello""#, false),
            (r#"["hello"]"#, false),
            ("[1, 2, 3]", true),
            ("[[1, 2, 3]]", true),
        ] {
            let prompt: CompletionPrompt = serde_json::from_str(json).unwrap();
            let is_tokens = matches!(
                prompt,
                CompletionPrompt::Tokens(_) | CompletionPrompt::TokenLists(_)
            );
            assert_eq!(is_tokens, tokens, "{json}");
        }
    }
}
