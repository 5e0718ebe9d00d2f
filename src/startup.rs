//! Bringing the service up and down: data dir checks, the database (external or the managed
//! cluster), migrations, blobs, metrics, the HTTP server on its own listener (port 0 works, so
//! tests run many apps at once), graceful shutdown on SIGINT/SIGTERM that also stops the managed
//! cluster. Also the CLI actions that need the database (`operator create`).

use std::io::BufRead;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::Child;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use actix_web::dev::{Server, ServerHandle};
use actix_web::{App, HttpServer, web};
use sqlx::postgres::PgConnectOptions;
use tokio::signal::unix::{Signal, SignalKind, signal};
use tokio::sync::watch;

use crate::api::{self, AppState, Metrics};
use crate::blobs::{BlobError, BlobStore};
use crate::config::{ConfigError, Settings};
use crate::console;
use crate::domain::{DomainError, Email, Password, PasswordHashError};
use crate::store::managed::{ManagedError, ManagedOptions, ManagedPostgres};
use crate::store::{Operator, Store, StoreError, describe_target, ensure_database};

/// Name of the database inside the managed cluster.
pub const MANAGED_DATABASE: &str = "punica";
/// How long the start waits for the database to answer.
pub const DB_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long in-flight requests get to finish after a shutdown signal.
pub const SHUTDOWN_GRACE_SECS: u64 = 10;

/// Why the service (or a CLI action) could not start. Each renders as one line naming the
/// setting or path at fault.
#[derive(Debug, thiserror::Error)]
pub enum StartupError {
    /// Invalid configuration.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The data dir cannot be created or written.
    #[error("data dir {path} is not writable: {source}")]
    DataDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The managed cluster failed.
    #[error("managed PostgreSQL: {0}")]
    Managed(#[from] ManagedError),
    /// `database_url` does not parse.
    #[error("invalid database_url: {0}")]
    DatabaseUrl(String),
    /// The database does not answer.
    #[error("cannot connect to the database at {target}: {source}")]
    Database {
        target: String,
        #[source]
        source: StoreError,
    },
    /// Migrations failed.
    #[error("cannot migrate the database: {0}")]
    Migrate(#[source] StoreError),
    /// The blob store cannot be opened.
    #[error(transparent)]
    Blobs(#[from] BlobError),
    /// The listen address is taken or invalid.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    /// Metrics registry setup failed.
    #[error("metrics setup failed: {0}")]
    Metrics(#[from] prometheus::Error),
    /// The tenant-facing service (state, spool, model loading) could not start.
    #[error(transparent)]
    Service(#[from] api::service::ServiceStartError),
    /// Signal handlers could not be installed.
    #[error("cannot listen for shutdown signals: {0}")]
    Signals(#[source] std::io::Error),
    /// A blocking task died.
    #[error("internal task failed: {0}")]
    Task(String),
    /// Invalid CLI input (email, password).
    #[error("{0}")]
    Input(#[from] DomainError),
    /// Reading stdin failed.
    #[error("cannot read the password from stdin: {0}")]
    Stdin(#[source] std::io::Error),
    /// Password hashing failed.
    #[error(transparent)]
    Hash(#[from] PasswordHashError),
    /// A store operation of a CLI action failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// State of the base model, as `/readyz` reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ModelState {
    /// The service runs without a model (ready as far as the model goes).
    NotConfigured,
    /// A model is configured and still loading.
    Loading,
    /// The model is loaded and serving.
    Loaded,
    /// Loading failed; the message says why.
    Failed(String),
}

impl ModelState {
    /// Short label for JSON and logs.
    pub fn label(&self) -> &'static str {
        match self {
            ModelState::NotConfigured => "not_configured",
            ModelState::Loading => "loading",
            ModelState::Loaded => "loaded",
            ModelState::Failed(_) => "failed",
        }
    }
}

/// Shared readiness flag: whoever loads the model sets it; `/readyz` reads it. Cheap to clone.
#[derive(Clone, Debug)]
pub struct Readiness {
    model: Arc<watch::Sender<ModelState>>,
}

impl Readiness {
    /// `Loading` when a model is configured, else `NotConfigured`.
    pub fn new(model_configured: bool) -> Readiness {
        let initial = if model_configured {
            ModelState::Loading
        } else {
            ModelState::NotConfigured
        };
        Readiness {
            model: Arc::new(watch::Sender::new(initial)),
        }
    }

    /// Publishes the model's state.
    pub fn set_model(&self, state: ModelState) {
        self.model.send_replace(state);
    }

    /// The model's current state.
    pub fn model(&self) -> ModelState {
        self.model.borrow().clone()
    }

    /// A receiver that sees every change (for waiting until the model is loaded).
    pub fn subscribe(&self) -> watch::Receiver<ModelState> {
        self.model.subscribe()
    }
}

/// The database of one process: the store, plus the managed cluster when the service runs its
/// own.
#[derive(Debug)]
pub struct Database {
    /// The store over the connection pool.
    pub store: Store,
    managed: Option<ManagedPostgres>,
    watchdog: Option<Child>,
}

impl Database {
    /// Connects to `database_url`, or starts (or adopts) the managed cluster under the data dir;
    /// then applies pending migrations.
    pub async fn open(settings: &Settings) -> Result<Database, StartupError> {
        let (store, managed) = match &settings.database_url {
            Some(url) => {
                let options = PgConnectOptions::from_str(url.expose())
                    .map_err(|e| StartupError::DatabaseUrl(e.to_string()))?;
                let target = describe_target(&options);
                let store = Store::connect(options, DB_CONNECT_TIMEOUT)
                    .await
                    .map_err(|source| StartupError::Database { target, source })?;
                (store, None)
            }
            None => {
                let root = settings.data_dir.join("postgres");
                let managed = tokio::task::spawn_blocking(move || {
                    ManagedPostgres::start(&root, ManagedOptions::default())
                })
                .await
                .map_err(|e| StartupError::Task(e.to_string()))??;
                let target = describe_target(&managed.connect_options(MANAGED_DATABASE));
                ensure_database(
                    managed.connect_options("postgres"),
                    MANAGED_DATABASE,
                    DB_CONNECT_TIMEOUT,
                )
                .await
                .map_err(|source| StartupError::Database {
                    target: target.clone(),
                    source,
                })?;
                let store = Store::connect(
                    managed.connect_options(MANAGED_DATABASE),
                    DB_CONNECT_TIMEOUT,
                )
                .await
                .map_err(|source| StartupError::Database { target, source })?;
                (store, Some(managed))
            }
        };
        // If this process dies without its shutdown path (SIGKILL, OOM), the watchdog still
        // stops the cluster it started.
        let watchdog = match &managed {
            Some(m) if m.started_here() => match m.spawn_exit_watchdog(std::process::id(), None) {
                Ok(child) => Some(child),
                Err(e) => {
                    tracing::warn!(error = %e, "no exit watchdog for the managed cluster");
                    None
                }
            },
            _ => None,
        };
        let db = Database {
            store,
            managed,
            watchdog,
        };
        if let Err(e) = db.store.migrate().await {
            db.shutdown(false).await;
            return Err(StartupError::Migrate(e));
        }
        Ok(db)
    }

    /// The managed cluster, when this process runs one.
    pub fn managed(&self) -> Option<&ManagedPostgres> {
        self.managed.as_ref()
    }

    /// Closes the pool and stops the managed cluster: always when `owner` (the service owns its
    /// cluster even if it adopted it from a crashed run), else only if this process started it.
    pub async fn shutdown(mut self, owner: bool) {
        self.store.close().await;
        // A cluster adopted by a short-lived command belongs to another process; dropping it
        // leaves it running.
        if let Some(mut managed) = self.managed.take()
            && (owner || managed.started_here())
        {
            let res = tokio::task::spawn_blocking(move || managed.stop()).await;
            match res {
                Ok(Ok(())) => {}
                Ok(Err(e)) => tracing::error!(error = %e, "stopping managed Postgres failed"),
                Err(e) => tracing::error!(error = %e, "stopping managed Postgres panicked"),
            }
        }
        if let Some(mut child) = self.watchdog.take() {
            // The cluster is down; the watchdog has nothing left to guard.
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Creates the data dir if needed and proves it writable.
pub fn check_data_dir(dir: &Path) -> Result<(), StartupError> {
    let err = |source| StartupError::DataDir {
        path: dir.to_owned(),
        source,
    };
    std::fs::create_dir_all(dir).map_err(err)?;
    let probe = dir.join(format!(".write-test-{}", std::process::id()));
    std::fs::write(&probe, b"ok").map_err(err)?;
    std::fs::remove_file(&probe).map_err(err)?;
    Ok(())
}

/// A built, listening service that has not started serving yet.
pub struct Application {
    port: u16,
    server: Server,
    state: AppState,
    database: Database,
}

impl Application {
    /// Checks the data dir, opens the database, migrates, binds the listener and builds the
    /// server. Nothing is served until [`Application::run_until_stopped`].
    pub async fn build(settings: Settings) -> Result<Application, StartupError> {
        check_data_dir(&settings.data_dir)?;
        let listener = TcpListener::bind(&settings.bind).map_err(|source| StartupError::Bind {
            addr: settings.bind.clone(),
            source,
        })?;
        let port = listener
            .local_addr()
            .map_err(|source| StartupError::Bind {
                addr: settings.bind.clone(),
                source,
            })?
            .port();
        let blobs = BlobStore::local(&settings.data_dir.join("blobs"))?;
        let metrics = Arc::new(Metrics::new()?);
        let database = Database::open(&settings).await?;
        let state = AppState {
            readiness: Readiness::new(settings.model.is_some()),
            settings: Arc::new(settings),
            store: database.store.clone(),
            blobs,
            metrics,
        };
        let service = match api::service::start(
            &state.settings,
            state.store.clone(),
            state.blobs.clone(),
            state.metrics.registry(),
            state.readiness.clone(),
        ) {
            Ok(service) => service,
            Err(error) => {
                database.shutdown(true).await;
                return Err(error.into());
            }
        };
        let server = match build_server(listener, state.clone(), service) {
            Ok(server) => server,
            Err(source) => {
                let addr = state.settings.bind.clone();
                database.shutdown(true).await;
                return Err(StartupError::Bind { addr, source });
            }
        };
        Ok(Application {
            port,
            server,
            state,
            database,
        })
    }

    /// The port actually bound (useful with port 0).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Shared state (store, blobs, readiness, metrics).
    pub fn state(&self) -> &AppState {
        &self.state
    }

    /// Handle to stop the server from elsewhere (tests, signal handlers).
    pub fn handle(&self) -> ServerHandle {
        self.server.handle()
    }

    /// Serves until the server is stopped through its handle, then shuts the database down.
    pub async fn run_until_stopped(self) -> Result<(), StartupError> {
        let result = self.server.await;
        self.database.shutdown(true).await;
        result.map_err(|e| StartupError::Task(e.to_string()))
    }

    /// Serves until `shutdown` resolves (its output names the reason for the log), then stops
    /// gracefully: in-flight requests get [`SHUTDOWN_GRACE_SECS`], then the database (and the
    /// managed cluster) go down.
    pub async fn run_until(
        self,
        shutdown: impl Future<Output = &'static str>,
    ) -> Result<(), StartupError> {
        let handle = self.server.handle();
        let server = self.server;
        tokio::pin!(server);
        let result = tokio::select! {
            r = &mut server => r,
            reason = shutdown => {
                tracing::info!(reason, "shutting down");
                // The server future itself carries out the stop, so both must be polled.
                let (_, result) = tokio::join!(handle.stop(true), &mut server);
                result
            }
        };
        self.database.shutdown(true).await;
        tracing::info!("stopped");
        result.map_err(|e| StartupError::Task(e.to_string()))
    }
}

/// SIGINT and SIGTERM listeners. Install them before anything announces readiness: a signal
/// that arrives earlier would otherwise kill the process without its shutdown path.
pub struct ShutdownSignals {
    interrupt: Signal,
    terminate: Signal,
}

impl ShutdownSignals {
    /// Starts listening (from now on the signals no longer terminate the process directly).
    pub fn install() -> Result<ShutdownSignals, StartupError> {
        let install = |kind| signal(kind).map_err(StartupError::Signals);
        Ok(ShutdownSignals {
            interrupt: install(SignalKind::interrupt())?,
            terminate: install(SignalKind::terminate())?,
        })
    }

    /// Resolves with the name of the first signal received.
    pub async fn recv(mut self) -> &'static str {
        tokio::select! {
            _ = self.interrupt.recv() => "SIGINT",
            _ = self.terminate.recv() => "SIGTERM",
        }
    }
}

fn build_server(
    listener: TcpListener,
    state: AppState,
    service: Arc<api::state::ServiceState>,
) -> std::io::Result<Server> {
    let max_upload = usize::try_from(state.settings.max_upload_bytes).unwrap_or(usize::MAX);
    let console = web::Data::new(console::ConsoleState::new(
        state.store.clone(),
        Arc::new(console::EngineResidency(service.clone())),
    ));
    let data = web::Data::new(state);
    let service = web::Data::from(service);
    Ok(HttpServer::new(move || {
        App::new()
            .app_data(data.clone())
            .app_data(service.clone())
            .app_data(web::PayloadConfig::new(max_upload))
            .wrap(actix_web::middleware::from_fn(api::metrics::track_requests))
            .configure(api::configure)
            .configure(console::configure(console.clone()))
    })
    .listen(listener)?
    .disable_signals()
    .shutdown_timeout(SHUTDOWN_GRACE_SECS)
    .run())
}

/// `punica serve`: build, log the address, serve until a signal.
pub async fn serve(settings: Settings) -> Result<(), StartupError> {
    let signals = ShutdownSignals::install()?;
    let app = Application::build(settings).await?;
    if app.state.settings.admin_token.is_none() {
        tracing::warn!("PUNICA_ADMIN_TOKEN is not set: the operator API rejects every request");
    }
    tracing::info!(
        address = %format!("http://{}:{}", host_of(&app.state.settings.bind), app.port()),
        "punica is serving"
    );
    app.run_until(signals.recv()).await
}

fn host_of(bind: &str) -> &str {
    bind.rsplit_once(':').map_or(bind, |(h, _)| h)
}

/// Whether `operator create` made a new account or reset an existing one's password.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OperatorOutcome {
    Created,
    PasswordReset,
}

/// `punica operator create --email E`: the password comes from `password` (the
/// `PUNICA_OPERATOR_PASSWORD` variable) or else the first line of stdin. An existing operator
/// with that email gets the new password.
pub async fn create_operator(
    settings: &Settings,
    email: &str,
    password: Option<String>,
) -> Result<(Operator, OperatorOutcome), StartupError> {
    let email = Email::parse(email)?;
    let password = match password {
        Some(p) => p,
        None => read_password_line()?,
    };
    let password = Password::parse(password)?;
    let hash = tokio::task::spawn_blocking(move || password.hash())
        .await
        .map_err(|e| StartupError::Task(e.to_string()))??;
    check_data_dir(&settings.data_dir)?;
    let db = Database::open(settings).await?;
    let result = match db.store.create_operator(&email, &hash).await {
        Ok(op) => Ok((op, OperatorOutcome::Created)),
        Err(StoreError::Conflict { .. }) => db
            .store
            .set_operator_password(&email, &hash)
            .await
            .map(|op| (op, OperatorOutcome::PasswordReset)),
        Err(e) => Err(e),
    };
    db.shutdown(false).await;
    Ok(result?)
}

fn read_password_line() -> Result<String, StartupError> {
    let mut line = String::new();
    std::io::stdin()
        .lock()
        .read_line(&mut line)
        .map_err(StartupError::Stdin)?;
    Ok(line.trim_end_matches(['\r', '\n']).to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readiness_starts_loading_only_when_a_model_is_configured() {
        assert_eq!(Readiness::new(false).model(), ModelState::NotConfigured);
        let r = Readiness::new(true);
        assert_eq!(r.model(), ModelState::Loading);
        let clone = r.clone();
        clone.set_model(ModelState::Loaded);
        assert_eq!(r.model(), ModelState::Loaded);
    }

    #[test]
    fn data_dir_below_a_file_is_reported_as_not_writable() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("file");
        std::fs::write(&file, b"x").unwrap();
        let err = check_data_dir(&file.join("data")).unwrap_err();
        assert!(err.to_string().contains("is not writable"), "{err}");
    }
}
