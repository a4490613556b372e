//! Accept loops. Connections are capped by a semaphore; a client over the
//! cap gets a CONNACK "Server busy" from a small, separately capped pool of
//! refusal tasks, and beyond that its socket is simply closed.

use std::sync::Arc;
use std::time::Duration;

use cirrus_codec::{reason, ConnAck, Packet};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, warn};

use crate::broker::Broker;
use crate::stats::Stats;

/// Refusals answered at once; more are closed without a word.
const MAX_PENDING_REFUSALS: usize = 64;

pub async fn serve_tcp(
    broker: Arc<Broker>,
    listener: TcpListener,
    shutdown: CancellationToken,
    tracker: TaskTracker,
) {
    let permits = Arc::new(Semaphore::new(broker.config.limits.max_connections));
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
        let rate_ok = rate
            .as_mut()
            .is_none_or(|r| r.try_take(std::time::Instant::now()));
        match permits.clone().try_acquire_owned() {
            Ok(permit) if rate_ok => {
                let shutdown = shutdown.clone();
                tracker.spawn(async move {
                    crate::connection::serve(broker, stream, peer, shutdown).await;
                    drop(permit);
                });
            }
            _ => {
                Stats::inc(&broker.stats.connections_refused);
                let Ok(permit) = refusals.clone().try_acquire_owned() else {
                    debug!(%peer, "connection limit reached; closing");
                    continue;
                };
                let (v5, v3) = if rate_ok {
                    (reason::SERVER_BUSY, reason::v3::SERVER_UNAVAILABLE)
                } else {
                    (
                        reason::CONNECTION_RATE_EXCEEDED,
                        reason::v3::SERVER_UNAVAILABLE,
                    )
                };
                tracker.spawn(async move {
                    refuse(broker, stream, v5, v3).await;
                    drop(permit);
                });
            }
        }
    }
}

/// Read the CONNECT (briefly) and answer with a refusal in the client's version.
async fn refuse(broker: Arc<Broker>, mut stream: tokio::net::TcpStream, v5_code: u8, v3_code: u8) {
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
        let code = if protocol.is_v5() { v5_code } else { v3_code };
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
        let _ = tokio::time::timeout(Duration::from_secs(1), stream.write_all(&out)).await;
    }
}
