//! Claimed hook requests, for the in-process stores: each key until its expiry, so that a
//! signed request is applied once. [`Claims`] is the pure part (no I/O, the clock handed in);
//! [`ClaimsFile`] persists it next to the embedded store's data, one fsynced line per claim,
//! so that a restart does not reopen the window.

use std::{
    collections::HashMap,
    fs::{File, OpenOptions},
    io::{self, BufRead, Write},
    path::{Path, PathBuf},
};

/// Keys and when they expire (unix seconds).
#[derive(Debug, Default)]
pub(super) struct Claims {
    until: HashMap<String, i64>,
}

impl Claims {
    /// Claims `key` until `expires`: `false` if it is held and unexpired at `now`.
    pub(super) fn claim(&mut self, key: &str, expires: i64, now: i64) -> bool {
        if self.until.len() >= 1024 && self.until.len().is_power_of_two() {
            self.until.retain(|_, until| *until >= now);
        }
        match self.until.get(key) {
            Some(until) if *until >= now => false,
            _ => {
                self.until.insert(key.to_owned(), expires);
                true
            }
        }
    }

    fn live(&self, now: i64) -> impl Iterator<Item = (&String, &i64)> {
        self.until.iter().filter(move |(_, until)| **until >= now)
    }
}

/// [`Claims`] kept in a file: `<key> <expiry>` per line, appended and fsynced before a claim
/// answers `true`; rewritten with the live claims only when opened.
pub(super) struct ClaimsFile {
    claims: Claims,
    file: File,
}

/// The claims file's name in the data directory.
pub(super) const CLAIMS_FILE: &str = "hook-claims";

impl ClaimsFile {
    /// Opens `dir/hook-claims`, keeping the claims unexpired at `now` (a torn last line is
    /// dropped: its claim never answered).
    pub(super) fn open(dir: &Path, now: i64) -> io::Result<Self> {
        let path: PathBuf = dir.join(CLAIMS_FILE);
        let mut claims = Claims::default();
        match File::open(&path) {
            Ok(file) => {
                for line in io::BufReader::new(file).lines() {
                    let Ok(line) = line else { break };
                    let mut parts = line.split(' ');
                    if let (Some(key), Some(Ok(until)), None) = (
                        parts.next(),
                        parts.next().map(str::parse::<i64>),
                        parts.next(),
                    ) {
                        claims.claim(key, until, now);
                    }
                }
            }
            Err(error) if error.kind() == io::ErrorKind::NotFound => {}
            Err(error) => return Err(error),
        }
        let mut text = String::new();
        for (key, until) in claims.live(now) {
            text.push_str(&format!("{key} {until}\n"));
        }
        let temp = dir.join(format!("{CLAIMS_FILE}.tmp"));
        {
            let mut file = File::create(&temp)?;
            file.write_all(text.as_bytes())?;
            file.sync_all()?;
        }
        std::fs::rename(&temp, &path)?;
        File::open(dir)?.sync_all()?;
        let file = OpenOptions::new().append(true).open(&path)?;
        Ok(Self { claims, file })
    }

    /// Claims `key` until `expires`, durably when it answers `true`.
    pub(super) fn claim(&mut self, key: &str, expires: i64, now: i64) -> io::Result<bool> {
        if !self.claims.claim(key, expires, now) {
            return Ok(false);
        }
        self.file
            .write_all(format!("{key} {expires}\n").as_bytes())?;
        self.file.sync_data()?;
        Ok(true)
    }
}

/// Unix seconds now.
pub(super) fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn a_claim_holds_until_it_expires() {
        let mut claims = Claims::default();
        assert!(claims.claim("a", 100, 10));
        assert!(!claims.claim("a", 100, 99));
        assert!(claims.claim("b", 100, 99));
        assert!(claims.claim("a", 200, 101), "expired: a new claim");
    }

    #[test]
    fn claims_survive_reopening_the_file_until_they_expire() {
        let dir = tempfile::tempdir().unwrap();
        let mut file = ClaimsFile::open(dir.path(), 10).unwrap();
        assert!(file.claim("a", 100, 10).unwrap());
        assert!(file.claim("b", 20, 10).unwrap());
        drop(file);
        let mut file = ClaimsFile::open(dir.path(), 50).unwrap();
        assert!(
            !file.claim("a", 100, 50).unwrap(),
            "replayed after a restart"
        );
        assert!(
            file.claim("b", 90, 50).unwrap(),
            "expired before the restart"
        );
        let text = std::fs::read_to_string(dir.path().join(CLAIMS_FILE)).unwrap();
        assert_eq!(text.lines().count(), 2, "only live claims are kept: {text}");
    }
}
