//! Uploading adapters from the console: real progress, the new adapter appearing in the list,
//! and the service's validation error shown inline.

use std::path::Path;

use crate::browser::with_browser;
use crate::support::{USER_PASSWORD, browser_login, spawn_console_with_model, tenant_with_user};
use crate::tiny_model::{AdapterFiles, adapter, adapter_with};

fn write_adapter(dir: &Path, files: &AdapterFiles) {
    std::fs::create_dir_all(dir).expect("adapter dir");
    std::fs::write(dir.join("adapter_config.json"), &files.config).expect("config");
    std::fs::write(dir.join("adapter_model.safetensors"), &files.weights).expect("weights");
}

#[tokio::test]
async fn uploading_an_adapter_shows_progress_and_then_the_adapter_in_the_list() {
    let console = spawn_console_with_model().await;
    let user = tenant_with_user(&console.store, "uploader").await;
    let files = tempfile::tempdir().expect("tmp");
    write_adapter(files.path(), &adapter(4, 11));
    let base = console.address.clone();
    let dir = files.path().to_owned();
    with_browser("upload_adapter", |page| async move {
        browser_login(&page, &base, &user.email, USER_PASSWORD).await;
        assert!(page.text("#adapter-list").await.contains("No adapters yet"));
        page.fill("#adapter-name", "support-bot").await;
        page.find("#adapter-config")
            .await
            .send_keys(&dir.join("adapter_config.json").display().to_string())
            .await
            .expect("choose config");
        page.find("#adapter-weights")
            .await
            .send_keys(&dir.join("adapter_model.safetensors").display().to_string())
            .await
            .expect("choose weights");
        page.click("#upload-form button[type=submit]").await;
        page.wait_text("#upload-ok", |t| {
            t.contains("Uploaded support-bot version 1")
        })
        .await;
        let progress = page
            .find("#upload-progress")
            .await
            // <progress>'s `value` property reflects its content attribute, which WebDriver
            // returns as a string (the property itself is a number).
            .attr("value")
            .await
            .expect("progress value");
        assert_eq!(progress.as_deref(), Some("100"));
        let row = page
            .wait_text("#adapter-list", |t| t.contains("support-bot"))
            .await;
        assert!(row.contains("q_proj, v_proj"), "{row}");
        assert!(row.contains("ready"), "{row}");
    })
    .await;
}

#[tokio::test]
async fn uploading_a_broken_adapter_shows_the_servers_reason_inline() {
    let console = spawn_console_with_model().await;
    let user = tenant_with_user(&console.store, "breaker").await;
    let files = tempfile::tempdir().expect("tmp");
    // The config says rank 8, the tensors have rank 4.
    write_adapter(files.path(), &adapter_with(8, 4, 3, &["q_proj", "v_proj"]));
    let base = console.address.clone();
    let dir = files.path().to_owned();
    with_browser("upload_broken_adapter", |page| async move {
        browser_login(&page, &base, &user.email, USER_PASSWORD).await;
        page.fill("#adapter-name", "broken").await;
        page.find("#adapter-config")
            .await
            .send_keys(&dir.join("adapter_config.json").display().to_string())
            .await
            .expect("choose config");
        page.find("#adapter-weights")
            .await
            .send_keys(&dir.join("adapter_model.safetensors").display().to_string())
            .await
            .expect("choose weights");
        page.click("#upload-form button[type=submit]").await;
        let error = page.wait_text("#upload-error", |t| !t.is_empty()).await;
        assert!(
            error.contains("rank"),
            "the reason should name the rank problem: {error}"
        );
        assert!(!page.text("#adapter-list").await.contains("broken"));
    })
    .await;
}

#[tokio::test]
async fn an_upload_without_the_csrf_token_is_refused() {
    let console = spawn_console_with_model().await;
    let user = tenant_with_user(&console.store, "forger").await;
    let session =
        crate::support::HttpSession::login(&console.address, &user.email, USER_PASSWORD).await;
    let files = adapter(4, 1);
    let form = reqwest::multipart::Form::new()
        .text("name", "forged")
        .part(
            "adapter_config.json",
            reqwest::multipart::Part::bytes(files.config).file_name("adapter_config.json"),
        )
        .part(
            "adapter_model.safetensors",
            reqwest::multipart::Part::bytes(files.weights).file_name("adapter_model.safetensors"),
        );
    let response = session
        .client
        .post(format!("{}/console/adapters", console.address))
        .header("Cookie", format!("punica_session={}", session.cookie))
        .header("Accept", "application/json")
        .multipart(form)
        .send()
        .await
        .expect("upload");
    assert_eq!(response.status(), 403);
    assert!(
        console
            .store
            .list_adapters(user.tenant_id.parse().unwrap())
            .await
            .unwrap()
            .is_empty()
    );
}
