//! Authorization: which workers each certificate identity may see, from an optional ACL file,
//! reloadable in place.
//!
//! Owns the file format, the [`Rights`] of an identity, and the history of reloads that
//! decides whether a subscription may resume. Enforcement happens in [`crate::requests`], the
//! one place every gRPC and QUIC request passes. Depends on the core's types only.
//!
//! # The ACL file
//!
//! One rule per line, `identity: pattern, pattern, …`; `#` starts a comment.
//!
//! ```text
//! # edge hosts of the shop see the shop's workers
//! edge-shop-1: shop-*, checkout
//! ops-console: *
//! # any identity not listed above
//! *: public-*
//! ```
//!
//! An identity is a certificate identity (the SPIFFE consumer id or CN); `*` as the identity is
//! the rule for every identity not listed. Patterns are worker names where `*` matches any run
//! of characters. With a file, an identity that no rule covers sees nothing; without a file,
//! every authenticated identity sees every worker.

use std::{
    collections::{HashMap, VecDeque},
    fmt,
    path::{Path, PathBuf},
    sync::{Arc, Mutex, PoisonError},
};

use tokio::sync::watch;

use crate::core::{
    Epoch, Revision, WorkerFilter, WorkerName,
    types::{NamePattern, NamePatterns},
};

/// Reloads remembered to decide whether a resume position predates a change of rights.
const HISTORY: usize = 64;

/// Why an ACL file could not be used.
#[derive(Debug, thiserror::Error)]
pub enum AclError {
    /// The file could not be read.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// A line does not follow the format.
    #[error("{path}:{line}: {message}")]
    Syntax {
        /// The file.
        path: PathBuf,
        /// 1-based line number.
        line: usize,
        /// What is wrong.
        message: String,
    },
}

/// The workers an identity may see.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Rights {
    /// Every worker.
    All,
    /// Workers matching these patterns (none, if empty).
    Only(NamePatterns),
}

impl Rights {
    /// Whether `worker` may be seen.
    pub fn allows(&self, worker: &WorkerName) -> bool {
        match self {
            Self::All => true,
            Self::Only(patterns) => patterns.matches(worker.as_str()),
        }
    }

    /// `requested` narrowed to these rights: what a subscription or listing may cover.
    pub fn narrow(&self, requested: WorkerFilter) -> WorkerFilter {
        match self {
            Self::All => requested,
            Self::Only(patterns) => requested.within(patterns.clone()),
        }
    }
}

/// A parsed ACL: rights per identity, and for everyone else.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Acl {
    rules: HashMap<String, Rights>,
    default: Rights,
}

impl Acl {
    /// No ACL: every identity sees every worker.
    pub fn allow_all() -> Self {
        Self {
            rules: HashMap::new(),
            default: Rights::All,
        }
    }

    /// The rights of `identity`.
    pub fn rights(&self, identity: &str) -> Rights {
        self.rules.get(identity).unwrap_or(&self.default).clone()
    }

    /// Parses the text of an ACL file (see the module docs); `path` only names it in errors.
    pub fn parse(text: &str, path: &Path) -> Result<Self, AclError> {
        let syntax = |line: usize, message: String| AclError::Syntax {
            path: path.to_path_buf(),
            line,
            message,
        };
        let mut rules = HashMap::new();
        let mut default = None;
        let mut seen_at: HashMap<String, usize> = HashMap::new();
        for (index, raw) in text.lines().enumerate() {
            let number = index + 1;
            let line = raw.split('#').next().unwrap_or_default().trim();
            if line.is_empty() {
                continue;
            }
            let (identity, patterns) = line.split_once(':').ok_or_else(|| {
                syntax(number, "expected `identity: pattern, pattern`".to_owned())
            })?;
            let identity = identity.trim();
            if identity.is_empty()
                || identity.contains('/')
                || identity
                    .chars()
                    .any(|c| c.is_control() || c.is_whitespace())
            {
                return Err(syntax(number, format!("invalid identity {identity:?}")));
            }
            if let Some(first) = seen_at.insert(identity.to_owned(), number) {
                return Err(syntax(
                    number,
                    format!("identity {identity:?} already has a rule on line {first}"),
                ));
            }
            let patterns = patterns
                .split(|c: char| c == ',' || c.is_whitespace())
                .filter(|p| !p.is_empty())
                .map(NamePattern::parse)
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| syntax(number, e.to_string()))?;
            let patterns = NamePatterns::new(patterns);
            let rights = if patterns.matches_everything() {
                Rights::All
            } else {
                Rights::Only(patterns)
            };
            if identity == "*" {
                default = Some(rights);
            } else {
                rules.insert(identity.to_owned(), rights);
            }
        }
        Ok(Self {
            rules,
            default: default.unwrap_or(Rights::Only(NamePatterns::default())),
        })
    }

    /// Reads and parses an ACL file.
    pub fn read(path: &Path) -> Result<Self, AclError> {
        let text = std::fs::read_to_string(path).map_err(|source| AclError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        Self::parse(&text, path)
    }
}

/// One ACL in force from a position of the log on.
struct Generation {
    /// In force for changes after this head of this epoch; `None`: from the start.
    after: Option<(Epoch, Revision)>,
    acl: Arc<Acl>,
}

/// The ACL in force, reloadable; shared by both transports.
pub struct AclStore {
    path: Option<PathBuf>,
    current: watch::Sender<Arc<Acl>>,
    history: Mutex<VecDeque<Generation>>,
}

impl fmt::Debug for AclStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AclStore")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

impl AclStore {
    /// Without a file: every identity sees every worker, and reloads change nothing.
    pub fn allow_all() -> Self {
        Self::with(None, Acl::allow_all())
    }

    /// Reads the ACL file at `path`.
    pub fn open(path: &Path) -> Result<Self, AclError> {
        Ok(Self::with(Some(path.to_path_buf()), Acl::read(path)?))
    }

    fn with(path: Option<PathBuf>, acl: Acl) -> Self {
        let acl = Arc::new(acl);
        Self {
            path,
            current: watch::Sender::new(acl.clone()),
            history: Mutex::new(VecDeque::from([Generation { after: None, acl }])),
        }
    }

    /// The ACL file, if there is one.
    pub fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }

    /// The rights `identity` has now.
    pub fn rights(&self, identity: &str) -> Rights {
        self.current.borrow().rights(identity)
    }

    /// Re-reads the file; on error the ACL in force stays. `position` is read after the swap:
    /// the log position from which the new ACL is in force. Returns whether anything changed.
    pub fn reload(&self, position: impl FnOnce() -> (Epoch, Revision)) -> Result<bool, AclError> {
        let Some(path) = &self.path else {
            return Ok(false);
        };
        let acl = Acl::read(path)?;
        if **self.current.borrow() == acl {
            return Ok(false);
        }
        let acl = Arc::new(acl);
        let mut history = self.history.lock().unwrap_or_else(PoisonError::into_inner);
        self.current.send_replace(acl.clone());
        // A change that reaches the hub after this read was published after the swap, so a
        // subscription that checks its rights before sending never delivers it under the old
        // ACL (see `RightsGuard`).
        history.push_back(Generation {
            after: Some(position()),
            acl,
        });
        while history.len() > HISTORY {
            history.pop_front();
        }
        Ok(true)
    }

    /// Whether a subscription of `identity` may resume at `revision` of `epoch`: only if the
    /// identity's rights then were its rights now. Otherwise it starts over (RESET and a
    /// snapshot under the rights of now), so the consumer drops what it may no longer see and
    /// gets what it newly may. Unknown (history too short) counts as changed.
    pub fn resumable(&self, identity: &str, epoch: &str, revision: Revision) -> bool {
        let now = self.rights(identity);
        let history = self.history.lock().unwrap_or_else(PoisonError::into_inner);
        let then = history
            .iter()
            .rev()
            .find(|generation| match &generation.after {
                None => true,
                // Reloads are in time order, so one of an older epoch was in force when this one
                // began.
                Some((in_epoch, _)) if in_epoch.as_str() != epoch => true,
                Some((_, head)) => revision > *head,
            });
        then.is_some_and(|generation| generation.acl.rights(identity) == now)
    }

    /// Watches `identity`'s rights from now on.
    pub fn guard(&self, identity: &str) -> RightsGuard {
        let mut changes = self.current.subscribe();
        let rights = changes.borrow_and_update().rights(identity);
        RightsGuard {
            changes,
            identity: identity.into(),
            rights,
            lost: false,
        }
    }
}

/// The rights an identity had when a subscription started, and whether they still hold.
///
/// A live subscription ends (PERMISSION_DENIED) once they change, so the consumer subscribes
/// again under the new ones; it checks before every send.
#[derive(Debug)]
pub struct RightsGuard {
    changes: watch::Receiver<Arc<Acl>>,
    identity: Arc<str>,
    rights: Rights,
    lost: bool,
}

impl RightsGuard {
    /// The rights it started with.
    pub fn rights(&self) -> &Rights {
        &self.rights
    }

    /// Whether the rights are still those it started with. Cheap when nothing was reloaded.
    pub fn holds(&mut self) -> bool {
        if !self.lost && self.changes.has_changed().unwrap_or(false) {
            self.recheck();
        }
        !self.lost
    }

    /// Resolves once the rights differ from those it started with.
    pub async fn lost(&mut self) {
        while self.holds() {
            if self.changes.changed().await.is_err() {
                // The store is gone, so nothing changes any more.
                std::future::pending::<()>().await;
            }
            // `changed` marked the new ACL seen, so `holds` would not look at it.
            self.recheck();
        }
    }

    fn recheck(&mut self) {
        let now = self.changes.borrow_and_update().rights(&self.identity);
        self.lost = now != self.rights;
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn parse(text: &str) -> Result<Acl, AclError> {
        Acl::parse(text, Path::new("acl"))
    }

    fn name(n: &str) -> WorkerName {
        WorkerName::parse(n).unwrap()
    }

    #[test]
    fn rules_map_identities_to_patterns_and_the_rest_to_the_default() {
        let acl = parse(
            "# comment\n\
             edge-1: shop-*, checkout   # trailing comment\n\
             ops: *\n\
             \n\
             *: public-*\n",
        )
        .unwrap();
        let edge = acl.rights("edge-1");
        assert!(edge.allows(&name("shop-cart")));
        assert!(edge.allows(&name("checkout")));
        assert!(!edge.allows(&name("admin-panel")));
        assert_eq!(acl.rights("ops"), Rights::All);
        assert!(acl.rights("stranger").allows(&name("public-home")));
        assert!(!acl.rights("stranger").allows(&name("shop-cart")));
    }

    #[test]
    fn without_a_default_rule_unlisted_identities_see_nothing() {
        let acl = parse("edge-1: shop-*\nedge-2:\n").unwrap();
        assert!(!acl.rights("stranger").allows(&name("shop-cart")));
        assert!(!acl.rights("edge-2").allows(&name("shop-cart")));
        assert!(Acl::allow_all().rights("stranger").allows(&name("x")));
    }

    #[test]
    fn malformed_lines_are_refused_with_their_line_number() {
        for (text, line) in [
            ("edge-1 shop-*", 1),
            ("ok: a\nedge/1: a", 2),
            ("edge-1: Shop", 1),
            ("edge-1: a\nedge-1: b", 2),
            (": a", 1),
        ] {
            match parse(text) {
                Err(AclError::Syntax { line: at, .. }) => assert_eq!(at, line, "{text:?}"),
                other => panic!("{text:?}: {other:?}"),
            }
        }
    }

    #[test]
    fn resume_is_allowed_only_where_the_rights_were_the_same() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("acl");
        std::fs::write(&path, "edge-1: shop-*\nedge-2: *\n").unwrap();
        let store = AclStore::open(&path).unwrap();
        let epoch = Epoch::parse("e1").unwrap();
        assert!(store.resumable("edge-1", "e1", 5));
        let mut guard = store.guard("edge-1");
        let mut other = store.guard("edge-2");

        std::fs::write(&path, "edge-1: shop-cart\nedge-2: *\n").unwrap();
        assert!(store.reload(|| (epoch.clone(), 10)).unwrap());
        assert!(!guard.holds());
        assert!(!guard.holds(), "a lost guard stays lost");
        assert!(other.holds());
        // Positions up to 10 were delivered under the old rights.
        assert!(!store.resumable("edge-1", "e1", 10));
        assert!(store.resumable("edge-1", "e1", 11));
        assert!(store.resumable("edge-2", "e1", 3));
        // Another epoch: the generation in force when it began is the latest.
        assert!(store.resumable("edge-1", "e2", 3));

        // An unchanged file, or an invalid one, leaves the ACL as it is.
        assert!(!store.reload(|| (epoch.clone(), 12)).unwrap());
        std::fs::write(&path, "broken").unwrap();
        assert!(store.reload(|| (epoch.clone(), 12)).is_err());
        assert!(store.rights("edge-1").allows(&name("shop-cart")));
    }

    #[tokio::test]
    async fn a_guard_wakes_when_its_identity_loses_its_rights_and_only_then() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("acl");
        std::fs::write(&path, "edge-1: shop-*\nedge-2: *\n").unwrap();
        let store = AclStore::open(&path).unwrap();
        let epoch = Epoch::parse("e1").unwrap();
        let mut guard = store.guard("edge-1");
        let mut lost = Box::pin(async move {
            guard.lost().await;
            guard
        });
        // A reload that leaves edge-1 as it was does not wake it.
        std::fs::write(&path, "edge-1: shop-*\nedge-2: admin-*\n").unwrap();
        assert!(store.reload(|| (epoch.clone(), 1)).unwrap());
        let waited = tokio::time::timeout(Duration::from_millis(50), &mut lost).await;
        assert!(waited.is_err(), "woke without a change of its rights");
        std::fs::write(&path, "edge-1: shop-cart\nedge-2: admin-*\n").unwrap();
        assert!(store.reload(|| (epoch.clone(), 2)).unwrap());
        let mut guard = tokio::time::timeout(Duration::from_secs(5), lost)
            .await
            .expect("woken by the change");
        assert!(!guard.holds());
    }
}
