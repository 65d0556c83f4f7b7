//! The stored vocabularies: every text column whose values are a closed set (a `CHECK
//! (col IN (...))` in the migrations) has its enum here, so the Worker compares and
//! writes variants, never strings. Each parses from and serializes to the stored name.
//!
//! [`Role`](crate::jwt::Role) and [`CallStatus`](crate::calls::CallStatus) live with the
//! rules that use them; the test below checks all of them against the migrations.

use std::fmt;
use std::str::FromStr;

/// A stored name that is not one of the enum's.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown {what} {value:?}")]
pub struct UnknownName {
    pub what: &'static str,
    pub value: String,
}

/// Declares a closed vocabulary: the enum, `ALL`, `as_str`, `Display`, `FromStr` and
/// serde as the stored name.
macro_rules! vocabulary {
    ($(#[$meta:meta])* $what:literal, pub enum $name:ident { $($(#[$vmeta:meta])* $variant:ident = $text:literal,)+ }) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum $name {
            $($(#[$vmeta])* $variant,)+
        }

        impl $name {
            pub const ALL: &'static [$name] = &[$($name::$variant,)+];

            /// The stored and serialized name.
            pub fn as_str(self) -> &'static str {
                match self {
                    $($name::$variant => $text,)+
                }
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl FromStr for $name {
            type Err = UnknownName;

            fn from_str(s: &str) -> Result<Self, Self::Err> {
                Self::ALL
                    .iter()
                    .copied()
                    .find(|v| v.as_str() == s)
                    .ok_or_else(|| UnknownName { what: $what, value: s.to_owned() })
            }
        }

        impl serde::Serialize for $name {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(self.as_str())
            }
        }

        impl<'de> serde::Deserialize<'de> for $name {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
                s.parse().map_err(serde::de::Error::custom)
            }
        }
    };
}

vocabulary! {
    /// A user's plan: it sets the daily call cap and the pending scheduled cap
    /// (`crate::limits`).
    "tier",
    pub enum Tier {
        Free = "free",
        Basic = "basic",
        Premium = "premium",
    }
}

vocabulary! {
    /// Why credits moved (`credit_ledger.kind`).
    "ledger kind",
    pub enum LedgerKind {
        /// Credits given: a verified phone's welcome credits, an admin grant.
        Grant = "grant",
        /// Credits held for a call about to be placed.
        Reserve = "reserve",
        /// The reservation's charged part, when the call settles.
        Settle = "settle",
        /// The reservation's uncharged part, given back.
        Release = "release",
        /// A paid credit pack.
        Purchase = "purchase",
        /// Credits taken back for a refunded or disputed payment.
        Refund = "refund",
        /// An admin's deduction.
        Adjust = "adjust",
    }
}

vocabulary! {
    /// A checkout's state (`purchases.status`).
    "purchase status",
    pub enum PurchaseStatus {
        Open = "open",
        Paid = "paid",
        Failed = "failed",
        Expired = "expired",
        Refunded = "refunded",
    }
}

vocabulary! {
    /// Who said a transcript line (`call_transcripts.role`).
    "transcript role",
    pub enum TranscriptRole {
        User = "user",
        Assistant = "assistant",
        System = "system",
    }
}

vocabulary! {
    /// Who asked for a call (`calls.requested_by`).
    "requester",
    pub enum RequestedBy {
        /// The user, through the API.
        User = "user",
        /// The persona, during a call (a callback it promised).
        Persona = "persona",
        /// One of the user's recurring schedules.
        Schedule = "schedule",
    }
}

impl LedgerKind {
    /// An admin adjustment of `amount` credits: a grant when positive, else a deduction.
    pub fn for_adjustment(amount: i64) -> LedgerKind {
        if amount > 0 {
            LedgerKind::Grant
        } else {
            LedgerKind::Adjust
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::calls::CallStatus;
    use crate::jwt::Role;

    const MIGRATIONS: [&str; 2] = [
        concat!(
            include_str!("../../../migrations/d1/0001_accounts_personas.sql"),
            include_str!("../../../migrations/d1/0002_calls.sql"),
            include_str!("../../../migrations/d1/0003_payments_admin.sql"),
            include_str!("../../../migrations/d1/0007_persona_memory.sql"),
        ),
        concat!(
            include_str!("../../../migrations/postgres/0001_accounts_personas.sql"),
            include_str!("../../../migrations/postgres/0002_calls.sql"),
            include_str!("../../../migrations/postgres/0003_payments_admin.sql"),
            include_str!("../../../migrations/postgres/0007_persona_memory.sql"),
        ),
    ];

    /// The values of `CHECK (<column> IN ('a', 'b'))` in `sql`.
    fn check_values(sql: &str, column: &str) -> Vec<String> {
        let needle = format!("CHECK ({column} IN (");
        let start = sql
            .find(&needle)
            .unwrap_or_else(|| panic!("no CHECK on {column}"))
            + needle.len();
        let list = &sql[start..start + sql[start..].find(')').expect("closed list")];
        list.split(',')
            .map(|v| v.trim().trim_matches('\'').to_owned())
            .collect()
    }

    fn names<T: Copy>(all: &[T], name: fn(T) -> &'static str) -> Vec<String> {
        all.iter().map(|v| name(*v).to_owned()).collect()
    }

    #[test]
    fn every_vocabulary_matches_its_check_constraint_in_both_dialects() {
        for sql in MIGRATIONS {
            let sorted = |mut v: Vec<String>| {
                v.sort();
                v
            };
            assert_eq!(
                sorted(check_values(sql, "tier")),
                sorted(names(Tier::ALL, Tier::as_str))
            );
            assert_eq!(
                sorted(check_values(sql, "kind")),
                sorted(names(LedgerKind::ALL, LedgerKind::as_str))
            );
            assert_eq!(
                sorted(check_values(sql, "status")),
                sorted(names(&CallStatus::ALL, CallStatus::as_str))
            );
            let purchase = &sql[sql.find("CREATE TABLE purchases").expect("purchases table")..];
            assert_eq!(
                sorted(check_values(purchase, "status")),
                sorted(names(PurchaseStatus::ALL, PurchaseStatus::as_str))
            );
            assert_eq!(
                sorted(check_values(sql, "role")),
                sorted(names(&[Role::User, Role::Admin], Role::as_str))
            );
            assert_eq!(
                sorted(check_values(sql, "requested_by")),
                sorted(names(RequestedBy::ALL, RequestedBy::as_str))
            );
            let transcripts = &sql[sql
                .find("CREATE TABLE call_transcripts")
                .expect("transcripts table")..];
            assert_eq!(
                sorted(check_values(transcripts, "role")),
                sorted(names(TranscriptRole::ALL, TranscriptRole::as_str))
            );
        }
    }

    #[test]
    fn names_round_trip_and_strangers_are_refused() {
        for t in Tier::ALL {
            assert_eq!(t.as_str().parse::<Tier>(), Ok(*t));
            assert_eq!(serde_json::to_value(t).unwrap(), t.as_str());
            assert_eq!(
                serde_json::from_value::<Tier>(t.as_str().into()).unwrap(),
                *t
            );
        }
        for k in LedgerKind::ALL {
            assert_eq!(k.to_string().parse::<LedgerKind>(), Ok(*k));
        }
        let err = "gold".parse::<Tier>().unwrap_err();
        assert_eq!(err.to_string(), "unknown tier \"gold\"");
        assert!(serde_json::from_value::<PurchaseStatus>("PAID".into()).is_err());
    }

    #[test]
    fn an_adjustment_is_a_grant_only_when_positive() {
        assert_eq!(LedgerKind::for_adjustment(5), LedgerKind::Grant);
        assert_eq!(LedgerKind::for_adjustment(-5), LedgerKind::Adjust);
        assert_eq!(LedgerKind::for_adjustment(0), LedgerKind::Adjust);
    }
}
