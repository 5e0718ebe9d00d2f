//! The Llama-family model: config, weights, tokenizer, GGUF import and the forward pass.

pub mod bench;
pub mod config;
pub mod gguf;
pub mod llama;
pub mod tokenizer;
pub mod weights;
