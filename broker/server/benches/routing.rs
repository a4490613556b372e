//! Topic matching against 100k filters: the router (local subscribers) and
//! the cluster route table (which pods and sessions want a message).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::hint::black_box;
use std::sync::Arc;

use cirrus_broker::router::{Router, Subscriber};
use cirrus_broker::session::Session;
use cirrus_broker::store::redis::{RemoteRoutes, SessionSub, Targets};
use cirrus_codec::{ByteString, Protocol, QoS, SubscriptionOptions};
use criterion::{criterion_group, criterion_main, Criterion, Throughput};

const FILTERS: usize = 100_000;

/// 100k filters shaped like a fleet: exact topics, `+` levels and `#` tails.
fn filter(i: usize) -> String {
    match i % 4 {
        0 => format!("fleet/{}/device/{}/telemetry", i % 100, i),
        1 => format!("fleet/{}/device/+/status", i % 1000),
        2 => format!("fleet/{}/device/{}/#", i % 100, i),
        _ => format!("alerts/{}/+/level", i),
    }
}

fn bench(c: &mut Criterion) {
    let router = Router::new();
    for i in 0..FILTERS {
        let session = Session::new(i as u64, ByteString::from(format!("c{i}")), Protocol::V5);
        router.subscribe(
            None,
            &filter(i),
            Subscriber {
                session,
                options: SubscriptionOptions::new(QoS::AtLeastOnce),
                sub_id: None,
            },
        );
    }
    let topics = [
        "fleet/42/device/4242/telemetry",
        "fleet/7/device/123/status",
        "nobody/listens/here",
    ];
    let mut g = c.benchmark_group("router/100k-filters");
    g.throughput(Throughput::Elements(1));
    for t in topics {
        let mut out = Vec::new();
        g.bench_function(t, |b| {
            b.iter(|| {
                out.clear();
                router.matches(black_box(t), &mut out);
                black_box(out.len())
            })
        });
    }
    g.finish();

    let mut table = RemoteRoutes::default();
    let nodes: Vec<Arc<str>> = (0..8).map(|n| Arc::from(format!("pod-{n}"))).collect();
    for i in 0..FILTERS {
        let f = filter(i);
        if i % 10 == 0 {
            table.add_session(
                &ByteString::from(format!("c{i}")),
                &f,
                SessionSub {
                    qos: QoS::AtLeastOnce,
                    no_local: false,
                },
            );
        } else {
            table.add_node_route(&nodes[i % nodes.len()], &ByteString::from(f));
        }
    }
    let mut g = c.benchmark_group("route-table/100k-filters-8-pods");
    g.throughput(Throughput::Elements(1));
    for t in topics {
        g.bench_function(t, |b| {
            b.iter(|| {
                let mut out = Targets::default();
                table.matches(black_box(t), None, "pod-0", &mut out);
                black_box(out.len())
            })
        });
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
