//! engine::model::tokenizer
