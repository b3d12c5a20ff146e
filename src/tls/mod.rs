//! Everything TLS: the dev PKI, the mTLS server and client configurations for gRPC and QUIC, and
//! the consumer identity taken from a verified client certificate.
//!
//! This is the only module that touches rustls, rcgen or x509-parser. gRPC and QUIC share one
//! client verifier ([`ServerTls`]) and one identity extractor ([`identity_of`]). It depends on
//! nothing else of ours; transports depend on it.
//!
//! Layout:
//! - [`pki`] — `workerpush certs` / `serve --dev` certificate generation; [`TestPki`] for tests.
//! - [`server`] — [`ServerTls`], reloadable server certificate, client CA and CRLs.
//! - [`connections`] — [`LiveConnections`], cut when their client certificate is revoked.
//! - [`client`] — [`client_config`] for `workerpush watch` and tests.
//! - [`identity`] — [`identity_of`].

pub mod client;
pub mod connections;
pub mod identity;
pub mod pki;
pub mod server;
mod test_pki;

#[cfg(test)]
mod handshake_tests;

use std::path::PathBuf;
use std::sync::Arc;

use rustls::crypto::{CryptoProvider, ring};

pub use client::{ClientTlsPurpose, client_config, client_config_from_pem};
pub use connections::{LiveConnections, Tracked};
pub use identity::identity_of;
pub use pki::{PkiReport, PkiRequest, ensure_dev, generate, revocation_list};
pub use server::{Reloaded, ServerTls};
pub use test_pki::TestPki;

/// ALPN protocol of our QUIC transport; a QUIC peer that does not offer it is refused.
pub const QUIC_ALPN: &[u8] = b"workerpush/1";

/// ALPN protocol of gRPC (HTTP/2 over TLS).
pub const GRPC_ALPN: &[u8] = b"h2";

/// TLS 1.3, then 1.2: what gRPC accepts.
static TLS12_AND_13: &[&rustls::SupportedProtocolVersion] =
    &[&rustls::version::TLS13, &rustls::version::TLS12];
/// TLS 1.3 only: what QUIC requires.
static TLS13_ONLY: &[&rustls::SupportedProtocolVersion] = &[&rustls::version::TLS13];

/// Everything that can go wrong loading, generating or using TLS material.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file or directory involved.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// A PEM file (or buffer) could not be parsed.
    #[error("{what}: invalid PEM: {source}")]
    Pem {
        /// Which file or buffer.
        what: String,
        /// The underlying error.
        source: rustls_pki_types::pem::Error,
    },
    /// A CRL file holds no `X509 CRL` PEM block.
    #[error("{what}: no certificate revocation list found")]
    NoCrl {
        /// Which file.
        what: String,
    },
    /// A PEM file (or buffer) holds no certificate.
    #[error("{what}: no certificate found")]
    NoCertificate {
        /// Which file or buffer.
        what: String,
    },
    /// The CA certificate exists but its key does not, so nothing new can be signed.
    #[error(
        "{0} is missing: cannot issue new certificates with the existing CA (use --force to make a new CA)"
    )]
    CaKeyMissing(PathBuf),
    /// A client name is not acceptable as a consumer identity.
    #[error("invalid client name {0:?}: must match ^[a-z0-9][a-z0-9_.-]{{0,62}}$")]
    InvalidClientName(String),
    /// A `--san` value is neither an IP address nor a DNS name.
    #[error("invalid subject alternative name {0:?}")]
    InvalidSan(String),
    /// A certificate could not be parsed.
    #[error("invalid certificate: {0}")]
    InvalidCertificate(String),
    /// A certificate has neither a SPIFFE consumer URI SAN nor a Subject CN.
    #[error(
        "certificate has no consumer identity (no spiffe://workerpush/consumer/ URI SAN, no CN)"
    )]
    NoIdentity,
    /// A certificate names an identity that is not usable.
    #[error("invalid consumer identity in certificate: {0}")]
    InvalidIdentity(String),
    /// Certificate generation failed.
    #[error("certificate generation: {0}")]
    Rcgen(#[from] rcgen::Error),
    /// rustls refused the material (e.g. the key does not match the certificate).
    #[error("tls: {0}")]
    Rustls(#[from] rustls::Error),
    /// The client CA bundle could not make a verifier (e.g. it holds no usable certificate).
    #[error("client CA: {0}")]
    ClientVerifier(#[from] rustls::server::VerifierBuilderError),
}

/// Installs ring as the process-wide rustls crypto provider.
///
/// Our own configs name their provider explicitly, but libraries that build rustls configs on
/// their own (reqwest with `rustls-no-provider`, tonic) need a process default. Call it first in
/// `main` and in every test binary; calling it again is harmless.
pub fn install_crypto_provider() {
    // An error only means a provider is already installed, which is what we want.
    let _ = ring::default_provider().install_default();
}

/// The ring provider with AES-128-GCM suites ahead of AES-256-GCM.
///
/// ring's default order negotiates AES-256-GCM first; AES-128-GCM is about 30% cheaper per byte
/// on this hardware and is what QUIC uses for its initial packets anyway.
pub fn crypto_provider() -> Arc<CryptoProvider> {
    use ring::cipher_suite as suite;
    Arc::new(CryptoProvider {
        cipher_suites: vec![
            suite::TLS13_AES_128_GCM_SHA256,
            suite::TLS13_AES_256_GCM_SHA384,
            suite::TLS13_CHACHA20_POLY1305_SHA256,
            suite::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256,
            suite::TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384,
            suite::TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256,
            suite::TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256,
            suite::TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384,
            suite::TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256,
        ],
        ..ring::default_provider()
    })
}

/// Reads a file whole, naming it in the error.
fn read_file(path: &std::path::Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Io {
        path: path.to_path_buf(),
        source,
    })
}

/// Every certificate in a PEM buffer, in order; at least one.
fn certs_from_pem(
    pem: &[u8],
    what: &str,
) -> Result<Vec<rustls_pki_types::CertificateDer<'static>>, TlsError> {
    use rustls_pki_types::pem::PemObject;
    let certs = rustls_pki_types::CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|source| TlsError::Pem {
            what: what.to_owned(),
            source,
        })?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate {
            what: what.to_owned(),
        });
    }
    Ok(certs)
}

/// The first private key (PKCS#8, SEC1 or PKCS#1) in a PEM buffer.
fn key_from_pem(
    pem: &[u8],
    what: &str,
) -> Result<rustls_pki_types::PrivateKeyDer<'static>, TlsError> {
    use rustls_pki_types::pem::PemObject;
    rustls_pki_types::PrivateKeyDer::from_pem_slice(pem).map_err(|source| TlsError::Pem {
        what: what.to_owned(),
        source,
    })
}
