//! One task per client: the MQTT protocol state machine.
//!
//! The task owns the socket and two buffers. It reads frames, answers them
//! into the write buffer, pulls messages queued for its session (woken by
//! its [`Signal`]), and writes everything gathered at once. A client that
//! does not read is not buffered for: its session queue is bounded, and a
//! write that blocks longer than the write timeout ends it.
//!
//! Idle connections are most of a broker's connections, so what one keeps
//! while it waits is kept small: the wait is a hand-written poll over the
//! socket, the keep-alive timer and the signal (no stored futures); an idle
//! connection holds no read or write buffer (a read lands on the stack
//! first); rare states (subscribe, backpressure, Redis waits, a write that
//! blocks) are boxed while they last.

use std::future::{poll_fn, Future};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::{Duration, Instant};

use bytes::{Buf, BytesMut};
use cirrus_codec::encode::{encode_publish_parts, PublishExtras, PublishHeader};
use cirrus_codec::topic::parse_filter;
use cirrus_codec::{
    reason, ByteString, ConnAck, Connect, DecodeError, Disconnect, LastWill, Packet, PacketId,
    Properties, Protocol, PubResp, Publish, QoS, SubAck, Subscribe, UnsubAck, Unsubscribe,
};
use futures_util::future::BoxFuture;
use futures_util::stream::{FuturesOrdered, Stream, StreamExt};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info};

use crate::auth::{Identity, LoginError};
use crate::broker::{Broker, ConnectRequest, SubscribeError};
use crate::message::{Delivery, Message, StoreAck};
use crate::router::Match;
use crate::session::{Inflight, OutState, Rung, Session, Signal};
use crate::stats::{DropReason, Refused, Stats};
use crate::store::redis::{Pending, StoreFail};
use cirrus_config::auth::Access;
use cirrus_config::DrainReason;

/// Reads of a connection whose last read was small (most clients) land in
/// a buffer of this size on the stack, and are copied to the read buffer.
const IDLE_READ: usize = 2048;
/// Read buffer of a connection whose last read filled the stack buffer.
const BUSY_READ: usize = 16 * 1024;
/// A connection lets go of its empty buffers this long after it last went
/// to sleep with them: an idle one holds none, a busy one reallocates them
/// about once this often (not once per message).
const RELEASE_AFTER: Duration = Duration::from_secs(1);
/// Buffers up to this size are let go of as soon as the connection sleeps.
const SMALL_BUFFER: usize = 1024;
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
/// Not a reason code: an entry of `acks` that sends PUBREL once Redis has
/// recorded an outgoing QoS 2 delivery (see `on_pubrec`).
const SEND_PUBREL: u8 = 0xFF;

type AckFuture = Pin<Box<dyn Future<Output = (Result<(), StoreFail>, QoS, PacketId, u8)> + Send>>;

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
    /// A paced drain sends the client to another pod.
    Moved,
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
/// a verified client certificate stands for (`tls.cert_as_username`);
/// `permit`, its place under the connection limit, is given back then.
///
/// Not an `async fn`: its arguments would stay in the task's state for the
/// connection's life. They go into the boxed opening state instead.
pub fn serve<S>(
    broker: Arc<Broker>,
    stream: S,
    peer: SocketAddr,
    cert_user: Option<String>,
    shutdown: CancellationToken,
    permit: tokio::sync::OwnedSemaphorePermit,
) -> impl Future<Output = ()> + Send
where
    S: AsyncRead + AsyncWrite + Unpin + Send,
{
    let args = Box::new((broker, stream, peer, cert_user, shutdown));
    async move {
        // Held (by reference: not moved into a second slot) until the end.
        let _permit = &permit;
        // The states before and after the session are boxed: the task
        // keeps only the running connection's state for its life.
        // Moved out in a block of its own, which frees the box at once.
        let (broker, stream, peer, cert_user, shutdown) = {
            let args = args;
            *args
        };
        let Some((mut conn, shutdown)) =
            Box::pin(open(broker, stream, peer, cert_user, shutdown)).await
        else {
            return;
        };
        let stats = &conn.broker.stats;
        stats
            .connections_current
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Stats::inc(&stats.connections_total);
        let close = conn.run(&shutdown).await;
        conn.broker
            .stats
            .connections_current
            .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
        Box::pin(conn.finish(close)).await;
    }
}

/// Read CONNECT and accept it: the connection, or None if it ended.
async fn open<S>(
    broker: Arc<Broker>,
    mut io: S,
    peer: SocketAddr,
    cert_user: Option<String>,
    shutdown: CancellationToken,
) -> Option<(Conn<S>, CancellationToken)>
where
    S: AsyncRead + AsyncWrite + Unpin + Send,
{
    let mut rbuf = BytesMut::new();
    let connect = match read_connect(&broker, &mut io, &mut rbuf, &shutdown).await {
        Ok(c) => c,
        Err(why) => {
            debug!(%peer, why, "connection closed before CONNECT was accepted");
            return None;
        }
    };
    let conn = accept(broker, io, rbuf, peer, *connect, cert_user).await?;
    Some((conn, shutdown))
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
        // Seen before decoding: a frame that fails to decode is gone.
        let level = connect_level(rbuf);
        match cirrus_codec::decode(rbuf, Protocol::V3_1_1, max) {
            Ok(Some(Packet::Connect(c))) => return Ok(c),
            Ok(Some(_)) => return Err("first packet is not CONNECT [MQTT-3.1.0-1]"),
            Ok(None) => {}
            Err(e) => {
                Stats::inc(&broker.stats.decode_errors);
                // Answer with a CONNACK the client can read (docs/protocol.md):
                // a level above 5 gets the 5.0 layout with 0x84
                // [MQTT-3.1.2-2], an older or odd level the 3.1.1 layout
                // with 0x01, a 5.0 CONNECT the 5.0 layout with the reason;
                // a wrong protocol name gets nothing [MQTT-3.1.2-1].
                let answer: Option<Vec<u8>> = match e {
                    DecodeError::UnsupportedProtocol if level.is_some_and(|l| l > 5) => {
                        Some(vec![0x20, 3, 0, reason::UNSUPPORTED_PROTOCOL_VERSION, 0])
                    }
                    DecodeError::UnsupportedProtocol => {
                        Some(vec![0x20, 2, 0, reason::v3::UNACCEPTABLE_PROTOCOL_VERSION])
                    }
                    _ if level == Some(5) => Some(vec![0x20, 3, 0, e.reason_code(), 0]),
                    _ => None,
                };
                if let Some(a) = answer {
                    let _ = tokio::time::timeout(Duration::from_secs(1), io.write_all(&a)).await;
                    linger(io).await;
                }
                return Err("invalid CONNECT");
            }
        }
        rbuf.reserve(256);
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

/// How long, and how much, a closing connection still reads (and drops)
/// after its last words: see [`linger`].
const LINGER_TIME: Duration = Duration::from_secs(2);
const LINGER_BYTES: usize = 64 << 20;

/// A lingering close, after a CONNACK or DISCONNECT with a reason code:
/// the write side is shut down (the client reads the packet, then EOF), and
/// what the client still sends is read and dropped until it closes, or for
/// at most [`LINGER_TIME`] and [`LINGER_BYTES`]. Closing at once with
/// unread input makes the kernel answer with a reset, which can destroy the
/// packet before the client has read it.
async fn linger<S>(io: &mut S)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let _ = tokio::time::timeout(LINGER_TIME, async {
        let _ = io.shutdown().await;
        let mut sink = [0u8; 2048];
        let mut left = LINGER_BYTES;
        while left > 0 {
            match io.read(&mut sink).await {
                Ok(0) | Err(_) => return,
                Ok(n) => left = left.saturating_sub(n),
            }
        }
    })
    .await;
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
    /// Boxed, like the other per-connection maps: most clients use none,
    /// and a map in place is 48 bytes of every idle connection.
    #[allow(clippy::box_collection)]
    alias_out: Option<Box<std::collections::HashMap<ByteString, u16>>>,
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
    epoch: u64,
    signal: Arc<Signal>,
    /// Keep alive in seconds (0: none).
    keep_alive: u16,
    /// Expiry asked for in CONNECT (a DISCONNECT may not raise it from 0).
    connect_expiry: u32,
    will: Option<Box<LastWill>>,
    /// Outgoing QoS 1/2 window: min(client Receive Maximum, our max_inflight).
    window: u16,
    /// Topic aliases the client set towards us (index = alias).
    alias_in: Vec<Option<ByteString>>,
    /// A subscriber this connection's publishes are outrunning.
    backlogged: Option<Arc<Session>>,
    identity: Identity,
    /// The auth policy generation `identity` was made under.
    auth_generation: u64,
    /// Publish decisions by topic, for the policy generation they were made
    /// under: no ACL evaluation (or allocation) per message.
    #[allow(clippy::box_collection)]
    acl_cache: Option<Box<std::collections::HashMap<ByteString, bool>>>,
    /// `limits.max_publish_rate`, when set.
    publish_rate: Option<Box<Throttle>>,
    /// Redis store: a QoS 0 publish waiting for room in the store's queue.
    blocked: Option<Box<Pending>>,
    /// Redis store: PUBACK/PUBREC waiting for Redis, in arrival order
    /// (made on first use).
    acks: Option<Box<FuturesOrdered<AckFuture>>>,
    /// The last read filled the stack buffer: read into a large one.
    busy_reader: bool,
    /// When the client will have been silent too long (keep alive).
    ka_deadline: tokio::time::Instant,
    /// The timer is set to let go of the buffers (see `poll_event`).
    release_pending: bool,
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
    S: AsyncRead + AsyncWrite + Unpin + Send,
{
    let cfg = broker.config.clone();
    let v5 = c.protocol.is_v5();
    let mut ack = ConnAck::default();
    let refuse = |code: u8| if v5 { code } else { reason::connack_v3(code) };

    // A copy: a slice would keep the whole CONNECT frame's buffer alive
    // for as long as the session lives.
    let mut client_id = ByteString::from(&*c.client_id);
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
    // Read before logging in: a policy installed after this is checked
    // when the connection starts serving.
    let auth_generation = broker.auth.generation();
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

    let window = c
        .properties
        .receive_maximum
        .unwrap_or(u16::MAX)
        .min(cfg.limits.max_inflight);
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
            alias_out: None,
            client_alias_max: if v5 {
                c.properties.topic_alias_maximum.unwrap_or(0)
            } else {
                0
            },
        },
        peer,
        protocol: c.protocol,
        session: grant.session,
        epoch: grant.epoch,
        signal: grant.signal,
        keep_alive,
        connect_expiry: expiry,
        will: c.will.map(Box::new),
        window,
        alias_in: Vec::new(),
        backlogged: None,
        identity,
        auth_generation,
        acl_cache: None,
        publish_rate: crate::stats::RateLimit::new(cfg.limits.max_publish_rate)
            .map(|rate| Box::new(Throttle { rate, until: None })),
        blocked: None,
        acks: None,
        busy_reader: false,
        ka_deadline: tokio::time::Instant::now(),
        release_pending: false,
    };
    conn.send(&Packet::ConnAck(ack));
    if grant.session_present {
        conn.resend_inflight();
    }
    conn.pump();
    debug!(%peer, client_id = %conn.session.client_id, protocol = %conn.protocol, "client connected");
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
    S: AsyncRead + AsyncWrite + Unpin,
{
    let code = ack.reason_code;
    broker
        .stats
        .refused(Refused::from_connack(code, protocol.is_v5()));
    let mut buf = BytesMut::new();
    cirrus_codec::encode(&Packet::ConnAck(ack), protocol, &mut buf);
    let _ = tokio::time::timeout(broker.config.write_timeout(), io.write_all(&buf)).await;
    info!(%peer, %client_id, reason_code = code, "connection refused");
    linger(io).await;
}

enum Event {
    Read(std::io::Result<usize>),
    /// The keep-alive deadline, or the time to let go of the buffers.
    Timer,
    Acked((Result<(), StoreFail>, QoS, PacketId, u8)),
    Wake,
    AuthChanged,
    Close(Close),
}

/// The publish rate limit of a connection, and until when it is not read.
struct Throttle {
    rate: crate::stats::RateLimit,
    until: Option<tokio::time::Instant>,
}

thread_local! {
    /// Route matches of one publish, reused by every connection this
    /// thread serves (rather than kept by each connection).
    static SCRATCH: std::cell::RefCell<Vec<Match>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// What became of the next buffered frame.
enum Frame<'a> {
    /// No complete frame is buffered.
    None,
    Handled,
    /// Answered once this (subscribe, unsubscribe) completes.
    Later(BoxFuture<'a, Result<(), Close>>),
}

/// Publish decisions remembered per connection; cleared when full.
const ACL_CACHE_MAX: usize = 1024;

/// Why the signal sends a connection away.
fn leave(r: Rung) -> Close {
    match r {
        Rung::Shutdown => Close::Shutdown,
        Rung::Moved => Close::Moved,
        _ => Close::TakenOver,
    }
}

impl<S> Conn<S>
where
    S: AsyncRead + AsyncWrite + Unpin + Send,
{
    fn v5(&self) -> bool {
        self.protocol.is_v5()
    }

    fn send(&mut self, p: &Packet) {
        cirrus_codec::encode(p, self.protocol, &mut self.out.wbuf);
        Stats::inc(&self.broker.stats.messages_sent);
    }

    /// Write what the socket takes now; Ready once all of it is written.
    fn poll_write_out(&mut self, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        while !self.out.wbuf.is_empty() {
            let n = ready!(Pin::new(&mut self.io).poll_write(cx, &self.out.wbuf))?;
            if n == 0 {
                return Poll::Ready(Err(std::io::ErrorKind::WriteZero.into()));
            }
            Stats::add(&self.broker.stats.bytes_sent, n as u64);
            self.out.wbuf.advance(n);
        }
        // flush() matters for framed transports (WebSocket); on TCP it is free.
        Pin::new(&mut self.io).poll_flush(cx)
    }

    async fn flush(&mut self) -> Result<(), Close> {
        if self.out.wbuf.is_empty() {
            return Ok(());
        }
        // Most writes go out at once: no timer for those. One that blocks
        // (a slow reader) gets the write timeout, in a boxed state.
        let done = match poll_fn(|cx| Poll::Ready(self.poll_write_out(cx))).await {
            Poll::Ready(r) => r,
            Poll::Pending => {
                let timeout = self.broker.config.write_timeout();
                let write = poll_fn(|cx| self.poll_write_out(cx));
                match Box::pin(tokio::time::timeout(timeout, write)).await {
                    Ok(r) => r,
                    Err(_) => return Err(Close::Io),
                }
            }
        };
        match done {
            Ok(()) => {
                self.out.wbuf.clear();
                // An idle connection does not keep a burst's buffer.
                if self.out.wbuf.capacity() > WRITE_HIGH_WATER {
                    self.out.wbuf = BytesMut::new();
                }
                Ok(())
            }
            Err(_) => Err(Close::Io),
        }
    }

    /// How long the client may be silent: 1.5 times its keep alive.
    fn silence_allowed(&self) -> Duration {
        match self.keep_alive {
            0 => Duration::from_secs(u64::from(u32::MAX)),
            secs => Duration::from_millis(u64::from(secs) * 1500),
        }
    }

    fn acks_len(&self) -> usize {
        self.acks.as_ref().map_or(0, |a| a.len())
    }

    /// Must the connection stop reading for a while (see `wait_to_read`)?
    fn must_wait(&self) -> bool {
        self.backlogged.is_some()
            || self
                .publish_rate
                .as_ref()
                .is_some_and(|t| t.until.is_some())
            || self.blocked.is_some()
            || self.acks_len() >= MAX_PENDING_ACKS
    }

    async fn run(&mut self, shutdown: &CancellationToken) -> Close {
        // One timer for the keep-alive deadline and for letting go of the
        // buffers.
        self.ka_deadline = tokio::time::Instant::now() + self.silence_allowed();
        let keepalive = tokio::time::sleep_until(self.ka_deadline);
        tokio::pin!(keepalive);
        // Shutdown and auth reloads ring the signals of connections attached
        // by then; this one may have attached (or logged in) just after.
        if shutdown.is_cancelled() {
            return Close::Shutdown;
        }
        if self.broker.auth.generation() != self.auth_generation {
            self.signal.auth_changed();
        }
        loop {
            // Answer every complete frame already buffered.
            loop {
                match self.next_frame() {
                    Ok(Frame::Handled) => {}
                    Ok(Frame::Later(later)) => {
                        if let Err(c) = later.await {
                            return c;
                        }
                    }
                    Ok(Frame::None) => break,
                    Err(c) => return c,
                }
                if self.must_wait() {
                    break;
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
            if self.must_wait() {
                if let Err(c) = Box::pin(self.wait_to_read()).await {
                    return c;
                }
                continue;
            }
            let ev = poll_fn(|cx| self.poll_event(cx, keepalive.as_mut())).await;
            match ev {
                Event::Close(c) => return c,
                Event::Read(Ok(0)) | Event::Read(Err(_)) => return Close::Io,
                Event::Read(Ok(n)) => {
                    Stats::add(&self.broker.stats.bytes_received, n as u64);
                    self.ka_deadline = tokio::time::Instant::now() + self.silence_allowed();
                    // A pending release fires first and then sets this.
                    if !self.release_pending {
                        keepalive.as_mut().reset(self.ka_deadline);
                    }
                }
                Event::Timer => {
                    if tokio::time::Instant::now() >= self.ka_deadline {
                        return Close::KeepAlive;
                    }
                    self.release_pending = false;
                    self.release_buffers(usize::MAX);
                    keepalive.as_mut().reset(self.ka_deadline);
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
                    self.auth_generation = self.broker.auth.generation();
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
                    self.acl_cache = None;
                }
            }
        }
    }

    /// The wait of a running connection, in order of urgency: leave (kick,
    /// shutdown), the timer (keep-alive deadline or buffer release), the
    /// socket, queued messages, stored publishes, an auth reload. Holds
    /// nothing between polls but the signal's waker.
    fn poll_event(
        &mut self,
        cx: &mut Context<'_>,
        mut timer: Pin<&mut tokio::time::Sleep>,
    ) -> Poll<Event> {
        loop {
            if let Some(r) = self.signal.resume() {
                return Poll::Ready(Event::Close(leave(r)));
            }
            if timer.as_mut().poll(cx).is_ready() {
                return Poll::Ready(Event::Timer);
            }
            if let Poll::Ready(r) = self.poll_read(cx) {
                return Poll::Ready(Event::Read(r));
            }
            // Finished store writes before wakes: a run of wakes must never
            // hold back a PUBACK or PUBREL that is ready.
            if let Some(acks) = self.acks.as_mut().filter(|a| !a.is_empty()) {
                if let Poll::Ready(Some(r)) = Pin::new(&mut **acks).poll_next(cx) {
                    return Poll::Ready(Event::Acked(r));
                }
            }
            if self.signal.take(Rung::Wake) {
                return Poll::Ready(Event::Wake);
            }
            if self.signal.take(Rung::AuthChanged) {
                return Poll::Ready(Event::AuthChanged);
            }
            // Going to sleep: small empty buffers go at once (getting them
            // back is cheap), large ones in a while, unless that is arranged.
            self.release_buffers(SMALL_BUFFER);
            let holding = self.rbuf.capacity() > 0 || self.out.wbuf.capacity() > 0;
            if holding && !self.release_pending {
                self.release_pending = true;
                let at = tokio::time::Instant::now() + RELEASE_AFTER;
                timer.as_mut().reset(at.min(self.ka_deadline));
                continue;
            }
            if self.signal.park(cx) {
                return Poll::Pending;
            }
        }
    }

    /// Let go of the empty buffers of at most `up_to` bytes.
    fn release_buffers(&mut self, up_to: usize) {
        if self.rbuf.is_empty() && (1..=up_to).contains(&self.rbuf.capacity()) {
            self.rbuf = BytesMut::new();
            self.busy_reader = false;
        }
        let wbuf = &mut self.out.wbuf;
        if wbuf.is_empty() && (1..=up_to).contains(&wbuf.capacity()) {
            *wbuf = BytesMut::new();
        }
    }

    /// Read from the socket: into the read buffer if the connection has
    /// one with room; else through a buffer on the stack (so that a
    /// connection without a buffer holds none while it waits). One whose
    /// last read filled that gets a large buffer.
    fn poll_read(&mut self, cx: &mut Context<'_>) -> Poll<std::io::Result<usize>> {
        let room = self.rbuf.capacity() - self.rbuf.len();
        if self.busy_reader || room >= IDLE_READ {
            if self.rbuf.is_empty() && self.rbuf.capacity() > 2 * BUSY_READ {
                self.rbuf = BytesMut::new();
            }
            if self.busy_reader {
                self.rbuf.reserve(BUSY_READ);
            }
            let n = ready!(tokio_util::io::poll_read_buf(
                Pin::new(&mut self.io),
                cx,
                &mut self.rbuf
            ))?;
            self.busy_reader = n >= IDLE_READ;
            return Poll::Ready(Ok(n));
        }
        let mut stack = [0u8; IDLE_READ];
        let mut buf = ReadBuf::new(&mut stack);
        ready!(Pin::new(&mut self.io).poll_read(cx, &mut buf))?;
        let n = buf.filled().len();
        self.rbuf.extend_from_slice(buf.filled());
        self.busy_reader = n >= IDLE_READ;
        Poll::Ready(Ok(n))
    }

    /// Read nothing more for a while (or until the connection must leave):
    /// a subscriber this publisher outran drains (bounded), the Redis
    /// store's queue has room, too many acknowledgements wait for Redis, or
    /// the publish rate limit.
    async fn wait_to_read(&mut self) -> Result<(), Close> {
        let signal = self.signal.clone();
        tokio::select! {
            biased;
            r = signal.leave() => Err(leave(r)),
            r = self.wait_for_room() => r,
        }
    }

    /// The wait of `wait_to_read`: the first reason that applies.
    async fn wait_for_room(&mut self) -> Result<(), Close> {
        if let Some(s) = self.backlogged.take() {
            s.wait_for_space(BACKPRESSURE_WAIT).await;
        } else if let Some(p) = self.blocked.take() {
            let _ = p.finish().await;
        } else if self.acks_len() >= MAX_PENDING_ACKS {
            let stored = match self.acks.as_mut() {
                Some(acks) => acks.next().await,
                None => None,
            };
            if let Some(r) = stored {
                self.on_stored(r)?;
            }
        } else if let Some(until) = self.publish_rate.as_mut().and_then(|t| t.until.take()) {
            // Rate limit: the client is slowed down by reading it later.
            tokio::time::sleep_until(until).await;
        }
        Ok(())
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
                info!(peer = %self.peer, client_id = %self.session.client_id, reason_code = code, what, "closing connection");
                (Some(code), self.will.take(), None)
            }
            Close::KeepAlive => {
                info!(peer = %self.peer, client_id = %self.session.client_id, "keep-alive timeout");
                (Some(reason::KEEP_ALIVE_TIMEOUT), self.will.take(), None)
            }
            Close::TakenOver => (Some(reason::SESSION_TAKEN_OVER), self.will.take(), None),
            Close::Shutdown => (Some(reason::SERVER_SHUTTING_DOWN), self.will.take(), None),
            Close::Moved => {
                let code = match self.broker.config.drain.reason {
                    DrainReason::ServerShuttingDown => reason::SERVER_SHUTTING_DOWN,
                    DrainReason::UseAnotherServer => reason::USE_ANOTHER_SERVER,
                };
                (Some(code), self.will.take(), None)
            }
        };
        if let (Some(code), true) = (code, self.v5()) {
            let mut properties = Properties::default();
            if code == reason::USE_ANOTHER_SERVER {
                properties.server_reference = self
                    .broker
                    .config
                    .drain
                    .server_reference
                    .as_deref()
                    .map(ByteString::from);
            }
            self.send(&Packet::Disconnect(Disconnect {
                reason_code: code,
                properties,
            }));
        }
        let _ = tokio::time::timeout(Duration::from_secs(1), async {
            let _ = self.flush().await;
            let _ = self.io.shutdown().await;
        })
        .await;
        self.broker
            .disconnect(&self.session, self.epoch, will.map(|w| *w), new_expiry);
        debug!(peer = %self.peer, client_id = %self.session.client_id, "client disconnected");
        if code.is_some() && self.v5() {
            // The session is handed back already; only the socket lingers,
            // so that the client can read the reason code.
            self.rbuf = BytesMut::new();
            self.out.wbuf = BytesMut::new();
            linger(&mut self.io).await;
        }
    }

    /// Decode and answer the next buffered frame (a sync step: the decoded
    /// packet is never kept in the task's state).
    fn next_frame(&mut self) -> Result<Frame<'_>, Close> {
        let max_in = self.broker.config.limits.max_packet_size as usize;
        match cirrus_codec::decode(&mut self.rbuf, self.protocol, max_in) {
            Ok(Some(p)) => {
                Stats::inc(&self.broker.stats.messages_received);
                Ok(match self.handle(p)? {
                    Some(later) => Frame::Later(later),
                    None => Frame::Handled,
                })
            }
            Ok(None) => Ok(Frame::None),
            Err(e) => {
                Stats::inc(&self.broker.stats.decode_errors);
                Err(e.into())
            }
        }
    }

    /// Answer one packet. Subscribe and unsubscribe may wait for Redis:
    /// they come back as a boxed future, so that their states do not
    /// enlarge every idle connection's task.
    fn handle(&mut self, p: Packet) -> Result<Option<BoxFuture<'_, Result<(), Close>>>, Close> {
        match p {
            Packet::Subscribe(s) => Ok(Some(Box::pin(self.on_subscribe(s)))),
            Packet::Unsubscribe(u) => Ok(Some(Box::pin(async move {
                self.on_unsubscribe(u).await;
                Ok(())
            }))),
            p => self.handle_now(p).map(|()| None),
        }
    }

    fn handle_now(&mut self, p: Packet) -> Result<(), Close> {
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
            Packet::Subscribe(_) | Packet::Unsubscribe(_) => Ok(()),
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
        if let Some(t) = &mut self.publish_rate {
            let wait = t.rate.take_or_wait(Instant::now());
            if !wait.is_zero() {
                t.until = Some(tokio::time::Instant::now() + wait);
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
            crate::trace::receive(
                &p.properties,
                &self.session.client_id,
                &p.topic,
                p.qos.as_u8(),
            )
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
            let publisher = Some(self.session.client_id.clone());
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
            let outcome = SCRATCH.with(|s| match s.try_borrow_mut() {
                Ok(mut scratch) => {
                    let outcome = self.broker.publish(msg, &mut scratch);
                    // Matches hold sessions: let go of them now.
                    scratch.clear();
                    outcome
                }
                Err(_) => self.broker.publish(msg, &mut Vec::new()),
            });
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
            self.blocked = remote.map(Box::new);
            return Ok(());
        };
        if remote.is_some() || self.acks_len() > 0 {
            // Acknowledge once Redis holds it, and in order.
            let qos = p.qos;
            let acks = self.acks.get_or_insert_with(Default::default);
            acks.push_back(Box::pin(async move {
                let stored = match remote {
                    Some(r) => r.finish().await,
                    None => Ok(()),
                };
                (stored, qos, id, code)
            }));
            return Ok(());
        }
        self.on_stored((Ok(()), p.qos, id, code))
    }

    /// A publish is stored (or failed to be): acknowledge it. A message
    /// the store did not take is never acknowledged as a success.
    fn on_stored(
        &mut self,
        (stored, qos, id, code): (Result<(), StoreFail>, QoS, PacketId, u8),
    ) -> Result<(), Close> {
        if code == SEND_PUBREL {
            // An outgoing QoS 2 message whose delivery Redis recorded (or
            // could not: the client gets it again, under the same id, from
            // whichever pod serves it next).
            return match stored {
                Ok(()) => {
                    // Not on a connection that was taken over meanwhile.
                    if self.session.state.lock().epoch == self.epoch {
                        self.send(&Packet::PubRel(PubResp::new(id, reason::SUCCESS)));
                    }
                    Ok(())
                }
                Err(e) => {
                    debug!(client_id = %self.session.client_id, pid = id.get(), error = ?e, "PUBREL withheld");
                    Err(Close::Violation(
                        reason::UNSPECIFIED_ERROR,
                        "the store did not record a delivered message",
                    ))
                }
            };
        }
        if let Err(fail) = stored {
            Stats::inc(&self.broker.stats.publish_store_failed);
            if !self.v5() {
                // 3.1.1 has no way to say it failed: the client resends
                // after reconnecting.
                return Err(Close::Violation(
                    reason::UNSPECIFIED_ERROR,
                    "the store did not take the message",
                ));
            }
            let p = PubResp::new(id, fail.reason_code());
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
        let cache = self.acl_cache.get_or_insert_with(Default::default);
        if let Some(&ok) = cache.get(topic) {
            return ok;
        }
        let ok = self
            .identity
            .allowed(&self.session.client_id, Access::Publish, topic);
        if cache.len() >= ACL_CACHE_MAX {
            cache.clear();
        }
        cache.insert(topic.clone(), ok);
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
                let recorded = self
                    .broker
                    .store
                    .records_qos2(st.inflight[i].delivery.ack.as_deref());
                // The receiver has it: its stream entry is done. One of the
                // session's stream keeps its entry reference while Redis
                // records it (the release leaves it out of `rel`).
                let ack = if recorded {
                    st.inflight[i].delivery.ack.clone()
                } else {
                    st.inflight[i].delivery.ack.take()
                };
                drop(st);
                // A message of the session's Redis stream: the client
                // forgets the packet id once it has the PUBREL, so Redis
                // must first know that the message is delivered and that
                // the id awaits PUBCOMP; else the next pod would send the
                // message again, or give the id to another message.
                let stored = ack.as_deref().and_then(|a| {
                    self.broker.store.delivered_qos2(
                        &self.session.client_id,
                        a,
                        r.packet_id,
                        self.epoch,
                    )
                });
                if let Some(stored) = stored {
                    let pid = r.packet_id;
                    let acks = self.acks.get_or_insert_with(Default::default);
                    acks.push_back(Box::pin(async move {
                        (stored.finish().await, QoS::ExactlyOnce, pid, SEND_PUBREL)
                    }));
                    return;
                }
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
            if expect == OutState::AwaitComp {
                // Its entry went with PUBREC; the recorded packet id goes.
                self.broker.store.completed_qos2(&self.session, pid);
            } else {
                self.stream_ack(done.delivery.ack);
            }
            self.pump();
        }
    }

    /// Redis store: the client has a message of a stream (its session's,
    /// or a shared group's): let go of the entry.
    fn stream_ack(&self, ack: Option<Box<StoreAck>>) {
        self.broker.store.ack(&self.session.client_id, ack);
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
                            &self.session.client_id,
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
                        Ok(existed) => {
                            let broker = self.broker.clone();
                            match broker
                                .store
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
                        let broker = self.broker.clone();
                        broker.store.unsubscribed(&self.session, f).await;
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
        // Stopped for a packet id still in flight: the PUBACK/PUBCOMP that
        // frees it pumps again; ringing our own wake now would spin (and
        // starve the futures that send that PUBREL).
        let mut waiting_for_id = false;
        while n < PUMP_BATCH && self.out.wbuf.len() < WRITE_HIGH_WATER {
            let Some(front) = st.queue.front() else { break };
            if front.qos != QoS::AtMostOnce && st.inflight.len() >= usize::from(self.window) {
                break;
            }
            // A message of the session's stream keeps one packet id on
            // every pod, so a client that holds a QoS 2 id from a previous
            // connection sees the resend as the same message [MQTT-4.3.3].
            // Two messages sharing an id: the second waits for the first.
            let stable = match (front.qos, front.ack.as_deref()) {
                (QoS::AtMostOnce, _) => None,
                (_, Some(a)) => a.session_id().map(crate::session::stable_packet_id),
                _ => None,
            };
            if stable.is_some_and(|pid| st.find_inflight(pid).is_some()) {
                waiting_for_id = true;
                break;
            }
            let Some(d) = st.queue.pop_front() else { break };
            n += 1;
            if d.msg.is_expired(now) {
                stats.dropped(DropReason::Expired);
                self.stream_ack(d.ack);
                continue;
            }
            let pid = match d.qos {
                QoS::AtMostOnce => None,
                _ => Some(stable.unwrap_or_else(|| st.next_packet_id())),
            };
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
        let more = !waiting_for_id
            && st.queue.front().is_some_and(|f| {
                f.qos == QoS::AtMostOnce || st.inflight.len() < usize::from(self.window)
            });
        let queued = st.queue.len();
        drop(st);
        if n > 0 {
            self.session.drained(queued, self.broker.queue_limits());
        }
        if more {
            // Batch bound reached: continue after this write.
            self.signal.wake();
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
            let aliases = self.alias_out.get_or_insert_with(Default::default);
            if let Some(&a) = aliases.get(&m.topic) {
                alias = Some(a);
                topic = "";
            } else if aliases.len() < usize::from(self.client_alias_max) {
                let a = aliases.len() as u16 + 1;
                aliases.insert(m.topic.clone(), a);
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
            if let (true, Some(aliases)) = (new_alias, self.alias_out.as_mut()) {
                aliases.remove(&m.topic);
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
    use std::sync::Arc;

    /// What an idle connection costs is mostly its task: keep the state it
    /// holds while it waits small (the opening, subscribe, Redis and
    /// blocked-write states are boxed out of it, nothing is stored twice).
    #[tokio::test]
    async fn an_idle_connection_task_stays_small() {
        let cfg = Arc::new(crate::config::Config::default());
        let auth = crate::auth::Auth::new(None, 10).unwrap();
        let local = crate::local::Local::new(cfg, false);
        let broker = crate::broker::Broker::new(local, auth, crate::store::Store::Memory);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let stream = tokio::net::TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let permit = Arc::new(tokio::sync::Semaphore::new(1))
            .try_acquire_owned()
            .unwrap();
        let f = super::serve(
            broker,
            stream,
            "127.0.0.1:1".parse().unwrap(),
            None,
            tokio_util::sync::CancellationToken::new(),
            permit,
        );
        let size = std::mem::size_of_val(&f);
        assert!(size <= 768, "connection future is {size} bytes");
        let conn = std::mem::size_of::<super::Conn<tokio::net::TcpStream>>();
        assert!(conn <= 480, "connection state is {conn} bytes");
        let session = std::mem::size_of::<crate::session::Session>();
        assert!(session <= 320, "session is {session} bytes");
    }
}
