//! Starting and stopping broker processes.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{mpsc, Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

/// The broker binary: `$CIRRUS_BROKER_BIN`, or the workspace's own build,
/// built once per test process if needed.
pub fn broker_bin() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| workspace_bin("cirrus-broker", "CIRRUS_BROKER_BIN"))
        .clone()
}

/// The operator binary: `$CIRRUS_OPERATOR_BIN`, or the workspace's build.
pub fn operator_bin() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| workspace_bin("cirrus-operator", "CIRRUS_OPERATOR_BIN"))
        .clone()
}

/// `$env` if set, else the binary `name` (of the package of that name),
/// built with cargo into this test binary's target directory.
fn workspace_bin(name: &str, env: &str) -> PathBuf {
    if let Ok(p) = std::env::var(env) {
        return PathBuf::from(p);
    }
    let manifest = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../Cargo.toml");
    let status = Command::new(env!("CARGO"))
        .args([
            "build",
            "--quiet",
            "-p",
            name,
            "--bin",
            name,
            "--manifest-path",
        ])
        .arg(&manifest)
        .status()
        .unwrap_or_else(|e| panic!("run cargo build for {name}: {e}"));
    assert!(status.success(), "building {name} failed");
    // target/<profile>/deps/<test-binary> → target/<profile>/<name>
    let exe = std::env::current_exe().expect("current exe");
    let profile_dir = exe.parent().and_then(|p| p.parent()).expect("target dir");
    let here = profile_dir.join(name);
    if here.exists() {
        here
    } else {
        profile_dir
            .parent()
            .expect("target")
            .join("debug")
            .join(name)
    }
}

/// Path of an external tool, or a failure that says how to install it.
pub fn tool(name: &str) -> PathBuf {
    for dir in ["/usr/bin", "/usr/local/bin", "/usr/sbin"] {
        let p = PathBuf::from(dir).join(name);
        if p.exists() {
            return p;
        }
    }
    panic!("{name} is not installed: run `bash .ci/run` once, or apt-get install mosquitto-clients python3-paho-mqtt");
}

static CONFIG_SEQ: AtomicU32 = AtomicU32::new(0);

/// A running `cirrus-broker`. Killed on drop.
pub struct BrokerProcess {
    child: Child,
    /// The MQTT (TCP) listener.
    pub addr: SocketAddr,
    /// Every listener by kind (`mqtt`, `mqtts`, ...).
    pub addrs: std::collections::HashMap<String, SocketAddr>,
    log: Arc<Mutex<String>>,
    config_file: Option<PathBuf>,
    /// The Redis this broker owns (`CIRRUS_TEST_STORE=redis`).
    pub redis: Option<crate::redis::RedisServer>,
}

impl BrokerProcess {
    /// Start with extra flags, on 127.0.0.1 with a port the OS picks.
    pub fn start(args: &[&str]) -> BrokerProcess {
        Self::spawn(args, None, &[])
    }

    /// Start with extra environment variables.
    pub fn start_with_env(args: &[&str], env: &[(&str, &str)]) -> BrokerProcess {
        Self::spawn(args, None, env)
    }

    /// Start with a YAML configuration file (written for this test).
    pub fn start_with_config(yaml: &str, args: &[&str]) -> BrokerProcess {
        let n = CONFIG_SEQ.fetch_add(1, Ordering::Relaxed);
        let path =
            std::env::temp_dir().join(format!("cirrus-test-{}-{n}.yaml", std::process::id()));
        std::fs::write(&path, yaml).expect("write config");
        Self::spawn(args, Some(path), &[])
    }

    /// Start one pod of a cluster on the given Redis.
    pub fn start_on_redis(redis_url: &str, args: &[&str]) -> BrokerProcess {
        Self::start_on_redis_with_env(redis_url, args, &[])
    }

    /// [`Self::start_on_redis`] with extra environment variables.
    pub fn start_on_redis_with_env(
        redis_url: &str,
        args: &[&str],
        env: &[(&str, &str)],
    ) -> BrokerProcess {
        let mut all = vec!["--redis", redis_url, "--node-timeout-ms", "1000"];
        all.extend_from_slice(args);
        Self::spawn(&all, None, env)
    }

    fn spawn(args: &[&str], config_file: Option<PathBuf>, env: &[(&str, &str)]) -> BrokerProcess {
        let mut cmd = Command::new(broker_bin());
        cmd.args(["--listen", "127.0.0.1:0"]);
        let mut redis = None;
        if crate::redis::redis_store_wanted() && !args.contains(&"--redis") {
            let r = crate::redis::RedisServer::start();
            cmd.args(["--redis", &r.url()]);
            redis = Some(r);
        }
        if !args.contains(&"--admin") {
            cmd.args(["--admin", "127.0.0.1:0"]);
        }
        if !args.contains(&"--sys-interval") {
            cmd.args(["--sys-interval", "0"]);
        }
        if let Some(p) = &config_file {
            cmd.arg("--config").arg(p);
        }
        cmd.args(args)
            .env(
                "RUST_LOG",
                std::env::var("CIRRUS_TEST_LOG").unwrap_or_else(|_| "info".into()),
            )
            .env_remove("CIRRUS_LISTEN")
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().expect("start cirrus-broker");
        let stderr = child.stderr.take().expect("stderr");
        let log = Arc::new(Mutex::new(String::new()));
        let (tx, rx) = mpsc::channel();
        let log2 = log.clone();
        // Drain stderr for the whole life of the process (a full pipe would
        // block the broker), and report the bound address once.
        std::thread::spawn(move || {
            let mut addrs = std::collections::HashMap::new();
            let mut reported = false;
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if !reported {
                    if line.contains("listening") {
                        let field = |name: &str| {
                            line.split(&format!("{name}="))
                                .nth(1)
                                .and_then(|s| s.split_whitespace().next())
                                .map(|s| s.trim_matches('"').to_string())
                        };
                        if let (Some(kind), Some(addr)) = (field("kind"), field("addr")) {
                            if let Ok(a) = addr.parse::<SocketAddr>() {
                                addrs.insert(kind, a);
                            }
                        }
                    }
                    if line.contains("accepting connections") {
                        let _ = tx.send(std::mem::take(&mut addrs));
                        reported = true;
                    }
                }
                let mut l = log2.lock().unwrap();
                l.push_str(&line);
                l.push('\n');
            }
        });
        let addrs = match rx.recv_timeout(Duration::from_secs(20)) {
            Ok(a) => a,
            Err(_) => {
                let _ = child.kill();
                panic!("broker did not start; log:\n{}", log.lock().unwrap());
            }
        };
        let addr = addrs
            .get("mqtt")
            .or_else(|| addrs.values().next())
            .copied()
            .expect("a listener");
        BrokerProcess {
            child,
            addr,
            addrs,
            log,
            config_file,
            redis,
        }
    }

    /// The admin HTTP port.
    pub fn admin(&self) -> SocketAddr {
        self.addrs["admin"]
    }

    /// GET a path of the admin port: (status code, body).
    pub fn http_get(&self, path: &str) -> (u16, String) {
        http_get(self.admin(), path)
    }

    /// The value of one sample of `/metrics`, e.g.
    /// `metric("cirrus_publish_received_total{qos=\"1\"}")`.
    pub fn metric(&self, sample: &str) -> f64 {
        let (code, body) = self.http_get("/metrics");
        assert_eq!(code, 200);
        body.lines()
            .filter(|l| !l.starts_with('#'))
            .find_map(|l| {
                let (k, v) = l.rsplit_once(' ')?;
                (k == sample).then(|| v.parse().ok()).flatten()
            })
            .unwrap_or_else(|| panic!("no sample {sample} in /metrics:\n{body}"))
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    /// Send a signal by name (TERM, INT, KILL).
    pub fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(self.pid().to_string())
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "kill -{sig} failed");
    }

    /// Wait for the process to exit, at most `timeout`.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let end = Instant::now() + timeout;
        while Instant::now() < end {
            if let Ok(Some(s)) = self.child.try_wait() {
                return Some(s);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }

    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Resident memory of the broker process, in KiB.
    pub fn rss_kib(&self) -> u64 {
        let status =
            std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap_or_default();
        status
            .lines()
            .find(|l| l.starts_with("VmRSS:"))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    }
}

impl Drop for BrokerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if let Some(p) = &self.config_file {
            let _ = std::fs::remove_file(p);
        }
    }
}

/// A minimal HTTP/1.1 GET (the admin port), at most 5 s.
pub fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    try_http_get(addr, path).expect("connect to the admin port")
}

/// [`http_get`], `None` when nothing listens (yet).
pub fn try_http_get(addr: SocketAddr, path: &str) -> Option<(u16, String)> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(5)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut resp = String::new();
    let _ = s.read_to_string(&mut resp);
    let code = resp
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = resp
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Some((code, body))
}

/// A loopback port nothing listens on right now.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("bind 127.0.0.1:0")
}

/// Run a Python script (Debian's python3, which has paho) with arguments,
/// at most 30 s; fails the test with its output unless it exits 0.
pub async fn run_python(script: &str, args: &[&str]) -> String {
    let out = tokio::time::timeout(
        Duration::from_secs(30),
        tokio::process::Command::new(tool("python3"))
            .arg("-c")
            .arg(script)
            .args(args)
            .output(),
    )
    .await
    .expect("python script timed out")
    .expect("run python3");
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "python script failed: {stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

/// A child process killed (and reaped) when the guard goes, test failure or
/// not.
pub struct KillOnDrop(pub Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
