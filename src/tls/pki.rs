//! The dev PKI behind `workerpush certs` and `serve --dev`: a CA, a server certificate and one
//! client certificate per consumer, ECDSA P-256, written in the layout every tool relies on.
//!
//! Owns the certificate profiles (what a CA, a server and a client certificate contain);
//! [`TestPki`](super::TestPki) issues from the same profiles in memory. Knows nothing of the
//! servers that load these files.

use std::fmt;
use std::fs;
use std::io::Write;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};

use super::TlsError;
use super::identity::SPIFFE_CONSUMER_PREFIX;

/// CA certificate file, also the client CA bundle the server trusts.
pub const CA_CERT: &str = "ca.pem";
/// CA private key file.
pub const CA_KEY: &str = "ca-key.pem";
/// Server certificate file (leaf first, then any intermediates).
pub const SERVER_CERT: &str = "server.pem";
/// Server private key file.
pub const SERVER_KEY: &str = "server-key.pem";
/// Directory of client certificates, `<name>.pem` and `<name>-key.pem`.
pub const CLIENTS_DIR: &str = "clients";
/// The client `serve --dev` makes.
pub const DEV_CLIENT: &str = "consumer-1";

/// Names every server certificate carries, so local tools and tests connect without `--san`.
const DEFAULT_SERVER_SANS: [&str; 3] = ["localhost", "127.0.0.1", "::1"];
const CA_LIFETIME: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
const LEAF_LIFETIME: Duration = Duration::from_secs(2 * 365 * 24 * 3600);
/// Backdating absorbs clock skew between the machine that issues and the ones that verify.
const BACKDATE: Duration = Duration::from_secs(3600);

/// What `workerpush certs` was asked to make.
#[derive(Debug, Clone, Default)]
pub struct PkiRequest {
    /// Directory receiving the files.
    pub out: PathBuf,
    /// Client names; each gets `clients/<name>.pem` and `clients/<name>-key.pem`.
    pub clients: Vec<String>,
    /// Extra server names (DNS names or IP addresses) besides localhost, 127.0.0.1 and ::1.
    pub sans: Vec<String>,
    /// Regenerate the CA and everything requested even if it exists.
    pub force: bool,
}

/// Which files [`generate`] wrote and which it left as they were.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PkiReport {
    /// Files written by this run.
    pub created: Vec<PathBuf>,
    /// Files that already existed and were kept.
    pub kept: Vec<PathBuf>,
}

impl PkiReport {
    /// Whether this run wrote anything.
    pub fn changed(&self) -> bool {
        !self.created.is_empty()
    }
}

impl fmt::Display for PkiReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for path in &self.created {
            writeln!(f, "created {}", path.display())?;
        }
        for path in &self.kept {
            writeln!(f, "kept    {}", path.display())?;
        }
        Ok(())
    }
}

/// Makes the dev PKI in `req.out`.
///
/// Without `force`, an existing CA is reused and only what is missing is issued: the server
/// certificate if absent (an existing one is kept, even if `sans` asks for more names) and each
/// requested client that does not exist yet; nothing existing is overwritten. When no CA exists
/// (or with `force`) a new CA is made and the server and every requested client are issued by
/// it. Private keys are written with mode 0600.
pub fn generate(req: &PkiRequest) -> Result<PkiReport, TlsError> {
    for name in &req.clients {
        validate_client_name(name)?;
    }
    let server = server_params(&req.sans)?;
    let mut clients: Vec<&str> = Vec::new();
    for name in &req.clients {
        if !clients.contains(&name.as_str()) {
            clients.push(name);
        }
    }

    let out = req.out.as_path();
    let clients_dir = out.join(CLIENTS_DIR);
    fs::create_dir_all(&clients_dir).map_err(|source| TlsError::Io {
        path: clients_dir.clone(),
        source,
    })?;

    let mut report = PkiReport::default();
    let ca_files = [out.join(CA_CERT), out.join(CA_KEY)];
    let server_files = [out.join(SERVER_CERT), out.join(SERVER_KEY)];
    let client_files: Vec<(&str, [PathBuf; 2])> = clients
        .iter()
        .map(|name| (*name, client_paths(out, name)))
        .collect();

    let reuse_ca = !req.force && ca_files[0].exists();
    let issue_server = !reuse_ca || !both_exist(&server_files);
    let to_issue: Vec<&(&str, [PathBuf; 2])> = client_files
        .iter()
        .filter(|(_, files)| !reuse_ca || !both_exist(files))
        .collect();

    if reuse_ca {
        report
            .kept
            .extend(ca_files.iter().filter(|p| p.exists()).cloned());
    }
    if reuse_ca && !issue_server && to_issue.is_empty() {
        report.kept.extend(server_files);
        report
            .kept
            .extend(client_files.into_iter().flat_map(|(_, files)| files));
        return Ok(report);
    }

    let issuer = if reuse_ca {
        load_ca(&ca_files[0], &ca_files[1])?
    } else {
        let (cert_pem, issuer) = new_ca()?;
        // Key first: a `ca.pem` on disk always has its key next to it.
        write_file(&ca_files[1], issuer.key().serialize_pem().as_bytes(), true)?;
        write_file(&ca_files[0], cert_pem.as_bytes(), false)?;
        report.created.extend(ca_files.iter().cloned());
        issuer
    };

    if issue_server {
        let (cert, key) = issue(server, &issuer)?;
        write_pair(&server_files, &cert, &key, &mut report.created)?;
    } else {
        report.kept.extend(server_files);
    }
    for (name, files) in &client_files {
        if to_issue.iter().any(|(n, _)| n == name) {
            let (cert, key) = issue(client_params(name)?, &issuer)?;
            write_pair(files, &cert, &key, &mut report.created)?;
        } else {
            report.kept.extend(files.iter().cloned());
        }
    }
    Ok(report)
}

/// Makes whatever is missing of the dev PKI in `dir` with the one client `client`; what
/// exists is kept. Used by `serve --dev`.
pub fn ensure_dev(dir: &Path, client: &str) -> Result<PkiReport, TlsError> {
    generate(&PkiRequest {
        out: dir.to_path_buf(),
        clients: vec![client.to_owned()],
        sans: Vec::new(),
        force: false,
    })
}

/// Checks a client name: `^[a-z0-9][a-z0-9_.-]{0,62}$`, the worker-name rule plus `.`.
pub fn validate_client_name(name: &str) -> Result<(), TlsError> {
    let mut chars = name.chars();
    let first_ok = chars
        .next()
        .is_some_and(|c| c.is_ascii_lowercase() || c.is_ascii_digit());
    let rest_ok = chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "_.-".contains(c));
    if first_ok && rest_ok && name.len() <= 63 {
        Ok(())
    } else {
        Err(TlsError::InvalidClientName(name.to_owned()))
    }
}

/// `clients/<name>.pem` and `clients/<name>-key.pem` under `dir`.
pub fn client_paths(dir: &Path, name: &str) -> [PathBuf; 2] {
    let clients = dir.join(CLIENTS_DIR);
    [
        clients.join(format!("{name}.pem")),
        clients.join(format!("{name}-key.pem")),
    ]
}

fn both_exist(files: &[PathBuf; 2]) -> bool {
    files.iter().all(|p| p.exists())
}

fn load_ca(cert_path: &Path, key_path: &Path) -> Result<Issuer<'static, KeyPair>, TlsError> {
    if !key_path.exists() {
        return Err(TlsError::CaKeyMissing(key_path.to_path_buf()));
    }
    let cert_pem = read_string(cert_path)?;
    let key = KeyPair::from_pem(&read_string(key_path)?)?;
    Ok(Issuer::from_ca_cert_pem(&cert_pem, key)?)
}

fn read_string(path: &Path) -> Result<String, TlsError> {
    fs::read_to_string(path).map_err(|source| TlsError::Io {
        path: path.to_path_buf(),
        source,
    })
}

fn write_pair(
    files: &[PathBuf; 2],
    cert_pem: &str,
    key_pem: &str,
    created: &mut Vec<PathBuf>,
) -> Result<(), TlsError> {
    write_file(&files[1], key_pem.as_bytes(), true)?;
    write_file(&files[0], cert_pem.as_bytes(), false)?;
    created.extend(files.iter().cloned());
    Ok(())
}

/// Writes through a temporary file and a rename, so a reader (a reloading server) never sees a
/// half-written file; a secret is 0600 from its creation on.
pub(super) fn write_file(path: &Path, contents: &[u8], secret: bool) -> Result<(), TlsError> {
    let io_err = |source| TlsError::Io {
        path: path.to_path_buf(),
        source,
    };
    let file_name = path
        .file_name()
        .map(|n| n.to_string_lossy())
        .unwrap_or_default();
    let tmp = path.with_file_name(format!(".{file_name}.tmp"));
    let mut options = fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(if secret { 0o600 } else { 0o644 });
    }
    let mut file = options.open(&tmp).map_err(io_err)?;
    #[cfg(unix)]
    {
        // `mode` only applies when the file is created; a stale temp file keeps its old mode.
        use std::os::unix::fs::PermissionsExt;
        let mode = if secret { 0o600 } else { 0o644 };
        file.set_permissions(fs::Permissions::from_mode(mode))
            .map_err(io_err)?;
    }
    file.write_all(contents).map_err(io_err)?;
    file.sync_all().map_err(io_err)?;
    drop(file);
    fs::rename(&tmp, path).map_err(io_err)
}

/// How long a CRL made by [`revocation_list`] says it is current.
const CRL_LIFETIME: Duration = Duration::from_secs(30 * 24 * 3600);

/// A CRL (PEM) signed by the CA `ca_cert_pem` with `ca_key_pem`, revoking the certificates in
/// `revoked` (one PEM each, issued by that CA). `number` is the CRL number: give each new CRL
/// of a CA a higher one. It is current from an hour ago for 30 days (the server uses it
/// after that too).
pub fn revocation_list(
    ca_cert_pem: &str,
    ca_key_pem: &str,
    revoked: &[&str],
    number: u64,
) -> Result<String, TlsError> {
    let key = KeyPair::from_pem(ca_key_pem)?;
    let issuer = Issuer::from_ca_cert_pem(ca_cert_pem, key)?;
    let now = SystemTime::now();
    let revoked_certs = revoked
        .iter()
        .map(|pem| {
            let der = super::certs_from_pem(pem.as_bytes(), "revoked certificate")?;
            let (_, cert) = x509_parser::parse_x509_certificate(der[0].as_ref())
                .map_err(|e| TlsError::InvalidCertificate(e.to_string()))?;
            Ok(rcgen::RevokedCertParams {
                serial_number: rcgen::SerialNumber::from_slice(cert.raw_serial()),
                revocation_time: now.into(),
                reason_code: Some(rcgen::RevocationReason::KeyCompromise),
                invalidity_date: None,
            })
        })
        .collect::<Result<Vec<_>, TlsError>>()?;
    let params = rcgen::CertificateRevocationListParams {
        this_update: (now - BACKDATE).into(),
        next_update: (now + CRL_LIFETIME).into(),
        crl_number: rcgen::SerialNumber::from(number),
        issuing_distribution_point: None,
        revoked_certs,
        key_identifier_method: rcgen::KeyIdMethod::Sha256,
    };
    Ok(params.signed_by(&issuer)?.pem()?)
}

/// A new self-signed CA: its certificate PEM and the issuer that signs with its key.
pub(super) fn new_ca() -> Result<(String, Issuer<'static, KeyPair>), TlsError> {
    let key = new_key()?;
    let params = ca_params("workerpush dev CA")?;
    let cert = params.self_signed(&key)?;
    Ok((cert.pem(), Issuer::new(params, key)))
}

/// A fresh ECDSA P-256 key.
pub(super) fn new_key() -> Result<KeyPair, TlsError> {
    Ok(KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?)
}

/// Signs `params` with a fresh key: (certificate PEM, key PEM).
pub(super) fn issue(
    params: CertificateParams,
    issuer: &Issuer<'_, KeyPair>,
) -> Result<(String, String), TlsError> {
    let key = new_key()?;
    let cert = params.signed_by(&key, issuer)?;
    Ok((cert.pem(), key.serialize_pem()))
}

/// A CA that signs leaves only (path length 0), valid from an hour ago for ten years.
pub(super) fn ca_params(common_name: &str) -> Result<CertificateParams, TlsError> {
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params.distinguished_name = rcgen::DistinguishedName::new();
    params
        .distinguished_name
        .push(DnType::OrganizationName, "workerpush");
    params
        .distinguished_name
        .push(DnType::CommonName, common_name);
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    set_validity(&mut params, CA_LIFETIME);
    Ok(params)
}

/// The server profile: CN `workerpush server`, the default SANs plus `extra_sans`, ServerAuth.
pub(super) fn server_params(extra_sans: &[String]) -> Result<CertificateParams, TlsError> {
    let mut sans: Vec<SanType> = Vec::new();
    for name in DEFAULT_SERVER_SANS
        .iter()
        .copied()
        .chain(extra_sans.iter().map(String::as_str))
    {
        let san = parse_san(name)?;
        if !sans.contains(&san) {
            sans.push(san);
        }
    }
    let mut params = leaf_params("workerpush server", ExtendedKeyUsagePurpose::ServerAuth)?;
    params.subject_alt_names = sans;
    Ok(params)
}

/// The client profile: CN `<name>` and URI SAN `spiffe://workerpush/consumer/<name>`,
/// ClientAuth.
pub(super) fn client_params(name: &str) -> Result<CertificateParams, TlsError> {
    validate_client_name(name)?;
    let mut params = leaf_params(name, ExtendedKeyUsagePurpose::ClientAuth)?;
    let uri = format!("{SPIFFE_CONSUMER_PREFIX}{name}");
    params.subject_alt_names = vec![SanType::URI(uri.try_into()?)];
    Ok(params)
}

/// An end-entity certificate (explicitly not a CA) for one purpose.
pub(super) fn leaf_params(
    common_name: &str,
    purpose: ExtendedKeyUsagePurpose,
) -> Result<CertificateParams, TlsError> {
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params.distinguished_name = rcgen::DistinguishedName::new();
    params
        .distinguished_name
        .push(DnType::CommonName, common_name);
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![purpose];
    params.use_authority_key_identifier_extension = true;
    set_validity(&mut params, LEAF_LIFETIME);
    Ok(params)
}

/// Valid from an hour ago for `lifetime`.
pub(super) fn set_validity(params: &mut CertificateParams, lifetime: Duration) {
    let now = SystemTime::now();
    params.not_before = (now - BACKDATE).into();
    params.not_after = (now + lifetime).into();
}

fn parse_san(name: &str) -> Result<SanType, TlsError> {
    if let Ok(ip) = name.parse::<IpAddr>() {
        return Ok(SanType::IpAddress(ip));
    }
    let invalid = || TlsError::InvalidSan(name.to_owned());
    let host = name.strip_prefix("*.").unwrap_or(name);
    let label_ok = |label: &str| {
        !label.is_empty()
            && label.len() <= 63
            && label.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
            && !label.starts_with('-')
            && !label.ends_with('-')
    };
    if name.len() > 253 || !host.split('.').all(label_ok) {
        return Err(invalid());
    }
    Ok(SanType::DnsName(name.try_into().map_err(|_| invalid())?))
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use rustls_pki_types::CertificateDer;
    use rustls_pki_types::pem::PemObject;
    use x509_parser::extensions::GeneralName;

    use super::*;

    fn request(dir: &Path, clients: &[&str], force: bool) -> PkiRequest {
        PkiRequest {
            out: dir.to_path_buf(),
            clients: clients.iter().map(|c| c.to_string()).collect(),
            sans: vec!["push.example.com".into(), "10.0.0.7".into()],
            force,
        }
    }

    fn cert_der(path: &Path) -> CertificateDer<'static> {
        CertificateDer::from_pem_file(path).unwrap()
    }

    fn mode(path: &Path) -> u32 {
        fs::metadata(path).unwrap().permissions().mode() & 0o777
    }

    #[test]
    fn generate_writes_every_file_with_private_keys_0600() {
        let dir = tempfile::tempdir().unwrap();
        let report = generate(&request(dir.path(), &["consumer-1", "edge.a"], false)).unwrap();
        let expected = [
            "ca.pem",
            "ca-key.pem",
            "server.pem",
            "server-key.pem",
            "clients/consumer-1.pem",
            "clients/consumer-1-key.pem",
            "clients/edge.a.pem",
            "clients/edge.a-key.pem",
        ];
        for file in expected {
            let path = dir.path().join(file);
            assert!(path.exists(), "{file} missing");
            assert!(report.created.contains(&path), "{file} not reported");
            let want = if file.ends_with("-key.pem") {
                0o600
            } else {
                0o644
            };
            assert_eq!(mode(&path), want, "{file} mode");
        }
        assert!(report.kept.is_empty());
    }

    #[test]
    fn generated_client_has_common_name_and_spiffe_uri_with_client_auth_only() {
        let dir = tempfile::tempdir().unwrap();
        generate(&request(dir.path(), &["consumer-1"], false)).unwrap();
        let der = cert_der(&dir.path().join("clients/consumer-1.pem"));
        let (_, cert) = x509_parser::parse_x509_certificate(&der).unwrap();
        let cn = cert.subject().iter_common_name().next().unwrap();
        assert_eq!(cn.as_str().unwrap(), "consumer-1");
        let san = cert.subject_alternative_name().unwrap().unwrap();
        assert_eq!(
            san.value.general_names,
            vec![GeneralName::URI("spiffe://workerpush/consumer/consumer-1")]
        );
        let eku = cert.extended_key_usage().unwrap().unwrap().value;
        assert!(eku.client_auth && !eku.server_auth);
        assert!(!cert.is_ca());
    }

    #[test]
    fn generated_server_has_default_and_requested_sans_and_ca_is_a_ca() {
        let dir = tempfile::tempdir().unwrap();
        generate(&request(dir.path(), &[], false)).unwrap();
        let der = cert_der(&dir.path().join("server.pem"));
        let (_, cert) = x509_parser::parse_x509_certificate(&der).unwrap();
        let san = cert.subject_alternative_name().unwrap().unwrap();
        let names = &san.value.general_names;
        for want in [
            GeneralName::DNSName("localhost"),
            GeneralName::DNSName("push.example.com"),
            GeneralName::IPAddress(&[127, 0, 0, 1]),
            GeneralName::IPAddress(&[10, 0, 0, 7]),
            GeneralName::IPAddress(&[0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1]),
        ] {
            assert!(names.contains(&want), "missing {want:?} in {names:?}");
        }
        let eku = cert.extended_key_usage().unwrap().unwrap().value;
        assert!(eku.server_auth && !eku.client_auth);
        let cn = cert.subject().iter_common_name().next().unwrap();
        assert_eq!(cn.as_str().unwrap(), "workerpush server");

        let ca_der = cert_der(&dir.path().join("ca.pem"));
        let (_, ca) = x509_parser::parse_x509_certificate(&ca_der).unwrap();
        assert!(ca.is_ca());
        let usage = ca.key_usage().unwrap().unwrap().value;
        assert!(usage.key_cert_sign() && usage.crl_sign());
    }

    #[test]
    fn generate_without_force_keeps_ca_and_server_and_adds_new_client() {
        let dir = tempfile::tempdir().unwrap();
        generate(&request(dir.path(), &["consumer-1"], false)).unwrap();
        let read = |f: &str| fs::read(dir.path().join(f)).unwrap();
        let (ca, ca_key, server, client) = (
            read("ca.pem"),
            read("ca-key.pem"),
            read("server.pem"),
            read("clients/consumer-1.pem"),
        );

        let report = generate(&request(dir.path(), &["consumer-1", "consumer-2"], false)).unwrap();
        assert_eq!(read("ca.pem"), ca);
        assert_eq!(read("ca-key.pem"), ca_key);
        assert_eq!(read("server.pem"), server);
        assert_eq!(read("clients/consumer-1.pem"), client);
        let new_client = dir.path().join("clients/consumer-2.pem");
        assert!(report.created.contains(&new_client));
        assert_eq!(report.created.len(), 2, "{report}");
        assert!(report.kept.contains(&dir.path().join("ca.pem")));

        // The new client is signed by the kept CA.
        let ca_der = cert_der(&dir.path().join("ca.pem"));
        let (_, ca_cert) = x509_parser::parse_x509_certificate(&ca_der).unwrap();
        let client_der = cert_der(&new_client);
        let (_, client_cert) = x509_parser::parse_x509_certificate(&client_der).unwrap();
        client_cert
            .verify_signature(Some(ca_cert.public_key()))
            .unwrap();

        let again = generate(&request(dir.path(), &["consumer-2"], false)).unwrap();
        assert!(!again.changed(), "{again}");
    }

    #[test]
    fn generate_with_force_replaces_the_ca() {
        let dir = tempfile::tempdir().unwrap();
        generate(&request(dir.path(), &["consumer-1"], false)).unwrap();
        let ca = fs::read(dir.path().join("ca.pem")).unwrap();
        let report = generate(&request(dir.path(), &["consumer-1"], true)).unwrap();
        assert_ne!(fs::read(dir.path().join("ca.pem")).unwrap(), ca);
        assert!(report.kept.is_empty());
        assert_eq!(report.created.len(), 6);
    }

    #[test]
    fn reused_ca_without_its_key_cannot_issue() {
        let dir = tempfile::tempdir().unwrap();
        generate(&request(dir.path(), &[], false)).unwrap();
        fs::remove_file(dir.path().join("ca-key.pem")).unwrap();
        let err = generate(&request(dir.path(), &["consumer-9"], false)).unwrap_err();
        assert!(matches!(err, TlsError::CaKeyMissing(_)), "{err}");
    }

    #[test]
    fn invalid_client_names_and_sans_are_refused_before_writing() {
        for bad in ["", "Upper", "-lead", "a/b", "../x", &"x".repeat(64)] {
            let dir = tempfile::tempdir().unwrap();
            let err = generate(&request(dir.path(), &[bad], false)).unwrap_err();
            assert!(matches!(err, TlsError::InvalidClientName(_)), "{bad:?}");
            assert!(!dir.path().join("ca.pem").exists());
        }
        validate_client_name("edge-1.eu_west").unwrap();
        let dir = tempfile::tempdir().unwrap();
        let mut req = request(dir.path(), &[], false);
        req.sans = vec!["bad host".into()];
        assert!(matches!(generate(&req), Err(TlsError::InvalidSan(_))));
    }

    #[test]
    fn ensure_dev_makes_the_dev_client_once() {
        let dir = tempfile::tempdir().unwrap();
        let first = ensure_dev(dir.path(), DEV_CLIENT).unwrap();
        assert_eq!(first.created.len(), 6);
        let second = ensure_dev(dir.path(), DEV_CLIENT).unwrap();
        assert!(!second.changed());
        assert_eq!(second.kept.len(), 6);
    }
}
