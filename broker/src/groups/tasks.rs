//! Activation-notification delivery. Delivery sleeps until the next instant
//! the store says something is due (or until a change wakes it), never on a
//! polling period; lifecycle deadlines are run the same way by
//! [`super::actor::GroupActors::follow_lifecycle`]. Time comes from the
//! [`Clock`](crate::clock::Clock) in [`GroupsConfig`].

use std::time::Duration;

use ferry_common::UnixMillis;
use tokio::process::Command;
use tokio_util::sync::CancellationToken;

use super::service::{GroupService, Notification};
use super::RETRY_AFTER_ERROR;
use crate::cluster::Ownership;
use crate::config::GroupsConfig;

/// Notifications handed to the hook per round.
const NOTIFY_BATCH: usize = 32;

fn after(t: UnixMillis, d: Duration) -> UnixMillis {
    UnixMillis(t.0.saturating_add(i64::try_from(d.as_millis()).unwrap_or(i64::MAX)))
}

/// Hands pending activation notifications to the configured hook until
/// `shutdown`; see [`deliver_due`].
pub async fn deliver_notifications(
    groups: GroupService,
    config: GroupsConfig,
    owned: Ownership,
    shutdown: CancellationToken,
) {
    let clock = groups.clock();
    loop {
        let next = if config.notify_command.is_empty() {
            // No hook: notifications wait in the outbox for one to be configured.
            None
        } else {
            match deliver_due(&groups, &config, &owned, &shutdown).await {
                Ok(next) => next,
                Err(e) => {
                    tracing::error!("deliver activation notifications: {e}");
                    Some(after(clock.now(), RETRY_AFTER_ERROR))
                }
            }
        };
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = clock.sleep_until(next) => {}
            _ = groups.changed() => {}
        }
    }
}

/// One delivery round: runs the hook for each notification due now (at most
/// one batch), marks one delivered only after the hook exited 0 and
/// reschedules the others with a doubling wait; returns when the next
/// pending notification is due. A hook still running at `shutdown` is killed
/// and its notification stays pending, as if the broker had crashed.
pub async fn deliver_due(
    groups: &GroupService,
    config: &GroupsConfig,
    owned: &Ownership,
    shutdown: &CancellationToken,
) -> Result<Option<UnixMillis>, super::GroupError> {
    let clock = groups.clock();
    let mut left = false;
    for n in groups.due_notifications(clock.now(), NOTIFY_BATCH).await? {
        // Brokers sharing a store: the group's owner delivers.
        if !n.group.parse().is_ok_and(|g| owned.owns(&g)) {
            left = true;
            continue;
        }
        let result = tokio::select! {
            _ = shutdown.cancelled() => return Ok(None),
            r = run_hook(config, &n) => r,
        };
        if let Err(e) = &result {
            tracing::warn!(user = %n.user, group = %n.group, attempts = n.attempts + 1, "activation notification: {e}");
        }
        groups
            .notification_attempted(n.id, result, clock.now())
            .await?;
    }
    let next = groups.next_notification_at().await?;
    Ok(if left {
        // Others' notifications are due now: look again after a while,
        // not at once (their owners deliver them, or this broker will
        // once it owns their group).
        next.map(|t| t.max(after(clock.now(), OTHERS_NOTIFICATIONS_WAIT)))
    } else {
        next
    })
}

/// How long delivery waits when the notifications due are other brokers'.
const OTHERS_NOTIFICATIONS_WAIT: Duration = Duration::from_secs(2);

/// Runs the hook once for `n`: `Ok` only if it exited 0 within
/// `notify_timeout`. It runs in its own process group
/// ([`ferry_process::child`]); one past the timeout is killed with what it
/// started, and reaped, before this returns, so hung hooks do not pile up.
/// A failure quotes the end of its stderr.
async fn run_hook(config: &GroupsConfig, n: &Notification) -> Result<(), String> {
    let Some((program, args)) = config.notify_command.split_first() else {
        return Err("no notify_command".into());
    };
    let mut cmd = Command::new(program);
    cmd.args(args)
        .env("FERRY_NOTIFY_KIND", &n.kind)
        .env("FERRY_NOTIFY_USER", &n.user)
        .env("FERRY_NOTIFY_EMAIL", &n.email)
        .env("FERRY_NOTIFY_MOBILE", &n.mobile)
        .env("FERRY_NOTIFY_GROUP", &n.group);
    // If this future is dropped (shutdown), the hook's group dies with it.
    let done = ferry_process::child::run(cmd, config.notify_timeout, NOTIFY_STDERR_TAIL)
        .await
        .map_err(|e| format!("run {program}: {e}"))?;
    let stderr = String::from_utf8_lossy(&done.stderr);
    let stderr = stderr.trim();
    let said = if stderr.is_empty() {
        String::new()
    } else {
        format!(": {stderr}")
    };
    match done.status {
        Some(status) if status.success() => Ok(()),
        Some(status) => Err(format!("{program} exited with {status}{said}")),
        None => Err(format!(
            "{program} took longer than notify_timeout ({}); killed{said}",
            ferry_common::duration::format_duration(config.notify_timeout)
        )),
    }
}

/// Bytes of a failed notification hook's stderr quoted in its error.
const NOTIFY_STDERR_TAIL: usize = 300;

#[cfg(test)]
mod tests {
    //! The activation hook with real programs: small shell scripts in a temp
    //! dir that log their environment to a file and exit as told. Outbox time
    //! is a [`ManualClock`]; only the timeout test waits for real, and only
    //! as long as its (short) timeout.

    use std::path::{Path, PathBuf};

    use ferry_common::admin::UserSpec;

    use super::*;
    use crate::clock::ManualClock;
    use crate::store::Store;

    /// 2026-03-02T00:00:00Z
    const T0: UnixMillis = UnixMillis(1_772_409_600_000);

    /// Bounds every wait on the background task: a wait that needs it has
    /// failed (the machine is shared and slow, so it is generous).
    const PATIENCE: Duration = Duration::from_secs(30);

    /// A hook that appends one line per run to `log` (its arguments and the
    /// `FERRY_NOTIFY_*` variables), then exits 1 for the first `failures`
    /// runs and 0 after.
    fn counting_hook(dir: &Path, failures: u32) -> (Vec<String>, PathBuf) {
        let log = dir.join("hook.log");
        let script = dir.join("hook.sh");
        std::fs::write(
            &script,
            format!(
                r#"log='{log}'
echo "args=$* kind=$FERRY_NOTIFY_KIND user=$FERRY_NOTIFY_USER email=$FERRY_NOTIFY_EMAIL mobile=$FERRY_NOTIFY_MOBILE group=$FERRY_NOTIFY_GROUP" >> "$log"
runs=$(wc -l < "$log")
if [ "$runs" -le {failures} ]; then exit 1; fi
exit 0
"#,
                log = log.display()
            ),
        )
        .expect("write hook");
        // Run through sh rather than exec'ing the fresh file: another test
        // thread forking while it was open for writing would make exec fail
        // with ETXTBSY.
        let command = vec![
            "/bin/sh".to_owned(),
            script.display().to_string(),
            "--activation".to_owned(),
        ];
        (command, log)
    }

    fn runs(log: &Path) -> Vec<String> {
        std::fs::read_to_string(log)
            .map(|s| s.lines().map(str::to_owned).collect())
            .unwrap_or_default()
    }

    fn config(clock: &ManualClock, notify_command: Vec<String>) -> GroupsConfig {
        GroupsConfig {
            notify_command,
            notify_timeout: Duration::from_secs(20),
            clock: clock.clock(),
            ..GroupsConfig::default()
        }
    }

    fn open(dir: &Path, config: &GroupsConfig) -> (Store, GroupService) {
        let store = crate::store::testing::open_for_test(dir);
        (store.clone(), GroupService::new(store, config.clone()))
    }

    /// Creates alice and publishes `g1` with her assigned: one activation
    /// notification, due at once.
    async fn assign_alice(g: &GroupService) {
        g.create_user(
            UserSpec {
                id: "alice".parse().expect("user"),
                email: "alice@example.com".into(),
                mobile: "+8613800000001".into(),
            },
            g.now(),
        )
        .await
        .expect("user");
        let mut spec = crate::test_support::group_spec("g1");
        spec.base_resources = 1;
        spec.users = vec!["alice".parse().expect("user")];
        spec.policy.scale_out_step = Some(1);
        spec.policy.max_elastic = Some(1);
        g.publish(spec, g.now()).await.expect("publish");
    }

    /// Waits (bounded) until the outbox satisfies `done`; the background task
    /// gives no other signal, so this checks the store after each yield.
    async fn wait_outbox(
        g: &GroupService,
        done: impl Fn(&[super::super::service::OutboxEntry]) -> bool,
    ) {
        let deadline = tokio::time::Instant::now() + PATIENCE;
        loop {
            let o = g.outbox(10).await.expect("outbox");
            if done(&o) {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "outbox never reached the expected state: {o:?}"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    #[tokio::test]
    async fn a_failing_hook_is_retried_with_backoff_and_stays_pending_across_restarts() {
        let dir = tempfile::tempdir().expect("tempdir");
        let clock = ManualClock::new(T0);
        let (command, log) = counting_hook(dir.path(), 2);
        let config = config(&clock, command);
        let (store, g) = open(dir.path(), &config);
        let stop = CancellationToken::new();
        assign_alice(&g).await;

        // First run fails: still pending, due again in 1s.
        let next = deliver_due(&g, &config, &Ownership::everything(), &stop)
            .await
            .expect("round");
        assert_eq!(next, Some(UnixMillis(T0.0 + 1_000)));
        assert_eq!(runs(&log).len(), 1);
        let o = g.outbox(10).await.expect("outbox");
        assert_eq!((o[0].attempts, o[0].delivered_at), (1, None));
        assert!(
            o[0].last_error
                .as_deref()
                .is_some_and(|e| e.contains("exit status: 1")),
            "{o:?}"
        );
        // Not due yet: the hook is not run again.
        assert_eq!(
            deliver_due(&g, &config, &Ownership::everything(), &stop)
                .await
                .expect("round"),
            next
        );
        assert_eq!(runs(&log).len(), 1);

        // The broker restarts; the pending notification is still there.
        store.close().await;
        let (store, g) = open(dir.path(), &config);
        clock.advance(Duration::from_secs(1));
        let next = deliver_due(&g, &config, &Ownership::everything(), &stop)
            .await
            .expect("round");
        assert_eq!(
            next,
            Some(UnixMillis(T0.0 + 1_000 + 2_000)),
            "the wait doubles"
        );
        assert_eq!(runs(&log).len(), 2);
        clock.advance(Duration::from_millis(1_999));
        deliver_due(&g, &config, &Ownership::everything(), &stop)
            .await
            .expect("round");
        assert_eq!(runs(&log).len(), 2);
        clock.advance(Duration::from_millis(1));
        assert_eq!(
            deliver_due(&g, &config, &Ownership::everything(), &stop)
                .await
                .expect("round"),
            None
        );
        let lines = runs(&log);
        assert_eq!(lines.len(), 3);
        let o = g.outbox(10).await.expect("outbox");
        assert_eq!(o[0].delivered_at, Some(clock.now()));
        assert_eq!(o[0].attempts, 3);
        assert_eq!(
            lines[2],
            "args=--activation kind=activation user=alice email=alice@example.com mobile=+8613800000001 group=g1"
        );
        // Delivered means done: later rounds never run the hook again.
        clock.advance(Duration::from_secs(3_600));
        assert_eq!(
            deliver_due(&g, &config, &Ownership::everything(), &stop)
                .await
                .expect("round"),
            None
        );
        assert_eq!(runs(&log).len(), 3);
        store.close().await;
    }

    #[tokio::test]
    async fn delivered_only_once_the_hook_has_exited_zero() {
        let dir = tempfile::tempdir().expect("tempdir");
        let clock = ManualClock::new(T0);
        let started = dir.path().join("started");
        let gate = dir.path().join("gate");
        let script = dir.path().join("gated.sh");
        // Bounded: gives up (exit 2) after about 30s if the test never opens the gate.
        std::fs::write(
            &script,
            format!(
                "touch '{started}'\nn=0\nwhile [ ! -e '{gate}' ]; do n=$((n+1)); [ $n -gt 3000 ] && exit 2; sleep 0.01; done\nexit 0\n",
                started = started.display(),
                gate = gate.display()
            ),
        )
        .expect("write hook");
        let config = config(&clock, vec!["/bin/sh".into(), script.display().to_string()]);
        let (store, g) = open(dir.path(), &config);
        assign_alice(&g).await;
        let stop = CancellationToken::new();
        let round = {
            let (g, config, stop) = (g.clone(), config.clone(), stop.clone());
            tokio::spawn(
                async move { deliver_due(&g, &config, &Ownership::everything(), &stop).await },
            )
        };
        let deadline = tokio::time::Instant::now() + PATIENCE;
        while !started.exists() {
            assert!(tokio::time::Instant::now() < deadline, "the hook never ran");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        // The hook is running: the notification is not delivered yet.
        let o = g.outbox(10).await.expect("outbox");
        assert_eq!((o[0].attempts, o[0].delivered_at), (0, None));
        std::fs::write(&gate, b"").expect("open the gate");
        let next = tokio::time::timeout(PATIENCE, round)
            .await
            .expect("round ends")
            .expect("round task")
            .expect("round");
        assert_eq!(next, None);
        let o = g.outbox(10).await.expect("outbox");
        assert_eq!((o[0].attempts, o[0].delivered_at), (1, Some(T0)));
        store.close().await;
    }

    #[tokio::test]
    async fn a_hung_hook_is_killed_at_the_timeout() {
        let dir = tempfile::tempdir().expect("tempdir");
        let clock = ManualClock::new(T0);
        let pid_file = dir.path().join("pid");
        let script = dir.path().join("hung.sh");
        // A child in the background: killed with the hook (its group).
        std::fs::write(
            &script,
            format!(
                "sleep 600 &\necho $! > '{}'\nsleep 600\n",
                pid_file.display()
            ),
        )
        .expect("write hook");
        let config = GroupsConfig {
            notify_timeout: Duration::from_millis(300),
            ..config(&clock, vec!["/bin/sh".into(), script.display().to_string()])
        };
        let (store, g) = open(dir.path(), &config);
        assign_alice(&g).await;
        let stop = CancellationToken::new();
        let next = tokio::time::timeout(
            PATIENCE,
            deliver_due(&g, &config, &Ownership::everything(), &stop),
        )
        .await
        .expect("the round does not wait for the hung hook")
        .expect("round");
        assert_eq!(next, Some(UnixMillis(T0.0 + 1_000)));
        let o = g.outbox(10).await.expect("outbox");
        assert_eq!((o[0].attempts, o[0].delivered_at), (1, None));
        let err = o[0].last_error.clone().unwrap_or_default();
        assert!(
            err.contains("took longer than notify_timeout (300ms); killed"),
            "{err}"
        );
        let pid = std::fs::read_to_string(&pid_file).expect("pid written");
        let pid = pid.trim().parse().expect("pid");
        assert!(
            ferry_process::child::gone_within(pid, Duration::from_secs(5)),
            "the hook's background child {pid} is still there"
        );
        store.close().await;
    }

    #[tokio::test]
    async fn the_delivery_task_wakes_on_assignment_and_on_clock_moves() {
        let dir = tempfile::tempdir().expect("tempdir");
        let clock = ManualClock::new(T0);
        let (command, log) = counting_hook(dir.path(), 1);
        let config = config(&clock, command);
        let (store, g) = open(dir.path(), &config);
        let stop = CancellationToken::new();
        let task = tokio::spawn(deliver_notifications(
            g.clone(),
            config.clone(),
            Ownership::everything(),
            stop.clone(),
        ));
        // The assignment wakes the idle task; its first run fails.
        assign_alice(&g).await;
        wait_outbox(&g, |o| o.first().is_some_and(|n| n.attempts == 1)).await;
        assert_eq!(g.outbox(10).await.expect("outbox")[0].delivered_at, None);
        // Moving the clock to the retry instant wakes it again.
        clock.advance(Duration::from_secs(1));
        wait_outbox(&g, |o| o.first().is_some_and(|n| n.delivered_at.is_some())).await;
        assert_eq!(runs(&log).len(), 2);
        stop.cancel();
        tokio::time::timeout(PATIENCE, task)
            .await
            .expect("the task stops on shutdown")
            .expect("task");
        store.close().await;
    }

    #[tokio::test]
    async fn shutdown_interrupts_a_running_hook_and_leaves_it_pending() {
        let dir = tempfile::tempdir().expect("tempdir");
        let clock = ManualClock::new(T0);
        let script = dir.path().join("slow.sh");
        let started = dir.path().join("started");
        std::fs::write(
            &script,
            format!("touch '{}'\nexec sleep 600\n", started.display()),
        )
        .expect("write hook");
        let config = config(&clock, vec!["/bin/sh".into(), script.display().to_string()]);
        let (store, g) = open(dir.path(), &config);
        assign_alice(&g).await;
        let stop = CancellationToken::new();
        let task = tokio::spawn(deliver_notifications(
            g.clone(),
            config.clone(),
            Ownership::everything(),
            stop.clone(),
        ));
        let deadline = tokio::time::Instant::now() + PATIENCE;
        while !started.exists() {
            assert!(tokio::time::Instant::now() < deadline, "the hook never ran");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        stop.cancel();
        tokio::time::timeout(PATIENCE, task)
            .await
            .expect("shutdown does not wait for the hook")
            .expect("task");
        let o = g.outbox(10).await.expect("outbox");
        assert_eq!(
            (o[0].attempts, o[0].delivered_at),
            (0, None),
            "as if never tried"
        );
        store.close().await;
    }
}
