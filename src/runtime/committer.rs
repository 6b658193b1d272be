//! Group commit: every state-changing agent call of this process goes through one
//! committer task, which applies all calls waiting at that moment in one store
//! transaction (see [`AgentStore::commit_batch`]) and then answers each caller.
//!
//! There is no artificial wait: a lone call is committed at once, and while a
//! batch commits the next one forms by itself, so batches grow with the load (as
//! Postgres's own WAL group commit does). A reply always means committed.

use std::sync::Arc;

use tokio::sync::{mpsc, oneshot};
use tracing::Instrument;

use crate::domain::batch::{Applied, Command};
use crate::error::{Error, Result};
use crate::metrics::Metrics;
use crate::runtime::clock::Clock;
use crate::runtime::fanout::LocalCommits;
use crate::runtime::heartbeats::AgentCache;
use crate::storage::AgentStore;

/// Calls queued beyond this wait for room (back-pressure on the callers).
const QUEUE: usize = 8192;

struct Pending {
    command: Command,
    reply: oneshot::Sender<Result<Applied>>,
    /// The caller's span (its call's), linked from the batch's.
    caller: tracing::Span,
}

/// The handle callers submit commands through. Cheap to clone; the task ends when
/// every handle is gone.
#[derive(Clone)]
pub struct Committer {
    queue: mpsc::Sender<Pending>,
}

impl Committer {
    /// Starts the committer task. Batches hold at most `max_batch` commands.
    pub fn start(
        store: Arc<dyn AgentStore>,
        clock: Clock,
        cache: Arc<AgentCache>,
        max_batch: usize,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self::start_publishing(store, clock, cache, max_batch, metrics, None)
    }

    /// [`Committer::start`], handing every committed batch's transitions to the
    /// fan-out (in commit order, after the cache has them) when `publish` is set.
    pub fn start_publishing(
        store: Arc<dyn AgentStore>,
        clock: Clock,
        cache: Arc<AgentCache>,
        max_batch: usize,
        metrics: Arc<Metrics>,
        publish: Option<LocalCommits>,
    ) -> Self {
        let (queue, rx) = mpsc::channel(QUEUE);
        let sinks = Sinks {
            cache,
            metrics,
            publish,
        };
        tokio::spawn(run(store, clock, sinks, max_batch.max(1), rx));
        Committer { queue }
    }

    /// Applies one command; returns once it is committed (or refused).
    pub async fn submit(&self, command: Command) -> Result<Applied> {
        let (reply, answer) = oneshot::channel();
        self.queue
            .send(Pending {
                command,
                reply,
                caller: tracing::Span::current(),
            })
            .await
            .map_err(|_| stopped())?;
        answer.await.map_err(|_| stopped())?
    }
}

fn stopped() -> Error {
    Error::Unavailable("server is shutting down".into())
}

/// Where a committed outcome goes besides its caller.
struct Sinks {
    cache: Arc<AgentCache>,
    metrics: Arc<Metrics>,
    publish: Option<LocalCommits>,
}

impl Sinks {
    /// Records committed outcomes (in revision order) and publishes their transitions.
    fn committed<'a>(&self, outcomes: impl IntoIterator<Item = &'a Applied>) {
        let mut transitions = Vec::new();
        for outcome in outcomes {
            self.cache.committed(&outcome.agent);
            count_transition(&self.metrics, outcome);
            if let Some(t) = &outcome.transition
                && self.publish.is_some()
            {
                transitions.push(t.clone());
            }
        }
        if let Some(publish) = &self.publish {
            transitions.sort_unstable_by_key(|t| t.revision);
            publish.publish(transitions);
        }
    }
}

async fn run(
    store: Arc<dyn AgentStore>,
    clock: Clock,
    sinks: Sinks,
    max_batch: usize,
    mut rx: mpsc::Receiver<Pending>,
) {
    let mut batch = Vec::with_capacity(max_batch);
    while rx.recv_many(&mut batch, max_batch).await > 0 {
        let pending = std::mem::take(&mut batch);
        commit(&*store, &clock, &sinks, pending).await;
    }
}

/// Commits one batch in a span, `commit_batch` (its size, how long the
/// transaction took, the revisions it committed, its outcome): a child of the
/// call's span when it carries one call, else a root linked to the spans of
/// the calls it carries (a batch serves many traces at once).
async fn commit(store: &dyn AgentStore, clock: &Clock, sinks: &Sinks, pending: Vec<Pending>) {
    let parent = match pending.as_slice() {
        [lone] => lone.caller.id(),
        _ => None,
    };
    let span = tracing::info_span!(
        parent: parent,
        "commit_batch",
        size = pending.len() as i64,
        elapsed_ms = tracing::field::Empty,
        split = tracing::field::Empty,
        outcome = tracing::field::Empty,
        otel.status_code = tracing::field::Empty,
        first_revision = tracing::field::Empty,
        last_revision = tracing::field::Empty,
    );
    if pending.len() > 1 {
        for p in &pending {
            span.follows_from(&p.caller);
        }
    }
    commit_in_span(store, clock, sinks, pending)
        .instrument(span)
        .await;
}

/// Commits one batch and answers its callers. A batch the store refuses as a whole
/// for a reason other than unavailability is split, so that one bad call cannot
/// fail the others.
async fn commit_in_span(
    store: &dyn AgentStore,
    clock: &Clock,
    sinks: &Sinks,
    pending: Vec<Pending>,
) {
    let metrics = &sinks.metrics;
    let (commands, replies): (Vec<Command>, Vec<_>) =
        pending.into_iter().map(|p| (p.command, p.reply)).unzip();
    let started = std::time::Instant::now();
    // Decided on what this process last committed or read, when it knows every
    // agent (the store checks the rows and falls back to reading them).
    let known = if commands.iter().any(Command::reads_liveness) {
        None
    } else {
        sinks.cache.known(commands.iter().map(Command::agent_id))
    };
    let committed = store
        .commit_batch_known(&commands, known, clock.now())
        .await;
    let elapsed = started.elapsed();
    tracing::Span::current().record("elapsed_ms", elapsed.as_secs_f64() * 1000.0);
    tracing::trace!(size = commands.len(), ?elapsed, "batch committed");
    metrics.commit_batch_size.observe(commands.len() as f64);
    metrics.commit_duration.observe(elapsed.as_secs_f64());
    match committed {
        Ok(outcomes) => {
            let mut revisions = Revisions::default();
            for outcome in outcomes.iter().flatten() {
                revisions.add(outcome);
            }
            sinks.committed(outcomes.iter().flatten());
            revisions.record("committed");
            for (reply, outcome) in replies.into_iter().zip(outcomes) {
                let _ = reply.send(outcome.map_err(Error::from));
            }
        }
        Err(Error::Unavailable(message)) => {
            Revisions::default().record("unavailable");
            for reply in replies {
                let _ = reply.send(Err(Error::Unavailable(message.clone())));
            }
        }
        Err(error) if commands.len() == 1 => {
            Revisions::default().record("failed");
            if let Some(reply) = replies.into_iter().next() {
                let _ = reply.send(Err(error));
            }
        }
        Err(error) => {
            tracing::Span::current().record("split", true);
            tracing::warn!(%error, size = commands.len(), "batch failed, committing its calls one by one");
            let mut revisions = Revisions::default();
            for (command, reply) in commands.into_iter().zip(replies) {
                let one = [command];
                let result = match store.commit_batch(&one, clock.now()).await {
                    Ok(mut outcomes) => match outcomes.pop() {
                        Some(outcome) => outcome.map_err(Error::from),
                        None => Err(Error::Internal("store returned no outcome".into())),
                    },
                    Err(error) => Err(error),
                };
                if let Ok(applied) = &result {
                    revisions.add(applied);
                    sinks.committed([applied]);
                }
                let _ = reply.send(result);
            }
            revisions.record("split");
        }
    }
}

/// A committed outcome's transition, if it made one.
fn count_transition(metrics: &Metrics, applied: &Applied) {
    if let Some(t) = &applied.transition {
        metrics.transition(t.cause, t.to);
    }
}

/// The lowest and highest revision a batch's transitions got, for its span.
#[derive(Default)]
struct Revisions(Option<(i64, i64)>);

impl Revisions {
    fn add(&mut self, applied: &Applied) {
        if let Some(t) = &applied.transition {
            let (first, last) = self.0.get_or_insert((t.revision, t.revision));
            *first = (*first).min(t.revision);
            *last = (*last).max(t.revision);
        }
    }

    /// Records the outcome (`committed`, `unavailable`, `failed`, `split`) and
    /// the revisions, if any, on the batch's span.
    fn record(self, outcome: &'static str) {
        let span = tracing::Span::current();
        span.record("outcome", outcome);
        if matches!(outcome, "unavailable" | "failed") {
            span.record("otel.status_code", "ERROR");
        }
        if let Some((first, last)) = self.0 {
            span.record("first_revision", first);
            span.record("last_revision", last);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::agent::{AgentStatus, Event, SlotType};
    use crate::storage::memory::MemoryStore;
    use chrono::TimeZone;

    fn setup() -> (Arc<MemoryStore>, Committer) {
        let store = Arc::new(MemoryStore::new());
        let (clock, _) = Clock::manual(chrono::Utc.with_ymd_and_hms(2026, 5, 1, 0, 0, 0).unwrap());
        let committer = Committer::start(
            store.clone(),
            clock,
            AgentCache::new(),
            64,
            crate::metrics::Metrics::new(),
        );
        (store, committer)
    }

    fn register(id: &str) -> Command {
        Command::Register {
            agent_id: id.into(),
            labels: Default::default(),
            actor: "test".into(),
        }
    }

    fn start(id: &str) -> Command {
        Command::Apply {
            agent_id: id.into(),
            event: Event::StartWork(SlotType::Work),
            actor: "test".into(),
        }
    }

    #[tokio::test]
    async fn concurrent_calls_share_batches_and_one_start_work_wins() {
        let (store, committer) = setup();
        committer.submit(register("a")).await.unwrap();
        let before = store.batches_committed();
        // Submitted at once: they queue while the first batch commits.
        let results =
            futures::future::join_all((0..20).map(|_| committer.submit(start("a")))).await;
        let winners = results.iter().filter(|r| r.is_ok()).count();
        assert_eq!(winners, 1, "{results:?}");
        for refused in results.iter().filter_map(|r| r.as_ref().err()) {
            assert!(
                matches!(refused, Error::TransitionRefused(_)),
                "{refused:?}"
            );
        }
        let batches = store.batches_committed() - before;
        assert!(batches < 20, "20 calls took {batches} batches: no grouping");
        let agent = store.get_agent("a").await.unwrap();
        assert_eq!(agent.state.status, AgentStatus::Busy);
        assert_eq!(store.revision_bounds().await.unwrap().head, 2);
    }

    #[tokio::test]
    async fn an_unknown_agent_is_not_found_and_the_rest_of_the_batch_commits() {
        let (store, committer) = setup();
        committer.submit(register("a")).await.unwrap();
        let (ghost, real) = tokio::join!(
            committer.submit(start("ghost")),
            committer.submit(start("a"))
        );
        assert!(matches!(ghost, Err(Error::NotFound { .. })), "{ghost:?}");
        assert_eq!(real.unwrap().agent.state.status, AgentStatus::Busy);
        assert_eq!(
            store.get_agent("a").await.unwrap().state.status,
            AgentStatus::Busy
        );
    }

    #[tokio::test]
    async fn a_store_outage_answers_every_caller_unavailable_and_commits_nothing() {
        let (store, committer) = setup();
        committer.submit(register("a")).await.unwrap();
        store.set_unavailable(true);
        let results = futures::future::join_all((0..5).map(|_| committer.submit(start("a")))).await;
        assert!(
            results
                .iter()
                .all(|r| matches!(r, Err(Error::Unavailable(_)))),
            "{results:?}"
        );
        store.set_unavailable(false);
        assert_eq!(
            store.get_agent("a").await.unwrap().state.status,
            AgentStatus::Idle
        );
        assert_eq!(store.revision_bounds().await.unwrap().head, 1);
    }
}
