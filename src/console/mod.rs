//! console (filled in by its issue).
