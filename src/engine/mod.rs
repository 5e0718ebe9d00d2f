//! The engine: model, backends, LoRA, scheduler. Never imports sqlx or actix.

pub mod backend;
pub mod kv;
pub mod lora;
pub mod model;
pub mod request;
pub mod sampling;
pub mod scheduler;
