//! Interoperability with clients we did not write: Debian's
//! `mosquitto_pub`/`mosquitto_sub` and `python3-paho-mqtt`.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use cirrus_codec::{reason, QoS};
use cirrus_e2e::{run_python, tool, BrokerProcess, Client, Opts};

/// Wait until someone is subscribed to `topic`: a QoS 1 probe is answered
/// 0x10 while nobody is.
async fn wait_subscribed(addr: SocketAddr, topic: &str) {
    let mut c = Client::connect_ok(addr, Opts::v5("probe")).await;
    let end = Instant::now() + Duration::from_secs(10);
    while c.publish(topic, b"probe", QoS::AtLeastOnce, false).await
        == reason::NO_MATCHING_SUBSCRIBERS
    {
        assert!(Instant::now() < end, "nobody subscribed to {topic}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Run mosquitto_sub, returning a receiver of its output lines.
fn mosquitto_sub(addr: SocketAddr, args: &[&str]) -> (std::process::Child, mpsc::Receiver<String>) {
    let mut child = Command::new(tool("mosquitto_sub"))
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &addr.port().to_string(),
            "-W",
            "20",
        ])
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("mosquitto_sub");
    let out = child.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    (child, rx)
}

fn mosquitto_pub(addr: SocketAddr, args: &[&str]) {
    let status = Command::new(tool("mosquitto_pub"))
        .args(["-h", "127.0.0.1", "-p", &addr.port().to_string()])
        .args(args)
        .status()
        .expect("mosquitto_pub");
    assert!(status.success(), "mosquitto_pub {args:?} failed");
}

fn expect_lines(rx: &mpsc::Receiver<String>, want: &[&str]) {
    let end = Instant::now() + Duration::from_secs(10);
    let mut got = Vec::new();
    while got.len() < want.len() {
        let left = end.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(l) if l.ends_with(" probe") => {}
            Ok(l) => got.push(l),
            Err(_) => panic!("expected {want:?}, got {got:?}"),
        }
    }
    assert_eq!(got, want);
}

#[tokio::test]
async fn mosquitto_clients_at_every_qos_and_version() {
    let b = BrokerProcess::start(&[]);
    for version in ["mqttv31", "mqttv311", "mqttv5"] {
        for qos in ["0", "1", "2"] {
            let topic = format!("interop/{version}/{qos}");
            let (mut sub, rx) =
                mosquitto_sub(b.addr, &["-V", version, "-q", qos, "-t", &topic, "-v"]);
            wait_subscribed(b.addr, &topic).await;
            mosquitto_pub(
                b.addr,
                &["-V", version, "-q", qos, "-t", &topic, "-m", "hello"],
            );
            mosquitto_pub(
                b.addr,
                &["-V", version, "-q", qos, "-t", &topic, "-m", "world"],
            );
            expect_lines(&rx, &[&format!("{topic} hello"), &format!("{topic} world")]);
            let _ = sub.kill();
            let _ = sub.wait();
        }
    }
}

#[tokio::test]
async fn mosquitto_retained_and_wildcards() {
    let b = BrokerProcess::start(&[]);
    mosquitto_pub(
        b.addr,
        &[
            "-V",
            "mqttv5",
            "-q",
            "1",
            "-r",
            "-t",
            "home/kitchen/temp",
            "-m",
            "21.5",
        ],
    );
    mosquitto_pub(
        b.addr,
        &["-q", "1", "-r", "-t", "home/hall/temp", "-m", "19"],
    );
    let (mut sub, rx) = mosquitto_sub(b.addr, &["-t", "home/+/temp", "-v", "-C", "2"]);
    let mut got: Vec<String> = (0..2)
        .map(|_| rx.recv_timeout(Duration::from_secs(10)).expect("retained"))
        .collect();
    got.sort();
    assert_eq!(got, vec!["home/hall/temp 19", "home/kitchen/temp 21.5"]);
    let _ = sub.wait();
}

#[tokio::test]
async fn paho_python_v5_with_properties() {
    let b = BrokerProcess::start(&[]);
    let script = r#"
import sys, time, threading
import paho.mqtt.client as mqtt
from paho.mqtt.properties import Properties
from paho.mqtt.packettypes import PacketTypes

port = int(sys.argv[1])
got = threading.Event()
result = {}

def on_message(client, userdata, msg):
    result["topic"] = msg.topic
    result["payload"] = msg.payload.decode()
    result["qos"] = msg.qos
    result["user"] = getattr(msg.properties, "UserProperty", None)
    got.set()

subscribed = threading.Event()
sub = mqtt.Client(client_id="paho-sub", protocol=mqtt.MQTTv5)
sub.on_message = on_message
sub.on_subscribe = lambda *a, **k: subscribed.set()
sub.connect("127.0.0.1", port)
sub.loop_start()
sub.subscribe("paho/#", qos=2)
assert subscribed.wait(10), "no SUBACK"

pub = mqtt.Client(client_id="paho-pub", protocol=mqtt.MQTTv5)
pub.connect("127.0.0.1", port)
pub.loop_start()
props = Properties(PacketTypes.PUBLISH)
props.UserProperty = ("origin", "paho")
info = pub.publish("paho/test", "from paho", qos=2, properties=props)
info.wait_for_publish(10)
assert got.wait(10), "message not received"
assert result["topic"] == "paho/test", result
assert result["payload"] == "from paho", result
assert result["qos"] == 2, result
assert result["user"] == [("origin", "paho")], result
pub.disconnect(); sub.disconnect()
pub.loop_stop(); sub.loop_stop()
print("ok")
"#;
    let out = run_python(script, &[&b.addr.port().to_string()]).await;
    assert!(out.contains("ok"), "{out}");
}

#[tokio::test]
async fn paho_python_v311_persistent_session() {
    let b = BrokerProcess::start(&[]);
    let script = r#"
import sys, threading
import paho.mqtt.client as mqtt
port = int(sys.argv[1])
received = []
done = threading.Event()
def on_message(c, u, m):
    received.append(m.payload.decode())
    if len(received) == 3: done.set()
# First visit: subscribe with a persistent session, then leave.
c = mqtt.Client(client_id="paho-persist", clean_session=False, protocol=mqtt.MQTTv311)
c.connect("127.0.0.1", port); c.loop_start()
r, mid = c.subscribe("persist/t", qos=1)
import time; time.sleep(0.3)
c.disconnect(); c.loop_stop()
# Someone publishes while it is away.
p = mqtt.Client(client_id="paho-p", protocol=mqtt.MQTTv311)
p.connect("127.0.0.1", port); p.loop_start()
for i in range(3):
    p.publish("persist/t", str(i), qos=1).wait_for_publish(10)
p.disconnect(); p.loop_stop()
# Back: the queued messages arrive.
flags = {}
c = mqtt.Client(client_id="paho-persist", clean_session=False, protocol=mqtt.MQTTv311)
c.on_message = on_message
c.on_connect = lambda cl, u, f, rc: flags.update(f)
c.connect("127.0.0.1", port); c.loop_start()
assert done.wait(10), received
assert received == ["0", "1", "2"], received
assert flags.get("session present") == 1, flags
c.disconnect(); c.loop_stop()
print("ok")
"#;
    let out = run_python(script, &[&b.addr.port().to_string()]).await;
    assert!(out.contains("ok"), "{out}");
}
