//! engine::scheduler
