//! Personas: validation of create/update input and the system prompt used on a call.
//!
//! Owns the field limits and the all-or-nothing merge of a partial update. Storage,
//! ownership and the catalog/custom distinction belong to the Worker.

use serde::{Deserialize, Serialize};

use crate::channel::VoiceSettings;
use crate::validate::{self, codes, ValidationError};

pub const NAME_MAX_CHARS: usize = 60;
pub const DESCRIPTION_MAX_CHARS: usize = 500;
pub const SYSTEM_PROMPT_MAX_CHARS: usize = 8000;
pub const GREETING_MAX_CHARS: usize = 500;
pub const VOICE_ID_MAX_CHARS: usize = 64;
pub const AVATAR_URL_MAX_CHARS: usize = 2048;
pub const CATEGORY_MAX_CHARS: usize = 40;

/// A partial voice-settings change: absent fields keep their current value.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct VoiceSettingsPatch {
    #[serde(default)]
    pub stability: Option<f64>,
    #[serde(default, alias = "similarityBoost")]
    pub similarity_boost: Option<f64>,
    #[serde(default)]
    pub style: Option<f64>,
    #[serde(default)]
    pub speed: Option<f64>,
}

impl VoiceSettingsPatch {
    /// `base` with this patch's values laid over it (not validated).
    pub fn apply_to(&self, base: &VoiceSettings) -> VoiceSettings {
        VoiceSettings {
            stability: self.stability.unwrap_or(base.stability),
            similarity_boost: self.similarity_boost.unwrap_or(base.similarity_boost),
            style: self.style.unwrap_or(base.style),
            speed: self.speed.unwrap_or(base.speed),
            use_speaker_boost: base.use_speaker_boost,
        }
    }
}

/// Persona fields as the API receives them, for both create (required fields checked)
/// and partial update (absent fields unchanged). The first version's names are accepted
/// as aliases for its clients: camelCase, and its `core_system_prompt`,
/// `default_voice_id` and `default_voice_settings`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct PersonaInput {
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub description: Option<String>,
    #[serde(default, alias = "systemPrompt", alias = "core_system_prompt")]
    pub system_prompt: Option<String>,
    #[serde(default)]
    pub greeting: Option<String>,
    #[serde(default, alias = "voiceId", alias = "default_voice_id")]
    pub voice_id: Option<String>,
    #[serde(default, alias = "voiceSettings", alias = "default_voice_settings")]
    pub voice_settings: Option<VoiceSettingsPatch>,
    /// An `http(s)` image URL; `""` clears it.
    #[serde(default, alias = "avatarUrl")]
    pub avatar_url: Option<String>,
    /// A free label for the catalog (`fitness`, `health`, …); `""` clears it.
    #[serde(default)]
    pub category: Option<String>,
}

/// A complete, validated persona.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PersonaFields {
    pub name: String,
    pub description: String,
    pub system_prompt: String,
    pub greeting: String,
    pub voice_id: String,
    pub voice_settings: VoiceSettings,
    pub avatar_url: Option<String>,
    pub category: Option<String>,
}

/// What `validate_create` produces: a complete persona ready to store.
pub type NewPersona = PersonaFields;

fn required(field: &str) -> ValidationError {
    ValidationError::new(field, codes::REQUIRED, format!("{field} is required."))
}

/// ElevenLabs voice ids: 1–64 of `[A-Za-z0-9_-]` (they end up in a URL path).
fn voice_id(input: &str) -> Result<String, ValidationError> {
    let value = validate::text("voice_id", input, 1, VOICE_ID_MAX_CHARS, false)?;
    if !value
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
    {
        return Err(ValidationError::new(
            "voice_id",
            codes::INVALID_FORMAT,
            "voice_id may contain only letters, digits, '_' and '-'.",
        ));
    }
    Ok(value)
}

/// One text field's validator.
type FieldCheck = fn(&str) -> Result<String, ValidationError>;

fn name(v: &str) -> Result<String, ValidationError> {
    validate::text("name", v, 1, NAME_MAX_CHARS, false)
}

fn description(v: &str) -> Result<String, ValidationError> {
    validate::text("description", v, 0, DESCRIPTION_MAX_CHARS, true)
}

fn system_prompt(v: &str) -> Result<String, ValidationError> {
    validate::text("system_prompt", v, 1, SYSTEM_PROMPT_MAX_CHARS, true)
}

fn greeting(v: &str) -> Result<String, ValidationError> {
    validate::text("greeting", v, 1, GREETING_MAX_CHARS, true)
}

/// The greeting of a persona created without one.
pub fn default_greeting(name: &str) -> String {
    format!("Hi, it's {name}! How are you doing today?")
}

/// `""` clears; anything else must be an absolute `http(s)` URL.
fn avatar_url(v: &str) -> Result<Option<String>, ValidationError> {
    let v = v.trim();
    if v.is_empty() {
        return Ok(None);
    }
    let invalid = || {
        ValidationError::new(
            "avatar_url",
            codes::INVALID_FORMAT,
            "avatar_url must be an http(s) URL.",
        )
    };
    if v.len() > AVATAR_URL_MAX_CHARS {
        return Err(ValidationError::new(
            "avatar_url",
            codes::TOO_LONG,
            format!("avatar_url must be at most {AVATAR_URL_MAX_CHARS} characters."),
        ));
    }
    match url::Url::parse(v) {
        Ok(u) if matches!(u.scheme(), "http" | "https") && u.host_str().is_some() => {
            Ok(Some(v.to_owned()))
        }
        _ => Err(invalid()),
    }
}

/// `""` clears; else 1–40 characters on one line.
fn category(v: &str) -> Result<Option<String>, ValidationError> {
    if v.trim().is_empty() {
        return Ok(None);
    }
    validate::text("category", v, 1, CATEGORY_MAX_CHARS, false).map(Some)
}

impl PersonaInput {
    /// Validates a creation: `name`, `system_prompt` and `voice_id` are required;
    /// `greeting` defaults to one built from the name, `description` to empty and voice
    /// settings to ElevenLabs' defaults. Every problem is reported, not just the first.
    pub fn validate_create(&self) -> Result<NewPersona, Vec<ValidationError>> {
        let base = PersonaFields {
            name: String::new(),
            description: String::new(),
            system_prompt: String::new(),
            greeting: String::new(),
            voice_id: String::new(),
            voice_settings: VoiceSettings::default(),
            avatar_url: None,
            category: None,
        };
        let mut problems = Vec::new();
        for (field, value) in [
            ("name", &self.name),
            ("system_prompt", &self.system_prompt),
            ("voice_id", &self.voice_id),
        ] {
            if value.is_none() {
                problems.push(required(field));
            }
        }
        match self.merged(&base) {
            Ok(mut fields) if problems.is_empty() => {
                if self.greeting.is_none() {
                    fields.greeting = default_greeting(&fields.name);
                }
                Ok(fields)
            }
            Ok(_) => Err(problems),
            // The merge only checks fields that are present, so a missing field is never
            // reported twice.
            Err(more) => {
                problems.extend(more);
                Err(problems)
            }
        }
    }

    /// Applies a partial update to `fields`: every present field is validated, and
    /// either all of them are applied or (on any problem) none is.
    pub fn apply_update(&self, fields: &mut PersonaFields) -> Result<(), Vec<ValidationError>> {
        *fields = self.merged(fields)?;
        Ok(())
    }

    /// `base` with every present input field validated and laid over it.
    fn merged(&self, base: &PersonaFields) -> Result<PersonaFields, Vec<ValidationError>> {
        let mut out = base.clone();
        let mut problems = Vec::new();
        let slots: [(&Option<String>, &mut String, FieldCheck); 5] = [
            (&self.name, &mut out.name, name),
            (&self.description, &mut out.description, description),
            (&self.system_prompt, &mut out.system_prompt, system_prompt),
            (&self.greeting, &mut out.greeting, greeting),
            (&self.voice_id, &mut out.voice_id, voice_id),
        ];
        for (input, slot, check) in slots {
            if let Some(value) = input {
                match check(value) {
                    Ok(v) => *slot = v,
                    Err(e) => problems.push(e),
                }
            }
        }
        if let Some(patch) = &self.voice_settings {
            out.voice_settings = patch.apply_to(&base.voice_settings);
            problems.extend(out.voice_settings.problems());
        }
        if let Some(v) = &self.avatar_url {
            match avatar_url(v) {
                Ok(v) => out.avatar_url = v,
                Err(e) => problems.push(e),
            }
        }
        if let Some(v) = &self.category {
            match category(v) {
                Ok(v) => out.category = v,
                Err(e) => problems.push(e),
            }
        }
        if problems.is_empty() {
            Ok(out)
        } else {
            Err(problems)
        }
    }
}

/// How every persona behaves on the phone, prepended to its own prompt: the reply is
/// spoken by TTS, so formatting would be read aloud and long answers feel like a lecture.
const PHONE_CALL_RULES: &str = "You are speaking with the user on a live phone call. \
Your words are converted to speech, so reply in plain spoken language: no markdown, lists, \
emoji or stage directions. Keep each reply short (one to three sentences) unless asked for \
more, and let the user talk. If they say goodbye, say a brief goodbye.";

/// The persona's first words on a call. On the first call that reaches a number the AI
/// disclosure comes first, so the person who answers hears that an AI is speaking
/// before anything else; later calls open with the greeting alone.
pub fn opening_line(greeting: &str, disclosure: &str, first_call_to_number: bool) -> String {
    if first_call_to_number {
        format!("{} {}", disclosure.trim(), greeting.trim())
    } else {
        greeting.trim().to_owned()
    }
}

/// What the persona leaves on an answering machine (after the beep), in its own voice:
/// short, says who called and that it will try again, with the AI disclosure first on the
/// first call that reaches the number, as for the greeting.
pub fn voicemail_line(name: &str, disclosure: &str, first_call_to_number: bool) -> String {
    let line = format!(
        "Hi, it's {} from Call Me Back. Sorry I missed you! I'll try you again soon. Talk later!",
        name.trim()
    );
    opening_line(&line, disclosure, first_call_to_number)
}

/// The system prompt for a call with `persona`: the phone-call rules, then the persona's
/// name and its own prompt.
pub fn call_system_prompt(persona: &PersonaFields) -> String {
    format!(
        "{PHONE_CALL_RULES}\n\nYour name is {}.\n\n{}",
        persona.name, persona.system_prompt
    )
}

/// A call's whole system prompt: the phone rules and the persona, the caller's local
/// date and time (`zone`, at `now_ms`), and what the persona remembers of the caller.
pub fn call_prompt(
    persona: &PersonaFields,
    zone: Option<&str>,
    now_ms: i64,
    notes: Option<crate::memory::Notes<'_>>,
) -> String {
    let base = format!(
        "{}\n\n{}",
        call_system_prompt(persona),
        crate::tz::prompt_line(zone, now_ms)
    );
    crate::memory::with_notes(&base, notes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_calls_prompt_has_the_persona_the_callers_time_and_the_notes_in_that_order() {
        let fields = full_input().validate_create().unwrap();
        let p = super::call_prompt(
            &fields,
            Some("Europe/London"),
            1_796_239_800_000,
            Some(crate::memory::Notes {
                summary: "Sam runs.",
                day: "2026-12-01",
            }),
        );
        let persona = p.find("Your name is Coach Max.").unwrap();
        let time = p
            .find("For the caller it is now Wednesday 2 December 2026, 19:30")
            .unwrap();
        let notes = p.find("(the last one on 2026-12-01):\nSam runs.").unwrap();
        assert!(persona < time && time < notes, "{p}");
    }

    #[test]
    fn the_first_call_to_a_number_opens_with_the_disclosure() {
        assert_eq!(
            opening_line("Yo, it's Brad!", "This is an AI calling.", true),
            "This is an AI calling. Yo, it's Brad!"
        );
        assert_eq!(
            opening_line(" Yo, it's Brad! ", "This is an AI calling.", false),
            "Yo, it's Brad!"
        );
    }

    fn full_input() -> PersonaInput {
        PersonaInput {
            name: Some("  Coach Max ".into()),
            description: None,
            system_prompt: Some("You are an upbeat gym coach.".into()),
            greeting: Some("Yo! Ready to crush it?".into()),
            voice_id: Some("pNInz6obpgDQGcFmaJgB".into()),
            voice_settings: Some(VoiceSettingsPatch {
                speed: Some(1.1),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    fn fields_of(e: &[ValidationError]) -> Vec<(&str, &str)> {
        e.iter().map(|e| (e.field.as_str(), e.code)).collect()
    }

    /// A complete input validates, trims, and fills defaults for absent optional parts.
    #[test]
    fn create_valid() {
        let p = full_input().validate_create().unwrap();
        assert_eq!(p.name, "Coach Max");
        assert_eq!(p.description, "");
        assert_eq!(
            p.voice_settings,
            VoiceSettings {
                speed: 1.1,
                ..VoiceSettings::default()
            }
        );
    }

    /// An empty body names every required field once.
    #[test]
    fn create_reports_all_missing() {
        let errs = PersonaInput::default().validate_create().unwrap_err();
        assert_eq!(
            fields_of(&errs),
            [
                ("name", codes::REQUIRED),
                ("system_prompt", codes::REQUIRED),
                ("voice_id", codes::REQUIRED)
            ]
        );
    }

    /// Every limit is enforced, and all problems are reported together.
    #[test]
    fn create_reports_every_limit() {
        let input = PersonaInput {
            name: Some("n".repeat(61)),
            description: Some("d".repeat(501)),
            system_prompt: Some("   ".into()),
            greeting: Some("g".repeat(501)),
            voice_id: Some("bad id!".into()),
            voice_settings: Some(VoiceSettingsPatch {
                stability: Some(1.5),
                speed: Some(0.5),
                ..Default::default()
            }),
            ..Default::default()
        };
        let errs = input.validate_create().unwrap_err();
        assert_eq!(
            fields_of(&errs),
            [
                ("name", codes::TOO_LONG),
                ("description", codes::TOO_LONG),
                ("system_prompt", codes::REQUIRED),
                ("greeting", codes::TOO_LONG),
                ("voice_id", codes::INVALID_FORMAT),
                ("voice_settings.stability", codes::OUT_OF_RANGE),
                ("voice_settings.speed", codes::OUT_OF_RANGE)
            ]
        );
    }

    /// Limits are inclusive: exactly the maximum lengths pass.
    #[test]
    fn limits_inclusive() {
        let input = PersonaInput {
            name: Some("n".repeat(60)),
            description: Some("d".repeat(500)),
            system_prompt: Some("s".repeat(8000)),
            greeting: Some("g".repeat(500)),
            voice_id: Some("v".repeat(64)),
            voice_settings: None,
            ..Default::default()
        };
        assert!(input.validate_create().is_ok());
        let long_prompt = PersonaInput {
            system_prompt: Some("s".repeat(8001)),
            ..input.clone()
        };
        assert_eq!(
            fields_of(&long_prompt.validate_create().unwrap_err()),
            [("system_prompt", codes::TOO_LONG)]
        );
        let long_voice = PersonaInput {
            voice_id: Some("v".repeat(65)),
            ..input
        };
        assert_eq!(
            fields_of(&long_voice.validate_create().unwrap_err()),
            [("voice_id", codes::TOO_LONG)]
        );
    }

    /// An update changes only the present fields and merges voice settings per key.
    #[test]
    fn update_merges_partially() {
        let mut p = full_input().validate_create().unwrap();
        let before = p.clone();
        let patch = PersonaInput {
            greeting: Some("Hello again".into()),
            description: Some(String::new()),
            voice_settings: Some(VoiceSettingsPatch {
                style: Some(0.3),
                ..Default::default()
            }),
            ..Default::default()
        };
        patch.apply_update(&mut p).unwrap();
        assert_eq!(p.greeting, "Hello again");
        assert_eq!(p.name, before.name);
        assert_eq!(p.system_prompt, before.system_prompt);
        assert_eq!(p.voice_settings.style, 0.3);
        assert_eq!(p.voice_settings.speed, 1.1, "untouched key kept");
    }

    /// An update with any invalid field changes nothing at all.
    #[test]
    fn update_is_all_or_nothing() {
        let mut p = full_input().validate_create().unwrap();
        let before = p.clone();
        let patch = PersonaInput {
            name: Some("New name".into()),
            greeting: Some(String::new()),
            ..Default::default()
        };
        let errs = patch.apply_update(&mut p).unwrap_err();
        assert_eq!(fields_of(&errs), [("greeting", codes::REQUIRED)]);
        assert_eq!(p, before);
    }

    /// Input JSON is snake_case, with the first version's camelCase accepted too.
    #[test]
    fn json_shapes() {
        let snake: PersonaInput = serde_json::from_str(
            r#"{"name":"A","system_prompt":"S","voice_settings":{"similarity_boost":0.9}}"#,
        )
        .unwrap();
        let camel: PersonaInput = serde_json::from_str(
            r#"{"name":"A","systemPrompt":"S","voiceSettings":{"similarityBoost":0.9}}"#,
        )
        .unwrap();
        assert_eq!(snake, camel);
        assert_eq!(snake.voice_settings.unwrap().similarity_boost, Some(0.9));
    }

    /// The call prompt carries the phone rules, the persona's name and its prompt.
    #[test]
    fn call_prompt() {
        let p = full_input().validate_create().unwrap();
        let prompt = call_system_prompt(&p);
        assert!(prompt.starts_with("You are speaking with the user on a live phone call."));
        assert!(prompt.contains("Your name is Coach Max."));
        assert!(prompt.ends_with("You are an upbeat gym coach."));
    }

    /// The first version's persona body, exactly as its frontend sends it.
    #[test]
    fn first_version_shape_is_accepted() {
        let body = r#"{"name":"Coach Max","description":"Gym coach",
            "core_system_prompt":"You are an upbeat gym coach.",
            "default_voice_id":"pNInz6obpgDQGcFmaJgB",
            "default_voice_settings":{"stability":0.4,"similarity_boost":0.8,"speed":1.1,"style":0.2},
            "avatar_url":"https://cdn.example.com/max.png","category":"fitness"}"#;
        let input: PersonaInput = serde_json::from_str(body).unwrap();
        let p = input.validate_create().unwrap();
        assert_eq!(p.system_prompt, "You are an upbeat gym coach.");
        assert_eq!(p.voice_id, "pNInz6obpgDQGcFmaJgB");
        assert_eq!(p.voice_settings.stability, 0.4);
        assert_eq!(p.voice_settings.similarity_boost, 0.8);
        assert_eq!(p.voice_settings.style, 0.2);
        assert_eq!(p.greeting, default_greeting("Coach Max"));
        assert_eq!(
            p.avatar_url.as_deref(),
            Some("https://cdn.example.com/max.png")
        );
        assert_eq!(p.category.as_deref(), Some("fitness"));
    }

    /// Hosts must be ASCII: the Worker's URL parser has no IDNA Unicode back end (its
    /// size, workers/api/Cargo.toml `idna_adapter`); the xn-- form of the same host is
    /// accepted.
    #[test]
    fn avatar_hosts_are_ascii() {
        assert_eq!(
            avatar_url("https://bücher.example/a.png").unwrap_err().code,
            codes::INVALID_FORMAT
        );
        assert_eq!(
            avatar_url("https://xn--bcher-kva.example/a.png").unwrap(),
            Some("https://xn--bcher-kva.example/a.png".to_owned())
        );
    }

    /// Avatar and category are validated; `""` clears them on update.
    #[test]
    fn avatar_and_category_rules() {
        let bad = PersonaInput {
            avatar_url: Some("javascript:alert(1)".into()),
            category: Some("x".repeat(41)),
            ..full_input()
        };
        let errs = bad.validate_create().unwrap_err();
        assert_eq!(
            fields_of(&errs),
            [
                ("avatar_url", codes::INVALID_FORMAT),
                ("category", codes::TOO_LONG)
            ]
        );
        let mut p = PersonaInput {
            avatar_url: Some("http://x.example/a.png".into()),
            category: Some("health".into()),
            ..full_input()
        }
        .validate_create()
        .unwrap();
        PersonaInput {
            avatar_url: Some(String::new()),
            ..Default::default()
        }
        .apply_update(&mut p)
        .unwrap();
        assert_eq!(p.avatar_url, None);
        assert_eq!(p.category.as_deref(), Some("health"));
    }
}
