//! Test harness: ONE throwaway Postgres cluster per test binary (started lazily on first use,
//! stopped and deleted by a watchdog when the binary exits), a fresh database per test, and
//! `spawn_app()` that runs the whole service in-process on port 0.
//!
//! Another test binary can reuse it with `#[path = "../api/helpers.rs"] mod helpers;`; each
//! binary then gets its own cluster.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::Duration;

use actix_web::dev::ServerHandle;
use punica::config::{DeviceChoice, Secret, Settings};
use punica::startup::{Application, Readiness};
use punica::store::managed::{ManagedOptions, ManagedPostgres};
use punica::store::{Store, ensure_database};
use sqlx::PgPool;
use sqlx::postgres::PgConnectOptions;

struct TestCluster {
    pg: ManagedPostgres,
    _dir: PathBuf,
}

static CLUSTER: OnceLock<TestCluster> = OnceLock::new();

fn cluster() -> &'static TestCluster {
    CLUSTER.get_or_init(|| {
        let dir = tempfile::Builder::new()
            .prefix("punica-test-pg-")
            .tempdir()
            .expect("create a temp dir for the test cluster")
            .keep();
        // The server runs as `postgres` when tests run as root: it must be able to enter the dir.
        std::fs::set_permissions(&dir, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .expect("chmod test cluster dir");
        let pg = ManagedPostgres::start(
            &dir.join("cluster"),
            ManagedOptions {
                durable: false,
                max_connections: 400,
            },
        )
        .expect("start the throwaway test cluster");
        // Deliberately never waited on: it must outlive this process to clean up after it.
        let watchdog = pg
            .spawn_exit_watchdog(std::process::id(), Some(&dir))
            .expect("start the test cluster's exit watchdog");
        std::mem::forget(watchdog);
        TestCluster { pg, _dir: dir }
    })
}

/// A new, empty database on the shared test cluster.
pub struct TestDatabase {
    pub name: String,
    pub options: PgConnectOptions,
    /// `postgres://...?host=<socket dir>` form, for settings and child processes.
    pub url: String,
}

/// Creates a fresh, empty (unmigrated) database.
pub async fn fresh_database() -> TestDatabase {
    let c = cluster();
    let name = format!("test_{}", uuid::Uuid::new_v4().simple());
    ensure_database(
        c.pg.connect_options("postgres"),
        &name,
        Duration::from_secs(30),
    )
    .await
    .expect("create test database");
    let url = format!(
        "postgres://{}@localhost/{}?host={}",
        punica::store::managed::SUPERUSER,
        name,
        c.pg.socket_dir().display()
    );
    TestDatabase {
        options: c.pg.connect_options(&name),
        name,
        url,
    }
}

/// A fresh database with the schema applied, and a store over it.
pub async fn migrated_store() -> Store {
    let db = fresh_database().await;
    let store = Store::connect(db.options, Duration::from_secs(30))
        .await
        .expect("connect to test database");
    store.migrate().await.expect("migrate test database");
    store
}

/// A running service and handles into it.
pub struct TestApp {
    /// `http://127.0.0.1:<port>`.
    pub address: String,
    pub port: u16,
    pub db_pool: PgPool,
    pub store: Store,
    pub readiness: Readiness,
    pub admin_token: String,
    pub database: TestDatabase,
    pub data_dir: tempfile::TempDir,
    pub client: reqwest::Client,
    handle: ServerHandle,
}

impl TestApp {
    /// GET `path` (relative to the app).
    pub async fn get(&self, path: &str) -> reqwest::Response {
        self.client
            .get(format!("{}{}", self.address, path))
            .send()
            .await
            .expect("request to test app")
    }

    /// Stops the server gracefully.
    pub async fn stop(&self) {
        self.handle.stop(true).await;
    }
}

/// The service on port 0 with a fresh migrated database and its own data dir.
pub async fn spawn_app() -> TestApp {
    spawn_app_with(|_| {}).await
}

/// Like [`spawn_app`], with the settings adjusted by `configure` before the build.
pub async fn spawn_app_with(configure: impl FnOnce(&mut Settings)) -> TestApp {
    if std::env::var_os("TEST_LOG").is_some() {
        punica::telemetry::init("debug");
    }
    let database = fresh_database().await;
    let data_dir = tempfile::tempdir().expect("temp data dir");
    let admin_token = format!("test-admin-{}", uuid::Uuid::new_v4().simple());
    let mut settings = Settings {
        bind: "127.0.0.1:0".into(),
        device: DeviceChoice::Cpu,
        database_url: Some(Secret::new(database.url.clone())),
        data_dir: data_dir.path().to_owned(),
        admin_token: Some(Secret::new(admin_token.clone())),
        log: "warn".into(),
        ..Settings::default()
    };
    configure(&mut settings);
    let app = Application::build(settings).await.expect("build test app");
    let port = app.port();
    let store = app.state().store.clone();
    let readiness = app.state().readiness.clone();
    let handle = app.handle();
    tokio::spawn(app.run_until_stopped());
    TestApp {
        address: format!("http://127.0.0.1:{port}"),
        port,
        db_pool: store.pool().clone(),
        store,
        readiness,
        admin_token,
        database,
        data_dir,
        client: reqwest::Client::new(),
        handle,
    }
}

/// The built `punica` binary with a clean environment (no inherited DATABASE_URL or PUNICA_*).
pub fn punica_command() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_punica"));
    for (key, _) in std::env::vars_os() {
        if let Some(k) = key.to_str()
            && (k.starts_with("PUNICA_") || k == "DATABASE_URL" || k == "RUST_LOG")
        {
            cmd.env_remove(k);
        }
    }
    cmd
}

/// Writes `contents` to `dir/name` and returns the path.
pub fn write_file(dir: &Path, name: &str, contents: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, contents).expect("write test file");
    path
}
