//! The OpenAI-compatible routes, over raw HTTP and with the official Python client.

use reqwest::Method;
use serde_json::{Value, json};

use crate::service_helpers::{MODEL_ID, spawn_service, sse_data};
use crate::tiny_model::adapter;

#[tokio::test]
async fn completions_answer_with_text_finish_reason_and_usage() {
    let app = spawn_service().await;
    let tenant = app.create_tenant("acme", json!({})).await;
    let response = app
        .tenant(Method::POST, "/v1/completions", &tenant.key)
        .json(&json!({"model": MODEL_ID, "prompt": "hello", "max_tokens": 7, "temperature": 0}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["object"], "text_completion");
    assert_eq!(body["model"], MODEL_ID);
    assert!(body["id"].as_str().unwrap().starts_with("cmpl-"));
    assert_eq!(body["choices"][0]["finish_reason"], "length");
    assert!(body["choices"][0]["text"].is_string());
    assert_eq!(body["usage"]["prompt_tokens"], 5);
    assert_eq!(body["usage"]["completion_tokens"], 7);
    assert_eq!(body["usage"]["total_tokens"], 12);

    let default_length: Value = app
        .tenant(Method::POST, "/v1/completions", &tenant.key)
        .json(&json!({"model": MODEL_ID, "prompt": [1, 2, 3]}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        default_length["usage"]["completion_tokens"], 16,
        "OpenAI's default"
    );
    assert_eq!(default_length["usage"]["prompt_tokens"], 3);
}

#[tokio::test]
async fn chat_completions_stream_sse_chunks_ending_in_done_with_usage() {
    let app = spawn_service().await;
    let tenant = app.create_tenant("acme", json!({})).await;
    app.upload_ok(&tenant.key, "style", &adapter(4, 3)).await;
    let response = app
        .tenant(Method::POST, "/v1/chat/completions", &tenant.key)
        .json(&json!({
            "model": "style",
            "messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}],
            "max_tokens": 6, "temperature": 0, "stream": true,
            "stream_options": {"include_usage": true}
        }))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert!(
        response.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/event-stream")
    );
    let body = response.text().await.unwrap();
    let data = sse_data(&body);
    assert_eq!(data.last().unwrap(), "[DONE]");
    let chunks: Vec<Value> = data[..data.len() - 1]
        .iter()
        .map(|d| serde_json::from_str(d).unwrap())
        .collect();
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    assert!(
        chunks
            .iter()
            .all(|c| c["object"] == "chat.completion.chunk")
    );
    let closing = chunks
        .iter()
        .find(|c| c["choices"][0]["finish_reason"].is_string())
        .expect("a closing chunk");
    assert_eq!(closing["choices"][0]["finish_reason"], "length");
    assert_eq!(closing["usage"]["completion_tokens"], 6);
    let usage_only = chunks.last().unwrap();
    assert_eq!(usage_only["choices"], json!([]));
    assert_eq!(usage_only["usage"]["completion_tokens"], 6);
    let text: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect();

    // The same request without streaming gives the same text.
    let whole: Value = app
        .tenant(Method::POST, "/v1/chat/completions", &tenant.key)
        .json(&json!({
            "model": "style",
            "messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}],
            "max_tokens": 6, "temperature": 0
        }))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(whole["object"], "chat.completion");
    assert_eq!(whole["choices"][0]["message"]["role"], "assistant");
    assert_eq!(whole["choices"][0]["message"]["content"], text.as_str());
}

#[tokio::test]
async fn models_lists_the_base_model_and_only_the_callers_adapters() {
    let app = spawn_service().await;
    let a = app.create_tenant("tenant-a", json!({})).await;
    let b = app.create_tenant("tenant-b", json!({})).await;
    app.upload_ok(&a.key, "mine", &adapter(4, 1)).await;
    app.upload_ok(&b.key, "theirs", &adapter(4, 2)).await;
    let models: Value = app
        .tenant(Method::GET, "/v1/models", &a.key)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(models["object"], "list");
    let ids: Vec<&str> = models["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, vec![MODEL_ID, "mine"]);
}

#[tokio::test]
async fn openai_routes_refuse_what_they_cannot_honour_with_error_codes() {
    let app = spawn_service().await;
    let tenant = app.create_tenant("acme", json!({})).await;
    let cases = [
        (
            json!({"model": MODEL_ID, "prompt": "x", "n": 2}),
            400,
            "invalid_request",
        ),
        (
            json!({"model": MODEL_ID, "prompt": "x", "presence_penalty": 1.0}),
            400,
            "invalid_request",
        ),
        (
            json!({"model": MODEL_ID, "prompt": "x", "top_p": 0}),
            400,
            "invalid_request",
        ),
        (
            json!({"model": "nope", "prompt": "x"}),
            404,
            "adapter_not_found",
        ),
        (json!({"prompt": "x"}), 400, "invalid_request"),
    ];
    for (body, status, code) in cases {
        let response = app
            .tenant(Method::POST, "/v1/completions", &tenant.key)
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), status, "{body}");
        let error: Value = response.json().await.unwrap();
        assert_eq!(error["error"]["code"], code, "{body}");
    }
    let anonymous = app
        .client
        .post(app.url("/v1/chat/completions"))
        .json(&json!({"model": MODEL_ID, "messages": [{"role": "user", "content": "x"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(anonymous.status(), 401);
}

#[tokio::test]
async fn the_official_openai_python_client_streams_a_chat_completion() {
    let app = spawn_service().await;
    let tenant = app.create_tenant("acme", json!({})).await;
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/api/openai_client.py");
    let base_url = format!("{}/v1", app.address);
    let key = tenant.key.clone();
    let output = tokio::task::spawn_blocking(move || {
        std::process::Command::new("python3")
            .arg(script)
            .env("OPENAI_BASE_URL", base_url)
            .env("OPENAI_API_KEY", key)
            .env("PUNICA_MODEL", MODEL_ID)
            .output()
    })
    .await
    .unwrap()
    .expect("python3 runs (install the client with `pip install openai`)");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "the openai client script failed:\n{stdout}\n{stderr}"
    );
    assert!(
        stdout.contains("chunks=") && stdout.contains("finish_reason=length"),
        "{stdout}"
    );
}
