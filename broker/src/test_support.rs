//! What the broker's unit tests share: a group spec to publish, and a rig
//! with the groups wired as the daemon wires them (a store in a temporary
//! directory, the registry, one group service, the actors and the rollouts'
//! board) on a manual clock.

use std::path::Path;
use std::sync::Arc;

use ferry_common::admin::{BillingSpec, GroupSpec, PolicySpec, SessionType};
use ferry_common::{GroupName, ResourceId, SessionId, UnixMillis};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::clock::ManualClock;
use crate::config::GroupsConfig;
use crate::groups::{ActorsParts, GroupActors, GroupService, Groups};
use crate::ota::Ota;
use crate::registry::Registry;
use crate::store::Store;

pub fn rid(s: &str) -> ResourceId {
    s.parse().expect("resource id")
}

pub fn sid(s: &str) -> SessionId {
    s.parse().expect("session id")
}

pub fn gname(s: &str) -> GroupName {
    s.parse().expect("group name")
}

/// A pay-as-you-go group `name` of 2 base resources, 2 concurrent
/// sessions each, up to 2 elastic ones; tests change what they need.
pub fn group_spec(name: &str) -> GroupSpec {
    GroupSpec {
        name: Some(gname(name)),
        region: "cn-hangzhou".into(),
        office_network: "office-net-1".into(),
        spec: "office-4c8g".into(),
        image: "img-1".into(),
        billing: BillingSpec::PayAsYouGo,
        base_resources: 2,
        session_type: SessionType::Independent,
        users: vec![],
        policy: PolicySpec {
            concurrent_sessions: Some(2),
            usage_threshold: Some(85),
            scale_out_step: Some(2),
            max_elastic: Some(2),
            max_idle_ms: Some(3_600_000),
            ..PolicySpec::default()
        },
    }
}

/// Opens a fresh store in `dir`.
pub fn open_store(dir: &Path) -> Store {
    crate::store::testing::open_for_test(dir)
}

/// The groups and OTA on `store` and `registry`, wired as the daemon
/// wires them (one service; the actors wake OTA's rollouts).
pub fn wire(
    store: &Store,
    registry: &Arc<Registry>,
    config: GroupsConfig,
    tracker: &TaskTracker,
    shutdown: &CancellationToken,
) -> (Groups, Ota) {
    let ota = Ota::new(store.clone(), config.clock.clone());
    let service = GroupService::new(store.clone(), config);
    let actors = GroupActors::new(ActorsParts {
        store: store.clone(),
        registry: registry.clone(),
        service: service.clone(),
        provisioning: None,
        rollouts: ota.board().clone(),
        tracker: tracker.clone(),
        shutdown: shutdown.clone(),
        ownership: crate::cluster::Ownership::everything(),
    });
    (Groups::new(service, actors), ota)
}

/// The groups wired as the daemon wires them (see [`wire`]). No actor
/// runs until a test syncs one (or calls `start_all`).
pub struct Rig {
    _dir: tempfile::TempDir,
    pub store: Store,
    pub clock: ManualClock,
    pub service: GroupService,
    pub actors: GroupActors,
    pub shutdown: CancellationToken,
    pub tracker: TaskTracker,
}

impl Rig {
    /// A rig whose groups' clock is a manual one at `t0`.
    pub fn new(t0: UnixMillis) -> Rig {
        Rig::with_config(t0, GroupsConfig::default())
    }

    /// [`Rig::new`] with `config` (its clock is replaced by the manual one).
    pub fn with_config(t0: UnixMillis, config: GroupsConfig) -> Rig {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = open_store(dir.path());
        Rig::on_store(dir, store, t0, config)
    }

    /// A rig on a store a test prepared in `dir`.
    pub fn on_store(
        dir: tempfile::TempDir,
        store: Store,
        t0: UnixMillis,
        config: GroupsConfig,
    ) -> Rig {
        let clock = ManualClock::new(t0);
        let config = GroupsConfig {
            clock: clock.clock(),
            ..config
        };
        let registry = Arc::new(Registry::new());
        let (shutdown, tracker) = (CancellationToken::new(), TaskTracker::new());
        let (groups, _) = wire(&store, &registry, config, &tracker, &shutdown);
        let (service, actors) = (groups.service().clone(), groups.actors().clone());
        Rig {
            _dir: dir,
            store,
            clock,
            service,
            actors,
            shutdown,
            tracker,
        }
    }

    /// Stops every task and closes the store.
    pub async fn close(self) {
        self.shutdown.cancel();
        self.tracker.close();
        self.tracker.wait().await;
        self.store.close().await;
    }
}
