//! LoRA adapters: PEFT parsing, the adapter cache and SGMV segment tables.

pub mod cache;
pub mod peft;
pub mod segments;
