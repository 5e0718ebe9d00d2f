//! Tenant adapter pages: list, versions, delete with confirmation, and isolation between
//! tenants.

use crate::browser::with_browser;
use crate::support::{
    HttpSession, USER_PASSWORD, browser_login, insert_adapter, spawn_console, tenant_with_user,
};

#[tokio::test]
async fn adapter_detail_lists_versions_and_delete_needs_confirmation() {
    let console = spawn_console().await;
    let user = tenant_with_user(&console.store, "versions").await;
    insert_adapter(&console.store, &user.tenant_id, "legal", 4).await;
    insert_adapter(&console.store, &user.tenant_id, "legal", 8).await;
    let base = console.address.clone();
    with_browser("adapter_versions_and_delete", |page| async move {
        browser_login(&page, &base, &user.email, USER_PASSWORD).await;
        let row = page.text("#adapter-list tr[data-adapter=legal]").await;
        assert!(row.contains("q_proj, v_proj"), "{row}");
        assert!(row.contains("ready"), "{row}");
        assert!(row.contains("never"), "{row}");
        page.click("a[href='/console/adapters/legal']").await;
        page.wait_text("#adapter-title", |t| t == "legal").await;
        let versions = page.text("#version-list tbody").await;
        let lines: Vec<&str> = versions.lines().collect();
        assert_eq!(lines.len(), 2, "{versions}");
        assert!(lines[0].starts_with("2 8"), "newest first: {versions}");
        assert!(lines[1].starts_with("1 4"), "{versions}");
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
    insert_adapter(&console.store, &bob.tenant_id, "bobs-secret", 4).await;
    let bob_tenant = bob.tenant_id.parse().unwrap();
    let (bob_key, _) = console
        .store
        .create_api_key(bob_tenant, "ci")
        .await
        .unwrap();

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
            &format!("/console/keys/{}/revoke", bob_key.id),
            &[("csrf", &csrf)],
        )
        .await;
    assert_eq!(revoke.status(), 404);
    let delete = session
        .post("/console/adapters/bobs-secret/delete", &[("csrf", &csrf)])
        .await;
    assert_eq!(delete.status(), 404);
    // Bob's things are untouched.
    let keys = console.store.list_api_keys(bob_tenant).await.unwrap();
    assert!(keys[0].revoked_at.is_none());
    let name = punica::domain::AdapterName::parse("bobs-secret").unwrap();
    assert!(console.store.get_adapter(bob_tenant, &name).await.is_ok());

    let base = console.address.clone();
    with_browser("cross_tenant_404", |page| async move {
        browser_login(&page, &base, &alice.email, USER_PASSWORD).await;
        assert!(!page.text("#adapter-list").await.contains("bobs-secret"));
        page.goto(&format!("{base}/console/adapters/bobs-secret"))
            .await;
        assert_eq!(page.text("h1").await, "Not found");
    })
    .await;
}
