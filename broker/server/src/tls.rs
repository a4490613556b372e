//! The TLS listener's certificates: PEM files turned into a rustls
//! `ServerConfig`, rebuilt when the files change (Kubernetes updates mounted
//! Secrets in place) and swapped in atomically; every new connection uses
//! the current one, established connections keep theirs. A change that does
//! not load keeps the last good configuration and says so in the log.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use arc_swap::ArcSwap;
use cirrus_config::broker::Tls;
use parking_lot::Mutex;
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::TlsAcceptor;
use tracing::{error, info};

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {what}")]
    Pem { path: PathBuf, what: String },
    #[error("TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
    #[error("client CA: {0}")]
    Verifier(String),
    #[error("TLS needs tls.cert_file and tls.key_file")]
    Missing,
}

/// The files, as last read.
#[derive(PartialEq)]
struct Files {
    cert: Vec<u8>,
    key: Vec<u8>,
    ca: Option<Vec<u8>>,
}

pub struct TlsState {
    cert: PathBuf,
    key: PathBuf,
    ca: Option<PathBuf>,
    pub cert_as_username: bool,
    current: ArcSwap<ServerConfig>,
    last: Mutex<Files>,
    pub reload_failures: AtomicU64,
}

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        path: path.to_owned(),
        source,
    })
}

fn build(
    files: &Files,
    cert_path: &Path,
    key_path: &Path,
    ca_path: Option<&Path>,
) -> Result<ServerConfig, TlsError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let pem = |path: &Path, what: String| TlsError::Pem {
        path: path.to_owned(),
        what,
    };
    let certs = CertificateDer::pem_slice_iter(&files.cert)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| pem(cert_path, format!("not a PEM certificate chain ({e})")))?;
    if certs.is_empty() {
        return Err(pem(cert_path, "no certificate in the file".into()));
    }
    // The key's own error is not shown: it could quote key material.
    let key = PrivateKeyDer::from_pem_slice(&files.key)
        .map_err(|_| pem(key_path, "no usable private key in the file".into()))?;
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS12, &rustls::version::TLS13])?;
    let builder = match (&files.ca, ca_path) {
        (Some(ca), Some(ca_path)) => {
            let mut roots = RootCertStore::empty();
            for c in CertificateDer::pem_slice_iter(ca) {
                let c = c.map_err(|e| pem(ca_path, format!("not a PEM certificate ({e})")))?;
                roots.add(c)?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .map_err(|e| TlsError::Verifier(e.to_string()))?;
            builder.with_client_cert_verifier(verifier)
        }
        _ => builder.with_no_client_auth(),
    };
    Ok(builder.with_single_cert(certs, key)?)
}

impl TlsState {
    pub fn new(cfg: &Tls) -> Result<TlsState, TlsError> {
        let (Some(cert), Some(key)) = (cfg.cert_file.clone(), cfg.key_file.clone()) else {
            return Err(TlsError::Missing);
        };
        let ca = cfg.client_ca_file.clone();
        let files = Files {
            cert: read(&cert)?,
            key: read(&key)?,
            ca: ca.as_deref().map(read).transpose()?,
        };
        let config = build(&files, &cert, &key, ca.as_deref())?;
        Ok(TlsState {
            cert,
            key,
            ca,
            cert_as_username: cfg.cert_as_username,
            current: ArcSwap::from_pointee(config),
            last: Mutex::new(files),
            reload_failures: AtomicU64::new(0),
        })
    }

    pub fn acceptor(&self) -> TlsAcceptor {
        TlsAcceptor::from(self.current.load_full())
    }

    /// Rebuild from the files if any changed; true when a new one is in use.
    pub fn reload_if_changed(&self) -> bool {
        // A file missing for a moment (a Secret mid-update) is no change.
        let Ok(cert) = read(&self.cert) else {
            return false;
        };
        let Ok(key) = read(&self.key) else {
            return false;
        };
        let ca = match self.ca.as_deref().map(read).transpose() {
            Ok(ca) => ca,
            Err(_) => return false,
        };
        let files = Files { cert, key, ca };
        let mut last = self.last.lock();
        if *last == files {
            return false;
        }
        let built = build(&files, &self.cert, &self.key, self.ca.as_deref());
        *last = files;
        match built {
            Ok(config) => {
                self.current.store(Arc::new(config));
                info!(cert = %self.cert.display(), "TLS certificates reloaded");
                true
            }
            Err(e) => {
                self.reload_failures.fetch_add(1, Ordering::Relaxed);
                error!(error = %e, "TLS reload failed; keeping the previous certificates");
                false
            }
        }
    }
}

/// The Common Name of a DER certificate.
pub fn common_name(der: &[u8]) -> Option<String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    let cn = cert.subject().iter_common_name().next()?;
    cn.as_str().ok().map(str::to_owned)
}
