//! Walks the main pages with realistic data and saves a screenshot of each, on a laptop-sized
//! and a phone-sized window, checking each page's heading on the way. The images land in
//! `target/console-screenshots/pages/`; with `PUNICA_DOCS_SCREENSHOTS=1` they also replace the
//! ones in `docs/console/` that the README shows.

use std::path::PathBuf;

use crate::browser::{Page, screenshot_dir, with_browser};
use crate::support::{
    OPERATOR_EMAIL, OPERATOR_PASSWORD, USER_PASSWORD, browser_login, spawn_console,
    tenant_with_user,
};
use crate::tiny_model::adapter;

async fn shoot(page: &Page, name: &str) {
    let path = screenshot_dir().join("pages").join(format!("{name}.png"));
    page.screenshot_to(&path).await;
    assert!(path.exists(), "screenshot {name} was not written");
    if std::env::var_os("PUNICA_DOCS_SCREENSHOTS").is_some() {
        let docs = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("docs/console");
        std::fs::create_dir_all(&docs).expect("docs dir");
        std::fs::copy(&path, docs.join(format!("{name}.png"))).expect("copy screenshot");
    }
}

#[tokio::test]
async fn main_pages_render_on_laptop_and_phone_screens() {
    let console = spawn_console().await;
    let user = tenant_with_user(&console.store, "acme").await;
    let tenant_id = user.tenant_id.clone();
    let (_, key) = console
        .store
        .create_api_key(tenant_id.parse().unwrap(), "ci")
        .await
        .unwrap();
    for (name, rank, seed) in [
        ("legal-v2", 8, 1),
        ("support-bot", 4, 2),
        ("sql-helper", 16, 3),
    ] {
        console
            .upload_ok(key.expose(), name, &adapter(rank, seed))
            .await;
    }
    // Some traffic for the usage chart.
    let mut ws = console.ws(Some(key.expose())).await;
    for (i, adapter_name) in ["legal-v2", "support-bot", "legal-v2", "sql-helper"]
        .iter()
        .enumerate()
    {
        let id = format!("r{i}");
        ws.send(
            serde_json::json!({"type": "generate", "id": id, "adapter": adapter_name,
            "prompt": "Hello there", "max_tokens": 16 + 8 * i}),
        )
        .await;
        ws.collect(&id).await;
    }
    let base = console.address.clone();
    with_browser("page_screenshots", |page| async move {
        page.client
            .set_window_size(1280, 900)
            .await
            .expect("laptop size");
        page.goto(&format!("{base}/console/login")).await;
        assert_eq!(page.text("h1").await, "Sign in");
        shoot(&page, "login").await;

        browser_login(&page, &base, OPERATOR_EMAIL, OPERATOR_PASSWORD).await;
        assert_eq!(page.text("h1").await, "Tenants");
        shoot(&page, "operator-tenants").await;
        page.goto(&format!("{base}/console/tenants/{tenant_id}"))
            .await;
        assert_eq!(page.text("h1").await, "Tenant acme");
        shoot(&page, "operator-tenant").await;
        page.click(".whoami button").await;
        page.find("#login-title").await;

        browser_login(&page, &base, &user.email, USER_PASSWORD).await;
        assert_eq!(page.text("h1").await, "Adapters");
        shoot(&page, "adapters").await;
        page.goto(&format!("{base}/console/adapters/legal-v2"))
            .await;
        shoot(&page, "adapter-detail").await;
        page.goto(&format!("{base}/console/usage")).await;
        assert_eq!(page.text("h1").await, "Usage and quotas");
        page.find("#usage-chart rect").await;
        shoot(&page, "usage").await;
        page.goto(&format!("{base}/console/playground")).await;
        page.find("#pg-adapter")
            .await
            .select_by_value("legal-v2")
            .await
            .expect("adapter");
        page.fill("#pg-max-tokens", "48").await;
        page.fill("#pg-input", "Summarise the contract in one line:")
            .await;
        page.click("#pg-send").await;
        page.wait_text("#pg-status", |t| t.starts_with("Finished"))
            .await;
        shoot(&page, "playground").await;

        page.client
            .set_window_size(390, 844)
            .await
            .expect("phone size");
        page.goto(&format!("{base}/console/adapters")).await;
        // Nothing may overflow the phone's width except inside scrollable tables.
        let overflow = page
            .client
            .execute(
                "return document.documentElement.scrollWidth > window.innerWidth + 1;",
                vec![],
            )
            .await
            .expect("measure");
        assert_eq!(
            overflow,
            serde_json::Value::Bool(false),
            "the page scrolls sideways on a phone"
        );
        shoot(&page, "adapters-phone").await;
    })
    .await;
}
