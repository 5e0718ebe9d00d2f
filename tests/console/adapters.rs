//! Tenant adapter pages: upload with progress, validation errors inline, versions, delete, and
//! isolation between tenants.

use std::path::Path;

use crate::browser::with_browser;
use crate::support::{HttpSession, USER_PASSWORD, browser_login, spawn_console, tenant_with_user};
use crate::tiny_model::{AdapterFiles, adapter, adapter_with};

fn write_adapter(dir: &Path, files: &AdapterFiles) {
    std::fs::create_dir_all(dir).expect("adapter dir");
    std::fs::write(dir.join("adapter_config.json"), &files.config).expect("config");
    std::fs::write(dir.join("adapter_model.safetensors"), &files.weights).expect("weights");
}

async fn api_key(console: &crate::support::Console, tenant_id: &str) -> String {
    let (_, key) = console
        .store
        .create_api_key(tenant_id.parse().expect("tenant id"), "test")
        .await
        .expect("create key");
    key.expose().to_owned()
}

#[tokio::test]
async fn uploading_an_adapter_shows_progress_and_then_the_adapter_in_the_list() {
    let console = spawn_console().await;
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
            .prop("value")
            .await
            .unwrap();
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
    let console = spawn_console().await;
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
async fn adapter_detail_lists_versions_and_delete_needs_confirmation() {
    let console = spawn_console().await;
    let user = tenant_with_user(&console.store, "versions").await;
    let key = api_key(&console, &user.tenant_id).await;
    console.upload_ok(&key, "legal", &adapter(4, 1)).await;
    console.upload_ok(&key, "legal", &adapter(8, 2)).await;
    let base = console.address.clone();
    with_browser("adapter_versions_and_delete", |page| async move {
        browser_login(&page, &base, &user.email, USER_PASSWORD).await;
        page.click("a[href='/console/adapters/legal']").await;
        page.wait_text("#adapter-title", |t| t == "legal").await;
        let versions = page.text("#version-list").await;
        assert!(
            versions.contains('2') && versions.contains('1'),
            "{versions}"
        );
        page.click("#delete-link").await;
        page.find("#confirm-delete").await;
        // The confirmation page alone deletes nothing.
        page.goto(&format!("{base}/console/adapters")).await;
        assert!(page.text("#adapter-list").await.contains("legal"));
        page.goto(&format!("{base}/console/adapters/legal/delete"))
            .await;
        page.click("#confirm-delete").await;
        page.wait_text("#adapter-list", |t| t.contains("No adapters yet"))
            .await;
    })
    .await;
}

#[tokio::test]
async fn another_tenants_adapter_and_key_urls_are_not_found() {
    let console = spawn_console().await;
    let alice = tenant_with_user(&console.store, "alice").await;
    let bob = tenant_with_user(&console.store, "bob").await;
    let bob_key = api_key(&console, &bob.tenant_id).await;
    console
        .upload_ok(&bob_key, "bobs-secret", &adapter(4, 5))
        .await;
    let bob_key_id = console
        .store
        .list_api_keys(bob.tenant_id.parse().unwrap())
        .await
        .unwrap()[0]
        .id
        .to_string();

    let session = HttpSession::login(&console.address, &alice.email, USER_PASSWORD).await;
    for path in [
        "/console/adapters/bobs-secret",
        "/console/adapters/bobs-secret/delete",
        &format!("/console/tenants/{}", bob.tenant_id),
    ] {
        assert_eq!(session.get(path).await.status(), 404, "{path}");
    }
    let csrf = session.csrf("/console/keys").await;
    let revoke = session
        .post(
            &format!("/console/keys/{bob_key_id}/revoke"),
            &[("csrf", &csrf)],
        )
        .await;
    assert_eq!(revoke.status(), 404);
    let delete = session
        .post("/console/adapters/bobs-secret/delete", &[("csrf", &csrf)])
        .await;
    assert_eq!(delete.status(), 404);
    // Bob's things are untouched.
    let list = console
        .store
        .list_api_keys(bob.tenant_id.parse().unwrap())
        .await
        .unwrap();
    assert!(list[0].revoked_at.is_none());
    assert!(
        console
            .store
            .get_adapter(
                bob.tenant_id.parse().unwrap(),
                &punica::domain::AdapterName::parse("bobs-secret").unwrap()
            )
            .await
            .is_ok()
    );

    with_browser("cross_tenant_404", |page| async move {
        browser_login(&page, &console.address, &alice.email, USER_PASSWORD).await;
        page.goto(&format!("{}/console/adapters/bobs-secret", console.address))
            .await;
        assert_eq!(page.text("h1").await, "Not found");
    })
    .await;
}
