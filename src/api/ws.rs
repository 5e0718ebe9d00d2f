//! `GET /v1/stream`: token streaming over one WebSocket that carries many generations, keyed by
//! the client's `id` (protocol in [`protocol`], API.md "WebSocket token streaming").
//!
//! One task per socket owns the session. It `select!`s over three things: events from the
//! socket's generations (one bounded queue shared by all of them), frames from the client, and a
//! 5 s heartbeat ticker. A client silent for 10 s is dropped; the socket is always closed on the
//! way out, and closing it cancels every generation it still runs.
//!
//! Each generation runs in its own task (admission, engine stream, accounting; see
//! [`crate::api::generate`]) and pushes its events into the shared queue. A client that does
//! not read makes that queue fill up; a generation whose event waits longer than
//! [`SLOW_CONSUMER_GRACE`] for room is cancelled and ends with an `overloaded` error event. So
//! server memory per socket is bounded by the queue plus one pending event per generation, and
//! generations per socket are capped by [`MAX_GENERATIONS_PER_SOCKET`].

pub mod protocol;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix_web::{HttpRequest, HttpResponse, web};
use actix_ws::{AggregatedMessage, AggregatedMessageStream, CloseCode, CloseReason, Session};
use tokio::sync::{mpsc, oneshot};

use crate::api::auth::{self, TenantContext};
use crate::api::error::{ApiError, ErrorCode};
use crate::api::generate::{self, EventSink, GenEvent, Undeliverable};
use crate::api::state::ServiceState;
use protocol::{ClientMessage, ServerEvent, parse_client_message};

/// How often the server pings.
pub const HEARTBEAT_INTERVAL: Duration = Duration::from_secs(5);
/// A client that sends nothing (not even a pong) for this long is dropped.
pub const CLIENT_TIMEOUT: Duration = Duration::from_secs(10);
/// A browser that authenticates by first message must do so within this time.
pub const AUTH_TIMEOUT: Duration = Duration::from_secs(10);
/// Events waiting to be written to one socket, all of its generations together.
pub const OUTGOING_QUEUE: usize = 256;
/// How long a generation's event may wait for room in a full queue before the generation is
/// cancelled as undeliverable.
pub const SLOW_CONSUMER_GRACE: Duration = Duration::from_secs(5);
/// How long writing one frame may take before the client is considered gone.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// Generations one socket may run at once (tenant quotas may allow fewer).
pub const MAX_GENERATIONS_PER_SOCKET: usize = 64;
/// Largest client message (a prompt), in bytes.
pub const MAX_MESSAGE_BYTES: usize = 1 << 20;

/// Upgrades the connection. With an `Authorization` header the key is checked before the
/// upgrade (a bad key is a plain 401); a console page is authenticated by its session cookie
/// (same origin only); otherwise the first message must be `auth`.
pub async fn stream(
    req: HttpRequest,
    body: web::Payload,
    state: web::Data<ServiceState>,
) -> Result<HttpResponse, actix_web::Error> {
    let tenant = match auth::bearer_token(&req) {
        Some(token) => Some(state.auth.authenticate(&token).await?),
        // Console pages (the playground) authenticate with their session cookie instead.
        None => crate::console::stream_tenant(&req)
            .await?
            .map(|console| TenantContext {
                tenant_id: console.tenant_id,
                tenant_name: console.tenant_name,
                key_id: None,
            }),
    };
    let (response, session, messages) = actix_ws::handle(&req, body)?;
    let messages = messages
        .max_frame_size(MAX_MESSAGE_BYTES)
        .aggregate_continuations()
        .max_continuation_size(MAX_MESSAGE_BYTES);
    let state = state.into_inner();
    actix_web::rt::spawn(async move {
        Socket::new(state, session, tenant).run(messages).await;
    });
    Ok(response)
}

/// Why the socket loop ended.
enum Exit {
    Closed(Option<CloseReason>),
    Policy(&'static str),
    Gone,
}

struct Socket {
    state: Arc<ServiceState>,
    session: Session,
    tenant: Option<TenantContext>,
    /// Running generations by id, until their last event has been written. Dropping a sender
    /// cancels its generation; `None` once a cancel has been sent (the id stays taken until the
    /// generation's final `done`, so a reused id can never be confused with the old one).
    active: HashMap<String, Option<oneshot::Sender<()>>>,
    out_tx: mpsc::Sender<ServerEvent>,
    out_rx: mpsc::Receiver<ServerEvent>,
    opened: Instant,
    last_heard: Instant,
}

impl Socket {
    fn new(state: Arc<ServiceState>, session: Session, tenant: Option<TenantContext>) -> Self {
        let (out_tx, out_rx) = mpsc::channel(OUTGOING_QUEUE);
        let now = Instant::now();
        Socket {
            state,
            session,
            tenant,
            active: HashMap::new(),
            out_tx,
            out_rx,
            opened: now,
            last_heard: now,
        }
    }

    async fn run(mut self, mut messages: AggregatedMessageStream) {
        let mut ticker = tokio::time::interval(HEARTBEAT_INTERVAL);
        let exit = loop {
            tokio::select! {
                Some(event) = self.out_rx.recv() => {
                    if event.is_terminal()
                        && let Some(id) = event.id()
                    {
                        self.active.remove(id);
                    }
                    if !self.send(&event).await {
                        break Exit::Gone;
                    }
                }
                message = messages.recv() => {
                    match message {
                        Some(Ok(message)) => {
                            self.last_heard = Instant::now();
                            if let Some(exit) = self.on_message(message).await {
                                break exit;
                            }
                        }
                        Some(Err(error)) => {
                            tracing::debug!(%error, "websocket protocol error");
                            break Exit::Policy("protocol error");
                        }
                        None => break Exit::Gone,
                    }
                }
                _ = ticker.tick() => {
                    if self.last_heard.elapsed() > CLIENT_TIMEOUT {
                        tracing::debug!("websocket client silent, dropping it");
                        break Exit::Gone;
                    }
                    if self.tenant.is_none() && self.opened.elapsed() > AUTH_TIMEOUT {
                        self.send_error(None, ErrorCode::Unauthorized, "no `auth` message in time").await;
                        break Exit::Policy("unauthorized");
                    }
                    let ping = tokio::time::timeout(WRITE_TIMEOUT, self.session.ping(b""));
                    if !matches!(ping.await, Ok(Ok(()))) {
                        break Exit::Gone;
                    }
                }
            }
        };
        // Dropping the senders cancels the generations; each records its usage on its way out.
        self.active.clear();
        let reason = match exit {
            Exit::Closed(reason) => reason,
            Exit::Policy(description) => Some(CloseReason {
                code: CloseCode::Policy,
                description: Some(description.to_owned()),
            }),
            Exit::Gone => None,
        };
        // The peer may already be gone; nothing is left to do with a failed close.
        let _ = self.session.close(reason).await;
    }

    /// Handles one client frame; `Some` ends the socket.
    async fn on_message(&mut self, message: AggregatedMessage) -> Option<Exit> {
        match message {
            AggregatedMessage::Text(text) => self.on_text(&text).await,
            AggregatedMessage::Binary(_) => {
                self.send_error(
                    None,
                    ErrorCode::InvalidRequest,
                    "binary frames are not supported; send JSON text",
                )
                .await;
                None
            }
            AggregatedMessage::Ping(bytes) => {
                if self.session.pong(&bytes).await.is_err() {
                    return Some(Exit::Gone);
                }
                None
            }
            AggregatedMessage::Pong(_) => None,
            AggregatedMessage::Close(reason) => Some(Exit::Closed(reason)),
        }
    }

    async fn on_text(&mut self, text: &str) -> Option<Exit> {
        let message = match parse_client_message(text) {
            Ok(message) => message,
            Err(error) => {
                self.send_error(error.id, ErrorCode::InvalidRequest, &error.message)
                    .await;
                return None;
            }
        };
        match message {
            ClientMessage::Auth { api_key } => {
                if self.tenant.is_some() {
                    self.send_error(None, ErrorCode::InvalidRequest, "already authenticated")
                        .await;
                    return None;
                }
                match self.state.auth.authenticate(&api_key).await {
                    Ok(tenant) => {
                        self.tenant = Some(tenant);
                        None
                    }
                    Err(error) => {
                        self.send_api_error(None, &error).await;
                        Some(Exit::Policy("unauthorized"))
                    }
                }
            }
            ClientMessage::Cancel { id } => {
                if self.tenant.is_none() {
                    return self.refuse_unauthenticated(Some(id)).await;
                }
                match self.active.get_mut(&id) {
                    // The generation answers with `done` / `cancelled` once it has stopped; a
                    // second cancel for it has nothing left to do.
                    Some(cancel) => {
                        if let Some(cancel) = cancel.take() {
                            let _ = cancel.send(());
                        }
                    }
                    None => {
                        let message = format!("no running generation with id '{id}'");
                        self.send_error(Some(id), ErrorCode::NotFound, &message)
                            .await;
                    }
                }
                None
            }
            ClientMessage::Generate(generate) => {
                let Some(tenant) = self.tenant.clone() else {
                    return self.refuse_unauthenticated(Some(generate.id)).await;
                };
                let (id, params) = match generate.into_params() {
                    Ok(split) => split,
                    Err((id, message)) => {
                        self.send_error(Some(id), ErrorCode::InvalidRequest, &message)
                            .await;
                        return None;
                    }
                };
                if self.active.contains_key(&id) {
                    let message = format!("a generation with id '{id}' is already running");
                    self.send_error(Some(id), ErrorCode::Conflict, &message)
                        .await;
                    return None;
                }
                if self.active.len() >= MAX_GENERATIONS_PER_SOCKET {
                    let message = format!(
                        "at most {MAX_GENERATIONS_PER_SOCKET} generations may run on one socket"
                    );
                    self.send_error(Some(id), ErrorCode::RateLimited, &message)
                        .await;
                    return None;
                }
                let (cancel_tx, cancel_rx) = oneshot::channel();
                self.active.insert(id.clone(), Some(cancel_tx));
                let sink = SocketSink {
                    id: id.clone(),
                    tx: self.out_tx.clone(),
                };
                let state = self.state.clone();
                tokio::spawn(async move {
                    generate::run(state, tenant, id, params, sink, async move {
                        // A dropped sender (socket closed) cancels just like a `cancel` message.
                        let _ = cancel_rx.await;
                    })
                    .await;
                });
                None
            }
        }
    }

    async fn refuse_unauthenticated(&mut self, id: Option<String>) -> Option<Exit> {
        self.send_error(
            id,
            ErrorCode::Unauthorized,
            "authenticate first: send {\"type\": \"auth\", \"api_key\": ...} or an Authorization header",
        )
        .await;
        Some(Exit::Policy("unauthorized"))
    }

    async fn send_api_error(&mut self, id: Option<String>, error: &ApiError) {
        error.log();
        self.send_error(id, error.code(), &error.public_message())
            .await;
    }

    async fn send_error(&mut self, id: Option<String>, code: ErrorCode, message: &str) {
        let event = ServerEvent::Error {
            id,
            code,
            message: message.to_owned(),
            retry_after: None,
        };
        // A failed write shows up as a closed session on the next loop turn.
        let _ = self.send(&event).await;
    }

    /// Writes one event; false when the client is gone or stuck.
    async fn send(&mut self, event: &ServerEvent) -> bool {
        matches!(
            tokio::time::timeout(WRITE_TIMEOUT, self.session.text(event.to_json())).await,
            Ok(Ok(()))
        )
    }
}

/// Delivers one generation's events into its socket's shared queue.
struct SocketSink {
    id: String,
    tx: mpsc::Sender<ServerEvent>,
}

impl SocketSink {
    fn frame(&self, event: GenEvent) -> ServerEvent {
        event.into_server_event(self.id.clone())
    }
}

impl EventSink for SocketSink {
    async fn deliver(&mut self, event: GenEvent) -> Result<(), Undeliverable> {
        let frame = self.frame(event);
        match self.tx.send_timeout(frame, SLOW_CONSUMER_GRACE).await {
            Ok(()) => Ok(()),
            Err(mpsc::error::SendTimeoutError::Timeout(_)) => Err(Undeliverable::TooSlow {
                waited: SLOW_CONSUMER_GRACE,
            }),
            Err(mpsc::error::SendTimeoutError::Closed(_)) => Err(Undeliverable::Gone),
        }
    }

    async fn finish(&mut self, event: GenEvent) {
        let frame = self.frame(event);
        // Waits for room however long it takes: one pending event per generation is the bound.
        // A closed queue means the socket is gone and nobody is left to tell.
        let _ = self.tx.send(frame).await;
    }
}
