//! The operator's REST API: tenants, quotas, keys, users, and the error format.

use reqwest::Method;
use serde_json::{Value, json};

use crate::service_helpers::spawn_service;

#[tokio::test]
async fn operator_routes_refuse_a_missing_or_wrong_admin_token() {
    let app = spawn_service().await;
    let none = app
        .client
        .get(app.url("/api/v1/tenants"))
        .send()
        .await
        .unwrap();
    assert_eq!(none.status(), 401);
    let body: Value = none.json().await.unwrap();
    assert_eq!(body["error"]["code"], "unauthorized");
    let wrong = app
        .client
        .get(app.url("/api/v1/tenants"))
        .bearer_auth("not-the-token")
        .send()
        .await
        .unwrap();
    assert_eq!(wrong.status(), 401);
    // A tenant key is not an operator token either.
    let tenant = app.create_tenant("acme", json!({})).await;
    let as_tenant = app
        .tenant(Method::GET, "/api/v1/tenants", &tenant.key)
        .send()
        .await
        .unwrap();
    assert_eq!(as_tenant.status(), 401);
}

#[tokio::test]
async fn operator_creates_lists_gets_patches_and_deletes_a_tenant() {
    let app = spawn_service().await;
    let created = app
        .admin(Method::POST, "/api/v1/tenants")
        .json(&json!({"name": "acme", "quotas": {"max_adapters": 3}}))
        .send()
        .await
        .unwrap();
    assert_eq!(created.status(), 201);
    let tenant: Value = created.json().await.unwrap();
    let id = tenant["id"].as_str().unwrap().to_owned();
    assert_eq!(tenant["name"], "acme");
    assert_eq!(tenant["quotas"]["max_adapters"], 3);
    assert!(tenant["quotas"]["tokens_per_day"].is_null());
    assert!(tenant["created_at"].is_string());

    let list: Value = app
        .admin(Method::GET, "/api/v1/tenants")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(list["tenants"].as_array().unwrap().len(), 1);

    let got: Value = app
        .admin(Method::GET, &format!("/api/v1/tenants/{id}"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(got["id"], id.as_str());

    let patched = app
        .admin(Method::PATCH, &format!("/api/v1/tenants/{id}"))
        .json(&json!({"name": "acme-corp", "quotas": {"tokens_per_day": 1000}}))
        .send()
        .await
        .unwrap();
    assert_eq!(patched.status(), 200);
    let patched: Value = patched.json().await.unwrap();
    assert_eq!(patched["name"], "acme-corp");
    assert_eq!(patched["quotas"]["tokens_per_day"], 1000);
    assert_eq!(patched["quotas"]["max_adapters"], 3, "unnamed quotas stay");

    let deleted = app
        .admin(Method::DELETE, &format!("/api/v1/tenants/{id}"))
        .send()
        .await
        .unwrap();
    assert_eq!(deleted.status(), 204);
    let gone = app
        .admin(Method::GET, &format!("/api/v1/tenants/{id}"))
        .send()
        .await
        .unwrap();
    assert_eq!(gone.status(), 404);
    let body: Value = gone.json().await.unwrap();
    assert_eq!(body["error"]["code"], "not_found");
}

#[tokio::test]
async fn a_taken_tenant_name_is_a_conflict_and_a_bad_one_is_invalid() {
    let app = spawn_service().await;
    app.create_tenant("acme", json!({})).await;
    let again = app
        .admin(Method::POST, "/api/v1/tenants")
        .json(&json!({"name": "acme"}))
        .send()
        .await
        .unwrap();
    assert_eq!(again.status(), 409);
    let body: Value = again.json().await.unwrap();
    assert_eq!(body["error"]["code"], "conflict");
    let bad = app
        .admin(Method::POST, "/api/v1/tenants")
        .json(&json!({"name": "Not A Name!"}))
        .send()
        .await
        .unwrap();
    assert_eq!(bad.status(), 400);
    let body: Value = bad.json().await.unwrap();
    assert_eq!(body["error"]["code"], "invalid_request");
}

#[tokio::test]
async fn malformed_json_and_unknown_routes_answer_in_the_error_format() {
    let app = spawn_service().await;
    let malformed = app
        .admin(Method::POST, "/api/v1/tenants")
        .header("content-type", "application/json")
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_eq!(malformed.status(), 400);
    let body: Value = malformed.json().await.unwrap();
    assert_eq!(body["error"]["code"], "invalid_request");
    let unknown_field = app
        .admin(Method::POST, "/api/v1/tenants")
        .json(&json!({"name": "x", "colour": "blue"}))
        .send()
        .await
        .unwrap();
    assert_eq!(unknown_field.status(), 400);
    let nowhere = app.get("/api/v1/nowhere").await;
    assert_eq!(nowhere.status(), 404);
    let body: Value = nowhere.json().await.unwrap();
    assert_eq!(body["error"]["code"], "not_found");
    let not_a_uuid = app
        .admin(Method::GET, "/api/v1/tenants/not-a-uuid")
        .send()
        .await
        .unwrap();
    assert_eq!(not_a_uuid.status(), 404);
}

#[tokio::test]
async fn api_keys_are_shown_once_listed_without_their_secret_and_revocable() {
    let app = spawn_service().await;
    let tenant = app.create_tenant("acme", json!({})).await;
    let path = format!("/api/v1/tenants/{}/api-keys", tenant.id);
    let created: Value = app
        .admin(Method::POST, &path)
        .json(&json!({"label": "ci"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let key = created["key"].as_str().unwrap().to_owned();
    assert!(key.starts_with(created["prefix"].as_str().unwrap()));
    assert_eq!(created["label"], "ci");

    let listing = app
        .admin(Method::GET, &path)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(!listing.contains(&key), "the secret is never listed");
    let listing: Value = serde_json::from_str(&listing).unwrap();
    assert_eq!(listing["api_keys"].as_array().unwrap().len(), 2);

    let ok = app
        .tenant(Method::GET, "/api/v1/adapters", &key)
        .send()
        .await
        .unwrap();
    assert_eq!(ok.status(), 200);
    let revoked = app
        .admin(
            Method::DELETE,
            &format!("{path}/{}", created["id"].as_str().unwrap()),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(revoked.status(), 204);
    let refused = app
        .tenant(Method::GET, "/api/v1/adapters", &key)
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 401, "a revoked key stops working at once");
    let other = app
        .tenant(Method::GET, "/api/v1/adapters", &tenant.key)
        .send()
        .await
        .unwrap();
    assert_eq!(other.status(), 200, "the tenant's other key still works");

    let unknown = app
        .admin(Method::DELETE, &format!("{path}/{}", uuid::Uuid::new_v4()))
        .send()
        .await
        .unwrap();
    assert_eq!(unknown.status(), 404);
}

#[tokio::test]
async fn put_quotas_replaces_every_limit() {
    let app = spawn_service().await;
    let tenant = app
        .create_tenant("acme", json!({"max_adapters": 2, "tokens_per_day": 5}))
        .await;
    let response = app
        .admin(
            Method::PUT,
            &format!("/api/v1/tenants/{}/quotas", tenant.id),
        )
        .json(&json!({"max_concurrent_streams": 4, "tokens_per_minute": 100}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["quotas"]["max_concurrent_streams"], 4);
    assert_eq!(body["quotas"]["tokens_per_minute"], 100);
    assert!(body["quotas"]["max_adapters"].is_null());
    assert!(body["quotas"]["tokens_per_day"].is_null());
    let negative = app
        .admin(
            Method::PUT,
            &format!("/api/v1/tenants/{}/quotas", tenant.id),
        )
        .json(&json!({"max_adapters": -1}))
        .send()
        .await
        .unwrap();
    assert_eq!(negative.status(), 400);
}

#[tokio::test]
async fn console_users_are_created_once_per_email() {
    let app = spawn_service().await;
    let tenant = app.create_tenant("acme", json!({})).await;
    let path = format!("/api/v1/tenants/{}/users", tenant.id);
    let body = json!({"email": "ada@example.com", "password": "correct horse battery"});
    let created = app
        .admin(Method::POST, &path)
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(created.status(), 201);
    let text = created.text().await.unwrap();
    assert!(!text.contains("correct horse"), "no password in the answer");
    let again = app
        .admin(Method::POST, &path)
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(again.status(), 409);
    let weak = app
        .admin(Method::POST, &path)
        .json(&json!({"email": "bob@example.com", "password": "x"}))
        .send()
        .await
        .unwrap();
    assert_eq!(weak.status(), 400);
}
