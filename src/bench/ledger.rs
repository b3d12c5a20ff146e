//! The shared record of one run: which versions belong to it, when each change's hook request
//! left the publisher, and per change the slowest delivery so far.
//!
//! Thousands of subscriber tasks write to it at once, so it is a fixed table of atomics: no
//! locks, nothing per subscriber. Times are unix nanoseconds from [`SystemTime`], a clock that
//! every process on a machine shares, so publisher and subscriber need not be one process.

use std::{
    sync::atomic::{AtomicU64, Ordering},
    time::{SystemTime, UNIX_EPOCH},
};

use crate::pb::WorkerUpdate;

/// Worker names are `bench-<k>`.
pub const WORKER_PREFIX: &str = "bench-";

/// Now, in unix nanoseconds.
pub fn unix_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

/// See the module docs.
#[derive(Debug)]
pub struct Ledger {
    /// `b<run>-`: every version of this run starts with it, so changes of earlier runs (or of
    /// anyone else) are never counted.
    version_prefix: String,
    workers: usize,
    sent_ns: Box<[AtomicU64]>,
    slowest_ns: Box<[AtomicU64]>,
    last_delivery_ns: AtomicU64,
}

impl Ledger {
    /// A ledger for `changes` changes rotating over `workers` workers, with a fresh run id.
    pub fn new(changes: usize, workers: usize) -> Self {
        Self::with_run(&format!("{:08x}", rand::random::<u32>()), changes, workers)
    }

    fn with_run(run: &str, changes: usize, workers: usize) -> Self {
        let table = || (0..changes).map(|_| AtomicU64::new(0)).collect();
        Self {
            version_prefix: format!("b{run}-"),
            workers: workers.max(1),
            sent_ns: table(),
            slowest_ns: table(),
            last_delivery_ns: AtomicU64::new(0),
        }
    }

    /// How many changes the run publishes.
    pub fn changes(&self) -> usize {
        self.sent_ns.len()
    }

    /// The worker of change `index`.
    pub fn worker(&self, index: usize) -> String {
        format!("{WORKER_PREFIX}{}", index % self.workers)
    }

    /// Every worker of the run: what subscribers ask for.
    pub fn workers(&self) -> Vec<String> {
        (0..self.workers.min(self.changes().max(1)))
            .map(|k| self.worker(k))
            .collect()
    }

    /// The version of change `index`.
    pub fn version(&self, index: usize) -> String {
        format!("{}{index}", self.version_prefix)
    }

    /// A version of the run that is none of its changes.
    pub fn seed_version(&self) -> String {
        format!("{}seed", self.version_prefix)
    }

    /// The change an update carries, if it is one of this run's.
    pub fn index_of(&self, update: &WorkerUpdate) -> Option<usize> {
        let index: usize = update
            .version
            .strip_prefix(&self.version_prefix)?
            .parse()
            .ok()?;
        (index < self.changes() && update.worker_name == self.worker(index)).then_some(index)
    }

    /// Change `index` is leaving the publisher now.
    pub fn mark_sent(&self, index: usize) {
        if let Some(sent) = self.sent_ns.get(index) {
            sent.store(unix_ns(), Ordering::Release);
        }
    }

    /// Change `index` arrived at a subscriber at `arrived_ns`: answers its latency in
    /// nanoseconds (`None` if it was never marked sent, which would be a bench bug).
    pub fn record(&self, index: usize, arrived_ns: u64) -> Option<u64> {
        let sent = self.sent_ns.get(index)?.load(Ordering::Acquire);
        if sent == 0 {
            return None;
        }
        let latency = arrived_ns.saturating_sub(sent);
        self.slowest_ns[index].fetch_max(latency, Ordering::Relaxed);
        self.last_delivery_ns
            .fetch_max(arrived_ns, Ordering::Relaxed);
        Some(latency)
    }

    /// Per change, the time until the last subscriber held it (ns); changes nobody received
    /// are left out.
    pub fn slowest_per_change(&self) -> Vec<u64> {
        self.slowest_ns
            .iter()
            .map(|s| s.load(Ordering::Relaxed))
            .filter(|&ns| ns > 0)
            .collect()
    }

    /// When the last delivery so far arrived (unix ns; 0 if none).
    pub fn last_delivery_ns(&self) -> u64 {
        self.last_delivery_ns.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn put(worker: &str, version: &str) -> WorkerUpdate {
        WorkerUpdate {
            worker_name: worker.to_owned(),
            version: version.to_owned(),
            ..WorkerUpdate::default()
        }
    }

    #[test]
    fn only_this_runs_versions_of_the_right_worker_are_counted() {
        let ledger = Ledger::with_run("cafe0001", 20, 4);
        assert_eq!(ledger.version(7), "bcafe0001-7");
        assert_eq!(ledger.worker(7), "bench-3");
        assert_eq!(ledger.index_of(&put("bench-3", "bcafe0001-7")), Some(7));
        // Another run, a version past the run, the wrong worker, a user's version.
        assert_eq!(ledger.index_of(&put("bench-3", "bcafe0002-7")), None);
        assert_eq!(ledger.index_of(&put("bench-0", "bcafe0001-20")), None);
        assert_eq!(ledger.index_of(&put("bench-2", "bcafe0001-7")), None);
        assert_eq!(ledger.index_of(&put("bench-3", "1.0.0")), None);
        assert_eq!(
            ledger.index_of(&put("bench-0", &ledger.seed_version())),
            None
        );
        assert_eq!(
            ledger.workers(),
            ["bench-0", "bench-1", "bench-2", "bench-3"]
        );
        assert_eq!(Ledger::with_run("x", 2, 16).workers().len(), 2);
    }

    #[test]
    fn latency_is_arrival_minus_send_and_the_slowest_is_kept() {
        let ledger = Ledger::with_run("r", 3, 1);
        assert_eq!(ledger.record(0, unix_ns()), None, "never sent");
        ledger.mark_sent(0);
        let sent = ledger.sent_ns[0].load(Ordering::Relaxed);
        assert_eq!(ledger.record(0, sent + 1_000), Some(1_000));
        assert_eq!(ledger.record(0, sent + 5_000), Some(5_000));
        assert_eq!(ledger.record(0, sent + 2_000), Some(2_000));
        // A clock stepping back is a zero latency, not an underflow.
        assert_eq!(ledger.record(0, sent - 10), Some(0));
        assert_eq!(ledger.slowest_per_change(), [5_000]);
        assert_eq!(ledger.last_delivery_ns(), sent + 5_000);
        assert_eq!(ledger.record(3, sent), None, "out of range");
    }
}
