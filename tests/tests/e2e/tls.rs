//! MQTT over TLS with real clients: `mosquitto_pub`/`mosquitto_sub` with
//! `--cafile`, `--cert`/`--key`; certificates made here with rcgen.

use std::process::{Command, Output};
use std::time::{Duration, Instant};

use cirrus_codec::QoS;
use cirrus_e2e::certs::{ca, leaf, Ca, Dir};
use cirrus_e2e::{tool, BrokerProcess, Client, Opts};

fn tls_port(b: &BrokerProcess) -> String {
    b.addrs["mqtts"].port().to_string()
}

/// mosquitto_pub over TLS; returns its output (success or not).
fn pub_tls(port: &str, extra: &[&str], topic: &str) -> Output {
    Command::new(tool("mosquitto_pub"))
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            port,
            "-t",
            topic,
            "-m",
            "over-tls",
            "-q",
            "1",
        ])
        .args(extra)
        .output()
        .unwrap()
}

/// Subscribe with our own client on the plain listener and wait for one message.
async fn expect_message(sub: &mut Client, topic: &str) {
    let m = sub.recv_ack().await;
    assert_eq!((&m.topic[..], &m.payload[..]), (topic, &b"over-tls"[..]));
}

fn server_files(dir: &Dir, ca: &Ca) -> (String, String, String) {
    let (cert, key) = leaf(ca, "broker", &["localhost", "127.0.0.1"], false, false);
    (
        dir.write("ca.pem", &ca.cert.pem()),
        dir.write("server.pem", &cert),
        dir.write("server.key", &key),
    )
}

#[tokio::test]
async fn tls_listener_with_mosquitto_clients() {
    let dir = Dir::new();
    let ca1 = ca("Cirrus Test CA");
    let (ca_file, cert, key) = server_files(&dir, &ca1);
    let b = BrokerProcess::start(&[
        "--tls-listen",
        "127.0.0.1:0",
        "--tls-cert",
        &cert,
        "--tls-key",
        &key,
    ]);
    let port = tls_port(&b);
    let mut sub = Client::connect_ok(b.addr, Opts::v5("plain-sub")).await;
    sub.subscribe("tls/#", QoS::AtLeastOnce).await;
    for (v, tlsv) in [
        ("mqttv311", "tlsv1.2"),
        ("mqttv5", "tlsv1.3"),
        ("mqttv31", "tlsv1.3"),
    ] {
        let out = pub_tls(
            &port,
            &["--cafile", &ca_file, "-V", v, "--tls-version", tlsv],
            &format!("tls/{v}"),
        );
        assert!(
            out.status.success(),
            "{v} over {tlsv}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        expect_message(&mut sub, &format!("tls/{v}")).await;
    }
    // A client that does not trust our CA is refused by its own verification.
    let other = ca("Someone Else");
    let other_file = dir.write("other.pem", &other.cert.pem());
    assert!(!pub_tls(&port, &["--cafile", &other_file], "tls/x")
        .status
        .success());
    // Plain MQTT on the TLS port is not served.
    let mut c = Client::raw(b.addrs["mqtts"], cirrus_codec::Protocol::V3_1_1).await;
    c.send(cirrus_codec::Packet::PingReq).await;
    assert!(matches!(
        c.next(Duration::from_secs(12)).await,
        cirrus_e2e::Next::Closed
    ));
}

#[tokio::test]
async fn client_certificates_are_verified() {
    let dir = Dir::new();
    let ca1 = ca("Cirrus Test CA");
    let (ca_file, cert, key) = server_files(&dir, &ca1);
    let b = BrokerProcess::start(&[
        "--tls-listen",
        "127.0.0.1:0",
        "--tls-cert",
        &cert,
        "--tls-key",
        &key,
        "--tls-client-ca",
        &ca_file,
    ]);
    let port = tls_port(&b);
    let mut sub = Client::connect_ok(b.addr, Opts::v5("plain-sub")).await;
    sub.subscribe("mtls/#", QoS::AtLeastOnce).await;
    let (c, k) = leaf(&ca1, "alice", &[], true, false);
    let (cf, kf) = (dir.write("alice.pem", &c), dir.write("alice.key", &k));
    let out = pub_tls(
        &port,
        &["--cafile", &ca_file, "--cert", &cf, "--key", &kf],
        "mtls/ok",
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    expect_message(&mut sub, "mtls/ok").await;
    // No certificate, an expired one, one from another CA: refused.
    assert!(!pub_tls(&port, &["--cafile", &ca_file], "mtls/none")
        .status
        .success());
    let (c, k) = leaf(&ca1, "old", &[], true, true);
    let (ef, ek) = (dir.write("old.pem", &c), dir.write("old.key", &k));
    assert!(!pub_tls(
        &port,
        &["--cafile", &ca_file, "--cert", &ef, "--key", &ek],
        "mtls/expired"
    )
    .status
    .success());
    let stranger = ca("Stranger CA");
    let (c, k) = leaf(&stranger, "mallory", &[], true, false);
    let (sf, sk) = (dir.write("mallory.pem", &c), dir.write("mallory.key", &k));
    assert!(!pub_tls(
        &port,
        &["--cafile", &ca_file, "--cert", &sf, "--key", &sk],
        "mtls/stranger"
    )
    .status
    .success());
    sub.expect_nothing(Duration::from_millis(300)).await;
}

#[tokio::test]
async fn certificate_common_name_is_the_user_name() {
    use argon2::password_hash::{rand_core::OsRng, PasswordHasher, SaltString};
    let dir = Dir::new();
    let ca1 = ca("Cirrus Test CA");
    let (ca_file, cert, key) = server_files(&dir, &ca1);
    let h = |p: &str| {
        argon2::Argon2::default()
            .hash_password(p.as_bytes(), &SaltString::generate(&mut OsRng))
            .unwrap()
            .to_string()
    };
    let auth = dir.write(
        "auth.yaml",
        &format!(
            "version: 1\nusers:\n  - username: alice\n    password_hash: \"{}\"\n    acl: [{{topic: \"alice/#\", access: all, permission: allow}}]\n  - username: bob\n    password_hash: \"{}\"\n    acl: [{{topic: \"#\", access: all, permission: allow}}]\n",
            h("unused"),
            h("b")
        ),
    );
    let cfg = format!(
        "listeners:\n  tcp: 127.0.0.1:0\n  tls: 127.0.0.1:0\ntls:\n  cert_file: {cert}\n  key_file: {key}\n  client_ca_file: {ca_file}\n  cert_as_username: true\nauth_file: {auth}\n"
    );
    let b = BrokerProcess::start_with_config(&cfg, &[]);
    let port = tls_port(&b);
    let mut o = Opts::v5("bob");
    o.username = Some("bob".into());
    o.password = Some(b"b".to_vec());
    let mut bob = Client::connect_ok(b.addr, o).await;
    bob.subscribe("#", QoS::AtLeastOnce).await;
    let (c, k) = leaf(&ca1, "alice", &[], true, false);
    let (cf, kf) = (dir.write("alice.pem", &c), dir.write("alice.key", &k));
    // No password: the certificate says this is alice, and alice's ACL applies.
    let out = pub_tls(
        &port,
        &[
            "--cafile", &ca_file, "--cert", &cf, "--key", &kf, "-V", "mqttv5",
        ],
        "alice/t",
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    expect_message(&mut bob, "alice/t").await;
    let _ = pub_tls(
        &port,
        &[
            "--cafile", &ca_file, "--cert", &cf, "--key", &kf, "-V", "mqttv5",
        ],
        "bob/t",
    );
    bob.expect_nothing(Duration::from_millis(500)).await;
    assert_eq!(
        bob.publish("alice/x", b"1", QoS::AtLeastOnce, false).await,
        0
    );
}

#[tokio::test]
async fn certificates_reload_without_restart() {
    let dir = Dir::new();
    let ca1 = ca("First CA");
    let (ca1_file, cert, key) = server_files(&dir, &ca1);
    let b = BrokerProcess::start(&[
        "--tls-listen",
        "127.0.0.1:0",
        "--tls-cert",
        &cert,
        "--tls-key",
        &key,
    ]);
    let port = tls_port(&b);
    assert!(pub_tls(&port, &["--cafile", &ca1_file], "r/1")
        .status
        .success());
    // Rotate to a certificate from another CA, as a renewed Secret would.
    let ca2 = ca("Second CA");
    let (c2, k2) = leaf(&ca2, "broker", &["localhost", "127.0.0.1"], false, false);
    let ca2_file = dir.write("ca2.pem", &ca2.cert.pem());
    dir.write("server.key", &k2);
    dir.write("server.pem", &c2);
    let end = Instant::now() + Duration::from_secs(10);
    while !pub_tls(&port, &["--cafile", &ca2_file], "r/2")
        .status
        .success()
    {
        assert!(Instant::now() < end, "new certificate not served");
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(
        !pub_tls(&port, &["--cafile", &ca1_file], "r/3")
            .status
            .success(),
        "old CA still accepted"
    );
    // A broken key keeps the working certificates.
    dir.write("server.key", "not a key");
    std::thread::sleep(Duration::from_millis(2500));
    assert!(b.log().contains("TLS reload failed"), "{}", b.log());
    assert!(pub_tls(&port, &["--cafile", &ca2_file], "r/4")
        .status
        .success());
}
