//! The user controls their data: what an erasure (`DELETE /api/me`) decides and writes in
//! place of personal data, and the name of the export (`GET /api/me/export`).
//!
//! The Worker runs the erasure (its cancellations and its one batch); everything it
//! decides without I/O is here: who may erase, what stands in for the email, the
//! password hash and a verified number, and which login counters name the account.
//! Nothing here reads a clock or touches storage.

use sha2::{Digest as _, Sha256};

use crate::calls::CallStatus;
use crate::limits::{
    LOGIN_FAILURES_PER_ACCOUNT, LOGIN_FAILURES_PER_ACCOUNT_IP, LOGIN_SLOWED_ACCOUNT,
};

/// The file name a client saves the export under.
pub const EXPORT_FILENAME: &str = "callmeback-export.json";

/// The password hash of an erased account: not in the stored hash format, so no
/// password ever verifies against it.
pub const ERASED_PASSWORD_HASH: &str = "!erased";

/// Prefix of a verified number kept only as its digest. An E.164 number starts with
/// `+`, so a digest can never be mistaken for (or collide with) a number in clear.
pub const PHONE_DIGEST_PREFIX: &str = "sha256:";

/// Why an account may not be erased now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErasureRefusal {
    /// Admins are demoted by an operator first (`cargo xtask admin revoke`): an erasure
    /// must never remove the last person able to run the service.
    Admin,
    /// A call is dialling, ringing or live: it would write its record under the erasure.
    CallInProgress,
}

impl ErasureRefusal {
    pub fn status(self) -> u16 {
        match self {
            ErasureRefusal::Admin => 403,
            ErasureRefusal::CallInProgress => 409,
        }
    }

    pub fn code(self) -> &'static str {
        match self {
            ErasureRefusal::Admin => "admin_cannot_erase",
            ErasureRefusal::CallInProgress => "call_in_progress",
        }
    }

    pub fn message(self) -> &'static str {
        match self {
            ErasureRefusal::Admin => {
                "An admin account cannot erase itself; an operator must revoke the admin role first."
            }
            ErasureRefusal::CallInProgress => {
                "A call of yours is in progress; erase your account once it has ended."
            }
        }
    }
}

/// A call that blocks an erasure: one Twilio may be dialling or connected (the statuses
/// of the one-live-call-per-user index). Scheduled calls do not block: the erasure
/// cancels them first.
pub fn blocks_erasure(status: CallStatus) -> bool {
    matches!(
        status,
        CallStatus::Queued | CallStatus::Ringing | CallStatus::InProgress
    )
}

/// Whether an account may be erased now, given its role and the statuses of its calls
/// that are not over yet. An admin is refused before anything else.
pub fn may_erase(
    is_admin: bool,
    unfinished: impl IntoIterator<Item = CallStatus>,
) -> Result<(), ErasureRefusal> {
    if is_admin {
        return Err(ErasureRefusal::Admin);
    }
    if unfinished.into_iter().any(blocks_erasure) {
        return Err(ErasureRefusal::CallInProgress);
    }
    Ok(())
}

/// The email an erased account keeps: unique per account (the column is), never
/// deliverable (`.invalid` is reserved, RFC 2606), and it frees the old address for a
/// new registration.
pub fn erased_email(user_id: &str) -> String {
    format!("erased-{user_id}@erased.invalid")
}

/// What `verified_phones` keeps of an erased account's number: its SHA-256, so the free
/// credits are still granted once per number ever, without the number in clear.
///
/// This is pseudonymisation, not anonymity: the space of phone numbers is small enough
/// to be searched, so the digest still proves "this number once verified" to whoever
/// holds the table — which is exactly the fraud check it serves.
pub fn phone_digest(e164: &str) -> String {
    let digest = Sha256::digest(e164.as_bytes());
    format!("{PHONE_DIGEST_PREFIX}{}", hex::encode(digest))
}

/// The rate-limit keys that name an account by its email, for the erasure to drop:
/// exact keys, and the prefix of the per-account-and-IP keys (`<email>|<ip>`).
pub fn login_counter_keys(email: &str) -> (Vec<String>, String) {
    let exact = [LOGIN_FAILURES_PER_ACCOUNT, LOGIN_SLOWED_ACCOUNT]
        .iter()
        .map(|l| format!("{}:{email}", l.name))
        .collect();
    let pair_prefix = format!("{}:{email}|", LOGIN_FAILURES_PER_ACCOUNT_IP.name);
    (exact, pair_prefix)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Admins are refused first, whatever their calls; then any call Twilio may be
    /// dialling or connected; scheduled and finished calls never block.
    #[test]
    fn who_may_erase() {
        assert_eq!(may_erase(true, []), Err(ErasureRefusal::Admin));
        assert_eq!(
            may_erase(true, [CallStatus::InProgress]),
            Err(ErasureRefusal::Admin)
        );
        assert_eq!(may_erase(false, []), Ok(()));
        assert_eq!(
            may_erase(false, [CallStatus::Scheduled, CallStatus::Scheduled]),
            Ok(())
        );
        for live in [
            CallStatus::Queued,
            CallStatus::Ringing,
            CallStatus::InProgress,
        ] {
            assert_eq!(
                may_erase(false, [CallStatus::Scheduled, live]),
                Err(ErasureRefusal::CallInProgress),
                "{live}"
            );
        }
        for status in CallStatus::ALL {
            if status.is_final() {
                assert!(!blocks_erasure(status), "{status}");
            }
        }
    }

    /// The refusals answer with the API's status and stable code.
    #[test]
    fn refusals_map_to_api_errors() {
        assert_eq!(ErasureRefusal::Admin.status(), 403);
        assert_eq!(ErasureRefusal::Admin.code(), "admin_cannot_erase");
        assert_eq!(ErasureRefusal::CallInProgress.status(), 409);
        assert_eq!(ErasureRefusal::CallInProgress.code(), "call_in_progress");
    }

    /// The tombstone is per account and undeliverable; the erased hash is not in the
    /// stored format, so no password verifies against it.
    #[test]
    fn tombstones() {
        assert_eq!(erased_email("u-1"), "erased-u-1@erased.invalid");
        assert_ne!(erased_email("a"), erased_email("b"));
        assert!(crate::password::PasswordHash::parse(ERASED_PASSWORD_HASH).is_err());
    }

    /// SHA-256 of the number as stored (E.164), hex, behind a prefix no number has.
    #[test]
    fn phone_digest_is_sha256_of_the_number() {
        assert_eq!(
            phone_digest("+15551234567"),
            "sha256:8a59780bb8cd2ba022bfa5ba2ea3b6e07af17a7d8b30c1f9b3390e36f69019e4"
        );
        assert_ne!(phone_digest("+15551234567"), phone_digest("+15551234568"));
        assert!(!phone_digest("+15551234567").starts_with('+'));
    }

    /// The keys are the login limits' own names over the normalised email.
    #[test]
    fn login_counters_of_an_email() {
        let (exact, prefix) = login_counter_keys("a@example.com");
        assert_eq!(
            exact,
            ["login:email:a@example.com", "login:slow:a@example.com"]
        );
        assert_eq!(prefix, "login:pair:a@example.com|");
    }
}
