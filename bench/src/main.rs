//! `cirrus-bench`: a load generator for any MQTT broker.
//!
//! Scenarios (`--scenario`):
//! - `fan-in`: P publishers → 1 subscriber on a wildcard filter;
//! - `fan-out`: 1 publisher → S subscribers of one topic;
//! - `pairs`: N publisher/subscriber pairs on distinct topics;
//! - `shared`: P publishers → S members of one shared subscription group;
//! - `connections`: C idle connections; connect rate and the broker's
//!   memory per connection (`--broker-pid`).
//!
//! Every run is bounded by `--messages` (per publisher) and `--duration`.
//! Each payload starts with its send time, so the subscriber measures the
//! end-to-end latency. The result is one JSON line on stdout.

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use bytes::{BufMut, Bytes, BytesMut};
use cirrus_codec::{
    ByteString, Connect, MqttCodec, Packet, PacketId, Properties, Protocol, PubResp, Publish, QoS,
    Subscribe, SubscriptionOptions,
};
use clap::{Parser, ValueEnum};
use futures_util::{FutureExt, SinkExt, StreamExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio_util::codec::Framed;

#[derive(Debug, Clone, Copy, ValueEnum, PartialEq, Eq)]
enum Scenario {
    FanIn,
    FanOut,
    Pairs,
    Shared,
    Connections,
}

#[derive(Debug, Clone, Copy, ValueEnum, PartialEq, Eq)]
enum Version {
    #[value(name = "3.1.1")]
    V311,
    #[value(name = "5")]
    V5,
}

#[derive(Debug, Parser, Clone)]
#[command(version, about = "Load generator for MQTT brokers")]
struct Args {
    #[arg(long, value_enum, default_value = "fan-in")]
    scenario: Scenario,
    /// Broker the publishers connect to.
    #[arg(long, default_value = "127.0.0.1:1883")]
    broker: SocketAddr,
    /// Broker the subscribers connect to (another pod); default: --broker.
    #[arg(long)]
    sub_broker: Option<SocketAddr>,
    #[arg(long, default_value_t = 10)]
    publishers: usize,
    #[arg(long, default_value_t = 10)]
    subscribers: usize,
    /// Messages per publisher.
    #[arg(long, default_value_t = 50_000)]
    messages: u64,
    #[arg(long, default_value_t = 0)]
    qos: u8,
    /// Payload bytes (at least 8: the send time).
    #[arg(long, default_value_t = 64)]
    payload: usize,
    /// Messages per second per publisher; 0 for as fast as possible.
    #[arg(long, default_value_t = 0)]
    rate: u64,
    #[arg(long, value_enum, default_value = "3.1.1")]
    protocol: Version,
    /// QoS 1/2 messages a publisher keeps unacknowledged.
    #[arg(long, default_value_t = 100)]
    window: usize,
    /// Upper bound of the whole run, in seconds.
    #[arg(long, default_value_t = 60)]
    duration: u64,
    /// Idle connections (connections scenario).
    #[arg(long, default_value_t = 10_000)]
    connections: usize,
    /// Connections opened at once (connections scenario).
    #[arg(long, default_value_t = 256)]
    concurrency: usize,
    /// Local addresses 127.0.0.1..=127.0.0.N to connect from, so more
    /// connections than one address has ephemeral ports.
    #[arg(long, default_value_t = 1)]
    source_ips: u8,
    /// The broker's process id, to report its memory per connection.
    #[arg(long)]
    broker_pid: Option<u32>,
    /// Prefix of client ids and topics, so runs do not meet.
    #[arg(long, default_value = "bench")]
    prefix: String,
    /// Subscribers keep persistent sessions (clean start off, a session
    /// expiry): with the Redis store their QoS 1/2 messages go through
    /// their session streams.
    #[arg(long)]
    persistent: bool,
    /// A label copied into the JSON result.
    #[arg(long, default_value = "")]
    label: String,
}

static EPOCH: OnceLock<Instant> = OnceLock::new();

fn now_ns() -> u64 {
    EPOCH.get_or_init(Instant::now).elapsed().as_nanos() as u64
}

type Conn = Framed<TcpStream, MqttCodec>;

fn protocol(v: Version) -> Protocol {
    match v {
        Version::V311 => Protocol::V3_1_1,
        Version::V5 => Protocol::V5,
    }
}

async fn connect(
    addr: SocketAddr,
    id: &str,
    v: Version,
    source: Option<IpAddr>,
) -> anyhow::Result<Conn> {
    connect_with(addr, id, v, source, false).await
}

async fn connect_with(
    addr: SocketAddr,
    id: &str,
    v: Version,
    source: Option<IpAddr>,
    persistent: bool,
) -> anyhow::Result<Conn> {
    let stream = match source {
        Some(ip) => {
            let sock = if addr.is_ipv4() {
                TcpSocket::new_v4()?
            } else {
                TcpSocket::new_v6()?
            };
            sock.bind(SocketAddr::new(ip, 0))?;
            // Many connections from a few source addresses: closed with a
            // reset, they leave no TIME_WAIT behind to crowd the next run's
            // port search (which slowed connects from 11k/s to under 1k/s
            // when runs followed each other).
            sock.set_zero_linger()?;
            sock.connect(addr).await?
        }
        None => TcpStream::connect(addr).await?,
    };
    stream.set_nodelay(true)?;
    let p = protocol(v);
    let mut f = Framed::new(stream, MqttCodec::new(p, 1 << 20));
    let mut properties = Properties::default();
    if persistent && p.is_v5() {
        properties.session_expiry_interval = Some(300);
    }
    f.send(Packet::Connect(Box::new(Connect {
        protocol: p,
        // A persistent session starts clean in 5.0 (expiry keeps it); 3.1.1
        // needs Clean Session 0.
        clean_start: !persistent || p.is_v5(),
        keep_alive: 600,
        client_id: ByteString::from(id),
        will: None,
        username: None,
        password: None,
        properties,
    })))
    .await?;
    match tokio::time::timeout(Duration::from_secs(10), f.next()).await {
        Ok(Some(Ok(Packet::ConnAck(a)))) if a.reason_code == 0 => Ok(f),
        Ok(Some(Ok(Packet::ConnAck(a)))) => bail!("CONNACK refused: 0x{:02x}", a.reason_code),
        other => bail!("no CONNACK: {other:?}"),
    }
}

fn qos(q: u8) -> QoS {
    QoS::from_u8(q).unwrap_or(QoS::AtMostOnce)
}

async fn subscribe(f: &mut Conn, filter: &str, q: QoS) -> anyhow::Result<()> {
    let packet_id = PacketId::MIN;
    f.send(Packet::Subscribe(Subscribe {
        packet_id,
        properties: Properties::default(),
        filters: vec![(ByteString::from(filter), SubscriptionOptions::new(q))],
    }))
    .await?;
    match tokio::time::timeout(Duration::from_secs(10), f.next()).await {
        Ok(Some(Ok(Packet::SubAck(a)))) if a.reason_codes.iter().all(|c| *c < 0x80) => Ok(()),
        other => bail!("subscribe {filter} failed: {other:?}"),
    }
}

/// What one subscriber saw.
#[derive(Default)]
struct SubResult {
    received: u64,
    latencies_us: Vec<u32>,
    last_ns: u64,
}

/// Receive until `expect` messages arrived, or nothing came for `idle`
/// after the publishers finished, or the deadline.
async fn run_subscriber(
    mut f: Conn,
    expect: u64,
    publishers_done: Arc<AtomicU64>,
    publishers: u64,
    deadline: Instant,
) -> SubResult {
    let mut r = SubResult {
        latencies_us: Vec::with_capacity(expect.min(5_000_000) as usize),
        ..SubResult::default()
    };
    let idle = Duration::from_secs(2);
    while r.received < expect && Instant::now() < deadline {
        let wait = if publishers_done.load(Ordering::Relaxed) >= publishers {
            idle
        } else {
            Duration::from_secs(1)
        };
        match tokio::time::timeout(wait, f.next()).await {
            Ok(Some(Ok(p))) => {
                on_delivery(p, &mut f, &mut r).await;
                while let Some(Some(Ok(p))) = f.next().now_or_never() {
                    on_delivery(p, &mut f, &mut r).await;
                }
                if f.flush().await.is_err() {
                    break;
                }
            }
            Ok(_) => break,
            Err(_) => {
                if publishers_done.load(Ordering::Relaxed) >= publishers {
                    break;
                }
            }
        }
    }
    r
}

async fn on_delivery(p: Packet, f: &mut Conn, r: &mut SubResult) {
    match p {
        Packet::Publish(m) => {
            let t = now_ns();
            if m.payload.len() >= 8 {
                let mut ts = [0u8; 8];
                ts.copy_from_slice(&m.payload[..8]);
                let us = t.saturating_sub(u64::from_be_bytes(ts)) / 1000;
                if r.latencies_us.len() < r.latencies_us.capacity() {
                    r.latencies_us.push(us.min(u64::from(u32::MAX)) as u32);
                }
            }
            r.received += 1;
            r.last_ns = t;
            match (m.qos, m.packet_id) {
                (QoS::AtLeastOnce, Some(id)) => {
                    let _ = f.feed(Packet::PubAck(PubResp::new(id, 0))).await;
                }
                (QoS::ExactlyOnce, Some(id)) => {
                    let _ = f.feed(Packet::PubRec(PubResp::new(id, 0))).await;
                }
                _ => {}
            }
        }
        Packet::PubRel(rel) => {
            let _ = f
                .feed(Packet::PubComp(PubResp::new(rel.packet_id, 0)))
                .await;
        }
        _ => {}
    }
}

/// Publish `n` messages to `topic`; returns how many were acknowledged
/// (QoS 1/2) or written (QoS 0).
async fn run_publisher(mut f: Conn, topic: String, a: Args, deadline: Instant) -> u64 {
    let q = qos(a.qos);
    let topic = ByteString::from(topic);
    let filler = vec![b'x'; a.payload.saturating_sub(8)];
    let mut sent = 0u64;
    let mut acked = 0u64;
    let mut inflight = 0usize;
    let mut next_id: u16 = 0;
    let start = Instant::now();
    let window = if q == QoS::AtMostOnce {
        usize::MAX
    } else {
        a.window.clamp(1, 65_000)
    };
    while Instant::now() < deadline {
        let mut batch = 0;
        while sent < a.messages && inflight < window && batch < 256 {
            if a.rate > 0 {
                let due = start + Duration::from_secs_f64(sent as f64 / a.rate as f64);
                if due > Instant::now() {
                    break;
                }
            }
            let mut payload = BytesMut::with_capacity(a.payload.max(8));
            payload.put_u64(now_ns());
            payload.put_slice(&filler);
            let packet_id = if q == QoS::AtMostOnce {
                None
            } else {
                next_id = next_id.wrapping_add(1).max(1);
                PacketId::new(next_id)
            };
            if f.feed(Packet::Publish(Publish {
                dup: false,
                qos: q,
                retain: false,
                topic: topic.clone(),
                packet_id,
                properties: Properties::default(),
                payload: Bytes::from(payload),
            }))
            .await
            .is_err()
            {
                return acked;
            }
            sent += 1;
            batch += 1;
            if q == QoS::AtMostOnce {
                acked += 1;
            } else {
                inflight += 1;
            }
        }
        if f.flush().await.is_err() {
            return acked;
        }
        if sent >= a.messages && inflight == 0 {
            break;
        }
        // What to wait for: an acknowledgement, or the next send time.
        let can_send = sent < a.messages && inflight < window;
        let next_due = (a.rate > 0 && can_send)
            .then(|| start + Duration::from_secs_f64(sent as f64 / a.rate as f64));
        if can_send && next_due.is_none_or(|d| d <= Instant::now()) {
            // Take any acknowledgements that are already here, send on.
            while let Some(Some(Ok(p))) = f.next().now_or_never() {
                on_ack(p, &mut f, &mut inflight, &mut acked).await;
            }
            continue;
        }
        if inflight == 0 {
            if let Some(d) = next_due {
                tokio::time::sleep_until(d.into()).await;
                continue;
            }
            break;
        }
        let wait = next_due.map_or(Duration::from_secs(10), |d| {
            d.saturating_duration_since(Instant::now())
        });
        match tokio::time::timeout(wait, f.next()).await {
            Ok(Some(Ok(p))) => {
                on_ack(p, &mut f, &mut inflight, &mut acked).await;
                while let Some(Some(Ok(p))) = f.next().now_or_never() {
                    on_ack(p, &mut f, &mut inflight, &mut acked).await;
                }
            }
            Ok(_) => break,
            // The next send is due (or the broker stopped answering).
            Err(_) if next_due.is_some() => {}
            Err(_) => break,
        }
    }
    let _ = f.flush().await;
    acked
}

async fn on_ack(p: Packet, f: &mut Conn, inflight: &mut usize, acked: &mut u64) {
    match p {
        Packet::PubAck(a) => {
            *inflight = inflight.saturating_sub(1);
            if a.reason_code < 0x80 {
                *acked += 1;
            }
        }
        Packet::PubRec(r) => {
            let _ = f.feed(Packet::PubRel(PubResp::new(r.packet_id, 0))).await;
        }
        Packet::PubComp(_) => {
            *inflight = inflight.saturating_sub(1);
            *acked += 1;
        }
        _ => {}
    }
}

fn percentile(sorted: &[u32], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    f64::from(sorted[i.min(sorted.len() - 1)]) / 1000.0
}

fn rss_kib(pid: u32) -> Option<u64> {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()?
        .lines()
        .find(|l| l.starts_with("VmRSS:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// CPU seconds (user + system) a process has used so far: fields 14 and 15
/// of /proc/PID/stat, in USER_HZ ticks (100 a second on Linux).
fn cpu_secs(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces: count after its ')'.
    let rest = stat.get(stat.rfind(')')? + 2..)?;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?;
    Some(ticks as f64 / 100.0)
}

fn source(a: &Args, i: usize) -> Option<IpAddr> {
    (a.source_ips > 1).then(|| IpAddr::from([127, 0, 0, 1 + (i % usize::from(a.source_ips)) as u8]))
}

async fn connections(a: &Args) -> anyhow::Result<serde_json::Value> {
    let rss_before = a.broker_pid.and_then(rss_kib);
    let sem = Arc::new(tokio::sync::Semaphore::new(a.concurrency.max(1)));
    let t0 = Instant::now();
    let mut held = Vec::with_capacity(a.connections);
    let mut failed = 0;
    // Two halves: the broker's memory after the first half and after the
    // second gives the cost of one more connection (the slope), apart from
    // what the first connections grow once (allocator arenas, tables).
    let half = a.connections / 2;
    let mut rss_half = None;
    let mut connect_secs = 0.0;
    // The broker's CPU while connecting: what a connect costs it, apart
    // from the generator that shares the machine.
    let mut broker_cpu = 0.0;
    for range in [0..half, half..a.connections] {
        let start = Instant::now();
        let cpu_start = a.broker_pid.and_then(cpu_secs);
        let mut tasks = Vec::with_capacity(range.len());
        for i in range {
            let permit = sem.clone().acquire_owned().await?;
            let a2 = a.clone();
            tasks.push(tokio::spawn(async move {
                let id = format!("{}-idle-{i}", a2.prefix);
                let r = connect(a2.broker, &id, a2.protocol, source(&a2, i)).await;
                drop(permit);
                r
            }));
        }
        for t in tasks {
            match t.await? {
                Ok(c) => held.push(c),
                Err(_) => failed += 1,
            }
        }
        connect_secs += start.elapsed().as_secs_f64();
        if let (Some(s), Some(e)) = (cpu_start, a.broker_pid.and_then(cpu_secs)) {
            broker_cpu += e - s;
        }
        if rss_half.is_none() {
            tokio::time::sleep(Duration::from_millis(500)).await;
            rss_half = Some((a.broker_pid.and_then(rss_kib), held.len()));
        }
    }
    let secs = t0.elapsed().as_secs_f64();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let rss_after = a.broker_pid.and_then(rss_kib);
    let per_conn = match (rss_before, rss_after) {
        (Some(b), Some(f)) if !held.is_empty() => {
            Some(((f.saturating_sub(b)) as f64 * 1024.0) / held.len() as f64)
        }
        _ => None,
    };
    let marginal = match (rss_half, rss_after) {
        (Some((Some(m), n)), Some(f)) if held.len() > n => {
            Some((f.saturating_sub(m) as f64 * 1024.0) / (held.len() - n) as f64)
        }
        _ => None,
    };
    Ok(serde_json::json!({
        "scenario": "connections",
        "label": a.label,
        "connections": held.len(),
        "connect_failures": failed,
        "seconds": secs,
        "connects_per_sec": held.len() as f64 / connect_secs.max(1e-9),
        "broker_rss_kib_before": rss_before,
        "broker_rss_kib_after": rss_after,
        "broker_bytes_per_connection": per_conn,
        "broker_bytes_per_added_connection": marginal,
        "broker_cpu_us_per_connect": a.broker_pid.map(|_| broker_cpu * 1e6 / held.len().max(1) as f64),
    }))
}

async fn traffic(a: &Args) -> anyhow::Result<serde_json::Value> {
    let sub_broker = a.sub_broker.unwrap_or(a.broker);
    let deadline = Instant::now() + Duration::from_secs(a.duration);
    let q = qos(a.qos);
    let p = &a.prefix;
    let (npub, nsub) = match a.scenario {
        Scenario::FanIn => (a.publishers, 1),
        Scenario::FanOut => (1, a.subscribers),
        Scenario::Pairs => (a.publishers, a.publishers),
        Scenario::Shared => (a.publishers, a.subscribers),
        Scenario::Connections => unreachable!(),
    };
    let total = npub as u64 * a.messages;
    // (filter, expected messages) per subscriber
    let subs: Vec<(String, u64)> = (0..nsub)
        .map(|i| match a.scenario {
            Scenario::FanIn => (format!("{p}/in/#"), total),
            Scenario::FanOut => (format!("{p}/out"), a.messages),
            Scenario::Pairs => (format!("{p}/pair/{i}"), a.messages),
            _ => (format!("$share/g/{p}/shared/#"), total),
        })
        .collect();
    let topics: Vec<String> = (0..npub)
        .map(|i| match a.scenario {
            Scenario::FanIn => format!("{p}/in/{i}"),
            Scenario::FanOut => format!("{p}/out"),
            Scenario::Pairs => format!("{p}/pair/{i}"),
            _ => format!("{p}/shared/{i}"),
        })
        .collect();
    let done = Arc::new(AtomicU64::new(0));
    let mut sub_tasks = Vec::new();
    for (i, (filter, expect)) in subs.into_iter().enumerate() {
        let mut f = connect_with(
            sub_broker,
            &format!("{p}-sub-{i}"),
            a.protocol,
            None,
            a.persistent,
        )
        .await
        .context("subscriber connect")?;
        subscribe(&mut f, &filter, q).await?;
        // A shared group splits the messages: its members stop together.
        let expect = if a.scenario == Scenario::Shared {
            u64::MAX
        } else {
            expect
        };
        sub_tasks.push(tokio::spawn(run_subscriber(
            f,
            expect,
            done.clone(),
            npub as u64,
            deadline,
        )));
    }
    // Routes may travel between pods: give them a moment.
    tokio::time::sleep(Duration::from_millis(if a.sub_broker.is_some() {
        500
    } else {
        100
    }))
    .await;
    let mut pubs = Vec::new();
    for (i, topic) in topics.into_iter().enumerate() {
        let f = connect(a.broker, &format!("{p}-pub-{i}"), a.protocol, None)
            .await
            .context("publisher connect")?;
        let a2 = a.clone();
        let done = done.clone();
        pubs.push(tokio::spawn(async move {
            let n = run_publisher(f, topic, a2, deadline).await;
            done.fetch_add(1, Ordering::Relaxed);
            n
        }));
    }
    let t0 = now_ns();
    let mut acked = 0;
    for t in pubs {
        acked += t.await?;
    }
    let pub_secs = (now_ns() - t0) as f64 / 1e9;
    let mut received = 0;
    let mut last = t0;
    let mut lat = Vec::new();
    let mut expected = 0u64;
    for t in sub_tasks {
        let r = t.await?;
        received += r.received;
        last = last.max(r.last_ns);
        lat.extend(r.latencies_us);
    }
    expected += match a.scenario {
        Scenario::FanOut => acked * nsub as u64,
        _ => acked,
    };
    lat.sort_unstable();
    let secs = (last.saturating_sub(t0)) as f64 / 1e9;
    Ok(serde_json::json!({
        "scenario": format!("{:?}", a.scenario).to_lowercase(),
        "label": a.label,
        "qos": a.qos,
        "persistent": a.persistent,
        "protocol": match a.protocol { Version::V311 => "3.1.1", Version::V5 => "5" },
        "publishers": npub,
        "subscribers": nsub,
        "payload": a.payload,
        "rate_per_publisher": a.rate,
        "published": acked,
        "expected": expected,
        "received": received,
        "lost": expected.saturating_sub(received),
        "seconds": secs,
        "publish_seconds": pub_secs,
        "delivered_per_sec": if secs > 0.0 { received as f64 / secs } else { 0.0 },
        "latency_ms_p50": percentile(&lat, 0.50),
        "latency_ms_p99": percentile(&lat, 0.99),
        "latency_ms_max": lat.last().map_or(0.0, |v| f64::from(*v) / 1000.0),
    }))
}

fn main() -> anyhow::Result<()> {
    let a = Args::parse();
    if a.payload < 8 {
        bail!("--payload must be at least 8 (the send time)");
    }
    if a.qos > 2 {
        bail!("--qos must be 0, 1 or 2");
    }
    let _ = now_ns();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let out = rt.block_on(async {
        let limit = Duration::from_secs(a.duration + 30);
        let run = async {
            match a.scenario {
                Scenario::Connections => connections(&a).await,
                _ => traffic(&a).await,
            }
        };
        tokio::time::timeout(limit, run)
            .await
            .map_err(|_| anyhow::anyhow!("run exceeded its time bound"))?
    })?;
    println!("{out}");
    // Idle connections and tasks end with the process.
    rt.shutdown_timeout(Duration::from_millis(100));
    Ok(())
}
