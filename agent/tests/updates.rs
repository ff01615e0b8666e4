//! Image switches, OTA updates (the agent's own across a restart) and
//! warnings against the test broker ([`peer`]): the hooks run with the
//! contract's arguments and environment, the outcome is answered and the
//! host's versions are reported in `Inventory` after every `Welcome` and
//! after every change.

#![allow(clippy::unwrap_used)] // a test crate: a failed unwrap is a failed test

mod peer;

use std::path::Path;

use ferry_agent::AGENT_VERSION;
use ferry_common::wire::{Command, CommandOutcome, ComponentVersion, Inventory, UpdateReport};
use peer::*;

fn lines(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(str::to_owned)
        .collect()
}

fn update(id: u64, component: &str, version: &str) -> Command {
    Command::ApplyUpdate {
        update: id,
        component: component.into(),
        version: version.into(),
        package: format!("/pkg/{component}_{version}.deb"),
    }
}

/// Reads what the update hook writes into the FIFO when it starts an agent
/// update (it then blocks, like an install that restarts the service).
async fn hook_started(fifo: &Path) -> String {
    let fifo = fifo.to_owned();
    let read = tokio::task::spawn_blocking(move || std::fs::read_to_string(fifo));
    tokio::time::timeout(WAIT, read)
        .await
        .unwrap()
        .unwrap()
        .unwrap()
        .trim()
        .to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn switches_and_updates_are_carried_out_and_reported() {
    let tmp = tempfile::tempdir().unwrap();
    let pki = mint(&tmp.path().join("pki"), "host-1");
    let mut peer = start_peer(&pki, ferry_common::PROTOCOL_VERSION);
    peer.open.send_replace(true);
    let (image_log, update_log, warn_log) = (
        tmp.path().join("image.log"),
        tmp.path().join("update.log"),
        tmp.path().join("warn.log"),
    );
    let fifo = tmp.path().join("agent-update.fifo");
    let made = std::process::Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .unwrap();
    assert!(made.success());
    let hooks = format!(
        r#"
        [hooks]
        image = ["/bin/sh", "-c", "echo \"$2 $FERRY_IMAGE\" >> {image}", "image-hook"]
        update = ["/bin/sh", "-c", "case \"$FERRY_COMPONENT\" in agent) echo \"$FERRY_UPDATE_ID\" > {fifo}; exec sleep 600;; esac; echo \"$FERRY_UPDATE_ID $FERRY_COMPONENT $FERRY_VERSION $FERRY_PACKAGE\" >> {update}; test \"$FERRY_VERSION\" != bad"]
        warn = ["/bin/sh", "-c", "echo \"$2 $FERRY_DEADLINE_MS $FERRY_MESSAGE\" >> {warn}", "warn-hook"]
        "#,
        image = image_log.display(),
        update = update_log.display(),
        warn = warn_log.display(),
        fifo = fifo.display(),
    );
    let cfg = config_with(&pki, tmp.path(), peer.addr, &hooks);
    let agent = start_agent(cfg.clone()).await;
    assert_eq!(recv(&mut peer.hellos).await.image_version, "img-1");

    // After the Welcome: the versions the host starts with.
    assert_eq!(
        recv(&mut peer.inventories).await,
        Inventory {
            agent_version: AGENT_VERSION.into(),
            image_version: "img-1".into(),
            components: vec![],
            last_update: None,
        }
    );

    // An image switch: hook, Done, then the new image.
    peer.commands
        .send(Command::SwitchImage {
            image: "img-2".into(),
        })
        .await
        .unwrap();
    assert_eq!(recv(&mut peer.results).await.outcome, CommandOutcome::Done);
    assert_eq!(recv(&mut peer.inventories).await.image_version, "img-2");
    assert_eq!(lines(&image_log), ["img-2 img-2"]);

    // A component update, then its replay: the hook runs once.
    for _ in 0..2 {
        peer.commands
            .send(update(11, "office", "2.0"))
            .await
            .unwrap();
        assert_eq!(recv(&mut peer.results).await.outcome, CommandOutcome::Done);
        let inv = recv(&mut peer.inventories).await;
        assert_eq!(
            inv.components,
            [ComponentVersion {
                name: "office".into(),
                version: "2.0".into()
            }]
        );
        assert_eq!(
            inv.last_update,
            Some(UpdateReport {
                update: 11,
                component: "office".into(),
                version: "2.0".into(),
                outcome: CommandOutcome::Done,
            })
        );
    }
    assert_eq!(lines(&update_log), ["11 office 2.0 /pkg/office_2.0.deb"]);

    // A failing update: Failed, and last_update says so.
    peer.commands
        .send(update(12, "office", "bad"))
        .await
        .unwrap();
    let r = recv(&mut peer.results).await;
    assert!(
        matches!(&r.outcome, CommandOutcome::Failed(m) if m.contains("update hook")),
        "{r:?}"
    );
    let inv = recv(&mut peer.inventories).await;
    assert_eq!(inv.components[0].version, "2.0");
    assert!(matches!(
        inv.last_update,
        Some(UpdateReport {
            update: 12,
            outcome: CommandOutcome::Failed(_),
            ..
        })
    ));

    // A warning.
    peer.commands
        .send(Command::WarnSession {
            session: "s-1".parse().unwrap(),
            message: "image update in 5 minutes".into(),
            deadline: ferry_common::UnixMillis(99),
        })
        .await
        .unwrap();
    assert_eq!(recv(&mut peer.results).await.outcome, CommandOutcome::Done);
    assert_eq!(lines(&warn_log), ["s-1 99 image update in 5 minutes"]);

    // The agent's own update: the hook starts and the service restarts
    // (here: the agent is stopped and started again) before any answer.
    peer.commands
        .send(update(13, "agent", AGENT_VERSION))
        .await
        .unwrap();
    assert_eq!(hook_started(&fifo).await, "13");
    agent.stop().await;
    let agent = start_agent(cfg.clone()).await;
    let hello = recv(&mut peer.hellos).await;
    assert_eq!(hello.image_version, "img-2");
    // The first Inventory of the first connection was read above; skip to
    // the new connection's.
    let inv = loop {
        let inv = recv(&mut peer.inventories).await;
        if inv.last_update.as_ref().is_some_and(|u| u.update == 13) {
            break inv;
        }
    };
    assert_eq!(inv.last_update.unwrap().outcome, CommandOutcome::Done);
    assert_eq!(inv.image_version, "img-2");
    // Replayed after the restart: done without running the hook.
    peer.commands
        .send(update(13, "agent", AGENT_VERSION))
        .await
        .unwrap();
    assert_eq!(recv(&mut peer.results).await.outcome, CommandOutcome::Done);

    // An agent update to a version the restarted agent does not run: failed.
    peer.commands
        .send(update(14, "agent", "99.0.0"))
        .await
        .unwrap();
    assert_eq!(hook_started(&fifo).await, "14");
    agent.stop().await;
    let agent = start_agent(cfg).await;
    let inv = loop {
        let inv = recv(&mut peer.inventories).await;
        if inv.last_update.as_ref().is_some_and(|u| u.update == 14) {
            break inv;
        }
    };
    assert!(
        matches!(&inv.last_update.as_ref().unwrap().outcome, CommandOutcome::Failed(m) if m.contains("99.0.0")),
        "{inv:?}"
    );
    // No update hook ran for the agent updates but through the FIFO.
    assert_eq!(lines(&update_log).len(), 2);
    agent.stop().await;
    peer.stop().await;
}
