//! engine::model::llama
