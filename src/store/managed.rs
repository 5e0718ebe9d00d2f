//! A private Postgres cluster under the data dir, for running without `DATABASE_URL`.
//!
//! `initdb` and `pg_ctl` are found on `PATH` or under `/usr/lib/postgresql/*/bin` (Debian keeps
//! them off `PATH`). Postgres refuses to run as root, so as root every server command goes
//! through `runuser -u postgres --` on directories owned by `postgres`. The server listens only
//! on a Unix socket in a directory that only its owner (and root) can enter, so `trust`
//! authentication admits nobody else. The cluster survives restarts of the service: a second
//! start reuses the data, and a server still running from a crashed process is adopted.
//!
//! Everything here is blocking (it runs external commands); async callers use `spawn_blocking`.

use std::ffi::OsStr;
use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use sha2::{Digest, Sha256};
use sqlx::postgres::PgConnectOptions;

/// The superuser created by `initdb` and the name we connect as.
pub const SUPERUSER: &str = "postgres";
/// Port number of the socket file name (`.s.PGSQL.<port>`); nothing listens on TCP.
pub const SOCKET_PORT: u16 = 5432;
/// Longest socket path the kernel accepts is 107 bytes; stay clear of it.
const MAX_SOCKET_PATH: usize = 100;

/// Why the managed cluster could not be prepared, started or stopped. One line each.
#[derive(Debug, thiserror::Error)]
pub enum ManagedError {
    /// No `initdb`/`pg_ctl` anywhere we looked.
    #[error(
        "no PostgreSQL server binaries found (looked on PATH and in /usr/lib/postgresql/*/bin); \
         install postgresql or set DATABASE_URL"
    )]
    NoBinaries,
    /// Running as root without a `postgres` account to run the server as.
    #[error("running as root needs a `postgres` system user to run the database server as")]
    NoPostgresUser,
    /// The `postgres` user cannot reach the cluster directory.
    #[error(
        "the postgres user cannot reach {path} (a parent directory is not searchable by it); \
         choose a data dir under a world-searchable path such as /var/lib or /srv"
    )]
    Unreachable { path: PathBuf },
    /// A filesystem operation failed.
    #[error("cannot {action} {path}: {source}")]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A command could not be run or failed.
    #[error("{command} failed: {detail}")]
    Command { command: String, detail: String },
}

/// Tuning of a managed cluster.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ManagedOptions {
    /// `false` turns off fsync and friends: for throwaway test clusters only.
    pub durable: bool,
    /// Server `max_connections`.
    pub max_connections: u32,
}

impl Default for ManagedOptions {
    fn default() -> Self {
        ManagedOptions {
            durable: true,
            max_connections: 100,
        }
    }
}

#[derive(Clone, Debug)]
struct RunAs {
    uid: u32,
    gid: u32,
}

/// A running private cluster. Stop it with [`ManagedPostgres::stop`]; dropping a cluster this
/// value started also stops it.
#[derive(Debug)]
pub struct ManagedPostgres {
    root: PathBuf,
    pgdata: PathBuf,
    socket_dir: PathBuf,
    initdb: PathBuf,
    pg_ctl: PathBuf,
    run_as: Option<RunAs>,
    started_here: bool,
    stopped: bool,
}

impl ManagedPostgres {
    /// Initialises (first time) and starts the cluster kept in `root`, or adopts the server
    /// already running on it.
    pub fn start(root: &Path, options: ManagedOptions) -> Result<ManagedPostgres, ManagedError> {
        let (initdb, pg_ctl) = find_binaries().ok_or(ManagedError::NoBinaries)?;
        let run_as = if nix::unistd::geteuid().is_root() {
            let user = nix::unistd::User::from_name(SUPERUSER)
                .ok()
                .flatten()
                .ok_or(ManagedError::NoPostgresUser)?;
            Some(RunAs {
                uid: user.uid.as_raw(),
                gid: user.gid.as_raw(),
            })
        } else {
            None
        };

        create_private_dir(root, run_as.as_ref())?;
        let root = fs::canonicalize(root).map_err(|source| ManagedError::Io {
            action: "resolve",
            path: root.to_owned(),
            source,
        })?;
        if let Some(ra) = &run_as {
            check_reachable(&root, ra)?;
        }
        let pgdata = root.join("pgdata");
        let socket_dir = socket_dir_for(&root);
        create_private_dir(&socket_dir, run_as.as_ref())?;

        let mut pg = ManagedPostgres {
            root,
            pgdata,
            socket_dir,
            initdb,
            pg_ctl,
            run_as,
            started_here: false,
            stopped: false,
        };
        pg.init_if_needed()?;
        if pg.is_running() {
            tracing::info!(pgdata = %pg.pgdata.display(), "adopting the running managed Postgres");
        } else {
            pg.start_server(options)?;
            pg.started_here = true;
            tracing::info!(pgdata = %pg.pgdata.display(), "managed Postgres started");
        }
        Ok(pg)
    }

    fn init_if_needed(&self) -> Result<(), ManagedError> {
        if self.pgdata.join("PG_VERSION").exists() {
            return Ok(());
        }
        // A directory without PG_VERSION is the leftover of an interrupted initdb.
        if self.pgdata.exists() {
            fs::remove_dir_all(&self.pgdata).map_err(|source| ManagedError::Io {
                action: "remove the incomplete cluster",
                path: self.pgdata.clone(),
                source,
            })?;
        }
        tracing::info!(pgdata = %self.pgdata.display(), "initialising managed Postgres cluster");
        self.run(
            &self.initdb,
            [
                OsStr::new("-D"),
                self.pgdata.as_os_str(),
                OsStr::new("-U"),
                OsStr::new(SUPERUSER),
                OsStr::new("-A"),
                OsStr::new("trust"),
                OsStr::new("-E"),
                OsStr::new("UTF8"),
                OsStr::new("--locale=C"),
                OsStr::new("--no-instructions"),
            ],
        )?;
        Ok(())
    }

    fn start_server(&self, options: ManagedOptions) -> Result<(), ManagedError> {
        let mut server_opts = format!(
            "-c listen_addresses='' -c unix_socket_directories={} -c unix_socket_permissions=0700 \
             -c max_connections={} -p {SOCKET_PORT}",
            shell_quote(&self.socket_dir.to_string_lossy()),
            options.max_connections,
        );
        if !options.durable {
            server_opts.push_str(" -c fsync=off -c synchronous_commit=off -c full_page_writes=off");
        }
        let log = self.root.join("postgres.log");
        self.run(
            &self.pg_ctl,
            [
                OsStr::new("-D"),
                self.pgdata.as_os_str(),
                OsStr::new("-l"),
                log.as_os_str(),
                OsStr::new("-w"),
                OsStr::new("-t"),
                OsStr::new("60"),
                OsStr::new("-s"),
                OsStr::new("-o"),
                OsStr::new(&server_opts),
                OsStr::new("start"),
            ],
        )
        .map_err(|e| match e {
            ManagedError::Command { command, detail } => ManagedError::Command {
                command,
                detail: format!("{detail} (server log: {})", log.display()),
            },
            other => other,
        })?;
        Ok(())
    }

    /// Whether a server is running on this cluster's data directory.
    pub fn is_running(&self) -> bool {
        self.command(&self.pg_ctl)
            .arg("-D")
            .arg(&self.pgdata)
            .arg("status")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    }

    /// Stops the server (fast shutdown: open sessions are disconnected). Idempotent.
    pub fn stop(&mut self) -> Result<(), ManagedError> {
        if self.stopped {
            return Ok(());
        }
        if self.is_running() {
            self.run(
                &self.pg_ctl,
                [
                    OsStr::new("-D"),
                    self.pgdata.as_os_str(),
                    OsStr::new("-m"),
                    OsStr::new("fast"),
                    OsStr::new("-w"),
                    OsStr::new("-t"),
                    OsStr::new("60"),
                    OsStr::new("-s"),
                    OsStr::new("stop"),
                ],
            )?;
            tracing::info!(pgdata = %self.pgdata.display(), "managed Postgres stopped");
        }
        self.stopped = true;
        Ok(())
    }

    /// Whether this value started the server (as opposed to adopting a running one).
    pub fn started_here(&self) -> bool {
        self.started_here
    }

    /// The cluster's data directory.
    pub fn pgdata(&self) -> &Path {
        &self.pgdata
    }

    /// The directory holding the server's socket.
    pub fn socket_dir(&self) -> &Path {
        &self.socket_dir
    }

    /// Process id of the running postmaster, from `postmaster.pid`.
    pub fn postmaster_pid(&self) -> Option<i32> {
        postmaster_pid(&self.pgdata)
    }

    /// Connection options for `database` on this cluster.
    pub fn connect_options(&self, database: &str) -> PgConnectOptions {
        PgConnectOptions::new()
            .socket(&self.socket_dir)
            .port(SOCKET_PORT)
            .username(SUPERUSER)
            .database(database)
    }

    /// Starts a detached shell that waits for process `owner` to exit, then asks the postmaster
    /// to shut down (and afterwards removes `cleanup`, if given). This stops the cluster even when
    /// the owner dies without running its shutdown code (a test binary's statics are never
    /// dropped; a killed service never reaches its shutdown path). Kill the returned child to
    /// cancel it. The watchdog signals the postmaster by pid, so it never touches a newer server
    /// started on the same directory.
    pub fn spawn_exit_watchdog(
        &self,
        owner: u32,
        cleanup: Option<&Path>,
    ) -> Result<Child, ManagedError> {
        let pid = self.postmaster_pid().ok_or_else(|| ManagedError::Command {
            command: "watchdog".into(),
            detail: format!("no postmaster.pid in {}", self.pgdata.display()),
        })?;
        // `alive` treats zombies as dead: in containers whose init does not reap, the exited
        // (daemonised) postmaster would otherwise look alive forever.
        let script = "alive() { kill -0 \"$1\" 2>/dev/null && \
                        [ \"$(sed -n 's/^.*) \\(.\\).*$/\\1/p' /proc/$1/stat 2>/dev/null)\" != Z ]; }; \
                      while alive \"$1\"; do sleep 0.2; done; \
                      kill -INT \"$2\" 2>/dev/null; \
                      if [ -n \"$3\" ]; then \
                        i=0; while alive \"$2\" && [ $i -lt 300 ]; do sleep 0.1; i=$((i+1)); done; \
                        rm -rf \"$3\"; \
                      fi";
        Command::new("sh")
            .arg("-c")
            .arg(script)
            .arg("punica-pg-watchdog")
            .arg(owner.to_string())
            .arg(pid.to_string())
            .arg(cleanup.map(Path::as_os_str).unwrap_or_default())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            // Own process group: a Ctrl-C meant for the owner must not kill the watchdog.
            .process_group(0)
            .spawn()
            .map_err(|e| ManagedError::Command {
                command: "sh (watchdog)".into(),
                detail: e.to_string(),
            })
    }

    fn command(&self, bin: &Path) -> Command {
        let mut cmd = match &self.run_as {
            Some(_) => {
                let mut c = Command::new("runuser");
                c.args(["-u", SUPERUSER, "--"]).arg(bin);
                c
            }
            None => Command::new(bin),
        };
        // The server user may not be able to enter our working directory.
        cmd.current_dir(&self.root).stdin(Stdio::null());
        cmd
    }

    fn run<'a>(
        &self,
        bin: &Path,
        args: impl IntoIterator<Item = &'a OsStr>,
    ) -> Result<(), ManagedError> {
        let name = bin.file_name().map_or_else(
            || bin.display().to_string(),
            |n| n.to_string_lossy().into_owned(),
        );
        let output = self
            .command(bin)
            .args(args)
            .output()
            .map_err(|e| ManagedError::Command {
                command: name.clone(),
                detail: e.to_string(),
            })?;
        if output.status.success() {
            return Ok(());
        }
        let stderr = String::from_utf8_lossy(&output.stderr);
        let stdout = String::from_utf8_lossy(&output.stdout);
        let detail = stderr
            .lines()
            .chain(stdout.lines())
            .map(str::trim)
            .rfind(|l| !l.is_empty())
            .map_or_else(|| output.status.to_string(), str::to_owned);
        Err(ManagedError::Command {
            command: name,
            detail,
        })
    }
}

impl Drop for ManagedPostgres {
    fn drop(&mut self) {
        if self.started_here
            && !self.stopped
            && let Err(e) = self.stop()
        {
            tracing::warn!(error = %e, "stopping managed Postgres on drop failed");
        }
    }
}

/// Process id recorded in `<pgdata>/postmaster.pid`.
pub fn postmaster_pid(pgdata: &Path) -> Option<i32> {
    fs::read_to_string(pgdata.join("postmaster.pid"))
        .ok()?
        .lines()
        .next()?
        .trim()
        .parse()
        .ok()
}

/// `(initdb, pg_ctl)`: from `PATH` first, else the newest `/usr/lib/postgresql/<v>/bin`.
pub fn find_binaries() -> Option<(PathBuf, PathBuf)> {
    let on_path = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .unwrap_or_default();
    let mut debian: Vec<(u32, PathBuf)> = fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let v = e.file_name().to_str()?.parse::<u32>().ok()?;
            Some((v, e.path().join("bin")))
        })
        .collect();
    debian.sort_by_key(|(v, _)| std::cmp::Reverse(*v));
    on_path
        .into_iter()
        .chain(debian.into_iter().map(|(_, p)| p))
        .find_map(|dir| {
            let initdb = dir.join("initdb");
            let pg_ctl = dir.join("pg_ctl");
            (is_executable(&initdb) && is_executable(&pg_ctl)).then_some((initdb, pg_ctl))
        })
}

fn is_executable(p: &Path) -> bool {
    fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

fn create_private_dir(dir: &Path, run_as: Option<&RunAs>) -> Result<(), ManagedError> {
    let io = |action: &'static str| {
        move |source| ManagedError::Io {
            action,
            path: dir.to_owned(),
            source,
        }
    };
    fs::create_dir_all(dir).map_err(io("create"))?;
    fs::set_permissions(dir, fs::Permissions::from_mode(0o700))
        .map_err(io("set permissions on"))?;
    if let Some(ra) = run_as {
        std::os::unix::fs::chown(dir, Some(ra.uid), Some(ra.gid)).map_err(io("chown"))?;
    }
    Ok(())
}

/// The server user must be able to search every parent of the cluster directory.
fn check_reachable(root: &Path, ra: &RunAs) -> Result<(), ManagedError> {
    for dir in root.ancestors().skip(1) {
        let Ok(meta) = fs::metadata(dir) else {
            continue;
        };
        let mode = meta.mode();
        let searchable = if meta.uid() == ra.uid {
            mode & 0o100 != 0
        } else if meta.gid() == ra.gid {
            mode & 0o010 != 0
        } else {
            mode & 0o001 != 0
        };
        if !searchable {
            return Err(ManagedError::Unreachable {
                path: root.to_owned(),
            });
        }
    }
    Ok(())
}

/// `<root>/run` when the socket path fits the kernel's limit, else a directory under /tmp
/// named after the cluster (stable across restarts).
fn socket_dir_for(root: &Path) -> PathBuf {
    let local = root.join("run");
    let socket_len = local.as_os_str().len() + format!("/.s.PGSQL.{SOCKET_PORT}.lock").len();
    if socket_len <= MAX_SOCKET_PATH {
        return local;
    }
    let digest = Sha256::digest(root.as_os_str().as_encoded_bytes());
    std::env::temp_dir().join(format!("punica-pg-{}", hex::encode(&digest[..8])))
}

fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "'\\''"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_cluster_paths_get_a_short_socket_dir() {
        let short = socket_dir_for(Path::new("/srv/punica/postgres"));
        assert_eq!(short, Path::new("/srv/punica/postgres/run"));
        let long_root = PathBuf::from(format!("/srv/{}/postgres", "x".repeat(120)));
        let long = socket_dir_for(&long_root);
        assert!(long.as_os_str().len() < 60, "{}", long.display());
        assert_eq!(long, socket_dir_for(&long_root), "stable across restarts");
    }

    #[test]
    fn shell_quoting_survives_embedded_quotes() {
        assert_eq!(shell_quote("/a b/it's"), "'/a b/it'\\''s'");
    }
}
