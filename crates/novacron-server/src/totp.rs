//! TOTP second factor (RFC 6238: HMAC-SHA1, 30 s steps, 6 digits), as
//! authenticator apps implement it. The algorithm is `totp-rs`'s; this module
//! only fixes the parameters and keeps secrets as base32 text.

use totp_rs::{Algorithm, Secret, TOTP};

const STEP_S: u64 = 30;
const DIGITS: usize = 6;
/// Steps accepted either side of the current one (clock skew).
const SKEW_STEPS: u8 = 1;

/// A new random 160-bit secret, base32 without padding.
pub fn new_secret() -> Result<String, std::io::Error> {
    let mut key = [0u8; 20];
    crate::auth::random_bytes(&mut key)?;
    Ok(Secret::Raw(key.to_vec()).to_encoded().to_string())
}

fn totp(secret: &str) -> Option<TOTP> {
    let key = Secret::Encoded(secret.to_string()).to_bytes().ok()?;
    // Unchecked: accept any key length, as the stored secrets were accepted before.
    Some(TOTP::new_unchecked(Algorithm::SHA1, DIGITS, SKEW_STEPS, STEP_S, key))
}

/// The code for `secret` at Unix time `now`.
pub fn code(secret: &str, now: i64) -> Option<String> {
    Some(totp(secret)?.generate(u64::try_from(now).ok()?))
}

/// Accepts the current code and the ones a step before and after (clock skew).
/// `totp-rs` compares the codes in constant time.
pub fn verify(secret: &str, given: &str, now: i64) -> bool {
    let (Some(totp), Ok(now)) = (totp(secret), u64::try_from(now)) else {
        return false;
    };
    // Before the first step there is no step before to skew back to.
    now >= STEP_S && totp.check(given.trim(), now)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// RFC 6238 appendix B vectors (SHA-1 key "12345678901234567890"), last 6 digits.
    #[test]
    fn rfc6238_vectors() {
        let secret = Secret::Raw(b"12345678901234567890".to_vec()).to_encoded().to_string();
        assert_eq!(secret, "GEZDGNBVGY3TQOJQGEZDGNBVGY3TQOJQ");
        for (t, want) in [
            (59, "287082"),
            (1111111109, "081804"),
            (1111111111, "050471"),
            (1234567890, "005924"),
            (2000000000, "279037"),
        ] {
            assert_eq!(code(&secret, t).as_deref(), Some(want), "t={t}");
        }
        assert!(verify(&secret, "287082", 59 + 30));
        assert!(verify(&secret, " 287082\n", 59));
        assert!(!verify(&secret, "287082", 59 + 95));
        assert!(!verify(&secret, "287083", 59));
        assert!(!verify(&secret, "28708", 59));
        assert!(code("not base32!", 0).is_none());
        assert!(!verify("not base32!", "287082", 59));
    }

    #[test]
    fn new_secrets_are_160_bit_base32() {
        let s = new_secret().unwrap();
        assert_eq!(s.len(), 32);
        assert_eq!(Secret::Encoded(s).to_bytes().unwrap().len(), 20);
    }
}
