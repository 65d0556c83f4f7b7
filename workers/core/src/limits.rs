//! The numbers that bound what one account or one network may do, and the fixed windows
//! they are counted in. The Worker keeps the counts (D1/Postgres rows, one upsert per
//! hit); what a count means is decided here, with explicit time.
//!
//! Logins, so that a stranger cannot lock the owner out:
//! - per client IP: 50 failed logins per 15 minutes, then that IP waits;
//! - per account and IP: 10 failures per 15 minutes, then that IP waits for that
//!   account (the others, and the owner elsewhere, are untouched);
//! - per account, from anywhere: after 10 failures in 15 minutes the account is *slowed
//!   down*, never locked: one attempt per 30-second window from any address the owner
//!   has not signed in from last. The owner's own last address is never slowed.
//!
//! Unknown emails are counted exactly like real ones (by the normalised address), so
//! the answers and their timing do not say whether an account exists.

use crate::model::Tier;

/// One fixed-window limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateLimit {
    /// Key prefix, e.g. `login:ip`.
    pub name: &'static str,
    pub limit: i64,
    pub window_secs: i64,
}

const MINUTE: i64 = 60;
const HOUR: i64 = 3600;
pub const DAY_SECS: i64 = 24 * HOUR;

pub const LOGIN_FAILURES_PER_IP: RateLimit = RateLimit {
    name: "login:ip",
    limit: 50,
    window_secs: 15 * MINUTE,
};
pub const LOGIN_FAILURES_PER_ACCOUNT_IP: RateLimit = RateLimit {
    name: "login:pair",
    limit: 10,
    window_secs: 15 * MINUTE,
};
/// Failures on one account, from anywhere, before it is slowed down. Counted, never
/// refused by itself.
pub const LOGIN_FAILURES_PER_ACCOUNT: RateLimit = RateLimit {
    name: "login:email",
    limit: 10,
    window_secs: 15 * MINUTE,
};
/// A slowed-down account takes one attempt per window from unfamiliar addresses.
pub const LOGIN_SLOWED_ACCOUNT: RateLimit = RateLimit {
    name: "login:slow",
    limit: 1,
    window_secs: 30,
};

/// Registrations per client IP: generous for shared networks, a wall for scripts.
pub const REGISTRATIONS_PER_IP: RateLimit = RateLimit {
    name: "register:ip",
    limit: 50,
    window_secs: HOUR,
};

/// SMS verifications started per account and per client IP: each costs us an SMS, and
/// each newly verified number is worth the free credits.
pub const VERIFICATIONS_PER_ACCOUNT: RateLimit = RateLimit {
    name: "verify:user",
    limit: 5,
    window_secs: HOUR,
};
pub const VERIFICATIONS_PER_IP: RateLimit = RateLimit {
    name: "verify:ip",
    limit: 50,
    window_secs: HOUR,
};

/// Whether a login attempt must also take the slowed-down account's one slot: the
/// account has failed more than its free allowance in this window and the attempt does
/// not come from the address its owner last signed in from.
pub fn login_slowed(account_failures: i64, from_owners_last_ip: bool) -> bool {
    account_failures > LOGIN_FAILURES_PER_ACCOUNT.limit && !from_owners_last_ip
}

/// Calls a user may place per UTC day, triggered or scheduled, by tier.
pub fn calls_per_day(tier: Tier) -> i64 {
    match tier {
        Tier::Premium => 50,
        Tier::Basic => 10,
        Tier::Free => 3,
    }
}

/// Scheduled calls a user may have pending at once, by tier.
pub fn pending_scheduled(tier: Tier) -> i64 {
    match tier {
        Tier::Premium => 20,
        Tier::Basic => 10,
        Tier::Free => 5,
    }
}

/// Custom personas one user may own.
pub const CUSTOM_PERSONAS_PER_USER: i64 = 20;

/// The fixed window containing `now`: its start and the seconds until it ends (≥ 1).
pub fn window(now_secs: i64, window_secs: i64) -> (i64, i64) {
    let start = now_secs - now_secs.rem_euclid(window_secs);
    (start, (start + window_secs - now_secs).max(1))
}

/// The UTC day of `now` (`YYYY-MM-DD`) and the seconds until the next one starts.
pub fn utc_day(now_secs: i64) -> (String, i64) {
    let (start, retry_after) = window(now_secs, DAY_SECS);
    let day = time::OffsetDateTime::from_unix_timestamp(start)
        .map(|t| t.date().to_string())
        .unwrap_or_else(|_| "1970-01-01".into());
    (day, retry_after)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_are_fixed_and_retry_after_is_positive() {
        assert_eq!(window(900, 900), (900, 900));
        assert_eq!(window(1799, 900), (900, 1));
        assert_eq!(window(1000, 900), (900, 800));
        assert_eq!(window(-1, 60), (-60, 1));
    }

    #[test]
    fn utc_days() {
        // 2026-12-02T23:59:59Z and the next second.
        assert_eq!(utc_day(1_796_255_999), ("2026-12-02".into(), 1));
        assert_eq!(utc_day(1_796_256_000), ("2026-12-03".into(), DAY_SECS));
    }

    /// The owner's own address is never slowed; a stranger's is only past the account's
    /// free allowance.
    #[test]
    fn slow_down_spares_the_owner() {
        let free = LOGIN_FAILURES_PER_ACCOUNT.limit;
        assert!(!login_slowed(free, false));
        assert!(login_slowed(free + 1, false));
        assert!(!login_slowed(free + 100, true));
    }

    #[test]
    fn tiers() {
        assert_eq!(
            [Tier::Free, Tier::Basic, Tier::Premium].map(calls_per_day),
            [3, 10, 50]
        );
        assert_eq!(
            [Tier::Free, Tier::Basic, Tier::Premium].map(pending_scheduled),
            [5, 10, 20]
        );
    }
}
