//! MQTT over WebSocket and secure WebSocket, with paho (Python) as the
//! client, and the HTTP upgrade's refusals.

use std::time::Duration;

use cirrus_codec::QoS;
use cirrus_e2e::{run_python, BrokerProcess, Client, Opts};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const PAHO_WS: &str = r#"
import sys, ssl, threading
import paho.mqtt.client as mqtt
port, topic, cafile = int(sys.argv[1]), sys.argv[2], sys.argv[3]
got = threading.Event()
c = mqtt.Client(client_id="paho-ws-" + topic.replace("/", "-"), protocol=mqtt.MQTTv5, transport="websockets")
c.ws_set_options(path="/mqtt")
if cafile != "-":
    c.tls_set(ca_certs=cafile)
c.on_message = lambda cl, u, m: got.set() if m.payload == b"ws-hello" else None
subscribed = threading.Event()
c.on_subscribe = lambda *a, **k: subscribed.set()
c.connect("127.0.0.1", port)
c.loop_start()
c.subscribe(topic, qos=1)
assert subscribed.wait(10), "no SUBACK"
c.publish(topic, "ws-hello", qos=1).wait_for_publish(10)
assert got.wait(10), "own message not received"
c.disconnect(); c.loop_stop()
print("ok")
"#;

async fn paho(port: u16, topic: &str, cafile: &str) {
    let out = run_python(PAHO_WS, &[&port.to_string(), topic, cafile]).await;
    assert!(out.contains("ok"), "{out}");
}

#[tokio::test]
async fn websocket_clients_meet_tcp_clients() {
    let b = BrokerProcess::start(&["--ws-listen", "127.0.0.1:0"]);
    let mut tcp = Client::connect_ok(b.addr, Opts::v311("tcp-side")).await;
    tcp.subscribe("ws/#", QoS::AtLeastOnce).await;
    paho(b.addrs["ws"].port(), "ws/a", "-").await;
    let m = tcp.recv_ack().await;
    assert_eq!((&m.topic[..], &m.payload[..]), ("ws/a", &b"ws-hello"[..]));
}

#[tokio::test]
async fn secure_websocket_uses_the_tls_certificates() {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};
    let dir = std::env::temp_dir().join(format!("cirrus-wss-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let ca_key = KeyPair::generate().unwrap();
    let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.distinguished_name.push(DnType::CommonName, "WSS CA");
    let ca = p.self_signed(&ca_key).unwrap();
    let key = KeyPair::generate().unwrap();
    let cert = CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()])
        .unwrap()
        .signed_by(&key, &ca, &ca_key)
        .unwrap();
    let w = |n: &str, c: String| {
        let f = dir.join(n);
        std::fs::write(&f, c).unwrap();
        f.to_str().unwrap().to_string()
    };
    let (caf, cf, kf) = (
        w("ca.pem", ca.pem()),
        w("s.pem", cert.pem()),
        w("s.key", key.serialize_pem()),
    );
    let b = BrokerProcess::start(&[
        "--wss-listen",
        "127.0.0.1:0",
        "--tls-cert",
        &cf,
        "--tls-key",
        &kf,
    ]);
    paho(b.addrs["wss"].port(), "wss/a", &caf).await;
    let _ = std::fs::remove_dir_all(&dir);
}

async fn upgrade(addr: std::net::SocketAddr, path: &str, protocol: &str) -> String {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let req = format!(
        "GET {path} HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: {protocol}\r\n\r\n"
    );
    s.write_all(req.as_bytes()).await.unwrap();
    let mut buf = vec![0u8; 1024];
    let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
        .await
        .unwrap()
        .unwrap();
    String::from_utf8_lossy(&buf[..n]).to_string()
}

#[tokio::test]
async fn websocket_upgrade_checks_path_and_subprotocol() {
    let b = BrokerProcess::start(&["--ws-listen", "127.0.0.1:0"]);
    let ws = b.addrs["ws"];
    let ok = upgrade(ws, "/mqtt", "mqtt").await;
    assert!(
        ok.starts_with("HTTP/1.1 101")
            && ok.to_lowercase().contains("sec-websocket-protocol: mqtt"),
        "{ok}"
    );
    assert!(upgrade(ws, "/other", "mqtt")
        .await
        .starts_with("HTTP/1.1 404"));
    assert!(upgrade(ws, "/mqtt", "chat")
        .await
        .starts_with("HTTP/1.1 400"));
}
