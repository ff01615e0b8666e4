//! The machine on virtual time: a simulated group (its actor's view, its
//! agents, the store's open sessions) answers every command the way an
//! agent does, and the clock jumps from deadline to deadline.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use ferry_common::admin::OtaUpdateInfo;
use ferry_common::wire::{Command, CommandOutcome, ComponentVersion, Inventory, UpdateReport};

use super::*;
use crate::store::rollouts::ResultRow;

const T0: UnixMillis = UnixMillis(1_800_000_000_000);
const MINUTE: i64 = 60_000;

fn rid(s: &str) -> ResourceId {
    s.parse().expect("resource id")
}

fn sid(s: &str) -> SessionId {
    s.parse().expect("session id")
}

fn at(offset_ms: i64) -> UnixMillis {
    UnixMillis(T0.0 + offset_ms)
}

/// How a simulated agent's update or image hook goes.
#[derive(Clone, Debug)]
enum Hook {
    Succeeds,
    Fails(String),
    /// An agent updating itself: the hook restarts it, so the command's
    /// answer never comes; the new process reports the update it carried out.
    Restarts,
}

/// A simulated host.
#[derive(Clone, Debug)]
struct Agent {
    conn: u64,
    connected: bool,
    /// Whether it sent its inventory on this connection.
    reported: bool,
    agent_version: String,
    image: String,
    components: BTreeMap<String, String>,
    last_update: Option<UpdateReport>,
    /// Its open sessions (its reports and the store say the same).
    sessions: Vec<SessionId>,
    draining: bool,
    hook: Hook,
    /// Its users log out when warned.
    leave_when_warned: bool,
}

impl Agent {
    fn new(sessions: &[&str]) -> Agent {
        Agent {
            conn: 1,
            connected: true,
            reported: true,
            agent_version: "1.0".into(),
            image: "img-1".into(),
            components: BTreeMap::new(),
            last_update: None,
            sessions: sessions.iter().map(|s| sid(s)).collect(),
            draining: false,
            hook: Hook::Succeeds,
            leave_when_warned: false,
        }
    }

    fn inventory(&self) -> Inventory {
        Inventory {
            agent_version: self.agent_version.clone(),
            image_version: self.image.clone(),
            components: self
                .components
                .iter()
                .map(|(name, version)| ComponentVersion {
                    name: name.clone(),
                    version: version.clone(),
                })
                .collect(),
            last_update: self.last_update.clone(),
        }
    }
}

/// A group, its agents and one rollout, on a virtual clock.
struct Sim {
    now: UnixMillis,
    machine: Rollout,
    agents: BTreeMap<ResourceId, Agent>,
    /// The group's actor: its engine's hosts in order; `None`: no actor.
    engine: Option<Vec<(ResourceId, ResourceState)>>,
    joined: BTreeSet<ResourceId>,
    row: GroupRow,
    running: bool,
    /// The group's members in the store (assigned hosts).
    members: BTreeSet<ResourceId>,
    /// Sent, not answered yet.
    out: VecDeque<(ResourceId, Purpose, Command)>,
    /// Every command sent, in order.
    sent: Vec<(ResourceId, Command)>,
    records: Vec<Record>,
    tells: Vec<Tell>,
}

impl Sim {
    /// `hosts`: each ready, joined and connected, with these sessions.
    fn new(machine: Rollout, status: &str, hosts: &[(&str, &[&str])]) -> Sim {
        let mut sim = Sim {
            now: T0,
            machine,
            agents: BTreeMap::new(),
            engine: Some(Vec::new()),
            joined: BTreeSet::new(),
            row: GroupRow {
                status: status.into(),
                image: "img-1".into(),
            },
            running: true,
            members: BTreeSet::new(),
            out: VecDeque::new(),
            sent: Vec::new(),
            records: Vec::new(),
            tells: Vec::new(),
        };
        for (h, sessions) in hosts {
            sim.agents.insert(rid(h), Agent::new(sessions));
            sim.joined.insert(rid(h));
            sim.members.insert(rid(h));
            if let Some(e) = sim.engine.as_mut() {
                e.push((rid(h), ResourceState::Ready));
            }
        }
        sim
    }

    fn agent(&mut self, h: &str) -> &mut Agent {
        self.agents.get_mut(&rid(h)).expect("a simulated host")
    }

    fn set_state(&mut self, h: &str, state: ResourceState) {
        if let Some(e) = self.engine.as_mut() {
            for (r, s) in e.iter_mut() {
                if r.as_str() == h {
                    *s = state;
                }
            }
        }
    }

    fn observation(&self) -> Observation {
        let wanted = self.machine.wants_recorded();
        let group = match &self.engine {
            None => Err("group g has no running actor".to_owned()),
            Some(engine) => Ok(GroupObs {
                resources: engine
                    .iter()
                    .map(|(r, state)| HostView {
                        resource: r.clone(),
                        state: *state,
                        // What the actor knows: the reports of a joined,
                        // connected agent.
                        sessions: self
                            .agents
                            .get(r)
                            .filter(|a| a.connected && self.joined.contains(r))
                            .map(|a| a.sessions.clone())
                            .unwrap_or_default(),
                    })
                    .collect(),
                joined: self.joined.clone(),
            }),
        };
        Observation {
            group,
            live: self
                .agents
                .iter()
                .filter(|(_, a)| a.connected)
                .map(|(r, a)| {
                    (
                        r.clone(),
                        Live {
                            conn: a.conn,
                            available: true,
                            draining: a.draining,
                            inventory: a.reported.then(|| a.inventory()),
                        },
                    )
                })
                .collect(),
            recorded: wanted
                .iter()
                .map(|r| {
                    let open = self.agents.get(r).map(|a| a.sessions.clone());
                    (r.clone(), open.unwrap_or_default())
                })
                .collect(),
            row: Some(self.row.clone()),
            members: self.members.clone(),
            running: self.running,
        }
    }

    /// What `h`'s agent answers to `command`, and what it does.
    fn answer(&mut self, h: &ResourceId, command: &Command) -> Answer {
        let Some(a) = self.agents.get_mut(h).filter(|a| a.connected) else {
            return Answer::Lost(format!("resource {h} is not connected"));
        };
        match command {
            Command::WarnSession { .. } if a.leave_when_warned => a.sessions.clear(),
            Command::DisconnectSession { session, .. } => a.sessions.retain(|s| s != session),
            Command::Drain => a.draining = true,
            Command::Undrain => a.draining = false,
            Command::SwitchImage { image } => match &a.hook {
                Hook::Fails(why) => return Answer::Failed(why.clone()),
                _ => a.image = image.clone(),
            },
            Command::ApplyUpdate {
                update,
                component,
                version,
                ..
            } => {
                match &a.hook {
                    Hook::Fails(why) => return Answer::Failed(why.clone()),
                    Hook::Succeeds => {}
                    Hook::Restarts => {
                        // The new process runs its own version and says so.
                        a.conn += 1;
                        a.last_update = Some(UpdateReport {
                            update: *update,
                            component: component.clone(),
                            version: version.clone(),
                            outcome: CommandOutcome::Done,
                        });
                        return Answer::Lost(format!(
                            "connection of resource {h} closed before it answered"
                        ));
                    }
                }
                match component.as_str() {
                    "agent" => a.agent_version = version.clone(),
                    "image" => a.image = version.clone(),
                    name => {
                        a.components.insert(name.to_owned(), version.clone());
                    }
                }
            }
            _ => {}
        }
        Answer::Done
    }

    /// One wake of the driver: the observation, the answers in flight, the
    /// deadlines due; whether anything happened.
    fn turn(&mut self) -> bool {
        let now = self.now;
        let obs = self.observation();
        self.machine.handle(now, Input::Observed(obs));
        let answered = !self.out.is_empty();
        for (host, purpose, command) in std::mem::take(&mut self.out) {
            let answer = self.answer(&host, &command);
            self.machine.handle(
                now,
                Input::Answered {
                    host,
                    purpose,
                    answer,
                },
            );
        }
        self.machine.handle_timeout(now);
        let outputs: Vec<Output> = self.machine.drain_outputs().collect();
        let busy = answered || !outputs.is_empty();
        for o in outputs {
            match o {
                Output::Command {
                    host,
                    purpose,
                    command,
                    ..
                } => {
                    self.sent.push((host.clone(), command.clone()));
                    self.out.push_back((host, purpose, command));
                }
                Output::Record(r) => self.records.push(r),
                Output::Tell(t) => self.tells.push(t),
            }
        }
        busy
    }

    /// Runs until nothing happens at the current time.
    fn settle(&mut self) {
        for _ in 0..1_000 {
            if !self.turn() && self.out.is_empty() {
                return;
            }
        }
        panic!("the rollout never settles at {:?}", self.now);
    }

    /// Runs, jumping from deadline to deadline, until it is finished or
    /// waits for nothing but `limit`.
    fn run_until(&mut self, limit: UnixMillis) {
        for _ in 0..1_000 {
            self.settle();
            if self.machine.is_finished() {
                return;
            }
            match self.machine.poll_deadline() {
                Some(d) if d <= limit => {
                    assert!(
                        d > self.now,
                        "deadline {d:?} due at {:?} not handled",
                        self.now
                    );
                    self.now = d;
                }
                _ => return,
            }
        }
        panic!("too many deadlines");
    }

    fn run(&mut self) {
        self.run_until(UnixMillis(i64::MAX));
    }

    /// The commands sent to `h`, by kind.
    fn sent_to(&self, h: &str) -> Vec<&'static str> {
        self.sent
            .iter()
            .filter(|(r, _)| r.as_str() == h)
            .map(|(_, c)| kind(c))
            .collect()
    }

    fn events(&self, of: &str) -> Vec<String> {
        self.records
            .iter()
            .filter_map(|r| match r {
                Record::Event { kind, message, .. } if *kind == of => Some(message.clone()),
                _ => None,
            })
            .collect()
    }

    fn host_records(&self, h: &str) -> Vec<HostRecord> {
        self.records
            .iter()
            .filter_map(|r| match r {
                Record::Host { host, step, .. } if host.as_str() == h => Some(*step),
                _ => None,
            })
            .collect()
    }

    /// The status change it recorded, if any.
    fn status(&self) -> Option<(String, Status)> {
        self.records.iter().find_map(|r| match r {
            Record::Status { from, to, .. } => Some((from.clone(), *to)),
            _ => None,
        })
    }

    fn ended(&self) -> Option<bool> {
        self.records.iter().find_map(|r| match r {
            Record::Ended { ok, .. } => Some(*ok),
            _ => None,
        })
    }
}

fn kind(c: &Command) -> &'static str {
    match c {
        Command::Drain => "drain",
        Command::Undrain => "undrain",
        Command::WarnSession { .. } => "warn",
        Command::DisconnectSession { .. } => "disconnect",
        Command::ApplyUpdate { .. } => "apply",
        Command::SwitchImage { .. } => "switch",
        _ => "other",
    }
}

const WARNING: i64 = 5 * MINUTE;

fn image_load(results: &[(&str, Recorded)], failed_before: &[&str]) -> ImageLoad {
    ImageLoad {
        id: 1,
        group: "g".parse().expect("name"),
        image: "img-2".into(),
        started_at: T0,
        disconnect_at: at(WARNING),
        results: results.iter().map(|(r, o)| (rid(r), o.clone())).collect(),
        previously_failed: failed_before.iter().map(|r| rid(r)).collect(),
        open: BTreeMap::new(),
    }
}

fn image_sim(results: &[(&str, Recorded)], hosts: &[(&str, &[&str])]) -> Sim {
    Sim::new(
        Rollout::image(image_load(results, &[]), Settings::default()),
        "updating",
        hosts,
    )
}

#[test]
fn an_image_update_warns_every_session_then_switches_every_host_at_the_deadline() {
    let mut sim = image_sim(&[], &[("h1", &["s1"]), ("h2", &["s2"]), ("h3", &[])]);
    // The warning: each session warned with the deadline, nothing else.
    sim.run_until(at(WARNING - 1));
    assert_eq!(sim.now, T0);
    let warned: Vec<(String, UnixMillis)> = sim
        .sent
        .iter()
        .filter_map(|(_, c)| match c {
            Command::WarnSession {
                session, deadline, ..
            } => Some((session.to_string(), *deadline)),
            _ => None,
        })
        .collect();
    assert_eq!(
        warned,
        [("s1".into(), at(WARNING)), ("s2".into(), at(WARNING))]
    );
    assert_eq!(sim.events("session-warned").len(), 2);
    assert!(sim.records.iter().all(|r| !matches!(r, Record::Plan(_))));
    let p = sim.machine.progress().expect("running");
    let steps: Vec<(&str, &str)> = p
        .hosts
        .iter()
        .map(|h| (h.resource.as_str(), h.step))
        .collect();
    assert_eq!(
        steps,
        [("h1", "warned"), ("h2", "warned"), ("h3", "waiting")]
    );
    assert_eq!(sim.machine.poll_deadline(), Some(at(WARNING)));

    // The deadline: the set is recorded, sessions disconnected, then the switch.
    sim.run();
    assert_eq!(sim.now, at(WARNING));
    assert_eq!(
        sim.records[sim
            .records
            .iter()
            .position(|r| matches!(r, Record::Plan(_)))
            .expect("plan")],
        Record::Plan(vec![rid("h1"), rid("h2"), rid("h3")])
    );
    assert_eq!(sim.sent_to("h1"), ["warn", "disconnect", "switch"]);
    assert_eq!(sim.sent_to("h3"), ["switch"]);
    for h in ["h1", "h2", "h3"] {
        assert_eq!(sim.host_records(h), [HostRecord::Done], "{h}");
        assert_eq!(sim.agent(h).image, "img-2");
    }
    assert!(sim
        .events("image-step")
        .iter()
        .any(|e| e == "h1 switching to image img-2 after disconnecting 1 open session(s): s1"));
    assert_eq!(sim.ended(), Some(true));
    assert!(sim.records.contains(&Record::GroupImage {
        image: "img-2".into(),
        at: at(WARNING)
    }));
    assert_eq!(sim.status(), Some(("updating".into(), Status::Published)));
    assert_eq!(sim.tells, [Tell::Sync]);
    assert!(sim.machine.is_finished() && sim.machine.progress().is_none());
}

#[test]
fn a_failing_switch_drains_its_host_and_the_others_keep_going() {
    let mut sim = image_sim(&[], &[("h1", &[]), ("h2", &[])]);
    sim.agent("h2").hook =
        Hook::Fails("image hook failed (exit status 7): no space left on device".into());
    sim.run();
    assert_eq!(sim.sent_to("h1"), ["switch"]);
    assert_eq!(sim.sent_to("h2"), ["switch", "drain"]);
    assert_eq!(sim.host_records("h1"), [HostRecord::Done]);
    assert_eq!(sim.host_records("h2"), [HostRecord::Failed]);
    assert!(sim.agent("h2").draining && !sim.agent("h1").draining);
    assert_eq!(sim.tells, [Tell::Drained(rid("h2")), Tell::Sync]);
    let failed = sim.events("image-switch-failed");
    assert_eq!(failed.len(), 1);
    assert!(
        failed[0].starts_with("h2 did not switch to image img-2: the image switch failed")
            && failed[0].contains("exit status 7")
            && failed[0].contains("it was drained"),
        "{failed:?}"
    );
    assert_eq!(sim.ended(), Some(false));
    assert_eq!(
        sim.status(),
        Some(("updating".into(), Status::UpdateFailed))
    );
    let message = sim
        .records
        .iter()
        .find_map(|r| match r {
            Record::Status { message, .. } => Some(message.clone()),
            _ => None,
        })
        .expect("status");
    assert!(
        message.contains("failed on 1 of 2 resource(s): h2 (")
            && message.contains("the 1 that switched"),
        "{message}"
    );
    assert!(!sim
        .records
        .iter()
        .any(|r| matches!(r, Record::GroupImage { .. })));
}

#[test]
fn a_resumed_switch_redoes_no_host_and_a_host_on_the_image_is_not_switched_again() {
    // Recorded: h1 done, h2 failed, h3 and h4 pending; h4 already runs the
    // image (it switched before the broker stopped); h2 failed before and
    // was drained: a success undrains it (not here: it is over).
    let mut sim = Sim::new(
        Rollout::image(
            image_load(
                &[
                    ("h1", Recorded::Done),
                    ("h2", Recorded::Failed("hook failed".into())),
                    ("h3", Recorded::Pending),
                    ("h4", Recorded::Pending),
                ],
                &["h3"],
            ),
            Settings::default(),
        ),
        "updating",
        &[("h1", &[]), ("h2", &[]), ("h3", &["s3"]), ("h4", &[])],
    );
    sim.now = at(WARNING + MINUTE);
    sim.agent("h4").image = "img-2".into();
    sim.run();
    assert!(sim.sent_to("h1").is_empty() && sim.sent_to("h2").is_empty());
    assert!(sim.sent_to("h4").is_empty(), "already on the image");
    // h3 failed in the group's previous update: undrained once switched.
    assert_eq!(sim.sent_to("h3"), ["disconnect", "switch", "undrain"]);
    assert!(sim.tells.contains(&Tell::Undrained(rid("h3"))));
    assert_eq!(
        sim.events("image-update"),
        ["image update to img-2 resumed: switching the resources not done yet"]
    );
    assert!(sim
        .events("image-switched")
        .contains(&"h4 already runs image img-2".to_owned()));
    assert_eq!(
        sim.status(),
        Some(("updating".into(), Status::UpdateFailed))
    );
}

#[test]
fn an_away_host_is_switched_when_it_joins_and_fails_after_the_gone_timeout() {
    let mut sim = image_sim(&[], &[("h1", &[]), ("h2", &[]), ("h3", &[])]);
    sim.agent("h2").connected = false;
    sim.agent("h3").connected = false;
    sim.run_until(at(WARNING));
    assert_eq!(sim.sent_to("h1"), ["switch"]);
    let p = sim.machine.progress().expect("switching");
    let gone = at(WARNING + 10 * MINUTE);
    assert_eq!(
        p.hosts
            .iter()
            .map(|h| (h.resource.as_str(), h.step, h.until))
            .collect::<Vec<_>>(),
        [
            ("h1", "done", None),
            ("h2", "waiting", Some(gone)),
            ("h3", "waiting", Some(gone))
        ]
    );
    // h2 comes back on a new connection: switched at once.
    sim.now = at(WARNING + MINUTE);
    sim.agent("h2").connected = true;
    sim.agent("h2").conn = 2;
    sim.settle();
    assert_eq!(sim.sent_to("h2"), ["switch"]);
    assert_eq!(sim.host_records("h2"), [HostRecord::Done]);
    // h3 never does: it fails at the end of the wait.
    sim.run();
    assert_eq!(sim.now, gone);
    assert_eq!(sim.host_records("h3"), [HostRecord::Failed]);
    assert!(sim.events("image-switch-failed")[0].contains("not connected within 600 s"));
    assert_eq!(
        sim.status(),
        Some(("updating".into(), Status::UpdateFailed))
    );

    // A host a scale-in released while it was away is left out instead.
    let mut sim = image_sim(&[], &[("h1", &[]), ("e1", &[])]);
    sim.agent("e1").connected = false;
    sim.run_until(at(WARNING));
    sim.set_state("e1", ResourceState::Released);
    sim.run();
    assert!(sim
        .events("image-update")
        .contains(&"e1 left the group during the image update: not switched".to_owned()));
    assert_eq!(sim.status(), Some(("updating".into(), Status::Published)));
}

#[test]
fn a_switch_cut_by_a_lost_connection_goes_on_when_the_agent_is_back() {
    let mut sim = image_sim(&[], &[("h1", &[])]);
    sim.run_until(at(WARNING - 1));
    sim.now = at(WARNING);
    sim.turn();
    // The switch is out; the agent's connection drops before it answers.
    assert_eq!(sim.sent_to("h1"), ["switch"]);
    sim.agent("h1").connected = false;
    sim.settle();
    assert!(sim.events("image-switch-interrupted")[0].starts_with("h1: image switch: "));
    assert!(sim.host_records("h1").is_empty(), "not an outcome");
    sim.agent("h1").connected = true;
    sim.agent("h1").conn = 2;
    sim.run();
    assert_eq!(sim.sent_to("h1"), ["switch", "switch"]);
    assert_eq!(sim.status(), Some(("updating".into(), Status::Published)));
}

#[test]
fn a_restart_during_the_warning_warns_recorded_sessions_when_their_agent_joins() {
    let mut load = image_load(&[], &[]);
    load.open = BTreeMap::from([
        (rid("h1"), BTreeSet::from([sid("s1")])),
        (rid("h2"), BTreeSet::from([sid("s2")])),
    ]);
    let mut sim = Sim::new(
        Rollout::image(load, Settings::default()),
        "updating",
        &[("h1", &["s1"]), ("h2", &["s2"])],
    );
    // The broker restarted a minute in: h2's agent is back (joined), h1's
    // is not.
    sim.now = at(MINUTE);
    sim.agent("h1").connected = false;
    sim.joined.remove(&rid("h1"));
    sim.settle();
    assert_eq!(
        sim.events("image-update")[0],
        format!(
            "warning 2 open session(s): they are disconnected in 4m ({}) for the switch to \
             image img-2; 1 of them on host(s) whose agents are not connected yet (h1): warned \
             when they are back",
            crate::render::rfc3339_secs(at(WARNING))
        )
    );
    assert_eq!(sim.sent_to("h2"), ["warn"]);
    let p = sim.machine.progress().expect("warning");
    assert_eq!(p.hosts[0].step, "waiting");
    assert!(p.hosts[0]
        .detail
        .as_deref()
        .is_some_and(|d| d.contains("not connected")));
    // h1's agent joins: s1 is warned with the same deadline.
    sim.now = at(2 * MINUTE);
    sim.agent("h1").connected = true;
    sim.agent("h1").conn = 2;
    sim.settle();
    assert!(sim.sent_to("h1").is_empty(), "connected, not joined yet");
    sim.joined.insert(rid("h1"));
    sim.settle();
    assert_eq!(sim.sent_to("h1"), ["warn"]);
    assert!(sim.sent.iter().all(|(_, c)| match c {
        Command::WarnSession { deadline, .. } => *deadline == at(WARNING),
        _ => true,
    }));
    assert_eq!(sim.events("image-step").len(), 1);
    sim.run();
    assert_eq!(sim.sent_to("h1"), ["warn", "disconnect", "switch"]);
}

#[test]
fn a_switch_that_starts_before_the_members_rejoin_waits_for_them_instead_of_skipping_them() {
    let mut sim = Sim::new(
        Rollout::image(image_load(&[], &[]), Settings::default()),
        "updating",
        &[("h1", &[]), ("h2", &[])],
    );
    // The broker restarted just before the warning ended: the group's
    // actor is back, no agent has rejoined yet; the store still knows both
    // hosts belong to the group.
    for h in ["h1", "h2"] {
        sim.agent(h).connected = false;
    }
    sim.joined.clear();
    sim.now = at(WARNING);
    sim.settle();
    assert!(
        !sim.machine.is_finished(),
        "{:?}",
        sim.events("image-update")
    );
    assert_eq!(
        sim.events("image-update").last().map(String::as_str),
        Some("switching 2 resource(s) to image img-2: h1, h2")
    );
    assert!(
        sim.status().is_none(),
        "not published with hosts left behind"
    );
    // They come back: each is switched once, then the group is published.
    sim.now = at(WARNING + MINUTE);
    for h in ["h1", "h2"] {
        sim.agent(h).connected = true;
        sim.agent(h).conn = 2;
        sim.joined.insert(rid(h));
    }
    sim.run();
    assert_eq!(sim.sent_to("h1"), ["switch"]);
    assert_eq!(sim.sent_to("h2"), ["switch"]);
    assert_eq!(sim.status(), Some(("updating".into(), Status::Published)));
}

#[test]
fn an_image_update_stops_when_the_group_leaves_updating() {
    let mut sim = image_sim(&[], &[("h1", &["s1"])]);
    sim.settle();
    sim.row.status = "expired".into();
    sim.settle();
    assert!(sim.machine.is_finished());
    assert_eq!(sim.ended(), Some(false));
    assert!(sim
        .events("image-update")
        .contains(&"image update to img-2 stopped: the group is expired".to_owned()));
    assert!(sim.status().is_none());
    // Ended by a newer update: nothing more is written.
    let mut sim = image_sim(&[], &[("h1", &[])]);
    sim.settle();
    let before = sim.records.len();
    sim.running = false;
    sim.settle();
    assert!(sim.machine.is_finished());
    assert_eq!(sim.records.len(), before);
}

fn update(component: &str, version: &str) -> OtaUpdateInfo {
    OtaUpdateInfo {
        id: 7,
        group: "g".parse().expect("name"),
        component: component.into(),
        version: version.into(),
        package: "/srv/pkg.deb".into(),
        description: "an update".into(),
        offered_at: T0,
    }
}

fn row(resource: &str, state: &str, started_at: Option<UnixMillis>) -> ResultRow {
    ResultRow {
        position: 0,
        resource: rid(resource),
        state: state.into(),
        started_at,
        finished_at: None,
        detail: None,
    }
}

const DRAIN: i64 = 10 * MINUTE;

fn ota_load(rows: Vec<ResultRow>, wave: u32) -> OtaLoad {
    OtaLoad {
        schedule: 3,
        group: "g".parse().expect("name"),
        update: update("office", "3.2"),
        wave,
        drain_ms: u64::try_from(DRAIN).expect("drain"),
        rows,
        retry: BTreeSet::new(),
    }
}

fn ota_sim(load: OtaLoad, status: &str, hosts: &[(&str, &[&str])]) -> Sim {
    Sim::new(Rollout::ota(load, Settings::default()), status, hosts)
}

#[test]
fn an_ota_rollout_runs_its_waves_host_by_host_in_order() {
    let mut sim = ota_sim(
        ota_load(Vec::new(), 2),
        "published",
        &[("h1", &["s1"]), ("h2", &["s2"]), ("h3", &[])],
    );
    // s1's user logs out when warned; s2's does not.
    sim.agent("h1").leave_when_warned = true;
    sim.settle();
    assert_eq!(
        sim.records[0],
        Record::Plan(vec![rid("h1"), rid("h2"), rid("h3")])
    );
    assert!(sim.events("ota-step")[0].contains("plan: 3 resource(s) in waves of 2"));
    // h1: warned, its session ended, updated at once; h2 waits for its
    // deadline; h3's wave has not come.
    assert_eq!(sim.sent_to("h1"), ["drain", "warn", "apply", "undrain"]);
    assert_eq!(sim.sent_to("h2"), ["drain", "warn"]);
    assert!(sim.sent_to("h3").is_empty());
    assert_eq!(sim.machine.poll_deadline(), Some(at(DRAIN)));
    sim.run();
    assert_eq!(
        sim.sent_to("h2"),
        ["drain", "warn", "disconnect", "apply", "undrain"]
    );
    assert_eq!(sim.sent_to("h3"), ["drain", "apply", "undrain"]);
    let deadline = sim.sent.iter().find_map(|(r, c)| match c {
        Command::WarnSession { deadline, .. } if r.as_str() == "h2" => Some(*deadline),
        _ => None,
    });
    assert_eq!(deadline, Some(at(DRAIN)), "counted from h2's drain");
    for h in ["h1", "h2", "h3"] {
        assert_eq!(
            sim.host_records(h),
            [HostRecord::Draining, HostRecord::Updating, HostRecord::Done],
            "{h}"
        );
        assert!(!sim.agent(h).draining);
    }
    let h2_done = sim.records.iter().find_map(|r| match r {
        Record::Host {
            host,
            step: HostRecord::Done,
            detail,
            ..
        } if host.as_str() == "h2" => Some(detail.clone()),
        _ => None,
    });
    assert_eq!(
        h2_done,
        Some(Some(
            "1 session(s) disconnected at the drain deadline".into()
        ))
    );
    assert_eq!(sim.ended(), Some(true));
    assert_eq!(sim.status(), None, "a published group stays so");
    assert_eq!(
        sim.tells,
        [
            Tell::Drained(rid("h1")),
            Tell::Drained(rid("h2")),
            Tell::Undrained(rid("h1")),
            Tell::Undrained(rid("h2")),
            Tell::Drained(rid("h3")),
            Tell::Undrained(rid("h3"))
        ]
    );
}

#[test]
fn an_ota_failure_stops_the_rollout_after_its_wave() {
    let mut sim = ota_sim(
        ota_load(Vec::new(), 2),
        "published",
        &[("h1", &[]), ("h2", &[]), ("h3", &[])],
    );
    sim.agent("h1").hook = Hook::Fails("update hook failed (exit status 1)".into());
    sim.run();
    assert_eq!(sim.sent_to("h1"), ["drain", "apply"], "stays drained");
    assert_eq!(
        sim.sent_to("h2"),
        ["drain", "apply", "undrain"],
        "its wave ends"
    );
    assert!(sim.sent_to("h3").is_empty(), "the next wave never starts");
    assert_eq!(
        sim.host_records("h1"),
        [
            HostRecord::Draining,
            HostRecord::Updating,
            HostRecord::Failed
        ]
    );
    assert!(sim.host_records("h3").is_empty());
    assert_eq!(sim.ended(), Some(false));
    let failed = sim.events("ota-failed");
    assert!(
        failed.len() == 1 && failed[0].contains("h1: update failed: update hook failed"),
        "{failed:?}"
    );
    assert_eq!(
        sim.status(),
        Some(("published".into(), Status::UpdateFailed))
    );
    assert!(sim.tells.contains(&Tell::Sync));
    // From update-failed, another failure changes no status.
    let mut sim = ota_sim(ota_load(Vec::new(), 1), "update-failed", &[("h1", &[])]);
    sim.agent("h1").hook = Hook::Fails("no".into());
    sim.run();
    assert_eq!((sim.ended(), sim.status()), (Some(false), None));
}

#[test]
fn a_resumed_ota_rollout_redoes_no_done_host_and_keeps_its_drain_deadline() {
    let started = at(-2 * MINUTE);
    let rows = vec![
        row("h1", "done", Some(at(-5 * MINUTE))),
        row("h2", "draining", Some(started)),
        row("h3", "pending", None),
    ];
    let mut sim = ota_sim(
        ota_load(rows, 1),
        "published",
        &[("h1", &[]), ("h2", &["s2"]), ("h3", &[])],
    );
    sim.run();
    assert!(sim.sent_to("h1").is_empty(), "done before the restart");
    assert!(!sim.records.iter().any(|r| matches!(r, Record::Plan(_))));
    let deadline = sim.sent.iter().find_map(|(_, c)| match c {
        Command::WarnSession { deadline, .. } => Some(*deadline),
        _ => None,
    });
    assert_eq!(deadline, Some(UnixMillis(started.0 + DRAIN)));
    assert_eq!(
        sim.sent_to("h2"),
        ["drain", "warn", "disconnect", "apply", "undrain"]
    );
    assert_eq!(sim.sent_to("h3"), ["drain", "apply", "undrain"]);
    assert_eq!(sim.ended(), Some(true));
    // A failure recorded before the restart is tried again.
    assert_eq!(
        plan_waves(&[row("a", "failed", None), row("b", "done", None)], 5),
        [vec![rid("a")]]
    );
}

#[test]
fn the_plan_leaves_out_drained_and_leaving_hosts_and_needs_a_live_group() {
    let mut load = ota_load(Vec::new(), 5);
    load.retry = BTreeSet::from([rid("h3")]);
    let mut sim = ota_sim(
        load,
        "published",
        &[("h1", &[]), ("h2", &[]), ("h3", &[]), ("h4", &[])],
    );
    // An operator drained h2; an earlier OTA failed on h3 and drained it.
    sim.agent("h2").draining = true;
    sim.agent("h3").draining = true;
    sim.set_state("h4", ResourceState::Releasing);
    sim.run();
    assert_eq!(sim.records[0], Record::Plan(vec![rid("h1"), rid("h3")]));
    assert!(sim.sent_to("h2").is_empty());
    assert!(sim.agent("h2").draining && !sim.agent("h3").draining);
    assert_eq!(sim.ended(), Some(true));

    // A host a scale-in releases before its turn is skipped.
    let mut sim = ota_sim(
        ota_load(Vec::new(), 1),
        "published",
        &[("h1", &[]), ("h2", &[])],
    );
    sim.agent("h1").leave_when_warned = true;
    sim.turn();
    sim.set_state("h2", ResourceState::Releasing);
    sim.run();
    assert_eq!(sim.host_records("h2"), [HostRecord::Skipped]);
    assert!(sim.sent_to("h2").is_empty());
    assert_eq!(sim.ended(), Some(true));

    // No running actor: nothing to plan from.
    let mut sim = ota_sim(ota_load(Vec::new(), 1), "published", &[("h1", &[])]);
    sim.engine = None;
    sim.run();
    assert_eq!(sim.ended(), Some(false));
    assert!(sim.events("ota-failed")[0]
        .contains("no live group to update: group g has no running actor"));
}

#[test]
fn an_ota_planned_before_the_members_rejoin_waits_for_them_and_keeps_an_operators_drain() {
    let mut sim = ota_sim(
        ota_load(Vec::new(), 1),
        "published",
        &[("h1", &[]), ("h2", &[])],
    );
    // The broker restarted as the schedule started: no agent has rejoined;
    // an operator had drained h2.
    for h in ["h1", "h2"] {
        sim.agent(h).connected = false;
    }
    sim.joined.clear();
    sim.agent("h2").draining = true;
    sim.settle();
    assert_eq!(sim.records[0], Record::Plan(vec![rid("h1"), rid("h2")]));
    assert!(sim.ended().is_none(), "waits for the members");
    // They come back: h1 is updated; h2 keeps the operator's drain.
    sim.now = at(MINUTE);
    for h in ["h1", "h2"] {
        sim.agent(h).connected = true;
        sim.agent(h).conn = 2;
        sim.joined.insert(rid(h));
    }
    sim.run();
    assert_eq!(sim.sent_to("h1"), ["drain", "apply", "undrain"]);
    assert!(sim.sent_to("h2").is_empty(), "{:?}", sim.sent_to("h2"));
    assert!(sim.agent("h2").draining);
    assert_eq!(
        sim.host_records("h2").last(),
        Some(&HostRecord::Skipped),
        "{:?}",
        sim.host_records("h2")
    );
    assert_eq!(sim.ended(), Some(true));
}

#[test]
fn an_agent_updating_itself_is_judged_by_its_reconnected_inventory() {
    let mut load = ota_load(Vec::new(), 1);
    load.update = update("agent", "2.0");
    let mut sim = ota_sim(load, "published", &[("h1", &[])]);
    sim.agent("h1").hook = Hook::Restarts;
    sim.settle();
    // No answer came; the restarted agent still runs 1.0.
    assert_eq!(sim.sent_to("h1"), ["drain", "apply"]);
    assert_eq!(sim.machine.poll_deadline(), Some(at(10 * MINUTE)));
    sim.run();
    let failed = sim.events("ota-failed");
    assert!(
        failed[0].contains("its inventory does not show agent 2.0 after 10m (it runs agent 1.0)"),
        "{failed:?}"
    );
    // When it does run the version, it is done.
    let mut load = ota_load(Vec::new(), 1);
    load.update = update("agent", "2.0");
    let mut sim = ota_sim(load, "published", &[("h1", &[])]);
    sim.agent("h1").hook = Hook::Restarts;
    sim.settle();
    sim.agent("h1").agent_version = "2.0".into();
    sim.run();
    assert_eq!(sim.sent_to("h1"), ["drain", "apply", "undrain"]);
    assert_eq!(sim.ended(), Some(true));
}

#[test]
fn an_ota_host_not_connected_fails_after_the_gone_timeout() {
    let mut sim = ota_sim(
        ota_load(vec![row("h1", "pending", None)], 1),
        "published",
        &[("h1", &[])],
    );
    sim.agent("h1").connected = false;
    sim.run();
    assert_eq!(sim.now, at(10 * MINUTE));
    assert!(sim.events("ota-failed")[0].contains("h1: not connected within 10m"));
    assert_eq!(
        sim.host_records("h1"),
        [HostRecord::Draining, HostRecord::Failed]
    );
}

#[test]
fn an_image_ota_sets_the_group_s_image_and_a_success_ends_update_failed() {
    let mut load = ota_load(Vec::new(), 1);
    load.update = update("image", "img-2");
    let mut sim = ota_sim(load, "update-failed", &[("h1", &[])]);
    sim.run();
    assert!(sim.records.contains(&Record::GroupImage {
        image: "img-2".into(),
        at: T0
    }));
    assert!(sim.events("ota-succeeded")[0].ends_with("; the group's image is now img-2"));
    assert_eq!(
        sim.status(),
        Some(("update-failed".into(), Status::Published))
    );
    assert_eq!(sim.tells.last(), Some(&Tell::Sync));
}
