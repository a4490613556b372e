//! How a pod reaches Redis: one server or a Redis Cluster, pipelines split by hash slot.

use super::*;

/// How this pod reaches Redis: one server, or a Redis Cluster.
// One per process: its size does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Clone)]
pub(super) enum Client {
    Single(redis::Client),
    Cluster(redis::cluster::ClusterClient),
}

/// The shared, multiplexed connection for commands and pipelines.
#[derive(Clone)]
pub(super) enum Conn {
    Single(ConnectionManager),
    Cluster(ClusterConnection),
}

/// A connection of its own, for blocking stream reads.
pub(super) enum ReadConn {
    Single(MultiplexedConnection),
    Cluster(ClusterConnection),
}

impl ReadConn {
    pub(super) async fn run(&mut self, cmd: &Cmd) -> redis::RedisResult<Value> {
        match self {
            ReadConn::Single(c) => cmd.query_async(c).await,
            ReadConn::Cluster(c) => cmd.query_async(c).await,
        }
    }
}

/// The key a command works on: what Redis Cluster routes it by.
pub(super) fn cmd_key(c: &Cmd) -> Option<Vec<u8>> {
    let args: Vec<&[u8]> = c
        .args_iter()
        .filter_map(|a| match a {
            redis::Arg::Simple(b) => Some(b),
            _ => None,
        })
        .collect();
    let i = match args.first()?.to_ascii_uppercase().as_slice() {
        b"EVAL" | b"EVALSHA" => 3,
        b"XGROUP" | b"XINFO" => 2,
        _ => 1,
    };
    args.get(i).map(|k| k.to_vec())
}

/// The Redis Cluster slot of a key: CRC16 of its hash tag (the part
/// between the first `{` and the next `}`, when not empty), mod 16384.
pub(super) fn slot(key: &[u8]) -> u16 {
    let tagged = key
        .iter()
        .position(|&b| b == b'{')
        .and_then(|open| {
            let rest = &key[open + 1..];
            let close = rest.iter().position(|&b| b == b'}')?;
            (close > 0).then(|| &rest[..close])
        })
        .unwrap_or(key);
    crc16::State::<crc16::XMODEM>::calculate(tagged) % 16384
}

/// Connect to one Redis or to a Redis Cluster. A Redis that does not
/// answer yet (it starts beside the broker, as a managed Redis does) is
/// tried again until `wait` has passed; a bad URL or CA file fails at once.
pub(super) async fn connect(cfg: &RedisConfig, wait: Duration) -> anyhow::Result<(Client, Conn)> {
    let urls: Vec<&str> = cfg
        .url
        .split(',')
        .map(str::trim)
        .filter(|u| !u.is_empty())
        .collect();
    let certs = match &cfg.ca_file {
        Some(p) => Some(redis::TlsCertificates {
            client_tls: None,
            root_cert: Some(
                std::fs::read(p)
                    .map_err(|e| anyhow::anyhow!("cannot read {}: {e}", p.display()))?,
            ),
        }),
        None => None,
    };
    // Never echo the URL: it may hold a password.
    let bad = |e: redis::RedisError| anyhow::anyhow!("invalid Redis URL ({:?})", e.kind());
    if cfg.cluster || urls.len() > 1 {
        let mut b = redis::cluster::ClusterClient::builder(urls)
            .connection_timeout(Duration::from_secs(2))
            .response_timeout(Duration::from_secs(5))
            .retries(2);
        if let Some(c) = certs {
            b = b.certs(c);
        }
        let client = b.build().map_err(bad)?;
        let con = retry(wait, "the Redis Cluster", || async {
            client.get_async_connection().await.map_err(Failed::from)
        })
        .await?;
        return Ok((Client::Cluster(client), Conn::Cluster(con)));
    }
    let url = urls.first().copied().unwrap_or_default();
    let client = match certs {
        Some(c) => redis::Client::build_with_tls(url, c),
        None => redis::Client::open(url),
    }
    .map_err(bad)?;
    let mgr_cfg = ConnectionManagerConfig::new()
        .set_connection_timeout(Some(Duration::from_secs(2)))
        .set_response_timeout(Some(Duration::from_secs(5)))
        .set_number_of_retries(1)
        .set_max_delay(Duration::from_millis(500));
    let host = match client.get_connection_info().addr() {
        redis::ConnectionAddr::Tcp(host, port)
        | redis::ConnectionAddr::TcpTls { host, port, .. } => Some((host.clone(), *port)),
        _ => None,
    };
    let con = retry(wait, "Redis", || async {
        // A Service's name may resolve only a moment after it was made.
        if let Some((h, p)) = &host {
            if let Err(e) = tokio::net::lookup_host((h.as_str(), *p)).await {
                return Err(Failed {
                    msg: format!("its host name does not resolve ({e})"),
                    again: true,
                });
            }
        }
        client
            .get_connection_manager_with_config(mgr_cfg.clone())
            .await
            .map_err(Failed::from)
    })
    .await?;
    Ok((Client::Single(client), Conn::Single(con)))
}

/// Why a connection attempt failed, and whether waiting may help.
struct Failed {
    msg: String,
    again: bool,
}

impl From<redis::RedisError> for Failed {
    fn from(e: redis::RedisError) -> Failed {
        Failed {
            msg: e.to_string(),
            // Refused, silent, or a reply cut off or garbled while it
            // starts: not up yet. Anything else (a certificate not trusted,
            // a wrong password) will not change by waiting.
            again: e.is_connection_refusal()
                || e.is_timeout()
                || e.is_connection_dropped()
                || e.kind() == redis::ErrorKind::Parse,
        }
    }
}

/// `attempt` until it succeeds, each try bounded to 5 s, pausing 200 ms
/// doubling to 2 s between tries, while waiting may help and `wait` has
/// not passed.
async fn retry<T, F, Fut>(wait: Duration, what: &str, mut attempt: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, Failed>>,
{
    let end = tokio::time::Instant::now() + wait;
    let mut pause = Duration::from_millis(200);
    loop {
        let f = match tokio::time::timeout(Duration::from_secs(5), attempt()).await {
            Ok(Ok(v)) => return Ok(v),
            Ok(Err(f)) => f,
            Err(_) => Failed {
                msg: "no answer within 5 s".into(),
                again: true,
            },
        };
        if !f.again || tokio::time::Instant::now() + pause >= end {
            return Err(anyhow::anyhow!("cannot connect to {what}: {}", f.msg));
        }
        tracing::warn!(error = %f.msg, "{what} not reachable yet; trying again");
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_secs(2));
    }
}

/// `WAIT` after a pipeline: its reply says how many replicas hold what
/// the pipeline wrote.
fn wait_cmd(r: Replicated) -> Cmd {
    redis::cmd("WAIT")
        .arg(r.replicas)
        .arg(r.timeout.as_millis().max(1) as u64)
        .clone()
}

/// Whether the reply of a `WAIT` says enough replicas have the writes.
fn replicated_enough(v: Option<&Value>, r: Replicated) -> bool {
    matches!(v, Some(Value::Int(n)) if *n >= i64::from(r.replicas))
}

/// Run a pipeline on a Redis Cluster: one pipeline per slot, all at once,
/// with the replies put back in the original order. With `wait`, each ends
/// with a `WAIT` on its primary; the commands of one whose writes the
/// replicas did not confirm are listed in `unreplicated`.
pub(super) async fn query_sharded(
    con: &ClusterConnection,
    pipe: &redis::Pipeline,
    wait: Option<Replicated>,
) -> redis::RedisResult<Replies> {
    let mut groups: HashMap<u16, (Vec<usize>, redis::Pipeline)> = HashMap::new();
    let mut n = 0;
    for (i, c) in pipe.cmd_iter().enumerate() {
        n = i + 1;
        let s = cmd_key(c).map_or(0, |k| slot(&k));
        let g = groups.entry(s).or_insert_with(|| {
            let mut p = redis::pipe();
            p.ignore_errors();
            (Vec::new(), p)
        });
        g.0.push(i);
        g.1.add_command(c.clone());
    }
    let runs = groups.into_values().map(|(idx, mut p)| {
        let mut con = con.clone();
        if let Some(w) = wait {
            // Keyless: the pipeline goes where its other commands go.
            p.add_command(wait_cmd(w));
        }
        async move { (idx, p.query_async::<Vec<Value>>(&mut con).await) }
    });
    let mut out = Replies {
        values: vec![Value::Nil; n],
        unreplicated: Vec::new(),
        retried: Vec::new(),
    };
    for (idx, r) in futures_util::future::join_all(runs).await {
        let mut r = r?;
        if let Some(w) = wait {
            if !replicated_enough(r.get(idx.len()), w) {
                out.unreplicated.extend(&idx);
            }
            r.truncate(idx.len());
        }
        for (i, v) in idx.into_iter().zip(r) {
            if let Some(slot) = out.values.get_mut(i) {
                *slot = v;
            }
        }
    }
    Ok(out)
}

/// Run a pipeline on one Redis; with `wait`, it ends with a `WAIT`, and
/// when too few replicas confirmed, every command is listed in
/// `unreplicated`.
async fn query_single(
    con: &ConnectionManager,
    pipe: &redis::Pipeline,
    wait: Option<Replicated>,
) -> redis::RedisResult<Replies> {
    let n = pipe.len();
    let mut values = match wait {
        None => pipe.query_async::<Vec<Value>>(&mut con.clone()).await?,
        Some(w) => {
            let mut p = pipe.clone();
            p.add_command(wait_cmd(w));
            p.query_async::<Vec<Value>>(&mut con.clone()).await?
        }
    };
    let mut unreplicated = Vec::new();
    if let Some(w) = wait {
        if !replicated_enough(values.get(n), w) {
            unreplicated = (0..n).collect();
        }
        values.truncate(n);
    }
    Ok(Replies {
        values,
        unreplicated,
        retried: Vec::new(),
    })
}

/// The replies of a pipeline, in order, and (`redis.durability:
/// replicated`) the commands whose writes the replicas did not confirm.
pub(super) struct Replies {
    pub(super) values: Vec<Value>,
    pub(super) unreplicated: Vec<usize>,
    /// Scripts Redis did not have cached (NOSCRIPT), sent again as `EVAL`
    /// after the rest of the pipeline.
    pub(super) retried: Vec<usize>,
}

/// `EVALSHA` that Redis answered with NOSCRIPT, as `EVAL` of the script.
pub(super) fn as_eval(c: &Cmd) -> Option<Cmd> {
    let mut args = c.args_iter().filter_map(|a| match a {
        redis::Arg::Simple(b) => Some(b),
        _ => None,
    });
    if !args.next()?.eq_ignore_ascii_case(b"EVALSHA") {
        return None;
    }
    let script = script_of(args.next()?)?;
    let mut e = redis::cmd("EVAL");
    e.arg(script.body);
    for a in args {
        e.arg(a);
    }
    Some(e)
}

fn is_noscript(v: &Value) -> bool {
    matches!(v, Value::ServerError(e) if e.code() == "NOSCRIPT")
}

impl RedisStore {
    pub(super) async fn query(&self, pipe: &redis::Pipeline) -> Result<Vec<Value>, StoreError> {
        self.query_waiting(pipe, false).await.map(|r| r.values)
    }

    /// Run a pipeline; with `durable` and `redis.durability: replicated`,
    /// also wait until the replicas hold its writes.
    pub(super) async fn query_waiting(
        &self,
        pipe: &redis::Pipeline,
        durable: bool,
    ) -> Result<Replies, StoreError> {
        let t0 = Instant::now();
        let wait = self.replicated.filter(|_| durable);
        let r = self.run_pipe(pipe, wait).await;
        self.redis_commands
            .fetch_add(pipe.len() as u64, Ordering::Relaxed);
        self.roundtrip.observe(t0.elapsed());
        let r = match r {
            Ok(r) if r.values.iter().any(is_noscript) => self.retry_scripts(pipe, r, wait).await,
            other => other,
        };
        match r {
            Ok(r) => {
                if !r.unreplicated.is_empty() {
                    self.unreplicated_logged(r.unreplicated.len());
                }
                Ok(r)
            }
            Err(e) => {
                self.failed("command", &e);
                Err(e.into())
            }
        }
    }

    /// Send the scripts Redis did not know again, as `EVAL` (which also
    /// caches them), and put their replies in place.
    async fn retry_scripts(
        &self,
        pipe: &redis::Pipeline,
        mut r: Replies,
        wait: Option<Replicated>,
    ) -> redis::RedisResult<Replies> {
        let mut again = redis::pipe();
        again.ignore_errors();
        let mut at = Vec::new();
        for (i, c) in pipe.cmd_iter().enumerate() {
            if r.values.get(i).is_some_and(is_noscript) {
                if let Some(e) = as_eval(c) {
                    again.add_command(e);
                    at.push(i);
                }
            }
        }
        let second = self.run_pipe(&again, wait).await?;
        for (v, &i) in second.values.into_iter().zip(&at) {
            if let Some(slot) = r.values.get_mut(i) {
                *slot = v;
            }
        }
        r.unreplicated.extend(
            second
                .unreplicated
                .iter()
                .filter_map(|&k| at.get(k).copied()),
        );
        r.retried = at;
        Ok(r)
    }

    /// One pipeline, on one Redis or split by slot on a Redis Cluster.
    async fn run_pipe(
        &self,
        pipe: &redis::Pipeline,
        wait: Option<Replicated>,
    ) -> redis::RedisResult<Replies> {
        match &self.cmd {
            Conn::Single(c) => query_single(c, pipe, wait).await,
            Conn::Cluster(c) => query_sharded(c, pipe, wait).await,
        }
    }

    pub(super) async fn query_cmds(&self, cmds: Vec<Cmd>) -> Result<Vec<Value>, StoreError> {
        let mut pipe = redis::pipe();
        // Server errors come back as values; only a lost connection fails.
        pipe.ignore_errors();
        for c in cmds {
            pipe.add_command(c);
        }
        self.query(&pipe).await
    }

    pub(super) async fn blocking_conn(&self) -> Option<ReadConn> {
        match &self.client {
            Client::Single(c) => {
                let cfg = AsyncConnectionConfig::new()
                    .set_connection_timeout(Some(Duration::from_secs(2)))
                    .set_response_timeout(Some(Duration::from_secs(5)));
                c.get_multiplexed_async_connection_with_config(&cfg)
                    .await
                    .ok()
                    .map(ReadConn::Single)
            }
            Client::Cluster(c) => c.get_async_connection().await.ok().map(ReadConn::Cluster),
        }
    }
}
