//! Verified TLS to Postgres (docs/security.md, "Postgres"): against a
//! throwaway cluster serving a certificate of a test CA, `sslmode=verify-full`
//! with that CA as `sslrootcert` connects over TLS; another CA, or a host
//! name the certificate does not name, is refused. The recorder takes these
//! settings from its `DATABASE_URL` as they are.

use std::path::Path;
use std::process::Command;

use recorder::store::ReadLimits;
use recorder::store::postgres::PgStore;
use sqlx::Connection;

use crate::helpers::init_logs;

/// Runs openssl with `args` in `dir`.
fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap_or_else(|e| panic!("cannot run openssl ({e}): apt-get install openssl"));
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A CA (`NAME.crt`, `NAME.key`) in `dir`.
fn make_ca(dir: &Path, name: &str) {
    openssl(
        dir,
        &[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-days",
            "2",
            "-subj",
            &format!("/CN={name}"),
            "-keyout",
            &format!("{name}.key"),
            "-out",
            &format!("{name}.crt"),
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign",
        ],
    );
}

#[tokio::test]
async fn verify_full_connects_with_the_right_ca_only() {
    init_logs();
    let certs = tempfile::tempdir().expect("temp dir");
    let dir = certs.path();
    make_ca(dir, "ca");
    make_ca(dir, "other-ca");
    // The server's certificate names localhost only (not 127.0.0.1).
    openssl(
        dir,
        &[
            "req",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-subj",
            "/CN=localhost",
            "-keyout",
            "server.key",
            "-out",
            "server.csr",
        ],
    );
    std::fs::write(
        dir.join("server.ext"),
        "subjectAltName=DNS:localhost\nextendedKeyUsage=serverAuth\n",
    )
    .expect("write ext");
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.crt",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            "2",
            "-extfile",
            "server.ext",
            "-out",
            "server.crt",
        ],
    );

    let cluster = testkit::PgCluster::start().await;
    // The server reads its key as user postgres, and only a private one.
    let served = tempfile::tempdir().expect("temp dir");
    let (crt, key) = (
        served.path().join("server.crt"),
        served.path().join("server.key"),
    );
    std::fs::copy(dir.join("server.crt"), &crt).expect("copy crt");
    std::fs::copy(dir.join("server.key"), &key).expect("copy key");
    let status = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "chmod 600 {k} && if [ \"$(id -u)\" = 0 ]; then chown -R postgres {d}; chmod 700 {d}; fi",
            k = key.display(),
            d = served.path().display()
        ))
        .status()
        .expect("sh");
    assert!(status.success(), "hand the key to postgres");
    let mut admin = sqlx::PgConnection::connect(&cluster.url("postgres"))
        .await
        .expect("admin");
    for sql in [
        format!("ALTER SYSTEM SET ssl_cert_file = '{}'", crt.display()),
        format!("ALTER SYSTEM SET ssl_key_file = '{}'", key.display()),
        "ALTER SYSTEM SET ssl = on".to_owned(),
        "SELECT pg_reload_conf()".to_owned(),
    ] {
        sqlx::query(sqlx::AssertSqlSafe(sql))
            .execute(&mut admin)
            .await
            .expect("enable ssl");
    }
    let _ = admin.close().await;

    let url = |host: &str, mode: &str, ca: &str| {
        format!(
            "postgres://postgres@{host}:{}/postgres?sslmode={mode}&sslrootcert={}",
            cluster.port(),
            dir.join(ca).display()
        )
    };
    // The reload applies to new sessions: give it a moment to take.
    let good = url("localhost", "verify-full", "ca.crt");
    let mut conn = None;
    for _ in 0..50 {
        match sqlx::PgConnection::connect(&good).await {
            Ok(c) => {
                conn = Some(c);
                break;
            }
            Err(_) => tokio::time::sleep(std::time::Duration::from_millis(100)).await,
        }
    }
    let mut conn =
        conn.unwrap_or_else(|| panic!("verify-full with the right CA: {}", cluster.log()));
    let ssl: bool = sqlx::query_scalar("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()")
        .fetch_one(&mut conn)
        .await
        .expect("pg_stat_ssl");
    assert!(ssl, "the session is encrypted");
    let _ = conn.close().await;

    // The recorder's store connects (and migrates) the same way.
    let store = PgStore::connect_split(&good, None, ReadLimits::default())
        .await
        .expect("the store over verify-full");
    store.pool().close().await;

    // Another CA: refused. A name the certificate does not hold: refused by
    // verify-full (verify-ca, which skips the name, connects).
    let wrong_ca =
        sqlx::PgConnection::connect(&url("localhost", "verify-full", "other-ca.crt")).await;
    let refusal = format!("{:?}", wrong_ca.map(|_| ()));
    assert!(
        refusal.contains("UnknownIssuer"),
        "a certificate of another CA must be refused: {refusal}"
    );
    let wrong_name = sqlx::PgConnection::connect(&url("127.0.0.1", "verify-full", "ca.crt")).await;
    let refusal = format!("{:?}", wrong_name.map(|_| ()));
    assert!(
        refusal.contains("NotValidForName"),
        "verify-full checks the host name: {refusal}"
    );
    let ca_only = sqlx::PgConnection::connect(&url("127.0.0.1", "verify-ca", "ca.crt"))
        .await
        .expect("verify-ca skips the host name");
    let _ = ca_only.close().await;
    drop(served);
}
