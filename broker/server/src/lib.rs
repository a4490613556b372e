//! # cirrus-broker
//!
//! The broker as a library; `main.rs` only parses flags and waits for a
//! signal. [`run`] takes its shutdown token, so tests and embedders stop it
//! the same way SIGTERM does.
//!
//! ## Layout
//! - [`config`]: the YAML file (from `cirrus-config`), defaults for every field.
//! - [`listener`]: accept loops, connection cap.
//! - [`connection`]: one task per client, the protocol state machine.
//! - [`auth`]: the auth file: logins (argon2), ACLs, reloads.
//! - [`broker`]: shared state and the operations a connection performs —
//!   the boundary behind which a store lives.
//! - [`session`]: what outlives a connection, each behind its own lock.
//! - [`router`]: subscriptions in a persistent trie, read without locks.
//! - [`retained`]: retained messages in a trie.
//! - [`message`]: a message shared by `Arc` with every subscriber.
//! - [`stats`]: counters, for `$SYS` and metrics; rate limits.
//! - [`tls`]: the TLS listener's certificates, reloaded when they change.
//! - [`websocket`]: MQTT over WebSocket as a byte stream.

pub mod admin;
pub mod auth;
pub mod broker;
/// The configuration file format, defined in `cirrus-config` (shared with the operator).
pub use cirrus_config::broker as config;
pub mod connection;
pub mod listener;
pub mod local;
pub mod message;
pub mod retained;
pub mod rollout;
pub mod router;
pub mod session;
pub mod stats;
pub mod store;
pub mod tls;
pub mod trace;
pub mod websocket;

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

pub use broker::Broker;
pub use config::Config;

/// A broker whose listeners are bound; [`Bound::serve`] runs it.
pub struct Bound {
    pub broker: Arc<Broker>,
    pub listeners: Vec<BoundListener>,
    /// The certificates shared by the TLS and secure WebSocket listeners.
    tls: Option<Arc<tls::TlsState>>,
    /// Stops the Redis store's tasks and the admin port once connections
    /// have drained.
    store_stop: CancellationToken,
    /// The admin HTTP port.
    pub admin: Option<(TcpListener, SocketAddr)>,
}

pub struct BoundListener {
    /// `mqtt`, `mqtts`, `ws` or `wss`, as logged.
    pub name: &'static str,
    pub addr: SocketAddr,
    listener: TcpListener,
    kind: listener::Kind,
}

impl Bound {
    /// The address of the listener called `name`.
    pub fn addr(&self, name: &str) -> Option<SocketAddr> {
        self.listeners
            .iter()
            .find(|l| l.name == name)
            .map(|l| l.addr)
    }
}

/// Connections the kernel completes before the broker accepts them (capped
/// by `net.core.somaxconn`). When a pod restarts, its clients reconnect at
/// once: with the usual 128, a burst of a few hundred overflows the queue
/// and every dropped handshake waits a second for the client's retry.
const LISTEN_BACKLOG: u32 = 4096;

fn listen(addr: SocketAddr) -> anyhow::Result<(TcpListener, SocketAddr)> {
    let bind = || -> std::io::Result<TcpListener> {
        let socket = if addr.is_ipv4() {
            tokio::net::TcpSocket::new_v4()?
        } else {
            tokio::net::TcpSocket::new_v6()?
        };
        socket.set_reuseaddr(true)?;
        socket.bind(addr)?;
        socket.listen(LISTEN_BACKLOG)
    };
    let l = bind().map_err(|e| anyhow::anyhow!("cannot listen on {addr}: {e}"))?;
    let local = l.local_addr()?;
    Ok((l, local))
}

/// Validate the configuration and bind every listener.
pub async fn bind(config: Config) -> anyhow::Result<Bound> {
    config.validate()?;
    let auth = auth::Auth::new(
        config.auth_file.clone(),
        config.limits.max_failed_logins_per_minute,
    )?;
    let redis = config.redis.clone();
    let local = local::Local::new(Arc::new(config), redis.url.is_some());
    let store_stop = CancellationToken::new();
    let store = match redis.url {
        None => store::Store::Memory,
        Some(url) => {
            let cfg = store::redis::RedisConfig {
                url,
                cluster: redis.cluster,
                ca_file: redis.ca_file.clone(),
                node_timeout: Duration::from_millis(redis.node_timeout_ms),
                node_id: node_id(),
                replicated: (redis.durability == cirrus_config::broker::Durability::Replicated)
                    .then(|| store::redis::Replicated {
                        replicas: redis.replicas,
                        timeout: Duration::from_millis(redis.wait_timeout_ms),
                    }),
                inbox_max: redis.inbox_max_entries,
            };
            let c = store::redis::RedisStore::start(cfg, local.clone(), store_stop.clone()).await?;
            info!(node = %c.node, "state in Redis");
            store::Store::Redis(c)
        }
    };
    let broker = Broker::new(local, auth, store);
    let ls = broker.config.listeners.clone();
    // One certificate state for TLS and secure WebSocket.
    let tls_state = match ls.tls.is_some() || ls.wss.is_some() {
        true => Some(Arc::new(tls::TlsState::new(&broker.config.tls)?)),
        false => None,
    };
    let mut listeners = Vec::new();
    let wanted = [
        ("mqtt", ls.tcp, Some(listener::Kind::Tcp)),
        ("mqtts", ls.tls, tls_state.clone().map(listener::Kind::Tls)),
        ("ws", ls.ws, Some(listener::Kind::Ws)),
        ("wss", ls.wss, tls_state.clone().map(listener::Kind::Wss)),
    ];
    let admin = match ls.admin {
        Some(a) => Some(listen(a)?),
        None => None,
    };
    for (name, addr, kind) in wanted {
        if let (Some(addr), Some(kind)) = (addr, kind) {
            let (listener, addr) = listen(addr)?;
            listeners.push(BoundListener {
                name,
                addr,
                listener,
                kind,
            });
        }
    }
    Ok(Bound {
        broker,
        listeners,
        tls: tls_state,
        store_stop,
        admin,
    })
}

/// A pod's id: its host name (the pod name on Kubernetes) and a random
/// suffix, so a restarted process is a new node.
fn node_id() -> String {
    let host = std::env::var("HOSTNAME")
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "cirrus".to_string());
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    format!("{host}-{:x}{:x}", std::process::id(), nanos)
}

impl Bound {
    /// Serve until `shutdown` is cancelled, then drain: listeners stop,
    /// MQTT 5 clients get DISCONNECT 0x8B, and every task ends within the
    /// configured shutdown timeout.
    pub async fn serve(self, stop: CancellationToken) {
        // On stop, /readyz turns 503 at once; the listeners keep serving
        // for `shutdown_delay_secs` (so that load balancers stop sending
        // clients here), then the drain begins.
        let draining = CancellationToken::new();
        let shutdown = CancellationToken::new();
        let delay = Duration::from_secs(self.broker.config.shutdown_delay_secs);
        {
            let (draining, shutdown) = (draining.clone(), shutdown.clone());
            let broker = self.broker.clone();
            tokio::spawn(async move {
                stop.cancelled().await;
                draining.cancel();
                // Pods told to stop together (a scale-down) count each
                // other before any of them drains: they share the rate.
                if let store::Store::Redis(r) = &broker.store {
                    if let Err(e) = r.draining_pods().await {
                        warn!(error = %e, "drain: could not count the draining pods");
                    }
                }
                if !delay.is_zero() {
                    info!(?delay, "not ready any more; draining after the delay");
                    tokio::time::sleep(delay).await;
                }
                shutdown.cancel();
            });
        }
        let broker = self.broker;
        let tracker = TaskTracker::new();
        // One connection cap for all listeners.
        let permits = Arc::new(tokio::sync::Semaphore::new(
            broker.config.limits.max_connections,
        ));
        for l in self.listeners {
            info!(kind = l.name, addr = %l.addr, "listening");
            let serve = listener::serve_listener(
                broker.clone(),
                l.listener,
                l.kind,
                permits.clone(),
                shutdown.clone(),
                tracker.clone(),
            );
            tracker.spawn(serve);
        }
        if let Some((l, addr)) = self.admin {
            info!(kind = "admin", %addr, "listening");
            tokio::spawn(admin::serve_admin(
                broker.clone(),
                l,
                draining.clone(),
                self.store_stop.clone(),
            ));
        }
        if let Some(state) = self.tls {
            tracker.spawn(run_tls_reload(state, shutdown.clone()));
        }
        info!("accepting connections");
        tracker.spawn(run_timers(broker.clone(), shutdown.clone()));
        if broker.config.sys_interval_secs > 0 {
            tracker.spawn(run_sys(broker.clone(), shutdown.clone()));
        }
        if broker.auth.enabled() {
            tracker.spawn(run_auth_reload(broker.clone(), shutdown.clone()));
        }
        if let (Some(rev), store::Store::Redis(r)) = (&broker.config.revision, &broker.store) {
            // Known to the others from now on (the rebalance and the drain
            // write it again as they read).
            if let Err(e) = r.revisions(rev).await {
                warn!(error = %e, "could not write this pod's revision");
            }
        }
        if let (true, store::Store::Redis(r)) = (broker.config.rebalance.enabled, &broker.store) {
            tracker.spawn(run_rebalance(broker.clone(), r.clone(), shutdown.clone()));
        }
        shutdown.cancelled().await;
        info!("shutting down");
        let deadline = broker.config.shutdown_timeout();
        drain(&broker, deadline).await;
        // Connections attached before this see the signal; later ones see
        // the cancelled token when they start serving.
        broker.signal_all(session::Signal::shutdown);
        tracker.close();
        if tokio::time::timeout(deadline, tracker.wait())
            .await
            .is_err()
        {
            warn!(
                ?deadline,
                "shutdown deadline passed with connections still open"
            );
        } else {
            info!("shut down cleanly");
        }
        // The store's writer lands what connections left (releases,
        // acknowledgements) and the pod leaves the cluster; waited for.
        broker.store.stop(Duration::from_secs(10)).await;
        self.store_stop.cancel();
    }
}

/// Send the attached clients away at `drain.connections_per_sec`, shared
/// with the pods draining at the same time (on the Redis store), so that
/// the pods that stay see at most that many reconnects a second; faster if
/// they would not all go 2 s before `deadline` (what is left then goes at
/// once, with the rest).
async fn drain(broker: &Broker, deadline: Duration) {
    let total = broker.config.drain.connections_per_sec;
    let redis = match &broker.store {
        store::Store::Redis(r) => Some(r.clone()),
        _ => None,
    };
    if total == 0 {
        if let Some(r) = &redis {
            let _ = r.done_draining().await;
        }
        return;
    }
    let end = Instant::now() + deadline.saturating_sub(Duration::from_secs(2));
    if let (Some(r), Some(rev)) = (&redis, &broker.config.revision) {
        let settle = Duration::from_secs(broker.config.shutdown_delay_secs);
        wait_for_old_siblings(r, rev, deadline, settle).await;
    }
    let signals = broker.attached_signals();
    info!(clients = signals.len(), per_sec = total, "draining");
    let mut sent = 0;
    let mut hurried = false;
    // A second at a time: how many pods share the rate may change.
    while sent < signals.len() && Instant::now() < end {
        let second = Instant::now();
        let sharing = match &redis {
            Some(r) => r.draining_pods().await.unwrap_or(1),
            None => 1,
        };
        let share = (total / u32::try_from(sharing).unwrap_or(u32::MAX)).max(1);
        // More clients than fit in the time left at this rate: faster, so
        // that all are told to go (rather than dropped at the deadline).
        let left = signals.len() - sent;
        let secs_left = end.saturating_duration_since(second).as_secs_f64().max(1.0);
        let fits = (left as f64 / secs_left).ceil() as u32;
        if fits > share && !hurried {
            hurried = true;
            warn!(
                clients = left,
                share,
                per_sec = fits,
                "drain: more clients than the rate sends away in time; going faster"
            );
        }
        let rate = share.max(fits);
        let batch = (rate as usize).min(left);
        let n = send_away_paced(
            &signals[sent..sent + batch],
            rate,
            end,
            &CancellationToken::new(),
            &broker.stats.drained,
        )
        .await;
        sent += n;
        if n < batch {
            break;
        }
        if sent < signals.len() {
            tokio::time::sleep_until((second + Duration::from_secs(1)).into()).await;
        }
    }
    if let Some(r) = &redis {
        if let Err(e) = r.done_draining().await {
            warn!(error = %e, "drain: could not leave the draining pods");
        }
    }
    if sent < signals.len() {
        // Still told to use another server (not shut down on): their
        // sessions go on elsewhere like the others'.
        let left = &signals[sent..];
        warn!(left = left.len(), "drain: out of time, the rest go at once");
        for s in left {
            s.move_away();
        }
        broker
            .stats
            .drained
            .fetch_add(left.len() as u64, Ordering::Relaxed);
    }
}

/// In a rollout, an old pod that drains waits for the other old pods that
/// still serve to drain too, and to be out of the Service (draining for
/// `shutdown_delay_secs`, as this pod waited itself), at most a quarter of
/// the drain's time and 15 s: then the clients it sends away reach new pods
/// only.
async fn wait_for_old_siblings(
    redis: &store::redis::RedisStore,
    revision: &str,
    deadline: Duration,
    settle: Duration,
) {
    let until = Instant::now() + (deadline / 4).min(Duration::from_secs(15));
    let settle_ms = settle.as_millis() as u64;
    let mut logged = false;
    loop {
        let serving = match redis.revisions(revision).await {
            Ok(pods) => rollout::old_siblings_serving(&pods, settle_ms),
            Err(_) => 0,
        };
        if serving == 0 {
            return;
        }
        if Instant::now() >= until {
            info!(serving, "drain: old pods still serving; draining anyway");
            return;
        }
        if !logged {
            logged = true;
            info!(
                serving,
                "drain: a rollout is under way; waiting for the other old pods to drain too"
            );
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Send the clients of `signals` away (DISCONNECT with `drain.reason`),
/// `per_sec` a second in ten steps a second (one client per step when
/// slower), until `end` or `stop`; each counted in `counter`. How many went.
async fn send_away_paced(
    signals: &[Arc<session::Signal>],
    per_sec: u32,
    end: Instant,
    stop: &CancellationToken,
    counter: &std::sync::atomic::AtomicU64,
) -> usize {
    let step = Duration::from_secs_f64((1.0 / f64::from(per_sec.max(1))).max(0.1));
    let per_step = (f64::from(per_sec) * step.as_secs_f64()).round().max(1.0) as usize;
    let mut tick = tokio::time::interval(step);
    let mut sent = 0;
    for chunk in signals.chunks(per_step) {
        tokio::select! {
            _ = stop.cancelled() => break,
            _ = tick.tick() => {}
        }
        if Instant::now() >= end {
            break;
        }
        for s in chunk {
            s.move_away();
        }
        sent += chunk.len();
        counter.fetch_add(chunk.len() as u64, Ordering::Relaxed);
    }
    sent
}

/// Redis store: every `rebalance.interval_secs`, compare this pod's
/// connections with the mean of the live pods and send the excess away.
async fn run_rebalance(
    broker: Arc<Broker>,
    redis: Arc<store::redis::RedisStore>,
    shutdown: CancellationToken,
) {
    let cfg = broker.config.rebalance.clone();
    let every = Duration::from_secs(cfg.interval_secs);
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // After a move, the counts in Redis are stale until every pod has
    // written its own again: this pod waits a round before it looks.
    let mut quiet = 0u32;
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = tick.tick() => {}
        }
        if quiet > 0 {
            quiet -= 1;
            let mine = broker.stats.connections_current.load(Ordering::Relaxed);
            let _ = redis.pod_loads(mine).await;
            continue;
        }
        let mine = broker.stats.connections_current.load(Ordering::Relaxed);
        let Ok((loads, draining)) = redis.pod_loads(mine).await else {
            continue;
        };
        // While a pod drains (a scale-down, a rollout) its clients are
        // arriving at the drain's rate: moving others at the same time
        // would add to it, and move clients that may have to move again.
        if draining > 0 {
            continue;
        }
        // Nor during a rollout: the new pods get their share from the old
        // ones as those drain.
        if let Some(rev) = &broker.config.revision {
            match redis.revisions(rev).await {
                Ok(pods) if !rollout::in_progress(&pods) => {}
                _ => continue,
            }
        }
        let Some(excess) = rebalance_excess(mine as u64, &loads, cfg.threshold_percent) else {
            continue;
        };
        // The excess over the mean, at most what the rate allows before
        // the next look. Every pod above the mean sends only its own
        // excess, which the pods below it can take: the moved clients
        // spread over all pods (this one too, through the Service), so the
        // count approaches the mean from above and settles inside the
        // threshold. The longest-connected go first: a client that came
        // back here is the last to be moved again.
        let budget = u64::from(cfg.connections_per_sec) * cfg.interval_secs;
        let settled = broker.settled_signals(Duration::from_secs(cfg.min_connection_age_secs));
        let n = (excess.min(budget) as usize).min(settled.len());
        if n == 0 {
            continue;
        }
        quiet = 1;
        info!(
            connections = mine,
            pods = loads.len(),
            moving = n,
            "rebalancing: more than the pods' mean"
        );
        send_away_paced(
            &settled[..n],
            cfg.connections_per_sec,
            Instant::now() + every * 2,
            &shutdown,
            &broker.stats.rebalanced,
        )
        .await;
    }
    // Draining: the count this pod wrote last would make the pods that stay
    // look above the mean (and send clients away to nowhere better) until
    // its heartbeat stops.
    if let Err(e) = redis.leave_loads().await {
        warn!(error = %e, "rebalance: could not take this pod's count out");
    }
}

/// How many clients a pod holding `mine` should send away, given the
/// counts of all live pods (its own among them): when some pod is more than
/// `threshold_percent` away from the mean (above it, or below it: a pod
/// that new clients avoid pulls nothing by itself), each pod above the mean
/// sends its excess over it (when at least 2).
fn rebalance_excess(mine: u64, loads: &[u64], threshold_percent: u32) -> Option<u64> {
    if loads.len() < 2 {
        return None;
    }
    let mean = loads.iter().sum::<u64>() as f64 / loads.len() as f64;
    let band = mean * f64::from(threshold_percent) / 100.0;
    let out_of_band = loads.iter().any(|&l| (l as f64 - mean).abs() > band);
    let excess = mine.saturating_sub(mean.ceil() as u64);
    (out_of_band && excess >= 2).then_some(excess)
}

/// Bind and serve: the whole broker.
pub async fn run(config: Config, shutdown: CancellationToken) -> anyhow::Result<()> {
    bind(config).await?.serve(shutdown).await;
    Ok(())
}

async fn run_timers(broker: Arc<Broker>, shutdown: CancellationToken) {
    loop {
        let next = broker.run_timers(Instant::now());
        // Wake at least every second: timers added meanwhile may be sooner.
        let wait = next.map_or(Duration::from_secs(1), |t| {
            t.saturating_duration_since(Instant::now())
                .min(Duration::from_secs(1))
        });
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(wait.max(Duration::from_millis(10))) => {}
        }
    }
}

/// Kubernetes updates a mounted Secret by swapping a symlink, which file
/// watchers see unreliably; polling the content every second is simple and
/// sure.
async fn run_auth_reload(broker: Arc<Broker>, shutdown: CancellationToken) {
    let mut every = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = every.tick() => {
                let b = broker.clone();
                let changed = tokio::task::spawn_blocking(move || b.auth.reload_if_changed()).await;
                if matches!(changed, Ok(true)) {
                    broker.signal_all(session::Signal::auth_changed);
                }
            }
        }
    }
}

async fn run_tls_reload(state: Arc<tls::TlsState>, shutdown: CancellationToken) {
    let mut every = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = every.tick() => {
                let s = state.clone();
                let _ = tokio::task::spawn_blocking(move || s.reload_if_changed()).await;
            }
        }
    }
}

async fn run_sys(broker: Arc<Broker>, shutdown: CancellationToken) {
    let mut every = tokio::time::interval(Duration::from_secs(broker.config.sys_interval_secs));
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = every.tick() => broker.publish_sys(),
        }
    }
}

#[cfg(test)]
mod rebalance_tests {
    use super::rebalance_excess;

    #[test]
    fn pods_above_the_mean_send_their_excess_when_one_is_out_of_band() {
        // 60 here, a new pod with none: 30 go.
        assert_eq!(rebalance_excess(60, &[60, 0], 20), Some(30));
        // Within 20 % of the mean: nothing moves (no bouncing).
        assert_eq!(rebalance_excess(34, &[34, 30, 26], 20), None);
        assert_eq!(rebalance_excess(26, &[34, 30, 26], 20), None);
        // Alone: nobody to give to.
        assert_eq!(rebalance_excess(100, &[100], 20), None);
        // A rounding excess of one is not worth a reconnect.
        assert_eq!(rebalance_excess(3, &[3, 1, 1], 20), None);
        assert_eq!(rebalance_excess(90, &[90, 30, 30], 20), Some(40));
        // One pod far below the mean, none far above: those above send.
        let loads = [1144, 1079, 778];
        assert_eq!(rebalance_excess(1144, &loads, 20), Some(143));
        assert_eq!(rebalance_excess(1079, &loads, 20), Some(78));
        assert_eq!(rebalance_excess(778, &loads, 20), None);
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    /// A reconnect storm: far more handshakes than the usual backlog of 128
    /// complete while the broker is not accepting. With a short backlog
    /// the kernel drops the handshakes past it and each client waits a
    /// second to retry.
    #[tokio::test]
    async fn a_burst_of_connects_is_not_dropped_by_the_listen_queue() {
        let (listener, addr) = super::listen("127.0.0.1:0".parse().unwrap()).unwrap();
        let connects: Vec<_> = (0..600)
            .map(|_| {
                tokio::spawn(tokio::time::timeout(
                    Duration::from_millis(700),
                    tokio::net::TcpStream::connect(addr),
                ))
            })
            .collect();
        let mut done = 0;
        let mut held = Vec::new();
        for c in connects {
            if let Ok(Ok(Ok(s))) = c.await {
                done += 1;
                held.push(s);
            }
        }
        assert_eq!(done, 600, "handshakes dropped by the listen queue");
        drop(listener);
    }
}
