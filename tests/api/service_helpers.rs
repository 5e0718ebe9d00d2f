//! Helpers for the service's route tests: an app serving the tiny model, tenants with keys,
//! adapter uploads, WebSocket clients and SSE parsing.

#![allow(dead_code)]

use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

use crate::helpers::{TestApp, spawn_app_with};
use crate::tiny_model::{AdapterFiles, write_tiny_model};

/// The base model's id: the model folder's name.
pub const MODEL_ID: &str = "tiny-llama";

/// A service app serving the tiny model, with its model folder kept alive.
pub struct Service {
    pub app: TestApp,
    _model_dir: tempfile::TempDir,
}

impl std::ops::Deref for Service {
    type Target = TestApp;
    fn deref(&self) -> &TestApp {
        &self.app
    }
}

/// The service with the tiny model loaded and ready.
pub async fn spawn_service() -> Service {
    spawn_service_with(|_| {}).await
}

/// Like [`spawn_service`], with settings adjusted by `configure`.
pub async fn spawn_service_with(configure: impl FnOnce(&mut punica::config::Settings)) -> Service {
    let model_root = tempfile::tempdir().expect("model temp dir");
    let model_dir = write_tiny_model(&model_root.path().join(MODEL_ID));
    let app = spawn_app_with(|settings| {
        settings.model = Some(model_dir);
        configure(settings);
    })
    .await;
    let service = Service {
        app,
        _model_dir: model_root,
    };
    service.wait_ready().await;
    service
}

/// A tenant with one API key.
#[derive(Clone, Debug)]
pub struct Tenant {
    pub id: String,
    pub name: String,
    pub key: String,
}

impl Service {
    /// Waits until `/readyz` answers 200 (the model has loaded).
    pub async fn wait_ready(&self) {
        for _ in 0..600 {
            if self.get("/readyz").await.status() == 200 {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("the service did not become ready within 30 s");
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{}", self.address, path)
    }

    /// A request with the operator token.
    pub fn admin(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        self.client
            .request(method, self.url(path))
            .bearer_auth(&self.admin_token)
    }

    /// A request with a tenant key.
    pub fn tenant(
        &self,
        method: reqwest::Method,
        path: &str,
        key: &str,
    ) -> reqwest::RequestBuilder {
        self.client.request(method, self.url(path)).bearer_auth(key)
    }

    /// Creates a tenant with `quotas` and one API key.
    pub async fn create_tenant(&self, name: &str, quotas: Value) -> Tenant {
        let response = self
            .admin(reqwest::Method::POST, "/api/v1/tenants")
            .json(&json!({"name": name, "quotas": quotas}))
            .send()
            .await
            .expect("create tenant");
        assert_eq!(response.status(), 201, "{}", response.text().await.unwrap());
        let tenant: Value = response.json().await.expect("tenant json");
        let id = tenant["id"].as_str().expect("tenant id").to_owned();
        let response = self
            .admin(
                reqwest::Method::POST,
                &format!("/api/v1/tenants/{id}/api-keys"),
            )
            .json(&json!({"label": "test"}))
            .send()
            .await
            .expect("create key");
        assert_eq!(response.status(), 201);
        let key: Value = response.json().await.expect("key json");
        Tenant {
            id,
            name: name.to_owned(),
            key: key["key"].as_str().expect("key").to_owned(),
        }
    }

    /// Uploads adapter `files` as `name`.
    pub async fn upload(&self, key: &str, name: &str, files: &AdapterFiles) -> reqwest::Response {
        let form = reqwest::multipart::Form::new()
            .text("name", name.to_owned())
            .part(
                "adapter_config.json",
                reqwest::multipart::Part::bytes(files.config.clone())
                    .file_name("adapter_config.json"),
            )
            .part(
                "adapter_model.safetensors",
                reqwest::multipart::Part::bytes(files.weights.clone())
                    .file_name("adapter_model.safetensors"),
            );
        self.tenant(reqwest::Method::POST, "/api/v1/adapters", key)
            .multipart(form)
            .send()
            .await
            .expect("upload request")
    }

    /// Uploads and asserts 201; returns the body.
    pub async fn upload_ok(&self, key: &str, name: &str, files: &AdapterFiles) -> Value {
        let response = self.upload(key, name, files).await;
        let status = response.status();
        let body: Value = response.json().await.expect("upload json");
        assert_eq!(status, 201, "{body}");
        body
    }

    /// Opens `/v1/stream`, with the key in the Authorization header when given.
    pub async fn ws(&self, key: Option<&str>) -> Ws {
        let mut request = format!("ws://127.0.0.1:{}/v1/stream", self.port)
            .into_client_request()
            .expect("ws request");
        if let Some(key) = key {
            request.headers_mut().insert(
                "Authorization",
                format!("Bearer {key}").parse().expect("header value"),
            );
        }
        let (socket, _) = tokio_tungstenite::connect_async(request)
            .await
            .expect("ws connect");
        Ws { socket }
    }

    /// Rows of the usage ledger of a tenant: (finish_reason, prompt, completion, version id).
    pub async fn ledger(&self, tenant_id: &str) -> Vec<(String, i32, i32, Option<uuid::Uuid>)> {
        sqlx::query_as(
            "SELECT finish_reason, prompt_tokens, completion_tokens, adapter_version_id \
             FROM usage_events WHERE tenant_id = $1::uuid ORDER BY id",
        )
        .bind(tenant_id)
        .fetch_all(&self.db_pool)
        .await
        .expect("read ledger")
    }

    /// Live stream leases of a tenant.
    pub async fn leases(&self, tenant_id: &str) -> i64 {
        sqlx::query_scalar(
            "SELECT count(*) FROM stream_leases WHERE tenant_id = $1::uuid AND expires_at > now()",
        )
        .bind(tenant_id)
        .fetch_one(&self.db_pool)
        .await
        .expect("count leases")
    }

    /// Polls `check` every 50 ms for up to 10 s.
    pub async fn eventually<F, Fut>(&self, what: &str, mut check: F)
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = bool>,
    {
        for _ in 0..200 {
            if check().await {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("timed out waiting until {what}");
    }
}

/// A WebSocket client speaking the `/v1/stream` protocol.
pub struct Ws {
    pub socket: WebSocketStream<MaybeTlsStream<TcpStream>>,
}

impl Ws {
    pub async fn send(&mut self, message: Value) {
        self.socket
            .send(Message::Text(message.to_string().into()))
            .await
            .expect("ws send");
    }

    /// The next JSON event (pings are answered by tungstenite); `None` when the socket closed.
    pub async fn next(&mut self) -> Option<Value> {
        loop {
            let frame = tokio::time::timeout(Duration::from_secs(30), self.socket.next())
                .await
                .expect("a ws event within 30 s")?;
            match frame {
                Ok(Message::Text(text)) => {
                    return Some(serde_json::from_str(&text).expect("event json"));
                }
                Ok(Message::Close(_)) | Err(_) => return None,
                Ok(_) => continue,
            }
        }
    }

    /// Events for `id` until its `done` or `error` (others are dropped).
    pub async fn collect(&mut self, id: &str) -> Vec<Value> {
        let mut events = Vec::new();
        while let Some(event) = self.next().await {
            if event["id"] == id {
                let last = event["type"] != "token";
                events.push(event);
                if last {
                    return events;
                }
            }
        }
        panic!("socket closed before generation {id} ended: {events:?}");
    }
}

/// The concatenated text of token events.
pub fn text_of(events: &[Value]) -> String {
    events
        .iter()
        .filter(|e| e["type"] == "token")
        .map(|e| e["text"].as_str().unwrap_or(""))
        .collect()
}

/// The `data:` payloads of an SSE body.
pub fn sse_data(body: &str) -> Vec<String> {
    body.split("\n\n")
        .filter_map(|event| event.strip_prefix("data: "))
        .map(str::to_owned)
        .collect()
}
