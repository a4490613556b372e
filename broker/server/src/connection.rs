//! One task per client: the MQTT protocol state machine.
//!
//! The task owns the socket and two buffers (in the struct, so every
//! `select!` branch is cancel-safe). It reads frames, answers them into the
//! write buffer, pulls messages queued for its session (woken by
//! `Attachment::wake`), and writes everything gathered in one `write_all`.
//! A client that does not read is not buffered for: its session queue is
//! bounded, and a write that blocks longer than the write timeout ends it.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use cirrus_codec::encode::{encode_publish_parts, PublishExtras, PublishHeader};
use cirrus_codec::topic::parse_filter;
use cirrus_codec::{
    reason, ByteString, ConnAck, Connect, DecodeError, Disconnect, LastWill, Packet, PacketId,
    Properties, Protocol, PubResp, Publish, QoS, SubAck, Subscribe, UnsubAck, Unsubscribe,
};
use futures_util::stream::{FuturesOrdered, StreamExt};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info};

use crate::auth::{Identity, LoginError};
use crate::broker::{Broker, ConnectRequest, SubscribeError};
use crate::cluster::Pending;
use crate::message::{Delivery, Message};
use crate::router::Match;
use crate::session::{Inflight, OutState, Session};
use crate::stats::{DropReason, Refused, Stats};
use cirrus_config::auth::Access;

/// Read buffer of a connection whose last read was small (idle clients).
const IDLE_READ: usize = 512;
/// Read buffer of a connection whose last read filled the small one.
const BUSY_READ: usize = 16 * 1024;
/// Flush the write buffer once it holds this much.
const WRITE_HIGH_WATER: usize = 64 * 1024;
/// Messages moved from the session queue per wake-up, so one busy session
/// cannot starve reading its own socket.
const PUMP_BATCH: usize = 256;
/// Longest a publisher waits for a backlogged subscriber before reading on.
const BACKPRESSURE_WAIT: Duration = Duration::from_millis(50);
/// Redis store: QoS 1/2 publishes whose acknowledgement waits for Redis;
/// past this many the connection reads nothing more until the oldest lands.
const MAX_PENDING_ACKS: usize = 256;

/// An acknowledgement that goes out once Redis holds the message:
/// (stored, QoS, packet id, reason code).
type AckFuture = Pin<Box<dyn Future<Output = (bool, QoS, PacketId, u8)> + Send>>;

/// Why a connection ends; decides the DISCONNECT sent and the will.
#[derive(Debug)]
enum Close {
    /// DISCONNECT from the client.
    Client {
        with_will: bool,
        new_expiry: Option<u32>,
    },
    /// The peer closed the socket, or it failed.
    Io,
    /// A protocol violation: DISCONNECT with this reason (MQTT 5), then close.
    Violation(u8, &'static str),
    KeepAlive,
    TakenOver,
    Shutdown,
}

impl From<DecodeError> for Close {
    fn from(e: DecodeError) -> Self {
        let what = match e {
            DecodeError::Malformed(s) | DecodeError::Protocol(s) | DecodeError::TopicName(s) => s,
            DecodeError::PacketTooLarge { .. } => "packet too large",
            DecodeError::UnsupportedProtocol => "unsupported protocol",
        };
        Close::Violation(e.reason_code(), what)
    }
}

/// Serve one client connection until it ends. `cert_user` is the user name
/// a verified client certificate stands for (`tls.cert_as_username`).
pub async fn serve<S>(
    broker: Arc<Broker>,
    stream: S,
    peer: SocketAddr,
    cert_user: Option<String>,
    shutdown: CancellationToken,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send,
{
    let mut io = stream;
    let mut rbuf = BytesMut::with_capacity(IDLE_READ);
    // The states before and after the session are boxed: the task keeps
    // only the running connection's state for its life.
    let connect = match Box::pin(read_connect(&broker, &mut io, &mut rbuf, &shutdown)).await {
        Ok(c) => c,
        Err(why) => {
            debug!(%peer, why, "connection closed before CONNECT was accepted");
            return;
        }
    };
    let Some(mut conn) =
        Box::pin(accept(broker.clone(), io, rbuf, peer, *connect, cert_user)).await
    else {
        return;
    };
    broker
        .stats
        .connections_current
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    Stats::inc(&broker.stats.connections_total);
    let close = conn.run(&shutdown).await;
    broker
        .stats
        .connections_current
        .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    Box::pin(conn.finish(close)).await;
}

/// Read the first packet, which must be CONNECT, within the connect timeout.
async fn read_connect<S>(
    broker: &Broker,
    io: &mut S,
    rbuf: &mut BytesMut,
    shutdown: &CancellationToken,
) -> Result<Box<Connect>, &'static str>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let max = broker.config.limits.max_packet_size as usize;
    let deadline = tokio::time::Instant::now() + broker.config.connect_timeout();
    loop {
        match cirrus_codec::decode(rbuf, Protocol::V3_1_1, max) {
            Ok(Some(Packet::Connect(c))) => return Ok(c),
            Ok(Some(_)) => return Err("first packet is not CONNECT [MQTT-3.1.0-1]"),
            Ok(None) => {}
            Err(e) => {
                Stats::inc(&broker.stats.decode_errors);
                // Answer with a CONNACK the client can read: 3.1.1 format
                // for an unknown level, 5.0 format if it asked for 5.0.
                let answer: Option<Vec<u8>> = match e {
                    DecodeError::UnsupportedProtocol => {
                        Some(vec![0x20, 2, 0, reason::v3::UNACCEPTABLE_PROTOCOL_VERSION])
                    }
                    _ if connect_level(rbuf) == Some(5) => {
                        Some(vec![0x20, 3, 0, e.reason_code(), 0])
                    }
                    _ => None,
                };
                if let Some(a) = answer {
                    let _ = tokio::time::timeout(Duration::from_secs(1), io.write_all(&a)).await;
                }
                return Err("invalid CONNECT");
            }
        }
        rbuf.reserve(1024);
        tokio::select! {
            _ = shutdown.cancelled() => return Err("shutting down"),
            _ = tokio::time::sleep_until(deadline) => return Err("no CONNECT within the connect timeout"),
            r = io.read_buf(rbuf) => match r {
                Ok(0) | Err(_) => return Err("closed"),
                Ok(n) => Stats::add(&broker.stats.bytes_received, n as u64),
            }
        }
    }
}

/// The protocol level of a CONNECT at the front of `buf`, if it can be seen.
fn connect_level(buf: &[u8]) -> Option<u8> {
    let h = cirrus_codec::decode::parse_fixed_header(buf).ok()??;
    let body = buf.get(h.header_len..)?;
    let name_len = usize::from(u16::from_be_bytes([*body.first()?, *body.get(1)?]));
    body.get(2 + name_len).copied()
}

/// The outgoing side: the write buffer and what shapes each PUBLISH for this
/// client. Separate from `Conn` so that it can be borrowed mutably while the
/// session lock is held.
struct Out {
    wbuf: BytesMut,
    protocol: Protocol,
    /// Largest packet the client accepts.
    client_max_packet: usize,
    /// Topic aliases we set towards the client.
    alias_out: std::collections::HashMap<ByteString, u16>,
    client_alias_max: u16,
}

struct Conn<S> {
    broker: Arc<Broker>,
    io: S,
    rbuf: BytesMut,
    out: Out,
    peer: SocketAddr,
    protocol: Protocol,
    session: Arc<Session>,
    client_id: ByteString,
    epoch: u64,
    wake: Arc<Notify>,
    kick: CancellationToken,
    keep_alive: Option<Duration>,
    /// Expiry asked for in CONNECT (a DISCONNECT may not raise it from 0).
    connect_expiry: u32,
    will: Option<Box<LastWill>>,
    /// Outgoing QoS 1/2 window: min(client Receive Maximum, our max_inflight).
    window: usize,
    /// Topic aliases the client set towards us (index = alias).
    alias_in: Vec<Option<ByteString>>,
    scratch: Vec<Match>,
    /// A subscriber this connection's publishes are outrunning.
    backlogged: Option<Arc<Session>>,
    identity: Identity,
    /// Publish decisions by topic, for the policy generation they were made
    /// under: no ACL evaluation (or allocation) per message.
    acl_cache: std::collections::HashMap<ByteString, bool>,
    publish_rate: Option<crate::stats::RateLimit>,
    /// Set when the publish rate is exceeded: read nothing more until then.
    throttle_until: Option<tokio::time::Instant>,
    /// Redis store: a QoS 0 publish waiting for room in the store's queue.
    blocked: Option<Pending>,
    /// Redis store: PUBACK/PUBREC waiting for Redis, in arrival order.
    acks: FuturesOrdered<AckFuture>,
    /// The last read filled the small buffer: read into a large one.
    busy_reader: bool,
}

/// Validate CONNECT, attach the session and answer CONNACK.
async fn accept<S>(
    broker: Arc<Broker>,
    mut io: S,
    rbuf: BytesMut,
    peer: SocketAddr,
    c: Connect,
    cert_user: Option<String>,
) -> Option<Conn<S>>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let cfg = broker.config.clone();
    let v5 = c.protocol.is_v5();
    let mut ack = ConnAck::default();
    let refuse = |code: u8| if v5 { code } else { reason::connack_v3(code) };

    let mut client_id = c.client_id.clone();
    let mut assigned = false;
    if client_id.is_empty() {
        if v5 || (c.clean_start && c.protocol == Protocol::V3_1_1) {
            client_id = broker.assign_client_id();
            assigned = true;
        } else {
            ack.reason_code = refuse(reason::CLIENT_IDENTIFIER_NOT_VALID);
        }
    }
    if !broker.store_ready() {
        ack.reason_code = refuse(reason::SERVER_UNAVAILABLE);
    }
    if ack.reason_code == 0 && c.properties.authentication_method.is_some() {
        // Enhanced authentication is not offered.
        ack.reason_code = refuse(reason::BAD_AUTHENTICATION_METHOD);
    }
    let mut identity = None;
    if ack.reason_code == 0 {
        if broker.auth.blocked(peer.ip()) {
            ack.reason_code = refuse(reason::CONNECTION_RATE_EXCEEDED);
        } else {
            let login = match &cert_user {
                // The verified certificate stands for the credentials.
                Some(user) => broker.auth.login_certified(user),
                None => {
                    let (u, p) = (c.username.as_deref(), c.password.as_deref());
                    broker.auth.login(peer.ip(), u, p).await
                }
            };
            match login {
                Ok(id) => identity = Some(id),
                // One answer for an unknown user and a wrong password.
                Err(LoginError::BadCredentials) => {
                    Stats::inc(&broker.stats.auth_failures);
                    ack.reason_code = refuse(reason::BAD_USER_NAME_OR_PASSWORD)
                }
                Err(LoginError::AnonymousNotAllowed) => {
                    ack.reason_code = refuse(reason::NOT_AUTHORIZED)
                }
            }
        }
    }
    if let (Some(w), Some(id)) = (&c.will, &identity) {
        if ack.reason_code == 0
            && broker.auth.enabled()
            && !id.allowed(&client_id, Access::Publish, &w.topic)
        {
            ack.reason_code = refuse(reason::NOT_AUTHORIZED);
        }
    }
    if let Some(w) = &c.will {
        if ack.reason_code == 0 && w.qos.as_u8() > cfg.mqtt.maximum_qos {
            ack.reason_code = refuse(reason::QOS_NOT_SUPPORTED);
        }
        if ack.reason_code == 0 && w.retain && !cfg.mqtt.retain_available {
            ack.reason_code = refuse(reason::RETAIN_NOT_SUPPORTED);
        }
        if ack.reason_code == 0
            && w.properties.payload_format_indicator == Some(1)
            && std::str::from_utf8(&w.payload).is_err()
        {
            ack.reason_code = refuse(reason::PAYLOAD_FORMAT_INVALID);
        }
    }
    if ack.reason_code != 0 {
        refuse_connect(&broker, &mut io, ack, c.protocol, peer, &c.client_id).await;
        return None;
    }
    let identity = identity?;

    // Session expiry: MQTT 5 asks for it; 3.x Clean Session 0 means "never".
    let asked_expiry = if v5 {
        c.properties.session_expiry_interval.unwrap_or(0)
    } else if c.clean_start {
        0
    } else {
        u32::MAX
    };
    let expiry = asked_expiry.min(cfg.limits.max_session_expiry_secs);
    if v5 && expiry != asked_expiry {
        ack.properties.session_expiry_interval = Some(expiry);
    }
    // Keep alive, capped by the configured maximum (Server Keep Alive).
    let max_ka = cfg.limits.max_keep_alive;
    let mut keep_alive = c.keep_alive;
    if max_ka > 0 && (keep_alive == 0 || keep_alive > max_ka) {
        keep_alive = max_ka;
        if v5 {
            ack.properties.server_keep_alive = Some(keep_alive);
        }
    }
    if v5 {
        let l = &cfg.limits;
        ack.properties.receive_maximum =
            (l.receive_maximum != u16::MAX).then_some(l.receive_maximum);
        ack.properties.maximum_packet_size = Some(l.max_packet_size);
        ack.properties.topic_alias_maximum =
            (l.topic_alias_maximum > 0).then_some(l.topic_alias_maximum);
        ack.properties.maximum_qos = (cfg.mqtt.maximum_qos < 2).then_some(cfg.mqtt.maximum_qos);
        ack.properties.retain_available = (!cfg.mqtt.retain_available).then_some(0);
        if assigned {
            ack.properties.assigned_client_identifier = Some(client_id.clone());
        }
    }

    let req = ConnectRequest {
        client_id: client_id.clone(),
        clean_start: c.clean_start,
        expiry_interval: expiry,
        protocol: c.protocol,
    };
    let grant = match broker.connect(req, c.will.as_ref()).await {
        Ok(g) => g,
        Err(code) => {
            ack.reason_code = refuse(code);
            ack.properties = Properties::default();
            refuse_connect(&broker, &mut io, ack, c.protocol, peer, &c.client_id).await;
            return None;
        }
    };
    ack.session_present = grant.session_present;

    let window = usize::from(
        c.properties
            .receive_maximum
            .unwrap_or(u16::MAX)
            .min(cfg.limits.max_inflight),
    );
    let client_max_packet = c
        .properties
        .maximum_packet_size
        .map_or(usize::MAX, |v| v as usize);
    let mut conn = Conn {
        broker: broker.clone(),
        io,
        rbuf,
        out: Out {
            wbuf: BytesMut::new(),
            protocol: c.protocol,
            client_max_packet,
            alias_out: std::collections::HashMap::new(),
            client_alias_max: if v5 {
                c.properties.topic_alias_maximum.unwrap_or(0)
            } else {
                0
            },
        },
        peer,
        protocol: c.protocol,
        session: grant.session,
        client_id,
        epoch: grant.epoch,
        wake: grant.wake,
        kick: grant.kick,
        keep_alive: (keep_alive > 0).then(|| Duration::from_millis(u64::from(keep_alive) * 1500)),
        connect_expiry: expiry,
        will: c.will.map(Box::new),
        window,
        alias_in: Vec::new(),
        scratch: Vec::new(),
        backlogged: None,
        identity,
        acl_cache: std::collections::HashMap::new(),
        publish_rate: crate::stats::RateLimit::new(cfg.limits.max_publish_rate),
        throttle_until: None,
        blocked: None,
        acks: FuturesOrdered::new(),
        busy_reader: false,
    };
    conn.send(&Packet::ConnAck(ack));
    if grant.session_present {
        conn.resend_inflight();
    }
    conn.pump();
    debug!(%peer, client_id = %conn.client_id, protocol = %conn.protocol, "client connected");
    Some(conn)
}

/// Answer a refused CONNECT and close.
async fn refuse_connect<S>(
    broker: &Broker,
    io: &mut S,
    ack: ConnAck,
    protocol: Protocol,
    peer: SocketAddr,
    client_id: &ByteString,
) where
    S: AsyncWrite + Unpin,
{
    let code = ack.reason_code;
    broker
        .stats
        .refused(Refused::from_connack(code, protocol.is_v5()));
    let mut buf = BytesMut::new();
    cirrus_codec::encode(&Packet::ConnAck(ack), protocol, &mut buf);
    let _ = tokio::time::timeout(broker.config.write_timeout(), io.write_all(&buf)).await;
    info!(%peer, %client_id, reason_code = code, "connection refused");
}

enum Event {
    Read(std::io::Result<usize>),
    Acked((bool, QoS, PacketId, u8)),
    Wake,
    AuthChanged,
    Close(Close),
}

/// Publish decisions remembered per connection; cleared when full.
const ACL_CACHE_MAX: usize = 1024;

impl<S> Conn<S>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    fn v5(&self) -> bool {
        self.protocol.is_v5()
    }

    fn send(&mut self, p: &Packet) {
        cirrus_codec::encode(p, self.protocol, &mut self.out.wbuf);
        Stats::inc(&self.broker.stats.messages_sent);
    }

    async fn flush(&mut self) -> Result<(), Close> {
        if self.out.wbuf.is_empty() {
            return Ok(());
        }
        let n = self.out.wbuf.len();
        // flush() matters for framed transports (WebSocket); on TCP it is free.
        let write = async {
            self.io.write_all(&self.out.wbuf).await?;
            self.io.flush().await
        };
        match tokio::time::timeout(self.broker.config.write_timeout(), write).await {
            Ok(Ok(())) => {
                Stats::add(&self.broker.stats.bytes_sent, n as u64);
                self.out.wbuf.clear();
                // An idle connection does not keep a burst's buffer.
                if self.out.wbuf.capacity() > WRITE_HIGH_WATER {
                    self.out.wbuf = BytesMut::new();
                }
                Ok(())
            }
            _ => Err(Close::Io),
        }
    }

    async fn run(&mut self, shutdown: &CancellationToken) -> Close {
        let max_in = self.broker.config.limits.max_packet_size as usize;
        let ka = self
            .keep_alive
            .unwrap_or(Duration::from_secs(u64::from(u32::MAX)));
        let keepalive = tokio::time::sleep(ka);
        tokio::pin!(keepalive);
        let wake = self.wake.clone();
        let kick = self.kick.clone();
        let mut auth_changes = self.broker.auth.subscribe_changes();
        loop {
            // Answer every complete frame already buffered.
            loop {
                match cirrus_codec::decode(&mut self.rbuf, self.protocol, max_in) {
                    Ok(Some(p)) => {
                        Stats::inc(&self.broker.stats.messages_received);
                        if let Err(c) = self.handle(p).await {
                            return c;
                        }
                        if self.backlogged.is_some()
                            || self.throttle_until.is_some()
                            || self.blocked.is_some()
                            || self.acks.len() >= MAX_PENDING_ACKS
                        {
                            break;
                        }
                    }
                    Ok(None) => break,
                    Err(e) => {
                        Stats::inc(&self.broker.stats.decode_errors);
                        return e.into();
                    }
                }
                if self.out.wbuf.len() >= WRITE_HIGH_WATER {
                    if let Err(c) = self.flush().await {
                        return c;
                    }
                }
            }
            if let Err(c) = self.flush().await {
                return c;
            }
            // Backpressure: read no more from this publisher until a
            // subscriber it outran has drained, for a bounded time.
            // Frames still buffered are handled next, before any new read.
            if let Some(s) = self.backlogged.take() {
                tokio::select! {
                    biased;
                    _ = kick.cancelled() => return Close::TakenOver,
                    _ = shutdown.cancelled() => return Close::Shutdown,
                    _ = s.wait_for_space(BACKPRESSURE_WAIT) => {}
                }
                continue;
            }
            // Redis store: the store's queue is full, or too many
            // acknowledgements wait for it: read on once it caught up.
            if let Some(p) = self.blocked.take() {
                tokio::select! {
                    biased;
                    _ = kick.cancelled() => return Close::TakenOver,
                    _ = shutdown.cancelled() => return Close::Shutdown,
                    _ = Box::pin(p.finish()) => {}
                }
                continue;
            }
            if self.acks.len() >= MAX_PENDING_ACKS {
                let r = tokio::select! {
                    biased;
                    _ = kick.cancelled() => return Close::TakenOver,
                    _ = shutdown.cancelled() => return Close::Shutdown,
                    r = self.acks.next() => r,
                };
                if let Some(r) = r {
                    if let Err(c) = self.on_stored(r) {
                        return c;
                    }
                }
                continue;
            }
            // Rate limit: the client is slowed down by reading it later.
            if let Some(until) = self.throttle_until.take() {
                tokio::select! {
                    biased;
                    _ = kick.cancelled() => return Close::TakenOver,
                    _ = shutdown.cancelled() => return Close::Shutdown,
                    _ = tokio::time::sleep_until(until) => {}
                }
                continue;
            }
            // Idle connections (most of them) read into a small buffer;
            // one that filled its buffer last time gets a large one.
            if self.rbuf.is_empty() && self.rbuf.capacity() > BUSY_READ && !self.busy_reader {
                self.rbuf = BytesMut::new();
            }
            self.rbuf.reserve(if self.busy_reader {
                BUSY_READ
            } else {
                IDLE_READ
            });
            let ev = tokio::select! {
                biased;
                _ = kick.cancelled() => Event::Close(Close::TakenOver),
                _ = shutdown.cancelled() => Event::Close(Close::Shutdown),
                _ = &mut keepalive => Event::Close(Close::KeepAlive),
                r = self.io.read_buf(&mut self.rbuf) => Event::Read(r),
                _ = wake.notified() => Event::Wake,
                Some(r) = self.acks.next(), if !self.acks.is_empty() => Event::Acked(r),
                Ok(()) = auth_changes.changed() => Event::AuthChanged,
            };
            match ev {
                Event::Close(c) => return c,
                Event::Read(Ok(0)) | Event::Read(Err(_)) => return Close::Io,
                Event::Read(Ok(n)) => {
                    self.busy_reader = n >= IDLE_READ;
                    Stats::add(&self.broker.stats.bytes_received, n as u64);
                    keepalive.as_mut().reset(tokio::time::Instant::now() + ka);
                }
                Event::Wake => self.pump(),
                Event::Acked(r) => {
                    if let Err(c) = self.on_stored(r) {
                        return c;
                    }
                }
                Event::AuthChanged => {
                    // Users still allowed keep their connection with the new
                    // rules; revoked or re-keyed ones are let go.
                    let policy = self.broker.auth.policy();
                    if let Some(p) = policy.as_ref() {
                        if !p.still_valid(&self.identity) {
                            return Close::Violation(
                                reason::NOT_AUTHORIZED,
                                "credentials no longer valid after an auth file reload",
                            );
                        }
                        self.identity = p.refresh(&self.identity);
                    }
                    self.acl_cache.clear();
                }
            }
        }
    }

    /// Send the last words and hand the session back to the broker.
    async fn finish(mut self, close: Close) {
        let (code, will, new_expiry) = match close {
            Close::Client {
                with_will,
                new_expiry,
            } => (
                None,
                if with_will { self.will.take() } else { None },
                new_expiry,
            ),
            Close::Io => (None, self.will.take(), None),
            Close::Violation(code, what) => {
                info!(peer = %self.peer, client_id = %self.client_id, reason_code = code, what, "closing connection");
                (Some(code), self.will.take(), None)
            }
            Close::KeepAlive => {
                info!(peer = %self.peer, client_id = %self.client_id, "keep-alive timeout");
                (Some(reason::KEEP_ALIVE_TIMEOUT), self.will.take(), None)
            }
            Close::TakenOver => (Some(reason::SESSION_TAKEN_OVER), self.will.take(), None),
            Close::Shutdown => (Some(reason::SERVER_SHUTTING_DOWN), self.will.take(), None),
        };
        if let (Some(code), true) = (code, self.v5()) {
            self.send(&Packet::Disconnect(Disconnect {
                reason_code: code,
                properties: Properties::default(),
            }));
        }
        let _ = tokio::time::timeout(Duration::from_secs(1), async {
            let _ = self.flush().await;
            let _ = self.io.shutdown().await;
        })
        .await;
        self.broker
            .disconnect(&self.session, self.epoch, will.map(|w| *w), new_expiry);
        debug!(peer = %self.peer, client_id = %self.client_id, "client disconnected");
    }

    async fn handle(&mut self, p: Packet) -> Result<(), Close> {
        match p {
            Packet::Publish(p) => self.on_publish(p),
            Packet::PubAck(r) => {
                self.complete(r.packet_id, OutState::AwaitAck);
                Ok(())
            }
            Packet::PubRec(r) => {
                self.on_pubrec(r);
                Ok(())
            }
            Packet::PubRel(r) => {
                let known = self
                    .session
                    .state
                    .lock()
                    .incoming_qos2
                    .remove(&r.packet_id.get());
                let code = if known || !self.v5() {
                    reason::SUCCESS
                } else {
                    reason::PACKET_IDENTIFIER_NOT_FOUND
                };
                self.send(&Packet::PubComp(PubResp::new(r.packet_id, code)));
                Ok(())
            }
            Packet::PubComp(r) => {
                self.complete(r.packet_id, OutState::AwaitComp);
                Ok(())
            }
            // Boxed: rare, and their states (Redis round trips) would
            // otherwise enlarge every idle connection's task.
            Packet::Subscribe(s) => Box::pin(self.on_subscribe(s)).await,
            Packet::Unsubscribe(u) => {
                Box::pin(self.on_unsubscribe(u)).await;
                Ok(())
            }
            Packet::PingReq => {
                self.send(&Packet::PingResp);
                Ok(())
            }
            Packet::Disconnect(d) => self.on_disconnect(d),
            Packet::Connect(_) => Err(Close::Violation(
                reason::PROTOCOL_ERROR,
                "second CONNECT [MQTT-3.1.0-2]",
            )),
            Packet::Auth(_) => Err(Close::Violation(
                reason::PROTOCOL_ERROR,
                "AUTH without enhanced authentication",
            )),
            Packet::ConnAck(_) | Packet::SubAck(_) | Packet::UnsubAck(_) | Packet::PingResp => Err(
                Close::Violation(reason::PROTOCOL_ERROR, "a packet only a server may send"),
            ),
        }
    }

    fn on_disconnect(&mut self, d: Disconnect) -> Result<(), Close> {
        let mut new_expiry = None;
        if let Some(e) = d.properties.session_expiry_interval {
            if self.connect_expiry == 0 && e != 0 {
                return Err(Close::Violation(
                    reason::PROTOCOL_ERROR,
                    "session expiry raised from 0 in DISCONNECT [MQTT-3.14.2-2]",
                ));
            }
            new_expiry = Some(e.min(self.broker.config.limits.max_session_expiry_secs));
        }
        Err(Close::Client {
            with_will: d.reason_code == reason::DISCONNECT_WITH_WILL,
            new_expiry,
        })
    }

    fn on_publish(&mut self, mut p: Publish) -> Result<(), Close> {
        let cfg = &*self.broker.config;
        Stats::inc(&self.broker.stats.publish_received);
        let q = usize::from(p.qos.as_u8()).min(2);
        Stats::inc(&self.broker.stats.publish_received_qos[q]);
        Stats::add(
            &self.broker.stats.payload_bytes_received_qos[q],
            p.payload.len() as u64,
        );
        if let Some(r) = &mut self.publish_rate {
            let wait = r.take_or_wait(Instant::now());
            if !wait.is_zero() {
                self.throttle_until = Some(tokio::time::Instant::now() + wait);
            }
        }
        if let Some(alias) = p.properties.topic_alias.take() {
            if alias == 0 || alias > cfg.limits.topic_alias_maximum {
                return Err(Close::Violation(
                    reason::TOPIC_ALIAS_INVALID,
                    "topic alias out of range [MQTT-3.3.2-9]",
                ));
            }
            let slot = usize::from(alias);
            if self.alias_in.len() <= slot {
                self.alias_in.resize(slot + 1, None);
            }
            if p.topic.is_empty() {
                match &self.alias_in[slot] {
                    Some(t) => p.topic = t.clone(),
                    None => {
                        return Err(Close::Violation(
                            reason::PROTOCOL_ERROR,
                            "unknown topic alias [MQTT-3.3.4-?]",
                        ))
                    }
                }
            } else {
                self.alias_in[slot] = Some(p.topic.clone());
            }
        } else if p.topic.is_empty() {
            return Err(Close::Violation(
                reason::PROTOCOL_ERROR,
                "empty topic without a topic alias",
            ));
        }
        if !p.properties.subscription_identifiers.is_empty() {
            return Err(Close::Violation(
                reason::PROTOCOL_ERROR,
                "subscription identifier from a client [MQTT-3.3.4-6]",
            ));
        }
        if p.qos.as_u8() > cfg.mqtt.maximum_qos {
            return Err(Close::Violation(
                reason::QOS_NOT_SUPPORTED,
                "QoS above Maximum QoS [MQTT-3.2.2-11]",
            ));
        }
        if p.retain && !cfg.mqtt.retain_available {
            return Err(Close::Violation(
                reason::RETAIN_NOT_SUPPORTED,
                "retain not available [MQTT-3.2.2-14]",
            ));
        }
        if p.qos == QoS::ExactlyOnce {
            let pid = p.packet_id.map_or(0, |v| v.get());
            let st = self.session.state.lock();
            if st.incoming_qos2.contains(&pid) {
                // A resend of a message we have: acknowledge, do not route again.
                drop(st);
                if let Some(id) = p.packet_id {
                    self.send(&Packet::PubRec(PubResp::new(id, reason::SUCCESS)));
                }
                return Ok(());
            }
            if st.incoming_qos2.len() >= usize::from(cfg.limits.receive_maximum) {
                return Err(Close::Violation(
                    reason::RECEIVE_MAXIMUM_EXCEEDED,
                    "more QoS 2 messages than Receive Maximum [MQTT-3.3.4-9]",
                ));
            }
        }

        // Tracing off: no span, no work (see `crate::trace`).
        let span = if crate::trace::enabled() {
            crate::trace::receive(&p.properties, &self.client_id, &p.topic, p.qos.as_u8())
        } else {
            tracing::Span::none()
        };
        let _in_span = span.enter();
        let mut remote = None;
        let code = if p.topic.starts_with("$SYS") {
            reason::NOT_AUTHORIZED
        } else if !{
            let _authorize = (!span.is_none()).then(|| crate::trace::authorize().entered());
            self.may_publish(&p.topic)
        } {
            Stats::inc(&self.broker.stats.acl_denied);
            Stats::inc(&self.broker.stats.acl_denied_publish);
            reason::NOT_AUTHORIZED
        } else if p.properties.payload_format_indicator == Some(1)
            && std::str::from_utf8(&p.payload).is_err()
        {
            reason::PAYLOAD_FORMAT_INVALID
        } else {
            let publisher = Some(self.client_id.clone());
            let route = if span.is_none() {
                tracing::Span::none()
            } else {
                crate::trace::route()
            };
            let _in_route = route.enter();
            let mut props = p.properties;
            if !route.is_none() {
                // Subscribers and other pods continue the trace from here.
                crate::trace::stamp(&mut props, &route);
            }
            let msg = Message::from_wire(p.topic, p.payload, p.qos, p.retain, props, publisher);
            let msg = Arc::new(msg);
            let outcome = self.broker.publish(msg, &mut self.scratch);
            if outcome.backlogged.is_some() {
                self.backlogged = outcome.backlogged;
            }
            remote = outcome.remote.filter(Pending::must_wait);
            if outcome.retain_refused {
                reason::QUOTA_EXCEEDED
            } else if outcome.delivered == 0 && self.v5() {
                reason::NO_MATCHING_SUBSCRIBERS
            } else {
                reason::SUCCESS
            }
        };
        let Some(id) = p.packet_id else {
            // QoS 0: nothing to acknowledge; wait only for room in the queue.
            self.blocked = remote;
            return Ok(());
        };
        if remote.is_some() || !self.acks.is_empty() {
            // Acknowledge once Redis holds it, and in order.
            let qos = p.qos;
            self.acks.push_back(Box::pin(async move {
                let stored = match remote {
                    Some(r) => r.finish().await,
                    None => true,
                };
                (stored, qos, id, code)
            }));
            return Ok(());
        }
        self.on_stored((true, p.qos, id, code))
    }

    /// A publish is stored (or failed to be): acknowledge it.
    fn on_stored(
        &mut self,
        (stored, qos, id, code): (bool, QoS, PacketId, u8),
    ) -> Result<(), Close> {
        if !stored {
            if !self.v5() {
                // 3.1.1 has no way to say it failed: the client resends
                // after reconnecting.
                return Err(Close::Violation(
                    reason::UNSPECIFIED_ERROR,
                    "the store did not take the message",
                ));
            }
            let p = PubResp::new(id, reason::UNSPECIFIED_ERROR);
            match qos {
                QoS::ExactlyOnce => self.send(&Packet::PubRec(p)),
                _ => self.send(&Packet::PubAck(p)),
            }
            return Ok(());
        }
        match (qos, Some(id)) {
            (QoS::AtLeastOnce, Some(id)) => self.send(&Packet::PubAck(PubResp::new(id, code))),
            (QoS::ExactlyOnce, Some(id)) => {
                if code < 0x80 {
                    self.session.state.lock().incoming_qos2.insert(id.get());
                }
                self.send(&Packet::PubRec(PubResp::new(id, code)));
            }
            _ => {}
        }
        Ok(())
    }

    /// The ACL's answer for publishing to `topic`, cached per connection.
    fn may_publish(&mut self, topic: &ByteString) -> bool {
        if !self.broker.auth.enabled() {
            return true;
        }
        if let Some(&ok) = self.acl_cache.get(topic) {
            return ok;
        }
        let ok = self
            .identity
            .allowed(&self.client_id, Access::Publish, topic);
        if self.acl_cache.len() >= ACL_CACHE_MAX {
            self.acl_cache.clear();
        }
        self.acl_cache.insert(topic.clone(), ok);
        ok
    }

    fn on_pubrec(&mut self, r: PubResp) {
        let mut st = self.session.state.lock();
        if st.epoch != self.epoch {
            return;
        }
        let found = st
            .find_inflight(r.packet_id)
            .filter(|&i| st.inflight[i].state == OutState::AwaitRec);
        match found {
            Some(i) if r.reason_code >= 0x80 => {
                // The receiver refused the message: it is done.
                let done = st.inflight.remove(i);
                drop(st);
                self.stream_ack(done.and_then(|d| d.delivery.ack));
                self.pump();
            }
            Some(i) => {
                st.inflight[i].state = OutState::AwaitComp;
                // The receiver has it: its stream entry is done.
                let ack = st.inflight[i].delivery.ack.take();
                drop(st);
                self.stream_ack(ack);
                self.send(&Packet::PubRel(PubResp::new(r.packet_id, reason::SUCCESS)));
            }
            None => {
                drop(st);
                let code = if self.v5() {
                    reason::PACKET_IDENTIFIER_NOT_FOUND
                } else {
                    reason::SUCCESS
                };
                self.send(&Packet::PubRel(PubResp::new(r.packet_id, code)));
            }
        }
    }

    /// PUBACK or PUBCOMP: the message leaves the in-flight window.
    fn complete(&mut self, pid: PacketId, expect: OutState) {
        let removed = {
            let mut st = self.session.state.lock();
            if st.epoch != self.epoch {
                return;
            }
            match st.find_inflight(pid) {
                Some(i) if st.inflight[i].state == expect => st.inflight.remove(i),
                _ => None,
            }
        };
        if let Some(done) = removed {
            self.stream_ack(done.delivery.ack);
            self.pump();
        }
    }

    /// Redis store: the client has a message of its session stream.
    fn stream_ack(&self, id: Option<ByteString>) {
        if let (Some(id), Some(c)) = (id, self.broker.cluster()) {
            c.ack(&self.client_id, &id);
        }
    }

    async fn on_subscribe(&mut self, s: Subscribe) -> Result<(), Close> {
        let cfg = &*self.broker.config;
        let v5 = self.v5();
        let failure = |code: u8| if v5 { code } else { reason::v3::SUBACK_FAILURE };
        let sub_id = s.properties.subscription_identifiers.first().copied();
        let mut codes = Vec::with_capacity(s.filters.len());
        for (filter, options) in &s.filters {
            let code = match parse_filter(filter) {
                Err(_) => failure(reason::TOPIC_FILTER_INVALID),
                Ok(fr)
                    if self.broker.auth.enabled()
                        && !self.identity.allowed(
                            &self.client_id,
                            Access::Subscribe,
                            fr.filter,
                        ) =>
                {
                    Stats::inc(&self.broker.stats.acl_denied);
                    failure(reason::NOT_AUTHORIZED)
                }
                Ok(fr) => {
                    if fr.share_group.is_some() && options.no_local {
                        return Err(Close::Violation(
                            reason::PROTOCOL_ERROR,
                            "No Local on a shared subscription [MQTT-3.8.3-4]",
                        ));
                    }
                    let mut o = *options;
                    if o.qos.as_u8() > cfg.mqtt.maximum_qos {
                        o.qos = QoS::from_u8(cfg.mqtt.maximum_qos).unwrap_or_default();
                    }
                    match self
                        .broker
                        .subscribe(&self.session, filter, fr, o, sub_id, true)
                    {
                        Ok(existed) => match self.broker.cluster() {
                            None => o.qos.as_u8(),
                            Some(c) => {
                                let c = c.clone();
                                match c
                                    .subscribed(&self.session, filter, o, sub_id, existed, true)
                                    .await
                                {
                                    Ok(()) => o.qos.as_u8(),
                                    Err(_) => {
                                        if !existed {
                                            self.broker.unsubscribe(&self.session, filter, fr);
                                        }
                                        failure(reason::UNSPECIFIED_ERROR)
                                    }
                                }
                            }
                        },
                        Err(SubscribeError::TooMany) => failure(reason::QUOTA_EXCEEDED),
                        Err(SubscribeError::Ended) => failure(reason::UNSPECIFIED_ERROR),
                    }
                }
            };
            codes.push(code);
        }
        self.send(&Packet::SubAck(SubAck {
            packet_id: s.packet_id,
            properties: Properties::default(),
            reason_codes: codes,
        }));
        // Retained messages were queued after the SUBACK was written.
        self.pump();
        Ok(())
    }

    async fn on_unsubscribe(&mut self, u: Unsubscribe) {
        let mut codes = Vec::with_capacity(u.filters.len());
        for f in &u.filters {
            codes.push(match parse_filter(f) {
                Err(_) => reason::TOPIC_FILTER_INVALID,
                Ok(fr) => {
                    if self.broker.unsubscribe(&self.session, f, fr) {
                        if let Some(c) = self.broker.cluster().cloned() {
                            c.unsubscribed(&self.session, f).await;
                        }
                        reason::SUCCESS
                    } else {
                        reason::NO_SUBSCRIPTION_EXISTED
                    }
                }
            });
        }
        self.send(&Packet::UnsubAck(UnsubAck {
            packet_id: u.packet_id,
            properties: Properties::default(),
            reason_codes: if self.v5() { codes } else { Vec::new() },
        }));
    }

    /// After a reconnect to a present session: send again every unacknowledged
    /// PUBLISH with DUP set, and PUBREL for those already received
    /// ([MQTT-4.4.0-1]).
    fn resend_inflight(&mut self) {
        let items: Vec<Inflight> = {
            let st = self.session.state.lock();
            if st.epoch != self.epoch {
                return;
            }
            st.inflight.iter().cloned().collect()
        };
        let now = Instant::now();
        for i in items {
            match i.state {
                OutState::AwaitComp => {
                    self.send(&Packet::PubRel(PubResp::new(i.packet_id, reason::SUCCESS)))
                }
                _ => {
                    self.out.encode_publish(
                        &i.delivery,
                        Some(i.packet_id),
                        true,
                        now,
                        &self.broker.stats,
                    );
                }
            }
        }
    }

    /// Move queued messages into the write buffer, within the in-flight
    /// window and the batch bounds.
    fn pump(&mut self) {
        let now = Instant::now();
        let stats = &self.broker.stats;
        let mut st = self.session.state.lock();
        if st.epoch != self.epoch || st.ended {
            return;
        }
        let mut n = 0;
        while n < PUMP_BATCH && self.out.wbuf.len() < WRITE_HIGH_WATER {
            let Some(front) = st.queue.front() else { break };
            if front.qos != QoS::AtMostOnce && st.inflight.len() >= self.window {
                break;
            }
            let Some(d) = st.queue.pop_front() else { break };
            n += 1;
            if d.msg.is_expired(now) {
                stats.dropped(DropReason::Expired);
                self.stream_ack(d.ack);
                continue;
            }
            let pid = (d.qos != QoS::AtMostOnce).then(|| st.next_packet_id());
            if !self.out.encode_publish(&d, pid, d.dup, now, stats) {
                stats.dropped(DropReason::TooLarge);
                self.stream_ack(d.ack);
                continue;
            }
            stats
                .delivery_latency
                .observe(now.saturating_duration_since(d.msg.received));
            if let Some(packet_id) = pid {
                let state = if d.qos == QoS::AtLeastOnce {
                    OutState::AwaitAck
                } else {
                    OutState::AwaitRec
                };
                st.inflight.push_back(Inflight {
                    packet_id,
                    state,
                    delivery: d,
                });
            }
        }
        let more = st
            .queue
            .front()
            .is_some_and(|f| f.qos == QoS::AtMostOnce || st.inflight.len() < self.window);
        let queued = st.queue.len();
        drop(st);
        if n > 0 {
            self.session.drained(queued, self.broker.queue_limits());
        }
        if more {
            // Batch bound reached: continue after this write.
            self.wake.notify_one();
        }
    }
}

impl Out {
    /// Encode one delivery; false if it exceeds the client's Maximum Packet
    /// Size, in which case nothing is written ([MQTT-3.1.2-25]).
    fn encode_publish(
        &mut self,
        d: &Delivery,
        pid: Option<PacketId>,
        dup: bool,
        now: Instant,
        stats: &Stats,
    ) -> bool {
        let m = &d.msg;
        let mut topic: &str = &m.topic;
        let mut alias = None;
        let mut new_alias = false;
        if self.client_alias_max > 0 {
            if let Some(&a) = self.alias_out.get(&m.topic) {
                alias = Some(a);
                topic = "";
            } else if self.alias_out.len() < usize::from(self.client_alias_max) {
                let a = self.alias_out.len() as u16 + 1;
                self.alias_out.insert(m.topic.clone(), a);
                alias = Some(a);
                new_alias = true;
            }
        }
        let start = self.wbuf.len();
        let len = encode_publish_parts(
            &mut self.wbuf,
            self.protocol,
            PublishHeader {
                dup,
                qos: d.qos,
                retain: d.retain,
                topic,
                packet_id: pid,
            },
            &m.properties,
            PublishExtras {
                topic_alias: alias,
                subscription_identifiers: &d.sub_ids,
                message_expiry_interval: m.remaining_expiry(now),
            },
            &m.payload,
        );
        if len > self.client_max_packet {
            self.wbuf.truncate(start);
            if new_alias {
                self.alias_out.remove(&m.topic);
            }
            return false;
        }
        Stats::inc(&stats.messages_sent);
        Stats::inc(&stats.publish_sent);
        let q = usize::from(d.qos.as_u8()).min(2);
        Stats::inc(&stats.publish_sent_qos[q]);
        Stats::add(&stats.payload_bytes_sent_qos[q], m.payload.len() as u64);
        true
    }
}

#[cfg(test)]
mod tests {
    /// What an idle connection costs is mostly its task's future: keep it
    /// small (the subscribe/Redis/handshake states are boxed out of it).
    #[tokio::test]
    async fn an_idle_connection_task_stays_small() {
        let cfg = std::sync::Arc::new(crate::config::Config::default());
        let auth = crate::auth::Auth::new(None, 10).unwrap();
        let broker = crate::broker::Broker::new(cfg, auth);
        let (a, _b) = tokio::io::duplex(64);
        let f = super::serve(
            broker,
            a,
            "127.0.0.1:1".parse().unwrap(),
            None,
            tokio_util::sync::CancellationToken::new(),
        );
        let size = std::mem::size_of_val(&f);
        assert!(size <= 3072, "connection future is {size} bytes");
        assert!(std::mem::size_of::<super::Conn<tokio::io::DuplexStream>>() <= 768);
    }
}
