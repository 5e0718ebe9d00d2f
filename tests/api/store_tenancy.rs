//! Tenant isolation of the store: every tenant-scoped query, called with tenant A's id, must
//! ignore tenant B's rows even when given B's object ids or names.

use punica::domain::{AdapterName, ApiKey, Email, Quotas, TenantName};
use punica::store::{NewAdapterVersion, Store, StoreError, Tenant, UsageRecord};
use time::OffsetDateTime;
use time::macros::{date, datetime};

use crate::helpers::migrated_store;

pub fn adapter(size: u64, sha: &str) -> NewAdapterVersion {
    NewAdapterVersion {
        rank: 8,
        alpha: 16.0,
        target_modules: vec!["q_proj".into(), "v_proj".into()],
        dtype: "float16".into(),
        size_bytes: size,
        sha256: sha.repeat(64 / sha.len()),
        blob_key: format!("sha256/{0}{0}/{1}", sha, sha.repeat(64 / sha.len())),
    }
}

async fn tenant(store: &Store, name: &str) -> Tenant {
    store
        .create_tenant(&TenantName::parse(name).unwrap(), &Quotas::UNLIMITED)
        .await
        .unwrap()
}

fn name(s: &str) -> AdapterName {
    AdapterName::parse(s).unwrap()
}

#[tokio::test]
async fn a_tenant_scoped_query_never_returns_another_tenants_rows() {
    let store = migrated_store().await;
    let a = tenant(&store, "alpha").await;
    let b = tenant(&store, "beta").await;

    // Both tenants use the same adapter name: names are per tenant.
    let a_shared = store
        .create_adapter_version(a.id, &name("shared"), &adapter(100, "a"))
        .await
        .unwrap();
    let b_shared = store
        .create_adapter_version(b.id, &name("shared"), &adapter(200, "b"))
        .await
        .unwrap();
    let b_only = store
        .create_adapter_version(b.id, &name("b-only"), &adapter(300, "c"))
        .await
        .unwrap();
    let (a_key, _) = store.create_api_key(a.id, "a-key").await.unwrap();
    let (b_key, b_secret) = store.create_api_key(b.id, "b-key").await.unwrap();
    let a_user = store
        .create_tenant_user(a.id, &Email::parse("a@alpha.test").unwrap(), "hash-a")
        .await
        .unwrap();
    let b_user = store
        .create_tenant_user(b.id, &Email::parse("b@beta.test").unwrap(), "hash-b")
        .await
        .unwrap();
    let now = OffsetDateTime::now_utc();
    for (t, v, req) in [
        (a.id, a_shared.id, "ra"),
        (b.id, b_shared.id, "rb"),
        (b.id, b_only.id, "rc"),
    ] {
        store
            .record_usage(&UsageRecord {
                tenant_id: t,
                adapter_version_id: Some(v),
                request_id: req.into(),
                prompt_tokens: 5,
                completion_tokens: 7,
                started_at: now,
                finished_at: now,
                finish_reason: "length".into(),
            })
            .await
            .unwrap();
    }

    // Listings.
    let listed = store.list_adapters(a.id).await.unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].id, a_shared.id);
    assert!(listed.iter().all(|v| v.tenant_id == a.id));
    let keys = store.list_api_keys(a.id).await.unwrap();
    assert_eq!(
        keys.iter().map(|k| k.id).collect::<Vec<_>>(),
        vec![a_key.id]
    );
    let users = store.list_tenant_users(a.id).await.unwrap();
    assert_eq!(
        users.iter().map(|u| u.id).collect::<Vec<_>>(),
        vec![a_user.id]
    );
    let usage = store
        .usage_daily(a.id, now.date(), now.date())
        .await
        .unwrap();
    assert_eq!(usage.len(), 1);
    assert_eq!(usage[0].adapter.as_deref(), Some("shared"));
    assert_eq!(usage[0].requests, 1);

    // Lookups by name or id resolve in A's namespace only.
    assert_eq!(
        store.get_adapter(a.id, &name("shared")).await.unwrap().id,
        a_shared.id
    );
    assert!(matches!(
        store.get_adapter(a.id, &name("b-only")).await,
        Err(StoreError::NotFound { .. })
    ));
    assert!(matches!(
        store.get_adapter_version(a.id, b_only.id).await,
        Err(StoreError::NotFound { .. })
    ));
    assert!(matches!(
        store.list_adapter_versions(a.id, &name("b-only")).await,
        Err(StoreError::NotFound { .. })
    ));

    // Mutations with B's ids through A's scope change nothing.
    assert!(matches!(
        store.revoke_api_key(a.id, b_key.id).await,
        Err(StoreError::NotFound { .. })
    ));
    assert_eq!(
        store
            .authenticate_api_key(&b_secret)
            .await
            .unwrap()
            .map(|k| k.tenant_id),
        Some(b.id),
        "B's key still works"
    );
    assert!(matches!(
        store.delete_adapter(a.id, &name("b-only")).await,
        Err(StoreError::NotFound { .. })
    ));
    assert!(matches!(
        store.delete_tenant_user(a.id, b_user.id).await,
        Err(StoreError::NotFound { .. })
    ));
    assert!(matches!(
        store
            .record_usage(&UsageRecord {
                tenant_id: a.id,
                adapter_version_id: Some(b_only.id),
                request_id: "forged".into(),
                prompt_tokens: 1,
                completion_tokens: 1,
                started_at: now,
                finished_at: now,
                finish_reason: "stop".into(),
            })
            .await,
        Err(StoreError::NotFound { .. })
    ));
    // Deleting A's "shared" leaves B's "shared" alone.
    store.delete_adapter(a.id, &name("shared")).await.unwrap();
    assert_eq!(
        store.get_adapter(b.id, &name("shared")).await.unwrap().id,
        b_shared.id
    );
    assert_eq!(store.list_adapters(b.id).await.unwrap().len(), 2);
    assert_eq!(store.list_tenant_users(b.id).await.unwrap().len(), 1);
    assert_eq!(
        store
            .usage_daily(b.id, now.date(), now.date())
            .await
            .unwrap()
            .len(),
        2
    );
}

#[tokio::test]
async fn api_keys_authenticate_until_revoked_and_reject_forged_secrets() {
    let store = migrated_store().await;
    let t = tenant(&store, "keys").await;
    let (info, key) = store.create_api_key(t.id, "ci").await.unwrap();
    assert_eq!(info.prefix, key.prefix());
    assert_eq!(info.label, "ci");
    let auth = store.authenticate_api_key(&key).await.unwrap().unwrap();
    assert_eq!(auth.tenant_id, t.id);
    assert_eq!(auth.key_id, info.id);
    let listed = store.list_api_keys(t.id).await.unwrap();
    assert!(listed[0].last_used_at.is_some(), "use is recorded");

    // Same prefix, different secret.
    let forged = format!("{}_{}", key.prefix(), "A".repeat(43));
    let forged = ApiKey::parse(&forged).unwrap();
    assert_eq!(store.authenticate_api_key(&forged).await.unwrap(), None);
    // Unknown prefix.
    assert_eq!(
        store
            .authenticate_api_key(&ApiKey::generate())
            .await
            .unwrap(),
        None
    );

    store.revoke_api_key(t.id, info.id).await.unwrap();
    store.revoke_api_key(t.id, info.id).await.unwrap();
    assert_eq!(store.authenticate_api_key(&key).await.unwrap(), None);
    assert!(
        store.list_api_keys(t.id).await.unwrap()[0]
            .revoked_at
            .is_some()
    );
}

#[tokio::test]
async fn tenant_names_and_user_emails_are_unique() {
    let store = migrated_store().await;
    let t = tenant(&store, "acme").await;
    assert!(matches!(
        store
            .create_tenant(&TenantName::parse("acme").unwrap(), &Quotas::UNLIMITED)
            .await,
        Err(StoreError::Conflict { what: "tenant" })
    ));
    let email = Email::parse("dev@acme.test").unwrap();
    store.create_tenant_user(t.id, &email, "h").await.unwrap();
    assert!(matches!(
        store.create_tenant_user(t.id, &email, "h").await,
        Err(StoreError::Conflict { .. })
    ));
    assert!(matches!(
        store
            .create_tenant_user(
                punica::domain::TenantId::new(),
                &Email::parse("x@y.z").unwrap(),
                "h"
            )
            .await,
        Err(StoreError::NotFound { what: "tenant" })
    ));
}

#[tokio::test]
async fn re_upload_adds_a_version_and_resolution_picks_the_newest() {
    let store = migrated_store().await;
    let t = tenant(&store, "versions").await;
    let v1 = store
        .create_adapter_version(t.id, &name("legal"), &adapter(10, "a"))
        .await
        .unwrap();
    let v2 = store
        .create_adapter_version(t.id, &name("legal"), &adapter(20, "b"))
        .await
        .unwrap();
    assert_eq!((v1.version, v2.version), (1, 2));
    assert_eq!(v1.adapter_id, v2.adapter_id);
    assert_eq!(
        store.get_adapter(t.id, &name("legal")).await.unwrap().id,
        v2.id
    );
    // A request that resolved v1 can still load it.
    assert_eq!(
        store
            .get_adapter_version(t.id, v1.id)
            .await
            .unwrap()
            .version,
        1
    );
    let versions = store
        .list_adapter_versions(t.id, &name("legal"))
        .await
        .unwrap();
    assert_eq!(
        versions.iter().map(|v| v.version).collect::<Vec<_>>(),
        vec![2, 1]
    );

    let deleted = store.delete_adapter(t.id, &name("legal")).await.unwrap();
    assert_eq!(deleted.len(), 2);
    assert!(
        deleted
            .iter()
            .all(|v| v.status == punica::store::AdapterStatus::Deleted)
    );
    assert!(!store.blob_in_use(&v1.blob_key).await.unwrap());
    assert!(store.list_adapters(t.id).await.unwrap().is_empty());
    // The name is free again and starts over at version 1.
    let fresh = store
        .create_adapter_version(t.id, &name("legal"), &adapter(10, "a"))
        .await
        .unwrap();
    assert_eq!(fresh.version, 1);
    assert_ne!(fresh.adapter_id, v1.adapter_id);
    assert!(store.blob_in_use(&v1.blob_key).await.unwrap());
}

#[tokio::test]
async fn usage_rolls_up_per_utc_day_and_adapter_with_the_base_model_separate() {
    let store = migrated_store().await;
    let t = tenant(&store, "usage").await;
    let v = store
        .create_adapter_version(t.id, &name("chat"), &adapter(10, "a"))
        .await
        .unwrap();
    let rows = [
        (None, datetime!(2026-11-27 23:59:59 UTC), 3, 4),
        (Some(v.id), datetime!(2026-11-27 10:00:00 UTC), 10, 20),
        (Some(v.id), datetime!(2026-11-27 11:00:00 UTC), 1, 2),
        (Some(v.id), datetime!(2026-11-28 00:00:00 UTC), 5, 5),
        (None, datetime!(2026-11-29 00:00:00 UTC), 100, 100),
    ];
    for (i, (version, at, p, c)) in rows.into_iter().enumerate() {
        store
            .record_usage(&UsageRecord {
                tenant_id: t.id,
                adapter_version_id: version,
                request_id: format!("r{i}"),
                prompt_tokens: p,
                completion_tokens: c,
                started_at: at,
                finished_at: at,
                finish_reason: "stop".into(),
            })
            .await
            .unwrap();
    }
    let days = store
        .usage_daily(t.id, date!(2026 - 11 - 27), date!(2026 - 11 - 28))
        .await
        .unwrap();
    let got: Vec<_> = days
        .iter()
        .map(|d| {
            (
                d.day,
                d.adapter.clone(),
                d.requests,
                d.prompt_tokens,
                d.completion_tokens,
            )
        })
        .collect();
    assert_eq!(
        got,
        vec![
            (date!(2026 - 11 - 27), None, 1, 3, 4),
            (date!(2026 - 11 - 27), Some("chat".to_string()), 2, 11, 22),
            (date!(2026 - 11 - 28), Some("chat".to_string()), 1, 5, 5),
        ]
    );
}

#[tokio::test]
async fn deleting_a_tenant_removes_everything_it_owned() {
    let store = migrated_store().await;
    let t = tenant(&store, "doomed").await;
    let other = tenant(&store, "survivor").await;
    let v = store
        .create_adapter_version(t.id, &name("x"), &adapter(10, "d"))
        .await
        .unwrap();
    store
        .create_adapter_version(other.id, &name("x"), &adapter(10, "d"))
        .await
        .unwrap();
    let (_, key) = store.create_api_key(t.id, "k").await.unwrap();
    store
        .create_tenant_user(t.id, &Email::parse("u@doomed.test").unwrap(), "h")
        .await
        .unwrap();
    let blobs = store.delete_tenant(t.id).await.unwrap();
    assert_eq!(blobs, vec![v.blob_key.clone()]);
    assert!(
        store.blob_in_use(&v.blob_key).await.unwrap(),
        "the survivor shares the blob"
    );
    assert!(matches!(
        store.get_tenant(t.id).await,
        Err(StoreError::NotFound { .. })
    ));
    assert_eq!(store.authenticate_api_key(&key).await.unwrap(), None);
    assert!(
        store
            .tenant_user_credentials(&Email::parse("u@doomed.test").unwrap())
            .await
            .unwrap()
            .is_none()
    );
    assert!(matches!(
        store.delete_tenant(t.id).await,
        Err(StoreError::NotFound { .. })
    ));
    assert_eq!(store.list_adapters(other.id).await.unwrap().len(), 1);
}

#[tokio::test]
async fn a_blob_lock_serialises_its_holders_across_connections_and_sees_commits() {
    let store = migrated_store().await;
    let t = store
        .create_tenant(&TenantName::parse("locks").unwrap(), &Quotas::UNLIMITED)
        .await
        .unwrap();
    let a = adapter(10, "c");
    let other = adapter(10, "d");
    // A deleter holds the lock and sees the blob unreferenced.
    let mut held = store.lock_blob(&a.blob_key).await.unwrap();
    assert!(!held.in_use().await.unwrap());
    // A second holder (another replica's pool connection) waits for it; other keys do not.
    let waiting = tokio::time::timeout(
        std::time::Duration::from_millis(300),
        store.lock_blob(&a.blob_key),
    )
    .await;
    assert!(waiting.is_err(), "a second holder got the same blob's lock");
    let free = tokio::time::timeout(
        std::time::Duration::from_secs(5),
        store.lock_blob(&other.blob_key),
    )
    .await
    .expect("another blob's lock is independent")
    .unwrap();
    free.release().await.unwrap();
    // Once released, the next holder gets it and sees a version committed meanwhile.
    held.release().await.unwrap();
    store
        .create_adapter_version(t.id, &AdapterName::parse("x").unwrap(), &a)
        .await
        .unwrap();
    let mut next = tokio::time::timeout(
        std::time::Duration::from_secs(5),
        store.lock_blob(&a.blob_key),
    )
    .await
    .expect("the released lock is free")
    .unwrap();
    assert!(next.in_use().await.unwrap());
    // Dropping a holder (a cancelled request) releases it too.
    drop(next);
    let again = tokio::time::timeout(
        std::time::Duration::from_secs(5),
        store.lock_blob(&a.blob_key),
    )
    .await
    .expect("a dropped holder releases the lock")
    .unwrap();
    again.release().await.unwrap();
}
