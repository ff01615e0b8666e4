//! The metrics endpoints as Prometheus sees them: a real `ferry-broker run`
//! and a real `ferry-agent run`, each with `[metrics] listen =
//! "127.0.0.1:0"` (the bound addresses read from their READY status),
//! sessions reported through the agent's CLI, end users routed with
//! `ferry-connect`, a ticket checked with `ferry-agent ticket verify`, a
//! session disconnected through the agent's hook; then both endpoints are
//! scraped over HTTP, the exposition parsed, and the numbers compared with
//! what was done. Every metric the Grafana dashboard
//! (`packaging/grafana/ferry.json`) queries must be in those scrapes.

use std::collections::BTreeSet;
use std::ffi::OsString;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use ferry_broker::pki;
use ferry_tests::bins::bin;
use ferry_tests::exposition::{scrape, Exposition};
use ferry_tests::harness::PATIENCE;
use ferry_tests::procs::{
    ferryctl_json, fixed_size, publish_payg, run, run_ok, AgentProcess, BrokerFiles, BrokerProcess,
};
use serde_json::Value;

const GROUP: &str = "design";

/// A user `id` with a password, created through the broker at `socket`.
async fn create_user(socket: &Path, dir: &Path, id: &str) -> anyhow::Result<PathBuf> {
    let pw = dir.join(format!("{id}.pw"));
    std::fs::write(&pw, format!("password-of-{id}\n"))?;
    let mut args: Vec<OsString> = vec!["--socket".into(), socket.into()];
    for a in ["user", "create", "--id", id, "--email"] {
        args.push(a.into());
    }
    args.push(format!("{id}@example.com").into());
    args.extend(["--mobile".into(), "+8613800000000".into()]);
    args.extend(["--password-file".into(), pw.clone().into()]);
    run_ok(&bin("ferryctl"), args).await?;
    Ok(pw)
}

/// `ferry-connect --json` of `user` into [`GROUP`]: (exit code, answer).
async fn connect(
    broker: &BrokerProcess,
    files: &BrokerFiles,
    user: &str,
    pw: &Path,
) -> anyhow::Result<(Option<i32>, Value)> {
    let args: Vec<OsString> = vec![
        "--broker".into(),
        broker.agent_addr.to_string().into(),
        "--server-name".into(),
        "localhost".into(),
        "--ca".into(),
        files.pki_dir.join(pki::CA_CERT).into(),
        "--group".into(),
        GROUP.into(),
        "--user".into(),
        user.into(),
        "--password-file".into(),
        pw.into(),
        "--json".into(),
    ];
    let out = run(&bin("ferry-connect"), args).await?;
    let v: Value = serde_json::from_slice(&out.stdout)
        .with_context(|| format!("ferry-connect printed {out:?}"))?;
    Ok((out.status.code(), v))
}

fn refused(answer: &(Option<i32>, Value), reason: &str) {
    let (code, v) = answer;
    assert_eq!(*code, Some(2), "{v}");
    assert_eq!(v["admitted"], false, "{v}");
    assert_eq!(v["reason"], reason, "{v}");
}

/// Every metric name in the PromQL expressions of the dashboard at `path`,
/// with the panels' titles for the error message.
fn dashboard_metrics(path: &Path) -> anyhow::Result<Vec<(String, String)>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("read {}", path.display()))?;
    let model: Value = serde_json::from_str(&text).context("the dashboard is JSON")?;
    let panels = model["panels"]
        .as_array()
        .context("the dashboard has panels")?;
    let mut out = Vec::new();
    // Variables' queries (`label_values(ferry_..., group)`) name metrics too.
    for var in model["templating"]["list"].as_array().into_iter().flatten() {
        let query = match &var["query"] {
            Value::String(q) => q.clone(),
            q => q["query"].as_str().unwrap_or_default().to_owned(),
        };
        let name = var["name"].as_str().unwrap_or("(variable)");
        out.extend(
            metric_names(&query)
                .into_iter()
                .map(|n| (format!("variable {name}"), n)),
        );
    }
    // Panels, and those folded into collapsed rows.
    let nested = panels
        .iter()
        .flat_map(|p| p["panels"].as_array().into_iter().flatten());
    for panel in panels.iter().chain(nested) {
        let title = panel["title"].as_str().unwrap_or("(untitled)").to_owned();
        if panel["type"] == "row" {
            continue;
        }
        let targets = panel["targets"]
            .as_array()
            .with_context(|| format!("panel {title:?} has no targets"))?;
        for target in targets {
            let expr = target["expr"]
                .as_str()
                .with_context(|| format!("panel {title:?}: a target without expr"))?;
            let names = metric_names(expr);
            if names.is_empty() {
                bail!("panel {title:?}: {expr:?} queries no ferry_ metric");
            }
            out.extend(names.into_iter().map(|n| (title.clone(), n)));
        }
    }
    Ok(out)
}

/// The `ferry_*` identifiers of a PromQL expression, outside label
/// matchers' quoted values.
fn metric_names(expr: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let mut word = String::new();
    let mut quoted = false;
    for c in expr.chars().chain(std::iter::once(' ')) {
        if c == '"' {
            quoted = !quoted;
            word.clear();
            continue;
        }
        if !quoted && (c.is_ascii_alphanumeric() || c == '_' || c == ':') {
            word.push(c);
            continue;
        }
        if word.starts_with("ferry_") {
            names.insert(std::mem::take(&mut word));
        }
        word.clear();
    }
    names
}

#[test]
fn metric_names_are_read_from_promql() {
    let names = metric_names(
        "histogram_quantile(0.99, sum by (le, group) (rate(ferry_group_decision_latency_seconds_bucket{group=~\"$group\",x=\"ferry_not\"}[5m]))) / ferry_agents_connected",
    );
    assert_eq!(
        names.into_iter().collect::<Vec<_>>(),
        [
            "ferry_agents_connected",
            "ferry_group_decision_latency_seconds_bucket"
        ]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_and_agent_metrics_match_what_happened() -> anyhow::Result<()> {
    let tmp = tempfile::tempdir()?;
    let mut files = BrokerFiles::init(tmp.path()).await?;
    let metrics_section = "[metrics]\nlisten = \"127.0.0.1:0\"\n";
    files.extra_config = metrics_section.into();
    let broker = BrokerProcess::start(&files, "127.0.0.1:0".parse()?, 0).await?;
    let broker_metrics = broker
        .metrics_addr
        .context("the broker's READY status names its metrics address")?;
    assert_ne!(broker_metrics.port(), 0);
    let socket = &files.admin_socket;

    // One host of two sessions; alice may use it, bob may not.
    let alice = create_user(socket, tmp.path(), "alice").await?;
    let bob = create_user(socket, tmp.path(), "bob").await?;
    let mut policy = fixed_size("1", "2");
    policy.extend(["--user", "alice"]);
    publish_payg(socket, GROUP, &policy).await?;
    let hook_log = tmp.path().join("disconnect.log");
    let hook = tmp.path().join("disconnect.sh");
    std::fs::write(
        &hook,
        format!("#!/bin/sh\necho \"$@\" >> {}\n", hook_log.display()),
    )?;
    std::fs::set_permissions(&hook, std::os::unix::fs::PermissionsExt::from_mode(0o755))?;
    let agent = AgentProcess::start_configured(
        &files,
        "host-1",
        broker.agent_addr,
        Some(GROUP),
        &format!(
            "{metrics_section}[hooks]\ndisconnect = [{:?}]\n",
            hook.display().to_string()
        ),
    )
    .await?;
    let agent_metrics = agent
        .metrics_addr
        .context("the agent's READY status names its metrics address")?;
    agent.wait_synced().await?;

    // A session the operator reports, then one a user is routed to: its
    // ticket checked on the host, then started with the ticket's session.
    agent.start_session("s1", "alice").await?;
    let (code, admitted) = connect(&broker, &files, "alice", &alice).await?;
    assert_eq!(code, Some(0), "{admitted}");
    let ticket = admitted["ticket"].as_str().context("a ticket")?;
    let session = admitted["session"].as_str().context("a session")?;
    agent.cli(&["ticket", "verify", ticket, "--json"]).await?;
    agent
        .cli(&["session", "start", "--session", session, "--user", "alice"])
        .await?;
    // The same ticket again: refused on the host as reused.
    let reused = run(
        &bin("ferry-agent"),
        [
            OsString::from("--config"),
            agent.config.clone().into(),
            "ticket".into(),
            "verify".into(),
            ticket.into(),
        ],
    )
    .await?;
    assert!(!reused.status.success(), "{reused:?}");
    // Refused: bob is not assigned; alice finds the host full.
    refused(
        &connect(&broker, &files, "bob", &bob).await?,
        "not-assigned",
    );
    refused(
        &connect(&broker, &files, "alice", &alice).await?,
        "at-capacity",
    );
    let synced = agent.wait_synced().await?;
    assert_eq!(synced["spooled"], 0, "{synced}");

    let b = Exposition::parse(&scrape(broker_metrics).await?)?;
    let g = [("group", GROUP)];
    assert_eq!(b.get("ferry_group_sessions", &g), Some(2.0));
    assert_eq!(b.get("ferry_group_waiting_requests", &g), Some(0.0));
    assert_eq!(b.get("ferry_group_capacity_sessions", &g), Some(2.0));
    assert_eq!(b.get("ferry_group_demand", &g), Some(2.0));
    assert_eq!(b.get("ferry_group_usage_ratio", &g), Some(1.0));
    assert_eq!(b.get("ferry_group_usage_threshold_ratio", &g), Some(0.8));
    let ready_base = [("group", GROUP), ("class", "base"), ("state", "ready")];
    assert_eq!(b.get("ferry_group_resources", &ready_base), Some(1.0));
    assert_eq!(b.sum("ferry_group_resources", &[("class", "elastic")]), 0.0);
    assert_eq!(b.get("ferry_route_admitted_total", &g), Some(1.0));
    let reason = |r| [("reason", r)];
    assert_eq!(
        b.get("ferry_route_refused_total", &reason("not-assigned")),
        Some(1.0)
    );
    assert_eq!(
        b.get("ferry_route_refused_total", &reason("at-capacity")),
        Some(1.0)
    );
    assert_eq!(b.sum("ferry_route_refused_total", &[]), 2.0);
    // Two starts reported, each recorded once.
    assert_eq!(b.get("ferry_events_recorded_total", &[]), Some(2.0));
    assert_eq!(b.get("ferry_agents_connected", &[]), Some(1.0));
    assert_eq!(
        b.get("ferry_agent_handshakes_total", &[("result", "accepted")]),
        Some(1.0)
    );
    let placed = [
        ("group", GROUP),
        ("kind", "placed"),
        ("reason", "placement"),
    ];
    assert_eq!(b.get("ferry_group_decisions_total", &placed), Some(1.0));
    assert!(b.sum("ferry_group_decision_latency_seconds_count", &g) >= 1.0);
    assert!(
        b.get("ferry_store_commit_seconds_count", &[])
            .unwrap_or(0.0)
            >= 1.0
    );
    assert!(
        b.get("ferry_store_commit_batch_writes_count", &[])
            .unwrap_or(0.0)
            >= 1.0
    );
    // alice's activation notice of the publish: no notify_command is
    // configured, so it waits in the outbox.
    assert_eq!(b.get("ferry_notification_outbox_depth", &[]), Some(1.0));
    assert_eq!(b.sum("ferry_rollouts", &[]), 0.0);
    assert_eq!(
        b.get("ferry_rollouts", &[("kind", "ota"), ("state", "running")]),
        Some(0.0)
    );

    // The operator ends s1: the agent runs its disconnect hook.
    ferryctl_json(socket, &["sessions", "disconnect", "s1"]).await?;
    let ran = std::fs::read_to_string(&hook_log).context("the hook ran")?;
    assert_eq!(ran.trim(), "-- s1");

    let a = Exposition::parse(&scrape(agent_metrics).await?)?;
    assert_eq!(a.get("ferry_agent_link_up", &[]), Some(1.0));
    assert_eq!(a.get("ferry_agent_link_reconnects_total", &[]), Some(0.0));
    assert_eq!(a.get("ferry_agent_spool_events", &[]), Some(0.0));
    assert_eq!(
        a.get("ferry_agent_spool_oldest_unacked_age_seconds", &[]),
        Some(0.0)
    );
    assert_eq!(a.get("ferry_agent_tickets_verified_total", &[]), Some(1.0));
    assert_eq!(
        a.get("ferry_agent_tickets_refused_total", &reason("reused")),
        Some(1.0)
    );
    let hook_ok = [("hook", "disconnect"), ("result", "ok")];
    assert_eq!(a.get("ferry_agent_hook_runs_total", &hook_ok), Some(1.0));
    assert_eq!(
        a.get(
            "ferry_agent_hook_duration_seconds_count",
            &[("hook", "disconnect")]
        ),
        Some(1.0)
    );

    // A host naming a group it is not in is refused at its handshake,
    // counted by reason.
    let _stray = AgentProcess::start_configured(
        &files,
        "host-2",
        broker.agent_addr,
        None,
        &format!("group = {GROUP:?}\n"),
    )
    .await?;
    let deadline = std::time::Instant::now() + PATIENCE;
    loop {
        let now = Exposition::parse(&scrape(broker_metrics).await?)?;
        let refused = now.get("ferry_agent_handshakes_total", &[("result", "not_member")]);
        if refused.is_some_and(|n| n >= 1.0) {
            let accepted = now.get("ferry_agent_handshakes_total", &[("result", "accepted")]);
            assert_eq!(accepted, Some(1.0));
            assert_eq!(now.get("ferry_agents_connected", &[]), Some(1.0));
            break;
        }
        if std::time::Instant::now() > deadline {
            bail!("no not_member handshake counted: {:?}", now.samples);
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }

    // The dashboard asks only for what the daemons export.
    let dashboard = Path::new(env!("CARGO_MANIFEST_DIR")).join("../packaging/grafana/ferry.json");
    let queried = dashboard_metrics(&dashboard)?;
    assert!(queried.len() >= 10, "{queried:?}");
    let missing: Vec<_> = queried
        .iter()
        .filter(|(_, name)| !b.knows(name) && !a.knows(name))
        .collect();
    assert!(missing.is_empty(), "queried but not exported: {missing:?}");
    Ok(())
}

/// `[metrics] tls = true`: served over TLS with the broker's certificate
/// (trusted through the PKI's CA, named `localhost`); plain HTTP to it gets
/// no answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_broker_serves_metrics_over_tls_with_its_certificate() -> anyhow::Result<()> {
    use ferry_broker::config::{GroupsConfig, MetricsConfig};
    use ferry_tests::exposition::scrape_over;
    use ferry_tests::harness::TestBroker;

    let tmp = tempfile::tempdir()?;
    let broker = TestBroker::start_tuned(tmp.path(), GroupsConfig::default(), |c| {
        c.metrics = MetricsConfig {
            listen: Some("127.0.0.1:0".parse().expect("addr")),
            tls: true,
        };
    })
    .await?;
    let addr = broker
        .metrics_addr()
        .context("metrics address in BrokerReady")?;

    let mut roots = rustls::RootCertStore::empty();
    let ca = std::fs::read(broker.pki_dir().join(pki::CA_CERT))?;
    for cert in rustls_pki_types::pem::PemObject::pem_slice_iter(&ca) {
        roots.add(cert?)?;
    }
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let client = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(client));
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    let tls = connector
        .connect(rustls_pki_types::ServerName::try_from("localhost")?, tcp)
        .await
        .context("TLS handshake with the broker's certificate")?;
    let e = Exposition::parse(&scrape_over(tls).await?)?;
    assert_eq!(e.get("ferry_agents_connected", &[]), Some(0.0));
    assert!(e.knows("ferry_store_commit_seconds_bucket"));

    assert!(
        scrape(addr).await.is_err(),
        "plain HTTP answered on the TLS port"
    );
    Ok(())
}
