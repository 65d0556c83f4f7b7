//! Personas (catalog and custom) and users' favourites.

use super::*;

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
