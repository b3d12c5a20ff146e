//! The live status page, rendered on the server: plain HTML tables of workers (with their
//! versions and a propagation bar) and consumers (with transport and lag), plus a few lines of
//! script that replace them with each fragment the page's event stream sends. No front-end
//! build, no client-side templating: every byte of markup comes from here, escaped.

use std::fmt::Write;

use crate::core::{
    ConsumerStatus, Core, Epoch, Propagation, PropagationState, Revision, WorkerStatus,
};

/// What the page shows, read from the core at one moment.
pub struct Snapshot {
    /// The epoch.
    pub epoch: Epoch,
    /// The head revision.
    pub head: Revision,
    /// Every live worker, by name.
    pub workers: Vec<WorkerStatus<Propagation>>,
    /// Every subscription, then every consumer that left recently.
    pub consumers: Vec<ConsumerStatus>,
}

impl Snapshot {
    /// Reads it from the core (fleet-wide when the core has a fleet).
    pub async fn read(core: &Core) -> Self {
        Self {
            epoch: core.epoch(),
            head: core.head(),
            workers: core.fleet_workers_detail().await,
            consumers: core.fleet_consumers_status().await,
        }
    }
}

const STYLE: &str = r#"
:root { color-scheme: light; font: 15px/1.45 system-ui, sans-serif; color: #1f2328; }
body { margin: 0 auto; max-width: 1100px; padding: 1.5rem; }
header { display: flex; align-items: center; gap: 1rem; }
h1 { font-size: 1.4rem; margin: 0; }
h2 { font-size: 1.1rem; margin: 1.6rem 0 .5rem; }
.badge { font-size: .8rem; padding: .1rem .55rem; border-radius: 1rem; }
.badge.on { background: #dafbe1; color: #1a7f37; }
.badge.off { background: #fff1e5; color: #9a6700; }
header form { margin-left: auto; }
.meta { color: #59636e; }
table { border-collapse: collapse; width: 100%; }
th, td { text-align: left; padding: .35rem .6rem; border-bottom: 1px solid #d1d9e0; vertical-align: top; }
th { font-weight: 600; background: #f6f8fa; }
td.num { font-variant-numeric: tabular-nums; }
.empty { color: #59636e; font-style: italic; }
progress { width: 9rem; height: .9rem; vertical-align: middle; accent-color: #9a6700; }
.state-complete progress { accent-color: #1a7f37; }
.state-failed progress { accent-color: #cf222e; }
.count { font-weight: 600; margin: 0 .4rem; }
.why { color: #cf222e; margin: .2rem 0 0; padding-left: 1.1rem; }
.away { color: #9a6700; }
code { font-size: .85em; }
"#;

const SCRIPT: &str = r#"
const state = document.getElementById('state');
const live = document.getElementById('live');
const source = new EventSource('/status/events');
source.addEventListener('state', (event) => { state.innerHTML = event.data; });
source.addEventListener('open', () => {
  live.textContent = 'live';
  live.className = 'badge on';
  document.body.dataset.live = 'true';
});
source.addEventListener('error', () => {
  const closed = source.readyState === EventSource.CLOSED;
  live.textContent = closed ? 'disconnected: reload to sign in again' : 'reconnecting…';
  live.className = 'badge off';
  document.body.dataset.live = 'false';
});
"#;

/// The whole page, with `snapshot` already in place.
pub fn page(nonce: &str, snapshot: &Snapshot) -> String {
    let mut html = head(nonce, "workerpush status");
    let _ = write!(
        html,
        "<body data-live=\"false\"><header><h1>workerpush</h1>\
         <span id=\"live\" class=\"badge off\">connecting…</span>\
         <form method=\"post\" action=\"/logout\"><button>Sign out</button></form></header>\
         <main id=\"state\">{}</main><script nonce=\"{nonce}\">{SCRIPT}</script></body></html>",
        fragment(snapshot)
    );
    html
}

/// The sign-in page: one field for the admin token.
pub fn login(nonce: &str, problem: Option<&str>) -> String {
    let mut html = head(nonce, "workerpush: sign in");
    html.push_str("<body><header><h1>workerpush</h1></header><main>");
    if let Some(problem) = problem {
        let _ = write!(html, "<p class=\"why\">{}</p>", escape(problem));
    }
    html.push_str(
        "<form method=\"post\" action=\"/login\"><p><label>Admin token (<code>ADMIN_TOKEN</code>, \
         by default <code>UPLOAD_TOKEN</code>)<br><input type=\"password\" name=\"token\" \
         autocomplete=\"current-password\" autofocus size=\"50\"></label></p>\
         <p><button>Sign in</button></p></form></main></body></html>",
    );
    html
}

fn head(nonce: &str, title: &str) -> String {
    format!(
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\
         <title>{}</title><style nonce=\"{nonce}\">{STYLE}</style></head>",
        escape(title)
    )
}

/// The part of the page that changes: what the event stream sends.
pub fn fragment(snapshot: &Snapshot) -> String {
    let mut html = String::with_capacity(4096);
    let connected = snapshot.consumers.iter().filter(|c| c.connected).count();
    let _ = write!(
        html,
        "<p class=\"meta\">epoch <code>{}</code> · head revision <b id=\"head\">{}</b> · \
         {} workers · {connected} subscriptions</p>",
        escape(snapshot.epoch.as_str()),
        snapshot.head,
        snapshot.workers.len(),
    );
    workers(&mut html, &snapshot.workers);
    consumers(&mut html, &snapshot.consumers);
    html
}

fn workers(html: &mut String, workers: &[WorkerStatus<Propagation>]) {
    html.push_str(
        "<h2>Workers</h2><table id=\"workers\"><thead><tr><th>worker</th><th>version</th>\
         <th>revision</th><th>checksum</th><th>updated (UTC)</th><th>deployer</th>\
         <th>propagation</th></tr>\
         </thead><tbody>",
    );
    if workers.is_empty() {
        html.push_str("<tr><td colspan=\"7\" class=\"empty\">No workers yet.</td></tr>");
    }
    for worker in workers {
        let p = &worker.propagation;
        let state = match p.state {
            PropagationState::Complete => "complete",
            PropagationState::Pending => "pending",
            PropagationState::Failed => "failed",
        };
        let name = escape(worker.name.as_str());
        let _ = write!(
            html,
            "<tr data-worker=\"{name}\" data-revision=\"{}\" class=\"state-{state}\">\
             <td>{name}</td><td class=\"version\">{}</td><td class=\"num\">{}</td>\
             <td><code>{}</code></td><td class=\"num\">{}</td><td class=\"deployer\">{}</td>\
             <td class=\"propagation\">\
             <progress value=\"{}\" max=\"{}\"></progress><span class=\"count\">{}/{}</span>\
             <span class=\"state\">{state}</span>",
            p.revision,
            escape(worker.version.as_str()),
            worker.revision,
            escape(worker.checksum.as_str().get(..12).unwrap_or_default()),
            utc(worker.updated_ms),
            if worker.deployer.is_empty() {
                "-".to_owned()
            } else {
                escape(&worker.deployer)
            },
            p.acked.len(),
            p.subscribers.max(1),
            p.acked.len(),
            p.subscribers,
        );
        if !p.failed.is_empty() {
            html.push_str("<ul class=\"why\">");
            for failed in &p.failed {
                let _ = write!(
                    html,
                    "<li>{}: {}</li>",
                    escape(failed.consumer_id.as_str()),
                    escape(&failed.reason)
                );
            }
            html.push_str("</ul>");
        }
        html.push_str("</td></tr>");
    }
    html.push_str("</tbody></table>");
}

fn consumers(html: &mut String, consumers: &[ConsumerStatus]) {
    html.push_str(
        "<h2>Consumers</h2><table id=\"consumers\"><thead><tr><th>consumer</th>\
         <th>transport</th><th>remote</th><th>workers</th><th>delivered</th><th>acked</th>\
         <th>lag</th><th>status</th></tr></thead><tbody>",
    );
    if consumers.is_empty() {
        html.push_str("<tr><td colspan=\"8\" class=\"empty\">No consumers yet.</td></tr>");
    }
    for consumer in consumers {
        let workers = match &consumer.workers {
            None => "all".to_owned(),
            Some(names) => {
                let mut listed = names
                    .iter()
                    .map(|n| escape(n.as_str()))
                    .collect::<Vec<_>>()
                    .join(", ");
                let count = consumer.worker_count.unwrap_or(names.len());
                if count > names.len() {
                    let _ = write!(listed, " … ({count} in all)");
                }
                listed
            }
        };
        let remote = consumer
            .remote
            .map_or_else(|| "—".to_owned(), |r| r.to_string());
        let status = if consumer.connected {
            "<span>connected</span>"
        } else {
            "<span class=\"away\">away</span>"
        };
        let _ = write!(
            html,
            "<tr data-consumer=\"{id}\"><td>{id}</td><td>{}</td><td>{}</td><td>{workers}</td>\
             <td class=\"num\">{}</td><td class=\"num\">{}</td><td class=\"num lag\">{}</td>\
             <td>{status}",
            escape(&consumer.transport),
            escape(&remote),
            consumer.delivered_revision,
            consumer.acked_revision,
            consumer.lag,
            id = escape(consumer.consumer_id.as_str()),
        );
        if !consumer.failures.is_empty() {
            html.push_str("<ul class=\"why\">");
            for failure in &consumer.failures {
                let _ = write!(
                    html,
                    "<li>{} r{}: {}</li>",
                    escape(failure.worker.as_str()),
                    failure.revision,
                    escape(&failure.reason)
                );
            }
            html.push_str("</ul>");
        }
        html.push_str("</td></tr>");
    }
    html.push_str("</tbody></table>");
}

/// Escapes text for HTML content and quoted attributes.
pub fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// `YYYY-MM-DD HH:MM:SS` of unix milliseconds, in UTC.
fn utc(ms: i64) -> String {
    let secs = ms.div_euclid(1000);
    let (days, rest) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02}",
        rest / 3600,
        rest % 3600 / 60,
        rest % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_is_escaped() {
        assert_eq!(
            escape(r#"<img src=x onerror="a('b')">&"#),
            "&lt;img src=x onerror=&quot;a(&#39;b&#39;)&quot;&gt;&amp;"
        );
    }

    #[test]
    fn timestamps_render_in_utc() {
        assert_eq!(utc(0), "1970-01-01 00:00:00");
        assert_eq!(utc(951_782_400_000), "2000-02-29 00:00:00");
        assert_eq!(utc(1_700_000_000_123), "2023-11-14 22:13:20");
    }
}
