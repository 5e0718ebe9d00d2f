//! Engine integration tests: one test binary, one module per area.

mod adapters;
mod bench;
mod golden;
mod smollm2;
