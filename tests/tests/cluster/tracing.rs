//! OpenTelemetry traces across pods: a publish carrying a W3C
//! `traceparent` yields spans of that trace from the pod that received it
//! and from the pod that delivered it, exported over OTLP/HTTP to a real
//! receiver, and the subscriber gets the trace context too.

use super::*;
use cirrus_e2e::client::publish_packet;
use cirrus_e2e::otlp::OtlpReceiver;

const TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const PARENT: &str = "00f067aa0ba902b7";

/// A pod on `url` exporting to `otlp` (protocol `protocol`) as service
/// `name`, with extra `OTEL_*` variables.
fn traced_pod_with(
    url: &str,
    otlp: &OtlpReceiver,
    protocol: &str,
    name: &str,
    extra: &[(&str, &str)],
) -> BrokerProcess {
    let endpoint = otlp.endpoint();
    let mut env = vec![
        ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.as_str()),
        ("OTEL_EXPORTER_OTLP_PROTOCOL", protocol),
        ("OTEL_SERVICE_NAME", name),
        // Export quickly: the tests wait for the spans.
        ("OTEL_BSP_SCHEDULE_DELAY", "100"),
    ];
    env.extend_from_slice(extra);
    BrokerProcess::start_on_redis_with_env(url, &[], &env)
}

fn traced_pod(url: &str, otlp: &OtlpReceiver, name: &str) -> BrokerProcess {
    traced_pod_with(url, otlp, "http/protobuf", name, &[])
}

/// A traced QoS 0 publish of `topic` carrying `traceparent`.
fn traced_publish(topic: &str, traceparent: String) -> cirrus_codec::Publish {
    let mut p = publish_packet(topic, b"x", QoS::AtMostOnce, false, None);
    p.properties.user_properties.push((
        ByteString::from("traceparent"),
        ByteString::from(traceparent),
    ));
    p
}

#[tokio::test]
async fn a_publish_is_one_trace_across_pods() {
    let r = RedisServer::start();
    let otlp = OtlpReceiver::start().await;
    let a = traced_pod(&r.url(), &otlp, "pod-a");
    let b = traced_pod(&r.url(), &otlp, "pod-b");
    let mut sub = Client::connect_ok(b.addr, Opts::v5("sub")).await;
    assert_eq!(sub.subscribe("traced/#", QoS::AtLeastOnce).await, 1);
    let mut publisher = Client::connect_ok(a.addr, Opts::v5("pub")).await;
    until_routed(&mut publisher, &mut sub, "traced/probe").await;

    let mut p = publish_packet("traced/x", b"hello", QoS::AtLeastOnce, false, None);
    p.properties.user_properties.push((
        ByteString::from("traceparent"),
        ByteString::from(format!("00-{TRACE}-{PARENT}-01")),
    ));
    p.properties
        .user_properties
        .push((ByteString::from("tracestate"), ByteString::from("vendor=7")));
    p.properties
        .user_properties
        .push((ByteString::from("app"), ByteString::from("kept")));
    assert_eq!(publisher.publish_full(p).await, 0);
    let m = sub.recv_ack().await;
    assert_eq!(&m.payload[..], b"hello");
    // The subscriber continues the same trace, from a span of pod B's.
    let props = &m.properties.user_properties;
    let tp = props
        .iter()
        .find(|(k, _)| &**k == "traceparent")
        .map(|(_, v)| v.to_string())
        .expect("a traceparent for the subscriber");
    assert!(tp.starts_with(&format!("00-{TRACE}-")), "{tp}");
    assert!(
        !tp.contains(PARENT),
        "the broker's own span, not the publisher's: {tp}"
    );
    assert_eq!(
        props.iter().filter(|(k, _)| &**k == "traceparent").count(),
        1
    );
    assert!(props
        .iter()
        .any(|(k, v)| &**k == "tracestate" && &**v == "vendor=7"));
    assert!(props.iter().any(|(k, v)| &**k == "app" && &**v == "kept"));

    let want = |spans: &[cirrus_e2e::otlp::SpanRecord], svc: &str, name: &str| {
        spans
            .iter()
            .any(|s| s.trace_id == TRACE && s.service == svc && s.name == name)
    };
    // The probes, published without a traceparent, are traces of their
    // own (the default sampler records every publish): each `remote.read`
    // on pod B hangs under a `route` of pod A in the same trace.
    let parented = |spans: &[cirrus_e2e::otlp::SpanRecord], read: &cirrus_e2e::otlp::SpanRecord| {
        spans.iter().any(|r| {
            r.service == "pod-a"
                && r.name == "route"
                && r.span_id == read.parent_span_id
                && r.trace_id == read.trace_id
        })
    };
    let spans = otlp
        .wait_for(Duration::from_secs(20), "spans of both pods", |s| {
            ["mqtt.publish", "authorize", "route", "redis.append"]
                .iter()
                .all(|n| want(s, "pod-a", n))
                && ["remote.read", "deliver"]
                    .iter()
                    .all(|n| want(s, "pod-b", n))
                && s.iter()
                    .filter(|r| r.name == "remote.read")
                    .all(|r| parented(s, r))
        })
        .await;
    let of = |svc: &str, name: &str| {
        spans
            .iter()
            .find(|s| s.trace_id == TRACE && s.service == svc && s.name == name)
            .unwrap()
            .clone()
    };
    // The tree: publisher → mqtt.publish → {authorize, route → redis.append}
    // on pod A; route → remote.read → deliver on pod B.
    let publish = of("pod-a", "mqtt.publish");
    assert_eq!(publish.parent_span_id, PARENT);
    assert!(publish
        .attributes
        .iter()
        .any(|(k, v)| k == "messaging.destination.name" && v == "traced/x"));
    let route = of("pod-a", "route");
    assert_eq!(route.parent_span_id, publish.span_id);
    assert_eq!(of("pod-a", "authorize").parent_span_id, publish.span_id);
    assert_eq!(of("pod-a", "redis.append").parent_span_id, route.span_id);
    let read = of("pod-b", "remote.read");
    assert_eq!(read.parent_span_id, route.span_id);
    let deliver = of("pod-b", "deliver");
    assert_eq!(deliver.parent_span_id, read.span_id);
    assert!(deliver
        .attributes
        .iter()
        .any(|(k, v)| k == "messaging.client_id" && v == "sub"));
    // What the subscriber got points at pod B's span.
    assert!(tp.contains(&read.span_id), "{tp} vs {}", read.span_id);
}

#[tokio::test]
async fn tracing_off_passes_trace_context_through_untouched() {
    let r = RedisServer::start();
    let p = pods(&r.url(), 2);
    let mut sub = Client::connect_ok(p[1].addr, Opts::v5("sub")).await;
    assert_eq!(sub.subscribe("plain/#", QoS::AtLeastOnce).await, 1);
    let mut publisher = Client::connect_ok(p[0].addr, Opts::v5("pub")).await;
    until_routed(&mut publisher, &mut sub, "plain/probe").await;
    let tp = format!("00-{TRACE}-{PARENT}-01");
    let mut m = publish_packet("plain/x", b"x", QoS::AtLeastOnce, false, None);
    m.properties.user_properties.push((
        ByteString::from("traceparent"),
        ByteString::from(tp.clone()),
    ));
    assert_eq!(publisher.publish_full(m).await, 0);
    let got = sub.recv_ack().await;
    assert_eq!(
        got.properties.user_properties,
        vec![(ByteString::from("traceparent"), ByteString::from(tp))]
    );
}

/// The sampler comes from the standard variables: parent-based with a
/// ratio of 0 records nothing of its own, but follows a publisher whose
/// `traceparent` says sampled, and drops one that says not sampled.
#[tokio::test]
async fn the_sampler_follows_the_otel_variables_and_the_parent() {
    let r = RedisServer::start();
    let otlp = OtlpReceiver::start().await;
    let pod = traced_pod_with(
        &r.url(),
        &otlp,
        "http/protobuf",
        "sampled",
        &[
            ("OTEL_TRACES_SAMPLER", "parentbased_traceidratio"),
            ("OTEL_TRACES_SAMPLER_ARG", "0"),
        ],
    );
    let mut sub = Client::connect_ok(pod.addr, Opts::v5("sub")).await;
    assert_eq!(sub.subscribe("s/#", QoS::AtMostOnce).await, 0);
    let mut publisher = Client::connect_ok(pod.addr, Opts::v5("pub")).await;
    let not_sampled = "0af7651916cd43dd8448eb211c80319c";
    for (trace, flags) in [(TRACE, "01"), (not_sampled, "00")] {
        publisher
            .publish_full(traced_publish(
                "s/x",
                format!("00-{trace}-{PARENT}-{flags}"),
            ))
            .await;
        sub.recv_publish().await;
    }
    // Ratio 0: the untraced publish is not recorded either.
    publisher.publish("s/y", b"y", QoS::AtMostOnce, false).await;
    sub.recv_publish().await;
    otlp.wait_for(Duration::from_secs(20), "the sampled publish", |s| {
        s.iter().any(|x| x.trace_id == TRACE && x.name == "route")
    })
    .await;
    // Give anything else time to arrive: the batch delay is 100 ms.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let spans = otlp.spans();
    assert!(
        spans.iter().all(|s| s.trace_id == TRACE),
        "spans of unsampled traces: {:?}",
        spans
            .iter()
            .filter(|s| s.trace_id != TRACE)
            .map(|s| (&s.name, &s.trace_id))
            .collect::<Vec<_>>()
    );
}

/// `OTEL_EXPORTER_OTLP_PROTOCOL=grpc`: the same spans over OTLP/gRPC.
#[tokio::test]
async fn traces_go_out_over_grpc_too() {
    let r = RedisServer::start();
    let otlp = OtlpReceiver::start_grpc().await;
    let pod = traced_pod_with(&r.url(), &otlp, "grpc", "grpc-pod", &[]);
    let mut sub = Client::connect_ok(pod.addr, Opts::v5("sub")).await;
    assert_eq!(sub.subscribe("g/#", QoS::AtMostOnce).await, 0);
    let mut publisher = Client::connect_ok(pod.addr, Opts::v5("pub")).await;
    publisher
        .publish_full(traced_publish("g/x", format!("00-{TRACE}-{PARENT}-01")))
        .await;
    sub.recv_publish().await;
    otlp.wait_for(Duration::from_secs(20), "spans over gRPC", |s| {
        ["mqtt.publish", "route", "deliver"].iter().all(|n| {
            s.iter()
                .any(|x| x.trace_id == TRACE && x.service == "grpc-pod" && x.name == *n)
        })
    })
    .await;
}
