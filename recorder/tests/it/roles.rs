//! Split Postgres roles (docs/security.md, "Postgres"): the schema owner
//! migrates, the runtime role reads and writes and cannot run DDL, and
//! tables of later migrations are covered by the default privileges of
//! `k8s/components/postgres-roles/roles.sql`, the script the deployments run.
//!
//! Roles are cluster-wide: each test makes its own, with unique names, and
//! drops them when it ends (after its database).

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use recorder::store::postgres::PgStore;
use recorder::store::{ReadLimits, Store};
use services::messages::SamplesQuery;
use sqlx::Connection;

use crate::helpers::{batch, client, init_logs, samples};

/// Two roles made by `roles.sql` in a fresh database; on drop, the
/// database goes first (it holds their grants), then the roles.
struct SplitRoles {
    owner: String,
    runtime: String,
    admin_url: String,
    db: Option<testkit::Database>,
}

impl SplitRoles {
    /// A fresh database, and `k8s/components/postgres-roles/roles.sql` run in it by psql.
    async fn create() -> SplitRoles {
        let db = testkit::fresh_database().await;
        let tag = format!("{:012x}", rand::random::<u64>() >> 16);
        let roles = SplitRoles {
            owner: format!("test_owner_{tag}"),
            runtime: format!("test_runtime_{tag}"),
            admin_url: db.url.replace(&format!("/{}", db.name), "/postgres"),
            db: Some(db),
        };
        roles.run_script();
        roles
    }

    /// The database's URL (as the admin).
    fn db_url(&self) -> &str {
        &self.db.as_ref().expect("until drop").url
    }

    /// Runs the script (again: it must be idempotent).
    fn run_script(&self) {
        let script: PathBuf = [
            env!("CARGO_MANIFEST_DIR"),
            "..",
            "k8s",
            "components",
            "postgres-roles",
            "roles.sql",
        ]
        .iter()
        .collect();
        let out = Command::new("psql")
            .arg(self.db_url())
            .args(["-X", "-q", "-v", "ON_ERROR_STOP=1"])
            .args(["-v", &format!("owner={}", self.owner)])
            .args(["-v", "owner_password=owner-secret"])
            .args(["-v", &format!("runtime={}", self.runtime)])
            .args(["-v", "runtime_password=runtime-secret"])
            .arg("-f")
            .arg(&script)
            .output()
            .unwrap_or_else(|e| {
                panic!("cannot run psql ({e}): install postgresql-client (apt-get install postgresql-client)")
            });
        assert!(
            out.status.success(),
            "roles.sql failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// `db_url` as `role`.
    fn url(db_url: &str, role: &str, password: &str) -> String {
        db_url.replacen("://postgres@", &format!("://{role}:{password}@"), 1)
    }
}

impl Drop for SplitRoles {
    fn drop(&mut self) {
        drop(self.db.take());
        let (admin, owner, runtime) = (
            self.admin_url.clone(),
            self.owner.clone(),
            self.runtime.clone(),
        );
        testkit::block_on_own_thread(move || async move {
            if let Ok(mut c) = sqlx::PgConnection::connect(&admin).await {
                for role in [runtime, owner] {
                    let _ = sqlx::query(sqlx::AssertSqlSafe(format!("DROP ROLE IF EXISTS {role}")))
                        .execute(&mut c)
                        .await;
                }
            }
        });
    }
}

/// The SQLSTATE of a failed statement.
async fn sqlstate(conn: &mut sqlx::PgConnection, sql: &str) -> Option<String> {
    match sqlx::query(sqlx::AssertSqlSafe(sql.to_owned()))
        .execute(conn)
        .await
    {
        Ok(_) => None,
        Err(sqlx::Error::Database(e)) => e.code().map(|c| c.into_owned()),
        Err(e) => panic!("{sql}: {e}"),
    }
}

const INSUFFICIENT_PRIVILEGE: &str = "42501";

#[tokio::test]
async fn the_runtime_role_reads_and_writes_but_runs_no_ddl() {
    init_logs();
    let roles = SplitRoles::create().await;
    let owner_url = SplitRoles::url(roles.db_url(), &roles.owner, "owner-secret");
    let runtime_url = SplitRoles::url(roles.db_url(), &roles.runtime, "runtime-secret");

    // Before any migration, the runtime role alone cannot create the schema.
    let err = PgStore::connect_split(&runtime_url, None, ReadLimits::default())
        .await
        .err()
        .expect("the runtime role cannot migrate");
    assert!(err.to_string().contains("permission denied"), "{err}");

    // The owner migrates, the runtime role serves.
    let store = PgStore::connect_split(&runtime_url, Some(&owner_url), ReadLimits::default())
        .await
        .expect("migrate as the owner, serve as the runtime role");
    let (id, base) = ("c-roles", 1_000_000_000_000);
    let b = batch(vec![client(id, true, None)], samples(id, true, 0..5, base));
    assert_eq!(store.insert(&[b]).await.expect("insert").inserted, 5);
    let q = SamplesQuery {
        channel_name: id.to_owned(),
        token_digest: None,
        since_us: None,
        limit: 100,
        deadline_unix_ms: None,
    };
    let read = store
        .samples(&q)
        .await
        .expect("read")
        .expect("known client");
    assert_eq!(read.len(), 5);
    assert_eq!(store.prune(base + 2_500_000).await.expect("prune"), 3);

    // Day partitions are made and dropped through the owner's functions,
    // packing upserts blocks and rollups: all as the runtime role.
    const DAY_US: i64 = 86_400_000_000;
    let created = store
        .maintain_partitions(base, Duration::from_secs(30 * 86_400))
        .await
        .expect("partitions as the runtime role");
    assert!(created >= 3, "today and the days ahead: {created}");
    assert_eq!(store.pack(base + DAY_US).await.expect("pack"), 2);
    assert_eq!(store.samples(&q).await.unwrap().unwrap().len(), 2);
    assert_eq!(store.prune(base + 10 * DAY_US).await.expect("prune"), 2);
    assert!(store.samples(&q).await.unwrap().is_none(), "all gone");

    // A browser's history (migration 0006): a device upserted and linked,
    // its minutes packed, read, pruned and forgotten, all as the runtime
    // role.
    let digest = services::ids::device_digest("roles-device-secret-0123");
    let mut record = client("c-dev", true, None);
    record.device = Some(digest.clone());
    let day = base + 20 * DAY_US;
    store
        .insert(&[batch(vec![record], samples("c-dev", true, 0..5, day))])
        .await
        .expect("insert with a device");
    assert_eq!(store.pack(day + DAY_US).await.expect("pack"), 5);
    let history = store
        .device_history(
            &digest,
            Duration::from_secs(3600),
            Duration::from_secs(3600),
            day + 600_000_000,
        )
        .await
        .expect("device history as the runtime role")
        .expect("a known device");
    assert_eq!(history.iter().map(|b| b.count).sum::<u64>(), 5);
    assert!(
        store
            .prune_rollups(day + 60_000_000)
            .await
            .expect("prune rollups")
            >= 1
    );
    assert_eq!(
        store
            .forget_device(&digest)
            .await
            .expect("forget as the runtime role"),
        Some(1)
    );

    // With the schema up to date, the runtime role starts alone.
    let again = PgStore::connect_split(&runtime_url, None, ReadLimits::default())
        .await
        .expect("an up-to-date schema needs no DDL");
    assert!(again.ping().await);

    // No DDL and no TRUNCATE for the runtime role, and the partition
    // functions take nothing but day partitions of sample_blocks.
    let mut rt = sqlx::PgConnection::connect(&runtime_url)
        .await
        .expect("runtime");
    for sql in [
        "DROP TABLE sample_staging",
        "DROP VIEW samples",
        "ALTER TABLE sample_staging ADD COLUMN x int",
        "CREATE TABLE intruder (i int)",
        "CREATE TEMP TABLE intruder (i int)",
        "TRUNCATE sample_staging",
        "CREATE SCHEMA intruder",
        "DELETE FROM _sqlx_migrations",
        "INSERT INTO _sqlx_migrations SELECT * FROM _sqlx_migrations",
    ] {
        assert_eq!(
            sqlstate(&mut rt, sql).await.as_deref(),
            Some(INSUFFICIENT_PRIVILEGE),
            "{sql} as the runtime role"
        );
    }

    for sql in [
        "SELECT pingapp_drop_day_partition('channels')",
        "SELECT pingapp_drop_day_partition('sample_blocks_default')",
        "SELECT pingapp_create_day_partition('intruder', 0, 1)",
    ] {
        assert_eq!(
            sqlstate(&mut rt, sql).await.as_deref(),
            Some("P0001"),
            "{sql} as the runtime role"
        );
    }

    // A table a later migration makes is covered by the default privileges.
    let mut owner = sqlx::PgConnection::connect(&owner_url)
        .await
        .expect("owner");
    assert_eq!(
        sqlstate(&mut owner, "CREATE TABLE later (k text PRIMARY KEY)").await,
        None
    );
    for sql in [
        "INSERT INTO later VALUES ('a')",
        "SELECT * FROM later",
        "DELETE FROM later",
    ] {
        assert_eq!(sqlstate(&mut rt, sql).await, None, "{sql} on a later table");
    }
    assert_eq!(
        sqlstate(&mut rt, "DROP TABLE later").await.as_deref(),
        Some(INSUFFICIENT_PRIVILEGE)
    );

    // The script runs again without harm (password rotation).
    roles.run_script();
    assert_eq!(
        sqlstate(&mut rt, "SELECT count(*) FROM samples").await,
        None
    );
    let _ = rt.close().await;
    let _ = owner.close().await;
    store.pool().close().await;
    again.pool().close().await;
}
