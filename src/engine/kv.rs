//! engine::kv
