//! Adapter upload, listing, versions, deletion, validation errors, size limits, quotas and
//! tenant isolation.

use std::io::Write;
use std::time::Duration;

use reqwest::Method;
use serde_json::{Value, json};

use crate::service_helpers::{spawn_service, spawn_service_with};
use crate::tiny_model::{adapter, adapter_with};

async fn error_of(response: reqwest::Response) -> (u16, String, String) {
    let status = response.status().as_u16();
    let body: Value = response.json().await.expect("error json");
    (
        status,
        body["error"]["code"].as_str().unwrap_or("").to_owned(),
        body["error"]["message"].as_str().unwrap_or("").to_owned(),
    )
}

#[tokio::test]
async fn upload_stores_a_valid_adapter_and_lists_it() {
    let app = spawn_service().await;
    let tenant = app.create_tenant("acme", json!({})).await;
    let body = app.upload_ok(&tenant.key, "legal-v2", &adapter(4, 1)).await;
    assert_eq!(body["name"], "legal-v2");
    assert_eq!(body["version"], 1);
    assert_eq!(body["rank"], 4);
    assert_eq!(body["alpha"], 8.0);
    assert_eq!(body["target_modules"], json!(["q_proj", "v_proj"]));
    assert_eq!(body["status"], "ready");
    assert_eq!(body["sha256"].as_str().unwrap().len(), 64);
    assert!(body["size_bytes"].as_u64().unwrap() > 0);

    let list: Value = app
        .tenant(Method::GET, "/api/v1/adapters", &tenant.key)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(list["adapters"].as_array().unwrap().len(), 1);
    assert_eq!(list["adapters"][0]["name"], "legal-v2");

    let detail: Value = app
        .tenant(Method::GET, "/api/v1/adapters/legal-v2", &tenant.key)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(detail["version"], 1);
    assert_eq!(detail["versions"].as_array().unwrap().len(), 1);
    // Nothing stays in the spool.
    let spool = app.data_dir.path().join("uploads");
    assert_eq!(std::fs::read_dir(&spool).unwrap().count(), 0);
}

#[tokio::test]
async fn reuploading_a_name_creates_a_new_version() {
    let app = spawn_service().await;
    let tenant = app.create_tenant("acme", json!({})).await;
    app.upload_ok(&tenant.key, "legal", &adapter(4, 1)).await;
    let second = app.upload_ok(&tenant.key, "legal", &adapter(8, 2)).await;
    assert_eq!(second["version"], 2);
    assert_eq!(second["rank"], 8);
    let detail: Value = app
        .tenant(Method::GET, "/api/v1/adapters/legal", &tenant.key)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(detail["version"], 2);
    let versions: Vec<u64> = detail["versions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["version"].as_u64().unwrap())
        .collect();
    assert_eq!(versions, vec![2, 1]);
}

#[tokio::test]
async fn upload_rejects_adapter_whose_rank_differs_from_its_config() {
    let app = spawn_service().await;
    let tenant = app.create_tenant("acme", json!({})).await;
    let response = app
        .upload(&tenant.key, "bad", &adapter_with(8, 4, 1, &["q_proj"]))
        .await;
    let (status, code, message) = error_of(response).await;
    assert_eq!((status, code.as_str()), (422, "invalid_adapter"));
    assert!(message.contains("rank"), "{message}");
    let list: Value = app
        .tenant(Method::GET, "/api/v1/adapters", &tenant.key)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(
        list["adapters"].as_array().unwrap().is_empty(),
        "nothing visible"
    );
}

#[tokio::test]
async fn upload_rejects_an_unknown_target_module_and_broken_files_with_the_reason() {
    let app = spawn_service().await;
    let tenant = app.create_tenant("acme", json!({})).await;
    let mut unknown = adapter(4, 1);
    unknown.config = serde_json::to_vec(&json!({
        "peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["wq"], "bias": "none"
    }))
    .unwrap();
    let (status, code, message) = error_of(app.upload(&tenant.key, "a", &unknown).await).await;
    assert_eq!((status, code.as_str()), (422, "invalid_adapter"));
    assert!(message.contains("wq"), "{message}");

    let mut bad_json = adapter(4, 1);
    bad_json.config = b"{not json".to_vec();
    let (status, code, message) = error_of(app.upload(&tenant.key, "b", &bad_json).await).await;
    assert_eq!((status, code.as_str()), (422, "invalid_adapter"));
    assert!(message.contains("adapter_config.json"), "{message}");

    let mut truncated = adapter(4, 1);
    truncated.weights.truncate(truncated.weights.len() / 2);
    let (status, code, _) = error_of(app.upload(&tenant.key, "c", &truncated).await).await;
    assert_eq!((status, code.as_str()), (422, "invalid_adapter"));

    let mut garbage = adapter(4, 1);
    garbage.weights = vec![0xff; 64];
    let (status, code, message) = error_of(app.upload(&tenant.key, "d", &garbage).await).await;
    assert_eq!((status, code.as_str()), (422, "invalid_adapter"));
    assert!(message.contains("safetensors"), "{message}");
}

#[tokio::test]
async fn upload_with_a_missing_file_or_bad_name_is_invalid_request() {
    let app = spawn_service().await;
    let tenant = app.create_tenant("acme", json!({})).await;
    let files = adapter(4, 1);
    let form = reqwest::multipart::Form::new().text("name", "x").part(
        "adapter_config.json",
        reqwest::multipart::Part::bytes(files.config.clone()),
    );
    let response = app
        .tenant(Method::POST, "/api/v1/adapters", &tenant.key)
        .multipart(form)
        .send()
        .await
        .unwrap();
    let (status, code, message) = error_of(response).await;
    assert_eq!((status, code.as_str()), (400, "invalid_request"));
    assert!(message.contains("adapter_model.safetensors"), "{message}");

    let (status, code, _) = error_of(app.upload(&tenant.key, "Bad Name", &files).await).await;
    assert_eq!((status, code.as_str()), (400, "invalid_request"));
    let (status, _, _) = error_of(app.upload(&tenant.key, "tiny-llama", &files).await).await;
    assert_eq!(status, 400, "the base model's id is not an adapter name");
}

#[tokio::test]
async fn an_upload_above_the_size_limit_is_payload_too_large() {
    let app = spawn_service_with(|s| s.max_upload_bytes = 4096).await;
    let tenant = app.create_tenant("acme", json!({})).await;
    let (status, code, _) = error_of(app.upload(&tenant.key, "big", &adapter(8, 1)).await).await;
    assert_eq!((status, code.as_str()), (413, "payload_too_large"));
    // Streamed without a length (chunked): the limit still holds while bytes arrive.
    let files = adapter(8, 1);
    let chunks: Vec<Result<Vec<u8>, std::io::Error>> =
        files.weights.chunks(1024).map(|c| Ok(c.to_vec())).collect();
    let stream = reqwest::Body::wrap_stream(futures_util::stream::iter(chunks));
    let form = reqwest::multipart::Form::new()
        .text("name", "big")
        .part(
            "adapter_config.json",
            reqwest::multipart::Part::bytes(files.config.clone()),
        )
        .part(
            "adapter_model.safetensors",
            reqwest::multipart::Part::stream(stream).file_name("adapter_model.safetensors"),
        );
    let response = app
        .tenant(Method::POST, "/api/v1/adapters", &tenant.key)
        .multipart(form)
        .send()
        .await;
    if let Ok(response) = response {
        assert_eq!(response.status(), 413);
    }
    app.eventually("the spool is empty", || async {
        std::fs::read_dir(app.data_dir.path().join("uploads"))
            .map(|d| d.count() == 0)
            .unwrap_or(true)
    })
    .await;
}

#[tokio::test]
async fn uploads_beyond_the_adapter_quotas_are_quota_exceeded() {
    let app = spawn_service().await;
    let tenant = app.create_tenant("acme", json!({"max_adapters": 1})).await;
    app.upload_ok(&tenant.key, "one", &adapter(4, 1)).await;
    let (status, code, message) =
        error_of(app.upload(&tenant.key, "two", &adapter(4, 2)).await).await;
    assert_eq!((status, code.as_str()), (429, "quota_exceeded"));
    assert!(message.contains("max_adapters"), "{message}");
    // A new version of an existing adapter is not a new adapter.
    app.upload_ok(&tenant.key, "one", &adapter(4, 3)).await;

    let small = app
        .create_tenant("small", json!({"max_adapter_bytes": 100}))
        .await;
    let (status, code, message) =
        error_of(app.upload(&small.key, "one", &adapter(4, 1)).await).await;
    assert_eq!((status, code.as_str()), (429, "quota_exceeded"));
    assert!(message.contains("max_adapter_bytes"), "{message}");
}

#[tokio::test]
async fn deleting_an_adapter_hides_it_and_frees_its_name_and_blob() {
    let app = spawn_service().await;
    let tenant = app.create_tenant("acme", json!({})).await;
    let stored = app.upload_ok(&tenant.key, "legal", &adapter(4, 1)).await;
    let sha = stored["sha256"].as_str().unwrap().to_owned();
    let blob = app
        .data_dir
        .path()
        .join("blobs/sha256")
        .join(&sha[..2])
        .join(&sha);
    assert!(blob.exists(), "{}", blob.display());

    let deleted = app
        .tenant(Method::DELETE, "/api/v1/adapters/legal", &tenant.key)
        .send()
        .await
        .unwrap();
    assert_eq!(deleted.status(), 204);
    let (status, code, _) = error_of(
        app.tenant(Method::GET, "/api/v1/adapters/legal", &tenant.key)
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!((status, code.as_str()), (404, "adapter_not_found"));
    app.eventually("the blob is deleted", || async { !blob.exists() })
        .await;
    let again = app.upload_ok(&tenant.key, "legal", &adapter(4, 2)).await;
    assert_eq!(again["version"], 1, "a new adapter under the freed name");
    let (status, _, _) = error_of(
        app.tenant(Method::DELETE, "/api/v1/adapters/nothing", &tenant.key)
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(status, 404);
}

#[tokio::test]
async fn tenant_b_can_neither_see_use_nor_delete_tenant_a_adapters_or_usage() {
    let app = spawn_service().await;
    let a = app.create_tenant("tenant-a", json!({})).await;
    let b = app.create_tenant("tenant-b", json!({})).await;
    app.upload_ok(&a.key, "secret", &adapter(4, 1)).await;
    let done = app
        .tenant(Method::POST, "/v1/completions", &a.key)
        .json(&json!({"model": "secret", "prompt": "hello", "max_tokens": 3, "temperature": 0}))
        .send()
        .await
        .unwrap();
    assert_eq!(done.status(), 200);

    let list: Value = app
        .tenant(Method::GET, "/api/v1/adapters", &b.key)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(list["adapters"].as_array().unwrap().is_empty());
    for method in [Method::GET, Method::DELETE] {
        let (status, code, _) = error_of(
            app.tenant(method, "/api/v1/adapters/secret", &b.key)
                .send()
                .await
                .unwrap(),
        )
        .await;
        assert_eq!((status, code.as_str()), (404, "adapter_not_found"));
    }
    let (status, code, _) = error_of(
        app.tenant(Method::POST, "/v1/completions", &b.key)
            .json(&json!({"model": "secret", "prompt": "hello", "max_tokens": 3}))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!((status, code.as_str()), (404, "adapter_not_found"));
    let mut ws = app.ws(Some(&b.key)).await;
    ws.send(json!({"type": "generate", "id": "x", "adapter": "secret", "prompt": "hi", "max_tokens": 2}))
        .await;
    let events = ws.collect("x").await;
    assert_eq!(events[0]["code"], "adapter_not_found");
    let models: Value = app
        .tenant(Method::GET, "/v1/models", &b.key)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(!models.to_string().contains("secret"));

    let usage_b: Value = app
        .tenant(Method::GET, "/api/v1/usage", &b.key)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(usage_b["usage"].as_array().unwrap().is_empty());
    let usage_a: Value = app
        .tenant(Method::GET, "/api/v1/usage", &a.key)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(usage_a["usage"][0]["adapter"], "secret");
    assert_eq!(usage_a["usage"][0]["requests"], 1);

    // A's adapter survived all of B's attempts.
    let still: Value = app
        .tenant(Method::GET, "/api/v1/adapters/secret", &a.key)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(still["name"], "secret");
    // B cannot revoke or list A's keys: those routes need the operator token.
    let keys = app
        .tenant(
            Method::GET,
            &format!("/api/v1/tenants/{}/api-keys", a.id),
            &b.key,
        )
        .send()
        .await
        .unwrap();
    assert_eq!(keys.status(), 401);
}

#[tokio::test]
async fn an_upload_killed_half_way_leaves_nothing_behind() {
    let app = spawn_service().await;
    let tenant = app.create_tenant("acme", json!({})).await;
    let files = adapter(8, 1);
    let boundary = "punicatestboundary";
    let mut body = Vec::new();
    write!(
        body,
        "--{boundary}\r\nContent-Disposition: form-data; name=\"name\"\r\n\r\nhalf\r\n\
         --{boundary}\r\nContent-Disposition: form-data; name=\"adapter_config.json\"; filename=\"adapter_config.json\"\r\n\r\n"
    )
    .unwrap();
    body.extend_from_slice(&files.config);
    write!(
        body,
        "\r\n--{boundary}\r\nContent-Disposition: form-data; name=\"adapter_model.safetensors\"; filename=\"adapter_model.safetensors\"\r\n\r\n"
    )
    .unwrap();
    let full_len = body.len() + files.weights.len() + format!("\r\n--{boundary}--\r\n").len();
    body.extend_from_slice(&files.weights[..files.weights.len() / 2]);

    let mut socket = std::net::TcpStream::connect(("127.0.0.1", app.port)).unwrap();
    write!(
        socket,
        "POST /api/v1/adapters HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer {}\r\n\
         Content-Type: multipart/form-data; boundary={boundary}\r\nContent-Length: {full_len}\r\n\r\n",
        tenant.key
    )
    .unwrap();
    socket.write_all(&body).unwrap();
    socket.flush().unwrap();
    // Let the server spool what it got, then kill the connection half way.
    let spool = app.data_dir.path().join("uploads");
    app.eventually("the upload is being spooled", || async {
        std::fs::read_dir(&spool)
            .map(|d| d.count() == 1)
            .unwrap_or(false)
    })
    .await;
    drop(socket);

    app.eventually("the spool is empty again", || async {
        std::fs::read_dir(&spool)
            .map(|d| d.count() == 0)
            .unwrap_or(false)
    })
    .await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    let list: Value = app
        .tenant(Method::GET, "/api/v1/adapters", &tenant.key)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(list["adapters"].as_array().unwrap().is_empty());
    let blobs = app.data_dir.path().join("blobs/sha256");
    let stored = std::fs::read_dir(&blobs).map(|d| d.count()).unwrap_or(0);
    assert_eq!(stored, 0, "no blob was stored");
    let versions: i64 = sqlx::query_scalar("SELECT count(*) FROM adapter_versions")
        .fetch_one(&app.db_pool)
        .await
        .unwrap();
    assert_eq!(versions, 0);
}
