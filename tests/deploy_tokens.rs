//! Deploy tokens against the real binary: a token limited to `shop-*` publishes `shop-cart`,
//! gets 403 for `admin-panel`, is named as the deployer in the answer and in the core's
//! `change accepted` event (it travels inside the signed hook body), and stops working within
//! the reload interval once removed from the file. `UPLOAD_TOKEN` keeps every worker. The
//! deployer is kept with the change: `/v1/workers/{name}`, `/v1/workers` and the status page
//! show it.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;
use sha2::{Digest, Sha256};

/// `serve --dev` on port 0 with the upload server, reading deploy tokens from `tokens` and
/// checking it every `reload_interval`.
fn serve_with_tokens<'a>(tokens: &'a std::path::Path, reload_interval: &'a str) -> Vec<&'a str> {
    let mut args = vec!["serve", "--dev"];
    args.extend(common_ports());
    args.extend([
        "--upload-port",
        "0",
        "--tokens-file",
        tokens.to_str().unwrap(),
        "--tokens-reload-interval",
        reload_interval,
    ]);
    args
}

fn token_line(name: &str, token: &str, patterns: &str) -> String {
    format!(
        "{name} sha256:{} {patterns}\n",
        hex::encode(Sha256::digest(token.as_bytes()))
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shop_token_deploys_shop_workers_only_is_named_and_can_be_revoked() {
    let dir = tempfile::tempdir().unwrap();
    let tokens = dir.path().join("tokens");
    std::fs::write(
        &tokens,
        format!(
            "# deployers\n{}{}",
            token_line("team-shop", "shop-secret", "shop-*"),
            token_line("release", "release-secret", "*")
        ),
    )
    .unwrap();
    let mut args = serve_with_tokens(&tokens, "100ms");
    args.extend(["--log-format", "json"]);
    let server = TestServer::start_capturing_logs(dir.path(), &args, &[("RUST_LOG", "info")]);
    let (_, upload_token) = server.secrets();
    let upload = server.addr("upload");

    let (status, body) = upload_with(upload, "shop-secret", "", "shop-cart", "1.0.0", b"a").await;
    assert_eq!(status, 201, "{body}");
    assert_eq!(body["deployer"], "team-shop");
    let revision = body["revision"].as_u64().unwrap();

    let (status, body) = upload_with(upload, "shop-secret", "", "admin-panel", "1.0.0", b"b").await;
    assert_eq!(status, 403, "{body}");
    assert!(
        body["error"]
            .as_str()
            .is_some_and(|e| e.contains("team-shop") && e.contains("admin-panel")),
        "{body}"
    );
    let refused_delete = http_client()
        .delete(format!("http://{upload}/workers/admin-panel"))
        .bearer_auth("shop-secret")
        .send()
        .await
        .unwrap();
    assert_eq!(refused_delete.status().as_u16(), 403);

    let (status, body) = upload_with(upload, &upload_token, "", "admin-panel", "1.0.0", b"b").await;
    assert_eq!(status, 201, "{body}");
    assert_eq!(body["deployer"], "upload-token");

    // Kept with the change: the admin API and the status page name who deployed each version;
    // a hook request that names nobody shows an empty deployer.
    let (http, (hook_secret, _)) = (server.addr("http"), server.secrets());
    let (status, body) = hook_put(http, &hook_secret, "plain-hook", "1", b"p").await;
    assert_eq!(status, 201, "{body}");
    let (status, worker) = admin_get(http, Some(&upload_token), "/v1/workers/shop-cart").await;
    assert_eq!(status, 200, "{worker}");
    assert_eq!(worker["deployer"], "team-shop", "{worker}");
    let (status, listing) = admin_get(http, Some(&upload_token), "/v1/workers").await;
    assert_eq!(status, 200, "{listing}");
    let deployer_of = |name: &str| {
        listing["workers"]
            .as_array()
            .and_then(|all| all.iter().find(|w| w["name"] == name))
            .map(|w| w["deployer"].clone())
    };
    assert_eq!(
        deployer_of("shop-cart"),
        Some("team-shop".into()),
        "{listing}"
    );
    assert_eq!(
        deployer_of("admin-panel"),
        Some("upload-token".into()),
        "{listing}"
    );
    assert_eq!(deployer_of("plain-hook"), Some("".into()), "{listing}");
    let page = http_client()
        .get(format!("http://{http}/"))
        .bearer_auth(&upload_token)
        .send()
        .await
        .unwrap();
    assert_eq!(page.status().as_u16(), 200);
    let page = page.text().await.unwrap();
    let row = |name: &str| {
        let start = page
            .find(&format!("data-worker=\"{name}\""))
            .unwrap_or_else(|| panic!("no row for {name}:\n{page}"));
        let end = start + page[start..].find("</tr>").unwrap();
        page[start..end].to_owned()
    };
    assert!(
        row("shop-cart").contains("<td class=\"deployer\">team-shop</td>"),
        "{}",
        row("shop-cart")
    );
    assert!(
        row("plain-hook").contains("<td class=\"deployer\">-</td>"),
        "{}",
        row("plain-hook")
    );

    // The core heard it from the signed hook body.
    eventually(
        Duration::from_secs(10),
        "the change event names team-shop",
        || {
            server.logs.lock().unwrap().iter().any(|line| {
                let event: Value = serde_json::from_str(line).unwrap_or(Value::Null);
                event["message"] == "change accepted"
                    && event["worker"] == "shop-cart"
                    && event["deployer"] == "team-shop"
                    && event["revision"].as_u64() == Some(revision)
            })
        },
    );

    // Removed from the file: refused within the reload interval (plus a scheduling margin).
    std::fs::write(&tokens, token_line("release", "release-secret", "*")).unwrap();
    let removed = Instant::now();
    loop {
        let (status, _) = upload_with(upload, "shop-secret", "", "shop-cart", "1.0.1", b"c").await;
        if status == 401 {
            break;
        }
        // 201 the first time, 200 for the same version again.
        assert!(status == 201 || status == 200, "{status}");
        assert!(
            removed.elapsed() < Duration::from_secs(3),
            "a removed token still works after {:?}",
            removed.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    let (status, body) =
        upload_with(upload, "release-secret", "", "admin-panel", "2.0.0", b"d").await;
    assert_eq!(status, 201, "{body}");
    assert_eq!(body["deployer"], "release");
}

#[test]
fn a_tokens_file_that_does_not_parse_is_refused_at_start_naming_the_line() {
    let dir = tempfile::tempdir().unwrap();
    let tokens = dir.path().join("tokens");
    std::fs::write(&tokens, "team-shop sha256:nothex shop-*\n").unwrap();
    let output = std::process::Command::new(BIN)
        .args(["serve", "--dev"])
        .args(common_ports())
        .args(["--upload-port", "0", "--tokens-file"])
        .arg(&tokens)
        .arg("--certs-dir")
        .arg(dir.path().join("certs"))
        .arg("--data-dir")
        .arg(dir.path().join("data"))
        .env("RUST_LOG", "warn")
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(64));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains(&format!("tokens file {}:1: team-shop", tokens.display())),
        "{stderr}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_no_reload_interval_a_sighup_reloads_the_tokens_file() {
    let dir = tempfile::tempdir().unwrap();
    let tokens = dir.path().join("tokens");
    std::fs::write(&tokens, token_line("team-shop", "shop-secret", "shop-*")).unwrap();
    let args = serve_with_tokens(&tokens, "0");
    let server = TestServer::start(dir.path(), &args, &[]);
    let upload = server.addr("upload");
    let (status, _) = upload_with(upload, "shop-secret", "", "shop-cart", "1.0.0", b"a").await;
    assert_eq!(status, 201);

    std::fs::write(&tokens, token_line("other", "other-secret", "*")).unwrap();
    let (status, _) = upload_with(upload, "shop-secret", "", "shop-cart", "1.0.1", b"b").await;
    assert_eq!(status, 201, "no interval: nothing reloads by itself");
    let hup = std::process::Command::new("kill")
        .args(["-HUP", &server.child.id().to_string()])
        .status()
        .unwrap();
    assert!(hup.success());
    let sent = Instant::now();
    loop {
        let (status, _) = upload_with(upload, "shop-secret", "", "shop-cart", "1.0.2", b"c").await;
        if status == 401 {
            break;
        }
        assert!(
            sent.elapsed() < Duration::from_secs(5),
            "still {status} after SIGHUP"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    let (status, body) = upload_with(upload, "other-secret", "", "anything", "1.0.0", b"d").await;
    assert_eq!(status, 201, "{body}");
}
