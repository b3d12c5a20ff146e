//! The hook signature: `X-Workerpush-Signature: v1=<hex HMAC-SHA256(secret, "<timestamp>." +
//! raw body)>` next to `X-Workerpush-Timestamp: <unix seconds>`, and the replay guard that
//! refuses a signature seen before inside the time window.
//!
//! Pure functions over bytes and a clock value handed in: no I/O, no axum. The hook calls
//! [`SignedHeaders::from_headers`] before reading the body (so unsigned or stale requests are
//! refused without buffering anything), then [`SignedHeaders::verify_body`] over the raw bytes,
//! then [`ReplayGuard::admit`].

use std::{
    collections::{BTreeSet, HashMap},
    sync::Mutex,
};

use hmac::{Hmac, KeyInit, Mac};
use http::HeaderMap;
use sha2::Sha256;

/// The header carrying the unix time (seconds) the request was signed at.
pub const TIMESTAMP_HEADER: &str = "x-workerpush-timestamp";
/// The header carrying `v1=<hex HMAC-SHA256>`.
pub const SIGNATURE_HEADER: &str = "x-workerpush-signature";
/// How far (seconds) a timestamp may be from the receiver's clock, either way.
pub const MAX_SKEW_SECS: i64 = 300;
/// How many signatures the default replay guard remembers.
pub const DEFAULT_REPLAY_CAPACITY: usize = 100_000;

const SCHEME: &str = "v1=";
const MAC_LEN: usize = 32;

type HmacSha256 = Hmac<Sha256>;

/// Why a hook request is not authentic. Every variant but [`Self::ReplayGuardFull`] is a 401.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HookAuthError {
    /// No secret is configured, so nothing can be authentic.
    #[error("hook secret not configured")]
    NoSecret,
    /// `X-Workerpush-Timestamp` is absent.
    #[error("missing X-Workerpush-Timestamp header")]
    MissingTimestamp,
    /// `X-Workerpush-Timestamp` is not unix seconds.
    #[error("malformed X-Workerpush-Timestamp header")]
    MalformedTimestamp,
    /// `X-Workerpush-Signature` is absent.
    #[error("missing X-Workerpush-Signature header")]
    MissingSignature,
    /// `X-Workerpush-Signature` is not `v1=` and 64 hex digits.
    #[error("malformed X-Workerpush-Signature header: expected v1=<64 hex digits>")]
    MalformedSignature,
    /// The timestamp is more than [`MAX_SKEW_SECS`] away from now.
    #[error("timestamp is {skew} s away from the server clock (limit {MAX_SKEW_SECS} s)")]
    Stale {
        /// Signed time minus now, in seconds.
        skew: i64,
    },
    /// The signature does not match the body.
    #[error("signature does not match")]
    BadSignature,
    /// The signature was already used inside the window.
    #[error("replayed request: signature already seen")]
    Replayed,
    /// The replay guard is full of unexpired signatures. Refused rather than forgetting one
    /// (which would let its request be replayed); retryable once entries expire.
    #[error("too many signed requests in the replay window; try again later")]
    ReplayGuardFull,
}

impl HookAuthError {
    /// A short label for metrics.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::NoSecret => "no_secret",
            Self::MissingTimestamp | Self::MissingSignature => "missing_signature",
            Self::MalformedTimestamp | Self::MalformedSignature => "malformed_signature",
            Self::Stale { .. } => "stale_timestamp",
            Self::BadSignature => "bad_signature",
            Self::Replayed => "replayed",
            Self::ReplayGuardFull => "replay_guard_full",
        }
    }
}

/// The value of `X-Workerpush-Signature` for `body` signed at `timestamp`.
pub fn sign(secret: &[u8], timestamp: i64, body: &[u8]) -> String {
    format!("{SCHEME}{}", hex::encode(mac(secret, timestamp, body)))
}

/// Checks the signature headers, the time window and the MAC over the raw `body`.
///
/// Does not consult a replay guard: see [`ReplayGuard::admit`].
pub fn verify(
    secret: &[u8],
    headers: &HeaderMap,
    body: &[u8],
    now: i64,
) -> Result<SignedHeaders, HookAuthError> {
    let signed = SignedHeaders::from_headers(headers, now)?;
    signed.verify_body(secret, body)?;
    Ok(signed)
}

fn keyed(secret: &[u8], timestamp: i64) -> HmacSha256 {
    // HMAC takes keys of any length (long ones are hashed), so this cannot fail; fall back to
    // an empty key rather than panic, which verification then refuses via `NoSecret` anyway.
    let mut mac = HmacSha256::new_from_slice(secret)
        .unwrap_or_else(|_| <HmacSha256 as KeyInit>::new(&Default::default()));
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac
}

fn mac(secret: &[u8], timestamp: i64, body: &[u8]) -> [u8; MAC_LEN] {
    let mut mac = keyed(secret, timestamp);
    mac.update(body);
    mac.finalize().into_bytes().into()
}

/// The parsed signature headers of a request whose timestamp is inside the window.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SignedHeaders {
    timestamp: i64,
    signature: [u8; MAC_LEN],
}

impl SignedHeaders {
    /// The request's key in the fleet-wide replay guard (the store): the signature, in hex.
    /// Only meaningful after [`Self::verify_body`] succeeded.
    pub fn replay_key(&self) -> String {
        hex::encode(self.signature)
    }

    /// Until when (unix seconds, exclusive: a key set to expire at this second is gone at its
    /// start) a replay of this request could pass the timestamp check, which still admits
    /// `timestamp + MAX_SKEW_SECS` itself.
    pub fn replay_expiry(&self) -> i64 {
        self.timestamp.saturating_add(MAX_SKEW_SECS + 1)
    }

    /// Parses the headers and checks the timestamp against `now` (unix seconds). Needs no body,
    /// so a request failing here is refused before it is read.
    pub fn from_headers(headers: &HeaderMap, now: i64) -> Result<Self, HookAuthError> {
        let timestamp = headers
            .get(TIMESTAMP_HEADER)
            .ok_or(HookAuthError::MissingTimestamp)?;
        let timestamp = timestamp
            .to_str()
            .ok()
            .filter(|t| (1..=12).contains(&t.len()) && t.bytes().all(|b| b.is_ascii_digit()))
            .and_then(|t| t.parse::<i64>().ok())
            .ok_or(HookAuthError::MalformedTimestamp)?;
        let signature = headers
            .get(SIGNATURE_HEADER)
            .ok_or(HookAuthError::MissingSignature)?;
        let mut decoded = [0u8; MAC_LEN];
        signature
            .to_str()
            .ok()
            .and_then(|s| s.strip_prefix(SCHEME))
            .filter(|hex| hex.len() == MAC_LEN * 2)
            .and_then(|hex| hex::decode_to_slice(hex, &mut decoded).ok())
            .ok_or(HookAuthError::MalformedSignature)?;
        let skew = timestamp - now;
        if skew.abs() > MAX_SKEW_SECS {
            return Err(HookAuthError::Stale { skew });
        }
        Ok(Self {
            timestamp,
            signature: decoded,
        })
    }

    /// The signed unix time.
    pub fn timestamp(&self) -> i64 {
        self.timestamp
    }

    /// Checks the MAC over the raw body, in constant time.
    pub fn verify_body(&self, secret: &[u8], body: &[u8]) -> Result<(), HookAuthError> {
        if secret.is_empty() {
            return Err(HookAuthError::NoSecret);
        }
        let mut mac = keyed(secret, self.timestamp);
        mac.update(body);
        mac.verify_slice(&self.signature)
            .map_err(|_| HookAuthError::BadSignature)
    }
}

/// Remembers verified signatures until their timestamp leaves the window, so that each signed
/// request is accepted once.
///
/// Bounded: when `capacity` unexpired signatures are held, new requests are refused with
/// [`HookAuthError::ReplayGuardFull`] rather than evicting a live entry, since forgetting one
/// would reopen it to replay. An entry lives until `timestamp + MAX_SKEW_SECS` has passed, at
/// most ten minutes, so a full guard drains by itself.
#[derive(Debug)]
pub struct ReplayGuard {
    capacity: usize,
    inner: Mutex<Seen>,
}

#[derive(Debug, Default)]
struct Seen {
    by_signature: HashMap<[u8; MAC_LEN], i64>,
    by_expiry: BTreeSet<(i64, [u8; MAC_LEN])>,
}

impl ReplayGuard {
    /// A guard holding at most `capacity` signatures.
    pub fn new(capacity: usize) -> Self {
        Self {
            capacity,
            inner: Mutex::new(Seen::default()),
        }
    }

    /// Admits `signed` if its signature was not seen inside the window. Call only after
    /// [`SignedHeaders::verify_body`] succeeded, so that forged requests cannot fill the guard.
    pub fn admit(&self, signed: &SignedHeaders, now: i64) -> Result<(), HookAuthError> {
        // Every critical section leaves both indexes consistent before it can panic.
        let mut seen = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        while let Some(&(expiry, signature)) = seen.by_expiry.first() {
            if expiry >= now {
                break;
            }
            seen.by_expiry.pop_first();
            seen.by_signature.remove(&signature);
        }
        if seen.by_signature.contains_key(&signed.signature) {
            return Err(HookAuthError::Replayed);
        }
        if seen.by_signature.len() >= self.capacity {
            return Err(HookAuthError::ReplayGuardFull);
        }
        let expiry = signed.timestamp + MAX_SKEW_SECS;
        seen.by_signature.insert(signed.signature, expiry);
        seen.by_expiry.insert((expiry, signed.signature));
        Ok(())
    }

    /// How many signatures are held.
    pub fn len(&self) -> usize {
        self.inner
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .by_signature
            .len()
    }

    /// Whether no signature is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Default for ReplayGuard {
    fn default() -> Self {
        Self::new(DEFAULT_REPLAY_CAPACITY)
    }
}

#[cfg(test)]
mod tests {
    use http::HeaderValue;

    use super::*;

    const SECRET: &[u8] = b"hook-secret";
    const NOW: i64 = 1_700_000_000;

    fn headers(timestamp: &str, signature: &str) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(TIMESTAMP_HEADER, HeaderValue::from_str(timestamp).unwrap());
        headers.insert(SIGNATURE_HEADER, HeaderValue::from_str(signature).unwrap());
        headers
    }

    fn signed(timestamp: i64, body: &[u8]) -> HeaderMap {
        headers(&timestamp.to_string(), &sign(SECRET, timestamp, body))
    }

    #[test]
    fn signature_is_hmac_sha256_of_timestamp_dot_body() {
        // Computed independently: printf '1700000000.hello' | openssl dgst -sha256 -hmac hook-secret
        let expected = "988712c5c7d077cf883daa670d2157dbc52cb3efc115d17ef674ee17e2923693";
        assert_eq!(sign(SECRET, NOW, b"hello"), format!("v1={expected}"));
        assert_eq!(sign(SECRET, NOW, b"hello").len(), 3 + 64);
    }

    #[test]
    fn correctly_signed_body_verifies() {
        let body = b"--x\r\nbody";
        let accepted = verify(SECRET, &signed(NOW, body), body, NOW).unwrap();
        assert_eq!(accepted.timestamp(), NOW);
        // Inside the window on both sides.
        verify(SECRET, &signed(NOW - 300, body), body, NOW).unwrap();
        verify(SECRET, &signed(NOW + 300, body), body, NOW).unwrap();
    }

    #[test]
    fn changed_body_wrong_secret_or_timestamp_fail() {
        let body = b"payload";
        let good = signed(NOW, body);
        assert_eq!(
            verify(SECRET, &good, b"payloaD", NOW),
            Err(HookAuthError::BadSignature)
        );
        assert_eq!(
            verify(SECRET, &good, b"payloae", NOW),
            Err(HookAuthError::BadSignature)
        );
        assert_eq!(
            verify(b"other", &good, body, NOW),
            Err(HookAuthError::BadSignature)
        );
        // The signature of one timestamp does not carry over to another.
        let moved = headers(&(NOW + 1).to_string(), &sign(SECRET, NOW, body));
        assert_eq!(
            verify(SECRET, &moved, body, NOW),
            Err(HookAuthError::BadSignature)
        );
        assert_eq!(verify(b"", &good, body, NOW), Err(HookAuthError::NoSecret));
    }

    #[test]
    fn timestamps_outside_the_window_are_stale() {
        let body = b"x";
        assert_eq!(
            verify(SECRET, &signed(NOW - 301, body), body, NOW),
            Err(HookAuthError::Stale { skew: -301 })
        );
        assert_eq!(
            verify(SECRET, &signed(NOW + 301, body), body, NOW),
            Err(HookAuthError::Stale { skew: 301 })
        );
    }

    #[test]
    fn missing_and_malformed_headers_are_refused() {
        let sig = sign(SECRET, NOW, b"x");
        let mut only_sig = HeaderMap::new();
        only_sig.insert(SIGNATURE_HEADER, HeaderValue::from_str(&sig).unwrap());
        assert_eq!(
            SignedHeaders::from_headers(&only_sig, NOW),
            Err(HookAuthError::MissingTimestamp)
        );
        let mut only_ts = HeaderMap::new();
        only_ts.insert(TIMESTAMP_HEADER, HeaderValue::from(NOW));
        assert_eq!(
            SignedHeaders::from_headers(&only_ts, NOW),
            Err(HookAuthError::MissingSignature)
        );
        let ts = NOW.to_string();
        for bad_ts in ["", "-1", "1.5", "abc", "17000000000000", " 1700000000"] {
            assert_eq!(
                SignedHeaders::from_headers(&headers(bad_ts, &sig), NOW),
                Err(HookAuthError::MalformedTimestamp),
                "{bad_ts:?}"
            );
        }
        let hex = &sig[3..];
        for bad_sig in [
            hex.to_owned(),
            format!("v2={hex}"),
            format!("v1={}", &hex[..63]),
            format!("v1={hex}0"),
            format!("v1={}g", &hex[..63]),
            format!("v1= {hex}"),
        ] {
            assert_eq!(
                SignedHeaders::from_headers(&headers(&ts, &bad_sig), NOW),
                Err(HookAuthError::MalformedSignature),
                "{bad_sig:?}"
            );
        }
    }

    #[test]
    fn uppercase_hex_signature_is_accepted() {
        let body = b"x";
        let sig = sign(SECRET, NOW, body);
        let upper = format!("v1={}", sig[3..].to_ascii_uppercase());
        verify(SECRET, &headers(&NOW.to_string(), &upper), body, NOW).unwrap();
    }

    #[test]
    fn replay_guard_admits_a_signature_once() {
        let guard = ReplayGuard::new(10);
        let a = verify(SECRET, &signed(NOW, b"a"), b"a", NOW).unwrap();
        let b = verify(SECRET, &signed(NOW, b"b"), b"b", NOW).unwrap();
        guard.admit(&a, NOW).unwrap();
        assert_eq!(guard.admit(&a, NOW + 10), Err(HookAuthError::Replayed));
        guard.admit(&b, NOW).unwrap();
        assert_eq!(guard.len(), 2);
    }

    #[test]
    fn replay_guard_forgets_signatures_once_they_are_stale_anyway() {
        let guard = ReplayGuard::new(10);
        let a = verify(SECRET, &signed(NOW, b"a"), b"a", NOW).unwrap();
        guard.admit(&a, NOW).unwrap();
        // Still inside the window: remembered.
        assert_eq!(
            guard.admit(&a, NOW + MAX_SKEW_SECS),
            Err(HookAuthError::Replayed)
        );
        // Past it the headers check refuses the request before the guard is asked; the guard
        // may then drop the entry.
        let later = NOW + MAX_SKEW_SECS + 1;
        assert!(matches!(
            SignedHeaders::from_headers(&signed(NOW, b"a"), later),
            Err(HookAuthError::Stale { .. })
        ));
        let c = verify(SECRET, &signed(later, b"c"), b"c", later).unwrap();
        guard.admit(&c, later).unwrap();
        assert_eq!(guard.len(), 1);
    }

    #[test]
    fn full_replay_guard_refuses_instead_of_forgetting() {
        let guard = ReplayGuard::new(2);
        let sign_at = |body: &[u8]| verify(SECRET, &signed(NOW, body), body, NOW).unwrap();
        let (a, b, c) = (sign_at(b"a"), sign_at(b"b"), sign_at(b"c"));
        guard.admit(&a, NOW).unwrap();
        guard.admit(&b, NOW).unwrap();
        assert_eq!(guard.admit(&c, NOW), Err(HookAuthError::ReplayGuardFull));
        // The old ones are still refused as replays.
        assert_eq!(guard.admit(&a, NOW), Err(HookAuthError::Replayed));
        // Once they expire there is room again.
        let later = NOW + MAX_SKEW_SECS + 1;
        let d = verify(SECRET, &signed(later, b"d"), b"d", later).unwrap();
        guard.admit(&d, later).unwrap();
        assert_eq!(guard.len(), 1);
    }
}
