//! Real `redis-server` processes on free loopback ports, for the broker's
//! Redis store: one server, or a Redis Cluster of several masters.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::process::tool;

/// Whether the e2e suite runs against the Redis store
/// (`CIRRUS_TEST_STORE=redis`) instead of the memory store.
pub fn redis_store_wanted() -> bool {
    std::env::var("CIRRUS_TEST_STORE").is_ok_and(|v| v == "redis")
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
}

/// Send one inline command and read the reply (enough for PING/CLUSTER INFO).
pub fn command(port: u16, cmd: &str) -> Option<String> {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_millis(300)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    s.write_all(format!("{cmd}\r\n").as_bytes()).ok()?;
    let mut buf = vec![0u8; 64 * 1024];
    let n = s.read(&mut buf).ok()?;
    Some(String::from_utf8_lossy(&buf[..n]).to_string())
}

/// A `redis-server` without persistence. Killed on drop.
pub struct RedisServer {
    child: Option<Child>,
    pub port: u16,
    dir: PathBuf,
    extra: Vec<String>,
    tls: bool,
}

impl RedisServer {
    pub fn start() -> RedisServer {
        Self::start_with(&[])
    }

    /// A server that speaks TLS only, with this certificate and key.
    pub fn start_tls(cert: &str, key: &str) -> RedisServer {
        Self::start_inner(
            &[
                "--tls-cert-file",
                cert,
                "--tls-key-file",
                key,
                "--tls-auth-clients",
                "no",
            ],
            true,
        )
    }

    pub fn start_with(extra: &[&str]) -> RedisServer {
        Self::start_inner(extra, false)
    }

    fn start_inner(extra: &[&str], tls: bool) -> RedisServer {
        let port = free_port();
        let dir = std::env::temp_dir().join(format!("cirrus-redis-{}-{port}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("redis dir");
        let mut r = RedisServer {
            child: None,
            port,
            dir,
            extra: extra.iter().map(|s| s.to_string()).collect(),
            tls,
        };
        r.spawn();
        r
    }

    fn spawn(&mut self) {
        let port = self.port.to_string();
        let ports: [&str; 4] = if self.tls {
            ["--port", "0", "--tls-port", &port]
        } else {
            ["--port", &port, "--tls-port", "0"]
        };
        let child = Command::new(tool("redis-server"))
            .args(ports)
            .args(["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(&self.dir)
            .args(&self.extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start redis-server (apt-get install redis-server)");
        self.child = Some(child);
        let end = Instant::now() + Duration::from_secs(10);
        while Instant::now() < end {
            let up = if self.tls {
                TcpStream::connect(("127.0.0.1", self.port)).is_ok()
            } else {
                command(self.port, "PING").is_some_and(|r| r.starts_with("+PONG"))
            };
            if up {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("redis-server on port {} did not answer", self.port);
    }

    pub fn url(&self) -> String {
        if self.tls {
            format!("rediss://localhost:{}", self.port)
        } else {
            format!("redis://127.0.0.1:{}", self.port)
        }
    }

    /// Send a signal by name (STOP, CONT, KILL) to the server.
    pub fn signal(&self, sig: &str) {
        let Some(c) = &self.child else { return };
        let ok = Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(c.id().to_string())
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "kill -{sig} redis-server failed");
    }

    /// Kill the server (its data is lost: no persistence).
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Start it again on the same port, empty.
    pub fn restart(&mut self) {
        self.stop();
        self.spawn();
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A Redis Cluster on free loopback ports: `n` masters, and with
/// [`RedisCluster::start_replicated`] one replica each.
pub struct RedisCluster {
    pub nodes: Vec<RedisServer>,
}

impl RedisCluster {
    /// `n` masters, no replicas.
    pub fn start(n: usize) -> RedisCluster {
        Self::start_inner(n, 0)
    }

    /// `n` masters with one replica each (`2 * n` servers); a replica takes
    /// over when its master has been unreachable for 2 s.
    pub fn start_replicated(n: usize) -> RedisCluster {
        let c = Self::start_inner(n * 2, 1);
        // Every replica has caught up with its master (the first sync).
        let end = Instant::now() + Duration::from_secs(30);
        for s in &c.nodes {
            loop {
                let info = command(s.port, "INFO replication").unwrap_or_default();
                let synced = info.contains("role:master") || info.contains("master_link_status:up");
                if synced {
                    break;
                }
                assert!(Instant::now() < end, "replica never synced: {info}");
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        c
    }

    fn start_inner(n: usize, replicas: usize) -> RedisCluster {
        let nodes: Vec<RedisServer> = (0..n)
            .map(|_| {
                RedisServer::start_with(&[
                    "--cluster-enabled",
                    "yes",
                    "--cluster-config-file",
                    "nodes.conf",
                    "--cluster-node-timeout",
                    "2000",
                ])
            })
            .collect();
        let addrs: Vec<String> = nodes
            .iter()
            .map(|s| format!("127.0.0.1:{}", s.port))
            .collect();
        let out = Command::new(tool("redis-cli"))
            .arg("--cluster")
            .arg("create")
            .args(&addrs)
            .args(["--cluster-replicas", &replicas.to_string(), "--cluster-yes"])
            .stdin(Stdio::null())
            .output()
            .expect("run redis-cli --cluster create");
        assert!(
            out.status.success(),
            "cluster create failed: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        let end = Instant::now() + Duration::from_secs(30);
        for s in &nodes {
            loop {
                let info = command(s.port, "CLUSTER INFO").unwrap_or_default();
                if info.contains("cluster_state:ok") {
                    break;
                }
                assert!(Instant::now() < end, "cluster never became ok: {info}");
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        RedisCluster { nodes }
    }

    /// The master serving `key` and its replica: indexes into `nodes`.
    pub fn master_and_replica_of(&self, key: &str) -> (usize, usize) {
        let slot: u16 = command(self.nodes[0].port, &format!("CLUSTER KEYSLOT {key}"))
            .and_then(|r| r.trim().trim_start_matches(':').parse().ok())
            .expect("CLUSTER KEYSLOT");
        let nodes = command(self.nodes[0].port, "CLUSTER NODES").expect("CLUSTER NODES");
        // Lines: id addr@bus flags master-id ping pong epoch state slots...
        let rows: Vec<Vec<&str>> = nodes
            .lines()
            .map(|l| {
                l.trim_start_matches('$')
                    .split_whitespace()
                    .collect::<Vec<_>>()
            })
            .filter(|f| f.len() >= 8)
            .collect();
        let serves = |f: &[&str]| {
            f[8..].iter().any(|r| match r.split_once('-') {
                Some((a, b)) => {
                    a.parse::<u16>().is_ok_and(|a| a <= slot)
                        && b.parse::<u16>().is_ok_and(|b| slot <= b)
                }
                None => r.parse::<u16>().is_ok_and(|s| s == slot),
            })
        };
        let master = rows
            .iter()
            .find(|f| f[2].contains("master") && serves(f))
            .expect("a master serves the slot");
        let replica = rows
            .iter()
            .find(|f| f[2].contains("slave") && f[3] == master[0])
            .expect("the master has a replica");
        let index = |f: &[&str]| {
            let port: u16 = f[1]
                .split('@')
                .next()
                .and_then(|a| a.rsplit(':').next())
                .and_then(|p| p.parse().ok())
                .expect("a node address");
            self.nodes
                .iter()
                .position(|n| n.port == port)
                .expect("a node of this cluster")
        };
        (index(master), index(replica))
    }

    /// Seed URLs of every node, comma-separated (what `--redis` takes).
    pub fn url(&self) -> String {
        self.nodes
            .iter()
            .map(RedisServer::url)
            .collect::<Vec<_>>()
            .join(",")
    }
}
