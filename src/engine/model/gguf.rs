//! engine::model::gguf
