//! Model-file integration tests: GGUF reading and import, the demo model, the tokenizer.

#[path = "../common/demo_model.rs"]
mod demo_model;
mod gguf_format;
mod helpers;
mod import;
mod tokenizer;
