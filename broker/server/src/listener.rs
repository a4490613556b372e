//! Accept loops. Connections are capped by a semaphore (shared by all
//! listeners) and optionally rate limited per listener; a client over a
//! limit gets a CONNACK refusal from a small, separately capped pool of
//! refusal tasks, and beyond that its socket is simply closed.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use cirrus_codec::{reason, ConnAck, Packet};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, warn};

use crate::broker::Broker;
use crate::tls::TlsState;

/// Refusals answered at once; more are closed without a word.
const MAX_PENDING_REFUSALS: usize = 64;
/// Time a client has to finish the TLS handshake.
const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// What a listener speaks.
#[derive(Clone)]
pub enum Kind {
    Tcp,
    Tls(Arc<TlsState>),
    /// MQTT over WebSocket.
    Ws,
    /// MQTT over WebSocket over TLS.
    Wss(Arc<TlsState>),
}

pub async fn serve_listener(
    broker: Arc<Broker>,
    listener: TcpListener,
    kind: Kind,
    permits: Arc<Semaphore>,
    shutdown: CancellationToken,
    tracker: TaskTracker,
) {
    let refusals = Arc::new(Semaphore::new(MAX_PENDING_REFUSALS));
    let mut rate = crate::stats::RateLimit::new(broker.config.limits.max_connection_rate);
    loop {
        let accepted = tokio::select! {
            _ = shutdown.cancelled() => break,
            r = listener.accept() => r,
        };
        let (stream, peer) = match accepted {
            Ok(a) => a,
            Err(e) => {
                // Out of file descriptors and the like: back off, keep serving.
                warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let broker = broker.clone();
        let kind = kind.clone();
        let rate_ok = rate
            .as_mut()
            .is_none_or(|r| r.try_take(std::time::Instant::now()));
        match permits.clone().try_acquire_owned() {
            Ok(permit) if rate_ok => {
                let shutdown = shutdown.clone();
                // One spawn per kind: each task is as large as its own kind's
                // state (a TLS or WebSocket connection's is several times a
                // plain TCP one's), which keeps idle connections small.
                match kind {
                    // Spawned as it is: wrapped in another async block, the
                    // future would be stored twice (captured, then awaited).
                    Kind::Tcp => {
                        tracker.spawn(crate::connection::serve(
                            broker, stream, peer, None, shutdown, permit,
                        ));
                    }
                    Kind::Tls(tls) => {
                        tracker.spawn(async move {
                            if let Some((s, user)) =
                                tls_handshake(&broker, stream, peer, &tls).await
                            {
                                crate::connection::serve(broker, s, peer, user, shutdown, permit)
                                    .await;
                            }
                        });
                    }
                    Kind::Ws => {
                        tracker.spawn(serve_ws(broker, stream, peer, None, shutdown, permit));
                    }
                    Kind::Wss(tls) => {
                        tracker.spawn(async move {
                            if let Some((s, user)) =
                                tls_handshake(&broker, stream, peer, &tls).await
                            {
                                serve_ws(broker, s, peer, user, shutdown, permit).await;
                            }
                        });
                    }
                }
            }
            _ => {
                broker.stats.refused(crate::stats::Refused::ConnectionLimit);
                let Ok(permit) = refusals.clone().try_acquire_owned() else {
                    debug!(%peer, "connection limit reached; closing");
                    continue;
                };
                let code = if rate_ok {
                    reason::SERVER_BUSY
                } else {
                    reason::CONNECTION_RATE_EXCEEDED
                };
                tracker.spawn(async move {
                    match kind {
                        Kind::Tcp => refuse(broker, stream, code).await,
                        Kind::Tls(tls) => {
                            if let Ok(Ok(s)) = tokio::time::timeout(
                                TLS_HANDSHAKE_TIMEOUT,
                                tls.acceptor().accept(stream),
                            )
                            .await
                            {
                                refuse(broker, s, code).await;
                            }
                        }
                        // Over WebSocket the refusal is the closed socket.
                        Kind::Ws | Kind::Wss(_) => drop(stream),
                    }
                    drop(permit);
                });
            }
        }
    }
}

/// The TLS handshake, and the user name a client certificate stands for.
async fn tls_handshake(
    broker: &Broker,
    stream: TcpStream,
    peer: SocketAddr,
    tls: &TlsState,
) -> Option<(tokio_rustls::server::TlsStream<TcpStream>, Option<String>)> {
    let handshake =
        tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, tls.acceptor().accept(stream)).await;
    let stream = match handshake {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            debug!(%peer, error = %e, "TLS handshake failed");
            broker.stats.refused(crate::stats::Refused::Tls);
            return None;
        }
        Err(_) => {
            debug!(%peer, "TLS handshake timed out");
            broker.stats.refused(crate::stats::Refused::Tls);
            return None;
        }
    };
    let cert_user = if tls.cert_as_username {
        let (_, conn) = stream.get_ref();
        conn.peer_certificates()
            .and_then(|c| c.first())
            .and_then(|c| crate::tls::common_name(c))
    } else {
        None
    };
    Some((stream, cert_user))
}

async fn serve_ws<S>(
    broker: Arc<Broker>,
    stream: S,
    peer: SocketAddr,
    cert_user: Option<String>,
    shutdown: CancellationToken,
    permit: OwnedSemaphorePermit,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send,
{
    // A WebSocket message carries at least one whole MQTT packet.
    let max = broker.config.limits.max_packet_size as usize + 16;
    match tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, crate::websocket::accept(stream, max)).await {
        Ok(Ok(ws)) => crate::connection::serve(broker, ws, peer, cert_user, shutdown, permit).await,
        Ok(Err(e)) => debug!(%peer, error = %e, "WebSocket upgrade failed"),
        Err(_) => debug!(%peer, "WebSocket upgrade timed out"),
    }
}

/// Read the CONNECT (briefly) and answer with a refusal in the client's
/// version (MQTT 3.x gets "Server unavailable").
async fn refuse<S: AsyncRead + AsyncWrite + Unpin>(
    broker: Arc<Broker>,
    mut stream: S,
    v5_code: u8,
) {
    let mut buf = bytes::BytesMut::with_capacity(512);
    let max = broker.config.limits.max_packet_size as usize;
    let read = tokio::time::timeout(Duration::from_secs(2), async {
        loop {
            match cirrus_codec::decode(&mut buf, cirrus_codec::Protocol::V3_1_1, max) {
                Ok(Some(Packet::Connect(c))) => return Some(c.protocol),
                Ok(None) => {}
                _ => return None,
            }
            match tokio::io::AsyncReadExt::read_buf(&mut stream, &mut buf).await {
                Ok(0) | Err(_) => return None,
                Ok(_) => {}
            }
        }
    })
    .await;
    if let Ok(Some(protocol)) = read {
        let code = if protocol.is_v5() {
            v5_code
        } else {
            reason::v3::SERVER_UNAVAILABLE
        };
        let mut out = bytes::BytesMut::new();
        cirrus_codec::encode(
            &Packet::ConnAck(ConnAck {
                session_present: false,
                reason_code: code,
                properties: Default::default(),
            }),
            protocol,
            &mut out,
        );
        let _ = tokio::time::timeout(Duration::from_secs(1), async {
            let _ = stream.write_all(&out).await;
            let _ = stream.flush().await;
        })
        .await;
    }
}
