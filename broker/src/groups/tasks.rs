//! The broker's group tasks: lifecycle deadlines and activation-notification
//! delivery. Both sleep until the next instant the store says something is
//! due (or until a change wakes them), never on a polling period.

use std::time::Duration;

use ferry_common::UnixMillis;
use tokio::process::Command;
use tokio_util::sync::CancellationToken;

use super::service::{GroupService, Notification};
use crate::config::GroupsConfig;
use crate::link::now_millis;

/// Longest single sleep: the wall clock can jump (NTP, suspend), so a long
/// wait is re-checked against it at least this often.
pub const MAX_TIMER_SLEEP: Duration = Duration::from_secs(60);

/// Wait after a store failure before trying again, so a broken disk does not
/// spin the task.
const RETRY_AFTER_ERROR: Duration = Duration::from_secs(5);

/// Notifications handed to the hook per round.
const NOTIFY_BATCH: usize = 32;

fn until(next: Option<UnixMillis>, now: UnixMillis) -> Duration {
    match next {
        Some(t) => Duration::from_millis(u64::try_from(t.0.saturating_sub(now.0)).unwrap_or(0))
            .min(MAX_TIMER_SLEEP),
        None => MAX_TIMER_SLEEP,
    }
}

/// Runs expiry, auto-renew and recycling at their deadlines until `shutdown`.
pub async fn run_deadlines(groups: GroupService, shutdown: CancellationToken) {
    loop {
        let now = now_millis();
        let wait = match groups.run_due(now).await {
            Ok(next) => until(next, now),
            Err(e) => {
                tracing::error!("run group deadlines: {e}");
                RETRY_AFTER_ERROR
            }
        };
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(wait) => {}
            _ = groups.changed() => {}
        }
    }
}

/// Hands pending activation notifications to the configured hook; marks one
/// delivered only after the hook exited 0, else retries it later.
pub async fn deliver_notifications(
    groups: GroupService,
    config: GroupsConfig,
    shutdown: CancellationToken,
) {
    loop {
        let now = now_millis();
        let mut wait = MAX_TIMER_SLEEP;
        if !config.notify_command.is_empty() {
            match groups.due_notifications(now, NOTIFY_BATCH).await {
                Ok(due) => {
                    for n in due {
                        let result = tokio::select! {
                            _ = shutdown.cancelled() => return,
                            r = run_hook(&config, &n) => r,
                        };
                        if let Err(e) = &result {
                            tracing::warn!(user = %n.user, group = %n.group, "activation notification: {e}");
                        }
                        if let Err(e) = groups
                            .notification_attempted(n.id, result, now_millis())
                            .await
                        {
                            tracing::error!("record notification attempt: {e}");
                        }
                    }
                    wait = match groups.next_notification_at().await {
                        Ok(next) => until(next, now_millis()),
                        Err(_) => RETRY_AFTER_ERROR,
                    };
                }
                Err(e) => {
                    tracing::error!("read notification outbox: {e}");
                    wait = RETRY_AFTER_ERROR;
                }
            }
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(wait) => {}
            _ = groups.changed() => {}
        }
    }
}

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
        .env("FERRY_NOTIFY_GROUP", &n.group)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true);
    let mut child = cmd.spawn().map_err(|e| format!("run {program}: {e}"))?;
    match tokio::time::timeout(config.notify_timeout, child.wait()).await {
        Ok(Ok(status)) if status.success() => Ok(()),
        Ok(Ok(status)) => Err(format!("{program} exited with {status}")),
        Ok(Err(e)) => Err(format!("wait for {program}: {e}")),
        Err(_) => Err(format!("{program} took longer than notify_timeout")),
    }
}
