//! Image updates (`ferryctl group update-image`, SPEC section 9): every
//! resource of a group switches to another image at no extra cost.
//!
//! A child module of [`super`] (the actor), so it works on the actor's state.
//!
//! - [`begin`] (the admin request) checks the status (`published` or
//!   `update-failed`, [`lifecycle::check_image_update`]) and the image (as at
//!   publish), and in one transaction records the update (`image_updates`),
//!   sets the group `updating` and writes the status event. From then on the
//!   route service refuses new sessions (`group-not-available`), and so does
//!   the actor (a request already on its way).
//! - The actor picks the update up when it rereads its row (or starts with a
//!   group already `updating`: broker restart). Every open session is warned
//!   (`Command::WarnSession`, deadline = start + warning): the sessions the
//!   store has open on the group's resources, those of hosts whose agents
//!   have not joined yet (after a restart) when they join, with the same
//!   deadline. The disconnect deadline is one of the actor's timers, like
//!   the engine's.
//! - At the deadline the switch starts: the set of resources (joined and
//!   ready; one that joins during the switch, e.g. an elastic resource whose
//!   creation completes, is added) is written (`image_update_results`,
//!   `pending`), then for each connected one a task disconnects its open sessions
//!   (`Command::DisconnectSession`), sends `Command::SwitchImage` and waits
//!   (on the registry's watch, bounded) for its `Inventory` to show the image.
//!   A resource is done only with both. A resource whose agent is not
//!   connected (or whose connection drops mid-way) is switched when it
//!   re-joins; one still away [`RECONNECT_DEADLINE`] after the switch began
//!   fails.
//! - Each host's step is a group event (`image-step`, then
//!   `image-switched` or `image-switch-failed`), and `group show` has the
//!   update with each host's step and deadline ([`Actor::image_progress`]).
//!   A failure's text is the tail of the hook's output with its exit status
//!   ([`crate::hook_failure::brief`]).
//! - Every outcome is committed (`image_update_results`, a group event).
//!   When every resource is done, the group's image becomes the new one and
//!   its status `published`; with any failure, `update-failed` with an event
//!   naming each failing resource and why (resources that switched keep the
//!   new image; the group's image stays the old one). A resource whose
//!   switch failed is drained (`Command::Drain`; the engine is told at once,
//!   so it takes no session there): `update-failed` serves from the others;
//!   the next update that switches it undrains it.
//! - Nothing is added or billed for it: the update feeds the engine no
//!   input but those drains (resources stay available to it while their
//!   sessions are warned, and demand cannot grow since routing refuses new
//!   sessions), so no scale-out is decided for it; no billing interval is
//!   opened or closed.
//! - Restart: a group still `updating` resumes from the store. Before the
//!   deadline it waits for it (sessions are warned again, each when its
//!   agent is back); after it, the
//!   recorded set is switched: a resource whose inventory already shows the
//!   image is done without a new switch, the rest are switched.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use ferry_common::admin::{GroupVersionsInfo, ImageUpdateSpec, ResourceVersionInfo};
use ferry_common::limits::MAX_TEXT_LEN;
use ferry_common::wire::{Command, CommandOutcome, Inventory};
use ferry_common::{GroupName, ResourceId, SessionId, UnixMillis};
use rusqlite::{params, Connection, OptionalExtension};

use super::{Actor, ActorError, Msg};
use crate::engine::{Input, ResourceState};
use crate::groups::lifecycle::{self, Status};
use crate::groups::service::GroupError;
use crate::hook_failure::brief;
use crate::registry::{CommandError, Registry, COMMAND_TIMEOUT};
use crate::store::{Store, StoreError};

/// Longest warning an operator may give: a day.
pub const MAX_WARNING: Duration = Duration::from_secs(24 * 3600);

/// How long the broker waits for an agent's answer to `SwitchImage`: longer
/// than the agent's own hook timeout (30 min by default), so the agent's
/// `Failed` arrives first.
pub const SWITCH_TIMEOUT: Duration = Duration::from_secs(35 * 60);

/// How long the `Inventory` showing the new image may take after the agent
/// answered `Done` (it is sent right after the answer).
pub const INVENTORY_WAIT: Duration = Duration::from_secs(60);

/// How long a task waits for the first `Inventory` of a (re)connected agent
/// before it decides whether the host still needs the switch.
pub const FIRST_INVENTORY_WAIT: Duration = Duration::from_secs(10);

/// How long a resource of the update may stay away (not connected) after
/// the switch began before it counts as failed.
pub const RECONNECT_DEADLINE: Duration = Duration::from_secs(10 * 60);

fn ms(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

/// The problems of an image name, as at publish.
fn check_image(image: &str) -> Result<(), GroupError> {
    let problem = if image.trim().is_empty() {
        "image: required".to_owned()
    } else if image.len() > MAX_TEXT_LEN {
        format!("image: longer than {MAX_TEXT_LEN} bytes")
    } else {
        return Ok(());
    };
    Err(GroupError::Invalid(vec![problem]))
}

/// What an image update needs of a group's row.
struct LiveGroup {
    num: i64,
    name: String,
    status: String,
    billing: String,
    image: String,
}

impl LiveGroup {
    /// From `SELECT num, name, status, billing, image`.
    fn read(r: &rusqlite::Row<'_>) -> Result<LiveGroup, rusqlite::Error> {
        Ok(LiveGroup {
            num: r.get(0)?,
            name: r.get(1)?,
            status: r.get(2)?,
            billing: r.get(3)?,
            image: r.get(4)?,
        })
    }
}

/// The live group named `group` (a name or an id).
fn live_group(c: &Connection, group: &str) -> Result<Option<LiveGroup>, rusqlite::Error> {
    c.query_row(
        "SELECT num, name, status, billing, image FROM groups
         WHERE (id = ?1 OR name = ?1) AND status != 'gone' ORDER BY num DESC LIMIT 1",
        [group],
        LiveGroup::read,
    )
    .optional()
}

/// `group update-image`: records the update and sets the group `updating`
/// (see the module doc); the caller then syncs the group's actor, which
/// carries it out. Returns the group's name.
pub async fn begin(
    store: &Store,
    spec: ImageUpdateSpec,
    now: UnixMillis,
) -> Result<String, GroupError> {
    check_image(&spec.image)?;
    let warning = Duration::from_millis(spec.warning_ms);
    if warning > MAX_WARNING {
        return Err(GroupError::Invalid(vec![format!(
            "warning: {} is longer than the longest, {}",
            ferry_common::duration::format_duration(warning),
            ferry_common::duration::format_duration(MAX_WARNING)
        )]));
    }
    let group = spec.group.to_string();
    store
        .exec(move |c| {
            let Some(LiveGroup {
                num,
                name,
                status,
                billing,
                image: previous,
            }) = live_group(c, &group)?
            else {
                return Ok(Err(GroupError::NotFound(format!("no group named {group}"))));
            };
            let status = Status::parse(&status)
                .ok_or_else(|| StoreError::Corrupt(format!("status {status:?}")))?;
            let billing = if billing == "subscription" {
                "subscription"
            } else {
                "pay-as-you-go"
            };
            if let Err(e) = lifecycle::check_image_update(billing, status) {
                return Ok(Err(e.into()));
            }
            // One update at a time: an OTA rollout drains and updates hosts
            // one wave after another, and switching their image under it
            // would mix the two.
            let ota: Option<i64> = c
                .query_row(
                    "SELECT id FROM ota_schedules WHERE group_num = ?1 AND state = 'running'",
                    [num],
                    |r| r.get(0),
                )
                .optional()?;
            if let Some(id) = ota {
                return Ok(Err(GroupError::Conflict(format!(
                    "group {name} is rolling out OTA schedule {id}; update the image after it \
                     ends (ferryctl ota history {name})"
                ))));
            }
            let disconnect_at = now.0.saturating_add(ms(warning));
            // An update the group left by other means (it expired while
            // updating, then was renewed) is over.
            c.execute(
                "UPDATE image_updates SET state = 'failed', finished_at = ?2
                 WHERE group_num = ?1 AND state = 'running'",
                params![num, now.0],
            )?;
            c.execute(
                "INSERT INTO image_updates (group_num, image, previous_image, warning_ms,
                     started_at, disconnect_at, state)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, 'running')",
                params![num, spec.image, previous, ms(warning), now.0, disconnect_at],
            )?;
            c.execute(
                "UPDATE groups SET status = 'updating', updated_at = ?1 WHERE num = ?2",
                params![now.0, num],
            )?;
            c.execute(
                "INSERT INTO group_events (group_num, at, kind, message)
                 VALUES (?1, ?2, 'status', ?3)",
                params![
                    num,
                    now.0,
                    format!(
                        "{status} -> updating: image update from {previous} to {}; open \
                         sessions are warned and disconnected in {}, no new sessions meanwhile",
                        spec.image,
                        ferry_common::duration::format_duration(warning)
                    )
                ],
            )?;
            Ok(Ok(name))
        })
        .await?
}

/// `group show`'s versions: the group's image and what each resource
/// registered with its name runs (its live inventory when connected).
pub async fn versions(
    store: &Store,
    registry: &Registry,
    group: &GroupName,
) -> Result<GroupVersionsInfo, GroupError> {
    let key = group.to_string();
    type Stored = (
        String,
        String,
        Vec<(String, String, String)>,
        BTreeMap<String, String>,
    );
    let (image, status, stored, outcomes): Stored = store
        .read_with(move |c| {
            // Like `group show`: the live group of that name first, else a gone one.
            let row = c
                .query_row(
                    "SELECT num, name, status, billing, image FROM groups
                     WHERE id = ?1 OR name = ?1
                     ORDER BY (status != 'gone') DESC, num DESC LIMIT 1",
                    [&key],
                    LiveGroup::read,
                )
                .optional()?;
            let Some(LiveGroup {
                num,
                name,
                status,
                image,
                ..
            }) = row
            else {
                return Ok(None);
            };
            let mut stmt = c.prepare(
                "SELECT resource, agent_version, image_version FROM resources
                 WHERE grp = ?1 ORDER BY resource",
            )?;
            let stored = stmt
                .query_map([&name], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?
                .collect::<Result<Vec<_>, _>>()?;
            let mut stmt = c.prepare(
                "SELECT resource, outcome, detail FROM image_update_results
                 WHERE update_id = (SELECT MAX(id) FROM image_updates WHERE group_num = ?1)",
            )?;
            let outcomes = stmt
                .query_map([num], |r| {
                    let (resource, outcome, detail): (String, String, String) =
                        (r.get(0)?, r.get(1)?, r.get(2)?);
                    Ok((
                        resource,
                        if outcome == "failed" {
                            format!("failed: {detail}")
                        } else {
                            outcome
                        },
                    ))
                })?
                .collect::<Result<BTreeMap<_, _>, _>>()?;
            Ok(Some((image, status, stored, outcomes)))
        })
        .await?
        .ok_or_else(|| GroupError::NotFound(format!("no group named {group}")))?;
    let live = registry.snapshot();
    let mut resources = Vec::with_capacity(stored.len());
    for (resource, agent_version, image_version) in stored {
        let Ok(id) = resource.parse::<ResourceId>() else {
            continue;
        };
        let inventory = live.get(&id).and_then(|l| l.inventory.clone());
        let image_update = outcomes.get(&resource).cloned();
        resources.push(match inventory {
            Some(inv) => ResourceVersionInfo {
                resource: id,
                connected: true,
                agent_version: inv.agent_version,
                image_version: inv.image_version,
                components: inv.components,
                image_update,
            },
            None => ResourceVersionInfo {
                connected: live.contains_key(&id),
                resource: id,
                agent_version,
                image_version,
                components: Vec::new(),
                image_update,
            },
        });
    }
    Ok(GroupVersionsInfo {
        image,
        status,
        resources,
    })
}

/// Where one resource of a running update is.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Step {
    /// Not connected: switched when its agent joins, failed at the deadline.
    Waiting,
    /// A task is disconnecting its sessions and switching it.
    Running,
    Done,
    Failed(String),
}

/// A write to commit with the actor's next commit.
#[derive(Debug)]
enum Write {
    /// The set of resources the switch covers.
    Pending(Vec<ResourceId>),
    /// One resource's outcome.
    Outcome {
        resource: ResourceId,
        ok: bool,
        detail: String,
        at: UnixMillis,
    },
    /// A group event, written in order with the update's other writes.
    Event {
        at: UnixMillis,
        kind: &'static str,
        message: String,
    },
    /// The group left `updating` by other means (expiry, purge): the
    /// update is over, unfinished.
    Abandon { at: UnixMillis },
    /// The update ended: the group's status (and image when it succeeded).
    Finish {
        ok: bool,
        image: String,
        message: String,
        at: UnixMillis,
    },
}

/// The running update.
struct Run {
    id: i64,
    image: String,
    /// When the operator asked for it.
    started_at: UnixMillis,
    disconnect_at: UnixMillis,
    /// Past the deadline: the set is known and resources are switched.
    switching: bool,
    steps: BTreeMap<ResourceId, Step>,
    /// When waiting resources fail.
    wait_until: UnixMillis,
    /// Resources the group's previous update failed on (and drained): a
    /// successful switch undrains them.
    previously_failed: BTreeSet<ResourceId>,
    /// Sessions warned of this update (by this broker process: after a
    /// restart they are warned again, with the same deadline).
    warned: BTreeSet<SessionId>,
    /// Open sessions recorded on the group's resources whose agents have
    /// not joined yet: warned when they do, before the deadline.
    unwarned: BTreeMap<ResourceId, BTreeSet<SessionId>>,
}

/// A running image update as `group show` shows it ([`Actor::image_progress`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ImageProgress {
    pub id: i64,
    pub image: String,
    pub started_at: UnixMillis,
    /// When warned sessions are disconnected and the switch starts.
    pub disconnect_at: UnixMillis,
    /// Past the deadline: hosts are being switched.
    pub switching: bool,
    /// Each host, sorted.
    pub hosts: Vec<HostStep>,
}

/// One host of a running image update.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HostStep {
    pub resource: ResourceId,
    /// `waiting`, `warned`, `switching`, `done` or `failed`.
    pub step: &'static str,
    /// When the step ends at the latest (the warning deadline; for a host
    /// away during the switch, when it fails).
    pub until: Option<UnixMillis>,
    pub detail: Option<String>,
}

/// The actor's image-update state.
#[derive(Default)]
pub struct ImageState {
    run: Option<Run>,
    writes: Vec<Write>,
}

/// A switch task's outcome, reported to the actor.
pub struct Report {
    update: i64,
    resource: ResourceId,
    outcome: Outcome,
    /// The drain state its agent confirmed after the outcome (drained after
    /// a failure, undrained after a success that undrains), for the
    /// group's engine; `None` when it did not change.
    drained: Option<bool>,
}

enum Outcome {
    Done(String),
    Failed(String),
    /// The agent's connection went away: switched again when it re-joins.
    Lost(String),
}

/// Waits (bounded) until `resource`'s inventory satisfies `want`, on the
/// registry's change watch.
async fn wait_inventory(
    registry: &Registry,
    resource: &ResourceId,
    want: impl Fn(&Inventory) -> bool,
    limit: Duration,
) -> Option<Inventory> {
    let mut changes = registry.subscribe();
    let wait = async {
        loop {
            if let Some(inv) = registry.inventory(resource).filter(|i| want(i)) {
                return Some(inv);
            }
            if changes.changed().await.is_err() {
                return None;
            }
        }
    };
    tokio::time::timeout(limit, wait).await.ok().flatten()
}

fn lost_or_failed(e: CommandError, what: &str) -> Outcome {
    match e {
        CommandError::NotConnected(_) | CommandError::ConnectionClosed(_) => {
            Outcome::Lost(format!("{what}: {e}"))
        }
        CommandError::Timeout(..) => Outcome::Failed(format!("{what}: {e}")),
    }
}

/// Disconnects `sessions` on `real`, switches it to `image` and waits for
/// its inventory to show it.
async fn switch_one(
    registry: &Registry,
    group: &GroupName,
    real: &ResourceId,
    image: &str,
    sessions: Vec<SessionId>,
) -> Outcome {
    // A host that switched already (a resumed update, a re-joined agent)
    // is not switched again.
    if let Some(inv) = wait_inventory(registry, real, |_| true, FIRST_INVENTORY_WAIT).await {
        if inv.image_version == image {
            return Outcome::Done(format!("{real} already runs image {image}"));
        }
    }
    for session in sessions {
        let command = Command::DisconnectSession {
            session: session.clone(),
            reason: format!("group {group} switches to image {image}"),
        };
        match registry.command(real, command, COMMAND_TIMEOUT).await {
            Ok(CommandOutcome::Done) => {}
            Ok(CommandOutcome::Failed(why)) => {
                return Outcome::Failed(format!(
                    "session {session} could not be disconnected: the agent says: {}",
                    brief(&why)
                ))
            }
            Err(e) => return lost_or_failed(e, &format!("disconnect of session {session}")),
        }
    }
    let command = Command::SwitchImage {
        image: image.to_owned(),
    };
    match registry.command(real, command, SWITCH_TIMEOUT).await {
        Ok(CommandOutcome::Done) => {}
        Ok(CommandOutcome::Failed(why)) => {
            return Outcome::Failed(format!(
                "the image switch failed: the agent says: {}",
                brief(&why)
            ))
        }
        Err(e) => return lost_or_failed(e, "image switch"),
    }
    match wait_inventory(registry, real, |i| i.image_version == image, INVENTORY_WAIT).await {
        Some(_) => Outcome::Done(format!("{real} runs image {image}")),
        None if registry.inventory(real).is_none() && !registry.snapshot().contains_key(real) => {
            Outcome::Lost("its agent went away before it reported the new image".into())
        }
        None => Outcome::Failed(format!(
            "the agent answered the switch but its inventory did not show image {image} within {} s",
            INVENTORY_WAIT.as_secs()
        )),
    }
}

/// Sets `real`'s drain state through its agent; says how it went, and
/// whether the agent confirmed it.
async fn set_drain(registry: &Registry, real: &ResourceId, draining: bool) -> (String, bool) {
    let (command, verb) = if draining {
        (Command::Drain, "drained")
    } else {
        (Command::Undrain, "undrained")
    };
    match registry.command(real, command, COMMAND_TIMEOUT).await {
        Ok(CommandOutcome::Done) => {
            registry.set_draining(real, draining);
            let said = if draining {
                "it was drained: it takes no new sessions until an image update switches it \
                 (or `ferryctl resources undrain`)"
                    .to_owned()
            } else {
                "it was undrained: it takes sessions again".to_owned()
            };
            (said, true)
        }
        Ok(CommandOutcome::Failed(why)) => {
            (format!("it could not be {verb}: {}", brief(&why)), false)
        }
        Err(e) => (format!("it could not be {verb}: {e}"), false),
    }
}

/// A resource the switch failed on is drained (the group serves from the
/// others, `update-failed`); one a previous update failed on (and drained)
/// takes sessions again once it switched. Returns the outcome and the drain
/// state the agent confirmed, if it changed.
async fn after_switch(
    registry: &Registry,
    real: &ResourceId,
    outcome: Outcome,
    undrain: bool,
) -> (Outcome, Option<bool>) {
    match outcome {
        Outcome::Failed(why) => {
            let (said, ok) = set_drain(registry, real, true).await;
            (
                Outcome::Failed(format!("{why}; {said}")),
                ok.then_some(true),
            )
        }
        Outcome::Done(what) if undrain => {
            let (said, ok) = set_drain(registry, real, false).await;
            (
                Outcome::Done(format!("{what}; {said}")),
                ok.then_some(false),
            )
        }
        other => (other, None),
    }
}

/// A running update as stored.
struct Loaded {
    id: i64,
    image: String,
    started_at: i64,
    disconnect_at: i64,
    /// (resource, outcome, detail) of the switch, once it began.
    results: Vec<(String, String, String)>,
    /// Resources the previous update failed on.
    before: Vec<String>,
    /// (resource, session) open on the group's resources.
    open: Vec<(String, String)>,
}

impl Actor {
    /// A group event of the update, committed with its other writes so the
    /// events read in the order things happened.
    fn image_note(&mut self, kind: &'static str, message: String) {
        let at = self.now();
        self.image.writes.push(Write::Event { at, kind, message });
    }

    /// The running update as `group show` shows it: each host's step and
    /// until when. During the warning: the ready hosts joined to the group
    /// (`warned` with its sessions, or `waiting` for the switch) and those
    /// with recorded sessions whose agents are not back yet; during the
    /// switch, the switch's set.
    pub(super) fn image_progress(&self) -> Option<ImageProgress> {
        let run = self.image.run.as_ref()?;
        let mut hosts = Vec::new();
        if run.switching {
            for (resource, step) in &run.steps {
                let (step, until, detail) = match step {
                    Step::Waiting => (
                        "waiting",
                        Some(run.wait_until),
                        Some("not connected: switched when its agent is back".to_owned()),
                    ),
                    Step::Running => ("switching", None, None),
                    Step::Done => ("done", None, None),
                    Step::Failed(why) => ("failed", None, Some(why.clone())),
                };
                hosts.push(HostStep {
                    resource: resource.clone(),
                    step,
                    until,
                    detail,
                });
            }
        } else {
            let mut by: BTreeMap<ResourceId, HostStep> = BTreeMap::new();
            for (real, id) in &self.to_engine {
                if self.state_of(id) != Some(ResourceState::Ready) {
                    continue;
                }
                let sessions: Vec<&SessionId> =
                    self.sessions.get(id).into_iter().flatten().collect();
                let warned = sessions.iter().filter(|s| run.warned.contains(**s)).count();
                let (step, detail) = if sessions.is_empty() {
                    (
                        "waiting",
                        "no open session; switched at the deadline".to_owned(),
                    )
                } else {
                    (
                        "warned",
                        format!(
                            "{warned} of {} open session(s) warned; disconnected at the deadline",
                            sessions.len()
                        ),
                    )
                };
                by.insert(
                    real.clone(),
                    HostStep {
                        resource: real.clone(),
                        step,
                        until: Some(run.disconnect_at),
                        detail: Some(detail),
                    },
                );
            }
            for (real, sessions) in &run.unwarned {
                by.entry(real.clone()).or_insert_with(|| HostStep {
                    resource: real.clone(),
                    step: "waiting",
                    until: Some(run.disconnect_at),
                    detail: Some(format!(
                        "not connected: its {} open session(s) are warned when its agent is back",
                        sessions.len()
                    )),
                });
            }
            hosts = by.into_values().collect();
        }
        Some(ImageProgress {
            id: run.id,
            image: run.image.clone(),
            started_at: run.started_at,
            disconnect_at: run.disconnect_at,
            switching: run.switching,
            hosts,
        })
    }

    /// Whether an image update holds the group: no new sessions.
    pub(super) fn image_updating(&self) -> bool {
        self.image.run.is_some()
    }

    /// The update's next deadline: the disconnect, or the end of the wait
    /// for resources not connected.
    pub(super) fn image_deadline(&self) -> Option<UnixMillis> {
        let run = self.image.run.as_ref()?;
        if !run.switching {
            Some(run.disconnect_at)
        } else if run.steps.values().any(|s| *s == Step::Waiting) {
            Some(run.wait_until)
        } else {
            None
        }
    }

    /// Follows the group's row: picks up the running update of an
    /// `updating` group (admin request, or broker restart); forgets it when
    /// the group left `updating` by other means (purge, expiry).
    pub(super) async fn image_sync(&mut self) -> Result<(), ActorError> {
        if self.row.status != Status::Updating.as_str() {
            if let Some(run) = self.image.run.take() {
                let at = self.now();
                self.image.writes.push(Write::Abandon { at });
                self.image_note(
                    "image-update",
                    format!(
                        "image update to {} stopped: the group is {}",
                        run.image, self.row.status
                    ),
                );
            }
            return Ok(());
        }
        if self.image.run.is_some() {
            return Ok(());
        }
        let (num, name) = (self.row.num, self.row.name.to_string());
        let loaded: Option<Loaded> = self
            .shared
            .store
            .read_with(move |c| {
                let row = c
                    .query_row(
                        "SELECT id, image, started_at, disconnect_at FROM image_updates
                         WHERE group_num = ?1 AND state = 'running'",
                        [num],
                        |r| {
                            Ok((
                                r.get::<_, i64>(0)?,
                                r.get::<_, String>(1)?,
                                r.get::<_, i64>(2)?,
                                r.get::<_, i64>(3)?,
                            ))
                        },
                    )
                    .optional()?;
                let Some((id, image, started_at, disconnect_at)) = row else {
                    return Ok(None);
                };
                let mut stmt = c.prepare(
                    "SELECT resource FROM image_update_results
                     WHERE outcome = 'failed' AND update_id = (SELECT MAX(id) FROM image_updates
                         WHERE group_num = ?1 AND state != 'running')",
                )?;
                let before = stmt
                    .query_map([num], |r| r.get::<_, String>(0))?
                    .collect::<Result<Vec<_>, _>>()?;
                let mut stmt = c.prepare(
                    "SELECT resource, outcome, detail FROM image_update_results
                     WHERE update_id = ?1 ORDER BY resource",
                )?;
                let results = stmt
                    .query_map([id], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?
                    .collect::<Result<Vec<_>, _>>()?;
                // The group's open sessions as recorded, whether or not
                // their agents have joined this actor yet (broker restart).
                let mut stmt = c.prepare(
                    "SELECT s.resource, s.session FROM sessions s
                     JOIN resources r ON r.resource = s.resource
                     WHERE r.grp = ?1 AND s.ended_at IS NULL ORDER BY s.resource, s.session",
                )?;
                let open = stmt
                    .query_map([&name], |r| Ok((r.get(0)?, r.get(1)?)))?
                    .collect::<Result<Vec<_>, _>>()?;
                Ok(Some(Loaded {
                    id,
                    image,
                    started_at,
                    disconnect_at,
                    results,
                    before,
                    open,
                }))
            })
            .await?;
        let Some(Loaded {
            id,
            image,
            started_at,
            disconnect_at,
            results,
            before,
            open,
        }) = loaded
        else {
            tracing::warn!(group = %self.row.name, "updating without a running image update");
            return Ok(());
        };
        let now = self.now();
        let mut steps = BTreeMap::new();
        for (resource, outcome, detail) in &results {
            let Ok(r) = resource.parse::<ResourceId>() else {
                continue;
            };
            steps.insert(
                r,
                match outcome.as_str() {
                    "done" => Step::Done,
                    "failed" => Step::Failed(detail.clone()),
                    _ => Step::Waiting,
                },
            );
        }
        let mut recorded: BTreeMap<ResourceId, BTreeSet<SessionId>> = BTreeMap::new();
        for (resource, session) in open {
            if let (Ok(r), Ok(s)) = (resource.parse(), session.parse()) {
                recorded.entry(r).or_default().insert(s);
            }
        }
        let switching = !results.is_empty();
        self.image.run = Some(Run {
            id,
            image: image.clone(),
            started_at: UnixMillis(started_at),
            disconnect_at: UnixMillis(disconnect_at),
            switching,
            steps,
            wait_until: UnixMillis(now.0.saturating_add(ms(RECONNECT_DEADLINE))),
            previously_failed: before.iter().filter_map(|r| r.parse().ok()).collect(),
            warned: BTreeSet::new(),
            unwarned: BTreeMap::new(),
        });
        // Requests waiting for room are refused: no new sessions now.
        self.refuse_waiters();
        if switching {
            self.image_note(
                "image-update",
                format!("image update to {image} resumed: switching the resources not done yet"),
            );
            let live = self.live_resources();
            let waiting: Vec<ResourceId> = self
                .image
                .run
                .iter()
                .flat_map(|r| r.steps.iter())
                .filter(|(r, s)| **s == Step::Waiting && live.contains(*r))
                .map(|(r, _)| r.clone())
                .collect();
            for r in waiting {
                if self.to_engine.contains_key(&r) {
                    self.image_launch(&r);
                }
            }
            self.image_check_finish();
        } else if now < UnixMillis(disconnect_at) {
            self.image_warn(&image, UnixMillis(disconnect_at), recorded);
        }
        Ok(())
    }

    fn live_resources(&self) -> std::collections::HashSet<ResourceId> {
        self.shared
            .registry
            .upgrade()
            .map(|r| r.snapshot().into_keys().collect())
            .unwrap_or_default()
    }

    /// Warns every open session of the group: those on hosts joined to the
    /// actor now, each in its own task (the outcome of each goes to the
    /// group's events), and those `recorded` on hosts whose agents have not
    /// joined yet (a broker restart) when they join, with the same
    /// deadline ([`Actor::image_joined`]).
    fn image_warn(
        &mut self,
        image: &str,
        deadline: UnixMillis,
        mut recorded: BTreeMap<ResourceId, BTreeSet<SessionId>>,
    ) {
        let known: Vec<(ResourceId, SessionId)> = self
            .sessions
            .iter()
            .flat_map(|(id, set)| {
                let real = self.external(id);
                set.iter().map(move |s| (real.clone(), s.clone()))
            })
            .collect();
        for (real, session) in &known {
            if let Some(set) = recorded.get_mut(real) {
                set.remove(session);
            }
        }
        // Hosts joined now have told the actor their sessions (their
        // `Hello`): what the store still has open there is stale.
        recorded.retain(|r, set| !set.is_empty() && !self.to_engine.contains_key(r));
        let later: usize = recorded.values().map(BTreeSet::len).sum();
        let left = deadline.0.saturating_sub(self.now().0).max(0);
        self.image_note(
            "image-update",
            format!(
                "warning {} open session(s): they are disconnected in {} ({}) for the switch \
                 to image {image}{}",
                known.len() + later,
                crate::render::time_left(left),
                crate::render::rfc3339_secs(deadline),
                if later == 0 {
                    String::new()
                } else {
                    format!(
                        "; {later} of them on host(s) whose agents are not connected yet ({}): \
                         warned when they are back",
                        recorded
                            .keys()
                            .map(|r| r.as_str())
                            .collect::<Vec<_>>()
                            .join(", ")
                    )
                }
            ),
        );
        if let Some(run) = self.image.run.as_mut() {
            run.unwarned = recorded;
        }
        self.image_warn_sessions(image, deadline, known);
    }

    /// Sends `WarnSession` for each of `sessions` not warned yet, each in
    /// its own task.
    fn image_warn_sessions(
        &mut self,
        image: &str,
        deadline: UnixMillis,
        sessions: Vec<(ResourceId, SessionId)>,
    ) {
        for (real, session) in sessions {
            let Some(run) = self.image.run.as_mut() else {
                return;
            };
            if !run.warned.insert(session.clone()) {
                continue;
            }
            let shared = self.shared.clone();
            let (num, group, image) = (self.row.num, self.row.name.clone(), image.to_owned());
            self.shared.tracker.spawn(async move {
                let command = Command::WarnSession {
                    session: session.clone(),
                    message: format!(
                        "group {group} switches to image {image}: this session will be \
                         disconnected"
                    ),
                    deadline,
                };
                let outcome = shared.command(&real, command).await;
                let (kind, message) = match outcome {
                    Ok(CommandOutcome::Done) => (
                        "session-warned",
                        format!(
                            "session {session} on {real} warned of the image switch at {}",
                            crate::render::rfc3339_secs(deadline)
                        ),
                    ),
                    Ok(CommandOutcome::Failed(m)) => (
                        "warn-failed",
                        format!(
                            "session {session} on {real} not warned: the agent says: {}",
                            brief(&m)
                        ),
                    ),
                    Err(e) => (
                        "warn-failed",
                        format!("session {session} on {real} not warned: {e}"),
                    ),
                };
                if let Err(e) = shared.event(num, kind, message).await {
                    tracing::error!(%group, "record a session warning: {e}");
                }
            });
        }
    }

    /// The update's timers: the disconnect deadline starts the switch; the
    /// end of the wait fails resources still away.
    pub(super) fn image_timeout(&mut self) {
        let now = self.now();
        let Some(run) = self.image.run.as_ref() else {
            return;
        };
        if !run.switching {
            if now >= run.disconnect_at {
                self.image_start_switch(now);
            }
            return;
        }
        if now < run.wait_until {
            return;
        }
        let away: Vec<ResourceId> = run
            .steps
            .iter()
            .filter(|(_, s)| **s == Step::Waiting)
            .map(|(r, _)| r.clone())
            .collect();
        for r in away {
            // Scaled in and released meanwhile: nothing left to switch. (One
            // not joined since a broker restart is still the group's: it fails.)
            let released = self
                .to_engine
                .get(&r)
                .is_some_and(|id| self.state_of(id) != Some(ResourceState::Ready));
            if released {
                if let Some(run) = self.image.run.as_mut() {
                    run.steps.remove(&r);
                }
                self.image_note(
                    "image-update",
                    format!("{r} left the group during the image update: not switched"),
                );
                continue;
            }
            let why = format!(
                "not connected within {} s of the switch's start",
                RECONNECT_DEADLINE.as_secs()
            );
            self.image_outcome(r, Outcome::Failed(why));
        }
        self.image_check_finish();
    }

    /// The warning is over: every ready resource joined to the group is
    /// switched (one still being created is added when its agent joins); the
    /// set is written first.
    fn image_start_switch(&mut self, now: UnixMillis) {
        let mut targets: Vec<ResourceId> = self
            .to_engine
            .iter()
            .filter(|(_, id)| self.state_of(id) == Some(ResourceState::Ready))
            .map(|(real, _)| real.clone())
            .collect();
        targets.sort();
        let live = self.live_resources();
        let Some(run) = self.image.run.as_mut() else {
            return;
        };
        run.switching = true;
        run.wait_until = UnixMillis(now.0.saturating_add(ms(RECONNECT_DEADLINE)));
        for r in &targets {
            run.steps.insert(r.clone(), Step::Waiting);
        }
        let image = run.image.clone();
        self.image.writes.push(Write::Pending(targets.clone()));
        let names: Vec<&str> = targets.iter().map(|r| r.as_str()).collect();
        self.image_note(
            "image-update",
            format!(
                "switching {} resource(s) to image {image}: {}",
                targets.len(),
                if names.is_empty() {
                    "none".to_owned()
                } else {
                    names.join(", ")
                }
            ),
        );
        let until =
            crate::render::rfc3339_secs(UnixMillis(now.0.saturating_add(ms(RECONNECT_DEADLINE))));
        for r in &targets {
            if live.contains(r) {
                self.image_launch(r);
            } else {
                self.image_note(
                    "image-step",
                    format!(
                        "{r} waiting: its agent is not connected; switched when it is back, \
                         failed if still away at {until}"
                    ),
                );
            }
        }
        self.image_check_finish();
    }

    /// An agent joined: a resource of the switch that was away is switched
    /// now; one that joins the group during the switch is added to it.
    pub(super) fn image_joined(&mut self, resource: &ResourceId) {
        let Some(id) = self.to_engine.get(resource).cloned() else {
            return;
        };
        let Some(run) = self.image.run.as_mut() else {
            return;
        };
        if !run.switching {
            // Still the warning: its open sessions (as its `Hello` listed
            // them) are warned now if they were not, with the deadline the
            // others were given.
            run.unwarned.remove(resource);
            let (image, deadline) = (run.image.clone(), run.disconnect_at);
            let open: Vec<(ResourceId, SessionId)> = self
                .sessions
                .get(&id)
                .into_iter()
                .flatten()
                .filter(|s| !run.warned.contains(*s))
                .map(|s| (resource.clone(), s.clone()))
                .collect();
            if !open.is_empty() && self.now() < deadline {
                self.image_note(
                    "image-step",
                    format!(
                        "{resource} joined during the warning: warning its {} open session(s) \
                         of the switch at {}",
                        open.len(),
                        crate::render::rfc3339_secs(deadline)
                    ),
                );
                self.image_warn_sessions(&image, deadline, open);
            }
            return;
        }
        match run.steps.get(resource) {
            Some(Step::Waiting) => {}
            Some(_) => return,
            None => {
                run.steps.insert(resource.clone(), Step::Waiting);
                self.image
                    .writes
                    .push(Write::Pending(vec![resource.clone()]));
            }
        }
        self.image_launch(resource);
    }

    /// Starts the task that switches `real`.
    fn image_launch(&mut self, real: &ResourceId) {
        let Some(run) = self.image.run.as_mut() else {
            return;
        };
        run.steps.insert(real.clone(), Step::Running);
        let (update, image) = (run.id, run.image.clone());
        let undrain = run.previously_failed.contains(real);
        let sessions: Vec<SessionId> = self
            .to_engine
            .get(real)
            .and_then(|id| self.sessions.get(id))
            .map(|s| s.iter().cloned().collect())
            .unwrap_or_default();
        self.image_note(
            "image-step",
            format!(
                "{real} switching to image {image}{}",
                if sessions.is_empty() {
                    String::new()
                } else {
                    format!(
                        " after disconnecting {} open session(s): {}",
                        sessions.len(),
                        sessions
                            .iter()
                            .map(|s| s.as_str())
                            .collect::<Vec<_>>()
                            .join(", ")
                    )
                }
            ),
        );
        let shared = self.shared.clone();
        let actor = self.disconnects.actor.clone();
        let (group, real) = (self.row.name.clone(), real.clone());
        self.shared.tracker.spawn(async move {
            let (outcome, drained) = match shared.registry.upgrade() {
                None => (Outcome::Lost("the broker is shutting down".into()), None),
                Some(registry) => tokio::select! {
                    o = async {
                        let o = switch_one(&registry, &group, &real, &image, sessions).await;
                        after_switch(&registry, &real, o, undrain).await
                    } => o,
                    _ = shared.shutdown.cancelled() => {
                        (Outcome::Lost("the broker shut down".into()), None)
                    }
                },
            };
            let report = Report {
                update,
                resource: real,
                outcome,
                drained,
            };
            if let Some(tx) = actor.upgrade() {
                if tx.send(Msg::Image(report)).await.is_err() {
                    tracing::debug!(%group, "image switch outcome after the actor stopped");
                }
            }
        });
    }

    /// A switch task's outcome. A drain the agent confirmed reaches the
    /// group's engine at once (not at the agent's next health report), so
    /// `group show` and `resources list` say the same from now on.
    pub(super) fn image_report(&mut self, report: Report) {
        if self.image.run.as_ref().map(|r| r.id) != Some(report.update) {
            return;
        }
        if let (Some(drained), Some(id)) = (
            report.drained,
            self.to_engine.get(&report.resource).cloned(),
        ) {
            let healthy = self
                .shared
                .registry
                .upgrade()
                .and_then(|r| r.snapshot().get(&report.resource).map(|l| l.available))
                .unwrap_or(false);
            if drained {
                self.input(Input::Unavailable { resource: id });
            } else if healthy {
                self.input(Input::Available { resource: id });
            }
        }
        self.image_outcome(report.resource, report.outcome);
        self.image_check_finish();
    }

    fn image_outcome(&mut self, resource: ResourceId, outcome: Outcome) {
        let at = self.now();
        let live = self.live_resources().contains(&resource);
        let Some(run) = self.image.run.as_mut() else {
            return;
        };
        let image = run.image.clone();
        let (step, write, kind, message) = match outcome {
            Outcome::Done(detail) => (
                Step::Done,
                Some((true, detail.clone())),
                "image-switched",
                detail,
            ),
            Outcome::Failed(why) => (
                Step::Failed(why.clone()),
                Some((false, why.clone())),
                "image-switch-failed",
                format!("{resource} did not switch to image {image}: {why}"),
            ),
            Outcome::Lost(why) => (
                Step::Waiting,
                None,
                "image-switch-interrupted",
                format!("{resource}: {why}; it is switched when its agent is back"),
            ),
        };
        run.steps.insert(resource.clone(), step);
        if let Some((ok, detail)) = write {
            self.image.writes.push(Write::Outcome {
                resource: resource.clone(),
                ok,
                detail,
                at,
            });
        }
        self.image_note(kind, message);
        // Back already (its new connection joined before this report).
        let waiting = self
            .image
            .run
            .as_ref()
            .is_some_and(|r| r.steps.get(&resource) == Some(&Step::Waiting));
        if waiting && live && self.to_engine.contains_key(&resource) {
            self.image_launch(&resource);
        }
    }

    /// Ends the update once every resource is done or failed.
    fn image_check_finish(&mut self) {
        let Some(run) = self.image.run.as_ref() else {
            return;
        };
        if !run.switching
            || run
                .steps
                .values()
                .any(|s| matches!(s, Step::Waiting | Step::Running))
        {
            return;
        }
        let failed: Vec<String> = run
            .steps
            .iter()
            .filter_map(|(r, s)| match s {
                Step::Failed(why) => Some(format!("{r} ({why})")),
                _ => None,
            })
            .collect();
        let ok = failed.is_empty();
        let image = run.image.clone();
        let done = run.steps.len() - failed.len();
        let message = if ok {
            format!("updating -> published: every resource ({done}) runs image {image}")
        } else {
            format!(
                "updating -> update-failed: image {image} failed on {} of {} resource(s): {}; \
                 the {done} that switched keep image {image}",
                failed.len(),
                run.steps.len(),
                failed.join("; ")
            )
        };
        let at = self.now();
        self.image.writes.push(Write::Finish {
            ok,
            image,
            message,
            at,
        });
        self.image.run = None;
        self.row.status = if ok {
            Status::Published
        } else {
            Status::UpdateFailed
        }
        .as_str()
        .to_owned();
    }

    /// Commits the update's pending writes (called first by every commit).
    pub(super) async fn image_flush(&mut self) -> Result<(), ActorError> {
        if self.image.writes.is_empty() {
            return Ok(());
        }
        let writes = std::mem::take(&mut self.image.writes);
        let num = self.row.num;
        let update = self.image.run.as_ref().map(|r| r.id);
        let finished = writes.iter().any(|w| matches!(w, Write::Finish { .. }));
        self.shared
            .store
            .exec(move |c| {
                // The running update's id (the run may be gone once finished).
                let id: Option<i64> = match update {
                    Some(id) => Some(id),
                    None => c
                        .query_row(
                            "SELECT id FROM image_updates WHERE group_num = ?1 AND state = 'running'",
                            [num],
                            |r| r.get(0),
                        )
                        .optional()?,
                };
                for w in &writes {
                    if let Write::Event { at, kind, message } = w {
                        c.execute(
                            "INSERT INTO group_events (group_num, at, kind, message)
                             VALUES (?1, ?2, ?3, ?4)",
                            params![num, at.0, kind, message],
                        )?;
                        continue;
                    }
                    let Some(id) = id else { continue };
                    match w {
                        Write::Event { .. } => {}
                        Write::Pending(resources) => {
                            for r in resources {
                                c.execute(
                                    "INSERT OR IGNORE INTO image_update_results
                                         (update_id, resource, outcome, detail, at)
                                     SELECT ?1, ?2, 'pending', '', started_at
                                     FROM image_updates WHERE id = ?1",
                                    params![id, r.as_str()],
                                )?;
                            }
                        }
                        Write::Outcome {
                            resource,
                            ok,
                            detail,
                            at,
                        } => {
                            c.execute(
                                "INSERT INTO image_update_results
                                     (update_id, resource, outcome, detail, at)
                                 VALUES (?1, ?2, ?3, ?4, ?5)
                                 ON CONFLICT (update_id, resource) DO UPDATE
                                     SET outcome = excluded.outcome, detail = excluded.detail,
                                         at = excluded.at",
                                params![
                                    id,
                                    resource.as_str(),
                                    if *ok { "done" } else { "failed" },
                                    detail,
                                    at.0
                                ],
                            )?;
                        }
                        Write::Abandon { at } => {
                            c.execute(
                                "UPDATE image_updates SET state = 'failed', finished_at = ?2
                                 WHERE id = ?1",
                                params![id, at.0],
                            )?;
                        }
                        Write::Finish {
                            ok,
                            image,
                            message,
                            at,
                        } => {
                            c.execute(
                                "UPDATE image_updates SET state = ?2, finished_at = ?3
                                 WHERE id = ?1",
                                params![id, if *ok { "succeeded" } else { "failed" }, at.0],
                            )?;
                            if *ok {
                                c.execute(
                                    "UPDATE groups SET image = ?2, status = 'published',
                                         updated_at = ?3
                                     WHERE num = ?1 AND status = 'updating'",
                                    params![num, image, at.0],
                                )?;
                            } else {
                                c.execute(
                                    "UPDATE groups SET status = 'update-failed', updated_at = ?2
                                     WHERE num = ?1 AND status = 'updating'",
                                    params![num, at.0],
                                )?;
                            }
                            c.execute(
                                "INSERT INTO group_events (group_num, at, kind, message)
                                 VALUES (?1, ?2, 'status', ?3)",
                                params![num, at.0, message],
                            )?;
                        }
                    }
                }
                Ok(())
            })
            .await?;
        if finished {
            // The lifecycle follower rereads statuses.
            self.shared.lifecycle.notify_one();
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    use crate::clock::ManualClock;
    use crate::config::GroupsConfig;
    use crate::groups::{GroupActors, GroupService};
    use crate::store::StoreOptions;
    use ferry_common::admin::{BillingSpec, GroupSpec, PolicySpec, SessionType};
    use tokio_util::sync::CancellationToken;
    use tokio_util::task::TaskTracker;

    const T0: i64 = 1_700_000_000_000;

    fn spec(name: &str) -> GroupSpec {
        GroupSpec {
            name: Some(name.parse().expect("name")),
            region: "cn-hangzhou".into(),
            office_network: "office-net-1".into(),
            spec: "office-4c8g".into(),
            image: "img-1".into(),
            billing: BillingSpec::PayAsYouGo,
            base_resources: 1,
            session_type: SessionType::Independent,
            users: vec![],
            policy: PolicySpec {
                concurrent_sessions: Some(2),
                usage_threshold: Some(50),
                scale_out_step: Some(1),
                max_elastic: Some(1),
                max_idle_ms: Some(600_000),
                ..PolicySpec::default()
            },
        }
    }

    fn update(group: &str, image: &str, warning_ms: u64) -> ImageUpdateSpec {
        ImageUpdateSpec {
            group: group.parse().expect("name"),
            image: image.into(),
            warning_ms,
        }
    }

    #[tokio::test]
    async fn begin_checks_status_and_image_and_the_switch_starts_at_the_actors_deadline() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store =
            Store::open(&dir.path().join("ferry.db"), StoreOptions::default()).expect("store");
        let registry = Arc::new(Registry::new());
        let clock = ManualClock::new(UnixMillis(T0));
        let config = GroupsConfig {
            clock: clock.clock(),
            ..GroupsConfig::default()
        };
        let (shutdown, tracker) = (CancellationToken::new(), TaskTracker::new());
        let actors = GroupActors::new(
            store.clone(),
            &registry,
            &config,
            tracker.clone(),
            shutdown.clone(),
        );
        let service = GroupService::new(store.clone(), config);
        service
            .publish(spec("g1"), UnixMillis(T0))
            .await
            .expect("publish");
        actors.start_all().await.expect("actors");
        let name: GroupName = "g1".parse().expect("name");

        // Refused: an empty image, a warning past the longest, an unknown group.
        let err = begin(&store, update("g1", "  ", 0), UnixMillis(T0))
            .await
            .expect_err("empty image");
        assert!(err.to_string().contains("image: required"), "{err}");
        let err = begin(
            &store,
            update("g1", "img-2", 25 * 3_600_000),
            UnixMillis(T0),
        )
        .await
        .expect_err("too long a warning");
        assert!(err.to_string().contains("longer than the longest"), "{err}");
        assert!(matches!(
            begin(&store, update("nope", "img-2", 0), UnixMillis(T0)).await,
            Err(GroupError::NotFound(_))
        ));

        // Accepted: updating at once, durably, with its event.
        let got = begin(&store, update("g1", "img-2", 300_000), UnixMillis(T0))
            .await
            .expect("begin");
        assert_eq!(got, "g1");
        actors.sync("g1").await.expect("sync");
        let d = service.show("g1").await.expect("show");
        assert_eq!(
            (d.info.status.as_str(), d.info.image.as_str()),
            ("updating", "img-1")
        );
        // Not twice: the refusal names the status and what is allowed.
        let err = begin(&store, update("g1", "img-3", 0), UnixMillis(T0))
            .await
            .expect_err("already updating")
            .to_string();
        assert!(
            err.contains("status updating") && err.contains("published or update-failed"),
            "{err}"
        );

        // Before the deadline nothing is switched.
        clock.advance(Duration::from_secs(299));
        actors.tick(&name).await.expect("tick");
        assert_eq!(
            service.show("g1").await.expect("show").info.status,
            "updating"
        );
        // At it the switch starts; no agent joined the group, so the set is
        // empty and the update is done.
        clock.advance(Duration::from_secs(1));
        actors.tick(&name).await.expect("tick");
        let d = service.show("g1").await.expect("show");
        assert_eq!(
            (d.info.status.as_str(), d.info.image.as_str()),
            ("published", "img-2")
        );
        let events = service.events(&name).await.expect("events");
        let statuses: Vec<&str> = events
            .iter()
            .filter(|e| e.kind == "status")
            .map(|e| e.message.as_str())
            .collect();
        assert_eq!(statuses.len(), 3, "{statuses:?}");
        assert!(
            statuses[1].starts_with("published -> updating"),
            "{statuses:?}"
        );
        assert!(
            statuses[2].starts_with("updating -> published"),
            "{statuses:?}"
        );
        let v = versions(&store, &registry, &name).await.expect("versions");
        assert_eq!(
            (v.image.as_str(), v.status.as_str()),
            ("img-2", "published")
        );
        // From published again, a new update may start.
        begin(&store, update("g1", "img-3", 0), UnixMillis(T0 + 300_000))
            .await
            .expect("a second update");
        shutdown.cancel();
        tracker.close();
        tracker.wait().await;
    }

    #[tokio::test]
    async fn an_image_update_is_refused_while_an_ota_rolls_out() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store =
            Store::open(&dir.path().join("ferry.db"), StoreOptions::default()).expect("store");
        let service = GroupService::new(store.clone(), GroupsConfig::default());
        service
            .publish(spec("g1"), UnixMillis(T0))
            .await
            .expect("publish");
        store
            .exec(|c| {
                c.execute_batch(
                    "INSERT INTO ota_updates (group_num, component, version, package,
                         description, offered_at)
                     SELECT num, 'app', '2', '', 'app 2', 0 FROM groups WHERE name = 'g1';
                     INSERT INTO ota_schedules (update_id, group_num, start_at, wave, drain_ms,
                         state, created_at)
                     SELECT id, group_num, 0, 1, 0, 'running', 0 FROM ota_updates;",
                )?;
                Ok(())
            })
            .await
            .expect("running schedule");
        let err = begin(&store, update("g1", "img-2", 0), UnixMillis(T0))
            .await
            .expect_err("refused while the OTA runs");
        assert!(
            matches!(&err, GroupError::Conflict(m) if m.contains("OTA schedule 1")),
            "{err}"
        );
        assert_eq!(
            service.show("g1").await.expect("show").info.status,
            "published"
        );
    }
}
