//! PUBLISH decode and encode: the per-message work of every connection.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::hint::black_box;

use bytes::{Bytes, BytesMut};
use cirrus_codec::encode::{encode_publish_parts, PublishExtras, PublishHeader};
use cirrus_codec::{ByteString, Packet, PacketId, Properties, Protocol, Publish, QoS};
use criterion::{criterion_group, criterion_main, Criterion, Throughput};

fn publish(payload: usize) -> Publish {
    Publish {
        dup: false,
        qos: QoS::AtLeastOnce,
        retain: false,
        topic: ByteString::from("sensors/building-7/floor-3/temperature"),
        packet_id: PacketId::new(17),
        properties: Properties::default(),
        payload: Bytes::from(vec![b'x'; payload]),
    }
}

fn bench(c: &mut Criterion) {
    for (proto, name) in [(Protocol::V3_1_1, "3.1.1"), (Protocol::V5, "5")] {
        for size in [64usize, 1024] {
            let mut wire = BytesMut::new();
            cirrus_codec::encode(&Packet::Publish(publish(size)), proto, &mut wire);
            let wire = wire.freeze();
            let mut g = c.benchmark_group(format!("publish/{name}/{size}B"));
            g.throughput(Throughput::Elements(1));
            g.bench_function("decode", |b| {
                b.iter(|| {
                    let mut buf = BytesMut::from(&wire[..]);
                    black_box(cirrus_codec::decode(&mut buf, proto, 1 << 20).unwrap())
                })
            });
            let p = publish(size);
            let mut out = BytesMut::with_capacity(4096);
            g.bench_function("encode", |b| {
                b.iter(|| {
                    out.clear();
                    black_box(encode_publish_parts(
                        &mut out,
                        proto,
                        PublishHeader {
                            dup: false,
                            qos: p.qos,
                            retain: false,
                            topic: &p.topic,
                            packet_id: p.packet_id,
                        },
                        &p.properties,
                        PublishExtras {
                            topic_alias: None,
                            subscription_identifiers: &[],
                            message_expiry_interval: None,
                        },
                        &p.payload,
                    ))
                })
            });
            g.finish();
        }
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
