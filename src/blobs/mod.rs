//! blobs (filled in by its issue).
