//! The custom metrics API (`custom.metrics.k8s.io/v1beta1`) for the broker
//! pods' `cirrus_connections`, so that a HorizontalPodAutoscaler with
//! `targetConnectionsPerPod` works with nothing else installed.
//!
//! The API server's aggregation layer forwards requests here over TLS: it
//! proves itself with a client certificate from the cluster's request-header
//! CA and names the user in `X-Remote-User` / `X-Remote-Group`
//! (ConfigMap `kube-system/extension-apiserver-authentication`); each
//! request is then authorized with a SubjectAccessReview, as every
//! aggregated API server does. The serving certificate comes from a CA the
//! operator keeps in a Secret of its own namespace, and that CA is the
//! `caBundle` of the APIService (which the Helm chart creates).
//!
//! Values are read from each broker pod's admin port (`/metrics`), at the
//! time of the request, in parallel, each bounded by a timeout.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http_body_util::Full;
use hyper::body::Bytes;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use k8s_openapi::api::authorization::v1::{
    ResourceAttributes, SubjectAccessReview, SubjectAccessReviewSpec,
};
use k8s_openapi::api::core::v1::{ConfigMap, Pod, Secret};
use k8s_openapi::ByteString;
use kube::api::{ListParams, Patch, PatchParams, PostParams};
use kube::{Api, Client};
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::resources::ADMIN_PORT;
use crate::tls;

pub const GROUP: &str = "custom.metrics.k8s.io";
pub const VERSION: &str = "v1beta1";
/// The APIService the chart creates and the operator gives its CA.
pub const API_SERVICE: &str = "v1beta1.custom.metrics.k8s.io";
pub const METRIC: &str = "cirrus_connections";
/// Label every broker pod carries.
pub(crate) const BROKER_LABEL: &str = "app.kubernetes.io/name=cirrus-broker";
/// A scrape of one pod: at most this long, and at most this many bytes.
const SCRAPE_TIMEOUT: Duration = Duration::from_secs(2);
const SCRAPE_MAX: u64 = 4 << 20;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error("{0}")]
    Tls(#[from] tls::TlsError),
    #[error("TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
    #[error("{0}")]
    Config(String),
    #[error("listening: {0}")]
    Io(#[from] std::io::Error),
}

/// Where and as what the API is served.
pub struct Config {
    pub addr: SocketAddr,
    /// The Service in front of the operator pods (the APIService's).
    pub service: String,
    /// The operator's own namespace (the Service's and the CA Secret's).
    pub namespace: String,
    /// Serve only this namespace's pods (the operator's watched one).
    pub watch: Option<String>,
}

/// Who may call: the request-header CA's clients with these names (any
/// name when empty), users named in these headers.
struct RequestHeader {
    allowed_names: Vec<String>,
    user_headers: Vec<String>,
    group_headers: Vec<String>,
}

struct State {
    client: Client,
    auth: RequestHeader,
    watch: Option<String>,
}

/// Set up (serving certificate, APIService CA bundle, request-header
/// trust) and serve until `stop`.
pub async fn run(client: Client, cfg: Config, stop: CancellationToken) -> Result<(), Error> {
    let (ca_pem, serving) = serving_certificate(&client, &cfg).await?;
    register(&client, &ca_pem).await?;
    let (auth, client_ca) = request_header(&client).await?;
    let tls = server_config(&serving, &client_ca)?;
    let listener = TcpListener::bind(cfg.addr).await?;
    info!(addr = %cfg.addr, "custom metrics API ({GROUP}/{VERSION}: {METRIC})");
    let state = Arc::new(State {
        client,
        auth,
        watch: cfg.watch,
    });
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));
    loop {
        let (tcp, peer) = tokio::select! {
            _ = stop.cancelled() => return Ok(()),
            r = listener.accept() => match r {
                Ok(s) => s,
                Err(e) => {
                    debug!(error = %e, "custom metrics accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let (acceptor, state, stop) = (acceptor.clone(), state.clone(), stop.clone());
        tokio::spawn(async move {
            let Ok(Ok(stream)) =
                tokio::time::timeout(Duration::from_secs(10), acceptor.accept(tcp)).await
            else {
                debug!(%peer, "custom metrics TLS handshake failed");
                return;
            };
            let name = stream
                .get_ref()
                .1
                .peer_certificates()
                .and_then(|c| c.first())
                .and_then(|c| common_name(c.as_ref()));
            let service = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                let (state, name) = (state.clone(), name.clone());
                async move { Ok::<_, Infallible>(handle(&state, name.as_deref(), req).await) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service);
            tokio::select! {
                r = conn => if let Err(e) = r { debug!(%peer, error = %e, "custom metrics connection"); },
                _ = stop.cancelled() => {}
                _ = tokio::time::sleep(Duration::from_secs(300)) => {}
            }
        });
    }
}

/// The CA and serving certificate, from the Secret `<service>-tls` in the
/// operator's namespace (made by the first replica to need it, shared by
/// all; issued again when it nears its end or its names changed).
async fn serving_certificate(client: &Client, cfg: &Config) -> Result<(String, tls::Pair), Error> {
    let api: Api<Secret> = Api::namespaced(client.clone(), &cfg.namespace);
    let name = format!("{}-tls", cfg.service);
    let names = tls::dns_names(&cfg.service, &cfg.namespace);
    let now = time_now();
    for _ in 0..3 {
        let existing = api.get_opt(&name).await?;
        if let Some(s) = &existing {
            let ca = tls::ca_from_secret(s);
            let cert = tls::cert_of(s);
            let key = s
                .data
                .as_ref()
                .and_then(|d| d.get("tls.key"))
                .and_then(|k| String::from_utf8(k.0.clone()).ok());
            if let (Some(ca), Some(cert), Some(key)) = (ca, cert, key) {
                if !tls::needs_renewal(Some(&cert), &names, now) {
                    return Ok((ca.cert, tls::Pair { cert, key }));
                }
            }
        }
        let ca = tls::new_ca(&cfg.namespace)?;
        let leaf = tls::issue(&ca, &names)?;
        let mut data = BTreeMap::new();
        data.insert(
            "ca.crt".to_string(),
            ByteString(ca.cert.clone().into_bytes()),
        );
        data.insert(
            "ca.key".to_string(),
            ByteString(ca.key.clone().into_bytes()),
        );
        data.insert(
            "tls.crt".to_string(),
            ByteString(leaf.cert.clone().into_bytes()),
        );
        data.insert(
            "tls.key".to_string(),
            ByteString(leaf.key.clone().into_bytes()),
        );
        let mut secret = Secret {
            metadata: kube::api::ObjectMeta {
                name: Some(name.clone()),
                namespace: Some(cfg.namespace.clone()),
                ..Default::default()
            },
            type_: Some("kubernetes.io/tls".into()),
            data: Some(data),
            ..Default::default()
        };
        let written = match existing {
            // Replaced only if nobody else did in between: the
            // resourceVersion in the patch is a precondition.
            Some(old) => {
                secret.metadata.resource_version = old.metadata.resource_version;
                api.patch(&name, &PatchParams::default(), &Patch::Merge(&secret))
                    .await
            }
            None => api.create(&PostParams::default(), &secret).await,
        };
        match written {
            Ok(_) => {
                info!(secret = %name, "custom metrics API: new serving certificate");
                return Ok((ca.cert, leaf));
            }
            // Another replica was first: use what it wrote.
            Err(kube::Error::Api(e)) if e.code == 409 => continue,
            Err(e) => return Err(e.into()),
        }
    }
    Err(Error::Config(format!(
        "the Secret {name} kept changing under this replica"
    )))
}

fn time_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

/// Give the APIService the CA that signed the serving certificate.
async fn register(client: &Client, ca_pem: &str) -> Result<(), Error> {
    let api: Api<kube::core::DynamicObject> = Api::all_with(
        client.clone(),
        &kube::discovery::ApiResource {
            group: "apiregistration.k8s.io".into(),
            version: "v1".into(),
            api_version: "apiregistration.k8s.io/v1".into(),
            kind: "APIService".into(),
            plural: "apiservices".into(),
        },
    );
    // ByteString serialises as base64, as the API server wants `[]byte`.
    let patch = json!({"spec": {"caBundle": ByteString(ca_pem.as_bytes().to_vec())}});
    api.patch(API_SERVICE, &PatchParams::default(), &Patch::Merge(&patch))
        .await?;
    Ok(())
}

/// The request-header settings the API server publishes for extension API
/// servers, and the CA of its proxy's client certificate.
async fn request_header(client: &Client) -> Result<(RequestHeader, String), Error> {
    let cm: ConfigMap = Api::namespaced(client.clone(), "kube-system")
        .get("extension-apiserver-authentication")
        .await?;
    let data = cm.data.unwrap_or_default();
    let ca = data
        .get("requestheader-client-ca-file")
        .filter(|s| !s.trim().is_empty())
        .cloned()
        .ok_or_else(|| {
            Error::Config(
                "the API server has no request-header CA (--requestheader-client-ca-file): \
                 it cannot forward to an aggregated API"
                    .into(),
            )
        })?;
    let list = |k: &str, default: &[&str]| -> Vec<String> {
        data.get(k)
            .and_then(|v| serde_json::from_str::<Vec<String>>(v).ok())
            .filter(|v| !v.is_empty())
            .unwrap_or_else(|| default.iter().map(|s| s.to_string()).collect())
    };
    Ok((
        RequestHeader {
            allowed_names: list("requestheader-allowed-names", &[]),
            user_headers: list("requestheader-username-headers", &["X-Remote-User"]),
            group_headers: list("requestheader-group-headers", &["X-Remote-Group"]),
        },
        ca,
    ))
}

fn server_config(serving: &tls::Pair, client_ca: &str) -> Result<ServerConfig, Error> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let certs = CertificateDer::pem_slice_iter(serving.cert.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| Error::Config(format!("serving certificate: {e}")))?;
    let key = PrivateKeyDer::from_pem_slice(serving.key.as_bytes())
        .map_err(|_| Error::Config("serving key unusable".into()))?;
    let mut roots = RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(client_ca.as_bytes()) {
        let c = c.map_err(|e| Error::Config(format!("request-header CA: {e}")))?;
        roots.add(c)?;
    }
    // Only the API server's proxy, with its client certificate, gets in.
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .build()
        .map_err(|e| Error::Config(format!("request-header CA: {e}")))?;
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS12, &rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_single_cert(certs, key)?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(config)
}

fn common_name(der: &[u8]) -> Option<String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    let cn = cert.subject().iter_common_name().next()?;
    cn.as_str().ok().map(str::to_string)
}

fn reply(status: StatusCode, body: serde_json::Value) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body.to_string())));
    *r.status_mut() = status;
    r.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    r
}

/// A Kubernetes `Status` error.
fn failure(status: StatusCode, reason: &str, message: String) -> Response<Full<Bytes>> {
    reply(
        status,
        json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
               "message": message, "reason": reason, "code": status.as_u16()}),
    )
}

async fn handle(
    state: &State,
    peer_name: Option<&str>,
    req: Request<hyper::body::Incoming>,
) -> Response<Full<Bytes>> {
    let allowed = &state.auth.allowed_names;
    if !allowed.is_empty() && !peer_name.is_some_and(|n| allowed.iter().any(|a| a == n)) {
        return failure(
            StatusCode::UNAUTHORIZED,
            "Unauthorized",
            "client certificate not allowed".into(),
        );
    }
    let headers = req.headers();
    let values = |names: &[String]| -> Vec<String> {
        names
            .iter()
            .flat_map(|n| headers.get_all(n.as_str()))
            .filter_map(|v| v.to_str().ok())
            .map(str::to_string)
            .collect()
    };
    let Some(user) = values(&state.auth.user_headers).into_iter().next() else {
        return failure(
            StatusCode::UNAUTHORIZED,
            "Unauthorized",
            "no user in the request headers".into(),
        );
    };
    let groups = values(&state.auth.group_headers);
    let path = req.uri().path().trim_end_matches('/').to_string();
    let query = req.uri().query().unwrap_or_default().to_string();
    let base = format!("/apis/{GROUP}/{VERSION}");
    if path == format!("/apis/{GROUP}") {
        let gv = json!({"groupVersion": format!("{GROUP}/{VERSION}"), "version": VERSION});
        return reply(
            StatusCode::OK,
            json!({"kind": "APIGroup", "apiVersion": "v1", "name": GROUP,
                   "versions": [gv.clone()], "preferredVersion": gv}),
        );
    }
    if path == base {
        return reply(
            StatusCode::OK,
            json!({"kind": "APIResourceList", "apiVersion": "v1",
                   "groupVersion": format!("{GROUP}/{VERSION}"),
                   "resources": [{"name": format!("pods/{METRIC}"), "singularName": "",
                                  "namespaced": true, "kind": "MetricValueList", "verbs": ["get"]}]}),
        );
    }
    // /namespaces/{ns}/pods/{name or *}/{metric}
    let parts: Vec<&str> = path
        .strip_prefix(&base)
        .unwrap_or_default()
        .split('/')
        .collect();
    let ["", "namespaces", ns, "pods", pod, metric] = parts[..] else {
        return failure(
            StatusCode::NOT_FOUND,
            "NotFound",
            format!("{path}: no such metric"),
        );
    };
    // "All pods" may come percent-encoded; names never hold a '%'.
    let pod = if pod.eq_ignore_ascii_case("%2A") {
        "*"
    } else {
        pod
    };
    match authorize(state, &user, &groups, ns, pod, metric).await {
        Ok(true) => {}
        Ok(false) => {
            return failure(
                StatusCode::FORBIDDEN,
                "Forbidden",
                format!("{user} may not get {GROUP} pods/{metric} in {ns}"),
            )
        }
        Err(e) => {
            warn!(error = %e, "custom metrics: SubjectAccessReview failed");
            return failure(
                StatusCode::INTERNAL_SERVER_ERROR,
                "InternalError",
                "authorization check failed".into(),
            );
        }
    }
    if metric != METRIC {
        return failure(
            StatusCode::NOT_FOUND,
            "NotFound",
            format!("the only metric here is {METRIC}, not {metric}"),
        );
    }
    let selector = query_param(&query, "labelSelector");
    match values_of(state, ns, pod, selector.as_deref()).await {
        Ok(items) => reply(
            StatusCode::OK,
            json!({"kind": "MetricValueList", "apiVersion": format!("{GROUP}/{VERSION}"),
                   "metadata": {}, "items": items}),
        ),
        Err(e) => {
            warn!(error = %e, "custom metrics: listing pods failed");
            failure(
                StatusCode::INTERNAL_SERVER_ERROR,
                "InternalError",
                "listing pods failed".into(),
            )
        }
    }
}

async fn authorize(
    state: &State,
    user: &str,
    groups: &[String],
    ns: &str,
    pod: &str,
    metric: &str,
) -> Result<bool, kube::Error> {
    let review = SubjectAccessReview {
        spec: SubjectAccessReviewSpec {
            user: Some(user.into()),
            groups: Some(groups.to_vec()),
            resource_attributes: Some(ResourceAttributes {
                group: Some(GROUP.into()),
                version: Some(VERSION.into()),
                resource: Some("pods".into()),
                subresource: Some(metric.into()),
                namespace: Some(ns.into()),
                name: (pod != "*").then(|| pod.to_string()),
                verb: Some(if pod == "*" { "list" } else { "get" }.into()),
                ..Default::default()
            }),
            ..Default::default()
        },
        ..Default::default()
    };
    let r = Api::<SubjectAccessReview>::all(state.client.clone())
        .create(&PostParams::default(), &review)
        .await?;
    Ok(r.status.is_some_and(|s| s.allowed))
}

/// A decoded query parameter.
fn query_param(query: &str, key: &str) -> Option<String> {
    form_urlencoded::parse(query.as_bytes())
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.into_owned())
}

/// The metric of the broker pods that match: running, with an address,
/// answering their admin port in time.
async fn values_of(
    state: &State,
    ns: &str,
    pod: &str,
    selector: Option<&str>,
) -> Result<Vec<serde_json::Value>, kube::Error> {
    if state.watch.as_deref().is_some_and(|w| w != ns) {
        return Ok(Vec::new());
    }
    let labels = match selector.filter(|s| !s.is_empty()) {
        Some(s) => format!("{BROKER_LABEL},{s}"),
        None => BROKER_LABEL.to_string(),
    };
    let mut lp = ListParams::default().labels(&labels);
    if pod != "*" {
        lp = lp.fields(&format!("metadata.name={pod}"));
    }
    let pods = Api::<Pod>::namespaced(state.client.clone(), ns)
        .list(&lp)
        .await?;
    let now = k8s_openapi::jiff::Timestamp::now().to_string();
    let scrapes = pods.items.into_iter().filter_map(|p| {
        let ip = serving_ip(&p)?;
        let name = p.metadata.name.clone()?;
        Some(async move { (name, scrape(&ip).await) })
    });
    let mut items = Vec::new();
    for (name, value) in futures_util::future::join_all(scrapes).await {
        let Some(v) = value else {
            debug!(pod = %name, "custom metrics: no value");
            continue;
        };
        items.push(json!({
            "describedObject": {"kind": "Pod", "namespace": ns, "name": name, "apiVersion": "/v1"},
            "metricName": METRIC,
            "timestamp": now,
            "value": v.to_string(),
        }));
    }
    Ok(items)
}

/// The address of a pod that runs and is not being deleted (one whose
/// count means something).
pub(crate) fn serving_ip(p: &Pod) -> Option<String> {
    let st = p.status.as_ref()?;
    if st.phase.as_deref() != Some("Running") || p.metadata.deletion_timestamp.is_some() {
        return None;
    }
    st.pod_ip.clone()
}

/// `cirrus_connections` from a broker pod's `/metrics`.
pub(crate) async fn scrape(ip: &str) -> Option<u64> {
    let read = async {
        let mut s = TcpStream::connect((ip, ADMIN_PORT)).await.ok()?;
        s.write_all(b"GET /metrics HTTP/1.0\r\nHost: broker\r\n\r\n")
            .await
            .ok()?;
        let mut body = Vec::new();
        s.take(SCRAPE_MAX).read_to_end(&mut body).await.ok()?;
        let text = String::from_utf8_lossy(&body);
        let (head, rest) = text.split_once("\r\n\r\n")?;
        if !head.starts_with("HTTP/1.1 200") && !head.starts_with("HTTP/1.0 200") {
            return None;
        }
        parse_metric(rest, METRIC)
    };
    tokio::time::timeout(SCRAPE_TIMEOUT, read)
        .await
        .ok()
        .flatten()
}

/// The value of an unlabelled gauge in a Prometheus text exposition.
fn parse_metric(text: &str, metric: &str) -> Option<u64> {
    text.lines().find_map(|l| {
        let v: f64 = l
            .strip_prefix(metric)?
            .strip_prefix(' ')?
            .trim()
            .parse()
            .ok()?;
        (v.is_finite() && v >= 0.0).then_some(v as u64)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_gauge_is_read_and_its_relatives_are_not() {
        let text =
            "# TYPE cirrus_connections gauge\ncirrus_connections_total 99\ncirrus_connections 12\n";
        assert_eq!(parse_metric(text, METRIC), Some(12));
        assert_eq!(parse_metric("cirrus_connections_total 3\n", METRIC), None);
        assert_eq!(parse_metric("cirrus_connections NaN\n", METRIC), None);
    }

    #[test]
    fn a_label_selector_is_decoded_from_the_query() {
        let q = "labelSelector=app.kubernetes.io%2Finstance%3Dh%2Capp.kubernetes.io%2Fname%3Dcirrus-broker&x=1";
        assert_eq!(
            query_param(q, "labelSelector").as_deref(),
            Some("app.kubernetes.io/instance=h,app.kubernetes.io/name=cirrus-broker")
        );
        assert_eq!(query_param(q, "missing"), None);
    }
}
