//! A real Kubernetes API server for the operator tests.
//!
//! `.ci/run` starts one for the whole run and exports
//! `CIRRUS_TEST_KUBECONFIG`. Without it, the first test to need one starts
//! it with `scripts/k8s-apiserver.sh` in `target/k8s-test-env` (under a
//! file lock, so parallel test processes share it) and leaves it running
//! for the next tests; stop it with
//! `scripts/k8s-apiserver.sh stop target/k8s-test-env`.

use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Namespace;
use kube::api::{Api, ObjectMeta, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::Client;

/// The workspace root (for paths in tests).
pub fn workspace_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Path of a kubeconfig for a running test API server (started if needed).
pub fn kubeconfig() -> PathBuf {
    if let Ok(p) = std::env::var("CIRRUS_TEST_KUBECONFIG") {
        return PathBuf::from(p);
    }
    let run = workspace_root().join("target/k8s-test-env");
    let crds = run.with_extension("crds");
    started_once(
        "scripts/k8s-apiserver.sh",
        &run,
        &["apiserver"],
        &[("CIRRUS_K8S_CRDS_JSON", &crds)],
        || {
            std::fs::create_dir_all(&crds).expect("crd dir");
            for crd in cirrus_operator_api::crds() {
                let name = crd.metadata.name.clone().unwrap();
                std::fs::write(
                    crds.join(format!("{name}.json")),
                    serde_json::to_vec(&crd).unwrap(),
                )
                .unwrap();
            }
        },
    )
}

/// The kubeconfig of what `bash SCRIPT start RUN` starts, started by the
/// first test process that needs it (under a file lock, so parallel test
/// processes share it) and left running for the next ones: it counts as
/// running while the processes of the `alive` pid files in RUN live.
pub(crate) fn started_once(
    script: &str,
    run: &std::path::Path,
    alive: &[&str],
    env: &[(&str, &std::path::Path)],
    prepare: impl FnOnce(),
) -> PathBuf {
    std::fs::create_dir_all(run).expect("run dir");
    let lock = std::fs::File::create(run.with_extension("lock")).expect("lock file");
    lock.lock().expect("lock");
    let kc = run.join("kubeconfig");
    let live = |name: &&str| {
        std::fs::read_to_string(run.join(format!("{name}.pid")))
            .ok()
            .and_then(|p| p.trim().parse::<u32>().ok())
            .is_some_and(|pid| std::path::Path::new(&format!("/proc/{pid}")).exists())
    };
    if !(kc.exists() && alive.iter().all(live)) {
        prepare();
        let out = Command::new("bash")
            .arg(workspace_root().join(script))
            .arg("start")
            .arg(run)
            .envs(env.iter().copied())
            .output()
            .unwrap_or_else(|e| panic!("run {script}: {e}"));
        assert!(
            out.status.success(),
            "{script} start failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    kc
}

pub async fn client() -> Client {
    let kc = Kubeconfig::read_from(kubeconfig()).expect("read kubeconfig");
    let config = kube::Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
        .await
        .expect("kubeconfig");
    Client::try_from(config).expect("client")
}

static NS_SEQ: AtomicU32 = AtomicU32::new(0);

/// A fresh namespace for one test.
pub async fn namespace(client: &Client, prefix: &str) -> String {
    let n = NS_SEQ.fetch_add(1, Ordering::Relaxed);
    let name = format!("{prefix}-{}-{n}", std::process::id());
    let ns = Namespace {
        metadata: ObjectMeta {
            name: Some(name.clone()),
            ..Default::default()
        },
        ..Default::default()
    };
    Api::<Namespace>::all(client.clone())
        .create(&PostParams::default(), &ns)
        .await
        .expect("create namespace");
    name
}

/// Poll `f` until it returns `Some`, at most `timeout`.
pub async fn eventually<T, F, Fut>(timeout: Duration, what: &str, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let end = Instant::now() + timeout;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(Instant::now() < end, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The Helm binary: `$CIRRUS_HELM`, else `scripts/helm-install.sh` (cached
/// under `~/.cache/cirrus-helm`).
pub fn helm() -> PathBuf {
    if let Ok(p) = std::env::var("CIRRUS_HELM") {
        return PathBuf::from(p);
    }
    let out = Command::new("bash")
        .arg(workspace_root().join("scripts/helm-install.sh"))
        .output()
        .expect("run scripts/helm-install.sh");
    assert!(
        out.status.success(),
        "installing helm failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    PathBuf::from(String::from_utf8_lossy(&out.stdout).trim())
}

/// Run `program args`, at most `timeout`; returns (success, stdout, stderr).
pub fn run(
    program: &std::path::Path,
    args: &[&str],
    env: &[(&str, &str)],
    timeout: Duration,
) -> (bool, String, String) {
    let mut cmd = Command::new(program);
    cmd.args(args).envs(env.iter().copied());
    run_command(cmd, timeout)
}

/// `cargo args` as a person would run it from a shell: without the
/// variables cargo sets for a test process (`CARGO_PKG_NAME`, …). Build
/// scripts that watch those (`cargo:rerun-if-env-changed`) would otherwise
/// see them change between this run and one from a shell, and cargo would
/// rebuild everything above them twice.
pub fn cargo_as_from_a_shell(args: &[&str], timeout: Duration) -> (bool, String, String) {
    let mut cmd = Command::new(env!("CARGO"));
    cmd.args(args);
    for (k, _) in std::env::vars_os() {
        let k = k.to_string_lossy();
        let set_for_tests = [
            "CARGO_PKG_",
            "CARGO_MANIFEST_",
            "CARGO_CRATE_",
            "CARGO_BIN_",
            "CARGO_PRIMARY_PACKAGE",
            "CARGO_TARGET_TMPDIR",
            "OUT_DIR",
        ];
        if set_for_tests.iter().any(|p| k.starts_with(p)) {
            cmd.env_remove(&*k);
        }
    }
    run_command(cmd, timeout)
}

fn run_command(mut cmd: Command, timeout: Duration) -> (bool, String, String) {
    let what = format!("{cmd:?}");
    let child = cmd
        .current_dir(workspace_root())
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("start {what}: {e}"));
    let pid = child.id();
    // Output is read while waiting (it may be larger than a pipe holds).
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    let out = match rx.recv_timeout(timeout) {
        Ok(r) => r.expect("output"),
        Err(_) => {
            let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
            panic!("{what} ran longer than {timeout:?}");
        }
    };
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}
