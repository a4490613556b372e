//! The operator's CA and the brokers' server certificates.
//!
//! Per namespace the operator keeps one CA in the Secret `cirrus-ca`
//! (created on first use, valid ten years). A broker with `tls.enabled` and
//! no `tls.secretName` gets a `kubernetes.io/tls` Secret `{broker}-tls`
//! signed by it for the Service's DNS names, valid 90 days and issued again
//! when less than 30 days remain, when its names changed or when it does
//! not parse. Brokers re-read the mounted files by themselves, so a renewal
//! rolls no pod.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::ByteString;
use kube::api::ObjectMeta;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose,
};

/// The namespace's CA Secret.
pub const CA_SECRET: &str = "cirrus-ca";
const CA_DAYS: i64 = 3650;
pub const SERVER_DAYS: i64 = 90;
/// Renew when less than this is left.
pub const RENEW_BEFORE_DAYS: i64 = 30;

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("certificate generation failed: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("the CA Secret {CA_SECRET} is unreadable: {0}")]
    BadCa(&'static str),
}

/// PEM certificate and key.
#[derive(Clone)]
pub struct Pair {
    pub cert: String,
    pub key: String,
}

impl std::fmt::Debug for Pair {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the key.
        f.debug_struct("Pair").field("cert", &self.cert).finish()
    }
}

/// The names a broker's certificate covers: its Service, in every form a
/// client inside the cluster may use.
pub fn dns_names(service: &str, ns: &str) -> Vec<String> {
    vec![
        service.to_string(),
        format!("{service}.{ns}"),
        format!("{service}.{ns}.svc"),
        format!("{service}.{ns}.svc.cluster.local"),
    ]
}

/// A name a certificate can carry: an IP address, or a DNS name of ASCII
/// labels (letters, digits, `-`; a leading `*.` wildcard allowed).
pub fn valid_san(n: &str) -> bool {
    if n.parse::<std::net::IpAddr>().is_ok() {
        return true;
    }
    let host = n.strip_prefix("*.").unwrap_or(n);
    !host.is_empty()
        && n.len() <= 253
        && host.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && !l.starts_with('-')
                && !l.ends_with('-')
                && l.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
        })
}

fn validity(p: &mut CertificateParams, days: i64) {
    let now = time::OffsetDateTime::now_utc();
    // A little slack for clocks that are behind.
    p.not_before = now - time::Duration::hours(1);
    p.not_after = now + time::Duration::days(days);
}

pub fn new_ca(ns: &str) -> Result<Pair, TlsError> {
    let key = KeyPair::generate()?;
    let mut p = CertificateParams::new(Vec::<String>::new())?;
    p.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    // Each CA's name is its own (the time it was made), so that a server
    // certificate tells which CA issued it across a rotation.
    let made = time::OffsetDateTime::now_utc().unix_timestamp_nanos();
    p.distinguished_name.push(
        DnType::CommonName,
        format!("cirrus operator CA ({ns}) {made}"),
    );
    p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    validity(&mut p, CA_DAYS);
    let cert = p.self_signed(&key)?;
    Ok(Pair {
        cert: cert.pem(),
        key: key.serialize_pem(),
    })
}

/// A server certificate for `names`, signed by the CA.
pub fn issue(ca: &Pair, names: &[String]) -> Result<Pair, TlsError> {
    let ca_key = KeyPair::from_pem(&ca.key).map_err(|_| TlsError::BadCa("key"))?;
    let ca_params = CertificateParams::from_ca_cert_pem(&ca.cert)
        .map_err(|_| TlsError::BadCa("certificate"))?;
    let ca_cert = ca_params.self_signed(&ca_key)?;
    let key = KeyPair::generate()?;
    let mut p = CertificateParams::new(names.to_vec())?;
    p.distinguished_name.push(
        DnType::CommonName,
        names.first().cloned().unwrap_or_default(),
    );
    p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    p.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    validity(&mut p, SERVER_DAYS);
    let cert = p.signed_by(&key, &ca_cert, &ca_key)?;
    Ok(Pair {
        cert: cert.pem(),
        key: key.serialize_pem(),
    })
}

/// What an existing certificate says: when it expires (unix seconds) and
/// its DNS names and IP addresses. `None` when it does not parse.
pub fn inspect(cert_pem: &str) -> Option<(i64, Vec<String>)> {
    let (_, pem) = x509_parser::pem::parse_x509_pem(cert_pem.as_bytes()).ok()?;
    let cert = pem.parse_x509().ok()?;
    let not_after = cert.validity().not_after.timestamp();
    let mut names = Vec::new();
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for n in &san.value.general_names {
            match n {
                x509_parser::extensions::GeneralName::DNSName(d) => names.push(d.to_string()),
                x509_parser::extensions::GeneralName::IPAddress(b) => {
                    let ip = match b.len() {
                        4 => <[u8; 4]>::try_from(*b).ok().map(std::net::IpAddr::from),
                        16 => <[u8; 16]>::try_from(*b).ok().map(std::net::IpAddr::from),
                        _ => None,
                    };
                    names.extend(ip.map(|ip| ip.to_string()));
                }
                _ => {}
            }
        }
    }
    Some((not_after, names))
}

/// The issuer's name in a certificate, and the subject's: a server
/// certificate was issued by a CA when its issuer is the CA's subject.
pub fn issuer_and_subject(cert_pem: &str) -> Option<(String, String)> {
    let (_, pem) = x509_parser::pem::parse_x509_pem(cert_pem.as_bytes()).ok()?;
    let cert = pem.parse_x509().ok()?;
    Some((cert.issuer().to_string(), cert.subject().to_string()))
}

/// Whether `cert_pem` was issued by the CA `ca_cert_pem`.
pub fn issued_by(cert_pem: &str, ca_cert_pem: &str) -> bool {
    match (
        issuer_and_subject(cert_pem),
        issuer_and_subject(ca_cert_pem),
    ) {
        (Some((issuer, _)), Some((_, ca))) => issuer == ca,
        _ => false,
    }
}

/// Whether a certificate must be issued again.
pub fn needs_renewal(cert_pem: Option<&str>, names: &[String], now_unix: i64) -> bool {
    let Some((not_after, have)) = cert_pem.and_then(inspect) else {
        return true;
    };
    // IP addresses compared in their canonical form.
    let canonical = |n: &String| {
        n.parse::<std::net::IpAddr>()
            .map_or_else(|_| n.clone(), |ip| ip.to_string())
    };
    let mut want: Vec<String> = names.iter().map(canonical).collect();
    let mut have = have;
    want.sort();
    want.dedup();
    have.sort();
    have.dedup();
    not_after - now_unix < RENEW_BEFORE_DAYS * 86_400 || want != have
}

fn data(s: &Secret, key: &str) -> Option<String> {
    s.data
        .as_ref()?
        .get(key)
        .and_then(|v| String::from_utf8(v.0.clone()).ok())
}

/// The CA held in a Secret.
pub fn ca_from_secret(s: &Secret) -> Option<Pair> {
    Some(Pair {
        cert: data(s, "tls.crt")?,
        key: data(s, "tls.key")?,
    })
}

/// Set on the CA Secret to ask for a new CA (any value not handled yet,
/// for example the date).
pub const ROTATE_ANNOTATION: &str = "mqtt.cirrus.dev/rotate-ca";
/// The last value of [`ROTATE_ANNOTATION`] the operator acted on.
pub const ROTATED_ANNOTATION: &str = "mqtt.cirrus.dev/rotated-ca";
/// Where a rotation is: `trust-both/<unix seconds>` (the new CA is in the
/// bundle, the old one still signs), `signed-by-new/<unix seconds>` (the
/// new one signs, the old one is still trusted); absent when none runs.
pub const PHASE_ANNOTATION: &str = "mqtt.cirrus.dev/ca-rotation";
/// Seconds each phase lasts (default [`DEFAULT_OVERLAP_SECS`]).
pub const OVERLAP_ANNOTATION: &str = "mqtt.cirrus.dev/ca-overlap-seconds";
/// A day in each phase: time for every client to fetch the new bundle and
/// for the kubelet to put reissued certificates in every pod.
pub const DEFAULT_OVERLAP_SECS: i64 = 86_400;

/// A CA rotation's phase.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    TrustBoth,
    SignedByNew,
}

/// The namespace's CA as its Secret holds it: the CA that signs
/// (`tls.crt`/`tls.key`), the one that will (`next.crt`/`next.key`,
/// during `TrustBoth`), and the bundle clients trust (`ca.crt`).
#[derive(Debug, Clone)]
pub struct CaState {
    pub signer: Pair,
    pub next: Option<Pair>,
    pub bundle: String,
    pub phase: Option<(Phase, i64)>,
    pub requested: Option<String>,
    pub handled: Option<String>,
    pub overlap: i64,
}

impl CaState {
    pub fn from_secret(s: &Secret) -> Option<CaState> {
        let signer = ca_from_secret(s)?;
        let ann = |k: &str| s.metadata.annotations.as_ref()?.get(k).cloned();
        let next = match (data(s, "next.crt"), data(s, "next.key")) {
            (Some(cert), Some(key)) => Some(Pair { cert, key }),
            _ => None,
        };
        let phase = ann(PHASE_ANNOTATION).and_then(|v| {
            let (p, since) = v.split_once('/')?;
            let p = match p {
                "trust-both" => Phase::TrustBoth,
                "signed-by-new" => Phase::SignedByNew,
                _ => return None,
            };
            Some((p, since.parse().ok()?))
        });
        Some(CaState {
            bundle: data(s, "ca.crt").unwrap_or_else(|| signer.cert.clone()),
            signer,
            next,
            phase,
            requested: ann(ROTATE_ANNOTATION),
            handled: ann(ROTATED_ANNOTATION),
            overlap: ann(OVERLAP_ANNOTATION)
                .and_then(|v| v.parse().ok())
                .filter(|v: &i64| *v > 0)
                .unwrap_or(DEFAULT_OVERLAP_SECS),
        })
    }

    /// The next step of a rotation at `now`, made with `fresh` (a new CA,
    /// used only to start one): `Some(state)` when the Secret must change,
    /// and the seconds until the step after.
    pub fn step(
        &self,
        now: i64,
        fresh: impl FnOnce() -> Result<Pair, TlsError>,
    ) -> Result<(Option<CaState>, Option<i64>), TlsError> {
        let mut s = self.clone();
        match (self.phase, &self.next) {
            // Asked for and not yet done: the new CA joins the bundle; the
            // old one keeps signing.
            (None, _) if self.requested.is_some() && self.requested != self.handled => {
                let new = fresh()?;
                s.bundle = bundle(&[&self.signer.cert, &new.cert]);
                s.next = Some(new);
                s.phase = Some((Phase::TrustBoth, now));
                s.handled = self.requested.clone();
                Ok((Some(s), Some(self.overlap)))
            }
            // Clients had the overlap to fetch the bundle: the new CA signs
            // (every server certificate is issued again), both are trusted.
            (Some((Phase::TrustBoth, since)), Some(next)) => {
                let left = since + self.overlap - now;
                if left > 0 {
                    return Ok((None, Some(left)));
                }
                s.signer = next.clone();
                s.next = None;
                s.phase = Some((Phase::SignedByNew, now));
                Ok((Some(s), Some(self.overlap)))
            }
            // Every pod has had the overlap to load its new certificate:
            // the old CA leaves the bundle.
            (Some((Phase::SignedByNew, since)), _) => {
                let left = since + self.overlap - now;
                if left > 0 {
                    return Ok((None, Some(left)));
                }
                s.bundle = bundle(&[&self.signer.cert]);
                s.phase = None;
                Ok((Some(s), None))
            }
            // A phase without its next CA (edited by hand): start over from
            // the CA that signs.
            (Some((Phase::TrustBoth, _)), None) => {
                s.phase = None;
                s.bundle = bundle(&[&self.signer.cert]);
                Ok((Some(s), None))
            }
            (None, _) => Ok((None, None)),
        }
    }

    /// The CA Secret for this state (`meta` as read, for its
    /// resourceVersion).
    pub fn to_secret(&self, mut meta: ObjectMeta) -> Secret {
        let ann = meta.annotations.get_or_insert_with(BTreeMap::new);
        match self.phase {
            Some((p, since)) => {
                let p = match p {
                    Phase::TrustBoth => "trust-both",
                    Phase::SignedByNew => "signed-by-new",
                };
                ann.insert(PHASE_ANNOTATION.into(), format!("{p}/{since}"));
            }
            None => {
                ann.remove(PHASE_ANNOTATION);
            }
        }
        if let Some(h) = &self.handled {
            ann.insert(ROTATED_ANNOTATION.into(), h.clone());
        }
        let mut s = tls_secret(meta, &self.signer, &self.bundle);
        if let (Some(next), Some(d)) = (&self.next, s.data.as_mut()) {
            d.insert(
                "next.crt".into(),
                ByteString(next.cert.clone().into_bytes()),
            );
            d.insert("next.key".into(), ByteString(next.key.clone().into_bytes()));
        }
        s
    }
}

impl CaState {
    /// A merge patch that makes the CA Secret this state, refused (409)
    /// when the Secret changed since `resource_version` was read: two
    /// reconciles never both take a step.
    pub fn patch(
        &self,
        resource_version: Option<String>,
    ) -> Result<serde_json::Value, serde_json::Error> {
        let mut v = serde_json::to_value(self.to_secret(ObjectMeta::default()))?;
        v["metadata"]["resourceVersion"] = serde_json::json!(resource_version);
        if self.phase.is_none() {
            v["metadata"]["annotations"][PHASE_ANNOTATION] = serde_json::Value::Null;
        }
        if self.next.is_none() {
            v["data"]["next.crt"] = serde_json::Value::Null;
            v["data"]["next.key"] = serde_json::Value::Null;
        }
        Ok(v)
    }

    /// What the rotation is doing, for events and logs.
    pub fn describe(&self) -> &'static str {
        match self.phase {
            Some((Phase::TrustBoth, _)) => {
                "CA rotation: a new CA is in the trust bundle; the old one still signs"
            }
            Some((Phase::SignedByNew, _)) => {
                "CA rotation: the new CA signs the server certificates; both are trusted"
            }
            None => "CA rotation done: the old CA left the trust bundle",
        }
    }
}

/// PEM certificates one after the other.
fn bundle(certs: &[&str]) -> String {
    certs
        .iter()
        .map(|c| c.trim_end().to_string() + "\n")
        .collect()
}

/// The trust bundle in a broker's TLS Secret.
pub fn bundle_of(s: &Secret) -> Option<String> {
    data(s, "ca.crt")
}

/// The server certificate in a broker's TLS Secret.
pub fn cert_of(s: &Secret) -> Option<String> {
    data(s, "tls.crt")
}

/// A `kubernetes.io/tls` Secret: `tls.crt`, `tls.key`, and `ca.crt` for
/// clients that want to verify the broker.
pub fn tls_secret(meta: ObjectMeta, pair: &Pair, ca_cert: &str) -> Secret {
    Secret {
        metadata: meta,
        type_: Some("kubernetes.io/tls".into()),
        data: Some(BTreeMap::from([
            (
                "tls.crt".to_string(),
                ByteString(pair.cert.clone().into_bytes()),
            ),
            (
                "tls.key".to_string(),
                ByteString(pair.key.clone().into_bytes()),
            ),
            (
                "ca.crt".to_string(),
                ByteString(ca_cert.as_bytes().to_vec()),
            ),
        ])),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_rotation_adds_the_new_ca_then_signs_with_it_then_drops_the_old() {
        let old = new_ca("ns").unwrap();
        let meta = ObjectMeta {
            name: Some(CA_SECRET.into()),
            annotations: Some(BTreeMap::from([
                (OVERLAP_ANNOTATION.to_string(), "60".to_string()),
                (ROTATE_ANNOTATION.to_string(), "one".to_string()),
            ])),
            ..Default::default()
        };
        let secret = tls_secret(meta.clone(), &old, &old.cert);
        let st = CaState::from_secret(&secret).unwrap();
        let names = dns_names("main", "ns");
        let served = issue(&st.signer, &names).unwrap();
        assert!(issued_by(&served.cert, &old.cert));

        // Asked for: both trusted, the old one still signs.
        let (next, wait) = st.step(1000, || new_ca("ns")).unwrap();
        let st = CaState::from_secret(&next.unwrap().to_secret(meta.clone())).unwrap();
        assert_eq!(wait, Some(60));
        assert_eq!(st.phase, Some((Phase::TrustBoth, 1000)));
        assert_eq!(st.signer.cert, old.cert);
        let new = st.next.clone().unwrap();
        assert!(st.bundle.contains(&old.cert) && st.bundle.contains(&new.cert));
        assert!(!issued_by(&served.cert, &new.cert));
        // Nothing before the overlap is over; and the same request is not
        // acted on twice.
        let (none, wait) = st.step(1030, || unreachable!()).unwrap();
        assert!(none.is_none());
        assert_eq!(wait, Some(30));

        // The new one signs; both still trusted.
        let (next, _) = st.step(1060, || unreachable!()).unwrap();
        let meta2 = next.as_ref().unwrap().to_secret(meta.clone()).metadata;
        let st = CaState::from_secret(&next.unwrap().to_secret(meta.clone())).unwrap();
        assert_eq!(st.phase, Some((Phase::SignedByNew, 1060)));
        assert_eq!(st.signer.cert, new.cert);
        assert!(st.next.is_none());
        assert!(st.bundle.contains(&old.cert) && st.bundle.contains(&new.cert));
        assert!(issued_by(
            &issue(&st.signer, &names).unwrap().cert,
            &new.cert
        ));

        // Then the old one leaves the bundle, and the rotation is done.
        let (next, wait) = st.step(1120, || unreachable!()).unwrap();
        let done = next.unwrap();
        assert_eq!(wait, None);
        assert_eq!(done.bundle.trim_end(), new.cert.trim_end());
        let st = CaState::from_secret(&done.to_secret(meta2)).unwrap();
        assert_eq!(st.phase, None);
        assert_eq!(st.handled.as_deref(), Some("one"));
        let (none, wait) = st.step(99_999, || unreachable!()).unwrap();
        assert!(none.is_none() && wait.is_none());
    }

    #[test]
    fn issued_certificates_cover_the_service_and_renew_in_time() {
        let ca = new_ca("ns").unwrap();
        let names = dns_names("main", "ns");
        let server = issue(&ca, &names).unwrap();
        let (not_after, have) = inspect(&server.cert).unwrap();
        let now = time::OffsetDateTime::now_utc().unix_timestamp();
        assert!((not_after - now) > 89 * 86_400);
        assert!(have.contains(&"main.ns.svc".to_string()));
        assert!(!needs_renewal(Some(&server.cert), &names, now));
        // 61 days later less than 30 remain.
        assert!(needs_renewal(Some(&server.cert), &names, now + 61 * 86_400));
        // A renamed Service needs a new certificate.
        assert!(needs_renewal(
            Some(&server.cert),
            &dns_names("other", "ns"),
            now
        ));
        assert!(needs_renewal(Some("garbage"), &names, now));
        assert!(needs_renewal(None, &names, now));
    }

    #[test]
    fn extra_names_and_addresses_are_covered_and_checked() {
        let ca = new_ca("ns").unwrap();
        let mut names = dns_names("main", "ns");
        names.extend([
            "mqtt.example.com".into(),
            "2001:db8::1".into(),
            "203.0.113.7".into(),
        ]);
        let server = issue(&ca, &names).unwrap();
        let (_, have) = inspect(&server.cert).unwrap();
        for n in ["mqtt.example.com", "2001:db8::1", "203.0.113.7"] {
            assert!(have.contains(&n.to_string()), "{n} in {have:?}");
        }
        let now = time::OffsetDateTime::now_utc().unix_timestamp();
        // The same names (an address in another spelling) keep it; one
        // more name reissues it.
        let mut again = names.clone();
        again[5] = "2001:0db8:0:0::1".into();
        assert!(!needs_renewal(Some(&server.cert), &again, now));
        again.push("lb.example.com".into());
        assert!(needs_renewal(Some(&server.cert), &again, now));

        for ok in [
            "mqtt.example.com",
            "*.example.com",
            "10.0.0.1",
            "::1",
            "a-b.c",
        ] {
            assert!(valid_san(ok), "{ok}");
        }
        for bad in [
            "",
            "*.",
            "a..b",
            "-a.b",
            "a_b.c",
            "exämple.com",
            "a b",
            &"x".repeat(64),
        ] {
            assert!(!valid_san(bad), "{bad}");
        }
    }
}
