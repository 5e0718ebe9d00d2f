//! The admin console, tested over HTTP and in real headless Chromium. One test binary; the
//! service's test harness (throwaway Postgres, `spawn_app`, the tiny model) is shared with
//! `tests/api/`.

#[path = "../api/helpers.rs"]
mod helpers;
#[path = "../api/service_helpers.rs"]
mod service_helpers;
#[path = "../api/tiny_model.rs"]
mod tiny_model;

mod browser;
mod support;

mod adapters;
mod auth;
mod keys;
mod operator;
mod playground;
mod screenshots;
mod upload;
