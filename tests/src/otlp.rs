//! A real OTLP trace receiver on 127.0.0.1: over HTTP it accepts
//! `POST /v1/traces` with an `ExportTraceServiceRequest` in protobuf, over
//! gRPC the `TraceService/Export` call (what the OpenTelemetry SDK's OTLP
//! exporter sends, by protocol); it decodes them with the published
//! `opentelemetry-proto` types and keeps every span.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use prost::Message;

/// One received span, ids in lowercase hex.
#[derive(Debug, Clone)]
pub struct SpanRecord {
    pub service: String,
    pub name: String,
    pub trace_id: String,
    pub span_id: String,
    pub parent_span_id: String,
    pub attributes: Vec<(String, String)>,
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn value_text(v: &opentelemetry_proto::tonic::common::v1::AnyValue) -> String {
    use opentelemetry_proto::tonic::common::v1::any_value::Value;
    match &v.value {
        Some(Value::StringValue(s)) => s.clone(),
        Some(Value::IntValue(i)) => i.to_string(),
        Some(Value::BoolValue(b)) => b.to_string(),
        Some(Value::DoubleValue(d)) => d.to_string(),
        other => format!("{other:?}"),
    }
}

fn records(req: ExportTraceServiceRequest) -> Vec<SpanRecord> {
    let mut out = Vec::new();
    for rs in req.resource_spans {
        let service = rs
            .resource
            .iter()
            .flat_map(|r| &r.attributes)
            .find(|kv| kv.key == "service.name")
            .and_then(|kv| kv.value.as_ref())
            .map(value_text)
            .unwrap_or_default();
        for ss in rs.scope_spans {
            for s in ss.spans {
                out.push(SpanRecord {
                    service: service.clone(),
                    name: s.name,
                    trace_id: hex(&s.trace_id),
                    span_id: hex(&s.span_id),
                    parent_span_id: hex(&s.parent_span_id),
                    attributes: s
                        .attributes
                        .iter()
                        .map(|kv| {
                            (
                                kv.key.clone(),
                                kv.value.as_ref().map(value_text).unwrap_or_default(),
                            )
                        })
                        .collect(),
                });
            }
        }
    }
    out
}

/// The receiver; stops with the test (its task ends with the runtime).
pub struct OtlpReceiver {
    pub addr: SocketAddr,
    spans: Arc<Mutex<Vec<SpanRecord>>>,
}

impl OtlpReceiver {
    pub async fn start() -> OtlpReceiver {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the OTLP receiver");
        let addr = listener.local_addr().expect("addr");
        let spans = Arc::new(Mutex::new(Vec::new()));
        let store = spans.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let store = store.clone();
                tokio::spawn(async move {
                    let service =
                        hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                            let store = store.clone();
                            async move {
                                let ok = req.uri().path() == "/v1/traces";
                                let body = req.into_body().collect().await.map(|b| b.to_bytes());
                                let decoded = body
                                    .ok()
                                    .filter(|_| ok)
                                    .and_then(|b| ExportTraceServiceRequest::decode(b).ok());
                                let mut resp = match decoded {
                                    Some(r) => {
                                        store.lock().unwrap().extend(records(r));
                                        let body =
                                            ExportTraceServiceResponse::default().encode_to_vec();
                                        Response::new(Full::new(Bytes::from(body)))
                                    }
                                    None => {
                                        let mut r = Response::new(Full::new(Bytes::new()));
                                        *r.status_mut() = hyper::StatusCode::BAD_REQUEST;
                                        r
                                    }
                                };
                                resp.headers_mut().insert(
                                    hyper::header::CONTENT_TYPE,
                                    hyper::header::HeaderValue::from_static(
                                        "application/x-protobuf",
                                    ),
                                );
                                Ok::<_, Infallible>(resp)
                            }
                        });
                    let _ = tokio::time::timeout(
                        Duration::from_secs(60),
                        hyper::server::conn::http1::Builder::new()
                            .serve_connection(TokioIo::new(stream), service),
                    )
                    .await;
                });
            }
        });
        OtlpReceiver { addr, spans }
    }

    /// The same receiver speaking OTLP/gRPC (`TraceService/Export` over
    /// HTTP/2, the generated tonic service of `opentelemetry-proto`).
    pub async fn start_grpc() -> OtlpReceiver {
        use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
            TraceService, TraceServiceServer,
        };

        struct Sink(Arc<Mutex<Vec<SpanRecord>>>);

        #[tonic::async_trait]
        impl TraceService for Sink {
            async fn export(
                &self,
                req: tonic::Request<ExportTraceServiceRequest>,
            ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
                self.0.lock().unwrap().extend(records(req.into_inner()));
                Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
            }
        }

        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the OTLP/gRPC receiver");
        let addr = listener.local_addr().expect("addr");
        let spans = Arc::new(Mutex::new(Vec::new()));
        let svc = TraceServiceServer::new(Sink(spans.clone()));
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let svc = hyper_util::service::TowerToHyperService::new(svc.clone());
                tokio::spawn(async move {
                    let _ = tokio::time::timeout(
                        Duration::from_secs(60),
                        hyper_util::server::conn::auto::Builder::new(
                            hyper_util::rt::TokioExecutor::new(),
                        )
                        .serve_connection(TokioIo::new(stream), svc),
                    )
                    .await;
                });
            }
        });
        OtlpReceiver { addr, spans }
    }

    /// `OTEL_EXPORTER_OTLP_ENDPOINT` for this receiver.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn spans(&self) -> Vec<SpanRecord> {
        self.spans.lock().unwrap().clone()
    }

    /// Wait (at most `timeout`) until `done` holds for the spans received.
    pub async fn wait_for(
        &self,
        timeout: Duration,
        what: &str,
        done: impl Fn(&[SpanRecord]) -> bool,
    ) -> Vec<SpanRecord> {
        let end = Instant::now() + timeout;
        loop {
            let spans = self.spans();
            if done(&spans) {
                return spans;
            }
            assert!(
                Instant::now() < end,
                "timed out waiting for {what}; spans so far: {:#?}",
                spans
                    .iter()
                    .map(|s| (&s.service, &s.name, &s.trace_id))
                    .collect::<Vec<_>>()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}
