//! The checker: pure functions from what happened (every change the hook accepted, every
//! event every consumer saw, the core's final listing) to figures and violations. No I/O, no
//! clock, so its own tests feed it hand-made histories, broken ones included.
//!
//! The promises checked, per consumer:
//! - ordered: within a stream, PUT/DELETE revisions strictly increase after RESET, a snapshot
//!   is in ascending revision, and SYNCED is never lower than what came before it;
//! - unique: no revision applied twice between two RESETs (a snapshot may re-send what was
//!   applied before its RESET: that is the point of a snapshot);
//! - reliable and resumable: between the position held (the last change applied or SYNCED)
//!   and the next change or SYNCED, across reconnects, no change of the durable history that
//!   passes the consumer's filter is missing; a snapshot is exactly the history's state at its
//!   SYNCED revision, filtered;
//! - convergent: the final state equals the core's listing, filtered;
//! - durable acks: every change the hook answered 2xx for is in the final history, with its
//!   revision and content, in the same epoch; no revision ever names two different changes.
//!
//! The durable history is rebuilt from every source at once (the hook's answers and every
//! consumer's updates, snapshots included): two sources that disagree about a revision are a
//! violation, and a revision no source knows is a gap that makes the run unprovable, so a
//! violation too.

use std::collections::{BTreeMap, BTreeSet, HashSet};

use super::record::Event;

/// Put or delete.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// A version became the worker's latest.
    Put,
    /// The worker was removed.
    Delete,
}

/// One change of the history, as far as the promises care.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Change {
    /// Put or delete.
    pub kind: Kind,
    /// The worker.
    pub worker: String,
    /// The version put, or removed.
    pub version: String,
    /// The checksum put (empty for a delete: not compared).
    pub checksum: String,
}

/// A change the hook answered 2xx for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Accepted {
    /// Its epoch.
    pub epoch: String,
    /// Its revision.
    pub revision: u64,
    /// The change.
    pub change: Change,
}

/// The core's `ListWorkers` answer.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Listing {
    /// The epoch.
    pub epoch: String,
    /// The head revision.
    pub head: u64,
    /// The latest version of every live worker: worker → (version, checksum).
    pub workers: BTreeMap<String, (String, String)>,
    /// The revision of each live worker's latest version.
    pub revisions: BTreeMap<String, u64>,
}

/// Which workers a consumer asked for (`None`: all).
pub type Filter = Option<BTreeSet<String>>;

/// Whether `worker` passes `filter`.
pub fn passes(filter: &Filter, worker: &str) -> bool {
    filter.as_ref().is_none_or(|names| names.contains(worker))
}

/// What the checker counted. Every field but the first five and `epochs` must be 0.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Figures {
    /// Consumers checked.
    pub consumers: usize,
    /// Events recorded over all consumers.
    pub events: u64,
    /// PUT/DELETE applied over all consumers, snapshots included.
    pub applied: u64,
    /// Connections (streams) over all consumers.
    pub streams: u64,
    /// Of which over QUIC.
    pub quic_streams: u64,
    /// RESETs after each consumer's first.
    pub resets: u64,
    /// Epochs seen (1 unless history was lost).
    pub epochs: usize,
    /// (consumer, worker) pairs whose final state is not the core's.
    pub lost_final_states: u64,
    /// Revisions out of order in a stream, snapshot or across a resume.
    pub order_violations: u64,
    /// Revisions applied twice between two RESETs.
    pub duplicates: u64,
    /// Changes of the history that passed a consumer's filter and were never applied.
    pub skipped: u64,
    /// Applied changes that differ from the history, or fall outside the filter.
    pub wrong_content: u64,
    /// Snapshots that are not the history's state at their SYNCED revision.
    pub snapshot_mismatches: u64,
    /// Revisions two sources describe differently (a revision reused).
    pub revision_conflicts: u64,
    /// Revisions of the history that no source knows (the run cannot be proven).
    pub history_gaps: u64,
    /// Changes answered 2xx by the hook that are not in the final history as answered.
    pub acked_lost: u64,
    /// The history replayed does not give the core's final listing.
    pub history_mismatches: u64,
    /// Other protocol breaches (a change before any position, an epoch changing without
    /// RESET, SYNCED flags that disagree with the stream).
    pub protocol_violations: u64,
}

impl Figures {
    /// The sum of every violation counter.
    pub fn violations(&self) -> u64 {
        self.lost_final_states
            + self.order_violations
            + self.duplicates
            + self.skipped
            + self.wrong_content
            + self.snapshot_mismatches
            + self.revision_conflicts
            + self.history_gaps
            + self.acked_lost
            + self.history_mismatches
            + self.protocol_violations
    }
}

impl std::fmt::Display for Figures {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "lost_final_states={} order_violations={} duplicates={} skipped={} \
             wrong_content={} snapshot_mismatches={} revision_conflicts={} history_gaps={} \
             acked_lost={} history_mismatches={} protocol_violations={} | consumers={} \
             events={} applied={} streams={} (quic {}) resets={} epochs={}",
            self.lost_final_states,
            self.order_violations,
            self.duplicates,
            self.skipped,
            self.wrong_content,
            self.snapshot_mismatches,
            self.revision_conflicts,
            self.history_gaps,
            self.acked_lost,
            self.history_mismatches,
            self.protocol_violations,
            self.consumers,
            self.events,
            self.applied,
            self.streams,
            self.quic_streams,
            self.resets,
            self.epochs,
        )
    }
}

/// Figures and the first violations described.
#[derive(Clone, Debug, Default)]
pub struct Findings {
    /// The counts.
    pub figures: Figures,
    /// Up to [`Findings::MAX_DETAILS`] violations, described.
    pub details: Vec<String>,
}

impl Findings {
    /// How many violations are described; the rest are only counted.
    pub const MAX_DETAILS: usize = 40;

    /// Describes a violation (already counted).
    pub fn note(&mut self, detail: String) {
        if self.details.len() < Self::MAX_DETAILS {
            self.details.push(detail);
        }
    }
}

/// The durable history, rebuilt from every source; see the module docs.
#[derive(Clone, Debug, Default)]
pub struct History {
    epochs: BTreeMap<String, BTreeMap<u64, (Change, String)>>,
}

impl History {
    /// Adds what `source` says revision `revision` of `epoch` is. Returns the other source's
    /// name and description if it disagrees.
    pub fn add(
        &mut self,
        epoch: &str,
        revision: u64,
        change: Change,
        source: &str,
    ) -> Result<(), (String, Change)> {
        let known = self.epochs.entry(epoch.to_owned()).or_default();
        match known.get(&revision) {
            None => {
                known.insert(revision, (change, source.to_owned()));
                Ok(())
            }
            Some((existing, _)) if same(existing, &change) => Ok(()),
            Some((existing, by)) => Err((by.clone(), existing.clone())),
        }
    }

    /// Revision `revision` of `epoch`, if known.
    pub fn get(&self, epoch: &str, revision: u64) -> Option<&Change> {
        self.epochs.get(epoch)?.get(&revision).map(|(c, _)| c)
    }

    /// The epochs known.
    pub fn epochs(&self) -> impl Iterator<Item = &str> {
        self.epochs.keys().map(String::as_str)
    }

    /// Known changes of `epoch` with revisions in `from..to`.
    fn range(&self, epoch: &str, from: u64, to: u64) -> impl Iterator<Item = (u64, &Change)> {
        self.epochs
            .get(epoch)
            .into_iter()
            .flat_map(move |known| known.range(from..to.max(from)))
            .map(|(revision, (change, _))| (*revision, change))
    }

    /// Revisions `1..=head` of `epoch` no source knows.
    pub fn missing(&self, epoch: &str, head: u64) -> Vec<u64> {
        let known = self.epochs.get(epoch);
        (1..=head)
            .filter(|r| known.is_none_or(|k| !k.contains_key(r)))
            .collect()
    }

    /// The state after revisions `1..=head` of `epoch`: worker → (version, checksum, revision);
    /// `Err` with the first unknown revision.
    pub fn state_at(
        &self,
        epoch: &str,
        head: u64,
    ) -> Result<BTreeMap<String, (String, String, u64)>, u64> {
        let mut state = BTreeMap::new();
        let mut expected = 1;
        for (revision, change) in self.range(epoch, 1, head + 1) {
            if revision != expected {
                return Err(expected);
            }
            expected += 1;
            match change.kind {
                Kind::Put => {
                    state.insert(
                        change.worker.clone(),
                        (change.version.clone(), change.checksum.clone(), revision),
                    );
                }
                Kind::Delete => {
                    state.remove(&change.worker);
                }
            }
        }
        if expected <= head {
            return Err(expected);
        }
        Ok(state)
    }
}

/// Whether two descriptions of a revision agree (a delete's checksum is not compared).
fn same(a: &Change, b: &Change) -> bool {
    a.kind == b.kind
        && a.worker == b.worker
        && a.version == b.version
        && (a.kind == Kind::Delete || a.checksum == b.checksum)
}

/// One consumer's record: its name, filter, events and final state.
#[derive(Clone, Debug)]
pub struct ConsumerRecord<'a> {
    /// Its name in reports.
    pub name: &'a str,
    /// Which workers it asked for.
    pub filter: &'a Filter,
    /// What it saw, in order.
    pub events: &'a [Event],
    /// What it holds at the end: worker → (version, checksum).
    pub state: &'a BTreeMap<String, (String, String)>,
}

/// Checks a whole run; see the module docs.
pub fn check_run(
    accepted: &[Accepted],
    consumers: &[ConsumerRecord<'_>],
    listing: &Listing,
) -> Findings {
    check(accepted, consumers, listing, false)
}

/// [`check_run`] for a run whose store lost its history on purpose (a Redis flushed, failed
/// over): new epochs are expected, each one starting from the state the cores held, so a
/// change acknowledged in an earlier epoch is kept when its worker's final state is what the
/// last acknowledged change of that worker made it. Every other promise holds per epoch.
pub fn check_run_losing_history(
    accepted: &[Accepted],
    consumers: &[ConsumerRecord<'_>],
    listing: &Listing,
) -> Findings {
    check(accepted, consumers, listing, true)
}

fn check(
    accepted: &[Accepted],
    consumers: &[ConsumerRecord<'_>],
    listing: &Listing,
    losing_history: bool,
) -> Findings {
    let mut out = Findings::default();
    let history = rebuild(accepted, consumers, &mut out);
    check_history(&history, accepted, listing, losing_history, &mut out);
    for consumer in consumers {
        check_consumer(consumer, &history, &mut out);
        check_final_state(consumer, listing, &mut out);
    }
    out.figures.consumers = consumers.len();
    out
}

/// Each worker's last acknowledged change (a worker's steps are acknowledged in plan order)
/// must be its final state.
fn check_final_states_of_acked(accepted: &[Accepted], listing: &Listing, out: &mut Findings) {
    let mut last: BTreeMap<&str, &Accepted> = BTreeMap::new();
    for a in accepted {
        last.insert(&a.change.worker, a);
    }
    for (worker, a) in last {
        let now = listing.workers.get(worker);
        let kept = match a.change.kind {
            Kind::Put => now == Some(&(a.change.version.clone(), a.change.checksum.clone())),
            Kind::Delete => now.is_none(),
        };
        if !kept {
            out.figures.acked_lost += 1;
            out.note(format!(
                "acknowledged {:?} of {worker} (revision {}, epoch {}) lost: final state {now:?} \
                 (epoch {})",
                a.change, a.revision, a.epoch, listing.epoch
            ));
        }
    }
}

fn change_of(event: &Event) -> Option<(&str, u64, Change)> {
    match event {
        Event::Put {
            revision,
            epoch,
            worker,
            version,
            checksum,
        } => Some((
            epoch,
            *revision,
            Change {
                kind: Kind::Put,
                worker: worker.clone(),
                version: version.clone(),
                checksum: checksum.clone(),
            },
        )),
        Event::Delete {
            revision,
            epoch,
            worker,
            version,
        } => Some((
            epoch,
            *revision,
            Change {
                kind: Kind::Delete,
                worker: worker.clone(),
                version: version.clone(),
                checksum: String::new(),
            },
        )),
        _ => None,
    }
}

/// The history from every source; disagreements counted.
fn rebuild(accepted: &[Accepted], consumers: &[ConsumerRecord<'_>], out: &mut Findings) -> History {
    let mut history = History::default();
    for a in accepted {
        if let Err((by, existing)) = history.add(&a.epoch, a.revision, a.change.clone(), "hook") {
            out.figures.revision_conflicts += 1;
            out.figures.acked_lost += 1;
            out.note(format!(
                "revision {} answered twice by the hook: {existing:?} (by {by}) and {:?}",
                a.revision, a.change
            ));
        }
    }
    let mut reported = HashSet::new();
    for consumer in consumers {
        for event in consumer.events {
            let Some((epoch, revision, change)) = change_of(event) else {
                continue;
            };
            if let Err((by, existing)) = history.add(epoch, revision, change.clone(), consumer.name)
                && reported.insert((epoch.to_owned(), revision))
            {
                out.figures.revision_conflicts += 1;
                if by == "hook" {
                    out.figures.acked_lost += 1;
                }
                out.note(format!(
                    "revision {revision} (epoch {epoch}) is {existing:?} to {by} but {change:?} \
                     to {}",
                    consumer.name
                ));
            }
        }
    }
    history
}

fn check_history(
    history: &History,
    accepted: &[Accepted],
    listing: &Listing,
    losing_history: bool,
    out: &mut Findings,
) {
    let mut epochs: BTreeSet<&str> = history.epochs().collect();
    epochs.insert(&listing.epoch);
    out.figures.epochs = epochs.len();
    if losing_history {
        check_final_states_of_acked(accepted, listing, out);
    } else if epochs.len() > 1 {
        out.figures.protocol_violations += 1;
        out.note(format!(
            "history lost: {} epochs seen ({epochs:?}), final {}",
            epochs.len(),
            listing.epoch
        ));
    }
    let mut missing = history.missing(&listing.epoch, listing.head);
    if losing_history {
        // A re-seed opens the final epoch with revisions `1..=n` that no hook request answered
        // (the workers the cores held); one overwritten before any consumer subscribed again is
        // seen by none. They are held to the final states instead (above).
        let first_answered = (accepted.iter())
            .filter(|a| a.epoch == listing.epoch)
            .map(|a| a.revision)
            .min();
        missing.retain(|revision| first_answered.is_some_and(|first| *revision > first));
    }
    out.figures.history_gaps += missing.len() as u64;
    if !missing.is_empty() {
        out.note(format!(
            "{} revisions of the history no one saw, e.g. {:?}",
            missing.len(),
            &missing[..missing.len().min(10)]
        ));
    }
    for a in accepted {
        let earlier_epoch = losing_history && a.epoch != listing.epoch;
        if !earlier_epoch && (a.epoch != listing.epoch || a.revision > listing.head) {
            out.figures.acked_lost += 1;
            out.note(format!(
                "accepted revision {} (epoch {}) {:?} is not in the final history (epoch {}, \
                 head {})",
                a.revision, a.epoch, a.change, listing.epoch, listing.head
            ));
        }
    }
    if let Ok(state) = history.state_at(&listing.epoch, listing.head) {
        let replayed: BTreeMap<_, _> = state
            .into_iter()
            .map(|(worker, (version, checksum, _))| (worker, (version, checksum)))
            .collect();
        if replayed != listing.workers {
            out.figures.history_mismatches += 1;
            out.note(format!(
                "the history replayed to {} is not the core's listing: {}",
                listing.head,
                diff(&replayed, &listing.workers)
            ));
        }
    }
}

/// Where a consumer is, walking its events.
struct Walk<'a> {
    consumer: &'a ConsumerRecord<'a>,
    history: &'a History,
    /// The epoch of the current RESET segment (or resumed position).
    epoch: Option<String>,
    /// The position: every change up to it is held.
    anchor: Option<u64>,
    /// The last revision in this stream (reset by a new connection and by RESET).
    stream_last: Option<u64>,
    /// Inside a snapshot: its (worker → version, checksum, revision) so far.
    snapshot: Option<BTreeMap<String, (String, String, u64)>>,
    /// Revisions applied since the last RESET.
    applied: HashSet<u64>,
}

fn check_consumer(consumer: &ConsumerRecord<'_>, history: &History, out: &mut Findings) {
    let mut walk = Walk {
        consumer,
        history,
        epoch: None,
        anchor: None,
        stream_last: None,
        snapshot: None,
        applied: HashSet::new(),
    };
    let mut connections = 0;
    let mut resets = 0;
    for (index, event) in consumer.events.iter().enumerate() {
        out.figures.events += 1;
        match event {
            Event::Connected { transport } => {
                connections += 1;
                if *transport == "quic" {
                    out.figures.quic_streams += 1;
                }
                walk.stream_last = None;
                // A snapshot cut short by a disconnect is abandoned: the client starts over.
                walk.snapshot = None;
            }
            Event::Disconnected { .. } => {}
            Event::Reset { epoch } => {
                resets += 1;
                walk.epoch = Some(epoch.clone());
                walk.anchor = None;
                walk.stream_last = None;
                walk.snapshot = Some(BTreeMap::new());
                walk.applied.clear();
            }
            Event::Synced {
                revision,
                epoch,
                ends_snapshot,
            } => walk.synced(index, *revision, epoch, *ends_snapshot, out),
            _ => {
                if let Some((epoch, revision, change)) = change_of(event) {
                    out.figures.applied += 1;
                    walk.change(index, epoch, revision, change, out);
                }
            }
        }
    }
    out.figures.streams += connections;
    out.figures.resets += resets.max(1) - 1;
}

impl Walk<'_> {
    fn violation(&self, out: &mut Findings, index: usize, what: String) {
        out.note(format!("{} event #{index}: {what}", self.consumer.name));
    }

    fn same_epoch(&mut self, index: usize, epoch: &str, out: &mut Findings) {
        match &self.epoch {
            Some(current) if current != epoch => {
                out.figures.protocol_violations += 1;
                self.violation(
                    out,
                    index,
                    format!("epoch {epoch} after {current} without a RESET"),
                );
                self.epoch = Some(epoch.to_owned());
            }
            Some(_) => {}
            None => self.epoch = Some(epoch.to_owned()),
        }
    }

    /// Counts the changes of the history in `from..to` that pass the filter: all skipped.
    fn skipped(&self, epoch: &str, from: u64, to: u64, index: usize, out: &mut Findings) {
        for (revision, change) in self.history.range(epoch, from, to) {
            if passes(self.consumer.filter, &change.worker) {
                out.figures.skipped += 1;
                self.violation(
                    out,
                    index,
                    format!("revision {revision} {change:?} was skipped"),
                );
            }
        }
    }

    fn change(
        &mut self,
        index: usize,
        epoch: &str,
        revision: u64,
        change: Change,
        out: &mut Findings,
    ) {
        self.same_epoch(index, epoch, out);
        if !passes(self.consumer.filter, &change.worker) {
            out.figures.wrong_content += 1;
            self.violation(
                out,
                index,
                format!(
                    "revision {revision} of {} outside the filter",
                    change.worker
                ),
            );
        }
        if let Some(truth) = self.history.get(epoch, revision)
            && !same(truth, &change)
        {
            // Counted once as a revision conflict when the history was rebuilt.
            self.violation(out, index, format!("revision {revision} is {truth:?}"));
        }
        if let Some(snapshot) = &mut self.snapshot {
            if change.kind == Kind::Delete {
                out.figures.protocol_violations += 1;
                self.violation(out, index, format!("DELETE {revision} inside a snapshot"));
                return;
            }
            let last = snapshot.values().map(|(_, _, r)| *r).max().unwrap_or(0);
            snapshot.insert(
                change.worker.clone(),
                (change.version.clone(), change.checksum.clone(), revision),
            );
            if revision <= last {
                if revision == last {
                    out.figures.duplicates += 1;
                } else {
                    out.figures.order_violations += 1;
                }
                self.violation(
                    out,
                    index,
                    format!("snapshot revision {revision} after {last}"),
                );
            }
            self.applied.insert(revision);
            return;
        }
        let Some(anchor) = self.anchor else {
            out.figures.protocol_violations += 1;
            self.violation(
                out,
                index,
                format!("revision {revision} before any RESET or position"),
            );
            self.anchor = Some(revision);
            self.stream_last = Some(revision);
            self.applied.insert(revision);
            return;
        };
        if !self.applied.insert(revision) {
            out.figures.duplicates += 1;
            self.violation(out, index, format!("revision {revision} applied again"));
            return;
        }
        let behind_stream = self.stream_last.is_some_and(|last| revision <= last);
        if behind_stream || revision <= anchor {
            out.figures.order_violations += 1;
            self.violation(
                out,
                index,
                format!(
                    "revision {revision} after {} in this stream (position {anchor})",
                    self.stream_last.unwrap_or(0)
                ),
            );
            return;
        }
        self.skipped(epoch, anchor + 1, revision, index, out);
        self.anchor = Some(revision);
        self.stream_last = Some(revision);
    }

    fn synced(
        &mut self,
        index: usize,
        revision: u64,
        epoch: &str,
        ends_snapshot: bool,
        out: &mut Findings,
    ) {
        self.same_epoch(index, epoch, out);
        if ends_snapshot != self.snapshot.is_some() {
            out.figures.protocol_violations += 1;
            self.violation(
                out,
                index,
                format!("SYNCED {revision}: ends_snapshot={ends_snapshot} disagrees"),
            );
        }
        if let Some(snapshot) = self.snapshot.take() {
            self.check_snapshot(index, epoch, revision, &snapshot, out);
            self.anchor = Some(revision);
            self.stream_last = Some(revision);
            return;
        }
        let Some(anchor) = self.anchor else {
            out.figures.protocol_violations += 1;
            self.violation(out, index, format!("SYNCED {revision} before any RESET"));
            self.anchor = Some(revision);
            self.stream_last = Some(revision);
            return;
        };
        let last = self.stream_last.unwrap_or(0).max(anchor);
        if revision < last {
            out.figures.order_violations += 1;
            self.violation(out, index, format!("SYNCED {revision} after {last}"));
            return;
        }
        self.skipped(epoch, anchor + 1, revision + 1, index, out);
        self.anchor = Some(revision);
        self.stream_last = Some(revision);
    }

    fn check_snapshot(
        &self,
        index: usize,
        epoch: &str,
        revision: u64,
        snapshot: &BTreeMap<String, (String, String, u64)>,
        out: &mut Findings,
    ) {
        if let Some((worker, (_, _, r))) = snapshot.iter().find(|(_, (_, _, r))| *r > revision) {
            out.figures.order_violations += 1;
            self.violation(
                out,
                index,
                format!("snapshot holds {worker} at {r}, after its SYNCED {revision}"),
            );
        }
        // Without the whole history up to `revision` (a gap, counted elsewhere) there is
        // nothing to compare with.
        let Ok(mut truth) = self.history.state_at(epoch, revision) else {
            return;
        };
        truth.retain(|worker, _| passes(self.consumer.filter, worker));
        if &truth != snapshot {
            out.figures.snapshot_mismatches += 1;
            let got = snapshot
                .iter()
                .map(|(w, (v, c, _))| (w.clone(), (v.clone(), c.clone())))
                .collect();
            let want = truth
                .into_iter()
                .map(|(w, (v, c, _))| (w, (v, c)))
                .collect();
            self.violation(
                out,
                index,
                format!(
                    "snapshot at {revision} is not the history's: {}",
                    diff(&got, &want)
                ),
            );
        }
    }
}

fn check_final_state(consumer: &ConsumerRecord<'_>, listing: &Listing, out: &mut Findings) {
    let want: BTreeMap<_, _> = listing
        .workers
        .iter()
        .filter(|(worker, _)| passes(consumer.filter, worker))
        .map(|(w, v)| (w.clone(), v.clone()))
        .collect();
    let names: BTreeSet<&String> = want.keys().chain(consumer.state.keys()).collect();
    let wrong = names
        .into_iter()
        .filter(|name| want.get(*name) != consumer.state.get(*name))
        .count();
    if wrong > 0 {
        out.figures.lost_final_states += wrong as u64;
        out.note(format!(
            "{} ends with {wrong} workers unlike the core: {}",
            consumer.name,
            diff(consumer.state, &want)
        ));
    }
}

/// The differences between two states, briefly.
pub fn diff(
    got: &BTreeMap<String, (String, String)>,
    want: &BTreeMap<String, (String, String)>,
) -> String {
    let names: BTreeSet<&String> = got.keys().chain(want.keys()).collect();
    let lines: Vec<String> = names
        .into_iter()
        .filter(|name| got.get(*name) != want.get(*name))
        .take(5)
        .map(|name| {
            let show = |v: Option<&(String, String)>| v.map_or("-".to_owned(), |(v, _)| v.clone());
            format!(
                "{name}: {} instead of {}",
                show(got.get(name)),
                show(want.get(name))
            )
        })
        .collect();
    lines.join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    const E: &str = "epoch-1";

    fn put(revision: u64, worker: &str, version: &str) -> Event {
        Event::Put {
            revision,
            epoch: E.into(),
            worker: worker.into(),
            version: version.into(),
            checksum: format!("sum-{worker}-{version}"),
        }
    }

    fn delete(revision: u64, worker: &str, version: &str) -> Event {
        Event::Delete {
            revision,
            epoch: E.into(),
            worker: worker.into(),
            version: version.into(),
        }
    }

    fn synced(revision: u64, ends_snapshot: bool) -> Event {
        Event::Synced {
            revision,
            epoch: E.into(),
            ends_snapshot,
        }
    }

    fn reset() -> Event {
        Event::Reset { epoch: E.into() }
    }

    fn connected() -> Event {
        Event::Connected { transport: "grpc" }
    }

    /// Revisions 1..=6: a1 b1 a2 b2 (delete b) a3.
    fn accepted() -> Vec<Accepted> {
        [
            put(1, "a", "1"),
            put(2, "b", "1"),
            put(3, "a", "2"),
            put(4, "b", "2"),
            delete(5, "b", "2"),
            put(6, "a", "3"),
        ]
        .iter()
        .map(|e| {
            let (epoch, revision, change) = change_of(e).unwrap();
            Accepted {
                epoch: epoch.into(),
                revision,
                change,
            }
        })
        .collect()
    }

    fn listing() -> Listing {
        Listing {
            epoch: E.into(),
            head: 6,
            workers: [("a".into(), ("3".into(), "sum-a-3".into()))].into(),
            revisions: [("a".into(), 6)].into(),
        }
    }

    fn state_of(events: &[Event]) -> BTreeMap<String, (String, String)> {
        let mut state = BTreeMap::new();
        for event in events {
            match event {
                Event::Put {
                    worker,
                    version,
                    checksum,
                    ..
                } => {
                    state.insert(worker.clone(), (version.clone(), checksum.clone()));
                }
                Event::Delete { worker, .. } => {
                    state.remove(worker);
                }
                _ => {}
            }
        }
        state
    }

    fn check(events: Vec<Event>, filter: Filter) -> Figures {
        let state = state_of(&events);
        let record = ConsumerRecord {
            name: "c",
            filter: &filter,
            events: &events,
            state: &state,
        };
        let findings = check_run(&accepted(), &[record], &listing());
        println!("{:#?}", findings.details);
        findings.figures
    }

    fn everything() -> Vec<Event> {
        vec![
            connected(),
            reset(),
            synced(0, true),
            put(1, "a", "1"),
            put(2, "b", "1"),
            put(3, "a", "2"),
            connected(),
            put(4, "b", "2"),
            delete(5, "b", "2"),
            synced(5, false),
            put(6, "a", "3"),
        ]
    }

    #[test]
    fn a_faithful_history_with_a_resume_has_no_violations() {
        let figures = check(everything(), None);
        assert_eq!(figures.violations(), 0, "{figures}");
        assert_eq!((figures.applied, figures.streams), (6, 2));
    }

    #[test]
    fn a_skipped_change_is_counted_even_across_a_reconnect() {
        let mut events = everything();
        events.remove(7); // put 4
        let figures = check(events, None);
        assert_eq!(figures.skipped, 1, "{figures}");
    }

    #[test]
    fn a_change_applied_twice_after_a_resume_is_a_duplicate() {
        let mut events = everything();
        events.insert(7, put(3, "a", "2"));
        let figures = check(events, None);
        assert_eq!(figures.duplicates, 1, "{figures}");
    }

    #[test]
    fn revisions_going_backwards_in_a_stream_are_order_violations() {
        let mut events = everything();
        events.swap(4, 5); // 2 before 1
        let figures = check(events, None);
        assert!(figures.order_violations >= 1, "{figures}");
    }

    #[test]
    fn a_filtered_consumer_may_miss_other_workers_but_not_its_own() {
        let filter: Filter = Some(["a".to_owned()].into());
        let events = vec![
            connected(),
            reset(),
            synced(0, true),
            put(1, "a", "1"),
            put(3, "a", "2"),
            synced(5, false),
            put(6, "a", "3"),
        ];
        assert_eq!(check(events.clone(), filter.clone()).violations(), 0);
        let mut missing = events;
        missing.remove(4); // put 3
        assert_eq!(check(missing, filter).skipped, 1);
    }

    #[test]
    fn a_reset_snapshot_must_be_the_state_at_its_synced() {
        let good = vec![
            connected(),
            reset(),
            put(3, "a", "2"),
            put(4, "b", "2"),
            synced(4, true),
            delete(5, "b", "2"),
            put(6, "a", "3"),
        ];
        assert_eq!(check(good.clone(), None).violations(), 0);
        let mut stale = good;
        stale[2] = put(1, "a", "1");
        let figures = check(stale, None);
        assert_eq!(figures.snapshot_mismatches, 1, "{figures}");
    }

    #[test]
    fn a_run_losing_history_keeps_acked_changes_through_the_final_state_of_each_worker() {
        // Epoch E acknowledged everything; the store lost it and was re-seeded in "e2" with
        // the workers' states (a at 3, revision 1), then b put again (revision 2).
        let mut acked = accepted();
        acked.push(Accepted {
            epoch: "e2".into(),
            revision: 2,
            change: Change {
                kind: Kind::Put,
                worker: "b".into(),
                version: "3".into(),
                checksum: "sum-b-3".into(),
            },
        });
        let listing = Listing {
            epoch: "e2".into(),
            head: 2,
            workers: [
                ("a".into(), ("3".into(), "sum-a-3".into())),
                ("b".into(), ("3".into(), "sum-b-3".into())),
            ]
            .into(),
            revisions: [("a".into(), 1), ("b".into(), 2)].into(),
        };
        let strict = check_run(&acked, &[], &listing).figures;
        assert!(
            strict.acked_lost > 0 && strict.protocol_violations > 0,
            "{strict}"
        );
        let lossy = check_run_losing_history(&acked, &[], &listing).figures;
        assert_eq!(
            (lossy.acked_lost, lossy.protocol_violations),
            (0, 0),
            "{lossy}"
        );
        // a re-seeded at its version 2 instead: the acknowledged version 3 was lost.
        let mut stale = listing.clone();
        stale
            .workers
            .insert("a".into(), ("2".into(), "sum-a-2".into()));
        let lossy = check_run_losing_history(&acked, &[], &stale).figures;
        assert_eq!(lossy.acked_lost, 1, "{lossy}");
    }

    #[test]
    fn a_revision_reused_for_another_change_is_an_acked_change_lost() {
        let mut events = everything();
        events[10] = put(6, "a", "other");
        let figures = check(events, None);
        assert_eq!(figures.revision_conflicts, 1, "{figures}");
        assert_eq!(figures.acked_lost, 1);
        assert!(figures.lost_final_states >= 1);
    }

    #[test]
    fn a_final_state_unlike_the_core_is_a_lost_final_state() {
        let mut events = everything();
        events.pop();
        let figures = check(events, None);
        assert_eq!(figures.lost_final_states, 1, "{figures}");
    }
}
