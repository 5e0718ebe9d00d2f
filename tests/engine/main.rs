//! Engine integration tests: one test binary, one module per area.

mod adapters;
mod golden;
mod smollm2;
