//! Users, passwords and ACLs from the auth file; reloads on a running broker.

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use argon2::password_hash::{rand_core::OsRng, PasswordHasher, SaltString};
use argon2::Argon2;
use cirrus_codec::{reason, QoS};
use cirrus_e2e::{tool, BrokerProcess, Client, Opts};

fn hash(password: &str) -> String {
    Argon2::default()
        .hash_password(password.as_bytes(), &SaltString::generate(&mut OsRng))
        .unwrap()
        .to_string()
}

/// An auth file in a fresh temp path; rewritten atomically like a mounted Secret.
struct AuthFile(PathBuf);

impl AuthFile {
    fn new(yaml: &str) -> AuthFile {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let f = AuthFile(
            std::env::temp_dir().join(format!("cirrus-auth-{}-{n}.yaml", std::process::id())),
        );
        f.write(yaml);
        f
    }
    fn write(&self, yaml: &str) {
        let tmp = self.0.with_extension("tmp");
        std::fs::write(&tmp, yaml).unwrap();
        std::fs::rename(&tmp, &self.0).unwrap();
    }
    fn path(&self) -> &str {
        self.0.to_str().unwrap()
    }
}

impl Drop for AuthFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn users_yaml(alice_hash: &str, bob_hash: &str, extra_rule: &str) -> String {
    format!(
        r##"version: 1
users:
  - username: alice
    password_hash: "{alice_hash}"
    acl:
{extra_rule}      - {{topic: "sensors/%u/#", access: publish, permission: allow}}
      - {{topic: "clients/%c/#", access: all, permission: allow}}
      - {{topic: "public/#", access: subscribe, permission: allow}}
  - username: bob
    password_hash: "{bob_hash}"
    acl:
      - {{topic: "#", access: all, permission: allow}}
"##
    )
}

fn with_creds(mut o: Opts, user: &str, password: &str) -> Opts {
    o.username = Some(user.into());
    o.password = Some(password.as_bytes().to_vec());
    o
}

#[tokio::test]
async fn credentials_are_checked_without_telling_who_exists() {
    let (ha, hb) = (hash("alice-pw"), hash("bob-pw"));
    let f = AuthFile::new(&users_yaml(&ha, &hb, ""));
    let b = BrokerProcess::start(&["--auth-file", f.path()]);
    let (_c, ack) = Client::connect(b.addr, with_creds(Opts::v5("a1"), "alice", "alice-pw")).await;
    assert_eq!(ack.reason_code, 0);
    let (_c, ack) = Client::connect(b.addr, with_creds(Opts::v5("a2"), "alice", "wrong")).await;
    assert_eq!(ack.reason_code, reason::BAD_USER_NAME_OR_PASSWORD);
    let (_c, ack) = Client::connect(b.addr, with_creds(Opts::v5("a3"), "nobody", "wrong")).await;
    assert_eq!(
        ack.reason_code,
        reason::BAD_USER_NAME_OR_PASSWORD,
        "same answer for an unknown user"
    );
    let (_c, ack) = Client::connect(b.addr, Opts::v5("anon")).await;
    assert_eq!(ack.reason_code, reason::NOT_AUTHORIZED);
    let (_c, ack) = Client::connect(b.addr, with_creds(Opts::v311("a4"), "alice", "wrong")).await;
    assert_eq!(ack.reason_code, reason::v3::BAD_USER_NAME_OR_PASSWORD);
    let (_c, ack) = Client::connect(b.addr, Opts::v311("anon3")).await;
    assert_eq!(ack.reason_code, reason::v3::NOT_AUTHORIZED);
    assert_eq!(b.metric("cirrus_auth_failures_total"), 3.0);
    assert_eq!(
        b.metric("cirrus_connections_refused_total{reason=\"bad_credentials\"}"),
        3.0
    );
    assert_eq!(
        b.metric("cirrus_connections_refused_total{reason=\"not_authorized\"}"),
        2.0
    );
    // Nothing secret reaches the log or the metrics.
    let (_, metrics) = b.http_get("/metrics");
    for secret in ["alice-pw", "bob-pw", "wrong", "alice", &ha, &hb] {
        assert!(!metrics.contains(secret), "metrics leak {secret:?}");
    }
    let log = b.log();
    for secret in ["alice-pw", "bob-pw", "wrong", &ha, &hb] {
        assert!(!log.contains(secret), "log leaks {secret:?}:\n{log}");
    }
}

#[tokio::test]
async fn acl_rules_for_publish_and_subscribe() {
    let f = AuthFile::new(&users_yaml(&hash("a"), &hash("b"), ""));
    let b = BrokerProcess::start(&["--auth-file", f.path()]);
    let mut bob = Client::connect_ok(b.addr, with_creds(Opts::v5("bob-1"), "bob", "b")).await;
    bob.subscribe("#", QoS::AtLeastOnce).await;
    let mut alice = Client::connect_ok(b.addr, with_creds(Opts::v5("alice-1"), "alice", "a")).await;
    assert_eq!(
        alice
            .publish("sensors/alice/t", b"1", QoS::AtLeastOnce, false)
            .await,
        0
    );
    assert_eq!(
        alice
            .publish("sensors/bob/t", b"2", QoS::AtLeastOnce, false)
            .await,
        reason::NOT_AUTHORIZED
    );
    assert_eq!(
        alice
            .publish("clients/alice-1/x", b"3", QoS::ExactlyOnce, false)
            .await,
        0
    );
    assert_eq!(
        alice
            .publish("clients/other/x", b"4", QoS::ExactlyOnce, false)
            .await,
        reason::NOT_AUTHORIZED
    );
    assert_eq!(bob.recv_ack().await.payload[..], b"1"[..]);
    assert_eq!(bob.recv_ack().await.payload[..], b"3"[..]);
    bob.expect_nothing(Duration::from_millis(300)).await;
    // Per filter: allowed ones granted, denied ones 0x87 (3.1.1: 0x80).
    let o = cirrus_codec::SubscriptionOptions::new(QoS::AtMostOnce);
    let a = alice
        .subscribe_with(
            &[
                ("public/news", o),
                ("sensors/#", o),
                ("clients/alice-1/#", o),
            ],
            Default::default(),
        )
        .await;
    assert_eq!(a.reason_codes, vec![0, reason::NOT_AUTHORIZED, 0]);
    let mut alice3 =
        Client::connect_ok(b.addr, with_creds(Opts::v311("alice-3"), "alice", "a")).await;
    assert_eq!(alice3.subscribe("#", QoS::AtMostOnce).await, 0x80);
    // 3.1.1: a denied publish is acknowledged and dropped.
    assert_eq!(
        alice3
            .publish("sensors/bob/t", b"x", QoS::AtLeastOnce, false)
            .await,
        0
    );
    bob.expect_nothing(Duration::from_millis(300)).await;
    // A will the user may not publish is refused at CONNECT.
    let mut o = with_creds(Opts::v5("alice-w"), "alice", "a");
    o.will = Some(cirrus_codec::LastWill {
        topic: "sensors/bob/will".into(),
        payload: Default::default(),
        qos: QoS::AtMostOnce,
        retain: false,
        properties: Default::default(),
    });
    let (_c, ack) = Client::connect(b.addr, o).await;
    assert_eq!(ack.reason_code, reason::NOT_AUTHORIZED);
}

#[tokio::test]
async fn reload_applies_new_rules_and_drops_only_revoked_users() {
    let (ha, hb) = (hash("a"), hash("b"));
    let f = AuthFile::new(&users_yaml(&ha, &hb, ""));
    let b = BrokerProcess::start(&["--auth-file", f.path()]);
    let mut alice = Client::connect_ok(b.addr, with_creds(Opts::v5("alice-r"), "alice", "a")).await;
    let mut bob = Client::connect_ok(b.addr, with_creds(Opts::v5("bob-r"), "bob", "b")).await;
    assert_eq!(
        alice
            .publish("sensors/alice/t", b"1", QoS::AtLeastOnce, false)
            .await,
        reason::NO_MATCHING_SUBSCRIBERS
    );
    // New rule first in alice's list: her sensors are now denied. Bob is removed.
    let yaml = users_yaml(
        &ha,
        &hb,
        "      - {topic: \"sensors/#\", access: publish, permission: deny}\n",
    );
    let without_bob = yaml.split("  - username: bob").next().unwrap().to_string();
    f.write(&without_bob);
    let d = bob.expect_closed().await.expect("DISCONNECT");
    assert_eq!(d.reason_code, reason::NOT_AUTHORIZED);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while alice
        .publish("sensors/alice/t", b"1", QoS::AtLeastOnce, false)
        .await
        != reason::NOT_AUTHORIZED
    {
        assert!(std::time::Instant::now() < deadline, "new ACL not applied");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    alice.ping().await; // still connected
    let (_c, ack) = Client::connect(b.addr, with_creds(Opts::v5("bob-again"), "bob", "b")).await;
    assert_eq!(ack.reason_code, reason::BAD_USER_NAME_OR_PASSWORD);
    // A broken file keeps the last good one, and says so.
    f.write("version: 1\nusers: [{username: x}]\n");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !b.log().contains("auth file reload failed") {
        assert!(
            std::time::Instant::now() < deadline,
            "no log line for the failed reload"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(b.metric("cirrus_auth_reload_failures_total"), 1.0);
    alice.ping().await;
    Client::connect_ok(b.addr, with_creds(Opts::v5("alice-2"), "alice", "a")).await;
}

#[tokio::test]
async fn failed_logins_are_limited_per_address() {
    let f = AuthFile::new(&users_yaml(&hash("a"), &hash("b"), ""));
    let cfg = format!(
        "auth_file: {}\nlimits:\n  max_failed_logins_per_minute: 3\n",
        f.path()
    );
    let b = BrokerProcess::start_with_config(&cfg, &[]);
    for i in 0..3 {
        let (_c, ack) = Client::connect(
            b.addr,
            with_creds(Opts::v5(&format!("f{i}")), "alice", "bad"),
        )
        .await;
        assert_eq!(ack.reason_code, reason::BAD_USER_NAME_OR_PASSWORD);
    }
    let (_c, ack) = Client::connect(b.addr, with_creds(Opts::v5("f-right"), "alice", "a")).await;
    assert_eq!(ack.reason_code, reason::CONNECTION_RATE_EXCEEDED);
}

#[tokio::test]
async fn anonymous_clients_get_their_own_rules_when_allowed() {
    let yaml = format!(
        "version: 1\nallow_anonymous: true\nanonymous_acl:\n  - {{topic: \"public/#\", access: all, permission: allow}}\nusers:\n  - {{username: alice, password_hash: \"{}\"}}\n",
        hash("a")
    );
    let f = AuthFile::new(&yaml);
    let b = BrokerProcess::start(&["--auth-file", f.path()]);
    let mut anon = Client::connect_ok(b.addr, Opts::v5("anon")).await;
    assert_eq!(anon.subscribe("public/#", QoS::AtMostOnce).await, 0);
    assert_eq!(
        anon.subscribe("private/#", QoS::AtMostOnce).await,
        reason::NOT_AUTHORIZED
    );
    assert_eq!(
        anon.publish("private/x", b"1", QoS::AtLeastOnce, false)
            .await,
        reason::NOT_AUTHORIZED
    );
}

#[tokio::test]
async fn mosquitto_clients_with_user_and_password() {
    let f = AuthFile::new(&users_yaml(&hash("alice-pw"), &hash("bob-pw"), ""));
    let b = BrokerProcess::start(&["--auth-file", f.path()]);
    let port = b.addr.port().to_string();
    let sub = Command::new(tool("mosquitto_sub"))
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &port,
            "-u",
            "bob",
            "-P",
            "bob-pw",
            "-t",
            "sensors/#",
            "-C",
            "1",
            "-W",
            "10",
            "-q",
            "1",
        ])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Wait until bob's subscription exists.
    let mut probe =
        Client::connect_ok(b.addr, with_creds(Opts::v5("probe"), "bob", "bob-pw")).await;
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while probe
        .publish("sensors/probe", b"p", QoS::AtLeastOnce, false)
        .await
        == reason::NO_MATCHING_SUBSCRIBERS
    {
        assert!(std::time::Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let out = sub.wait_with_output().unwrap();
    assert!(out.status.success());
    let ok = Command::new(tool("mosquitto_pub"))
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &port,
            "-u",
            "alice",
            "-P",
            "alice-pw",
            "-t",
            "sensors/alice/t",
            "-m",
            "hi",
            "-q",
            "1",
        ])
        .status()
        .unwrap();
    assert!(ok.success());
    let refused = Command::new(tool("mosquitto_pub"))
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &port,
            "-u",
            "alice",
            "-P",
            "nope",
            "-t",
            "sensors/alice/t",
            "-m",
            "hi",
            "-q",
            "1",
        ])
        .output()
        .unwrap();
    assert!(
        !refused.status.success(),
        "a wrong password must be refused"
    );
}

/// `cirrus-broker passwd FILE USER --stdin` into `file`.
fn passwd(file: &std::path::Path, user: &str, password: &str) {
    use std::io::Write;
    let mut child = Command::new(cirrus_e2e::broker_bin())
        .args(["passwd", "--stdin"])
        .arg(file)
        .arg(user)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    writeln!(child.stdin.take().unwrap(), "{password}").unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "passwd failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(!said.contains(password), "the password was echoed: {said}");
}

/// The password tool makes an auth file the broker starts on; a user added
/// later, and a changed password, are picked up by the running broker.
#[tokio::test]
async fn the_passwd_command_makes_and_updates_the_auth_file() {
    use std::os::unix::fs::PermissionsExt;
    let dir = std::env::temp_dir().join(format!("cirrus-passwd-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("auth.yaml");
    let _ = std::fs::remove_file(&file);
    passwd(&file, "alice", "wonder land");
    let text = std::fs::read_to_string(&file).unwrap();
    assert!(!text.contains("wonder land") && text.contains("$argon2id$"));
    assert_eq!(
        std::fs::metadata(&file).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let b = BrokerProcess::start(&["--auth-file", file.to_str().unwrap()]);
    let login = |user: &str, pw: &str| {
        let mut o = Opts::v5(&format!("c-{user}"));
        o.username = Some(user.into());
        o.password = Some(pw.as_bytes().to_vec());
        o
    };
    let mut alice = Client::connect_ok(b.addr, login("alice", "wonder land")).await;
    // A user in a file made by the tool may do everything.
    assert_eq!(alice.subscribe("a/#", QoS::AtLeastOnce).await, 1);
    assert_eq!(
        alice.publish("a/x", b"hi", QoS::AtLeastOnce, false).await,
        0
    );
    assert_eq!(&alice.recv_ack().await.payload[..], b"hi");
    let (_, ack) = Client::connect(b.addr, login("alice", "wrong")).await;
    assert_eq!(ack.reason_code, reason::BAD_USER_NAME_OR_PASSWORD);
    let (_, ack) = Client::connect(b.addr, login("bob", "builder")).await;
    assert_eq!(ack.reason_code, reason::BAD_USER_NAME_OR_PASSWORD);

    // A comment someone wrote stays through the next edits.
    std::fs::write(&file, format!("# kept: ops notes\n{text}")).unwrap();
    passwd(&file, "bob", "builder");
    passwd(&file, "alice", "new password");
    assert!(std::fs::read_to_string(&file)
        .unwrap()
        .starts_with("# kept: ops notes\n"));
    let end = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let (_, bob) = Client::connect(b.addr, login("bob", "builder")).await;
        let (_, new) = Client::connect(b.addr, login("alice", "new password")).await;
        if bob.reason_code == 0 && new.reason_code == 0 {
            break;
        }
        assert!(
            std::time::Instant::now() < end,
            "the broker never read the new file"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let (_, old) = Client::connect(b.addr, login("alice", "wonder land")).await;
    assert_eq!(old.reason_code, reason::BAD_USER_NAME_OR_PASSWORD);
    let _ = std::fs::remove_dir_all(&dir);
}
