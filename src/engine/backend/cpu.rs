//! The f32 CPU backend: the oracle every other backend is tested against.
