//! # cirrus-admin
//!
//! The admin port of the broker and of the operator: a small HTTP/1.1
//! server for Kubernetes probes and Prometheus scrapes ([`serve`]), the
//! Prometheus text format ([`Exposition`]) and a lock-free latency
//! [`Histogram`]. It carries no client data and no secrets.

use std::convert::Infallible;
use std::fmt::Write as _;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use http_body_util::Full;
use hyper::body::Bytes;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::debug;

pub use hyper::StatusCode;

/// Serve `handler` (path → status and plain-text body) on `listener` until
/// `stop`. A connection lives at most a minute: probes and scrapes are
/// quick, and nothing may pile up.
pub async fn serve<H, F>(listener: TcpListener, stop: CancellationToken, handler: H)
where
    H: Fn(String) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = (StatusCode, String)> + Send + 'static,
{
    loop {
        let (stream, peer) = tokio::select! {
            _ = stop.cancelled() => return,
            r = listener.accept() => match r {
                Ok(s) => s,
                Err(e) => {
                    debug!(error = %e, "admin accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let handler = handler.clone();
        let stop = stop.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                let reply = handler(req.uri().path().to_string());
                async move {
                    let (status, body) = reply.await;
                    Ok::<_, Infallible>(text(status, body))
                }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service);
            tokio::select! {
                r = conn => if let Err(e) = r { debug!(%peer, error = %e, "admin connection"); },
                _ = stop.cancelled() => {}
                _ = tokio::time::sleep(Duration::from_secs(60)) => {}
            }
        });
    }
}

fn text(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
    );
    r
}

/// A Prometheus text exposition being written.
#[derive(Debug, Default)]
pub struct Exposition(String);

impl Exposition {
    pub fn new() -> Exposition {
        Exposition(String::with_capacity(8192))
    }

    pub fn finish(self) -> String {
        self.0
    }

    pub fn head(&mut self, name: &str, kind: &str, help: &str) {
        let _ = writeln!(self.0, "# HELP {name} {help}\n# TYPE {name} {kind}");
    }

    /// One unlabelled sample.
    pub fn one(&mut self, name: &str, kind: &str, help: &str, v: u64) {
        self.head(name, kind, help);
        let _ = writeln!(self.0, "{name} {v}");
    }

    /// One sample per value of a single label.
    pub fn labelled(
        &mut self,
        name: &str,
        kind: &str,
        help: &str,
        rows: &[(&str, u64)],
        label: &str,
    ) {
        self.head(name, kind, help);
        for (l, v) in rows {
            self.sample(name, &[(label, l)], *v);
        }
    }

    /// One sample line with any labels (after its `head`).
    pub fn sample(&mut self, name: &str, labels: &[(&str, &str)], v: u64) {
        let _ = write!(self.0, "{name}");
        for (i, (k, l)) in labels.iter().enumerate() {
            let sep = if i == 0 { '{' } else { ',' };
            let _ = write!(self.0, "{sep}{k}=\"{l}\"");
        }
        let close = if labels.is_empty() { "" } else { "}" };
        let _ = writeln!(self.0, "{close} {v}");
    }

    pub fn histogram(&mut self, name: &str, help: &str, h: &Histogram) {
        self.head(name, "histogram", help);
        let (buckets, sum, count) = h.snapshot();
        for (le, n) in buckets {
            if le.is_infinite() {
                let _ = writeln!(self.0, "{name}_bucket{{le=\"+Inf\"}} {n}");
            } else {
                let _ = writeln!(self.0, "{name}_bucket{{le=\"{le}\"}} {n}");
            }
        }
        let _ = writeln!(self.0, "{name}_sum {sum}\n{name}_count {count}");
    }
}

/// Upper bounds (seconds) of the latency histograms' buckets.
pub const LATENCY_BUCKETS: [f64; 16] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0,
];

/// A Prometheus histogram on atomics: no lock on the paths that observe it.
#[derive(Debug, Default)]
pub struct Histogram {
    /// Per bucket (not cumulative); the last slot is +Inf.
    buckets: [AtomicU64; LATENCY_BUCKETS.len() + 1],
    sum_micros: AtomicU64,
    count: AtomicU64,
}

impl Histogram {
    pub fn observe(&self, d: Duration) {
        let secs = d.as_secs_f64();
        let i = LATENCY_BUCKETS
            .iter()
            .position(|&b| secs <= b)
            .unwrap_or(LATENCY_BUCKETS.len());
        self.buckets[i].fetch_add(1, Ordering::Relaxed);
        self.sum_micros
            .fetch_add(d.as_micros() as u64, Ordering::Relaxed);
        self.count.fetch_add(1, Ordering::Relaxed);
    }

    /// Cumulative bucket counts, sum (seconds) and count.
    pub fn snapshot(&self) -> (Vec<(f64, u64)>, f64, u64) {
        let mut acc = 0;
        let mut out = Vec::with_capacity(LATENCY_BUCKETS.len() + 1);
        for (i, b) in self.buckets.iter().enumerate() {
            acc += b.load(Ordering::Relaxed);
            out.push((
                LATENCY_BUCKETS.get(i).copied().unwrap_or(f64::INFINITY),
                acc,
            ));
        }
        let sum = self.sum_micros.load(Ordering::Relaxed) as f64 / 1e6;
        (out, sum, self.count.load(Ordering::Relaxed))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn histogram_buckets_are_cumulative() {
        let h = Histogram::default();
        h.observe(Duration::from_micros(50));
        h.observe(Duration::from_millis(3));
        h.observe(Duration::from_secs(60));
        let (b, sum, count) = h.snapshot();
        assert_eq!(count, 3);
        assert_eq!(b[0], (0.0001, 1));
        assert_eq!(b.last().unwrap().1, 3);
        assert!(b.last().unwrap().0.is_infinite());
        assert!((sum - 60.00305).abs() < 1e-6);
        let mut e = Exposition::new();
        e.histogram("x_seconds", "X.", &h);
        let out = e.finish();
        assert!(out.contains("x_seconds_bucket{le=\"+Inf\"} 3\n"));
        assert!(out.contains("x_seconds_count 3\n"));
    }

    #[tokio::test]
    async fn serves_paths_over_http() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let stop = CancellationToken::new();
        tokio::spawn(serve(l, stop.clone(), |path: String| async move {
            match path.as_str() {
                "/healthz" => (StatusCode::OK, "ok\n".to_string()),
                _ => (StatusCode::NOT_FOUND, "not found\n".to_string()),
            }
        }));
        for (path, want) in [("/healthz", "200 OK"), ("/nope", "404 Not Found")] {
            let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
            s.write_all(
                format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes(),
            )
            .await
            .unwrap();
            let mut out = String::new();
            s.read_to_string(&mut out).await.unwrap();
            assert!(out.starts_with(&format!("HTTP/1.1 {want}")), "{out}");
        }
        stop.cancel();
    }
}
