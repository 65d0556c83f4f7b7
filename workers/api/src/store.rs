//! Data access: the only module that writes SQL. Routes and the Durable Object call these
//! methods and never see which database answers.
//!
//! Multi-statement writes go through D1 `batch`, which runs as one transaction: a failed
//! constraint in any statement (unique idempotency key, `credits >= 0`) rolls the whole
//! batch back. That is how credit operations stay exact under concurrency without
//! read-then-write.

use serde::{Deserialize, Serialize};
use wasm_bindgen::JsValue;
use worker::{D1Database, D1PreparedStatement};

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
    pub created_at: String,
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
    pub is_custom: bool,
    pub owner_id: Option<String>,
    pub is_active: bool,
    pub created_at: String,
    pub updated_at: String,
}

impl PersonaRow {
    pub fn view(&self) -> PersonaView {
        PersonaView {
            id: self.id.clone(),
            name: self.name.clone(),
            description: self.description.clone(),
            system_prompt: self.system_prompt.clone(),
            greeting: self.greeting.clone(),
            voice_id: self.voice_id.clone(),
            voice_settings: VoiceSettingsView {
                stability: self.stability,
                similarity_boost: self.similarity_boost,
                style: self.style,
                speed: self.speed,
            },
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
}

/// How a failed batch failed, for the callers that care.
#[derive(Debug)]
pub enum WriteConflict {
    /// A UNIQUE constraint: the row (or the idempotency key) already exists.
    Duplicate,
    /// A CHECK constraint, e.g. `credits >= 0`.
    Check,
}

pub struct Store {
    db: D1Database,
}

fn s(v: &str) -> JsValue {
    JsValue::from_str(v)
}

fn opt(v: Option<&str>) -> JsValue {
    v.map_or(JsValue::NULL, JsValue::from_str)
}

/// Integers cross into JS as numbers; every value we store is far below 2^53.
fn int(v: i64) -> JsValue {
    JsValue::from_f64(v as f64)
}

fn real(v: f64) -> JsValue {
    JsValue::from_f64(v)
}

fn classify(err: &worker::Error) -> Option<WriteConflict> {
    let text = err.to_string();
    if text.contains("UNIQUE constraint failed") {
        Some(WriteConflict::Duplicate)
    } else if text.contains("CHECK constraint failed") {
        Some(WriteConflict::Check)
    } else {
        None
    }
}

const USER_COLUMNS: &str = "id, email, name, phone_number, password_hash, role, tier, credits, is_banned, created_at";
const PERSONA_COLUMNS: &str = "id, owner_id, name, description, system_prompt, greeting, voice_id, stability, similarity_boost, style, speed, is_active, created_at, updated_at";

impl Store {
    pub fn new(db: D1Database) -> Self {
        Self { db }
    }

    fn stmt(&self, sql: &str, args: &[JsValue]) -> ApiResult<D1PreparedStatement> {
        self.db
            .prepare(sql)
            .bind(args)
            .map_err(|e| ApiError::internal("d1 bind", e))
    }

    async fn first<T: for<'de> Deserialize<'de>>(&self, sql: &str, args: &[JsValue]) -> ApiResult<Option<T>> {
        self.stmt(sql, args)?
            .first::<T>(None)
            .await
            .map_err(|e| ApiError::internal("d1 first", e))
    }

    async fn all<T: for<'de> Deserialize<'de>>(&self, sql: &str, args: &[JsValue]) -> ApiResult<Vec<T>> {
        let result = self
            .stmt(sql, args)?
            .all()
            .await
            .map_err(|e| ApiError::internal("d1 all", e))?;
        result.results::<T>().map_err(|e| ApiError::internal("d1 decode", e))
    }

    /// Runs statements as one transaction; a constraint failure is returned as a
    /// [`WriteConflict`] with nothing applied.
    async fn batch(&self, stmts: Vec<D1PreparedStatement>) -> ApiResult<Result<(), WriteConflict>> {
        match self.db.batch(stmts).await {
            Ok(_) => Ok(Ok(())),
            Err(e) => match classify(&e) {
                Some(conflict) => Ok(Err(conflict)),
                None => Err(ApiError::internal("d1 batch", e)),
            },
        }
    }

    /// Liveness check for `/health`.
    pub async fn ping(&self) -> Result<(), String> {
        self.db
            .prepare("SELECT 1 AS ok")
            .first::<serde_json::Value>(None)
            .await
            .map(|_| ())
            .map_err(|e| e.to_string())
    }

    // ---- users ----

    /// Creates a user and grants the starting credits in one transaction.
    /// Returns `Err(WriteConflict::Duplicate)` when the email is taken.
    #[allow(clippy::too_many_arguments)]
    pub async fn create_user(
        &self,
        id: &str,
        email: &str,
        name: &str,
        phone_number: Option<&str>,
        password_hash: &str,
        role: &str,
        free_credits: i64,
        ledger_id: &str,
        now: &str,
    ) -> ApiResult<Result<(), WriteConflict>> {
        let insert = self.stmt(
            "INSERT INTO users (id, email, name, phone_number, password_hash, role, credits, created_at, updated_at) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?8)",
            &[s(id), s(email), s(name), opt(phone_number), s(password_hash), s(role), int(free_credits), s(now)],
        )?;
        let grant = self.stmt(
            "INSERT INTO credit_ledger (id, user_id, kind, amount, idempotency_key, reason, created_at) \
             VALUES (?1, ?2, 'grant', ?3, ?4, 'signup', ?5)",
            &[s(ledger_id), s(id), int(free_credits), s(&format!("signup:{id}")), s(now)],
        )?;
        self.batch(vec![insert, grant]).await
    }

    pub async fn user_by_email(&self, email: &str) -> ApiResult<Option<UserRow>> {
        self.first(&format!("SELECT {USER_COLUMNS} FROM users WHERE email = ?1"), &[s(email)])
            .await
    }

    pub async fn user_by_id(&self, id: &str) -> ApiResult<Option<UserRow>> {
        self.first(&format!("SELECT {USER_COLUMNS} FROM users WHERE id = ?1"), &[s(id)])
            .await
    }

    // ---- personas ----

    /// Active catalog personas plus the viewer's own active custom ones.
    pub async fn list_personas(&self, viewer: Option<&str>) -> ApiResult<Vec<PersonaRow>> {
        self.all(
            &format!(
                "SELECT {PERSONA_COLUMNS} FROM personas \
                 WHERE is_active = 1 AND (owner_id IS NULL OR owner_id = ?1) \
                 ORDER BY owner_id IS NOT NULL, created_at, name"
            ),
            &[opt(viewer)],
        )
        .await
    }

    pub async fn persona(&self, id: &str) -> ApiResult<Option<PersonaRow>> {
        self.first(&format!("SELECT {PERSONA_COLUMNS} FROM personas WHERE id = ?1"), &[s(id)])
            .await
    }

    pub async fn insert_persona(&self, id: &str, owner: Option<&str>, p: &PersonaWrite, now: &str) -> ApiResult<()> {
        let stmt = self.stmt(
            "INSERT INTO personas (id, owner_id, name, description, system_prompt, greeting, voice_id, \
             stability, similarity_boost, style, speed, is_active, created_at, updated_at) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, 1, ?12, ?12)",
            &[
                s(id),
                opt(owner),
                s(&p.name),
                s(&p.description),
                s(&p.system_prompt),
                s(&p.greeting),
                s(&p.voice_id),
                real(p.stability),
                real(p.similarity_boost),
                real(p.style),
                real(p.speed),
                s(now),
            ],
        )?;
        stmt.run().await.map_err(|e| ApiError::internal("insert persona", e))?;
        Ok(())
    }

    pub async fn update_persona(&self, id: &str, p: &PersonaWrite, now: &str) -> ApiResult<()> {
        let stmt = self.stmt(
            "UPDATE personas SET name = ?2, description = ?3, system_prompt = ?4, greeting = ?5, voice_id = ?6, \
             stability = ?7, similarity_boost = ?8, style = ?9, speed = ?10, updated_at = ?11 WHERE id = ?1",
            &[
                s(id),
                s(&p.name),
                s(&p.description),
                s(&p.system_prompt),
                s(&p.greeting),
                s(&p.voice_id),
                real(p.stability),
                real(p.similarity_boost),
                real(p.style),
                real(p.speed),
                s(now),
            ],
        )?;
        stmt.run().await.map_err(|e| ApiError::internal("update persona", e))?;
        Ok(())
    }

    pub async fn deactivate_persona(&self, id: &str, now: &str) -> ApiResult<()> {
        let stmt = self.stmt(
            "UPDATE personas SET is_active = 0, updated_at = ?2 WHERE id = ?1",
            &[s(id), s(now)],
        )?;
        stmt.run().await.map_err(|e| ApiError::internal("delete persona", e))?;
        Ok(())
    }

    // ---- favourites ----

    /// Idempotent: marking an existing favourite again changes nothing.
    pub async fn add_favorite(&self, user: &str, persona: &str, now: &str) -> ApiResult<()> {
        let stmt = self.stmt(
            "INSERT INTO favorites (user_id, persona_id, created_at) VALUES (?1, ?2, ?3) \
             ON CONFLICT (user_id, persona_id) DO NOTHING",
            &[s(user), s(persona), s(now)],
        )?;
        stmt.run().await.map_err(|e| ApiError::internal("add favorite", e))?;
        Ok(())
    }

    pub async fn remove_favorite(&self, user: &str, persona: &str) -> ApiResult<()> {
        let stmt = self.stmt(
            "DELETE FROM favorites WHERE user_id = ?1 AND persona_id = ?2",
            &[s(user), s(persona)],
        )?;
        stmt.run().await.map_err(|e| ApiError::internal("remove favorite", e))?;
        Ok(())
    }

    /// The user's favourites that they can still see (active, catalog or their own).
    pub async fn favorites(&self, user: &str) -> ApiResult<Vec<PersonaRow>> {
        self.all(
            "SELECT p.id, p.owner_id, p.name, p.description, p.system_prompt, p.greeting, p.voice_id, \
             p.stability, p.similarity_boost, p.style, p.speed, p.is_active, p.created_at, p.updated_at \
             FROM favorites f JOIN personas p ON p.id = f.persona_id \
             WHERE f.user_id = ?1 AND p.is_active = 1 AND (p.owner_id IS NULL OR p.owner_id = ?1) \
             ORDER BY f.created_at DESC",
            &[s(user)],
        )
        .await
    }
}
