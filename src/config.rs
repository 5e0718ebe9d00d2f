//! Settings: defaults, optional TOML file, PUNICA_* environment, CLI flags.
