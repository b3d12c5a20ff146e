//! The live status page in a real browser: headless Chromium (Debian's `chromium`), driven
//! over the Chrome DevTools Protocol, watches a new version's propagation rise to 3/3 as three
//! consumers acknowledge it, without a reload, and takes a screenshot.
//!
//! Chromium is required (`CHROMIUM_BIN`, else `chromium` on PATH; `cargo xtask test` provides
//! it): without it this test fails and says how to install it.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::{
    collections::HashMap,
    io::{BufRead, BufReader},
    path::PathBuf,
    process::{Child, Command, Stdio},
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
        mpsc as std_mpsc,
    },
    time::{Duration, Instant},
};

use common::*;
use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::sync::{mpsc, oneshot};
use tokio_tungstenite::tungstenite::Message;

type Replies = Arc<Mutex<HashMap<u64, oneshot::Sender<Value>>>>;

/// A minimal DevTools client: numbered commands, replies matched by id, events ignored.
struct Cdp {
    outgoing: mpsc::UnboundedSender<String>,
    replies: Replies,
    next_id: AtomicU64,
}

impl Cdp {
    async fn connect(url: &str) -> Self {
        let (socket, _) = tokio_tungstenite::connect_async(url)
            .await
            .expect("connect to the DevTools websocket");
        let (mut sink, mut source) = socket.split();
        let (outgoing, mut queue) = mpsc::unbounded_channel::<String>();
        tokio::spawn(async move {
            while let Some(text) = queue.recv().await {
                if sink.send(Message::text(text)).await.is_err() {
                    return;
                }
            }
        });
        let replies: Replies = Arc::default();
        let waiting = replies.clone();
        tokio::spawn(async move {
            while let Some(Ok(message)) = source.next().await {
                let Message::Text(text) = message else {
                    continue;
                };
                let value: Value = serde_json::from_str(&text).unwrap();
                if let Some(id) = value["id"].as_u64()
                    && let Some(reply) = waiting.lock().unwrap().remove(&id)
                {
                    let _ = reply.send(value);
                }
            }
        });
        Self {
            outgoing,
            replies,
            next_id: AtomicU64::new(1),
        }
    }

    /// Sends a command (to a page session if given) and answers its reply: `Ok(result)` or
    /// `Err(error)`.
    async fn call(
        &self,
        session: Option<&str>,
        method: &str,
        params: Value,
    ) -> Result<Value, Value> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let mut command = json!({"id": id, "method": method, "params": params});
        if let Some(session) = session {
            command["sessionId"] = json!(session);
        }
        let (reply, answer) = oneshot::channel();
        self.replies.lock().unwrap().insert(id, reply);
        self.outgoing.send(command.to_string()).unwrap();
        let answer = tokio::time::timeout(Duration::from_secs(30), answer)
            .await
            .unwrap_or_else(|_| panic!("{method}: no reply within 30 s"))
            .expect("DevTools connection open");
        match answer.get("error") {
            Some(error) => Err(error.clone()),
            None => Ok(answer["result"].clone()),
        }
    }
}

/// Headless Chromium with a throwaway profile; killed on drop.
struct Browser {
    child: Child,
    cdp: Cdp,
    _profile: tempfile::TempDir,
}

impl Browser {
    async fn launch() -> Self {
        // `cargo xtask test` names the one it found (or installed) in CHROMIUM_BIN.
        let named = std::env::var("CHROMIUM_BIN").ok().filter(|b| !b.is_empty());
        let binary = named
            .iter()
            .map(String::as_str)
            .chain(["chromium", "chromium-browser"])
            .find(|name| {
                Command::new(name)
                    .arg("--version")
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .status()
                    .is_ok_and(|s| s.success())
            })
            .unwrap_or_else(|| {
                panic!(
                    "this test needs headless Chromium and found none (CHROMIUM_BIN, then \
                     chromium on PATH): `cargo xtask prepare` installs Debian's package as root, \
                     or run apt-get install -y --no-install-recommends chromium"
                )
            });
        let profile = tempfile::tempdir().unwrap();
        let mut child = Command::new(binary)
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-dev-shm-usage",
                "--no-first-run",
                "--no-default-browser-check",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--disable-extensions",
                "--window-size=1200,900",
                "--remote-debugging-port=0",
            ])
            .arg(format!("--user-data-dir={}", profile.path().display()))
            .arg("about:blank")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start chromium");
        let stderr = child.stderr.take().unwrap();
        let (found, endpoint) = std_mpsc::channel();
        std::thread::spawn(move || {
            let mut found = Some(found);
            // Keep draining so Chromium never blocks on a full pipe.
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Some(url) = line.strip_prefix("DevTools listening on ")
                    && let Some(found) = found.take()
                {
                    let _ = found.send(url.trim().to_owned());
                }
            }
        });
        let url = endpoint
            .recv_timeout(Duration::from_secs(60))
            .expect("chromium printed its DevTools address");
        Self {
            child,
            cdp: Cdp::connect(&url).await,
            _profile: profile,
        }
    }

    /// Opens `url` in a new tab; answers the tab's session.
    async fn open(&self, url: &str) -> String {
        let target = self
            .cdp
            .call(None, "Target.createTarget", json!({"url": url}))
            .await
            .unwrap();
        let attached = self
            .cdp
            .call(
                None,
                "Target.attachToTarget",
                json!({"targetId": target["targetId"], "flatten": true}),
            )
            .await
            .unwrap();
        attached["sessionId"].as_str().unwrap().to_owned()
    }

    /// Evaluates `expression` in the page and answers its value (promises awaited).
    async fn evaluate(&self, session: &str, expression: &str) -> Result<Value, Value> {
        let result = self
            .cdp
            .call(
                Some(session),
                "Runtime.evaluate",
                json!({"expression": expression, "awaitPromise": true, "returnByValue": true}),
            )
            .await?;
        match result.get("exceptionDetails") {
            Some(exception) => Err(exception.clone()),
            None => Ok(result["result"]["value"].clone()),
        }
    }

    /// Waits until `condition` (a JavaScript expression) holds in the page: the page resolves
    /// a promise from a MutationObserver, so this wakes on the DOM change itself. A page still
    /// loading (or navigating away) is asked again.
    async fn wait_for(&self, session: &str, condition: &str, within: Duration) {
        let expression = format!(
            "new Promise((resolve) => {{
               const check = () => {{ try {{ if ({condition}) {{ resolve(true); }} }} catch (e) {{}} }};
               check();
               new MutationObserver(check).observe(document, {{
                 subtree: true, childList: true, characterData: true, attributes: true
               }});
             }})"
        );
        let deadline = Instant::now() + within;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match tokio::time::timeout(left, self.evaluate(session, &expression)).await {
                Ok(Ok(_)) => return,
                // The document went away under the promise (a navigation): ask the new one.
                Ok(Err(_)) if Instant::now() < deadline => continue,
                _ => {
                    let html = self
                        .evaluate(session, "document.documentElement.outerHTML")
                        .await;
                    panic!("timed out waiting for `{condition}`; page: {html:?}");
                }
            }
        }
    }

    async fn screenshot(&self, session: &str) -> Vec<u8> {
        use base64::Engine;
        let shot = self
            .cdp
            .call(
                Some(session),
                "Page.captureScreenshot",
                json!({"format": "png", "captureBeyondViewport": true}),
            )
            .await
            .unwrap();
        base64::engine::general_purpose::STANDARD
            .decode(shot["data"].as_str().unwrap())
            .unwrap()
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn count_is(worker: &str, count: &str) -> String {
    format!(
        "document.querySelector('tr[data-worker=\"{worker}\"] .count')?.textContent === '{count}'"
    )
}

#[tokio::test]
async fn status_page_shows_propagation_rising_to_three_of_three_without_a_reload() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::serve_dev(dir.path(), &[]);
    let (_, token) = server.secrets();
    let (certs, grpc, http) = (server.certs(), server.addr("grpc"), server.addr("http"));
    let mut consumers = Vec::new();
    for id in [
        "consumer-1/edge-a",
        "consumer-1/edge-b",
        "consumer-1/edge-c",
    ] {
        consumers.push(HandConsumer::subscribe(&certs, grpc, id, &["checkout"], None).await);
    }

    let browser = Browser::launch().await;
    let page = browser.open(&format!("http://{http}/?token={token}")).await;
    let within = Duration::from_secs(20);
    // Signed in (the token is gone from the address), the tables are there, and the event
    // stream is open.
    browser
        .wait_for(
            &page,
            "location.search === '' && document.getElementById('workers') \
             && document.body.dataset.live === 'true'",
            within,
        )
        .await;
    browser
        .evaluate(&page, "window.loadedOnce = 'yes'")
        .await
        .unwrap();
    assert_eq!(
        browser
            .evaluate(
                &page,
                "document.querySelectorAll('#consumers tr[data-consumer]').length"
            )
            .await
            .unwrap(),
        3
    );

    let (status, body) = upload_with(
        server.addr("upload"),
        &token,
        "",
        "checkout",
        "2.4.0",
        b"v2.4.0",
    )
    .await;
    assert_eq!(status, 201, "{body}");
    browser
        .wait_for(&page, &count_is("checkout", "0/3"), within)
        .await;
    for (acked, consumer) in consumers.iter_mut().enumerate() {
        let put = consumer.next_change().await;
        assert_eq!(put.version, "2.4.0");
        consumer.ack(&put, None).await;
        let count = format!("{}/3", acked + 1);
        browser
            .wait_for(&page, &count_is("checkout", &count), within)
            .await;
    }

    let row = browser
        .evaluate(
            &page,
            "(() => { const row = document.querySelector('tr[data-worker=\"checkout\"]');
                      const bar = row.querySelector('progress');
                      return { state: row.className, version: row.querySelector('.version').textContent,
                               value: bar.value, max: bar.max, loadedOnce: window.loadedOnce ?? null }; })()",
        )
        .await
        .unwrap();
    assert_eq!(
        row,
        json!({"state": "state-complete", "version": "2.4.0", "value": 3, "max": 3, "loadedOnce": "yes"}),
        "complete, and the same document all along (no reload)"
    );

    let png = browser.screenshot(&page).await;
    assert!(png.starts_with(b"\x89PNG\r\n\x1a\n"), "a PNG");
    let width = u32::from_be_bytes(png[16..20].try_into().unwrap());
    assert_eq!(width, 1200, "the whole window");
    let path = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("status-page.png");
    std::fs::write(&path, &png).unwrap();
    std::fs::write(dir.path().join("status-page.png"), &png).unwrap();
    eprintln!("status page screenshot: {}", path.display());
    let _ = browser.cdp.call(None, "Browser.close", json!({})).await;
}
