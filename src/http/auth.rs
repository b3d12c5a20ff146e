//! Bearer tokens: the upload token and the admin token, compared in constant time, and the
//! admin session cookie derived from the admin token.
//!
//! Tokens are held only as SHA-256 digests and compared digest to digest, so neither the
//! length nor a prefix of a token leaks through timing. Nothing here logs a token.

use std::fmt;

use axum::http::{HeaderMap, header};
use sha2::{Digest, Sha256};

/// Name of the admin session cookie.
pub const SESSION_COOKIE: &str = "workerpush_admin";

/// A secret bearer token, held as its digest.
#[derive(Clone)]
pub struct BearerToken {
    digest: [u8; 32],
    session: [u8; 32],
}

impl BearerToken {
    /// The token; `None` when it is empty (an empty token would let anyone in).
    pub fn new(token: &str) -> Option<Self> {
        if token.is_empty() {
            return None;
        }
        Some(Self {
            digest: Sha256::digest(token.as_bytes()).into(),
            session: session_of(token),
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

    /// The value of the session cookie for this token: a digest of it, so that the browser
    /// never stores the token itself.
    pub fn session_value(&self) -> String {
        hex::encode(self.session)
    }

    /// Whether the request carries the session cookie of this token.
    pub fn session_in(&self, headers: &HeaderMap) -> bool {
        headers
            .get_all(header::COOKIE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(';'))
            .filter_map(|pair| pair.trim().split_once('='))
            .filter(|(name, _)| *name == SESSION_COOKIE)
            .filter_map(|(_, value)| {
                let bytes = hex::decode(value).ok()?;
                <[u8; 32]>::try_from(bytes.as_slice()).ok()
            })
            .any(|value| constant_time_eq(&self.session, &value))
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

fn session_of(token: &str) -> [u8; 32] {
    let mut hasher = Sha256::new();
    hasher.update(b"workerpush admin session v1\0");
    hasher.update(token.as_bytes());
    hasher.finalize().into()
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
    fn bearer_header_and_session_cookie_are_recognised() {
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

        let session = token.session_value();
        assert!(!session.contains("s3cret"));
        let cookie = format!("other=1; {SESSION_COOKIE}={session}");
        headers.insert(header::COOKIE, HeaderValue::from_str(&cookie).unwrap());
        assert!(token.session_in(&headers));
        let other = BearerToken::new("other").unwrap();
        assert!(!other.session_in(&headers));
        headers.insert(
            header::COOKIE,
            HeaderValue::from_str(&format!("{SESSION_COOKIE}=s3cret")).unwrap(),
        );
        assert!(!token.session_in(&headers));
    }
}
