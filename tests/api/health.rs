use punica::startup::ModelState;

use crate::helpers::spawn_app;

#[tokio::test]
async fn healthz_answers_ok() {
    let app = spawn_app().await;
    let res = app.get("/healthz").await;
    assert_eq!(res.status(), 200);
    let body: serde_json::Value = res.json().await.unwrap();
    assert_eq!(body["status"], "ok");
}

#[tokio::test]
async fn readyz_is_ready_without_a_model_and_follows_the_model_state() {
    let app = spawn_app().await;
    let res = app.get("/readyz").await;
    assert_eq!(res.status(), 200);
    let body: serde_json::Value = res.json().await.unwrap();
    assert_eq!(body["database"], "ok");
    assert_eq!(body["model"], "not_configured");

    app.readiness.set_model(ModelState::Loading);
    let res = app.get("/readyz").await;
    assert_eq!(res.status(), 503);
    let body: serde_json::Value = res.json().await.unwrap();
    assert_eq!(body["model"], "loading");

    app.readiness.set_model(ModelState::Loaded);
    assert_eq!(app.get("/readyz").await.status(), 200);

    app.readiness
        .set_model(ModelState::Failed("bad weights".into()));
    assert_eq!(app.get("/readyz").await.status(), 503);
}

#[tokio::test]
async fn readyz_reports_the_database_when_it_is_gone() {
    let app = spawn_app().await;
    app.store.close().await;
    let res = app.get("/readyz").await;
    assert_eq!(res.status(), 503);
    let body: serde_json::Value = res.json().await.unwrap();
    assert_ne!(body["database"], "ok");
}

#[tokio::test]
async fn metrics_count_requests_by_route_pattern_and_status() {
    let app = spawn_app().await;
    for _ in 0..3 {
        assert_eq!(app.get("/healthz").await.status(), 200);
    }
    assert_eq!(app.get("/no/such/route").await.status(), 404);
    let res = app.get("/metrics").await;
    assert_eq!(res.status(), 200);
    assert!(
        res.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/plain")
    );
    let text = res.text().await.unwrap();
    assert!(
        text.contains(
            r#"punica_http_requests_total{method="GET",route="/healthz",status="200"} 3"#
        ),
        "{text}"
    );
    assert!(
        text.contains(
            r#"punica_http_requests_total{method="GET",route="unmatched",status="404"} 1"#
        ),
        "{text}"
    );
    assert!(text.contains(
        r#"punica_http_request_duration_seconds_count{method="GET",route="/healthz"} 3"#
    ));
}
