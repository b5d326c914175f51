//! Why a TLS handshake with the broker failed, told so that a technician
//! knows which file to fix or whom to call.
//!
//! rustls reports a failure by the rule that broke ("invalid peer
//! certificate: UnknownIssuer"), not by the file or the party that must
//! act. [`TlsFailure::classify`] sorts a [`rustls::Error`] by cause, keeping
//! the facts a message needs (dates, names, the broker's TLS alert), and
//! [`TlsFailure::describe`] renders it as one line that names the config key
//! and file to fix, or the broker's operator when the fault is theirs.
//!
//! What the error does not carry (who issued the broker's certificate,
//! what the broker asked of our client certificate) comes from [`Seen`],
//! which hearth's certificate verifier and client-certificate resolver fill
//! in during the handshake (`tls.rs`).

use std::path::Path;

use chrono::{DateTime, SecondsFormat, Utc};
use rustls::pki_types::UnixTime;
use rustls::{AlertDescription, CertificateError, Error, PeerIncompatible, SignatureScheme};

use super::der::{self, CertFacts};
use crate::config::MqttConfig;

/// What the handshake showed besides the error, recorded by hearth's
/// verifier and resolver.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Seen {
    /// The broker's certificate, when the verifier refused it.
    pub refused: Option<CertFacts>,
    /// The broker asked for a client certificate.
    pub asked: Option<Asked>,
}

/// The broker's request for a client certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Asked {
    /// Our key can make one of the signatures the broker accepts; when it
    /// cannot, rustls sends no certificate at all.
    pub fits: bool,
    /// The signature schemes the broker accepts.
    pub schemes: Vec<SignatureScheme>,
    /// The CAs whose client certificates the broker accepts (their CNs),
    /// when it says.
    pub trusted: Vec<String>,
    /// Who issued our client certificate (its CN).
    pub ours: Option<String>,
}

/// A failed TLS handshake with the broker, by cause. Two failures are equal
/// when a technician would do the same about them: that is what decides
/// whether a retry's failure is news (a WARN and an audit event) or not.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TlsFailure {
    /// The broker's certificate does not lead to the CA in `mqtt.ca_file`.
    UnknownIssuer {
        issuer: Option<String>,
    },
    /// The broker's certificate is its own issuer.
    SelfSigned {
        subject: Option<String>,
    },
    Expired {
        not_after: Option<DateTime<Utc>>,
    },
    NotYetValid {
        not_before: Option<DateTime<Utc>>,
    },
    /// The broker's certificate does not name `mqtt.host`.
    NameMismatch {
        presented: Vec<String>,
    },
    /// The broker's certificate lacks the serverAuth extended key usage.
    NotForServers {
        presented: Vec<String>,
    },
    /// A CRL in `mqtt.crl_file` lists the broker's certificate.
    Revoked,
    /// No CRL in `mqtt.crl_file` covers the broker's chain.
    RevocationUnknown {
        issuer: Option<String>,
    },
    CrlExpired {
        next_update: Option<DateTime<Utc>>,
    },
    CrlInvalid {
        problem: String,
    },
    BadSignature,
    /// The broker's certificate is X.509 v1.
    PeerV1,
    /// The broker accepts no signature our key can make, so rustls sent
    /// no client certificate.
    ClientCertNotSent {
        accepted: Vec<String>,
    },
    /// The broker refused our client certificate with this TLS alert.
    ClientCertRejected {
        alert: &'static str,
        trusted: Vec<String>,
        ours: Option<String>,
    },
    /// The broker offers no TLS version above 1.1.
    TlsTooOld,
    /// No cipher suite, key exchange group or signature scheme in common.
    Incompatible {
        what: &'static str,
    },
    Other {
        message: String,
    },
}

/// What a message names besides the failure: the broker, the files in use,
/// and the time (for a clock that is wrong).
#[derive(Debug, Clone, Copy)]
pub struct Context<'a> {
    pub mqtt: &'a MqttConfig,
    pub config_file: &'a Path,
    pub now: DateTime<Utc>,
}

impl TlsFailure {
    /// Sorts a rustls error by cause; `seen` adds what the handshake showed.
    pub fn classify(error: &Error, seen: &Seen) -> TlsFailure {
        match error {
            Error::InvalidCertificate(e) => Self::certificate(e, seen),
            Error::InvalidCertRevocationList(e) => TlsFailure::CrlInvalid {
                problem: format!("{e:?}"),
            },
            Error::AlertReceived(alert) => Self::alert(*alert, seen),
            Error::PeerIncompatible(p) => Self::incompatible(p),
            Error::NoCertificatesPresented => TlsFailure::Other {
                message: "the broker presented no certificate".into(),
            },
            other => TlsFailure::Other {
                message: other.to_string(),
            },
        }
    }

    /// The rustls error inside an I/O error from tokio-rustls, classified;
    /// `None` when the error is not TLS's (a reset, a timeout).
    pub fn from_io(error: &std::io::Error, seen: &Seen) -> Option<TlsFailure> {
        let inner = error.get_ref()?.downcast_ref::<Error>()?;
        Some(Self::classify(inner, seen))
    }

    fn certificate(e: &CertificateError, seen: &Seen) -> TlsFailure {
        use CertificateError as C;
        let refused = seen.refused.as_ref();
        let issuer = refused.and_then(|f| der::common_name(&f.issuer));
        match e {
            C::UnknownIssuer => match refused {
                Some(f) if f.self_issued() => TlsFailure::SelfSigned {
                    subject: der::common_name(&f.subject),
                },
                _ => TlsFailure::UnknownIssuer { issuer },
            },
            C::BadSignature => TlsFailure::BadSignature,
            C::Expired => TlsFailure::Expired { not_after: None },
            C::ExpiredContext { not_after, .. } => TlsFailure::Expired {
                not_after: Some(utc(*not_after)),
            },
            C::NotValidYet => TlsFailure::NotYetValid { not_before: None },
            C::NotValidYetContext { not_before, .. } => TlsFailure::NotYetValid {
                not_before: Some(utc(*not_before)),
            },
            C::NotValidForName => TlsFailure::NameMismatch { presented: vec![] },
            C::NotValidForNameContext { presented, .. } => TlsFailure::NameMismatch {
                presented: presented.iter().map(|n| general_name(n)).collect(),
            },
            C::InvalidPurpose => TlsFailure::NotForServers { presented: vec![] },
            C::InvalidPurposeContext { presented, .. } => TlsFailure::NotForServers {
                presented: presented.iter().map(ToString::to_string).collect(),
            },
            C::Revoked => TlsFailure::Revoked,
            C::UnknownRevocationStatus => TlsFailure::RevocationUnknown { issuer },
            C::ExpiredRevocationList => TlsFailure::CrlExpired { next_update: None },
            C::ExpiredRevocationListContext { next_update, .. } => TlsFailure::CrlExpired {
                next_update: Some(utc(*next_update)),
            },
            _ if refused.is_some_and(|f| f.version == 1) => TlsFailure::PeerV1,
            other => TlsFailure::Other {
                message: format!("the broker's certificate is invalid: {other:?}"),
            },
        }
    }

    fn alert(alert: AlertDescription, seen: &Seen) -> TlsFailure {
        use AlertDescription as A;
        let asked = seen.asked.as_ref();
        if let Some(asked) = asked.filter(|a| !a.fits)
            && matches!(
                alert,
                A::CertificateRequired | A::HandshakeFailure | A::NoCertificate
            )
        {
            return TlsFailure::ClientCertNotSent {
                accepted: asked.schemes.iter().map(|s| format!("{s:?}")).collect(),
            };
        }
        let name = match alert {
            A::ProtocolVersion => return TlsFailure::TlsTooOld,
            A::HandshakeFailure | A::InsufficientSecurity if asked.is_none() => {
                return TlsFailure::Incompatible {
                    what: "TLS parameters (cipher suites, key exchange groups, signature schemes)",
                };
            }
            A::CertificateRequired => "certificate_required",
            A::NoCertificate => "no_certificate",
            A::BadCertificate => "bad_certificate",
            A::UnsupportedCertificate => "unsupported_certificate",
            A::CertificateRevoked => "certificate_revoked",
            A::CertificateExpired => "certificate_expired",
            A::CertificateUnknown => "certificate_unknown",
            A::UnknownCA => "unknown_ca",
            A::AccessDenied => "access_denied",
            A::DecryptError => "decrypt_error",
            A::HandshakeFailure => "handshake_failure",
            A::InsufficientSecurity => "insufficient_security",
            other => {
                return TlsFailure::Other {
                    message: format!("the broker ended the handshake with TLS alert {other:?}"),
                };
            }
        };
        TlsFailure::ClientCertRejected {
            alert: name,
            trusted: asked.map(|a| a.trusted.clone()).unwrap_or_default(),
            ours: asked.and_then(|a| a.ours.clone()),
        }
    }

    fn incompatible(p: &PeerIncompatible) -> TlsFailure {
        use PeerIncompatible as P;
        match p {
            P::ServerDoesNotSupportTls12Or13
            | P::SupportedVersionsExtensionRequired
            | P::Tls12NotOffered
            | P::Tls12NotOfferedOrEnabled => TlsFailure::TlsTooOld,
            P::NoCipherSuitesInCommon => TlsFailure::Incompatible {
                what: "cipher suite",
            },
            P::NoKxGroupsInCommon => TlsFailure::Incompatible {
                what: "key exchange group",
            },
            P::NoSignatureSchemesInCommon => TlsFailure::Incompatible {
                what: "signature scheme",
            },
            other => TlsFailure::Other {
                message: format!("the broker's TLS is incompatible: {other:?}"),
            },
        }
    }

    /// A short, stable name of the cause, for the audit trail and fields.
    pub fn code(&self) -> &'static str {
        match self {
            TlsFailure::UnknownIssuer { .. } => "unknown-issuer",
            TlsFailure::SelfSigned { .. } => "self-signed",
            TlsFailure::Expired { .. } => "expired",
            TlsFailure::NotYetValid { .. } => "not-yet-valid",
            TlsFailure::NameMismatch { .. } => "name-mismatch",
            TlsFailure::NotForServers { .. } => "not-a-server-certificate",
            TlsFailure::Revoked => "revoked",
            TlsFailure::RevocationUnknown { .. } => "revocation-unknown",
            TlsFailure::CrlExpired { .. } => "crl-expired",
            TlsFailure::CrlInvalid { .. } => "crl-invalid",
            TlsFailure::BadSignature => "bad-signature",
            TlsFailure::PeerV1 => "broker-certificate-v1",
            TlsFailure::ClientCertNotSent { .. } => "client-certificate-not-sent",
            TlsFailure::ClientCertRejected { .. } => "client-certificate-rejected",
            TlsFailure::TlsTooOld => "tls-version",
            TlsFailure::Incompatible { .. } => "incompatible",
            TlsFailure::Other { .. } => "other",
        }
    }

    /// The config key of the file (or value) to fix, when the fix is on
    /// this gateway; `None` when the broker's operator must act.
    pub fn key(&self) -> Option<&'static str> {
        match self {
            TlsFailure::UnknownIssuer { .. } | TlsFailure::SelfSigned { .. } => {
                Some("mqtt.ca_file")
            }
            TlsFailure::NameMismatch { .. } => Some("mqtt.host"),
            TlsFailure::Revoked
            | TlsFailure::RevocationUnknown { .. }
            | TlsFailure::CrlExpired { .. }
            | TlsFailure::CrlInvalid { .. } => Some("mqtt.crl_file"),
            TlsFailure::ClientCertNotSent { .. } => Some("mqtt.key_file"),
            TlsFailure::ClientCertRejected { .. } => Some("mqtt.cert_file"),
            TlsFailure::Expired { .. }
            | TlsFailure::NotYetValid { .. }
            | TlsFailure::NotForServers { .. }
            | TlsFailure::BadSignature
            | TlsFailure::PeerV1
            | TlsFailure::TlsTooOld
            | TlsFailure::Incompatible { .. }
            | TlsFailure::Other { .. } => None,
        }
    }

    /// The file that [`key`](Self::key) names (the config file itself for
    /// `mqtt.host`).
    pub fn file<'a>(&self, cx: &Context<'a>) -> Option<&'a Path> {
        Some(match self.key()? {
            "mqtt.ca_file" => &cx.mqtt.ca_file,
            "mqtt.cert_file" => &cx.mqtt.cert_file,
            "mqtt.key_file" => &cx.mqtt.key_file,
            "mqtt.crl_file" => cx.mqtt.crl_file.as_deref()?,
            _ => cx.config_file,
        })
    }

    /// One line: what failed, why in a technician's words, and what to do.
    pub fn describe(&self, cx: &Context<'_>) -> String {
        let broker = format!("{}:{}", cx.mqtt.host, cx.mqtt.port);
        format!(
            "TLS handshake with broker `{broker}` failed: {}",
            self.cause(cx)
        )
    }

    /// [`describe`](Self::describe) for a working link dropped because
    /// reloaded CRLs refuse its broker.
    pub fn describe_dropped(&self, cx: &Context<'_>) -> String {
        let broker = format!("{}:{}", cx.mqtt.host, cx.mqtt.port);
        format!(
            "TLS link to broker `{broker}` dropped after the CRL reload: {}",
            self.cause(cx)
        )
    }

    fn cause(&self, cx: &Context<'_>) -> String {
        let m = cx.mqtt;
        let ca = format!("`mqtt.ca_file` ({})", m.ca_file.display());
        let cert = format!("`mqtt.cert_file` ({})", m.cert_file.display());
        let crl = match &m.crl_file {
            Some(p) => format!("`mqtt.crl_file` ({})", p.display()),
            None => "`mqtt.crl_file`".to_owned(),
        };
        let now = time(cx.now);
        let reload = "then send hearth SIGHUP (`systemctl kill -s HUP hearth`)";
        match self {
            TlsFailure::UnknownIssuer { issuer: Some(issuer) } => format!(
                "the broker's certificate is issued by `{issuer}`, not by the CA in {ca}: if `{issuer}` is the hospital's, add its CA certificate to that file (or the broker's operator must send it along as an intermediate); if not, the broker's operator must install a certificate from the hospital's CA"
            ),
            TlsFailure::UnknownIssuer { issuer: None } => format!(
                "the broker's certificate is not issued by the CA in {ca}: ask the hospital which CA issues the broker's certificate and put it in that file, or the broker's operator must install a certificate from the hospital's CA"
            ),
            TlsFailure::SelfSigned { subject } => format!(
                "the broker's certificate{} is self-signed, not issued by the CA in {ca}: the broker's operator must install a certificate issued by the hospital's CA",
                quoted(" ", subject.as_deref(), "")
            ),
            TlsFailure::Expired { not_after } => format!(
                "the broker's certificate expired{} (this gateway's clock says {now}): the broker's operator must renew it; if it was renewed, check this gateway's clock",
                at(" at ", *not_after)
            ),
            TlsFailure::NotYetValid { not_before } => format!(
                "the broker's certificate is not valid yet{} and this gateway's clock says {now}: if the clock is wrong, set it (NTP); if not, the broker's operator installed a certificate that starts in the future",
                at(": it starts at ", *not_before)
            ),
            TlsFailure::NameMismatch { presented } => {
                let names = if presented.is_empty() {
                    "no host name (it has no subjectAltName; a name in its CN alone does not count)"
                        .to_owned()
                } else {
                    list(presented)
                };
                format!(
                    "the broker's certificate is for {names}, not for `{host}` (`mqtt.host` in {config}): set `mqtt.host` to a name the certificate carries, or the broker's operator must add `{host}` to its subjectAltName",
                    host = m.host,
                    config = cx.config_file.display()
                )
            }
            TlsFailure::NotForServers { presented } => format!(
                "the broker's certificate is not a server certificate (its extendedKeyUsage allows {} only, not server authentication): the broker's operator must install a certificate issued for a TLS server (extendedKeyUsage serverAuth)",
                if presented.is_empty() {
                    "other uses".to_owned()
                } else {
                    presented.join(", ")
                }
            ),
            TlsFailure::Revoked => format!(
                "the broker's certificate is revoked by a CRL in {crl}: the broker's operator must install a new certificate (do not remove the CRL to reconnect: a revoked key may be in other hands)"
            ),
            TlsFailure::RevocationUnknown { issuer } => format!(
                "no CRL in {crl} covers the broker's certificate chain{}, so whether it is revoked is unknown: add the current CRL of each CA in that chain to the file, {reload}",
                quoted(" (issued by ", issuer.as_deref(), ")")
            ),
            TlsFailure::CrlExpired { next_update } => format!(
                "a CRL in {crl} is out of date{}: install the CA's current CRL, {reload}",
                match next_update {
                    Some(t) => format!(" (its next update was due at {})", time(*t)),
                    None => String::new(),
                }
            ),
            TlsFailure::CrlInvalid { problem } => format!(
                "a CRL in {crl} cannot be used ({problem}): install the current CRL from the CA that issued the broker's certificate, {reload}"
            ),
            TlsFailure::BadSignature => "the broker's certificate carries a signature that does not verify against its issuer's key (damaged or forged): tell the broker's operator".to_owned(),
            TlsFailure::PeerV1 => "the broker's certificate is an X.509 v1 certificate (no extensions), which rustls/webpki refuse: the broker's operator must install an X.509 v3 certificate".to_owned(),
            TlsFailure::ClientCertNotSent { accepted } => format!(
                "the broker demands a client certificate signed with {}, and the key in `mqtt.key_file` ({}) can make none of those signatures, so hearth sent none: install a certificate and key of a type the broker accepts in `mqtt.cert_file` and `mqtt.key_file`, or ask the broker's operator to accept this key's type",
                if accepted.is_empty() { "a scheme hearth does not know".to_owned() } else { accepted.join(", ") },
                m.key_file.display()
            ),
            TlsFailure::ClientCertRejected { alert, trusted, ours } => {
                let known = match (trusted.as_slice(), ours) {
                    ([], None) => String::new(),
                    ([], Some(o)) => format!("; ours is from `{o}`"),
                    (t, Some(o)) => format!(
                        "; it accepts client certificates from {} and ours is from `{o}`",
                        list(t)
                    ),
                    (t, None) => format!("; it accepts client certificates from {}", list(t)),
                };
                let why = match *alert {
                    "unknown_ca" => "does not trust the CA that issued the client certificate in",
                    "certificate_expired" => "says the client certificate has expired in",
                    "certificate_revoked" => "says the client certificate is revoked in",
                    "certificate_required" | "no_certificate" => {
                        "says it got no client certificate, though one is configured in"
                    }
                    "access_denied" => "denies access to the client certificate in",
                    _ => "refused the client certificate in",
                };
                let todo = match *alert {
                    "certificate_expired" => "install a renewed certificate and its key (`mqtt.key_file`); if it is current, the broker's clock may be wrong",
                    "certificate_revoked" => "ask the hospital's PKI for a new certificate and key",
                    "access_denied" => "ask the broker's operator to admit this gateway",
                    _ => "install a client certificate from the CA the broker trusts (X.509 v3, extendedKeyUsage clientAuth), or ask the broker's operator which it accepts",
                };
                format!("the broker {why} {cert} (TLS alert `{alert}`{known}): {todo}")
            }
            TlsFailure::TlsTooOld => "the broker offers only TLS versions older than 1.2, which hearth refuses (TLS 1.0 and 1.1 are obsolete, RFC 8996): the broker's operator must enable TLS 1.2 or 1.3".to_owned(),
            TlsFailure::Incompatible { what } => format!(
                "the broker and hearth have no {what} in common: the broker's operator must enable TLS 1.2 or 1.3 with ECDHE and AES-GCM or ChaCha20-Poly1305"
            ),
            TlsFailure::Other { message } => format!(
                "{message} (check {ca}, {cert} and the broker's TLS settings)"
            ),
        }
    }
}

fn utc(t: UnixTime) -> DateTime<Utc> {
    let secs = i64::try_from(t.as_secs()).unwrap_or(i64::MAX);
    DateTime::from_timestamp(secs, 0).unwrap_or_default()
}

fn time(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Secs, true)
}

fn at(prefix: &str, t: Option<DateTime<Utc>>) -> String {
    t.map(|t| format!("{prefix}{}", time(t)))
        .unwrap_or_default()
}

fn quoted(prefix: &str, name: Option<&str>, suffix: &str) -> String {
    name.map(|n| format!("{prefix}`{n}`{suffix}"))
        .unwrap_or_default()
}

fn list(names: &[String]) -> String {
    names
        .iter()
        .map(|n| format!("`{n}`"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// webpki's `DnsName("broker.example")` or `IpAddress(10.0.0.1)` as the
/// bare name.
fn general_name(presented: &str) -> String {
    let inner = presented
        .split_once('(')
        .and_then(|(_, rest)| rest.strip_suffix(')'))
        .unwrap_or(presented);
    inner.trim_matches('"').to_owned()
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use rcgen::{CertificateParams, DnType, IsCa, Issuer, KeyPair};
    use rustls::pki_types::ServerName;
    use rustls::{CertRevocationListError, ExtendedKeyPurpose, OtherError};

    use super::*;
    use crate::config::{Config, DEFAULT_TOML};

    fn config() -> Config {
        let mut c = Config::parse(DEFAULT_TOML, Path::new("/etc/hearth/hearth.toml")).unwrap();
        c.source = "/etc/hearth/hearth.toml".into();
        c.mqtt.crl_file = Some("/etc/hearth/certs/crl.pem".into());
        c
    }

    fn now() -> DateTime<Utc> {
        DateTime::from_timestamp(1_800_000_000, 0).unwrap()
    }

    fn describe(f: &TlsFailure) -> String {
        let c = config();
        let cx = Context {
            mqtt: &c.mqtt,
            config_file: &c.source,
            now: now(),
        };
        f.describe(&cx)
    }

    fn params(cn: &str) -> CertificateParams {
        let mut p = CertificateParams::default();
        p.distinguished_name.push(DnType::CommonName, cn);
        p
    }

    fn self_signed(cn: &str) -> CertFacts {
        let key = KeyPair::generate().unwrap();
        CertFacts::parse(params(cn).self_signed(&key).unwrap().der()).unwrap()
    }

    fn issued_by(ca: &str, cn: &str) -> CertFacts {
        let mut ca_params = params(ca);
        ca_params.is_ca = IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let issuer = Issuer::new(ca_params, KeyPair::generate().unwrap());
        let key = KeyPair::generate().unwrap();
        CertFacts::parse(params(cn).signed_by(&key, &issuer).unwrap().der()).unwrap()
    }

    fn refused(facts: CertFacts) -> Seen {
        Seen {
            refused: Some(facts),
            asked: None,
        }
    }

    fn cert_error(e: CertificateError, seen: &Seen) -> TlsFailure {
        TlsFailure::classify(&Error::InvalidCertificate(e), seen)
    }

    #[test]
    fn an_unknown_issuer_is_named_and_a_self_signed_certificate_is_told_apart() {
        let other = refused(issued_by("Other Hospital CA", "broker"));
        let failure = cert_error(CertificateError::UnknownIssuer, &other);
        assert_eq!(
            failure,
            TlsFailure::UnknownIssuer {
                issuer: Some("Other Hospital CA".into())
            }
        );
        let line = describe(&failure);
        assert!(
            line.contains("is issued by `Other Hospital CA`, not by the CA in"),
            "{line}"
        );
        assert!(
            line.contains("`mqtt.ca_file` (/etc/hearth/certs/ca.crt)"),
            "{line}"
        );

        let own = refused(self_signed("mqtt.hospital.example"));
        let failure = cert_error(CertificateError::UnknownIssuer, &own);
        assert_eq!(
            failure,
            TlsFailure::SelfSigned {
                subject: Some("mqtt.hospital.example".into())
            }
        );
        assert!(describe(&failure).contains("`mqtt.hospital.example` is self-signed"));
        // Nothing seen: still the CA file's fault, without a name.
        assert_eq!(
            cert_error(CertificateError::UnknownIssuer, &Seen::default()),
            TlsFailure::UnknownIssuer { issuer: None }
        );
    }

    #[test]
    fn validity_failures_carry_their_dates_and_the_gateway_clock() {
        let t = |s| UnixTime::since_unix_epoch(std::time::Duration::from_secs(s));
        let failure = cert_error(
            CertificateError::ExpiredContext {
                time: t(1_800_000_000),
                not_after: t(1_700_000_000),
            },
            &Seen::default(),
        );
        assert_eq!(
            failure,
            TlsFailure::Expired {
                not_after: DateTime::from_timestamp(1_700_000_000, 0)
            }
        );
        let line = describe(&failure);
        assert!(line.contains("expired at 2023-11-14T22:13:20Z"), "{line}");
        assert!(line.contains("clock says 2027-01-15T08:00:00Z"), "{line}");
        assert!(line.contains("operator must renew it"), "{line}");

        let failure = cert_error(
            CertificateError::NotValidYetContext {
                time: t(1_800_000_000),
                not_before: t(1_900_000_000),
            },
            &Seen::default(),
        );
        let line = describe(&failure);
        assert_eq!(failure.code(), "not-yet-valid");
        assert!(line.contains("starts at 2030-03-17T17:46:40Z"), "{line}");
        assert!(line.contains("set it (NTP)"), "{line}");
    }

    #[test]
    fn a_name_mismatch_lists_the_names_and_names_mqtt_host_in_the_config() {
        let failure = cert_error(
            CertificateError::NotValidForNameContext {
                expected: ServerName::try_from("mqtt.hospital.example").unwrap(),
                presented: vec![
                    "DnsName(\"other.example\")".into(),
                    "IpAddress(10.0.0.7)".into(),
                ],
            },
            &Seen::default(),
        );
        assert_eq!(
            failure,
            TlsFailure::NameMismatch {
                presented: vec!["other.example".into(), "10.0.0.7".into()]
            }
        );
        let line = describe(&failure);
        assert!(
            line.contains("is for `other.example`, `10.0.0.7`, not for `mqtt.hospital.example` (`mqtt.host` in /etc/hearth/hearth.toml)"),
            "{line}"
        );
        let c = config();
        let cx = Context {
            mqtt: &c.mqtt,
            config_file: &c.source,
            now: now(),
        };
        assert_eq!(
            failure.file(&cx),
            Some(Path::new("/etc/hearth/hearth.toml"))
        );
    }

    #[test]
    fn a_client_only_certificate_on_the_broker_is_not_a_server_certificate() {
        let failure = cert_error(
            CertificateError::InvalidPurposeContext {
                required: ExtendedKeyPurpose::ServerAuth,
                presented: vec![ExtendedKeyPurpose::ClientAuth],
            },
            &Seen::default(),
        );
        assert_eq!(
            failure,
            TlsFailure::NotForServers {
                presented: vec!["client authentication".into()]
            }
        );
        let line = describe(&failure);
        assert!(line.contains("allows client authentication only"), "{line}");
        assert_eq!(failure.key(), None);
    }

    #[test]
    fn revocation_failures_name_the_crl_file() {
        for (error, code) in [
            (CertificateError::Revoked, "revoked"),
            (
                CertificateError::UnknownRevocationStatus,
                "revocation-unknown",
            ),
            (CertificateError::ExpiredRevocationList, "crl-expired"),
        ] {
            let failure = cert_error(error, &Seen::default());
            assert_eq!(failure.code(), code);
            assert_eq!(failure.key(), Some("mqtt.crl_file"));
            let line = describe(&failure);
            assert!(
                line.contains("`mqtt.crl_file` (/etc/hearth/certs/crl.pem)"),
                "{line}"
            );
        }
        let failure = TlsFailure::classify(
            &Error::InvalidCertRevocationList(CertRevocationListError::BadSignature),
            &Seen::default(),
        );
        assert_eq!(failure.code(), "crl-invalid");
        assert!(describe(&failure).contains("BadSignature"));
    }

    #[test]
    fn a_v1_broker_certificate_is_told_by_its_version() {
        let mut facts = self_signed("old broker");
        facts.version = 1;
        let other = CertificateError::Other(OtherError(Arc::new(std::io::Error::other(
            "UnsupportedCertVersion",
        ))));
        assert_eq!(cert_error(other, &refused(facts)), TlsFailure::PeerV1);
    }

    #[test]
    fn broker_alerts_about_our_certificate_name_the_cert_file() {
        let asked = Seen {
            refused: None,
            asked: Some(Asked {
                fits: true,
                schemes: vec![SignatureScheme::ECDSA_NISTP256_SHA256],
                trusted: vec!["Broker Client CA".into()],
                ours: Some("hearth test CA".into()),
            }),
        };
        let failure =
            TlsFailure::classify(&Error::AlertReceived(AlertDescription::UnknownCA), &asked);
        assert_eq!(
            failure,
            TlsFailure::ClientCertRejected {
                alert: "unknown_ca",
                trusted: vec!["Broker Client CA".into()],
                ours: Some("hearth test CA".into()),
            }
        );
        let line = describe(&failure);
        assert!(
            line.contains("does not trust the CA that issued the client certificate in `mqtt.cert_file` (/etc/hearth/certs/gateway.crt)"),
            "{line}"
        );
        assert!(
            line.contains("accepts client certificates from `Broker Client CA` and ours is from `hearth test CA`"),
            "{line}"
        );
        for (alert, name) in [
            (AlertDescription::BadCertificate, "bad_certificate"),
            (AlertDescription::CertificateExpired, "certificate_expired"),
            (AlertDescription::CertificateRevoked, "certificate_revoked"),
            (
                AlertDescription::CertificateRequired,
                "certificate_required",
            ),
            (AlertDescription::AccessDenied, "access_denied"),
        ] {
            let failure = TlsFailure::classify(&Error::AlertReceived(alert), &asked);
            assert_eq!(failure.key(), Some("mqtt.cert_file"), "{alert:?}");
            let line = describe(&failure);
            assert!(line.contains(&format!("TLS alert `{name}`")), "{line}");
        }
    }

    #[test]
    fn a_key_the_broker_accepts_no_signature_of_means_no_certificate_was_sent() {
        let asked = Seen {
            refused: None,
            asked: Some(Asked {
                fits: false,
                schemes: vec![SignatureScheme::RSA_PSS_SHA256],
                trusted: vec![],
                ours: None,
            }),
        };
        let failure = TlsFailure::classify(
            &Error::AlertReceived(AlertDescription::CertificateRequired),
            &asked,
        );
        assert_eq!(
            failure,
            TlsFailure::ClientCertNotSent {
                accepted: vec!["RSA_PSS_SHA256".into()]
            }
        );
        let line = describe(&failure);
        assert!(
            line.contains("signed with RSA_PSS_SHA256, and the key in `mqtt.key_file` (/etc/hearth/certs/gateway.key) can make none"),
            "{line}"
        );
    }

    #[test]
    fn an_old_or_incompatible_broker_is_the_operators_to_fix() {
        for error in [
            Error::AlertReceived(AlertDescription::ProtocolVersion),
            Error::PeerIncompatible(PeerIncompatible::ServerDoesNotSupportTls12Or13),
        ] {
            let failure = TlsFailure::classify(&error, &Seen::default());
            assert_eq!(failure, TlsFailure::TlsTooOld, "{error:?}");
            assert!(describe(&failure).contains("must enable TLS 1.2 or 1.3"));
        }
        let failure = TlsFailure::classify(
            &Error::PeerIncompatible(PeerIncompatible::NoCipherSuitesInCommon),
            &Seen::default(),
        );
        assert_eq!(
            failure,
            TlsFailure::Incompatible {
                what: "cipher suite"
            }
        );
        // A handshake failure before any request for our certificate is
        // about parameters, not about us.
        let failure = TlsFailure::classify(
            &Error::AlertReceived(AlertDescription::HandshakeFailure),
            &Seen::default(),
        );
        assert_eq!(failure.code(), "incompatible");
    }

    #[test]
    fn only_an_io_error_carrying_a_rustls_error_is_a_tls_failure() {
        let tls = std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            Error::InvalidCertificate(CertificateError::Revoked),
        );
        assert_eq!(
            TlsFailure::from_io(&tls, &Seen::default()),
            Some(TlsFailure::Revoked)
        );
        let reset = std::io::Error::from(std::io::ErrorKind::ConnectionReset);
        assert_eq!(TlsFailure::from_io(&reset, &Seen::default()), None);
    }

    #[test]
    fn every_line_is_one_line_that_starts_the_same_and_names_its_file() {
        let c = config();
        let cx = Context {
            mqtt: &c.mqtt,
            config_file: &c.source,
            now: now(),
        };
        let all = [
            TlsFailure::UnknownIssuer { issuer: None },
            TlsFailure::SelfSigned { subject: None },
            TlsFailure::Expired { not_after: None },
            TlsFailure::NotYetValid { not_before: None },
            TlsFailure::NameMismatch { presented: vec![] },
            TlsFailure::NotForServers { presented: vec![] },
            TlsFailure::Revoked,
            TlsFailure::RevocationUnknown { issuer: None },
            TlsFailure::CrlExpired { next_update: None },
            TlsFailure::CrlInvalid {
                problem: "x".into(),
            },
            TlsFailure::BadSignature,
            TlsFailure::PeerV1,
            TlsFailure::ClientCertNotSent { accepted: vec![] },
            TlsFailure::ClientCertRejected {
                alert: "bad_certificate",
                trusted: vec![],
                ours: None,
            },
            TlsFailure::TlsTooOld,
            TlsFailure::Incompatible { what: "x" },
            TlsFailure::Other {
                message: "x".into(),
            },
        ];
        for failure in all {
            let line = failure.describe(&cx);
            assert!(!line.contains('\n'), "{line}");
            assert!(
                line.starts_with("TLS handshake with broker `mqtt.hospital.example:8883` failed: "),
                "{line}"
            );
            if let (Some(key), Some(file)) = (failure.key(), failure.file(&cx)) {
                assert!(line.contains(&format!("`{key}`")), "{line}");
                assert!(line.contains(&file.display().to_string()), "{line}");
            }
        }
    }
}
