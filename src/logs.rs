//! Where the process's `tracing` events go and how they look: `--log-format text|json` on
//! stderr, ANSI colour only on a terminal and never with `NO_COLOR`, and a `RUST_LOG` that does
//! not parse refused at start (exit 64) rather than silently replaced.
//!
//! Depends on nothing of the servers; `main` calls [`init`] once, before anything binds.

use std::io::IsTerminal;

use clap::ValueEnum;
use tracing_subscriber::EnvFilter;

/// The filter used when `RUST_LOG` is unset or empty.
pub const DEFAULT_FILTER: &str = "info";

/// How log lines look.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// One human-readable line per event.
    #[default]
    Text,
    /// One JSON object per line: `timestamp`, `level`, `target`, `message` and the event's
    /// fields at the top level.
    Json,
}

/// Why logging could not start.
#[derive(Debug, thiserror::Error)]
pub enum LogError {
    /// `RUST_LOG` does not parse.
    #[error(
        "RUST_LOG={value:?} is not a valid log filter ({reason}); e.g. RUST_LOG=info or RUST_LOG=warn,workerpush=debug"
    )]
    Filter {
        /// What was given.
        value: String,
        /// The parser's words.
        reason: String,
    },
    /// `RUST_LOG` is not UTF-8.
    #[error("RUST_LOG is not valid UTF-8")]
    NotUnicode,
}

impl LogError {
    /// The process exit code: 64 (usage), as for every configuration error.
    pub fn exit_code(&self) -> u8 {
        64
    }
}

/// The filter `RUST_LOG` asks for, or [`DEFAULT_FILTER`] when it is unset or empty.
pub fn filter_from(
    rust_log: Option<Result<String, std::env::VarError>>,
) -> Result<EnvFilter, LogError> {
    match rust_log {
        Some(Ok(value)) if !value.trim().is_empty() => {
            EnvFilter::builder()
                .parse(&value)
                .map_err(|e| LogError::Filter {
                    reason: e.to_string(),
                    value,
                })
        }
        Some(Err(std::env::VarError::NotUnicode(_))) => Err(LogError::NotUnicode),
        _ => Ok(EnvFilter::new(DEFAULT_FILTER)),
    }
}

/// Whether text logs may carry colour: stderr is a terminal and `NO_COLOR` is unset or empty
/// (<https://no-color.org>).
pub fn colour_allowed(stderr_is_terminal: bool, no_color: Option<std::ffi::OsString>) -> bool {
    stderr_is_terminal && no_color.is_none_or(|v| v.is_empty())
}

/// Installs the process's subscriber: events to stderr in `format`, filtered by `RUST_LOG`.
pub fn init(format: LogFormat) -> Result<(), LogError> {
    let filter = filter_from(Some(std::env::var("RUST_LOG")))?;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder
            .with_ansi(colour_allowed(
                std::io::stderr().is_terminal(),
                std::env::var_os("NO_COLOR"),
            ))
            .init(),
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .with_span_list(true)
            .init(),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_unset_or_empty_rust_log_means_info() {
        assert_eq!(filter_from(None).unwrap().to_string(), "info");
        assert_eq!(
            filter_from(Some(Ok("  ".into()))).unwrap().to_string(),
            "info"
        );
        assert_eq!(
            filter_from(Some(Err(std::env::VarError::NotPresent)))
                .unwrap()
                .to_string(),
            "info"
        );
    }

    #[test]
    fn a_rust_log_that_does_not_parse_is_refused_in_words() {
        let error = filter_from(Some(Ok("info,workerpush=loud".into()))).unwrap_err();
        let text = error.to_string();
        assert!(
            text.starts_with("RUST_LOG=\"info,workerpush=loud\" is not a valid log filter"),
            "{text}"
        );
        assert_eq!(error.exit_code(), 64);
        assert!(filter_from(Some(Ok("warn,workerpush::http=debug".into()))).is_ok());
    }

    #[test]
    fn colour_only_on_a_terminal_and_never_with_no_color() {
        assert!(colour_allowed(true, None));
        assert!(colour_allowed(true, Some("".into())));
        assert!(!colour_allowed(true, Some("1".into())));
        assert!(!colour_allowed(false, None));
    }
}
