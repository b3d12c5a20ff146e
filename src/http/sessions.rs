//! Status page sessions: a sign-in opens a server-side session named by a random id, which
//! the browser holds as an HttpOnly cookie with an expiry (`ADMIN_SESSION_TTL`); sign-out
//! removes it, so a copied cookie stops working then, and at the latest when it expires.
//!
//! The table holds only SHA-256 digests of the ids, and at most [`MAX_SESSIONS`] of them (the
//! one closest to expiry goes first). Only a correct admin token opens one. Nothing here logs
//! an id.

use std::{
    collections::HashMap,
    sync::{Mutex, PoisonError},
    time::{Duration, Instant},
};

use axum::http::{HeaderMap, header};
use sha2::{Digest, Sha256};

/// Name of the admin session cookie.
pub const SESSION_COOKIE: &str = "workerpush_admin";

/// Most sessions open at once.
pub const MAX_SESSIONS: usize = 1024;

/// The open sessions; see the module docs.
#[derive(Debug)]
pub struct Sessions {
    ttl: Duration,
    open: Mutex<HashMap<[u8; 32], Instant>>,
}

impl Sessions {
    /// No sessions yet; each will last `ttl`.
    pub fn new(ttl: Duration) -> Self {
        Self {
            ttl,
            open: Mutex::new(HashMap::new()),
        }
    }

    /// How long a session lasts.
    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    /// Opens a session at `now`; returns the cookie value that names it.
    pub fn open(&self, now: Instant) -> String {
        let id: [u8; 32] = rand::random();
        let mut open = self.table();
        if open.len() >= MAX_SESSIONS {
            open.retain(|_, expires| *expires > now);
        }
        if open.len() >= MAX_SESSIONS
            && let Some(soonest) = open.iter().min_by_key(|(_, at)| **at).map(|(k, _)| *k)
        {
            open.remove(&soonest);
        }
        open.insert(digest(&id), now + self.ttl);
        hex::encode(id)
    }

    /// Whether the request carries the cookie of a session open at `now`.
    pub fn admits(&self, headers: &HeaderMap, now: Instant) -> bool {
        let open = self.table();
        presented(headers).any(|id| open.get(&id).is_some_and(|expires| *expires > now))
    }

    /// Closes the sessions the request's cookies name.
    pub fn close(&self, headers: &HeaderMap) {
        let mut open = self.table();
        for id in presented(headers) {
            open.remove(&id);
        }
    }

    /// The `Set-Cookie` value of a new session `value`.
    pub fn cookie(&self, value: &str) -> String {
        format!(
            "{SESSION_COOKIE}={value}; Path=/; HttpOnly; SameSite=Strict; Max-Age={}",
            self.ttl.as_secs().max(1)
        )
    }

    fn table(&self) -> std::sync::MutexGuard<'_, HashMap<[u8; 32], Instant>> {
        // Every critical section is one map operation: a poisoned lock is still consistent.
        self.open.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// The `Set-Cookie` value that makes a browser forget the cookie.
pub fn expired_cookie() -> String {
    format!("{SESSION_COOKIE}=; Path=/; HttpOnly; SameSite=Strict; Max-Age=0")
}

/// Digests of the well-formed session ids among the request's cookies.
fn presented(headers: &HeaderMap) -> impl Iterator<Item = [u8; 32]> + '_ {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .filter(|(name, _)| *name == SESSION_COOKIE)
        .filter_map(|(_, value)| {
            let bytes = hex::decode(value).ok()?;
            let id = <[u8; 32]>::try_from(bytes.as_slice()).ok()?;
            Some(digest(&id))
        })
}

fn digest(id: &[u8; 32]) -> [u8; 32] {
    Sha256::digest(id).into()
}

#[cfg(test)]
mod tests {
    use axum::http::HeaderValue;

    use super::*;

    fn with_cookie(value: &str) -> HeaderMap {
        let mut headers = HeaderMap::new();
        let cookie = format!("other=1; {SESSION_COOKIE}={value}");
        headers.insert(header::COOKIE, HeaderValue::from_str(&cookie).unwrap());
        headers
    }

    #[test]
    fn a_session_admits_until_it_expires_or_is_closed() {
        let sessions = Sessions::new(Duration::from_secs(60));
        let now = Instant::now();
        let value = sessions.open(now);
        let headers = with_cookie(&value);
        assert!(sessions.admits(&headers, now));
        assert!(!sessions.admits(&headers, now + Duration::from_secs(60)));
        assert!(!sessions.admits(&with_cookie(&"00".repeat(32)), now));
        assert!(!sessions.admits(&with_cookie("garbage"), now));
        sessions.close(&headers);
        assert!(!sessions.admits(&headers, now));
        assert!(sessions.cookie(&value).contains("Max-Age=60"));
    }

    #[test]
    fn the_table_stays_bounded() {
        let sessions = Sessions::new(Duration::from_secs(60));
        let now = Instant::now();
        let first = sessions.open(now);
        for i in 1..=MAX_SESSIONS {
            sessions.open(now + Duration::from_millis(i as u64));
        }
        assert_eq!(sessions.table().len(), MAX_SESSIONS);
        assert!(
            !sessions.admits(&with_cookie(&first), now),
            "the oldest went first"
        );
    }
}
