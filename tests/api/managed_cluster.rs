//! The managed cluster through the real binary: `punica serve` without DATABASE_URL starts a
//! private Postgres under the data dir, keeps its data across restarts and stops it on SIGTERM.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use punica::domain::{Quotas, TenantName};
use punica::store::Store;
use punica::store::managed::postmaster_pid;
use sqlx::postgres::PgConnectOptions;

use crate::helpers::punica_command;

struct Serving {
    child: Child,
    port: u16,
}

impl Drop for Serving {
    /// A failed test must not leave the service running (its exit watchdog then stops the
    /// cluster); after a clean stop this is a no-op.
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Starts `punica serve` on `data_dir` and waits for its "serving" log line.
fn start_serve(data_dir: &Path) -> Serving {
    let mut child = punica_command()
        .args([
            "serve",
            "--bind",
            "127.0.0.1:0",
            "--log",
            "info",
            "--data-dir",
        ])
        .arg(data_dir)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if let Some(rest) = line.split("http://127.0.0.1:").nth(1) {
                let port: String = rest.chars().take_while(char::is_ascii_digit).collect();
                let _ = tx.send(port.parse::<u16>().unwrap());
            }
        }
    });
    match rx.recv_timeout(Duration::from_secs(120)) {
        Ok(port) => Serving { child, port },
        Err(_) => {
            let _ = child.kill();
            let out = child.wait_with_output().unwrap();
            panic!(
                "serve did not come up: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
}

/// SIGTERM, then wait for a clean exit.
fn stop_serve(mut s: Serving) {
    kill(Pid::from_raw(s.child.id() as i32), Signal::SIGTERM).unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(status) = s.child.try_wait().unwrap() {
            assert!(status.success(), "serve exited with {status:?}");
            return;
        }
        assert!(
            Instant::now() < deadline,
            "serve did not stop after SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn cluster_options(data_dir: &Path) -> PgConnectOptions {
    PgConnectOptions::new()
        .socket(data_dir.join("postgres").join("run"))
        .port(punica::store::managed::SOCKET_PORT)
        .username(punica::store::managed::SUPERUSER)
        .database(punica::startup::MANAGED_DATABASE)
}

/// Alive and not a zombie (a container's init may be slow to reap the daemonised postmaster).
fn process_alive(pid: i32) -> bool {
    if kill(Pid::from_raw(pid), None).is_err() {
        return false;
    }
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_some_and(|state| state != "Z" && state != "X"),
        Err(_) => false,
    }
}

fn data_dir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    // As root the cluster runs as `postgres`, which must be able to enter the data dir.
    std::fs::set_permissions(
        dir.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    dir
}

#[tokio::test]
async fn managed_cluster_starts_survives_a_restart_with_its_data_and_stops_cleanly() {
    let dir = data_dir();
    let pgdata = dir.path().join("postgres").join("pgdata");

    let first = start_serve(dir.path());
    let ready = reqwest::get(format!("http://127.0.0.1:{}/readyz", first.port))
        .await
        .unwrap();
    assert_eq!(ready.status(), 200);
    let first_pid = postmaster_pid(&pgdata).expect("postmaster running");
    assert!(process_alive(first_pid));
    {
        let store = Store::connect(cluster_options(dir.path()), Duration::from_secs(10))
            .await
            .unwrap();
        store
            .create_tenant(&TenantName::parse("persisted").unwrap(), &Quotas::UNLIMITED)
            .await
            .unwrap();
        store.close().await;
    }
    stop_serve(first);
    assert!(
        !process_alive(first_pid),
        "postgres {first_pid} still running after shutdown"
    );
    assert!(
        !pgdata.join("postmaster.pid").exists(),
        "clean shutdown removes postmaster.pid"
    );

    let second = start_serve(dir.path());
    let second_pid = postmaster_pid(&pgdata).expect("postmaster running again");
    {
        let store = Store::connect(cluster_options(dir.path()), Duration::from_secs(10))
            .await
            .unwrap();
        let tenant = store
            .get_tenant_by_name(&TenantName::parse("persisted").unwrap())
            .await
            .expect("data survived the restart");
        assert_eq!(tenant.name.as_str(), "persisted");
        store.close().await;
    }
    stop_serve(second);
    assert!(
        !process_alive(second_pid),
        "postgres {second_pid} still running after shutdown"
    );
}

#[tokio::test]
async fn operator_create_shares_a_running_managed_cluster_and_leaves_it_running() {
    let dir = data_dir();
    let pgdata = dir.path().join("postgres").join("pgdata");
    let serving = start_serve(dir.path());
    let pid = postmaster_pid(&pgdata).unwrap();

    let out = punica_command()
        .args([
            "operator",
            "create",
            "--email",
            "ops@example.com",
            "--data-dir",
        ])
        .arg(dir.path())
        .env("PUNICA_OPERATOR_PASSWORD", "a long password")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        process_alive(pid),
        "the service's cluster must keep running"
    );
    let ready = reqwest::get(format!("http://127.0.0.1:{}/readyz", serving.port))
        .await
        .unwrap();
    assert_eq!(ready.status(), 200);
    stop_serve(serving);
    assert!(!process_alive(pid));
}

#[tokio::test]
async fn killed_service_leaves_no_postgres_behind() {
    let dir = data_dir();
    let pgdata = dir.path().join("postgres").join("pgdata");
    let mut serving = start_serve(dir.path());
    let pid = postmaster_pid(&pgdata).unwrap();
    // SIGKILL: no shutdown code runs; the exit watchdog must stop the cluster.
    serving.child.kill().unwrap();
    serving.child.wait().unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while process_alive(pid) {
        assert!(
            Instant::now() < deadline,
            "postgres {pid} outlived its killed owner"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // And the next start recovers the cluster.
    let again = start_serve(dir.path());
    stop_serve(again);
}
