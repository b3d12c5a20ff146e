//! Bearer tokens: the upload token and the admin token, compared in constant time. (Status
//! page sessions are server-side: [`super::sessions`].)
//!
//! Tokens are held only as SHA-256 digests and compared digest to digest, so neither the
//! length nor a prefix of a token leaks through timing. Nothing here logs a token.

use std::fmt;

use axum::http::{HeaderMap, header};
use sha2::{Digest, Sha256};

/// A secret bearer token, held as its digest.
#[derive(Clone)]
pub struct BearerToken {
    digest: [u8; 32],
}

impl BearerToken {
    /// The token; `None` when it is empty (an empty token would let anyone in).
    pub fn new(token: &str) -> Option<Self> {
        if token.is_empty() {
            return None;
        }
        Some(Self {
            digest: Sha256::digest(token.as_bytes()).into(),
        })
    }

    /// Whether `presented` is the token.
    pub fn matches(&self, presented: &str) -> bool {
        let presented: [u8; 32] = Sha256::digest(presented.as_bytes()).into();
        constant_time_eq(&self.digest, &presented)
    }

    /// Whether the request carries `Authorization: Bearer <the token>`.
    pub fn authorizes(&self, headers: &HeaderMap) -> bool {
        bearer(headers).is_some_and(|token| self.matches(token))
    }
}

impl fmt::Debug for BearerToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("BearerToken(<redacted>)")
    }
}

/// The token of `Authorization: Bearer <token>`, if any.
pub fn bearer(headers: &HeaderMap) -> Option<&str> {
    headers
        .get(header::AUTHORIZATION)?
        .to_str()
        .ok()?
        .split_once(' ')
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map(|(_, token)| token.trim())
}

pub(crate) fn constant_time_eq(a: &[u8; 32], b: &[u8; 32]) -> bool {
    a.iter().zip(b).fold(0u8, |diff, (x, y)| diff | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use axum::http::HeaderValue;

    use super::*;

    #[test]
    fn only_the_token_matches() {
        let token = BearerToken::new("upload-token").unwrap();
        assert!(token.matches("upload-token"));
        for wrong in ["", "upload-toke", "upload-token2", "UPLOAD-TOKEN"] {
            assert!(!token.matches(wrong), "{wrong}");
        }
        assert!(BearerToken::new("").is_none());
        assert!(!format!("{token:?}").contains("upload-token"));
    }

    #[test]
    fn the_bearer_header_is_recognised() {
        let token = BearerToken::new("s3cret").unwrap();
        let mut headers = HeaderMap::new();
        assert!(!token.authorizes(&headers));
        headers.insert(
            header::AUTHORIZATION,
            HeaderValue::from_static("bearer s3cret"),
        );
        assert!(token.authorizes(&headers));
        headers.insert(
            header::AUTHORIZATION,
            HeaderValue::from_static("Basic s3cret"),
        );
        assert!(!token.authorizes(&headers));
    }
}
