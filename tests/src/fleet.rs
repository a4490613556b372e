//! A fleet of persistent QoS 1 clients behind one address (a Service's node
//! port), as the Day-2 tests need them: a third speak MQTT 3.1.1, the rest
//! MQTT 5; each subscribes to a topic of its own (`{prefix}/{i}`, what
//! [`Topics::Spread`](crate::load::Topics) publishes to), acknowledges what
//! it receives into a shared [`Tally`], and when the broker sends it away
//! (DISCONNECT, or a closed socket) comes straight back through the same
//! address and resumes its session. The fleet counts what the tests judge:
//! moves per client, reconnects per second, how long clients were offline,
//! sessions that did not survive.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cirrus_codec::{Packet, PubResp, QoS};
use tokio_util::sync::CancellationToken;

use crate::client::Next;
use crate::load::{seq_of, Tally};
use crate::{Client, Opts};

/// How long a client may take to be served again before the test fails.
const RECONNECT_LIMIT: Duration = Duration::from_secs(90);

#[derive(Default)]
struct Counts {
    /// Per client: how many times it was sent away.
    moves: Vec<AtomicU32>,
    /// Clients connected now.
    connected: AtomicUsize,
    /// Resumed without the session (`session_present` false).
    sessions_lost: AtomicUsize,
    /// Each reconnect: when its CONNACK came, and how long the client
    /// had been without a connection.
    reconnects: Mutex<Vec<(Instant, Duration)>>,
    /// DISCONNECT reason codes received from the broker, and closes
    /// without one.
    reasons: Mutex<BTreeMap<Option<u8>, usize>>,
}

/// What a phase of a test did to the fleet (see [`Fleet::since`]).
#[derive(Debug)]
pub struct Phase {
    /// Clients sent away during the phase.
    pub moved: usize,
    /// Times the most-moved client was sent away.
    pub most_moves: u32,
    pub reconnects: usize,
    /// Reconnects in the busiest second.
    pub peak_per_sec: usize,
    /// The longest a client was without a connection.
    pub longest_offline: Duration,
    /// From the phase's start to the last reconnect.
    pub all_back_after: Option<Duration>,
    /// From the phase's start to the first reconnect.
    pub first_back_after: Option<Duration>,
}

pub struct Fleet {
    pub n: usize,
    pub tally: Arc<Mutex<Tally>>,
    counts: Arc<Counts>,
    stop: CancellationToken,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

/// A snapshot to measure a phase from.
pub struct Mark {
    at: Instant,
    moves: Vec<u32>,
    reconnects: usize,
}

impl Mark {
    /// Time since the mark was taken.
    pub fn age(&self) -> Duration {
        self.at.elapsed()
    }
}

impl Fleet {
    /// Connect `n` clients `{name}-{i}` to `addr`, `per_sec` a second, each
    /// subscribed to `{prefix}/{i}`; returns once all are (at most 180 s).
    pub async fn start(
        addr: SocketAddr,
        name: &str,
        prefix: &str,
        n: usize,
        per_sec: u32,
    ) -> Fleet {
        rlimit::increase_nofile_limit(n as u64 * 2 + 1024).expect("raise the open-file limit");
        let counts = Arc::new(Counts {
            moves: (0..n).map(|_| AtomicU32::new(0)).collect(),
            ..Counts::default()
        });
        let tally = Arc::new(Mutex::new(Tally::default()));
        let stop = CancellationToken::new();
        let step = Duration::from_secs_f64(1.0 / f64::from(per_sec.max(1)));
        let mut tick = tokio::time::interval(step);
        let mut tasks = Vec::with_capacity(n);
        for i in 0..n {
            tick.tick().await;
            let member = Member {
                i,
                addr,
                id: format!("{name}-{i}"),
                topic: format!("{prefix}/{i}"),
                v311: i % 3 == 0,
                counts: counts.clone(),
                tally: tally.clone(),
                stop: stop.clone(),
            };
            tasks.push(tokio::spawn(member.run()));
        }
        let fleet = Fleet {
            n,
            tally,
            counts,
            stop,
            tasks,
        };
        fleet
            .wait_connected(Duration::from_secs(180), "the fleet to connect")
            .await;
        fleet
    }

    pub fn connected(&self) -> usize {
        self.counts.connected.load(Ordering::SeqCst)
    }

    /// Wait until every client is connected.
    pub async fn wait_connected(&self, timeout: Duration, what: &str) {
        let end = Instant::now() + timeout;
        while self.connected() < self.n {
            assert!(
                Instant::now() < end,
                "timed out waiting for {what}: {} of {} connected",
                self.connected(),
                self.n
            );
            assert!(
                self.tasks.iter().all(|t| !t.is_finished()),
                "a fleet client failed"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    pub fn mark(&self) -> Mark {
        Mark {
            at: Instant::now(),
            moves: self
                .counts
                .moves
                .iter()
                .map(|m| m.load(Ordering::SeqCst))
                .collect(),
            reconnects: self.counts.reconnects.lock().unwrap().len(),
        }
    }

    /// What happened since `mark`.
    pub fn since(&self, mark: &Mark) -> Phase {
        let per_client: Vec<u32> = self
            .counts
            .moves
            .iter()
            .zip(&mark.moves)
            .map(|(m, before)| m.load(Ordering::SeqCst) - before)
            .collect();
        let reconnects = self.counts.reconnects.lock().unwrap()[mark.reconnects..].to_vec();
        let mut per_sec: BTreeMap<u64, usize> = BTreeMap::new();
        for (at, _) in &reconnects {
            *per_sec
                .entry(at.duration_since(mark.at).as_secs())
                .or_default() += 1;
        }
        Phase {
            moved: per_client.iter().filter(|m| **m > 0).count(),
            most_moves: per_client.iter().copied().max().unwrap_or(0),
            reconnects: reconnects.len(),
            peak_per_sec: per_sec.values().copied().max().unwrap_or(0),
            longest_offline: reconnects
                .iter()
                .map(|(_, off)| *off)
                .max()
                .unwrap_or_default(),
            all_back_after: reconnects
                .iter()
                .map(|(at, _)| at.duration_since(mark.at))
                .max(),
            first_back_after: reconnects
                .iter()
                .map(|(at, _)| at.duration_since(mark.at))
                .min(),
        }
    }

    pub fn sessions_lost(&self) -> usize {
        self.counts.sessions_lost.load(Ordering::SeqCst)
    }

    /// DISCONNECT reason codes the fleet got (`None`: closed without one).
    pub fn reasons(&self) -> BTreeMap<Option<u8>, usize> {
        self.counts.reasons.lock().unwrap().clone()
    }

    /// Wait until every acknowledged message arrived (at most `timeout`),
    /// then disconnect the clients (their sessions stay).
    pub async fn finish(self, timeout: Duration) {
        let end = Instant::now() + timeout;
        loop {
            let all = {
                let t = self.tally.lock().unwrap();
                t.acked.iter().all(|s| t.received.contains_key(s))
            };
            if all || Instant::now() >= end {
                break;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        self.stop.cancel();
        for t in self.tasks {
            let _ = tokio::time::timeout(Duration::from_secs(10), t).await;
        }
    }
}

struct Member {
    i: usize,
    addr: SocketAddr,
    id: String,
    topic: String,
    v311: bool,
    counts: Arc<Counts>,
    tally: Arc<Mutex<Tally>>,
    stop: CancellationToken,
}

impl Member {
    fn opts(&self, resume: bool) -> Opts {
        let mut o = if self.v311 {
            // MQTT 3.1.1: a persistent session is clean session 0, always.
            Opts::v311(&self.id).resume()
        } else {
            // MQTT 5: a fresh start with an expiry, then resumed.
            let o = Opts::v5(&self.id).persistent(3600);
            Opts {
                clean_start: !resume,
                ..o
            }
        };
        // No keep-alive traffic from thousands of idle clients.
        o.keep_alive = 0;
        o
    }

    /// Connect (retrying for up to [`RECONNECT_LIMIT`]): the Service may
    /// lead to a pod that is going away.
    async fn connect(&self, resume: bool) -> Option<Client> {
        let end = Instant::now() + RECONNECT_LIMIT;
        loop {
            if self.stop.is_cancelled() {
                return None;
            }
            if let Some((c, ack)) = Client::try_connect(self.addr, self.opts(resume)).await {
                if ack.reason_code == 0 {
                    if resume && !ack.session_present {
                        self.counts.sessions_lost.fetch_add(1, Ordering::SeqCst);
                    }
                    return Some(c);
                }
            }
            assert!(Instant::now() < end, "{} not served again", self.id);
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn run(self) {
        let Some(mut c) = self.connect(false).await else {
            return;
        };
        assert_eq!(
            c.subscribe(&self.topic, QoS::AtLeastOnce).await,
            1,
            "{} subscribed",
            self.id
        );
        self.counts.connected.fetch_add(1, Ordering::SeqCst);
        let mut told = false;
        loop {
            let next = tokio::select! {
                _ = self.stop.cancelled() => break,
                n = c.next(Duration::from_secs(3600)) => n,
            };
            match next {
                Next::Packet(Packet::Publish(m)) => {
                    if let Some(id) = m.packet_id {
                        let _ = c.try_send(Packet::PubAck(PubResp::new(id, 0))).await;
                    }
                    if let Some(s) = seq_of(&m.payload) {
                        *self.tally.lock().unwrap().received.entry(s).or_insert(0) += 1;
                    }
                }
                Next::Packet(Packet::Disconnect(d)) => {
                    *self
                        .counts
                        .reasons
                        .lock()
                        .unwrap()
                        .entry(Some(d.reason_code))
                        .or_default() += 1;
                    // The socket closes next.
                    told = true;
                }
                Next::Packet(_) | Next::Timeout => {}
                Next::Closed => {
                    let lost = Instant::now();
                    self.counts.connected.fetch_sub(1, Ordering::SeqCst);
                    self.counts.moves[self.i].fetch_add(1, Ordering::SeqCst);
                    if !std::mem::take(&mut told) {
                        *self.counts.reasons.lock().unwrap().entry(None).or_default() += 1;
                    }
                    let Some(nc) = self.connect(true).await else {
                        return;
                    };
                    c = nc;
                    self.counts
                        .reconnects
                        .lock()
                        .unwrap()
                        .push((Instant::now(), lost.elapsed()));
                    self.counts.connected.fetch_add(1, Ordering::SeqCst);
                }
            }
        }
        let _ = c.try_send(Packet::Disconnect(Default::default())).await;
    }
}
