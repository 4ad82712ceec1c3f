//! PostgreSQL for tests: a throwaway cluster that can be stopped and started
//! again ([`PgCluster`]), or a fresh database on the machine's server
//! ([`fresh_database`]).

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use sqlx::Connection;
use tempfile::TempDir;
use tokio::process::Command;

use crate::{find_in, free_port, is_root, show_logs, tail};

/// How to get PostgreSQL, for the panic message.
const INSTALL: &str = "install postgresql (`apt-get install postgresql`), or point \
                       PINGAPP_PG_BIN at the folder holding initdb and pg_ctl";

/// The machine's server, for [`fresh_database`].
const DEFAULT_SERVER: &str = "postgres://postgres@127.0.0.1:5432/postgres";

/// A PostgreSQL cluster of its own in a temp dir, on a port of its own,
/// trusting local connections as user `postgres`. Stopped (immediate) and
/// removed on drop.
///
/// As root the server runs as the `postgres` user (PostgreSQL refuses to
/// run as root), so the temp dir is handed to that user.
pub struct PgCluster {
    dir: TempDir,
    port: u16,
    bin: PathBuf,
    running: bool,
}

impl PgCluster {
    /// Creates the cluster (`initdb`) and starts it.
    ///
    /// # Panics
    /// PostgreSQL is not installed, or the cluster did not start (its log
    /// is printed).
    pub async fn start() -> PgCluster {
        let bin = pg_bin_dir();
        let dir = tempfile::Builder::new()
            .prefix("testkit-pg")
            .tempdir()
            .expect("temp dir for PostgreSQL");
        let mut cluster = PgCluster {
            dir,
            port: free_port(),
            bin,
            running: false,
        };
        if is_root() {
            run(Command::new("chown")
                .args(["-R", "postgres:postgres"])
                .arg(cluster.dir.path()))
            .await
            .unwrap_or_else(|e| panic!("cannot hand the cluster dir to user postgres: {e}"));
        }
        let data = cluster.data_dir();
        cluster
            .pg(
                "initdb",
                &[
                    "-D",
                    path_str(&data),
                    "-A",
                    "trust",
                    "-U",
                    "postgres",
                    "-E",
                    "UTF8",
                    "--no-sync",
                    "--no-instructions",
                ],
            )
            .await
            .unwrap_or_else(|e| panic!("initdb failed: {e}"));
        // The port can be taken between the check and the bind: try others.
        for _ in 0..4 {
            match cluster.try_start().await {
                Ok(()) => return cluster,
                Err(_) => cluster.port = free_port(),
            }
        }
        if let Err(e) = cluster.try_start().await {
            panic!("PostgreSQL did not start: {e}\n{}", cluster.log());
        }
        cluster
    }

    /// The server's port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The URL of database `db` on this cluster.
    pub fn url(&self, db: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{db}", self.port)
    }

    /// Creates a database with a random name; returns its URL.
    ///
    /// # Panics
    /// The cluster is not running.
    pub async fn create_database(&self) -> String {
        let name = random_db_name();
        let mut admin = sqlx::PgConnection::connect(&self.url("postgres"))
            .await
            .expect("connect to the test cluster");
        sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
            .execute(&mut admin)
            .await
            .expect("CREATE DATABASE");
        let _ = admin.close().await;
        self.url(&name)
    }

    /// Stops the server (fast shutdown: sessions are disconnected) and
    /// waits until it is down.
    ///
    /// # Panics
    /// `pg_ctl stop` failed.
    pub async fn stop(&mut self) {
        let data = self.data_dir();
        self.pg(
            "pg_ctl",
            &["-D", path_str(&data), "-m", "fast", "-w", "stop"],
        )
        .await
        .unwrap_or_else(|e| panic!("pg_ctl stop failed: {e}\n{}", self.log()));
        self.running = false;
    }

    /// Starts the stopped server again, same data and port.
    ///
    /// # Panics
    /// It did not start (its log is printed).
    pub async fn start_again(&mut self) {
        if let Err(e) = self.try_start().await {
            panic!("PostgreSQL did not start again: {e}\n{}", self.log());
        }
    }

    /// [`PgCluster::stop`], then [`PgCluster::start_again`].
    pub async fn restart(&mut self) {
        self.stop().await;
        self.start_again().await;
    }

    /// The server log so far (its last 40 lines).
    pub fn log(&self) -> String {
        tail(&self.dir.path().join("server.log"), 40)
    }

    fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    async fn try_start(&mut self) -> Result<(), String> {
        let data = self.data_dir();
        let log = self.dir.path().join("server.log");
        let opts = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c fsync=off -c full_page_writes=off",
            self.port,
            self.dir.path().display()
        );
        self.pg(
            "pg_ctl",
            &[
                "-D",
                path_str(&data),
                "-l",
                path_str(&log),
                "-o",
                &opts,
                "-t",
                "30",
                "-w",
                "start",
            ],
        )
        .await?;
        self.running = true;
        Ok(())
    }

    /// Runs one of PostgreSQL's programs, as user `postgres` when root.
    async fn pg(&self, program: &str, args: &[&str]) -> Result<(), String> {
        let exe = self.bin.join(program);
        let mut cmd = if is_root() {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(&exe);
            c
        } else {
            Command::new(&exe)
        };
        cmd.args(args).current_dir(self.dir.path());
        run(&mut cmd).await
    }
}

impl Drop for PgCluster {
    fn drop(&mut self) {
        if show_logs() {
            eprintln!(
                "----- PostgreSQL on port {} (last lines) -----\n{}",
                self.port,
                self.log()
            );
        }
        if !self.running {
            return;
        }
        let pg_ctl = self.bin.join("pg_ctl");
        let data = self.data_dir();
        let mut cmd = if is_root() {
            let mut c = std::process::Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(&pg_ctl);
            c
        } else {
            std::process::Command::new(&pg_ctl)
        };
        let _ = cmd
            .arg("-D")
            .arg(&data)
            .args(["-m", "immediate", "-w", "stop"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

/// A database on the machine's PostgreSQL server, dropped on drop.
pub struct Database {
    /// Its URL.
    pub url: String,
    /// Its name.
    pub name: String,
    admin_url: String,
}

/// Creates a database with a random name on the machine's server:
/// `PINGAPP_TEST_DATABASE_URL` (default
/// `postgres://postgres@127.0.0.1:5432/postgres`), whose user must be
/// allowed to create databases.
///
/// # Panics
/// The server is unreachable (the message says how to fix it).
pub async fn fresh_database() -> Database {
    let admin_url =
        std::env::var("PINGAPP_TEST_DATABASE_URL").unwrap_or_else(|_| DEFAULT_SERVER.to_owned());
    let connect = sqlx::PgConnection::connect(&admin_url);
    let mut admin = match tokio::time::timeout(Duration::from_secs(10), connect).await {
        Ok(Ok(c)) => c,
        Ok(Err(e)) => panic!(
            "cannot reach PostgreSQL at {admin_url}: {e}. Start it (`service postgresql start`, \
             after `apt-get install postgresql`) or set PINGAPP_TEST_DATABASE_URL"
        ),
        Err(_) => panic!(
            "timed out connecting to PostgreSQL at {admin_url}: start it or set \
             PINGAPP_TEST_DATABASE_URL"
        ),
    };
    let name = random_db_name();
    sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
        .execute(&mut admin)
        .await
        .expect("CREATE DATABASE");
    let _ = admin.close().await;
    Database {
        url: with_database(&admin_url, &name),
        name,
        admin_url,
    }
}

impl Drop for Database {
    fn drop(&mut self) {
        let admin_url = self.admin_url.clone();
        let name = self.name.clone();
        // Drop cannot await, and the test's runtime may be the one blocked
        // here: a thread with a runtime of its own does the work.
        crate::block_on_own_thread(move || async move {
            if let Ok(mut c) = sqlx::PgConnection::connect(&admin_url).await {
                let _ = sqlx::query(sqlx::AssertSqlSafe(format!(
                    "DROP DATABASE IF EXISTS {name} WITH (FORCE)"
                )))
                .execute(&mut c)
                .await;
            }
        });
    }
}

fn random_db_name() -> String {
    format!("test_{:016x}", rand::random::<u64>())
}

/// `url` with its database replaced by `name`.
fn with_database(url: &str, name: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((b, q)) => (b, format!("?{q}")),
        None => (url, String::new()),
    };
    let scheme_end = base.find("://").map_or(0, |i| i + 3);
    let base = match base[scheme_end..].find('/') {
        Some(i) => &base[..scheme_end + i],
        None => base,
    };
    format!("{base}/{name}{query}")
}

/// The folder with `initdb` and `pg_ctl`: `PINGAPP_PG_BIN`, else the
/// newest `/usr/lib/postgresql/<version>/bin` (Debian), else `PATH`.
fn pg_bin_dir() -> PathBuf {
    if let Some(p) = std::env::var_os("PINGAPP_PG_BIN") {
        return PathBuf::from(p);
    }
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let v = e.file_name().to_str()?.parse::<u32>().ok()?;
            Some((v, e.path().join("bin")))
        })
        .filter(|(_, bin)| bin.join("initdb").is_file())
        .collect();
    versions.sort();
    if let Some((_, bin)) = versions.pop() {
        return bin;
    }
    let path = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .unwrap_or_default();
    match find_in(path, "initdb") {
        Some(p) => p.parent().map(Path::to_path_buf).unwrap_or_default(),
        None => panic!("no initdb found: {INSTALL}"),
    }
}

fn path_str(p: &Path) -> &str {
    p.to_str().expect("temp paths are UTF-8")
}

/// Runs `cmd`; its output becomes the error if it fails.
async fn run(cmd: &mut Command) -> Result<(), String> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .await
        .map_err(|e| format!("cannot run {cmd:?}: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{cmd:?} exited with {}: {}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}
