//! Graceful shutdown on SIGTERM and SIGINT.

use std::time::Duration;

use cirrus_codec::reason;
use cirrus_e2e::{BrokerProcess, Client, Opts};

#[tokio::test]
async fn sigterm_disconnects_clients_and_exits() {
    let mut b = BrokerProcess::start(&[]);
    let mut v5 = Client::connect_ok(b.addr, Opts::v5("five")).await;
    let mut v3 = Client::connect_ok(b.addr, Opts::v311("three")).await;
    b.signal("TERM");
    assert_eq!(
        v5.expect_closed().await.unwrap().reason_code,
        reason::SERVER_SHUTTING_DOWN
    );
    assert!(v3.expect_closed().await.is_none());
    let status = b.wait_exit(Duration::from_secs(10)).expect("exited");
    assert!(status.success(), "{status:?}");
    assert!(b.log().contains("shut down cleanly"), "{}", b.log());
}

#[tokio::test]
async fn sigint_also_drains() {
    let mut b = BrokerProcess::start(&[]);
    let mut c = Client::connect_ok(b.addr, Opts::v5("c")).await;
    b.signal("INT");
    assert_eq!(
        c.expect_closed().await.unwrap().reason_code,
        reason::SERVER_SHUTTING_DOWN
    );
    assert!(b
        .wait_exit(Duration::from_secs(10))
        .expect("exited")
        .success());
}

/// With a shutdown delay, SIGTERM first makes `/readyz` say not ready while
/// clients are still served; the drain comes after the delay.
#[tokio::test]
async fn shutdown_delay_turns_not_ready_before_draining() {
    let mut b = BrokerProcess::start_with_config("shutdown_delay_secs: 2\n", &[]);
    let mut c = Client::connect_ok(b.addr, Opts::v5("early")).await;
    assert_eq!(b.http_get("/readyz").0, 200);
    b.signal("TERM");
    let t0 = std::time::Instant::now();
    let end = t0 + Duration::from_secs(1);
    while b.http_get("/readyz").0 != 503 {
        assert!(std::time::Instant::now() < end, "still ready after SIGTERM");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Still serving: a new client connects and the old one works.
    Client::connect_ok(b.addr, Opts::v5("late")).await;
    c.ping().await;
    assert_eq!(
        c.expect_closed().await.unwrap().reason_code,
        reason::SERVER_SHUTTING_DOWN
    );
    assert!(
        t0.elapsed() >= Duration::from_millis(1500),
        "drained before the delay"
    );
    assert!(b
        .wait_exit(Duration::from_secs(10))
        .expect("exited")
        .success());
}
