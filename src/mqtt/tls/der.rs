//! Just enough DER to name certificates in messages: a certificate's
//! version, issuer and subject, and a name's common name.
//!
//! webpki parses certificates fully but keeps what it found to itself; a
//! technician needs to read "issued by `CN=Other CA`", and that a client
//! certificate is X.509 v1, which webpki refuses without saying so. Any
//! input that is not what RFC 5280 (4.1) describes gives `None`, never a
//! panic.

/// `[0] EXPLICIT`, the version field of a v2 or v3 certificate.
const VERSION: u8 = 0xa0;
const INTEGER: u8 = 0x02;
const OID: u8 = 0x06;
const SEQUENCE: u8 = 0x30;
const SET: u8 = 0x31;
/// id-at-commonName, 2.5.4.3.
const COMMON_NAME: &[u8] = &[0x55, 0x04, 0x03];

/// What messages say about a certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertFacts {
    /// 1, 2 or 3, as people count them (the DER holds 0, 1 or 2).
    pub version: u8,
    /// The issuer's `Name`, as DER (with its SEQUENCE header).
    pub issuer: Vec<u8>,
    /// The subject's `Name`, as DER.
    pub subject: Vec<u8>,
}

impl CertFacts {
    /// Walks a certificate as far as its subject.
    pub fn parse(der: &[u8]) -> Option<CertFacts> {
        let mut input = der;
        let (_, mut certificate, _) = expect(&mut input, SEQUENCE)?;
        let (_, mut tbs, _) = expect(&mut certificate, SEQUENCE)?;
        let (mut tag, mut body, _) = tlv(&mut tbs)?;
        let mut version = 1;
        if tag == VERSION {
            let mut inner = body;
            let (_, number, _) = expect(&mut inner, INTEGER)?;
            version = match number {
                [v @ 0..=2] => v + 1,
                _ => return None,
            };
            (tag, body, _) = tlv(&mut tbs)?;
        }
        let _serial = (tag == INTEGER).then_some(body)?;
        expect(&mut tbs, SEQUENCE)?; // signature algorithm
        let (_, _, issuer) = expect(&mut tbs, SEQUENCE)?;
        expect(&mut tbs, SEQUENCE)?; // validity
        let (_, _, subject) = expect(&mut tbs, SEQUENCE)?;
        Some(CertFacts {
            version,
            issuer: issuer.to_vec(),
            subject: subject.to_vec(),
        })
    }

    /// Issuer and subject are the same name: a self-signed certificate (or
    /// a CA's own, which a server must not present alone).
    pub fn self_issued(&self) -> bool {
        self.issuer == self.subject
    }
}

/// The first common name in a DER `Name` (with its SEQUENCE header).
pub fn common_name(name: &[u8]) -> Option<String> {
    let mut input = name;
    let (_, mut rdns, _) = expect(&mut input, SEQUENCE)?;
    while !rdns.is_empty() {
        let (_, mut set, _) = expect(&mut rdns, SET)?;
        while !set.is_empty() {
            let (_, mut attribute, _) = expect(&mut set, SEQUENCE)?;
            let (_, oid, _) = expect(&mut attribute, OID)?;
            let (tag, value, _) = tlv(&mut attribute)?;
            if oid == COMMON_NAME {
                return text(tag, value);
            }
        }
    }
    None
}

/// A directory string as text: UTF8String, PrintableString, IA5String,
/// TeletexString (taken as Latin-1) or BMPString.
fn text(tag: u8, value: &[u8]) -> Option<String> {
    let s = match tag {
        0x0c | 0x13 | 0x16 => String::from_utf8_lossy(value).into_owned(),
        0x14 => value.iter().map(|&b| char::from(b)).collect(),
        0x1e if value.len().is_multiple_of(2) => {
            let units: Vec<u16> = value
                .chunks_exact(2)
                .map(|c| u16::from_be_bytes([c[0], c[1]]))
                .collect();
            String::from_utf16_lossy(&units)
        }
        _ => return None,
    };
    // A name goes into a log line: no control characters.
    Some(s.chars().filter(|c| !c.is_control()).collect())
}

/// Takes one tag-length-value from the front of `input`: its tag, its
/// contents and the whole element. One-byte tags, definite lengths of up to
/// four bytes: what certificates use.
fn tlv<'a>(input: &mut &'a [u8]) -> Option<(u8, &'a [u8], &'a [u8])> {
    let whole: &'a [u8] = input;
    let [tag, first, rest @ ..] = whole else {
        return None;
    };
    if tag & 0x1f == 0x1f {
        return None;
    }
    let (len, rest) = match *first {
        n @ 0..=0x7f => (usize::from(n), rest),
        n @ 0x81..=0x84 => {
            let n = usize::from(n & 0x7f);
            let (len, rest) = (rest.get(..n)?, rest.get(n..)?);
            (
                len.iter().fold(0usize, |acc, b| acc << 8 | usize::from(*b)),
                rest,
            )
        }
        _ => return None,
    };
    let body = rest.get(..len)?;
    let header = whole.len() - rest.len();
    *input = &rest[len..];
    Some((*tag, body, &whole[..header + len]))
}

/// [`tlv`], `None` unless its tag is `tag`.
fn expect<'a>(input: &mut &'a [u8], tag: u8) -> Option<(u8, &'a [u8], &'a [u8])> {
    tlv(input).filter(|(t, _, _)| *t == tag)
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use rcgen::{CertificateParams, DnType, KeyPair};

    fn cert(cn: &str) -> Vec<u8> {
        let mut params = CertificateParams::default();
        params.distinguished_name.push(DnType::CommonName, cn);
        let key = KeyPair::generate().unwrap();
        params.self_signed(&key).unwrap().der().to_vec()
    }

    #[test]
    fn a_v3_certificate_names_its_issuer_and_subject() {
        let der = cert("broker.hospital.example");
        let facts = CertFacts::parse(&der).unwrap();
        assert_eq!(facts.version, 3);
        assert!(facts.self_issued());
        assert_eq!(
            common_name(&facts.subject).as_deref(),
            Some("broker.hospital.example")
        );
    }

    #[test]
    fn a_v1_certificate_has_no_version_field() {
        // A v1 TBSCertificate starts with the serial: drop the [0] version
        // of a v3 one and fix the lengths (all short forms here).
        let der = cert("x");
        let facts = CertFacts::parse(&der).unwrap();
        assert_eq!(facts.version, 3);
        let v1 = strip_version(&der);
        assert_eq!(CertFacts::parse(&v1).unwrap().version, 1);
    }

    /// Rebuilds `der` without the version field of its TBSCertificate: an
    /// X.509 v1 certificate (its signature no longer matches, which
    /// nothing that refuses v1 gets as far as checking).
    pub(in crate::mqtt::tls) fn strip_version(der: &[u8]) -> Vec<u8> {
        let mut input = der;
        let (_, mut certificate, _) = expect(&mut input, SEQUENCE).unwrap();
        let (_, mut tbs, _) = expect(&mut certificate, SEQUENCE).unwrap();
        let (tag, _, _) = tlv(&mut tbs).unwrap();
        assert_eq!(tag, VERSION);
        let tbs = wrap(SEQUENCE, tbs);
        wrap(SEQUENCE, &[tbs.as_slice(), certificate].concat())
    }

    fn wrap(tag: u8, body: &[u8]) -> Vec<u8> {
        let mut out = vec![tag];
        match body.len() {
            n @ 0..=0x7f => out.push(n as u8),
            n @ 0x80..=0xff => out.extend([0x81, n as u8]),
            n => out.extend([0x82, (n >> 8) as u8, n as u8]),
        }
        out.extend_from_slice(body);
        out
    }

    #[test]
    fn every_cut_of_a_certificate_is_none_or_facts_never_a_panic() {
        let der = cert("cut");
        for n in 0..der.len() {
            let _ = CertFacts::parse(&der[..n]);
        }
        for i in 0..der.len() {
            for byte in [0x00, 0x80, 0x84, 0xff] {
                let mut bad = der.clone();
                bad[i] = byte;
                if let Some(f) = CertFacts::parse(&bad) {
                    let _ = common_name(&f.issuer);
                }
            }
        }
    }

    #[test]
    fn names_decode_the_usual_string_types_and_drop_control_characters() {
        assert_eq!(text(0x13, b"Broker 1"), Some("Broker 1".into()));
        assert_eq!(
            text(0x0c, "Klinik Süd\n".as_bytes()),
            Some("Klinik Süd".into())
        );
        assert_eq!(text(0x14, &[0x53, 0xfc, 0x64]), Some("Süd".into()));
        assert_eq!(text(0x1e, &[0, 0x41, 0, 0x42]), Some("AB".into()));
        assert_eq!(text(0x1e, &[0, 0x41, 0]), None);
        assert_eq!(text(0x04, b"x"), None);
        assert_eq!(common_name(&[0x30, 0x00]), None);
    }
}
