//! The schema and its migrations. `PRAGMA user_version` is the number of
//! migrations applied; a store newer than this broker is refused.

use rusqlite::Connection;

use super::StoreError;

/// Schema migrations, in order. `PRAGMA user_version` is the number applied.
/// Never edit a shipped migration; append a new one.
pub(super) const MIGRATIONS: &[&str] = &[
    // 1: the first schema.
    r#"
    CREATE TABLE spools (
        resource TEXT NOT NULL,
        spool_id INTEGER NOT NULL,
        last_seq INTEGER NOT NULL,
        PRIMARY KEY (resource, spool_id)
    );
    CREATE TABLE session_events (
        id INTEGER PRIMARY KEY,
        resource TEXT NOT NULL,
        spool_id INTEGER NOT NULL,
        seq INTEGER NOT NULL,
        kind TEXT NOT NULL CHECK (kind IN ('started', 'ended')),
        session TEXT NOT NULL,
        user TEXT,
        at INTEGER NOT NULL,
        recorded_at INTEGER NOT NULL,
        reason TEXT,
        UNIQUE (resource, spool_id, seq)
    );
    CREATE TABLE sessions (
        id INTEGER PRIMARY KEY,
        resource TEXT NOT NULL,
        session TEXT NOT NULL,
        user TEXT NOT NULL,
        started_at INTEGER NOT NULL,
        ended_at INTEGER,
        end_reason TEXT,
        reconciled INTEGER NOT NULL DEFAULT 0
    );
    CREATE UNIQUE INDEX sessions_open ON sessions (resource, session) WHERE ended_at IS NULL;
    CREATE INDEX sessions_by_session ON sessions (session);
    CREATE TABLE resources (
        resource TEXT PRIMARY KEY,
        grp TEXT,
        agent_version TEXT NOT NULL,
        image_version TEXT NOT NULL,
        hostname TEXT NOT NULL,
        os TEXT NOT NULL,
        kernel TEXT NOT NULL,
        vcpus INTEGER NOT NULL,
        memory_bytes INTEGER NOT NULL,
        first_seen INTEGER NOT NULL,
        last_seen INTEGER NOT NULL
    );
    "#,
    // 2: delivery groups, users, assignments, orders, the activation
    // outbox and group events (issue 4).
    r#"
    CREATE TABLE groups (
        num INTEGER PRIMARY KEY,
        id TEXT NOT NULL UNIQUE,
        name TEXT NOT NULL,
        region TEXT NOT NULL,
        office_network TEXT NOT NULL,
        spec TEXT NOT NULL,
        image TEXT NOT NULL,
        billing TEXT NOT NULL CHECK (billing IN ('subscription', 'pay-as-you-go')),
        term TEXT,
        auto_renew INTEGER NOT NULL DEFAULT 0,
        base_resources INTEGER NOT NULL,
        session_type TEXT NOT NULL CHECK (session_type IN ('independent', 'shared')),
        policy TEXT NOT NULL,
        status TEXT NOT NULL,
        expires_at INTEGER,
        expired_at INTEGER,
        created_at INTEGER NOT NULL,
        updated_at INTEGER NOT NULL,
        gone_at INTEGER,
        CHECK ((billing = 'subscription') = (term IS NOT NULL))
    );
    CREATE UNIQUE INDEX groups_live_name ON groups (name) WHERE status != 'gone';
    CREATE TABLE users (
        id TEXT PRIMARY KEY,
        email TEXT NOT NULL,
        mobile TEXT NOT NULL,
        password_hash TEXT,
        created_at INTEGER NOT NULL,
        updated_at INTEGER NOT NULL
    );
    CREATE TABLE group_users (
        group_num INTEGER NOT NULL REFERENCES groups (num),
        user TEXT NOT NULL REFERENCES users (id),
        assigned_at INTEGER NOT NULL,
        PRIMARY KEY (group_num, user)
    );
    CREATE TABLE orders (
        id INTEGER PRIMARY KEY,
        group_num INTEGER NOT NULL REFERENCES groups (num),
        kind TEXT NOT NULL CHECK (kind IN ('publish', 'renew', 'auto-renew')),
        term TEXT NOT NULL,
        base_resources INTEGER NOT NULL,
        amount TEXT NOT NULL,
        currency TEXT NOT NULL,
        period_start INTEGER NOT NULL,
        period_end INTEGER NOT NULL,
        at INTEGER NOT NULL
    );
    CREATE INDEX orders_by_group ON orders (group_num, id);
    CREATE TABLE notifications (
        id INTEGER PRIMARY KEY,
        group_num INTEGER NOT NULL REFERENCES groups (num),
        user TEXT NOT NULL,
        email TEXT NOT NULL,
        mobile TEXT NOT NULL,
        kind TEXT NOT NULL,
        created_at INTEGER NOT NULL,
        attempts INTEGER NOT NULL DEFAULT 0,
        next_attempt_at INTEGER NOT NULL,
        delivered_at INTEGER,
        last_error TEXT
    );
    CREATE INDEX notifications_pending ON notifications (next_attempt_at)
        WHERE delivered_at IS NULL;
    CREATE TABLE group_events (
        id INTEGER PRIMARY KEY,
        group_num INTEGER NOT NULL REFERENCES groups (num),
        at INTEGER NOT NULL,
        kind TEXT NOT NULL,
        message TEXT NOT NULL
    );
    CREATE INDEX group_events_by_group ON group_events (group_num, id);
    "#,
    // 3: resource metering (issue 4): when each resource of a group was
    // ready and when it was released, with its kind and the group's billing
    // method at that time. At most one open interval per (group, resource).
    r#"
    CREATE TABLE resource_intervals (
        id INTEGER PRIMARY KEY,
        group_num INTEGER NOT NULL REFERENCES groups (num),
        resource TEXT NOT NULL,
        kind TEXT NOT NULL CHECK (kind IN ('base', 'elastic')),
        billing TEXT NOT NULL CHECK (billing IN ('subscription', 'pay-as-you-go')),
        ready_at INTEGER NOT NULL,
        released_at INTEGER,
        CHECK (released_at IS NULL OR released_at >= ready_at)
    );
    CREATE UNIQUE INDEX resource_intervals_open ON resource_intervals (group_num, resource)
        WHERE released_at IS NULL;
    CREATE INDEX resource_intervals_by_group ON resource_intervals (group_num, ready_at);
    "#,
    // 4: policy push (issue 4): each group's policy version, 1 at publish and
    // bumped by every accepted update-policy, and the newest version each
    // resource of the group acknowledged having applied.
    r#"
    ALTER TABLE groups ADD COLUMN policy_version INTEGER NOT NULL DEFAULT 1
        CHECK (policy_version >= 1);
    CREATE TABLE resource_policy (
        group_num INTEGER NOT NULL REFERENCES groups (num),
        resource TEXT NOT NULL,
        version INTEGER NOT NULL CHECK (version >= 1),
        applied_at INTEGER NOT NULL,
        PRIMARY KEY (group_num, resource)
    );
    "#,
    // 5: users' credentials (issue 5). `users.password_hash` (migration 2)
    // holds an Argon2id PHC string (NULL = no password: the user cannot log
    // in with one until it is set); this adds the generation of the user's
    // tokens, bumped by `user revoke-tokens`, which invalidates every token
    // issued before.
    r#"
    ALTER TABLE users ADD COLUMN token_generation INTEGER NOT NULL DEFAULT 0
        CHECK (token_generation >= 0);
    "#,
    // 6: elastic resources for real (issue 6): each elastic resource of a
    // group with its engine id and lifecycle, so a restarted broker rebuilds
    // its engine with them and numbering continues; and the one-time
    // enrollment tokens given to the provisioner, stored as SHA-256 hashes.
    r#"
    CREATE TABLE elastic_resources (
        group_num INTEGER NOT NULL REFERENCES groups (num),
        engine_id TEXT NOT NULL,
        resource TEXT NOT NULL,
        state TEXT NOT NULL
            CHECK (state IN ('pending', 'ready', 'releasing', 'released', 'failed')),
        requested_at INTEGER NOT NULL,
        ready_at INTEGER,
        releasing_at INTEGER,
        released_at INTEGER,
        deleted_at INTEGER,
        PRIMARY KEY (group_num, engine_id)
    );
    CREATE TABLE enroll_tokens (
        token_hash TEXT PRIMARY KEY,
        group_num INTEGER NOT NULL REFERENCES groups (num),
        resource TEXT NOT NULL,
        created_at INTEGER NOT NULL,
        expires_at INTEGER NOT NULL,
        used_at INTEGER
    );
    CREATE INDEX enroll_tokens_by_resource ON enroll_tokens (resource);
    "#,
    // 7: sessions by (resource, session) (issue 4, store throughput).
    // Recording an end looks its session up on its resource; with only the
    // index by session, hosts that name sessions alike (`1`, `2`, ... on
    // every host) made that a scan of every host's rows of that name.
    r#"
    CREATE INDEX sessions_by_resource ON sessions (resource, session);
    "#,
    // OTA updates (issue 7, `crate::ota`): offered updates, their rollout
    // schedules (at most one scheduled or running per group) and each
    // resource's outcome in a rollout, in update order.
    r#"
    CREATE TABLE ota_updates (
        id INTEGER PRIMARY KEY,
        group_num INTEGER NOT NULL REFERENCES groups (num),
        component TEXT NOT NULL,
        version TEXT NOT NULL,
        package TEXT NOT NULL,
        description TEXT NOT NULL,
        offered_at INTEGER NOT NULL
    );
    CREATE INDEX ota_updates_by_group ON ota_updates (group_num, id);
    CREATE TABLE ota_schedules (
        id INTEGER PRIMARY KEY,
        update_id INTEGER NOT NULL REFERENCES ota_updates (id),
        group_num INTEGER NOT NULL REFERENCES groups (num),
        start_at INTEGER NOT NULL,
        wave INTEGER NOT NULL CHECK (wave >= 1),
        drain_ms INTEGER NOT NULL CHECK (drain_ms >= 0),
        state TEXT NOT NULL
            CHECK (state IN ('scheduled', 'cancelled', 'running', 'succeeded', 'failed')),
        created_at INTEGER NOT NULL,
        started_at INTEGER,
        finished_at INTEGER,
        detail TEXT
    );
    CREATE UNIQUE INDEX ota_schedules_active ON ota_schedules (group_num)
        WHERE state IN ('scheduled', 'running');
    CREATE TABLE ota_results (
        schedule_id INTEGER NOT NULL REFERENCES ota_schedules (id),
        position INTEGER NOT NULL,
        resource TEXT NOT NULL,
        state TEXT NOT NULL
            CHECK (state IN ('pending', 'draining', 'updating', 'done', 'failed', 'skipped')),
        started_at INTEGER,
        finished_at INTEGER,
        detail TEXT,
        PRIMARY KEY (schedule_id, resource)
    );
    "#,
    // Base resources created through the provisioner (issue 4, publishing,
    // `groups::actor::elastic`): they are recorded in `elastic_resources` with
    // engine ids `b1..bN`; `created_at` is when the provisioner's create
    // succeeded, so a broker restarted while a group is publishing does not
    // create a resource twice.
    r#"
    ALTER TABLE elastic_resources ADD COLUMN created_at INTEGER;
    "#,
    // Image updates (issue 7, `groups::actor::image_update`): each
    // `group update-image` with its target and warning deadline, and each
    // resource's outcome (the set is written when the switching starts, so
    // a restarted broker resumes with it).
    r#"
    CREATE TABLE image_updates (
        id INTEGER PRIMARY KEY,
        group_num INTEGER NOT NULL REFERENCES groups (num),
        image TEXT NOT NULL,
        previous_image TEXT NOT NULL,
        warning_ms INTEGER NOT NULL CHECK (warning_ms >= 0),
        started_at INTEGER NOT NULL,
        disconnect_at INTEGER NOT NULL,
        state TEXT NOT NULL CHECK (state IN ('running', 'succeeded', 'failed')),
        finished_at INTEGER
    );
    CREATE UNIQUE INDEX image_updates_running ON image_updates (group_num)
        WHERE state = 'running';
    CREATE TABLE image_update_results (
        update_id INTEGER NOT NULL REFERENCES image_updates (id),
        resource TEXT NOT NULL,
        outcome TEXT NOT NULL CHECK (outcome IN ('pending', 'done', 'failed')),
        detail TEXT NOT NULL,
        at INTEGER NOT NULL,
        PRIMARY KEY (update_id, resource)
    );
    "#,
    // Store throughput (issue 4): the index of sessions by name alone goes.
    // Every recorded start paid for it; its one reader (`disconnect` by
    // session name, `Store::open_session_hosts`) wants open sessions only
    // and reads the index of open sessions instead.
    r#"
    DROP INDEX IF EXISTS sessions_by_session;
    "#,
    // Expiry disconnects not confirmed yet (issue 4, `groups::disconnects`):
    // a restarted broker goes on retrying them, up to 24 h after the first
    // attempt. `due_at` NULL: an attempt was in flight.
    r#"
    CREATE TABLE pending_disconnects (
        group_num INTEGER NOT NULL REFERENCES groups (num),
        resource TEXT NOT NULL,
        session TEXT NOT NULL,
        attempts INTEGER NOT NULL CHECK (attempts >= 0),
        first_at INTEGER NOT NULL,
        due_at INTEGER,
        PRIMARY KEY (group_num, resource, session)
    );
    "#,
    // Retained sessions (issue 12, `groups::retention`): a disconnected
    // session's retention runs from the disconnect across broker restarts.
    // `deadline` NULL: kept for ever. Ends the broker decides itself (the
    // retention ran out, the host stayed away) are `sessions.reconciled = 2`:
    // the host's own later report does not move them, an earlier one does.
    // `resources.last_seen` is also written when an agent's link ends.
    r#"
    CREATE TABLE retained_sessions (
        group_num INTEGER NOT NULL REFERENCES groups (num),
        session TEXT NOT NULL,
        resource TEXT NOT NULL,
        disconnected_at INTEGER NOT NULL,
        deadline INTEGER,
        PRIMARY KEY (group_num, session)
    );
    "#,
    // Operator output (issue 12): the expiry of the newest token issued to
    // a user since its tokens were last revoked (NULL: none since), for
    // `user list`. Tokens themselves are never stored.
    r#"
    ALTER TABLE users ADD COLUMN token_expires_at INTEGER;
    "#,
    // Membership is the operator's decision (issue 14, `store::membership`):
    // `ferryctl resources assign` puts a host in a group; an agent naming
    // another group is refused. Provisioned (elastic and base) resources
    // belong to the group of their live `elastic_resources` record instead.
    // The hosts that named a group before this schema keep it ('upgrade'):
    // an upgrade does not lock a running fleet out.
    r#"
    CREATE TABLE memberships (
        resource TEXT PRIMARY KEY,
        grp TEXT NOT NULL,
        assigned_at INTEGER NOT NULL,
        source TEXT NOT NULL CHECK (source IN ('operator', 'upgrade'))
    );
    INSERT INTO memberships (resource, grp, assigned_at, source)
        SELECT resource, grp, CAST(strftime('%s', 'now') AS INTEGER) * 1000, 'upgrade'
        FROM resources
        WHERE grp IS NOT NULL
          AND resource NOT IN (SELECT resource FROM elastic_resources);
    "#,
    // Certificates (issue 14, `store::revocations`): per resource, every
    // certificate issued before `revoked_before_ms` is refused. Set by the
    // operator's `resources revoke` (`by_operator` 1) and by the enrollment
    // of a name (0), which leaves keys of an earlier machine of that name
    // worthless.
    r#"
    CREATE TABLE revocations (
        resource TEXT PRIMARY KEY,
        revoked_before_ms INTEGER NOT NULL,
        at INTEGER NOT NULL,
        reason TEXT NOT NULL,
        by_operator INTEGER NOT NULL CHECK (by_operator IN (0, 1))
    );
    "#,
    // 17: the brokers sharing a database and their groups' leases (issue 16).
    r#"
    CREATE TABLE brokers (
        id TEXT PRIMARY KEY,
        address TEXT NOT NULL,
        started_at INTEGER NOT NULL,
        seen_at INTEGER NOT NULL,
        leaving INTEGER NOT NULL DEFAULT 0 CHECK (leaving IN (0, 1))
    );
    CREATE TABLE group_leases (
        group_num INTEGER PRIMARY KEY REFERENCES groups (num),
        owner TEXT,
        epoch INTEGER NOT NULL CHECK (epoch >= 0),
        expires_at INTEGER NOT NULL
    );
    "#,
    // 18: slots reserved by a ticket whose client has not arrived, so that a
    // broker restarted or taking the group over keeps them (issue 16).
    r#"
    CREATE TABLE route_reservations (
        group_num INTEGER NOT NULL REFERENCES groups (num),
        session TEXT NOT NULL,
        resource TEXT NOT NULL,
        user TEXT NOT NULL,
        expires_at INTEGER NOT NULL,
        PRIMARY KEY (group_num, session)
    );
    "#,
];

/// The PostgreSQL schema, in the same steps. PostgreSQL stores start at
/// SQLite's schema 16 as one step: nothing was ever stored in PostgreSQL
/// before it. Append each new migration to both lists, in both dialects
/// (the doors' SQL is shared; see `sql::postgres_sql`).
pub(super) const POSTGRES_MIGRATIONS: &[&str] = &[
    // 1: SQLite's migrations 1 to 16.
    r#"
    CREATE TABLE spools (
        resource TEXT NOT NULL,
        spool_id BIGINT NOT NULL,
        last_seq BIGINT NOT NULL,
        PRIMARY KEY (resource, spool_id)
    );
    CREATE TABLE session_events (
        id BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
        resource TEXT NOT NULL,
        spool_id BIGINT NOT NULL,
        seq BIGINT NOT NULL,
        kind TEXT NOT NULL CHECK (kind IN ('started', 'ended')),
        session TEXT NOT NULL,
        "user" TEXT,
        at BIGINT NOT NULL,
        recorded_at BIGINT NOT NULL,
        reason TEXT,
        UNIQUE (resource, spool_id, seq)
    );
    CREATE TABLE sessions (
        id BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
        resource TEXT NOT NULL,
        session TEXT NOT NULL,
        "user" TEXT NOT NULL,
        started_at BIGINT NOT NULL,
        ended_at BIGINT,
        end_reason TEXT,
        reconciled BIGINT NOT NULL DEFAULT 0
    );
    CREATE UNIQUE INDEX sessions_open ON sessions (resource, session) WHERE ended_at IS NULL;
    CREATE TABLE resources (
        resource TEXT PRIMARY KEY,
        grp TEXT,
        agent_version TEXT NOT NULL,
        image_version TEXT NOT NULL,
        hostname TEXT NOT NULL,
        os TEXT NOT NULL,
        kernel TEXT NOT NULL,
        vcpus BIGINT NOT NULL,
        memory_bytes BIGINT NOT NULL,
        first_seen BIGINT NOT NULL,
        last_seen BIGINT NOT NULL
    );
    CREATE TABLE groups (
        num BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
        id TEXT NOT NULL UNIQUE,
        name TEXT NOT NULL,
        region TEXT NOT NULL,
        office_network TEXT NOT NULL,
        spec TEXT NOT NULL,
        image TEXT NOT NULL,
        billing TEXT NOT NULL CHECK (billing IN ('subscription', 'pay-as-you-go')),
        term TEXT,
        auto_renew BIGINT NOT NULL DEFAULT 0,
        base_resources BIGINT NOT NULL,
        session_type TEXT NOT NULL CHECK (session_type IN ('independent', 'shared')),
        policy TEXT NOT NULL,
        status TEXT NOT NULL,
        expires_at BIGINT,
        expired_at BIGINT,
        created_at BIGINT NOT NULL,
        updated_at BIGINT NOT NULL,
        gone_at BIGINT,
        policy_version BIGINT NOT NULL DEFAULT 1 CHECK (policy_version >= 1),
        CHECK ((billing = 'subscription') = (term IS NOT NULL))
    );
    CREATE UNIQUE INDEX groups_live_name ON groups (name) WHERE status != 'gone';
    CREATE TABLE users (
        id TEXT PRIMARY KEY,
        email TEXT NOT NULL,
        mobile TEXT NOT NULL,
        password_hash TEXT,
        created_at BIGINT NOT NULL,
        updated_at BIGINT NOT NULL,
        token_generation BIGINT NOT NULL DEFAULT 0 CHECK (token_generation >= 0),
        token_expires_at BIGINT
    );
    CREATE TABLE group_users (
        group_num BIGINT NOT NULL REFERENCES groups (num),
        "user" TEXT NOT NULL REFERENCES users (id),
        assigned_at BIGINT NOT NULL,
        PRIMARY KEY (group_num, "user")
    );
    CREATE TABLE orders (
        id BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
        group_num BIGINT NOT NULL REFERENCES groups (num),
        kind TEXT NOT NULL CHECK (kind IN ('publish', 'renew', 'auto-renew')),
        term TEXT NOT NULL,
        base_resources BIGINT NOT NULL,
        amount TEXT NOT NULL,
        currency TEXT NOT NULL,
        period_start BIGINT NOT NULL,
        period_end BIGINT NOT NULL,
        at BIGINT NOT NULL
    );
    CREATE INDEX orders_by_group ON orders (group_num, id);
    CREATE TABLE notifications (
        id BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
        group_num BIGINT NOT NULL REFERENCES groups (num),
        "user" TEXT NOT NULL,
        email TEXT NOT NULL,
        mobile TEXT NOT NULL,
        kind TEXT NOT NULL,
        created_at BIGINT NOT NULL,
        attempts BIGINT NOT NULL DEFAULT 0,
        next_attempt_at BIGINT NOT NULL,
        delivered_at BIGINT,
        last_error TEXT
    );
    CREATE INDEX notifications_pending ON notifications (next_attempt_at)
        WHERE delivered_at IS NULL;
    CREATE TABLE group_events (
        id BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
        group_num BIGINT NOT NULL REFERENCES groups (num),
        at BIGINT NOT NULL,
        kind TEXT NOT NULL,
        message TEXT NOT NULL
    );
    CREATE INDEX group_events_by_group ON group_events (group_num, id);
    CREATE TABLE resource_intervals (
        id BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
        group_num BIGINT NOT NULL REFERENCES groups (num),
        resource TEXT NOT NULL,
        kind TEXT NOT NULL CHECK (kind IN ('base', 'elastic')),
        billing TEXT NOT NULL CHECK (billing IN ('subscription', 'pay-as-you-go')),
        ready_at BIGINT NOT NULL,
        released_at BIGINT,
        CHECK (released_at IS NULL OR released_at >= ready_at)
    );
    CREATE UNIQUE INDEX resource_intervals_open ON resource_intervals (group_num, resource)
        WHERE released_at IS NULL;
    CREATE INDEX resource_intervals_by_group ON resource_intervals (group_num, ready_at);
    CREATE TABLE resource_policy (
        group_num BIGINT NOT NULL REFERENCES groups (num),
        resource TEXT NOT NULL,
        version BIGINT NOT NULL CHECK (version >= 1),
        applied_at BIGINT NOT NULL,
        PRIMARY KEY (group_num, resource)
    );
    CREATE TABLE elastic_resources (
        group_num BIGINT NOT NULL REFERENCES groups (num),
        engine_id TEXT NOT NULL,
        resource TEXT NOT NULL,
        state TEXT NOT NULL
            CHECK (state IN ('pending', 'ready', 'releasing', 'released', 'failed')),
        requested_at BIGINT NOT NULL,
        ready_at BIGINT,
        releasing_at BIGINT,
        released_at BIGINT,
        deleted_at BIGINT,
        created_at BIGINT,
        -- SQLite's implicit rowid, which the doors order by.
        rowid BIGINT GENERATED ALWAYS AS IDENTITY,
        PRIMARY KEY (group_num, engine_id)
    );
    CREATE TABLE enroll_tokens (
        token_hash TEXT PRIMARY KEY,
        group_num BIGINT NOT NULL REFERENCES groups (num),
        resource TEXT NOT NULL,
        created_at BIGINT NOT NULL,
        expires_at BIGINT NOT NULL,
        used_at BIGINT
    );
    CREATE INDEX enroll_tokens_by_resource ON enroll_tokens (resource);
    CREATE INDEX sessions_by_resource ON sessions (resource, session);
    CREATE TABLE ota_updates (
        id BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
        group_num BIGINT NOT NULL REFERENCES groups (num),
        component TEXT NOT NULL,
        version TEXT NOT NULL,
        package TEXT NOT NULL,
        description TEXT NOT NULL,
        offered_at BIGINT NOT NULL
    );
    CREATE INDEX ota_updates_by_group ON ota_updates (group_num, id);
    CREATE TABLE ota_schedules (
        id BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
        update_id BIGINT NOT NULL REFERENCES ota_updates (id),
        group_num BIGINT NOT NULL REFERENCES groups (num),
        start_at BIGINT NOT NULL,
        wave BIGINT NOT NULL CHECK (wave >= 1),
        drain_ms BIGINT NOT NULL CHECK (drain_ms >= 0),
        state TEXT NOT NULL
            CHECK (state IN ('scheduled', 'cancelled', 'running', 'succeeded', 'failed')),
        created_at BIGINT NOT NULL,
        started_at BIGINT,
        finished_at BIGINT,
        detail TEXT
    );
    CREATE UNIQUE INDEX ota_schedules_active ON ota_schedules (group_num)
        WHERE state IN ('scheduled', 'running');
    CREATE TABLE ota_results (
        schedule_id BIGINT NOT NULL REFERENCES ota_schedules (id),
        position BIGINT NOT NULL,
        resource TEXT NOT NULL,
        state TEXT NOT NULL
            CHECK (state IN ('pending', 'draining', 'updating', 'done', 'failed', 'skipped')),
        started_at BIGINT,
        finished_at BIGINT,
        detail TEXT,
        PRIMARY KEY (schedule_id, resource)
    );
    CREATE TABLE image_updates (
        id BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
        group_num BIGINT NOT NULL REFERENCES groups (num),
        image TEXT NOT NULL,
        previous_image TEXT NOT NULL,
        warning_ms BIGINT NOT NULL CHECK (warning_ms >= 0),
        started_at BIGINT NOT NULL,
        disconnect_at BIGINT NOT NULL,
        state TEXT NOT NULL CHECK (state IN ('running', 'succeeded', 'failed')),
        finished_at BIGINT
    );
    CREATE UNIQUE INDEX image_updates_running ON image_updates (group_num)
        WHERE state = 'running';
    CREATE TABLE image_update_results (
        update_id BIGINT NOT NULL REFERENCES image_updates (id),
        resource TEXT NOT NULL,
        outcome TEXT NOT NULL CHECK (outcome IN ('pending', 'done', 'failed')),
        detail TEXT NOT NULL,
        at BIGINT NOT NULL,
        PRIMARY KEY (update_id, resource)
    );
    CREATE TABLE pending_disconnects (
        group_num BIGINT NOT NULL REFERENCES groups (num),
        resource TEXT NOT NULL,
        session TEXT NOT NULL,
        attempts BIGINT NOT NULL CHECK (attempts >= 0),
        first_at BIGINT NOT NULL,
        due_at BIGINT,
        PRIMARY KEY (group_num, resource, session)
    );
    CREATE TABLE retained_sessions (
        group_num BIGINT NOT NULL REFERENCES groups (num),
        session TEXT NOT NULL,
        resource TEXT NOT NULL,
        disconnected_at BIGINT NOT NULL,
        deadline BIGINT,
        PRIMARY KEY (group_num, session)
    );
    CREATE TABLE memberships (
        resource TEXT PRIMARY KEY,
        grp TEXT NOT NULL,
        assigned_at BIGINT NOT NULL,
        source TEXT NOT NULL CHECK (source IN ('operator', 'upgrade'))
    );
    CREATE TABLE revocations (
        resource TEXT PRIMARY KEY,
        revoked_before_ms BIGINT NOT NULL,
        at BIGINT NOT NULL,
        reason TEXT NOT NULL,
        by_operator BIGINT NOT NULL CHECK (by_operator IN (0, 1))
    );
    "#,
    // 2: SQLite's 17.
    r#"
    CREATE TABLE brokers (
        id TEXT PRIMARY KEY,
        address TEXT NOT NULL,
        started_at BIGINT NOT NULL,
        seen_at BIGINT NOT NULL,
        leaving BIGINT NOT NULL DEFAULT 0 CHECK (leaving IN (0, 1))
    );
    CREATE TABLE group_leases (
        group_num BIGINT PRIMARY KEY REFERENCES groups (num),
        owner TEXT,
        epoch BIGINT NOT NULL CHECK (epoch >= 0),
        expires_at BIGINT NOT NULL
    );
    "#,
    // 3: SQLite's 18.
    r#"
    CREATE TABLE route_reservations (
        group_num BIGINT NOT NULL REFERENCES groups (num),
        session TEXT NOT NULL,
        resource TEXT NOT NULL,
        "user" TEXT NOT NULL,
        expires_at BIGINT NOT NULL,
        PRIMARY KEY (group_num, session)
    );
    "#,
];

/// The first SQLite migration a PostgreSQL store has not applied as its
/// first step: PostgreSQL migration `i` (from 1) is SQLite migration
/// `i + POSTGRES_BASE`.
pub(super) const POSTGRES_BASE: usize = MIGRATIONS.len() - POSTGRES_MIGRATIONS.len();

/// Applies every migration the store has not seen, each in its own
/// transaction.
pub(super) fn migrate(conn: &mut Connection) -> Result<(), StoreError> {
    let known = MIGRATIONS.len() as i64;
    let found: i64 = conn.query_row("PRAGMA user_version", [], |r| r.get(0))?;
    if found > known {
        return Err(StoreError::NewerSchema { found, known });
    }
    for (i, sql) in MIGRATIONS.iter().enumerate().skip(found as usize) {
        let tx = conn.transaction()?;
        tx.execute_batch(sql)?;
        tx.pragma_update(None, "user_version", i as i64 + 1)?;
        tx.commit()?;
    }
    Ok(())
}

/// Key of the advisory lock under which brokers sharing a PostgreSQL
/// database migrate it, one at a time.
const POSTGRES_MIGRATION_LOCK: i64 = 0x6665_7272_7973_6368;

/// Applies every PostgreSQL migration the database has not seen, each in
/// its own transaction, holding an advisory lock so brokers starting
/// together migrate once.
pub(super) fn migrate_postgres(client: &mut postgres::Client) -> Result<(), StoreError> {
    client.batch_execute(
        "CREATE TABLE IF NOT EXISTS ferry_schema (
             only_row BOOLEAN PRIMARY KEY DEFAULT TRUE CHECK (only_row),
             version BIGINT NOT NULL
         )",
    )?;
    let known = POSTGRES_MIGRATIONS.len() as i64;
    loop {
        let mut tx = client.transaction()?;
        tx.execute(
            "SELECT pg_advisory_xact_lock($1)",
            &[&POSTGRES_MIGRATION_LOCK],
        )?;
        let found: i64 = tx
            .query_opt("SELECT version FROM ferry_schema", &[])?
            .map(|r| r.try_get(0))
            .transpose()?
            .unwrap_or(0);
        if found > known {
            return Err(StoreError::NewerSchema {
                found: found + POSTGRES_BASE as i64,
                known: known + POSTGRES_BASE as i64,
            });
        }
        let Some(sql) = POSTGRES_MIGRATIONS.get(found as usize) else {
            return Ok(());
        };
        tx.batch_execute(sql)?;
        tx.execute(
            "INSERT INTO ferry_schema (version) VALUES ($1)
             ON CONFLICT (only_row) DO UPDATE SET version = excluded.version",
            &[&(found + 1)],
        )?;
        tx.commit()?;
    }
}
