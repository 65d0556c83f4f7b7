//! Input validation for API bodies: emails, names, phone numbers, free text.
//!
//! Owns [`ValidationError`] (the field, a stable snake_case `code` the API puts in its 400
//! answer, and a human message) and the normalising validators. It must not know about
//! HTTP or storage: the Worker maps these errors to responses in one place.

use serde::Serialize;

/// Stable error codes, as the API returns them.
pub mod codes {
    pub const REQUIRED: &str = "required";
    pub const TOO_LONG: &str = "too_long";
    pub const OUT_OF_RANGE: &str = "out_of_range";
    pub const INVALID_EMAIL: &str = "invalid_email";
    pub const INVALID_PHONE_NUMBER: &str = "invalid_phone_number";
    pub const WEAK_PASSWORD: &str = "weak_password";
    pub const INVALID_FORMAT: &str = "invalid_format";
}

/// One invalid input field, ready to become part of an API 400.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, thiserror::Error)]
#[error("{field}: {message}")]
pub struct ValidationError {
    /// The JSON field at fault (dotted for nested ones: `voice_settings.speed`).
    pub field: String,
    /// Stable snake_case code, e.g. `invalid_email` (see [`codes`]).
    pub code: &'static str,
    /// For humans.
    pub message: String,
}

impl ValidationError {
    pub fn new(field: impl Into<String>, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            code,
            message: message.into(),
        }
    }
}

/// Whether `s` is a UUID in its hyphenated form (the ids this API hands out).
pub fn is_uuid(s: &str) -> bool {
    s.len() == 36
        && s.bytes().enumerate().all(|(i, b)| match i {
            8 | 13 | 18 | 23 => b == b'-',
            _ => b.is_ascii_hexdigit(),
        })
}

/// Longest email address accepted (RFC 5321 path limit).
pub const EMAIL_MAX_LEN: usize = 254;
/// Longest local part (before `@`) accepted (RFC 5321).
const EMAIL_LOCAL_MAX_LEN: usize = 64;
/// Longest user display name, in characters.
pub const NAME_MAX_CHARS: usize = 100;
/// E.164 numbers: at most 15 digits; fewer than 8 is no real subscriber number.
const E164_MIN_DIGITS: usize = 8;
const E164_MAX_DIGITS: usize = 15;

/// Normalises and checks an email address: trimmed, lowercased, `local@domain` with a
/// dotted domain of DNS labels, at most 254 bytes.
///
/// ASCII only: internationalised addresses are rare here and are where look-alike
/// tricks live.
pub fn email(input: &str) -> Result<String, ValidationError> {
    const FIELD: &str = "email";
    let invalid =
        || ValidationError::new(FIELD, codes::INVALID_EMAIL, "Enter a valid email address.");
    let value = input.trim().to_ascii_lowercase();
    if value.is_empty() {
        return Err(ValidationError::new(
            FIELD,
            codes::REQUIRED,
            "Email is required.",
        ));
    }
    if value.len() > EMAIL_MAX_LEN {
        return Err(ValidationError::new(
            FIELD,
            codes::INVALID_EMAIL,
            format!("Email must be at most {EMAIL_MAX_LEN} characters."),
        ));
    }
    let (local, domain) = value.split_once('@').ok_or_else(invalid)?;
    if !is_valid_local_part(local) || !is_valid_domain(domain) {
        return Err(invalid());
    }
    Ok(value)
}

/// RFC 5322 dot-atom local part (no quoted strings: nobody types those into a signup form).
fn is_valid_local_part(local: &str) -> bool {
    const SPECIALS: &str = "!#$%&'*+-/=?^_`{|}~.";
    !local.is_empty()
        && local.len() <= EMAIL_LOCAL_MAX_LEN
        && !local.starts_with('.')
        && !local.ends_with('.')
        && !local.contains("..")
        && local
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || SPECIALS.contains(c))
}

/// At least two DNS labels, each 1–63 of `[a-z0-9-]` not starting or ending with `-`,
/// and a top-level label that is not all digits (which would be an IP address).
fn is_valid_domain(domain: &str) -> bool {
    let labels: Vec<&str> = domain.split('.').collect();
    let labels_ok = labels.iter().all(|l| {
        !l.is_empty()
            && l.len() <= 63
            && !l.starts_with('-')
            && !l.ends_with('-')
            && l.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
    });
    let tld_ok = labels
        .last()
        .is_some_and(|tld| tld.len() >= 2 && !tld.chars().all(|c| c.is_ascii_digit()));
    labels.len() >= 2 && labels_ok && tld_ok
}

/// A user's display name: trimmed, 1–100 characters, one line.
pub fn name(input: &str) -> Result<String, ValidationError> {
    text("name", input, 1, NAME_MAX_CHARS, false)
}

/// Generic free-text field: trimmed, `min_chars..=max_chars` characters (Unicode scalar
/// values), no control characters except newline and tab when `multiline`.
///
/// An empty value (after trimming) is `required` when `min_chars > 0`; too long is
/// `too_long`.
pub fn text(
    field: &str,
    input: &str,
    min_chars: usize,
    max_chars: usize,
    multiline: bool,
) -> Result<String, ValidationError> {
    let value = input.trim();
    let len = value.chars().count();
    if len == 0 && min_chars > 0 {
        return Err(ValidationError::new(
            field,
            codes::REQUIRED,
            format!("{field} is required."),
        ));
    }
    if len < min_chars {
        return Err(ValidationError::new(
            field,
            codes::OUT_OF_RANGE,
            format!("{field} must be at least {min_chars} characters."),
        ));
    }
    if len > max_chars {
        return Err(ValidationError::new(
            field,
            codes::TOO_LONG,
            format!("{field} must be at most {max_chars} characters."),
        ));
    }
    let allowed_control = |c: char| multiline && (c == '\n' || c == '\t' || c == '\r');
    if value.chars().any(|c| c.is_control() && !allowed_control(c)) {
        return Err(ValidationError::new(
            field,
            codes::INVALID_FORMAT,
            format!("{field} contains control characters."),
        ));
    }
    Ok(value.to_owned())
}

/// Normalises a phone number to strict E.164 (`+` then 8–15 digits, first digit 1–9).
///
/// Spaces, dashes, dots and parentheses are stripped, as people type them
/// (`+1 (555) 010-9999`); anything else — letters, a missing `+`, a `00` international
/// prefix, a leading-zero country code, the wrong number of digits — is refused rather
/// than guessed at, because a guess dials a stranger.
pub fn e164(input: &str) -> Result<String, ValidationError> {
    const FIELD: &str = "phone_number";
    let invalid = |message: &str| {
        ValidationError::new(FIELD, codes::INVALID_PHONE_NUMBER, message.to_owned())
    };
    let compact: String = input
        .chars()
        .filter(|c| !(c.is_whitespace() || matches!(c, '-' | '.' | '(' | ')')))
        .collect();
    if compact.is_empty() {
        return Err(ValidationError::new(
            FIELD,
            codes::REQUIRED,
            "Phone number is required.",
        ));
    }
    let Some(digits) = compact.strip_prefix('+') else {
        return Err(invalid(
            "Phone number must start with + and the country code, e.g. +14155550100.",
        ));
    };
    if !digits.chars().all(|c| c.is_ascii_digit()) {
        return Err(invalid("Phone number may contain only digits after the +."));
    }
    if !(E164_MIN_DIGITS..=E164_MAX_DIGITS).contains(&digits.len()) {
        return Err(invalid("Phone number must have 8 to 15 digits."));
    }
    if digits.starts_with('0') {
        return Err(invalid("Country codes never start with 0."));
    }
    Ok(compact)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Valid emails are trimmed and lowercased; common real-world shapes pass.
    #[test]
    fn email_accepts_and_normalises() {
        assert_eq!(email("  Alice@Example.COM ").unwrap(), "alice@example.com");
        for ok in [
            "a.b+tag@sub.example.co.uk",
            "x_y-z@a-b.io",
            "o'neil@example.org",
            "1@2.xn--p1ai",
        ] {
            assert_eq!(email(ok).unwrap(), ok, "{ok}");
        }
    }

    /// Malformed emails are refused with `invalid_email`; empty is `required`.
    #[test]
    fn email_rejects_malformed() {
        for bad in [
            "plainaddress",
            "@example.com",
            "a@",
            "a@b",
            "a@@b.com",
            "a@b@c.com",
            "a b@c.com",
            ".a@b.com",
            "a.@b.com",
            "a..b@c.com",
            "a@-b.com",
            "a@b-.com",
            "a@b..com",
            "a@.b.com",
            "a@b.c",
            "a@1.2.3.4",
            "a@b_c.com",
            "é@example.com",
            "a@exämple.com",
            "a\"b@c.com",
        ] {
            let e = email(bad).unwrap_err();
            assert_eq!(e.code, codes::INVALID_EMAIL, "{bad}");
            assert_eq!(e.field, "email");
        }
        assert_eq!(email("   ").unwrap_err().code, codes::REQUIRED);
    }

    /// Length limits: 254 bytes overall and 64 for the local part.
    #[test]
    fn email_length_limits() {
        let domain = format!(
            "{}.{}.{}.com",
            "a".repeat(63),
            "b".repeat(63),
            "c".repeat(57)
        );
        let ok = format!("{}@{domain}", "l".repeat(64));
        assert_eq!(ok.len(), EMAIL_MAX_LEN);
        assert!(email(&ok).is_ok());
        let long_local = format!("{}@example.com", "l".repeat(65));
        assert!(email(&long_local).is_err());
        let too_long = format!("{}@{}.com", "l".repeat(60), "d".repeat(200));
        assert!(too_long.len() > EMAIL_MAX_LEN);
        assert_eq!(email(&too_long).unwrap_err().code, codes::INVALID_EMAIL);
    }

    /// Names are trimmed, required, bounded and single-line.
    #[test]
    fn name_rules() {
        assert_eq!(name("  Zoë  ").unwrap(), "Zoë");
        assert_eq!(name("").unwrap_err().code, codes::REQUIRED);
        assert_eq!(name(&"n".repeat(100)).unwrap().len(), 100);
        assert_eq!(name(&"n".repeat(101)).unwrap_err().code, codes::TOO_LONG);
        // 100 multi-byte characters are 100 characters, not 200.
        assert!(name(&"é".repeat(100)).is_ok());
        assert_eq!(name("a\nb").unwrap_err().code, codes::INVALID_FORMAT);
    }

    /// Multi-line text keeps inner newlines; single-line refuses them; minimums apply.
    #[test]
    fn text_rules() {
        assert_eq!(text("d", " a\nb\t ", 0, 10, true).unwrap(), "a\nb");
        assert_eq!(text("d", "", 0, 10, true).unwrap(), "");
        assert_eq!(
            text("d", "a\u{7}", 0, 10, true).unwrap_err().code,
            codes::INVALID_FORMAT
        );
        assert_eq!(
            text("d", "ab", 3, 10, false).unwrap_err().code,
            codes::OUT_OF_RANGE
        );
    }

    /// Typed separators are stripped and the canonical `+digits` form is returned.
    #[test]
    fn e164_accepts_common_typing() {
        for (input, want) in [
            ("+14155550100", "+14155550100"),
            (" +1 (415) 555-0100 ", "+14155550100"),
            ("+44 20 7946 0958", "+442079460958"),
            ("+49.30.123456", "+4930123456"),
            ("+1\u{a0}415\u{a0}555\u{a0}0100", "+14155550100"),
            ("+12345678", "+12345678"),
            ("+123456789012345", "+123456789012345"),
        ] {
            assert_eq!(e164(input).unwrap(), want, "{input}");
        }
    }

    /// Letters, a missing `+`, `00` prefixes, leading-zero country codes and wrong
    /// lengths are refused with `invalid_phone_number`; empty is `required`.
    #[test]
    fn e164_rejects_everything_else() {
        for bad in [
            "14155550100",
            "004415550100",
            "+0123456789",
            "+1234567",
            "+1234567890123456",
            "+1 415 CALL NOW",
            "+1-415-555-0100x12",
            "++14155550100",
            "+1+4155550100",
            "+",
            "+١٢٣٤٥٦٧٨٩",
            "+1/415/5550100",
        ] {
            let e = e164(bad).unwrap_err();
            assert_eq!(e.code, codes::INVALID_PHONE_NUMBER, "{bad}");
            assert_eq!(e.field, "phone_number");
        }
        assert_eq!(e164("  ").unwrap_err().code, codes::REQUIRED);
        assert_eq!(e164("()-").unwrap_err().code, codes::REQUIRED);
    }

    /// The error's Display names the field, for logs.
    #[test]
    fn error_display() {
        let e = ValidationError::new("x", codes::REQUIRED, "x is required.");
        assert_eq!(e.to_string(), "x: x is required.");
    }
}
