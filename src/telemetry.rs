//! Logging: `tracing` to stdout with an `EnvFilter` from the `log` setting. Logs go to stdout so
//! that stderr carries only the one-line fatal error of a failed start.

use tracing_subscriber::EnvFilter;

/// Installs the global subscriber. A second call (tests) keeps the first subscriber.
pub fn init(filter: &str) {
    let filter = EnvFilter::try_new(filter).unwrap_or_else(|_| EnvFilter::new("info"));
    // Err only means a subscriber is already installed, which is fine.
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stdout)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stdout()))
        .with_target(true)
        .try_init();
}

/// Renders an error and its sources as one line: `outer: inner: innermost`, skipping a source
/// whose text the outer message already contains.
pub fn error_chain(error: &dyn std::error::Error) -> String {
    let mut out = error.to_string();
    let mut source = error.source();
    while let Some(e) = source {
        let text = e.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = e.source();
    }
    out.split_whitespace().collect::<Vec<_>>().join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("cannot start")]
    struct Outer(#[source] std::io::Error);

    #[test]
    fn error_chain_is_one_line_with_every_cause() {
        let e = Outer(std::io::Error::other("disk\nfull"));
        assert_eq!(error_chain(&e), "cannot start: disk full");
    }
}
