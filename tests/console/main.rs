//! The admin console, tested over HTTP and in real headless Chromium. One test binary; the
//! service's test harness (throwaway Postgres, `spawn_app`) is shared with `tests/api/`.

#[path = "../api/helpers.rs"]
mod helpers;

mod browser;
mod support;

mod adapters;
mod auth;
mod keys;
mod operator;
mod screenshots;
