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
