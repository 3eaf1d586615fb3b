//! Log setup: `tracing` to stderr, text or JSON, filtered by `HERALD_LOG` (or `RUST_LOG`).

use tracing_subscriber::EnvFilter;

use crate::config::LogFormat;

/// Env var holding the log filter (tracing-subscriber syntax), e.g. `info,herald_raft=debug`.
pub const LOG_FILTER_ENV: &str = "HERALD_LOG";

pub fn init(format: LogFormat) {
    let filter = std::env::var(LOG_FILTER_ENV)
        .ok()
        .or_else(|| std::env::var("RUST_LOG").ok())
        .unwrap_or_else(|| "info,openraft=warn,h2=warn,tower=warn,hyper=warn".into());
    let filter = EnvFilter::try_new(&filter).unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    // A second init (tests, dev mode) is harmless: the first subscriber stays.
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
}
