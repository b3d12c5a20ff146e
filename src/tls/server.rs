//! [`ServerTls`]: the mTLS server configurations of the gRPC and QUIC listeners, built once
//! from the certs directory and reloadable in place.
//!
//! Both configurations hold the same swappable certificate resolver and client verifier, so a
//! [`ServerTls::reload`] reaches listeners that were handed their config long before. A reload
//! also re-reads the optional CRL file and cuts the [`LiveConnections`] whose client
//! certificate it now revokes. Knows nothing of tonic or quinn.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, PoisonError, RwLock};

use rustls::client::danger::HandshakeSignatureValid;
use rustls::crypto::CryptoProvider;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{
    ClientHello, ProducesTickets, ResolvesServerCert, ServerSessionMemoryCache,
    StoresServerSessions, WebPkiClientVerifier,
};
use rustls::sign::CertifiedKey;
use rustls::{
    CertificateError, DigitallySignedStruct, DistinguishedName, RootCertStore, ServerConfig,
    SignatureScheme, SupportedProtocolVersion,
};
use rustls_pki_types::{CertificateDer, CertificateRevocationListDer, UnixTime};

use super::connections::LiveConnections;
use super::pki::{CA_CERT, SERVER_CERT, SERVER_KEY};
use super::{
    GRPC_ALPN, QUIC_ALPN, TLS12_AND_13, TLS13_ONLY, TlsError, certs_from_pem, crypto_provider,
    key_from_pem, read_file,
};

/// Sessions kept per configuration for TLS 1.2 session-id resumption.
const SESSION_CACHE_SIZE: usize = 1024;

/// The server side of mTLS for both transports.
///
/// Loaded from a certs directory: `ca.pem` (the client CA bundle), `server.pem` (leaf first,
/// then intermediates) and `server-key.pem`. Every client must present a certificate chaining
/// to the client CA, with the ClientAuth EKU, and not be revoked by the CRL file if one is
/// given.
#[derive(Debug)]
pub struct ServerTls {
    dir: PathBuf,
    crl_file: Option<PathBuf>,
    connections: Arc<LiveConnections>,
    provider: Arc<CryptoProvider>,
    cert: Arc<ReloadableCert>,
    verifier: Arc<ReloadableClientVerifier>,
    grpc_resumption: Resumption,
    quic_resumption: Resumption,
    grpc: Arc<ServerConfig>,
    quic: Arc<ServerConfig>,
}

impl ServerTls {
    /// Reads `certs_dir` and builds both configurations.
    pub fn load(certs_dir: &Path) -> Result<Self, TlsError> {
        Self::load_with_crl(certs_dir, None)
    }

    /// [`Self::load`], refusing client certificates revoked by the PEM CRLs in `crl_file`.
    pub fn load_with_crl(certs_dir: &Path, crl_file: Option<&Path>) -> Result<Self, TlsError> {
        let provider = crypto_provider();
        let material = Material::read(certs_dir, crl_file, &provider)?;
        let cert = Arc::new(ReloadableCert(Swap::new(material.certified_key)));
        let verifier = Arc::new(ReloadableClientVerifier(Swap::new(material.verifier)));

        let grpc_resumption = Resumption::new()?;
        let mut grpc = Self::config(&provider, TLS12_AND_13, &cert, &verifier, &grpc_resumption)?;
        grpc.alpn_protocols = vec![GRPC_ALPN.to_vec()];

        let quic_resumption = Resumption::new()?;
        let mut quic = Self::config(&provider, TLS13_ONLY, &cert, &verifier, &quic_resumption)?;
        quic.alpn_protocols = vec![QUIC_ALPN.to_vec()];
        // QUIC allows only 0 or u32::MAX. No 0-RTT: early data is replayable and a subscribe
        // gains nothing from saving one round trip on a long-lived connection.
        quic.max_early_data_size = 0;

        Ok(Self {
            dir: certs_dir.to_path_buf(),
            crl_file: crl_file.map(Path::to_path_buf),
            connections: LiveConnections::new(),
            provider,
            cert,
            verifier,
            grpc_resumption,
            quic_resumption,
            grpc: Arc::new(grpc),
            quic: Arc::new(quic),
        })
    }

    fn config(
        provider: &Arc<CryptoProvider>,
        versions: &[&'static SupportedProtocolVersion],
        cert: &Arc<ReloadableCert>,
        verifier: &Arc<ReloadableClientVerifier>,
        resumption: &Resumption,
    ) -> Result<ServerConfig, TlsError> {
        let mut config = ServerConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(versions)?
            .with_client_cert_verifier(verifier.clone())
            .with_cert_resolver(cert.clone());
        // Our suite order (AES-128-GCM first) wins over the client's.
        config.ignore_client_order = true;
        config.session_storage = resumption.sessions.clone();
        config.ticketer = resumption.tickets.clone();
        Ok(config)
    }

    /// The configuration of the gRPC listener: TLS 1.2 and 1.3, ALPN `h2`.
    pub fn grpc_config(&self) -> Arc<ServerConfig> {
        self.grpc.clone()
    }

    /// The configuration of the QUIC listener: TLS 1.3 only, ALPN `workerpush/1`, no 0-RTT.
    /// Ready for `quinn::crypto::rustls::QuicServerConfig::try_from`.
    pub fn quic_config(&self) -> Arc<ServerConfig> {
        self.quic.clone()
    }

    /// The directory this was loaded from.
    pub fn certs_dir(&self) -> &Path {
        &self.dir
    }

    /// The files a reload reads: the client CA bundle, the server certificate and key, and the
    /// CRL file if any. Watch these to reload on change.
    pub fn files(&self) -> Vec<PathBuf> {
        let mut files = vec![
            self.dir.join(CA_CERT),
            self.dir.join(SERVER_CERT),
            self.dir.join(SERVER_KEY),
        ];
        files.extend(self.crl_file.clone());
        files
    }

    /// The live connections of both transports; each transport tracks its connections here so
    /// that [`Self::reload`] can cut the revoked ones.
    pub fn connections(&self) -> Arc<LiveConnections> {
        self.connections.clone()
    }

    /// Re-reads the certs directory (and the CRL file) and swaps in the new server
    /// certificate, client CA and CRLs.
    ///
    /// Configurations handed out earlier see the new material on their next handshake.
    /// Established connections stay, except those whose client certificate the new CRLs
    /// revoke: they are cut (see [`LiveConnections`]). Resumption state is dropped too: rustls
    /// does not re-verify the client certificate of a resumed session, so a ticket issued
    /// under the old CA or before a revocation must not outlive it. On error the old material
    /// stays in place and nothing is cut.
    pub fn reload(&self) -> Result<Reloaded, TlsError> {
        let material = Material::read(&self.dir, self.crl_file.as_deref(), &self.provider)?;
        let grpc_resumption = Resumption::fresh()?;
        let quic_resumption = Resumption::fresh()?;
        self.verifier.0.replace(material.verifier);
        self.cert.0.replace(material.certified_key);
        self.grpc_resumption.replace(grpc_resumption);
        self.quic_resumption.replace(quic_resumption);
        let verifier = self.verifier.0.current();
        let revoked_connections = self.connections.cut_where(|chain| {
            let Some((leaf, intermediates)) = chain.split_first() else {
                return false;
            };
            // Only revocation cuts a live connection; a CA dropped from the bundle or an
            // expiry affects new handshakes only.
            matches!(
                verifier.verify_client_cert(leaf, intermediates, UnixTime::now()),
                Err(rustls::Error::InvalidCertificate(CertificateError::Revoked))
            )
        });
        Ok(Reloaded {
            revoked_connections,
        })
    }
}

/// What a [`ServerTls::reload`] did besides swapping the material.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reloaded {
    /// Live connections cut because their client certificate is now revoked.
    pub revoked_connections: usize,
}

/// What one read of the certs directory yields, validated as a whole before anything swaps.
struct Material {
    certified_key: Arc<CertifiedKey>,
    verifier: Arc<dyn ClientCertVerifier>,
}

impl Material {
    fn read(
        dir: &Path,
        crl_file: Option<&Path>,
        provider: &Arc<CryptoProvider>,
    ) -> Result<Self, TlsError> {
        let ca_path = dir.join(CA_CERT);
        let mut roots = RootCertStore::empty();
        for ca in certs_from_pem(&read_file(&ca_path)?, &ca_path.display().to_string())? {
            roots.add(ca)?;
        }
        let mut verifier =
            WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone());
        if let Some(crl_file) = crl_file {
            // Leaves only (our CAs sign leaves directly), and a CA without a CRL in the file
            // is not a reason to refuse its clients.
            verifier = verifier
                .with_crls(crls_from_pem(crl_file)?)
                .only_check_end_entity_revocation()
                .allow_unknown_revocation_status();
        }
        let verifier = verifier.build()?;

        let cert_path = dir.join(SERVER_CERT);
        let key_path = dir.join(SERVER_KEY);
        let chain = certs_from_pem(&read_file(&cert_path)?, &cert_path.display().to_string())?;
        let key = key_from_pem(&read_file(&key_path)?, &key_path.display().to_string())?;
        // Also checks that the key belongs to the certificate.
        let certified_key = Arc::new(CertifiedKey::from_der(chain, key, provider)?);
        Ok(Self {
            certified_key,
            verifier,
        })
    }
}

/// Every CRL in a PEM file; at least one.
fn crls_from_pem(path: &Path) -> Result<Vec<CertificateRevocationListDer<'static>>, TlsError> {
    use rustls_pki_types::pem::PemObject;
    let what = path.display().to_string();
    let crls = CertificateRevocationListDer::pem_slice_iter(&read_file(path)?)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|source| TlsError::Pem {
            what: what.clone(),
            source,
        })?;
    if crls.is_empty() {
        return Err(TlsError::NoCrl { what });
    }
    Ok(crls)
}

/// An `Arc` that readers clone and a reload replaces.
struct Swap<T: ?Sized>(RwLock<Arc<T>>);

impl<T: ?Sized> Swap<T> {
    fn new(value: Arc<T>) -> Self {
        Self(RwLock::new(value))
    }

    fn current(&self) -> Arc<T> {
        // The lock only guards an `Arc` swap, which cannot be left half done: a poisoned lock
        // still holds a valid value.
        self.0
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    fn replace(&self, value: Arc<T>) {
        *self.0.write().unwrap_or_else(PoisonError::into_inner) = value;
    }
}

impl<T: ?Sized + fmt::Debug> fmt::Debug for Swap<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.current().fmt(f)
    }
}

/// Serves whichever server certificate was loaded last, whatever the SNI.
#[derive(Debug)]
struct ReloadableCert(Swap<CertifiedKey>);

impl ResolvesServerCert for ReloadableCert {
    fn resolve(&self, _client_hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.current())
    }
}

/// Mandatory client authentication against whichever client CA was loaded last.
#[derive(Debug)]
struct ReloadableClientVerifier(Swap<dyn ClientCertVerifier>);

impl ClientCertVerifier for ReloadableClientVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        true
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        // The hints live in the swappable inner verifier and cannot be borrowed past the lock.
        // They are optional (RFC 8446 4.2.4); our clients present their one certificate anyway.
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.0
            .current()
            .verify_client_cert(end_entity, intermediates, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.current().verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.current().verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.current().supported_verify_schemes()
    }
}

/// Resumption state of one configuration: ticket keys (TLS 1.3 and 1.2) and the session-id
/// cache (TLS 1.2), both replaced on reload.
#[derive(Debug)]
struct Resumption {
    tickets: Arc<ReloadableTickets>,
    sessions: Arc<ReloadableSessions>,
}

/// Fresh ticket keys and an empty session cache.
type ResumptionState = (Arc<dyn ProducesTickets>, Arc<dyn StoresServerSessions>);

impl Resumption {
    fn new() -> Result<Self, TlsError> {
        let (tickets, sessions) = Self::fresh()?;
        Ok(Self {
            tickets: Arc::new(ReloadableTickets(Swap::new(tickets))),
            sessions: Arc::new(ReloadableSessions(Swap::new(sessions))),
        })
    }

    fn fresh() -> Result<ResumptionState, TlsError> {
        Ok((
            rustls::crypto::ring::Ticketer::new()?,
            ServerSessionMemoryCache::new(SESSION_CACHE_SIZE),
        ))
    }

    fn replace(&self, (tickets, sessions): ResumptionState) {
        self.tickets.0.replace(tickets);
        self.sessions.0.replace(sessions);
    }
}

#[derive(Debug)]
struct ReloadableTickets(Swap<dyn ProducesTickets>);

impl ProducesTickets for ReloadableTickets {
    fn enabled(&self) -> bool {
        self.0.current().enabled()
    }

    fn lifetime(&self) -> u32 {
        self.0.current().lifetime()
    }

    fn encrypt(&self, plain: &[u8]) -> Option<Vec<u8>> {
        self.0.current().encrypt(plain)
    }

    fn decrypt(&self, cipher: &[u8]) -> Option<Vec<u8>> {
        self.0.current().decrypt(cipher)
    }
}

#[derive(Debug)]
struct ReloadableSessions(Swap<dyn StoresServerSessions>);

impl StoresServerSessions for ReloadableSessions {
    fn put(&self, key: Vec<u8>, value: Vec<u8>) -> bool {
        self.0.current().put(key, value)
    }

    fn get(&self, key: &[u8]) -> Option<Vec<u8>> {
        self.0.current().get(key)
    }

    fn take(&self, key: &[u8]) -> Option<Vec<u8>> {
        self.0.current().take(key)
    }

    fn can_cache(&self) -> bool {
        self.0.current().can_cache()
    }
}
