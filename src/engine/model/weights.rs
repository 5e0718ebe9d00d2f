//! engine::model::weights
