//! The API contract as the integration tests hold the Worker to it: every response the
//! test client ([`crate::api::ApiClient`]) receives is checked against
//! `workers/core/openapi.json` — its status must be documented for the operation, and
//! its body must fit that status's schema (JSON Schema draft 2020-12, as OpenAPI 3.1
//! uses, through the `jsonschema` crate).
//!
//! Paths are matched like the Worker's router: a literal segment wins over a parameter,
//! and one trailing slash names the same resource. A known path asked with another
//! method must be a 405 error and an unknown path a 404 error; a preflight (`OPTIONS`)
//! is an empty 204.

use std::collections::HashMap;
use std::sync::OnceLock;

use anyhow::{bail, Context as _};
use serde_json::{json, Value};

/// One documented answer: what its body must be.
enum Answer {
    /// A JSON body fitting this validator.
    Json(jsonschema::Validator),
    /// No body at all (204, 101).
    Empty,
    /// A body of another media type (TwiML, HTML), not checked here.
    Other(String),
}

struct Contract {
    /// Path templates split into segments (`None`: a `{parameter}`), with their path.
    paths: Vec<(Vec<Option<String>>, String)>,
    /// By (METHOD, path template): operationId and answers by status.
    operations: HashMap<(String, String), (String, HashMap<u16, Answer>)>,
    /// The shared error schema, for 404s and 405s outside any operation.
    error: jsonschema::Validator,
}

/// A validator for `schema`, whose `#/components/…` references resolve in `doc`.
fn validator(doc: &Value, schema: &Value) -> anyhow::Result<jsonschema::Validator> {
    let mut root = schema.clone();
    let obj = root.as_object_mut().context("a schema must be an object")?;
    obj.insert("components".into(), doc["components"].clone());
    jsonschema::draft202012::new(&root).map_err(|e| anyhow::anyhow!("{e}"))
}

impl Contract {
    fn load() -> anyhow::Result<Contract> {
        let doc: Value = serde_json::from_str(cmb_core::http::openapi::DOCUMENT)?;
        let mut paths = Vec::new();
        let mut operations = HashMap::new();
        for (path, item) in doc["paths"].as_object().context("paths")? {
            let segments = path
                .trim_matches('/')
                .split('/')
                .map(|s| (!s.starts_with('{')).then(|| s.to_owned()))
                .collect();
            paths.push((segments, path.clone()));
            for (method, op) in item.as_object().context("path item")? {
                let id = op["operationId"].as_str().unwrap_or(method).to_owned();
                let mut answers = HashMap::new();
                for (status, resp) in op["responses"].as_object().context("responses")? {
                    let status: u16 = status.parse().with_context(|| format!("{id} {status}"))?;
                    let answer = match resp.get("content").and_then(Value::as_object) {
                        None => Answer::Empty,
                        Some(content) => match content.get("application/json") {
                            Some(media) => Answer::Json(
                                validator(&doc, &media["schema"])
                                    .with_context(|| format!("{id} {status}"))?,
                            ),
                            None => Answer::Other(content.keys().cloned().collect()),
                        },
                    };
                    answers.insert(status, answer);
                }
                operations.insert((method.to_uppercase(), path.clone()), (id, answers));
            }
        }
        let error = validator(&doc, &json!({ "$ref": "#/components/schemas/Error" }))?;
        Ok(Contract {
            paths,
            operations,
            error,
        })
    }

    /// The templates `path` fits, the most specific (fewest parameters) only.
    fn templates(&self, path: &str) -> Vec<&str> {
        let trimmed = path.strip_prefix('/').unwrap_or(path);
        let trimmed = trimmed.strip_suffix('/').unwrap_or(trimmed);
        let segments: Vec<&str> = trimmed.split('/').collect();
        let fitting: Vec<(usize, &str)> = self
            .paths
            .iter()
            .filter(|(pattern, _)| {
                pattern.len() == segments.len()
                    && pattern.iter().zip(&segments).all(|(p, s)| match p {
                        Some(literal) => literal == s,
                        None => !s.is_empty(),
                    })
            })
            .map(|(pattern, path)| {
                (
                    pattern.iter().filter(|p| p.is_none()).count(),
                    path.as_str(),
                )
            })
            .collect();
        let fewest = fitting.iter().map(|(n, _)| *n).min();
        fitting
            .into_iter()
            .filter(|(n, _)| Some(*n) == fewest)
            .map(|(_, p)| p)
            .collect()
    }
}

fn contract() -> anyhow::Result<&'static Contract> {
    static CONTRACT: OnceLock<Result<Contract, String>> = OnceLock::new();
    CONTRACT
        .get_or_init(|| Contract::load().map_err(|e| format!("{e:#}")))
        .as_ref()
        .map_err(|e| anyhow::anyhow!("openapi.json cannot be used: {e}"))
}

fn fits(v: &jsonschema::Validator, body: &Value) -> Result<(), String> {
    let problems: Vec<String> = v
        .iter_errors(body)
        .map(|e| format!("at '{}': {e}", e.instance_path()))
        .collect();
    if problems.is_empty() {
        Ok(())
    } else {
        Err(problems.join("; "))
    }
}

/// Checks one response of the Worker against the document: `path` as requested (query
/// string allowed), `content_type` its header, `body` its parsed JSON (`Null` when
/// empty).
pub fn check(
    method: &str,
    path: &str,
    status: u16,
    content_type: Option<&str>,
    body: &Value,
) -> anyhow::Result<()> {
    let contract = contract()?;
    let method = method.to_ascii_uppercase();
    let path = path.split('?').next().unwrap_or(path);
    let templates = contract.templates(path);
    let what = format!("{method} {path} answered {status}");
    if method == "OPTIONS" {
        if status != 204 || !body.is_null() {
            bail!("{what} with {body}: a preflight is an empty 204");
        }
        return Ok(());
    }
    let Some((id, answers)) = templates
        .iter()
        .find_map(|t| contract.operations.get(&(method.clone(), t.to_string())))
    else {
        // Outside every operation: the router's own errors.
        let expected = if templates.is_empty() { 404 } else { 405 };
        if status != expected {
            bail!("{what}, but it is no operation of openapi.json: only {expected} is right");
        }
        return fits(&contract.error, body).map_err(|e| anyhow::anyhow!("{what}: {e}: {body}"));
    };
    let Some(answer) = answers.get(&status) else {
        let mut documented: Vec<_> = answers.keys().collect();
        documented.sort();
        bail!("{what}, which openapi.json does not document for {id} (documented: {documented:?}): {body}");
    };
    match answer {
        Answer::Empty if body.is_null() => Ok(()),
        Answer::Empty => bail!("{what} with a body, but {id} {status} has none: {body}"),
        Answer::Other(media) => bail!("{what} with JSON, but {id} {status} is {media}: {body}"),
        Answer::Json(v) => {
            if !content_type.is_some_and(|c| c.starts_with("application/json")) {
                bail!("{what} with content-type {content_type:?}, but {id} {status} is application/json");
            }
            fits(v, body)
                .map_err(|e| anyhow::anyhow!("{what}, not as {id} documents it: {e}: {body}"))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The document compiles, and the checks tell documented answers from others.
    #[test]
    fn documented_answers_pass_and_others_fail() {
        let user = json!({ "user": {
            "id": "u1", "email": "a@b.co", "name": "A", "phone_number": null, "role": "user",
            "tier": "free", "credits": 0, "is_banned": false, "phone_verified": false,
            "created_at": "2030-01-01T00:00:00Z", "timezone": null } });
        let json_ct = Some("application/json");
        check("GET", "/api/me", 200, json_ct, &user).unwrap();
        check("GET", "/api/me/", 200, json_ct, &user).unwrap();
        let mut wrong = user.clone();
        wrong["user"]["credits"] = json!("many");
        assert!(check("GET", "/api/me", 200, json_ct, &wrong).is_err());
        let error =
            |code: &str| json!({ "error": { "code": code, "message": "m", "request_id": "r" } });
        check("GET", "/api/me", 401, json_ct, &error("unauthorized")).unwrap();
        // A code not listed for the status, and a status not documented at all.
        assert!(check("GET", "/api/me", 401, json_ct, &error("invalid_code")).is_err());
        assert!(check("GET", "/api/me", 418, json_ct, &error("teapot")).is_err());
        // Literals win over parameters; the router's own errors; preflights.
        let history = json!({ "calls": [], "total": 0 });
        check("GET", "/api/calls/history?limit=5", 200, json_ct, &history).unwrap();
        check(
            "POST",
            "/api/me",
            405,
            json_ct,
            &error("method_not_allowed"),
        )
        .unwrap();
        check("GET", "/nowhere", 404, json_ct, &error("not_found")).unwrap();
        assert!(check("GET", "/nowhere", 200, json_ct, &json!({})).is_err());
        check("OPTIONS", "/api/me", 204, None, &Value::Null).unwrap();
        check("POST", "/api/auth/logout", 204, None, &Value::Null).unwrap();
        assert!(check("POST", "/api/auth/logout", 204, None, &json!({})).is_err());
        assert!(check("GET", "/api/me", 200, Some("text/plain"), &user).is_err());
    }
}
