//! Data access: the only module that writes SQL, one file per subject (`users`,
//! `personas`, `ledger`, `calls`, `payments`, `audit`, `limits`, `analytics`) over the
//! database drivers in `db`. Routes and the Durable Object call these methods and never
//! see which database answers.
//!
//! Multi-statement writes go through D1 `batch`, which runs as one transaction: a failed
//! constraint in any statement (unique idempotency key, `credits >= 0`) rolls the whole
//! batch back. That is how credit operations stay exact under concurrency without
//! read-then-write. An admin action's audit row is part of the same batch, so a change
//! and its record exist together or not at all; amounts that depend on the balance
//! (refunds that may not overdraw) are computed by SQL inside the batch.

mod analytics;
mod audit;
mod calls;
pub mod db;
mod ledger;
mod limits;
mod payments;
mod personas;
mod users;

pub use analytics::*;
pub use audit::*;
pub use ledger::*;
pub use payments::*;
pub use users::*;

use serde::{Deserialize, Serialize};
use worker::{D1Database, Env};

use crate::store::db::Db;
pub use crate::store::db::WriteConflict;
pub(crate) use crate::store::db::{day, flag, int, opt, opt_int, opt_ts, real, s, ts, Arg, Bound};

use crate::error::{ApiError, ApiResult};

/// A user as stored.
#[derive(Debug, Clone, Deserialize)]
pub struct UserRow {
    pub id: String,
    pub email: String,
    pub name: String,
    pub phone_number: Option<String>,
    pub password_hash: String,
    pub role: String,
    pub tier: String,
    pub credits: i64,
    pub is_banned: i64,
    pub phone_verified: i64,
    /// The address the owner last signed in from (never slowed down at login).
    pub last_login_ip: Option<String>,
    pub created_at: String,
}

impl UserRow {
    /// The number calls go to: the account's phone, once verified.
    pub fn verified_phone(&self) -> Option<&str> {
        self.phone_number
            .as_deref()
            .filter(|_| self.phone_verified != 0)
    }
}

/// The public view of a user (never the password hash).
#[derive(Debug, Clone, Serialize)]
pub struct UserView {
    pub id: String,
    pub email: String,
    pub name: String,
    pub phone_number: Option<String>,
    pub role: String,
    pub tier: String,
    pub credits: i64,
    pub is_banned: bool,
    pub phone_verified: bool,
    pub created_at: String,
}

impl UserRow {
    pub fn view(&self, role: &str) -> UserView {
        UserView {
            id: self.id.clone(),
            email: self.email.clone(),
            name: self.name.clone(),
            phone_number: self.phone_number.clone(),
            role: role.to_string(),
            tier: self.tier.clone(),
            credits: self.credits,
            is_banned: self.is_banned != 0,
            phone_verified: self.phone_verified != 0,
            created_at: self.created_at.clone(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
pub struct PersonaRow {
    pub id: String,
    pub owner_id: Option<String>,
    pub name: String,
    pub description: String,
    pub system_prompt: String,
    pub greeting: String,
    pub voice_id: String,
    pub stability: f64,
    pub similarity_boost: f64,
    pub style: f64,
    pub speed: f64,
    pub is_active: i64,
    pub created_at: String,
    pub updated_at: String,
    pub avatar_url: Option<String>,
    pub category: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct VoiceSettingsView {
    pub stability: f64,
    pub similarity_boost: f64,
    pub style: f64,
    pub speed: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct PersonaView {
    pub id: String,
    pub name: String,
    pub description: String,
    pub system_prompt: String,
    pub greeting: String,
    pub voice_id: String,
    pub voice_settings: VoiceSettingsView,
    /// The first version's names for the same three fields, for its clients.
    pub core_system_prompt: String,
    pub default_voice_id: String,
    pub default_voice_settings: VoiceSettingsView,
    pub avatar_url: Option<String>,
    pub category: Option<String>,
    pub is_custom: bool,
    pub owner_id: Option<String>,
    pub is_active: bool,
    pub created_at: String,
    pub updated_at: String,
}

impl PersonaRow {
    /// The persona's validated fields (as `cmb_core::persona` merges updates into them).
    pub fn fields(&self) -> cmb_core::persona::PersonaFields {
        cmb_core::persona::PersonaFields {
            name: self.name.clone(),
            description: self.description.clone(),
            system_prompt: self.system_prompt.clone(),
            greeting: self.greeting.clone(),
            voice_id: self.voice_id.clone(),
            voice_settings: cmb_core::channel::VoiceSettings {
                stability: self.stability,
                similarity_boost: self.similarity_boost,
                style: self.style,
                speed: self.speed,
                use_speaker_boost: true,
            },
            avatar_url: self.avatar_url.clone(),
            category: self.category.clone(),
        }
    }

    pub fn view(&self) -> PersonaView {
        let voice_settings = VoiceSettingsView {
            stability: self.stability,
            similarity_boost: self.similarity_boost,
            style: self.style,
            speed: self.speed,
        };
        PersonaView {
            id: self.id.clone(),
            name: self.name.clone(),
            description: self.description.clone(),
            system_prompt: self.system_prompt.clone(),
            greeting: self.greeting.clone(),
            voice_id: self.voice_id.clone(),
            voice_settings: voice_settings.clone(),
            core_system_prompt: self.system_prompt.clone(),
            default_voice_id: self.voice_id.clone(),
            default_voice_settings: voice_settings,
            avatar_url: self.avatar_url.clone(),
            category: self.category.clone(),
            is_custom: self.owner_id.is_some(),
            owner_id: self.owner_id.clone(),
            is_active: self.is_active != 0,
            created_at: self.created_at.clone(),
            updated_at: self.updated_at.clone(),
        }
    }
}

/// The fields of a persona to write (already validated by `cmb_core::persona`).
#[derive(Debug, Clone)]
pub struct PersonaWrite {
    pub name: String,
    pub description: String,
    pub system_prompt: String,
    pub greeting: String,
    pub voice_id: String,
    pub stability: f64,
    pub similarity_boost: f64,
    pub style: f64,
    pub speed: f64,
    pub avatar_url: Option<String>,
    pub category: Option<String>,
}

/// A call as stored; also its API view (API.md "A `call` object" plus `status_reason`).
#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct CallRow {
    pub id: String,
    pub user_id: String,
    pub persona_id: String,
    pub phone_number: String,
    pub status: String,
    pub status_reason: Option<String>,
    pub scheduled_time: Option<String>,
    pub started_at: Option<String>,
    pub ended_at: Option<String>,
    pub duration_seconds: Option<i64>,
    pub twilio_call_sid: Option<String>,
    pub answered_by: Option<String>,
    #[serde(skip_serializing)]
    pub reserved_credits: i64,
    pub cost_cents: Option<i64>,
    pub created_at: String,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct TranscriptRow {
    pub seq: i64,
    pub role: String,
    pub text: String,
    pub at: String,
    pub interrupted: i64,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct CostRow {
    pub provider: String,
    pub quantity: f64,
    pub unit: String,
    pub cost_micros: i64,
}

/// A credit movement for one call, with its idempotency key.
pub struct LedgerEntry<'a> {
    pub id: &'a str,
    pub user_id: &'a str,
    pub kind: &'a str,
    pub amount: i64,
    pub key: &'a str,
    pub call_id: Option<&'a str>,
    pub reason: &'a str,
}

/// The final record of a call, written once when it settles.
pub struct Settlement<'a> {
    pub call_id: &'a str,
    pub status: &'a str,
    pub reason: Option<&'a str>,
    pub ended_at: &'a str,
    pub duration_seconds: i64,
    pub charge: i64,
    pub release: i64,
    pub user_id: &'a str,
    pub release_ledger_id: &'a str,
    pub settle_ledger_id: &'a str,
    pub costs: &'a [CostRow],
}

pub struct Store {
    db: Db,
}

/// A persona's writable fields as arguments, in column order (name … speed).
fn persona_args(p: &PersonaWrite) -> [Arg; 11] {
    [
        s(&p.name),
        s(&p.description),
        s(&p.system_prompt),
        s(&p.greeting),
        s(&p.voice_id),
        real(p.stability),
        real(p.similarity_boost),
        real(p.style),
        real(p.speed),
        opt(p.avatar_url.as_deref()),
        opt(p.category.as_deref()),
    ]
}

const USER_COLUMNS: &str =
    "id, email, name, phone_number, password_hash, role, tier, credits, is_banned, phone_verified, last_login_ip, created_at";
const CALL_COLUMNS: &str = "id, user_id, persona_id, phone_number, status, status_reason, scheduled_time, started_at, ended_at, duration_seconds, twilio_call_sid, answered_by, reserved_credits, cost_cents, created_at";
pub(crate) const PERSONA_COLUMNS: &str = "id, owner_id, name, description, system_prompt, greeting, voice_id, stability, similarity_boost, style, speed, is_active, created_at, updated_at, avatar_url, category";

impl Store {
    pub fn new(db: D1Database) -> Self {
        Self { db: Db::d1(db) }
    }

    /// The configured database: D1, or Postgres through Hyperdrive (`DB_BACKEND`).
    pub async fn open(env: &Env, backend: cmb_core::config::DbBackend) -> ApiResult<Self> {
        Ok(Self {
            db: Db::open(env, backend).await?,
        })
    }

    pub fn dialect(&self) -> crate::store::db::Dialect {
        self.db.dialect()
    }

    pub(crate) fn stmt(&self, sql: &str, args: &[Arg]) -> ApiResult<Bound<'_>> {
        Ok(self.db.bind(sql, args))
    }

    pub(crate) async fn first<T: for<'de> Deserialize<'de>>(
        &self,
        sql: &str,
        args: &[Arg],
    ) -> ApiResult<Option<T>> {
        self.db.first(sql, args).await
    }

    pub(crate) async fn all<T: for<'de> Deserialize<'de>>(
        &self,
        sql: &str,
        args: &[Arg],
    ) -> ApiResult<Vec<T>> {
        self.db.all(sql, args).await
    }

    /// Runs statements as one transaction; a constraint failure is returned as a
    /// [`WriteConflict`] with nothing applied.
    pub(crate) async fn batch(
        &self,
        stmts: Vec<Bound<'_>>,
    ) -> ApiResult<Result<(), WriteConflict>> {
        self.db.batch_bound(stmts).await
    }

    /// Liveness check for `/health`.
    pub async fn ping(&self) -> Result<(), String> {
        self.db
            .first::<serde_json::Value>("SELECT 1 AS ok", &[])
            .await
            .map(|_| ())
            .map_err(|e| e.message)
    }
}
