//! Model-file integration tests: GGUF reading and import, the demo model, the tokenizer.

mod gguf_format;
mod helpers;
mod import;
mod tokenizer;
