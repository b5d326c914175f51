//! Mutual TLS for the broker link: the hospital's CA, our client
//! certificate, and the CAs' revocation lists.
//!
//! rustls speaks TLS 1.2 and 1.3 only and never fetches CRLs or OCSP: a
//! revoked broker certificate is refused only when `mqtt.crl_file` holds a
//! CRL that lists it. [`TlsSource`] holds the configuration the publisher
//! connects with. It reads the CA, the client certificate and its key once,
//! at start; the CRL file at start and again on SIGHUP ([`HangupReload`]).
//! A file that cannot be used at start is a config error (exit 2); on
//! SIGHUP it is one WARN, and the lists loaded before stay in use. New
//! lists apply to the next handshake, and the publisher checks the broker
//! it is connected to against them at once, dropping the link if that
//! broker is no longer trusted (a revoked key may be an attacker's).
//!
//! Why a handshake failed is told by [`failure`]. hearth's verifier and
//! client-certificate resolver wrap rustls's own without changing what they
//! decide; they only record what the handshake showed (the broker's
//! certificate, what it asked of ours) for that explanation.

mod der;
pub mod failure;

use std::convert::Infallible;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::{ResolvesClientCert, WebPkiServerVerifier};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{
    CertificateDer, CertificateRevocationListDer, PrivateKeyDer, ServerName, UnixTime,
};
use rustls::sign::CertifiedKey;
use rustls::{
    CertRevocationListError, ClientConfig, DigitallySignedStruct, DistinguishedName,
    InconsistentKeys, RootCertStore, SignatureScheme,
};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use self::der::CertFacts;
use self::failure::{Asked, Seen};
pub use self::failure::{Context, TlsFailure};
use crate::config::MqttConfig;

/// A TLS configuration that cannot be built from the files.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read PEM file `{path}`: {message}")]
    Pem {
        key: &'static str,
        path: PathBuf,
        message: String,
    },
    #[error("no certificate in `{path}`: expected PEM `BEGIN CERTIFICATE` blocks")]
    NoCertificate { key: &'static str, path: PathBuf },
    #[error("CA file `{path}` holds an unusable certificate: {source}")]
    BadCa {
        path: PathBuf,
        source: rustls::Error,
    },
    #[error(
        "`{0}` is an X.509 v1 certificate (it has no extensions), which rustls/webpki refuse: have it re-issued as X.509 v3 with `basicConstraints=CA:FALSE` and `extendedKeyUsage=clientAuth` (`openssl x509 -req` makes v1 unless given `-extfile`)"
    )]
    ClientCertV1(PathBuf),
    #[error("client certificate `{path}` is unusable: {source}")]
    BadClientCert {
        path: PathBuf,
        source: rustls::Error,
    },
    #[error("private key `{path}` is unusable: {source}")]
    BadKey {
        path: PathBuf,
        source: rustls::Error,
    },
    /// Reported under `mqtt.cert_file`: a wrong certificate (another
    /// gateway's, a CA's) is the likelier mistake, and the line names both.
    #[error(
        "`{cert}` is not the certificate of the key in `{key_path}` (`mqtt.key_file`): install the certificate issued for that key, or the key made with this certificate's request"
    )]
    KeyMismatch { cert: PathBuf, key_path: PathBuf },
    #[error(
        "no CRL in `{0}`: expected PEM `BEGIN X509 CRL` blocks (a DER file converts with `openssl crl -inform DER -in FILE -out FILE.pem`)"
    )]
    NoCrl(PathBuf),
    #[error(
        "CRL file `{path}` is unusable: {problem}: install the current CRLs of the broker's CAs, as PEM"
    )]
    BadCrl { path: PathBuf, problem: String },
}

impl TlsError {
    /// The config key of the file at fault.
    pub fn key(&self) -> &'static str {
        match self {
            TlsError::Pem { key, .. } | TlsError::NoCertificate { key, .. } => key,
            TlsError::BadCa { .. } => "mqtt.ca_file",
            TlsError::ClientCertV1(_)
            | TlsError::BadClientCert { .. }
            | TlsError::KeyMismatch { .. } => "mqtt.cert_file",
            TlsError::BadKey { .. } => "mqtt.key_file",
            TlsError::NoCrl(_) | TlsError::BadCrl { .. } => "mqtt.crl_file",
        }
    }
}

/// The crypto provider hearth uses everywhere (ring), installed once per
/// process so that no library picks another one.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn certs(key: &'static str, path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| TlsError::Pem {
            key,
            path: path.to_owned(),
            message: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate {
            key,
            path: path.to_owned(),
        });
    }
    Ok(certs)
}

/// Reads every CRL in a PEM file and checks that rustls can parse them.
fn crls(path: &Path) -> Result<Vec<CertificateRevocationListDer<'static>>, TlsError> {
    let crls = CertificateRevocationListDer::pem_file_iter(path)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| TlsError::Pem {
            key: "mqtt.crl_file",
            path: path.to_owned(),
            message: e.to_string(),
        })?;
    if crls.is_empty() {
        return Err(TlsError::NoCrl(path.to_owned()));
    }
    Ok(crls)
}

/// Why rustls cannot use a CRL, in words.
fn crl_problem(e: &CertRevocationListError) -> String {
    use CertRevocationListError as E;
    match e {
        E::ParseError => "a CRL in it is not valid DER".into(),
        E::UnsupportedCrlVersion => "a CRL in it is not an X.509 v2 CRL".into(),
        E::UnsupportedCriticalExtension => {
            "a CRL in it has a critical extension rustls does not know".into()
        }
        E::UnsupportedDeltaCrl => "a CRL in it is a delta CRL, which rustls does not use".into(),
        E::UnsupportedIndirectCrl => {
            "a CRL in it is an indirect CRL, which rustls does not use".into()
        }
        E::UnsupportedRevocationReason => {
            "a CRL in it gives a revocation reason rustls does not know".into()
        }
        other => format!("rustls refuses a CRL in it: {other:?}"),
    }
}

/// The files' contents, read once: the trust roots and our certified key.
#[derive(Debug, Clone)]
struct Material {
    roots: Arc<RootCertStore>,
    key: Arc<CertifiedKey>,
    /// Who issued our client certificate (its CN), for messages.
    issuer: Option<String>,
}

impl Material {
    fn load(ca: &Path, cert: &Path, key: &Path) -> Result<Material, TlsError> {
        let mut roots = RootCertStore::empty();
        for c in certs("mqtt.ca_file", ca)? {
            roots.add(c).map_err(|source| TlsError::BadCa {
                path: ca.to_owned(),
                source,
            })?;
        }
        let chain = certs("mqtt.cert_file", cert)?;
        // webpki refuses a v1 end-entity certificate with an error that
        // rustls reports as a key that does not fit: say what it is.
        let facts = CertFacts::parse(&chain[0]);
        if facts.as_ref().is_some_and(|f| f.version == 1) {
            return Err(TlsError::ClientCertV1(cert.to_owned()));
        }
        let key_der = PrivateKeyDer::from_pem_file(key).map_err(|e| TlsError::Pem {
            key: "mqtt.key_file",
            path: key.to_owned(),
            message: e.to_string(),
        })?;
        let signing = provider()
            .key_provider
            .load_private_key(key_der)
            .map_err(|source| TlsError::BadKey {
                path: key.to_owned(),
                source,
            })?;
        let certified = CertifiedKey::new(chain, signing);
        match certified.keys_match() {
            Ok(()) | Err(rustls::Error::InconsistentKeys(InconsistentKeys::Unknown)) => {}
            Err(rustls::Error::InconsistentKeys(InconsistentKeys::KeyMismatch)) => {
                return Err(TlsError::KeyMismatch {
                    cert: cert.to_owned(),
                    key_path: key.to_owned(),
                });
            }
            Err(source) => {
                return Err(TlsError::BadClientCert {
                    path: cert.to_owned(),
                    source,
                });
            }
        }
        Ok(Material {
            roots: Arc::new(roots),
            key: Arc::new(certified),
            issuer: facts.and_then(|f| der::common_name(&f.issuer)),
        })
    }

    /// A client configuration checking the broker against the roots and
    /// `crls`; what its handshakes show goes to `seen`.
    fn build(
        &self,
        crls: Vec<CertificateRevocationListDer<'static>>,
        seen: &Arc<Mutex<Seen>>,
    ) -> Result<Built, CertRevocationListError> {
        let verifier = WebPkiServerVerifier::builder_with_provider(self.roots.clone(), provider())
            .with_crls(crls)
            .build()
            .map_err(|e| match e {
                rustls::client::VerifierBuilderError::InvalidCrl(e) => e,
                // The roots were checked non-empty when read.
                other => CertRevocationListError::Other(rustls::OtherError(Arc::new(
                    std::io::Error::other(other.to_string()),
                ))),
            })?;
        let config = ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .expect("ring supports the default TLS versions")
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(Witnessing {
                inner: verifier.clone(),
                seen: seen.clone(),
            }))
            .with_client_cert_resolver(Arc::new(WitnessingResolver {
                key: self.key.clone(),
                ours: self.issuer.clone(),
                seen: seen.clone(),
            }));
        Ok(Built {
            config: Arc::new(config),
            verifier: Some(verifier),
        })
    }
}

/// Builds a client configuration from PEM files, without CRLs: for the
/// demo and the test subscribers (the gateway uses [`TlsSource`]).
pub fn client_config(ca: &Path, cert: &Path, key: &Path) -> Result<Arc<ClientConfig>, TlsError> {
    let material = Material::load(ca, cert, key)?;
    let built = material
        .build(Vec::new(), &Arc::default())
        .expect("no CRL to refuse");
    Ok(built.config)
}

/// One built configuration and the verifier inside it.
struct Built {
    config: Arc<ClientConfig>,
    /// `None` for a configuration given ready-made.
    verifier: Option<Arc<WebPkiServerVerifier>>,
}

/// The TLS configuration the publisher connects with; cheap to clone.
#[derive(Clone)]
pub struct TlsSource {
    inner: Arc<Source>,
}

struct Source {
    /// `None` for a configuration given ready-made (no reload).
    material: Option<Material>,
    crl_file: Option<PathBuf>,
    seen: Arc<Mutex<Seen>>,
    current: Mutex<Built>,
    /// Bumped on every reload.
    reloaded: watch::Sender<u64>,
}

impl From<Arc<ClientConfig>> for TlsSource {
    /// A fixed configuration: no CRL reload, no facts for messages.
    fn from(config: Arc<ClientConfig>) -> TlsSource {
        TlsSource::new(
            None,
            None,
            Arc::default(),
            Built {
                config,
                verifier: None,
            },
        )
    }
}

impl TlsSource {
    fn new(
        material: Option<Material>,
        crl_file: Option<PathBuf>,
        seen: Arc<Mutex<Seen>>,
        built: Built,
    ) -> TlsSource {
        TlsSource {
            inner: Arc::new(Source {
                material,
                crl_file,
                seen,
                current: Mutex::new(built),
                reloaded: watch::Sender::new(0),
            }),
        }
    }

    /// Reads `mqtt.ca_file`, `mqtt.cert_file`, `mqtt.key_file` and
    /// `mqtt.crl_file` (if set); an error names the file and its key.
    pub fn load(mqtt: &MqttConfig) -> Result<TlsSource, TlsError> {
        let material = Material::load(&mqtt.ca_file, &mqtt.cert_file, &mqtt.key_file)?;
        let seen = Arc::default();
        let built = match &mqtt.crl_file {
            Some(path) => material
                .build(crls(path)?, &seen)
                .map_err(|e| TlsError::BadCrl {
                    path: path.clone(),
                    problem: crl_problem(&e),
                })?,
            None => material.build(Vec::new(), &seen).expect("no CRL to refuse"),
        };
        Ok(TlsSource::new(
            Some(material),
            mqtt.crl_file.clone(),
            seen,
            built,
        ))
    }

    /// The configuration for the next handshake; forgets what the last
    /// handshake showed.
    pub fn for_handshake(&self) -> Arc<ClientConfig> {
        *lock(&self.inner.seen) = Seen::default();
        lock(&self.inner.current).config.clone()
    }

    /// What the last handshake showed, for [`TlsFailure::classify`].
    pub fn seen(&self) -> Seen {
        lock(&self.inner.seen).clone()
    }

    /// The rustls error inside `error` (from the handshake or the first
    /// read after it), classified; `None` if it is not TLS's.
    pub fn failure(&self, error: &std::io::Error) -> Option<TlsFailure> {
        TlsFailure::from_io(error, &self.seen())
    }

    /// Resolves after each reload of the CRLs.
    pub fn reloaded(&self) -> watch::Receiver<u64> {
        self.inner.reloaded.subscribe()
    }

    /// Reads `mqtt.crl_file` again and uses its lists from the next
    /// handshake on. Returns how many lists it holds, or `None` when no
    /// file is configured; on error the lists in use stay.
    pub fn reload_crls(&self) -> Result<Option<usize>, TlsError> {
        let (Some(material), Some(path)) = (&self.inner.material, &self.inner.crl_file) else {
            return Ok(None);
        };
        let lists = crls(path)?;
        let n = lists.len();
        let built = material
            .build(lists, &self.inner.seen)
            .map_err(|e| TlsError::BadCrl {
                path: path.clone(),
                problem: crl_problem(&e),
            })?;
        *lock(&self.inner.current) = built;
        self.inner.reloaded.send_modify(|n| *n += 1);
        Ok(Some(n))
    }

    /// Checks a broker's chain (from a live connection) against the
    /// current roots and CRLs, as a new handshake would.
    pub fn recheck(&self, host: &str, chain: &[CertificateDer<'static>]) -> Result<(), TlsFailure> {
        let Some(verifier) = lock(&self.inner.current).verifier.clone() else {
            return Ok(());
        };
        let Some((end_entity, intermediates)) = chain.split_first() else {
            return Ok(());
        };
        let name = ServerName::try_from(host.to_owned()).map_err(|_| TlsFailure::Other {
            message: format!("`{host}` is not a valid TLS server name"),
        })?;
        verifier
            .verify_server_cert(end_entity, intermediates, &name, &[], UnixTime::now())
            .map(drop)
            .map_err(|e| {
                let seen = Seen {
                    refused: CertFacts::parse(end_entity),
                    asked: None,
                };
                TlsFailure::classify(&e, &seen)
            })
    }

    fn crl_file(&self) -> Option<&Path> {
        self.inner.crl_file.as_deref()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// rustls's verifier, recording the broker's certificate when it refuses it.
#[derive(Debug)]
struct Witnessing {
    inner: Arc<WebPkiServerVerifier>,
    seen: Arc<Mutex<Seen>>,
}

impl ServerCertVerifier for Witnessing {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let verdict = self.inner.verify_server_cert(
            end_entity,
            intermediates,
            server_name,
            ocsp_response,
            now,
        );
        if verdict.is_err() {
            lock(&self.seen).refused = CertFacts::parse(end_entity);
        }
        verdict
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }

    fn root_hint_subjects(&self) -> Option<&[DistinguishedName]> {
        self.inner.root_hint_subjects()
    }
}

/// Always offers our certificate, as rustls's own single-certificate
/// resolver does, recording what the broker asked for.
#[derive(Debug)]
struct WitnessingResolver {
    key: Arc<CertifiedKey>,
    ours: Option<String>,
    seen: Arc<Mutex<Seen>>,
}

impl ResolvesClientCert for WitnessingResolver {
    fn resolve(
        &self,
        root_hint_subjects: &[&[u8]],
        sigschemes: &[SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        lock(&self.seen).asked = Some(Asked {
            fits: self.key.key.choose_scheme(sigschemes).is_some(),
            schemes: sigschemes.to_vec(),
            trusted: root_hint_subjects
                .iter()
                .filter_map(|name| der::common_name(name))
                .collect(),
            ours: self.ours.clone(),
        });
        Some(self.key.clone())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

/// Re-reads `mqtt.crl_file` on SIGHUP: the hook the gateway installs.
pub struct HangupReload {
    source: TlsSource,
    hangup: tokio::signal::unix::Signal,
}

impl HangupReload {
    /// Takes SIGHUP over at once (its default action ends the process):
    /// call it before telling systemd READY.
    pub fn install(source: TlsSource) -> std::io::Result<HangupReload> {
        use tokio::signal::unix::{SignalKind, signal};
        Ok(HangupReload {
            source,
            hangup: signal(SignalKind::hangup())?,
        })
    }

    /// Reloads on each SIGHUP until shutdown.
    pub async fn run(mut self, shutdown: CancellationToken) -> Result<(), Infallible> {
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return Ok(()),
                got = self.hangup.recv() => {
                    if got.is_none() {
                        // No more signals (the runtime is going away).
                        shutdown.cancelled().await;
                        return Ok(());
                    }
                    self.reload();
                }
            }
        }
    }

    fn reload(&self) {
        match self.source.reload_crls() {
            Ok(Some(lists)) => tracing::info!(
                lists,
                "SIGHUP: CRLs reloaded from `mqtt.crl_file` ({}); the broker link is checked against them.",
                self.source
                    .crl_file()
                    .map(Path::display)
                    .map(|d| d.to_string())
                    .unwrap_or_default()
            ),
            Ok(None) => tracing::info!("SIGHUP: `mqtt.crl_file` is not set; nothing to reload."),
            Err(e) => tracing::warn!(
                "SIGHUP: cannot reload `mqtt.crl_file`: {e}; the CRLs loaded before stay in use."
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::fs;

    use super::*;
    use crate::config::{Config, DEFAULT_TOML};
    use rcgen::{
        BasicConstraints, CertificateParams, CertificateRevocationListParams, DnType,
        ExtendedKeyUsagePurpose, IsCa, Issuer, KeyIdMethod, KeyPair, KeyUsagePurpose,
        RevokedCertParams, SerialNumber,
    };

    /// A CA, a broker certificate (serial 7) and a gateway certificate
    /// with its key, in a temporary folder.
    struct Pki {
        dir: tempfile::TempDir,
        ca: Issuer<'static, KeyPair>,
        mqtt: MqttConfig,
    }

    fn params(cn: &str) -> CertificateParams {
        let mut p = CertificateParams::default();
        p.distinguished_name.push(DnType::CommonName, cn);
        p
    }

    impl Pki {
        fn new() -> Pki {
            let dir = tempfile::tempdir().unwrap();
            let mut ca = params("unit CA");
            ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
            ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
            let ca_key = KeyPair::generate().unwrap();
            fs::write(
                dir.path().join("ca.crt"),
                ca.self_signed(&ca_key).unwrap().pem(),
            )
            .unwrap();
            let ca = Issuer::new(ca, ca_key);
            let key = KeyPair::generate().unwrap();
            let mut gw = params("gw-unit");
            gw.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
            let cert = gw.signed_by(&key, &ca).unwrap();
            fs::write(dir.path().join("gw.crt"), cert.pem()).unwrap();
            fs::write(dir.path().join("gw.key"), key.serialize_pem()).unwrap();
            let mut c = Config::parse(DEFAULT_TOML, Path::new("unit.toml")).unwrap();
            c.mqtt.host = "localhost".into();
            c.mqtt.ca_file = dir.path().join("ca.crt");
            c.mqtt.cert_file = dir.path().join("gw.crt");
            c.mqtt.key_file = dir.path().join("gw.key");
            Pki {
                dir,
                ca,
                mqtt: c.mqtt,
            }
        }

        fn path(&self, name: &str) -> PathBuf {
            self.dir.path().join(name)
        }

        /// The broker's chain: one certificate, serial 7, for localhost.
        fn broker(&self) -> Vec<CertificateDer<'static>> {
            let mut p = CertificateParams::new(vec!["localhost".to_owned()]).unwrap();
            p.serial_number = Some(SerialNumber::from(7u64));
            p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
            let key = KeyPair::generate().unwrap();
            vec![p.signed_by(&key, &self.ca).unwrap().der().clone()]
        }

        /// Writes a CRL revoking `serials` to `crl.pem`.
        fn crl(&self, serials: &[u64]) -> PathBuf {
            use chrono::Datelike;
            let today = chrono::Utc::now().date_naive();
            let now = rcgen::date_time_ymd(today.year(), today.month() as u8, today.day() as u8);
            let day = std::time::Duration::from_secs(86_400);
            let crl = CertificateRevocationListParams {
                this_update: now - day,
                next_update: now + 2 * day,
                crl_number: SerialNumber::from(1u64),
                issuing_distribution_point: None,
                revoked_certs: serials
                    .iter()
                    .map(|s| RevokedCertParams {
                        serial_number: SerialNumber::from(*s),
                        revocation_time: now - day,
                        reason_code: None,
                        invalidity_date: None,
                    })
                    .collect(),
                key_identifier_method: KeyIdMethod::Sha256,
            }
            .signed_by(&self.ca)
            .unwrap();
            let path = self.path("crl.pem");
            fs::write(&path, crl.pem().unwrap()).unwrap();
            path
        }
    }

    #[test]
    fn a_v1_client_certificate_is_named_as_such_not_blamed_on_the_key() {
        let pki = Pki::new();
        let v3 = CertificateDer::from_pem_file(&pki.mqtt.cert_file).unwrap();
        let v1 = der::tests::strip_version(&v3);
        // pki-types reads PEM but does not write it.
        let b64 = base64_encode(&v1);
        fs::write(
            &pki.mqtt.cert_file,
            format!("-----BEGIN CERTIFICATE-----\n{b64}\n-----END CERTIFICATE-----\n"),
        )
        .unwrap();
        // Regression: what rustls says on its own is about the key.
        let key = PrivateKeyDer::from_pem_file(&pki.mqtt.key_file).unwrap();
        let plain = ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(RootCertStore::empty())
            .with_client_auth_cert(vec![CertificateDer::from(v1)], key)
            .unwrap_err();
        assert!(
            format!("{plain:?}").contains("UnsupportedCertVersion"),
            "{plain:?}"
        );

        let e = TlsSource::load(&pki.mqtt).err().unwrap();
        assert_eq!(e.key(), "mqtt.cert_file");
        let message = e.to_string();
        assert!(message.contains("is an X.509 v1 certificate"), "{message}");
        assert!(message.contains("re-issued as X.509 v3"), "{message}");
        assert!(!message.contains("key"), "{message}");
    }

    /// Standard base64 with padding, in one line (PEM readers take it).
    fn base64_encode(bytes: &[u8]) -> String {
        const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
        let mut out = String::new();
        for chunk in bytes.chunks(3) {
            let b = [
                chunk[0],
                *chunk.get(1).unwrap_or(&0),
                *chunk.get(2).unwrap_or(&0),
            ];
            let n = u32::from(b[0]) << 16 | u32::from(b[1]) << 8 | u32::from(b[2]);
            for i in 0..4 {
                if i <= chunk.len() {
                    out.push(A[(n >> (18 - 6 * i) & 63) as usize] as char);
                } else {
                    out.push('=');
                }
            }
        }
        out
    }

    #[test]
    fn a_key_of_another_certificate_is_a_mismatch_naming_both_files() {
        let pki = Pki::new();
        fs::write(
            &pki.mqtt.key_file,
            KeyPair::generate().unwrap().serialize_pem(),
        )
        .unwrap();
        let e = TlsSource::load(&pki.mqtt).err().unwrap();
        assert!(matches!(e, TlsError::KeyMismatch { .. }), "{e:?}");
        assert_eq!(e.key(), "mqtt.cert_file");
        let message = e.to_string();
        assert!(message.contains("gw.key"), "{message}");
        assert!(message.contains("gw.crt"), "{message}");
    }

    #[test]
    fn a_crl_file_without_crls_or_with_garbage_is_refused_naming_it() {
        let mut pki = Pki::new();
        let path = pki.path("crl.pem");
        pki.mqtt.crl_file = Some(path.clone());
        fs::write(&path, "").unwrap();
        let e = TlsSource::load(&pki.mqtt).err().unwrap();
        assert!(matches!(e, TlsError::NoCrl(_)), "{e:?}");
        assert_eq!(e.key(), "mqtt.crl_file");
        fs::write(
            &path,
            "-----BEGIN X509 CRL-----\nAAAA\n-----END X509 CRL-----\n",
        )
        .unwrap();
        let e = TlsSource::load(&pki.mqtt).err().unwrap();
        assert!(matches!(e, TlsError::BadCrl { .. }), "{e:?}");
        assert!(e.to_string().contains("crl.pem"), "{e}");
        fs::remove_file(&path).unwrap();
        let e = TlsSource::load(&pki.mqtt).err().unwrap();
        assert_eq!(e.key(), "mqtt.crl_file");
    }

    #[test]
    fn a_reload_applies_new_crls_and_a_bad_file_keeps_the_old_ones() {
        let mut pki = Pki::new();
        pki.mqtt.crl_file = Some(pki.crl(&[99]));
        let source = TlsSource::load(&pki.mqtt).unwrap();
        let mut reloaded = source.reloaded();
        let broker = pki.broker();
        assert_eq!(source.recheck("localhost", &broker), Ok(()));

        pki.crl(&[99, 7]);
        assert_eq!(source.reload_crls().unwrap(), Some(1));
        assert!(reloaded.has_changed().unwrap());
        reloaded.mark_unchanged();
        assert_eq!(
            source.recheck("localhost", &broker),
            Err(TlsFailure::Revoked)
        );

        fs::write(pki.path("crl.pem"), "not a CRL").unwrap();
        let e = source.reload_crls().unwrap_err();
        assert_eq!(e.key(), "mqtt.crl_file");
        assert!(!reloaded.has_changed().unwrap());
        // Still the lists of the last good reload.
        assert_eq!(
            source.recheck("localhost", &broker),
            Err(TlsFailure::Revoked)
        );
    }

    #[test]
    fn without_a_crl_file_a_reload_does_nothing() {
        let pki = Pki::new();
        let source = TlsSource::load(&pki.mqtt).unwrap();
        assert_eq!(source.reload_crls().unwrap(), None);
        assert_eq!(source.recheck("localhost", &pki.broker()), Ok(()));
        assert_eq!(
            source.recheck("elsewhere.example", &pki.broker()),
            Err(TlsFailure::NameMismatch {
                presented: vec!["localhost".into()]
            })
        );
    }
}
