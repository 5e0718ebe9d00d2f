//! Engine integration tests: one test binary, one module per area.

mod golden;
mod smollm2;
