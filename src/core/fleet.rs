//! The core's side of the fleet link ([`crate::store::Fleet`]): it publishes this core's
//! aggregates, answers the other cores' questions, applies their news, and folds their views
//! into the fleet-wide propagation that `?wait`, the admin API and the status page show.
//!
//! What travels: per worker, one [`PropagationSummary`] per core (written when it changes,
//! at most once per [`PUBLISH_INTERVAL`]); per-host detail only when asked ([`Question`]).
//! Without a fleet (one core, the embedded store) none of this runs.

use std::{collections::HashMap, sync::Arc, time::Duration};

use serde::{Deserialize, Serialize};

use super::{
    Core, WorkerStatus, lock,
    propagation::{ConsumerStatus, CoreCounts, Propagation, PropagationSummary, state_of},
    types::{Revision, WorkerFilter, WorkerName},
};
use crate::store::{CoreView, Fleet, Heard, News};

/// Changes of this core's aggregates within this interval go out as one write.
pub const PUBLISH_INTERVAL: Duration = Duration::from_millis(10);

/// How long a core waits for the others' detail before answering with their counts.
pub const ASK_WITHIN: Duration = Duration::from_secs(1);

/// Every aggregate is written again this often, in case the store lost it (restart, flush).
const REPUBLISH_EVERY: Duration = Duration::from_secs(30);

/// Most workers per read of the other cores' aggregates.
const VIEWS_BATCH: usize = 500;

/// What one core asks the others.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "ask", rename_all = "snake_case")]
pub(super) enum Question {
    /// Their detail of one revision of a worker.
    Propagation {
        /// The worker.
        worker: WorkerName,
        /// The revision.
        revision: Revision,
    },
    /// Their consumers.
    Consumers,
}

impl Core {
    /// Starts the fleet tasks: publishing aggregates, hearing the others.
    pub(super) fn join_fleet(self: &Arc<Self>, fleet: &Arc<dyn Fleet>) {
        self.tracker.track_dirty();
        let mut tasks = lock(&self.fleet_tasks);
        tasks.push(tokio::spawn(self.clone().publish_aggregates(fleet.clone())));
        if let Some(heard) = fleet.heard() {
            tasks.push(tokio::spawn(self.clone().hear(fleet.clone(), heard)));
        }
        tasks.push(tokio::spawn(self.clone().forward_changes(fleet.clone())));
    }

    /// Stops the fleet tasks and leaves the fleet.
    pub(super) async fn leave_fleet(&self) {
        let tasks = std::mem::take(&mut *lock(&self.fleet_tasks));
        for task in tasks {
            task.abort();
            let _ = task.await;
        }
        if let Some(fleet) = &self.fleet {
            fleet.leave().await;
        }
    }

    /// Tells the other cores `news`, in the background (callers are not held up by the store).
    pub(super) fn tell_fleet(&self, news: News) {
        if let Some(fleet) = &self.fleet {
            let fleet = fleet.clone();
            tokio::spawn(async move {
                if let Err(error) = fleet.tell(&news).await {
                    tracing::warn!(%error, ?news, "could not tell the other cores");
                }
            });
        }
    }

    /// Tells the other cores that `info`'s consumer subscribed here, and records where it is
    /// (so that a dead core it left stops counting it), in the background.
    pub(super) fn arrived_in_fleet(&self, info: &super::SubscriberInfo) {
        if let Some(fleet) = &self.fleet {
            let fleet = fleet.clone();
            let consumer = info.consumer_id.clone();
            let workers = info.filter.names().map(<[WorkerName]>::to_vec);
            tokio::spawn(async move {
                let told = fleet.tell(&News::Subscribed(consumer.clone())).await;
                let recorded = fleet.arrived(&consumer, workers.as_deref()).await;
                if let Err(error) = told.and(recorded) {
                    tracing::warn!(%error, %consumer, "could not tell the other cores of a subscription");
                }
            });
        }
    }

    /// Writes this core's aggregates of the workers whose propagation changed, coalesced.
    async fn publish_aggregates(self: Arc<Self>, fleet: Arc<dyn Fleet>) {
        let mut changes = self.tracker.watch();
        let mut published: HashMap<WorkerName, PropagationSummary> = HashMap::new();
        let mut republish = tokio::time::Instant::now() + REPUBLISH_EVERY;
        loop {
            tokio::select! {
                changed = changes.changed() => if changed.is_err() { return },
                () = tokio::time::sleep_until(republish) => {
                    published.clear();
                    self.tracker.changed_workers(None::<std::iter::Empty<&WorkerName>>);
                    republish = tokio::time::Instant::now() + REPUBLISH_EVERY;
                }
                () = self.shutdown.cancelled() => return,
            }
            tokio::time::sleep(PUBLISH_INTERVAL).await;
            changes.borrow_and_update();
            let dirty = self.tracker.take_dirty();
            let latest: Vec<(WorkerName, Revision)> = {
                let state = self.hub.read();
                if dirty.all {
                    state
                        .snapshot(&WorkerFilter::all())
                        .iter()
                        .map(|e| (e.change.worker.clone(), e.change.revision))
                        .collect()
                } else {
                    dirty
                        .workers
                        .iter()
                        .map(|w| (w.clone(), state.latest(w).map_or(0, |e| e.change.revision)))
                        .collect()
                }
            };
            let mut writes = Vec::new();
            for (worker, revision) in latest {
                if revision == 0 {
                    if published.remove(&worker).is_some() {
                        writes.push((worker, None));
                    }
                    continue;
                }
                let summary = self.tracker.propagation(&worker, revision).summary();
                if published.get(&worker) != Some(&summary) {
                    match serde_json::to_string(&summary) {
                        Ok(json) => {
                            published.insert(worker.clone(), summary);
                            writes.push((worker, Some(json)));
                        }
                        Err(error) => tracing::error!(%error, "aggregate does not encode"),
                    }
                }
            }
            if dirty.all {
                let live: std::collections::HashSet<WorkerName> = {
                    let state = self.hub.read();
                    state
                        .snapshot(&WorkerFilter::all())
                        .iter()
                        .map(|e| e.change.worker.clone())
                        .collect()
                };
                published.retain(|worker, _| {
                    let keep = live.contains(worker);
                    if !keep {
                        writes.push((worker.clone(), None));
                    }
                    keep
                });
            }
            if let Err(error) = fleet.publish(&writes).await {
                tracing::warn!(%error, workers = writes.len(), "aggregates not written; retrying");
                for (worker, _) in &writes {
                    published.remove(worker);
                }
                self.tracker
                    .changed_workers(Some(writes.iter().map(|(w, _)| w)));
                tokio::select! {
                    () = tokio::time::sleep(Duration::from_millis(500)) => {}
                    () = self.shutdown.cancelled() => return,
                }
            }
        }
    }

    /// Wakes this core's waiters and status pages when another core's aggregates change.
    async fn forward_changes(self: Arc<Self>, fleet: Arc<dyn Fleet>) {
        let mut changed = fleet.changed();
        loop {
            tokio::select! {
                result = changed.changed() => if result.is_err() { return },
                () = self.shutdown.cancelled() => return,
            }
            self.tracker.bump();
        }
    }

    /// Answers the other cores' questions and applies their news.
    async fn hear(
        self: Arc<Self>,
        fleet: Arc<dyn Fleet>,
        mut heard: tokio::sync::mpsc::Receiver<Heard>,
    ) {
        loop {
            let next = tokio::select! {
                next = heard.recv() => next,
                () = self.shutdown.cancelled() => return,
            };
            let Some(next) = next else { return };
            match next {
                Heard::Asked { id, question } => {
                    let answer = match serde_json::from_str::<Question>(&question) {
                        Ok(Question::Propagation { worker, revision }) => {
                            serde_json::to_string(&self.tracker.propagation(&worker, revision))
                        }
                        Ok(Question::Consumers) => serde_json::to_string(&self.consumers_status()),
                        Err(error) => {
                            tracing::debug!(%error, "ignoring a question this core does not know");
                            continue;
                        }
                    };
                    match answer {
                        Ok(answer) => {
                            let fleet = fleet.clone();
                            tokio::spawn(async move {
                                if let Err(error) = fleet.answer(&id, &answer).await {
                                    tracing::debug!(%error, "answer to another core not written");
                                }
                            });
                        }
                        Err(error) => tracing::error!(%error, "answer does not encode"),
                    }
                }
                Heard::News(News::Subscribed(consumer)) => self.tracker.moved(&consumer),
                Heard::News(News::Registered(consumer)) => self.tracker.registered(consumer),
                Heard::News(News::Deregistered(consumer)) => {
                    lock(&self.registry).remove(&consumer);
                    self.tracker.forget(&consumer);
                }
            }
        }
    }

    /// Whether every other core has answered `revision` of `worker` (see
    /// [`remote_answered`]). `true` without a fleet.
    pub(super) async fn others_answered(&self, worker: &WorkerName, revision: Revision) -> bool {
        let Some(fleet) = &self.fleet else {
            return true;
        };
        match fleet.views(std::slice::from_ref(worker)).await {
            Ok(views) => views.iter().all(|view| {
                let summary = aggregate(view, 0).map(|s| unlisted(view, s, revision, 0).summary);
                remote_answered(view, summary.as_ref(), revision)
            }),
            Err(error) => {
                tracing::debug!(%error, "other cores' aggregates unreadable; still waiting");
                false
            }
        }
    }

    /// Where `revision` of `worker` stands across the fleet: this core's detail, each other
    /// live core's detail (asked for), and the counts of those that did not answer.
    pub(super) async fn fleet_propagation_of(
        &self,
        mut mine: Propagation,
        worker: &WorkerName,
        revision: Revision,
    ) -> Propagation {
        let Some(fleet) = &self.fleet else {
            return mine;
        };
        let question = Question::Propagation {
            worker: worker.clone(),
            revision,
        };
        let answers = self.ask(fleet.as_ref(), &question).await;
        let mut answered = std::collections::HashSet::new();
        for (core, answer) in answers {
            match serde_json::from_str::<Propagation>(&answer) {
                Ok(theirs) => {
                    answered.insert(core);
                    mine.merge(theirs);
                }
                Err(error) => {
                    tracing::warn!(%error, %core, "another core's detail does not decode")
                }
            }
        }
        match fleet.views(std::slice::from_ref(worker)).await {
            Ok(views) => {
                for view in views.iter().filter(|v| !answered.contains(&v.core)) {
                    if let Some(summary) = aggregate(view, 0) {
                        mine.count_unlisted(unlisted(view, summary, revision, 0));
                    }
                }
            }
            Err(error) => tracing::warn!(%error, "other cores' aggregates unreadable"),
        }
        mine
    }

    async fn ask(&self, fleet: &dyn Fleet, question: &Question) -> Vec<(String, String)> {
        let text = match serde_json::to_string(question) {
            Ok(text) => text,
            Err(error) => {
                tracing::error!(%error, "question does not encode");
                return Vec::new();
            }
        };
        fleet.ask(&text, ASK_WITHIN).await.unwrap_or_else(|error| {
            tracing::warn!(%error, "could not ask the other cores");
            Vec::new()
        })
    }

    /// A live worker's latest version and where it stands across the fleet.
    pub async fn fleet_worker_status(
        &self,
        worker: &WorkerName,
    ) -> Option<WorkerStatus<Propagation>> {
        let mut status = self.worker_status(worker)?;
        status.propagation = self
            .fleet_propagation_of(status.propagation, worker, status.revision)
            .await;
        Some(status)
    }

    /// Every live worker's latest version and its counts across the fleet, by name.
    pub async fn fleet_workers_status(&self) -> Vec<WorkerStatus<PropagationSummary>> {
        let mut all: Vec<_> = self
            .workers_status()
            .into_iter()
            .map(WorkerStatus::summarized)
            .collect();
        let workers: Vec<_> = all.iter().map(|s| (s.name.clone(), s.revision)).collect();
        self.fold_views(&workers, |i, counts| {
            all[i].propagation.merge(&counts.summary)
        })
        .await;
        all
    }

    /// Every live worker's latest version with this core's detail and the other cores' counts
    /// (see [`Propagation::unlisted`]), by name: the status page, which asks nobody.
    pub async fn fleet_workers_detail(&self) -> Vec<WorkerStatus<Propagation>> {
        let mut all = self.workers_status();
        let workers: Vec<_> = all.iter().map(|s| (s.name.clone(), s.revision)).collect();
        self.fold_views(&workers, |i, counts| {
            all[i].propagation.count_unlisted(counts)
        })
        .await;
        all
    }

    /// Hands `fold` every other core's counts of each of `workers` (by index), as seen from
    /// the revision given with it.
    async fn fold_views(
        &self,
        workers: &[(WorkerName, Revision)],
        mut fold: impl FnMut(usize, CoreCounts),
    ) {
        let Some(fleet) = &self.fleet else {
            return;
        };
        for (batch, chunk) in workers.chunks(VIEWS_BATCH).enumerate() {
            let names: Vec<WorkerName> = chunk.iter().map(|(name, _)| name.clone()).collect();
            let views = match fleet.views(&names).await {
                Ok(views) => views,
                Err(error) => {
                    tracing::warn!(%error, "other cores' aggregates unreadable");
                    return;
                }
            };
            for (i, (_, revision)) in chunk.iter().enumerate() {
                for view in &views {
                    if let Some(summary) = aggregate(view, i) {
                        fold(
                            batch * VIEWS_BATCH + i,
                            unlisted(view, summary, *revision, i),
                        );
                    }
                }
            }
        }
    }

    /// The fleet's consumers: this core's, then every other live core's, each naming its core.
    pub async fn fleet_consumers_status(&self) -> Vec<ConsumerStatus> {
        let mut all = self.consumers_status();
        let Some(fleet) = &self.fleet else {
            return all;
        };
        for (core, answer) in self.ask(fleet.as_ref(), &Question::Consumers).await {
            match serde_json::from_str::<Vec<ConsumerStatus>>(&answer) {
                Ok(theirs) => all.extend(theirs),
                Err(error) => {
                    tracing::warn!(%error, %core, "another core's consumers do not decode")
                }
            }
        }
        all
    }
}

/// The `index`th aggregate of `view`, decoded.
fn aggregate(view: &CoreView, index: usize) -> Option<PropagationSummary> {
    let json = view.aggregates.get(index)?.as_ref()?;
    serde_json::from_str(json)
        .inspect_err(|error| tracing::warn!(%error, core = %view.core, "aggregate does not decode"))
        .ok()
}

/// Whether another core has answered `revision`: its aggregate is about that revision (or a
/// later one) with nobody pending. A live core that has not written one yet (it has not seen
/// the revision) is waited for; a dead one counts by its last aggregate: its subscribers are
/// pending until they resume elsewhere or it is forgotten.
fn remote_answered(
    view: &CoreView,
    summary: Option<&PropagationSummary>,
    revision: Revision,
) -> bool {
    match summary {
        Some(summary) if summary.answered(revision) => true,
        Some(summary) => !view.alive && summary.subscribers == 0,
        None => !view.alive,
    }
}

/// `view`'s counts (its `index`th aggregate) as seen from `revision`: subscribers of a core
/// that has not seen it yet are pending, and so are a dead core's that had not answered,
/// except those that subscribed elsewhere since it died (counted where they are now).
fn unlisted(
    view: &CoreView,
    mut summary: PropagationSummary,
    revision: Revision,
    index: usize,
) -> CoreCounts {
    if summary.revision < revision {
        (summary.pending, summary.acked, summary.failed) = (summary.subscribers, 0, 0);
    } else if !view.alive && summary.pending > 0 {
        summary.pending = summary.subscribers.saturating_sub(summary.failed);
        summary.acked = 0;
    }
    if !view.alive {
        let moved = view.moved.get(index).copied().unwrap_or(0);
        let moved = usize::try_from(moved)
            .unwrap_or(usize::MAX)
            .min(summary.subscribers);
        summary.subscribers -= moved;
        summary.pending = summary.pending.saturating_sub(moved);
    }
    summary.state = state_of(summary.pending, summary.failed);
    CoreCounts {
        core: view.core.as_str().into(),
        alive: view.alive,
        summary,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::PropagationState;

    fn view(alive: bool) -> CoreView {
        CoreView {
            core: "core-b".to_owned(),
            alive,
            aggregates: Vec::new(),
            moved: vec![0],
        }
    }

    fn summary(revision: Revision, subscribers: usize, pending: usize) -> PropagationSummary {
        PropagationSummary {
            revision,
            state: state_of(pending, 0),
            subscribers,
            acked: subscribers - pending,
            pending,
            failed: 0,
        }
    }

    #[test]
    fn another_core_has_answered_only_once_it_saw_the_revision_and_nobody_is_pending() {
        let live = view(true);
        assert!(
            !remote_answered(&live, None, 5),
            "not written yet: wait for it"
        );
        assert!(
            !remote_answered(&live, Some(&summary(4, 0, 0)), 5),
            "has not seen 5"
        );
        assert!(!remote_answered(&live, Some(&summary(5, 2, 1)), 5));
        assert!(remote_answered(&live, Some(&summary(5, 2, 0)), 5));
        assert!(remote_answered(&live, Some(&summary(6, 2, 0)), 5));
    }

    #[test]
    fn a_dead_core_counts_its_subscribers_as_pending_until_forgotten() {
        let dead = view(false);
        assert!(remote_answered(&dead, None, 5), "nobody to wait for");
        assert!(remote_answered(&dead, Some(&summary(4, 0, 0)), 5));
        assert!(!remote_answered(&dead, Some(&summary(4, 3, 0)), 5));
        let counts = unlisted(&dead, summary(4, 3, 0), 5, 0);
        assert_eq!((counts.summary.pending, counts.summary.acked), (3, 0));
        assert_eq!(counts.summary.state, PropagationState::Pending);
        assert!(!counts.alive);
        // It had answered this revision before it died: that stands.
        let counts = unlisted(&dead, summary(5, 3, 0), 5, 0);
        assert_eq!(counts.summary.state, PropagationState::Complete);
        // Two of three resumed on another core since: one is still pending here.
        let moved = CoreView {
            moved: vec![2],
            ..view(false)
        };
        let counts = unlisted(&moved, summary(4, 3, 0), 5, 0);
        assert_eq!((counts.summary.subscribers, counts.summary.pending), (1, 1));
        let counts = unlisted(&moved, summary(4, 2, 0), 5, 0);
        assert_eq!(counts.summary.state, PropagationState::Complete);
    }
}
