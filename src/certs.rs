//! A throwaway development PKI, made in-process with rcgen.
//!
//! `hearth demo` and the integration tests need a broker and a gateway that
//! authenticate each other, exactly as in a hospital deployment, without an
//! operator running `certs/make-dev-certs.sh` first. [`DevCerts::generate`]
//! writes one CA and three leaf certificates (all ECDSA P-256, PEM):
//!
//! | file                            | subject                       | used by                 |
//! |---------------------------------|-------------------------------|-------------------------|
//! | `ca.crt`                        | CN hearth development CA      | both sides, as the root |
//! | `server.crt` / `server.key`     | SAN localhost, 127.0.0.1, ::1 | the broker              |
//! | `gateway.crt` / `gateway.key`   | CN = gateway id               | hearth (client)         |
//! | `hospital.crt` / `hospital.key` | CN hospital                   | a test subscriber       |
//!
//! The shapes are chosen so that both rustls/webpki and OpenSSL (mosquitto)
//! accept them: the CA has `basicConstraints CA:TRUE, pathlen:0` and
//! `keyCertSign`; every leaf says `CA:FALSE` (webpki rejects a CA used as an
//! end entity), carries an authority key identifier, and has exactly one
//! extended key usage. The server name lives in the SAN, never only in the CN.
//!
//! Invariant: a private key is never on disk readable by group or others,
//! not even for a moment; it ends at mode 0600.
//! The CA key is not written at all: nothing can be signed with this PKI
//! after `generate` returns.

use std::fs::{self, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use chrono::{Datelike, Days, NaiveDate, Utc};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType,
};

/// The CA's common name; also what `openssl x509 -issuer` shows on every leaf.
pub const CA_COMMON_NAME: &str = "hearth development CA";

/// The common name of the second client certificate, for a test subscriber.
pub const HOSPITAL_COMMON_NAME: &str = "hospital";

/// Days the certificates stay valid. Long enough for a demo left running,
/// short enough that a leaked dev key does not live for decades.
const VALIDITY_DAYS: u64 = 365;

/// Errors from making the development PKI.
#[derive(Debug, thiserror::Error)]
pub enum CertError {
    #[error("cannot create directory `{path}`: {source}")]
    CreateDir { path: PathBuf, source: io::Error },
    #[error("cannot write `{path}`: {source}")]
    Write { path: PathBuf, source: io::Error },
    #[error("cannot generate the {what}: {source}")]
    Generate {
        what: &'static str,
        source: rcgen::Error,
    },
}

/// Paths of a generated development PKI (all PEM). Keys are written with mode 0600.
#[derive(Debug, Clone)]
pub struct DevCerts {
    pub dir: PathBuf,
    pub ca_cert: PathBuf,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
    pub gateway_cert: PathBuf,
    pub gateway_key: PathBuf,
    pub hospital_cert: PathBuf,
    pub hospital_key: PathBuf,
}

/// One leaf certificate to issue: its subject and what it may be used for.
struct Leaf<'a> {
    what: &'static str,
    common_name: &'a str,
    sans: Vec<SanType>,
    usage: ExtendedKeyUsagePurpose,
}

impl DevCerts {
    /// Makes a CA (CN "hearth development CA"), a broker (server) certificate valid for DNS "localhost", IP 127.0.0.1 and ::1,
    /// a gateway client certificate with CN = gateway_id, and a second client certificate CN "hospital" (for a subscriber).
    /// Files: ca.crt, server.crt, server.key, gateway.crt, gateway.key, hospital.crt, hospital.key in `dir` (created if missing).
    ///
    /// Existing files of those names are overwritten: every call makes a new CA,
    /// so certificates from an earlier call no longer chain to `ca.crt`.
    pub fn generate(dir: &Path, gateway_id: &str) -> Result<DevCerts, CertError> {
        fs::create_dir_all(dir).map_err(|source| CertError::CreateDir {
            path: dir.to_path_buf(),
            source,
        })?;
        let certs = DevCerts::in_dir(dir);

        let ca_key = new_key("CA key")?;
        let ca_params = ca_params();
        let ca_cert = ca_params
            .self_signed(&ca_key)
            .map_err(|source| CertError::Generate {
                what: "CA certificate",
                source,
            })?;
        let ca = Issuer::new(ca_params, ca_key);
        write_cert(&certs.ca_cert, &ca_cert.pem())?;

        let leaves = [
            (
                Leaf {
                    what: "server certificate",
                    common_name: "localhost",
                    sans: vec![
                        SanType::DnsName("localhost".try_into().expect("valid DNS name")),
                        SanType::IpAddress([127, 0, 0, 1].into()),
                        SanType::IpAddress(std::net::Ipv6Addr::LOCALHOST.into()),
                    ],
                    usage: ExtendedKeyUsagePurpose::ServerAuth,
                },
                &certs.server_cert,
                &certs.server_key,
            ),
            (
                Leaf {
                    what: "gateway certificate",
                    common_name: gateway_id,
                    sans: Vec::new(),
                    usage: ExtendedKeyUsagePurpose::ClientAuth,
                },
                &certs.gateway_cert,
                &certs.gateway_key,
            ),
            (
                Leaf {
                    what: "hospital certificate",
                    common_name: HOSPITAL_COMMON_NAME,
                    sans: Vec::new(),
                    usage: ExtendedKeyUsagePurpose::ClientAuth,
                },
                &certs.hospital_cert,
                &certs.hospital_key,
            ),
        ];
        for (leaf, cert_path, key_path) in leaves {
            let key = new_key(leaf.what)?;
            let cert =
                leaf_params(&leaf)
                    .signed_by(&key, &ca)
                    .map_err(|source| CertError::Generate {
                        what: leaf.what,
                        source,
                    })?;
            // Key first: a certificate on disk without its key is the more
            // confusing half-finished state.
            write_key(key_path, &key.serialize_pem())?;
            write_cert(cert_path, &cert.pem())?;
        }
        Ok(certs)
    }

    /// The paths `generate` writes to in `dir`.
    fn in_dir(dir: &Path) -> DevCerts {
        DevCerts {
            dir: dir.to_path_buf(),
            ca_cert: dir.join("ca.crt"),
            server_cert: dir.join("server.crt"),
            server_key: dir.join("server.key"),
            gateway_cert: dir.join("gateway.crt"),
            gateway_key: dir.join("gateway.key"),
            hospital_cert: dir.join("hospital.crt"),
            hospital_key: dir.join("hospital.key"),
        }
    }
}

fn new_key(what: &'static str) -> Result<KeyPair, CertError> {
    // ECDSA P-256: accepted by ring, aws-lc-rs and OpenSSL at any security level.
    KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
        .map_err(|source| CertError::Generate { what, source })
}

fn ca_params() -> CertificateParams {
    let mut params = base_params(CA_COMMON_NAME);
    // pathlen:0: this CA signs leaves only, never an intermediate.
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params
}

fn leaf_params(leaf: &Leaf<'_>) -> CertificateParams {
    let mut params = base_params(leaf.common_name);
    // webpki refuses a certificate with CA:TRUE as an end entity; say so explicitly.
    params.is_ca = IsCa::ExplicitNoCa;
    params.subject_alt_names = leaf.sans.clone();
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![leaf.usage.clone()];
    // OpenSSL's chain building and `-x509_strict` want the AKI on every leaf.
    params.use_authority_key_identifier_extension = true;
    params
}

/// Parameters shared by all four certificates: a subject with only a CN and a
/// validity from yesterday (tolerates a clock a little behind) for a year.
fn base_params(common_name: &str) -> CertificateParams {
    let mut params = CertificateParams::default();
    let mut name = DistinguishedName::new();
    name.push(DnType::CommonName, common_name);
    params.distinguished_name = name;
    let today = Utc::now().date_naive();
    // Midnight UTC of the given day; chrono's months and days are always in range.
    let midnight =
        |day: NaiveDate| rcgen::date_time_ymd(day.year(), day.month() as u8, day.day() as u8);
    params.not_before = midnight(today - Days::new(1));
    params.not_after = midnight(today + Days::new(VALIDITY_DAYS));
    params
}

fn write_cert(path: &Path, pem: &str) -> Result<(), CertError> {
    fs::write(path, pem).map_err(|source| CertError::Write {
        path: path.to_path_buf(),
        source,
    })
}

/// Writes a private key so that it is never readable by group or others, even
/// for a moment and even when a file with a looser mode is already there.
fn write_key(path: &Path, pem: &str) -> Result<(), CertError> {
    let write = || -> io::Result<()> {
        let mut file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(path)?;
        // `mode` applies only to a new file: tighten an existing one before writing.
        file.set_permissions(fs::Permissions::from_mode(0o600))?;
        file.write_all(pem.as_bytes())?;
        file.sync_all()
    };
    write().map_err(|source| CertError::Write {
        path: path.to_path_buf(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls::RootCertStore;
    use rustls::client::danger::ServerCertVerifier;
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
    use rustls::server::WebPkiClientVerifier;
    use std::sync::Arc;

    fn cert(path: &Path) -> CertificateDer<'static> {
        CertificateDer::from_pem_file(path).unwrap()
    }

    fn roots(certs: &DevCerts) -> Arc<RootCertStore> {
        let mut roots = RootCertStore::empty();
        roots.add(cert(&certs.ca_cert)).unwrap();
        Arc::new(roots)
    }

    fn provider() -> Arc<rustls::crypto::CryptoProvider> {
        Arc::new(rustls::crypto::ring::default_provider())
    }

    fn generate() -> (tempfile::TempDir, DevCerts) {
        let tmp = tempfile::tempdir().unwrap();
        let certs = DevCerts::generate(&tmp.path().join("pki"), "gw-test-42").unwrap();
        (tmp, certs)
    }

    #[test]
    fn generate_writes_every_file_and_keys_are_0600() {
        let (_tmp, certs) = generate();
        for path in [
            &certs.ca_cert,
            &certs.server_cert,
            &certs.gateway_cert,
            &certs.hospital_cert,
        ] {
            let text = fs::read_to_string(path).unwrap();
            assert!(text.starts_with("-----BEGIN CERTIFICATE-----"), "{path:?}");
        }
        for path in [&certs.server_key, &certs.gateway_key, &certs.hospital_key] {
            let mode = fs::metadata(path).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600, "{path:?}");
            assert!(fs::read_to_string(path).unwrap().contains("PRIVATE KEY"));
        }
        assert!(
            !certs.dir.join("ca.key").exists(),
            "the CA key must not be kept"
        );
    }

    #[test]
    fn generate_tightens_an_existing_world_readable_key() {
        let tmp = tempfile::tempdir().unwrap();
        let key = tmp.path().join("gateway.key");
        fs::write(&key, "old").unwrap();
        fs::set_permissions(&key, fs::Permissions::from_mode(0o644)).unwrap();
        DevCerts::generate(tmp.path(), "gw-0001").unwrap();
        let mode = fs::metadata(&key).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
    }

    #[test]
    fn webpki_server_verifier_accepts_server_cert_for_localhost_and_loopback_ips() {
        let (_tmp, certs) = generate();
        let verifier =
            rustls::client::WebPkiServerVerifier::builder_with_provider(roots(&certs), provider())
                .build()
                .unwrap();
        for name in ["localhost", "127.0.0.1", "::1"] {
            let name = ServerName::try_from(name).unwrap();
            verifier
                .verify_server_cert(&cert(&certs.server_cert), &[], &name, &[], UnixTime::now())
                .unwrap_or_else(|e| panic!("server.crt rejected for {name:?}: {e}"));
        }
        // A client certificate must not pass as the broker's (wrong EKU, no SAN).
        let localhost = ServerName::try_from("localhost").unwrap();
        assert!(
            verifier
                .verify_server_cert(
                    &cert(&certs.gateway_cert),
                    &[],
                    &localhost,
                    &[],
                    UnixTime::now()
                )
                .is_err()
        );
    }

    #[test]
    fn webpki_client_verifier_accepts_gateway_and_hospital_certs() {
        let (_tmp, certs) = generate();
        let verifier = WebPkiClientVerifier::builder_with_provider(roots(&certs), provider())
            .build()
            .unwrap();
        for path in [&certs.gateway_cert, &certs.hospital_cert] {
            verifier
                .verify_client_cert(&cert(path), &[], UnixTime::now())
                .unwrap_or_else(|e| panic!("{path:?} rejected as a client: {e}"));
        }
        // The server certificate has only the server-auth EKU.
        assert!(
            verifier
                .verify_client_cert(&cert(&certs.server_cert), &[], UnixTime::now())
                .is_err()
        );
    }

    #[test]
    fn gateway_cert_subject_is_the_gateway_id() {
        let (_tmp, certs) = generate();
        // No X.509 parser in the tree: the CN is a UTF8String (tag 0x0c) in the DER.
        let der = cert(&certs.gateway_cert);
        let mut needle = vec![0x0c, "gw-test-42".len() as u8];
        needle.extend_from_slice(b"gw-test-42");
        assert!(der.windows(needle.len()).any(|w| w == needle.as_slice()));
    }

    #[test]
    fn a_second_generate_makes_a_new_ca() {
        let (_tmp, certs) = generate();
        let first = fs::read(&certs.ca_cert).unwrap();
        DevCerts::generate(&certs.dir, "gw-test-42").unwrap();
        assert_ne!(first, fs::read(&certs.ca_cert).unwrap());
    }

    #[test]
    fn write_error_names_the_file() {
        let tmp = tempfile::tempdir().unwrap();
        // A directory where the CA certificate should go makes the write fail.
        fs::create_dir(tmp.path().join("ca.crt")).unwrap();
        let err = DevCerts::generate(tmp.path(), "gw-0001").unwrap_err();
        let message = err.to_string();
        assert!(message.starts_with("cannot write `"), "{message}");
        assert!(message.contains("ca.crt"), "{message}");
    }
}
