//! Punica-rs: multi-tenant LoRA serving. One base LLM, many tenants' adapters, one batch.
//!
//! The library holds everything; `main.rs` is a thin CLI over it. See ARCHITECTURE.md for the map.

pub mod api;
pub mod blobs;
pub mod config;
pub mod console;
pub mod domain;
pub mod engine;
pub mod startup;
pub mod store;
pub mod telemetry;
