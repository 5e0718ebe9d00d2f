//! One generation from admission to its ledger row, shared by the WebSocket and the OpenAI
//! routes (ARCHITECTURE.md "The way of a request").
//!
//! [`run`] checks the parameters, resolves the adapter name to a pinned (adapter, version) in
//! the caller's tenant, tokenizes off the async workers, takes the tenant's concurrency permit
//! and reserves its tokens in Postgres, submits to the engine, and forwards the engine's events
//! to an [`EventSink`] (a socket's queue or an SSE body). However it ends — done, stopped,
//! cancelled by the client, undeliverable, engine error — the permit is released, unused tokens
//! are given back, and a usage row is written for every request the engine accepted.

mod params;

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

pub use params::{
    ChatMessage, CheckedParams, CheckedSampling, GenerationParams, PromptInput, StopSequences,
};

use tracing::Instrument;

use crate::api::adapter_registry::PinnedAdapter;
use crate::api::auth::TenantContext;
use crate::api::error::{ApiError, ErrorCode};
use crate::api::quota::Admission;
use crate::api::state::{DEFAULT_MAX_TOKENS, ModelRuntime, ServiceState};
use crate::api::ws::protocol::ServerEvent;
use crate::engine::request::{
    ErrorCode as EngineErrorCode, SamplingParams, StreamEvent, ValidRequest,
};
pub use crate::engine::request::{FinishReason, Usage};
use crate::engine::{EngineError, RequestStream};
use crate::store::UsageRecord;

/// What a generation tells its client, transport-neutral.
#[derive(Clone, Debug, PartialEq)]
pub enum GenEvent {
    Token {
        index: u32,
        token_id: u32,
        /// The text this token completes (may be empty while a multi-byte character is held).
        text: String,
        logprob: Option<f32>,
    },
    Done {
        finish_reason: FinishReason,
        usage: Usage,
    },
    Failed {
        code: ErrorCode,
        message: String,
        /// For 429s: when a retry may succeed.
        retry_after: Option<Duration>,
    },
}

impl GenEvent {
    fn failed(error: &ApiError) -> GenEvent {
        GenEvent::Failed {
            code: error.code(),
            message: error.public_message(),
            retry_after: error.retry_after(),
        }
    }

    /// The WebSocket frame of this event for generation `id`.
    pub fn into_server_event(self, id: String) -> ServerEvent {
        match self {
            GenEvent::Token {
                index,
                token_id,
                text,
                logprob,
            } => ServerEvent::Token {
                id,
                index,
                token_id,
                text,
                logprob,
            },
            GenEvent::Done {
                finish_reason,
                usage,
            } => ServerEvent::Done {
                id,
                finish_reason,
                usage,
            },
            GenEvent::Failed {
                code,
                message,
                retry_after,
            } => ServerEvent::Error {
                id: Some(id),
                code,
                message,
                retry_after: retry_after.map(crate::api::error::retry_after_secs),
            },
        }
    }
}

/// Why an event could not be handed to the client.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Undeliverable {
    /// The client is gone (socket closed, HTTP response dropped).
    Gone,
    /// The client did not make room for the event within `waited`.
    TooSlow { waited: Duration },
}

/// Where a generation's events go. Implementations keep memory bounded: `deliver` gives up
/// (`TooSlow`) instead of queueing without limit.
pub trait EventSink: Send + 'static {
    /// Hands over a token event.
    fn deliver(
        &mut self,
        event: GenEvent,
    ) -> impl Future<Output = Result<(), Undeliverable>> + Send;
    /// Hands over the final event (`Done` or `Failed`), waiting for room as long as the client
    /// is connected: it is one event, so the wait holds no unbounded memory.
    fn finish(&mut self, event: GenEvent) -> impl Future<Output = ()> + Send;
}

/// Runs one generation from admission to its end; see the module docs. `cancel` resolving
/// stops it with `finish_reason: cancelled`.
pub async fn run<S: EventSink>(
    state: Arc<ServiceState>,
    tenant: TenantContext,
    request_id: String,
    params: GenerationParams,
    mut sink: S,
    cancel: impl Future<Output = ()> + Send,
) {
    let span = generation_span(&tenant, &request_id, params.adapter.as_deref());
    async move {
        tokio::pin!(cancel);
        let admitted = tokio::select! {
            admitted = admit(&state, &tenant, &request_id, params) => admitted,
            () = &mut cancel => {
                sink.finish(GenEvent::Done {
                    finish_reason: FinishReason::Cancelled,
                    usage: Usage::default(),
                })
                .await;
                return;
            }
        };
        match admitted {
            Ok(running) => running.drive_inner(&mut sink, cancel).await,
            Err(error) => sink.finish(GenEvent::failed(&error)).await,
        }
    }
    .instrument(span)
    .await
}

fn generation_span(
    tenant: &TenantContext,
    request_id: &str,
    adapter: Option<&str>,
) -> tracing::Span {
    tracing::info_span!(
        "generation",
        tenant = %tenant.tenant_id,
        request = %request_id,
        adapter = adapter.unwrap_or("base"),
    )
}

/// A generation the engine has accepted: its event stream, permit, reservation and pinned
/// adapter. Drive it with [`Running::drive`].
pub struct Running {
    state: Arc<ServiceState>,
    tenant: TenantContext,
    request_id: String,
    adapter: Option<PinnedAdapter>,
    prompt_tokens: u32,
    events: RequestStream,
    admission: Option<Admission>,
    received: Instant,
    started_at: time::OffsetDateTime,
    span: tracing::Span,
}

/// The prompt as token ids: encodes text, renders chat through the model's template.
fn tokenize(model: &ModelRuntime, input: PromptInput) -> Result<Vec<u32>, ApiError> {
    let invalid = |e: crate::engine::model::tokenizer::TokenizerError| {
        ApiError::InvalidRequest(format!("cannot tokenize the prompt: {e}"))
    };
    match input {
        PromptInput::Text(text) => model.tokenizer.encode(&text, true).map_err(invalid),
        PromptInput::Tokens(tokens) => {
            let vocab = model.tokenizer.vocab_size();
            match tokens.iter().find(|&&t| t as usize >= vocab) {
                Some(bad) => Err(ApiError::InvalidRequest(format!(
                    "token id {bad} is outside the vocabulary of {vocab}"
                ))),
                None => Ok(tokens),
            }
        }
        PromptInput::Chat(messages) => {
            if !model.tokenizer.has_chat_template() {
                return Err(ApiError::InvalidRequest(
                    "the base model has no chat template; send `prompt` instead".into(),
                ));
            }
            let messages: Vec<crate::engine::model::tokenizer::ChatMessage> = messages
                .into_iter()
                .map(|m| crate::engine::model::tokenizer::ChatMessage::new(m.role, m.content))
                .collect();
            let text = model
                .tokenizer
                .apply_chat_template(&messages, true)
                .map_err(invalid)?;
            model.tokenizer.encode(&text, false).map_err(invalid)
        }
    }
}

fn engine_error(error: EngineError) -> ApiError {
    match error {
        EngineError::Overloaded { .. } => ApiError::Overloaded(error.to_string()),
        EngineError::InvalidRequest(message) => ApiError::InvalidRequest(message),
        EngineError::TooLong { .. } => ApiError::InvalidRequest(error.to_string()),
        EngineError::Stopped | EngineError::Startup(_) => {
            ApiError::Overloaded(format!("the engine is not serving: {error}"))
        }
    }
}

/// Admits a generation: checks, adapter, prompt, quotas, engine. Nothing is held on failure.
pub async fn admit(
    state: &Arc<ServiceState>,
    tenant: &TenantContext,
    request_id: &str,
    params: GenerationParams,
) -> Result<Running, ApiError> {
    let received = Instant::now();
    let result = admit_inner(state, tenant, request_id, params, received).await;
    if let Err(error) = &result {
        error.log();
        state.metrics.record_error(Some(tenant), error.code());
    }
    result
}

async fn admit_inner(
    state: &Arc<ServiceState>,
    tenant: &TenantContext,
    request_id: &str,
    params: GenerationParams,
    received: Instant,
) -> Result<Running, ApiError> {
    let span = generation_span(tenant, request_id, params.adapter.as_deref());
    let model = state.model()?;
    let checked = params.check()?;
    let adapter = match &checked.adapter {
        Some(name) => Some(state.adapters.resolve(tenant, name).await?),
        None => None,
    };
    let prompt = {
        let model = model.clone();
        let input = checked.input;
        tokio::task::spawn_blocking(move || tokenize(&model, input))
            .await
            .map_err(ApiError::internal)??
    };
    if prompt.is_empty() {
        return Err(ApiError::InvalidRequest(
            "the prompt encodes to no tokens".into(),
        ));
    }
    let context = model.context_tokens();
    let room = context.saturating_sub(prompt.len());
    if room == 0 {
        return Err(ApiError::InvalidRequest(format!(
            "the prompt has {} tokens; the model's context holds {context}",
            prompt.len()
        )));
    }
    let room = u32::try_from(room).unwrap_or(u32::MAX);
    let max_tokens = match checked.max_tokens {
        Some(asked) if asked > room => {
            return Err(ApiError::InvalidRequest(format!(
                "prompt ({} tokens) + max_tokens ({asked}) exceeds the model's context of {context} tokens",
                prompt.len()
            )));
        }
        Some(asked) => asked,
        None => DEFAULT_MAX_TOKENS.min(room),
    };
    let prompt_tokens = u32::try_from(prompt.len()).unwrap_or(u32::MAX);
    let admission = state
        .quotas
        .admit(
            tenant.tenant_id,
            u64::from(prompt_tokens) + u64::from(max_tokens),
        )
        .await?;
    let sampling = checked.sampling;
    let request = ValidRequest {
        tenant: tenant.tenant_id.as_uuid(),
        request_id: uuid::Uuid::new_v4(),
        adapter: adapter.as_ref().map(|a| a.key),
        prompt,
        sampling: SamplingParams {
            temperature: sampling.temperature,
            top_k: (sampling.top_k > 0).then_some(sampling.top_k as usize),
            top_p: sampling.top_p,
            seed: sampling.seed,
            max_tokens: max_tokens as usize,
            stop_token_ids: model.tokenizer.stop_ids().to_vec(),
            stop: sampling.stop,
            // API.md's `logprobs` asks for the chosen token's logprob only: no alternatives.
            logprobs: sampling.logprobs.then_some(0),
        },
    };
    let events = model.engine.submit(request).map_err(engine_error)?;
    state.metrics.stream_started(tenant);
    Ok(Running {
        state: state.clone(),
        tenant: tenant.clone(),
        request_id: request_id.to_owned(),
        adapter,
        prompt_tokens,
        events,
        admission: Some(admission),
        received,
        started_at: time::OffsetDateTime::now_utc(),
        span,
    })
}

/// The end of a generation as the accounting sees it.
struct Outcome {
    /// `length`, `stop`, `cancelled` or `error` (the ledger's spelling).
    ledger_reason: &'static str,
    usage: Usage,
}

impl Outcome {
    fn finished(reason: FinishReason, usage: Usage) -> Self {
        Outcome {
            ledger_reason: reason.as_str(),
            usage,
        }
    }

    fn failed(usage: Usage) -> Self {
        Outcome {
            ledger_reason: "error",
            usage,
        }
    }
}

fn engine_failure(code: EngineErrorCode, message: String) -> GenEvent {
    let code = match code {
        EngineErrorCode::AdapterNotFound => ErrorCode::AdapterNotFound,
        EngineErrorCode::InvalidAdapter => ErrorCode::InvalidAdapter,
        EngineErrorCode::InvalidRequest => ErrorCode::InvalidRequest,
        EngineErrorCode::Overloaded => ErrorCode::Overloaded,
        EngineErrorCode::Internal => ErrorCode::Internal,
    };
    GenEvent::Failed {
        code,
        message,
        retry_after: None,
    }
}

impl Running {
    /// Streams the generation's events into `sink` until it ends or `cancel` resolves, then
    /// settles its quota and writes its usage row.
    pub async fn drive<S: EventSink>(self, mut sink: S, cancel: impl Future<Output = ()> + Send) {
        let span = self.span.clone();
        async move {
            tokio::pin!(cancel);
            self.drive_inner(&mut sink, cancel).await;
        }
        .instrument(span)
        .await
    }

    async fn drive_inner<S: EventSink>(
        mut self,
        sink: &mut S,
        mut cancel: std::pin::Pin<&mut (impl Future<Output = ()> + Send)>,
    ) {
        let (outcome, last) = self.pump(sink, &mut cancel).await;
        // Usage is on the ledger before the client learns the generation ended.
        self.finish(outcome).await;
        if let Some(last) = last {
            sink.finish(last).await;
        }
    }

    async fn pump<S: EventSink>(
        &mut self,
        sink: &mut S,
        cancel: &mut std::pin::Pin<&mut (impl Future<Output = ()> + Send)>,
    ) -> (Outcome, Option<GenEvent>) {
        let prompt_tokens = self.prompt_tokens;
        let mut completion_tokens = 0u32;
        let usage = |completion_tokens| Usage {
            prompt_tokens,
            completion_tokens,
        };
        loop {
            let event = tokio::select! {
                event = self.events.next_event() => event,
                () = cancel.as_mut() => {
                    self.events.cancel();
                    let usage = usage(completion_tokens);
                    return (
                        Outcome::finished(FinishReason::Cancelled, usage),
                        Some(GenEvent::Done { finish_reason: FinishReason::Cancelled, usage }),
                    );
                }
            };
            match event {
                Some(StreamEvent::Token {
                    index,
                    token_id,
                    text,
                    logprob,
                    top_logprobs: _,
                }) => {
                    if completion_tokens == 0 {
                        self.state
                            .metrics
                            .first_token(&self.tenant, self.received.elapsed());
                    }
                    completion_tokens += 1;
                    let event = GenEvent::Token {
                        index,
                        token_id,
                        text,
                        logprob,
                    };
                    match sink.deliver(event).await {
                        Ok(()) => {}
                        Err(Undeliverable::Gone) => {
                            self.events.cancel();
                            return (
                                Outcome::finished(
                                    FinishReason::Cancelled,
                                    usage(completion_tokens),
                                ),
                                None,
                            );
                        }
                        Err(Undeliverable::TooSlow { waited }) => {
                            self.events.cancel();
                            let message = format!(
                                "the client did not read its events for {:.1} s; generation cancelled",
                                waited.as_secs_f32()
                            );
                            self.state
                                .metrics
                                .record_error(Some(&self.tenant), ErrorCode::Overloaded);
                            return (
                                Outcome::finished(
                                    FinishReason::Cancelled,
                                    usage(completion_tokens),
                                ),
                                Some(GenEvent::Failed {
                                    code: ErrorCode::Overloaded,
                                    message,
                                    retry_after: None,
                                }),
                            );
                        }
                    }
                }
                Some(StreamEvent::Done {
                    finish_reason,
                    usage,
                }) => {
                    return (
                        Outcome::finished(finish_reason, usage),
                        Some(GenEvent::Done {
                            finish_reason,
                            usage,
                        }),
                    );
                }
                Some(StreamEvent::Error { code, message }) => {
                    tracing::warn!(code = code.as_str(), %message, "generation failed in the engine");
                    let event = engine_failure(code, message);
                    if let GenEvent::Failed { code, .. } = &event {
                        self.state.metrics.record_error(Some(&self.tenant), *code);
                    }
                    return (Outcome::failed(usage(completion_tokens)), Some(event));
                }
                None => {
                    let error = ApiError::internal(anyhow::anyhow!(
                        "the engine ended the stream without a final event"
                    ));
                    error.log();
                    self.state
                        .metrics
                        .record_error(Some(&self.tenant), ErrorCode::Internal);
                    return (
                        Outcome::failed(usage(completion_tokens)),
                        Some(GenEvent::failed(&error)),
                    );
                }
            }
        }
    }

    /// Settles quota, writes the usage row, records metrics, unpins the adapter.
    async fn finish(mut self, outcome: Outcome) {
        let usage = outcome.usage;
        if let Some(admission) = self.admission.take() {
            admission.settle(usage.total()).await;
        }
        let record = UsageRecord {
            tenant_id: self.tenant.tenant_id,
            adapter_version_id: self.adapter.as_ref().map(|a| a.version.id),
            request_id: self.request_id.clone(),
            prompt_tokens: usage.prompt_tokens,
            completion_tokens: usage.completion_tokens,
            started_at: self.started_at,
            finished_at: time::OffsetDateTime::now_utc(),
            finish_reason: outcome.ledger_reason.to_owned(),
        };
        if let Err(error) = self.state.store.record_usage(&record).await {
            // The tenant (or the version's rows) may have been deleted while it ran.
            tracing::warn!(%error, "writing the usage row failed");
        }
        self.state.metrics.stream_finished(
            &self.tenant,
            self.adapter.as_ref().map(|a| a.version.name.as_str()),
            outcome.ledger_reason,
            usage.prompt_tokens,
            usage.completion_tokens,
            self.received.elapsed(),
        );
        tracing::debug!(
            finish_reason = outcome.ledger_reason,
            prompt_tokens = usage.prompt_tokens,
            completion_tokens = usage.completion_tokens,
            "generation ended"
        );
    }
}
