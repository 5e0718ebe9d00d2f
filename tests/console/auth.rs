//! Logging in and out: cookies, the same answer for unknown users, the throttle, CSRF.

use std::time::{Duration, Instant};

use crate::browser::with_browser;
use crate::support::FormBody;
use crate::support::{
    HttpSession, OPERATOR_EMAIL, OPERATOR_PASSWORD, location, post_login, set_cookie, spawn_console,
};

#[tokio::test]
async fn login_sets_an_http_only_strict_session_cookie_and_logout_ends_the_session() {
    let console = spawn_console().await;
    let response = post_login(&console.address, OPERATOR_EMAIL, OPERATOR_PASSWORD).await;
    assert_eq!(response.status(), 303);
    assert_eq!(location(&response), "/console/tenants");
    let cookie = set_cookie(&response, "punica_session").expect("session cookie");
    assert!(cookie.contains("HttpOnly"), "{cookie}");
    assert!(cookie.contains("SameSite=Strict"), "{cookie}");
    assert!(cookie.contains("Path=/"), "{cookie}");
    assert!(
        !cookie.contains("Secure"),
        "plain HTTP must not set Secure: {cookie}"
    );

    let session = HttpSession::login(&console.address, OPERATOR_EMAIL, OPERATOR_PASSWORD).await;
    assert_eq!(session.get("/console/tenants").await.status(), 200);
    let csrf = session.csrf("/console/tenants").await;
    let out = session.post("/console/logout", &[("csrf", &csrf)]).await;
    assert_eq!(out.status(), 303);
    // The row is gone: the same cookie no longer opens anything.
    let after = session.get("/console/tenants").await;
    assert_eq!(after.status(), 303);
    assert!(location(&after).starts_with("/console/login"));
}

#[tokio::test]
async fn session_cookie_is_secure_behind_a_tls_terminating_proxy() {
    let console = spawn_console().await;
    let (csrf, cookie) = crate::support::login_form(&console.address).await;
    let response = crate::support::plain_client()
        .post(format!("{}/console/login", console.address))
        .header("Cookie", format!("punica_login_csrf={cookie}"))
        .header("X-Forwarded-Proto", "https")
        .form_fields(&[
            ("email", OPERATOR_EMAIL),
            ("password", OPERATOR_PASSWORD),
            ("csrf", csrf.as_str()),
        ])
        .send()
        .await
        .expect("login");
    assert_eq!(response.status(), 303);
    let cookie = set_cookie(&response, "punica_session").expect("session cookie");
    assert!(cookie.contains("Secure"), "{cookie}");
}

#[tokio::test]
async fn pages_redirect_to_login_without_a_session_and_back_after_it() {
    let console = spawn_console().await;
    let response = crate::support::plain_client()
        .get(format!("{}/console/tenants", console.address))
        .send()
        .await
        .expect("get");
    assert_eq!(response.status(), 303);
    assert_eq!(location(&response), "/console/login?next=/console/tenants");
}

#[tokio::test]
async fn wrong_and_unknown_credentials_get_the_same_answer_in_similar_time() {
    let console = spawn_console().await;
    let mut known = Vec::new();
    let mut unknown = Vec::new();
    // Alternate so that machine load affects both alike; each email stays under the throttle.
    for i in 0..4 {
        let started = Instant::now();
        let r = post_login(
            &console.address,
            OPERATOR_EMAIL,
            &format!("wrong-password-{i}"),
        )
        .await;
        known.push(started.elapsed());
        assert_eq!(r.status(), 401);
        let body = r.text().await.expect("body");
        assert!(body.contains("The email or password is not correct."));

        let started = Instant::now();
        let r = post_login(
            &console.address,
            &format!("nobody{i}@example.com"),
            "whatever-password",
        )
        .await;
        unknown.push(started.elapsed());
        assert_eq!(r.status(), 401);
        assert!(
            r.text()
                .await
                .expect("body")
                .contains("The email or password is not correct.")
        );
    }
    known.sort();
    unknown.sort();
    let (k, u) = (known[known.len() / 2], unknown[unknown.len() / 2]);
    // Without the dummy verification an unknown email answers in a fraction of a millisecond
    // while argon2id takes tens of milliseconds; with it both take about the same.
    assert!(
        u > k / 3 && u < k * 3,
        "median failure time: known email {k:?}, unknown email {u:?}"
    );
    assert!(
        k > Duration::from_millis(5),
        "argon2id verification seems skipped: {k:?}"
    );
}

#[tokio::test]
async fn repeated_failed_logins_are_throttled_even_with_the_right_password() {
    let console = spawn_console().await;
    for i in 0..5 {
        let r = post_login(
            &console.address,
            OPERATOR_EMAIL,
            &format!("bad-password-{i}"),
        )
        .await;
        assert_eq!(r.status(), 401);
    }
    let r = post_login(&console.address, OPERATOR_EMAIL, OPERATOR_PASSWORD).await;
    assert_eq!(r.status(), 429);
    assert!(set_cookie(&r, "punica_session").is_none());
    assert!(
        r.text()
            .await
            .expect("body")
            .contains("Too many failed sign-in attempts")
    );
}

#[tokio::test]
async fn login_without_its_csrf_cookie_is_refused() {
    let console = spawn_console().await;
    let (csrf, _cookie) = crate::support::login_form(&console.address).await;
    let response = crate::support::plain_client()
        .post(format!("{}/console/login", console.address))
        .form_fields(&[
            ("email", OPERATOR_EMAIL),
            ("password", OPERATOR_PASSWORD),
            ("csrf", csrf.as_str()),
        ])
        .send()
        .await
        .expect("login");
    assert_eq!(response.status(), 403);
}

#[tokio::test]
async fn a_form_posted_without_its_csrf_token_is_refused_in_the_browser() {
    let console = spawn_console().await;
    let base = console.address.clone();
    with_browser("csrf_refused", |page| async move {
        crate::support::browser_login(&page, &base, OPERATOR_EMAIL, OPERATOR_PASSWORD).await;
        page.goto(&format!("{base}/console/tenants")).await;
        page.fill("#tenant-name", "sneaky").await;
        // A forged form: the same fields, no token.
        page.client
            .execute(
                "document.querySelector('#create-tenant input[name=csrf]').remove();",
                vec![],
            )
            .await
            .expect("remove token");
        page.click("#create-tenant button[type=submit]").await;
        let heading = page.wait_text("h1", |t| t == "Form expired").await;
        assert_eq!(heading, "Form expired");
    })
    .await;
    assert!(
        console
            .store
            .get_tenant_by_name(&punica::domain::TenantName::parse("sneaky").unwrap())
            .await
            .is_err(),
        "the refused form must not create the tenant"
    );
    let session = HttpSession::login(&console.address, OPERATOR_EMAIL, OPERATOR_PASSWORD).await;
    let wrong = session
        .post(
            "/console/tenants",
            &[("name", "sneaky"), ("csrf", "not-the-token")],
        )
        .await;
    assert_eq!(wrong.status(), 403);
}
