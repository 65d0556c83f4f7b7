//! Personas (catalog and custom) and users' favourites.

use super::*;

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
    #[serde(deserialize_with = "read_flag")]
    pub is_active: bool,
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
    /// A call can be booked with it by `user_id`: active, and a catalog persona or theirs.
    pub fn usable_by(&self, user_id: &str) -> bool {
        self.is_active && self.owner_id.as_deref().is_none_or(|o| o == user_id)
    }

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
            is_active: self.is_active,
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

pub(crate) const PERSONA_COLUMNS: &str = "id, owner_id, name, description, system_prompt, greeting, voice_id, stability, similarity_boost, style, speed, is_active, created_at, updated_at, avatar_url, category";

impl Store {
    // ---- personas ----

    /// Active catalog personas plus the viewer's own active custom ones.
    /// A page of the personas `viewer` may pick (active catalog ones first, then their
    /// own), and how many there are in all.
    pub async fn list_personas(
        &self,
        viewer: Option<&str>,
        limit: i64,
        offset: i64,
    ) -> ApiResult<(Vec<PersonaRow>, i64)> {
        let filter = "is_active = TRUE AND (owner_id IS NULL OR owner_id = ?1)";
        let rows = self
            .all(
                &format!(
                    "SELECT {PERSONA_COLUMNS} FROM personas WHERE {filter} \
                     ORDER BY owner_id IS NOT NULL, created_at, name, id LIMIT ?2 OFFSET ?3"
                ),
                &[opt(viewer), int(limit), int(offset)],
            )
            .await?;
        let total: Option<Count> = self
            .first(
                &format!("SELECT COUNT(*) AS n FROM personas WHERE {filter}"),
                &[opt(viewer)],
            )
            .await?;
        Ok((rows, total.map_or(0, |c| c.n)))
    }

    pub async fn persona(&self, id: &str) -> ApiResult<Option<PersonaRow>> {
        self.first(
            &format!("SELECT {PERSONA_COLUMNS} FROM personas WHERE id = ?1"),
            &[s(id)],
        )
        .await
    }

    /// Inserts a persona: a catalog one (`owner` None), or a custom one of `owner` while
    /// they have fewer than `max_custom` active ones (checked inside the insert, under
    /// the owner's row lock, so concurrent creations cannot pass the cap). Whether it
    /// was inserted.
    pub async fn insert_persona(
        &self,
        id: &str,
        owner: Option<&str>,
        p: &PersonaWrite,
        max_custom: i64,
        now: &str,
    ) -> ApiResult<bool> {
        let mut args = vec![s(id), opt(owner)];
        args.extend(persona_args(p));
        args.push(ts(now));
        args.push(int(max_custom));
        let insert = self.stmt(
            "INSERT INTO personas (id, owner_id, name, description, system_prompt, greeting, voice_id, \
             stability, similarity_boost, style, speed, avatar_url, category, is_active, created_at, updated_at) \
             SELECT ?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, TRUE, ?14, ?14 \
             WHERE ?2 IS NULL OR (SELECT COUNT(*) FROM personas WHERE owner_id = ?2 AND is_active = TRUE) < ?15",
            &args,
        )?;
        let mut stmts = Vec::new();
        if let Some(owner) = owner {
            stmts.push(self.lock_user_stmt(owner)?);
        }
        stmts.push(insert);
        if let Err(e) = self.batch(stmts).await? {
            return Err(ApiError::internal("insert persona", format!("{e:?}")));
        }
        Ok(self.persona(id).await?.is_some())
    }

    pub async fn update_persona(&self, id: &str, p: &PersonaWrite, now: &str) -> ApiResult<()> {
        let mut args = vec![s(id)];
        args.extend(persona_args(p));
        args.push(ts(now));
        let stmt = self.stmt(
            "UPDATE personas SET name = ?2, description = ?3, system_prompt = ?4, greeting = ?5, voice_id = ?6, \
             stability = ?7, similarity_boost = ?8, style = ?9, speed = ?10, avatar_url = ?11, category = ?12, \
             updated_at = ?13 WHERE id = ?1",
            &args,
        )?;
        stmt.run()
            .await
            .map_err(|e| ApiError::internal("update persona", e))?;
        Ok(())
    }

    pub async fn deactivate_persona(&self, id: &str, now: &str) -> ApiResult<()> {
        let stmt = self.stmt(
            "UPDATE personas SET is_active = FALSE, updated_at = ?2 WHERE id = ?1",
            &[s(id), ts(now)],
        )?;
        stmt.run()
            .await
            .map_err(|e| ApiError::internal("delete persona", e))?;
        Ok(())
    }

    // ---- favourites ----

    /// Idempotent: marking an existing favourite again changes nothing.
    pub async fn add_favorite(&self, user: &str, persona: &str, now: &str) -> ApiResult<()> {
        let stmt = self.stmt(
            "INSERT INTO favorites (user_id, persona_id, created_at) VALUES (?1, ?2, ?3) \
             ON CONFLICT (user_id, persona_id) DO NOTHING",
            &[s(user), s(persona), ts(now)],
        )?;
        stmt.run()
            .await
            .map_err(|e| ApiError::internal("add favorite", e))?;
        Ok(())
    }

    pub async fn remove_favorite(&self, user: &str, persona: &str) -> ApiResult<()> {
        let stmt = self.stmt(
            "DELETE FROM favorites WHERE user_id = ?1 AND persona_id = ?2",
            &[s(user), s(persona)],
        )?;
        stmt.run()
            .await
            .map_err(|e| ApiError::internal("remove favorite", e))?;
        Ok(())
    }

    /// The user's favourites that they can still see (active, catalog or their own).
    pub async fn favorites(&self, user: &str) -> ApiResult<Vec<PersonaRow>> {
        self.all(
            "SELECT p.id, p.owner_id, p.name, p.description, p.system_prompt, p.greeting, p.voice_id, \
             p.stability, p.similarity_boost, p.style, p.speed, p.is_active, p.created_at, p.updated_at, \
             p.avatar_url, p.category \
             FROM favorites f JOIN personas p ON p.id = f.persona_id \
             WHERE f.user_id = ?1 AND p.is_active = TRUE AND (p.owner_id IS NULL OR p.owner_id = ?1) \
             ORDER BY f.created_at DESC",
            &[s(user)],
        )
        .await
    }
}
