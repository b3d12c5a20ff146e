//! The consumer identity of a client certificate: one extractor shared by gRPC and QUIC.
//!
//! Called only on a leaf that rustls has already verified against the client CA; it parses, it
//! does not verify.

use rustls_pki_types::CertificateDer;
use x509_parser::extensions::GeneralName;

use super::TlsError;

/// URI SAN prefix naming a consumer: `spiffe://workerpush/consumer/<id>`.
pub const SPIFFE_CONSUMER_PREFIX: &str = "spiffe://workerpush/consumer/";

/// The consumer identity of a verified client leaf certificate.
///
/// The `<id>` of a URI SAN `spiffe://workerpush/consumer/<id>` when there is one, else the
/// Subject CN. An identity must be non-empty, must not contain `/` (authorization treats
/// `identity/anything` as belonging to `identity`) and must not contain control characters.
/// Two SPIFFE consumer URIs naming different ids are ambiguous and refused.
pub fn identity_of(leaf: &CertificateDer<'_>) -> Result<String, TlsError> {
    let (_, cert) = x509_parser::parse_x509_certificate(leaf.as_ref())
        .map_err(|e| TlsError::InvalidCertificate(e.to_string()))?;

    let sans = cert
        .subject_alternative_name()
        .map_err(|e| TlsError::InvalidCertificate(e.to_string()))?;
    let mut spiffe_ids = sans
        .iter()
        .flat_map(|ext| ext.value.general_names.iter())
        .filter_map(|name| match name {
            GeneralName::URI(uri) => uri.strip_prefix(SPIFFE_CONSUMER_PREFIX),
            _ => None,
        });
    if let Some(first) = spiffe_ids.next() {
        if let Some(other) = spiffe_ids.find(|id| *id != first) {
            return Err(TlsError::InvalidIdentity(format!(
                "two SPIFFE consumer ids: {first:?} and {other:?}"
            )));
        }
        return checked(first);
    }

    let cn = cert
        .subject()
        .iter_common_name()
        .next()
        .ok_or(TlsError::NoIdentity)?
        .as_str()
        .map_err(|e| TlsError::InvalidIdentity(format!("subject CN: {e}")))?;
    checked(cn)
}

fn checked(id: &str) -> Result<String, TlsError> {
    if id.is_empty() || id.contains('/') || id.chars().any(char::is_control) {
        return Err(TlsError::InvalidIdentity(format!("{id:?}")));
    }
    Ok(id.to_owned())
}

#[cfg(test)]
mod tests {
    use rcgen::{CertificateParams, DnType, KeyPair, SanType};

    use super::*;

    fn self_signed(cn: Option<&str>, uris: &[&str]) -> CertificateDer<'static> {
        let mut params = CertificateParams::default();
        params.distinguished_name = rcgen::DistinguishedName::new();
        if let Some(cn) = cn {
            params.distinguished_name.push(DnType::CommonName, cn);
        }
        for uri in uris {
            params
                .subject_alt_names
                .push(SanType::URI((*uri).try_into().unwrap()));
        }
        let key = KeyPair::generate().unwrap();
        params.self_signed(&key).unwrap().der().clone()
    }

    #[test]
    fn identity_prefers_spiffe_uri_san_over_common_name() {
        let cert = self_signed(Some("cn-name"), &["spiffe://workerpush/consumer/uri-name"]);
        assert_eq!(identity_of(&cert).unwrap(), "uri-name");
    }

    #[test]
    fn identity_falls_back_to_common_name_without_spiffe_uri() {
        let cert = self_signed(Some("cn-name"), &["spiffe://other/consumer/x"]);
        assert_eq!(identity_of(&cert).unwrap(), "cn-name");
    }

    #[test]
    fn identity_is_refused_without_uri_or_common_name() {
        let cert = self_signed(None, &[]);
        assert!(matches!(identity_of(&cert), Err(TlsError::NoIdentity)));
    }

    #[test]
    fn identity_with_slash_or_conflicting_uris_is_refused() {
        let slash = self_signed(None, &["spiffe://workerpush/consumer/a/b"]);
        assert!(matches!(
            identity_of(&slash),
            Err(TlsError::InvalidIdentity(_))
        ));
        let two = self_signed(
            None,
            &[
                "spiffe://workerpush/consumer/a",
                "spiffe://workerpush/consumer/b",
            ],
        );
        assert!(matches!(
            identity_of(&two),
            Err(TlsError::InvalidIdentity(_))
        ));
    }

    #[test]
    fn identity_of_garbage_is_an_error() {
        let junk = CertificateDer::from(vec![0x30, 0x03, 0x01, 0x02]);
        assert!(matches!(
            identity_of(&junk),
            Err(TlsError::InvalidCertificate(_))
        ));
    }
}
