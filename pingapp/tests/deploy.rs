//! Deployment files are part of the product: this test binary runs
//! `deploy/validate.sh` so that `cargo test --workspace` checks
//! `docker-compose.yml`, every Kubernetes overlay (and that both name the
//! image the build produces), the Prometheus configuration and alert rules
//! (`promtool`, with unit tests for every alert), and the metrics the
//! Grafana dashboard queries, offline. (`tests/compose.rs` runs the stack.)
//!
//! The checks need `docker-compose` (or Docker Compose v2), `kubectl`,
//! `python3`, `kubernetes-validate` (`pip install kubernetes-validate`) and
//! `promtool` (Debian: `apt-get install prometheus`);
//! `scripts/setup-test-deps.sh` installs them. A missing tool fails the test
//! with what to install: these checks never pass by skipping.

use std::env;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// The exit status `deploy/validate.sh` uses for a missing tool.
const EXIT_MISSING_TOOL: i32 = 127;

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .canonicalize()
        .expect("the repository root (CARGO_MANIFEST_DIR/..) exists")
}

/// True when `tool` is an executable file in one of the `PATH` directories.
fn on_path(tool: &str) -> bool {
    let Some(path) = env::var_os("PATH") else {
        return false;
    };
    env::split_paths(&path).any(|dir| is_executable(&dir.join(tool)))
}

#[cfg(unix)]
fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    fs::metadata(path)
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

#[cfg(not(unix))]
fn is_executable(path: &Path) -> bool {
    path.is_file()
}

fn require(tool: &str, install: &str) {
    assert!(
        on_path(tool),
        "`{tool}` is not on PATH: install {install} (scripts/setup-test-deps.sh installs every tool \
         these checks need; see deploy/README.md)"
    );
}

fn require_compose() {
    if on_path("docker-compose") {
        return;
    }
    let v2 = on_path("docker")
        && Command::new("docker")
            .args(["compose", "version"])
            .output()
            .map(|o| o.status.success())
            .unwrap_or(false);
    assert!(
        v2,
        "neither `docker-compose` nor `docker compose` is available: install docker-compose \
         (Debian: apt-get install docker-compose; or run deploy/install-tools.sh)"
    );
}

fn require_k8s_tools() {
    require("kubectl", "kubectl (v1.27 or newer, bundling kustomize v5)");
    require("python3", "python3");
    require(
        "kubernetes-validate",
        "kubernetes-validate (pip install kubernetes-validate)",
    );
}

/// Runs `bash deploy/validate.sh ARGS...` from the repository root and fails
/// the test, with the script's whole output, unless it succeeds.
fn validate(args: &[&str]) {
    require("bash", "bash");
    let root = repo_root();
    let output: Output = Command::new("bash")
        .arg(root.join("deploy/validate.sh"))
        .args(args)
        .current_dir(&root)
        .output()
        .expect("bash runs deploy/validate.sh");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    let command = format!("bash deploy/validate.sh {}", args.join(" "));
    if output.status.code() == Some(EXIT_MISSING_TOOL) {
        panic!(
            "`{command}` could not run: a tool is missing; install what it names \
             (see deploy/README.md)\n--- stderr ---\n{stderr}\n--- stdout ---\n{stdout}"
        );
    }
    assert!(
        output.status.success(),
        "`{command}` failed with {}\n--- stdout ---\n{stdout}\n--- stderr ---\n{stderr}",
        output.status
    );
    // A pass must come from checks that ran, not from a script that did nothing.
    assert!(
        stdout.contains(": OK"),
        "`{command}` succeeded without reporting a check\n--- stdout ---\n{stdout}\n--- stderr ---\n{stderr}"
    );
}

#[test]
fn compose_file_is_valid() {
    require_compose();
    validate(&["compose"]);
}

#[test]
fn k8s_overlay_dev_is_valid() {
    require_k8s_tools();
    validate(&["overlay", "dev"]);
}

#[test]
fn k8s_overlay_prod_is_valid() {
    require_k8s_tools();
    validate(&["overlay", "prod"]);
}

#[test]
fn prometheus_config_and_alert_rules_pass_promtool_and_their_unit_tests() {
    require("promtool", "promtool (Debian: apt-get install prometheus)");
    validate(&["prometheus"]);
}

#[test]
fn dashboards_and_rules_query_only_documented_metrics() {
    require(
        "python3",
        "python3 (with PyYAML: pip install kubernetes-validate brings it)",
    );
    validate(&["dashboards"]);
}

/// The dashboard check can fail: a dashboard with a misspelt metric is
/// rejected, naming the metric.
#[test]
fn dashboard_check_rejects_an_unknown_metric() {
    require("python3", "python3");
    let root = repo_root();
    let dashboard = fs::read_to_string(root.join("deploy/grafana/dashboards/pingapp.json"))
        .expect("the dashboard is readable");
    assert!(dashboard.contains("pingapp_gateway_connections"));
    let broken = dashboard.replacen(
        "pingapp_gateway_connections",
        "pingapp_gateway_conections",
        1,
    );
    let dir = tempfile::tempdir().expect("a temporary folder");
    let path = dir.path().join("broken.json");
    fs::write(&path, broken).expect("write the broken dashboard");
    let output = Command::new("python3")
        .arg(root.join("deploy/check_metrics.py"))
        .arg(&path)
        .output()
        .expect("python3 runs deploy/check_metrics.py");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "stderr: {stderr}");
    assert!(
        stderr.contains("unknown metric pingapp_gateway_conections"),
        "stderr: {stderr}"
    );
}

/// Each overlay has a test above; a new overlay must get one too.
#[test]
fn every_k8s_overlay_has_a_test() {
    let dir = repo_root().join("k8s/overlays");
    let mut overlays: Vec<String> = fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", dir.display()))
        .filter_map(Result::ok)
        .filter(|entry| entry.path().join("kustomization.yaml").is_file())
        .map(|entry| entry.file_name().to_string_lossy().into_owned())
        .collect();
    overlays.sort();
    assert_eq!(
        overlays,
        ["dev", "prod"],
        "k8s/overlays changed: add a test for each overlay in pingapp/tests/deploy.rs"
    );
}
