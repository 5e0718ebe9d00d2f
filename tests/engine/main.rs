//! Engine integration tests: one test binary, one module per area.

mod adapters;
mod bench;
#[path = "../common/demo_model.rs"]
mod demo_model;
mod golden;
mod smollm2;
