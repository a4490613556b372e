//! # cirrus-telemetry
//!
//! Logs and traces for the broker and the operator, set up once at start:
//!
//! - logs on stderr, human-readable or JSON, filtered by `RUST_LOG`
//!   (default `info`);
//! - OpenTelemetry traces exported with OTLP when
//!   `OTEL_EXPORTER_OTLP_ENDPOINT` (or `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`)
//!   is set, honouring the standard variables: `OTEL_SERVICE_NAME`,
//!   `OTEL_RESOURCE_ATTRIBUTES`, `OTEL_EXPORTER_OTLP_PROTOCOL` (`grpc` or
//!   `http/protobuf`), `OTEL_TRACES_SAMPLER` and `OTEL_TRACES_SAMPLER_ARG`,
//!   `OTEL_EXPORTER_OTLP_HEADERS`, `OTEL_EXPORTER_OTLP_TIMEOUT`;
//!   `OTEL_SDK_DISABLED=true` or `OTEL_TRACES_EXPORTER=none` turn it off.
//!
//! Only spans of the targets the program names go to OpenTelemetry, and
//! spans of [`TRACE_TARGET`] never reach the log. With no exporter, no layer
//! wants those spans, so creating one costs a relaxed atomic load; the hot
//! paths also check [`enabled`] before doing any tracing work at all.
//!
//! W3C Trace Context (`traceparent`, `tracestate`) moves in and out of
//! key/value carriers (MQTT 5 user properties) with [`extract`] and
//! [`inject`].

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::{TraceContextExt, TracerProvider as _};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use opentelemetry_sdk::Resource;
use tracing::Level;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::filter::{filter_fn, FilterExt, Targets};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

pub use opentelemetry::Context;

/// The target of spans that exist for traces only (the publish path).
pub const TRACE_TARGET: &str = "cirrus::trace";

/// The W3C Trace Context keys.
pub const TRACEPARENT: &str = "traceparent";
pub const TRACESTATE: &str = "tracestate";

static ENABLED: AtomicBool = AtomicBool::new(false);

/// Whether traces are exported: hot paths do no tracing work without it.
#[inline]
pub fn enabled() -> bool {
    ENABLED.load(Ordering::Relaxed)
}

#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    #[error("OTLP exporter: {0}")]
    Exporter(String),
    #[error("a global tracing subscriber is already set")]
    AlreadySet,
}

/// What `init` set up; dropping it (or [`Telemetry::shutdown`]) exports the
/// spans still buffered.
#[derive(Debug)]
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

impl Telemetry {
    /// Flush buffered spans (at most a few seconds) and stop exporting.
    pub fn shutdown(mut self) {
        self.stop();
    }

    fn stop(&mut self) {
        if let Some(p) = self.provider.take() {
            ENABLED.store(false, Ordering::Relaxed);
            let _ = p.shutdown_with_timeout(Duration::from_secs(5));
        }
    }
}

impl Drop for Telemetry {
    fn drop(&mut self) {
        self.stop();
    }
}

fn env_true(name: &str) -> bool {
    std::env::var(name).is_ok_and(|v| v.trim().eq_ignore_ascii_case("true"))
}

fn env_set(name: &str) -> bool {
    std::env::var(name).is_ok_and(|v| !v.trim().is_empty())
}

/// Whether the environment asks for OTLP traces.
pub fn otlp_configured() -> bool {
    if env_true("OTEL_SDK_DISABLED")
        || std::env::var("OTEL_TRACES_EXPORTER").is_ok_and(|v| v.trim() == "none")
    {
        return false;
    }
    env_set("OTEL_EXPORTER_OTLP_ENDPOINT") || env_set("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
}

/// Set up logging and, when configured, trace export. `service` is the
/// service name unless `OTEL_SERVICE_NAME` says otherwise; `traced` are the
/// targets whose INFO spans are exported. Call within a Tokio runtime (the
/// gRPC exporter needs one).
pub fn init(service: &str, json: bool, traced: &[&str]) -> Result<Telemetry, TelemetryError> {
    let env = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let not_trace_only = filter_fn(|m| m.target() != TRACE_TARGET);
    let ansi = !json && std::io::IsTerminal::is_terminal(&std::io::stderr());
    let fmt = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(ansi);
    let fmt = if json {
        fmt.json().with_filter(env.and(not_trace_only)).boxed()
    } else {
        fmt.with_filter(env.and(not_trace_only)).boxed()
    };
    let (otel, provider) = if otlp_configured() {
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .build()
            .map_err(|e| TelemetryError::Exporter(e.to_string()))?;
        let mut resource = Resource::builder();
        if !env_set("OTEL_SERVICE_NAME") {
            resource = resource.with_service_name(service.to_string());
        }
        let provider = SdkTracerProvider::builder()
            .with_batch_exporter(exporter)
            .with_resource(resource.build())
            .build();
        let tracer = provider.tracer(service.to_string());
        let targets = traced
            .iter()
            .fold(Targets::new(), |t, name| t.with_target(*name, Level::INFO));
        let layer = tracing_opentelemetry::layer()
            .with_tracer(tracer)
            .with_filter(targets);
        (Some(layer), Some(provider))
    } else {
        (None, None)
    };
    tracing_subscriber::registry()
        .with(fmt)
        .with(otel)
        .try_init()
        .map_err(|_| TelemetryError::AlreadySet)?;
    if provider.is_some() {
        ENABLED.store(true, Ordering::Relaxed);
        tracing::info!(service, "exporting traces with OTLP");
    }
    Ok(Telemetry { provider })
}

struct Pairs<'a, I>(&'a I);

impl<'a, I, K, V> Extractor for Pairs<'a, I>
where
    &'a I: IntoIterator<Item = &'a (K, V)>,
    K: AsRef<str> + 'a,
    V: AsRef<str> + 'a,
{
    fn get(&self, key: &str) -> Option<&str> {
        self.0
            .into_iter()
            .find(|(k, _)| k.as_ref().eq_ignore_ascii_case(key))
            .map(|(_, v)| v.as_ref())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.into_iter().map(|(k, _)| k.as_ref()).collect()
    }
}

/// The remote span context carried by key/value pairs (`traceparent`,
/// `tracestate`), or an empty context.
pub fn extract<'a, I, K, V>(pairs: &'a I) -> Context
where
    &'a I: IntoIterator<Item = &'a (K, V)>,
    K: AsRef<str> + 'a,
    V: AsRef<str> + 'a,
{
    TraceContextPropagator::new().extract(&Pairs(pairs))
}

/// Whether `pairs` carry a `traceparent`.
pub fn carries_context<'a, I, K, V>(pairs: &'a I) -> bool
where
    &'a I: IntoIterator<Item = &'a (K, V)>,
    K: AsRef<str> + 'a,
    V: AsRef<str> + 'a,
{
    pairs
        .into_iter()
        .any(|(k, _)| k.as_ref().eq_ignore_ascii_case(TRACEPARENT))
}

struct Collect(Vec<(&'static str, String)>);

impl Injector for Collect {
    fn set(&mut self, key: &str, value: String) {
        let key = if key == TRACEPARENT {
            TRACEPARENT
        } else if key == TRACESTATE {
            TRACESTATE
        } else {
            return;
        };
        self.0.push((key, value));
    }
}

/// `traceparent` (and `tracestate` when there is one) of `span`, to carry
/// downstream; empty when the span is not part of a valid trace.
pub fn inject(span: &tracing::Span) -> Vec<(&'static str, String)> {
    let cx = span.context();
    if !cx.span().span_context().is_valid() {
        return Vec::new();
    }
    let mut c = Collect(Vec::with_capacity(2));
    TraceContextPropagator::new().inject_context(&cx, &mut c);
    c.0
}

/// Make `span` a child of the remote context `cx` (when it holds one).
pub fn set_parent(span: &tracing::Span, cx: Context) {
    if cx.span().span_context().is_valid() {
        let _ = span.set_parent(cx);
    }
}

/// Whether `span` is sampled (recorded and exported). A span the sampler
/// dropped still carries its trace, but nothing under it needs building.
pub fn is_sampled(span: &tracing::Span) -> bool {
    !span.is_none() && span.context().span().span_context().is_sampled()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn extracts_a_w3c_traceparent_from_pairs() {
        let pairs = vec![
            ("other".to_string(), "x".to_string()),
            (
                "traceparent".to_string(),
                "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".to_string(),
            ),
            ("tracestate".to_string(), "vendor=1".to_string()),
        ];
        assert!(carries_context(&pairs));
        let cx = extract(&pairs);
        let sc = cx.span().span_context().clone();
        assert!(sc.is_valid() && sc.is_remote() && sc.is_sampled());
        assert_eq!(
            sc.trace_id().to_string(),
            "4bf92f3577b34da6a3ce929d0e0e4736"
        );
        assert_eq!(sc.trace_state().header(), "vendor=1");
        let bad = vec![("traceparent".to_string(), "garbage".to_string())];
        assert!(!extract(&bad).span().span_context().is_valid());
        let none: Vec<(String, String)> = Vec::new();
        assert!(!carries_context(&none));
    }

    #[test]
    fn nothing_to_inject_outside_a_trace() {
        assert!(inject(&tracing::Span::none()).is_empty());
    }
}
