//! The playground streams tokens over `/v1/stream`, authenticated by the console session.

use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

use crate::browser::with_browser;
use crate::support::{
    HttpSession, USER_PASSWORD, browser_login, spawn_console_with_model, tenant_with_user,
};
use crate::tiny_model::adapter;

#[tokio::test]
async fn playground_streams_text_from_an_adapter_and_shows_the_rate() {
    let console = spawn_console_with_model().await;
    let user = tenant_with_user(&console.store, "player").await;
    let (_, key) = console
        .store
        .create_api_key(user.tenant_id.parse().unwrap(), "t")
        .await
        .unwrap();
    console
        .service()
        .upload_ok(key.expose(), "poet", &adapter(4, 9))
        .await;
    let base = console.address.clone();
    with_browser("playground_streams", |page| async move {
        browser_login(&page, &base, &user.email, USER_PASSWORD).await;
        page.click("a[href='/console/playground']").await;
        page.wait_text("#pg-status", |t| t == "Ready.").await;
        page.find("#pg-adapter")
            .await
            .select_by_value("poet")
            .await
            .expect("choose adapter");
        page.fill("#pg-max-tokens", "24").await;
        page.fill("#pg-input", "Once upon a time").await;
        page.click("#pg-send").await;
        let status = page
            .wait_text("#pg-status", |t| {
                t.starts_with("Finished") || t.starts_with("Error")
            })
            .await;
        assert!(status.starts_with("Finished: length"), "{status}");
        assert!(status.contains("24 completion tokens"), "{status}");
        let output = page.text("#pg-output").await;
        assert!(output.starts_with("Once upon a time"), "{output}");
        assert!(
            output.len() > "Once upon a time".len(),
            "no generated text: {output:?}"
        );
        assert_eq!(page.text("#pg-count").await, "24 tokens");
        assert!(page.text("#pg-rate").await.ends_with("tokens/s"));
        assert!(
            page.find("#pg-send")
                .await
                .is_enabled()
                .await
                .expect("send button state")
        );
        assert!(
            !page
                .find("#pg-stop")
                .await
                .is_enabled()
                .await
                .expect("stop button state")
        );
        // The adapter just served the stream, so the engine holds it in a device slot.
        page.goto(&format!("{base}/console/adapters")).await;
        let list = page.text("#adapter-list").await;
        assert!(list.contains("poet") && list.contains("resident"), "{list}");
    })
    .await;
}

async fn socket_events(port: u16, cookie: &str, origin: &str) -> Vec<Value> {
    let mut request = format!("ws://127.0.0.1:{port}/v1/stream")
        .into_client_request()
        .expect("ws request");
    request.headers_mut().insert(
        "Cookie",
        format!("punica_session={cookie}").parse().unwrap(),
    );
    request
        .headers_mut()
        .insert("Origin", origin.parse().unwrap());
    let (mut socket, _) = tokio_tungstenite::connect_async(request)
        .await
        .expect("ws connect");
    socket
        .send(Message::text(
            json!({"type": "generate", "id": "g", "prompt": "hi", "max_tokens": 3}).to_string(),
        ))
        .await
        .expect("send");
    let mut events = Vec::new();
    while let Ok(Some(Ok(message))) =
        tokio::time::timeout(std::time::Duration::from_secs(10), socket.next()).await
    {
        if let Message::Text(text) = message {
            let event: Value = serde_json::from_str(&text).expect("json event");
            let last = matches!(event["type"].as_str(), Some("done" | "error"));
            events.push(event);
            if last {
                break;
            }
        }
    }
    events
}

#[tokio::test]
async fn the_session_cookie_opens_the_stream_only_from_the_consoles_own_origin() {
    let console = spawn_console_with_model().await;
    let user = tenant_with_user(&console.store, "origin").await;
    let session = HttpSession::login(&console.address, &user.email, USER_PASSWORD).await;

    let own = socket_events(
        console.port,
        &session.cookie,
        &format!("http://127.0.0.1:{}", console.port),
    )
    .await;
    let last = own.last().expect("events");
    assert_eq!(last["type"], "done", "{own:?}");
    assert_eq!(last["usage"]["completion_tokens"], 3);

    let foreign = socket_events(console.port, &session.cookie, "http://127.0.0.1:1").await;
    let last = foreign.last().expect("events");
    assert_eq!(last["type"], "error", "{foreign:?}");
    assert_eq!(last["code"], "unauthorized");
}
