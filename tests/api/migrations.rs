use std::time::Duration;

use punica::store::{MIGRATOR, Store};

use crate::helpers::fresh_database;

#[tokio::test]
async fn migrations_apply_to_an_empty_database_and_are_idempotent() {
    let db = fresh_database().await;
    let store = Store::connect(db.options, Duration::from_secs(30))
        .await
        .unwrap();

    let tables_before: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM information_schema.tables WHERE table_schema = 'public'",
    )
    .fetch_one(store.pool())
    .await
    .unwrap();
    assert_eq!(tables_before, 0, "the database starts empty");

    store.migrate().await.unwrap();
    store.migrate().await.unwrap();

    let mut tables: Vec<String> = sqlx::query_scalar(
        "SELECT table_name::text FROM information_schema.tables \
         WHERE table_schema = 'public' AND table_name <> '_sqlx_migrations'",
    )
    .fetch_all(store.pool())
    .await
    .unwrap();
    tables.sort();
    for expected in [
        "adapter_versions",
        "adapters",
        "api_keys",
        "operators",
        "stream_leases",
        "tenant_users",
        "tenants",
        "token_windows",
        "usage_events",
    ] {
        assert!(
            tables.iter().any(|t| t == expected),
            "missing {expected}: {tables:?}"
        );
    }

    let applied: i64 = sqlx::query_scalar("SELECT count(*) FROM _sqlx_migrations WHERE success")
        .fetch_one(store.pool())
        .await
        .unwrap();
    assert_eq!(applied, MIGRATOR.iter().count() as i64);
}

#[tokio::test]
async fn concurrent_migrations_from_two_replicas_both_succeed() {
    let db = fresh_database().await;
    let a = Store::connect(db.options.clone(), Duration::from_secs(30))
        .await
        .unwrap();
    let b = Store::connect(db.options, Duration::from_secs(30))
        .await
        .unwrap();
    let (ra, rb) = tokio::join!(a.migrate(), b.migrate());
    ra.unwrap();
    rb.unwrap();
}
