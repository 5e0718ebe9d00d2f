//! engine::lora::peft
