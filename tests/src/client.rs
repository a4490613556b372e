//! A small MQTT client for tests, on the project's codec. It does only what
//! a test says: no automatic acknowledgements, no retries, so a test can
//! check each packet the broker sends.

use std::net::SocketAddr;
use std::num::NonZeroU16;
use std::time::Duration;

use bytes::Bytes;
use cirrus_codec::{
    ByteString, ConnAck, Connect, Disconnect, LastWill, MqttCodec, Packet, Properties, Protocol,
    PubResp, Publish, QoS, SubAck, Subscribe, SubscriptionOptions, UnsubAck, Unsubscribe,
};
use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio_util::codec::Framed;

use crate::TIMEOUT;

/// CONNECT options; `Opts::v5("id")` and `Opts::v311("id")` start from the
/// usual values.
#[derive(Debug, Clone)]
pub struct Opts {
    pub protocol: Protocol,
    pub client_id: String,
    pub clean_start: bool,
    pub keep_alive: u16,
    pub properties: Properties,
    pub will: Option<LastWill>,
    pub username: Option<String>,
    pub password: Option<Vec<u8>>,
}

impl Opts {
    pub fn new(protocol: Protocol, client_id: &str) -> Opts {
        Opts {
            protocol,
            client_id: client_id.to_string(),
            clean_start: true,
            keep_alive: 60,
            properties: Properties::default(),
            will: None,
            username: None,
            password: None,
        }
    }
    pub fn v5(client_id: &str) -> Opts {
        Opts::new(Protocol::V5, client_id)
    }
    pub fn v311(client_id: &str) -> Opts {
        Opts::new(Protocol::V3_1_1, client_id)
    }
    pub fn persistent(mut self, expiry: u32) -> Opts {
        self.clean_start = false;
        self.properties.session_expiry_interval = Some(expiry);
        self
    }
    pub fn resume(mut self) -> Opts {
        self.clean_start = false;
        self
    }
}

/// What the next read brought.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
pub enum Next {
    Packet(Packet),
    Closed,
    Timeout,
}

/// A byte stream the client speaks MQTT on: TCP, or TLS over TCP.
trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

pub struct Client {
    framed: Framed<Box<dyn Io>, MqttCodec>,
    pub protocol: Protocol,
    next_pid: u16,
}

pub fn pid(v: u16) -> NonZeroU16 {
    NonZeroU16::new(v).expect("non-zero packet id")
}

pub fn publish_packet(
    topic: &str,
    payload: &[u8],
    qos: QoS,
    retain: bool,
    packet_id: Option<u16>,
) -> Publish {
    Publish {
        dup: false,
        qos,
        retain,
        topic: ByteString::from(topic),
        packet_id: packet_id.map(pid),
        properties: Properties::default(),
        payload: Bytes::copy_from_slice(payload),
    }
}

fn connect_packet(o: Opts) -> Packet {
    Packet::Connect(Box::new(Connect {
        protocol: o.protocol,
        clean_start: o.clean_start,
        keep_alive: o.keep_alive,
        properties: o.properties,
        client_id: ByteString::from(o.client_id),
        will: o.will,
        username: o.username.map(ByteString::from),
        password: o.password.map(Bytes::from),
    }))
}

impl Client {
    /// Open a TCP connection without sending anything.
    pub async fn raw(addr: SocketAddr, protocol: Protocol) -> Client {
        let stream = tokio::time::timeout(TIMEOUT, TcpStream::connect(addr))
            .await
            .expect("connect timed out")
            .expect("connect");
        Client::on(Box::new(stream), protocol)
    }

    fn on(stream: Box<dyn Io>, protocol: Protocol) -> Client {
        Client {
            framed: Framed::new(stream, MqttCodec::new(protocol, 1 << 28)),
            protocol,
            next_pid: 0,
        }
    }

    /// Connect over TLS to `addr`, checking the server's certificate
    /// against `ca_pem` for the name `server_name`, and return the CONNACK.
    pub async fn connect_tls(
        addr: SocketAddr,
        server_name: &str,
        ca_pem: &[u8],
        o: Opts,
    ) -> (Client, ConnAck) {
        match Client::try_connect_tls(addr, server_name, ca_pem, o).await {
            Ok(c) => c,
            Err(e) => panic!("{e}"),
        }
    }

    /// [`Client::connect_tls`], with what failed (connect, handshake,
    /// CONNACK) as the error.
    pub async fn try_connect_tls(
        addr: SocketAddr,
        server_name: &str,
        ca_pem: &[u8],
        o: Opts,
    ) -> Result<(Client, ConnAck), String> {
        use rustls_pki_types::pem::PemObject;
        let mut roots = rustls::RootCertStore::empty();
        for cert in rustls_pki_types::CertificateDer::pem_slice_iter(ca_pem) {
            let cert = cert.map_err(|e| format!("CA PEM: {e}"))?;
            roots
                .add(cert)
                .map_err(|e| format!("CA certificate: {e}"))?;
        }
        let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| format!("TLS versions: {e}"))?
            .with_root_certificates(roots)
            .with_no_client_auth();
        let name = rustls_pki_types::ServerName::try_from(server_name.to_string())
            .map_err(|e| format!("server name: {e}"))?;
        let tcp = tokio::time::timeout(TIMEOUT, TcpStream::connect(addr))
            .await
            .map_err(|_| "connect timed out".to_string())?
            .map_err(|e| format!("connect: {e}"))?;
        let tls = tokio::time::timeout(
            TIMEOUT,
            tokio_rustls::TlsConnector::from(std::sync::Arc::new(config)).connect(name, tcp),
        )
        .await
        .map_err(|_| "TLS handshake timed out".to_string())?
        .map_err(|e| format!("TLS handshake: {e}"))?;
        let mut c = Client::on(Box::new(tls), o.protocol);
        if !c.try_send(connect_packet(o)).await {
            return Err("CONNECT not sent".into());
        }
        match c.next(TIMEOUT).await {
            Next::Packet(Packet::ConnAck(a)) => Ok((c, a)),
            other => Err(format!("no CONNACK: {other:?}")),
        }
    }

    /// Connect and return the CONNACK, whatever its code.
    pub async fn connect(addr: SocketAddr, o: Opts) -> (Client, ConnAck) {
        Client::raw(addr, o.protocol).await.handshake(o).await
    }

    /// Connect and return the CONNACK, or `None` when the connection is
    /// refused, closed or silent before one came (the address may lead to
    /// a pod that is going away).
    pub async fn try_connect(addr: SocketAddr, o: Opts) -> Option<(Client, ConnAck)> {
        let stream = tokio::time::timeout(TIMEOUT, TcpStream::connect(addr))
            .await
            .ok()?
            .ok()?;
        let mut c = Client::on(Box::new(stream), o.protocol);
        if !c.try_send(connect_packet(o)).await {
            return None;
        }
        match c.next(TIMEOUT).await {
            Next::Packet(Packet::ConnAck(a)) => Some((c, a)),
            _ => None,
        }
    }

    async fn handshake(mut self, o: Opts) -> (Client, ConnAck) {
        let c = &mut self;
        c.send(connect_packet(o)).await;
        match c.recv().await {
            Packet::ConnAck(a) => (self, a),
            other => panic!("expected CONNACK, got {other:?}"),
        }
    }

    /// Connect and insist on success.
    pub async fn connect_ok(addr: SocketAddr, o: Opts) -> Client {
        let (c, ack) = Client::connect(addr, o).await;
        assert_eq!(ack.reason_code, 0, "CONNACK refused: {ack:?}");
        c
    }

    pub fn next_pid(&mut self) -> NonZeroU16 {
        self.next_pid = self.next_pid.wrapping_add(1).max(1);
        pid(self.next_pid)
    }

    pub async fn send(&mut self, p: Packet) {
        tokio::time::timeout(TIMEOUT, self.framed.send(p))
            .await
            .expect("send timed out")
            .expect("send");
    }

    /// Write raw bytes on the socket.
    pub async fn send_raw(&mut self, bytes: &[u8]) {
        use tokio::io::AsyncWriteExt;
        let s = self.framed.get_mut();
        let _ = tokio::time::timeout(TIMEOUT, s.write_all(bytes)).await;
    }

    pub async fn next(&mut self, wait: Duration) -> Next {
        match tokio::time::timeout(wait, self.framed.next()).await {
            Err(_) => Next::Timeout,
            Ok(None) | Ok(Some(Err(_))) => Next::Closed,
            Ok(Some(Ok(p))) => Next::Packet(p),
        }
    }

    /// The next packet; fails the test on timeout or close.
    pub async fn recv(&mut self) -> Packet {
        match self.next(TIMEOUT).await {
            Next::Packet(p) => p,
            other => panic!("expected a packet, got {other:?}"),
        }
    }

    pub async fn recv_publish(&mut self) -> Publish {
        match self.recv().await {
            Packet::Publish(p) => p,
            other => panic!("expected PUBLISH, got {other:?}"),
        }
    }

    /// Assert that nothing arrives within `wait`.
    pub async fn expect_nothing(&mut self, wait: Duration) {
        match self.next(wait).await {
            Next::Timeout => {}
            other => panic!("expected nothing, got {other:?}"),
        }
    }

    /// Read until the broker closes the connection; returns the DISCONNECT
    /// it sent first, if any. Fails if the socket stays open.
    pub async fn expect_closed(&mut self) -> Option<Disconnect> {
        let mut disconnect = None;
        loop {
            match self.next(TIMEOUT).await {
                Next::Closed => return disconnect,
                Next::Packet(Packet::Disconnect(d)) => disconnect = Some(d),
                Next::Packet(_) => {}
                Next::Timeout => panic!("connection was not closed"),
            }
        }
    }

    pub async fn subscribe_with(
        &mut self,
        filters: &[(&str, SubscriptionOptions)],
        properties: Properties,
    ) -> SubAck {
        let packet_id = self.next_pid();
        self.send(Packet::Subscribe(Subscribe {
            packet_id,
            properties,
            filters: filters
                .iter()
                .map(|(f, o)| (ByteString::from(*f), *o))
                .collect(),
        }))
        .await;
        match self.recv().await {
            Packet::SubAck(a) => {
                assert_eq!(a.packet_id, packet_id);
                a
            }
            other => panic!("expected SUBACK, got {other:?}"),
        }
    }

    /// Subscribe to one filter; returns its SUBACK code.
    pub async fn subscribe(&mut self, filter: &str, qos: QoS) -> u8 {
        let a = self
            .subscribe_with(
                &[(filter, SubscriptionOptions::new(qos))],
                Properties::default(),
            )
            .await;
        a.reason_codes[0]
    }

    pub async fn unsubscribe(&mut self, filters: &[&str]) -> UnsubAck {
        let packet_id = self.next_pid();
        self.send(Packet::Unsubscribe(Unsubscribe {
            packet_id,
            properties: Properties::default(),
            filters: filters.iter().map(|f| ByteString::from(*f)).collect(),
        }))
        .await;
        match self.recv().await {
            Packet::UnsubAck(a) => a,
            other => panic!("expected UNSUBACK, got {other:?}"),
        }
    }

    /// Publish and complete the QoS flow; returns the PUBACK/PUBREC reason
    /// code (0 for QoS 0).
    pub async fn publish_full(&mut self, mut p: Publish) -> u8 {
        if p.qos != QoS::AtMostOnce && p.packet_id.is_none() {
            p.packet_id = Some(self.next_pid());
        }
        let qos = p.qos;
        let id = p.packet_id;
        self.send(Packet::Publish(p)).await;
        match qos {
            QoS::AtMostOnce => 0,
            QoS::AtLeastOnce => match self.recv().await {
                Packet::PubAck(a) if Some(a.packet_id) == id => a.reason_code,
                other => panic!("expected PUBACK, got {other:?}"),
            },
            QoS::ExactlyOnce => {
                let code = match self.recv().await {
                    Packet::PubRec(a) if Some(a.packet_id) == id => a.reason_code,
                    other => panic!("expected PUBREC, got {other:?}"),
                };
                if code < 0x80 {
                    let id = id.expect("qos 2 id");
                    self.send(Packet::PubRel(PubResp::new(id, 0))).await;
                    match self.recv().await {
                        Packet::PubComp(c) if c.packet_id == id => {}
                        other => panic!("expected PUBCOMP, got {other:?}"),
                    }
                }
                code
            }
        }
    }

    pub async fn publish(&mut self, topic: &str, payload: &[u8], qos: QoS, retain: bool) -> u8 {
        self.publish_full(publish_packet(topic, payload, qos, retain, None))
            .await
    }

    /// Acknowledge a received PUBLISH as its QoS requires (QoS 2: PUBREC,
    /// then the PUBREL/PUBCOMP exchange).
    pub async fn ack(&mut self, p: &Publish) {
        match (p.qos, p.packet_id) {
            (QoS::AtLeastOnce, Some(id)) => self.send(Packet::PubAck(PubResp::new(id, 0))).await,
            (QoS::ExactlyOnce, Some(id)) => {
                self.send(Packet::PubRec(PubResp::new(id, 0))).await;
                match self.recv().await {
                    Packet::PubRel(r) if r.packet_id == id => {}
                    other => panic!("expected PUBREL, got {other:?}"),
                }
                self.send(Packet::PubComp(PubResp::new(id, 0))).await;
            }
            _ => {}
        }
    }

    /// Send a packet; false when the connection is gone (instead of failing).
    pub async fn try_send(&mut self, p: Packet) -> bool {
        matches!(
            tokio::time::timeout(TIMEOUT, self.framed.send(p)).await,
            Ok(Ok(()))
        )
    }

    /// Receive a PUBLISH and acknowledge it.
    pub async fn recv_ack(&mut self) -> Publish {
        let p = self.recv_publish().await;
        self.ack(&p).await;
        p
    }

    pub async fn ping(&mut self) {
        self.send(Packet::PingReq).await;
        match self.recv().await {
            Packet::PingResp => {}
            other => panic!("expected PINGRESP, got {other:?}"),
        }
    }

    pub async fn disconnect(mut self) {
        self.send(Packet::Disconnect(Disconnect::default())).await;
        let _ = self.next(Duration::from_secs(2)).await;
    }

    /// Drop the socket without DISCONNECT (an abnormal close).
    pub fn drop_connection(self) {
        drop(self);
    }
}
