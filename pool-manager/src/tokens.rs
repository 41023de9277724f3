//! Runtime access tokens: `<sandbox>.<expiry>.<mac>`, HMAC-SHA256 with a per-host secret.
//! Stateless to check; they expire; one sandbox's token never opens another.

use base64::Engine;
use hmac::{Hmac, Mac};
use sha2::Sha256;

/// How long a runtime token is valid.
pub const TOKEN_TTL_S: i64 = 3600;

/// Why a token was refused.
#[derive(Debug, PartialEq, Eq)]
pub enum TokenError {
    /// Malformed, forged, or expired: 401.
    Invalid(&'static str),
    /// Valid, but for another sandbox: 403.
    OtherSandbox,
}

/// Signs and checks runtime tokens.
#[derive(Clone)]
pub struct TokenSigner {
    secret: Vec<u8>,
}

impl TokenSigner {
    /// A signer with `secret`.
    pub fn new(secret: Vec<u8>) -> Self {
        Self { secret }
    }

    fn mac(&self, payload: &str) -> String {
        let mut mac = Hmac::<Sha256>::new_from_slice(&self.secret).expect("any key length");
        mac.update(payload.as_bytes());
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(mac.finalize().into_bytes())
    }

    /// A token for `sandbox` valid until `expires_unix` (seconds).
    pub fn issue(&self, sandbox: &str, expires_unix: i64) -> String {
        let payload = format!("{sandbox}.{expires_unix}");
        format!("{payload}.{}", self.mac(&payload))
    }

    /// Checks `token` for `sandbox` at `now_unix`.
    pub fn check(&self, token: &str, sandbox: &str, now_unix: i64) -> Result<(), TokenError> {
        let mut parts = token.rsplitn(3, '.');
        let (Some(mac), Some(expiry), Some(id)) = (parts.next(), parts.next(), parts.next()) else {
            return Err(TokenError::Invalid("malformed token"));
        };
        let payload = format!("{id}.{expiry}");
        let want = self.mac(&payload);
        // Constant-time comparison of the MACs.
        if want.len() != mac.len()
            || want
                .bytes()
                .zip(mac.bytes())
                .fold(0u8, |acc, (a, b)| acc | (a ^ b))
                != 0
        {
            return Err(TokenError::Invalid("token signature is invalid"));
        }
        let expiry: i64 = expiry
            .parse()
            .map_err(|_| TokenError::Invalid("malformed token"))?;
        if expiry <= now_unix {
            return Err(TokenError::Invalid("token expired"));
        }
        if id != sandbox {
            return Err(TokenError::OtherSandbox);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_open_only_their_sandbox_until_they_expire() {
        let s = TokenSigner::new(b"secret".to_vec());
        let t = s.issue("sbx-a", 1000);
        assert_eq!(s.check(&t, "sbx-a", 999), Ok(()));
        assert_eq!(s.check(&t, "sbx-b", 999), Err(TokenError::OtherSandbox));
        assert!(matches!(
            s.check(&t, "sbx-a", 1000),
            Err(TokenError::Invalid(_))
        ));
        let forged = t.replace("1000", "9999");
        assert!(matches!(
            s.check(&forged, "sbx-a", 999),
            Err(TokenError::Invalid(_))
        ));
        let other_host = TokenSigner::new(b"other".to_vec());
        assert!(matches!(
            other_host.check(&t, "sbx-a", 999),
            Err(TokenError::Invalid(_))
        ));
    }
}
