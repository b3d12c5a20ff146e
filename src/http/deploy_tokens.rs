//! Deploy tokens: named bearer tokens of the upload API, each allowed to publish and delete
//! only the workers its patterns match, from an optional tokens file that is reloaded in
//! place. The file holds SHA-256 digests, never the tokens. `UPLOAD_TOKEN` stays the
//! all-powerful default (deployer `upload-token`).
//!
//! # The tokens file
//!
//! One token per line, `name sha256:HEX pattern, pattern, …`; `#` starts a comment.
//!
//! ```text
//! # printf %s "$TOKEN" | sha256sum
//! team-shop  sha256:2c26b46b68ffc68ff99b453c1d30413413422d706483bfa0f98a5e886266e7ae  shop-*, checkout
//! release    sha256:fcde2b2edba56bf408601fb721fe9b5c338d10ee429ea04fae5511b68fbf8fb9  *
//! ```
//!
//! Names are `[A-Za-z0-9._-]`, at most 64 characters, each once; patterns are worker names
//! where `*` matches any run of characters. Depends on the core's name patterns only.

use std::{
    path::{Path, PathBuf},
    sync::{Arc, PoisonError, RwLock},
};

use sha2::{Digest, Sha256};

use crate::core::types::{NamePattern, NamePatterns};

/// The deployer name of `UPLOAD_TOKEN`.
pub const UPLOAD_TOKEN_DEPLOYER: &str = "upload-token";

/// Why a tokens file could not be used.
#[derive(Debug, thiserror::Error)]
pub enum TokensFileError {
    /// The file could not be read.
    #[error("tokens file {path} (--tokens-file / TOKENS_FILE): {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// A line does not follow the format.
    #[error("tokens file {path}:{line}: {message}")]
    Syntax {
        /// The file.
        path: PathBuf,
        /// 1-based line number.
        line: usize,
        /// What is wrong.
        message: String,
    },
}

/// Who presented a token, and what it may change.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Deployer {
    /// The token's name, recorded with each change it makes.
    pub name: Arc<str>,
    /// The workers it may publish and delete; `None`: every worker.
    patterns: Option<NamePatterns>,
}

impl Deployer {
    /// The holder of `UPLOAD_TOKEN`: every worker.
    pub fn upload_token() -> Self {
        Self {
            name: UPLOAD_TOKEN_DEPLOYER.into(),
            patterns: None,
        }
    }

    /// Whether it may publish or delete `worker`.
    pub fn may_change(&self, worker: &str) -> bool {
        self.patterns.as_ref().is_none_or(|p| p.matches(worker))
    }
}

#[derive(Debug)]
struct Entry {
    digest: [u8; 32],
    deployer: Deployer,
}

/// The tokens in force: those of the file when it was last loaded (none without a file).
#[derive(Debug, Default)]
pub struct DeployTokens {
    path: Option<PathBuf>,
    entries: RwLock<Arc<Vec<Entry>>>,
}

impl DeployTokens {
    /// No tokens file: only `UPLOAD_TOKEN` works.
    pub fn none() -> Self {
        Self::default()
    }

    /// Loads `path`; a file that cannot be read or parsed is refused, naming it and the line.
    pub fn load(path: &Path) -> Result<Self, TokensFileError> {
        let entries = read(path)?;
        Ok(Self {
            path: Some(path.to_path_buf()),
            entries: RwLock::new(Arc::new(entries)),
        })
    }

    /// The tokens file, if any.
    pub fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }

    /// Reads the file again; on error what is in force stays. Answers how many tokens are
    /// in force after.
    pub fn reload(&self) -> Result<usize, TokensFileError> {
        let Some(path) = &self.path else {
            return Ok(0);
        };
        let entries = Arc::new(read(path)?);
        let count = entries.len();
        *self.entries.write().unwrap_or_else(PoisonError::into_inner) = entries;
        Ok(count)
    }

    /// The deployer whose token `presented` is, if any. Every entry is compared, digest to
    /// digest in constant time, so timing tells nothing about which (if any) matched.
    pub fn deployer(&self, presented: &str) -> Option<Deployer> {
        let digest: [u8; 32] = Sha256::digest(presented.as_bytes()).into();
        let entries = self
            .entries
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        let mut found = None;
        for entry in entries.iter() {
            if super::auth::constant_time_eq(&entry.digest, &digest) && found.is_none() {
                found = Some(entry.deployer.clone());
            }
        }
        found
    }
}

fn read(path: &Path) -> Result<Vec<Entry>, TokensFileError> {
    let text = std::fs::read_to_string(path).map_err(|source| TokensFileError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    parse(&text).map_err(|(line, message)| TokensFileError::Syntax {
        path: path.to_path_buf(),
        line,
        message,
    })
}

/// The entries of a tokens file, or the 1-based line at fault and why.
fn parse(text: &str) -> Result<Vec<Entry>, (usize, String)> {
    let mut entries: Vec<Entry> = Vec::new();
    for (index, raw) in text.lines().enumerate() {
        let line = index + 1;
        let content = raw.split('#').next().unwrap_or_default().trim();
        if content.is_empty() {
            continue;
        }
        let mut words = content.splitn(3, char::is_whitespace);
        let name = words.next().unwrap_or_default();
        let valid_name = (1..=64).contains(&name.len())
            && name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
        if !valid_name {
            return Err((
                line,
                format!("token name {name:?}: use 1 to 64 of [A-Za-z0-9._-]"),
            ));
        }
        if entries.iter().any(|e| &*e.deployer.name == name) {
            return Err((line, format!("token name {name} appears twice")));
        }
        let hash = words.next().unwrap_or_default().trim();
        let digest = hash
            .strip_prefix("sha256:")
            .and_then(|hex_text| hex::decode(hex_text).ok())
            .and_then(|bytes| <[u8; 32]>::try_from(bytes).ok())
            .ok_or_else(|| {
                (
                    line,
                    format!("{name}: expected sha256:<64 hex digits> of the token, found {hash:?}"),
                )
            })?;
        let patterns = words
            .next()
            .unwrap_or_default()
            .split(',')
            .map(str::trim)
            .filter(|p| !p.is_empty())
            .map(|p| NamePattern::parse(p).map_err(|e| (line, format!("{name}: {e}"))))
            .collect::<Result<Vec<_>, _>>()?;
        if patterns.is_empty() {
            return Err((
                line,
                format!("{name}: no worker patterns (use * for every worker)"),
            ));
        }
        entries.push(Entry {
            digest,
            deployer: Deployer {
                name: name.into(),
                patterns: Some(NamePatterns::new(patterns)),
            },
        });
    }
    Ok(entries)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(name: &str, token: &str, patterns: &str) -> String {
        format!(
            "{name} sha256:{} {patterns}\n",
            hex::encode(Sha256::digest(token))
        )
    }

    #[test]
    fn a_token_finds_its_deployer_and_its_patterns_decide() {
        let text = format!(
            "# comment\n{}{}",
            line("team-shop", "shop-secret", "shop-*, checkout"),
            line("release", "release-secret", "*")
        );
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokens");
        std::fs::write(&path, text).unwrap();
        let tokens = DeployTokens::load(&path).unwrap();
        let shop = tokens.deployer("shop-secret").unwrap();
        assert_eq!(&*shop.name, "team-shop");
        assert!(shop.may_change("shop-cart") && shop.may_change("checkout"));
        assert!(!shop.may_change("admin-panel"));
        assert!(
            tokens
                .deployer("release-secret")
                .unwrap()
                .may_change("admin-panel")
        );
        assert!(tokens.deployer("nope").is_none());
        assert!(Deployer::upload_token().may_change("anything"));
        assert!(
            !std::fs::read_to_string(&path)
                .unwrap()
                .contains("shop-secret")
        );
    }

    #[test]
    fn bad_lines_are_refused_naming_the_line() {
        let hash = hex::encode(Sha256::digest("x"));
        for (text, expected) in [
            ("b@d sha256:00 *".to_owned(), "token name"),
            (
                "a sha256:abc *".to_owned(),
                "expected sha256:<64 hex digits>",
            ),
            (format!("a sha256:{hash}"), "no worker patterns"),
            (
                format!("a sha256:{hash} Shop"),
                "invalid worker name pattern",
            ),
            (
                format!("a sha256:{hash} *\na sha256:{hash} *"),
                "appears twice",
            ),
        ] {
            let Err((line, message)) = parse(&text) else {
                panic!("{text:?} parsed");
            };
            assert!(
                line >= 1 && message.contains(expected),
                "{text:?}: {message}"
            );
        }
    }
}
