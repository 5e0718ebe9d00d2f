//! `/v1/stream`: the WebSocket protocol end to end against the CPU engine.

use std::time::Duration;

use futures_util::SinkExt;
use reqwest::Method;
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;

use crate::service_helpers::{spawn_service, text_of};
use crate::tiny_model::adapter;

#[tokio::test]
async fn a_generation_streams_indexed_tokens_then_done_with_usage() {
    let app = spawn_service().await;
    let tenant = app.create_tenant("acme", json!({})).await;
    let mut ws = app.ws(Some(&tenant.key)).await;
    ws.send(
        json!({"type": "generate", "id": "r1", "adapter": null, "prompt": "hello",
                   "max_tokens": 12, "temperature": 0.0, "logprobs": true}),
    )
    .await;
    let events = ws.collect("r1").await;
    let (done, tokens) = events.split_last().unwrap();
    assert_eq!(tokens.len(), 12);
    for (i, token) in tokens.iter().enumerate() {
        assert_eq!(token["type"], "token");
        assert_eq!(token["index"], i);
        assert!(token["token_id"].is_u64());
        let logprob = token["logprob"].as_f64().expect("logprob asked for");
        assert!(logprob <= 0.0);
    }
    assert_eq!(done["type"], "done");
    assert_eq!(done["finish_reason"], "length");
    assert_eq!(done["usage"]["prompt_tokens"], 5);
    assert_eq!(done["usage"]["completion_tokens"], 12);

    // Greedy is deterministic, and without logprobs the field is absent.
    ws.send(
        json!({"type": "generate", "id": "r2", "prompt": "hello", "max_tokens": 12,
                   "temperature": 0}),
    )
    .await;
    let again = ws.collect("r2").await;
    assert_eq!(text_of(&again), text_of(&events));
    assert!(again[0].get("logprob").is_none());
}

#[tokio::test]
async fn auth_by_first_message_works_and_a_bad_key_closes_the_socket() {
    let app = spawn_service().await;
    let tenant = app.create_tenant("acme", json!({})).await;
    let mut ws = app.ws(None).await;
    ws.send(json!({"type": "auth", "api_key": tenant.key}))
        .await;
    ws.send(json!({"type": "generate", "id": "a", "prompt": "hi", "max_tokens": 2}))
        .await;
    let events = ws.collect("a").await;
    assert_eq!(events.last().unwrap()["type"], "done");

    let mut bad = app.ws(None).await;
    bad.send(json!({"type": "auth", "api_key": "pun_wrong"}))
        .await;
    let error = bad.next().await.expect("an error event");
    assert_eq!(error["type"], "error");
    assert_eq!(error["code"], "unauthorized");
    assert!(bad.next().await.is_none(), "the socket closes");

    let mut early = app.ws(None).await;
    early
        .send(json!({"type": "generate", "id": "g", "prompt": "hi"}))
        .await;
    let error = early.next().await.expect("an error event");
    assert_eq!(error["code"], "unauthorized");
    assert_eq!(error["id"], "g");

    // A bad key in the header is refused before the upgrade.
    let request = app
        .client
        .get(app.url("/v1/stream"))
        .bearer_auth("pun_wrong")
        .header("Connection", "Upgrade")
        .header("Upgrade", "websocket")
        .header("Sec-WebSocket-Version", "13")
        .header("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ==")
        .send()
        .await
        .unwrap();
    assert_eq!(request.status(), 401);
}

#[tokio::test]
async fn one_socket_carries_many_concurrent_generations_keyed_by_id() {
    let app = spawn_service().await;
    let tenant = app.create_tenant("acme", json!({})).await;
    app.upload_ok(&tenant.key, "style", &adapter(4, 7)).await;
    let mut ws = app.ws(Some(&tenant.key)).await;
    let ids = ["a", "b", "c", "d"];
    for (i, id) in ids.iter().enumerate() {
        let adapter = if i % 2 == 0 {
            Value::Null
        } else {
            json!("style")
        };
        ws.send(json!({"type": "generate", "id": id, "adapter": adapter,
                       "prompt": "the same prompt", "max_tokens": 8, "temperature": 0}))
            .await;
    }
    let mut texts = std::collections::HashMap::new();
    let mut next_index = std::collections::HashMap::new();
    let mut open = ids.len();
    while open > 0 {
        let event = ws.next().await.expect("events until all are done");
        let id = event["id"].as_str().unwrap().to_owned();
        match event["type"].as_str().unwrap() {
            "token" => {
                let expected = next_index.entry(id.clone()).or_insert(0u64);
                assert_eq!(event["index"], *expected, "in order per id");
                *expected += 1;
                texts
                    .entry(id)
                    .or_insert_with(String::new)
                    .push_str(event["text"].as_str().unwrap());
            }
            "done" => {
                assert_eq!(event["usage"]["completion_tokens"], 8);
                open -= 1;
            }
            other => panic!("unexpected {other}: {event}"),
        }
    }
    assert_eq!(texts["a"], texts["c"], "same base request, same text");
    assert_eq!(texts["b"], texts["d"], "same adapter request, same text");
    let base_ids: Vec<u64> = next_index.values().copied().collect();
    assert!(base_ids.iter().all(|n| *n == 8));
    assert_ne!(texts["a"], texts["b"], "the adapter changes the output");
}

#[tokio::test]
async fn cancel_ends_a_generation_with_done_cancelled_and_records_its_usage() {
    let app = spawn_service().await;
    let tenant = app.create_tenant("acme", json!({})).await;
    let mut ws = app.ws(Some(&tenant.key)).await;
    ws.send(
        json!({"type": "generate", "id": "long", "prompt": "x", "max_tokens": 500,
                   "temperature": 0}),
    )
    .await;
    let first = ws.next().await.unwrap();
    assert_eq!(first["type"], "token");
    ws.send(json!({"type": "cancel", "id": "long"})).await;
    let events = ws.collect("long").await;
    let done = events.last().unwrap();
    assert_eq!(done["type"], "done");
    assert_eq!(done["finish_reason"], "cancelled");
    let completion = done["usage"]["completion_tokens"].as_u64().unwrap();
    assert!(completion < 500, "{completion}");

    ws.send(json!({"type": "cancel", "id": "never-started"}))
        .await;
    let error = ws.next().await.unwrap();
    assert_eq!(error["code"], "not_found");
    assert_eq!(error["id"], "never-started");

    app.eventually("the cancelled request is in the ledger", || async {
        app.ledger(&tenant.id)
            .await
            .iter()
            .any(|(reason, _, _, _)| reason == "cancelled")
    })
    .await;
}

#[tokio::test]
async fn invalid_generations_get_error_events_with_their_codes() {
    let app = spawn_service().await;
    let tenant = app.create_tenant("acme", json!({})).await;
    let mut ws = app.ws(Some(&tenant.key)).await;
    let cases = [
        (
            json!({"type": "generate", "id": "t", "prompt": "x", "temperature": -1}),
            "invalid_request",
        ),
        (
            json!({"type": "generate", "id": "m", "prompt": "x", "max_tokenz": 3}),
            "invalid_request",
        ),
        (json!({"type": "generate", "id": "p"}), "invalid_request"),
        (
            json!({"type": "generate", "id": "n", "adapter": "missing", "prompt": "x"}),
            "adapter_not_found",
        ),
        (
            json!({"type": "generate", "id": "l", "prompt": "x", "max_tokens": 100000}),
            "invalid_request",
        ),
    ];
    for (message, code) in cases {
        let id = message["id"].as_str().unwrap().to_owned();
        ws.send(message).await;
        let events = ws.collect(&id).await;
        assert_eq!(events.len(), 1, "{events:?}");
        assert_eq!(events[0]["type"], "error");
        assert_eq!(events[0]["code"], code, "{id}: {}", events[0]);
    }
    ws.socket
        .send(Message::Text("not json".into()))
        .await
        .unwrap();
    let error = ws.next().await.unwrap();
    assert_eq!(error["code"], "invalid_request");
    assert!(error.get("id").is_none());

    ws.send(json!({"type": "generate", "id": "dup", "prompt": "x", "max_tokens": 400, "temperature": 0}))
        .await;
    ws.send(json!({"type": "generate", "id": "dup", "prompt": "x", "max_tokens": 4}))
        .await;
    let mut saw_conflict = false;
    loop {
        let event = ws.next().await.unwrap();
        if event["type"] == "error" {
            assert_eq!(event["code"], "conflict");
            saw_conflict = true;
        }
        if event["type"] == "done" {
            break;
        }
    }
    assert!(saw_conflict);
}

#[tokio::test]
async fn a_socket_that_disconnects_mid_generation_frees_its_permit_and_records_usage() {
    let app = spawn_service().await;
    let tenant = app
        .create_tenant("acme", json!({"max_concurrent_streams": 1}))
        .await;
    let mut ws = app.ws(Some(&tenant.key)).await;
    ws.send(
        json!({"type": "generate", "id": "g", "prompt": "x", "max_tokens": 500,
                   "temperature": 0}),
    )
    .await;
    assert_eq!(ws.next().await.unwrap()["type"], "token");
    assert_eq!(app.leases(&tenant.id).await, 1);
    // The only permit is taken: a second request is refused.
    let refused = app
        .tenant(Method::POST, "/v1/completions", &tenant.key)
        .json(&json!({"model": "tiny-llama", "prompt": "x", "max_tokens": 2}))
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 429);
    assert!(refused.headers().get("retry-after").is_some());
    let body: Value = refused.json().await.unwrap();
    assert_eq!(body["error"]["code"], "rate_limited");

    drop(ws);
    app.eventually("the permit is released", || async {
        app.leases(&tenant.id).await == 0
    })
    .await;
    app.eventually("the usage is recorded", || async {
        app.ledger(&tenant.id)
            .await
            .iter()
            .any(|(reason, prompt, completion, _)| {
                reason == "cancelled" && *prompt == 1 && *completion >= 1 && *completion < 500
            })
    })
    .await;
    let admitted = app
        .tenant(Method::POST, "/v1/completions", &tenant.key)
        .json(&json!({"model": "tiny-llama", "prompt": "x", "max_tokens": 2}))
        .send()
        .await
        .unwrap();
    assert_eq!(admitted.status(), 200);
}

#[tokio::test]
async fn requests_started_before_a_reupload_keep_their_version() {
    let app = spawn_service().await;
    let tenant = app.create_tenant("acme", json!({})).await;
    let v1 = app.upload_ok(&tenant.key, "style", &adapter(4, 1)).await;
    assert_eq!(v1["version"], 1);
    let mut ws = app.ws(Some(&tenant.key)).await;
    ws.send(
        json!({"type": "generate", "id": "old", "adapter": "style", "prompt": "x",
                   "max_tokens": 300, "temperature": 0}),
    )
    .await;
    assert_eq!(ws.next().await.unwrap()["type"], "token");
    let v2 = app.upload_ok(&tenant.key, "style", &adapter(4, 2)).await;
    assert_eq!(v2["version"], 2);
    ws.send(
        json!({"type": "generate", "id": "new", "adapter": "style", "prompt": "x",
                   "max_tokens": 2, "temperature": 0}),
    )
    .await;
    let mut open = 2;
    while open > 0 {
        let event = ws.next().await.unwrap();
        if event["type"] == "done" {
            open -= 1;
        }
        assert_ne!(event["type"], "error", "{event}");
    }
    let versions: Vec<(String, i32)> = sqlx::query_as(
        "SELECT u.request_id, v.version FROM usage_events u \
         JOIN adapter_versions v ON v.id = u.adapter_version_id ORDER BY u.id",
    )
    .fetch_all(&app.db_pool)
    .await
    .unwrap();
    let old = versions
        .iter()
        .find(|(id, _)| id == "old")
        .expect("old row");
    let new = versions
        .iter()
        .find(|(id, _)| id == "new")
        .expect("new row");
    assert_eq!(old.1, 1);
    assert_eq!(new.1, 2);
}

#[tokio::test]
async fn a_silent_client_is_dropped_after_ten_seconds() {
    let app = spawn_service().await;
    let tenant = app.create_tenant("acme", json!({})).await;
    let ws = app.ws(Some(&tenant.key)).await;
    // Never read: tungstenite answers pings only while reading, so the server hears nothing.
    let started = std::time::Instant::now();
    let mut ws = ws;
    tokio::time::sleep(Duration::from_secs(16)).await;
    let mut closed = false;
    while let Ok(Some(frame)) = tokio::time::timeout(
        Duration::from_secs(1),
        futures_util::StreamExt::next(&mut ws.socket),
    )
    .await
    {
        match frame {
            Ok(Message::Close(_)) | Err(_) => {
                closed = true;
                break;
            }
            Ok(_) => continue,
        }
    }
    if !closed {
        // Reading answered the queued pings; the socket must now refuse to work.
        ws.send(json!({"type": "generate", "id": "late", "prompt": "x", "max_tokens": 1}))
            .await;
        closed = ws.next().await.is_none();
    }
    assert!(closed, "dropped after {:?}", started.elapsed());
}
