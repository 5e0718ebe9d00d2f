//! engine::request
