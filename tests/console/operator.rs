//! Operator pages: create a tenant, set its quotas, create its user and a key; the user logs in.

use crate::browser::with_browser;
use crate::support::{
    HttpSession, OPERATOR_EMAIL, OPERATOR_PASSWORD, USER_PASSWORD, browser_login, spawn_console,
    tenant_with_user,
};

#[tokio::test]
async fn operator_creates_a_tenant_with_quotas_and_a_user_who_then_logs_in() {
    let console = spawn_console().await;
    let base = console.address.clone();
    with_browser("operator_creates_tenant_and_user", |page| async move {
        browser_login(&page, &base, OPERATOR_EMAIL, OPERATOR_PASSWORD).await;
        assert_eq!(page.path().await, "/console/tenants");

        page.fill("#tenant-name", "acme").await;
        page.click("#create-tenant button[type=submit]").await;
        page.wait_text("#tenant-name", |t| t == "acme").await;
        assert!(page.path().await.starts_with("/console/tenants/"));

        let tenant_page = page.client.current_url().await.expect("url").to_string();
        page.fill("#quota-max_adapters", "3").await;
        page.fill("#quota-tokens_per_day", "100000").await;
        page.click("#quota-form button[type=submit]").await;
        page.wait_text("[role=status]", |t| t.contains("Quotas saved"))
            .await;
        assert_eq!(
            page.find("#quota-max_adapters")
                .await
                .prop("value")
                .await
                .unwrap()
                .as_deref(),
            Some("3")
        );

        page.fill("#user-email", "dev@acme.example").await;
        page.fill("#user-password", USER_PASSWORD).await;
        page.click("#create-user button[type=submit]").await;
        page.wait_text("#user-list", |t| t.contains("dev@acme.example"))
            .await;

        page.fill("#key-label", "ci").await;
        page.click("#create-key button[type=submit]").await;
        let key = page
            .wait_text("#new-key-value", |t| t.starts_with("pun_"))
            .await;
        assert!(page.text("#key-list").await.contains("ci"));
        // Shown once: a reload of the page does not show it again.
        page.goto(&tenant_page).await;
        assert!(!page.source().await.contains(&key));

        page.click(".whoami button").await;
        page.find("#login-title").await;
        browser_login(&page, &base, "dev@acme.example", USER_PASSWORD).await;
        assert_eq!(page.path().await, "/console/adapters");
        assert!(
            page.text(".whoami")
                .await
                .contains("dev@acme.example (acme)")
        );
    })
    .await;
}

#[tokio::test]
async fn operator_pages_are_not_found_for_tenant_users() {
    let console = spawn_console().await;
    let user = tenant_with_user(&console.store, "tenant-a").await;
    let session = HttpSession::login(&console.address, &user.email, USER_PASSWORD).await;
    assert_eq!(session.get("/console/tenants").await.status(), 404);
    assert_eq!(
        session
            .get(&format!("/console/tenants/{}", user.tenant_id))
            .await
            .status(),
        404
    );
}

#[tokio::test]
async fn quota_form_rejects_values_that_are_not_whole_numbers() {
    let console = spawn_console().await;
    let user = tenant_with_user(&console.store, "tenant-q").await;
    let session = HttpSession::login(&console.address, OPERATOR_EMAIL, OPERATOR_PASSWORD).await;
    let path = format!("/console/tenants/{}", user.tenant_id);
    let csrf = session.csrf(&path).await;
    let response = session
        .post(
            &format!("{path}/quotas"),
            &[
                ("csrf", &csrf),
                ("max_adapters", "-2"),
                ("tokens_per_day", ""),
            ],
        )
        .await;
    assert_eq!(response.status(), 422);
    assert!(
        response
            .text()
            .await
            .unwrap()
            .contains("max_adapters must be a whole number")
    );
}
