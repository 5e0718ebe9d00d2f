//! engine::model::config
