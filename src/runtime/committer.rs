//! Group commit: every state-changing agent call of this process goes through one
//! committer task, which applies all calls waiting at that moment in one store
//! transaction (see [`AgentStore::commit_batch`]) and then answers each caller.
//!
//! There is no artificial wait: a lone call is committed at once, and while a
//! batch commits the next one forms by itself, so batches grow with the load (as
//! Postgres's own WAL group commit does). A reply always means committed.
//!
//! Up to `depth` batches are in flight at once (`--commit-pipeline-depth`,
//! [`crate::config::COMMIT_PIPELINE_DEPTH`] by default),
//! so that the next batch is at the store, queued behind the revision row, while
//! the previous one waits for its commit to be flushed: the store commits
//! them one after another without a round trip in between. A batch starts only
//! if none of its agents is in a batch in flight (it waits for those to be
//! done), so every batch is decided on its agents' committed state, and calls
//! on one agent are decided in arrival order. While batches are in flight, the
//! next one also waits to hold as many calls as the one started before it (or
//! for that one to be done): each batch commits on its own (a WAL flush each,
//! one after another), so a batch of a few calls started early would cost
//! the callers behind it a commit. Batches are completed (cache,
//! metrics, fan-out, replies) in the order they started, so the cache and the
//! fan-out see them in that order; the store may commit two disjoint batches
//! in the other order (then the second's revisions are the lower ones, and the
//! fan-out reads the gap from the table before publishing the first).

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use futures::future::{self, Join, Ready};
use futures::stream::FuturesOrdered;
use tokio::sync::{mpsc, oneshot};
use tokio::task::{JoinError, JoinHandle};
use tracing::Instrument;

use crate::domain::batch::{self, Applied, Command, PoolCommand, Refusal};
use crate::error::{Error, Result};
use crate::metrics::Metrics;
use crate::runtime::agent_cache::AgentCache;
use crate::runtime::clock::Clock;
use crate::runtime::fanout::LocalCommits;
use crate::storage::AgentStore;
use crate::storage::quota::PoolCommitted;

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
    /// For pool commands, committed on their own (see [`Committer::commit_pool`]).
    direct: Arc<Direct>,
}

/// What a pool command's commit needs: the store, the clock, and where its
/// outcome goes.
struct Direct {
    store: Arc<dyn AgentStore>,
    clock: Clock,
    sinks: Sinks,
}

impl Committer {
    /// Starts the committer task. Batches hold at most `max_batch` commands, and
    /// at most `depth` of them are in flight at once.
    pub fn start(
        store: Arc<dyn AgentStore>,
        clock: Clock,
        cache: Arc<AgentCache>,
        max_batch: usize,
        depth: usize,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self::start_publishing(store, clock, cache, max_batch, depth, metrics, None)
    }

    /// [`Committer::start`], handing every committed batch's transitions to the
    /// fan-out (in the order the batches started, after the cache has them)
    /// when `publish` is set.
    pub fn start_publishing(
        store: Arc<dyn AgentStore>,
        clock: Clock,
        cache: Arc<AgentCache>,
        max_batch: usize,
        depth: usize,
        metrics: Arc<Metrics>,
        publish: Option<LocalCommits>,
    ) -> Self {
        let (queue, rx) = mpsc::channel(QUEUE);
        let sinks = Sinks {
            cache,
            metrics,
            publish,
        };
        let direct = Arc::new(Direct {
            store: store.clone(),
            clock: clock.clone(),
            sinks: sinks.clone(),
        });
        let run = Run {
            store,
            clock,
            sinks,
            max_batch: max_batch.max(1),
            depth: depth.max(1),
        };
        tokio::spawn(run.run(rx));
        Committer { queue, direct }
    }

    /// Commits one pool command (`ParkPool`, `ReleasePool`, a release that
    /// settled) in a transaction of its own, beside the batches (it names no
    /// agent; the store locks the pool's row and members), and hands what it
    /// changed to the cache, the metrics and the fan-out as a batch's.
    pub async fn commit_pool(&self, command: &PoolCommand) -> Result<PoolCommitted> {
        let d = &self.direct;
        let committed = d.store.commit_pool(command, d.clock.now()).await?;
        d.sinks.pool_committed(&committed);
        Ok(committed)
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
#[derive(Clone)]
struct Sinks {
    cache: Arc<AgentCache>,
    metrics: Arc<Metrics>,
    publish: Option<LocalCommits>,
}

impl Sinks {
    /// A pool command's changes: its members cached, its transitions counted
    /// and published.
    fn pool_committed(&self, committed: &PoolCommitted) {
        for agent in &committed.agents {
            self.cache.committed(agent);
        }
        for t in &committed.transitions {
            self.metrics.transition(t.cause, t.to);
        }
        if let Some(publish) = &self.publish {
            publish.publish(committed.transitions.clone());
        }
    }

    /// Records committed outcomes (in revision order) and publishes their transitions.
    fn committed<'a>(&self, outcomes: impl IntoIterator<Item = &'a Applied>) {
        let mut transitions = Vec::new();
        for outcome in outcomes {
            match &outcome.transition {
                Some(t) if t.ends_agent() => self.cache.forget(&t.agent_id),
                _ => self.cache.committed(&outcome.agent),
            }
            count_transition(&self.metrics, outcome);
            if let Some(t) = &outcome.transition
                && self.publish.is_some()
            {
                transitions.push(t.clone());
            }
            // What the command did to other agents (a report parking its
            // pool's members): cached, counted and published the same way.
            for agent in &outcome.others {
                self.cache.committed(agent);
            }
            for t in &outcome.other_transitions {
                self.metrics.transition(t.cause, t.to);
                if self.publish.is_some() {
                    transitions.push(t.clone());
                }
            }
        }
        if let Some(publish) = &self.publish {
            transitions.sort_unstable_by_key(|t| t.revision);
            publish.publish(transitions);
        }
    }
}

/// The committer task.
struct Run {
    store: Arc<dyn AgentStore>,
    clock: Clock,
    sinks: Sinks,
    max_batch: usize,
    depth: usize,
}

/// A batch in flight: what its completion needs besides the store's answer.
struct Started {
    /// The distinct agents it names (none of them in another batch in flight).
    agents: Vec<String>,
    replies: Vec<oneshot::Sender<Result<Applied>>>,
    span: tracing::Span,
}

/// The store's answer to a batch, and the commands (for a split).
struct Attempt {
    commands: Vec<Command>,
    committed: Result<Vec<Result<Applied, Refusal>>>,
}

impl Run {
    /// Forms batches from the queue and keeps up to `depth` in flight, each
    /// committing in a task of its own (so that it progresses while earlier
    /// ones complete); completes them in the order they started. Ends when
    /// every handle is gone and every batch is done.
    async fn run(self, mut rx: mpsc::Receiver<Pending>) {
        // Each batch in flight with its commit's task, in the order they started.
        let mut commits: FuturesOrdered<Join<Ready<Started>, JoinHandle<Attempt>>> =
            FuturesOrdered::new();
        // The agents of the batches in flight.
        let mut busy: HashSet<String> = HashSet::new();
        // The calls of the next batch, not started yet.
        let mut next: Vec<Pending> = Vec::with_capacity(self.max_batch);
        // The size of the batch started last (the newest in flight, if any).
        let mut last_size = 0;
        let mut open = true;
        loop {
            // The next batch starts when there is room and none of its agents
            // is in flight. While others are in flight it also waits to be as
            // large as the one ahead of it (or full): it reaches the store
            // while that one commits, and a batch of a few calls taking its
            // turn at the revision row would cost a commit of its own for
            // them. With nothing in flight, a lone call goes at once.
            let ready = !next.is_empty()
                && commits.len() < self.depth
                && (commits.is_empty() || next.len() >= last_size)
                && next
                    .iter()
                    .filter_map(|p| p.command.agent_id())
                    .all(|id| !busy.contains(id));
            if ready {
                let (batch, commit) = self.start(std::mem::take(&mut next), &busy);
                last_size = batch.replies.len();
                busy.extend(batch.agents.iter().cloned());
                commits.push_back(future::join(future::ready(batch), commit));
            }
            let room = self.max_batch - next.len();
            tokio::select! {
                biased;
                Some((batch, attempt)) = commits.next(), if !commits.is_empty() => {
                    // Done once completed: a batch naming its agents may start.
                    for agent in self.complete(batch, attempt).await {
                        busy.remove(&agent);
                    }
                }
                received = rx.recv_many(&mut next, room), if open && room > 0 => {
                    if received == 0 {
                        open = false;
                    }
                }
                // Nothing in flight (so the next batch, if any, has started),
                // and the queue is closed.
                else => return,
            }
        }
    }

    /// Starts a batch's commit in a span, `commit_batch` (its size, how long the
    /// transaction took, the revisions it committed, its outcome): a child of
    /// the call's span when it carries one call, else a root linked to the
    /// spans of the calls it carries (a batch serves many traces at once). The
    /// state the batch is decided on is read now: its agents are in no batch
    /// in flight, so what the cache holds of them is current.
    fn start(
        &self,
        pending: Vec<Pending>,
        busy: &HashSet<String>,
    ) -> (Started, JoinHandle<Attempt>) {
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
        let (commands, replies): (Vec<Command>, Vec<_>) =
            pending.into_iter().map(|p| (p.command, p.reply)).unzip();
        let mut seen = HashSet::new();
        let mut agents: Vec<String> = commands
            .iter()
            .filter_map(Command::agent_id)
            .filter(|id| seen.insert(*id))
            .map(str::to_owned)
            .collect();
        // Decided on what this process last committed or read, when it knows every
        // agent (the store checks the rows and falls back to reading them), and,
        // for claims, enough claimable agents outside the batches in flight
        // (which this batch then holds until it is done, as the agents it names).
        let known = if commands.iter().any(Command::needs_stored_rows) {
            None
        } else {
            let cache = &self.sinks.cache;
            let named = cache.known(commands.iter().filter_map(Command::agent_id));
            let selectors: Vec<_> = batch::claim_requests(&commands)
                .map(|(request, _)| &request.selector)
                .collect();
            match named {
                Some(mut known) if !selectors.is_empty() => {
                    cache.claim_candidates(&selectors, busy).map(|candidates| {
                        for agent in candidates {
                            if !seen.contains(agent.agent_id.as_str()) {
                                agents.push(agent.agent_id.clone());
                                known.push(agent);
                            }
                        }
                        known
                    })
                }
                named => named,
            }
        };
        let store = self.store.clone();
        let metrics = self.sinks.metrics.clone();
        let now = self.clock.now();
        let commit = tokio::spawn(
            async move {
                let began = Instant::now();
                let committed = store.commit_batch_known(&commands, known, now).await;
                record_commit(&metrics, commands.len(), began.elapsed());
                Attempt {
                    commands,
                    committed,
                }
            }
            .instrument(span.clone()),
        );
        let batch = Started {
            agents,
            replies,
            span,
        };
        (batch, commit)
    }

    /// Completes a batch in its span: records what it committed and answers its
    /// callers. A batch the store refuses as a whole for a reason other than
    /// unavailability is split, so that one bad call cannot fail the others.
    /// Returns the batch's agents.
    async fn complete(
        &self,
        batch: Started,
        attempt: std::result::Result<Attempt, JoinError>,
    ) -> Vec<String> {
        let Started {
            agents,
            replies,
            span,
        } = batch;
        self.complete_in_span(replies, attempt)
            .instrument(span)
            .await;
        agents
    }

    async fn complete_in_span(
        &self,
        replies: Vec<oneshot::Sender<Result<Applied>>>,
        attempt: std::result::Result<Attempt, JoinError>,
    ) {
        let (store, clock, sinks) = (&*self.store, &self.clock, &self.sinks);
        let Attempt {
            commands,
            committed,
        } = match attempt {
            Ok(attempt) => attempt,
            Err(error) => {
                // The commit's task panicked (or the runtime is stopping):
                // whether it committed is unknown.
                tracing::error!(%error, "batch commit task failed");
                Revisions::default().record("failed");
                for reply in replies {
                    let _ = reply.send(Err(Error::Internal("batch commit failed".into())));
                }
                return;
            }
        };
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
                // The batches in flight behind this one commit meanwhile (each in
                // its task, on other agents); their completion waits for this.
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
}

/// A batch's size and how long its store commit took, on its span and in the metrics.
fn record_commit(metrics: &Metrics, size: usize, elapsed: Duration) {
    tracing::Span::current().record("elapsed_ms", elapsed.as_secs_f64() * 1000.0);
    tracing::trace!(size, ?elapsed, "batch committed");
    metrics.commit_batch_size.observe(size as f64);
    metrics.commit_duration.observe(elapsed.as_secs_f64());
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
    use crate::config::COMMIT_PIPELINE_DEPTH;
    use crate::domain::agent::{AgentStatus, Event, SlotType};
    use crate::storage::memory::{CommitEvent, MemoryStore};
    use chrono::TimeZone;

    fn setup() -> (Arc<MemoryStore>, Committer) {
        let store = Arc::new(MemoryStore::new());
        let (clock, _) = Clock::manual(chrono::Utc.with_ymd_and_hms(2026, 5, 1, 0, 0, 0).unwrap());
        let committer = Committer::start(
            store.clone(),
            clock,
            AgentCache::new(),
            64,
            COMMIT_PIPELINE_DEPTH,
            crate::metrics::Metrics::new(),
        );
        (store, committer)
    }

    /// A committer at `depth` on a store with `ids` registered, publishing
    /// to the returned receiver, and the store's commit log from then on.
    async fn pipelined(
        depth: usize,
        ids: &[&str],
    ) -> (
        Arc<MemoryStore>,
        Arc<AgentCache>,
        Committer,
        mpsc::UnboundedReceiver<Vec<crate::domain::transition::Transition>>,
        tokio::sync::watch::Receiver<Vec<CommitEvent>>,
    ) {
        let store = Arc::new(MemoryStore::new());
        let (clock, _) = Clock::manual(chrono::Utc.with_ymd_and_hms(2026, 5, 1, 0, 0, 0).unwrap());
        let cache = AgentCache::new();
        let (publish, published) = LocalCommits::channel();
        let committer = Committer::start_publishing(
            store.clone(),
            clock,
            cache.clone(),
            64,
            depth,
            crate::metrics::Metrics::new(),
            Some(publish),
        );
        for id in ids {
            committer.submit(register(id)).await.unwrap();
        }
        let mut published = published;
        while published.try_recv().is_ok() {}
        let log = store.commit_log();
        (store, cache, committer, published, log)
    }

    /// Waits (5 s at most) until the store's log holds `event`.
    async fn logged(log: &mut tokio::sync::watch::Receiver<Vec<CommitEvent>>, event: CommitEvent) {
        let wait = log.wait_for(|events| events.contains(&event));
        tokio::time::timeout(std::time::Duration::from_secs(5), wait)
            .await
            .unwrap_or_else(|_| panic!("no {event:?} within 5 s"))
            .unwrap();
    }

    /// Lets every task that can make progress do so (the tests run on one
    /// thread, and the store waits only for held agents).
    async fn settle() {
        for _ in 0..64 {
            tokio::task::yield_now().await;
        }
    }

    fn started(ids: &[&str]) -> CommitEvent {
        CommitEvent::Started(ids.iter().map(|id| (*id).to_owned()).collect())
    }

    fn finished(ids: &[&str]) -> CommitEvent {
        CommitEvent::Finished(ids.iter().map(|id| (*id).to_owned()).collect())
    }

    fn finish(id: &str) -> Command {
        Command::Apply {
            agent_id: id.into(),
            event: Event::FinishWork,
            fencing_token: None,
            actor: "test".into(),
        }
    }

    /// Submits `command` in a task of its own, which pushes `name` to `answered`
    /// when its reply arrives.
    fn submit_in_task(
        committer: &Committer,
        command: Command,
        name: &'static str,
        answered: &Arc<std::sync::Mutex<Vec<&'static str>>>,
    ) -> tokio::task::JoinHandle<Result<Applied>> {
        let committer = committer.clone();
        let answered = answered.clone();
        tokio::spawn(async move {
            let result = committer.submit(command).await;
            answered.lock().unwrap().push(name);
            result
        })
    }

    #[tokio::test]
    async fn a_batch_of_other_agents_commits_while_one_is_in_flight_and_is_answered_after_it() {
        let (store, cache, committer, mut published, mut log) =
            pipelined(COMMIT_PIPELINE_DEPTH, &["a", "b"]).await;
        let answered = Arc::default();
        store.hold("a");
        let first = submit_in_task(&committer, start("a"), "a", &answered);
        logged(&mut log, started(&["a"])).await;
        let second = submit_in_task(&committer, start("b"), "b", &answered);
        // B's commit starts and ends at the store while A's is held there.
        logged(&mut log, finished(&["b"])).await;
        assert!(!log.borrow().contains(&finished(&["a"])));
        // Its completion waits for A's: no reply, nothing published.
        settle().await;
        assert!(answered.lock().unwrap().is_empty(), "b answered before a");
        assert!(published.try_recv().is_err(), "b published before a");

        store.release("a");
        let a = first.await.unwrap().unwrap();
        let b = second.await.unwrap().unwrap();
        assert_eq!(*answered.lock().unwrap(), ["a", "b"]);
        // B committed first, so its revision is the lower; the fan-out gets
        // the batches in the order they started (and reads such a gap from
        // the table, see fanout's tests).
        let (ra, rb) = (a.agent.revision, b.agent.revision);
        assert_eq!((rb, ra), (3, 4));
        let batches: Vec<Vec<i64>> = [published.recv().await, published.recv().await]
            .into_iter()
            .map(|batch| batch.unwrap().iter().map(|t| t.revision).collect())
            .collect();
        assert_eq!(batches, [vec![ra], vec![rb]]);
        // The cache holds both as committed.
        let known = cache.known(["a", "b"]).expect("both known");
        assert!(
            known
                .iter()
                .all(|agent| agent.state.status == AgentStatus::Busy)
        );
    }

    #[tokio::test]
    async fn a_batch_naming_an_agent_in_flight_starts_only_once_that_batch_is_done() {
        let (store, _, committer, _published, mut log) =
            pipelined(COMMIT_PIPELINE_DEPTH, &["a"]).await;
        let answered = Arc::default();
        store.hold("a");
        let first = submit_in_task(&committer, start("a"), "start", &answered);
        logged(&mut log, started(&["a"])).await;
        let second = submit_in_task(&committer, finish("a"), "finish", &answered);
        settle().await;
        assert_eq!(
            *log.borrow(),
            [started(&["a"])],
            "a second batch on a started"
        );

        store.release("a");
        assert_eq!(
            first.await.unwrap().unwrap().agent.state.status,
            AgentStatus::Busy
        );
        // Decided on the state the first batch committed.
        assert_eq!(
            second.await.unwrap().unwrap().agent.state.status,
            AgentStatus::Idle
        );
        assert_eq!(
            *log.borrow(),
            [
                started(&["a"]),
                finished(&["a"]),
                started(&["a"]),
                finished(&["a"])
            ]
        );
        assert_eq!(*answered.lock().unwrap(), ["start", "finish"]);
    }

    #[tokio::test]
    async fn a_batch_behind_one_in_flight_starts_once_it_is_as_large() {
        let (store, _, committer, _published, mut log) =
            pipelined(COMMIT_PIPELINE_DEPTH, &["a", "b", "c", "d", "e"]).await;
        let answered = Arc::default();
        store.hold("a");
        // Queued before the committer runs: one batch of two.
        let first = [
            submit_in_task(&committer, start("a"), "a", &answered),
            submit_in_task(&committer, start("b"), "b", &answered),
        ];
        logged(&mut log, started(&["a", "b"])).await;
        let c = submit_in_task(&committer, start("c"), "c", &answered);
        settle().await;
        assert_eq!(log.borrow().len(), 1, "a batch of one started behind two");
        let d = submit_in_task(&committer, start("d"), "d", &answered);
        // Two calls now: they start while the first batch is still held.
        logged(&mut log, finished(&["c", "d"])).await;
        store.release("a");
        for call in first.into_iter().chain([c, d]) {
            call.await.unwrap().unwrap();
        }
        assert_eq!(*answered.lock().unwrap(), ["a", "b", "c", "d"]);
        // A lone call with nothing in flight goes at once.
        committer.submit(start("e")).await.unwrap();
    }

    #[tokio::test]
    async fn no_more_than_depth_batches_are_in_flight() {
        let (store, _, committer, _published, mut log) = pipelined(2, &["a", "b", "c"]).await;
        let answered = Arc::default();
        store.hold("a");
        store.hold("b");
        let a = submit_in_task(&committer, start("a"), "a", &answered);
        logged(&mut log, started(&["a"])).await;
        let b = submit_in_task(&committer, start("b"), "b", &answered);
        logged(&mut log, started(&["b"])).await;
        let c = submit_in_task(&committer, start("c"), "c", &answered);
        settle().await;
        assert!(
            !log.borrow().contains(&started(&["c"])),
            "a third batch started"
        );

        // A done, C starts while B is still held.
        store.release("a");
        logged(&mut log, finished(&["c"])).await;
        assert!(!log.borrow().contains(&finished(&["b"])));
        store.release("b");
        for call in [a, b, c] {
            call.await.unwrap().unwrap();
        }
        assert_eq!(*answered.lock().unwrap(), ["a", "b", "c"]);
    }

    fn register(id: &str) -> Command {
        Command::Register {
            agent_id: id.into(),
            labels: Default::default(),
            quota_pools: Vec::new(),
            actor: "test".into(),
        }
    }

    fn start(id: &str) -> Command {
        Command::Apply {
            agent_id: id.into(),
            event: Event::StartWork(SlotType::Work),
            fencing_token: None,
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
