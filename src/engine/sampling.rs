//! engine::sampling
