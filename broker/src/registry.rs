//! Live state of connected resources: which connection serves each resource,
//! whether it is available, draining, its last health, its group and
//! streaming address; and the way to send it a command.
//!
//! A leaf: the registry knows connections, not groups. The link writes it,
//! the group actors, the rollouts and the admin socket read it and send
//! commands through it; it holds no reference to any of them (ownership
//! flows one way, from the daemon down). Connection ids only grow, so a
//! report of a replaced connection can be told from the current one's.
//!
//! Why a `std::sync::Mutex` and not an actor: every operation is a short map
//! update or copy with no I/O and no `.await` while the lock is held (the
//! methods are synchronous, so the compiler enforces it). Connection tasks
//! touch it a few times per health interval; an actor would add a hop and a
//! queue to every one of those for no gain. Commands, which do wait, clone the
//! connection's command sender under the lock and await after releasing it.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ferry_common::wire::{
    Command, CommandOutcome, HealthReport, Inventory, Refusal, StreamingProtocol,
};
use ferry_common::{GroupName, ResourceId, UnixMillis};
use tokio::sync::{mpsc, oneshot, watch};
use tokio_util::sync::CancellationToken;

/// How long an admin command waits for the agent's `CommandResult`. Drain and
/// undrain are immediate on the host; a disconnect hook gets a few seconds.
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(15);

/// A command for one connection, answered through `reply`.
pub struct CommandRequest {
    /// What the agent should do.
    pub command: Command,
    /// Receives the agent's outcome; dropped if the connection ends first.
    pub reply: oneshot::Sender<CommandOutcome>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CommandError {
    #[error("resource {0} is not connected")]
    NotConnected(ResourceId),
    #[error("resource {0} did not answer within {1:?}")]
    Timeout(ResourceId, Duration),
    #[error("connection of resource {0} closed before it answered")]
    ConnectionClosed(ResourceId),
}

/// What the registry knows about one connected resource.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LiveResource {
    /// Reporting health on time: may take new sessions.
    pub available: bool,
    /// The host reports it takes no new sessions.
    pub draining: bool,
    /// Broker clock when the last health report arrived.
    pub last_health_at: Option<UnixMillis>,
    /// The last health report.
    pub last_health: Option<HealthReport>,
    /// What the host runs, from its last `Inventory` on this connection
    /// (checked against the limits by the link); `None` until the first.
    pub inventory: Option<Inventory>,
    /// The group its `Hello` named. Kept so a group whose actor starts
    /// after the agent connected (published later, broker restart, a
    /// scale-out asking for this elastic id) takes the host in at once.
    pub group: Option<GroupName>,
    /// Where end users reach its streaming server: the address the agent
    /// reported, or a guess from its connection until it does.
    pub streaming: Option<StreamingTarget>,
    /// The agent has reported its streaming server on this connection
    /// (right after `Welcome`): `streaming` is no longer a guess.
    pub streaming_reported: bool,
}

/// Where end users reach a host's streaming server, and what it speaks.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StreamingTarget {
    /// `host:port` (`[v6]:port`).
    pub address: String,
    /// `None`: the agent did not say (an older agent, or none configured).
    pub protocol: Option<StreamingProtocol>,
}

/// Why the broker ended a connection ([`Registry::dismiss`]); shared by
/// the registry and the connection's task.
pub type Dismissal = Arc<Mutex<Option<Refusal>>>;

struct Entry {
    /// Which connection serves the resource; stale connections must not
    /// overwrite the state of the one that replaced them.
    conn_id: u64,
    /// Cancelled when a newer connection of the same resource registers,
    /// or when the broker dismisses the connection ([`Registry::dismiss`]).
    superseded: CancellationToken,
    /// Why the broker dismissed the connection, if it did.
    dismissal: Dismissal,
    /// The connection task's command inbox.
    commands: mpsc::Sender<CommandRequest>,
    live: LiveResource,
}

/// Live state shared by the link, the admin socket and the daemon.
pub struct Registry {
    /// Connected resources; see the module doc for why a std mutex.
    resources: Mutex<HashMap<ResourceId, Entry>>,
    /// Source of connection ids.
    next_conn: AtomicU64,
    /// Bumped after every change, for whoever wants to wait for one (tests,
    /// watchers) instead of polling.
    generation: watch::Sender<u64>,
}

impl Default for Registry {
    fn default() -> Self {
        Registry {
            resources: Mutex::default(),
            next_conn: AtomicU64::new(0),
            generation: watch::Sender::new(0),
        }
    }
}

impl Registry {
    pub fn new() -> Registry {
        Registry::default()
    }

    /// A receiver that sees a new value after every change of live state.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.generation.subscribe()
    }

    /// Reads the map without signalling a change.
    fn peek<T>(&self, f: impl FnOnce(&HashMap<ResourceId, Entry>) -> T) -> T {
        let guard = self
            .resources
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        f(&guard)
    }

    /// Changes the map and signals subscribers.
    fn with<T>(&self, f: impl FnOnce(&mut HashMap<ResourceId, Entry>) -> T) -> T {
        // A panic while holding this lock cannot leave the map half-updated in
        // a way that matters (each update is one insert/field write), so a
        // poisoned lock is recovered rather than propagated.
        let out = {
            let mut guard = self
                .resources
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            f(&mut guard)
        };
        self.generation.send_modify(|g| *g = g.wrapping_add(1));
        out
    }

    /// A fresh id for a new connection.
    pub fn next_conn_id(&self) -> u64 {
        self.next_conn.fetch_add(1, Ordering::Relaxed) + 1
    }

    /// Registers `conn_id` as the connection of `resource`, available and not
    /// draining. An older connection of the same resource is told through its
    /// `superseded` token.
    pub fn attach(
        &self,
        resource: &ResourceId,
        conn_id: u64,
        group: Option<GroupName>,
        superseded: CancellationToken,
        dismissal: Dismissal,
        commands: mpsc::Sender<CommandRequest>,
    ) {
        let old = self.with(|map| {
            map.insert(
                resource.clone(),
                Entry {
                    conn_id,
                    superseded,
                    dismissal,
                    commands,
                    live: LiveResource {
                        available: true,
                        draining: false,
                        last_health_at: None,
                        last_health: None,
                        inventory: None,
                        group,
                        streaming: None,
                        streaming_reported: false,
                    },
                },
            )
        });
        if let Some(old) = old {
            old.superseded.cancel();
        }
    }

    /// Ends the current connection of `resource`, if any, with `refusal`
    /// (its link sends it and closes; the agent reconnects and is checked
    /// again): for a change the connection was accepted under, such as the
    /// host's group. Returns whether a connection was dismissed.
    pub fn dismiss(&self, resource: &ResourceId, refusal: Refusal) -> bool {
        self.peek(|map| match map.get(resource) {
            Some(e) => {
                *e.dismissal
                    .lock()
                    .unwrap_or_else(|poisoned| poisoned.into_inner()) = Some(refusal);
                e.superseded.cancel();
                true
            }
            None => false,
        })
    }

    /// Forgets the connection, if it is still the resource's current one;
    /// returns whether it was.
    pub fn detach(&self, resource: &ResourceId, conn_id: u64) -> bool {
        self.with(|map| {
            if map.get(resource).is_some_and(|e| e.conn_id == conn_id) {
                map.remove(resource);
                true
            } else {
                false
            }
        })
    }

    fn update(&self, resource: &ResourceId, conn_id: u64, f: impl FnOnce(&mut LiveResource)) {
        self.with(|map| {
            if let Some(e) = map.get_mut(resource).filter(|e| e.conn_id == conn_id) {
                f(&mut e.live);
            }
        });
    }

    /// Records a health report: the resource is available again.
    pub fn health(
        &self,
        resource: &ResourceId,
        conn_id: u64,
        report: HealthReport,
        now: UnixMillis,
    ) {
        self.update(resource, conn_id, |l| {
            l.available = true;
            l.draining = report.draining;
            l.last_health_at = Some(now);
            l.last_health = Some(report);
        });
    }

    /// Records what the host runs now.
    pub fn set_inventory(&self, resource: &ResourceId, conn_id: u64, inventory: Inventory) {
        self.update(resource, conn_id, |l| l.inventory = Some(inventory));
    }

    /// Records where end users reach the host's streaming server, until
    /// its agent says (a guess from its connection).
    pub fn set_streaming(&self, resource: &ResourceId, conn_id: u64, target: StreamingTarget) {
        self.update(resource, conn_id, |l| l.streaming = Some(target));
    }

    /// Records that the agent reported its streaming server: `target`, or
    /// nothing usable (`None`: the guess stays).
    pub fn streaming_reported(
        &self,
        resource: &ResourceId,
        conn_id: u64,
        target: Option<StreamingTarget>,
    ) {
        self.update(resource, conn_id, |l| {
            if let Some(t) = target {
                l.streaming = Some(t);
            }
            l.streaming_reported = true;
        });
    }

    /// Where end users reach `resource`'s streaming server, once its agent
    /// has said on its current connection, waiting at most `within` for it
    /// (a host that just joined says right after its `Welcome`); the guess
    /// when it has not said by then; `None` when it is not connected here.
    pub async fn reported_streaming(
        &self,
        resource: &ResourceId,
        within: std::time::Duration,
    ) -> Option<StreamingTarget> {
        // Subscribed before looking: a change in between wakes the wait.
        let mut changes = self.subscribe();
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let (reported, streaming) = self.peek(|map| {
                map.get(resource)
                    .map(|e| (e.live.streaming_reported, e.live.streaming.clone()))
            })?;
            if reported {
                return streaming;
            }
            match tokio::time::timeout_at(deadline, changes.changed()).await {
                Ok(Ok(())) => {}
                _ => return streaming,
            }
        }
    }

    /// The connected resources whose `Hello` named `group`, with their
    /// connection ids, in id order.
    pub fn members(&self, group: &GroupName) -> Vec<(ResourceId, u64, LiveResource)> {
        let mut out: Vec<_> = self.peek(|map| {
            map.iter()
                .filter(|(_, e)| e.live.group.as_ref() == Some(group))
                .map(|(r, e)| (r.clone(), e.conn_id, e.live.clone()))
                .collect()
        });
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out
    }

    /// The connection id and live state of one connected resource.
    pub fn get(&self, resource: &ResourceId) -> Option<(u64, LiveResource)> {
        self.peek(|map| map.get(resource).map(|e| (e.conn_id, e.live.clone())))
    }

    /// The last inventory of a connected resource.
    pub fn inventory(&self, resource: &ResourceId) -> Option<Inventory> {
        self.peek(|map| map.get(resource).and_then(|e| e.live.inventory.clone()))
    }

    /// Marks the resource (un)available, e.g. after missed health reports.
    pub fn set_available(&self, resource: &ResourceId, conn_id: u64, available: bool) {
        self.update(resource, conn_id, |l| l.available = available);
    }

    /// Records the drain state the agent confirmed.
    pub fn set_draining(&self, resource: &ResourceId, draining: bool) {
        self.with(|map| {
            if let Some(e) = map.get_mut(resource) {
                e.live.draining = draining;
            }
        });
    }

    /// Live state of every connected resource.
    pub fn snapshot(&self) -> HashMap<ResourceId, LiveResource> {
        self.peek(|map| {
            map.iter()
                .map(|(k, e)| (k.clone(), e.live.clone()))
                .collect()
        })
    }

    /// Number of connected resources.
    pub fn connected(&self) -> usize {
        self.peek(|map| map.len())
    }

    /// Sends a command to the resource's agent and waits for its outcome.
    pub async fn command(
        &self,
        resource: &ResourceId,
        command: Command,
        timeout: Duration,
    ) -> Result<CommandOutcome, CommandError> {
        let sender = self
            .peek(|map| map.get(resource).map(|e| e.commands.clone()))
            .ok_or_else(|| CommandError::NotConnected(resource.clone()))?;
        let (reply, rx) = oneshot::channel();
        let exchange = async {
            sender
                .send(CommandRequest { command, reply })
                .await
                .map_err(|_| CommandError::ConnectionClosed(resource.clone()))?;
            rx.await
                .map_err(|_| CommandError::ConnectionClosed(resource.clone()))
        };
        tokio::time::timeout(timeout, exchange)
            .await
            .map_err(|_| CommandError::Timeout(resource.clone(), timeout))?
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rid(s: &str) -> ResourceId {
        s.parse().expect("id")
    }

    #[tokio::test]
    async fn an_admission_waits_for_the_agent_s_streaming_report() {
        let reg = Arc::new(Registry::new());
        let (tx, _rx) = mpsc::channel(1);
        let guess = StreamingTarget {
            address: "10.0.0.9:8443".into(),
            protocol: None,
        };
        let wait = Duration::from_secs(30);
        assert_eq!(reg.reported_streaming(&rid("h1"), wait).await, None);
        reg.attach(
            &rid("h1"),
            1,
            None,
            CancellationToken::new(),
            Default::default(),
            tx,
        );
        reg.set_streaming(&rid("h1"), 1, guess.clone());
        // Not said yet: the guess, once the wait is over.
        assert_eq!(
            reg.reported_streaming(&rid("h1"), Duration::from_millis(1))
                .await,
            Some(guess.clone())
        );
        let said = StreamingTarget {
            address: "10.0.0.9:3389".into(),
            protocol: Some(StreamingProtocol::Rdp),
        };
        let waiting = tokio::spawn({
            let reg = reg.clone();
            async move { reg.reported_streaming(&rid("h1"), wait).await }
        });
        // A report of another connection is not this one's.
        reg.streaming_reported(&rid("h1"), 7, Some(guess.clone()));
        reg.streaming_reported(&rid("h1"), 1, Some(said.clone()));
        assert_eq!(waiting.await.expect("task"), Some(said.clone()));
        // Said, even with nothing usable: no more waiting.
        reg.streaming_reported(&rid("h1"), 1, None);
        assert_eq!(reg.reported_streaming(&rid("h1"), wait).await, Some(said));
    }

    #[tokio::test]
    async fn a_newer_connection_supersedes_and_a_stale_detach_is_ignored() {
        let reg = Registry::new();
        let (tx1, _rx1) = mpsc::channel(1);
        let (tx2, mut rx2) = mpsc::channel(1);
        let old = CancellationToken::new();
        reg.attach(&rid("h1"), 1, None, old.clone(), Default::default(), tx1);
        reg.attach(
            &rid("h1"),
            2,
            None,
            CancellationToken::new(),
            Default::default(),
            tx2,
        );
        assert!(old.is_cancelled());
        reg.detach(&rid("h1"), 1);
        assert_eq!(reg.connected(), 1);

        // Commands reach the current connection.
        let answer = tokio::spawn(async move {
            let req = rx2.recv().await.expect("command");
            assert_eq!(req.command, Command::Drain);
            req.reply.send(CommandOutcome::Done).expect("reply");
        });
        let out = reg
            .command(&rid("h1"), Command::Drain, Duration::from_secs(5))
            .await
            .expect("outcome");
        assert_eq!(out, CommandOutcome::Done);
        answer.await.expect("join");

        reg.detach(&rid("h1"), 2);
        assert_eq!(
            reg.command(&rid("h1"), Command::Drain, Duration::from_secs(5))
                .await,
            Err(CommandError::NotConnected(rid("h1")))
        );
    }

    #[tokio::test]
    async fn a_connection_that_goes_away_fails_the_command() {
        let reg = Registry::new();
        let (tx, mut rx) = mpsc::channel(1);
        reg.attach(
            &rid("h1"),
            1,
            None,
            CancellationToken::new(),
            Default::default(),
            tx,
        );
        let drop_it = tokio::spawn(async move {
            let req = rx.recv().await.expect("command");
            drop(req);
        });
        assert_eq!(
            reg.command(&rid("h1"), Command::Undrain, Duration::from_secs(5))
                .await,
            Err(CommandError::ConnectionClosed(rid("h1")))
        );
        drop_it.await.expect("join");
    }
}
