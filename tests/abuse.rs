//! Abuse against the real binary: slow and oversized HTTP requests, hostile input, garbage on
//! gRPC and QUIC, stalled handshakes, bad certificates, and every limit. Each case checks the
//! refusal the abuser gets, that correct clients are served during and after, and that the
//! server process's memory (`VmRSS`) and open descriptors (`/proc/<pid>/fd`) stay bounded.
//! Authenticated clients too: churn of subscriptions, registrations and acks holds the core's
//! memory and data directory within bounds, and damage on disk never reuses a revision.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    path::Path,
    sync::Arc,
    time::{Duration, Instant},
};

use bytes::Bytes;
use common::*;
use futures_util::StreamExt;
use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};
use workerpush::{
    client::{ClientError, GrpcTransport, QuicTransport, Session, Transport, UpdateStream},
    pb::{
        AckBatch, AckRequest, FetchWorkerRequest, ListWorkersRequest, QuicRequest, QuicResponse,
        RegisterRequest, SubscribeRequest, UpdateKind, quic_request, quic_response,
    },
    quic::{
        CLOSE_RESOURCE_EXHAUSTED,
        codec::{MAX_FRAME_BYTES, encode_frame},
        frames::FrameReader,
    },
    tls::{self, ClientTlsPurpose, TestPki},
};

// ---------------------------------------------------------------------------------------------
// Harness: the server process's resources, metrics, polling, raw clients.

/// Resident memory (MiB) and open descriptors of a process, from `/proc`.
fn resources(pid: u32) -> (u64, usize) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let rss_kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .expect("VmRSS in /proc/<pid>/status");
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count();
    (rss_kib / 1024, fds)
}

fn fds(server: &TestServer) -> usize {
    resources(server.child.id()).1
}

fn rss_mib(server: &TestServer) -> u64 {
    resources(server.child.id()).0
}

/// Waits until the server holds at most `most` descriptors.
async fn fds_back_to(server: &TestServer, most: usize, what: &str) {
    let pid = server.child.id();
    until(Duration::from_secs(15), what, || async move {
        resources(pid).1 <= most
    })
    .await;
}

/// The value of `workerpush_limit_refusals_total{limit=...}` (or another counter with one
/// label), 0 when not yet counted.
async fn counter(http: SocketAddr, name: &str, label: &str) -> f64 {
    let text = metrics_text(http).await;
    text.lines()
        .filter(|l| l.starts_with(name) && l.contains(label))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

async fn refusals(server: &TestServer, limit: &str) -> f64 {
    counter(
        server.addr("http"),
        "workerpush_limit_refusals_total",
        &format!("limit=\"{limit}\""),
    )
    .await
}

/// `POST /upload` as the deployer; answers (status, Retry-After, body).
async fn upload_from(
    client: &reqwest::Client,
    upload: SocketAddr,
    token: &str,
    fields: &[(&str, Option<&str>, &[u8])],
) -> (u16, Option<String>, String) {
    let (boundary, body) = multipart(fields);
    let answer = client
        .post(format!("http://{upload}/upload"))
        .bearer_auth(token)
        .header(
            "content-type",
            format!("multipart/form-data; boundary={boundary}"),
        )
        .body(body)
        .send()
        .await
        .unwrap();
    let status = answer.status().as_u16();
    let retry_after = answer
        .headers()
        .get("retry-after")
        .map(|v| v.to_str().unwrap().to_owned());
    (status, retry_after, answer.text().await.unwrap())
}

async fn upload(upload: SocketAddr, token: &str, name: &str, version: &str, code: &[u8]) -> u16 {
    let fields: [(&str, Option<&str>, &[u8]); 3] = [
        ("filename", None, name.as_bytes()),
        ("version", None, version.as_bytes()),
        ("file", Some("worker.js"), code),
    ];
    let (status, _, body) = upload_from(&http_client(), upload, token, &fields).await;
    assert!(status < 500, "{status} {body}");
    status
}

/// Reads until the peer closes (EOF or error); answers what came. Fails after `within`.
async fn read_until_closed(stream: &mut (impl AsyncRead + Unpin), within: Duration) -> Vec<u8> {
    let mut answer = Vec::new();
    let mut buf = vec![0u8; 16 << 10];
    tokio::time::timeout(within, async {
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => answer.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("connection still open after {within:?}"));
    answer
}

/// Writes `head`, then one byte of `drip` (if any) every `every`, until the server answers or
/// closes. Answers what the server said and how long the connection lasted.
async fn trickle(
    addr: SocketAddr,
    head: Vec<u8>,
    drip: Option<u8>,
    every: Duration,
) -> (Vec<u8>, Duration) {
    let started = Instant::now();
    let mut stream = TcpStream::connect(addr).await.unwrap();
    let _ = stream.write_all(&head).await;
    let mut answer = Vec::new();
    let mut buf = [0u8; 4096];
    let give_up = tokio::time::sleep(Duration::from_secs(20));
    tokio::pin!(give_up);
    loop {
        tokio::select! {
            () = &mut give_up => panic!("slow connection never cut"),
            read = stream.read(&mut buf) => match read {
                Ok(0) | Err(_) => return (answer, started.elapsed()),
                Ok(n) => answer.extend_from_slice(&buf[..n]),
            },
            () = tokio::time::sleep(every), if drip.is_some() => {
                if stream.write_all(&[drip.unwrap_or_default()]).await.is_err() {
                    // Closed: collect whatever answer arrived.
                    let _ = tokio::time::timeout(Duration::from_secs(1), stream.read_to_end(&mut answer)).await;
                    return (answer, started.elapsed());
                }
            }
        }
    }
}

/// Headers that pass the hook's cheap checks (fresh timestamp, well-formed signature) but
/// carry a wrong signature: what an attacker without the secret can send.
fn forged_hook_headers() -> String {
    let now = workerpush::core::now_ms() / 1000;
    format!(
        "x-workerpush-timestamp: {now}\r\nx-workerpush-signature: v1={}\r\n",
        "0".repeat(64)
    )
}

fn grpc_tls(certs: &Path) -> Arc<rustls::ClientConfig> {
    client_tls(certs, "consumer-1", ClientTlsPurpose::Grpc)
}

/// A raw mutual-TLS connection to the gRPC port, as `consumer-1`.
async fn raw_grpc_tls(
    certs: &Path,
    grpc: SocketAddr,
) -> tokio_rustls::client::TlsStream<TcpStream> {
    let connector = tokio_rustls::TlsConnector::from(grpc_tls(certs));
    let tcp = TcpStream::connect(grpc).await.unwrap();
    let name = rustls_pki_types::ServerName::try_from("localhost").unwrap();
    connector.connect(name, tcp).await.unwrap()
}

/// A raw quinn endpoint with `consumer-1`'s certificate.
fn raw_quic(certs: &Path) -> (quinn::Endpoint, quinn::ClientConfig) {
    let tls = client_tls(certs, "consumer-1", ClientTlsPurpose::Quic);
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls).unwrap();
    let endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    (endpoint, quinn::ClientConfig::new(Arc::new(crypto)))
}

/// A raw QUIC connection to `addr` from `endpoint`.
async fn raw_quic_connect(
    endpoint: &quinn::Endpoint,
    config: &quinn::ClientConfig,
    addr: SocketAddr,
) -> quinn::Connection {
    endpoint
        .connect_with(config.clone(), addr, "localhost")
        .unwrap()
        .await
        .unwrap()
}

/// Sends `bytes` on a new stream of `connection`, finishes it, and reads the first answer.
async fn quic_exchange(connection: &quinn::Connection, bytes: &[u8]) -> quic_response::Response {
    let (mut send, recv) = connection.open_bi().await.unwrap();
    send.write_all(bytes).await.unwrap();
    send.finish().unwrap();
    let mut frames = FrameReader::new(recv, MAX_FRAME_BYTES);
    let answer = tokio::time::timeout(Duration::from_secs(10), frames.next::<QuicResponse>())
        .await
        .expect("an answer within 10 s")
        .unwrap()
        .expect("a frame");
    answer.response.expect("a response")
}

fn list_request() -> Bytes {
    encode_frame(&QuicRequest {
        request: Some(quic_request::Request::List(ListWorkersRequest::default())),
    })
}

fn subscribe_all() -> SubscribeRequest {
    SubscribeRequest {
        consumer_id: String::new(),
        worker_names: vec![],
        resume_revision: 0,
        epoch: String::new(),
    }
}

async fn until_synced(stream: &mut UpdateStream) -> u64 {
    loop {
        let update = tokio::time::timeout(Duration::from_secs(10), stream.next())
            .await
            .expect("an update within 10 s")
            .expect("stream open")
            .expect("no error");
        if update.kind == UpdateKind::Synced as i32 {
            return update.revision;
        }
    }
}

fn status_code(result: Result<impl Sized, ClientError>) -> (i32, String) {
    match result {
        Err(ClientError::Status { code, message }) => (code, message),
        Err(other) => panic!("expected a status, got {other}"),
        Ok(_) => panic!("expected a refusal"),
    }
}

// ---------------------------------------------------------------------------------------------
// HTTP: slow, large and hostile requests.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slowloris_headers_and_bodies_are_cut_while_uploads_succeed() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::serve_dev(
        dir.path(),
        &[
            "--http-header-timeout",
            "1s",
            "--http-body-timeout",
            "700ms",
            "--http-body-deadline",
            "2s",
        ],
    );
    let (_, token) = server.secrets();
    let every = Duration::from_millis(200);
    let baseline = fds(&server);

    let mut slow = Vec::new();
    for (port, path, auth) in [
        (
            "upload",
            "/upload",
            format!("authorization: Bearer {token}\r\n"),
        ),
        ("http", "/internal/broadcast", forged_hook_headers()),
    ] {
        let addr = server.addr(port);
        for i in 0..60 {
            let drip = (i % 4 >= 2).then_some(b'x');
            let head = match i % 4 {
                // Silent: not even a request line.
                0 => Vec::new(),
                // The HTTP/2 preface, slowly: hyper would wait for the rest forever.
                1 => b"PRI * HT".to_vec(),
                // A head that never ends.
                2 => format!("POST {path} HTTP/1.1\r\nhost: x\r\nx-slow: ").into_bytes(),
                // A complete head, then a body that trickles faster than the idle timeout.
                _ => format!(
                    "POST {path} HTTP/1.1\r\nhost: x\r\n{auth}content-type: multipart/form-data; boundary=b\r\ncontent-length: 100000\r\n\r\n"
                )
                .into_bytes(),
            };
            slow.push(tokio::spawn(trickle(addr, head, drip, every)));
        }
    }
    // While they hang on, the server holds their descriptors and still takes an upload.
    let pid = server.child.id();
    until(
        Duration::from_secs(5),
        "slow connections accepted",
        || async move { resources(pid).1 >= baseline + 100 },
    )
    .await;
    assert_eq!(
        upload(server.addr("upload"), &token, "during", "1", b"ok").await,
        201
    );

    let mut bodies_408 = 0;
    for (i, task) in slow.into_iter().enumerate() {
        let (answer, lasted) = task.await.unwrap();
        let answer = String::from_utf8_lossy(&answer);
        assert!(
            lasted < Duration::from_secs(6),
            "connection {i} lasted {lasted:?}"
        );
        if i % 4 == 3 {
            assert!(answer.starts_with("HTTP/1.1 408"), "body {i}: {answer:?}");
            bodies_408 += 1;
        } else {
            // Heads are cut without an answer, or with a 408 from hyper.
            assert!(
                answer.is_empty() || answer.starts_with("HTTP/1.1 408"),
                "head {i}: {answer:?}"
            );
        }
    }
    assert_eq!(bodies_408, 30);
    fds_back_to(
        &server,
        baseline + 4,
        "slow connections' descriptors released",
    )
    .await;
    assert!(refusals(&server, "http_first_request_timeout").await >= 60.0);
    assert_eq!(
        upload(server.addr("upload"), &token, "after", "1", b"ok").await,
        201
    );
}

/// Sends a chunked body without end; answers what the server said before it cut us off.
async fn endless_chunked(addr: SocketAddr, head: String) -> String {
    let stream = TcpStream::connect(addr).await.unwrap();
    let (mut read, mut write) = stream.into_split();
    let writer = tokio::spawn(async move {
        write.write_all(head.as_bytes()).await?;
        let chunk = vec![b'a'; 64 << 10];
        loop {
            write.write_all(b"10000\r\n").await?;
            write.write_all(&chunk).await?;
            write.write_all(b"\r\n").await?;
        }
        #[allow(unreachable_code)]
        Ok::<(), std::io::Error>(())
    });
    let answer = read_until_closed(&mut read, Duration::from_secs(20)).await;
    writer.abort();
    String::from_utf8_lossy(&answer).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_and_endless_bodies_are_cut_with_memory_bounded() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::serve_dev(
        dir.path(),
        &[
            "--max-code-bytes",
            "4194304",
            "--max-upload-bytes",
            "4194304",
            "--http-body-budget",
            "33554432",
        ],
    );
    let (secret, token) = server.secrets();
    let (upload_addr, hook_addr) = (server.addr("upload"), server.addr("http"));
    let (rss_before, fds_before) = resources(server.child.id());

    // Declared too large: 413 before a byte of the body is read.
    for (addr, head) in [
        (
            upload_addr,
            format!(
                "POST /upload HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {token}\r\ncontent-type: multipart/form-data; boundary=b\r\ncontent-length: 1000000000\r\n\r\n"
            ),
        ),
        (
            hook_addr,
            format!(
                "POST /internal/broadcast HTTP/1.1\r\nhost: x\r\n{}content-type: multipart/form-data; boundary=b\r\ncontent-length: 1000000000\r\n\r\n",
                forged_hook_headers()
            ),
        ),
    ] {
        let mut stream = TcpStream::connect(addr).await.unwrap();
        stream.write_all(head.as_bytes()).await.unwrap();
        let mut answer = vec![0u8; 12];
        stream.read_exact(&mut answer).await.unwrap();
        assert_eq!(&answer, b"HTTP/1.1 413", "{addr}");
    }

    // Endless chunked bodies, many at once: each is cut at its limit (413) or refused up front
    // by the body budget (503); the memory held is the budget's, not the attackers'.
    let mut endless = Vec::new();
    for i in 0..48 {
        let head = if i % 3 == 0 {
            format!(
                "POST /upload HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {token}\r\ncontent-type: multipart/form-data; boundary=b\r\ntransfer-encoding: chunked\r\n\r\n"
            )
        } else {
            format!(
                "POST /internal/broadcast HTTP/1.1\r\nhost: x\r\n{}content-type: multipart/form-data; boundary=b\r\ntransfer-encoding: chunked\r\n\r\n",
                forged_hook_headers()
            )
        };
        let addr = if i % 3 == 0 { upload_addr } else { hook_addr };
        endless.push(tokio::spawn(endless_chunked(addr, head)));
    }
    let pid = server.child.id();
    let mut peak = 0;
    let mut answers = Vec::new();
    for task in endless {
        while !task.is_finished() {
            peak = peak.max(resources(pid).0);
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        answers.push(task.await.unwrap());
    }
    for answer in &answers {
        assert!(
            answer.is_empty()
                || answer.starts_with("HTTP/1.1 413")
                || answer.starts_with("HTTP/1.1 400")
                || answer.starts_with("HTTP/1.1 503"),
            "{answer:?}"
        );
    }
    // Most answers arrive before the connection is reset; each kind showed up.
    assert!(answers.iter().any(|a| a.starts_with("HTTP/1.1 413")));
    // 32 MiB of budget (plus buffer growth and allocator slack), not 48 × 4 MiB.
    eprintln!("endless bodies: RSS {rss_before} MiB before, peak {peak} MiB");
    assert!(
        peak < rss_before + 96,
        "RSS rose from {rss_before} MiB to {peak} MiB"
    );

    // The server is fine: a correct change goes through both ports.
    let (status, body) = hook_put(hook_addr, &secret, "after-hook", "1", b"ok").await;
    assert_eq!(status, 201, "{body}");
    assert_eq!(
        upload(upload_addr, &token, "after-upload", "1", b"ok").await,
        201
    );
    fds_back_to(
        &server,
        fds_before + 4,
        "cut connections' descriptors released",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_names_and_malformed_multipart_get_400() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::serve_dev(dir.path(), &["--rate-limit-per-second", "0"]);
    let (secret, token) = server.secrets();
    let (upload_addr, hook_addr) = (server.addr("upload"), server.addr("http"));
    let client = http_client();

    let long_name = "a".repeat(64);
    let long_version = "1".repeat(65);
    let hostile: &[(&str, &str)] = &[
        ("../../etc/passwd", "1"),
        ("UPPER", "1"),
        ("a b", "1"),
        ("", "1"),
        (&long_name, "1"),
        ("名前", "1"),
        ("a\0b", "1"),
        ("-lead", "1"),
        ("ok", "../1"),
        ("ok", ""),
        ("ok", "1 2"),
        ("ok", &long_version),
        ("ok", "1\r\nx-injected: yes"),
    ];
    for (name, version) in hostile {
        let fields: [(&str, Option<&str>, &[u8]); 3] = [
            ("filename", None, name.as_bytes()),
            ("version", None, version.as_bytes()),
            ("file", Some("worker.js"), b"code"),
        ];
        let (status, _, body) = upload_from(&client, upload_addr, &token, &fields).await;
        assert_eq!(status, 400, "{name:?} {version:?}: {body}");
        assert!(body.contains("\"error\""), "{body}");
    }
    for path in ["UPPER", "a%20b", "..%2F..%2Fetc", "%00"] {
        let answer = client
            .delete(format!("http://{upload_addr}/workers/{path}"))
            .bearer_auth(&token)
            .send()
            .await
            .unwrap();
        assert_eq!(answer.status(), 400, "DELETE /workers/{path}");
    }

    // Malformed forms on the upload port.
    let raw_cases: Vec<(&str, Option<&str>, Vec<u8>)> = vec![
        ("no content type", None, b"filename=a".to_vec()),
        (
            "no boundary",
            Some("multipart/form-data"),
            b"--x\r\n".to_vec(),
        ),
        ("not multipart", Some("application/json"), b"{}".to_vec()),
        (
            "garbage",
            Some("multipart/form-data; boundary=b"),
            (0..=255u8).cycle().take(5000).collect(),
        ),
        (
            "truncated",
            Some("multipart/form-data; boundary=b"),
            b"--b\r\nContent-Disposition: form-data; name=\"filename\"\r\n\r\nabc".to_vec(),
        ),
        (
            "no disposition",
            Some("multipart/form-data; boundary=b"),
            b"--b\r\n\r\nabc\r\n--b--\r\n".to_vec(),
        ),
        ("empty", Some("multipart/form-data; boundary=b"), Vec::new()),
    ];
    for (case, content_type, body) in raw_cases {
        let mut request = client
            .post(format!("http://{upload_addr}/upload"))
            .bearer_auth(&token)
            .body(body);
        if let Some(content_type) = content_type {
            request = request.header("content-type", content_type);
        }
        let answer = request.send().await.unwrap();
        assert_eq!(answer.status(), 400, "upload {case}");
    }
    let fields: [(&str, Option<&str>, &[u8]); 4] = [
        ("filename", None, b"dup"),
        ("filename", None, b"dup"),
        ("version", None, b"1"),
        ("file", Some("worker.js"), b"code"),
    ];
    assert_eq!(
        upload_from(&client, upload_addr, &token, &fields).await.0,
        400
    );
    let fields: [(&str, Option<&str>, &[u8]); 2] =
        [("filename", None, b"nofile"), ("version", None, b"1")];
    assert_eq!(
        upload_from(&client, upload_addr, &token, &fields).await.0,
        400
    );

    // Correctly signed but malformed hook requests.
    let hook_cases: Vec<(&str, Vec<u8>, &str)> = vec![
        ("metadata not JSON", b"{not json".to_vec(), "b"),
        (
            "unknown metadata field",
            br#"{"worker_name":"a","version":"1","evil":1}"#.to_vec(),
            "b",
        ),
        (
            "hostile name",
            br#"{"worker_name":"../a","version":"1"}"#.to_vec(),
            "b",
        ),
        (
            "hostile version",
            br#"{"worker_name":"a","version":"../1"}"#.to_vec(),
            "b",
        ),
        (
            "bad checksum",
            br#"{"worker_name":"a","version":"1","checksum":"zz"}"#.to_vec(),
            "b",
        ),
        (
            "no code",
            br#"{"worker_name":"a","version":"1"}"#.to_vec(),
            "b",
        ),
    ];
    for (case, metadata, _) in hook_cases {
        let (boundary, body) = multipart(&[("metadata", None, &metadata)]);
        let (status, body) = signed_post(hook_addr, &secret, &boundary, body).await;
        assert_eq!(status, 400, "hook {case}: {body}");
    }
    for (case, body) in [
        (
            "garbage",
            (0..=255u8).cycle().take(3000).collect::<Vec<u8>>(),
        ),
        (
            "truncated",
            b"--b\r\nContent-Disposition: form-data; name=\"metadata\"\r\n\r\n{".to_vec(),
        ),
        (
            "unknown field",
            b"--b\r\nContent-Disposition: form-data; name=\"evil\"\r\n\r\nx\r\n--b--\r\n".to_vec(),
        ),
    ] {
        let (status, answer) = signed_post(hook_addr, &secret, "b", body).await;
        assert_eq!(status, 400, "hook {case}: {answer}");
    }

    assert_eq!(
        upload(upload_addr, &token, "fine", "1.0.0", b"ok").await,
        201
    );
}

// ---------------------------------------------------------------------------------------------
// gRPC and QUIC: garbage, stalls, bad certificates.

/// An HTTP/2 frame header.
fn h2_frame(length: u32, kind: u8, flags: u8, stream: u32) -> Vec<u8> {
    let mut frame = length.to_be_bytes()[1..].to_vec();
    frame.extend_from_slice(&[kind, flags]);
    frame.extend_from_slice(&stream.to_be_bytes());
    frame
}

const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_over_mutual_tls_grpc_closes_only_that_connection() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::serve_dev(dir.path(), &["--handshake-timeout", "1s"]);
    let (certs, grpc) = (server.certs(), server.addr("grpc"));
    let session = grpc_session(&certs, grpc, "consumer-1").await;
    let mut updates = session.subscribe(subscribe_all()).await.unwrap();
    until_synced(&mut updates).await;
    let baseline = fds(&server);

    let random: Vec<u8> = (0..4096).map(|_| rand::random::<u8>()).collect();
    let settings = h2_frame(0, 0x4, 0, 0);
    let mut huge_headers = [H2_PREFACE, &settings].concat();
    huge_headers.extend(h2_frame(0xFF_FFFF, 0x1, 0x4, 1));
    huge_headers.extend(vec![0u8; 1024]);
    let mut continuation_flood = [H2_PREFACE, &settings].concat();
    continuation_flood.extend(h2_frame(1, 0x1, 0, 1));
    continuation_flood.push(0x82);
    for _ in 0..256 {
        continuation_flood.extend(h2_frame(16_000, 0x9, 0, 1));
        // Literal header fields without indexing, new name: never a complete list.
        continuation_flood.extend([0x00, 0x7f, 0xff, 0x7f].iter().cycle().take(16_000));
    }
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("junk instead of the preface", random.clone()),
        (
            "HTTP/1.1 instead of HTTP/2",
            b"GET / HTTP/1.1\r\nhost: x\r\n\r\n".to_vec(),
        ),
        (
            "garbage frames after the preface",
            [H2_PREFACE, &random].concat(),
        ),
        ("a 16 MiB HEADERS frame", huge_headers),
        ("a CONTINUATION flood", continuation_flood),
        ("nothing at all", Vec::new()),
        ("half the preface", H2_PREFACE[..10].to_vec()),
    ];
    for (case, bytes) in cases {
        let started = Instant::now();
        let mut tls = raw_grpc_tls(&certs, grpc).await;
        // The server may close before everything is written.
        let _ = tls.write_all(&bytes).await;
        let _ = tls.flush().await;
        read_until_closed(&mut tls, Duration::from_secs(10)).await;
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "{case}: closed only after {:?}",
            started.elapsed()
        );
        // The good connection and its subscription are untouched.
        assert!(
            session.list(ListWorkersRequest::default()).await.is_ok(),
            "{case}"
        );
    }
    let (secret, _) = server.secrets();
    hook_put(server.addr("http"), &secret, "still", "1", b"live").await;
    let update = updates.next().await.unwrap().unwrap();
    assert_eq!(update.worker_name, "still");
    fds_back_to(
        &server,
        baseline + 2,
        "garbage connections' descriptors released",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_and_oversized_quic_frames_fail_only_their_stream() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::serve_dev(dir.path(), &[]);
    let (endpoint, config) = raw_quic(&server.certs());
    let connection = endpoint
        .connect_with(config, server.addr("quic"), "localhost")
        .unwrap()
        .await
        .unwrap();
    // A subscription on the same connection, to see it carry on.
    let quic = quic_session(&server.certs(), server.addr("quic"), "consumer-1").await;
    let mut updates = quic.subscribe(subscribe_all()).await.unwrap();
    until_synced(&mut updates).await;

    let random: Vec<u8> = (0..2048).map(|_| rand::random::<u8>()).collect();
    let mut oversized = Vec::new();
    prost::encoding::encode_varint((MAX_FRAME_BYTES + 1) as u64, &mut oversized);
    oversized.extend_from_slice(&[0u8; 64]);
    let mut huge_varint = vec![0xFFu8; 10];
    huge_varint.push(0x01);
    let mut undecodable = Vec::new();
    prost::encoding::encode_varint(8, &mut undecodable);
    undecodable.extend_from_slice(&[0xFF; 8]);
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("random bytes", random),
        ("a frame over 16 MiB", oversized),
        ("a varint that overflows", huge_varint),
        ("bytes that do not decode", undecodable),
        ("nothing", Vec::new()),
    ];
    for (case, bytes) in cases {
        match quic_exchange(&connection, &bytes).await {
            quic_response::Response::Error(status) => {
                assert_eq!(status.code, 3, "{case}: INVALID_ARGUMENT, got {status:?}");
            }
            other => panic!("{case}: {other:?}"),
        }
    }
    // The same connection still answers a good request.
    match quic_exchange(&connection, &list_request()).await {
        quic_response::Response::Workers(_) => {}
        other => panic!("{other:?}"),
    }
    let (secret, _) = server.secrets();
    hook_put(server.addr("http"), &secret, "still", "1", b"live").await;
    let update = updates.next().await.unwrap().unwrap();
    assert_eq!(update.worker_name, "still");
    // Random datagrams at the port change nothing either.
    let (rss_before, _) = resources(server.child.id());
    let udp = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    for i in 0..3000usize {
        let len = if i % 3 == 0 { 1200 } else { 1 + i % 1500 };
        let mut datagram: Vec<u8> = (0..len).map(|_| rand::random::<u8>()).collect();
        if i % 2 == 0 {
            // A long header with QUIC v1, so the packet is parsed further.
            datagram[0] = 0xC0 | (datagram[0] & 0x0F);
            if len > 5 {
                datagram[1..5].copy_from_slice(&[0, 0, 0, 1]);
            }
        }
        let _ = udp.send_to(&datagram, server.addr("quic")).await;
    }
    match quic_exchange(&connection, &list_request()).await {
        quic_response::Response::Workers(_) => {}
        other => panic!("{other:?}"),
    }
    assert!(quic.list(ListWorkersRequest::default()).await.is_ok());
    let rss_after = rss_mib(&server);
    assert!(
        rss_after < rss_before + 32,
        "RSS {rss_before} → {rss_after} MiB"
    );
    connection.close(0u32.into(), b"done");
}

/// Forwards datagrams from clients to `server` and drops every answer: handshakes that start
/// and never finish.
async fn black_hole_proxy(server: SocketAddr) -> (SocketAddr, tokio::task::JoinHandle<()>) {
    let socket = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let addr = socket.local_addr().unwrap();
    let upstream = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let task = tokio::spawn(async move {
        let mut buf = vec![0u8; 65536];
        let mut answers = vec![0u8; 65536];
        loop {
            tokio::select! {
                received = socket.recv_from(&mut buf) => {
                    let Ok((n, _)) = received else { return };
                    let _ = upstream.send_to(&buf[..n], server).await;
                }
                // Read and drop what the server says.
                _ = upstream.recv_from(&mut answers) => {}
            }
        }
    });
    (addr, task)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_handshakes_are_cut_by_the_timeout_and_capped_in_number() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::serve_dev(
        dir.path(),
        &[
            "--handshake-timeout",
            "1s",
            "--max-concurrent-handshakes",
            "8",
        ],
    );
    let (certs, grpc, quic_addr) = (server.certs(), server.addr("grpc"), server.addr("quic"));
    let baseline = fds(&server);

    // TCP: silent connections and half a ClientHello, 4× the handshake cap.
    let mut stalled = Vec::new();
    for i in 0..32 {
        stalled.push(tokio::spawn(async move {
            let started = Instant::now();
            let mut tcp = TcpStream::connect(grpc).await.unwrap();
            if i % 2 == 1 {
                // A TLS handshake record header announcing 512 bytes, then 40 of them.
                let mut half = vec![0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00, 0x01, 0xfc];
                half.extend_from_slice(&[0x03; 31]);
                tcp.write_all(&half).await.unwrap();
            }
            read_until_closed(&mut tcp, Duration::from_secs(15)).await;
            started.elapsed()
        }));
    }
    // A correct client still gets through while they stall (it waits its turn).
    let started = Instant::now();
    let session = grpc_session(&certs, grpc, "consumer-1").await;
    assert!(session.list(ListWorkersRequest::default()).await.is_ok());
    assert!(started.elapsed() < Duration::from_secs(8));
    for task in stalled {
        // 32 stalls, 8 at a time, 1 s each: all cut within a few seconds.
        let lasted = task.await.unwrap();
        assert!(lasted < Duration::from_secs(8), "stalled for {lasted:?}");
    }
    fds_back_to(
        &server,
        baseline + 2,
        "stalled handshakes' descriptors released",
    )
    .await;

    // QUIC: handshakes whose answers never reach the client.
    let (proxy, proxy_task) = black_hole_proxy(quic_addr).await;
    let (endpoint, config) = raw_quic(&certs);
    let failures_before = counter(
        server.addr("http"),
        "workerpush_handshake_failures_total",
        "transport=\"quic\"",
    )
    .await;
    // A new stalled handshake every 50 ms, each held by the server for its 1 s timeout: the
    // server sits at its cap of 8 for as long as this runs.
    let stalls = tokio::spawn(async move {
        let mut held = Vec::new();
        loop {
            held.push(
                endpoint
                    .connect_with(config.clone(), proxy, "localhost")
                    .unwrap(),
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    });
    // At the cap, a ninth handshake is refused outright...
    let (direct, direct_config) = raw_quic(&certs);
    let (direct, direct_config) = (Arc::new(direct), direct_config);
    until(
        Duration::from_secs(5),
        "a handshake refused at the cap",
        || {
            let (direct, config) = (direct.clone(), direct_config.clone());
            async move {
                match direct
                    .connect_with(config, quic_addr, "localhost")
                    .unwrap()
                    .await
                {
                    Ok(connection) => {
                        connection.close(0u32.into(), b"");
                        false
                    }
                    Err(_) => true,
                }
            }
        },
    )
    .await;
    assert!(refusals(&server, "quic_connections").await >= 1.0);
    // ...and the stalled ones are cut by the timeout.
    stalls.abort();
    proxy_task.abort();
    let http = server.addr("http");
    until(
        Duration::from_secs(10),
        "stalled QUIC handshakes cut",
        || async move {
            counter(
                http,
                "workerpush_handshake_failures_total",
                "transport=\"quic\"",
            )
            .await
                >= failures_before + 8.0
        },
    )
    .await;
    // Then correct clients connect again.
    let quic = quic_session(&certs, quic_addr, "consumer-1").await;
    assert!(quic.list(ListWorkersRequest::default()).await.is_ok());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_bad_client_certificate_is_refused_on_both_transports() {
    tls::install_crypto_provider();
    let dir = tempfile::tempdir().unwrap();
    let pki = TestPki::new();
    pki.write_to(&dir.path().join("certs")).unwrap();
    let server = TestServer::serve_dev(dir.path(), &[]);
    let ca = pki.ca_pem().as_bytes().to_vec();
    let name = "consumer-1";
    let cases: Vec<(&str, Option<(String, String)>)> = vec![
        ("no client certificate", None),
        (
            "another CA",
            Some(TestPki::invalid_client_from_other_ca(name)),
        ),
        ("expired", Some(pki.invalid_client_expired(name))),
        (
            "not yet valid",
            Some(pki.invalid_client_not_yet_valid(name)),
        ),
        ("the CA as leaf", Some(pki.invalid_client_ca_as_leaf())),
        (
            "server-only EKU",
            Some(pki.invalid_client_server_only_eku(name)),
        ),
        (
            "self-signed",
            Some(TestPki::invalid_client_self_signed(name)),
        ),
    ];
    let http = server.addr("http");
    let failures = |transport: &'static str| async move {
        counter(
            http,
            "workerpush_handshake_failures_total",
            &format!("transport=\"{transport}\""),
        )
        .await
    };
    let before = (failures("grpc").await, failures("quic").await);
    for purpose in [ClientTlsPurpose::Grpc, ClientTlsPurpose::Quic] {
        for (case, identity) in &cases {
            let config = match identity {
                Some((cert, key)) => {
                    tls::client_config_from_pem(&ca, cert.as_bytes(), key.as_bytes(), purpose)
                        .unwrap()
                }
                None => no_client_certificate(&ca, purpose),
            };
            let transport: Box<dyn Transport> = match purpose {
                ClientTlsPurpose::Grpc => Box::new(
                    GrpcTransport::new(
                        &format!("localhost:{}", server.addr("grpc").port()),
                        config,
                    )
                    .unwrap(),
                ),
                ClientTlsPurpose::Quic => Box::new(
                    QuicTransport::new(
                        &format!("localhost:{}", server.addr("quic").port()),
                        config,
                    )
                    .unwrap(),
                ),
            };
            let outcome = match transport.connect().await {
                Err(error) => Err(error),
                // With TLS 1.3 the refusal may only show on the first call.
                Ok(session) => session
                    .list(ListWorkersRequest::default())
                    .await
                    .map(|_| ()),
            };
            let error = outcome.expect_err(&format!("{purpose:?} {case}: must be refused"));
            assert!(
                !matches!(error, ClientError::Status { code: 8, .. }),
                "{purpose:?} {case}: refused for the wrong reason: {error}"
            );
        }
    }
    until(Duration::from_secs(5), "every refusal counted", || async {
        failures("grpc").await >= before.0 + 7.0 && failures("quic").await >= before.1 + 7.0
    })
    .await;
    // Good clients on both transports are served.
    let grpc = grpc_session(&server.certs(), server.addr("grpc"), name).await;
    assert!(grpc.list(ListWorkersRequest::default()).await.is_ok());
    let quic = quic_session(&server.certs(), server.addr("quic"), name).await;
    assert!(quic.list(ListWorkersRequest::default()).await.is_ok());
}

fn no_client_certificate(ca: &[u8], purpose: ClientTlsPurpose) -> Arc<rustls::ClientConfig> {
    use rustls_pki_types::{CertificateDer, pem::PemObject};
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(ca) {
        roots.add(cert.unwrap()).unwrap();
    }
    let mut config = rustls::ClientConfig::builder_with_provider(tls::crypto_provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![match purpose {
        ClientTlsPurpose::Grpc => tls::GRPC_ALPN.to_vec(),
        ClientTlsPurpose::Quic => tls::QUIC_ALPN.to_vec(),
    }];
    Arc::new(config)
}

// ---------------------------------------------------------------------------------------------
// Limits: per identity, rates, slow consumers.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_past_the_identity_limit_are_refused_on_both_transports() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::serve_dev(
        dir.path(),
        &[
            "--max-connections-per-identity",
            "2",
            "--handshake-timeout",
            "1s",
        ],
    );
    let (certs, grpc, quic_addr) = (server.certs(), server.addr("grpc"), server.addr("quic"));

    // gRPC: the third connection's calls get RESOURCE_EXHAUSTED, then it is closed.
    let first = grpc_session(&certs, grpc, "consumer-1").await;
    let second = grpc_session(&certs, grpc, "consumer-1").await;
    assert!(first.list(ListWorkersRequest::default()).await.is_ok());
    assert!(second.list(ListWorkersRequest::default()).await.is_ok());
    let with_two = fds(&server);
    let third = grpc_session(&certs, grpc, "consumer-1").await;
    let (code, message) = status_code(third.list(ListWorkersRequest::default()).await);
    assert_eq!(code, 8, "RESOURCE_EXHAUSTED: {message}");
    assert!(message.contains("too many connections"), "{message}");
    let (code, _) = status_code(third.subscribe(subscribe_all()).await);
    assert_eq!(code, 8);
    fds_back_to(
        &server,
        with_two,
        "the refused connection closed by the server",
    )
    .await;
    drop(third);
    assert!(refusals(&server, "grpc_connections_per_identity").await >= 1.0);
    // A slot freed is a slot to use.
    drop(first);
    until(Duration::from_secs(10), "a freed gRPC slot reused", || {
        let certs = certs.clone();
        async move {
            let session = grpc_session(&certs, grpc, "consumer-1").await;
            session.list(ListWorkersRequest::default()).await.is_ok()
        }
    })
    .await;

    // QUIC: the third connection is closed with CLOSE_RESOURCE_EXHAUSTED and a reason.
    let (endpoint, config) = raw_quic(&certs);
    let connect = || raw_quic_connect(&endpoint, &config, quic_addr);
    let a = connect().await;
    let b = connect().await;
    for connection in [&a, &b] {
        assert!(matches!(
            quic_exchange(connection, &list_request()).await,
            quic_response::Response::Workers(_)
        ));
    }
    let c = connect().await;
    match tokio::time::timeout(Duration::from_secs(10), c.closed())
        .await
        .unwrap()
    {
        quinn::ConnectionError::ApplicationClosed(close) => {
            assert_eq!(close.error_code, CLOSE_RESOURCE_EXHAUSTED.into());
            let reason = String::from_utf8_lossy(&close.reason);
            assert!(reason.contains("too many connections"), "{reason}");
        }
        other => panic!("expected an application close, got {other}"),
    }
    assert!(refusals(&server, "quic_connections_per_identity").await >= 1.0);
    a.close(0u32.into(), b"done");
    until(
        Duration::from_secs(10),
        "a freed QUIC slot reused",
        || async {
            let d = connect().await;
            let ok = tokio::time::timeout(Duration::from_secs(2), async {
                let (mut send, recv) = d.open_bi().await.ok()?;
                send.write_all(&list_request()).await.ok()?;
                send.finish().ok()?;
                FrameReader::new(recv, MAX_FRAME_BYTES)
                    .next::<QuicResponse>()
                    .await
                    .ok()?
            })
            .await
            .ok()
            .flatten()
            .is_some_and(|r| matches!(r.response, Some(quic_response::Response::Workers(_))));
            d.close(0u32.into(), b"done");
            ok
        },
    )
    .await;
    drop(b);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_past_the_identity_limit_get_resource_exhausted_on_both_transports() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::serve_dev(dir.path(), &["--max-streams-per-identity", "2"]);
    let (secret, _) = server.secrets();
    hook_put(server.addr("http"), &secret, "w", "1", b"code").await;
    let fetch = || FetchWorkerRequest {
        worker_name: "w".into(),
        version: String::new(),
    };
    let grpc_a = grpc_session(&server.certs(), server.addr("grpc"), "consumer-1").await;
    let grpc_b = grpc_session(&server.certs(), server.addr("grpc"), "consumer-1").await;
    let quic = quic_session(&server.certs(), server.addr("quic"), "consumer-1").await;
    for (transport, one, other) in [("grpc", &grpc_a, &grpc_b), ("quic", &quic, &quic)] {
        // Two streams, over one or two connections, are the identity's share.
        let mut first = one.subscribe(subscribe_all()).await.unwrap();
        let mut second = other.subscribe(subscribe_all()).await.unwrap();
        until_synced(&mut first).await;
        until_synced(&mut second).await;
        let (code, message) = status_code(one.subscribe(subscribe_all()).await);
        assert_eq!(code, 8, "{transport}: {message}");
        assert!(message.contains("too many concurrent streams"), "{message}");
        let (code, _) = status_code(other.fetch(fetch()).await);
        assert_eq!(code, 8, "{transport}: fetch");
        // Unary calls are not streams.
        assert!(one.list(ListWorkersRequest::default()).await.is_ok());
        drop(first);
        until(
            Duration::from_secs(10),
            "a freed stream slot reused",
            || async { one.fetch(fetch()).await.is_ok() },
        )
        .await;
    }
    assert!(refusals(&server, "grpc_streams_per_identity").await >= 2.0);
    assert!(refusals(&server, "quic_streams_per_identity").await >= 2.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uploads_and_hook_calls_past_the_rate_get_429_with_retry_after() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::serve_dev(
        dir.path(),
        &["--rate-limit-per-second", "0.5", "--rate-limit-burst", "3"],
    );
    let (secret, token) = server.secrets();
    let (upload_addr, hook_addr) = (server.addr("upload"), server.addr("http"));
    let here = http_client();
    let elsewhere = reqwest::Client::builder()
        .local_address(Some("127.0.0.2".parse().unwrap()))
        .build()
        .unwrap();
    let put = |version: &str| {
        let version = version.to_owned();
        move |code: &'static [u8]| -> [(&'static str, Option<&'static str>, Vec<u8>); 3] {
            [
                ("filename", None, b"rated".to_vec()),
                ("version", None, version.into_bytes()),
                ("file", Some("worker.js"), code.to_vec()),
            ]
        }
    };
    let send = |client: reqwest::Client,
                token: String,
                fields: [(&'static str, Option<&'static str>, Vec<u8>); 3]| async move {
        let refs: Vec<(&str, Option<&str>, &[u8])> = fields
            .iter()
            .map(|(n, f, v)| (*n, *f, v.as_slice()))
            .collect();
        upload_from(&client, upload_addr, &token, &refs).await
    };

    // The burst passes (and its hook calls use up 127.0.0.1's burst at the core).
    for i in 0..3 {
        let (status, _, body) = send(here.clone(), token.clone(), put(&i.to_string())(b"x")).await;
        assert_eq!(status, 201, "{body}");
    }
    let (status, retry_after, body) = send(here.clone(), token.clone(), put("4")(b"x")).await;
    assert_eq!(status, 429, "{body}");
    let retry_after: u64 = retry_after.expect("Retry-After").parse().unwrap();
    assert!((1..=2).contains(&retry_after), "{retry_after}");
    assert!(body.contains("rate limit"), "{body}");
    // A wrong token from the same address is held by the address's bucket: no free guesses.
    let (status, _, _) = send(here.clone(), "guess".into(), put("5")(b"x")).await;
    assert_eq!(status, 429);
    // The same token from another address is held by the token's bucket.
    let (status, _, _) = send(elsewhere.clone(), token.clone(), put("6")(b"x")).await;
    assert_eq!(status, 429);
    // Another address with another token has its own budget (and is then unauthenticated).
    let (status, _, _) = send(elsewhere.clone(), "other".into(), put("7")(b"x")).await;
    assert_eq!(status, 401);
    // Reads are not rate limited.
    for _ in 0..10 {
        let health = here
            .get(format!("http://{upload_addr}/healthz"))
            .send()
            .await
            .unwrap();
        assert_eq!(health.status(), 200);
    }

    // The hook: 127.0.0.1 used its burst through the upload server.
    let (status, body) = hook_put(hook_addr, &secret, "direct", "1", b"x").await;
    assert_eq!(status, 429, "{body}");
    // From another address, the hook takes it.
    let metadata = serde_json::json!({"worker_name": "direct", "version": "1"}).to_string();
    let (boundary, body) = multipart(&[
        ("metadata", None, metadata.as_bytes()),
        ("worker_code", Some("worker.js"), b"x"),
    ]);
    let timestamp = workerpush::core::now_ms() / 1000;
    let answer = elsewhere
        .post(format!("http://{hook_addr}/internal/broadcast"))
        .header(
            "content-type",
            format!("multipart/form-data; boundary={boundary}"),
        )
        .header("x-workerpush-timestamp", timestamp.to_string())
        .header(
            "x-workerpush-signature",
            workerpush::http::signing::sign(secret.as_bytes(), timestamp, &body),
        )
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status(), 201);

    assert!(refusals(&server, "upload_rate").await >= 3.0);
    assert!(refusals(&server, "hook_rate").await >= 1.0);
    // After Retry-After, the deployer is served again.
    tokio::time::sleep(Duration::from_secs(retry_after)).await;
    let (status, _, body) = send(here.clone(), token.clone(), put("8")(b"x")).await;
    assert_eq!(status, 201, "{body}");
}

/// A signed hook put on a kept-alive `client`; answers the status.
async fn signed_put(
    client: &reqwest::Client,
    http: SocketAddr,
    secret: &str,
    worker: &str,
    version: &str,
    code: &[u8],
) -> u16 {
    let request = signed_put_request(client, http, secret, "", worker, version, code);
    request.send().await.unwrap().status().as_u16()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscribers_that_never_read_leave_memory_bounded() {
    const CHANGES: u64 = 2_000;
    const WORKERS: u64 = 100;
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::serve_dev(
        dir.path(),
        &[
            "--rate-limit-per-second",
            "0",
            "--inline-code-max-bytes",
            "65536",
        ],
    );
    let (secret, _) = server.secrets();
    let (certs, grpc, quic_addr) = (server.certs(), server.addr("grpc"), server.addr("quic"));

    // 200 subscriptions that are never read: 10 gRPC and 10 QUIC connections, 10 each.
    let mut idle = Vec::new();
    let mut sessions: Vec<Box<dyn Session>> = Vec::new();
    for i in 0..20 {
        let session = if i % 2 == 0 {
            grpc_session(&certs, grpc, "consumer-1").await
        } else {
            quic_session(&certs, quic_addr, "consumer-1").await
        };
        for _ in 0..10 {
            idle.push(session.subscribe(subscribe_all()).await.unwrap());
        }
        sessions.push(session);
    }
    let reader_session = grpc_session(&certs, grpc, "consumer-1").await;
    let mut reader = reader_session.subscribe(subscribe_all()).await.unwrap();
    until_synced(&mut reader).await;
    let rss_before = rss_mib(&server);

    let reading = tokio::spawn(async move {
        let mut state = BTreeMap::new();
        let mut last = 0;
        while last < CHANGES {
            let update = tokio::time::timeout(Duration::from_secs(30), reader.next())
                .await
                .expect("the reader is never held up")
                .unwrap()
                .unwrap();
            match UpdateKind::try_from(update.kind).unwrap() {
                UpdateKind::Put => {
                    assert_eq!(update.revision, last + 1, "every change, in order");
                    last = update.revision;
                    assert_eq!(sha256(&update.worker_code), update.checksum);
                    state.insert(update.worker_name, update.version);
                }
                UpdateKind::Synced => {}
                other => panic!("a reading subscriber got {other:?}"),
            }
        }
        state
    });
    // 2,000 changes of 8 KiB: 16 MiB that 200 unbounded queues would hold 200 times.
    let http = server.addr("http");
    let pid = server.child.id();
    let publishing = Instant::now();
    let client = http_client();
    let publishers: Vec<_> = (0..16u64)
        .map(|p| {
            let secret = secret.clone();
            let client = client.clone();
            tokio::spawn(async move {
                let mut peak = 0;
                for i in (p..CHANGES).step_by(16) {
                    let mut code = format!("export default {i};\n").into_bytes();
                    code.resize(8 << 10, b' ');
                    let worker = format!("w{}", i % WORKERS);
                    let status =
                        signed_put(&client, http, &secret, &worker, &format!("v{i}"), &code).await;
                    assert_eq!(status, 201);
                    if i % 50 == 0 {
                        peak = peak.max(resources(pid).0);
                    }
                }
                peak
            })
        })
        .collect();
    let mut peak = 0;
    for publisher in publishers {
        peak = peak.max(publisher.await.unwrap());
    }
    eprintln!("published in {:?}", publishing.elapsed());
    let state = reading.await.unwrap();
    peak = peak.max(rss_mib(&server));
    assert_eq!(state.len(), WORKERS as usize);
    assert!(
        peak < 300,
        "RSS {rss_before} MiB before, {peak} MiB at the peak"
    );
    eprintln!("slow subscribers: RSS {rss_before} MiB before, peak {peak} MiB");
    // The idle ones were never dropped from the truth: one reads now and reaches the head.
    // (The others go first: on its connection, their unread data holds HTTP/2's connection
    // window, which is the client's business, not the server's.)
    let mut late = idle.swap_remove(0);
    drop(idle);
    let mut head = 0;
    while head < CHANGES {
        let update = tokio::time::timeout(Duration::from_secs(30), late.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        head = head.max(update.revision);
    }
    drop(sessions);
}

// ---------------------------------------------------------------------------------------------
// Authenticated clients: what one certificate can make the core hold.

/// Bytes of every file under `dir`.
fn dir_bytes(dir: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .map(|e| e.unwrap())
        .map(|e| {
            let meta = e.metadata().unwrap();
            if meta.is_dir() {
                dir_bytes(&e.path())
            } else {
                meta.len()
            }
        })
        .sum()
}

/// Bytes the process has written through `write` and friends (`wchar` of `/proc/<pid>/io`):
/// files, sockets and pipes together, an upper bound on what reached the disk.
fn written_bytes(server: &TestServer) -> u64 {
    let io = std::fs::read_to_string(format!("/proc/{}/io", server.child.id())).unwrap();
    io.lines()
        .find_map(|l| l.strip_prefix("wchar:"))
        .and_then(|v| v.trim().parse().ok())
        .expect("wchar in /proc/<pid>/io")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscribe_cancel_churn_with_huge_filters_keeps_memory_and_the_consumer_list_bounded() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::serve_dev(dir.path(), &[]);
    let (_, token) = server.secrets();
    let session = grpc_session(&server.certs(), server.addr("grpc"), "consumer-1").await;
    let cycle = |i: usize| SubscribeRequest {
        consumer_id: format!("consumer-1/d{i}"),
        // A different filter every time: nothing to share.
        worker_names: (0..10_000).map(|j| format!("w{i}-{j}")).collect(),
        resume_revision: 0,
        epoch: String::new(),
    };
    for i in 0..5 {
        let mut stream = session.subscribe(cycle(i)).await.unwrap();
        until_synced(&mut stream).await;
    }
    let rss_before = rss_mib(&server);
    let mut peak = rss_before;
    for i in 5..305 {
        let mut stream = session.subscribe(cycle(i)).await.unwrap();
        until_synced(&mut stream).await;
        drop(stream);
        if i % 20 == 0 {
            peak = peak.max(rss_mib(&server));
        }
    }
    let http = server.addr("http");
    until(
        Duration::from_secs(15),
        "every subscription ended",
        || async {
            let (_, body) = admin_get(http, Some(&token), "/v1/consumers").await;
            body["consumers"]
                .as_array()
                .unwrap()
                .iter()
                .all(|c| c["connected"] == false)
        },
    )
    .await;
    peak = peak.max(rss_mib(&server));
    let listing = http_client()
        .get(format!("http://{http}/v1/consumers"))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    eprintln!(
        "subscribe/cancel churn: RSS {rss_before} MiB before, peak {peak} MiB; /v1/consumers {} bytes",
        listing.len()
    );
    assert!(peak < rss_before + 64, "RSS {rss_before} → {peak} MiB");
    assert!(
        listing.len() < 1 << 20,
        "/v1/consumers is {} bytes",
        listing.len()
    );
    let listed: serde_json::Value = serde_json::from_slice(&listing).unwrap();
    let first = &listed["consumers"][0];
    assert_eq!(first["worker_count"], 10_000, "{first}");
    assert!(first["workers"].as_array().unwrap().len() <= 32);
    // The filters outweighed the departure window: the oldest were forgotten, and counted.
    assert!(refusals(&server, "departed_bytes").await > 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_filter_past_its_bound_is_refused_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::serve_dev(dir.path(), &["--max-filter-names", "100"]);
    let session = grpc_session(&server.certs(), server.addr("grpc"), "consumer-1").await;
    let names = |n: usize| SubscribeRequest {
        worker_names: (0..n).map(|j| format!("w{j}")).collect(),
        ..subscribe_all()
    };
    let mut stream = session.subscribe(names(100)).await.unwrap();
    until_synced(&mut stream).await;
    let (code, message) = status_code(session.subscribe(names(101)).await);
    assert_eq!(code, 8, "{message}");
    assert!(message.contains("--max-filter-names"), "{message}");
    assert_eq!(refusals(&server, "filter_names").await, 1.0);
    // Every bound's counter is there from the start.
    for limit in [
        "consumer_ids_per_identity",
        "departed_consumers",
        "labels",
        "endpoint_bytes",
    ] {
        assert_eq!(refusals(&server, limit).await, 0.0, "{limit}");
        let metrics = metrics_text(server.addr("http")).await;
        assert!(metrics.contains(&format!("limit=\"{limit}\"")), "{limit}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registrations_and_acks_with_distinct_suffixes_and_huge_labels_stay_bounded() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::serve_dev(dir.path(), &[]);
    let data = dir.path().join("data");
    let session = grpc_session(&server.certs(), server.addr("grpc"), "consumer-1").await;
    let (rss_before, disk_before) = (rss_mib(&server), dir_bytes(&data));
    let mut peak = rss_before;

    let register = |i: usize| RegisterRequest {
        consumer_id: format!("consumer-1/r{i}"),
        endpoint: format!("10.0.0.1:{i}"),
        labels: [("region".to_owned(), "eu".to_owned())].into(),
    };
    let outcomes: Vec<_> = futures_util::stream::iter(0..50_000)
        .map(|i| session.register(register(i)))
        .buffer_unordered(64)
        .collect()
        .await;
    let registered = outcomes.iter().filter(|r| r.is_ok()).count();
    assert_eq!(
        registered, 1024,
        "the default bound of consumer ids per identity"
    );
    let refusal = outcomes.into_iter().find(Result::is_err).unwrap();
    let (code, message) = status_code(refusal);
    assert_eq!(code, 8, "{message}");
    assert!(
        message.contains("--max-consumer-ids-per-identity"),
        "{message}"
    );
    peak = peak.max(rss_mib(&server));

    let ack = |suffix: String| AckRequest {
        consumer_id: suffix,
        worker_name: "w".into(),
        revision: 1,
        applied: true,
        error: String::new(),
    };
    let acked: Vec<_> = futures_util::stream::iter(0..50_000)
        .map(|i| session.ack(ack(format!("consumer-1/a{i}"))))
        .buffer_unordered(64)
        .collect()
        .await;
    assert!(
        acked.iter().all(Result::is_err),
        "acks of unknown ids past the bound"
    );
    peak = peak.max(rss_mib(&server));

    let labelled = |i: usize, value_bytes: usize| RegisterRequest {
        consumer_id: format!("consumer-1/r{i}"),
        endpoint: String::new(),
        labels: (0..64)
            .map(|k| (format!("k{k}"), "v".repeat(value_bytes)))
            .collect(),
    };
    for i in 0..60 {
        // 64 labels of 61 KB (3.9 MB): past the gRPC decoder's limit (the inline code limit
        // plus 64 KiB), refused before the core sees it.
        let (code, message) = status_code(session.register(labelled(i, 61_000)).await);
        assert_eq!(code, 11, "{message}");
        assert!(message.contains("too large"), "{message}");
        // 64 labels of 16 KB (1 MB): decoded, and refused by the core's label bound.
        let (code, message) = status_code(session.register(labelled(i, 16_000)).await);
        assert_eq!(code, 8, "{message}");
        assert!(message.contains("--max-label-bytes"), "{message}");
    }
    peak = peak.max(rss_mib(&server));
    assert!(refusals(&server, "consumer_ids_per_identity").await >= 98_976.0);
    assert!(refusals(&server, "label_bytes").await >= 60.0);

    // One ack per 10 ms for 10 s from a registered consumer: appended, not rewritten whole.
    let written_before = written_bytes(&server);
    let mut every = tokio::time::interval(Duration::from_millis(10));
    for _ in 0..1000 {
        every.tick().await;
        session.ack(ack("consumer-1/r0".into())).await.unwrap();
    }
    let written = written_bytes(&server) - written_before;
    peak = peak.max(rss_mib(&server));
    let disk = dir_bytes(&data);
    eprintln!(
        "registry churn: RSS {rss_before} → peak {peak} MiB; data dir {disk_before} → {disk} bytes; \
         {written} bytes written during 10 s of acks"
    );
    assert!(peak < rss_before + 64, "RSS {rss_before} → {peak} MiB");
    assert!(
        disk < disk_before + (16 << 20),
        "data dir {disk_before} → {disk} bytes"
    );
    assert!(
        written < 10 << 20,
        "{written} bytes written in 10 s of acks"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupt_registry_file_is_set_aside_and_the_core_starts_and_serves() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = TestServer::serve_dev(dir.path(), &[]);
    let session = grpc_session(&server.certs(), server.addr("grpc"), "consumer-1").await;
    session
        .register(RegisterRequest {
            consumer_id: "consumer-1/edge".into(),
            endpoint: "10.0.0.1:1".into(),
            labels: Default::default(),
        })
        .await
        .unwrap();
    drop(session);
    assert!(server.terminate(Duration::from_secs(15)).success());
    let registry = dir.path().join("data/consumers.jsonl");
    assert!(registry.exists(), "the registry was written");
    std::fs::write(&registry, b"\x00garbage{{{\nnot json either\n").unwrap();

    let server = server.restart_same_ports();
    let (secret, token) = server.secrets();
    let (status, body) = hook_put(server.addr("http"), &secret, "w", "1", b"code").await;
    assert_eq!(status, 201, "{body}");
    let session = grpc_session(&server.certs(), server.addr("grpc"), "consumer-1").await;
    let mut stream = session.subscribe(subscribe_all()).await.unwrap();
    assert_eq!(until_synced(&mut stream).await, 1);
    let (status, _) = admin_get(server.addr("http"), Some(&token), "/v1/consumers").await;
    assert_eq!(status, 200);
    let aside: Vec<String> = std::fs::read_dir(dir.path().join("data"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|name| name.starts_with("consumers.jsonl.damaged-"))
        .collect();
    assert_eq!(
        aside.len(),
        1,
        "the damaged file is kept aside for the operator"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cut_or_bit_flipped_log_tail_starts_a_new_epoch_and_consumers_get_the_next_upload() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = TestServer::serve_dev(dir.path(), &[]);
    let log = dir.path().join("data/log");
    let (secret, _) = server.secrets();
    for version in ["1", "2"] {
        let (status, body) = hook_put(server.addr("http"), &secret, "w", version, b"code").await;
        assert_eq!(status, 201, "{body}");
    }
    type Damage = fn(&Path);
    let cut: Damage = |log| {
        let len = std::fs::metadata(log).unwrap().len();
        std::fs::OpenOptions::new()
            .write(true)
            .open(log)
            .unwrap()
            .set_len(len - 20)
            .unwrap();
    };
    let flip: Damage = |log| {
        let mut bytes = std::fs::read(log).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 0x04;
        std::fs::write(log, bytes).unwrap();
    };
    for (what, damage, next) in [("cut", cut, "3"), ("bit-flipped", flip, "4")] {
        // A consumer that holds the head of the epoch.
        let session = grpc_session(&server.certs(), server.addr("grpc"), "consumer-1").await;
        let mut stream = session.subscribe(subscribe_all()).await.unwrap();
        let (epoch, head) = loop {
            let update = next_update(&mut stream).await;
            if update.kind == UpdateKind::Synced as i32 {
                break (update.epoch, update.revision);
            }
        };
        drop(stream);
        drop(session);
        assert!(server.terminate(Duration::from_secs(15)).success());
        assert!(
            std::fs::metadata(&log).unwrap().len() > 20,
            "{what}: the log holds records"
        );
        damage(&log);

        // The next upload lands before the consumer is back, as the damaged store would give
        // it the revision the consumer already holds.
        server = server.restart_same_ports();
        let (status, body) =
            hook_put(server.addr("http"), &secret, "w", next, next.as_bytes()).await;
        assert_eq!(status, 201, "{what}: {body}");
        let session = grpc_session(&server.certs(), server.addr("grpc"), "consumer-1").await;
        let mut stream = session
            .subscribe(SubscribeRequest {
                resume_revision: head,
                epoch: epoch.clone(),
                ..subscribe_all()
            })
            .await
            .unwrap();
        let first = next_update(&mut stream).await;
        assert_eq!(first.kind, UpdateKind::Reset as i32, "{what}: {first:?}");
        assert_ne!(first.epoch, epoch, "{what}: a new epoch");
        let (snapshot, _) = common::until_synced(&mut stream).await;
        assert!(
            snapshot
                .iter()
                .any(|u| u.kind == UpdateKind::Put as i32 && u.version == next),
            "{what}: the consumer receives the upload: {snapshot:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_token_gets_are_throttled_and_a_signed_out_cookie_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::serve_dev(dir.path(), &[]);
    let (_, token) = server.secrets();
    let http = server.addr("http");
    let client = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();

    // Sign in, use the cookie, sign out: the cookie is refused from then on.
    let signed_in = client
        .get(format!("http://{http}/?token={token}"))
        .send()
        .await
        .unwrap();
    assert_eq!(signed_in.status(), 303);
    let set_cookie = signed_in.headers()["set-cookie"]
        .to_str()
        .unwrap()
        .to_owned();
    assert!(
        set_cookie.contains("Max-Age=43200"),
        "a 12 h expiry: {set_cookie}"
    );
    let cookie = set_cookie.split(';').next().unwrap().to_owned();
    let with_cookie = || {
        client
            .get(format!("http://{http}/v1/workers"))
            .header("cookie", cookie.clone())
            .send()
    };
    assert_eq!(with_cookie().await.unwrap().status(), 200);
    let signed_out = client
        .post(format!("http://{http}/logout"))
        .header("cookie", cookie.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(signed_out.status(), 303);
    assert_eq!(with_cookie().await.unwrap().status(), 401);

    // 2,000 guesses from one address, half through the API and half through the page.
    let mut statuses = BTreeMap::<u16, usize>::new();
    let mut retry_after = None;
    for i in 0..2000 {
        let request = if i % 2 == 0 {
            client
                .get(format!("http://{http}/v1/consumers"))
                .bearer_auth(format!("guess-{i}"))
        } else {
            client.get(format!("http://{http}/?token=guess-{i}"))
        };
        let answer = request.send().await.unwrap();
        if answer.status() == 429 {
            retry_after = answer.headers().get("retry-after").cloned();
        }
        *statuses.entry(answer.status().as_u16()).or_default() += 1;
    }
    eprintln!("2,000 wrong-token GETs: {statuses:?}");
    assert!(
        statuses.get(&429).copied().unwrap_or(0) > 1900,
        "{statuses:?}"
    );
    assert!(
        statuses.get(&401).copied().unwrap_or(0) < 60,
        "{statuses:?}"
    );
    assert!(retry_after.is_some(), "429 with Retry-After");
    // Even the right token waits: the address spent its failures.
    let (status, _) = admin_get(http, Some(&token), "/v1/workers").await;
    assert_eq!(status, 429);
    // Another address is not held by this one's failures.
    let elsewhere = reqwest::Client::builder()
        .local_address(Some("127.0.0.2".parse().unwrap()))
        .build()
        .unwrap();
    let answer = elsewhere
        .get(format!("http://{http}/v1/workers"))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status(), 200);
    assert!(refusals(&server, "hook_auth_failures").await > 1900.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_version_is_refused_naming_the_version_rule_before_any_size_check() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::serve_dev(dir.path(), &[]);
    let (_, token) = server.secrets();
    let (status, body) = upload_with(
        server.addr("upload"),
        &token,
        "",
        "w",
        &"1".repeat(2000),
        b"code",
    )
    .await;
    assert_eq!(status, 400, "{body}");
    let error = body["error"].as_str().unwrap();
    assert!(
        error.contains("version must match") && error.contains("at most 64 characters"),
        "{error}"
    );
}

/// An ack stream written as fast as QUIC takes it, its answers never read: the core reads one
/// frame at a time, so its memory stays flat while ~100 MB of acks go through, a correct
/// client is served meanwhile, and every batch is answered, in order, once the flooder reads.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ack_stream_that_floods_without_reading_leaves_memory_bounded() {
    const FRAMES: usize = 120;
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::serve_dev(dir.path(), &[]);
    let (secret, _) = server.secrets();
    hook_put(server.addr("http"), &secret, "app", "1", b"code").await;
    let (certs, quic_addr) = (server.certs(), server.addr("quic"));
    let (endpoint, config) = raw_quic(&certs);
    let connect = || raw_quic_connect(&endpoint, &config, quic_addr);
    let (flooder, bystander) = (connect().await, connect().await);
    // 800 acks padded with a 1 KiB reason each (ignored: applied): about 830 KB, a frame under
    // the request limit.
    let nack = AckRequest {
        worker_name: "app".into(),
        revision: 1,
        applied: true,
        error: "x".repeat(1024),
        ..AckRequest::default()
    };
    let frame = encode_frame(&QuicRequest {
        request: Some(quic_request::Request::Acks(AckBatch {
            acks: vec![nack; 800],
        })),
    });
    assert!(frame.len() > 800 << 10, "{}", frame.len());
    let baseline = rss_mib(&server);
    let (mut send, recv) = flooder.open_bi().await.unwrap();
    let writer = tokio::spawn(async move {
        for _ in 0..FRAMES {
            send.write_all(&frame).await.unwrap();
        }
        send.finish().unwrap();
    });
    let mut peak = baseline;
    while !writer.is_finished() {
        peak = peak.max(rss_mib(&server));
        assert!(
            matches!(
                quic_exchange(&bystander, &list_request()).await,
                quic_response::Response::Workers(_)
            ),
            "a correct client is served during the flood"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    writer.await.unwrap();
    eprintln!(
        "ack flood: core RSS {baseline} MiB before, {peak} MiB at most during {FRAMES} frames"
    );
    assert!(
        peak < baseline + 48,
        "~{} MB of acks raised the core from {baseline} to {peak} MiB",
        FRAMES * 830 / 1000
    );
    let mut frames = FrameReader::new(recv, MAX_FRAME_BYTES);
    let mut acked = 0;
    while let Some(answer) =
        tokio::time::timeout(Duration::from_secs(30), frames.next::<QuicResponse>())
            .await
            .expect("answers within 30 s")
            .unwrap()
    {
        match answer.response {
            Some(quic_response::Response::Acked(_)) => acked += 1,
            other => panic!("after {acked} answers: {other:?}"),
        }
    }
    assert_eq!(acked, FRAMES, "one answer per batch");

    // Anything but acks on an ack stream: INVALID_ARGUMENT there, the connection goes on.
    let (mut send, recv) = flooder.open_bi().await.unwrap();
    let one = encode_frame(&QuicRequest {
        request: Some(quic_request::Request::Acks(AckBatch::default())),
    });
    send.write_all(&one).await.unwrap();
    send.write_all(&list_request()).await.unwrap();
    let mut frames = FrameReader::new(recv, MAX_FRAME_BYTES);
    let mut answers = Vec::new();
    while let Some(answer) =
        tokio::time::timeout(Duration::from_secs(10), frames.next::<QuicResponse>())
            .await
            .expect("answers within 10 s")
            .unwrap()
    {
        answers.push(answer.response);
    }
    match &answers[..] {
        [
            Some(quic_response::Response::Acked(_)),
            Some(quic_response::Response::Error(status)),
        ] => {
            assert_eq!(status.code, 3, "{status:?}");
            assert!(status.message.contains("only acks"), "{status:?}");
        }
        other => panic!("{other:?}"),
    }
    assert!(matches!(
        quic_exchange(&flooder, &list_request()).await,
        quic_response::Response::Workers(_)
    ));
}
