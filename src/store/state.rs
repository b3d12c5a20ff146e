//! The pure state machine of the in-process stores: decides each proposal by the immutability
//! rules and keeps the latest versions and the retained log. No I/O, no clock.

use std::collections::{BTreeMap, HashMap, VecDeque};

use super::{Change, ChangeKind, Outcome, Proposal, Recovered, Tail};
use crate::core::types::{Checksum, Epoch, Revision, Version, WorkerName};

/// Decides proposals and applies committed changes, in memory.
#[derive(Clone, Debug)]
pub struct StateMachine {
    epoch: Epoch,
    head: Revision,
    latest: BTreeMap<WorkerName, Change>,
    versions: HashMap<(WorkerName, Version), Checksum>,
    tail: VecDeque<Change>,
    retain: usize,
}

impl StateMachine {
    /// An empty history in `epoch`, retaining the last `retain` changes (at least 1).
    pub fn new(epoch: Epoch, retain: usize) -> Self {
        Self {
            epoch,
            head: 0,
            latest: BTreeMap::new(),
            versions: HashMap::new(),
            tail: VecDeque::new(),
            retain: retain.max(1),
        }
    }

    /// The epoch.
    pub fn epoch(&self) -> &Epoch {
        &self.epoch
    }

    /// The revision of the last committed change.
    pub fn head(&self) -> Revision {
        self.head
    }

    /// Every (worker, version) ever published, with its checksum: versions stay immutable
    /// after a delete, so persistent stores must keep this too.
    pub fn versions(&self) -> impl Iterator<Item = (&WorkerName, &Version, &Checksum)> {
        self.versions.iter().map(|((w, v), c)| (w, v, c))
    }

    /// Decides `proposal` against the current state, without changing it. A committed
    /// outcome carries revision `head + 1`.
    pub fn decide(&self, proposal: &Proposal, timestamp_ms: i64) -> Outcome {
        match proposal {
            Proposal::Put {
                worker,
                version,
                checksum,
                size,
                deployer,
            } => {
                if let Some(existing) = self.versions.get(&(worker.clone(), version.clone()))
                    && existing != checksum
                {
                    return Outcome::Conflict {
                        existing: existing.clone(),
                    };
                }
                if let Some(latest) = self.latest.get(worker)
                    && &latest.version == version
                {
                    return Outcome::Unchanged(latest.clone());
                }
                Outcome::Committed(Change {
                    revision: self.head + 1,
                    kind: ChangeKind::Put,
                    worker: worker.clone(),
                    version: version.clone(),
                    checksum: checksum.clone(),
                    size: *size,
                    timestamp_ms,
                    deployer: deployer.clone(),
                })
            }
            Proposal::Delete { worker, deployer } => match self.latest.get(worker) {
                None => Outcome::NotFound,
                Some(latest) => Outcome::Committed(Change {
                    revision: self.head + 1,
                    kind: ChangeKind::Delete,
                    worker: worker.clone(),
                    version: latest.version.clone(),
                    checksum: latest.checksum.clone(),
                    size: latest.size,
                    timestamp_ms,
                    deployer: deployer.clone(),
                }),
            },
        }
    }

    /// Applies a committed change. Its revision must be `head + 1`; recovery replays the
    /// log through here too.
    pub fn commit(&mut self, change: Change) -> Result<(), String> {
        if change.revision != self.head + 1 {
            return Err(format!(
                "change {} does not follow head {}",
                change.revision, self.head
            ));
        }
        self.head = change.revision;
        match change.kind {
            ChangeKind::Put => {
                self.versions.insert(
                    (change.worker.clone(), change.version.clone()),
                    change.checksum.clone(),
                );
                self.latest.insert(change.worker.clone(), change.clone());
            }
            ChangeKind::Delete => {
                self.latest.remove(&change.worker);
            }
        }
        self.tail.push_back(change);
        while self.tail.len() > self.retain {
            self.tail.pop_front();
        }
        Ok(())
    }

    /// Restores a state saved earlier (snapshot of a persistent store).
    pub fn restore(
        epoch: Epoch,
        retain: usize,
        head: Revision,
        latest: Vec<Change>,
        versions: Vec<(WorkerName, Version, Checksum)>,
        tail: Vec<Change>,
    ) -> Self {
        let mut machine = Self::new(epoch, retain);
        machine.head = head;
        machine.latest = latest.into_iter().map(|c| (c.worker.clone(), c)).collect();
        machine.versions = versions.into_iter().map(|(w, v, c)| ((w, v), c)).collect();
        machine.tail = tail.into_iter().collect();
        while machine.tail.len() > machine.retain {
            machine.tail.pop_front();
        }
        machine
    }

    /// Up to `limit` changes after `after`.
    pub fn changes_after(&self, after: Revision, limit: usize) -> Tail {
        self.changes_after_until(after, limit, self.head)
    }

    /// Like [`Self::changes_after`], but nothing past `until` (a durability watermark).
    pub fn changes_after_until(&self, after: Revision, limit: usize, until: Revision) -> Tail {
        let epoch = self.epoch.clone();
        let until = until.min(self.head);
        if after > until {
            return Tail::Gone { epoch };
        }
        if after == until {
            return Tail::Changes {
                epoch,
                changes: Vec::new(),
            };
        }
        let first = self.tail.front().map_or(self.head + 1, |c| c.revision);
        if after + 1 < first {
            return Tail::Gone { epoch };
        }
        let start = usize::try_from(after + 1 - first).unwrap_or(usize::MAX);
        let count = usize::try_from(until - after)
            .unwrap_or(usize::MAX)
            .min(limit);
        Tail::Changes {
            epoch,
            changes: self.tail.iter().skip(start).take(count).cloned().collect(),
        }
    }

    /// The whole state, as [`super::Store::load`] returns it.
    pub fn recovered(&self) -> Recovered {
        let mut latest: Vec<Change> = self.latest.values().cloned().collect();
        latest.sort_by_key(|c| c.revision);
        Recovered {
            epoch: self.epoch.clone(),
            head: self.head,
            latest,
            tail: self.tail.iter().cloned().collect(),
        }
    }

    /// How many changes the retained log holds.
    pub fn tail_len(&self) -> usize {
        self.tail.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn put(worker: &str, version: &str, code: &str) -> Proposal {
        Proposal::Put {
            worker: WorkerName::parse(worker).unwrap(),
            version: Version::parse(version).unwrap(),
            checksum: Checksum::of(code.as_bytes()),
            size: code.len() as u64,
            deployer: "".into(),
        }
    }

    fn apply(m: &mut StateMachine, p: &Proposal) -> Outcome {
        let outcome = m.decide(p, 1);
        if let Outcome::Committed(change) = &outcome {
            m.commit(change.clone()).unwrap();
        }
        outcome
    }

    #[test]
    fn versions_are_immutable_across_deletes() {
        let mut m = StateMachine::new(Epoch::generate(), 100);
        assert!(
            matches!(apply(&mut m, &put("a", "1", "x")), Outcome::Committed(c) if c.revision == 1)
        );
        assert!(
            matches!(apply(&mut m, &put("a", "1", "x")), Outcome::Unchanged(c) if c.revision == 1)
        );
        assert!(matches!(
            apply(&mut m, &put("a", "1", "y")),
            Outcome::Conflict { .. }
        ));
        let delete = Proposal::Delete {
            worker: WorkerName::parse("a").unwrap(),
            deployer: "".into(),
        };
        assert!(
            matches!(apply(&mut m, &delete), Outcome::Committed(c) if c.revision == 2 && c.version.as_str() == "1")
        );
        assert_eq!(apply(&mut m, &delete), Outcome::NotFound);
        assert!(matches!(
            apply(&mut m, &put("a", "1", "y")),
            Outcome::Conflict { .. }
        ));
        assert!(
            matches!(apply(&mut m, &put("a", "1", "x")), Outcome::Committed(c) if c.revision == 3)
        );
        assert_eq!(m.recovered().latest.len(), 1);
    }

    #[test]
    fn changes_after_respects_retention_and_watermark() {
        let mut m = StateMachine::new(Epoch::generate(), 3);
        for i in 0..5 {
            apply(&mut m, &put("a", &i.to_string(), &i.to_string()));
        }
        assert!(matches!(m.changes_after(0, 10), Tail::Gone { .. }));
        assert!(matches!(m.changes_after(1, 10), Tail::Gone { .. }));
        let Tail::Changes { changes, .. } = m.changes_after(2, 10) else {
            panic!("retained")
        };
        assert_eq!(
            changes.iter().map(|c| c.revision).collect::<Vec<_>>(),
            [3, 4, 5]
        );
        let Tail::Changes { changes, .. } = m.changes_after_until(2, 10, 4) else {
            panic!("retained")
        };
        assert_eq!(
            changes.iter().map(|c| c.revision).collect::<Vec<_>>(),
            [3, 4]
        );
        assert!(
            matches!(m.changes_after(5, 10), Tail::Changes { changes, .. } if changes.is_empty())
        );
        assert!(matches!(m.changes_after(6, 10), Tail::Gone { .. }));
    }
}
