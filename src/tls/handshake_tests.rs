//! Real mTLS handshakes over TCP on 127.0.0.1:0 between [`ServerTls`] and [`client_config`].

use std::path::Path;
use std::sync::Arc;

use rustls::pki_types::ServerName;
use rustls::{CipherSuite, ClientConfig, HandshakeKind, ServerConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::{TlsAcceptor, TlsConnector};

use super::pki::{DEV_CLIENT, client_paths};
use super::*;

/// What the server saw of a successful handshake.
#[derive(Debug)]
struct Accepted {
    identity: String,
    kind: Option<HandshakeKind>,
    suite: Option<CipherSuite>,
    alpn: Option<Vec<u8>>,
}

/// One connection: the server's accept outcome and whether the client could read the byte the
/// server sends after a successful handshake. With TLS 1.3 a refused client certificate may
/// only show on the client's first read, so both sides are reported.
async fn connect(
    server: Arc<ServerConfig>,
    client: Arc<ClientConfig>,
) -> (Result<Accepted, String>, Result<(), String>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server_task = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.map_err(|e| e.to_string())?;
        let mut tls = TlsAcceptor::from(server)
            .accept(tcp)
            .await
            .map_err(|e| e.to_string())?;
        let (_, conn) = tls.get_ref();
        let leaf = conn
            .peer_certificates()
            .and_then(|chain| chain.first())
            .ok_or("no peer certificate")?;
        let accepted = Accepted {
            identity: identity_of(leaf).map_err(|e| e.to_string())?,
            kind: conn.handshake_kind(),
            suite: conn.negotiated_cipher_suite().map(|s| s.suite()),
            alpn: conn.alpn_protocol().map(<[u8]>::to_vec),
        };
        tls.write_all(b"k").await.map_err(|e| e.to_string())?;
        tls.shutdown().await.map_err(|e| e.to_string())?;
        Ok::<_, String>(accepted)
    });

    let client_result = async {
        let tcp = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
        let name = ServerName::try_from("localhost").unwrap();
        let mut tls = TlsConnector::from(client)
            .connect(name, tcp)
            .await
            .map_err(|e| e.to_string())?;
        let mut byte = [0u8; 1];
        tls.read_exact(&mut byte).await.map_err(|e| e.to_string())?;
        Ok::<_, String>(())
    }
    .await;
    let server_result = server_task.await.unwrap();
    (server_result, client_result)
}

async fn assert_accepted(server: Arc<ServerConfig>, client: Arc<ClientConfig>) -> Accepted {
    let (server_result, client_result) = connect(server, client).await;
    client_result.expect("client side of the handshake");
    server_result.expect("server side of the handshake")
}

/// Asserts the server refused the client with an error containing `reason`, and the client saw
/// no data.
async fn assert_refused(server: Arc<ServerConfig>, client: Arc<ClientConfig>, reason: &str) {
    let (server_result, client_result) = connect(server, client).await;
    match server_result {
        Ok(accepted) => panic!("server accepted: {accepted:?}"),
        Err(e) => assert!(e.contains(reason), "refused for {e:?}, not {reason:?}"),
    }
    assert!(client_result.is_err(), "client got data from the server");
}

fn loaded(pki: &TestPki) -> (tempfile::TempDir, ServerTls) {
    let dir = tempfile::tempdir().unwrap();
    pki.write_to(dir.path()).unwrap();
    let tls = ServerTls::load(dir.path()).unwrap();
    (dir, tls)
}

fn grpc_client(pki: &TestPki, (cert, key): (String, String)) -> Arc<ClientConfig> {
    client_config_from_pem(
        pki.ca_pem().as_bytes(),
        cert.as_bytes(),
        key.as_bytes(),
        ClientTlsPurpose::Grpc,
    )
    .unwrap()
}

fn dev_client_from_files(dir: &Path, purpose: ClientTlsPurpose) -> Arc<ClientConfig> {
    let [cert, key] = client_paths(dir, DEV_CLIENT);
    client_config(&dir.join("ca.pem"), &cert, &key, purpose).unwrap()
}

#[tokio::test]
async fn valid_client_completes_mtls_and_is_identified_by_its_certificate() {
    let pki = TestPki::new();
    let (dir, tls) = loaded(&pki);
    let client = dev_client_from_files(dir.path(), ClientTlsPurpose::Grpc);
    let accepted = assert_accepted(tls.grpc_config(), client).await;
    assert_eq!(accepted.identity, "consumer-1");
    assert_eq!(accepted.alpn.as_deref(), Some(&b"h2"[..]));
    assert_eq!(accepted.suite, Some(CipherSuite::TLS13_AES_128_GCM_SHA256));
}

#[tokio::test]
async fn reconnecting_client_resumes_its_session() {
    let pki = TestPki::new();
    let (_dir, tls) = loaded(&pki);
    let client = grpc_client(&pki, pki.client("edge-7"));
    let first = assert_accepted(tls.grpc_config(), client.clone()).await;
    assert_eq!(first.kind, Some(HandshakeKind::Full));
    let second = assert_accepted(tls.grpc_config(), client).await;
    assert_eq!(second.kind, Some(HandshakeKind::Resumed));
    assert_eq!(second.identity, "edge-7");
}

#[tokio::test]
async fn server_picks_aes_128_even_when_the_client_prefers_aes_256() {
    let pki = TestPki::new();
    let (_dir, tls) = loaded(&pki);
    let (cert, key) = pki.client("edge-1");
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(super::certs_from_pem(pki.ca_pem().as_bytes(), "ca").unwrap()[0].clone())
        .unwrap();
    // ring's stock order: AES-256-GCM first.
    let client =
        ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_client_auth_cert(
                super::certs_from_pem(cert.as_bytes(), "cert").unwrap(),
                super::key_from_pem(key.as_bytes(), "key").unwrap(),
            )
            .unwrap();
    let accepted = assert_accepted(tls.grpc_config(), Arc::new(client)).await;
    assert_eq!(accepted.suite, Some(CipherSuite::TLS13_AES_128_GCM_SHA256));
}

#[tokio::test]
async fn tls12_client_is_accepted_on_grpc() {
    let pki = TestPki::new();
    let (_dir, tls) = loaded(&pki);
    let (cert, key) = pki.client("old-edge");
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(super::certs_from_pem(pki.ca_pem().as_bytes(), "ca").unwrap()[0].clone())
        .unwrap();
    let client = ClientConfig::builder_with_provider(crypto_provider())
        .with_protocol_versions(&[&rustls::version::TLS12])
        .unwrap()
        .with_root_certificates(roots)
        .with_client_auth_cert(
            super::certs_from_pem(cert.as_bytes(), "cert").unwrap(),
            super::key_from_pem(key.as_bytes(), "key").unwrap(),
        )
        .unwrap();
    let accepted = assert_accepted(tls.grpc_config(), Arc::new(client)).await;
    assert_eq!(accepted.identity, "old-edge");
    assert_eq!(
        accepted.suite,
        Some(CipherSuite::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256)
    );
}

#[tokio::test]
async fn client_without_certificate_is_refused() {
    let pki = TestPki::new();
    let (_dir, tls) = loaded(&pki);
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(super::certs_from_pem(pki.ca_pem().as_bytes(), "ca").unwrap()[0].clone())
        .unwrap();
    let client = ClientConfig::builder_with_provider(crypto_provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    assert_refused(
        tls.grpc_config(),
        Arc::new(client),
        "peer sent no certificates",
    )
    .await;
}

#[tokio::test]
async fn client_from_another_ca_is_refused() {
    let pki = TestPki::new();
    let (_dir, tls) = loaded(&pki);
    let client = grpc_client(&pki, TestPki::invalid_client_from_other_ca("consumer-1"));
    assert_refused(tls.grpc_config(), client, "BadSignature").await;
}

#[tokio::test]
async fn ca_certificate_used_as_client_leaf_is_refused() {
    let pki = TestPki::new();
    let (_dir, tls) = loaded(&pki);
    let client = grpc_client(&pki, pki.invalid_client_ca_as_leaf());
    assert_refused(tls.grpc_config(), client, "CaUsedAsEndEntity").await;
}

#[tokio::test]
async fn client_certificate_with_server_only_eku_is_refused() {
    let pki = TestPki::new();
    let (_dir, tls) = loaded(&pki);
    let client = grpc_client(&pki, pki.invalid_client_server_only_eku("consumer-1"));
    assert_refused(
        tls.grpc_config(),
        client,
        "does not allow extended key usage for client authentication",
    )
    .await;
}

#[tokio::test]
async fn expired_client_certificate_is_refused() {
    let pki = TestPki::new();
    let (_dir, tls) = loaded(&pki);
    let client = grpc_client(&pki, pki.invalid_client_expired("consumer-1"));
    assert_refused(tls.grpc_config(), client, "certificate expired").await;
}

#[tokio::test]
async fn not_yet_valid_client_certificate_is_refused() {
    let pki = TestPki::new();
    let (_dir, tls) = loaded(&pki);
    let client = grpc_client(&pki, pki.invalid_client_not_yet_valid("consumer-1"));
    assert_refused(tls.grpc_config(), client, "certificate not valid yet").await;
}

#[tokio::test]
async fn self_signed_client_certificate_is_refused() {
    let pki = TestPki::new();
    let (_dir, tls) = loaded(&pki);
    let client = grpc_client(&pki, TestPki::invalid_client_self_signed("consumer-1"));
    assert_refused(tls.grpc_config(), client, "UnknownIssuer").await;
}

#[tokio::test]
async fn quic_config_speaks_only_tls13_with_workerpush_alpn() {
    let pki = TestPki::new();
    let (dir, tls) = loaded(&pki);
    let quic_client = dev_client_from_files(dir.path(), ClientTlsPurpose::Quic);
    let accepted = assert_accepted(tls.quic_config(), quic_client.clone()).await;
    assert_eq!(accepted.alpn.as_deref(), Some(QUIC_ALPN));
    assert_eq!(accepted.identity, "consumer-1");

    // A gRPC client (ALPN h2) is refused by the QUIC configuration.
    let grpc = dev_client_from_files(dir.path(), ClientTlsPurpose::Grpc);
    assert_refused(
        tls.quic_config(),
        grpc,
        "doesn't support any known protocol",
    )
    .await;

    // quinn takes both as they are.
    quinn::crypto::rustls::QuicServerConfig::try_from(tls.quic_config()).unwrap();
    quinn::crypto::rustls::QuicClientConfig::try_from(quic_client).unwrap();
    assert_eq!(tls.quic_config().max_early_data_size, 0);
}

#[tokio::test]
async fn reload_swaps_client_ca_and_server_certificate_in_configs_already_handed_out() {
    let old = TestPki::new();
    let new = TestPki::new();
    let (dir, tls) = loaded(&old);
    let grpc = tls.grpc_config();
    // Clients of the old CA that trust both server certificates: after the reload only the
    // server's verdict on their certificate can keep them out.
    let both_cas = format!("{}{}", old.ca_pem(), new.ca_pem());
    let old_client = |name: &str| {
        let (cert, key) = old.client(name);
        client_config_from_pem(
            both_cas.as_bytes(),
            cert.as_bytes(),
            key.as_bytes(),
            ClientTlsPurpose::Grpc,
        )
        .unwrap()
    };
    let resuming = old_client("consumer-1");
    assert_accepted(grpc.clone(), resuming.clone()).await;
    let resumed = assert_accepted(grpc.clone(), resuming.clone()).await;
    assert_eq!(resumed.kind, Some(HandshakeKind::Resumed));

    new.write_to(dir.path()).unwrap();
    tls.reload().unwrap();

    // rustls does not re-verify a resumed session's client certificate: the session from
    // before the reload must not be honoured.
    assert_refused(grpc.clone(), resuming, "invalid peer certificate").await;
    assert_refused(
        grpc.clone(),
        old_client("consumer-2"),
        "invalid peer certificate",
    )
    .await;
    // The new client trusts only the new CA, so this also proves the server certificate changed.
    let accepted = assert_accepted(grpc, grpc_client(&new, new.client("consumer-2"))).await;
    assert_eq!(accepted.identity, "consumer-2");
}

#[tokio::test]
async fn crl_reload_refuses_revoked_clients_and_cuts_their_live_connections() {
    let pki = TestPki::new();
    let dir = tempfile::tempdir().unwrap();
    pki.write_to(dir.path()).unwrap();
    let crl = dir.path().join("crl.pem");
    std::fs::write(&crl, pki.crl(&[], 1)).unwrap();
    let tls = ServerTls::load_with_crl(dir.path(), Some(&crl)).unwrap();
    assert!(tls.files().contains(&crl));
    let revoked = pki.client("revoked");
    let kept = pki.client("kept");
    let revoked_client = grpc_client(&pki, revoked.clone());
    assert_accepted(tls.grpc_config(), revoked_client.clone()).await;
    let resumed = assert_accepted(tls.grpc_config(), revoked_client.clone()).await;
    assert_eq!(resumed.kind, Some(HandshakeKind::Resumed));

    let leaf = |pem: &str| certs_from_pem(pem.as_bytes(), "leaf").unwrap();
    let connections = tls.connections();
    let revoked_live = connections.track(&leaf(&revoked.0));
    let kept_live = connections.track(&leaf(&kept.0));
    assert_eq!(connections.len(), 2);

    std::fs::write(&crl, pki.crl(&[&revoked.0], 2)).unwrap();
    assert_eq!(tls.reload().unwrap().revoked_connections, 1);
    assert!(revoked_live.cut().is_cancelled());
    assert!(!kept_live.cut().is_cancelled());
    // Neither a resumed session nor a full handshake gets past the revocation.
    assert_refused(
        tls.grpc_config(),
        revoked_client,
        "invalid peer certificate",
    )
    .await;
    assert_refused(
        tls.grpc_config(),
        grpc_client(&pki, revoked),
        "invalid peer certificate",
    )
    .await;
    assert_accepted(tls.grpc_config(), grpc_client(&pki, kept)).await;
    drop(revoked_live);
    assert_eq!(connections.len(), 1);

    std::fs::write(&crl, "no CRL here").unwrap();
    assert!(matches!(tls.reload(), Err(TlsError::NoCrl { .. })));
}

#[tokio::test]
async fn failed_reload_keeps_serving_the_old_material() {
    let pki = TestPki::new();
    let (dir, tls) = loaded(&pki);
    let other = TestPki::new();
    std::fs::write(dir.path().join("server-key.pem"), other.server_key_pem()).unwrap();
    let err = tls.reload().unwrap_err();
    assert!(matches!(err, TlsError::Rustls(_)), "{err}");

    std::fs::write(dir.path().join("ca.pem"), "not a certificate").unwrap();
    let err = tls.reload().unwrap_err();
    assert!(matches!(err, TlsError::NoCertificate { .. }), "{err}");

    let accepted =
        assert_accepted(tls.grpc_config(), grpc_client(&pki, pki.client("edge-2"))).await;
    assert_eq!(accepted.identity, "edge-2");
}

#[test]
fn load_reports_the_missing_file() {
    let dir = tempfile::tempdir().unwrap();
    let err = ServerTls::load(dir.path()).unwrap_err();
    match err {
        TlsError::Io { path, .. } => assert_eq!(path, dir.path().join("ca.pem")),
        other => panic!("unexpected {other}"),
    }
}

#[test]
fn installing_the_crypto_provider_twice_is_harmless() {
    install_crypto_provider();
    install_crypto_provider();
    assert!(rustls::crypto::CryptoProvider::get_default().is_some());
}
