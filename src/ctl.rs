//! `workerpush ctl`: the operator's command line over the core's admin API (`/v1/workers`,
//! `/v1/workers/{name}`, `/v1/consumers`) and the upload server (`delete`), as a table or the
//! API's own JSON (`--json`).
//!
//! Reads the answers as JSON values, not as the server's types, so that it keeps working
//! against a core that adds fields. Depends on nothing of the servers.

use std::time::{Duration, Instant};

use serde_json::Value;

use crate::config::{CtlArgs, CtlCommand};

/// How often `wait` looks again.
const WAIT_POLL: Duration = Duration::from_millis(200);

/// Why a `ctl` command did not do what it was asked.
#[derive(Debug, thiserror::Error)]
pub enum CtlError {
    /// A URL flag does not parse.
    #[error("{flag}: {url:?} is not an http:// or https:// URL")]
    BadUrl {
        /// The flag and its environment variable.
        flag: &'static str,
        /// What was given.
        url: String,
    },
    /// No token for the API the command needs.
    #[error("no token: set {flag}")]
    NoToken {
        /// The flag and its environment variable.
        flag: &'static str,
    },
    /// The server could not be reached or did not answer in time.
    #[error("cannot reach {url} ({flag}): {reason}")]
    Unreachable {
        /// The request's URL.
        url: String,
        /// The flag that chose the server.
        flag: &'static str,
        /// In words.
        reason: String,
    },
    /// The server refused the request.
    #[error("{url} answered {status}: {message}{hint}")]
    Refused {
        /// The request's URL.
        url: String,
        /// The HTTP status.
        status: u16,
        /// The server's words.
        message: String,
        /// What to check.
        hint: &'static str,
    },
    /// A consumer refused the revision.
    #[error("{worker}: revision {revision} was refused: {failures}")]
    RefusedByConsumer {
        /// The worker.
        worker: String,
        /// The revision looked at.
        revision: u64,
        /// Who refused and why.
        failures: String,
    },
    /// The timeout passed first.
    #[error("{worker}: revision {revision} not everywhere within {timeout:?}; last seen: {last}")]
    TimedOut {
        /// The worker.
        worker: String,
        /// The revision waited for.
        revision: u64,
        /// `--timeout`.
        timeout: Duration,
        /// What the last look said.
        last: String,
    },
}

impl CtlError {
    /// The process exit code: 2 when a consumer refused, 3 on timeout, 64 for bad flags, 1
    /// otherwise.
    pub fn exit_code(&self) -> u8 {
        match self {
            Self::RefusedByConsumer { .. } => 2,
            Self::TimedOut { .. } => 3,
            Self::BadUrl { .. } | Self::NoToken { .. } => 64,
            _ => 1,
        }
    }
}

const ADMIN_URL_FLAG: &str = "--admin-url / WORKERPUSH_ADMIN_URL";
const UPLOAD_URL_FLAG: &str = "--upload-url / WORKERPUSH_UPLOAD_URL";

/// Runs one `ctl` command; answers what to print on stdout.
pub async fn run(args: CtlArgs) -> Result<String, CtlError> {
    let client = Client::new(&args)?;
    let (answer, table): (Value, fn(&Value) -> String) = match &args.command {
        CtlCommand::Workers => (client.admin("/v1/workers").await?, workers_table),
        CtlCommand::Worker { name } => (
            client.admin(&format!("/v1/workers/{}", path(name))).await?,
            worker_table,
        ),
        CtlCommand::Consumers => (client.admin("/v1/consumers").await?, consumers_table),
        CtlCommand::Wait {
            name,
            revision,
            timeout,
        } => (client.wait(name, *revision, *timeout).await?, worker_table),
        CtlCommand::Delete { name } => (client.delete(name).await?, deleted_line),
    };
    Ok(if args.json {
        answer.to_string()
    } else {
        table(&answer)
    })
}

fn deleted_line(answer: &Value) -> String {
    format!(
        "deleted {} (revision {})",
        text(&answer["worker_name"]),
        text(&answer["revision"])
    )
}

struct Client {
    http: reqwest::Client,
    admin_url: String,
    admin_token: Option<String>,
    upload_url: String,
    upload_token: Option<String>,
}

impl Client {
    fn new(args: &CtlArgs) -> Result<Self, CtlError> {
        let base = |url: &str, flag| {
            let trimmed = url.trim_end_matches('/');
            if trimmed.starts_with("http://") || trimmed.starts_with("https://") {
                Ok(trimmed.to_owned())
            } else {
                Err(CtlError::BadUrl {
                    flag,
                    url: url.to_owned(),
                })
            }
        };
        let nonempty = |token: &Option<String>| token.clone().filter(|t| !t.is_empty());
        crate::tls::install_crypto_provider();
        let http = reqwest::Client::builder()
            .timeout(args.request_timeout)
            .build()
            .map_err(|e| CtlError::Unreachable {
                url: args.admin_url.clone(),
                flag: ADMIN_URL_FLAG,
                reason: crate::http::upload::error_chain(&e),
            })?;
        Ok(Self {
            http,
            admin_url: base(&args.admin_url, ADMIN_URL_FLAG)?,
            // As on the server: the admin token defaults to the upload token.
            admin_token: nonempty(&args.admin_token).or_else(|| nonempty(&args.upload_token)),
            upload_url: base(&args.upload_url, UPLOAD_URL_FLAG)?,
            upload_token: nonempty(&args.upload_token),
        })
    }

    async fn admin(&self, route: &str) -> Result<Value, CtlError> {
        let token = self.admin_token.as_deref().ok_or(CtlError::NoToken {
            flag: "--admin-token / ADMIN_TOKEN (or UPLOAD_TOKEN)",
        })?;
        let url = format!("{}{route}", self.admin_url);
        let request = self.http.get(&url).bearer_auth(token);
        send(
            request,
            url,
            ADMIN_URL_FLAG,
            "; is --admin-token / ADMIN_TOKEN the core's?",
        )
        .await
    }

    async fn delete(&self, name: &str) -> Result<Value, CtlError> {
        let token = self.upload_token.as_deref().ok_or(CtlError::NoToken {
            flag: "--upload-token / UPLOAD_TOKEN",
        })?;
        let url = format!("{}/workers/{}", self.upload_url, path(name));
        let request = self.http.delete(&url).bearer_auth(token);
        send(
            request,
            url,
            UPLOAD_URL_FLAG,
            "; is --upload-token / UPLOAD_TOKEN the upload server's?",
        )
        .await
    }

    /// Looks at `name` until its propagation of `revision` (or a later one) is complete or
    /// failed, or `timeout` passes. A worker not live yet (404) is waited for too.
    async fn wait(&self, name: &str, revision: u64, timeout: Duration) -> Result<Value, CtlError> {
        let deadline = Instant::now() + timeout;
        let route = format!("/v1/workers/{}", path(name));
        loop {
            let last = match self.admin(&route).await {
                Ok(answer) => {
                    let at = answer["revision"].as_u64().unwrap_or(0);
                    let state = answer["propagation"]["state"].as_str().unwrap_or("");
                    if at >= revision && state == "complete" {
                        return Ok(answer);
                    }
                    if at >= revision && state == "failed" {
                        return Err(CtlError::RefusedByConsumer {
                            worker: name.to_owned(),
                            revision: at,
                            failures: failures(&answer["propagation"]["failed"]),
                        });
                    }
                    format!("revision {at}, {state}")
                }
                Err(CtlError::Refused { status: 404, .. }) => "no live version".to_owned(),
                Err(other) => return Err(other),
            };
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(CtlError::TimedOut {
                    worker: name.to_owned(),
                    revision,
                    timeout,
                    last,
                });
            }
            // The last look comes at the deadline itself.
            tokio::time::sleep(left.min(WAIT_POLL)).await;
        }
    }
}

async fn send(
    request: reqwest::RequestBuilder,
    url: String,
    flag: &'static str,
    auth_hint: &'static str,
) -> Result<Value, CtlError> {
    let unreachable = |url: &str, e: reqwest::Error| CtlError::Unreachable {
        url: url.to_owned(),
        flag,
        reason: crate::http::upload::error_chain(&e),
    };
    let response = request.send().await.map_err(|e| unreachable(&url, e))?;
    let status = response.status().as_u16();
    let body = response.text().await.map_err(|e| unreachable(&url, e))?;
    let value: Value = serde_json::from_str(&body).unwrap_or(Value::Null);
    if (200..300).contains(&status) {
        return Ok(value);
    }
    let message = value["error"]
        .as_str()
        .map_or_else(|| body.trim().to_owned(), str::to_owned);
    Err(CtlError::Refused {
        url,
        status,
        message,
        hint: if status == 401 || status == 403 {
            auth_hint
        } else {
            ""
        },
    })
}

/// A worker name as one URL path segment (names are `[a-z0-9-]`; anything else is escaped so
/// that the server, not the URL, refuses it).
fn path(name: &str) -> String {
    name.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.' {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

/// A JSON value as a table cell.
fn text(value: &Value) -> String {
    match value {
        Value::Null => "-".to_owned(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

fn failures(list: &Value) -> String {
    let all: Vec<String> = list
        .as_array()
        .into_iter()
        .flatten()
        .map(|f| format!("{} ({})", text(&f["consumer_id"]), text(&f["reason"])))
        .collect();
    if all.is_empty() {
        "no reason given".to_owned()
    } else {
        all.join(", ")
    }
}

/// Columns padded to their widest cell; the last column is not padded.
fn table(headers: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<String>| {
        let last = cells.len().saturating_sub(1);
        let mut out = String::new();
        for (i, (cell, width)) in cells.iter().zip(&widths).enumerate() {
            if i == last {
                out.push_str(cell);
            } else {
                out.push_str(&format!("{cell:<width$}  "));
            }
        }
        out.trim_end().to_owned()
    };
    let mut lines = vec![line(headers.iter().map(|h| (*h).to_owned()).collect())];
    lines.extend(rows.iter().cloned().map(line));
    lines.join("\n")
}

/// `acked/subscribers`, from a summary (counts) or a full propagation (lists).
fn propagation_cell(propagation: &Value) -> String {
    let count = |v: &Value| {
        v.as_array()
            .map_or_else(|| text(v), |a| a.len().to_string())
    };
    format!(
        "{}/{}",
        count(&propagation["acked"]),
        text(&propagation["subscribers"])
    )
}

fn workers_table(answer: &Value) -> String {
    let rows: Vec<Vec<String>> = answer["workers"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|w| {
            vec![
                text(&w["name"]),
                text(&w["version"]),
                text(&w["revision"]),
                propagation_cell(&w["propagation"]),
                text(&w["propagation"]["state"]),
            ]
        })
        .collect();
    format!(
        "{}\nepoch {} head {}",
        table(&["NAME", "VERSION", "REVISION", "ACKED", "STATE"], &rows),
        text(&answer["epoch"]),
        text(&answer["head"])
    )
}

fn worker_table(worker: &Value) -> String {
    let propagation = &worker["propagation"];
    let mut out = table(
        &[
            "NAME", "VERSION", "REVISION", "SIZE", "CHECKSUM", "ACKED", "STATE",
        ],
        &[vec![
            text(&worker["name"]),
            text(&worker["version"]),
            text(&worker["revision"]),
            text(&worker["size"]),
            text(&worker["checksum"]),
            propagation_cell(propagation),
            text(&propagation["state"]),
        ]],
    );
    let mut rows = Vec::new();
    for (kind, list) in [
        ("acked", "acked"),
        ("pending", "pending"),
        ("failed", "failed"),
    ] {
        for entry in propagation[list].as_array().into_iter().flatten() {
            rows.push(vec![
                text(&entry["consumer_id"]),
                text(&entry["transport"]),
                kind.to_owned(),
                text(&entry["revision"]),
                text(&entry["reason"]),
            ]);
        }
    }
    if !rows.is_empty() {
        out.push_str("\n\n");
        out.push_str(&table(
            &["CONSUMER", "TRANSPORT", "ANSWER", "REVISION", "REASON"],
            &rows,
        ));
    }
    out
}

fn consumers_table(answer: &Value) -> String {
    let rows: Vec<Vec<String>> = answer["consumers"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|c| {
            vec![
                text(&c["consumer_id"]),
                if c["connected"] == true {
                    "connected".to_owned()
                } else {
                    "left".to_owned()
                },
                text(&c["transport"]),
                text(&c["remote"]),
                text(&c["acked_revision"]),
                text(&c["lag"]),
            ]
        })
        .collect();
    format!(
        "{}\nhead {}",
        table(
            &["CONSUMER", "STATE", "TRANSPORT", "REMOTE", "ACKED", "LAG"],
            &rows
        ),
        text(&answer["head"])
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_pad_every_column_but_the_last() {
        let out = table(
            &["NAME", "STATE"],
            &[
                vec!["a-long-name".into(), "complete".into()],
                vec!["b".into(), "pending".into()],
            ],
        );
        assert_eq!(
            out,
            "NAME         STATE\na-long-name  complete\nb            pending"
        );
    }

    #[test]
    fn worker_names_become_one_path_segment() {
        assert_eq!(path("shop-cart"), "shop-cart");
        assert_eq!(path("a/b c"), "a%2Fb%20c");
    }
}
