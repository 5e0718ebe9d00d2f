//! Quotas held in SQL: adapter count and bytes, token-rate windows and concurrent-stream leases,
//! including concurrent callers (as if on several replicas).

use std::time::Duration;

use punica::domain::{AdapterName, Email, Password, Quotas, TenantName};
use punica::store::{Store, StoreError};
use time::OffsetDateTime;

use crate::helpers::migrated_store;
use crate::store_tenancy::adapter;

async fn tenant_with(store: &Store, name: &str, quotas: Quotas) -> punica::store::Tenant {
    store
        .create_tenant(&TenantName::parse(name).unwrap(), &quotas)
        .await
        .unwrap()
}

#[tokio::test]
async fn quotas_round_trip_and_null_means_unlimited() {
    let store = migrated_store().await;
    let q = Quotas {
        max_adapters: Some(2),
        tokens_per_day: Some(1_000_000),
        ..Quotas::UNLIMITED
    };
    let t = tenant_with(&store, "q", q).await;
    assert_eq!(store.get_tenant(t.id).await.unwrap().quotas, q);
    let updated = store.set_quotas(t.id, &Quotas::UNLIMITED).await.unwrap();
    assert_eq!(updated.quotas, Quotas::UNLIMITED);
    let renamed = store
        .rename_tenant(t.id, &TenantName::parse("q2").unwrap())
        .await
        .unwrap();
    assert_eq!(renamed.name.as_str(), "q2");
    assert_eq!(
        store
            .get_tenant_by_name(&TenantName::parse("q2").unwrap())
            .await
            .unwrap()
            .id,
        t.id
    );
    assert_eq!(store.list_tenants().await.unwrap().len(), 1);
}

#[tokio::test]
async fn max_adapters_counts_names_not_versions() {
    let store = migrated_store().await;
    let t = tenant_with(
        &store,
        "limited",
        Quotas {
            max_adapters: Some(1),
            ..Quotas::UNLIMITED
        },
    )
    .await;
    let one = AdapterName::parse("one").unwrap();
    store
        .create_adapter_version(t.id, &one, &adapter(1, "a"))
        .await
        .unwrap();
    store
        .create_adapter_version(t.id, &one, &adapter(1, "b"))
        .await
        .unwrap();
    let err = store
        .create_adapter_version(t.id, &AdapterName::parse("two").unwrap(), &adapter(1, "c"))
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            StoreError::QuotaExceeded {
                quota: "max_adapters",
                limit: 1,
                current: 1,
                requested: 1
            }
        ),
        "{err}"
    );
}

#[tokio::test]
async fn max_adapter_bytes_counts_the_newest_version_of_each_adapter() {
    let store = migrated_store().await;
    let t = tenant_with(
        &store,
        "bytes",
        Quotas {
            max_adapter_bytes: Some(1000),
            ..Quotas::UNLIMITED
        },
    )
    .await;
    let a = AdapterName::parse("a").unwrap();
    let b = AdapterName::parse("b").unwrap();
    store
        .create_adapter_version(t.id, &a, &adapter(600, "a"))
        .await
        .unwrap();
    // Replacing a (600 -> 700) fits: the old version does not count against its successor.
    store
        .create_adapter_version(t.id, &a, &adapter(700, "b"))
        .await
        .unwrap();
    let err = store
        .create_adapter_version(t.id, &b, &adapter(301, "c"))
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            StoreError::QuotaExceeded {
                quota: "max_adapter_bytes",
                limit: 1000,
                current: 700,
                requested: 301
            }
        ),
        "{err}"
    );
    store
        .create_adapter_version(t.id, &b, &adapter(300, "c"))
        .await
        .unwrap();
}

#[tokio::test]
async fn concurrent_uploads_of_one_name_get_distinct_versions() {
    let store = migrated_store().await;
    let t = tenant_with(&store, "race", Quotas::UNLIMITED).await;
    let name = AdapterName::parse("hot").unwrap();
    let mut tasks = Vec::new();
    for i in 0..8 {
        let store = store.clone();
        let name = name.clone();
        tasks.push(tokio::spawn(async move {
            store
                .create_adapter_version(t.id, &name, &adapter(1, ["a", "b"][i % 2]))
                .await
                .unwrap()
                .version
        }));
    }
    let mut versions = Vec::new();
    for task in tasks {
        versions.push(task.await.unwrap());
    }
    versions.sort();
    assert_eq!(versions, (1..=8).collect::<Vec<u32>>());
}

#[tokio::test]
async fn concurrent_token_reservations_never_exceed_the_minute_limit() {
    let store = migrated_store().await;
    let t = tenant_with(
        &store,
        "tokens",
        Quotas {
            tokens_per_minute: Some(1000),
            ..Quotas::UNLIMITED
        },
    )
    .await;
    // Fix "now" mid-minute so the whole test lands in one window.
    let now = OffsetDateTime::now_utc().replace_second(30).unwrap();
    let mut tasks = Vec::new();
    for _ in 0..30 {
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            store.reserve_tokens(t.id, 100, now).await
        }));
    }
    let mut granted = 0;
    let mut limited = 0;
    for task in tasks {
        match task.await.unwrap() {
            Ok(r) => {
                assert_eq!(r.tokens, 100);
                granted += 1;
            }
            Err(StoreError::RateLimited {
                window: "minute",
                limit: 1000,
                requested: 100,
                retry_after_secs,
                ..
            }) => {
                assert!((1..=30).contains(&retry_after_secs), "{retry_after_secs}");
                limited += 1;
            }
            Err(e) => panic!("unexpected {e}"),
        }
    }
    assert_eq!((granted, limited), (10, 20));
    assert_eq!(store.tokens_used(t.id, now).await.unwrap(), (1000, 1000));
}

#[tokio::test]
async fn settling_a_reservation_returns_unused_tokens_and_day_limit_applies() {
    let store = migrated_store().await;
    let t = tenant_with(
        &store,
        "settle",
        Quotas {
            tokens_per_day: Some(500),
            ..Quotas::UNLIMITED
        },
    )
    .await;
    let now = OffsetDateTime::now_utc();
    let r = store.reserve_tokens(t.id, 400, now).await.unwrap();
    assert!(matches!(
        store.reserve_tokens(t.id, 200, now).await,
        Err(StoreError::RateLimited {
            window: "day",
            used: 400,
            ..
        })
    ));
    store.settle_tokens(&r, 50).await.unwrap();
    assert_eq!(store.tokens_used(t.id, now).await.unwrap().1, 50);
    store.reserve_tokens(t.id, 200, now).await.unwrap();
    // The failed attempt above took nothing from the minute window either.
    assert_eq!(store.tokens_used(t.id, now).await.unwrap(), (250, 250));
    assert_eq!(
        store
            .prune_token_windows(now + time::Duration::days(3))
            .await
            .unwrap(),
        2
    );
}

#[tokio::test]
async fn concurrent_stream_leases_respect_the_limit_and_free_on_release_or_expiry() {
    let store = migrated_store().await;
    let t = tenant_with(
        &store,
        "streams",
        Quotas {
            max_concurrent_streams: Some(3),
            ..Quotas::UNLIMITED
        },
    )
    .await;
    let mut tasks = Vec::new();
    for _ in 0..10 {
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            store
                .acquire_stream_lease(t.id, Duration::from_secs(60))
                .await
        }));
    }
    let mut leases = Vec::new();
    for task in tasks {
        match task.await.unwrap() {
            Ok(id) => leases.push(id),
            Err(StoreError::QuotaExceeded {
                quota: "max_concurrent_streams",
                limit: 3,
                ..
            }) => {}
            Err(e) => panic!("unexpected {e}"),
        }
    }
    assert_eq!(leases.len(), 3);
    assert_eq!(store.active_streams(t.id).await.unwrap(), 3);
    for lease in &leases {
        assert!(
            store
                .renew_stream_lease(t.id, *lease, Duration::from_secs(60))
                .await
                .unwrap()
        );
    }
    let other = tenant_with(&store, "other", Quotas::UNLIMITED).await;
    assert!(
        !store
            .renew_stream_lease(other.id, leases[0], Duration::from_secs(60))
            .await
            .unwrap(),
        "another tenant cannot touch the lease"
    );

    store.release_stream_lease(t.id, leases[0]).await.unwrap();
    let short = store
        .acquire_stream_lease(t.id, Duration::from_millis(200))
        .await
        .unwrap();
    assert!(
        store
            .acquire_stream_lease(t.id, Duration::from_secs(60))
            .await
            .is_err()
    );
    tokio::time::sleep(Duration::from_millis(400)).await;
    // The short lease expired (its holder died without releasing): the slot is free again.
    store
        .acquire_stream_lease(t.id, Duration::from_secs(60))
        .await
        .unwrap();
    store.release_stream_lease(t.id, short).await.unwrap();
}

#[tokio::test]
async fn operators_log_in_with_their_argon2_password() {
    let store = migrated_store().await;
    let email = Email::parse("Root@Ops.test").unwrap();
    let password = Password::parse("long enough secret").unwrap();
    let op = store
        .create_operator(&email, &password.hash().unwrap())
        .await
        .unwrap();
    assert_eq!(op.email.as_str(), "root@ops.test");
    let (found, hash) = store
        .operator_credentials(&Email::parse("root@ops.test").unwrap())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(found.id, op.id);
    assert!(password.verify(&hash));
    assert_eq!(store.get_operator(op.id).await.unwrap(), op);
    assert_eq!(store.count_operators().await.unwrap(), 1);
    assert!(matches!(
        store.create_operator(&email, "x").await,
        Err(StoreError::Conflict { .. })
    ));
}
