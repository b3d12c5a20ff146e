//! [`TestPki`]: certificates made in memory for unit and integration tests, good ones from the
//! same profiles as [`pki`](super::pki), and the invalid ones hardening tests must see refused.
//!
//! Not for production use; public only because integration tests under `tests/` need it.

// A test fixture should fail loudly: every `expect` below covers key generation (fails only if
// the system RNG does) or signing parameters built right here (fixed, valid).
#![allow(clippy::expect_used)]

use std::path::Path;
use std::time::{Duration, SystemTime};

use rcgen::{ExtendedKeyUsagePurpose, Issuer, KeyPair};

use super::TlsError;
use super::pki::{self, DEV_CLIENT};

/// A CA, a server certificate for `localhost`/`127.0.0.1`/`::1`, and client certificates on
/// demand, all in memory.
pub struct TestPki {
    ca_cert_pem: String,
    issuer: Issuer<'static, KeyPair>,
    server_cert_pem: String,
    server_key_pem: String,
}

impl std::fmt::Debug for TestPki {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TestPki").finish_non_exhaustive()
    }
}

impl Default for TestPki {
    fn default() -> Self {
        Self::new()
    }
}

impl TestPki {
    /// A new CA and a server certificate it signed. Panics only if key generation fails.
    pub fn new() -> Self {
        let (ca_cert_pem, issuer) = pki::new_ca().expect("generate test CA");
        let server = pki::server_params(&[]).expect("server profile");
        let (server_cert_pem, server_key_pem) =
            pki::issue(server, &issuer).expect("issue test server certificate");
        Self {
            ca_cert_pem,
            issuer,
            server_cert_pem,
            server_key_pem,
        }
    }

    /// The CA certificate (PEM), the bundle clients and the server trust.
    pub fn ca_pem(&self) -> &str {
        &self.ca_cert_pem
    }

    /// The server certificate (PEM).
    pub fn server_cert_pem(&self) -> &str {
        &self.server_cert_pem
    }

    /// The server private key (PEM).
    pub fn server_key_pem(&self) -> &str {
        &self.server_key_pem
    }

    /// Another valid server certificate from this CA (a rotation): `(cert_pem, key_pem)`.
    pub fn another_server(&self) -> (String, String) {
        let server = pki::server_params(&[]).expect("server profile");
        pki::issue(server, &self.issuer).expect("issue test server certificate")
    }

    /// A valid client certificate for `name` (CN and SPIFFE URI SAN): `(cert_pem, key_pem)`.
    /// Panics if `name` is not a valid client name.
    pub fn client(&self, name: &str) -> (String, String) {
        let params = pki::client_params(name).expect("valid client name");
        pki::issue(params, &self.issuer).expect("issue test client certificate")
    }

    /// A CRL (PEM) of this CA revoking `revoked` (client certificate PEMs it issued).
    pub fn crl(&self, revoked: &[&str], number: u64) -> String {
        pki::revocation_list(
            &self.ca_cert_pem,
            &self.issuer.key().serialize_pem(),
            revoked,
            number,
        )
        .expect("sign test CRL")
    }

    /// Invalid: a well-formed client certificate for `name` signed by an unrelated CA.
    pub fn invalid_client_from_other_ca(name: &str) -> (String, String) {
        TestPki::new().client(name)
    }

    /// Invalid: this PKI's own CA certificate and key presented as a client leaf.
    pub fn invalid_client_ca_as_leaf(&self) -> (String, String) {
        (self.ca_cert_pem.clone(), self.issuer.key().serialize_pem())
    }

    /// Invalid: a client certificate that expired an hour ago.
    pub fn invalid_client_expired(&self, name: &str) -> (String, String) {
        let mut params = pki::client_params(name).expect("valid client name");
        let now = SystemTime::now();
        params.not_before = (now - Duration::from_secs(48 * 3600)).into();
        params.not_after = (now - Duration::from_secs(3600)).into();
        pki::issue(params, &self.issuer).expect("issue expired client certificate")
    }

    /// Invalid: a client certificate valid only from tomorrow on.
    pub fn invalid_client_not_yet_valid(&self, name: &str) -> (String, String) {
        let mut params = pki::client_params(name).expect("valid client name");
        let now = SystemTime::now();
        params.not_before = (now + Duration::from_secs(24 * 3600)).into();
        params.not_after = (now + Duration::from_secs(48 * 3600)).into();
        pki::issue(params, &self.issuer).expect("issue future client certificate")
    }

    /// Invalid: a certificate from this CA whose only EKU is ServerAuth.
    pub fn invalid_client_server_only_eku(&self, name: &str) -> (String, String) {
        let mut params = pki::client_params(name).expect("valid client name");
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        pki::issue(params, &self.issuer).expect("issue server-EKU certificate")
    }

    /// Invalid: a client certificate for `name` that signs itself.
    pub fn invalid_client_self_signed(name: &str) -> (String, String) {
        let params = pki::client_params(name).expect("valid client name");
        let key = pki::new_key().expect("generate key");
        let cert = params.self_signed(&key).expect("self-sign");
        (cert.pem(), key.serialize_pem())
    }

    /// Writes the standard layout into `dir`: `ca.pem`, `ca-key.pem`, `server.pem`,
    /// `server-key.pem` and `clients/consumer-1.pem` + `-key.pem`, keys 0600.
    pub fn write_to(&self, dir: &Path) -> Result<(), TlsError> {
        let clients = dir.join(pki::CLIENTS_DIR);
        std::fs::create_dir_all(&clients).map_err(|source| TlsError::Io {
            path: clients,
            source,
        })?;
        let ca_key = self.issuer.key().serialize_pem();
        pki::write_file(&dir.join(pki::CA_KEY), ca_key.as_bytes(), true)?;
        pki::write_file(&dir.join(pki::CA_CERT), self.ca_cert_pem.as_bytes(), false)?;
        pki::write_file(
            &dir.join(pki::SERVER_KEY),
            self.server_key_pem.as_bytes(),
            true,
        )?;
        pki::write_file(
            &dir.join(pki::SERVER_CERT),
            self.server_cert_pem.as_bytes(),
            false,
        )?;
        let (cert, key) = self.client(DEV_CLIENT);
        let [cert_path, key_path] = pki::client_paths(dir, DEV_CLIENT);
        pki::write_file(&key_path, key.as_bytes(), true)?;
        pki::write_file(&cert_path, cert.as_bytes(), false)
    }
}
