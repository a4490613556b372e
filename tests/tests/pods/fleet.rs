//! Day-2 at scale: 3,000 persistent QoS 1 clients (a third MQTT 3.1.1)
//! through the Service of a 3-pod broker while a publisher sends them
//! numbered messages, and Kubernetes scales the broker to 1, back to 3, and
//! rolls it to a new image. Judged by what the clients saw (moves,
//! reconnects per second, time offline, sessions kept) and by the tally of
//! acknowledged against received messages.

use super::*;
use cirrus_e2e::fleet::{Fleet, Phase};
use cirrus_e2e::load::Topics;

const CLIENTS: usize = 3000;
/// The spec's drain and rebalance rates (clients sent away per second, per
/// pod).
const DRAIN_RATE: usize = 100;
const REBALANCE_RATE: usize = 200;
/// Messages per second from the publisher, one per client topic in turn.
const PUBLISH_RATE: u32 = 100;

/// Each running broker pod's connections, once all of them are within
/// `percent` of their mean (and they hold every client).
fn balanced(ns: &Namespace, name: &str, pods: usize, percent: f64) -> Option<Vec<f64>> {
    let counts: Vec<f64> = connection_counts(ns, name)
        .into_iter()
        .map(|(_, n)| n)
        .collect();
    let total: f64 = counts.iter().sum();
    let mean = total / counts.len().max(1) as f64;
    (counts.len() == pods
        && total >= CLIENTS as f64
        && counts
            .iter()
            .all(|n| (n - mean).abs() <= mean * percent / 100.0))
    .then_some(counts)
}

/// Wait (in a blocking thread) until `f` says yes.
async fn wait_blocking<T: Send + 'static>(
    ns: &Arc<Namespace>,
    timeout: Duration,
    what: &'static str,
    f: impl Fn(&Namespace) -> Option<T> + Send + 'static,
) -> T {
    let ns = ns.clone();
    tokio::task::spawn_blocking(move || wait_for(timeout, what, || f(&ns)))
        .await
        .unwrap()
}

fn report(what: &str, p: &Phase, took: Duration) {
    eprintln!(
        "{what}: {:.1} s; {} clients moved (most {} times), {} reconnects, peak {}/s, \
         longest offline {:.2} s, last back after {:.1} s",
        took.as_secs_f64(),
        p.moved,
        p.most_moves,
        p.reconnects,
        p.peak_per_sec,
        p.longest_offline.as_secs_f64(),
        p.all_back_after.unwrap_or_default().as_secs_f64()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_thousand_clients_follow_a_scale_down_a_scale_up_and_a_rollout_with_nothing_lost() {
    day2(false).await;
}

/// The same without the Day-2 features, for the benchmark in
/// docs/performance.md: every client of a terminating pod sent away at once
/// (as before the paced drain), no rebalance. Reports, asserts only that
/// nothing is lost. `cargo nextest run -p cirrus-e2e --test pods
/// --run-ignored only -E 'test(plain_deployment)' --no-capture`
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "benchmark baseline, run by hand"]
async fn plain_deployment_baseline_for_the_day2_benchmark() {
    day2(true).await;
}

async fn day2(plain: bool) {
    let spec = if plain {
        "  drain: {connectionsPerSecond: 100000, timeoutSeconds: 30}\n  rebalance: {enabled: false}\n  rollout: {maxSurge: 1, minReadySeconds: 5}\n"
    } else {
        "  drain: {connectionsPerSecond: 100, timeoutSeconds: 45}\n  rebalance: {connectionsPerSecond: 200}\n  rollout: {minReadySeconds: 5}\n"
    };
    let ns = with_broker(if plain { "plain" } else { "fleet" }, &[], "f", 3, spec).await;
    let addr = ns.node_port("f", "mqtt");
    let fleet = Fleet::start(addr, "fleet", "load/fleet", CLIENTS, 300).await;
    let counts = wait_blocking(&ns, Duration::from_secs(30), "3 pods counting", |ns| {
        let c = connection_counts(ns, "f");
        (c.iter().map(|(_, n)| n).sum::<f64>() >= CLIENTS as f64).then_some(c)
    })
    .await;
    eprintln!("{CLIENTS} clients connected through the Service: {counts:?}");
    let tally = fleet.tally.clone();
    let publisher = tokio::spawn(publish_numbered(
        vec![addr],
        Topics::Spread {
            prefix: "load/fleet".into(),
            n: CLIENTS as u32,
        },
        QoS::AtLeastOnce,
        u32::MAX / 2,
        PUBLISH_RATE,
        16,
        tally.clone(),
    ));
    tokio::time::sleep(Duration::from_secs(3)).await;

    // Scale to 1: two pods drain at once, sharing the rate, onto the one
    // left; every client is back within the drain time.
    let mark = fleet.mark();
    patch_broker(&ns, "f", r#"{"replicas": 1}"#);
    // Every client on the pod that stays (the pods that go are not counted
    // from their deletion on; the kubelet may take a while to remove them
    // after their containers ended).
    wait_blocking(
        &ns,
        Duration::from_secs(90),
        "every client on one pod",
        |ns| {
            let c = connection_counts(ns, "f");
            (c.len() == 1 && c[0].1 >= CLIENTS as f64).then_some(())
        },
    )
    .await;
    fleet
        .wait_connected(
            Duration::from_secs(60),
            "every client back after the scale-down",
        )
        .await;
    let down = fleet.since(&mark);
    report("scale 3 -> 1", &down, mark.age());
    assert!(down.most_moves <= 1, "{down:?}");
    assert!(
        down.all_back_after.unwrap() < Duration::from_secs(5 + 30),
        "not back within the drain time: {down:?}"
    );
    if !plain {
        assert!(
            (CLIENTS / 2..=CLIENTS * 3 / 4).contains(&down.moved),
            "the two pods' clients: {down:?}"
        );
        assert!(
            down.peak_per_sec <= DRAIN_RATE * 5 / 4,
            "two pods draining share {DRAIN_RATE}/s: {down:?}"
        );
    }

    // Scale to 3: the one pod sends its excess to the new ones; each ends
    // within 20 % of the mean, and no client is moved twice. (The clients
    // must first be older than minConnectionAgeSeconds, 60 s: the time to
    // balance is counted from the first move.)
    let mark = fleet.mark();
    patch_broker(&ns, "f", r#"{"replicas": 3}"#);
    let counts = if plain {
        // Nothing moves the clients: what the pods hold a minute later.
        wait_blocking(&ns, Duration::from_secs(120), "3 pods", |ns| {
            (ns.pods(&broker_selector("f")).len() == 3).then_some(())
        })
        .await;
        tokio::time::sleep(Duration::from_secs(60)).await;
        connection_counts(&ns, "f")
            .into_iter()
            .map(|(_, n)| n)
            .collect()
    } else {
        wait_blocking(&ns, Duration::from_secs(180), "balanced on 3 pods", |ns| {
            balanced(ns, "f", 3, 20.0)
        })
        .await
    };
    let to_balance = mark.age();
    fleet
        .wait_connected(
            Duration::from_secs(30),
            "every client back after the rebalance",
        )
        .await;
    // Settled: a few more rounds move nobody.
    tokio::time::sleep(Duration::from_secs(15)).await;
    let up = fleet.since(&mark);
    report("scale 1 -> 3", &up, to_balance);
    if let Some(first) = up.first_back_after {
        eprintln!(
            "scale 1 -> 3: balanced {:.1} s after the first move",
            (to_balance.saturating_sub(first)).as_secs_f64()
        );
    }
    eprintln!(
        "pods hold {counts:?}, 15 s later {:?}",
        connection_counts(&ns, "f")
    );
    assert!(up.most_moves <= 1, "a client moved twice: {up:?}");
    assert!(
        up.peak_per_sec <= REBALANCE_RATE * 5 / 4,
        "one pod sending at {REBALANCE_RATE}/s: {up:?}"
    );

    // A rolling image change. Plain: one new pod at a time (maxSurge 1),
    // each old pod sends its clients away at once. Day-2: the default
    // surge (every new pod at once); the old pods drain together, into the
    // new pods only, with no rebalance meanwhile: each client moves once and
    // the random spread of the Service leaves the pods balanced.
    let tag = if plain { "plain" } else { "fleet" };
    ctr(&[
        "images",
        "tag",
        "--force",
        "cirrus.local/cirrus-broker:dev",
        &format!("cirrus.local/cirrus-broker:{tag}"),
    ]);
    let mark = fleet.mark();
    patch_broker(
        &ns,
        "f",
        &format!(r#"{{"image": "cirrus.local/cirrus-broker:{tag}"}}"#),
    );
    let suffix = format!(":{tag}");
    let rolled = move |ns: &Namespace| {
        let images = pod_images(ns, "f");
        // ... and every client on the new pods (the old ones are not
        // counted from their deletion on).
        images.len() == 3
            && images.iter().all(|i| i.ends_with(&suffix))
            && connection_counts(ns, "f")
                .iter()
                .map(|(_, n)| n)
                .sum::<f64>()
                >= CLIENTS as f64
    };
    let counts = if plain {
        wait_blocking(&ns, Duration::from_secs(300), "the rollout", move |ns| {
            rolled(ns).then_some(())
        })
        .await;
        connection_counts(&ns, "f")
            .into_iter()
            .map(|(_, n)| n)
            .collect()
    } else {
        wait_blocking(
            &ns,
            Duration::from_secs(300),
            "the rollout, balanced",
            move |ns| rolled(ns).then(|| balanced(ns, "f", 3, 20.0)).flatten(),
        )
        .await
    };
    let took = mark.age();
    fleet
        .wait_connected(
            Duration::from_secs(30),
            "every client back after the rollout",
        )
        .await;
    let roll = fleet.since(&mark);
    report("rolling image change", &roll, took);
    eprintln!("pods hold {counts:?}");
    assert!(
        roll.longest_offline < Duration::from_secs(10),
        "a client was not served again soon: {roll:?}"
    );
    if !plain {
        assert!(roll.most_moves <= 1, "a client moved twice: {roll:?}");
        assert!(roll.peak_per_sec <= DRAIN_RATE * 5 / 4, "{roll:?}");
    }

    publisher.abort();
    let _ = publisher.await;
    let lost_sessions = fleet.sessions_lost();
    let reasons = fleet.reasons();
    fleet.finish(Duration::from_secs(60)).await;
    eprintln!("DISCONNECT reasons (None: closed without one): {reasons:?}");
    // MQTT 5 clients were told 0x9C "Use another server", 3.1.1 clients
    // saw their socket close; nobody was taken over or timed out.
    assert!(
        reasons.keys().all(|r| matches!(r, None | Some(0x9C))),
        "{reasons:?}"
    );
    assert_eq!(lost_sessions, 0, "sessions did not survive a move");
    let t = tally.lock().unwrap();
    assert!(
        t.acked.len() > 10_000,
        "the publisher ran: {}",
        t.acked.len()
    );
    t.check(
        "3,000 clients through scale-down, scale-up, rollout",
        QoS::AtLeastOnce,
    );
}
