//! Walks the main pages with realistic data and saves a screenshot of each, on a laptop-sized
//! and a phone-sized window, checking each page on the way. The images land in
//! `target/console-screenshots/pages/`; with `PUNICA_DOCS_SCREENSHOTS=1` they also replace the
//! ones in `docs/console/` that the README shows.

use std::path::PathBuf;

use punica::domain::AdapterName;
use punica::store::UsageRecord;
use time::{Duration, OffsetDateTime};

use crate::browser::{Page, screenshot_dir, with_browser};
use crate::support::{
    OPERATOR_EMAIL, OPERATOR_PASSWORD, USER_PASSWORD, browser_login, insert_adapter, spawn_console,
    tenant_with_user,
};

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
    let tenant = tenant_id.parse().unwrap();
    console.store.create_api_key(tenant, "ci").await.unwrap();
    console
        .store
        .create_api_key(tenant, "staging")
        .await
        .unwrap();
    // Two weeks of ledger rows for the usage chart.
    let now = OffsetDateTime::now_utc();
    for (name, rank, daily) in [
        ("legal-v2", 8, 900),
        ("support-bot", 4, 500),
        ("sql-helper", 16, 250),
    ] {
        insert_adapter(&console.store, &tenant_id, name, rank).await;
        let version = console
            .store
            .get_adapter(tenant, &AdapterName::parse(name).unwrap())
            .await
            .unwrap();
        for day in 0..14i64 {
            let at = now - Duration::days(day);
            let completion = daily + (day as u32 * 37 + rank * 11) % 400;
            console
                .store
                .record_usage(&UsageRecord {
                    tenant_id: tenant,
                    adapter_version_id: Some(version.id),
                    request_id: format!("{name}-{day}"),
                    prompt_tokens: completion / 3,
                    completion_tokens: completion,
                    started_at: at - Duration::seconds(2),
                    finished_at: at,
                    finish_reason: "length".into(),
                })
                .await
                .unwrap();
        }
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
        assert!(page.text("#tenant-list").await.contains("acme"));
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
        let bars = page
            .client
            .find_all(fantoccini::Locator::Css("#usage-chart rect"))
            .await
            .expect("bars");
        assert_eq!(bars.len(), 3 * 14, "one bar segment per adapter and day");
        shoot(&page, "usage").await;
        page.goto(&format!("{base}/console/keys")).await;
        shoot(&page, "keys").await;

        page.client
            .set_window_size(390, 844)
            .await
            .expect("phone size");
        for path in ["/console/adapters", "/console/usage", "/console/keys"] {
            page.goto(&format!("{base}{path}")).await;
            // Nothing may overflow the phone's width except inside scrollable tables.
            let overflow = page
                .client
                .execute(
                    "if (document.documentElement.scrollWidth <= window.innerWidth + 1) return []; \
                     return Array.from(document.querySelectorAll('body *')) \
                       .filter(e => e.getBoundingClientRect().right > window.innerWidth + 1 \
                                 && !e.closest('.table-wrap')) \
                       .map(e => e.tagName + (e.id ? '#' + e.id : '') + '.' + e.className);",
                    vec![],
                )
                .await
                .expect("measure");
            assert_eq!(
                overflow,
                serde_json::json!([]),
                "{path} scrolls sideways on a phone because of these elements"
            );
        }
        page.goto(&format!("{base}/console/adapters")).await;
        shoot(&page, "adapters-phone").await;
    })
    .await;
}
