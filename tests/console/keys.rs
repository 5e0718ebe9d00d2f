//! API keys in the tenant console: created and shown once, revoked with immediate effect.

use punica::domain::ApiKey;

use crate::browser::with_browser;
use crate::support::{USER_PASSWORD, browser_login, spawn_console, tenant_with_user};

#[tokio::test]
async fn a_key_created_in_the_console_works_until_it_is_revoked_there() {
    let console = spawn_console().await;
    let user = tenant_with_user(&console.store, "keyholder").await;
    let base = console.address.clone();
    let store = console.store.clone();
    with_browser("create_and_revoke_key", |page| async move {
        browser_login(&page, &base, &user.email, USER_PASSWORD).await;
        page.click("a[href='/console/keys']").await;
        page.fill("#key-label", "laptop").await;
        page.click("#create-key button[type=submit]").await;
        let shown = page
            .wait_text("#new-key-value", |t| t.starts_with("pun_"))
            .await;
        let key = ApiKey::parse(&shown).expect("the page shows a well-formed key");
        let resolved = store.authenticate_api_key(&key).await.unwrap();
        assert_eq!(
            resolved.map(|k| k.tenant_id.to_string()),
            Some(user.tenant_id.clone())
        );
        assert!(page.text("#key-list").await.contains("laptop"));

        page.click("#key-list button.danger").await;
        page.wait_text("[role=status]", |t| t.contains("Key revoked"))
            .await;
        assert!(page.text("#key-list").await.contains("revoked"));
        assert_eq!(store.authenticate_api_key(&key).await.unwrap(), None);
        // The secret is never shown again.
        assert!(!page.source().await.contains(&shown));
    })
    .await;
}
