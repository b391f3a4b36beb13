//! The few fields NovaCron reads from its own X.509 certificates (validity,
//! subject common name), walked from the DER by hand: rustls and webpki do
//! not expose them, and a full X.509 parser would be a large tree for three
//! fields of certificates we issued ourselves.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

#[derive(Debug, thiserror::Error)]
#[error("Malformed certificate: {0}")]
pub struct DerError(&'static str);

/// One DER element: its tag, its contents, and what follows it.
fn element(input: &[u8]) -> Result<(u8, &[u8], &[u8]), DerError> {
    let (&tag, rest) = input.split_first().ok_or(DerError("truncated"))?;
    let (&first, rest) = rest.split_first().ok_or(DerError("truncated length"))?;
    let (len, rest) = if first < 0x80 {
        (first as usize, rest)
    } else {
        let n = (first & 0x7f) as usize;
        if n == 0 || n > 4 || rest.len() < n {
            return Err(DerError("bad length"));
        }
        let len = rest[..n].iter().fold(0usize, |acc, b| (acc << 8) | *b as usize);
        (len, &rest[n..])
    };
    if rest.len() < len {
        return Err(DerError("element longer than its container"));
    }
    Ok((tag, &rest[..len], &rest[len..]))
}

fn expect<'a>(input: &'a [u8], tag: u8, what: &'static str) -> Result<(&'a [u8], &'a [u8]), DerError> {
    match element(input)? {
        (t, body, rest) if t == tag => Ok((body, rest)),
        _ => Err(DerError(what)),
    }
}

const SEQUENCE: u8 = 0x30;
const SET: u8 = 0x31;
const OID: u8 = 0x06;
const UTC_TIME: u8 = 0x17;
const GENERALIZED_TIME: u8 = 0x18;
const EXPLICIT_VERSION: u8 = 0xa0;
/// id-at-commonName, 2.5.4.3.
const COMMON_NAME: [u8; 3] = [0x55, 0x04, 0x03];

/// The TBSCertificate fields from `validity` on.
fn after_issuer(der: &[u8]) -> Result<&[u8], DerError> {
    let (cert, _) = expect(der, SEQUENCE, "not a certificate")?;
    let (tbs, _) = expect(cert, SEQUENCE, "no TBSCertificate")?;
    let mut rest = tbs;
    if rest.first() == Some(&EXPLICIT_VERSION) {
        rest = element(rest)?.2;
    }
    // serialNumber, signature algorithm, issuer.
    for _ in 0..3 {
        rest = element(rest)?.2;
    }
    Ok(rest)
}

/// When a certificate becomes valid and when it expires.
pub fn validity(der: &[u8]) -> Result<(SystemTime, SystemTime), DerError> {
    let (validity, _) = expect(after_issuer(der)?, SEQUENCE, "no validity")?;
    let (tag, not_before, rest) = element(validity)?;
    let not_before = time(tag, not_before)?;
    let (tag, not_after, _) = element(rest)?;
    Ok((not_before, time(tag, not_after)?))
}

/// The subject's common name.
pub fn subject_common_name(der: &[u8]) -> Result<String, DerError> {
    let (_, rest) = expect(after_issuer(der)?, SEQUENCE, "no validity")?;
    let (mut subject, _) = expect(rest, SEQUENCE, "no subject")?;
    while !subject.is_empty() {
        let (set, next) = expect(subject, SET, "bad name")?;
        subject = next;
        let (attribute, _) = expect(set, SEQUENCE, "bad attribute")?;
        let (oid, value) = expect(attribute, OID, "bad attribute type")?;
        if oid == COMMON_NAME {
            let (_, text, _) = element(value)?;
            return String::from_utf8(text.to_vec()).map_err(|_| DerError("common name is not UTF-8"));
        }
    }
    Err(DerError("no common name"))
}

/// UTCTime `YYMMDDHHMMSSZ` or GeneralizedTime `YYYYMMDDHHMMSSZ`.
fn time(tag: u8, body: &[u8]) -> Result<SystemTime, DerError> {
    let text = std::str::from_utf8(body).map_err(|_| DerError("time is not ASCII"))?;
    let digits = text.strip_suffix('Z').ok_or(DerError("time is not UTC"))?;
    let (year, rest) = match (tag, digits.len()) {
        (UTC_TIME, 12) => {
            let yy: i64 = digits[..2].parse().map_err(|_| DerError("bad year"))?;
            // RFC 5280: 50-99 are 19xx, 00-49 are 20xx.
            (if yy >= 50 { 1900 + yy } else { 2000 + yy }, &digits[2..])
        }
        (GENERALIZED_TIME, 14) => (digits[..4].parse().map_err(|_| DerError("bad year"))?, &digits[4..]),
        _ => return Err(DerError("bad time")),
    };
    let field = |i: usize| -> Result<i64, DerError> { rest[i..i + 2].parse().map_err(|_| DerError("bad time field")) };
    let (month, day, hour, minute, second) = (field(0)?, field(2)?, field(4)?, field(6)?, field(8)?);
    if !(1..=12).contains(&month) || !(1..=31).contains(&day) || hour > 23 || minute > 59 || second > 60 {
        return Err(DerError("time out of range"));
    }
    let days = days_from_civil(year, month, day);
    let secs = days * 86_400 + hour * 3_600 + minute * 60 + second;
    let secs = u64::try_from(secs).map_err(|_| DerError("time before 1970"))?;
    Ok(UNIX_EPOCH + Duration::from_secs(secs))
}

/// Days since 1970-01-01 of a proleptic Gregorian date (H. Hinnant's algorithm).
fn days_from_civil(year: i64, month: i64, day: i64) -> i64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (month + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_in_both_encodings() {
        let at = |tag, s: &str| time(tag, s.as_bytes()).map(|t| t.duration_since(UNIX_EPOCH).unwrap().as_secs());
        assert_eq!(at(UTC_TIME, "700101000000Z").unwrap(), 0);
        assert_eq!(at(UTC_TIME, "261203094000Z").unwrap(), 1_796_290_800);
        assert_eq!(at(GENERALIZED_TIME, "20261203094000Z").unwrap(), 1_796_290_800);
        assert_eq!(at(GENERALIZED_TIME, "40960101000000Z").unwrap(), 67_090_118_400);
        assert!(at(UTC_TIME, "261303094000Z").is_err());
        assert!(at(UTC_TIME, "2612030940Z").is_err());
        assert!(at(UTC_TIME, "261203094000+0100").is_err());
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        for bad in [
            &b""[..],
            b"\x30",
            b"\x30\x85\x00\x00\x00\x00\x00",
            b"\x30\x02\x30\x10",
            b"\x04\x00",
        ] {
            assert!(validity(bad).is_err());
            assert!(subject_common_name(bad).is_err());
        }
    }
}
