//! API keys in the tenant console: created and shown once, revoked with immediate effect.

use crate::browser::with_browser;
use crate::support::{USER_PASSWORD, browser_login, spawn_console, tenant_with_user};

#[tokio::test]
async fn a_key_created_in_the_console_works_until_it_is_revoked_there() {
    let console = spawn_console().await;
    let user = tenant_with_user(&console.store, "keyholder").await;
    let base = console.address.clone();
    let api = reqwest::Client::new();
    with_browser("create_and_revoke_key", |page| async move {
        browser_login(&page, &base, &user.email, USER_PASSWORD).await;
        page.click("a[href='/console/keys']").await;
        page.fill("#key-label", "laptop").await;
        page.click("#create-key button[type=submit]").await;
        let key = page
            .wait_text("#new-key-value", |t| t.starts_with("pun_"))
            .await;

        let list = |key: String| {
            let api = api.clone();
            let url = format!("{base}/api/v1/adapters");
            async move {
                api.get(url)
                    .bearer_auth(key)
                    .send()
                    .await
                    .expect("api call")
                    .status()
            }
        };
        assert_eq!(list(key.clone()).await, 200);

        page.click("#key-list button.danger").await;
        page.wait_text("#key-list", |t| t.contains("revoked")).await;
        page.wait_text("[role=status]", |t| t.contains("Key revoked"))
            .await;
        assert_eq!(list(key).await, 401);
    })
    .await;
}
