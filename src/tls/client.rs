//! Client configurations for consumers (`workerpush watch`) and tests: trust exactly one CA,
//! present one client certificate.
//!
//! Knows nothing of tonic or quinn; they take the returned `rustls::ClientConfig`.

use std::path::Path;
use std::sync::Arc;

use rustls::{ClientConfig, RootCertStore, SupportedProtocolVersion};

use super::{
    GRPC_ALPN, QUIC_ALPN, TLS12_AND_13, TLS13_ONLY, TlsError, certs_from_pem, crypto_provider,
    key_from_pem, read_file,
};

/// Which transport a client configuration is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientTlsPurpose {
    /// gRPC over HTTP/2: TLS 1.2 and 1.3, ALPN `h2`.
    Grpc,
    /// Our QUIC protocol: TLS 1.3 only (QUIC requires it), ALPN `workerpush/1`.
    Quic,
}

impl ClientTlsPurpose {
    fn versions(self) -> &'static [&'static SupportedProtocolVersion] {
        match self {
            Self::Grpc => TLS12_AND_13,
            Self::Quic => TLS13_ONLY,
        }
    }

    fn alpn(self) -> &'static [u8] {
        match self {
            Self::Grpc => GRPC_ALPN,
            Self::Quic => QUIC_ALPN,
        }
    }
}

/// A client configuration from PEM files: `ca_pem_path` is the only trust anchor, `cert_path`
/// (leaf first) and `key_path` the client certificate presented to the server.
pub fn client_config(
    ca_pem_path: &Path,
    cert_path: &Path,
    key_path: &Path,
    purpose: ClientTlsPurpose,
) -> Result<Arc<ClientConfig>, TlsError> {
    build(
        &read_file(ca_pem_path)?,
        &ca_pem_path.display().to_string(),
        &read_file(cert_path)?,
        &cert_path.display().to_string(),
        &read_file(key_path)?,
        &key_path.display().to_string(),
        purpose,
    )
}

/// [`client_config`] from PEM bytes already in memory.
pub fn client_config_from_pem(
    ca: &[u8],
    cert: &[u8],
    key: &[u8],
    purpose: ClientTlsPurpose,
) -> Result<Arc<ClientConfig>, TlsError> {
    build(
        ca,
        "CA PEM",
        cert,
        "certificate PEM",
        key,
        "key PEM",
        purpose,
    )
}

fn build(
    ca: &[u8],
    ca_name: &str,
    cert: &[u8],
    cert_name: &str,
    key: &[u8],
    key_name: &str,
    purpose: ClientTlsPurpose,
) -> Result<Arc<ClientConfig>, TlsError> {
    let mut roots = RootCertStore::empty();
    for ca in certs_from_pem(ca, ca_name)? {
        roots.add(ca)?;
    }
    let chain = certs_from_pem(cert, cert_name)?;
    let key = key_from_pem(key, key_name)?;
    // The default `resumption` (an in-memory session cache) stays on: reconnects resume.
    let mut config = ClientConfig::builder_with_provider(crypto_provider())
        .with_protocol_versions(purpose.versions())?
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key)?;
    config.alpn_protocols = vec![purpose.alpn().to_vec()];
    Ok(Arc::new(config))
}
