//! The group's session limits, enforced on the host: `max_session_duration`
//! (the user is warned [`WARN_AHEAD_MS`] before, through the warn hook, and
//! the session is ended at the limit) and `idle_disconnect` (a session the
//! streaming server reports idle that long is ended).
//!
//! [`Enforcer`] is the pure core: it takes the open sessions, the limits,
//! the idle reports and `now`, and returns what to do and when it next has
//! something to do. It never reads a clock. [`run`] wraps it in a task that
//! sleeps until that deadline (or until an input arrives): no polling.
//!
//! Sessions count from their start (`Started::at` in the spool), also those
//! that started before the policy arrived; a user with less than
//! [`WARN_AHEAD_MS`] left when the policy arrives is warned at once, and a
//! limit already passed then ends the session at once (after a warning). Idleness is
//! not persisted: after a restart every session counts as active until the
//! streaming server reports it idle again.
//!
//! Ending a session is the disconnect hook, then exactly one
//! `Ended { reason: MaxSessionDuration | Idle }` in the spool. While the hook
//! runs the session is in the [`EnforcerHandle`]'s ending set: if the
//! streaming server reports the end the hook caused (`SessionEnd` on the
//! local socket), the local socket records it with the enforcer's reason, and
//! the enforcer's own record then finds the session closed and writes
//! nothing. The spool refuses an end for a session that is not open, so a
//! session is never ended twice, whoever reports first (the broker's
//! `DisconnectSession` works the same way: the hook, then the host's report).
//! An end whose hook fails (or that has no disconnect hook: the agent cannot
//! enforce a limit without one) is logged and retried after [`RETRY_MS`].

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use ferry_common::duration::format_duration;
use ferry_common::wire::{EndReason, OpenSession, SessionEvent};
use ferry_common::{SessionId, UnixMillis};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::config::HooksConfig;
use crate::policy::SessionLimits;
use crate::spool::{SpoolError, SpoolHandle};

/// How long before `max_session_duration` the user is warned.
pub const WARN_AHEAD_MS: i64 = 5 * 60 * 1000;

/// How long after a failed end the enforcer tries again.
pub const RETRY_MS: i64 = 60 * 1000;

/// Idle and active reports buffered between the local socket and the task.
const INPUTS_LEN: usize = 64;

/// What the enforcer decided.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// Run the warn hook for `session`: it ends at `deadline`.
    Warn {
        session: SessionId,
        deadline: UnixMillis,
        message: String,
    },
    /// End `session` (disconnect hook, then `Ended` with `reason`).
    End {
        session: SessionId,
        reason: EndReason,
    },
}

/// One open session as the enforcer follows it.
#[derive(Clone, Debug)]
struct Tracked {
    /// When it started (host clock).
    started_at: UnixMillis,
    /// Reported idle since then; `None`: active.
    idle_since: Option<UnixMillis>,
    /// The end time its user was warned of (a changed limit warns again).
    warned_for: Option<UnixMillis>,
    /// An end is in progress.
    ending: bool,
    /// A failed end is not tried again before this.
    retry_at: Option<UnixMillis>,
}

/// The pure core: sessions, limits, deadlines.
#[derive(Debug, Default)]
pub struct Enforcer {
    limits: SessionLimits,
    sessions: BTreeMap<SessionId, Tracked>,
}

fn add_ms(t: UnixMillis, ms: u64) -> UnixMillis {
    UnixMillis(t.0.saturating_add(i64::try_from(ms).unwrap_or(i64::MAX)))
}

impl Enforcer {
    pub fn limits(&self) -> SessionLimits {
        self.limits
    }

    pub fn set_limits(&mut self, limits: SessionLimits) {
        self.limits = limits;
    }

    /// Follows the host's open sessions: new ones are added (counting from
    /// their start), ended ones forgotten.
    pub fn sync_open(&mut self, open: &[OpenSession]) {
        let mut next = BTreeMap::new();
        for s in open {
            let tracked = self.sessions.remove(&s.session).unwrap_or(Tracked {
                started_at: s.started_at,
                idle_since: None,
                warned_for: None,
                ending: false,
                retry_at: None,
            });
            next.insert(s.session.clone(), tracked);
        }
        self.sessions = next;
    }

    /// The streaming server says `session` has had no input since `since`
    /// (never before its start). `false`: not an open session.
    pub fn idle(&mut self, session: &SessionId, since: UnixMillis) -> bool {
        match self.sessions.get_mut(session) {
            Some(t) => {
                t.idle_since = Some(since.max(t.started_at));
                true
            }
            None => false,
        }
    }

    /// The session has input again. `false`: not an open session.
    pub fn active(&mut self, session: &SessionId) -> bool {
        match self.sessions.get_mut(session) {
            Some(t) => {
                t.idle_since = None;
                true
            }
            None => false,
        }
    }

    /// An end finished: `ended` (the session is closed in the spool) or not,
    /// in which case it is tried again [`RETRY_MS`] after `now`.
    pub fn end_finished(&mut self, session: &SessionId, ended: bool, now: UnixMillis) {
        if ended {
            self.sessions.remove(session);
        } else if let Some(t) = self.sessions.get_mut(session) {
            t.ending = false;
            t.retry_at = Some(UnixMillis(now.0.saturating_add(RETRY_MS)));
        }
    }

    /// The session's end by the limits: when and why.
    fn end_of(&self, t: &Tracked) -> Option<(UnixMillis, EndReason)> {
        let max = self
            .limits
            .max_session_duration_ms
            .map(|ms| (add_ms(t.started_at, ms), EndReason::MaxSessionDuration));
        let idle = match (self.limits.idle_disconnect_ms, t.idle_since) {
            (Some(ms), Some(since)) => Some((add_ms(since, ms), EndReason::Idle)),
            _ => None,
        };
        let end = match (max, idle) {
            (Some(m), Some(i)) => Some(if i.0 < m.0 { i } else { m }),
            (m, i) => m.or(i),
        };
        end.map(|(at, why)| (t.retry_at.map_or(at, |r| at.max(r)), why))
    }

    /// When the user must be warned of the max duration, if not yet.
    fn warning_of(&self, t: &Tracked) -> Option<(UnixMillis, UnixMillis)> {
        let ms = self.limits.max_session_duration_ms?;
        let deadline = add_ms(t.started_at, ms);
        if t.warned_for == Some(deadline) {
            return None;
        }
        Some((
            UnixMillis(deadline.0.saturating_sub(WARN_AHEAD_MS)),
            deadline,
        ))
    }

    /// What is due at `now`; each action is returned once.
    pub fn poll(&mut self, now: UnixMillis) -> Vec<Action> {
        let mut actions = Vec::new();
        let max = self.limits.max_session_duration_ms;
        let ids: Vec<SessionId> = self
            .sessions
            .iter()
            .filter(|(_, t)| !t.ending)
            .map(|(id, _)| id.clone())
            .collect();
        for id in ids {
            let Some(t) = self.sessions.get(&id) else {
                continue;
            };
            let end = self.end_of(t).filter(|(at, _)| *at <= now);
            let warn = self.warning_of(t).filter(|(at, _)| *at <= now);
            let Some(t) = self.sessions.get_mut(&id) else {
                continue;
            };
            if let Some((_, deadline)) = warn {
                t.warned_for = Some(deadline);
                let left = deadline.0.saturating_sub(now.0).max(0);
                let minutes = (left + 59_999) / 60_000;
                let limit = format_duration(Duration::from_millis(max.unwrap_or(0)));
                actions.push(Action::Warn {
                    session: id.clone(),
                    deadline,
                    message: if minutes == 0 {
                        format!("this session reached the group's maximum session duration of {limit} and is ending now")
                    } else {
                        format!("this session reaches the group's maximum session duration of {limit} and ends in {minutes} minute(s)")
                    },
                });
            }
            if let Some((_, reason)) = end {
                t.ending = true;
                actions.push(Action::End {
                    session: id.clone(),
                    reason,
                });
            }
        }
        actions
    }

    /// The next time [`Enforcer::poll`] has something to do.
    pub fn next_deadline(&self) -> Option<UnixMillis> {
        self.sessions
            .values()
            .filter(|t| !t.ending)
            .flat_map(|t| {
                [
                    self.end_of(t).map(|(at, _)| at),
                    self.warning_of(t).map(|(at, _)| at),
                ]
            })
            .flatten()
            .min()
    }
}

/// Why an idle or active report was refused.
#[derive(Debug, thiserror::Error)]
pub enum EnforceError {
    #[error("the agent is shutting down")]
    Closed,
}

enum Input {
    Idle {
        session: SessionId,
        since: UnixMillis,
    },
    Active {
        session: SessionId,
    },
}

/// The local socket's side: idle/active reports in, the reason of an end in
/// progress out.
#[derive(Clone, Debug)]
pub struct EnforcerHandle {
    inputs: mpsc::Sender<Input>,
    /// Sessions being ended by the enforcer, with the reason to record.
    ending: Arc<Mutex<BTreeMap<SessionId, EndReason>>>,
}

impl std::fmt::Debug for Input {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Input::Idle { session, since } => write!(f, "Idle({session}, {})", since.0),
            Input::Active { session } => write!(f, "Active({session})"),
        }
    }
}

/// The task's side of [`EnforcerHandle`].
pub struct EnforcerInputs {
    inputs: mpsc::Receiver<Input>,
    ending: Arc<Mutex<BTreeMap<SessionId, EndReason>>>,
}

/// A connected handle and inputs.
pub fn channel() -> (EnforcerHandle, EnforcerInputs) {
    let (tx, rx) = mpsc::channel(INPUTS_LEN);
    let ending = Arc::default();
    (
        EnforcerHandle {
            inputs: tx,
            ending: Arc::clone(&ending),
        },
        EnforcerInputs { inputs: rx, ending },
    )
}

impl EnforcerHandle {
    /// `session` (open: the caller checked) is idle since `since`.
    pub async fn idle(&self, session: SessionId, since: UnixMillis) -> Result<(), EnforceError> {
        self.inputs
            .send(Input::Idle { session, since })
            .await
            .map_err(|_| EnforceError::Closed)
    }

    /// `session` has input again.
    pub async fn active(&self, session: SessionId) -> Result<(), EnforceError> {
        self.inputs
            .send(Input::Active { session })
            .await
            .map_err(|_| EnforceError::Closed)
    }

    /// The reason to record for `session` if the enforcer is ending it.
    pub fn ending_reason(&self, session: &SessionId) -> Option<EndReason> {
        self.ending
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(session)
            .cloned()
    }
}

#[cfg(test)]
impl EnforcerHandle {
    /// As the task does while it ends `session`.
    pub(crate) fn mark_ending(&self, session: SessionId, reason: EndReason) {
        self.ending
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(session, reason);
    }
}

#[cfg(test)]
impl EnforcerInputs {
    /// The next report: the session and `Some(since)` for idle, `None` for
    /// active.
    pub(crate) async fn next(&mut self) -> Option<(SessionId, Option<UnixMillis>)> {
        self.inputs.recv().await.map(|i| match i {
            Input::Idle { session, since } => (session, Some(since)),
            Input::Active { session } => (session, None),
        })
    }
}

/// What the enforcer task works with.
pub struct EnforcerTask {
    /// Open sessions (and where ends are recorded).
    pub spool: SpoolHandle,
    /// The applied policy's limits.
    pub limits: watch::Receiver<SessionLimits>,
    /// The warn and disconnect hooks.
    pub hooks: HooksConfig,
    /// Where their runs are counted.
    pub metrics: crate::metrics::AgentMetrics,
    /// Forgets a session's presence when it is ended.
    pub presence: crate::presence::PresenceBoard,
}

/// How a job ended.
enum JobDone {
    Warned,
    Ended { session: SessionId, ended: bool },
}

/// Runs the enforcer until `shutdown`: sleeps until its next deadline, an
/// input, a spool change or a policy change.
pub async fn run(task: EnforcerTask, inputs: EnforcerInputs, shutdown: CancellationToken) {
    let EnforcerInputs {
        inputs: mut rx,
        ending,
    } = inputs;
    let EnforcerTask {
        spool,
        mut limits,
        hooks,
        metrics,
        presence,
    } = task;
    let mut core = Enforcer::default();
    core.set_limits(*limits.borrow_and_update());
    let mut appended = spool.subscribe_appended();
    let mut jobs = Jobs {
        set: JoinSet::new(),
        hooks,
        metrics,
        spool: spool.clone(),
        presence,
        ending,
    };
    loop {
        appended.borrow_and_update();
        let open = spool.lock().open_sessions();
        core.sync_open(&open);
        jobs.start(core.poll(crate::clock::now()));
        let sleep = core.next_deadline().map(|at| {
            let ms = at.0.saturating_sub(crate::clock::now().0).max(0);
            Duration::from_millis(u64::try_from(ms).unwrap_or(0))
        });
        tokio::select! {
            _ = shutdown.cancelled() => return,
            changed = appended.changed() => {
                if changed.is_err() {
                    return;
                }
            }
            changed = limits.changed() => {
                if changed.is_err() {
                    return;
                }
                set_limits(&mut core, *limits.borrow_and_update());
            }
            input = rx.recv() => {
                let Some(input) = input else { return };
                report(&mut core, &spool, input);
            }
            Some(done) = jobs.set.join_next(), if !jobs.set.is_empty() => {
                if let Ok(JobDone::Ended { session, ended }) = done {
                    core.end_finished(&session, ended, crate::clock::now());
                }
            }
            _ = sleep_for(sleep) => {}
        }
    }
}

/// A policy's new limits, logged when they changed.
fn set_limits(core: &mut Enforcer, l: SessionLimits) {
    if l != core.limits() {
        tracing::info!(max_session_duration_ms = ?l.max_session_duration_ms, idle_disconnect_ms = ?l.idle_disconnect_ms, "session limits changed");
    }
    core.set_limits(l);
}

/// An idle or active report.
fn report(core: &mut Enforcer, spool: &SpoolHandle, input: Input) {
    // A report may name a session started since the last sync.
    let open = spool.lock().open_sessions();
    core.sync_open(&open);
    let known = match &input {
        Input::Idle { session, since } => core.idle(session, *since),
        Input::Active { session } => core.active(session),
    };
    if !known {
        tracing::debug!(?input, "idle report for a session that is not open");
    }
}

/// The warn and end jobs running, with what they use.
struct Jobs {
    set: JoinSet<JobDone>,
    hooks: HooksConfig,
    metrics: crate::metrics::AgentMetrics,
    spool: SpoolHandle,
    presence: crate::presence::PresenceBoard,
    /// The sessions being ended by the enforcer, with why.
    ending: Arc<Mutex<BTreeMap<SessionId, EndReason>>>,
}

impl Jobs {
    /// One job per action. A session past its limit when the policy arrives
    /// is warned and ended in one poll: its warning goes first, in the same
    /// job.
    fn start(&mut self, actions: Vec<Action>) {
        let ending_now: Vec<SessionId> = actions
            .iter()
            .filter_map(|a| match a {
                Action::End { session, .. } => Some(session.clone()),
                Action::Warn { .. } => None,
            })
            .collect();
        let mut warnings: HashMap<SessionId, (UnixMillis, String)> = HashMap::new();
        for action in actions {
            match action {
                Action::Warn {
                    session,
                    deadline,
                    message,
                } => {
                    if ending_now.contains(&session) {
                        warnings.insert(session, (deadline, message));
                        continue;
                    }
                    let (hooks, metrics) = (self.hooks.clone(), self.metrics.clone());
                    self.set.spawn(async move {
                        warn(&metrics, &hooks, &session, &message, deadline).await;
                        JobDone::Warned
                    });
                }
                Action::End { session, reason } => {
                    let warning = warnings.remove(&session);
                    self.start_end(session, reason, warning);
                }
            }
        }
    }

    /// Ends `session` (after its `warning`, if it has one due now).
    fn start_end(
        &mut self,
        session: SessionId,
        reason: EndReason,
        warning: Option<(UnixMillis, String)>,
    ) {
        self.ending
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(session.clone(), reason.clone());
        let metrics = self.metrics.clone();
        let (hooks, spool, presence, ending) = (
            self.hooks.clone(),
            self.spool.clone(),
            self.presence.clone(),
            self.ending.clone(),
        );
        self.set.spawn(async move {
            if let Some((deadline, message)) = warning {
                warn(&metrics, &hooks, &session, &message, deadline).await;
            }
            let ended = end_session(&metrics, &hooks, &spool, &session, reason).await;
            ending
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .remove(&session);
            if ended {
                presence.forget(&session);
            }
            JobDone::Ended { session, ended }
        });
    }
}

/// Runs the warn hook for `session`, logging the outcome.
async fn warn(
    metrics: &crate::metrics::AgentMetrics,
    hooks: &HooksConfig,
    session: &SessionId,
    message: &str,
    deadline: UnixMillis,
) {
    match crate::commands::run_warn_hook(metrics, hooks, session, message, deadline).await {
        Ok(()) => {
            tracing::info!(%session, deadline = deadline.0, "session warned of its maximum duration")
        }
        Err(e) => tracing::warn!(%session, error = %e, "session warning failed"),
    }
}

/// Sleeps `d`; forever when there is nothing to wait for.
async fn sleep_for(d: Option<Duration>) {
    match d {
        Some(d) => tokio::time::sleep(d).await,
        None => std::future::pending().await,
    }
}

/// The disconnect hook, then the `Ended` record; `true` when the session is
/// closed in the spool afterwards (by this record or the host's report).
async fn end_session(
    metrics: &crate::metrics::AgentMetrics,
    hooks: &HooksConfig,
    spool: &SpoolHandle,
    session: &SessionId,
    reason: EndReason,
) -> bool {
    tracing::info!(%session, ?reason, "ending session by the group's policy");
    let Some(argv) = &hooks.disconnect else {
        tracing::error!(%session, ?reason, "cannot end the session: no disconnect hook configured ([hooks] disconnect); trying again later");
        return false;
    };
    if let Err(e) =
        crate::commands::run_disconnect_hook(metrics, argv, session, hooks.timeout).await
    {
        tracing::warn!(%session, error = %e, "ending session failed; trying again later");
        // The hook may have ended it anyway (and the host reported it).
        return !is_open(spool, session);
    }
    let event = SessionEvent::Ended {
        session: session.clone(),
        at: crate::clock::now(),
        reason: reason.clone(),
    };
    match spool.append(event).await {
        Ok(seq) => {
            tracing::info!(%session, ?reason, seq, "session ended by the group's policy");
            true
        }
        // The host reported the end the hook caused first (with this reason).
        Err(SpoolError::UnknownSession(_)) => true,
        Err(e) => {
            tracing::error!(%session, error = %e, "record the end of a session");
            !is_open(spool, session)
        }
    }
}

fn is_open(spool: &SpoolHandle, session: &SessionId) -> bool {
    spool
        .lock()
        .open_sessions()
        .iter()
        .any(|s| &s.session == session)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIN: i64 = 60_000;

    fn sid(s: &str) -> SessionId {
        s.parse().unwrap()
    }

    fn open(list: &[(&str, i64)]) -> Vec<OpenSession> {
        list.iter()
            .map(|(s, at)| OpenSession {
                session: sid(s),
                user: "u".parse().unwrap(),
                started_at: UnixMillis(*at),
            })
            .collect()
    }

    fn limits(max_min: Option<i64>, idle_min: Option<i64>) -> SessionLimits {
        SessionLimits {
            max_session_duration_ms: max_min.map(|m| (m * MIN) as u64),
            idle_disconnect_ms: idle_min.map(|m| (m * MIN) as u64),
        }
    }

    /// Jumps virtual time from deadline to deadline until `until`,
    /// collecting (time, action).
    fn run_until(e: &mut Enforcer, from: i64, until: i64) -> Vec<(i64, Action)> {
        let mut out = Vec::new();
        let mut now = from;
        loop {
            for a in e.poll(UnixMillis(now)) {
                out.push((now, a));
            }
            match e.next_deadline() {
                Some(at) if at.0 <= until => now = at.0.max(now),
                _ => return out,
            }
        }
    }

    fn kinds(actions: &[(i64, Action)]) -> Vec<(i64, &str, String)> {
        actions
            .iter()
            .map(|(t, a)| match a {
                Action::Warn { session, .. } => (*t, "warn", session.to_string()),
                Action::End { session, reason } => (
                    *t,
                    if *reason == EndReason::Idle {
                        "end-idle"
                    } else {
                        "end-max"
                    },
                    session.to_string(),
                ),
            })
            .collect()
    }

    #[test]
    fn a_session_is_warned_five_minutes_before_the_limit_and_ended_at_it() {
        let mut e = Enforcer::default();
        e.set_limits(limits(Some(60), None));
        e.sync_open(&open(&[("a", 0), ("b", 10 * MIN)]));
        let got = run_until(&mut e, 0, 1000 * MIN);
        assert_eq!(
            kinds(&got),
            [
                (55 * MIN, "warn", "a".into()),
                (60 * MIN, "end-max", "a".into()),
                (65 * MIN, "warn", "b".into()),
                (70 * MIN, "end-max", "b".into()),
            ]
        );
        let Action::Warn {
            deadline, message, ..
        } = &got[0].1
        else {
            panic!()
        };
        assert_eq!(*deadline, UnixMillis(60 * MIN));
        assert!(message.contains("5 minute"), "{message}");
        // Ending: nothing more is due for them until the end finishes.
        assert_eq!(e.next_deadline(), None);
    }

    #[test]
    fn sessions_older_than_the_policy_count_from_their_start() {
        let mut e = Enforcer::default();
        e.sync_open(&open(&[
            ("old", 0),
            ("older", -100 * MIN),
            ("new", 50 * MIN),
        ]));
        assert!(e.poll(UnixMillis(58 * MIN)).is_empty());
        assert_eq!(e.next_deadline(), None);
        // The policy arrives at minute 58: "old" has 2 minutes left (warned
        // at once), "older" is past its limit (warned and ended at once).
        e.set_limits(limits(Some(60), None));
        let got = run_until(&mut e, 58 * MIN, 1000 * MIN);
        assert_eq!(
            kinds(&got),
            [
                (58 * MIN, "warn", "old".into()),
                (58 * MIN, "warn", "older".into()),
                (58 * MIN, "end-max", "older".into()),
                (60 * MIN, "end-max", "old".into()),
                (105 * MIN, "warn", "new".into()),
                (110 * MIN, "end-max", "new".into()),
            ]
        );
        let Action::Warn { message, .. } = &got[0].1 else {
            panic!()
        };
        assert!(message.contains("2 minute"), "{message}");
    }

    #[test]
    fn idle_sessions_are_ended_and_activity_resets_them() {
        let mut e = Enforcer::default();
        e.set_limits(limits(None, Some(10)));
        e.sync_open(&open(&[("a", 0), ("b", 0)]));
        assert_eq!(e.next_deadline(), None);
        assert!(e.idle(&sid("a"), UnixMillis(5 * MIN)));
        // Reported idle since before its start: counts from the start.
        assert!(e.idle(&sid("b"), UnixMillis(-50 * MIN)));
        assert!(!e.idle(&sid("gone"), UnixMillis(0)));
        assert_eq!(e.next_deadline(), Some(UnixMillis(10 * MIN)));
        assert_eq!(
            kinds(
                &e.poll(UnixMillis(10 * MIN))
                    .into_iter()
                    .map(|a| (10 * MIN, a))
                    .collect::<Vec<_>>()
            ),
            [(10 * MIN, "end-idle", "b".into())]
        );
        // "a" had input at minute 12: its idle deadline is gone.
        assert!(e.active(&sid("a")));
        assert_eq!(e.next_deadline(), None);
        e.idle(&sid("a"), UnixMillis(20 * MIN));
        assert_eq!(e.next_deadline(), Some(UnixMillis(30 * MIN)));
        // Lifting the limit lifts the deadline.
        e.set_limits(SessionLimits::default());
        assert_eq!(e.next_deadline(), None);
    }

    #[test]
    fn the_earlier_limit_ends_the_session() {
        let mut e = Enforcer::default();
        e.set_limits(limits(Some(60), Some(10)));
        e.sync_open(&open(&[("a", 0)]));
        e.idle(&sid("a"), UnixMillis(52 * MIN));
        let got = run_until(&mut e, 52 * MIN, 1000 * MIN);
        assert_eq!(
            kinds(&got),
            [
                (55 * MIN, "warn", "a".into()),
                (60 * MIN, "end-max", "a".into())
            ]
        );
        let mut e = Enforcer::default();
        e.set_limits(limits(Some(60), Some(10)));
        e.sync_open(&open(&[("a", 0)]));
        e.idle(&sid("a"), UnixMillis(30 * MIN));
        let got = run_until(&mut e, 30 * MIN, 1000 * MIN);
        assert_eq!(kinds(&got), [(40 * MIN, "end-idle", "a".into())]);
    }

    #[test]
    fn a_failed_end_is_retried_later_and_an_ended_session_is_forgotten() {
        let mut e = Enforcer::default();
        e.set_limits(limits(Some(60), None));
        e.sync_open(&open(&[("a", 0), ("b", 0)]));
        let got = run_until(&mut e, 0, 60 * MIN);
        assert_eq!(got.len(), 4);
        // Each end is handed out once, however often poll runs.
        assert!(e.poll(UnixMillis(61 * MIN)).is_empty());
        e.end_finished(&sid("a"), false, UnixMillis(61 * MIN));
        e.end_finished(&sid("b"), true, UnixMillis(61 * MIN));
        assert_eq!(e.next_deadline(), Some(UnixMillis(61 * MIN + RETRY_MS)));
        assert!(e.poll(UnixMillis(61 * MIN + RETRY_MS - 1)).is_empty());
        assert_eq!(
            e.poll(UnixMillis(61 * MIN + RETRY_MS)),
            [Action::End {
                session: sid("a"),
                reason: EndReason::MaxSessionDuration
            }]
        );
        // The host reported "a" ended meanwhile: forgotten, nothing due.
        e.sync_open(&[]);
        assert_eq!(e.next_deadline(), None);
    }

    #[test]
    fn a_longer_limit_warns_again_for_the_new_end() {
        let mut e = Enforcer::default();
        e.set_limits(limits(Some(60), None));
        e.sync_open(&open(&[("a", 0)]));
        assert_eq!(e.poll(UnixMillis(56 * MIN)).len(), 1);
        e.set_limits(limits(Some(120), None));
        assert_eq!(e.next_deadline(), Some(UnixMillis(115 * MIN)));
        let got = run_until(&mut e, 56 * MIN, 1000 * MIN);
        assert_eq!(
            kinds(&got),
            [
                (115 * MIN, "warn", "a".into()),
                (120 * MIN, "end-max", "a".into())
            ]
        );
    }
}
