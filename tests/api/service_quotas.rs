//! Quotas under load: concurrency and token limits hold exactly with 50 parallel requests;
//! usage and per-tenant metrics follow what ran.

use std::time::Duration;

use futures_util::future::join_all;
use reqwest::Method;
use serde_json::{Value, json};

use punica::domain::TenantId;
use punica::store::Store;

use crate::service_helpers::{MODEL_ID, Service, spawn_service};

/// Waits out the end of a UTC minute so a test's token window cannot roll over mid-test.
async fn away_from_a_minute_boundary() {
    let second = time::OffsetDateTime::now_utc().second();
    if second >= 45 {
        tokio::time::sleep(Duration::from_secs(u64::from(61 - second))).await;
    }
}

async fn completion(app: &Service, key: &str, max_tokens: u32) -> (u16, Value, Option<String>) {
    let response = app
        .tenant(Method::POST, "/v1/completions", key)
        .json(&json!({"model": MODEL_ID, "prompt": "abcd", "max_tokens": max_tokens, "temperature": 0}))
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    let retry_after = response
        .headers()
        .get("retry-after")
        .map(|v| v.to_str().unwrap().to_owned());
    (status, response.json().await.unwrap(), retry_after)
}

#[tokio::test]
async fn the_concurrency_quota_holds_exactly_under_50_parallel_requests() {
    let app = spawn_service().await;
    let tenant = app
        .create_tenant("acme", json!({"max_concurrent_streams": 5}))
        .await;
    // Five streams running on another replica that shares the database hold the five permits
    // (leases taken straight through the store, so no generation can end early and free one).
    let store = Store::new(app.db_pool.clone());
    let tenant_id: TenantId = tenant.id.parse().unwrap();
    let mut holders = Vec::new();
    for _ in 0..5 {
        holders.push(
            store
                .acquire_stream_lease(tenant_id, Duration::from_secs(60))
                .await
                .unwrap(),
        );
    }
    assert_eq!(app.leases(&tenant.id).await, 5);
    // Fifty more at once: every one is refused while the five run.
    let results = join_all((0..50).map(|_| completion(&app, &tenant.key, 1))).await;
    for (status, body, retry_after) in &results {
        assert_eq!(*status, 429, "{body}");
        assert_eq!(body["error"]["code"], "rate_limited");
        assert!(retry_after.is_some());
    }
    assert_eq!(app.leases(&tenant.id).await, 5);
    for lease in holders {
        store.release_stream_lease(tenant_id, lease).await.unwrap();
    }
    app.eventually("all permits are back", || async {
        app.leases(&tenant.id).await == 0
    })
    .await;

    // From idle, fifty at once: at least the quota runs, and a watcher polling the leases
    // never sees more than five held.
    let pool = app.db_pool.clone();
    let tenant_id = tenant.id.clone();
    let (stop_tx, mut stop_rx) = tokio::sync::oneshot::channel::<()>();
    let watcher = tokio::spawn(async move {
        let mut peak = 0i64;
        loop {
            let held: i64 =
                sqlx::query_scalar("SELECT count(*) FROM stream_leases WHERE tenant_id = $1::uuid")
                    .bind(&tenant_id)
                    .fetch_one(&pool)
                    .await
                    .unwrap();
            peak = peak.max(held);
            if stop_rx.try_recv().is_ok() {
                return peak;
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    });
    let results = join_all((0..50).map(|_| completion(&app, &tenant.key, 40))).await;
    let _ = stop_tx.send(());
    let peak = watcher.await.unwrap();
    let admitted = results.iter().filter(|(s, _, _)| *s == 200).count();
    let refused = results.iter().filter(|(s, _, _)| *s == 429).count();
    assert_eq!(admitted + refused, 50);
    assert!(admitted >= 5, "at least the quota is admitted: {admitted}");
    assert!((1..=5).contains(&peak), "peak of {peak} concurrent streams");
    app.eventually("every admitted request is in the ledger", || async {
        app.ledger(&tenant.id)
            .await
            .iter()
            .filter(|r| r.0 == "length")
            .count()
            == admitted
    })
    .await;
}

#[tokio::test]
async fn the_token_quota_holds_exactly_under_50_parallel_requests() {
    away_from_a_minute_boundary().await;
    let app = spawn_service().await;
    // Each request reserves 4 prompt + 6 completion = 10 tokens and uses all of them
    // (greedy generations of the tiny model never stop early).
    let tenant = app
        .create_tenant("acme", json!({"tokens_per_minute": 125}))
        .await;
    let results = join_all((0..50).map(|_| completion(&app, &tenant.key, 6))).await;
    let admitted: Vec<&Value> = results
        .iter()
        .filter(|(s, _, _)| *s == 200)
        .map(|(_, body, _)| body)
        .collect();
    assert_eq!(
        admitted.len(),
        12,
        "floor(125 / 10) requests fit the minute"
    );
    for (status, body, retry_after) in results.iter().filter(|(s, _, _)| *s != 200) {
        assert_eq!(*status, 429);
        assert_eq!(body["error"]["code"], "rate_limited");
        let wait: u64 = retry_after.as_ref().unwrap().parse().unwrap();
        assert!((1..=60).contains(&wait));
    }
    let used: u64 = admitted
        .iter()
        .map(|b| b["usage"]["total_tokens"].as_u64().unwrap())
        .sum();
    assert_eq!(used, 120);
    app.eventually("the twelve requests are in the ledger", || async {
        app.ledger(&tenant.id).await.len() == 12
    })
    .await;
}

#[tokio::test]
async fn a_daily_token_quota_is_quota_exceeded_with_retry_after() {
    let app = spawn_service().await;
    let tenant = app
        .create_tenant("acme", json!({"tokens_per_day": 25}))
        .await;
    let (status, _, _) = completion(&app, &tenant.key, 6).await;
    assert_eq!(status, 200);
    let (status, _, _) = completion(&app, &tenant.key, 6).await;
    assert_eq!(status, 200);
    let (status, body, retry_after) = completion(&app, &tenant.key, 6).await;
    assert_eq!(status, 429);
    assert_eq!(body["error"]["code"], "quota_exceeded");
    let wait: u64 = retry_after.unwrap().parse().unwrap();
    assert!((1..=86_400).contains(&wait));
    // A request larger than the whole quota can never pass: said so, without Retry-After.
    let (status, body, retry_after) = completion(&app, &tenant.key, 100).await;
    assert_eq!(status, 429);
    assert_eq!(body["error"]["code"], "quota_exceeded");
    assert!(retry_after.is_none());
    let mut ws = app.ws(Some(&tenant.key)).await;
    ws.send(json!({"type": "generate", "id": "q", "prompt": "abcd", "max_tokens": 6}))
        .await;
    let error = ws.next().await.unwrap();
    assert_eq!(error["code"], "quota_exceeded");
    assert!(error["retry_after"].as_u64().unwrap() >= 1);
}

#[tokio::test]
async fn usage_reports_requests_and_tokens_per_day_and_adapter() {
    let app = spawn_service().await;
    let tenant = app.create_tenant("acme", json!({})).await;
    app.upload_ok(&tenant.key, "style", &crate::tiny_model::adapter(4, 1))
        .await;
    completion(&app, &tenant.key, 3).await;
    completion(&app, &tenant.key, 5).await;
    let response = app
        .tenant(Method::POST, "/v1/completions", &tenant.key)
        .json(&json!({"model": "style", "prompt": "ab", "max_tokens": 2}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let today = time::OffsetDateTime::now_utc().date();
    let report: Value = app
        .tenant(
            Method::GET,
            &format!("/api/v1/usage?from={today}&to={today}"),
            &tenant.key,
        )
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let rows = report["usage"].as_array().unwrap();
    assert_eq!(rows.len(), 2, "{report}");
    assert!(rows[0]["adapter"].is_null());
    assert_eq!(rows[0]["requests"], 2);
    assert_eq!(rows[0]["prompt_tokens"], 8);
    assert_eq!(rows[0]["completion_tokens"], 8);
    assert_eq!(rows[1]["adapter"], "style");
    assert_eq!(rows[1]["completion_tokens"], 2);
    assert_eq!(rows[0]["date"], today.to_string());

    let bad = app
        .tenant(Method::GET, "/api/v1/usage?from=yesterday", &tenant.key)
        .send()
        .await
        .unwrap();
    assert_eq!(bad.status(), 400);
    let operator: Value = app
        .admin(Method::GET, &format!("/api/v1/tenants/{}/usage", tenant.id))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(operator["usage"], report["usage"]);
}

#[tokio::test]
async fn per_tenant_metrics_count_requests_tokens_and_errors() {
    let app = spawn_service().await;
    let tenant = app.create_tenant("metered", json!({})).await;
    completion(&app, &tenant.key, 3).await;
    let missing = app
        .tenant(Method::GET, "/api/v1/adapters/nope", &tenant.key)
        .send()
        .await
        .unwrap();
    assert_eq!(missing.status(), 404);
    let text = app.get("/metrics").await.text().await.unwrap();
    assert!(
        text.contains(r#"punica_tenant_requests_total{adapter="_base",finish_reason="length",tenant="metered"} 1"#),
        "{text}"
    );
    assert!(text.contains(
        r#"punica_tenant_tokens_total{adapter="_base",kind="completion",tenant="metered"} 3"#
    ));
    assert!(
        text.contains(r#"punica_tenant_errors_total{code="adapter_not_found",tenant="metered"} 1"#)
    );
    assert!(text.contains("punica_tenant_time_to_first_token_seconds_bucket"));
}
