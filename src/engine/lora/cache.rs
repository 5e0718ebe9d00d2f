//! engine::lora::cache
