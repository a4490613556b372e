//! MQTT over WebSocket: the HTTP upgrade (path `/mqtt`, subprotocol `mqtt`)
//! and an adapter that turns the WebSocket's binary messages back into a
//! byte stream, so the connection code is the same for every transport.

use std::pin::Pin;
use std::task::{ready, Context, Poll};

use bytes::Bytes;
use futures_util::{Sink, Stream};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};
use tokio_tungstenite::tungstenite::http::{HeaderValue, StatusCode};
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

pub const PATH: &str = "/mqtt";

/// Accept the upgrade. Another path is 404; a client that offers
/// subprotocols but not `mqtt` is refused (MQTT 5, 6.0).
pub async fn accept<S>(
    stream: S,
    max_message: usize,
) -> Result<WsIo<S>, tokio_tungstenite::tungstenite::Error>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    // The signature is tungstenite's `Callback`; its error type is theirs.
    #[allow(clippy::result_large_err)]
    let check = |req: &Request, mut resp: Response| -> Result<Response, ErrorResponse> {
        let refuse = |code: StatusCode| {
            let mut r = ErrorResponse::new(None);
            *r.status_mut() = code;
            r
        };
        if req.uri().path() != PATH {
            return Err(refuse(StatusCode::NOT_FOUND));
        }
        if let Some(offered) = req.headers().get("Sec-WebSocket-Protocol") {
            let ok = offered
                .to_str()
                .unwrap_or("")
                .split(',')
                .any(|p| p.trim() == "mqtt");
            if !ok {
                return Err(refuse(StatusCode::BAD_REQUEST));
            }
            resp.headers_mut()
                .insert("Sec-WebSocket-Protocol", HeaderValue::from_static("mqtt"));
        }
        Ok(resp)
    };
    let mut config = WebSocketConfig::default();
    config.max_message_size = Some(max_message);
    config.max_frame_size = Some(max_message);
    let ws = tokio_tungstenite::accept_hdr_async_with_config(stream, check, Some(config)).await?;
    Ok(WsIo {
        ws,
        read: Bytes::new(),
    })
}

/// A WebSocket as a byte stream: binary messages in, one binary message per
/// write out.
pub struct WsIo<S> {
    ws: WebSocketStream<S>,
    /// The rest of the binary message being read.
    read: Bytes,
}

fn io_err(e: tokio_tungstenite::tungstenite::Error) -> std::io::Error {
    std::io::Error::other(e)
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for WsIo<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        while this.read.is_empty() {
            match ready!(Pin::new(&mut this.ws).poll_next(cx)) {
                Some(Ok(Message::Binary(b))) => this.read = b,
                // MQTT is only binary frames ([MQTT-6.0.0-1]): close.
                Some(Ok(Message::Text(_))) | Some(Ok(Message::Close(_))) | None => {
                    return Poll::Ready(Ok(()))
                }
                // Pings are answered by tungstenite itself.
                Some(Ok(_)) => {}
                Some(Err(e)) => return Poll::Ready(Err(io_err(e))),
            }
        }
        let n = this.read.len().min(buf.remaining());
        buf.put_slice(&this.read.split_to(n));
        Poll::Ready(Ok(()))
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for WsIo<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        ready!(Pin::new(&mut this.ws).poll_ready(cx)).map_err(io_err)?;
        Pin::new(&mut this.ws)
            .start_send(Message::Binary(Bytes::copy_from_slice(data)))
            .map_err(io_err)?;
        Poll::Ready(Ok(data.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().ws)
            .poll_flush(cx)
            .map_err(io_err)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().ws)
            .poll_close(cx)
            .map_err(io_err)
    }
}
