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
//!
//! [`not_after`] reads when any certificate file expires (the health check
//! uses it on the configured ones), with a small DER walker instead of an
//! X.509 crate.

use std::fs::{self, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use chrono::{DateTime, Datelike, Days, NaiveDate, Utc};
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
    #[error("cannot read certificates from `{path}`: {message}")]
    Read { path: PathBuf, message: String },
    #[error("certificate in `{path}` is not a valid X.509 certificate: {problem}")]
    Parse {
        path: PathBuf,
        problem: &'static str,
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

/// How the certificates of one PEM file are used, which decides when the
/// file as a whole stops working.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PemUse {
    /// A chain presented to the peer (leaf, then intermediates): it fails
    /// when its first certificate expires, so the earliest notAfter.
    Chain,
    /// Trust anchors (a CA bundle, e.g. the old and the new root during a
    /// rollover): it works while any one is valid, so the latest notAfter.
    Anchors,
}

/// When the certificates in a PEM file stop being valid, for their `use`:
/// see [`PemUse`]. For the health check, so that it needs no X.509 crate:
/// see [`der_not_after`].
pub fn not_after(pem_path: &Path, use_: PemUse) -> Result<DateTime<Utc>, CertError> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    let read = |message: String| CertError::Read {
        path: pem_path.to_path_buf(),
        message,
    };
    let ders = CertificateDer::pem_file_iter(pem_path)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| read(e.to_string()))?;
    let mut ends = Vec::with_capacity(ders.len());
    for der in &ders {
        ends.push(der_not_after(der).map_err(|problem| CertError::Parse {
            path: pem_path.to_path_buf(),
            problem,
        })?);
    }
    let end = match use_ {
        PemUse::Chain => ends.into_iter().min(),
        PemUse::Anchors => ends.into_iter().max(),
    };
    end.ok_or_else(|| read("no `BEGIN CERTIFICATE` block in it".into()))
}

/// The notAfter of one DER certificate, found by walking just far enough
/// into it (RFC 5280, 4.1): Certificate, TBSCertificate, then past the
/// optional `[0]` version, serialNumber, signature and issuer to Validity,
/// whose second time is notAfter. Garbage of any kind is an error, never a
/// panic.
pub fn der_not_after(der: &[u8]) -> Result<DateTime<Utc>, &'static str> {
    let mut input = der;
    let mut certificate = der_expect(&mut input, DER_SEQUENCE, "it is not a SEQUENCE")?;
    if !input.is_empty() {
        return Err("bytes follow the certificate");
    }
    let mut tbs = der_expect(
        &mut certificate,
        DER_SEQUENCE,
        "its tbsCertificate is not a SEQUENCE",
    )?;
    let (mut tag, _) = der_tlv(&mut tbs)?;
    if tag == DER_VERSION {
        (tag, _) = der_tlv(&mut tbs)?;
    }
    if tag != DER_INTEGER {
        return Err("its serialNumber is not an INTEGER");
    }
    der_expect(&mut tbs, DER_SEQUENCE, "its signature is not a SEQUENCE")?;
    der_expect(&mut tbs, DER_SEQUENCE, "its issuer is not a SEQUENCE")?;
    let mut validity = der_expect(&mut tbs, DER_SEQUENCE, "its validity is not a SEQUENCE")?;
    let (tag, not_before) = der_tlv(&mut validity)?;
    der_time(tag, not_before)?;
    let (tag, not_after) = der_tlv(&mut validity)?;
    der_time(tag, not_after)
}

const DER_INTEGER: u8 = 0x02;
const DER_UTC_TIME: u8 = 0x17;
const DER_GENERALIZED_TIME: u8 = 0x18;
const DER_SEQUENCE: u8 = 0x30;
/// `[0] EXPLICIT`, the version field of a v2 or v3 certificate.
const DER_VERSION: u8 = 0xa0;
const DER_TRUNCATED: &str = "it is cut short";

/// Takes one tag-length-value from the front of `input`; returns its tag
/// and contents. Only what certificates use: one-byte tags, definite
/// lengths of up to four bytes.
fn der_tlv<'a>(input: &mut &'a [u8]) -> Result<(u8, &'a [u8]), &'static str> {
    let bytes: &'a [u8] = input;
    let [tag, first, rest @ ..] = bytes else {
        return Err(DER_TRUNCATED);
    };
    if tag & 0x1f == 0x1f {
        return Err("it has a multi-byte tag");
    }
    let (len, rest) = match *first {
        n @ 0..=0x7f => (usize::from(n), rest),
        n @ 0x81..=0x84 => {
            let n = usize::from(n & 0x7f);
            if rest.len() < n {
                return Err(DER_TRUNCATED);
            }
            let (len, rest) = rest.split_at(n);
            (
                len.iter().fold(0, |acc, b| acc << 8 | usize::from(*b)),
                rest,
            )
        }
        _ => return Err("it has an indefinite or oversized length"),
    };
    if rest.len() < len {
        return Err(DER_TRUNCATED);
    }
    let (body, rest) = rest.split_at(len);
    *input = rest;
    Ok((*tag, body))
}

/// [`der_tlv`], failing with `problem` unless the tag is `tag`.
fn der_expect<'a>(
    input: &mut &'a [u8],
    tag: u8,
    problem: &'static str,
) -> Result<&'a [u8], &'static str> {
    match der_tlv(input)? {
        (t, body) if t == tag => Ok(body),
        _ => Err(problem),
    }
}

/// A validity time as RFC 5280 (4.1.2.5) has CAs write it: UTCTime
/// `YYMMDDHHMMSSZ` up to 2049 (YY of 50 and above is 19YY) and
/// GeneralizedTime `YYYYMMDDHHMMSSZ` from 2050; always UTC, with seconds,
/// without fractions.
fn der_time(tag: u8, body: &[u8]) -> Result<DateTime<Utc>, &'static str> {
    const BAD: &str = "a validity time is not YYMMDDHHMMSSZ or YYYYMMDDHHMMSSZ";
    let number = |digits: &[u8]| -> Result<u32, &'static str> {
        digits.iter().try_fold(0, |acc, d| match d {
            b'0'..=b'9' => Ok(acc * 10 + u32::from(d - b'0')),
            _ => Err(BAD),
        })
    };
    let (year, rest) = match (tag, body.len()) {
        (DER_UTC_TIME, 13) => match number(&body[..2])? {
            yy @ 50.. => (1900 + yy, &body[2..]),
            yy => (2000 + yy, &body[2..]),
        },
        (DER_GENERALIZED_TIME, 15) => (number(&body[..4])?, &body[4..]),
        (DER_UTC_TIME | DER_GENERALIZED_TIME, _) => return Err(BAD),
        _ => return Err("a validity time is neither UTCTime nor GeneralizedTime"),
    };
    let [fields @ .., b'Z'] = rest else {
        return Err(BAD);
    };
    // Month, day, hour, minute, second: two digits each.
    let mut f = [0; 5];
    for (i, value) in f.iter_mut().enumerate() {
        *value = number(&fields[2 * i..2 * i + 2])?;
    }
    NaiveDate::from_ymd_opt(year as i32, f[0], f[1])
        .and_then(|day| day.and_hms_opt(f[2], f[3], f[4]))
        .map(|t| t.and_utc())
        .ok_or("a validity time is not a real date and time")
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

    /// A self-signed certificate valid until `secs` after midnight UTC of
    /// the given day, as PEM.
    fn pem_until(year: i32, month: u8, day: u8, secs: u64) -> String {
        let mut params = base_params("expiry test");
        params.not_after =
            rcgen::date_time_ymd(year, month, day) + std::time::Duration::from_secs(secs);
        let key = new_key("test key").unwrap();
        params.self_signed(&key).unwrap().pem()
    }

    fn utc(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().to_utc()
    }

    fn contains(haystack: &[u8], needle: &[u8]) -> bool {
        haystack.windows(needle.len()).any(|w| w == needle)
    }

    #[test]
    fn not_after_reads_a_utc_time_before_2050() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("until-2049.crt");
        fs::write(&path, pem_until(2049, 12, 31, 86_399)).unwrap();
        assert!(contains(&cert(&path), b"\x17\x0d491231235959Z"));
        assert_eq!(
            not_after(&path, PemUse::Chain).unwrap(),
            utc("2049-12-31T23:59:59Z")
        );
    }

    #[test]
    fn not_after_reads_a_generalized_time_from_2050() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("until-2050.crt");
        fs::write(&path, pem_until(2050, 1, 1, 1)).unwrap();
        assert!(contains(&cert(&path), b"\x18\x0f20500101000001Z"));
        assert_eq!(
            not_after(&path, PemUse::Chain).unwrap(),
            utc("2050-01-01T00:00:01Z")
        );
    }

    #[test]
    fn utc_time_years_from_50_are_the_1900s() {
        for (text, expected) in [
            (&b"500101000000Z"[..], "1950-01-01T00:00:00Z"),
            (b"991231235959Z", "1999-12-31T23:59:59Z"),
            (b"000229120000Z", "2000-02-29T12:00:00Z"),
            (b"491231235959Z", "2049-12-31T23:59:59Z"),
        ] {
            assert_eq!(der_time(DER_UTC_TIME, text), Ok(utc(expected)));
        }
    }

    #[test]
    fn validity_times_outside_rfc_5280_are_refused() {
        for (tag, text) in [
            (DER_UTC_TIME, &b"4912312359590"[..]),
            (DER_UTC_TIME, b"4912312359Z"),
            (DER_UTC_TIME, b"491231235959+0100"),
            (DER_UTC_TIME, b"491331235959Z"),
            (DER_UTC_TIME, b"490230235959Z"),
            (DER_UTC_TIME, b"4912312359a9Z"),
            (DER_UTC_TIME, b"49123123595\xc3\xa9"),
            (DER_GENERALIZED_TIME, b"20500101000001.5Z"),
            (DER_GENERALIZED_TIME, b"491231235959Z"),
            (0x04, b"491231235959Z"),
        ] {
            assert!(
                der_time(tag, text).is_err(),
                "{:?}",
                String::from_utf8_lossy(text)
            );
        }
    }

    #[test]
    fn a_chain_ends_with_its_earliest_and_a_ca_bundle_with_its_latest() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("chain.crt");
        let chain = [(2040, 0), (2030, 7), (2060, 0)]
            .map(|(year, secs)| pem_until(year, 6, 1, secs))
            .concat();
        fs::write(&path, chain).unwrap();
        assert_eq!(
            not_after(&path, PemUse::Chain).unwrap(),
            utc("2030-06-01T00:00:07Z")
        );
        // Review finding: a bundle mid-rollover works while any root does.
        assert_eq!(
            not_after(&path, PemUse::Anchors).unwrap(),
            utc("2060-06-01T00:00:00Z")
        );
    }

    #[test]
    fn not_after_of_the_dev_certs_is_a_year_ahead() {
        let (_tmp, certs) = generate();
        let expected = (Utc::now().date_naive() + Days::new(VALIDITY_DAYS))
            .and_hms_opt(0, 0, 0)
            .unwrap()
            .and_utc();
        for path in [&certs.ca_cert, &certs.gateway_cert, &certs.server_cert] {
            assert_eq!(
                not_after(path, PemUse::Chain).unwrap(),
                expected,
                "{path:?}"
            );
        }
    }

    #[test]
    fn every_cut_and_every_flipped_byte_of_a_certificate_is_handled_without_panic() {
        let (_tmp, certs) = generate();
        let der = cert(&certs.gateway_cert).to_vec();
        assert!(der_not_after(&der).is_ok());
        for n in 0..der.len() {
            assert!(der_not_after(&der[..n]).is_err(), "cut at {n}");
        }
        let mut longer = der.clone();
        longer.push(0);
        assert_eq!(der_not_after(&longer), Err("bytes follow the certificate"));
        for i in 0..der.len() {
            for byte in [0x00, 0x80, 0xff] {
                let mut bad = der.clone();
                bad[i] = byte;
                let _ = der_not_after(&bad);
            }
        }
    }

    #[test]
    fn not_after_errors_name_the_file() {
        let tmp = tempfile::tempdir().unwrap();
        let missing = tmp.path().join("missing.crt");
        let empty = tmp.path().join("empty.crt");
        fs::write(&empty, "").unwrap();
        let garbage = tmp.path().join("garbage.crt");
        fs::write(
            &garbage,
            "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
        )
        .unwrap();
        for (path, says) in [
            (&missing, "cannot read certificates from `"),
            (&empty, "no `BEGIN CERTIFICATE` block"),
            (
                &garbage,
                "is not a valid X.509 certificate: it is not a SEQUENCE",
            ),
        ] {
            let message = not_after(path, PemUse::Chain).unwrap_err().to_string();
            assert!(message.contains(says), "{message}");
            assert!(message.contains(&path.display().to_string()), "{message}");
        }
    }
}
