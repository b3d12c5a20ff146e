//! Validated names and ids that the rest of workerpush passes around, so that a worker name,
//! a version, a checksum and a consumer id can never be mixed up or arrive unchecked.

use std::{fmt, sync::Arc};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::error::InvalidInput;

/// A revision: the position of a change in the one global order. Strictly increasing within an
/// epoch; 0 means "nothing yet".
pub type Revision = u64;

macro_rules! string_newtype {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
        #[serde(transparent)]
        pub struct $name(Arc<str>);

        impl $name {
            /// The text, as validated.
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::Debug::fmt(&*self.0, f)
            }
        }

        impl AsRef<str> for $name {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }
    };
}

string_newtype!(
    /// A worker name: `^[a-z0-9][a-z0-9_-]{0,62}$`.
    WorkerName
);
string_newtype!(
    /// A worker version: `^[0-9A-Za-z][0-9A-Za-z.+_-]{0,63}$`. Immutable once published.
    Version
);
string_newtype!(
    /// Lowercase hex SHA-256 of a worker's code.
    Checksum
);
string_newtype!(
    /// The id of the store's history; changes only when that history is lost or wiped.
    Epoch
);
string_newtype!(
    /// A consumer id: the certificate identity, or `identity/suffix`.
    ConsumerId
);

impl WorkerName {
    /// Validates a worker name.
    pub fn parse(name: &str) -> Result<Self, InvalidInput> {
        let bytes = name.as_bytes();
        let valid = (1..=63).contains(&bytes.len())
            && matches!(bytes[0], b'a'..=b'z' | b'0'..=b'9')
            && bytes[1..]
                .iter()
                .all(|b| matches!(b, b'a'..=b'z' | b'0'..=b'9' | b'_' | b'-'));
        if valid {
            Ok(Self(name.into()))
        } else {
            Err(InvalidInput::WorkerName(truncate_for_message(name)))
        }
    }
}

impl Version {
    /// Validates a version.
    pub fn parse(version: &str) -> Result<Self, InvalidInput> {
        let bytes = version.as_bytes();
        let valid = (1..=64).contains(&bytes.len())
            && bytes[0].is_ascii_alphanumeric()
            && bytes[1..]
                .iter()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'+' | b'_' | b'-'));
        if valid {
            Ok(Self(version.into()))
        } else {
            Err(InvalidInput::Version(truncate_for_message(version)))
        }
    }
}

impl Checksum {
    /// The checksum of `code`.
    pub fn of(code: &[u8]) -> Self {
        Self(hex::encode(Sha256::digest(code)).into())
    }

    /// Validates a checksum given by a client: 64 hex digits, normalised to lowercase.
    pub fn parse(text: &str) -> Result<Self, InvalidInput> {
        if text.len() == 64 && text.bytes().all(|b| b.is_ascii_hexdigit()) {
            Ok(Self(text.to_ascii_lowercase().into()))
        } else {
            Err(InvalidInput::Checksum(truncate_for_message(text)))
        }
    }
}

impl Epoch {
    /// A new random epoch id.
    pub fn generate() -> Self {
        Self(hex::encode(rand::random::<[u8; 8]>()).into())
    }

    /// An epoch read back from a store. Any non-empty text up to 64 bytes.
    pub fn parse(text: &str) -> Result<Self, InvalidInput> {
        if (1..=64).contains(&text.len()) && text.bytes().all(|b| b.is_ascii_graphic()) {
            Ok(Self(text.into()))
        } else {
            Err(InvalidInput::Epoch(truncate_for_message(text)))
        }
    }
}

impl ConsumerId {
    /// Resolves the `consumer_id` a client asked for against the identity of its certificate.
    ///
    /// Empty means the identity itself; the identity, or `identity/anything`, is allowed;
    /// anything else belongs to someone else.
    pub fn authorize(identity: &str, requested: &str) -> Result<Self, ConsumerIdError> {
        if requested.len() > 256 || requested.chars().any(char::is_control) {
            return Err(ConsumerIdError::Invalid);
        }
        if requested.is_empty() || requested == identity {
            return Ok(Self(identity.into()));
        }
        match requested.strip_prefix(identity) {
            Some(suffix) if suffix.len() > 1 && suffix.starts_with('/') => {
                Ok(Self(requested.into()))
            }
            _ => Err(ConsumerIdError::NotYours {
                identity: identity.to_owned(),
                requested: requested.to_owned(),
            }),
        }
    }

    /// The certificate identity part (before the first `/`).
    pub fn identity(&self) -> &str {
        self.0.split('/').next().unwrap_or_default()
    }
}

/// Why a requested `consumer_id` was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConsumerIdError {
    /// Too long or holding control characters.
    #[error("consumer_id is malformed")]
    Invalid,
    /// Neither the identity nor `identity/…`.
    #[error("identity {identity:?} may not act as consumer {requested:?}")]
    NotYours {
        /// The certificate identity.
        identity: String,
        /// What the client asked for.
        requested: String,
    },
}

/// The most worker names one request may list.
pub const MAX_FILTER_NAMES: usize = 10_000;

/// Which workers a subscription or listing covers.
/// A worker-name pattern: worker-name characters and `*`, which matches any run of them
/// (`shop-*`, `*-eu`, `*`). Without `*` it names exactly one worker.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct NamePattern(Arc<str>);

impl NamePattern {
    /// Validates a pattern: 1 to 128 characters of `[a-z0-9_*-]`.
    pub fn parse(text: &str) -> Result<Self, InvalidInput> {
        let valid = (1..=128).contains(&text.len())
            && text
                .bytes()
                .all(|b| matches!(b, b'a'..=b'z' | b'0'..=b'9' | b'_' | b'-' | b'*'));
        if valid {
            Ok(Self(text.into()))
        } else {
            Err(InvalidInput::Other(format!(
                "invalid worker name pattern {:?}: use [a-z0-9_-] and * only",
                truncate_for_message(text)
            )))
        }
    }

    /// The pattern as written.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Whether `name` matches: linear in the name, no allocation (it runs per change per
    /// subscriber).
    pub fn matches(&self, name: &str) -> bool {
        let Some((head, last)) = self.0.rsplit_once('*') else {
            return *self.0 == *name;
        };
        let Some(mut rest) = name.strip_suffix(last) else {
            return false;
        };
        let mut parts = head.split('*');
        // `split` yields at least one part.
        let first = parts.next().unwrap_or_default();
        let Some(after_first) = rest.strip_prefix(first) else {
            return false;
        };
        rest = after_first;
        for part in parts {
            match rest.find(part) {
                Some(at) => rest = &rest[at + part.len()..],
                None => return false,
            }
        }
        true
    }
}

impl fmt::Debug for NamePattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&*self.0, f)
    }
}

impl fmt::Display for NamePattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A set of [`NamePattern`]s, sorted and without duplicates so that equal sets compare equal.
/// An empty set matches nothing.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NamePatterns(Arc<[NamePattern]>);

impl NamePatterns {
    /// The set of `patterns`.
    pub fn new(mut patterns: Vec<NamePattern>) -> Self {
        patterns.sort();
        patterns.dedup();
        Self(patterns.into())
    }

    /// Whether any pattern matches `name`.
    pub fn matches(&self, name: &str) -> bool {
        self.0.iter().any(|p| p.matches(name))
    }

    /// Whether some pattern is `*`, which matches every worker.
    pub fn matches_everything(&self) -> bool {
        self.0.iter().any(|p| p.as_str() == "*")
    }

    /// The patterns, sorted.
    pub fn as_slice(&self) -> &[NamePattern] {
        &self.0
    }
}

/// Which workers a subscription or listing covers: the names asked for (or every worker),
/// narrowed to the patterns the consumer may see (or not narrowed).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct WorkerFilter {
    names: Option<Arc<[WorkerName]>>,
    patterns: Option<NamePatterns>,
}

impl WorkerFilter {
    /// Every worker.
    pub fn all() -> Self {
        Self::default()
    }

    /// Only these workers; an empty list means every worker.
    pub fn only(mut names: Vec<WorkerName>) -> Self {
        if names.is_empty() {
            return Self::all();
        }
        names.sort();
        names.dedup();
        Self {
            names: Some(names.into()),
            patterns: None,
        }
    }

    /// Validates the names of a request (at most [`MAX_FILTER_NAMES`]).
    pub fn parse<S: AsRef<str>>(names: &[S]) -> Result<Self, InvalidInput> {
        if names.len() > MAX_FILTER_NAMES {
            return Err(InvalidInput::Other(format!(
                "{} worker names; at most {MAX_FILTER_NAMES} per request",
                names.len()
            )));
        }
        let names = names
            .iter()
            .map(|n| WorkerName::parse(n.as_ref()))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self::only(names))
    }

    /// This filter narrowed to workers matching `patterns` (the intersection).
    pub fn within(mut self, patterns: NamePatterns) -> Self {
        self.patterns = Some(patterns);
        self
    }

    /// Whether `worker` passes the filter.
    pub fn matches(&self, worker: &WorkerName) -> bool {
        let named = match &self.names {
            None => true,
            Some(names) => names.binary_search(worker).is_ok(),
        };
        named
            && self
                .patterns
                .as_ref()
                .is_none_or(|patterns| patterns.matches(worker.as_str()))
    }

    /// The names, or `None` for every worker (before narrowing to [`Self::patterns`]).
    pub fn names(&self) -> Option<&[WorkerName]> {
        self.names.as_deref()
    }

    /// The patterns it is narrowed to, if any.
    pub fn patterns(&self) -> Option<&NamePatterns> {
        self.patterns.as_ref()
    }

    /// The names as shared by every clone of this filter.
    pub(crate) fn shared_names(&self) -> Option<&Arc<[WorkerName]>> {
        self.names.as_ref()
    }

    /// This filter holding `names` (the same names, shared with another filter) instead.
    pub(crate) fn with_names(mut self, names: Arc<[WorkerName]>) -> Self {
        self.names = Some(names);
        self
    }
}

fn truncate_for_message(text: &str) -> String {
    text.chars().take(80).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn worker_names_follow_the_design_rule() {
        for good in ["a", "0", "my-worker", "a_b-c", &"a".repeat(63)] {
            assert!(WorkerName::parse(good).is_ok(), "{good}");
        }
        for bad in [
            "",
            "A",
            "../x",
            "a/b",
            "-a",
            "_a",
            "a.b",
            &"a".repeat(64),
            "é",
        ] {
            assert!(WorkerName::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn versions_follow_the_design_rule() {
        for good in ["1", "1.0.0", "v2+build.7", "1.0.0-rc_1", &"a".repeat(64)] {
            assert!(Version::parse(good).is_ok(), "{good}");
        }
        for bad in ["", "..", ".1", "1/2", "1 0", &"a".repeat(65)] {
            assert!(Version::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn checksum_is_lowercase_sha256_hex() {
        assert_eq!(
            Checksum::of(b"").as_str(),
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
        let upper = "E3B0C44298FC1C149AFBF4C8996FB92427AE41E4649B934CA495991B7852B855";
        assert_eq!(Checksum::parse(upper).ok(), Some(Checksum::of(b"")));
        assert!(Checksum::parse("abc").is_err());
    }

    #[test]
    fn consumer_id_is_bound_to_the_certificate_identity() {
        let ok = |id, req| ConsumerId::authorize(id, req).map(|c| c.to_string());
        assert_eq!(ok("edge-1", "").as_deref(), Ok("edge-1"));
        assert_eq!(ok("edge-1", "edge-1").as_deref(), Ok("edge-1"));
        assert_eq!(
            ok("edge-1", "edge-1/worker-3").as_deref(),
            Ok("edge-1/worker-3")
        );
        assert!(ok("edge-1", "edge-2").is_err());
        assert!(ok("edge-1", "edge-10").is_err());
        assert!(ok("edge-1", "edge-1/").is_err());
        assert!(ok("edge-1", "edge").is_err());
        assert_eq!(
            ConsumerId::authorize("edge-1", "edge-1/a").map(|c| c.identity().to_owned()),
            Ok("edge-1".to_owned())
        );
    }

    #[test]
    fn filter_matches_only_listed_workers() {
        let a = WorkerName::parse("a").unwrap();
        let b = WorkerName::parse("b").unwrap();
        assert!(WorkerFilter::all().matches(&a));
        let only_a = WorkerFilter::only(vec![a.clone()]);
        assert!(only_a.matches(&a));
        assert!(!only_a.matches(&b));
        assert_eq!(
            WorkerFilter::parse::<&str>(&[]).unwrap(),
            WorkerFilter::all()
        );
        assert!(WorkerFilter::parse(&["a", "B"]).is_err());
    }

    #[test]
    fn patterns_match_with_stars_anywhere() {
        let p = |text| NamePattern::parse(text).unwrap();
        let cases = [
            ("shop-*", "shop-cart", true),
            ("shop-*", "shop-", true),
            ("shop-*", "shop", false),
            ("shop-*", "admin-shop-x", false),
            ("*-eu", "cart-eu", true),
            ("*-eu", "cart-eu-2", false),
            ("*", "anything", true),
            ("a*b*c", "abc", true),
            ("a*b*c", "axxbyyc", true),
            ("a*b*c", "ac", false),
            ("a*a", "a", false),
            ("a*a", "aa", true),
            ("exact", "exact", true),
            ("exact", "exact-2", false),
            ("**", "x", true),
        ];
        for (pattern, name, expected) in cases {
            assert_eq!(p(pattern).matches(name), expected, "{pattern} ~ {name}");
        }
        for bad in ["", "Shop-*", "shop/*", "a b", &"a".repeat(129)] {
            assert!(NamePattern::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn filter_is_the_intersection_of_names_and_patterns() {
        let name = |n| WorkerName::parse(n).unwrap();
        let shop = NamePatterns::new(vec![NamePattern::parse("shop-*").unwrap()]);
        let all_shop = WorkerFilter::all().within(shop.clone());
        assert!(all_shop.matches(&name("shop-cart")));
        assert!(!all_shop.matches(&name("admin-panel")));
        let named = WorkerFilter::parse(&["shop-cart", "admin-panel"])
            .unwrap()
            .within(shop);
        assert!(named.matches(&name("shop-cart")));
        assert!(!named.matches(&name("admin-panel")));
        assert!(!named.matches(&name("shop-other")));
        let nothing = WorkerFilter::all().within(NamePatterns::default());
        assert!(!nothing.matches(&name("shop-cart")));
    }
}
