//! Signed access tokens: runtime tokens (the data plane; their subject is the sandbox ID)
//! and preview and proxy tokens (one port of one sandbox; see `preview::subject`).
//!
//! Format: `<subject>.<epoch>.<expiry>.<mac>`, the MAC an HMAC-SHA256 with a per-host
//! secret over `<subject>.<epoch>.<expiry>`. Signature, expiry and subject are checked
//! without state ([`TokenSigner::verify`]); they expire; one sandbox's token never opens
//! another.
//!
//! Revocation by epoch: a sandbox's record keeps the current epoch of its runtime tokens
//! ([`runtime_epoch`]) and of each port's preview and proxy tokens ([`preview_epoch`]).
//! A token issued in any other epoch is refused ([`TokenError::Revoked`]): `connect`
//! moves the runtime epoch on, so the token it issues ends the older ones; making a port
//! private moves that port's, which ends its preview URLs and proxy targets. The record
//! is read where the token is checked (the edge and the preview listener read it on
//! every request anyway), so an epoch written there takes effect on the next request.
//!
//! Epochs are not counted from 0 but move to at least the current time in milliseconds
//! ([`next_epoch`]), and one never moved stands at the record's creation time. So a
//! record made later under the same sandbox ID (a hibernated sandbox adopted back from
//! the store) never shares an epoch with the tokens of the record it replaces.
//!
//! Tokens of the format before epochs (`<subject>.<expiry>.<mac>`) are refused with
//! [`TokenError::OldFormat`]: they lived an hour at most, and `connect` (or a new preview
//! URL) gives one of the current format.

use crate::model::SandboxRecord;
use base64::Engine;
use hmac::{Hmac, Mac};
use sha2::Sha256;

/// How long a runtime token is valid.
pub const TOKEN_TTL_S: i64 = 3600;

/// Why a token was refused.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    /// Malformed, forged, or expired: 401.
    #[error("{0}")]
    Invalid(&'static str),
    /// Of the format before epochs (no epoch in it): 401.
    #[error("token of an older format, without an epoch")]
    OldFormat,
    /// Genuine, but of an epoch that is not the current one: a newer token replaced it,
    /// or its port was made private since. 401.
    #[error("token replaced by a newer one, or revoked")]
    Revoked,
    /// Valid, but for another sandbox (or port, or kind): 403.
    #[error("token for another sandbox")]
    OtherSandbox,
}

/// Signs and checks tokens.
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

    /// A token for `subject`, issued in `epoch`, valid until `expires_unix` (seconds).
    pub fn issue(&self, subject: &str, epoch: u64, expires_unix: i64) -> String {
        let payload = format!("{subject}.{epoch}.{expires_unix}");
        format!("{payload}.{}", self.mac(&payload))
    }

    /// Checks the signature, expiry and subject of `token` at `now_unix`, and returns the
    /// epoch it was issued in: whether that epoch is still current is the caller's to
    /// say (see [`TokenSigner::check`]), once it has read the sandbox's record.
    pub fn verify(&self, token: &str, subject: &str, now_unix: i64) -> Result<u64, TokenError> {
        // From the right: the subject is whatever is left.
        let fields: Vec<&str> = token.rsplitn(4, '.').collect();
        let (mac, expiry, epoch, id) = match fields[..] {
            [mac, expiry, epoch, id] => (mac, expiry, epoch, id),
            [_, _, _] => return Err(TokenError::OldFormat),
            _ => return Err(TokenError::Invalid("malformed token")),
        };
        let want = self.mac(&format!("{id}.{epoch}.{expiry}"));
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
        let (Ok(epoch), Ok(expiry)) = (epoch.parse::<u64>(), expiry.parse::<i64>()) else {
            return Err(TokenError::Invalid("malformed token"));
        };
        if expiry <= now_unix {
            return Err(TokenError::Invalid("token expired"));
        }
        if id != subject {
            return Err(TokenError::OtherSandbox);
        }
        Ok(epoch)
    }

    /// Checks `token` for `subject` at `now_unix`, issued in the `current` epoch.
    pub fn check(
        &self,
        token: &str,
        subject: &str,
        current: u64,
        now_unix: i64,
    ) -> Result<(), TokenError> {
        match self.verify(token, subject, now_unix)? {
            epoch if epoch == current => Ok(()),
            _ => Err(TokenError::Revoked),
        }
    }
}

/// The epoch a record that never moved one stands at: its creation time (ms).
fn created_epoch(r: &SandboxRecord) -> u64 {
    u64::try_from(r.created_at_ms).unwrap_or(0)
}

/// The epoch `r`'s runtime tokens are issued in and checked against.
pub fn runtime_epoch(r: &SandboxRecord) -> u64 {
    r.runtime_token_epoch.max(created_epoch(r))
}

/// The epoch the preview and proxy tokens of `port` of `r` are issued in and checked
/// against.
pub fn preview_epoch(r: &SandboxRecord, port: u16) -> u64 {
    r.preview_token_epochs
        .get(&port)
        .copied()
        .unwrap_or(0)
        .max(created_epoch(r))
}

/// The epoch after `current` at `now_ms`: later than it, and no earlier than now, so that
/// no epoch of an earlier record under the same ID comes back.
pub fn next_epoch(current: u64, now_ms: i64) -> u64 {
    current
        .saturating_add(1)
        .max(u64::try_from(now_ms).unwrap_or(0))
}

/// Moves `r`'s runtime epoch on (ending the runtime tokens issued so far) and returns the
/// new one. The caller writes `r` before it hands out a token of the new epoch.
pub fn bump_runtime_epoch(r: &mut SandboxRecord, now_ms: i64) -> u64 {
    r.runtime_token_epoch = next_epoch(runtime_epoch(r), now_ms);
    r.runtime_token_epoch
}

/// Moves the preview epoch of `port` of `r` on (ending the preview and proxy tokens
/// issued for it so far) and returns the new one. The caller writes `r`.
pub fn bump_preview_epoch(r: &mut SandboxRecord, port: u16, now_ms: i64) -> u64 {
    let epoch = next_epoch(preview_epoch(r, port), now_ms);
    r.preview_token_epochs.insert(port, epoch);
    epoch
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Resources;

    fn record(created_at_ms: i64) -> SandboxRecord {
        let mut r = SandboxRecord::fresh("team", "base".into(), Resources::default(), 60, 0);
        r.created_at_ms = created_at_ms;
        r
    }

    #[test]
    fn tokens_open_only_their_sandbox_until_they_expire() {
        let s = TokenSigner::new(b"secret".to_vec());
        let t = s.issue("sbx-a", 7, 1000);
        assert_eq!(s.verify(&t, "sbx-a", 999), Ok(7));
        assert_eq!(s.check(&t, "sbx-a", 7, 999), Ok(()));
        assert_eq!(s.check(&t, "sbx-b", 7, 999), Err(TokenError::OtherSandbox));
        assert!(matches!(
            s.check(&t, "sbx-a", 7, 1000),
            Err(TokenError::Invalid(_))
        ));
        let forged = t.replace("1000", "9999");
        assert!(matches!(
            s.check(&forged, "sbx-a", 7, 999),
            Err(TokenError::Invalid(_))
        ));
        let other_host = TokenSigner::new(b"other".to_vec());
        assert!(matches!(
            other_host.check(&t, "sbx-a", 7, 999),
            Err(TokenError::Invalid(_))
        ));
        for garbage in ["", "x", "a.b", "a..b.c.d", "sbx-a.x.1000.mac"] {
            assert!(
                matches!(s.verify(garbage, "sbx-a", 999), Err(TokenError::Invalid(_))),
                "{garbage:?}"
            );
        }
    }

    #[test]
    fn a_token_of_an_older_epoch_is_refused() {
        let s = TokenSigner::new(b"secret".to_vec());
        let old = s.issue("sbx-a", 7, 1000);
        let new = s.issue("sbx-a", 8, 1000);
        assert_eq!(s.check(&old, "sbx-a", 8, 999), Err(TokenError::Revoked));
        assert_eq!(s.check(&new, "sbx-a", 8, 999), Ok(()));
        // An expired or foreign token says so, whatever its epoch.
        assert!(matches!(
            s.check(&old, "sbx-a", 8, 1000),
            Err(TokenError::Invalid(_))
        ));
        assert_eq!(
            s.check(&old, "sbx-b", 8, 999),
            Err(TokenError::OtherSandbox)
        );
    }

    #[test]
    fn a_forged_epoch_is_refused() {
        let s = TokenSigner::new(b"secret".to_vec());
        let old = s.issue("sbx-a", 7, 1000);
        // The old token with the current epoch written in: its MAC no longer fits.
        let forged = old.replacen(".7.", ".8.", 1);
        assert_ne!(forged, old);
        assert_eq!(
            s.check(&forged, "sbx-a", 8, 999),
            Err(TokenError::Invalid("token signature is invalid"))
        );
    }

    #[test]
    fn tokens_without_an_epoch_are_refused_as_an_older_format() {
        let s = TokenSigner::new(b"secret".to_vec());
        // What `issue` made before epochs: `<sandbox>.<expiry>.<mac>`.
        let old = format!("sbx-a.1000.{}", s.mac("sbx-a.1000"));
        assert_eq!(s.verify(&old, "sbx-a", 999), Err(TokenError::OldFormat));
    }

    #[test]
    fn epochs_move_forward_and_never_come_back_under_a_new_record() {
        let now = 1_700_000_000_000;
        let mut r = record(now);
        // Never moved: the creation time; a port never made private likewise.
        assert_eq!(runtime_epoch(&r), now as u64);
        assert_eq!(preview_epoch(&r, 8000), now as u64);
        // Within the same millisecond, still later.
        let first = bump_runtime_epoch(&mut r, now);
        assert_eq!(first, now as u64 + 1);
        assert_eq!(runtime_epoch(&r), first);
        let second = bump_runtime_epoch(&mut r, now + 5000);
        assert_eq!(second, now as u64 + 5000);
        // One port's move leaves the other ports and the runtime epoch alone.
        let port = bump_preview_epoch(&mut r, 8000, now + 6000);
        assert_eq!(preview_epoch(&r, 8000), port);
        assert_eq!(preview_epoch(&r, 9000), now as u64);
        assert_eq!(runtime_epoch(&r), second);
        // A record made later under the same ID starts past every epoch of this one.
        let later = record(now + 10_000);
        assert!(runtime_epoch(&later) > second);
        assert!(preview_epoch(&later, 8000) > port);
        // A record from before epochs (no field: 0) loads at its creation time.
        let mut json = serde_json::to_value(record(now)).unwrap();
        let fields = json.as_object_mut().unwrap();
        fields.remove("runtime_token_epoch");
        fields.remove("preview_token_epochs");
        let old: SandboxRecord = serde_json::from_value(json).unwrap();
        assert_eq!(runtime_epoch(&old), now as u64);
    }
}
