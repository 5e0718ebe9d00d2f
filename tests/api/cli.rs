//! The built binary: bad configuration fails at start with one clear line and a non-zero exit
//! code; `operator create` writes a working login.

use std::io::Write;
use std::process::{Output, Stdio};
use std::time::Duration;

use punica::domain::{Email, Password};
use punica::store::Store;

use crate::helpers::{fresh_database, punica_command, write_file};

fn assert_one_line_failure(out: &Output, expected: &str) -> String {
    assert!(!out.status.success(), "exit status {:?}", out.status);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "stderr must be one line, got: {stderr:?}");
    assert!(lines[0].starts_with("punica: error: "), "{stderr}");
    assert!(
        lines[0].contains(expected),
        "expected `{expected}` in: {stderr}"
    );
    stderr
}

#[test]
fn unknown_key_in_the_config_file_fails_the_start_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_file(
        dir.path(),
        "punica.toml",
        "bind = \"127.0.0.1:0\"\ncolour = \"blue\"\n",
    );
    let out = punica_command()
        .args(["serve", "--config"])
        .arg(&config)
        .arg("--data-dir")
        .arg(dir.path().join("data"))
        .output()
        .unwrap();
    assert_one_line_failure(&out, "unknown field `colour`");
}

#[test]
fn config_file_named_by_environment_is_read() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_file(dir.path(), "punica.toml", "gpu_memory_fraction = 7.0\n");
    let out = punica_command()
        .arg("serve")
        .env("PUNICA_CONFIG", &config)
        .output()
        .unwrap();
    assert_one_line_failure(&out, "gpu_memory_fraction");
}

#[test]
fn flag_beats_environment_which_beats_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_file(dir.path(), "punica.toml", "device = \"cpu\"\n");
    // The environment's bad device overrides the file's good one...
    let out = punica_command()
        .args(["serve", "--config"])
        .arg(&config)
        .env("PUNICA_DEVICE", "tpu")
        .output()
        .unwrap();
    assert_one_line_failure(&out, "`tpu` is not one of cpu, cuda, auto");
    // ...and a flag overrides the environment (the start then fails later, on the data dir).
    let blocker = write_file(dir.path(), "blocker", "x");
    let out = punica_command()
        .args(["serve", "--config"])
        .arg(&config)
        .env("PUNICA_DEVICE", "tpu")
        .args(["--device", "cpu", "--data-dir"])
        .arg(blocker.join("data"))
        .output()
        .unwrap();
    assert_one_line_failure(&out, "is not writable");
}

#[test]
fn unreachable_database_url_fails_the_start_without_leaking_the_password() {
    let dir = tempfile::tempdir().unwrap();
    let out = punica_command()
        .args(["serve", "--bind", "127.0.0.1:0", "--data-dir"])
        .arg(dir.path())
        .env(
            "DATABASE_URL",
            "postgres://punica:hunter2@127.0.0.1:1/punica",
        )
        .output()
        .unwrap();
    let stderr =
        assert_one_line_failure(&out, "cannot connect to the database at 127.0.0.1:1/punica");
    assert!(!stderr.contains("hunter2"), "{stderr}");
}

#[test]
fn unwritable_data_dir_fails_the_start() {
    let dir = tempfile::tempdir().unwrap();
    // Below a regular file no directory can be created, even for root.
    let blocker = write_file(dir.path(), "blocker", "x");
    let out = punica_command()
        .args(["serve", "--bind", "127.0.0.1:0", "--data-dir"])
        .arg(blocker.join("data"))
        .output()
        .unwrap();
    assert_one_line_failure(&out, "is not writable");
}

#[test]
fn taken_listen_address_fails_the_start() {
    let dir = tempfile::tempdir().unwrap();
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let out = punica_command()
        .args(["serve", "--bind", &addr, "--data-dir"])
        .arg(dir.path())
        .output()
        .unwrap();
    assert_one_line_failure(&out, &format!("cannot listen on {addr}"));
}

#[tokio::test]
async fn operator_create_reads_the_password_from_stdin_and_stores_an_argon2_hash() {
    let db = fresh_database().await;
    let dir = tempfile::tempdir().unwrap();
    let mut child = punica_command()
        .args([
            "operator",
            "create",
            "--email",
            "Admin@Example.com",
            "--data-dir",
        ])
        .arg(dir.path())
        .env("DATABASE_URL", &db.url)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"correct horse battery\n")
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("operator created admin@example.com"));

    let store = Store::connect(db.options.clone(), Duration::from_secs(10))
        .await
        .unwrap();
    let (_, hash) = store
        .operator_credentials(&Email::parse("admin@example.com").unwrap())
        .await
        .unwrap()
        .expect("operator exists");
    assert!(hash.starts_with("$argon2id$"));
    assert!(
        Password::parse("correct horse battery")
            .unwrap()
            .verify(&hash)
    );

    // Running it again with the environment's password resets the password.
    let out = punica_command()
        .args(["operator", "create", "--email", "admin@example.com"])
        .env("DATABASE_URL", &db.url)
        .env("PUNICA_DATA_DIR", dir.path())
        .env("PUNICA_OPERATOR_PASSWORD", "another long password")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (_, hash) = store
        .operator_credentials(&Email::parse("admin@example.com").unwrap())
        .await
        .unwrap()
        .unwrap();
    assert!(
        Password::parse("another long password")
            .unwrap()
            .verify(&hash)
    );
}

#[test]
fn operator_create_rejects_a_short_password_in_one_line() {
    let dir = tempfile::tempdir().unwrap();
    let out = punica_command()
        .args(["operator", "create", "--email", "a@b.co", "--data-dir"])
        .arg(dir.path())
        .env("PUNICA_OPERATOR_PASSWORD", "short")
        .output()
        .unwrap();
    assert_one_line_failure(
        &out,
        "password must be between 8 and 1024 characters, got 5",
    );
}
