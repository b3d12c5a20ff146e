//! The `--out` directory as `watch` keeps it: a lock so that one agent writes it, a manifest of
//! the worker and version directories `watch` created (it touches nothing else), and writes
//! that never go through a symlink it did not make and are durable before they are acked.
//!
//! Layout: `<out>/<worker>/<version>/worker.js`, plus `.workerpush.lock`,
//! `.workerpush-manifest.json` and `.workerpush-position.json`. Depends on `core` types only.

use std::{
    collections::{BTreeMap, BTreeSet},
    fs::{self, File, OpenOptions},
    io::{self, Read, Write},
    os::{fd::OwnedFd, unix::fs::OpenOptionsExt},
    path::{Path, PathBuf},
};

use rustix::fs::{AtFlags, Mode, OFlags};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::core::{Version, WorkerName};

/// The lock file: held with an exclusive lock while an agent runs.
pub const LOCK_FILE: &str = ".workerpush.lock";
/// The manifest: which directories this agent made, and for which deployment.
pub const MANIFEST_FILE: &str = ".workerpush-manifest.json";
/// The resume position (written by `watch`, whose format it is).
pub const POSITION_FILE: &str = ".workerpush-position.json";
/// The name of each worker's code file.
pub const CODE_FILE: &str = "worker.js";

/// Why `--out` cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum OutDirError {
    /// Another agent holds the lock.
    #[error("--out {0} is in use by another workerpush watch (its lock {LOCK_FILE} is held)")]
    Locked(PathBuf),
    /// The manifest names another deployment.
    #[error(
        "--out {path} belongs to another deployment ({theirs}; this one is {ours}): give another \
         --out, or remove {MANIFEST_FILE} there to hand the directory over"
    )]
    Foreign {
        /// The directory.
        path: PathBuf,
        /// The deployment in its manifest.
        theirs: String,
        /// This agent's deployment.
        ours: String,
    },
    /// Reading or writing failed.
    #[error("--out {path}: {error}")]
    Io {
        /// What was being accessed.
        path: PathBuf,
        /// The error.
        error: io::Error,
    },
}

/// What the manifest records.
#[derive(Debug, Default, Serialize, Deserialize)]
struct Manifest {
    /// Who writes this directory: see [`OutDir::open`].
    deployment: String,
    /// Worker → version → checksum of every directory this agent created.
    workers: BTreeMap<String, BTreeMap<String, String>>,
}

/// A version written beside the current one, not yet made current.
#[derive(Debug)]
pub struct Staged {
    /// `<out>/<worker>/<version>/worker.js`.
    pub path: PathBuf,
    /// Whether its directory is new (and so is removed again if the change is refused).
    created: bool,
    worker: String,
    version: String,
}

/// The locked `--out` directory.
pub struct OutDir {
    root: PathBuf,
    manifest: Manifest,
    /// Held for the life of the agent; the lock goes with the descriptor.
    _lock: File,
}

impl OutDir {
    /// Creates `path` if needed, locks it, and reads (or starts) its manifest. `deployment`
    /// names who writes here; a manifest naming another is refused.
    pub fn open(path: &Path, deployment: &str) -> Result<Self, OutDirError> {
        let io = |error| OutDirError::Io {
            path: path.to_owned(),
            error,
        };
        fs::create_dir_all(path).map_err(io)?;
        // The operator's `--out` may itself be a symlink: resolved once, here.
        let root = fs::canonicalize(path).map_err(io)?;
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(0o600)
            .custom_flags(no_follow())
            .open(root.join(LOCK_FILE))
            .map_err(io)?;
        match lock.try_lock() {
            Ok(()) => {}
            Err(fs::TryLockError::WouldBlock) => return Err(OutDirError::Locked(root)),
            Err(fs::TryLockError::Error(error)) => return Err(io(error)),
        }
        let manifest = match read_file(&root.join(MANIFEST_FILE)) {
            Ok(bytes) => serde_json::from_slice::<Manifest>(&bytes).map_err(|e| {
                io(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("{MANIFEST_FILE}: {e}"),
                ))
            })?,
            Err(error) if error.kind() == io::ErrorKind::NotFound => Manifest {
                deployment: deployment.to_owned(),
                workers: adopt_legacy(&root),
            },
            Err(error) => return Err(io(error)),
        };
        if manifest.deployment != deployment {
            return Err(OutDirError::Foreign {
                path: root,
                theirs: manifest.deployment,
                ours: deployment.to_owned(),
            });
        }
        let out = Self {
            root,
            manifest,
            _lock: lock,
        };
        out.save().map_err(io)?;
        Ok(out)
    }

    /// The directory (resolved).
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Whether `worker`@`version` with `checksum` is on disk already, as the only version: a
    /// snapshot after a RESET then rewrites nothing.
    pub fn holds(&self, worker: &WorkerName, version: &Version, checksum: &str) -> bool {
        let Some(versions) = self.manifest.workers.get(worker.as_str()) else {
            return false;
        };
        if versions.len() != 1
            || versions.get(version.as_str()).map(String::as_str) != Some(checksum)
        {
            return false;
        }
        read_at(&self.root, &[worker.as_str(), version.as_str()], CODE_FILE)
            .is_ok_and(|code| hex::encode(Sha256::digest(&code)) == checksum)
    }

    /// Writes `code` as `worker`@`version` beside the current version (durably: file and
    /// directories synced), creating only directories that do not exist and recording them
    /// first. Refuses a path held by anything it did not create.
    pub fn stage(
        &mut self,
        worker: &WorkerName,
        version: &Version,
        checksum: &str,
        code: &[u8],
    ) -> Result<Staged, String> {
        let (worker, version) = (worker.as_str(), version.as_str());
        let worker_dir = self.root.join(worker);
        let owned = self.manifest.workers.contains_key(worker);
        if !existing_dir(&worker_dir, owned)? {
            if !owned {
                self.manifest
                    .workers
                    .insert(worker.to_owned(), BTreeMap::new());
                self.save().map_err(|e| e.to_string())?;
            }
            make_dir(&self.root, &[], worker)?;
        }
        let version_dir = worker_dir.join(version);
        let known = self.versions(worker).contains_key(version);
        let exists = existing_dir(&version_dir, known)?;
        if !exists {
            if !known {
                self.versions_mut(worker)
                    .insert(version.to_owned(), checksum.to_owned());
                self.save().map_err(|e| e.to_string())?;
            }
            make_dir(&self.root, &[worker], version)?;
        }
        write_durably(&self.root, &[worker, version], CODE_FILE, code)
            .map_err(|e| format!("{}: {e}", version_dir.join(CODE_FILE).display()))?;
        self.versions_mut(worker)
            .insert(version.to_owned(), checksum.to_owned());
        self.save().map_err(|e| e.to_string())?;
        Ok(Staged {
            path: version_dir.join(CODE_FILE),
            created: !exists,
            worker: worker.to_owned(),
            version: version.to_owned(),
        })
    }

    /// Makes a staged version current: removes the worker's other versions (those it made).
    pub fn commit(&mut self, staged: &Staged) -> Result<(), String> {
        let others: Vec<String> = (self.versions(&staged.worker).keys())
            .filter(|v| **v != staged.version)
            .cloned()
            .collect();
        let worker_dir = self.root.join(&staged.worker);
        for version in others {
            remove_version(&self.root, &staged.worker, &version)?;
            self.versions_mut(&staged.worker).remove(&version);
        }
        sync_dir(&worker_dir).map_err(|e| e.to_string())?;
        self.save().map_err(|e| e.to_string())
    }

    /// Takes a staged version back (its `--exec` refused it): the previous one stays current.
    pub fn discard(&mut self, staged: Staged) -> Result<(), String> {
        if !staged.created {
            return Ok(());
        }
        remove_version(&self.root, &staged.worker, &staged.version)?;
        self.versions_mut(&staged.worker).remove(&staged.version);
        self.save().map_err(|e| e.to_string())
    }

    /// Removes `worker`'s directory if this agent made it; anything else is left alone.
    pub fn remove_worker(&mut self, worker: &WorkerName) -> Result<(), String> {
        if !self.manifest.workers.contains_key(worker.as_str()) {
            return Ok(());
        }
        remove_own_dir(&self.root.join(worker.as_str()))?;
        self.manifest.workers.remove(worker.as_str());
        sync_dir(&self.root).map_err(|e| e.to_string())?;
        self.save().map_err(|e| e.to_string())
    }

    /// Removes every worker it made that `keep` does not name (after a RESET's snapshot).
    pub fn retain(&mut self, keep: &BTreeSet<String>) -> Vec<String> {
        let gone: Vec<String> = (self.manifest.workers.keys())
            .filter(|w| !keep.contains(*w))
            .cloned()
            .collect();
        let mut removed = Vec::new();
        for worker in gone {
            let Ok(name) = WorkerName::parse(&worker) else {
                continue;
            };
            match self.remove_worker(&name) {
                Ok(()) => removed.push(worker),
                Err(error) => tracing::warn!(%worker, %error, "could not remove a worker"),
            }
        }
        removed
    }

    /// `<out>/<worker>/<version>/worker.js`.
    pub fn code_path(&self, worker: &str, version: &str) -> PathBuf {
        self.root.join(worker).join(version).join(CODE_FILE)
    }

    /// Writes `name` in the directory durably (never through a link).
    pub fn write_file(&self, name: &str, contents: &[u8]) -> io::Result<()> {
        write_durably(&self.root, &[], name, contents)
    }

    /// Reads `name` from the directory (never through a link).
    pub fn read(&self, name: &str) -> io::Result<Vec<u8>> {
        read_file(&self.root.join(name))
    }

    fn versions(&self, worker: &str) -> &BTreeMap<String, String> {
        static EMPTY: BTreeMap<String, String> = BTreeMap::new();
        self.manifest.workers.get(worker).unwrap_or(&EMPTY)
    }

    fn versions_mut(&mut self, worker: &str) -> &mut BTreeMap<String, String> {
        self.manifest.workers.entry(worker.to_owned()).or_default()
    }

    fn save(&self) -> io::Result<()> {
        let text = serde_json::to_vec_pretty(&self.manifest).map_err(io::Error::other)?;
        write_durably(&self.root, &[], MANIFEST_FILE, &text)
    }
}

/// The worker directories of a `watch` from before manifests, when `root` holds its position
/// file but no manifest: a directory counts as made by it only if it has exactly that shape
/// (`<worker>/<version>/worker.js`, nothing else but its old `worker.tmp`, no links).
fn adopt_legacy(root: &Path) -> BTreeMap<String, BTreeMap<String, String>> {
    let mut adopted = BTreeMap::new();
    let is_file = |path: &Path| fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_file());
    let is_dir = |path: &Path| fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_dir());
    if !is_file(&root.join(POSITION_FILE)) {
        return adopted;
    }
    let Ok(entries) = fs::read_dir(root) else {
        return adopted;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let dir = entry.path();
        if WorkerName::parse(&name).is_err() || !is_dir(&dir) {
            continue;
        }
        let versions = (|| {
            let mut versions = BTreeMap::new();
            for version in fs::read_dir(&dir).ok()? {
                let version = version.ok()?;
                let label = version.file_name().to_string_lossy().into_owned();
                let path = version.path();
                Version::parse(&label).ok().filter(|_| is_dir(&path))?;
                for file in fs::read_dir(&path).ok()? {
                    let file = file.ok()?.file_name();
                    let known = file == CODE_FILE || file == "worker.tmp";
                    known
                        .then_some(())
                        .filter(|()| is_file(&path.join(&file)))?;
                }
                let code = read_file(&path.join(CODE_FILE)).ok()?;
                versions.insert(label, hex::encode(Sha256::digest(&code)));
            }
            (!versions.is_empty()).then_some(versions)
        })();
        if let Some(versions) = versions {
            tracing::info!(worker = %name, "adopted from an earlier watch");
            adopted.insert(name, versions);
        }
    }
    adopted
}

/// `O_NOFOLLOW`: opening a symlink fails instead of following it.
fn no_follow() -> i32 {
    // The flag's bits fit an `open` flag argument by definition.
    i32::try_from(rustix::fs::OFlags::NOFOLLOW.bits()).unwrap_or(0)
}

/// Reads a regular file, refusing a symlink in its place.
fn read_file(path: &Path) -> io::Result<Vec<u8>> {
    let mut file = OpenOptions::new()
        .read(true)
        .custom_flags(no_follow())
        .open(path)?;
    let mut bytes = Vec::new();
    file.read_to_end(&mut bytes)?;
    Ok(bytes)
}

/// Whether the directory at `path` is there (`owned`: this agent made it, and it is still a
/// real directory, not a link to one) or not (nothing at all there, not even a dangling link).
/// Anything else there is refused.
fn existing_dir(path: &Path, owned: bool) -> Result<bool, String> {
    match fs::symlink_metadata(path) {
        Err(error) if error.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(error) => Err(format!("{}: {error}", path.display())),
        Ok(meta) if owned && meta.file_type().is_dir() => Ok(true),
        Ok(_) if owned => Err(format!(
            "{} was replaced by something workerpush watch did not make: left alone",
            path.display()
        )),
        Ok(_) => Err(format!(
            "{} exists and was not made by workerpush watch: left alone",
            path.display()
        )),
    }
}

/// Opens `root`, then each of `components` beneath it, as directories, refusing a link at
/// every step (`O_NOFOLLOW`): what is written or removed through the result is inside what
/// this agent made, even if a path was swapped for a link since it was checked.
fn open_dir(root: &Path, components: &[&str]) -> io::Result<OwnedFd> {
    let flags = OFlags::DIRECTORY | OFlags::RDONLY | OFlags::CLOEXEC;
    let mut dir = rustix::fs::open(root, flags, Mode::empty())?;
    for component in components {
        dir = rustix::fs::openat(&dir, *component, flags | OFlags::NOFOLLOW, Mode::empty())?;
    }
    Ok(dir)
}

/// Creates `name` in `root/components…` (failing if anything appeared there) and syncs the
/// parent.
fn make_dir(root: &Path, components: &[&str], name: &str) -> Result<(), String> {
    let described = |e: io::Error| {
        format!(
            "{}: {e}",
            root.join(components.join("/")).join(name).display()
        )
    };
    let parent = open_dir(root, components).map_err(described)?;
    rustix::fs::mkdirat(&parent, name, Mode::from_raw_mode(0o755))
        .map_err(|e| described(e.into()))?;
    rustix::fs::fsync(&parent).map_err(|e| described(e.into()))
}

/// Reads `root/components…/name`, never through a link.
fn read_at(root: &Path, components: &[&str], name: &str) -> io::Result<Vec<u8>> {
    let dir = open_dir(root, components)?;
    let fd = rustix::fs::openat(
        &dir,
        name,
        OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    )?;
    let mut bytes = Vec::new();
    File::from(fd).read_to_end(&mut bytes)?;
    Ok(bytes)
}

/// Removes the version directory `root/worker/version` this agent made: its files, then
/// itself. A directory inside it is not its own: left alone, and an error.
fn remove_version(root: &Path, worker: &str, version: &str) -> Result<(), String> {
    let path = root.join(worker).join(version);
    let described = |e: io::Error| format!("{}: {e}", path.display());
    let worker_dir = open_dir(root, &[worker]).map_err(described)?;
    let flags = OFlags::DIRECTORY | OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC;
    let dir = match rustix::fs::openat(&worker_dir, version, flags, Mode::empty()) {
        Err(rustix::io::Errno::NOENT) => return Ok(()),
        Err(error) => return Err(described(error.into())),
        Ok(dir) => dir,
    };
    for entry in rustix::fs::Dir::read_from(&dir).map_err(|e| described(e.into()))? {
        let entry = entry.map_err(|e| described(e.into()))?;
        let name = entry.file_name();
        if name == c"." || name == c".." {
            continue;
        }
        if entry.file_type() == rustix::fs::FileType::Directory {
            return Err(format!(
                "{} holds a directory workerpush watch did not make: left alone",
                path.display()
            ));
        }
        rustix::fs::unlinkat(&dir, name, AtFlags::empty()).map_err(|e| described(e.into()))?;
    }
    rustix::fs::unlinkat(&worker_dir, version, AtFlags::REMOVEDIR)
        .map_err(|e| described(e.into()))?;
    rustix::fs::fsync(&worker_dir).map_err(|e| described(e.into()))
}

/// Removes a directory this agent made, if it is still a real directory (`remove_dir_all`
/// does not follow links inside it).
fn remove_own_dir(path: &Path) -> Result<(), String> {
    match fs::symlink_metadata(path) {
        Err(error) if error.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(error) => Err(format!("{}: {error}", path.display())),
        Ok(meta) if meta.file_type().is_dir() => {
            fs::remove_dir_all(path).map_err(|e| format!("{}: {e}", path.display()))
        }
        Ok(_) => Err(format!(
            "{} was replaced by something workerpush watch did not make: left alone",
            path.display()
        )),
    }
}

/// Writes `root/components…/name` as a new file with a unique name created exclusively (a
/// link planted at any name is never followed), synced, renamed into place, and the directory
/// synced.
fn write_durably(root: &Path, components: &[&str], name: &str, contents: &[u8]) -> io::Result<()> {
    let dir = open_dir(root, components)?;
    let tmp = format!(".{name}.{:016x}.tmp", rand::random::<u64>());
    let flags = OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC;
    let fd = rustix::fs::openat(&dir, tmp.as_str(), flags, Mode::from_raw_mode(0o644))?;
    let mut file = File::from(fd);
    let result = (|| -> io::Result<()> {
        file.write_all(contents)?;
        file.sync_all()?;
        rustix::fs::renameat(&dir, tmp.as_str(), &dir, name)?;
        rustix::fs::fsync(&dir)?;
        Ok(())
    })();
    if result.is_err() {
        let _ = rustix::fs::unlinkat(&dir, tmp.as_str(), AtFlags::empty());
    }
    result
}

fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn names(worker: &str, version: &str) -> (WorkerName, Version) {
        (
            WorkerName::parse(worker).unwrap(),
            Version::parse(version).unwrap(),
        )
    }

    #[test]
    fn a_second_agent_and_another_deployment_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let first = OutDir::open(dir.path(), "a").unwrap();
        assert!(matches!(
            OutDir::open(dir.path(), "a"),
            Err(OutDirError::Locked(_))
        ));
        drop(first);
        assert!(matches!(
            OutDir::open(dir.path(), "b"),
            Err(OutDirError::Foreign { .. })
        ));
        OutDir::open(dir.path(), "a").unwrap();
    }

    #[test]
    fn only_what_it_made_is_written_or_removed() {
        let dir = tempfile::tempdir().unwrap();
        fs::create_dir(dir.path().join("src")).unwrap();
        let mut out = OutDir::open(dir.path(), "a").unwrap();
        let (src, v1) = names("src", "1");
        assert!(out.stage(&src, &v1, "00", b"x").is_err(), "not ours");
        let (app, _) = names("app", "1");
        let staged = out.stage(&app, &v1, "00", b"one").unwrap();
        out.commit(&staged).unwrap();
        out.retain(&BTreeSet::new());
        assert!(dir.path().join("src").is_dir());
        assert!(!dir.path().join("app").exists());
    }

    #[test]
    fn an_earlier_watchs_directories_are_adopted_only_in_their_exact_shape() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join(POSITION_FILE), "{}").unwrap();
        fs::create_dir_all(dir.path().join("app/1")).unwrap();
        fs::write(dir.path().join("app/1/worker.js"), "one").unwrap();
        fs::create_dir_all(dir.path().join("src/lib")).unwrap();
        fs::write(dir.path().join("src/lib/worker.js"), "x").unwrap();
        fs::write(dir.path().join("src/lib/mod.rs"), "x").unwrap();
        fs::create_dir_all(dir.path().join("docs")).unwrap();
        let mut out = OutDir::open(dir.path(), "a").unwrap();
        out.retain(&BTreeSet::new());
        assert!(!dir.path().join("app").exists(), "adopted, so removed");
        assert!(dir.path().join("src/lib/mod.rs").exists() && dir.path().join("docs").exists());
    }

    /// The last line of defence, below the path checks: a directory swapped for a link after
    /// it was checked is still not written through or emptied.
    #[test]
    fn writes_and_removals_refuse_a_link_at_any_step() {
        let dir = tempfile::tempdir().unwrap();
        let (root, elsewhere) = (dir.path().join("out"), dir.path().join("elsewhere"));
        fs::create_dir_all(elsewhere.join("1")).unwrap();
        fs::write(elsewhere.join("1/worker.js"), "theirs").unwrap();
        fs::create_dir_all(&root).unwrap();
        std::os::unix::fs::symlink(&elsewhere, root.join("app")).unwrap();
        assert!(write_durably(&root, &["app", "1"], CODE_FILE, b"ours").is_err());
        assert!(make_dir(&root, &["app"], "2").is_err());
        assert!(remove_version(&root, "app", "1").is_err());
        assert!(read_at(&root, &["app", "1"], CODE_FILE).is_err());
        assert_eq!(fs::read(elsewhere.join("1/worker.js")).unwrap(), b"theirs");
        assert_eq!(fs::read_dir(&elsewhere).unwrap().count(), 1);
    }

    #[test]
    fn a_refused_version_leaves_the_previous_one_current() {
        let dir = tempfile::tempdir().unwrap();
        let mut out = OutDir::open(dir.path(), "a").unwrap();
        let (app, v1) = names("app", "1");
        let (_, v2) = names("app", "2");
        let one = out.stage(&app, &v1, "c1", b"one").unwrap();
        out.commit(&one).unwrap();
        let two = out.stage(&app, &v2, "c2", b"two").unwrap();
        out.discard(two).unwrap();
        assert_eq!(fs::read(out.code_path("app", "1")).unwrap(), b"one");
        assert!(!dir.path().join("app/2").exists());
        let checksum = hex::encode(Sha256::digest(b"one"));
        assert!(!out.holds(&app, &v1, &checksum), "manifest says c1");
    }
}
